#!/usr/bin/env bash
# Boot benchmark: nvmm against `qemu-system-x86_64 -M microvm`, same guest ELF, same memory.
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/boot.sh [-h] [-n N] [--mem MIB] [--nvmm PATH] [--guest PATH]
                     [--only nvmm|qemu] [--json FILE]

Boots the nvmm test guest (scenario "halt": the guest writes 0x10 to port 0x80 first, then
parks in cli; hlt) N times under nvmm and under QEMU microvm, alternating, and reports p50/p90 of
  spawn->marker  time from spawning the monitor until the guest's first port-0x80 write is
                 visible to this harness (nvmm: its "debug port 0x80" log line on stderr;
                 QEMU: the 0x10 byte from an isa-debugcon on port 0x80 on stdout)
  RSS overhead   Rss summed over /proc/PID/smaps, minus the guest-RAM mapping's Rss, sampled
                 200 ms after the marker (nvmm: the adjacent anonymous mappings that add
                 up to exactly MIB; QEMU: the largest anonymous mapping of at least MIB)
with the nvmm/QEMU ratios and the targets (spawn->marker <= 0.25x QEMU, overhead <= 3 MiB).
One discarded warm-up run of each precedes the measured runs. Compare ratios, not absolute
times: shared machines are noisy.

Options:
  -n N            runs per monitor (default 20)
  --mem MIB       guest memory in MiB (default 128)
  --nvmm PATH     nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the
                  static build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH    test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside
                  the nvmm binary)
  --only WHICH    measure only nvmm or only qemu
  --json FILE     also write the figures as JSON
  -h, --help      this text
EOF
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=20
mem=128
nvmm=
guest=${NVMM_TEST_GUEST:-}
only=
json=
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --mem) mem=${2:?--mem needs a value}; shift ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --mem "$mem" MiB

bench_setup "$only"

exec python3 - "$runs" "$mem" "$nvmm" "$guest" "$only" "$json" <<'PY'
"""Spawn each monitor, time its first port-0x80 marker, sample its smaps, kill it."""
import json, math, os, select, signal, subprocess, sys, tempfile, time

runs, mem = int(sys.argv[1]), int(sys.argv[2])
nvmm, guest, only, json_path = sys.argv[3:7]
MEM_KIB, TIMEOUT_S, SETTLE_S = mem * 1024, 10.0, 0.2

MONITORS = {
    # name: (argv, stream carrying the marker, marker bytes, guest-RAM rule)
    "nvmm": ([nvmm, "run", "--kernel", guest, "--mem", str(mem),
              "--cmdline", "nvmm_test=halt", "-v"],
             "stderr", b"debug port 0x80", "exact"),
    "qemu": (["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(mem),
              "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
              "-kernel", guest, "-append", "nvmm_test=halt",
              "-device", "isa-debugcon,iobase=0x80,chardev=dbg", "-chardev", "stdio,id=dbg",
              "-serial", "null"],  # a UART like nvmm's, its output discarded
             "stdout", b"\x10", "largest"),
}


def is_anon(path):
    """Private or shared anonymous memory, memfd, or a named anonymous mapping."""
    return not path or path.startswith(("/dev/zero", "/memfd:", "[anon"))


def guest_ram_rss_kib(maps, rule):
    """Rss of the guest RAM. nvmm's: the adjacent anonymous mappings that add up to exactly MEM
    (it advises huge or small pages per range, which splits its one mapping); QEMU's, and
    nvmm's where there are none: the largest anonymous mapping of at least MEM."""
    anon = [m for m in maps if is_anon(m["path"])]
    if rule == "exact":
        for first in range(len(anon)):
            size = rss = 0
            for i, m in enumerate(anon[first:], first):
                if i > first and m["start"] != anon[i - 1]["end"]:
                    break
                size, rss = size + m["size"], rss + m["rss"]
                if size >= MEM_KIB:
                    break
            if size == MEM_KIB:
                return rss
        print(f"warning: no anonymous mappings of exactly {mem} MiB; using the largest",
              file=sys.stderr)
    large = [m for m in anon if m["size"] >= MEM_KIB]
    if not large:
        raise RuntimeError(f"no anonymous mapping of at least {mem} MiB in smaps")
    return max(large, key=lambda m: m["size"])["rss"]


def rss_overhead_kib(pid, rule):
    maps = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # mapping header: range perms offset dev inode [path]
                start, end = (int(a, 16) for a in fields[0].split("-"))
                maps.append({"path": " ".join(fields[5:]), "start": start, "end": end,
                             "size": 0, "rss": 0})
            elif fields[0] == "Size:":
                maps[-1]["size"] = int(fields[1])
            elif fields[0] == "Rss:":
                maps[-1]["rss"] = int(fields[1])
    return sum(m["rss"] for m in maps) - guest_ram_rss_kib(maps, rule)


def run_once(name):
    argv, stream, marker, rule = MONITORS[name]
    log = tempfile.TemporaryFile()
    pipe = subprocess.PIPE
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                         stdout=pipe if stream == "stdout" else subprocess.DEVNULL,
                         stderr=pipe if stream == "stderr" else log)
    fd = (p.stdout if stream == "stdout" else p.stderr).fileno()
    seen = b""
    try:
        while marker not in seen:
            left = t0 + TIMEOUT_S - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"no marker within {TIMEOUT_S:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"exited before the marker (status {p.wait()})")
            seen += chunk
        latency_ms = (time.monotonic() - t0) * 1e3
        time.sleep(SETTLE_S)
        if p.poll() is not None:
            raise RuntimeError(f"exited {SETTLE_S} s after the marker (status {p.returncode})")
        return latency_ms, rss_overhead_kib(p.pid, rule) / 1024
    except RuntimeError as e:
        log.seek(0)
        detail = (seen + log.read()).decode(errors="replace").strip()[-2000:]
        sys.exit(f"bench/boot.sh: {name}: {e}\n  command: {' '.join(argv)}\n  output:\n{detail}")
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


def pct(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


names = [n for n in ("nvmm", "qemu") if only in ("", n)]
for name in names:  # warm-up: page cache, first-exec costs
    run_once(name)
samples = {n: {"spawn_to_marker_ms": [], "rss_overhead_mib": []} for n in names}
for i in range(runs):
    for name in names if i % 2 == 0 else reversed(names):
        lat, rss = run_once(name)
        samples[name]["spawn_to_marker_ms"].append(lat)
        samples[name]["rss_overhead_mib"].append(rss)

result = {"runs": runs, "mem_mib": mem, "guest": guest, "monitors": {}}
for name in names:
    result["monitors"][name] = {
        metric: {"p50": pct(v, 50), "p90": pct(v, 90), "samples": v}
        for metric, v in samples[name].items()}

print(f"boot benchmark: {runs} runs each, {mem} MiB, guest {guest}")
print(f"{'':24}{'':>6}{'p50':>10}{'p90':>10}")
rows = [("spawn->marker (ms)", "spawn_to_marker_ms"), ("RSS overhead (MiB)", "rss_overhead_mib")]
for label, metric in rows:
    for name in names:
        f = result["monitors"][name][metric]
        print(f"{label:24}{name:>6}{f['p50']:10.2f}{f['p90']:10.2f}")
        label = ""
    if len(names) == 2:
        n, q = (result["monitors"][x][metric] for x in names)
        ratio = {p: n[p] / q[p] if q[p] else float("nan") for p in ("p50", "p90")}
        result.setdefault("ratio_nvmm_over_qemu", {})[metric] = ratio
        print(f"{'':24}{'ratio':>6}{ratio['p50']:10.2f}{ratio['p90']:10.2f}")
print("targets: spawn->marker <= 0.25x QEMU; nvmm RSS overhead <= 3 MiB")
if "nvmm" in names:
    rss = result["monitors"]["nvmm"]["rss_overhead_mib"]["p50"]
    print(f"  nvmm RSS overhead p50 {rss:.2f} MiB: {'met' if rss <= 3 else 'MISSED'}")
    if len(names) == 2:
        r = result["ratio_nvmm_over_qemu"]["spawn_to_marker_ms"]["p50"]
        print(f"  spawn->marker ratio p50 {r:.2f}: {'met' if r <= 0.25 else 'MISSED'}")
if json_path:
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
PY
