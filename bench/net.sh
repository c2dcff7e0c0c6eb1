#!/usr/bin/env bash
# virtio-net benchmark: guest -> host and host -> guest TCP throughput, nvmm against
# `qemu-system-x86_64 -M microvm` with virtio-net-device on a tap, same guest (smoltcp), plus
# the host's own loopback TCP figure. Runs inside a network namespace it creates and removes.
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bench/net.sh [-h] [-n N] [--mib MIB] [--nvmm PATH] [--guest PATH] [--only nvmm|qemu]
                    [--no-tso] [--json FILE]

The test guest's "net_bench" scenario (tests/guest/README.md), at CPL 3 as in blk.sh
(nvmm_cpl3=1), connects to a server this harness runs on the host end of the tap, sends MIB
MiB (markers 0x30 .. 0x31 on I/O port 0x80), then receives MIB MiB from the host (0x32 ..
0x33). The guest sends with segmentation offload (frames of up to 64 KiB, as Linux's TCP
does; both monitors offer it). nvmm's markers come from its -v log, QEMU's from an
isa-debugcon on port 0x80; this harness timestamps both on arrival. QEMU uses its default userspace virtio-net backend on the
same kind of tap (no vhost-net). Each monitor runs N times
(alternating); the table shows medians and nvmm/QEMU ratios. Target: nvmm >= 1.0x QEMU.
The host row is loopback TCP inside the same namespace (the physical limit of this machine).

Options:
  -n N          runs per monitor (default 3)
  --mib MIB     bytes each way (default 32)
  --nvmm PATH   nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the static
                build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH  test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside the
                nvmm binary)
  --only WHICH  measure only nvmm or only qemu
  --no-tso      the guest sends plain frames of at most 1514 bytes (virtio_net_tso=0)
  --json FILE   also write the figures as JSON
Needs root (network namespace, tap).
USAGE
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=3 mib=32 nvmm='' guest=${NVMM_TEST_GUEST:-} only='' json='' tso=1
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --mib) mib=${2:?--mib needs a value}; shift ;;
        --no-tso) tso=0 ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --mib "$mib"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespace and tap)"

bench_setup "$only"

bench_netns

ip netns exec "$bench_ns" python3 - "$runs" "$mib" "$nvmm" "$guest" "$only" "$json" "$tso" <<'PY'
"""Serve the guest's net_bench, timestamp its port-0x80 phase markers."""
import json, socket, statistics, subprocess, sys, threading, time

import netbench
from markers import time_markers

runs, mib = int(sys.argv[1]), int(sys.argv[2])
nvmm, guest, only, json_path = sys.argv[3:7]
TSO = sys.argv[7] == "1"
TIMEOUT_S, TOTAL = 300.0, mib << 20
PHASES = [("guest->host MiB/s", 0x30, 0x31), ("host->guest MiB/s", 0x32, 0x33)]


def run_once(name):
    listener = socket.create_server((netbench.HOST, netbench.PORT), reuse_port=True)
    errors = []
    server = threading.Thread(target=netbench.serve, args=(listener, TOTAL, errors),
                              daemon=True)
    server.start()
    p = subprocess.Popen(netbench.argv(name, nvmm, guest, mib, markers=True, cpl3=True, tso=TSO),
                         stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if name == "qemu" else subprocess.DEVNULL,
                         stderr=subprocess.PIPE if name == "nvmm" else subprocess.DEVNULL)
    stream = p.stdout if name == "qemu" else p.stderr
    try:
        when = time_markers(name, stream, 0x33, TIMEOUT_S, f"bench/net.sh: {name}")
        if errors:
            sys.exit(f"bench/net.sh: {name}: server: {errors[0]}")
    finally:
        p.kill()
        p.wait()
        listener.close()
    return {label: mib / (when[end] - when[start]) for label, start, end in PHASES}


def host_once():
    """Loopback TCP, both directions, in this namespace."""
    out = {}
    for label, _, _ in PHASES:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        def sink():
            conn, _ = listener.accept()
            with conn:
                while conn.recv(1 << 20):
                    pass
        t = threading.Thread(target=sink)
        t.start()
        block = bytes(1 << 20)
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(mib):
                c.sendall(block)
        t.join()
        out[label] = mib / (time.monotonic() - start)
        listener.close()
    return out


names = [n for n in ("nvmm", "qemu") if only in ("", n)]
samples = {n: [] for n in names + ["host"]}
for i in range(runs):
    for name in names if i % 2 == 0 else list(reversed(names)):
        samples[name].append(run_once(name))
    samples["host"].append(host_once())

table = {n: {label: statistics.median(s[label] for s in samples[n]) for label, *_ in PHASES}
         for n in samples}
print(f"virtio-net benchmark: {runs} runs each, {mib} MiB each way"
      + ("" if TSO else ", no segmentation offload"))
header = f"{'':20}" + "".join(f"{n:>10}" for n in samples)
if len(names) == 2:
    header += f"{'nvmm/qemu':>11}"
print(header)
result = {"runs": runs, "mib": mib, "median": table, "samples": samples}
for label, *_ in PHASES:
    row = f"{label:20}" + "".join(f"{table[n][label]:10.3g}" for n in samples)
    if len(names) == 2:
        r = table["nvmm"][label] / table["qemu"][label]
        result.setdefault("ratio_nvmm_over_qemu", {})[label] = r
        row += f"{r:11.2f}"
    print(row)
print("target: nvmm >= 1.0x QEMU on every figure")
if json_path:
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
PY
