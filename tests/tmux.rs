//! nvmm driven in tmux, as a person would: typing, window resizes, detach and re-attach, and
//! the terminal left exactly as it was (`stty -g`) however nvmm ends.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A detached tmux session on its own server socket, killed on drop.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(test: &str, command: &str) -> Option<Self> {
        if Command::new("tmux").arg("-V").output().is_err() {
            skip(test, "tmux is not installed");
            return None;
        }
        let tmux = Self {
            socket: format!("nvmm-{}-{}", std::process::id(), test.replace(' ', "-")),
            session: "t".into(),
        };
        // The shell saves the terminal settings before and after nvmm, then prints nvmm's exit
        // code (so once EXIT= shows, both files are complete).
        let script = format!(
            "stty -g > /tmp/{s}.before; {command}; code=$?; stty -g > /tmp/{s}.after; \
             echo EXIT=$code; sleep 30",
            s = tmux.socket
        );
        let ok = Command::new("tmux")
            .args([
                "-L",
                &tmux.socket,
                "new-session",
                "-d",
                "-x",
                "100",
                "-y",
                "30",
            ])
            .args(["-s", &tmux.session, "sh", "-c", &script])
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux new-session failed");
        Some(tmux)
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared:\\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stty_unchanged(&self) -> bool {
        let read =
            |suffix| std::fs::read_to_string(format!("/tmp/{}.{suffix}", self.socket)).unwrap();
        read("before") == read("after")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
        for suffix in ["before", "after"] {
            let _ = std::fs::remove_file(format!("/tmp/{}.{suffix}", self.socket));
        }
    }
}

fn nvmm_run(scenario: &str, extra: &str) -> String {
    format!("{NVMM} run --kernel {GUEST} --mem {MEM} --cmdline nvmm_test={scenario} {extra}")
}

#[test]
fn typing_echoes_and_ctrl_a_x_quits_with_the_terminal_restored() {
    if !kvm_or_skip("tmux echo") {
        return;
    }
    let Some(t) = Tmux::start("tmux echo", &nvmm_run("echo", "")) else {
        return;
    };
    t.wait_for("echo ready");
    t.keys(&["typed in tmux", "Enter"]);
    t.wait_for("typed in tmux");
    t.keys(&["C-a", "x"]);
    t.wait_for("EXIT=0");
    assert!(t.stty_unchanged(), "stty -g differs after Ctrl-A x");
}

#[test]
fn a_window_resize_reaches_the_guest() {
    if !kvm_or_skip("tmux resize") {
        return;
    }
    let Some(t) = Tmux::start("tmux resize", &nvmm_run("vcon_size", "--console virtio")) else {
        return;
    };
    t.wait_for("vcon_size cols=100 rows=30");
    t.tmux(&["resize-window", "-t", &t.session, "-x", "120", "-y", "40"]);
    t.wait_for("vcon_size changed cols=120 rows=40");
    t.wait_for("EXIT=0");
    assert!(t.stty_unchanged(), "stty -g differs after guest poweroff");
}

#[test]
fn the_terminal_survives_sigterm_and_an_nvmm_panic() {
    if !kvm_or_skip("tmux sigterm") {
        return;
    }
    let Some(t) = Tmux::start("tmux sigterm", &nvmm_run("halt", "")) else {
        return;
    };
    t.wait_for("halting");
    let pid = t.tmux(&["list-panes", "-t", &t.session, "-F", "#{pane_pid}"]);
    // The pane runs sh, whose child is nvmm.
    let killed = Command::new("pkill")
        .args(["-TERM", "-P", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    t.wait_for("EXIT=143");
    assert!(t.stty_unchanged(), "stty -g differs after SIGTERM");

    let panic = format!("NVMM_TEST_PANIC_AFTER_BOOT=1 {}", nvmm_run("halt", ""));
    let Some(t) = Tmux::start("tmux panic", &panic) else {
        return;
    };
    t.wait_for("EXIT=101");
    assert!(t.stty_unchanged(), "stty -g differs after a panic");
}
