# shellcheck shell=bash
# Shared by the bench scripts (sourced): checks, and where nvmm and the test guest are.

die() { echo "${0##*/}: error: $*" >&2; exit 1; }

# build_release_nvmm and NVMM_RELEASE_BIN: the static release build that is benchmarked.
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

# For a script's argument loop: takes the options every benchmark has, -n N, --nvmm PATH,
# --guest PATH, --only nvmm|qemu and --json FILE, into $runs, $nvmm, $guest, $only and $json.
# Returns 1 when $1 is none of them; otherwise the caller shifts the option and its value.
bench_common_option() {
    # shellcheck disable=SC2034 # the calling script's variables
    case $1 in
        -n) runs=${2:?-n needs a value} ;;
        --nvmm) nvmm=${2:?--nvmm needs a value} ;;
        --guest) guest=${2:?--guest needs a value} ;;
        --only)
            [[ ${2:?--only needs a value} == nvmm || $2 == qemu ]] || die "--only takes nvmm or qemu"
            only=$2
            ;;
        --json) json=${2:?--json needs a value} ;;
        *) return 1 ;;
    esac
}

# Dies unless VALUE, given with OPTION, is a positive integer; UNIT, if given, is named.
bench_positive() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer${3:+ ($3)}"
}

# Moves to the repository root, checks python3, /dev/kvm and (unless $1 is "nvmm") QEMU, and
# fills in $nvmm and $guest where the caller left them empty: nvmm is NVMM_RELEASE_BIN (built
# by build_release_nvmm if missing), the guest the one cargo built beside the nvmm binary.
bench_setup() {
    local only=$1 dir
    # Paths given by the caller are relative to where it was started.
    [[ -z $nvmm ]] || nvmm=$(realpath -m "$nvmm")
    [[ -z $guest ]] || guest=$(realpath -m "$guest")
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot enter the repository"
    command -v python3 >/dev/null || die "python3 not found (apt-get install python3)"
    [[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is missing or not accessible"
    if [[ $only != nvmm ]] && ! command -v qemu-system-x86_64 >/dev/null; then
        die "qemu-system-x86_64 not found; install it with: apt-get install -y qemu-system-x86 (or use --only nvmm)"
    fi
    if [[ -z $nvmm ]]; then
        nvmm=$NVMM_RELEASE_BIN
        [[ -x $nvmm ]] || build_release_nvmm >&2 || die "building nvmm failed"
    fi
    [[ -x $nvmm ]] || die "nvmm binary not found or not executable: $nvmm"
    if [[ -z $guest ]]; then
        # The guest cli/build.rs built for this nvmm binary, else for the default one.
        for dir in "$(dirname "$nvmm")" "$(dirname "$NVMM_RELEASE_BIN")"; do
            # shellcheck disable=SC2012 # build paths are plain; ls -t gives the newest
            # (ls fails where there is none: under set -e and pipefail, that must not exit)
            guest=$(ls -t "$dir"/build/nvmm-*/out/guest/release/nvmm-test-guest 2>/dev/null |
                head -n 1) || true
            [[ -z $guest ]] || break
        done
    fi
    [[ -f $guest ]] ||
        die "test guest ELF not found (build nvmm with build_release_nvmm, or use --guest)"
    nvmm=$(realpath "$nvmm")
    guest=$(realpath "$guest")
    export PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
}

# Runs COMMAND... in network namespace NS with NVMM_RUNTIME_DIR (which it makes) on a tmpfs of
# its own, as nvmm's runtime directory is where it counts: root's is /run/nvmm, and /run is a
# tmpfs on Debian (and on every systemd host). The development machines' /run is on ext4, where
# each file nvmm creates there (records, console logs, fresh disks) costs ~0.35 ms of journal.
# The tmpfs is mounted in the private mount namespace `ip netns exec` gives the command, so it
# goes when the last process in that namespace does: nothing to unmount, even after a kill.
bench_netns_exec_tmpfs_runtime() {
    local ns=$1
    shift
    mkdir -p "$NVMM_RUNTIME_DIR"
    # shellcheck disable=SC2016 # expanded by the inner sh, in the new mount namespace
    ip netns exec "$ns" sh -c 'mount -t tmpfs -o mode=0755 nvmm-bench-runtime "$NVMM_RUNTIME_DIR" &&
        exec "$@"' sh "$@"
}

# A network namespace $bench_ns holding the tap `tap0` at 10.77.0.1/24 (netbench.py), removed
# when the calling script exits.
bench_netns() {
    bench_ns=nvmmbench-$$
    trap 'ip netns del "$bench_ns" 2>/dev/null || true' EXIT
    ip netns add "$bench_ns"
    ip -n "$bench_ns" link set lo up
    ip -n "$bench_ns" tuntap add tap0 mode tap vnet_hdr
    ip -n "$bench_ns" addr add 10.77.0.1/24 dev tap0
    ip -n "$bench_ns" link set tap0 up
}
