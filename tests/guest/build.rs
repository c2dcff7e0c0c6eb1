//! Link arguments that turn the guest, built for the host triple
//! (`x86_64-unknown-linux-gnu`), into a bare-metal ELF.
//!
//! They are passed with `cargo:rustc-link-arg-bins`, so they reach the guest
//! binary only. In `.cargo/config.toml` they would also reach the build scripts
//! and proc-macros of dependencies (without `--target`, cargo builds those with
//! the same flags), which then fail to link.

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = manifest_dir.join("link.ld");
    // Relink when the layout changes (main.rs also names link.ld, for rustc).
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");

    let args = [
        // Our own layout: linked and loaded at 2 MiB, p_paddr == p_vaddr.
        &format!("-T{}", script.display()),
        // No C runtime, no libc, no dynamic loader.
        "-nostartfiles",
        "-nostdlib",
        "-static",
        // Absolute addresses: the image runs where it is linked. This also
        // overrides the `-pie` rustc passes for position-independent code
        // (the default relocation model), so no dynamic relocations remain.
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=0x1000",
        "-Wl,-z,noexecstack",
    ];
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
