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

fn linux_tier_or_skip(test: &str) -> Option<PathBuf> {
    if std::env::var("NVMM_LINUX_TESTS").as_deref() == Ok("0") {
        skip(test, "NVMM_LINUX_TESTS=0");
        return None;
    }
    if !kvm_or_skip(test) {
        return None;
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        skip(
            test,
            "this host's KVM is kvm-pvm (software, nested, no VMX): stock Linux kernels die \
             there with KVM_EXIT_INTERNAL_ERROR (cmpxchg16b, xrstor, int3), whatever the VMM",
        );
        return None;
    }
    let dir = images_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/linux/build-image.sh");
    let status = Command::new(script)
        .arg(&dir)
        .status()
        .expect("run build-image.sh");
    assert!(status.success(), "tests/linux/build-image.sh failed");
    Some(dir)
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
