#!/usr/bin/env bash
# Fleet start benchmark: `nvmm up` of 16 test-guest VMs at once, against starting the same 16
# with `qemu-system-x86_64 -M microvm` the way a script would.
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/up16.sh [-h] [-n N] [--count N] [--mem MIB] [--nvmm PATH] [--guest PATH]
                     [--only nvmm|qemu] [--json FILE]

Starts COUNT VMs (default 16) of the test guest at once, scenario "halt" (it prints its lines,
then parks in cli; hlt, which costs the host no CPU), MIB of memory each, three ways:
  up    `nvmm up` in a temporary copy of the stand-in flake (tests/flakes/guests: no nixpkgs)
        with configurations vm01..vmNN, each that guest and scenario: nix eval and build of the
        runners on a warm store, a network with a tap per VM, disks, one background nvmm each;
        the network settings on the seed disk, not the command line (a NixOS runner's default)
        then `nvmm ps --json` (the pids) and `nvmm down --force`
  run   the VMM alone, for reference: COUNT `nvmm run --kernel GUEST --name runNN` processes
        spawned one after another without waiting (no nix, no network, no disks)
  qemu  COUNT `qemu-system-x86_64 -M microvm -accel kvm` processes, spawned the same way, on
        the same guest ELF, scenario and memory (no network, no disks: the cheapest peer)
All three guests get the kernel command line an `nvmm up` VM gets (its virtio-mmio devices
included), read from the warm-up round's console: the test guest prints its command line over
the serial port, a trapped write per byte, so a shorter one would be less guest work. `run`
passes the part after nvmm's default with --cmdline, QEMU all of it with -append; the warm-ups
check that each guest printed the same line. (With --only qemu: nvmm_test=halt alone.)
and measures, from the first spawn:
  all at marker   until every VM's console holds "nvmm-test: halting with interrupts off"
                  (up: NVMM_RUNTIME_DIR/vms/NAME/console.log; run, qemu: each one's stdout in
                  a file), polled every 5 ms; also the first VM's, and when `nvmm up` returned
  Pss, Rss, Anonymous
                  summed over the COUNT VM processes (/proc/PID/smaps_rollup; up: the pids of
                  `nvmm ps --json`), 200 ms after all markers (and after `nvmm up` returned);
                  Anonymous leaves out the binaries' and libraries' pages
  MemAvailable    the host's drop from just before the spawn (once it has stopped rising
                  after the previous round): at that sample, and its largest drop in between
                  (polled with the markers; up: includes nix's own memory); noisier than the
                  sums, as it counts everything else the host does meanwhile
Where `nvmm up`'s time goes comes from its stderr lines ("nvmm: evaluating", "nvmm: building"
or "nvmm: NAMES already built", "nvmm: NAME runs in the background"), each timestamped on
arrival, and from when each VM's directory appears (its daemon is being forked).
All run N rounds, alternating, after one discarded warm-up each (the warm-up `nvmm up` also
writes the guest module, the ssh keys and the network state, and puts the runners in the
store; run and qemu warm up once more with the command line it showed). Everything runs
inside a network namespace made for the run, nix with NIX_CONFIG='substituters =' and nvmm
with temporary NVMM_RUNTIME_DIR/NVMM_STATE_DIR, the runtime one on a tmpfs of its own, as
root's /run/nvmm is on a Debian host (see lib.sh).
Reported: p50 of each figure and the ratios up/qemu and run/qemu. Compare ratios, not absolute
times: shared machines are noisy, and on kvm-pvm hosts the guest's instructions are emulated.

Options:
  -n N            measured rounds of each (default 3)
  --count N       VMs per round (default 16)
  --mem MIB       guest memory in MiB (default 32)
  --nvmm PATH     nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the
                  static build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH    test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside
                  the nvmm binary)
  --only WHICH    nvmm: up and run only (no QEMU needed); qemu: qemu only
  --json FILE     also write the figures as JSON
  -h, --help      this text
Needs root (network namespace) and nix (2.4 or later).
EOF
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=3
count=16
mem=32
nvmm=
guest=${NVMM_TEST_GUEST:-}
only=
json=
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --count) count=${2:?--count needs a value}; shift ;;
        --mem) mem=${2:?--mem needs a value}; shift ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
bench_positive --count "$count"
bench_positive --mem "$mem" MiB
[[ $(id -u) -eq 0 ]] || die "needs root (nvmm up joins a network; this runs it in a namespace)"
[[ $only == qemu ]] || command -v nix >/dev/null || die "nix not found (apt-get install nix-bin)"
[[ -z $json || $json == /* ]] || json=$PWD/$json

bench_setup "$only"

work=$(mktemp -d /tmp/nvmm-up16.XXXXXX)
ns=nvmmbench-$$
ns_made=
cleanup() {
    local pid
    if [[ -n $ns_made ]]; then
        # Whatever a failed round left running: every process in the namespace is this run's.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/flake" "$work/out"
cp tests/flakes/guests/flake.nix "$work/flake/flake.nix"
cp "$guest" "$work/flake/guest.elf"
ip netns add "$ns"
ns_made=1
ip -n "$ns" link set lo up

# No binary cache can be reached here; asking one costs seconds.
export NIX_CONFIG='substituters ='
export NVMM_RUNTIME_DIR=$work/run NVMM_STATE_DIR=$work/state

bench_netns_exec_tmpfs_runtime "$ns" python3 - "$runs" "$count" "$mem" "$nvmm" "$guest" "$only" "$json" \
    "$work" <<'PY'
"""Start COUNT VMs at once with nvmm up, nvmm run and QEMU; time the markers, sum memory."""
import json, math, os, re, select, shutil, signal, subprocess, sys, time

runs, count, mem = (int(a) for a in sys.argv[1:4])
nvmm, guest, only, json_path, work = sys.argv[4:9]
FLAKE, OUT = os.path.join(work, "flake"), os.path.join(work, "out")
RUNTIME = os.environ["NVMM_RUNTIME_DIR"]
WIDTH = max(2, len(str(count)))
NAMES = [f"vm{i:0{WIDTH}d}" for i in range(1, count + 1)]
SCENARIO = "halt"
MARKER = b"nvmm-test: halting with interrupts off"
POLL_S, SETTLE_S, GONE_S = 0.005, 0.2, 10.0
QUIET_KIB, QUIET_S, QUIET_MAX_S = 1024, 1.0, 15.0
TIMEOUT_S = 60.0 + 5.0 * count
READY = re.compile(r"^nvmm: (\S+) runs in the background")
EVALUATED = re.compile(r"^nvmm: (building |.* already built$)")
CMDLINE = re.compile(rb'nvmm-test: cmdline="([^"]*)"')
# The kernel command line of every guest (see -h): until the warm-up `nvmm up` shows its own,
# the scenario alone; the part `nvmm run` adds to its default.
guest_cmdline = {"full": f"nvmm_test={SCENARIO}", "run": f"nvmm_test={SCENARIO}"}


class Failure(Exception):
    """A round that did not do what it should: the harness stops, with the details."""


def printed_cmdline(path):
    """The command line the test guest printed in the console output at path (its escapes
    undone)."""
    with open(path, "rb") as f:
        m = CMDLINE.search(f.read())
    if not m:
        raise Failure(f"{path}: the guest printed no command line")
    return re.sub(rb"\\x([0-9a-f]{2})", lambda x: bytes([int(x.group(1), 16)]),
                  m.group(1)).decode()


def qemu_argv():
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(mem),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", guest, "-append", guest_cmdline["full"], "-serial", "stdio"]


def spawn_name(kind, i):
    return f"{kind}{i + 1:0{WIDTH}d}"


def run_checked(argv, what, cwd=None):
    p = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=TIMEOUT_S)
    if p.returncode != 0:
        raise Failure(f"{what}: exit status {p.returncode}\n  command: {' '.join(argv)}\n"
                      f"  output:\n{(p.stdout + p.stderr).decode(errors='replace')[-3000:]}")
    return p.stdout.decode()


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise Failure("/proc/meminfo has no MemAvailable")


def settled_mem_available_kib():
    """MemAvailable once it has stopped rising (for up to 15 s): what the previous round freed
    can take seconds to show as free again (free page reporting, when this host is a VM)."""
    deadline = time.monotonic() + QUIET_MAX_S
    last = mem_available_kib()
    while time.monotonic() < deadline:
        time.sleep(QUIET_S)
        now = mem_available_kib()
        if now - last < QUIET_KIB:
            return now
        last = now
    return last


def memory_kib(pids):
    """Rss, Pss and Anonymous of smaps_rollup, each summed over pids."""
    total = {"Rss:": 0, "Pss:": 0, "Anonymous:": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    fields = line.split()
                    if fields[0] in total:
                        total[fields[0]] += int(fields[1])
        except (FileNotFoundError, ProcessLookupError):
            raise Failure(f"VM process {pid} ended before its memory was read") from None
    return total["Rss:"], total["Pss:"], total["Anonymous:"]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return ") Z " not in f.read()
    except FileNotFoundError:
        return False


class Markers:
    """Follows growing output files; notes when each first holds MARKER."""

    def __init__(self, paths):
        self.files = {path: None for path in paths}
        self.data = {path: b"" for path in paths}
        self.at = {}

    def poll(self, now):
        for path, f in list(self.files.items()):
            if path in self.at:
                continue
            if f is None:
                try:
                    f = self.files[path] = open(path, "rb")
                except FileNotFoundError:
                    continue
            chunk = f.read()
            if chunk:
                self.data[path] += chunk
                if MARKER in self.data[path]:
                    self.at[path] = now

    def done(self):
        return len(self.at) == len(self.files)

    def tail(self, path):
        return self.data[path].decode(errors="replace")[-1500:]

    def close(self):
        for f in self.files.values():
            if f is not None:
                f.close()


class Low:
    """The lowest MemAvailable seen since it was made."""

    def __init__(self):
        self.before = self.low = settled_mem_available_kib()

    def poll(self):
        self.low = min(self.low, mem_available_kib())

    def figures(self, after):
        return {"avail_drop_mib": (self.before - after) / 1024,
                "avail_peak_drop_mib": (self.before - min(self.low, after)) / 1024}


def memory_figures(pids, low):
    time.sleep(SETTLE_S)
    rss, pss, anon = memory_kib(pids)
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "anon_mib": anon / 1024,
            **low.figures(mem_available_kib())}


def ps_json():
    return json.loads(run_checked([nvmm, "ps", "--json"], "nvmm ps --json", cwd=FLAKE))


def round_up():
    """`nvmm up` of the whole flake; then ps, memory, `nvmm down --force`."""
    vm_dirs = {n: os.path.join(RUNTIME, "vms", n) for n in NAMES}
    markers = Markers([os.path.join(d, "console.log") for d in vm_dirs.values()])
    low = Low()
    t0 = time.monotonic()
    argv = [nvmm, "up"]
    p = subprocess.Popen(argv, cwd=FLAKE, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    streams = {p.stdout.fileno(): "stdout", p.stderr.fileno(): "stderr"}
    data = {"stdout": b"", "stderr": b""}
    pending = dict(data)
    lines, started, ready, exited = {}, {}, {}, None

    def output():
        return (data["stdout"] + data["stderr"]).decode(errors="replace")[-3000:]

    try:
        while not (markers.done() and exited is not None and not streams):
            if time.monotonic() - t0 > TIMEOUT_S:
                missing = [n for n, d in vm_dirs.items()
                           if os.path.join(d, "console.log") not in markers.at]
                raise Failure(f"nvmm up: not all at the marker within {TIMEOUT_S:.0f} s "
                              f"(missing {missing}, nvmm up {'ran' if exited is None else 'ended'})"
                              f"\n  output:\n{output()}")
            fds = select.select(list(streams), [], [], POLL_S)[0] if streams else []
            if not streams:
                time.sleep(POLL_S)
            now = time.monotonic() - t0
            for fd in fds:
                name = streams[fd]
                piece = os.read(fd, 65536)
                if not piece:
                    del streams[fd]
                    continue
                data[name] += piece
                pending[name] += piece
                *done, pending[name] = pending[name].split(b"\n")
                for line in (d.decode(errors="replace") for d in done):
                    if name != "stderr":
                        continue
                    if line.startswith("nvmm: evaluating "):
                        lines.setdefault("evaluating", now)
                    if EVALUATED.match(line):
                        lines.setdefault("evaluated", now)
                    if m := READY.match(line):
                        ready.setdefault(m.group(1), now)
            for n, d in vm_dirs.items():
                if n not in started and os.path.isdir(d):
                    started[n] = now
            markers.poll(now)
            low.poll()
            if exited is None and p.poll() is not None:
                exited = now
                if p.returncode != 0:
                    raise Failure(f"nvmm up: exit status {p.returncode}\n  output:\n{output()}")
    finally:
        markers.close()
        if p.poll() is None:
            p.kill()
        p.wait()
    missing = [k for k in ("evaluating", "evaluated") if k not in lines]
    missing += [f"{n} runs in the background" for n in NAMES if n not in ready]
    if missing:
        raise Failure(f"nvmm up never printed {missing}\n  output:\n{output()}")

    entries = ps_json()
    states = sorted((e["name"], e["state"]) for e in entries)
    if states != [(n, "running") for n in NAMES]:
        raise Failure(f"nvmm ps after up: {states}")
    pids = [e["pid"] for e in entries]
    result = {"all_markers": max(markers.at.values()), "first_marker": min(markers.at.values()),
              "returned": exited, "evaluating": lines["evaluating"],
              "evaluated": lines["evaluated"], "first_start": min(started.values()),
              "last_start": max(started.values()), "last_ready": max(ready.values()),
              "start_to_ready": [ready[n] - started[n] for n in NAMES],
              "vm_forked": [started[n] for n in NAMES], "vm_ready": [ready[n] for n in NAMES],
              "vm_marker": [markers.at[os.path.join(vm_dirs[n], "console.log")] for n in NAMES],
              **memory_figures(pids, low)}

    t = time.monotonic()
    run_checked([nvmm, "down", "--force"], "nvmm down --force", cwd=FLAKE)
    result["down"] = time.monotonic() - t
    deadline = time.monotonic() + GONE_S
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise Failure(f"VM processes still there {GONE_S:.0f} s after nvmm down: "
                          f"{[pid for pid in pids if alive(pid)]}")
        time.sleep(POLL_S)
    if left := ps_json():
        raise Failure(f"nvmm ps after down: {left}")
    result["cmdline"] = printed_cmdline(os.path.join(vm_dirs[NAMES[0]], "console.log"))
    for d in vm_dirs.values():  # console.log is appended to: the next round starts afresh
        shutil.rmtree(d)
    return result


def round_processes(kind):
    """COUNT monitor processes spawned one after another, as a script would; then killed."""
    logs = [os.path.join(OUT, f"{spawn_name(kind, i)}.log") for i in range(count)]
    for log in logs:
        if os.path.exists(log):
            os.remove(log)
    markers = Markers(logs)
    procs = []
    low = Low()
    t0 = time.monotonic()
    try:
        for i, log in enumerate(logs):
            argv = qemu_argv() if kind == "qemu" else [
                nvmm, "run", "--kernel", guest, "--mem", str(mem), "--cmdline",
                guest_cmdline["run"], "--name", spawn_name(kind, i)]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT))
        spawned = time.monotonic() - t0
        while not markers.done():
            time.sleep(POLL_S)
            now = time.monotonic() - t0
            markers.poll(now)
            low.poll()
            for log, proc in zip(logs, procs):
                if log not in markers.at and proc.poll() is not None:
                    markers.poll(now)
                    if log not in markers.at:
                        raise Failure(f"{kind}: {os.path.basename(log)} exited (status "
                                      f"{proc.returncode}) before the marker\n  command: "
                                      f"{' '.join(proc.args)}\n  output:\n{markers.tail(log)}")
            if now > TIMEOUT_S:
                raise Failure(f"{kind}: not all at the marker within {TIMEOUT_S:.0f} s")
        return {"all_markers": max(markers.at.values()), "first_marker": min(markers.at.values()),
                "returned": spawned, **memory_figures([proc.pid for proc in procs], low),
                "cmdline": printed_cmdline(logs[0])}
    finally:
        markers.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()
        if kind == "run":  # what `nvmm ps` would show as dead (and up would reap)
            for i in range(count):
                shutil.rmtree(os.path.join(RUNTIME, "vms", spawn_name(kind, i)),
                              ignore_errors=True)


def pct(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def main():
    with open(os.path.join(FLAKE, "settings.json"), "w") as f:
        # cmdlineNetwork false, as in a NixOS configuration's runner (the guest module's
        # default): the VM's network settings and its hosts table reach the guest on the seed
        # disk. On the command line they would make each VM's different (and longer with
        # every VM), where every guest here gets the same one (see -h).
        json.dump({"systems": {n: {"cmdline": f"nvmm_test={SCENARIO}", "memoryMiB": mem,
                                   "extra": {"cmdlineNetwork": False}}
                               for n in NAMES}}, f)
    rounds = {"up": round_up, "run": lambda: round_processes("run"),
              "qemu": lambda: round_processes("qemu")}
    names = {"": ["up", "run", "qemu"], "nvmm": ["up", "run"], "qemu": ["qemu"]}[only]
    warm = {name: rounds[name]() for name in names}  # discarded: nix's store and eval
    # cache, ssh keys, page cache; and the command lines (see -h)
    if "up" in warm:
        full, default = warm["up"]["cmdline"], warm["run"]["cmdline"]
        prefix = default.removesuffix(guest_cmdline["run"])
        if prefix == default or not full.startswith(prefix):
            raise Failure(f"nvmm run's guest printed {default!r}, nvmm up's {full!r}: cannot "
                          "tell nvmm's default part")
        guest_cmdline.update(full=full, run=full[len(prefix):])
        for name in names[1:]:
            rounds[name]()
    samples = {name: [] for name in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(rounds[name]())
    for name in names:
        if printed := {s["cmdline"] for s in samples[name]} - {guest_cmdline["full"]}:
            raise Failure(f"{name}'s guests printed {printed}, not {guest_cmdline['full']!r}")
    report(names, samples)


def report(names, samples):
    version = "" if only == "qemu" else subprocess.run(
        ["nix", "--version"], capture_output=True, text=True).stdout.strip()
    result = {"runs": runs, "count": count, "mem_mib": mem, "scenario": SCENARIO,
              "guest": guest, "nix": version, "guest_cmdline": guest_cmdline["full"],
              "figures": {}}
    rows = [("all_markers", "ms", f"all {count} at marker"),
            ("first_marker", "ms", "first at marker"),
            ("returned", "ms", "command returned"),
            ("pss_mib", "MiB", f"Pss, sum of {count}"),
            ("rss_mib", "MiB", f"Rss, sum of {count}"),
            ("anon_mib", "MiB", f"Anonymous, sum of {count}"),
            ("avail_drop_mib", "MiB", "MemAvailable drop"),
            ("avail_peak_drop_mib", "MiB", "  largest drop")]
    for name in names:
        for metric, unit, _ in rows:
            values = [s[metric] * (1e3 if unit == "ms" else 1) for s in samples[name]]
            result["figures"].setdefault(name, {})[metric] = {"p50": pct(values, 50),
                                                             "samples": values}
    fig = result["figures"]
    ratios = [(a, "qemu") for a in ("up", "run") if a in names and "qemu" in names]
    print(f"up16 benchmark: {count} VMs at once, {mem} MiB each, scenario {SCENARIO}; "
          f"{runs} rounds each, alternating, after one discarded warm-up; guest {guest}"
          + (f"; {version}" if version else ""))
    print(f"every guest's kernel command line: {guest_cmdline['full']}")
    print(f"{'p50':30}" + "".join(f"{n:>10}" for n in names)
          + "".join(f"{a + '/' + b:>10}" for a, b in ratios))
    for metric, unit, label in rows:
        cells = "".join(f"{fig[n][metric]['p50']:10.1f}" for n in names)
        for a, b in ratios:
            den = fig[b][metric]["p50"]
            r = fig[a][metric]["p50"] / den if den > 0 else float("nan")
            result.setdefault("ratios", {}).setdefault(f"{a}/{b}", {})[metric] = r
            cells += f"{r:10.2f}"
        print(f"{label + ' (' + unit + ')':30}{cells}")
    print(f"  command returned: up: `nvmm up` exited; run, qemu: the last of the {count} "
          "spawned (they run on)")
    print(f"all {count} at marker, each round (ms):")
    for n in names:
        print(f"  {n:6}" + " ".join(f"{v:9.1f}" for v in fig[n]["all_markers"]["samples"]))
    if "up" in names:
        report_up(samples["up"], result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def report_up(up, result):
    def p50(f):
        return pct([f(s) * 1e3 for s in up], 50)

    steps = [
        ("nvmm's start (-> \"evaluating\")", lambda s: s["evaluating"]),
        ("nix eval: names, runners, built?", lambda s: s["evaluated"] - s["evaluating"]),
        ("nix build if any, network joined (-> 1st VM forked)",
         lambda s: s["first_start"] - s["evaluated"]),
        (f"{count} VMs forked at once, until the last runs", lambda s: s["last_ready"] - s["first_start"]),
        ("last ready -> all at marker", lambda s: s["all_markers"] - s["last_ready"]),
        ("last ready -> nvmm up returned", lambda s: s["returned"] - s["last_ready"]),
    ]
    print("where nvmm up's time goes (p50 ms of each step, from its stderr and the VM dirs):")
    timeline = {}
    for label, f in steps:
        timeline[label] = p50(f)
        print(f"  {label:52}{timeline[label]:9.1f}")
    nix = p50(lambda s: s["first_start"])
    total = p50(lambda s: s["all_markers"])
    each = pct([d * 1e3 for s in up for d in s["start_to_ready"]], 50)
    gap = p50(lambda s: (s["last_start"] - s["first_start"]) / max(count - 1, 1))
    first = p50(lambda s: s["first_marker"] - s["first_start"])
    print(f"  before the first VM is forked (mostly nix): {nix:.1f} of {total:.1f} ms to all at "
          "marker")
    print(f"  per VM: fork -> \"runs in the background\" p50 {each:.1f} ms (its set-up and boot, "
          f"side by side with the others'); {gap:.1f} ms between forks; "
          f"first VM fork -> its marker {first:.1f} ms")
    down = p50(lambda s: s["down"])
    print(f"  nvmm down --force of {count}: p50 {down:.1f} ms")
    result["up_steps_ms"] = timeline
    # Each round's events in ms since the spawn, per VM where there is one per VM.
    result["up_rounds_ms"] = [
        {k: [x * 1e3 for x in v] if isinstance(v, list) else v * 1e3
         for k, v in s.items() if not k.endswith("_mib") and k != "cmdline"} for s in up]
    result["up_per_vm_ms"] = {"fork_to_ready_p50": each, "between_forks_p50": gap,
                              "before_first_fork_p50": nix, "first_fork_to_marker_p50": first,
                              "down_force_p50": down}


try:
    main()
except (Failure, subprocess.TimeoutExpired) as e:
    sys.exit(f"bench/up16.sh: {e}")
PY
