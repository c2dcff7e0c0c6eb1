#!/usr/bin/env bash
# Smoke run of every fuzz target, for CI: builds them (nightly, AddressSanitizer), then runs each
# for a few seconds on its seed corpus (fuzz/corpus/TARGET, read only: new inputs go to a
# temporary directory). Fails on a crash, a timeout (5 s per input) or more than 2 GiB of memory;
# the input that did it is left in fuzz/artifacts/TARGET/. Long campaigns: see fuzz/README.md.
#
# Usage: fuzz/smoke.sh [SECONDS_PER_TARGET]   (default 10: seven targets, 70 s of fuzzing)
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-10}
targets=(mmio blk net console boot_writers runner_json seed_roundtrip)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "error: the nightly toolchain is missing (cargo fuzz needs it)" >&2
    echo "hint: rustup toolchain install nightly --profile minimal" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    echo "--- fuzz $target (${seconds}s)"
    mkdir -p "$scratch/$target"
    seeds=()
    [[ -d corpus/$target ]] && seeds=("corpus/$target")
    cargo +nightly fuzz run "$target" "$scratch/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1
done
