//! Background VMs: `nvmm run -d`, `nvmm console NAME` (attach, detach, take-over), and
//! `nvmm logs NAME`, with the terminal restored on every way out.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod pty;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use pty::*;

/// A private runtime directory, so tests never touch /run/nvmm.
struct Runtime(PathBuf);

impl Runtime {
    fn new(test: &str) -> Self {
        Self(std::env::temp_dir().join(format!("nvmm-console-{}-{test}", std::process::id())))
    }

    fn nvmm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(NVMM);
        cmd.args(args)
            .env("NVMM_RUNTIME_DIR", &self.0)
            .env("NVMM_STATE_DIR", self.0.join("state"));
        cmd
    }

    fn start(&self, name: &str, scenario: &str) -> Output {
        let cmdline = format!("nvmm_test={scenario}");
        run(self.nvmm(&[
            "run",
            "-d",
            "--name",
            name,
            "--kernel",
            GUEST,
            "--mem",
            MEM,
            "--cmdline",
            &cmdline,
        ]))
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.0.join("vms").join(name)
    }

    fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.vm_dir(name).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn logs(&self, name: &str) -> String {
        run(self.nvmm(&["logs", name])).stdout
    }

    fn wait_for_log(&self, name: &str, needle: &str) {
        let deadline = Instant::now() + HANG_GUARD;
        while !self.logs(name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in the log: {}",
                self.logs(name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_gone(&self, name: &str) {
        let deadline = Instant::now() + HANG_GUARD;
        while self.vm_dir(name).join("pid").exists() {
            assert!(Instant::now() < deadline, "VM {name} did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether process `pid` exists.
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir(self.0.join("vms")) {
            for vm in dir.flatten() {
                if let Some(pid) = std::fs::read_to_string(vm.path().join("pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn detach_reattach_and_stop_from_the_console() {
    if !kvm_or_skip("console detach") {
        return;
    }
    let rt = Runtime::new("detach");
    let started = rt.start("bg", "echo");
    assert_eq!(started.code(), Some(0), "{started:?}");
    assert!(
        started.stderr.contains("bg runs in the background"),
        "{started:?}"
    );
    rt.wait_for_log("bg", "echo ready");

    // Attach, type, detach with Ctrl-A d: the client exits 0, the VM keeps running.
    let mut pty = open_pty();
    let before = settings(&pty.slave);
    let (client, screen) = spawn_on(&pty, rt.nvmm(&["console", "bg"]));
    std::thread::sleep(Duration::from_millis(300));
    pty.master.write_all(b"first\r").unwrap();
    wait_for(&screen, "first");
    assert!(is_raw(&pty.slave), "attached console is raw");
    pty.master.write_all(b"\x01d").unwrap();
    assert_eq!(wait_exit(client), Some(0));
    wait_for(&screen, "detached");
    assert_eq!(
        settings(&pty.slave),
        before,
        "terminal restored after detach"
    );
    let pid = rt.pid("bg").expect("still running");
    assert!(alive(pid), "the VM survives a detach");

    // Re-attach: new input reaches the guest; Ctrl-D ends the scenario and the VM powers off.
    let mut pty = open_pty();
    let (client, screen) = spawn_on(&pty, rt.nvmm(&["console", "bg"]));
    std::thread::sleep(Duration::from_millis(300));
    pty.master.write_all(b"second\r\x04").unwrap();
    wait_for(&screen, "echo done bytes=13");
    assert_eq!(wait_exit(client), Some(0), "the client ends with the VM");
    assert_eq!(
        settings(&pty.slave),
        before,
        "terminal restored after the VM ended"
    );
    rt.wait_gone("bg");
    let log = rt.logs("bg");
    assert!(
        log.contains("first") && log.contains("second") && log.contains("result=ok"),
        "{log}"
    );
    assert!(
        !rt.vm_dir("bg").join("console.sock").exists(),
        "socket removed"
    );
}

#[test]
fn a_second_attach_takes_over_and_sighup_only_detaches() {
    if !kvm_or_skip("console take-over") {
        return;
    }
    let rt = Runtime::new("takeover");
    assert_eq!(rt.start("shared", "echo").code(), Some(0));
    rt.wait_for_log("shared", "echo ready");

    let first_pty = open_pty();
    let (first, first_screen) = spawn_on(&first_pty, rt.nvmm(&["console", "shared"]));
    std::thread::sleep(Duration::from_millis(300));
    let mut second_pty = open_pty();
    let before = settings(&second_pty.slave);
    let (second, second_screen) = spawn_on(&second_pty, rt.nvmm(&["console", "shared"]));
    wait_for(&first_screen, "took over");
    assert_eq!(wait_exit(first), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    second_pty.master.write_all(b"mine\r").unwrap();
    wait_for(&second_screen, "mine");

    // Closing the terminal (SIGHUP) detaches; it never stops the VM.
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(second.id() as i32, libc::SIGHUP) }, 0);
    assert_eq!(wait_exit(second), Some(0));
    assert_eq!(settings(&second_pty.slave), before);
    let pid = rt.pid("shared").expect("still running");
    assert!(alive(pid), "the VM survives SIGHUP of its console");
}

#[test]
fn ctrl_a_x_from_an_attached_console_stops_the_vm() {
    if !kvm_or_skip("console quit") {
        return;
    }
    let rt = Runtime::new("quit");
    assert_eq!(rt.start("doomed", "halt").code(), Some(0));
    rt.wait_for_log("doomed", "halting");
    // `logs -f` follows the console until the VM ends.
    let mut follow = rt.nvmm(&["logs", "-f", "doomed"]);
    follow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let follower = follow.spawn().unwrap();
    let mut pty = open_pty();
    let (client, _screen) = spawn_on(&pty, rt.nvmm(&["console", "doomed"]));
    std::thread::sleep(Duration::from_millis(300));
    pty.master.write_all(b"\x01x").unwrap();
    assert_eq!(wait_exit(client), Some(0));
    rt.wait_gone("doomed");
    let followed = wait_with_guard(follower);
    assert_eq!(followed.code(), Some(0), "{followed:?}");
    assert!(
        followed.stdout.contains("halting with interrupts off"),
        "{followed:?}"
    );
}

#[test]
fn names_are_unique_and_unknown_names_are_clear_errors() {
    if !kvm_or_skip("console names") {
        return;
    }
    let rt = Runtime::new("names");
    assert_eq!(rt.start("one", "halt").code(), Some(0));
    let again = rt.start("one", "halt");
    assert_eq!(again.code(), Some(1), "{again:?}");
    assert!(
        again.stderr.contains("error: VM one is already running"),
        "{again:?}"
    );
    assert!(
        again
            .stderr
            .contains("hint: attach to it with `nvmm console one`"),
        "{again:?}"
    );

    let missing = run(rt.nvmm(&["console", "nobody"]));
    assert_eq!(missing.code(), Some(1), "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("error: no VM named nobody is running"),
        "{missing:?}"
    );
    let logs = run(rt.nvmm(&["logs", "nobody"]));
    assert_eq!(logs.code(), Some(1), "{logs:?}");
}

#[test]
fn boot_errors_of_a_background_vm_reach_the_caller() {
    let rt = Runtime::new("errors");
    let out = run(rt.nvmm(&[
        "run",
        "-d",
        "--name",
        "bad",
        "--kernel",
        "/nonexistent",
        "--mem",
        MEM,
    ]));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("error: cannot read kernel /nonexistent"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("runs in the background"), "{out:?}");
}

#[test]
fn the_virtio_console_follows_the_terminal_size() {
    if !kvm_or_skip("console size") {
        return;
    }
    let pty = open_pty();
    set_size(&pty, 100, 30);
    let mut cmd = guest_command("nvmm_test=vcon_size", &["--console", "virtio"]);
    cmd.env_remove("NVMM_TEST_PANIC_AFTER_BOOT");
    let (child, screen) = spawn_on(&pty, cmd);
    wait_for(&screen, "vcon_size cols=100 rows=30");
    set_size(&pty, 132, 43);
    send_sigwinch(&child);
    wait_for(&screen, "vcon_size changed cols=132 rows=43");
    assert_eq!(wait_exit(child), Some(0), "{}", screen.lock().unwrap());
}

#[test]
fn a_background_vm_takes_the_size_of_the_attached_terminal() {
    if !kvm_or_skip("console size attached") {
        return;
    }
    let rt = Runtime::new("size");
    let cmdline = "nvmm_test=vcon_size size_changes=2";
    let started = run(rt.nvmm(&[
        "run",
        "-d",
        "--name",
        "sized",
        "--kernel",
        GUEST,
        "--mem",
        MEM,
        "--console",
        "virtio",
        "--cmdline",
        cmdline,
    ]));
    assert_eq!(started.code(), Some(0), "{started:?}");
    rt.wait_for_log("sized", "vcon_size cols=80 rows=24");

    let pty = open_pty();
    set_size(&pty, 90, 20);
    let (client, _screen) = spawn_on(&pty, rt.nvmm(&["console", "sized"]));
    rt.wait_for_log("sized", "vcon_size changed cols=90 rows=20");
    set_size(&pty, 100, 50);
    send_sigwinch(&client);
    rt.wait_for_log("sized", "vcon_size changed cols=100 rows=50");
    assert_eq!(wait_exit(client), Some(0), "the client ends with the VM");
    rt.wait_gone("sized");
}

#[test]
fn typing_faster_than_the_guest_reads_loses_nothing_on_the_virtio_console() {
    if !kvm_or_skip("virtio console back pressure") {
        return;
    }
    let mut input: Vec<u8> = (0..8192u32).map(|i| b'a' + (i % 26) as u8).collect();
    input.push(0x04);
    let out = run_with_input(
        guest_command("nvmm_test=vcon_echo", &["--console", "virtio"]),
        &input,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("vcon_echo done bytes=8192"),
        "{}",
        out.stdout
    );
    let typed = String::from_utf8_lossy(&input[..8192]).into_owned();
    assert!(out.stdout.contains(&typed), "echo differs");
}
