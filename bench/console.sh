#!/usr/bin/env bash
# Console benchmark: guest output throughput to a terminal and keystroke round-trip latency,
# virtio console vs 8250 serial, nvmm against `qemu-system-x86_64 -M microvm`, same guest.
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bench/console.sh [-h] [-n N] [--kib KIB] [--keys N] [--nvmm PATH] [--guest PATH]
                        [--only nvmm|qemu] [--json FILE]

Throughput: the test guest's "vcon_flood" writes KIB KiB to the console (virtio, or the 8250
with flood_target=serial); the monitor's console is a pseudo-terminal this harness drains. The
flood is bracketed by port-0x80 markers (0x40/0x41 virtio, 0x42/0x43 serial) that this harness
timestamps on arrival: nvmm's from its -v log, QEMU's from an isa-debugcon.
Latency: "vcon_rtt" echoes each byte; the harness writes one byte to the terminal and times
until it comes back, N times (p50/p90).
Each monitor runs N times (alternating); the table shows medians and nvmm/QEMU ratios.

Options:
  -n N          runs per monitor and console (default 3)
  --kib KIB     flood size (default 256)
  --keys N      round trips per run (default 50)
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

runs=3 kib=256 keys=50 nvmm='' guest=${NVMM_TEST_GUEST:-} only='' json=''
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --kib) kib=${2:?--kib needs a value}; shift ;;
        --keys) keys=${2:?--keys needs a value}; shift ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --kib "$kib"
bench_positive --keys "$keys"

bench_setup "$only"

exec python3 - "$runs" "$kib" "$keys" "$nvmm" "$guest" "$only" "$json" <<'PY'
"""Console throughput and keystroke latency on a pseudo-terminal."""
import faulthandler, json, os, pty, select, signal, statistics, subprocess, sys, threading, time
import tty

from markers import QEMU_DEBUGCON, time_markers

runs, kib, keys = (int(v) for v in sys.argv[1:4])
nvmm, guest, only, json_path = sys.argv[4:8]
TIMEOUT_S = 120.0
# How long a keystroke may go without its echo (resent every 0.5 s meanwhile).
ECHO_TIMEOUT_S = 10.0
# Past this, one flood or round-trip run is stuck where no timeout above reaches (a full
# bench/run once hung here for 300 s with nothing on stderr): every thread's stack is printed
# and the run fails, its monitor killed on the way out, so the next hang says where it was.
RUN_LIMIT_S = int(TIMEOUT_S) + 30


def stuck(signum, frame):
    faulthandler.dump_traceback(all_threads=True)
    raise TimeoutError(f"bench/console.sh: a run went on for over {RUN_LIMIT_S} s")


signal.signal(signal.SIGALRM, stuck)
# Where QEMU's serial port goes while the virtio console has the terminal.
REPORT = f"/tmp/nvmm-console-bench-{os.getpid()}.serial"


def argv(name, target, scenario, tty_path):
    cmdline = f"nvmm_test={scenario} flood_kib={kib} flood_target={target} rtt_target={target}"
    if name == "nvmm":
        console = ["--console", "virtio"] if target == "virtio" else []
        return [nvmm, "run", "-v", "--kernel", guest, "--mem", "32", "--cmdline", cmdline] + console
    base = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-m", "32",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", guest, "-append", cmdline
            ] + QEMU_DEBUGCON
    if target == "serial":
        return base + ["-serial", tty_path]
    return base + ["-serial", f"file:{REPORT}", "-device", "virtio-serial-device",
                   "-chardev", f"tty,id=c0,path={tty_path}", "-device", "virtconsole,chardev=c0"]


def spawn(name, target, scenario):
    master, slave = pty.openpty()
    tty.setraw(slave)
    tty_path = os.ttyname(slave)
    out = {"text": b""}
    # The markers arrive on nvmm's stderr (-v log) or QEMU's stdout (debugcon).
    if name == "nvmm":
        p = subprocess.Popen(argv(name, target, scenario, tty_path), stdin=slave, stdout=slave,
                             stderr=subprocess.PIPE)
        marker_stream = p.stderr
    else:
        # For virtio runs QEMU's serial port (the guest's report) goes to REPORT.
        p = subprocess.Popen(argv(name, target, scenario, tty_path), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        marker_stream = p.stdout
    return p, master, slave, out, marker_stream


def drain(master, out, stop):
    while not stop.is_set():
        if select.select([master], [], [], 0.1)[0]:
            try:
                out["text"] += os.read(master, 65536)
            except OSError:
                return


def flood(name, target):
    """Output MB/s between the guest's start and end markers, timed on arrival here."""
    p, master, slave, out, marker_stream = spawn(name, target, "vcon_flood")
    start, end = (0x40, 0x41) if target == "virtio" else (0x42, 0x43)
    stop = threading.Event()
    reader = threading.Thread(target=drain, args=(master, out, stop), daemon=True)
    reader.start()
    try:
        when = time_markers(name, marker_stream, end, TIMEOUT_S, f"bench/console.sh: {name} {target}")
        return kib * 1024 / (when[end] - when[start]) / 1e6
    finally:
        stop.set()
        p.kill()
        p.wait()
        os.close(master)
        os.close(slave)
        if os.path.exists(REPORT):
            os.unlink(REPORT)


def rtt(name, target):
    """Round trips of one byte through the guest's echo."""
    p, master, slave, _, _ = spawn(name, target, "vcon_rtt")
    try:
        samples = []
        warm = False
        while len(samples) < keys:
            # Since the last echo (a guest that stopped echoing fails here, not at bench/run's
            # limit for the whole script).
            deadline = time.monotonic() + ECHO_TIMEOUT_S
            if p.poll() is not None:
                sys.exit(f"bench/console.sh: {name} {target}: the monitor exited")
            while True:
                if time.monotonic() > deadline:
                    sys.exit(f"bench/console.sh: {name} {target}: no echo for "
                             f"{ECHO_TIMEOUT_S:.0f} s after {len(samples)} keystrokes")
                t0 = time.monotonic()
                os.write(master, b"k")
                got = b""
                while b"k" not in got and time.monotonic() < deadline:
                    if not select.select([master], [], [], 0.5)[0]:
                        break
                    got += os.read(master, 4096)
                if b"k" in got:
                    break
            if warm:
                samples.append((time.monotonic() - t0) * 1e3)
            warm = True
        return statistics.median(samples), sorted(samples)[int(0.9 * (len(samples) - 1))]
    finally:
        p.kill()
        p.wait()
        os.close(master)
        os.close(slave)


names = [n for n in ("nvmm", "qemu") if only in ("", n)]
targets = ["virtio", "serial"]
results = {n: {t: {"mbps": [], "rtt_p50": [], "rtt_p90": []} for t in targets} for n in names}
for i in range(runs):
    for name in names if i % 2 == 0 else list(reversed(names)):
        for target in targets:
            signal.alarm(RUN_LIMIT_S)
            results[name][target]["mbps"].append(flood(name, target))
            signal.alarm(RUN_LIMIT_S)
            p50, p90 = rtt(name, target)
            signal.alarm(0)
            results[name][target]["rtt_p50"].append(p50)
            results[name][target]["rtt_p90"].append(p90)

med = {n: {t: {k: statistics.median(v) for k, v in results[n][t].items()} for t in targets}
       for n in names}
print(f"console benchmark: {runs} runs each, {kib} KiB flood, {keys} keystrokes")
print(f"{'':28}" + "".join(f"{n:>10}" for n in names) + ("  nvmm/qemu" if len(names) == 2 else ""))
rows = [("output MB/s", "mbps"), ("keystroke RTT p50 (ms)", "rtt_p50"), ("keystroke RTT p90 (ms)", "rtt_p90")]
for target in targets:
    for label, key in rows:
        row = f"{target + ' ' + label:28}" + "".join(f"{med[n][target][key]:10.3g}" for n in names)
        if len(names) == 2:
            row += f"{med['nvmm'][target][key] / med['qemu'][target][key]:11.2f}"
        print(row)
print("higher MB/s is better, lower RTT is better")
if json_path:
    with open(json_path, "w") as f:
        json.dump({"runs": runs, "kib": kib, "keys": keys, "median": med, "samples": results},
                  f, indent=2)
        f.write("\n")
PY
