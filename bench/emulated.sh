#!/usr/bin/env bash
# Guest work as KVM sees it: how many guest instructions KVM's emulator runs, and how many exits
# reach the monitor, per unit of guest work, for nvmm and QEMU microvm on the same guest.
# On kvm-pvm it explains the guest-bound throughput figures. Not a test. See `-h`.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bench/emulated.sh [-h] [-n N] [--mib MIB] [--ios N] [--net-mib MIB] [--dir DIR]
                         [--nvmm PATH] [--guest PATH] [--only nvmm|qemu] [--json FILE]

Counts two KVM tracepoints over whole runs of the test guest with `perf stat`:
  kvm:kvm_emulate_insn     a guest instruction run by KVM's instruction emulator
  kvm:kvm_userspace_exit   a vCPU exit handed to the monitor (KVM_RUN returns)
Hardware KVM emulates only some of a guest's accesses to ports and MMIO. On kvm-pvm every
instruction of the test guest goes through the emulator (`perf record -e kvm:kvm_emulate_insn`
lists its movs and jumps one after another), so there the first count is the guest's own
instruction count, and a throughput that the guest's code bounds is the same for every monitor.

Per unit of work, from differences between runs of the same scenario:
  boot -> power-off     scenario "poweroff", whole run (QEMU's includes its firmware)
  4 KiB random read     blkbench with 10 + N random reads, minus blkbench with 10
  MiB sequential        blkbench with 1 + MIB MiB read and written, minus blkbench with 1
  MiB over TCP          net_bench (as net.sh runs it, on a tap in a network namespace) with
                        1 + MIB MiB sent and received, minus net_bench with 1
Each run is repeated N times (alternating monitors); medians are shown. No target.

Options:
  -n N          runs per monitor and size (default 3)
  --mib MIB     extra sequential MiB (default 16)
  --ios N       extra random reads (default 2000)
  --net-mib MIB extra MiB each way over TCP (default 2; the guest moves about 1 MiB/s)
  --dir DIR     where the scratch disk goes (default /var/tmp)
  --nvmm PATH   nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the static
                build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH  test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside the
                nvmm binary)
  --only WHICH  measure only nvmm or only qemu
  --json FILE   also write the figures as JSON
Needs root (network namespace, tap, the kvm tracepoints) and perf (apt-get install linux-perf).
USAGE
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=3 mib=16 ios=2000 net_mib=2 dir=/var/tmp nvmm='' guest=${NVMM_TEST_GUEST:-} only='' json=''
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --mib) mib=${2:?--mib needs a value}; shift ;;
        --ios) ios=${2:?--ios needs a value}; shift ;;
        --net-mib) net_mib=${2:?--net-mib needs a value}; shift ;;
        --dir) dir=${2:?--dir needs a value}; shift ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --mib "$mib"
bench_positive --ios "$ios"
bench_positive --net-mib "$net_mib"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespace, tap, kvm tracepoints)"
command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
perf stat -e kvm:kvm_emulate_insn -- true >/dev/null 2>&1 ||
    die "perf cannot count kvm:kvm_emulate_insn (needs root and the kvm tracepoints)"

bench_setup "$only"

bench_netns

ip netns exec "$bench_ns" python3 - "$runs" "$mib" "$ios" "$net_mib" "$dir" "$nvmm" "$guest" \
    "$only" "$json" <<'PY'
"""Run the guest under `perf stat` for each monitor and size; per-unit counts from differences."""
import json, os, signal, socket, statistics, subprocess, sys, tempfile, threading

import blkbench
import netbench

runs, mib, ios, net_mib = (int(v) for v in sys.argv[1:5])
scratch_dir, nvmm, guest, only, json_path = sys.argv[5:10]
MEM_MIB, TIMEOUT_S = 64, 300
EVENTS = ["kvm:kvm_emulate_insn", "kvm:kvm_userspace_exit"]
# The smallest blkbench and net_bench: the bases the larger ones are compared with.
BASE_MIB, BASE_IOS = 1, 10
# Each run: what the guest does, and its bytes each way for net_bench (None: not networked).
RUNS = {"poweroff": ("nvmm_test=poweroff", None),
        "blk_base": (blkbench.cmdline(BASE_MIB, BASE_IOS, cpl3=False), None),
        "blk_random": (blkbench.cmdline(BASE_MIB, BASE_IOS + ios, cpl3=False), None),
        "blk_sequential": (blkbench.cmdline(BASE_MIB + mib, BASE_IOS, cpl3=False), None),
        "net_base": (netbench.cmdline(BASE_MIB, cpl3=False), BASE_MIB),
        "net": (netbench.cmdline(BASE_MIB + net_mib, cpl3=False), BASE_MIB + net_mib)}

fd, disk = tempfile.mkstemp(prefix="nvmm-emulated-", suffix=".img", dir=scratch_dir)
os.ftruncate(fd, max(BASE_MIB + mib, 64) << 20)
os.close(fd)


def argv(name, cmdline, net_mib):
    if net_mib is not None:
        return netbench.argv(name, nvmm, guest, net_mib, markers=False, cpl3=False)
    if "blkbench" in cmdline:
        return blkbench.argv(name, nvmm, guest, disk, cmdline, markers=False)
    if name == "nvmm":
        return [nvmm, "run", "--kernel", guest, "--mem", str(MEM_MIB),
                "--cmdline", cmdline]
    # ACPI on: the guest powers off as it does under nvmm.
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(MEM_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", guest, "-append", cmdline, "-serial", "stdio"]


def count(name, cmdline, net_mib):
    """{event: count} over one whole run; the guest's console must say it finished."""
    errors = []
    listener = None
    if net_mib is not None:
        listener = socket.create_server((netbench.HOST, netbench.PORT), reuse_port=True)
        threading.Thread(target=netbench.serve, args=(listener, net_mib << 20, errors),
                         daemon=True).start()
    try:
        with tempfile.NamedTemporaryFile("r", prefix="nvmm-perf-") as out:
            # In a session of its own: a monitor that outlives its time limit is killed with
            # perf (killing perf alone would leave it running).
            p = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out.name,
                                  "-e", ",".join(EVENTS), "--"] + argv(name, cmdline, net_mib),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
            try:
                stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                sys.exit(f"bench/emulated.sh: {name} '{cmdline}': still running after "
                         f"{TIMEOUT_S} s")
            report = out.read()
    finally:
        if listener:
            listener.close()
    console = stdout.decode(errors="replace")
    finished = "poweroff via acpi" if "poweroff" in cmdline else "nvmm-test: result=ok"
    if finished not in console or errors:
        sys.exit(f"bench/emulated.sh: {name} '{cmdline}': the guest did not finish: "
                 f"{errors} {console[-1500:]}{stderr.decode(errors='replace')[-1500:]}")
    counts = {}
    for line in report.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in EVENTS:
            if not fields[0].isdigit():
                sys.exit(f"bench/emulated.sh: perf could not count {fields[2]}: {line}")
            counts[fields[2]] = int(fields[0])
    if set(counts) != set(EVENTS):
        sys.exit(f"bench/emulated.sh: perf stat printed no counts for {name}")
    return counts


try:
    names = [n for n in ("nvmm", "qemu") if only in ("", n)]
    samples = {n: {run: [] for run in RUNS} for n in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else list(reversed(names)):
            for run, (cmdline, net) in RUNS.items():
                samples[name][run].append(count(name, cmdline, net))
finally:
    os.unlink(disk)


def fmt(value):
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def median(name, run, event):
    return statistics.median(s[event] for s in samples[name][run])


def per(run, base, units):
    return lambda n, e: (median(n, run, e) - median(n, base, e)) / units


UNITS = [("boot -> power-off", "boot", lambda n, e: median(n, "poweroff", e)),
         ("per 4 KiB random read", "rand_read", per("blk_random", "blk_base", ios)),
         ("per MiB read and written", "seq_mib", per("blk_sequential", "blk_base", mib)),
         ("per MiB sent and received", "net_mib", per("net", "net_base", net_mib))]
# Each event's name in the table and its key in the JSON.
SHORT = {"kvm:kvm_emulate_insn": ("emulated instructions", "emulated"),
         "kvm:kvm_userspace_exit": ("exits", "exits")}

result = {"runs": runs, "mib": mib, "ios": ios, "net_mib": net_mib,
          "kvm_pvm": os.path.isdir("/sys/module/kvm_pvm"), "per_unit": {}, "samples": samples}
print(f"KVM-emulated guest instructions and exits to the monitor: {runs} runs each, "
      f"{ios} random 4K reads, {mib} MiB sequential, {net_mib} MiB each way over TCP")
header = f"{'':50}" + "".join(f"{n:>12}" for n in names)
if len(names) == 2:
    header += f"{'nvmm/qemu':>11}"
print(header)
for event in EVENTS:
    for label, key, figure in UNITS:
        figures = {n: figure(n, event) for n in names}
        text, json_key = SHORT[event]
        result["per_unit"].setdefault(key, {})[json_key] = figures
        row = f"{text + ', ' + label:50}" + "".join(f"{fmt(figures[n]):>12}" for n in names)
        if len(names) == 2 and figures["qemu"]:
            row += f"{figures['nvmm'] / figures['qemu']:11.2f}"
        print(row)
if json_path:
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
PY
