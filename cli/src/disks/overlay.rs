//! The guest's writable disk: a fresh sparse file per boot, or a kept one (`--keep`) with a
//! record of the system it was made for.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::json::{self, Value};
use super::{DiskError, check_disk_size, vm_dir, write_atomically};

/// Apparent size of an overlay disk unless asked otherwise: 8 GiB. The file is sparse, so the
/// host only spends what the guest writes.
pub const DEFAULT_OVERLAY_SIZE: u64 = 8 << 30;

/// The per-boot overlay in `<runtime dir>/<vm>/`.
const FRESH_FILE: &str = "overlay.img";
/// The kept disk in `<state dir>/<vm>/`.
const KEPT_FILE: &str = "disk.img";
/// The kept disk's record, beside it.
const RECORD_FILE: &str = "disk.json";
/// A record is four short fields; anything much larger is not one (and is not read whole).
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// A writable disk image for one VM. A fresh disk is removed when this is dropped; a kept disk
/// stays.
#[derive(Debug)]
pub struct OverlayDisk {
    path: PathBuf,
    size_bytes: u64,
    /// `None` for a kept disk. For a fresh one, the file nvmm created, held open so that its
    /// inode number cannot be reused while this lives: drop compares it with what is at `path`
    /// and never removes a file that a later run of the same VM put there.
    fresh: Option<fs::File>,
}

impl OverlayDisk {
    /// Creates a fresh, empty, sparse overlay at `runtime_dir/<vm_name>/overlay.img`, replacing
    /// one left behind by a run that crashed. `size_bytes` is its apparent size, a multiple of
    /// [`DISK_BLOCK_SIZE`](super::DISK_BLOCK_SIZE); nothing is written, so it takes no space
    /// until the guest writes.
    pub fn create_fresh(
        runtime_dir: &Path,
        vm_name: &str,
        size_bytes: u64,
    ) -> Result<OverlayDisk, DiskError> {
        check_disk_size(size_bytes)?;
        let path = vm_dir(runtime_dir, vm_name)?.join(FRESH_FILE);
        // Unlink rather than truncate: if some process still has the old file open, it keeps
        // its own inode instead of seeing its disk emptied underneath it.
        match fs::remove_file(&path) {
            Ok(()) => log::info!(
                "replaced overlay disk {} left by an earlier run",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DiskError::RemoveStaleOverlay { path, source }),
        }
        let file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => file,
            Err(source) => return Err(DiskError::CreateDisk { path, source }),
        };
        // set_len only moves the end of file: the blocks stay unallocated (sparse).
        let resized = file.set_len(size_bytes);
        // From here on, drop removes the file on every error path.
        let disk = OverlayDisk {
            path,
            size_bytes,
            fresh: Some(file),
        };
        resized.map_err(|source| DiskError::ResizeDisk {
            path: disk.path.clone(),
            size: size_bytes,
            source,
        })?;
        log::debug!(
            "created overlay disk {} ({size_bytes} bytes, sparse)",
            disk.path.display()
        );
        Ok(disk)
    }

    /// Opens the kept disk `state_dir/<vm_name>/disk.img` (`--keep`), creating it sparse on first
    /// use; it is never removed by nvmm. A disk smaller than `size_bytes` grows (sparse); a
    /// larger one is left as it is.
    ///
    /// `disk.json` beside it records the system closure (`system`, a store path) the disk is
    /// used with, when the disk was created and its size. If the record names another system,
    /// or cannot be read, the disk is still used, the record is rewritten for `system`, and a
    /// [`KeptDiskWarning`] says so: the disk holds state the new system did not write.
    pub fn keep(
        state_dir: &Path,
        vm_name: &str,
        size_bytes: u64,
        system: &str,
    ) -> Result<(OverlayDisk, Option<KeptDiskWarning>), DiskError> {
        check_disk_size(size_bytes)?;
        let dir = vm_dir(state_dir, vm_name)?;
        let path = dir.join(KEPT_FILE);
        let record_path = dir.join(RECORD_FILE);
        let now = rfc3339(SystemTime::now());

        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                let created = file
                    .set_len(size_bytes)
                    .map_err(|source| DiskError::ResizeDisk {
                        path: path.clone(),
                        size: size_bytes,
                        source,
                    })
                    .and_then(|()| {
                        let record = DiskRecord {
                            system,
                            created: Some(&now),
                            updated: &now,
                            size_bytes,
                        };
                        record.write(&record_path)
                    });
                if let Err(err) = created {
                    // The disk is new and empty: leave nothing that a later run would take
                    // for a kept disk without a record.
                    let _ = fs::remove_file(&path);
                    return Err(err);
                }
                log::info!("created kept disk {} for {system}", path.display());
                return Ok((OverlayDisk::kept(path, size_bytes), None));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(DiskError::CreateDisk { path, source }),
        }

        // Opened read-write now, so that a disk the VM could not write fails here, by name.
        let open_error = |source| DiskError::OpenKeptDisk {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        if !metadata.is_file() {
            return Err(DiskError::KeptDiskNotAFile { path });
        }
        let mut actual_size = metadata.len();
        if actual_size < size_bytes {
            file.set_len(size_bytes)
                .map_err(|source| DiskError::ResizeDisk {
                    path: path.clone(),
                    size: size_bytes,
                    source,
                })?;
            log::info!(
                "grew kept disk {} from {actual_size} to {size_bytes} bytes",
                path.display()
            );
            actual_size = size_bytes;
        }

        let previous = read_record(&record_path);
        let record_stale = match &previous {
            Ok(previous) => previous.size_bytes != Some(actual_size),
            Err(_) => true,
        };
        let (warning, created) = match previous {
            Ok(previous) if previous.system == system => (None, previous.created),
            Ok(previous) => (
                Some(KeptDiskWarning::SystemChanged {
                    disk: path.clone(),
                    old: previous.system,
                    new: system.to_owned(),
                }),
                previous.created,
            ),
            Err(reason) => (
                Some(KeptDiskWarning::UnknownSystem {
                    disk: path.clone(),
                    reason,
                    new: system.to_owned(),
                }),
                // The best remaining answer to "when was this disk made".
                metadata.created().ok().map(rfc3339),
            ),
        };
        if warning.is_some() || record_stale {
            let record = DiskRecord {
                system,
                created: created.as_deref(),
                updated: &now,
                size_bytes: actual_size,
            };
            record.write(&record_path)?;
        }
        Ok((OverlayDisk::kept(path, actual_size), warning))
    }

    fn kept(path: PathBuf, size_bytes: u64) -> OverlayDisk {
        OverlayDisk {
            path,
            size_bytes,
            fresh: None,
        }
    }

    /// The image file, for the VM's writable virtio-blk device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Apparent size in bytes (for a kept disk: its actual size, which may exceed the request).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether this is a kept disk (`--keep`), which outlives the VM.
    pub fn is_kept(&self) -> bool {
        self.fresh.is_none()
    }
}

impl Drop for OverlayDisk {
    fn drop(&mut self) {
        let Some(file) = &self.fresh else {
            return;
        };
        let identity = match file.metadata() {
            Ok(metadata) => (metadata.dev(), metadata.ino()),
            Err(e) => {
                log::warn!("cannot remove overlay disk {}: {e}", self.path.display());
                return;
            }
        };
        // Only remove the file this disk created: a later run of the same VM may have replaced
        // it at this path (see create_fresh). A replacement between this check and the unlink
        // is possible but needs two runs of one VM racing, which the disks cannot prevent alone.
        match fs::symlink_metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == identity => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("cannot remove overlay disk {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::debug!(
                "overlay disk {} was replaced by another run; leaving it",
                self.path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove overlay disk {}: {e}", self.path.display()),
        }
    }
}

/// A kept disk is about to be used with a system other than the one that wrote it. The disk
/// is used anyway (that is what `--keep` asks for); the caller shows this to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptDiskWarning {
    /// The record names a different system closure.
    SystemChanged {
        /// The kept disk.
        disk: PathBuf,
        /// The system the record named.
        old: String,
        /// The system booting now.
        new: String,
    },
    /// The record is missing, unreadable or corrupt.
    UnknownSystem {
        /// The kept disk.
        disk: PathBuf,
        /// What was wrong with the record.
        reason: String,
        /// The system booting now.
        new: String,
    },
}

impl fmt::Display for KeptDiskWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeptDiskWarning::SystemChanged { disk, old, new } => write!(
                f,
                "kept disk {disk} was made for {old} and now boots {new}; it keeps the state the \
                 old system wrote (to start fresh, delete {disk} or boot without --keep)",
                disk = disk.display()
            ),
            KeptDiskWarning::UnknownSystem { disk, reason, new } => write!(
                f,
                "kept disk {disk} does not say which system it was made for ({reason}); it now \
                 boots {new} and keeps the state already on it (to start fresh, delete {disk} or \
                 boot without --keep)",
                disk = disk.display()
            ),
        }
    }
}

/// What `disk.json` says, as written.
struct DiskRecord<'a> {
    system: &'a str,
    /// When the disk file was created; `None` if no one knows any more.
    created: Option<&'a str>,
    /// When this record was written: the system named here has used the disk since then.
    updated: &'a str,
    size_bytes: u64,
}

impl DiskRecord<'_> {
    fn to_json(&self) -> String {
        let mut out = String::from("{\n");
        out.push_str(&format!("  \"system\": {},\n", json::quote(self.system)));
        if let Some(created) = self.created {
            out.push_str(&format!("  \"created\": {},\n", json::quote(created)));
        }
        out.push_str(&format!("  \"updated\": {},\n", json::quote(self.updated)));
        out.push_str(&format!("  \"size_bytes\": {}\n}}\n", self.size_bytes));
        out
    }

    /// Written atomically and synced: a kept disk outlives host crashes, and so must the record
    /// of what is on it.
    fn write(&self, path: &Path) -> Result<(), DiskError> {
        write_atomically(path, self.to_json().as_bytes(), 0o600, true).map_err(|source| {
            DiskError::WriteRecord {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

/// What nvmm could read back from `disk.json`.
#[derive(Debug)]
struct PreviousRecord {
    system: String,
    created: Option<String>,
    size_bytes: Option<u64>,
}

/// Reads `disk.json`; the error is a reason for the user ("disk.json is missing").
fn read_record(path: &Path) -> Result<PreviousRecord, String> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|file| {
        // One byte over the limit tells "too large" from "exactly at the limit".
        file.take(MAX_RECORD_BYTES + 1).read_to_string(&mut text)
    });
    match read {
        Ok(len) if len as u64 > MAX_RECORD_BYTES => {
            return Err(format!("{name} is larger than {MAX_RECORD_BYTES} bytes"));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(format!("{name} is missing")),
        Err(e) => return Err(format!("cannot read {name}: {e}")),
    }
    let members = json::parse_object(&text).map_err(|e| format!("{name} is corrupt: {e}"))?;
    let string = |field: &str| {
        members.iter().find_map(|(n, v)| match v {
            Value::Str(s) if n == field => Some(s.clone()),
            _ => None,
        })
    };
    let system = string("system")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{name} names no system"))?;
    let size_bytes = members.iter().find_map(|(n, v)| match v {
        Value::Num(s) if n == "size_bytes" => s.parse().ok(),
        _ => None,
    });
    Ok(PreviousRecord {
        system,
        created: string("created"),
        size_bytes,
    })
}

/// `time` as RFC 3339 UTC to the second ("2024-05-01T12:00:00Z"); times before 1970 (a wrong
/// clock) read as 1970.
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::disks::test_util::TempDir;
    use crate::exit::error_chain;

    const SYSTEM_A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-server-24.05";
    const SYSTEM_B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-server-24.11";
    const MIB: u64 = 1 << 20;

    fn record_text(dir: &Path, vm: &str) -> String {
        fs::read_to_string(dir.join(vm).join(RECORD_FILE)).unwrap()
    }

    #[test]
    fn fresh_disk_is_sparse_with_the_apparent_size() {
        let tmp = TempDir::new("fresh");
        let disk = OverlayDisk::create_fresh(tmp.path(), "server", DEFAULT_OVERLAY_SIZE).unwrap();
        assert!(!disk.is_kept());
        assert_eq!(disk.path(), tmp.path().join("server/overlay.img"));
        let metadata = fs::metadata(disk.path()).unwrap();
        assert_eq!(metadata.len(), 8 << 30);
        // st_blocks counts 512-byte units; a sparse file has (next to) none allocated.
        assert!(metadata.blocks() * 512 <= 64 << 10, "{}", metadata.blocks());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        let dir_mode = fs::metadata(tmp.path().join("server"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn fresh_disk_is_removed_on_drop() {
        let tmp = TempDir::new("fresh-drop");
        let disk = OverlayDisk::create_fresh(tmp.path(), "server", MIB).unwrap();
        let path = disk.path().to_path_buf();
        assert!(path.exists());
        drop(disk);
        assert!(!path.exists());
    }

    #[test]
    fn stale_overlay_from_a_crashed_run_is_replaced() {
        let tmp = TempDir::new("fresh-stale");
        let dir = tmp.path().join("server");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(FRESH_FILE), vec![0xaa; 3 * 4096]).unwrap();
        let disk = OverlayDisk::create_fresh(tmp.path(), "server", MIB).unwrap();
        let bytes = fs::read(disk.path()).unwrap();
        assert_eq!(bytes.len() as u64, MIB);
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn dropping_a_replaced_disk_leaves_the_replacement() {
        let tmp = TempDir::new("fresh-replaced");
        let first = OverlayDisk::create_fresh(tmp.path(), "server", MIB).unwrap();
        let second = OverlayDisk::create_fresh(tmp.path(), "server", MIB).unwrap();
        drop(first);
        assert!(second.path().exists());
        drop(second);
        assert!(!tmp.path().join("server").join(FRESH_FILE).exists());
    }

    #[test]
    fn bad_sizes_rejected() {
        let tmp = TempDir::new("fresh-size");
        for size in [0, 1000, MIB + 512] {
            let err = OverlayDisk::create_fresh(tmp.path(), "server", size).unwrap_err();
            assert!(matches!(err, DiskError::InvalidDiskSize { .. }), "{size}");
        }
    }

    #[test]
    fn unwritable_runtime_dir_names_the_path() {
        // A directory below a regular file cannot be created, even by root.
        let tmp = TempDir::new("fresh-unwritable");
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = OverlayDisk::create_fresh(&file, "server", MIB).unwrap_err();
        assert!(matches!(err, DiskError::CreateDir { .. }), "{err:?}");
        let text = error_chain(&err);
        assert!(
            text.contains(&*file.join("server").to_string_lossy()),
            "{text}"
        );
        assert!(text.contains("Not a directory"), "{text}");

        let err = OverlayDisk::keep(&file, "server", MIB, SYSTEM_A).unwrap_err();
        assert!(matches!(err, DiskError::CreateDir { .. }), "{err:?}");
    }

    #[test]
    fn read_only_runtime_dir_names_the_file() {
        let tmp = TempDir::new("fresh-readonly");
        fs::create_dir(tmp.path().join("server")).unwrap();
        fs::set_permissions(tmp.path().join("server"), fs::Permissions::from_mode(0o500)).unwrap();
        let result = OverlayDisk::create_fresh(tmp.path(), "server", MIB);
        // Give the cleanup back its write permission whatever happened.
        fs::set_permissions(tmp.path().join("server"), fs::Permissions::from_mode(0o700)).unwrap();
        match result {
            Ok(_) => eprintln!("skipped: this user writes into a mode-500 directory (root)"),
            Err(err) => {
                assert!(matches!(err, DiskError::CreateDisk { .. }), "{err:?}");
                let text = error_chain(&err);
                assert!(text.contains("server/overlay.img"), "{text}");
            }
        }
    }

    #[test]
    fn kept_disk_survives_drop_and_is_reused() {
        let tmp = TempDir::new("kept");
        let (disk, warning) = OverlayDisk::keep(tmp.path(), "server", 4 * MIB, SYSTEM_A).unwrap();
        assert!(warning.is_none());
        assert!(disk.is_kept());
        let path = disk.path().to_path_buf();
        assert_eq!(path, tmp.path().join("server/disk.img"));
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), 4 * MIB);
        assert!(metadata.blocks() * 512 <= 64 << 10);
        let record = record_text(tmp.path(), "server");
        let members = json::parse_object(&record).unwrap();
        let names: Vec<_> = members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["system", "created", "updated", "size_bytes"]);
        assert!(record.contains(&json::quote(SYSTEM_A)), "{record}");
        assert!(record.contains("\"size_bytes\": 4194304"), "{record}");
        drop(disk);
        assert!(path.exists());

        // State written by the guest is still there next time.
        fs::write(&path, b"guest state").unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        let (again, warning) = OverlayDisk::keep(tmp.path(), "server", 4 * MIB, SYSTEM_A).unwrap();
        assert!(warning.is_none());
        assert!(fs::read(again.path()).unwrap().starts_with(b"guest state"));
        // Same system, same size: the record is left alone.
        assert_eq!(record_text(tmp.path(), "server"), record);
    }

    #[test]
    fn switching_system_warns_and_updates_the_record() {
        let tmp = TempDir::new("kept-switch");
        OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_A).unwrap();
        let created = read_record(&tmp.path().join("server").join(RECORD_FILE))
            .unwrap()
            .created;
        let (disk, warning) = OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_B).unwrap();
        let warning = warning.expect("a warning");
        assert_eq!(
            warning,
            KeptDiskWarning::SystemChanged {
                disk: disk.path().to_path_buf(),
                old: SYSTEM_A.into(),
                new: SYSTEM_B.into(),
            }
        );
        let text = warning.to_string();
        assert!(!text.contains('\n'));
        for needle in [
            SYSTEM_A,
            SYSTEM_B,
            "--keep",
            "delete",
            &*disk.path().to_string_lossy(),
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        let record = read_record(&tmp.path().join("server").join(RECORD_FILE)).unwrap();
        assert_eq!(record.system, SYSTEM_B);
        assert_eq!(record.created, created);
        // Now the record matches: no more warnings.
        let (_, warning) = OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_B).unwrap();
        assert!(warning.is_none());
    }

    #[test]
    fn corrupt_or_missing_record_warns_and_is_rewritten() {
        let tmp = TempDir::new("kept-corrupt");
        let record_path = tmp.path().join("server").join(RECORD_FILE);
        OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_A).unwrap();
        for (contents, reason) in [
            (Some(&b"{\"system\": \"/nix/sto"[..]), "corrupt"),
            (Some(&b"\xff\xfe garbage"[..]), "cannot read"),
            (Some(&b"{\"size_bytes\": 1}"[..]), "names no system"),
            (None, "missing"),
        ] {
            match contents {
                Some(bytes) => fs::write(&record_path, bytes).unwrap(),
                None => fs::remove_file(&record_path).unwrap(),
            }
            let (disk, warning) = OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_A).unwrap();
            let Some(KeptDiskWarning::UnknownSystem { reason: got, .. }) = &warning else {
                panic!("expected an unknown-system warning, got {warning:?}");
            };
            assert!(got.contains(reason), "{got:?} lacks {reason:?}");
            let text = warning.as_ref().unwrap().to_string();
            assert!(text.contains(SYSTEM_A) && text.contains("--keep"), "{text}");
            assert!(disk.path().exists());
            assert_eq!(read_record(&record_path).unwrap().system, SYSTEM_A);
        }
    }

    #[test]
    fn kept_disk_grows_but_never_shrinks() {
        let tmp = TempDir::new("kept-grow");
        let record_path = tmp.path().join("server").join(RECORD_FILE);
        OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_A).unwrap();
        let (disk, warning) = OverlayDisk::keep(tmp.path(), "server", 8 * MIB, SYSTEM_A).unwrap();
        assert!(warning.is_none());
        assert_eq!(disk.size_bytes(), 8 * MIB);
        let metadata = fs::metadata(disk.path()).unwrap();
        assert_eq!(metadata.len(), 8 * MIB);
        assert!(metadata.blocks() * 512 <= 64 << 10);
        assert_eq!(read_record(&record_path).unwrap().size_bytes, Some(8 * MIB));

        let (disk, _) = OverlayDisk::keep(tmp.path(), "server", 2 * MIB, SYSTEM_A).unwrap();
        assert_eq!(disk.size_bytes(), 8 * MIB);
        assert_eq!(fs::metadata(disk.path()).unwrap().len(), 8 * MIB);
    }

    #[test]
    fn kept_disk_path_that_is_a_directory_is_an_error() {
        let tmp = TempDir::new("kept-dir");
        fs::create_dir_all(tmp.path().join("server").join(KEPT_FILE)).unwrap();
        let err = OverlayDisk::keep(tmp.path(), "server", MIB, SYSTEM_A).unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains("server/disk.img"), "{text}");
    }

    #[test]
    fn record_escapes_odd_system_strings() {
        let tmp = TempDir::new("kept-escape");
        let odd = "/nix/store/x\"y\\z\n";
        OverlayDisk::keep(tmp.path(), "server", MIB, odd).unwrap();
        let record = read_record(&tmp.path().join("server").join(RECORD_FILE)).unwrap();
        assert_eq!(record.system, odd);
        let (_, warning) = OverlayDisk::keep(tmp.path(), "server", MIB, odd).unwrap();
        assert!(warning.is_none());
    }

    #[test]
    fn rfc3339_dates() {
        let at = |secs| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }
}
