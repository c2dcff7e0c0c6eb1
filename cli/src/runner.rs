//! Runner directories: `nvmm.json` and the files it names (the contract in docs/runner.md).
//! Whatever made the directory, Nix or not, this is all `nvmm boot` knows of a system.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::net::forward::ForwardSpec;

/// The runner format this nvmm reads.
pub const RUNNER_VERSION: u64 = 1;
/// The description's file name inside a runner directory.
pub const RUNNER_FILE: &str = "nvmm.json";
/// The largest `diskSizeMiB`: the largest size in MiB whose byte count (`<< 20`) fits a `u64`.
/// Past it the shift would drop the high bits and give a small disk (or an empty one) without
/// a word.
pub const MAX_DISK_SIZE_MIB: u64 = u64::MAX >> 20;

/// Errors reading a runner directory.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// `nvmm.json` could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nvmm.json` is not what docs/runner.md describes.
    #[error("{} is not a valid runner description: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the member.
        reason: String,
    },
    /// A newer (or older) format.
    #[error("{} has format version {found}; this nvmm reads version {RUNNER_VERSION}", .path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version it states.
        found: u64,
    },
    /// A path the description names does not exist, or is no file (a directory).
    #[error("{} names {member} {}, which {}", .runner.display(), .path.display(),
        if .path.exists() { "is not a file" } else { "does not exist" })]
    Missing {
        /// The file.
        runner: PathBuf,
        /// The member (`kernel`, ...).
        member: &'static str,
        /// The path it resolved to.
        path: PathBuf,
    },
}

/// Where typing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerConsole {
    /// hvc0.
    Virtio,
    /// ttyS0.
    Serial,
}

/// How the kernel finds virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerDiscovery {
    /// `virtio_mmio.device=` only.
    Cmdline,
    /// ACPI only.
    Acpi,
    /// Both.
    Both,
}

/// One `forwardPorts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardPort {
    host: u16,
    guest: u16,
    #[serde(default = "default_forward_address")]
    address: IpAddr,
}

fn default_forward_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// `nvmm.json` as written; [`Runner`] is the checked form.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunnerFile {
    version: u64,
    #[serde(default)]
    name: Option<String>,
    kernel: PathBuf,
    #[serde(default)]
    initrd: Option<PathBuf>,
    cmdline: String,
    #[serde(default)]
    store_image: Option<PathBuf>,
    #[serde(default = "default_memory", rename = "memoryMiB")]
    memory_mib: u64,
    #[serde(default = "default_vcpus")]
    vcpus: u8,
    #[serde(default = "default_disk_size", rename = "diskSizeMiB")]
    disk_size_mib: u64,
    #[serde(default)]
    forward_ports: Vec<ForwardPort>,
    #[serde(default = "default_console")]
    console: RunnerConsole,
    #[serde(default = "default_discovery")]
    virtio_discovery: RunnerDiscovery,
    #[serde(default)]
    cmdline_network: bool,
    #[serde(default)]
    module_version: Option<String>,
}

fn default_memory() -> u64 {
    1024
}
fn default_vcpus() -> u8 {
    1
}
fn default_disk_size() -> u64 {
    crate::disks::DEFAULT_OVERLAY_SIZE >> 20
}
fn default_console() -> RunnerConsole {
    RunnerConsole::Virtio
}
fn default_discovery() -> RunnerDiscovery {
    RunnerDiscovery::Cmdline
}

/// A checked runner: every path absolute and present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// The runner directory.
    pub dir: PathBuf,
    /// The system's own name, if it states one.
    pub name: Option<String>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (after nvmm's defaults).
    pub cmdline: String,
    /// Read-only store disk.
    pub store_image: Option<PathBuf>,
    /// Default guest memory, MiB.
    pub memory_mib: u64,
    /// Default vCPU count.
    pub vcpus: u8,
    /// Writable disk size, MiB: 1 to [`MAX_DISK_SIZE_MIB`].
    pub disk_size_mib: u64,
    /// Ports forwarded from the host.
    pub forwards: Vec<ForwardSpec>,
    /// Where typing goes.
    pub console: RunnerConsole,
    /// How the kernel finds virtio devices.
    pub virtio_discovery: RunnerDiscovery,
    /// Put the network on the command line too.
    pub cmdline_network: bool,
    /// What made the runner.
    pub module_version: Option<String>,
}

impl Runner {
    /// Reads and checks `dir/nvmm.json`.
    pub fn load(dir: &Path) -> Result<Runner, RunnerError> {
        let path = dir.join(RUNNER_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| RunnerError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(dir, &text)
    }

    /// Checks `text`, the contents of `dir/nvmm.json`. Only the paths it names are looked up
    /// (they must exist); the description itself is not read from `dir`, so the fuzz targets
    /// can parse documents without writing them out.
    pub fn parse(dir: &Path, text: &str) -> Result<Runner, RunnerError> {
        let path = dir.join(RUNNER_FILE);
        let invalid = |reason: String| RunnerError::Invalid {
            path: path.clone(),
            reason,
        };
        // The version first, alone: a future format may not parse as this one.
        #[derive(Deserialize)]
        struct Versioned {
            version: Option<u64>,
        }
        let versioned: Versioned =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        match versioned.version {
            None => return Err(invalid("missing field `version`".into())),
            Some(RUNNER_VERSION) => {}
            Some(found) => {
                return Err(RunnerError::Version {
                    path: path.clone(),
                    found,
                });
            }
        }
        let file: RunnerFile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        debug_assert_eq!(file.version, RUNNER_VERSION);
        if file.memory_mib == 0 {
            return Err(invalid("`memoryMiB` must be at least 1".into()));
        }
        if file.vcpus == 0 {
            return Err(invalid("`vcpus` must be at least 1".into()));
        }
        if file.forward_ports.iter().any(|f| f.guest == 0) {
            return Err(invalid("a `forwardPorts` entry has guest port 0".into()));
        }
        if file.disk_size_mib == 0 {
            return Err(invalid("`diskSizeMiB` must be at least 1".into()));
        }
        if file.disk_size_mib > MAX_DISK_SIZE_MIB {
            return Err(invalid(format!(
                "`diskSizeMiB` must be at most {MAX_DISK_SIZE_MIB}"
            )));
        }
        let existing = |member: &'static str, relative: &Path| {
            let resolved = dir.join(relative);
            // A directory (`"kernel": "."`) would pass here and fail to load much later.
            if resolved.is_file() {
                Ok(resolved)
            } else {
                Err(RunnerError::Missing {
                    runner: path.clone(),
                    member,
                    path: resolved,
                })
            }
        };
        Ok(Runner {
            dir: dir.to_path_buf(),
            name: file.name,
            kernel: existing("kernel", &file.kernel)?,
            initrd: file.initrd.map(|p| existing("initrd", &p)).transpose()?,
            cmdline: file.cmdline,
            store_image: file
                .store_image
                .map(|p| existing("storeImage", &p))
                .transpose()?,
            memory_mib: file.memory_mib,
            vcpus: file.vcpus,
            disk_size_mib: file.disk_size_mib,
            forwards: file
                .forward_ports
                .iter()
                .map(|f| ForwardSpec {
                    host_addr: f.address,
                    host_port: f.host,
                    guest_port: f.guest,
                })
                .collect(),
            console: file.console,
            virtio_discovery: file.virtio_discovery,
            cmdline_network: file.cmdline_network,
            module_version: file.module_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::test_util::TempDir;

    fn runner_dir(json: &str) -> TempDir {
        let dir = TempDir::new("runner");
        std::fs::write(dir.path().join("kernel"), b"k").unwrap();
        std::fs::write(dir.path().join("store.erofs"), b"s").unwrap();
        std::fs::write(dir.path().join(RUNNER_FILE), json).unwrap();
        dir
    }

    #[test]
    fn minimal_runner_gets_the_documented_defaults() {
        let dir = runner_dir(r#"{"version": 1, "kernel": "kernel", "cmdline": "init=/init"}"#);
        let runner = Runner::load(dir.path()).unwrap();
        assert_eq!(runner.kernel, dir.path().join("kernel"));
        assert_eq!(runner.initrd, None);
        assert_eq!(runner.cmdline, "init=/init");
        assert_eq!(runner.memory_mib, 1024);
        assert_eq!(runner.vcpus, 1);
        assert_eq!(runner.disk_size_mib, 8192);
        assert_eq!(runner.console, RunnerConsole::Virtio);
        assert_eq!(runner.virtio_discovery, RunnerDiscovery::Cmdline);
        assert!(!runner.cmdline_network);
        assert!(runner.forwards.is_empty());
    }

    #[test]
    fn full_runner_is_read_and_unknown_members_ignored() {
        let dir = runner_dir(
            r#"{"version": 1, "name": "server", "kernel": "kernel", "cmdline": "x",
                "storeImage": "store.erofs", "memoryMiB": 256, "vcpus": 2, "diskSizeMiB": 64,
                "forwardPorts": [{"host": 8080, "guest": 80},
                                 {"host": 2222, "guest": 22, "address": "0.0.0.0"}],
                "console": "serial", "virtioDiscovery": "both", "cmdlineNetwork": true,
                "moduleVersion": "0.1.0", "futureMember": {"a": 1}}"#,
        );
        let runner = Runner::load(dir.path()).unwrap();
        assert_eq!(runner.name.as_deref(), Some("server"));
        assert_eq!(runner.store_image, Some(dir.path().join("store.erofs")));
        assert_eq!(
            (runner.memory_mib, runner.vcpus, runner.disk_size_mib),
            (256, 2, 64)
        );
        assert_eq!(runner.forwards.len(), 2);
        assert_eq!(runner.forwards[0].listen_addr().port(), 8080);
        assert_eq!(
            runner.forwards[1].listen_addr(),
            "0.0.0.0:2222".parse().unwrap()
        );
        assert_eq!(runner.console, RunnerConsole::Serial);
        assert_eq!(runner.virtio_discovery, RunnerDiscovery::Both);
        assert!(runner.cmdline_network);
        assert_eq!(runner.module_version.as_deref(), Some("0.1.0"));
    }

    #[test]
    fn errors_name_the_member() {
        let cases = [
            (
                r#"{"kernel": "kernel", "cmdline": ""}"#,
                "missing field `version`",
            ),
            (r#"{"version": 1, "cmdline": ""}"#, "missing field `kernel`"),
            (
                r#"{"version": 1, "kernel": "kernel", "cmdline": 3}"#,
                "invalid type",
            ),
            (
                r#"{"version": 1, "kernel": "kernel", "cmdline": "", "console": "vga"}"#,
                "unknown variant `vga`",
            ),
            (
                r#"{"version": 1, "kernel": "kernel", "cmdline": "", "vcpus": 0}"#,
                "`vcpus` must be at least 1",
            ),
            (
                r#"{"version": 1, "kernel": "kernel", "cmdline": "", "forwardPorts": [{"host": 1}]}"#,
                "missing field `guest`",
            ),
            ("not json", "expected"),
        ];
        for (json, expected) in cases {
            let dir = runner_dir(json);
            let err = Runner::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn disk_sizes_past_a_64_bit_byte_count_are_refused() {
        // 2^44 MiB is 2^64 bytes: `<< 20` made it an empty disk, and 2^44 + 8192 MiB the
        // default 8 GiB one.
        for mib in [1 << 44, (1 << 44) + 8192, u64::MAX] {
            let dir = runner_dir(&format!(
                r#"{{"version": 1, "kernel": "kernel", "cmdline": "", "diskSizeMiB": {mib}}}"#
            ));
            let err = Runner::load(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("`diskSizeMiB` must be at most"),
                "{mib}: {err}"
            );
        }
        let dir = runner_dir(&format!(
            r#"{{"version": 1, "kernel": "kernel", "cmdline": "", "diskSizeMiB": {MAX_DISK_SIZE_MIB}}}"#
        ));
        let runner = Runner::load(dir.path()).unwrap();
        assert_eq!((runner.disk_size_mib << 20) >> 20, runner.disk_size_mib);
    }

    #[test]
    fn other_versions_and_missing_files_are_refused() {
        let dir = runner_dir(r#"{"version": 2, "kernel": 5}"#);
        let err = Runner::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, RunnerError::Version { found: 2, .. }),
            "{err}"
        );

        let dir = runner_dir(r#"{"version": 1, "kernel": "vmlinux", "cmdline": ""}"#);
        let err = Runner::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("names kernel") && err.contains("vmlinux, which does not exist"),
            "{err}"
        );

        // A directory is no kernel (found by fuzz/fuzz_targets/runner_json.rs).
        let dir = runner_dir(r#"{"version": 1, "kernel": ".", "cmdline": ""}"#);
        let err = Runner::load(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("which is not a file"), "{err}");

        let dir = TempDir::new("runner-empty");
        let err = Runner::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("cannot read") && err.contains(RUNNER_FILE),
            "{err}"
        );
    }
}
