//! The disks `nvmm boot` gives a NixOS guest, all virtio-blk:
//!
//! 1. the **store image** (read-only), built by Nix and shared by every VM of that system:
//!    [`open_store_image`] checks it before the VM config references it;
//! 2. the **overlay disk** (writable): a fresh sparse file per boot, removed when the VM ends
//!    ([`OverlayDisk::create_fresh`]), or a persistent one with `--keep` ([`OverlayDisk::keep`]);
//! 3. the **seed disk** (read-only): per-boot data as a ustar archive written directly on the
//!    device, so the guest reads it with a plain `tar` ([`SeedDisk`]).
//!
//! Nothing here knows about KVM or virtio: these functions prepare files and hand back paths.

mod json;
mod overlay;
mod seed;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use overlay::{DEFAULT_OVERLAY_SIZE, KeptDiskWarning, OverlayDisk};
pub use seed::SeedDisk;

/// Disk images are sized in whole 4 KiB blocks: a block device's size must be a multiple of
/// its block size, and 4 KiB is the largest logical block size a guest may pick.
pub const DISK_BLOCK_SIZE: u64 = 4096;

/// Errors while preparing a VM's disks. Every variant that touches a file names it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The VM name cannot be used as a directory name.
    #[error("VM name {name:?} cannot name a directory (empty, `.`, `..`, or contains `/` or NUL)")]
    InvalidVmName {
        /// The name given.
        name: String,
    },
    /// The requested disk size is not a positive whole number of blocks.
    #[error("disk size {size} bytes is not a positive multiple of {DISK_BLOCK_SIZE}")]
    InvalidDiskSize {
        /// Size asked for.
        size: u64,
    },
    /// A VM's runtime or state directory could not be created.
    #[error("cannot create directory {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The overlay left behind by an earlier run could not be removed.
    #[error("cannot remove stale overlay disk {}", .path.display())]
    RemoveStaleOverlay {
        /// The stale file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A disk image file could not be created.
    #[error("cannot create disk image {}", .path.display())]
    CreateDisk {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A disk image could not be given its size.
    #[error("cannot resize disk image {} to {size} bytes", .path.display())]
    ResizeDisk {
        /// The image.
        path: PathBuf,
        /// Size asked for.
        size: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An existing kept disk could not be opened for reading and writing.
    #[error("cannot open kept disk {}", .path.display())]
    OpenKeptDisk {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kept disk's path holds something other than a regular file.
    #[error("kept disk {} is not a regular file", .path.display())]
    KeptDiskNotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The record beside a kept disk could not be written.
    #[error("cannot write kept disk record {}", .path.display())]
    WriteRecord {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A seed disk entry cannot be stored in a ustar archive, or clashes with another entry.
    #[error("seed disk entry {path:?} {reason}")]
    InvalidSeedEntry {
        /// The path as given.
        path: String,
        /// What is wrong with it, as a predicate ("is absolute").
        reason: String,
    },
    /// The seed disk image could not be written.
    #[error("cannot write seed disk {}", .path.display())]
    WriteSeed {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store image is missing or cannot be read.
    #[error("cannot open store image {}", .path.display())]
    OpenStoreImage {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store image path names a directory, socket, FIFO, ...
    #[error("store image {} is not a regular file or block device", .path.display())]
    StoreImageNotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The store image is an empty file.
    #[error("store image {} is empty", .path.display())]
    StoreImageEmpty {
        /// The path given.
        path: PathBuf,
    },
}

/// Checks the store image at `path` and returns its resolved path for the VM config.
///
/// The image must exist, be a regular file (or a block device) and be readable by this user;
/// nvmm attaches it read-only, so any number of VMs share one image. The path is resolved
/// (symlinks such as Nix's `result` followed) so that a rebuild that moves the symlink while a
/// VM runs does not change what that VM's config names.
pub fn open_store_image(path: &Path) -> Result<PathBuf, DiskError> {
    let open_error = |source| DiskError::OpenStoreImage {
        path: path.to_path_buf(),
        source,
    };
    let resolved = fs::canonicalize(path).map_err(open_error)?;
    // Look before opening: opening a FIFO for reading would block until a writer appears.
    let metadata = fs::metadata(&resolved).map_err(open_error)?;
    let file_type = metadata.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(DiskError::StoreImageNotAFile {
            path: path.to_path_buf(),
        });
    }
    // Opening is the only reliable readability test (ACLs, read-only mounts, LSMs).
    fs::File::open(&resolved).map_err(open_error)?;
    // A block device reports length 0 here; only a regular file can be empty.
    if file_type.is_file() && metadata.len() == 0 {
        return Err(DiskError::StoreImageEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(resolved)
}

/// `base/<vm_name>`, created (with parents) as 0700: it holds the VM's disks, and the seed
/// disk may carry private keys.
fn vm_dir(base: &Path, vm_name: &str) -> Result<PathBuf, DiskError> {
    let invalid = vm_name.is_empty()
        || vm_name == "."
        || vm_name == ".."
        || vm_name.contains('/')
        || vm_name.contains('\0');
    if invalid {
        return Err(DiskError::InvalidVmName {
            name: vm_name.to_owned(),
        });
    }
    let dir = base.join(vm_name);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| DiskError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Checks a requested disk size (see [`DISK_BLOCK_SIZE`]).
fn check_disk_size(size: u64) -> Result<(), DiskError> {
    if size == 0 || size % DISK_BLOCK_SIZE != 0 {
        return Err(DiskError::InvalidDiskSize { size });
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: readers see the old file or the new one, never a
/// partial one. The new file gets `mode` (less the umask). `sync` makes the data durable
/// before the rename, for files that must survive a host crash.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    // Unique within this process; the pid makes it unique across processes.
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    // The temp file must be in the same directory: rename(2) is only atomic within a file system.
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        // Best effort: the temp file may not even exist (the open failed).
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
pub mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A directory under the system temp dir, unique per test, removed on drop.
    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "nvmm-disks-{}-{}-{name}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::test_util::TempDir;
    use super::*;
    use crate::exit::error_chain;

    #[test]
    fn store_image_ok_and_resolved() {
        let tmp = TempDir::new("store-ok");
        let image = tmp.path().join("store.img");
        fs::write(&image, vec![0u8; 4096]).unwrap();
        let link = tmp.path().join("result");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        let resolved = open_store_image(&link).unwrap();
        assert_eq!(resolved, fs::canonicalize(&image).unwrap());
    }

    #[test]
    fn store_image_missing_names_path() {
        let tmp = TempDir::new("store-missing");
        let image = tmp.path().join("nope.img");
        let err = open_store_image(&image).unwrap_err();
        assert!(matches!(err, DiskError::OpenStoreImage { .. }), "{err:?}");
        let text = error_chain(&err);
        assert!(text.contains(&*image.to_string_lossy()), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn store_image_directory_and_empty_rejected() {
        let tmp = TempDir::new("store-kind");
        let err = open_store_image(tmp.path()).unwrap_err();
        assert!(
            matches!(err, DiskError::StoreImageNotAFile { .. }),
            "{err:?}"
        );
        let empty = tmp.path().join("empty.img");
        fs::write(&empty, b"").unwrap();
        let err = open_store_image(&empty).unwrap_err();
        assert!(matches!(err, DiskError::StoreImageEmpty { .. }), "{err:?}");
    }

    #[test]
    fn store_image_unreadable_rejected() {
        // root reads anything, so this can only be checked as another user.
        let tmp = TempDir::new("store-unreadable");
        let image = tmp.path().join("store.img");
        fs::write(&image, vec![0u8; 4096]).unwrap();
        fs::set_permissions(&image, fs::Permissions::from_mode(0o000)).unwrap();
        if fs::File::open(&image).is_ok() {
            eprintln!("skipped: this user can read a mode-000 file (root)");
            return;
        }
        let err = open_store_image(&image).unwrap_err();
        assert!(matches!(err, DiskError::OpenStoreImage { .. }), "{err:?}");
    }

    #[test]
    fn vm_names_that_are_not_directory_names_rejected() {
        let tmp = TempDir::new("vm-name");
        for name in ["", ".", "..", "a/b", "a\0b"] {
            let err = vm_dir(tmp.path(), name).unwrap_err();
            assert!(matches!(err, DiskError::InvalidVmName { .. }), "{name:?}");
        }
        let dir = vm_dir(tmp.path(), "server").unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let tmp = TempDir::new("atomic");
        let path = tmp.path().join("f");
        write_atomically(&path, b"one", 0o600, true).unwrap();
        write_atomically(&path, b"two", 0o400, false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
