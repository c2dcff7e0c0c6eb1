//! Where nvmm keeps track of VMs, and how it tells a running VM from the leftovers of a dead one.
//!
//! Runtime, per VM (`RUNTIME/vms/NAME/`, gone with a reboot of the host):
//!
//! | file | what |
//! |---|---|
//! | `lock` | locked (an open-file-description lock) by the VM's nvmm for as long as it lives: the kernel drops the lock when the process dies, however it dies, so "locked" is "running" |
//! | `pid` | that process |
//! | `vm.json` | [`VmRecord`]: what `ps`, `ssh` and `down` need to know |
//! | `control.sock` | the control socket (control.rs) |
//! | `console.sock`, `console.log`, `nvmm.log` | a background VM's console and logs (background.rs) |
//! | `overlay.img`, `seed.img` | the VM's per-boot disks |
//!
//! Persistent (`STATE/`): networks (net/), the guest module (guest-module/), and per VM under
//! `STATE/vms/SCOPE/NAME/`, where SCOPE names the flake it came from (two flakes' `server`s
//! keep apart): ssh keys and the kept disk.
//!
//! Every command that looks at VMs reaps the dead first: an unlocked VM directory is a VM whose
//! nvmm died without cleaning up (SIGKILL, OOM); its files go, its network membership is
//! reaped by net::host.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Errors of VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A VM of that name already runs.
    #[error("VM {name} is already running (process {pid})")]
    AlreadyRunning {
        /// VM name.
        name: String,
        /// Its nvmm process (0 if unknown).
        pid: u32,
    },
    /// A state file could not be read or written.
    #[error("cannot set up {}", .path.display())]
    Files {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What nvmm records of a running VM (`vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name.
    pub name: String,
    /// The flake it was built from (`nvmm boot`), if any.
    #[serde(default)]
    pub flake: Option<String>,
    /// The nvmm process.
    pub pid: u32,
    /// When it started, in milliseconds since the epoch.
    pub started_ms: u64,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// In the background (console on a socket).
    pub background: bool,
    /// The network, if it joined one.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
    /// The ssh keys (`nvmm ssh`), if nvmm gave the guest any.
    #[serde(default)]
    pub ssh: Option<SshRecord>,
}

/// A VM's place on its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The network (bridge) name.
    pub name: String,
    /// The guest's address.
    pub address: std::net::Ipv4Addr,
    /// Forwarded ports, ssh first.
    pub forwards: Vec<ForwardRecord>,
}

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRecord {
    /// Where the host listens.
    pub host: std::net::SocketAddr,
    /// The guest port.
    pub guest: u16,
}

/// What `nvmm ssh` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRecord {
    /// The private key the guest authorizes for root.
    pub identity: PathBuf,
    /// The guest's host public key (`ssh-ed25519 AAAA… comment`).
    pub host_key: String,
}

impl NetworkRecord {
    /// The host port forwarded to the guest's ssh (the first forward).
    pub fn ssh_port(&self) -> Option<u16> {
        self.forwards
            .iter()
            .find(|f| f.guest == 22)
            .map(|f| f.host.port())
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A VM's runtime directory.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

/// Held by the process that runs the VM; dropping it releases the name and removes the files
/// that only mean something while the VM runs.
#[derive(Debug)]
pub struct VmLock {
    dir: VmDir,
    _file: File,
}

impl Drop for VmLock {
    fn drop(&mut self) {
        self.dir.remove_runtime_files();
        let _ = fs::remove_file(self.dir.file("lock"));
        // Only if nothing is left (a background VM's logs stay for `nvmm logs`).
        let _ = fs::remove_dir(&self.dir.0);
    }
}

fn same_inode(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Is a VM running?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its nvmm holds the lock.
    Running {
        /// That process (0 if its pid file is unreadable).
        pid: u32,
    },
    /// Nobody holds the lock, but the VM left files behind.
    Dead,
    /// No trace of it.
    Absent,
}

impl VmDir {
    /// `RUNTIME_DIR/vms/NAME`.
    pub fn new(runtime_dir: &Path, name: &str) -> Self {
        Self(runtime_dir.join("vms").join(name))
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The VM's name (the directory's).
    pub fn name(&self) -> String {
        self.0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Takes the VM's name for this process, for as long as the returned lock lives, and writes
    /// the pid file. Fails if another process holds it.
    pub fn lock(&self) -> Result<VmLock, StateError> {
        let files_error = |source| StateError::Files {
            path: self.0.clone(),
            source,
        };
        fs::create_dir_all(&self.0).map_err(files_error)?;
        let path = self.file("lock");
        // The owner removes the lock file when it ends: a file locked here after that removal
        // is no longer the one at `path`, so check, and try again with the new one.
        let file = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(files_error)?;
            if let Err(err) = set_lock(&file) {
                return Err(match err.raw_os_error() {
                    Some(libc::EAGAIN | libc::EACCES) => StateError::AlreadyRunning {
                        name: self.name(),
                        pid: self.read_pid().unwrap_or(0),
                    },
                    _ => files_error(err),
                });
            }
            if same_inode(&file, &path) {
                break file;
            }
        };
        fs::write(self.file("pid"), format!("{}\n", std::process::id())).map_err(files_error)?;
        Ok(VmLock {
            dir: self.clone(),
            _file: file,
        })
    }

    /// Whether the VM runs, without disturbing it.
    pub fn liveness(&self) -> Liveness {
        let Ok(file) = File::open(self.file("lock")) else {
            return match self.0.join("vm.json").exists() || self.0.join("pid").exists() {
                true => Liveness::Dead,
                false => Liveness::Absent,
            };
        };
        match is_locked(&file) {
            Ok(true) => Liveness::Running {
                pid: self.read_pid().unwrap_or(0),
            },
            _ if self.file("vm.json").exists() || self.file("pid").exists() => Liveness::Dead,
            _ => Liveness::Absent,
        }
    }

    /// The pid of the running VM's nvmm, if it runs.
    pub fn running_pid(&self) -> Option<u32> {
        match self.liveness() {
            Liveness::Running { pid } => Some(pid),
            _ => None,
        }
    }

    fn read_pid(&self) -> Option<u32> {
        fs::read_to_string(self.file("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Writes `vm.json`.
    pub fn write_record(&self, record: &VmRecord) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(record).map_err(|e| StateError::Files {
            path: self.file("vm.json"),
            source: io::Error::other(e),
        })?;
        let temp = self.file("vm.json.tmp");
        fs::write(&temp, text + "\n")
            .and_then(|()| fs::rename(&temp, self.file("vm.json")))
            .map_err(|source| StateError::Files {
                path: self.file("vm.json"),
                source,
            })
    }

    /// Reads `vm.json`, if there is a readable one.
    pub fn record(&self) -> Option<VmRecord> {
        serde_json::from_slice(&fs::read(self.file("vm.json")).ok()?).ok()
    }

    /// Removes what only a running VM uses (the logs stay, for `nvmm logs`).
    fn remove_runtime_files(&self) {
        for name in [
            "vm.json",
            "pid",
            "control.sock",
            "console.sock",
            "seed.img",
            "overlay.img",
            "known_hosts",
            "forwards",
        ] {
            let _ = fs::remove_file(self.file(name));
        }
    }

    /// Cleans up after a dead VM; returns whether it was dead.
    pub fn reap_if_dead(&self) -> bool {
        if self.liveness() != Liveness::Dead {
            return false;
        }
        // Taking the lock makes sure no new VM of this name started meanwhile; releasing it
        // removes what the dead one left (its logs stay).
        match self.lock() {
            Ok(lock) => {
                log::info!("cleaned up after VM {}, whose nvmm died", self.name());
                drop(lock);
                true
            }
            Err(_) => false,
        }
    }
}

/// Every VM directory under `runtime_dir`, sorted by name.
pub fn vm_dirs(runtime_dir: &Path) -> Vec<VmDir> {
    let mut dirs: Vec<VmDir> = fs::read_dir(runtime_dir.join("vms"))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| VmDir(entry.path()))
        .collect();
    dirs.sort_by(|a, b| a.0.cmp(&b.0));
    dirs
}

/// Cleans up after every dead VM (files here, taps and bridges in net::host); returns the names
/// of the VMs that were dead.
pub fn reap_dead(runtime_dir: &Path) -> Vec<String> {
    let dead: Vec<String> = vm_dirs(runtime_dir)
        .into_iter()
        .filter(|dir| dir.reap_if_dead())
        .map(|dir| dir.name())
        .collect();
    if let Err(err) = crate::net::host::reap_stale(runtime_dir) {
        log::warn!(
            "cleaning up dead VMs' networks: {}",
            crate::exit::error_chain(&err)
        );
    }
    dead
}

/// The persistent directory of VM `name` from `scope` (see [`scope_of_flake`]).
pub fn persistent_vm_dir(state_dir: &Path, scope: &str, name: &str) -> PathBuf {
    state_dir.join("vms").join(scope).join(name)
}

/// The scope of VMs built from `flake`: its last path component (for people) and a hash of the
/// whole reference (for uniqueness).
pub fn scope_of_flake(flake: &str) -> String {
    let base: String = flake
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect();
    let hash = flake.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}-{:08x}", base.trim_start_matches('.'), hash as u32)
}

// Open-file-description locks: owned by the open file (not the process), so a forked child
// does not inherit a lock it did not take, and F_OFD_GETLK tests one without taking it.
fn whole_file_lock(kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

fn set_lock(file: &File) -> io::Result<()> {
    let lock = whole_file_lock(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass; the fd is open.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn is_locked(file: &File) -> io::Result<bool> {
    let mut lock = whole_file_lock(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK fills in the flock struct we pass; the fd is open.
    match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } {
        0 => Ok(lock.l_type != libc::F_UNLCK as libc::c_short),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::test_util::TempDir;

    #[test]
    fn a_lock_is_running_and_its_release_leaves_no_runtime_files() {
        let runtime = TempDir::new("state");
        let dir = VmDir::new(runtime.path(), "server");
        assert_eq!(dir.liveness(), Liveness::Absent);
        let lock = dir.lock().unwrap();
        assert_eq!(
            dir.liveness(),
            Liveness::Running {
                pid: std::process::id()
            }
        );
        // A second open file description cannot take it, even in the same process.
        let err = dir.lock().unwrap_err();
        assert!(
            matches!(err, StateError::AlreadyRunning { ref name, .. } if name == "server"),
            "{err}"
        );
        std::fs::write(dir.file("console.log"), "kept").unwrap();
        drop(lock);
        assert_eq!(dir.liveness(), Liveness::Absent);
        assert!(!dir.file("pid").exists());
        assert!(dir.file("console.log").exists(), "logs outlive the VM");
        std::fs::remove_file(dir.file("console.log")).unwrap();
        drop(dir.lock().unwrap());
        assert!(!dir.0.exists(), "an empty directory goes too");
    }

    #[test]
    fn leftovers_without_a_lock_holder_are_dead_and_reaped() {
        let runtime = TempDir::new("state-dead");
        let dir = VmDir::new(runtime.path(), "client");
        std::fs::create_dir_all(&dir.0).unwrap();
        for file in ["lock", "pid", "vm.json", "overlay.img", "console.log"] {
            std::fs::write(dir.file(file), "").unwrap();
        }
        assert_eq!(dir.liveness(), Liveness::Dead);
        assert_eq!(reap_dead(runtime.path()), ["client"]);
        assert_eq!(dir.liveness(), Liveness::Absent);
        assert!(!dir.file("overlay.img").exists());
        assert!(!dir.file("lock").exists());
        assert!(dir.file("console.log").exists());
        assert!(reap_dead(runtime.path()).is_empty());
    }

    #[test]
    fn records_round_trip() {
        let runtime = TempDir::new("state-record");
        let dir = VmDir::new(runtime.path(), "server");
        std::fs::create_dir_all(&dir.0).unwrap();
        let record = VmRecord {
            name: "server".into(),
            flake: Some("/home/me/fleet".into()),
            pid: 42,
            started_ms: 1,
            memory_mib: 1024,
            vcpus: 2,
            background: true,
            network: Some(NetworkRecord {
                name: "nvmm0".into(),
                address: "10.213.0.2".parse().unwrap(),
                forwards: vec![ForwardRecord {
                    host: "127.0.0.1:2222".parse().unwrap(),
                    guest: 22,
                }],
            }),
            ssh: None,
        };
        dir.write_record(&record).unwrap();
        assert_eq!(dir.record(), Some(record.clone()));
        assert_eq!(record.network.unwrap().ssh_port(), Some(2222));
    }

    #[test]
    fn flake_scopes_are_readable_and_distinct() {
        assert!(scope_of_flake("/home/me/fleet").starts_with("fleet-"));
        assert!(scope_of_flake("github:me/fleet").starts_with("fleet-"));
        assert_ne!(scope_of_flake("/a/fleet"), scope_of_flake("/b/fleet"));
        assert_eq!(scope_of_flake("/a/fleet"), scope_of_flake("/a/fleet"));
    }
}
