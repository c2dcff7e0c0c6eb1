//! The seed disk: per-boot data for the guest as a POSIX ustar archive written directly on a
//! read-only block device. ustar needs no file system driver and no tools beyond `tar`, which
//! every NixOS system has: the guest runs `tar -x -f /dev/vdX -C /run/nvmm-seed`.
//!
//! The archive is reproducible: entries come in the order given, every entry is owned by
//! uid/gid 0 and carries the same mtime ([`SEED_MTIME`]), so equal inputs give equal images.
//!
//! This module is deliberately generic. The intended payload is small per-boot files (the
//! host name, addresses, a hosts table, SSH host keys); which files, and the guest unit that
//! unpacks them, belong to the `nvmm boot` work that writes them.

use std::collections::HashSet;
use std::path::Path;

use super::{DISK_BLOCK_SIZE, DiskError, write_atomically};

/// The mtime of every entry (the epoch): fixed so that images are reproducible.
pub const SEED_MTIME: u64 = 0;

/// ustar's record size: headers and data are written in 512-byte blocks.
const BLOCK: usize = 512;
/// The ustar `name` field; longer paths go partly into `prefix`.
const NAME_LEN: usize = 100;
/// The ustar `prefix` field.
const PREFIX_LEN: usize = 155;
/// The size field holds 11 octal digits.
const MAX_FILE_SIZE: u64 = 0o777_7777_7777;
/// Mode of directories: the seed is read-only anyway; files carry their own modes.
const DIR_MODE: u32 = 0o755;
/// Mode of the image file on the host: only nvmm reads it, and it may carry private keys.
const IMAGE_MODE: u32 = 0o400;

/// A finished seed disk image, in memory (seed data is a few KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedDisk {
    image: Vec<u8>,
}

impl SeedDisk {
    /// Starts an empty seed disk.
    pub fn builder() -> SeedDiskBuilder {
        SeedDiskBuilder::default()
    }

    /// The image: the archive, then zeros up to a multiple of 4096 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.image
    }

    /// Writes the image to `path` (mode 0400) through a temp file in the same directory and a
    /// rename, so a VM never sees half an image.
    pub fn write_to(&self, path: &Path) -> Result<(), DiskError> {
        // No fsync: the seed is rebuilt on every boot, so a copy lost to a host crash costs
        // nothing.
        write_atomically(path, &self.image, IMAGE_MODE, false).map_err(|source| {
            DiskError::WriteSeed {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

/// Collects the seed disk's entries. Paths are relative and use `/`; the guest extracts them
/// below the directory it chooses. Parent directories need no entries of their own (`tar`
/// creates them), but may have one to fix their mode. Names are checked by [`build`], so the
/// adders can be chained.
///
/// [`build`]: SeedDiskBuilder::build
#[derive(Debug, Default, Clone)]
pub struct SeedDiskBuilder {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    mode: u32,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Directory,
    File(Vec<u8>),
}

impl SeedDiskBuilder {
    /// Adds a directory (mode 0755).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entries.push(Entry {
            path: path.to_owned(),
            mode: DIR_MODE,
            kind: Kind::Directory,
        });
        self
    }

    /// Adds a regular file with `contents` and permission bits `mode` (at most 0o7777).
    pub fn file(&mut self, path: &str, contents: impl AsRef<[u8]>, mode: u32) -> &mut Self {
        self.entries.push(Entry {
            path: path.to_owned(),
            mode,
            kind: Kind::File(contents.as_ref().to_vec()),
        });
        self
    }

    /// Checks every entry and lays out the image. Absolute paths, `..` components, paths that
    /// do not fit a ustar header, duplicates and entries below a file are errors.
    pub fn build(&self) -> Result<SeedDisk, DiskError> {
        let paths = self.checked_paths()?;
        let mut image = Vec::new();
        for (entry, path) in self.entries.iter().zip(&paths) {
            let header = header(entry, path).map_err(|reason| invalid(entry, reason))?;
            image.extend_from_slice(&header);
            if let Kind::File(contents) = &entry.kind {
                image.extend_from_slice(contents);
                image.resize(image.len().next_multiple_of(BLOCK), 0);
            }
        }
        // The end of the archive: two zero blocks. Then whole device blocks.
        image.resize(image.len() + 2 * BLOCK, 0);
        let device_block = DISK_BLOCK_SIZE as usize;
        image.resize(image.len().next_multiple_of(device_block), 0);
        Ok(SeedDisk { image })
    }

    /// [`build`](SeedDiskBuilder::build), then [`SeedDisk::write_to`].
    #[cfg(test)]
    pub fn write_to(&self, path: &Path) -> Result<(), DiskError> {
        self.build()?.write_to(path)
    }

    /// Each entry's normalised path (no `.` or empty components), in entry order, after the
    /// checks that look at several entries at once.
    fn checked_paths(&self) -> Result<Vec<String>, DiskError> {
        let mut paths = Vec::with_capacity(self.entries.len());
        let mut seen = HashSet::new();
        let mut files = HashSet::new();
        for entry in &self.entries {
            let path = normalise(&entry.path).map_err(|reason| invalid(entry, reason.into()))?;
            if entry.mode > 0o7777 {
                return Err(invalid(
                    entry,
                    format!("has mode {:o}, beyond the permission bits 7777", entry.mode),
                ));
            }
            if !seen.insert(path.clone()) {
                return Err(invalid(entry, "appears twice".into()));
            }
            if matches!(entry.kind, Kind::File(_)) {
                files.insert(path.clone());
            }
            paths.push(path);
        }
        // tar could not create a path below a file: the extraction would fail in the guest.
        for (entry, path) in self.entries.iter().zip(&paths) {
            for (slash, _) in path.match_indices('/') {
                let parent = &path[..slash];
                if files.contains(parent) {
                    return Err(invalid(entry, format!("lies below the file {parent:?}")));
                }
            }
        }
        Ok(paths)
    }
}

fn invalid(entry: &Entry, reason: String) -> DiskError {
    DiskError::InvalidSeedEntry {
        path: entry.path.clone(),
        reason,
    }
}

/// `path` without empty and `.` components; errors are reasons ("is absolute").
fn normalise(path: &str) -> Result<String, &'static str> {
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("has a `..` component"),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err("names no file");
    }
    Ok(parts.join("/"))
}

/// The 512-byte ustar header of `entry`, stored as `path`; the error is a reason.
fn header(entry: &Entry, path: &str) -> Result<[u8; BLOCK], String> {
    let (stored, size, typeflag) = match &entry.kind {
        // The trailing slash is what tar itself writes for directories.
        Kind::Directory => (format!("{path}/"), 0, b'5'),
        Kind::File(contents) => (path.to_owned(), contents.len() as u64, b'0'),
    };
    if size > MAX_FILE_SIZE {
        return Err(format!(
            "is {size} bytes, more than a ustar header can hold"
        ));
    }
    let (prefix, name) = split_name(&stored).ok_or_else(|| {
        format!(
            "is too long for a ustar header (at most {PREFIX_LEN} bytes, `/`, {NAME_LEN} bytes)"
        )
    })?;

    let mut header = [0u8; BLOCK];
    header[0..100][..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut header[100..108], u64::from(entry.mode)); // mode
    put_octal(&mut header[108..116], 0); // uid
    put_octal(&mut header[116..124], 0); // gid
    put_octal(&mut header[124..136], size);
    put_octal(&mut header[136..148], SEED_MTIME);
    header[156] = typeflag;
    // 157..257: linkname, unused.
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // 265..329: uname and gname, left empty so tar uses the numeric ids.
    put_octal(&mut header[329..337], 0); // devmajor
    put_octal(&mut header[337..345], 0); // devminor
    header[345..500][..prefix.len()].copy_from_slice(prefix.as_bytes());
    let checksum = checksum(&header);
    // Six octal digits, NUL, space: the form every tar writes and reads.
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    Ok(header)
}

/// The header checksum: the sum of all bytes, the checksum field counted as eight spaces.
fn checksum(header: &[u8; BLOCK]) -> u32 {
    header
        .iter()
        .enumerate()
        .map(|(i, &byte)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(byte)
            }
        })
        .sum()
}

/// Zero-padded octal filling `field` but its last byte, which stays NUL. Callers keep values
/// in range (checked sizes, modes ≤ 0o7777, a constant mtime).
fn put_octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    debug_assert_eq!(
        digits.len(),
        field.len() - 1,
        "{value:o} overflows its field"
    );
    let len = digits.len().min(field.len() - 1);
    field[..len].copy_from_slice(&digits.as_bytes()[digits.len() - len..]);
}

/// Splits `stored` into ustar's (prefix, name): the whole path in `name` if it fits, else at
/// a `/` with at most 155 bytes before it and 1..=100 after. `None` if no `/` works.
fn split_name(stored: &str) -> Option<(&str, &str)> {
    if stored.len() <= NAME_LEN {
        return Some(("", stored));
    }
    // The first `/` that leaves a short enough name gives the shortest prefix; if that prefix
    // is too long, every later one is too.
    let slash = stored
        .match_indices('/')
        .map(|(i, _)| i)
        .find(|&i| stored.len() - i - 1 <= NAME_LEN && i + 1 < stored.len())?;
    (slash <= PREFIX_LEN).then(|| (&stored[..slash], &stored[slash + 1..]))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use super::*;
    use crate::disks::test_util::TempDir;
    use crate::exit::error_chain;

    /// 150 bytes: two 60-byte directories and a 28-byte file name, too long for `name` alone.
    fn long_path() -> String {
        format!("{}/{}/{}", "d".repeat(60), "e".repeat(60), "f".repeat(28))
    }

    fn big_contents() -> Vec<u8> {
        (0..1500u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn sample() -> SeedDiskBuilder {
        let mut builder = SeedDisk::builder();
        builder
            .dir("etc")
            .file("etc/hostname", b"server\n", 0o644)
            .dir("ssh")
            .file("ssh/ssh_host_ed25519_key", big_contents(), 0o600)
            .file("empty", b"", 0o644)
            .dir("a")
            .dir("a/b")
            .file("a/b/c.txt", b"nested\n", 0o640)
            .file(&long_path(), b"long\n", 0o644)
            .file(&"n".repeat(100), b"exactly 100\n", 0o644);
        builder
    }

    fn tar_available() -> bool {
        let found = Command::new("tar").arg("--version").output().is_ok();
        if !found {
            eprintln!("skipped: no `tar` on this host");
        }
        found
    }

    /// Walks the headers of `image`: (offset, header) until the first zero block.
    fn headers(image: &[u8]) -> Vec<(usize, [u8; BLOCK])> {
        let mut found = Vec::new();
        let mut offset = 0;
        loop {
            let header: [u8; BLOCK] = image[offset..offset + BLOCK].try_into().unwrap();
            if header.iter().all(|&b| b == 0) {
                return found;
            }
            let size_field = std::str::from_utf8(&header[124..135]).unwrap();
            let size = usize::from_str_radix(size_field, 8).unwrap();
            found.push((offset, header));
            offset += BLOCK + size.next_multiple_of(BLOCK);
        }
    }

    #[test]
    fn image_is_whole_device_blocks_and_ends_with_two_zero_blocks() {
        let image = sample().build().unwrap();
        let bytes = image.as_bytes();
        assert_eq!(bytes.len() % 4096, 0);
        let (last_offset, last) = *headers(bytes).last().unwrap();
        let end = last_offset
            + BLOCK
            + last[124..135]
                .iter()
                .fold(0usize, |n, &d| n * 8 + usize::from(d - b'0'))
                .next_multiple_of(BLOCK);
        assert!(bytes[end..end + 2 * BLOCK].iter().all(|&b| b == 0));
        assert_eq!(
            SeedDisk::builder().build().unwrap().as_bytes(),
            &[0u8; 4096][..]
        );
    }

    #[test]
    fn header_checksums_recomputed_independently() {
        let image = sample().build().unwrap();
        let headers = headers(image.as_bytes());
        assert_eq!(headers.len(), 10);
        for (offset, header) in headers {
            // Sum of all bytes with the checksum field read as spaces, computed here without
            // the module's helper.
            let mut sum = 0u32;
            for (i, byte) in header.iter().enumerate() {
                sum += if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*byte)
                };
            }
            let field = std::str::from_utf8(&header[148..154]).unwrap();
            assert_eq!(
                u32::from_str_radix(field, 8).unwrap(),
                sum,
                "header at {offset}"
            );
            assert_eq!(&header[154..156], b"\0 ");
            assert_eq!(&header[257..265], b"ustar\x0000");
        }
    }

    #[test]
    fn long_path_uses_the_prefix_field() {
        let image = sample().build().unwrap();
        let (_, header) = headers(image.as_bytes())
            .into_iter()
            .find(|(_, h)| h[345] == b'd')
            .unwrap();
        // The first `/` that leaves at most 100 bytes: prefix "ddd…", name "eee…/fff…".
        assert_eq!(
            &header[345..406],
            format!("{}\0", "d".repeat(60)).as_bytes()
        );
        let name = format!("{}/{}\0", "e".repeat(60), "f".repeat(28));
        assert_eq!(&header[0..name.len()], name.as_bytes());
    }

    #[test]
    fn gnu_tar_lists_the_entries() {
        if !tar_available() {
            return;
        }
        let tmp = TempDir::new("seed-list");
        let path = tmp.path().join("seed.img");
        sample().write_to(&path).unwrap();
        let output = Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .env("TZ", "UTC")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.is_empty(), "{stderr}");
        let listing = String::from_utf8(output.stdout).unwrap();
        let rows: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let long = long_path();
        let hundred = "n".repeat(100);
        let expected = [
            ("drwxr-xr-x", "0", "etc/"),
            ("-rw-r--r--", "7", "etc/hostname"),
            ("drwxr-xr-x", "0", "ssh/"),
            ("-rw-------", "1500", "ssh/ssh_host_ed25519_key"),
            ("-rw-r--r--", "0", "empty"),
            ("drwxr-xr-x", "0", "a/"),
            ("drwxr-xr-x", "0", "a/b/"),
            ("-rw-r-----", "7", "a/b/c.txt"),
            ("-rw-r--r--", "5", long.as_str()),
            ("-rw-r--r--", "12", hundred.as_str()),
        ];
        assert_eq!(rows.len(), expected.len(), "{listing}");
        for (row, (mode, size, name)) in rows.iter().zip(expected) {
            // mode, owner, size, date, time, name
            assert_eq!(row.len(), 6, "{row:?}");
            assert_eq!((row[0], row[1], row[2], row[5]), (mode, "0/0", size, name));
            assert_eq!((row[3], row[4]), ("1970-01-01", "00:00"));
        }
    }

    #[test]
    fn gnu_tar_extracts_the_same_bytes() {
        if !tar_available() {
            return;
        }
        let tmp = TempDir::new("seed-extract");
        let path = tmp.path().join("seed.img");
        sample().write_to(&path).unwrap();
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o400);
        assert_eq!(metadata.len() % 4096, 0);

        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        // -p: modes exactly as archived, whatever this user's umask.
        let output = Command::new("tar")
            .args(["-x", "-p", "--no-same-owner", "-f"])
            .arg(&path)
            .arg("-C")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.is_empty(), "{stderr}");
        let file = |name: &str, contents: &[u8], mode: u32| {
            let path = out.join(name);
            assert_eq!(fs::read(&path).unwrap(), contents, "{name}");
            let got = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode, "{name}");
        };
        file("etc/hostname", b"server\n", 0o644);
        file("ssh/ssh_host_ed25519_key", &big_contents(), 0o600);
        file("empty", b"", 0o644);
        file("a/b/c.txt", b"nested\n", 0o640);
        file(&long_path(), b"long\n", 0o644);
        file(&"n".repeat(100), b"exactly 100\n", 0o644);
        assert!(out.join("a/b").is_dir());
    }

    #[test]
    fn images_are_reproducible() {
        assert_eq!(sample().build().unwrap(), sample().build().unwrap());
    }

    #[test]
    fn paths_are_normalised() {
        let mut builder = SeedDisk::builder();
        builder.file("./etc//hostname", b"x", 0o644);
        let image = builder.build().unwrap();
        assert_eq!(&image.as_bytes()[..13], b"etc/hostname\0");
    }

    /// Asserts that `builder` fails to build for `reason`.
    fn assert_rejected(builder: &SeedDiskBuilder, reason: &str) {
        let err = builder.build().unwrap_err();
        assert!(matches!(err, DiskError::InvalidSeedEntry { .. }), "{err:?}");
        assert!(err.to_string().contains(reason), "{err} lacks {reason:?}");
    }

    #[test]
    fn invalid_entries_rejected() {
        let file = |path: &str, mode| {
            let mut builder = SeedDisk::builder();
            builder.file(path, b"", mode);
            builder
        };
        let dir = |path: &str| {
            let mut builder = SeedDisk::builder();
            builder.dir(path);
            builder
        };
        assert_rejected(&file("/etc/hostname", 0o644), "is absolute");
        assert_rejected(&file("a/../b", 0o644), "`..`");
        assert_rejected(&dir(".."), "`..`");
        assert_rejected(&dir(""), "names no file");
        assert_rejected(&dir("./"), "names no file");
        assert_rejected(&file("a\0b", 0o644), "NUL");
        assert_rejected(&file("x", 0o10644), "beyond the permission bits");
        assert_rejected(&file(&"x".repeat(101), 0o644), "too long");
        assert_rejected(&file(&format!("{}/x", "p".repeat(156)), 0o644), "too long");
        assert_rejected(dir("etc").dir("./etc/"), "appears twice");
        assert_rejected(file("etc", 0o644).dir("etc"), "appears twice");
        assert_rejected(
            file("a/b/c", 0o644).file("a/b", b"", 0o644),
            "lies below the file \"a/b\"",
        );
    }

    #[test]
    fn split_name_limits() {
        let name100 = "n".repeat(100);
        assert_eq!(split_name(&name100), Some(("", name100.as_str())));
        let path = format!("{}/{}", "p".repeat(155), "n".repeat(100));
        assert_eq!(
            split_name(&path).map(|(p, n)| (p.len(), n.len())),
            Some((155, 100))
        );
        assert_eq!(split_name(&format!("{}/", "d".repeat(100))), None);
        assert_eq!(split_name(&format!("{}/{}", "p".repeat(156), "n")), None);
    }

    #[test]
    fn write_to_an_impossible_path_names_it() {
        let tmp = TempDir::new("seed-unwritable");
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let path = file.join("seed.img");
        let err = sample().write_to(&path).unwrap_err();
        assert!(matches!(err, DiskError::WriteSeed { .. }), "{err:?}");
        let text = error_chain(&err);
        assert!(text.contains(&*path.to_string_lossy()), "{text}");
        assert!(text.contains("Not a directory"), "{text}");
    }

    #[test]
    fn write_to_replaces_an_earlier_read_only_image() {
        let tmp = TempDir::new("seed-replace");
        let path = tmp.path().join("seed.img");
        SeedDisk::builder().write_to(&path).unwrap();
        sample().write_to(&path).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            sample().build().unwrap().as_bytes()
        );
    }
}
