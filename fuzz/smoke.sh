#!/usr/bin/env bash
# Smoke run of every fuzz target, for CI: builds them (AddressSanitizer; nightly, else stable, see
# below), then runs each
# for a few seconds on its seed corpus (fuzz/corpus/TARGET, read only: new inputs go to a
# temporary directory). Fails on a crash, a timeout (5 s per input) or more than 2 GiB of memory;
# the input that did it is left in fuzz/artifacts/TARGET/. Long campaigns: see fuzz/README.md.
#
# Usage: fuzz/smoke.sh [SECONDS_PER_TARGET]   (default 10: seven targets, 70 s of fuzzing)
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-10}
targets=(mmio blk net console boot_writers runner_json seed_roundtrip)

# cargo fuzz builds with nightly's -Z flags (AddressSanitizer, sanitizer coverage). Where only
# stable is installed (CI's fresh machines cannot fetch nightly), RUSTC_BOOTSTRAP=1 makes the
# stable compiler accept them: meant for building Rust itself, and good enough for a test build.
toolchain=()
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    echo "no nightly toolchain: building with $(rustc --version) and RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cargo "${toolchain[@]}" fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    echo "--- fuzz $target (${seconds}s)"
    mkdir -p "$scratch/$target"
    seeds=()
    [[ -d corpus/$target ]] && seeds=("corpus/$target")
    cargo "${toolchain[@]}" fuzz run "$target" "$scratch/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
done
