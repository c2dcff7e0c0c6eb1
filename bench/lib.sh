# shellcheck shell=bash
# Shared by the bench scripts (sourced): checks, and where nvmm and the test guest are.

die() { echo "${0##*/}: error: $*" >&2; exit 1; }

# Moves to the repository root, checks python3, /dev/kvm and (unless $1 is "nvmm") QEMU, and
# fills in $nvmm and $guest where the caller left them empty.
bench_setup() {
    local only=$1
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot enter the repository"
    command -v python3 >/dev/null || die "python3 not found (apt-get install python3)"
    [[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is missing or not accessible"
    if [[ $only != nvmm ]] && ! command -v qemu-system-x86_64 >/dev/null; then
        die "qemu-system-x86_64 not found; install it with: apt-get install -y qemu-system-x86 (or use --only nvmm)"
    fi
    if [[ -z $nvmm ]]; then
        nvmm=target/release/nvmm
        [[ -x $nvmm ]] || cargo build --release -p nvmm >&2 || die "building nvmm failed"
    fi
    if [[ -z $guest ]]; then
        # The guest cli/build.rs built for this nvmm binary.
        # shellcheck disable=SC2012 # build paths are plain; ls -t gives the newest
        guest=$(ls -t target/release/build/nvmm-*/out/guest/release/nvmm-test-guest 2>/dev/null | head -n 1)
    fi
    [[ -f $guest ]] || die "test guest ELF not found (build nvmm with cargo build --release, or use --guest)"
    nvmm=$(realpath "$nvmm")
    guest=$(realpath "$guest")
    export PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
}
