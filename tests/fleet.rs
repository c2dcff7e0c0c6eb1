//! `nvmm up`, `ps`, `stop`, `down`: a small fleet from the stand-in flake, in a network
//! namespace of its own, through every way a VM can end.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod fake_flake;
mod netns;

use std::time::{Duration, Instant};

use common::{Output, kvm_or_skip, run, wait_with_guard};
use fake_flake::FakeFlake;
use netns::Netns;

const FLEET: &str = r#"{"systems": {
    "alpha": {"cmdline": "nvmm_test=net_echo echo_port=7", "memoryMiB": 64},
    "beta": {"cmdline": "nvmm_test=net_echo echo_port=7", "memoryMiB": 64},
    "gamma": {"cmdline": "nvmm_test=wait"},
    "probe": {"cmdline": "nvmm_test=net_client connect=beta:7 bytes=5000", "memoryMiB": 64}}}"#;

fn ok(out: &Output) {
    assert_eq!(out.code(), Some(0), "{out:?}");
}

/// `nvmm ps --json`, parsed.
fn ps(flake: &FakeFlake, ns: &Netns) -> Vec<serde_json::Value> {
    let out = run(flake.nvmm_in(ns, &["ps", "--json"]));
    ok(&out);
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn names_and_states(entries: &[serde_json::Value]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(name: &str, state: &str) -> (String, String) {
    (name.to_owned(), state.to_owned())
}

#[test]
fn a_fleet_comes_up_talks_stops_dies_and_goes_down_leaving_nothing() {
    if !kvm_or_skip("fleet") {
        return;
    }
    let Some(ns) = Netns::new("fleet") else {
        return;
    };
    let flake = FakeFlake::new(FLEET);

    // Up three of the four by name: all in the background, one table.
    let out = run(flake.nvmm_in(&ns, &["up", "alpha", "beta", "gamma"]));
    ok(&out);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ADDRESS", "SSH", "STATE"]
    );
    assert_eq!(lines.len(), 4, "{out:?}");
    for (line, name) in lines[1..].iter().zip(["alpha", "beta", "gamma"]) {
        assert!(
            line.starts_with(name) && line.ends_with("running"),
            "{out:?}"
        );
        assert!(line.contains("127.0.0.1:"), "{out:?}");
    }

    let fleet = ps(&flake, &ns);
    assert_eq!(
        names_and_states(&fleet),
        [
            pair("alpha", "running"),
            pair("beta", "running"),
            pair("gamma", "running")
        ]
    );
    let flake_path = std::fs::canonicalize(flake.path()).unwrap();
    for vm in &fleet {
        assert!(vm["address"].as_str().unwrap().starts_with("10."), "{vm}");
        assert!(vm["ssh_port"].as_u64().unwrap() > 0, "{vm}");
        assert!(vm["pid"].as_u64().unwrap() > 0, "{vm}");
        assert!(vm["memory_kib"].as_u64().unwrap() > 0, "{vm}");
        assert_eq!(vm["flake"], flake_path.to_str().unwrap(), "{vm}");
    }

    // A second up starts nothing new.
    let out = run(flake.nvmm_in(&ns, &["up", "alpha"]));
    ok(&out);
    assert!(out.stderr.contains("alpha already runs"), "{out:?}");
    assert!(out.stdout.contains("running (already)"), "{out:?}");
    // Booting a running name is an error that says what to do.
    let out = run(flake.nvmm_in(&ns, &["boot", "beta"]));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("VM beta is already running"), "{out:?}");
    assert!(
        out.stderr
            .contains("hint: attach to it with `nvmm console beta`"),
        "{out:?}"
    );

    // Guest to guest by name: a fourth VM (on this terminal) echoes through beta.
    let out = wait_with_guard(flake.nvmm_in(&ns, &["boot", "probe"]).spawn().unwrap());
    ok(&out);
    assert!(
        out.stdout.contains("net_client echoed bytes=5000 ok"),
        "{out:?}"
    );

    // A clean stop: the guest answers Ctrl-Alt-Del and powers off.
    let out = run(flake.nvmm_in(&ns, &["stop", "gamma"]));
    ok(&out);
    assert!(
        out.stderr.contains("nvmm: gamma shut down cleanly"),
        "{out:?}"
    );
    let out = run(flake.nvmm_in(&ns, &["logs", "gamma"]));
    assert!(
        out.stdout.contains("ctrl-alt-del: shutting down"),
        "{out:?}"
    );
    assert!(out.stdout.contains("result=ok"), "{out:?}");
    assert_eq!(
        names_and_states(&ps(&flake, &ns)),
        [pair("alpha", "running"), pair("beta", "running")]
    );

    // SIGKILL: the next ps finds beta dead (once), and cleans up after it.
    let beta = flake.background_pid("beta").unwrap();
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(beta, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries = ps(&flake, &ns);
        if names_and_states(&entries).contains(&pair("beta", "dead")) {
            break entries;
        }
        assert!(Instant::now() < deadline, "beta never dead: {entries:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        names_and_states(&entries),
        [pair("alpha", "running"), pair("beta", "dead")]
    );
    assert_eq!(
        names_and_states(&ps(&flake, &ns)),
        [pair("alpha", "running")]
    );
    assert!(
        !ns.links()
            .iter()
            .any(|l| l.ends_with("-beta") || l == "nv-beta"),
        "beta's tap reaped: {:?}",
        ns.links()
    );

    // Down: nothing left, not even the bridge.
    let out = run(flake.nvmm_in(&ns, &["down"]));
    ok(&out);
    assert!(
        out.stderr.contains("nvmm: alpha shut down cleanly"),
        "{out:?}"
    );
    assert!(ps(&flake, &ns).is_empty());
    assert_eq!(ns.links(), vec!["lo".to_owned()], "no tap, no bridge");
    let leftovers: Vec<String> = walk(&flake.runtime_dir())
        .into_iter()
        .filter(|p| !p.ends_with("console.log") && !p.ends_with("nvmm.log"))
        .filter(|p| !p.contains("/net/"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        walk(&flake.runtime_dir().join("net/nvmm0/members")).is_empty(),
        "no member records"
    );
    for vm in &fleet {
        let pid = vm["pid"].as_u64().unwrap();
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "));
        assert!(
            !alive,
            "{}'s nvmm (process {pid}) is still there",
            vm["name"]
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path.to_string_lossy().into_owned());
        }
    }
    files
}

#[test]
fn stopping_what_does_not_run_is_a_clear_error() {
    let flake = FakeFlake::new(FLEET);
    let out = run(flake.nvmm(&["stop", "nothing"]));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("error: no VM named nothing runs"),
        "{out:?}"
    );
    assert!(out.stderr.contains("hint: `nvmm ps` lists"), "{out:?}");
    let out = run(flake.nvmm(&["ssh", "nothing"]));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("error: no VM named nothing runs"),
        "{out:?}"
    );
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let mut cmd = std::process::Command::new(common::NVMM);
        cmd.args(["completions", shell]);
        let out = run(cmd);
        ok(&out);
        for word in ["boot", "up", "ps", "stop", "down", "ssh"] {
            assert!(out.stdout.contains(word), "{shell} lacks {word}");
        }
    }
}
