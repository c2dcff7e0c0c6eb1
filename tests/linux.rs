//! The Linux tier: boots Debian's kernel with a busybox initramfs (built by
//! tests/linux/build-image.sh) through `nvmm run`. Stock kernels only boot where KVM is
//! hardware-backed; on kvm-pvm this test is skipped with the reason printed.
//!
//! Env overrides: NVMM_LINUX_DIR (where the images are or go), NVMM_LINUX_TESTS=0 to skip.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn images_dir() -> PathBuf {
    std::env::var_os("NVMM_LINUX_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest"),
        PathBuf::from,
    )
}

fn is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn linux_tier_or_skip(test: &str) -> Option<PathBuf> {
    if std::env::var("NVMM_LINUX_TESTS").as_deref() == Ok("0") {
        skip(test, "NVMM_LINUX_TESTS=0");
        return None;
    }
    if !kvm_or_skip(test) {
        return None;
    }
    if is_kvm_pvm() {
        skip(
            test,
            "this host's KVM is kvm-pvm (software, nested, no VMX): stock Linux kernels die \
             there with KVM_EXIT_INTERNAL_ERROR (cmpxchg16b, xrstor, int3), whatever the VMM",
        );
        return None;
    }
    Some(build_images())
}

fn build_images() -> PathBuf {
    let dir = images_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/linux/build-image.sh");
    let status = Command::new(script)
        .arg(&dir)
        .status()
        .expect("run build-image.sh");
    assert!(status.success(), "tests/linux/build-image.sh failed");
    dir
}

fn boot_linux(test: &str, kernel: &str, cpus: &str) {
    let Some(dir) = linux_tier_or_skip(test) else {
        return;
    };
    let mut cmd = Command::new(NVMM);
    cmd.arg("run")
        .arg("--kernel")
        .arg(dir.join(kernel))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--mem", "512", "--cpus", cpus]);
    let out = run(cmd);
    assert!(out.stdout.contains("nvmm-linux: init reached"), "{out:?}");
    assert!(
        out.stdout.contains(&format!("nvmm-linux: cpus={cpus}")),
        "{out:?}"
    );
    assert_eq!(
        out.code(),
        Some(0),
        "poweroff -f ends the VM cleanly: {out:?}"
    );
}

#[test]
fn debian_bzimage_reaches_init_and_powers_off() {
    boot_linux("linux bzImage", "bzImage", "2");
}

#[test]
fn debian_vmlinux_reaches_init_and_powers_off() {
    boot_linux("linux vmlinux", "vmlinux", "1");
}

/// Where stock kernels cannot run (kvm-pvm), nvmm must still load the Debian vmlinux, run it
/// until KVM gives up, and report that clearly: exit 3, suberror, RIP and the instruction bytes
/// (lock cmpxchg16b, the first instruction kvm-pvm cannot emulate).
#[test]
fn kvm_pvm_reports_a_stock_kernels_emulation_failure() {
    const TEST: &str = "linux on kvm-pvm";
    if std::env::var("NVMM_LINUX_TESTS").as_deref() == Ok("0") {
        skip(TEST, "NVMM_LINUX_TESTS=0");
        return;
    }
    if !kvm_or_skip(TEST) {
        return;
    }
    if !is_kvm_pvm() {
        skip(
            TEST,
            "KVM is hardware-backed here; the boot tests above cover Linux",
        );
        return;
    }
    let dir = build_images();
    let mut cmd = Command::new(NVMM);
    cmd.arg("run")
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .args(["--mem", "256"]);
    // The kernel runs ~30 s of emulated instructions before it reaches the failing one.
    let out = run_with_guard(cmd, b"", std::time::Duration::from_secs(600));
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: KVM internal error on vCPU 0: suberror 1 at RIP 0xffffffff"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("instruction bytes [f0 48 0f c7"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("hint: this host's KVM is kvm-pvm"),
        "{out:?}"
    );
}
