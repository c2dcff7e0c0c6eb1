//! virtio-blk end to end: the test guest drives nvmm's virtio-mmio transport and virtio-blk
//! device the way Linux does, and the host checks the disk files afterwards.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A disk image in the temp dir, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("nvmm-blk-{}-{name}.img", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    fn zeroed(name: &str, sectors: u64) -> Self {
        Self::new(name, &vec![0u8; (sectors * 512) as usize])
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn sector(&self, sector: u64) -> Vec<u8> {
        let mut data = vec![0u8; 512];
        std::fs::File::open(&self.0)
            .unwrap()
            .read_exact_at(&mut data, sector * 512)
            .unwrap();
        data
    }

    fn hash(&self) -> u64 {
        fnv1a64(&std::fs::read(&self.0).unwrap())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The bytes the guest's `blk` scenario writes to a sector.
fn pattern(sector: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (sector.wrapping_mul(31).wrapping_add(i) as u8) ^ 0x5a)
        .collect()
}

fn random_bytes(len: usize, mut state: u32) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[test]
fn guest_writes_reads_and_identifies_several_disks() {
    if !kvm_or_skip("blk") {
        return;
    }
    let disk0 = Image::zeroed("rw0", 2048);
    let disk1 = Image::zeroed("rw1", 64);
    let base = Image::new("ro", &random_bytes(64 * 1024, 7));
    let base_hash = base.hash();
    let out = run(guest_command(
        "nvmm_test=blk",
        &[
            "--disk",
            &format!("{},serial=disk0", disk0.path()),
            "--disk",
            disk1.path(),
            "--disk",
            &format!("{},ro,serial=store", base.path()),
        ],
    ));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let s = &out.stdout;
    assert!(
        s.contains("blk dev=0 capacity=2048 ro=0 blk_size=512 flush=1 serial=\"disk0\""),
        "{s}"
    );
    let default_serial = Path::new(disk1.path())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let default_serial: String = default_serial.chars().take(20).collect();
    assert!(
        s.contains(&format!(
            "blk dev=1 capacity=64 ro=0 blk_size=512 flush=1 serial=\"{default_serial}\""
        )),
        "{s}"
    );
    assert!(s.contains("blk dev=2 capacity=128 ro=1"), "{s}");
    assert!(
        s.contains("blk dev=0 wrote sectors=0,1,2047 readback=ok"),
        "{s}"
    );
    assert!(
        s.contains("blk dev=1 wrote sectors=0,1,63 readback=ok"),
        "{s}"
    );
    assert!(s.contains("blk dev=0 past-end status=1"), "{s}");
    assert!(s.contains("blk dev=2 ro write status=1"), "{s}");
    assert!(s.contains("blk devices=3"), "{s}");
    assert!(s.contains("result=ok"), "{s}");

    for sector in [0, 1, 2047] {
        assert_eq!(
            disk0.sector(sector),
            pattern(sector),
            "disk0 sector {sector}"
        );
    }
    assert_eq!(
        disk0.sector(2),
        vec![0u8; 512],
        "untouched sectors stay zero"
    );
    for sector in [0, 1, 63] {
        assert_eq!(
            disk1.sector(sector),
            pattern(sector),
            "disk1 sector {sector}"
        );
    }
    assert_eq!(base.hash(), base_hash, "the read-only disk is unchanged");
}

#[test]
fn works_without_event_idx_and_indirect_descriptors_on_a_small_queue() {
    if !kvm_or_skip("blk minimal features") {
        return;
    }
    let disk = Image::zeroed("minimal", 128);
    let out = run(guest_command(
        "nvmm_test=blk virtio_event_idx=0 virtio_indirect=0 virtio_queue_size=8",
        &["--disk", disk.path()],
    ));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("queue_size=8 event_idx=0 indirect=0"),
        "{out:?}"
    );
    assert!(out.stdout.contains("result=ok"), "{out:?}");
    for sector in [0, 1, 127] {
        assert_eq!(disk.sector(sector), pattern(sector));
    }
}

/// The benchmarks run the guest's driver at CPL 3 (`nvmm_cpl3=1`, tests/guest/src/ring3.rs):
/// the driver must do there what it does at CPL 0, the writes included.
#[test]
fn guest_drives_its_disk_at_cpl3_as_the_benchmarks_do() {
    if !kvm_or_skip("blk at CPL 3") {
        return;
    }
    // Runs `scenario` at CPL 3 on `disk`; its console, once it ran to `result=ok` there.
    let run_at_cpl3 = |scenario: &str, disk: &Image| {
        let out = run(guest_command(
            &format!("{scenario} nvmm_cpl3=1"),
            &["--disk", disk.path()],
        ));
        assert_eq!(out.code(), Some(0), "{out:?}");
        let s = out.stdout;
        assert!(s.contains("running at CPL 3"), "{s}");
        assert!(s.contains("result=ok"), "{s}");
        s
    };

    let disk = Image::zeroed("cpl3", 2048);
    // Without event idx: at native speed the driver can move used_event past GET_ID's buffer
    // before the device decides whether to interrupt, and then none is due, which `blk` checks.
    let s = run_at_cpl3("nvmm_test=blk virtio_event_idx=0", &disk);
    assert!(
        s.contains("blk dev=0 wrote sectors=0,1,2047 readback=ok"),
        "{s}"
    );
    for sector in [0, 1, 2047] {
        assert_eq!(disk.sector(sector), pattern(sector), "sector {sector}");
    }

    let bench = Image::zeroed("cpl3-bench", 4096);
    let s = run_at_cpl3("nvmm_test=blkbench bench_mib=1 bench_ios=200", &bench);
    assert!(
        s.contains("blkbench rand-read bytes=819200 requests=200"),
        "{s}"
    );
}

#[test]
fn guest_reads_whole_disks_correctly() {
    if !kvm_or_skip("blkhash") {
        return;
    }
    let data = random_bytes(256 * 1024, 99);
    let disk = Image::new("hash", &data);
    let out = run(guest_command(
        "nvmm_test=blkhash",
        &["--disk", &format!("{},ro", disk.path())],
    ));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let expected = format!("blk dev=0 sectors=512 fnv1a64={:016x}", fnv1a64(&data));
    assert!(
        out.stdout.contains(&expected),
        "{expected} not in {}",
        out.stdout
    );
}

#[test]
fn sigkill_during_guest_writes_leaves_the_base_image_untouched() {
    if !kvm_or_skip("blk sigkill") {
        return;
    }
    let base = Image::new("base", &random_bytes(128 * 1024, 3));
    let base_hash = base.hash();
    let overlay = Image::zeroed("overlay", 4096);
    let (mut child, mut stdout) = spawn_reading_stdout(guest_command(
        "nvmm_test=blkwrite write_sectors=1024",
        &[
            "--disk",
            &format!("{},ro", base.path()),
            "--disk",
            overlay.path(),
        ],
    ));
    read_until(&mut stdout, "blkwrite started");
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "killed by a signal: {status:?}");
    assert_eq!(base.hash(), base_hash, "the read-only base image changed");
    assert_eq!(
        overlay.sector(0),
        pattern(0),
        "the guest wrote to the overlay"
    );
}

#[test]
fn devices_can_be_announced_by_acpi_only() {
    if !kvm_or_skip("virtio discovery") {
        return;
    }
    let disk = Image::zeroed("acpi", 8);
    let both = run(guest_command("nvmm_test=hello", &["--disk", disk.path()]));
    assert!(
        both.stdout.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{both:?}"
    );
    let acpi = run(guest_command(
        "nvmm_test=hello",
        &["--disk", disk.path(), "--virtio-discovery", "acpi"],
    ));
    assert_eq!(acpi.code(), Some(0), "{acpi:?}");
    assert!(!acpi.stdout.contains("virtio_mmio.device"), "{acpi:?}");
}

fn nvmm_run(args: &[&str]) -> Output {
    let mut cmd = Command::new(NVMM);
    cmd.args(["run", "--kernel", GUEST, "--mem", MEM])
        .args(args);
    run(cmd)
}

fn assert_user_error(out: &Output, message: &str, hint: &str) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(message),
        "{out:?}"
    );
    assert!(
        lines[1].starts_with("hint: ") && lines[1].contains(hint),
        "{out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "the guest must not have run: {out:?}"
    );
}

#[test]
fn missing_disk_is_a_clear_error() {
    if !kvm_or_skip("missing disk") {
        return;
    }
    let out = nvmm_run(&["--disk", "/nonexistent/disk.img"]);
    assert_user_error(
        &out,
        "cannot open disk /nonexistent/disk.img read-write: No such file",
        "--disk",
    );
}

#[test]
fn directory_as_disk_is_a_clear_error() {
    if !kvm_or_skip("directory disk") {
        return;
    }
    let dir = std::env::temp_dir();
    let out = nvmm_run(&["--disk", &format!("{},ro", dir.display())]);
    assert_user_error(&out, "is not a regular file or block device", "image file");
}

#[test]
fn bad_disk_options_are_usage_errors() {
    let out = nvmm_run(&["--disk", "x.img,rw"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("unknown disk option"), "{out:?}");
}

#[test]
fn read_only_file_without_ro_is_a_clear_error() {
    if !kvm_or_skip("read-only disk") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("read-only disk", "needs root for a read-only bind mount");
        return;
    }
    let disk = Image::zeroed("readonly", 8);
    let script = format!(
        "mount --bind {p} {p} && mount -o remount,bind,ro {p} && exec {NVMM} run --kernel {GUEST} --mem {MEM} --disk {p}",
        p = disk.path()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c", &script]);
    let out = run(cmd);
    assert_user_error(&out, "read-write: Read-only file system", "add ,ro");
}

#[test]
fn concurrent_vms_share_one_read_only_image() {
    if !kvm_or_skip("shared store image") {
        return;
    }
    let data = random_bytes(64 * 1024, 5);
    let store = Image::new("shared-store", &data);
    let spawn = || {
        guest_command(
            "nvmm_test=blkhash",
            &["--disk", &format!("{},ro", store.path())],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let expected = format!("blk dev=0 sectors=128 fnv1a64={:016x}", fnv1a64(&data));
    for child in [first, second] {
        let out = wait_with_guard(child);
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert!(out.stdout.contains(&expected), "{out:?}");
    }
}

#[test]
fn more_disks_than_interrupt_lines_is_a_clear_error() {
    if !kvm_or_skip("too many disks") {
        return;
    }
    let disk = Image::zeroed("many", 8);
    let spec = format!("{},ro", disk.path());
    let mut args = Vec::new();
    for _ in 0..18 {
        args.extend(["--disk", spec.as_str()]);
    }
    let out = nvmm_run(&args);
    assert_user_error(&out, "at most 17 are supported", "fewer disks");
}
