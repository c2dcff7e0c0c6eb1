#!/usr/bin/env bash
# `nvmm boot` benchmark: what nvmm adds to nix's own eval + build on a warm store, against the
# flow it replaces (the same nix calls, then `qemu-system-x86_64 -M microvm` on the result).
# Not a test: it prints figures and never fails on a missed target. See `-h`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/nix-boot.sh [-h] [-n N] [--nvmm PATH] [--guest PATH] [--only nvmm|qemu]
                         [--json FILE]

Boots configuration "server" of a temporary copy of the stand-in flake (tests/flakes/guests: no
nixpkgs; its runner boots the test guest, scenario "poweroff", 32 MiB) and times, from spawn:
  A     nix alone, the least it does to hand over a built runner: one `nix build --no-link
        --json --impure --expr E`, where E is the runner of the expression nvmm evaluates
        (cli/src/nix.rs, runner_expression) with the guest module nvmm wrote; spawn -> exit
        (nvmm's own nix call is one `nix eval` on a warm store, which checks the runner)
  B     `nvmm boot server`: -> exit (the guest powers off at once), and -> the guest's first
        line ("nvmm-test: boot protocol=") on stdout
  B-v   the same with -v, whose log lines (timestamped on arrival) show where B's time goes
  C     `nvmm run` of the same guest and scenario, the VM part alone: -> exit and -> that line
  peer  the flow nvmm replaces: A, then QEMU microvm on the kernel of the runner A built:
        -> exit and -> that line; "qemu part" is QEMU's spawn -> exit within it
All run N times, alternating, after one discarded warm-up each (the warm-up `nvmm boot` also
writes the guest module, the ssh keys and the network state). Everything runs inside a network
namespace made for the run (`nvmm boot` joins a network: a bridge and a tap), nix with
NIX_CONFIG='substituters =' and nvmm with temporary NVMM_RUNTIME_DIR/NVMM_STATE_DIR, the
runtime one on a tmpfs of its own, as root's /run/nvmm is on a Debian host (see lib.sh).
Reported: p50/p90 of each, the overhead B - A (p50; target <= 150 ms), the ratio B / peer,
and where the time goes inside B (from B-v). The peer has no disks and no network, so it is
the cheapest version of that flow. Compare ratios and differences, not absolute times: shared
machines are noisy, and on kvm-pvm hosts the guest's instructions are emulated.

Options:
  -n N            runs of each (default 10)
  --nvmm PATH     nvmm binary (default target/x86_64-unknown-linux-gnu/release/nvmm, the
                  static build of scripts/lib.sh build_release_nvmm, built if missing)
  --guest PATH    test guest ELF (default $NVMM_TEST_GUEST, else the one cargo built beside
                  the nvmm binary)
  --only WHICH    nvmm: A, B, B-v and C only (no QEMU needed); qemu: A and the peer only
  --json FILE     also write the figures as JSON
  -h, --help      this text
Needs root (network namespace) and nix (2.4 or later).
EOF
}

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runs=10
nvmm=
guest=${NVMM_TEST_GUEST:-}
only=
json=
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        *) bench_common_option "$@" || { usage >&2; die "unknown argument: $1"; }; shift ;;
    esac
    shift
done
bench_positive -n "$runs"
[[ $(id -u) -eq 0 ]] || die "needs root (nvmm boot joins a network; this runs it in a namespace)"
command -v nix >/dev/null || die "nix not found (apt-get install nix-bin)"
[[ -z $json || $json == /* ]] || json=$PWD/$json

bench_setup "$only"

work=$(mktemp -d /tmp/nvmm-nix-boot.XXXXXX)
ns=nvmmbench-$$
cleanup() {
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/flake"
cp tests/flakes/guests/flake.nix "$work/flake/flake.nix"
cp "$guest" "$work/flake/guest.elf"
cat >"$work/flake/settings.json" <<'EOF'
{"systems": {"server": {"cmdline": "nvmm_test=poweroff", "memoryMiB": 32}}}
EOF
ip netns add "$ns"
ip -n "$ns" link set lo up

# No binary cache can be reached here; asking one costs seconds.
export NIX_CONFIG='substituters ='
export NVMM_RUNTIME_DIR=$work/run NVMM_STATE_DIR=$work/state

bench_netns_exec_tmpfs_runtime "$ns" python3 - "$runs" "$nvmm" "$guest" "$only" "$json" "$work" <<'PY'
"""Time nix alone, nvmm boot, nvmm run and nix + QEMU, alternating; report percentiles."""
import glob, json, math, os, re, select, subprocess, sys, time

runs = int(sys.argv[1])
nvmm, guest, only, json_path, work = sys.argv[2:7]
FLAKE, STATE = os.path.join(work, "flake"), os.environ["NVMM_STATE_DIR"]
SCENARIO, MEM, TIMEOUT_S, TARGET_MS = "poweroff", 32, 120.0, 150.0
GUEST_LINE = "nvmm-test: boot protocol="
NIX = ["nix", "--extra-experimental-features", "nix-command flakes"]
# Steps of `nvmm -v boot`, by the first line (stream, text) that shows each is done.
BOOT_STEPS = [
    ("started", "stderr", "nvmm: evaluating "),
    ("nix eval done (runner already built)", "stderr", "server already built"),
    ("network joined", "stderr", "joined network"),
    ("disks, seed and VM set up", "stderr", "nvmm_vmm] booting "),
    ("guest's first line", "stdout", GUEST_LINE),
    ("guest powered off", "stderr", "ACPI S5"),
    ("network left", "stderr", "left network"),
]


def fail(what, argv, detail):
    sys.exit(f"bench/nix-boot.sh: {what}\n  command: {' '.join(argv)}\n  output:\n"
             f"{detail[-3000:]}")


def run(argv, what, events=(), cwd=None):
    """Runs argv to its end; returns (stdout, {event: seconds since spawn}, exit seconds).

    `events` are (name, stream, text): the arrival of the first line holding text."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    streams = {p.stdout.fileno(): "stdout", p.stderr.fileno(): "stderr"}
    data = {"stdout": b"", "stderr": b""}
    pending = dict(data)
    when = {}
    try:
        while streams:
            left = t0 + TIMEOUT_S - time.monotonic()
            ready = select.select(list(streams), [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                fail(f"{what}: not done within {TIMEOUT_S:.0f} s", argv,
                     (data["stdout"] + data["stderr"]).decode(errors="replace"))
            now = time.monotonic() - t0
            for fd in ready:
                name = streams[fd]
                piece = os.read(fd, 65536)
                if not piece:
                    del streams[fd]
                    continue
                data[name] += piece
                pending[name] += piece
                *lines, pending[name] = pending[name].split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    for event, stream, needle in events:
                        if stream == name and needle in text:
                            when.setdefault(event, now)
        status = p.wait()
        end = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if status != 0:
        fail(f"{what}: exit status {status}", argv,
             (data["stdout"] + data["stderr"]).decode(errors="replace"))
    missing = [e for e, *_ in events if e not in when]
    if missing:
        fail(f"{what}: never printed {missing}", argv,
             (data["stdout"] + data["stderr"]).decode(errors="replace"))
    return data["stdout"].decode(), when, end


def nix_string(text):
    """text as a Nix string literal (cli/src/nix.rs, nix_string)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return '"' + out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def runner_expression(flake, name, module):
    """The runner of `name`, as the expression `nvmm boot` evaluates finds it (cli/src/nix.rs,
    runner_expression)."""
    return f"""let
  flake = builtins.getFlake {nix_string(flake)};
  module = /. + {nix_string(module)};
  configurations = flake.nixosConfigurations or (throw "nvmm-no-nixos-configurations");
  runner = name:
    if ! configurations ? ${{name}} then
      throw "nvmm-no-such-configuration ${{builtins.toJSON name}} ${{builtins.toJSON (builtins.attrNames configurations)}}"
    else
      let
        system = configurations.${{name}};
        withModule =
          if system ? options && system.options ? nvmm then system
          else system.extendModules {{ modules = [ module ]; }};
      in withModule.config.system.build.nvmm;
in runner {nix_string(name)}"""


def nix_alone():
    """A: one nix build of the runner; returns (seconds, runner directory)."""
    t0 = time.monotonic()
    out, _, _ = run(NIX + ["build", "--no-link", "--json", "--impure", "--expr", EXPR],
                    "nix build")
    return time.monotonic() - t0, json.loads(out)[0]["outputs"]["out"]


def measure_a():
    seconds, _ = nix_alone()
    return {"exit": seconds}


def measure_b():
    _, when, end = run([nvmm, "boot", "server"], "nvmm boot",
                       [("line", "stdout", GUEST_LINE)], cwd=FLAKE)
    return {"exit": end, "guest_line": when["line"]}


def measure_b_steps():
    """B with -v, whose log lines show when each step is done."""
    _, when, end = run([nvmm, "-v", "boot", "server"], "nvmm -v boot", BOOT_STEPS, cwd=FLAKE)
    steps = {label: when[label] for label, *_ in BOOT_STEPS}
    return {"exit": end, "guest_line": when["guest's first line"], "steps": steps}


def measure_c():
    argv = [nvmm, "run", "--kernel", guest, "--mem", str(MEM), "--cmdline",
            f"nvmm_test={SCENARIO}"]
    _, when, end = run(argv, "nvmm run", [("line", "stdout", GUEST_LINE)])
    return {"exit": end, "guest_line": when["line"]}


def measure_peer():
    nix_s, runner = nix_alone()
    argv = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", str(MEM),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(runner, "kernel"), "-append", f"nvmm_test={SCENARIO}",
            "-serial", "stdio"]
    _, when, end = run(argv, "qemu", [("line", "stdout", GUEST_LINE)])
    return {"exit": nix_s + end, "guest_line": nix_s + when["line"], "qemu_part": end}


def pct(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


version_text = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout

# Warm-up: the first nvmm boot writes the guest module (whose path the expression names), the
# ssh keys and the network state, and puts the flake and the runner in the store.
measure_b()
modules = glob.glob(os.path.join(STATE, "guest-module", "*", "default.nix"))
if len(modules) != 1:
    sys.exit("bench/nix-boot.sh: expected one guest module under "
             f"{STATE}/guest-module after the first boot, found {modules} (an nvmm built with "
             "NVMM_GUEST_MODULE uses its installed copy; this harness does not know where)")
EXPR = runner_expression(FLAKE, "server", modules[0])
_, runner = nix_alone()
# The check that A builds what nvmm boots: the same runner directory.
run([nvmm, "-v", "boot", "server"], "nvmm boot",
                 [("kernel", "stderr", f"booting {runner}/kernel")], cwd=FLAKE)

MEASURES = {"A": measure_a, "B": measure_b, "B-v": measure_b_steps, "C": measure_c,
            "peer": measure_peer}
names = {"": ["A", "B", "C", "peer", "B-v"], "nvmm": ["A", "B", "C", "B-v"],
         "qemu": ["A", "peer"]}[only]
for name in names:  # discarded: page cache, first-exec costs
    MEASURES[name]()
samples = {name: [] for name in names}
for i in range(runs):
    for name in names[i % len(names):] + names[:i % len(names)]:
        samples[name].append(MEASURES[name]())


def figures(name, metric):
    values = [s[metric] * 1e3 for s in samples[name]]
    return {"p50": pct(values, 50), "p90": pct(values, 90), "samples": values}


ROWS = [("A", "exit", "nix build"),
        ("B", "exit", "nvmm boot -> exit"),
        ("B", "guest_line", "nvmm boot -> guest line"),
        ("B-v", "exit", "nvmm -v boot -> exit"),
        ("C", "exit", "nvmm run -> exit"),
        ("C", "guest_line", "nvmm run -> guest line"),
        ("peer", "exit", "nix + QEMU -> exit"),
        ("peer", "guest_line", "nix + QEMU -> guest line"),
        ("peer", "qemu_part", "  of which QEMU -> exit")]
result = {"runs": runs, "scenario": SCENARIO, "mem_mib": MEM, "nix": version_text.strip(),
          "target_overhead_ms": TARGET_MS, "ms": {}}
print(f"nix-boot benchmark: {runs} runs each, alternating; guest {guest}, "
      f"scenario {SCENARIO}, {MEM} MiB; {version_text.strip()}")
print(f"{'':6}{'':28}{'p50 ms':>10}{'p90 ms':>10}")
for name, metric, label in ROWS:
    if name in names:
        f = result["ms"].setdefault(name, {})[metric] = figures(name, metric)
        print(f"{name:6}{label:28}{f['p50']:10.1f}{f['p90']:10.1f}")

ms = result["ms"]
if "B" in names:
    overhead = ms["B"]["exit"]["p50"] - ms["A"]["exit"]["p50"]
    vm = ms["C"]["exit"]["p50"]
    result["overhead_b_minus_a_ms"] = {
        p: ms["B"]["exit"][p] - ms["A"]["exit"][p] for p in ("p50", "p90")}
    print(f"overhead B - A (p50): {overhead:.1f} ms, target <= {TARGET_MS:.0f} ms: "
          f"{'met' if overhead <= TARGET_MS else 'MISSED'}")
    print(f"  of which the VM itself (C, p50) {vm:.1f} ms; the rest {overhead - vm:.1f} ms "
          "(network, disks, seed, teardown)")
    steps, previous = {}, [0.0] * runs
    print("where nvmm boot's time goes (B-v, p50 ms; each step from the one before):")
    for label, *_ in BOOT_STEPS + [("exit", None, None)]:
        at = [s["exit"] if label == "exit" else s["steps"][label] for s in samples["B-v"]]
        took = [(t - p) * 1e3 for t, p in zip(at, previous)]
        steps[label] = {"p50": pct(took, 50), "p90": pct(took, 90)}
        print(f"  {label:34}{steps[label]['p50']:8.1f}")
        previous = at
    result["nvmm_boot_steps_ms"] = steps
if "B" in names and "peer" in names:
    result["ratio_b_over_peer"] = {
        m: {p: ms["B"][m][p] / ms["peer"][m][p] for p in ("p50", "p90")}
        for m in ("exit", "guest_line")}
    for m, label in (("exit", "-> exit"), ("guest_line", "-> guest line")):
        r = result["ratio_b_over_peer"][m]
        print(f"ratio B / peer {label}: p50 {r['p50']:.2f}, p90 {r['p90']:.2f}")
if json_path:
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
PY
