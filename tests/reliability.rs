//! Bad input and faults: each test is one row of the table in docs/reliability.md. Every bad
//! input must end in one `error:` line and one `hint:` line right after it (clap's usage errors:
//! its `error:` line and its `--help` tip), the documented exit code, and nothing left behind:
//! no VM files in the runtime directory (logs and a network's lock file may stay), no disk
//! image in the state directory, no tap or bridge in the test's network namespace, no nvmm
//! process. Each test has private state directories and, where a network is involved, a
//! network namespace of its own, so they run in parallel.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod fake_flake;
mod netns;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fake_flake::FakeFlake;
use netns::Netns;

// ---- the harness ----

/// Private runtime and state directories (and room for fixtures), removed on drop; any VM a
/// failed test left running there is killed first.
struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(test: &str) -> Dirs {
        let root = std::env::temp_dir().join(format!("nvmm-rel-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Dirs { root }
    }

    fn runtime(&self) -> PathBuf {
        self.root.join("run")
    }

    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// A fixture path under the test's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn prepare(&self, cmd: &mut Command, args: &[&str]) {
        cmd.args(args)
            .env("NVMM_RUNTIME_DIR", self.runtime())
            .env("NVMM_STATE_DIR", self.state())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }

    /// `nvmm ARGS` with these directories.
    fn nvmm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(NVMM);
        self.prepare(&mut cmd, args);
        cmd
    }

    /// `nvmm ARGS` inside `ns`.
    fn nvmm_in(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut cmd = ns.command(NVMM);
        self.prepare(&mut cmd, args);
        cmd
    }

    /// `sh -c SCRIPT` (which runs `$NVMM`) with these directories, e.g. in a mount namespace.
    fn shell(&self, wrapper: &[&str], script: &str) -> Command {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).args(["sh", "-c", script]);
        self.prepare(&mut cmd, &[]);
        cmd.env("NVMM", NVMM).env("GUEST", GUEST);
        cmd
    }

    fn nothing_left(&self, ns: Option<&Netns>) {
        assert_nothing_left(&self.runtime(), &self.state(), ns);
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        kill_vms(&self.runtime());
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SIGKILLs the nvmm of every VM recorded under `runtime` (a failed test's leftovers).
fn kill_vms(runtime: &Path) {
    for entry in std::fs::read_dir(runtime.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let pid = std::fs::read_to_string(entry.path().join("pid"));
        if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A failed command: `code`, one `error:` line containing `error` (nix's own message may go on
/// over indented lines), then one `hint:` line containing `hint`; before them only progress
/// (nvmm's `nvmm: ...` lines, nix's relayed output), after them only `nvmm: ...` lines; nothing
/// on stdout (no guest ran). clap's usage errors (exit 2): its `error:` line and its tip.
fn assert_fails(out: &Output, code: i32, error: &str, hint: &str) {
    assert_eq!(out.code(), Some(code), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "the guest must not have run: {out:?}"
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    let errors: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {out:?}");
    let at = errors[0];
    assert!(lines[at].contains(error), "{error:?} not in {out:?}");
    if code == 2 {
        assert!(
            out.stderr.contains("For more information, try '--help'."),
            "{out:?}"
        );
        assert!(out.stderr.contains(hint), "{hint:?} not in {out:?}");
        return;
    }
    let hints: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].starts_with("hint: "))
        .collect();
    assert_eq!(hints.len(), 1, "one hint line: {out:?}");
    let hint_at = hints[0];
    assert!(hint_at > at, "the hint follows the error: {out:?}");
    assert!(
        lines[at + 1..hint_at].iter().all(|l| l.starts_with(' ')),
        "only the error's own indented lines between error and hint: {out:?}"
    );
    assert!(lines[hint_at].contains(hint), "{hint:?} not in {out:?}");
    assert!(
        lines[hint_at + 1..].iter().all(|l| l.starts_with("nvmm: ")),
        "after the hint only nvmm's progress: {out:?}"
    );
}

/// Every file under `dir` but logs (a background VM starts its `nvmm.log` just after its
/// start was reported).
fn state_files(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "log"))
        .collect()
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Nothing of a VM is left: in `runtime` only logs and networks' lock files, in `state` no
/// disk image (addresses, subnets, ssh keys and the guest module are kept on purpose), in `ns`
/// no interface but lo, and no process that has `runtime` as its NVMM_RUNTIME_DIR.
fn assert_nothing_left(runtime: &Path, state: &Path, ns: Option<&Netns>) {
    let left: Vec<PathBuf> = files(runtime)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "log"))
        .filter(|p| {
            !(p.ends_with("lock")
                && p.parent()
                    .is_some_and(|d| d.parent().is_some_and(|n| n.ends_with("net"))))
        })
        .collect();
    assert!(left.is_empty(), "left in the runtime directory: {left:?}");
    let images: Vec<PathBuf> = files(state)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert!(images.is_empty(), "disk images left: {images:?}");
    if let Some(ns) = ns {
        assert_eq!(ns.links(), vec!["lo".to_owned()], "no tap, no bridge left");
    }
    // A VM's nvmm releases its name (what `stop` waits for) a moment before it exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let processes = processes_with_runtime_dir(runtime);
        if processes.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nvmm processes left: {processes:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes (not zombies) whose environment names `runtime` as NVMM_RUNTIME_DIR.
fn processes_with_runtime_dir(runtime: &Path) -> Vec<i32> {
    let wanted = format!("NVMM_RUNTIME_DIR={}", runtime.display()).into_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_slice()))
        })
        .collect()
}

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root (namespaces, mounts, setpriv)");
    }
    root
}

/// A runner directory (docs/runner.md) booting the test guest with `json`'s description.
fn runner(dirs: &Dirs, name: &str, json: &str) -> String {
    let dir = dirs.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(GUEST, dir.join("vmlinux")).unwrap();
    std::fs::write(dir.join("nvmm.json"), json).unwrap();
    dir.to_string_lossy().into_owned()
}

/// A runner of VM `name` running guest scenario `cmdline`, with `extra` JSON members.
fn test_runner(dirs: &Dirs, name: &str, cmdline: &str, extra: &str) -> String {
    runner(
        dirs,
        name,
        &format!(
            r#"{{"version": 1, "name": "{name}", "kernel": "vmlinux", "memoryMiB": 32,
                "cmdline": "{cmdline}", "console": "serial", "cmdlineNetwork": true {extra}}}"#
        ),
    )
}

/// Holds 127.0.0.1:PORT (a free port) inside `ns` until the returned sender is dropped.
fn hold_port(ns: &Netns) -> (u16, std::sync::mpsc::Sender<()>) {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: setns only changes this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        port_tx.send(listener.local_addr().unwrap().port()).unwrap();
        let _ = done_rx.recv();
    });
    (port_rx.recv().unwrap(), done_tx)
}

/// Waits until `nvmm ps` in `ns` says `name` runs.
fn wait_running(dirs: &Dirs, ns: Option<&Netns>, name: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let cmd = match ns {
            Some(ns) => dirs.nvmm_in(ns, &["ps", "--json"]),
            None => dirs.nvmm(&["ps", "--json"]),
        };
        let out = run(cmd);
        let ps: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let running = ps
            .as_array()
            .unwrap()
            .iter()
            .any(|vm| vm["name"] == name && vm["state"] == "running");
        if running {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never ran: {ps}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- nvmm run ----

/// `nvmm run --name bad --kernel GUEST --mem 32 EXTRA...` (a name, so the VM has state files
/// that must go).
fn run_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--name", "bad", "--kernel", GUEST, "--mem", MEM];
    args.extend_from_slice(extra);
    args
}

#[test]
fn run_kernel_missing() {
    if !kvm_or_skip("run kernel missing") {
        return;
    }
    let dirs = Dirs::new("kernel-missing");
    let out = run(dirs.nvmm(&["run", "--name", "bad", "--kernel", "/nonexistent/vmlinux"]));
    assert_fails(
        &out,
        1,
        "cannot read kernel /nonexistent/vmlinux: No such file or directory",
        "check the path given to --kernel",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_kernel_unreadable() {
    if !kvm_or_skip("run kernel unreadable") {
        return;
    }
    let dirs = Dirs::new("kernel-unreadable");
    let out = run(dirs.nvmm(&["run", "--name", "bad", "--kernel", "/", "--mem", MEM]));
    assert_fails(
        &out,
        1,
        "cannot read kernel /: Is a directory",
        "check the path given to --kernel",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_kernel_wrong_format() {
    if !kvm_or_skip("run kernel wrong format") {
        return;
    }
    let dirs = Dirs::new("kernel-format");
    let kernel = dirs.path("vmlinux");
    std::fs::write(&kernel, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let kernel = kernel.to_string_lossy().into_owned();
    let out = run(dirs.nvmm(&["run", "--name", "bad", "--kernel", &kernel, "--mem", MEM]));
    assert_fails(
        &out,
        1,
        "is neither an ELF vmlinux nor a bzImage",
        "--kernel takes an x86_64 ELF vmlinux or a bzImage",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_initrd_missing() {
    if !kvm_or_skip("run initrd missing") {
        return;
    }
    let dirs = Dirs::new("initrd-missing");
    let out = run(dirs.nvmm(&run_args(&["--initrd", "/nonexistent/initrd"])));
    assert_fails(
        &out,
        1,
        "cannot read initrd /nonexistent/initrd: No such file or directory",
        "check the path given to --initrd",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_initrd_larger_than_memory() {
    if !kvm_or_skip("run initrd too large") {
        return;
    }
    let dirs = Dirs::new("initrd-large");
    let initrd = dirs.path("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let initrd = initrd.to_string_lossy().into_owned();
    let out = run(dirs.nvmm(&run_args(&["--initrd", &initrd])));
    assert_fails(
        &out,
        1,
        "bytes are free above the kernel",
        "give the VM more memory, e.g. --mem",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_memory_zero() {
    let dirs = Dirs::new("mem-zero");
    let out = run(dirs.nvmm(&["run", "--name", "bad", "--kernel", GUEST, "--mem", "0"]));
    assert_fails(
        &out,
        1,
        "0 MiB of memory is too little; nvmm needs at least 8 MiB",
        "choose --mem 8 or more",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_memory_larger_than_the_host() {
    let dirs = Dirs::new("mem-huge");
    let out = run(dirs.nvmm(&[
        "run",
        "--name",
        "bad",
        "--kernel",
        GUEST,
        "--mem",
        "100000000",
    ]));
    assert_fails(
        &out,
        1,
        "100000000 MiB of memory requested but this host has",
        "choose --mem below",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_cpus_zero() {
    let dirs = Dirs::new("cpus-zero");
    let out = run(dirs.nvmm(&run_args(&["--cpus", "0"])));
    assert_fails(
        &out,
        2,
        "invalid value '0' for '--cpus <N>'",
        "0 is not in 1..=254",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_unknown_flag() {
    let dirs = Dirs::new("unknown-flag");
    let out = run(dirs.nvmm(&run_args(&["--memory", "64"])));
    assert_fails(
        &out,
        2,
        "unexpected argument '--memory' found",
        "Usage: nvmm run",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_bad_forward_spec() {
    let dirs = Dirs::new("bad-forward");
    let out = run(dirs.nvmm(&run_args(&["--net", "--forward", "80"])));
    assert_fails(
        &out,
        2,
        "invalid value '80' for '--forward",
        "is not [HOSTADDR:]HOSTPORT:GUESTPORT (for example 2222:22",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_disk_missing() {
    if !kvm_or_skip("run disk missing") {
        return;
    }
    let dirs = Dirs::new("disk-missing");
    let out = run(dirs.nvmm(&run_args(&["--disk", "/nonexistent/disk.img"])));
    assert_fails(
        &out,
        1,
        "cannot open disk /nonexistent/disk.img read-write: No such file or directory",
        "check the path given to --disk",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_dev_kvm_absent() {
    if !root_or_skip("run /dev/kvm absent") {
        return;
    }
    let dirs = Dirs::new("kvm-absent");
    // An empty /dev in a private mount namespace: no /dev/kvm there.
    let out = run(dirs.shell(
        &["unshare", "--mount", "--"],
        "mount -t tmpfs none /dev && exec $NVMM run --name bad --kernel $GUEST --mem 32",
    ));
    assert_fails(
        &out,
        1,
        "cannot open /dev/kvm: No such file or directory",
        "KVM is not available: enable virtualization in the firmware and load the kvm_intel or \
         kvm_amd module",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_dev_kvm_not_permitted() {
    if !root_or_skip("run /dev/kvm not permitted") || !kvm_or_skip("run /dev/kvm not permitted") {
        return;
    }
    let dirs = Dirs::new("kvm-denied");
    // nobody may write its state (as a user's own XDG directories) but not open /dev/kvm.
    std::os::unix::fs::chown(&dirs.root, Some(65534), Some(65534)).unwrap();
    let guest = Path::new(GUEST);
    let readable = guest
        .ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        && std::fs::metadata(guest).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
    if !readable {
        skip(
            "run /dev/kvm not permitted",
            "the test guest is not readable by nobody",
        );
        return;
    }
    let out = run(dirs.shell(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        "exec $NVMM run --name bad --kernel $GUEST --mem 32",
    ));
    assert_fails(
        &out,
        1,
        "cannot open /dev/kvm: Permission denied",
        "add yourself to the kvm group",
    );
    dirs.nothing_left(None);
}

/// `sh -c` in a mount namespace where /dev/net (so /dev/net/tun) is an empty directory.
const WITHOUT_TUN: &str = "mount -t tmpfs none /dev/net && exec $NVMM";

#[test]
fn run_tun_missing() {
    if !kvm_or_skip("run tun missing") {
        return;
    }
    let Some(ns) = Netns::new("run tun missing") else {
        return;
    };
    let dirs = Dirs::new("tun-missing");
    let script = format!("{WITHOUT_TUN} run --name bad --kernel $GUEST --mem 32 --net");
    let out = run(dirs.shell(
        &["ip", "netns", "exec", &ns.name, "unshare", "--mount", "--"],
        &script,
    ));
    assert_fails(
        &out,
        1,
        "cannot create tap nv-bad: No such file or directory",
        "VM networking needs the tun driver and /dev/net/tun: `modprobe tun`",
    );
    dirs.nothing_left(Some(&ns));
}

#[test]
fn run_tap_without_tun() {
    if !kvm_or_skip("run --tap without tun") {
        return;
    }
    let Some(ns) = Netns::new("run --tap without tun") else {
        return;
    };
    let dirs = Dirs::new("tap-no-tun");
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap", "vnet_hdr"]);
    let script = format!("{WITHOUT_TUN} run --name bad --kernel $GUEST --mem 32 --tap tap0");
    let out = run(dirs.shell(
        &["ip", "netns", "exec", &ns.name, "unshare", "--mount", "--"],
        &script,
    ));
    assert_fails(
        &out,
        1,
        "cannot open tap device tap0: No such file or directory",
        "VM networking needs the tun driver",
    );
    // The tap is the user's: nvmm leaves it alone.
    ns.ip(&["link", "del", "tap0"]);
    dirs.nothing_left(Some(&ns));
}

#[test]
fn run_subnet_clashes_with_a_host_route() {
    if !kvm_or_skip("run subnet clash") {
        return;
    }
    let Some(ns) = Netns::new("run subnet clash") else {
        return;
    };
    let dirs = Dirs::new("subnet-clash");
    ns.ip(&["route", "add", "10.99.0.0/16", "dev", "lo"]);
    let out = run(dirs.nvmm_in(&ns, &run_args(&["--net", "--subnet", "10.99.5.0/24"])));
    assert_fails(
        &out,
        1,
        "requested subnet 10.99.5.0/24 of network nvmm0 overlaps the host's route 10.99.0.0/16 \
         dev lo",
        "choose a free private range with --subnet",
    );
    dirs.nothing_left(Some(&ns));
}

#[test]
fn run_forward_port_in_use() {
    if !kvm_or_skip("run port in use") {
        return;
    }
    let Some(ns) = Netns::new("run port in use") else {
        return;
    };
    let dirs = Dirs::new("port-in-use");
    let (port, holder) = hold_port(&ns);
    let forward = format!("{port}:80");
    let out = run(dirs.nvmm_in(&ns, &run_args(&["--net", "--forward", &forward])));
    drop(holder);
    assert_fails(
        &out,
        1,
        &format!("cannot listen on 127.0.0.1:{port}: the port is already in use"),
        "pick another host port (in --forward",
    );
    dirs.nothing_left(Some(&ns));
}

#[test]
fn run_invalid_network_name() {
    let dirs = Dirs::new("net-name");
    let out = run(dirs.nvmm(&run_args(&["--net", "this-name-is-too-long"])));
    assert_fails(
        &out,
        1,
        "network name \"this-name-is-too-long\" cannot name a bridge",
        "--net names the host bridge, e.g. --net nvmm1",
    );
    dirs.nothing_left(None);
}

#[test]
fn run_name_that_runs() {
    if !kvm_or_skip("run name clash") {
        return;
    }
    let dirs = Dirs::new("run-clash");
    let out = run(dirs.nvmm(&run_args(&["-d", "--cmdline", "nvmm_test=wait"])));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let before = state_files(&dirs.runtime());

    let out = run(dirs.nvmm(&run_args(&["--cmdline", "nvmm_test=hello"])));
    assert_fails(
        &out,
        1,
        "VM bad is already running (process ",
        "attach to it with `nvmm console bad`, or stop it with `nvmm stop bad`",
    );
    // The running VM is untouched.
    assert_eq!(state_files(&dirs.runtime()), before);
    wait_running(&dirs, None, "bad");

    let out = run(dirs.nvmm(&["stop", "bad"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    dirs.nothing_left(None);
}

// ---- nvmm boot ----

#[test]
fn boot_runner_without_nvmm_json() {
    let dirs = Dirs::new("runner-empty");
    let dir = dirs.path("runner");
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(dirs.nvmm(&["boot", "--runner", dir.to_str().unwrap()]));
    assert_fails(
        &out,
        1,
        "nvmm.json: No such file or directory",
        "docs/runner.md describes the runner directory and nvmm.json",
    );
    dirs.nothing_left(None);
}

#[test]
fn boot_runner_broken_nvmm_json() {
    let dirs = Dirs::new("runner-broken");
    let dir = runner(
        &dirs,
        "runner",
        r#"{"version": 1, "kernel": "vmlinux", "cmdline": """#,
    );
    let out = run(dirs.nvmm(&["boot", "--runner", &dir]));
    assert_fails(
        &out,
        1,
        "nvmm.json is not a valid runner description: EOF while parsing",
        "docs/runner.md describes the runner directory and nvmm.json",
    );
    dirs.nothing_left(None);
}

#[test]
fn boot_runner_kernel_missing() {
    let dirs = Dirs::new("runner-kernel");
    let dir = dirs.path("runner");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("nvmm.json"),
        r#"{"version": 1, "kernel": "bzImage", "cmdline": ""}"#,
    )
    .unwrap();
    let out = run(dirs.nvmm(&["boot", "--runner", dir.to_str().unwrap()]));
    assert_fails(
        &out,
        1,
        "nvmm.json names kernel ",
        "docs/runner.md describes the runner directory and nvmm.json",
    );
    assert!(
        out.stderr.contains("bzImage, which does not exist"),
        "{out:?}"
    );
    dirs.nothing_left(None);
}

#[test]
fn boot_memory_zero() {
    if !kvm_or_skip("boot --mem 0") {
        return;
    }
    let Some(ns) = Netns::new("boot --mem 0") else {
        return;
    };
    let dirs = Dirs::new("boot-mem-zero");
    let dir = test_runner(&dirs, "zero", "nvmm_test=hello", "");
    for detach in [false, true] {
        let mut args = vec!["boot", "--runner", &dir, "--mem", "0"];
        if detach {
            args.push("-d");
        }
        let out = run(dirs.nvmm_in(&ns, &args));
        assert_fails(
            &out,
            1,
            "0 MiB of memory is too little",
            "choose --mem 8 or more",
        );
        dirs.nothing_left(Some(&ns));
    }
}

#[test]
fn boot_cpus_zero() {
    let dirs = Dirs::new("boot-cpus-zero");
    let dir = test_runner(&dirs, "cpus", "nvmm_test=hello", "");
    let out = run(dirs.nvmm(&["boot", "--runner", &dir, "--cpus", "0"]));
    assert_fails(
        &out,
        2,
        "invalid value '0' for '--cpus <N>'",
        "0 is not in 1..=254",
    );
    dirs.nothing_left(None);
}

#[test]
fn boot_name_that_runs() {
    if !kvm_or_skip("boot name clash") {
        return;
    }
    let Some(ns) = Netns::new("boot name clash") else {
        return;
    };
    let dirs = Dirs::new("boot-clash");
    let dir = test_runner(&dirs, "busy", "nvmm_test=wait", "");
    let out = run(dirs.nvmm_in(&ns, &["boot", "-d", "--runner", &dir]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let before = (state_files(&dirs.runtime()), ns.links());

    let out = run(dirs.nvmm_in(&ns, &["boot", "--runner", &dir]));
    assert_fails(
        &out,
        1,
        "VM busy is already running (process ",
        "attach to it with `nvmm console busy`, or stop it with `nvmm stop busy`",
    );
    assert_eq!(
        (state_files(&dirs.runtime()), ns.links()),
        before,
        "busy is untouched"
    );
    wait_running(&dirs, Some(&ns), "busy");

    let out = run(dirs.nvmm_in(&ns, &["stop", "busy"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    dirs.nothing_left(Some(&ns));
}

#[test]
fn boot_forward_port_of_the_configuration_in_use() {
    if !kvm_or_skip("boot forwardPorts in use") {
        return;
    }
    let Some(ns) = Netns::new("boot forwardPorts in use") else {
        return;
    };
    let dirs = Dirs::new("boot-port");
    let (port, holder) = hold_port(&ns);
    let dir = test_runner(
        &dirs,
        "web",
        "nvmm_test=hello",
        &format!(r#", "forwardPorts": [{{"host": {port}, "guest": 80}}]"#),
    );
    for detach in [false, true] {
        let mut args = vec!["boot", "--runner", &dir];
        if detach {
            args.push("-d");
        }
        let out = run(dirs.nvmm_in(&ns, &args));
        assert_fails(
            &out,
            1,
            &format!("cannot listen on 127.0.0.1:{port}: the port is already in use"),
            "pick another host port (in --forward, or nvmm.forwardPorts of the configuration)",
        );
        if detach {
            assert!(out.stderr.ends_with("nvmm: web did not start\n"), "{out:?}");
        }
        dirs.nothing_left(Some(&ns));
    }
    drop(holder);
}

// ---- nvmm up (through the real nix, on the stand-in flake) ----

fn flake_nothing_left(flake: &FakeFlake, ns: Option<&Netns>) {
    assert_nothing_left(&flake.runtime_dir(), &flake.state_dir(), ns);
}

#[test]
fn up_flake_without_configurations() {
    let flake = FakeFlake::new(r#"{"noConfigurations": true}"#);
    let out = run(flake.nvmm(&["up"]));
    assert_fails(
        &out,
        1,
        "has no nixosConfigurations",
        "define nixosConfigurations.NAME = nixpkgs.lib.nixosSystem",
    );
    flake_nothing_left(&flake, None);
}

#[test]
fn up_without_a_flake() {
    let flake = FakeFlake::new(r#"{"systems": {}}"#);
    let out = run(flake.nvmm(&["up", "--flake", "/nonexistent"]));
    assert_fails(
        &out,
        1,
        "no flake.nix in /nonexistent",
        "run nvmm in the directory of your flake.nix, or point --flake at it",
    );
    flake_nothing_left(&flake, None);
}

#[test]
fn up_unknown_configuration() {
    let flake = FakeFlake::new(r#"{"systems": {"server": {"cmdline": ""}}}"#);
    let out = run(flake.nvmm(&["up", "sever"]));
    assert_fails(
        &out,
        1,
        "has no configuration \"sever\"",
        "did you mean `server`?",
    );
    flake_nothing_left(&flake, None);
}

#[test]
fn up_configuration_that_does_not_evaluate() {
    let flake = FakeFlake::new(
        r#"{"systems": {"broken": {"cmdline": "", "evalError": "nvmm-test: broken on purpose"}}}"#,
    );
    let out = run(flake.nvmm(&["up", "broken"]));
    assert_fails(
        &out,
        1,
        "evaluating broken failed",
        "that is nix's message about the configuration",
    );
    assert!(
        out.stderr.contains("nvmm-test: broken on purpose"),
        "{out:?}"
    );
    flake_nothing_left(&flake, None);
}

#[test]
fn up_subnet_clashes_with_a_host_route() {
    let Some(ns) = Netns::new("up subnet clash") else {
        return;
    };
    let flake = FakeFlake::new(r#"{"systems": {"server": {"cmdline": "nvmm_test=wait"}}}"#);
    ns.ip(&["route", "add", "10.99.0.0/16", "dev", "lo"]);
    let out = run(flake.nvmm_in(&ns, &["up", "--subnet", "10.99.5.0/24"]));
    assert_fails(
        &out,
        1,
        "overlaps the host's route 10.99.0.0/16 dev lo",
        "choose a free private range with --subnet",
    );
    flake_nothing_left(&flake, Some(&ns));
}

#[test]
fn up_configuration_with_more_memory_than_the_host() {
    let Some(ns) = Netns::new("up memory") else {
        return;
    };
    let flake = FakeFlake::new(
        r#"{"systems": {"big": {"cmdline": "nvmm_test=wait", "memoryMiB": 100000000}}}"#,
    );
    let out = run(flake.nvmm_in(&ns, &["up"]));
    assert_fails(
        &out,
        1,
        "100000000 MiB of memory requested but this host has",
        "also nvmm.memory",
    );
    flake_nothing_left(&flake, Some(&ns));
}

// ---- nvmm stop and ssh ----

#[test]
fn stop_unknown_name() {
    let dirs = Dirs::new("stop-unknown");
    let out = run(dirs.nvmm(&["stop", "nothing"]));
    assert_fails(
        &out,
        1,
        "no VM named nothing runs",
        "`nvmm ps` lists the VMs that run; `nvmm up NAME` starts one",
    );
    dirs.nothing_left(None);
}

#[test]
fn stop_bad_timeout() {
    let dirs = Dirs::new("stop-timeout");
    let out = run(dirs.nvmm(&["stop", "x", "--timeout", "soon"]));
    assert_fails(
        &out,
        2,
        "invalid value 'soon' for '--timeout <S>'",
        "invalid digit",
    );
    dirs.nothing_left(None);
}

#[test]
fn ssh_unknown_name() {
    let dirs = Dirs::new("ssh-unknown");
    let out = run(dirs.nvmm(&["ssh", "nothing", "--", "true"]));
    assert_fails(
        &out,
        1,
        "no VM named nothing runs",
        "`nvmm ps` lists the VMs that run",
    );
    dirs.nothing_left(None);
}

#[test]
fn ssh_vm_on_no_network() {
    if !kvm_or_skip("ssh without network") {
        return;
    }
    let dirs = Dirs::new("ssh-no-net");
    let out = run(dirs.nvmm(&run_args(&["-d", "--cmdline", "nvmm_test=wait"])));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let out = run(dirs.nvmm(&["ssh", "bad"]));
    assert_fails(
        &out,
        1,
        "cannot ssh into bad: it is on no network",
        "`nvmm console bad` attaches to its console instead",
    );
    wait_running(&dirs, None, "bad");
    let out = run(dirs.nvmm(&["stop", "bad"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    dirs.nothing_left(None);
}

// ---- faults ----

fn hash_file(path: &Path) -> u64 {
    fnv1a64(&std::fs::read(path).unwrap())
}

/// The state of process `pid` (`R`, `S`, `T` stopped, `Z` ...), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn sigkill_during_guest_disk_writes_leaves_the_store_image_unchanged() {
    if !kvm_or_skip("sigkill during writes") {
        return;
    }
    let Some(ns) = Netns::new("sigkill during writes") else {
        return;
    };
    let dirs = Dirs::new("sigkill-writes");
    let dir = test_runner(
        &dirs,
        "writer",
        "nvmm_test=blkwrite write_sectors=1024",
        r#", "storeImage": "store.img", "diskSizeMiB": 1"#,
    );
    let store = Path::new(&dir).join("store.img");
    let bytes: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    std::fs::write(&store, &bytes).unwrap();
    let before = hash_file(&store);

    let mut child = dirs
        .nvmm_in(&ns, &["boot", "--runner", &dir])
        .spawn()
        .unwrap();
    read_until(child.stdout.as_mut().unwrap(), "blkwrite started");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "killed by a signal: {status:?}");

    assert_eq!(hash_file(&store), before, "the store image changed");
    assert!(
        dirs.runtime().join("vms/writer/overlay.img").exists(),
        "the killed VM left its overlay for the next command to reap"
    );
    let out = run(dirs.nvmm_in(&ns, &["ps"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("writer") && out.stdout.contains("dead"),
        "{out:?}"
    );
    dirs.nothing_left(Some(&ns));
}

#[test]
fn sigkill_during_network_setup_is_reaped_by_the_next_command() {
    if !kvm_or_skip("sigkill during network setup") {
        return;
    }
    let Some(ns) = Netns::new("sigkill during network setup") else {
        return;
    };
    let dirs = Dirs::new("sigkill-net");
    let mut cmd = dirs.nvmm_in(&ns, &run_args(&["--net", "--cmdline", "nvmm_test=hello"]));
    // nvmm stops itself right after making its tap (cli/src/net/host.rs).
    cmd.env("NVMM_TEST_STOP_AT", "tap");
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + HANG_GUARD;
    while process_state(child.id()) != Some('T') {
        assert!(Instant::now() < deadline, "nvmm never reached its tap");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        ns.links().iter().any(|l| l == "nv-bad"),
        "stopped with its tap made: {:?}",
        ns.links()
    );
    child.kill().unwrap();
    let _ = child.wait();

    let out = run(dirs.nvmm_in(&ns, &["ps"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    dirs.nothing_left(Some(&ns));
}

#[test]
fn host_disk_full_during_a_guest_write_is_an_ioerr_and_nvmm_survives() {
    if !kvm_or_skip("disk full") {
        return;
    }
    let Some(ns) = Netns::new("disk full") else {
        return;
    };
    let dirs = Dirs::new("disk-full");
    // An 8 MiB overlay (sparse) on a 2 MiB tmpfs: the guest writes all 8 MiB.
    let dir = test_runner(
        &dirs,
        "full",
        "nvmm_test=blkwrite write_sectors=16384",
        r#", "diskSizeMiB": 8"#,
    );
    let runtime = dirs.path("tmpfs");
    std::fs::create_dir_all(&runtime).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=2m tmpfs {run} || exit 99
         $NVMM boot --runner {dir}; rc=$?
         echo leftovers:; find {run} -type f ! -name lock ! -name '*.log'
         exit $rc",
        run = runtime.display()
    );
    let mut cmd = dirs.shell(
        &["ip", "netns", "exec", &ns.name, "unshare", "--mount", "--"],
        &script,
    );
    cmd.env("NVMM_RUNTIME_DIR", &runtime);
    let out = run(cmd);
    assert_ne!(out.code(), Some(99), "cannot mount a tmpfs: {out:?}");
    // The guest's write failed with IOERR (status 1), it powered off, and nvmm ended normally.
    assert!(
        out.stdout.contains("nvmm-test: blk dev=0 write status=1"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("result=fail reason=blk-write-failed"),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("No space left on device"), "{out:?}");
    assert!(!out.stderr.contains("error:"), "{out:?}");
    let leftovers = out.stdout.split("leftovers:").nth(1).unwrap();
    assert!(
        leftovers.trim().is_empty(),
        "left on the tmpfs: {leftovers}"
    );
    assert_nothing_left(&runtime, &dirs.state(), Some(&ns));
}
