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
