//! The seccomp sandbox: a thread that makes a system call its filter forbids ends nvmm with an
//! `error:` and a `hint:` line naming the thread and the call, exit code 4, and the terminal
//! restored. `NVMM_TEST_FORBIDDEN_SYSCALL=THREAD` makes that thread call getppid (which no
//! filter allows) right after installing its filter. Every other test runs with the filters on.
//! Confining a thread also drops its capabilities: the last test checks what a root nvmm keeps.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod netns;
mod pty;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use netns::Netns;
use pty::*;

/// nvmm's exit code when it broke its own sandbox.
const EXIT_SANDBOX: i32 = 4;
const HOOK: &str = "NVMM_TEST_FORBIDDEN_SYSCALL";
const HINT: &str = "hint: this is a bug in nvmm, please report it; --no-seccomp runs without \
                    filters (for debugging only)";

/// The report of a violation by `thread`: getppid is system call 110 on x86_64.
fn report(thread: &str) -> String {
    format!("error: thread {thread} made a forbidden system call (110); the VM is stopped\n{HINT}")
}

/// Private state directories, so tests never touch /run/nvmm or /var/lib/nvmm.
struct StateDirs(PathBuf);

impl StateDirs {
    fn new(test: &str) -> Self {
        Self(std::env::temp_dir().join(format!("nvmm-seccomp-{}-{test}", std::process::id())))
    }

    fn apply(&self, cmd: &mut Command) {
        cmd.env("NVMM_RUNTIME_DIR", self.0.join("run"))
            .env("NVMM_STATE_DIR", self.0.join("state"));
    }
}

impl Drop for StateDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_forbidden_call_ends_nvmm_with_a_report_whatever_the_thread() {
    if !kvm_or_skip("seccomp threads") {
        return;
    }
    for (thread, label) in [("vcpu", "vcpu0"), ("main", "main"), ("control", "control")] {
        let dirs = StateDirs::new(thread);
        // `halt` never ends by itself: only the violation ends this run.
        let mut cmd = guest_command("nvmm_test=halt", &["--name", "sandboxed"]);
        cmd.env(HOOK, thread);
        dirs.apply(&mut cmd);
        let out = run(cmd);
        assert_eq!(out.code(), Some(EXIT_SANDBOX), "{thread}: {out:?}");
        assert!(
            out.stderr.contains(&report(label)),
            "{thread}: {}",
            out.stderr
        );
    }
}

#[test]
fn the_port_forwarders_are_sandboxed_too() {
    if !kvm_or_skip("seccomp forwarder") {
        return;
    }
    let Some(ns) = Netns::new("seccomp forwarder") else {
        return;
    };
    let dirs = StateDirs::new("fwd");
    let mut cmd = ns.command(NVMM);
    cmd.args([
        "run",
        "--kernel",
        GUEST,
        "--mem",
        MEM,
        "--net",
        "--name",
        "fwd",
        "--cmdline",
        "nvmm_test=halt",
    ])
    .env(HOOK, "fwd");
    dirs.apply(&mut cmd);
    let out = run(cmd);
    assert_eq!(out.code(), Some(EXIT_SANDBOX), "{out:?}");
    // The ssh forwarder starts first, on a port the system picks.
    assert!(
        out.stderr.contains("error: thread fwd:") && out.stderr.contains(HINT),
        "{}",
        out.stderr
    );
}

#[test]
fn the_terminal_is_restored_after_a_violation() {
    if !kvm_or_skip("seccomp tty") {
        return;
    }
    let pty = open_pty();
    let before = settings(&pty.slave);
    // The main thread installs its filter after entering raw mode.
    let mut cmd = guest_command("nvmm_test=halt", &[]);
    cmd.env(HOOK, "main");
    let (child, screen) = spawn_on(&pty, cmd);
    wait_for(&screen, "made a forbidden system call");
    assert_eq!(wait_exit(child), Some(EXIT_SANDBOX));
    assert_eq!(settings(&pty.slave), before, "terminal not restored");
    // Restored before the report: its lines start at the left margin.
    wait_for(&screen, "the VM is stopped\r\nhint: ");
}

#[test]
fn a_background_vm_reports_a_violation_in_its_log() {
    if !kvm_or_skip("seccomp background") {
        return;
    }
    let dirs = StateDirs::new("background");
    let mut cmd = guest_command("nvmm_test=halt", &["-d", "--name", "bg"]);
    cmd.env(HOOK, "main");
    dirs.apply(&mut cmd);
    // The main thread installs its filter after telling `nvmm run -d` that the VM runs.
    let out = run(cmd);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let log = dirs.0.join("run/vms/bg/nvmm.log");
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&report("main")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report in {log:?}: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn no_seccomp_runs_without_filters() {
    if !kvm_or_skip("no-seccomp") {
        return;
    }
    let mut cmd = guest_command("nvmm_test=hello", &["--no-seccomp"]);
    cmd.env(HOOK, "vcpu");
    let out = run(cmd);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("hello from the nvmm test guest"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("--no-seccomp: every thread runs without its seccomp filter"),
        "{}",
        out.stderr
    );
}

/// `FIELD:` of each thread of `pid`'s `/proc/PID/task/TID/status`: (thread name, value).
fn thread_status(pid: u32, field: &str) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let value = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap()
        };
        threads.push((value("Name:"), value(field)));
    }
    threads
}

/// The pid of background VM `name`, once its process has confined its main thread (it does
/// so right after telling `nvmm run -d` that the VM runs).
fn confined_vm_pid(dirs: &StateDirs, name: &str) -> u32 {
    let pid: u32 = std::fs::read_to_string(dirs.0.join(format!("run/vms/{name}/pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while thread_status(pid, "NoNewPrivs:")
        .iter()
        .any(|(_, value)| value != "1")
    {
        assert!(std::time::Instant::now() < deadline, "never confined");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    pid
}

#[test]
fn after_set_up_only_the_main_thread_keeps_cap_net_admin_and_only_on_a_network() {
    if !kvm_or_skip("capabilities") {
        return;
    }
    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "capabilities",
            "needs root (a root nvmm is what drops them)",
        );
        return;
    }
    let Some(ns) = Netns::new("capabilities") else {
        return;
    };
    let dirs = StateDirs::new("caps");
    const NET_ADMIN: &str = "0000000000001000";
    const NONE: &str = "0000000000000000";
    for (name, network) in [("netted", true), ("alone", false)] {
        let mut cmd = ns.command(NVMM);
        cmd.args(["run", "-d", "--name", name, "--kernel", GUEST, "--mem", MEM]);
        cmd.args(["--cmdline", "nvmm_test=halt"]);
        if network {
            cmd.arg("--net");
        }
        dirs.apply(&mut cmd);
        let out = run(cmd);
        assert_eq!(out.code(), Some(0), "{out:?}");
        let pid = confined_vm_pid(&dirs, name);
        let kept = if network { NET_ADMIN } else { NONE };
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            // KVM's own worker (kvm-nx-lpage-recovery) shows up as a thread of the process
            // but runs kernel code only; where it is made with the VM, it has the set-up's
            // capabilities.
            let threads = thread_status(pid, field).into_iter();
            for (thread, value) in threads.filter(|(thread, _)| !thread.starts_with("kvm-")) {
                let expected = if thread == "nvmm" { kept } else { NONE };
                assert_eq!(value, expected, "{name}: {thread} {field}");
            }
        }
        for field in ["CapInh:", "CapAmb:"] {
            assert!(
                thread_status(pid, field).iter().all(|(_, v)| v == NONE),
                "{name}: {field}"
            );
        }
    }
    assert!(
        ns.links().iter().any(|l| l == "nv-netted"),
        "{:?}",
        ns.links()
    );
    // What stayed is enough to leave the network: the tap and the bridge go with the VM.
    for name in ["netted", "alone"] {
        let mut cmd = ns.command(NVMM);
        cmd.args(["stop", "--force", name]);
        dirs.apply(&mut cmd);
        let out = run(cmd);
        assert_eq!(out.code(), Some(0), "{out:?}");
    }
    let links = ns.links();
    assert!(
        !links.iter().any(|l| l == "nv-netted" || l == "nvmm0"),
        "{links:?}"
    );
}
