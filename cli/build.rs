//! Builds nvmm's no_std test guest (tests/guest) so that `nvmm doctor` can embed it and the
//! integration tests can boot it. The guest is its own Cargo package with its own link settings,
//! so it is built by a nested `cargo build` in its directory, into this build's OUT_DIR.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../tests/guest");
    for input in [
        "src",
        "build.rs",
        "link.ld",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(input).display());
    }
    let target_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("guest");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut build = Command::new(cargo);
    build
        .current_dir(&guest_dir)
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, target overrides) are for host
    // crates; the guest has its own in tests/guest/.cargo/config.toml.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS"
            || matches!(
                &*key,
                "RUSTFLAGS" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTDOCFLAGS"
            )
        {
            build.env_remove(&*key);
        }
    }
    let status = build
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(
        status.success(),
        "building the test guest (tests/guest) failed"
    );

    let elf = target_dir.join("release/nvmm-test-guest");
    println!("cargo:rustc-env=NVMM_TEST_GUEST_ELF={}", elf.display());
}
