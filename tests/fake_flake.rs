//! A temporary copy of the stand-in flake (tests/flakes/guests) for the tests that drive
//! `nvmm boot`, `up` and friends through the real nix.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{GUEST, NVMM};
use crate::netns::Netns;

/// A temporary copy of tests/flakes/guests with the test guest and a settings.json.
pub struct FakeFlake {
    pub dir: PathBuf,
}

impl FakeFlake {
    pub fn new(settings: &str) -> FakeFlake {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nvmm-flake-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/flakes/guests");
        std::fs::create_dir_all(dir.join("flake")).unwrap();
        std::fs::copy(fixture.join("flake.nix"), dir.join("flake/flake.nix")).unwrap();
        std::fs::copy(GUEST, dir.join("flake/guest.elf")).unwrap();
        let flake = FakeFlake { dir };
        flake.set(settings);
        flake
    }

    /// Changes the configurations (as a user edits their flake).
    pub fn set(&self, settings: &str) {
        std::fs::write(self.dir.join("flake/settings.json"), settings).unwrap();
    }

    pub fn path(&self) -> String {
        self.dir.join("flake").to_string_lossy().into_owned()
    }

    /// `nvmm ARGS…` with this test's state directories and nix kept off the network.
    pub fn nvmm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(NVMM);
        self.prepare(&mut cmd, args);
        cmd
    }

    /// Like [`nvmm`](Self::nvmm), inside `ns`.
    pub fn nvmm_in(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut cmd = ns.command(NVMM);
        self.prepare(&mut cmd, args);
        cmd
    }

    fn prepare(&self, cmd: &mut Command, args: &[&str]) {
        require_nix();
        cmd.args(args)
            .current_dir(self.dir.join("flake"))
            .env("NVMM_RUNTIME_DIR", self.dir.join("state/run"))
            .env("NVMM_STATE_DIR", self.dir.join("state/lib"))
            // No binary cache can be reached from the test hosts; asking costs seconds.
            .env("NIX_CONFIG", "substituters =")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }

    /// nvmm's runtime directory for this flake's VMs.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("state/run")
    }

    /// nvmm's persistent directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state/lib")
    }

    /// The pid of the background nvmm serving `name`, if any.
    pub fn background_pid(&self, name: &str) -> Option<i32> {
        let pid = std::fs::read_to_string(self.dir.join(format!("state/run/vms/{name}/pid")));
        pid.ok()?.trim().parse().ok()
    }

    /// Stops the background VM `name` and waits until its nvmm is gone.
    pub fn stop(&self, name: &str) {
        let Some(pid) = self.background_pid(name) else {
            return;
        };
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "background {name} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeFlake {
    fn drop(&mut self) {
        // Whatever the test left running in the background.
        let vms = std::fs::read_dir(self.dir.join("state/run/vms"));
        for entry in vms.into_iter().flatten().flatten() {
            self.stop(&entry.file_name().to_string_lossy());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn require_nix() {
    let found = Command::new("nix")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "these tests drive the real nix: run scripts/test, which installs nix-bin"
    );
}
