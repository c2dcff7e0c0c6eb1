//! The terminal is put in raw mode while a guest runs and restored on every exit path. Each test
//! runs nvmm on a pseudo-terminal and compares its settings before, during and after.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod pty;

use std::fs::File;
use std::io::Write;
use std::process::Child;
use std::sync::{Arc, Mutex};

use common::*;
use pty::*;

/// Starts nvmm on the pty with the guest `scenario` and collects what it writes.
fn start(pty: &Pty, scenario: &str, env: &[(&str, &str)]) -> (Child, Arc<Mutex<String>>) {
    let mut cmd = guest_command(&format!("nvmm_test={scenario}"), &[]);
    for (key, value) in env {
        cmd.env(key, value);
    }
    spawn_on(pty, cmd)
}

/// Runs `scenario`, waits for `ready` on the screen, checks raw mode, ends it with `end`, and
/// checks the settings are back and the exit code is `expected`.
fn restored_after(
    test: &str,
    scenario: &str,
    ready: &str,
    env: &[(&str, &str)],
    end: impl FnOnce(&Child, &mut File),
    expected: Option<i32>,
) {
    if !kvm_or_skip(test) {
        return;
    }
    let mut pty = open_pty();
    let before = settings(&pty.slave);
    let (child, screen) = start(&pty, scenario, env);
    wait_for(&screen, ready);
    // The crash and panic cases end by themselves, possibly before this check; the others are
    // still running here (waiting for input, or halted).
    if !matches!(expected, Some(3) | Some(101)) {
        assert!(is_raw(&pty.slave), "{test}: not in raw mode");
    }
    end(&child, &mut pty.master);
    let code = wait_exit(child);
    assert_eq!(code, expected, "{test}: {:?}", screen.lock().unwrap());
    assert_eq!(
        settings(&pty.slave),
        before,
        "{test}: terminal not restored"
    );
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn restored_after_guest_poweroff() {
    restored_after(
        "tty poweroff",
        "echo",
        "echo ready",
        &[],
        |_, master| {
            master.write_all(b"hi\x04").unwrap();
        },
        Some(0),
    );
}

#[test]
fn restored_after_ctrl_a_x() {
    restored_after(
        "tty quit",
        "halt",
        "halting",
        &[],
        |_, master| {
            master.write_all(b"\x01x").unwrap();
        },
        Some(0),
    );
}

#[test]
fn restored_after_guest_crash() {
    restored_after(
        "tty crash",
        "triplefault",
        "nvmm-test: triple fault",
        &[],
        |_, _| {},
        Some(3),
    );
}

#[test]
fn restored_after_sigterm() {
    restored_after(
        "tty sigterm",
        "halt",
        "halting",
        &[],
        |c, _| signal(c, libc::SIGTERM),
        Some(128 + libc::SIGTERM),
    );
}

#[test]
fn restored_after_sigint() {
    restored_after(
        "tty sigint",
        "halt",
        "halting",
        &[],
        |c, _| signal(c, libc::SIGINT),
        Some(128 + libc::SIGINT),
    );
}

#[test]
fn restored_after_sighup() {
    restored_after(
        "tty sighup",
        "halt",
        "halting",
        &[],
        |c, _| signal(c, libc::SIGHUP),
        Some(128 + libc::SIGHUP),
    );
}

#[test]
fn restored_after_nvmm_panic() {
    restored_after(
        "tty panic",
        "halt",
        "panic injected",
        &[("NVMM_TEST_PANIC_AFTER_BOOT", "1")],
        |_, _| {},
        Some(101),
    );
}

#[test]
fn ctrl_c_goes_to_the_guest() {
    if !kvm_or_skip("tty ctrl-c") {
        return;
    }
    let mut pty = open_pty();
    let (child, screen) = start(&pty, "echo", &[]);
    wait_for(&screen, "echo ready");
    // In raw mode Ctrl-C is a byte for the guest, not SIGINT for nvmm.
    pty.master.write_all(b"\x03\x04").unwrap();
    assert_eq!(wait_exit(child), Some(0));
    assert!(
        screen.lock().unwrap().contains("echo done bytes=1"),
        "{:?}",
        screen.lock().unwrap()
    );
}
