# shellcheck shell=bash
# Helpers shared by the scripts in this directory (sourced, not run).

# Fails with instructions when no suitable Rust toolchain is installed.
require_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found" >&2
        echo "hint: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
        exit 1
    fi
}

# Installs the named Debian packages if any is missing (needs root or sudo).
require_debian_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Where build_release_nvmm puts nvmm (used by the scripts that source this file).
export NVMM_RELEASE_BIN=target/x86_64-unknown-linux-gnu/release/nvmm

# Builds the release nvmm statically linked and not position-independent. Most of the VMM's
# resident memory beyond the guest's is code: its own and the shared libraries' pages it
# touches. A static build maps only the C library code it uses and needs no start-up
# relocations (RSS overhead 3.5 -> 2.6 MiB in bench/boot.sh). `--target` keeps these flags off
# build scripts and proc-macros, which cannot be static.
build_release_nvmm() {
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        cargo build --release --locked -p nvmm --target x86_64-unknown-linux-gnu
}
