//! Builds nvmm's no_std test guest (tests/guest) so that `nvmm doctor` can embed it and the
//! integration tests can boot it. The guest is its own Cargo package with its own link settings,
//! so it is built by a nested `cargo build` in its directory, into this build's OUT_DIR; a
//! packager that builds it separately (the flake) names the result in
//! `NVMM_TEST_GUEST_ELF_PREBUILT` instead.
//!
//! It also embeds the NixOS guest module (nix/guest): `nvmm boot` writes those files out to
//! import them, unless the build names an installed copy in `NVMM_GUEST_MODULE`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    embed_guest_module(&manifest_dir.join("../nix/guest"));
    println!("cargo:rerun-if-env-changed=NVMM_GUEST_MODULE");
    println!("cargo:rerun-if-env-changed=NVMM_TEST_GUEST_ELF_PREBUILT");
    if let Some(elf) = env::var_os("NVMM_TEST_GUEST_ELF_PREBUILT") {
        println!(
            "cargo:rustc-env=NVMM_TEST_GUEST_ELF={}",
            PathBuf::from(elf).display()
        );
        return;
    }
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

/// Writes `OUT_DIR/guest_module.rs`: `GUEST_MODULE_FILES`, the (relative path, contents) of
/// every file under `dir`, sorted, so the binary can write the module out unchanged.
fn embed_guest_module(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files);
    files.sort();
    let mut code = String::from("pub const GUEST_MODULE_FILES: &[(&str, &[u8])] = &[\n");
    for (relative, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        code.push_str(&format!(
            "    ({relative:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("guest_module.rs");
    fs::write(out, code).expect("cannot write guest_module.rs");
}

fn collect_files(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("cannot read nix/guest").path();
        if path.is_dir() {
            collect_files(root, &path, files);
        } else {
            let relative = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            files.push((relative, path));
        }
    }
}
