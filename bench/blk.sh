#!/usr/bin/env bash
# virtio-blk benchmark: nvmm against `qemu-system-x86_64 -M microvm` with virtio-blk-device, same
# guest, same file, plus the host's own figures on that file as the physical limit.
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bench/blk.sh [-h] [-n N] [--mib MIB] [--ios N] [--dir DIR] [--nvmm PATH] [--guest PATH]
                    [--only nvmm|qemu] [--json FILE]

The test guest's "blkbench" scenario (tests/guest/README.md) runs three phases on its first
virtio-blk disk at CPL 3 (nvmm_cpl3=1: kvm-pvm runs the guest's CPL 0 code instruction by
instruction in its emulator, its CPL 3 code natively), each bracketed by writes to I/O port 0x80
that this harness timestamps:
  seq read    MIB MiB in 128 KiB requests, several in flight      (markers 0x20 .. 0x21)
  seq write   the same                                            (markers 0x22 .. 0x23)
  rand read   N random 4 KiB reads, queue depth up to 32          (markers 0x24 .. 0x25)
nvmm exposes the markers in its -v log on stderr, QEMU through an isa-debugcon on port 0x80.
Both use the same scratch file (buffered host I/O: nvmm's default, QEMU's cache=writeback).
The host row is the same work done by this harness with pread/pwrite on that file, once right
after every monitor run.
Each monitor runs N times (alternating); the table shows medians and nvmm/QEMU ratios. nvmm/host
is the median of N paired ratios, each nvmm run against the host run right after it: this
machine's speed drifts by tens of percent within seconds, more than between neighbouring runs.
Target: nvmm >= 1.0x QEMU on every figure; the ratio to the host figure is reported.

Options:
  -n N          runs per monitor (default 3)
  --mib MIB     sequential size, and the scratch disk's (at least 64 MiB) (default 1024)
  --ios N       random reads (default 100000)
  --dir DIR     where the scratch disk goes (default /var/tmp)
  --nvmm PATH   nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the static
                build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH  test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside the
                nvmm binary)
  --only WHICH  measure only nvmm or only qemu
  --json FILE   also write the figures as JSON
USAGE
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=3 mib=1024 ios=100000 dir=/var/tmp nvmm='' guest=${NVMM_TEST_GUEST:-} only='' json=''
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --mib) mib=${2:?--mib needs a value}; shift ;;
        --ios) ios=${2:?--ios needs a value}; shift ;;
        --dir) dir=${2:?--dir needs a value}; shift ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --mib "$mib"
bench_positive --ios "$ios"

bench_setup "$only"

exec python3 - "$runs" "$mib" "$ios" "$dir" "$nvmm" "$guest" "$only" "$json" <<'PY'
"""Run the guest's blkbench under each monitor, timestamp its port-0x80 phase markers."""
import json, os, random, statistics, subprocess, sys, tempfile, time

import blkbench
from markers import time_markers

runs, mib, ios = (int(v) for v in sys.argv[1:4])
scratch_dir, nvmm, guest, only, json_path = sys.argv[4:9]
TIMEOUT_S = 600.0
DISK_BYTES = max(mib, 64) << 20
CMDLINE = blkbench.cmdline(mib, ios, cpl3=True)
PHASES = [("seq read MiB/s", 0x20, 0x21, mib), ("seq write MiB/s", 0x22, 0x23, mib),
          ("4K rand read IOPS", 0x24, 0x25, ios)]

fd, disk = tempfile.mkstemp(prefix="nvmm-blkbench-", suffix=".img", dir=scratch_dir)
chunk = os.urandom(1 << 20)
for _ in range(DISK_BYTES >> 20):
    os.write(fd, chunk)
os.fsync(fd)
os.close(fd)


def run_once(name):
    p = subprocess.Popen(blkbench.argv(name, nvmm, guest, disk, CMDLINE, markers=True),
                         stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if name == "qemu" else subprocess.DEVNULL,
                         stderr=subprocess.PIPE if name == "nvmm" else subprocess.DEVNULL)
    stream = p.stdout if name == "qemu" else p.stderr
    try:
        when = time_markers(name, stream, 0x25, TIMEOUT_S, f"bench/blk.sh: {name}")
    finally:
        p.kill()
        p.wait()
    rates = {}
    for label, start, end, units in PHASES:
        # Timed on arrival here: a phase shorter than a pause of this harness ends in the same
        # read as it starts.
        if when[end] <= when[start]:
            sys.exit(f"bench/blk.sh: {name}: markers {start:#04x} and {end:#04x} arrived "
                     "together, too short a phase to time (a larger --mib or --ios)")
        rates[label] = units / (when[end] - when[start])
    return rates


def host_once():
    """The same work straight on the file: the physical limit of this machine."""
    out, block = {}, 128 << 10
    f = os.open(disk, os.O_RDWR)
    try:
        t = time.monotonic()
        for off in range(0, mib << 20, block):
            os.pread(f, block, off % DISK_BYTES)
        out[PHASES[0][0]] = mib / (time.monotonic() - t)
        buf = os.urandom(block)
        t = time.monotonic()
        for off in range(0, mib << 20, block):
            os.pwrite(f, buf, off % DISK_BYTES)
        out[PHASES[1][0]] = mib / (time.monotonic() - t)
        rng = random.Random(1)
        t = time.monotonic()
        for _ in range(ios):
            os.pread(f, 4096, rng.randrange(DISK_BYTES >> 12) << 12)
        out[PHASES[2][0]] = ios / (time.monotonic() - t)
    finally:
        os.close(f)
    return out


try:
    names = [n for n in ("nvmm", "qemu") if only in ("", n)]
    samples = {n: [] for n in names + ["host"]}
    host_after = {n: [] for n in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else list(reversed(names)):
            samples[name].append(run_once(name))
            host_after[name].append(host_once())
            samples["host"].append(host_after[name][-1])
finally:
    os.unlink(disk)

table = {n: {label: statistics.median(s[label] for s in samples[n]) for label, *_ in PHASES}
         for n in samples}
print(f"virtio-blk benchmark: {runs} runs each, {mib} MiB sequential, {ios} random 4K reads")
header = f"{'':20}" + "".join(f"{n:>10}" for n in samples)
if len(names) == 2:
    header += f"{'nvmm/qemu':>11}"
if "nvmm" in names:
    header += f"{'nvmm/host':>11}"
print(header)
result = {"runs": runs, "mib": mib, "ios": ios, "median": table, "samples": samples,
          "host_after": host_after}
for label, *_ in PHASES:
    row = f"{label:20}" + "".join(f"{table[n][label]:10.1f}" for n in samples)
    if len(names) == 2:
        r = table["nvmm"][label] / table["qemu"][label]
        result.setdefault("ratio_nvmm_over_qemu", {})[label] = r
        row += f"{r:11.2f}"
    if "nvmm" in names:
        h = statistics.median(run[label] / host[label]
                              for run, host in zip(samples["nvmm"], host_after["nvmm"]))
        result.setdefault("ratio_nvmm_over_host", {})[label] = h
        row += f"{h:11.2f}"
    print(row)
print("target: nvmm >= 1.0x QEMU on every figure")
if json_path:
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
PY
