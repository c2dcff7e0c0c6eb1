//! `nvmm boot` and `nvmm list` end to end, through the real nix, on the stand-in flake in
//! tests/flakes/guests (no nixpkgs here): its configurations' runners boot nvmm's test guest.
//! The VMs join networks inside namespaces of their own, with private state directories.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod fake_flake;
mod netns;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{GUEST, NVMM, Output, fnv1a64, kvm_or_skip, run, wait_with_guard};
use fake_flake::FakeFlake;
use netns::Netns;

fn ok(out: &Output) {
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn list_shows_the_configurations() {
    let flake =
        FakeFlake::new(r#"{"systems": {"server": {"cmdline": ""}, "client": {"cmdline": ""}}}"#);
    let out = run(flake.nvmm(&["list"]));
    ok(&out);
    assert_eq!(
        out.stdout, "NAME    STATUS\nclient  -\nserver  -\n",
        "{out:?}"
    );

    let out = run(flake.nvmm(&["list", "--json", "--flake", &flake.path()]));
    ok(&out);
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([{"name": "client", "running": false},
                           {"name": "server", "running": false}])
    );
}

#[test]
fn two_configurations_booted_together_reach_each_other_by_name() {
    if !kvm_or_skip("nix boot two") {
        return;
    }
    let Some(ns) = Netns::new("nix boot two") else {
        return;
    };
    let flake = FakeFlake::new(
        r#"{"systems": {
            "server": {"cmdline": "nvmm_test=net_echo echo_port=7", "memoryMiB": 64},
            "client": {"cmdline": "nvmm_test=net_client connect=server:7 bytes=20000",
                       "memoryMiB": 64}}}"#,
    );
    // The first name gets this terminal; the server runs in the background.
    let out = wait_with_guard(
        flake
            .nvmm_in(&ns, &["boot", "client", "server"])
            .spawn()
            .unwrap(),
    );
    ok(&out);
    assert!(
        out.stdout.contains("net_client echoed bytes=20000 ok"),
        "{out:?}"
    );
    assert!(out.stderr.contains("evaluating client, server"), "{out:?}");
    // Built by an earlier run of this test, the same runners are in the store already.
    assert!(
        out.stderr.contains("building client, server")
            || out.stderr.contains("client, server already built"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("server runs in the background"),
        "{out:?}"
    );
    // The client learnt the server's address from the reserved hosts table.
    let server_line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("nvmm: server is "))
        .expect("server's address line");
    let server_addr = server_line["nvmm: server is ".len()..]
        .split('/')
        .next()
        .unwrap();
    assert!(
        out.stdout
            .contains(&format!("net_client connected to={server_addr}:7")),
        "{out:?}"
    );

    let out = run(flake.nvmm(&["list", "--json"]));
    ok(&out);
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed[0]["running"], false, "{listed}");
    assert_eq!(listed[1]["name"], "server", "{listed}");
    assert_eq!(listed[1]["running"], true, "{listed}");
    flake.stop("server");
    assert_eq!(ns.links(), vec!["lo".to_owned()], "no tap, no bridge left");
}

#[test]
fn a_built_runner_is_not_built_again_and_a_broken_one_is() {
    if !kvm_or_skip("nix boot built") {
        return;
    }
    let Some(ns) = Netns::new("nix boot built") else {
        return;
    };
    // Store text of its own, so that no earlier run built this runner.
    let nonce = format!("{}-{:?}", std::process::id(), Instant::now());
    let flake = FakeFlake::new(&format!(
        r#"{{"systems": {{"server": {{"cmdline": "nvmm_test=poweroff", "store": "{nonce}"}}}}}}"#
    ));
    let boot = || {
        let out = wait_with_guard(
            flake
                .nvmm_in(&ns, &["-v", "boot", "server"])
                .spawn()
                .unwrap(),
        );
        ok(&out);
        assert!(out.stdout.contains("poweroff via acpi"), "{out:?}");
        out
    };
    let out = boot();
    assert!(out.stderr.contains("nvmm: building server"), "{out:?}");
    let runner = out
        .stderr
        .lines()
        .find_map(|l| l.split_once("] booting ")?.1.split_once("/kernel "))
        .expect("the booted kernel")
        .0
        .to_owned();
    let delete_runner = || {
        let deleted = std::process::Command::new("nix-store")
            .args(["--delete", &runner])
            .output()
            .unwrap();
        assert!(deleted.status.success(), "{deleted:?}");
    };

    // Warm: the evaluation checks the runner, and no build follows.
    let out = boot();
    assert!(out.stderr.contains("nvmm: server already built"), "{out:?}");
    assert!(!out.stderr.contains("nvmm: building"), "{out:?}");

    // A runner directory that is on disk but not valid in the store (a build that was cut
    // short, a half-finished garbage collection) is built again, not booted.
    delete_runner();
    std::fs::create_dir(&runner).unwrap();
    std::fs::write(format!("{runner}/nvmm.json"), "not a runner").unwrap();
    let out = boot();
    assert!(out.stderr.contains("nvmm: server already built"), "{out:?}");
    let description = std::fs::read_to_string(format!("{runner}/nvmm.json")).unwrap();
    assert!(description.contains("\"kernel\""), "{description}");

    // Not on disk at all: one nix build, as the first time.
    delete_runner();
    let out = boot();
    assert!(out.stderr.contains("nvmm: building server"), "{out:?}");
}

/// The FNV-1a of `sectors` 512-byte sectors of `bytes`, zero-padded, as the guest prints it.
fn sectors_hash(bytes: &[u8], sectors: usize) -> String {
    let mut image = bytes.to_vec();
    image.resize(sectors * 512, 0);
    format!("{:016x}", fnv1a64(&image))
}

/// `nvmm-test: blk dev=N sectors=8 fnv1a64=H` → H.
fn device_hash(stdout: &str, dev: usize) -> String {
    let prefix = format!("nvmm-test: blk dev={dev} sectors=8 fnv1a64=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no hash of dev {dev} in {stdout}"))
        .trim()
        .to_owned()
}

fn blk_settings(scenario: &str, store: &str) -> String {
    format!(
        r#"{{"systems": {{"server": {{"cmdline": "nvmm_test={scenario} blk_sectors=0 hash_sectors=8",
                                    "store": "{store}"}}}}}}"#
    )
}

#[test]
fn every_boot_runs_the_current_configuration_on_a_fresh_disk_unless_kept() {
    if !kvm_or_skip("nix boot fresh") {
        return;
    }
    let Some(ns) = Netns::new("nix boot fresh") else {
        return;
    };
    let flake = FakeFlake::new(&blk_settings("blk", "first"));
    // Boot 1 writes the pattern to sector 0 of every writable disk (the overlay).
    let out = wait_with_guard(flake.nvmm_in(&ns, &["boot", "server"]).spawn().unwrap());
    ok(&out);
    for (dev, serial, ro) in [
        (0, "nvmm-store", 1),
        (1, "nvmm-overlay", 0),
        (2, "nvmm-seed", 1),
    ] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(&format!("blk dev={dev} capacity=")))
            .unwrap_or_else(|| panic!("no dev {dev}: {out:?}"));
        assert!(line.contains(&format!(" ro={ro} ")), "{line}");
        assert!(line.ends_with(&format!("serial=\"{serial}\"")), "{line}");
    }
    assert!(
        out.stdout.contains("blk dev=1 wrote sectors=0 readback=ok"),
        "{out:?}"
    );

    // The user changes the configuration: the next boot runs the new one, on a fresh disk.
    flake.set(&blk_settings("blkhash", "second"));
    let out = wait_with_guard(flake.nvmm_in(&ns, &["boot", "server"]).spawn().unwrap());
    ok(&out);
    assert_eq!(
        device_hash(&out.stdout, 0),
        sectors_hash(b"second", 8),
        "{out:?}"
    );
    assert_eq!(
        device_hash(&out.stdout, 1),
        sectors_hash(b"", 8),
        "fresh: {out:?}"
    );

    // With --keep, what boot 1 wrote is there at boot 2.
    flake.set(&blk_settings("blk", "third"));
    let out = wait_with_guard(
        flake
            .nvmm_in(&ns, &["boot", "server", "--keep"])
            .spawn()
            .unwrap(),
    );
    ok(&out);
    flake.set(&blk_settings("blkhash", "fourth"));
    let out = wait_with_guard(
        flake
            .nvmm_in(&ns, &["boot", "server", "--keep"])
            .spawn()
            .unwrap(),
    );
    ok(&out);
    let pattern: Vec<u8> = (0..512u64).map(|i| (i as u8) ^ 0x5a).collect();
    assert_eq!(
        device_hash(&out.stdout, 1),
        sectors_hash(&pattern, 8),
        "kept: {out:?}"
    );
}

#[test]
fn a_runner_directory_boots_without_nix() {
    if !kvm_or_skip("runner dir") {
        return;
    }
    let Some(ns) = Netns::new("runner dir") else {
        return;
    };
    let flake = FakeFlake::new(r#"{"systems": {}}"#);
    let runner = flake.dir.join("runner");
    std::fs::create_dir_all(&runner).unwrap();
    std::os::unix::fs::symlink(GUEST, runner.join("vmlinux")).unwrap();
    std::fs::write(
        runner.join("nvmm.json"),
        r#"{"version": 1, "name": "handmade", "kernel": "vmlinux", "memoryMiB": 32,
            "cmdline": "nvmm_test=blk", "console": "serial"}"#,
    )
    .unwrap();
    let mut cmd = ns.command(NVMM);
    cmd.args(["boot", "--runner"])
        .arg(&runner)
        .env("NVMM_RUNTIME_DIR", flake.dir.join("state/run"))
        .env("NVMM_STATE_DIR", flake.dir.join("state/lib"))
        // Nothing here may need nix.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin:/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_with_guard(cmd.spawn().unwrap());
    ok(&out);
    assert!(out.stderr.contains("nvmm: handmade is "), "{out:?}");
    // No store image: the overlay and the seed only.
    assert!(out.stdout.contains("serial=\"nvmm-overlay\""), "{out:?}");
    assert!(out.stdout.contains("serial=\"nvmm-seed\""), "{out:?}");
    assert!(out.stdout.contains("nvmm-test: blk devices=2"), "{out:?}");
}

/// Runs `nvmm ARGS` expecting failure (before any VM or network), returns stderr.
fn failure(flake: &FakeFlake, args: &[&str]) -> String {
    let out = run(flake.nvmm(args));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(out.stderr.matches("error: ").count(), 1, "{out:?}");
    assert_eq!(out.stderr.matches("hint: ").count(), 1, "{out:?}");
    nothing_left(flake);
    out.stderr
}

/// Nix failed before any VM: nothing in the runtime directory, no disk image kept.
fn nothing_left(flake: &FakeFlake) {
    let runtime = std::fs::read_dir(flake.runtime_dir()).map_or(0, |d| d.count());
    assert_eq!(runtime, 0, "the runtime directory is not empty");
    let vms = std::fs::read_dir(flake.state_dir().join("vms")).map_or(0, |d| d.count());
    assert_eq!(
        vms, 0,
        "no VM state (keys, kept disk) for a VM that never ran"
    );
}

#[test]
fn nix_problems_are_clear_errors_with_hints() {
    let flake = FakeFlake::new(
        r#"{"systems": {
            "server": {"cmdline": ""},
            "client": {"cmdline": ""},
            "broken": {"cmdline": "", "evalError": "nvmm-test: this configuration is broken"},
            "failing": {"cmdline": "", "failBuild": true}}}"#,
    );

    let err = failure(&flake, &["boot", "sever"]);
    assert!(err.contains("has no configuration \"sever\""), "{err}");
    assert!(
        err.contains("(it has: broken, client, failing, server)"),
        "{err}"
    );
    assert!(err.contains("hint: did you mean `server`?"), "{err}");

    let err = failure(&flake, &["boot", "broken"]);
    assert!(err.contains("evaluating broken failed"), "{err}");
    assert!(
        err.contains("nvmm-test: this configuration is broken"),
        "{err}"
    );
    assert!(err.contains("hint: that is nix's message"), "{err}");

    let err = failure(&flake, &["boot", "failing"]);
    assert!(err.contains("building failing failed"), "{err}");
    assert!(err.contains("this build fails on purpose"), "{err}");
    assert!(err.contains("hint: `nix log /nix/store/"), "{err}");
    assert!(
        err.contains("-nvmm-runner-failing.drv` shows the whole build log"),
        "{err}"
    );

    let err = failure(&flake, &["boot", "server", "--flake", "/nonexistent"]);
    assert!(err.contains("error: no flake.nix in /nonexistent"), "{err}");
    assert!(
        err.contains("hint: run nvmm in the directory of your flake.nix"),
        "{err}"
    );

    flake.set(r#"{"noConfigurations": true}"#);
    let err = failure(&flake, &["boot", "server"]);
    assert!(err.contains("has no nixosConfigurations"), "{err}");
    let err = failure(&flake, &["list"]);
    assert!(err.contains("has no nixosConfigurations"), "{err}");

    let mut cmd = flake.nvmm(&["boot", "server"]);
    cmd.env("PATH", "/nonexistent");
    let out = run(cmd);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("error: nix is not installed"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("hint: install Nix") && out.stderr.contains("nvmm boot --runner DIR"),
        "{out:?}"
    );
    nothing_left(&flake);
}

/// Processes whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted)
        })
        .collect()
}

#[test]
fn a_stop_signal_during_the_build_stops_nix_and_nvmm() {
    // A sleep no other test runs, so that its process can be found.
    let sleep = format!("3{}.5", std::process::id() % 1000);
    let flake = FakeFlake::new(&format!(
        r#"{{"systems": {{"slow": {{"cmdline": "", "sleepBuild": "{sleep}"}}}}}}"#
    ));
    let mut child = flake.nvmm(&["boot", "slow"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_running(&["sleep", &sleep]).is_empty() {
        assert!(Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM to nvmm alone: nvmm must pass it on (Ctrl-C reaches nix directly).
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_with_guard(child);
    assert_eq!(out.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert!(
        out.stderr
            .contains("error: interrupted while nix was running"),
        "{out:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_running(&["sleep", &sleep]).is_empty() {
        assert!(Instant::now() < deadline, "the build outlived nvmm");
        std::thread::sleep(Duration::from_millis(20));
    }
    child = flake.nvmm(&["list"]).spawn().unwrap();
    ok(&wait_with_guard(child));
}
