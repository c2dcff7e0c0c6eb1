//! `nvmm ssh NAME -- CMD…`: the client key, the pinned host key and the forwarded port, end to
//! end. The test guest has no ssh server, so the host's own sshd stands in for the guest's: it
//! runs in the VM's network namespace on the guest's address (also put on `lo` there, where
//! local addresses win over the bridge's route) with the host key nvmm seeded, authorizing the
//! client key nvmm made. `nvmm ssh` then reaches it the way it reaches a real guest: through the
//! VM's ssh forward, 127.0.0.1:PORT → ADDRESS:22. The whole path into a NixOS guest's own sshd
//! runs on the Linux tier, where hardware KVM exists.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod fake_flake;
mod netns;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Output, kvm_or_skip, run};
use fake_flake::FakeFlake;
use netns::Netns;

/// One VM that idles until it is stopped; only its network and its keys matter here.
const SETTINGS: &str = r#"{"systems": {"box": {"cmdline": "nvmm_test=wait"}}}"#;

const SSHD: &str = "/usr/sbin/sshd";

/// A directory of this test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nvmm-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host's sshd, in the namespace, in the foreground; killed on drop.
struct Sshd {
    child: Child,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd on `address`:22 with `host_key`, authorizing the keys in `authorized`, and
    /// waits until it listens.
    fn start(ns: &Netns, dir: &Path, address: &str, host_key: &Path, authorized: &Path) -> Self {
        // Where sshd's unprivileged child chroots; Debian's service makes it at boot.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {address}:22\n\
                 HostKey {}\n\
                 AuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM {}\n\
                 StrictModes no\n\
                 PidFile none\n",
                host_key.display(),
                authorized.display(),
                if root_password_locked() { "yes" } else { "no" },
            ),
        )
        .unwrap();
        let log = dir.join("sshd.log");
        let child = ns
            .command(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut sshd = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sshd.log().contains("Server listening on") {
            assert!(
                sshd.child.try_wait().unwrap().is_none(),
                "sshd ended: {}",
                sshd.log()
            );
            assert!(
                Instant::now() < deadline,
                "sshd never listened: {}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // `ip netns exec` execs sshd: this is sshd itself.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Without PAM, sshd turns away an account whose password is locked (`!` in shadow), even for
/// key logins; with PAM (Debian's stack) it lets the key in.
fn root_password_locked() -> bool {
    std::fs::read_to_string("/etc/shadow")
        .unwrap_or_default()
        .lines()
        .any(|line| line.starts_with("root:!"))
}

/// A running VM `box` and what nvmm recorded of it, with its guest address answered by the
/// host's sshd. Fields drop in order: sshd, the VM, the files, the namespace.
struct Fixture {
    sshd: Option<Sshd>,
    flake: FakeFlake,
    temp: TempDir,
    ns: Netns,
    /// The guest's address.
    address: String,
    /// The VM's host key pair, from nvmm's persistent state (private key; `.pub` beside it).
    host_key: PathBuf,
    /// What vm.json says of the host key.
    recorded_host_key: String,
    /// The client key `nvmm ssh` logs in with.
    identity: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Option<Self> {
        if !kvm_or_skip(test) {
            return None;
        }
        let ns = Netns::new(test)?;
        assert!(
            Path::new(SSHD).is_file(),
            "{test} runs the host's sshd: run scripts/test, which installs openssh-server"
        );
        let flake = FakeFlake::new(SETTINGS);
        let temp = TempDir::new(test);

        let out = run(flake.nvmm_in(&ns, &["up", "box"]));
        assert_eq!(out.code(), Some(0), "{out:?}");
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(flake.runtime_dir().join("vms/box/vm.json")).unwrap(),
        )
        .unwrap();
        let address = record["network"]["address"].as_str().unwrap().to_owned();
        let identity = PathBuf::from(record["ssh"]["identity"].as_str().unwrap());
        let recorded_host_key = record["ssh"]["host_key"].as_str().unwrap().to_owned();

        // The keys live in the VM's persistent directory, STATE/vms/SCOPE/box/.
        let scopes: Vec<PathBuf> = std::fs::read_dir(flake.state_dir().join("vms"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(scopes.len(), 1, "one flake, one scope: {scopes:?}");
        let persistent = scopes[0].join("box");
        assert_eq!(identity, persistent.join("id_ed25519"), "{record}");
        let host_key = persistent.join("ssh_host_ed25519_key");
        assert!(host_key.is_file(), "{}", host_key.display());

        // The forwarder runs in the namespace: its connections to the guest's address now end
        // at this namespace's own stack.
        ns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
        Some(Self {
            sshd: None,
            flake,
            temp,
            ns,
            address,
            host_key,
            recorded_host_key,
            identity,
        })
    }

    /// (Re)starts the stand-in sshd with this host key, authorizing the VM's client key.
    fn serve_ssh(&mut self, host_key: &Path) {
        self.sshd = None;
        self.sshd = Some(Sshd::start(
            &self.ns,
            &self.temp.0,
            &self.address,
            host_key,
            &self.identity.with_extension("pub"),
        ));
    }

    /// `nvmm ssh box -- CMD…` in the namespace, with HOME in the test's directory.
    fn ssh(&self, command: &[&str]) -> Output {
        let mut args = vec!["ssh", "box", "--"];
        args.extend_from_slice(command);
        let mut cmd = self.flake.nvmm_in(&self.ns, &args);
        cmd.env("HOME", self.home());
        run(cmd)
    }

    fn home(&self) -> PathBuf {
        let home = self.temp.0.join("home");
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    fn sshd_log(&self) -> String {
        self.sshd.as_ref().map(Sshd::log).unwrap_or_default()
    }
}

/// The user's own known_hosts as ssh finds it: under the home directory of the passwd entry
/// (ssh does not read $HOME for `~`).
fn users_known_hosts() -> (bool, Option<Vec<u8>>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() }.to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let home = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 5 && fields[2] == uid)
        .map(|fields| PathBuf::from(fields[5]))
        .unwrap();
    let dot_ssh = home.join(".ssh");
    (
        dot_ssh.exists(),
        std::fs::read(dot_ssh.join("known_hosts")).ok(),
    )
}

#[test]
fn nvmm_ssh_logs_in_with_the_vms_client_key_and_pins_its_host_key() {
    let Some(mut vm) = Fixture::new("ssh") else {
        return;
    };
    let public = std::fs::read_to_string(vm.host_key.with_extension("pub")).unwrap();
    assert_eq!(
        vm.recorded_host_key,
        public.trim(),
        "vm.json pins the seeded key"
    );
    let before = users_known_hosts();

    let host_key = vm.host_key.clone();
    vm.serve_ssh(&host_key);

    // In through the forward, as root, with no question and no word about host keys: the
    // session's server end is the guest's address, port 22.
    let out = vm.ssh(&["printenv", "SSH_CONNECTION", "USER"]);
    let log = vm.sshd_log();
    assert_eq!(out.code(), Some(0), "{out:?}\nsshd: {log}");
    let mut lines = out.stdout.lines();
    let connection: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(connection[2..], [vm.address.as_str(), "22"], "{out:?}");
    assert_eq!(lines.next(), Some("root"), "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    assert!(log.contains("Accepted publickey for root"), "{log}");

    // The remote command's exit status is nvmm ssh's.
    let out = vm.ssh(&["exit", "7"]);
    assert_eq!(out.code(), Some(7), "{out:?}\nsshd: {}", vm.sshd_log());
    assert_eq!(out.stderr, "", "{out:?}");

    // The user's own ssh files are left alone: no .ssh appears in $HOME, and the known_hosts
    // ssh would use (under the passwd entry's home) is as it was.
    assert!(!vm.home().join(".ssh").exists(), "a .ssh appeared in $HOME");
    assert_eq!(
        users_known_hosts(),
        before,
        "the user's known_hosts changed"
    );

    // The pin is real: a server with any other host key is refused, and nothing is learned.
    let impostor = vm.temp.0.join("impostor_host_key");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&impostor)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(keygen.success());
    vm.serve_ssh(&impostor);
    let out = vm.ssh(&["true"]);
    assert_eq!(out.code(), Some(255), "{out:?}\nsshd: {}", vm.sshd_log());
    assert!(
        out.stderr
            .contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("Host key verification failed."),
        "{out:?}"
    );
    assert!(!vm.home().join(".ssh").exists(), "a .ssh appeared in $HOME");
    assert_eq!(
        users_known_hosts(),
        before,
        "the user's known_hosts changed"
    );

    // And the right key works again: nvmm pins the VM's key, not whatever it saw last.
    vm.serve_ssh(&host_key);
    let out = vm.ssh(&["true"]);
    assert_eq!(out.code(), Some(0), "{out:?}\nsshd: {}", vm.sshd_log());

    vm.sshd = None;
    let out = run(vm.flake.nvmm_in(&vm.ns, &["stop", "box"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let out = vm.ssh(&["true"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("error: no VM named box runs"),
        "{out:?}"
    );
}

/// CMD's words reach the guest as they are, as with `docker exec` and `kubectl exec`: a shell
/// script and its arguments survive. ssh itself joins its command words with spaces for the
/// remote shell to split again, so nvmm has to quote each one.
#[test]
fn nvmm_ssh_runs_the_commands_words_unchanged() {
    let Some(mut vm) = Fixture::new("ssh-words") else {
        return;
    };
    let host_key = vm.host_key.clone();
    vm.serve_ssh(&host_key);
    let out = vm.ssh(&[
        "sh",
        "-c",
        "echo \"hello from $0 and $1\"; exit 7",
        "one",
        "two  words; 'quoted'",
    ]);
    assert_eq!(
        out.stdout, "hello from one and two  words; 'quoted'\n",
        "{out:?}"
    );
    assert_eq!(out.code(), Some(7), "{out:?}");
}
