"""Aggregates one bench/run: the scripts' JSON files into one document and one Markdown table.

Called by bench/run with the work directory, which holds for each benchmark NAME:
NAME.json (the script's --json output, absent if it failed), NAME.args (its argv, one per
line), NAME.status ("rc start end limit"), NAME.out and NAME.err; and loadavg.before.
Writes OUT/STAMP.json and OUT/STAMP.md, and prints the Markdown.

`bench/report.py --render FILE.json` prints the Markdown of a stored result again, its rows
recomputed from the scripts' figures it holds (after a change to the rows here).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return default


def command_output(argv, cwd=None):
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def kvm_flavour():
    """Which module is behind /dev/kvm: kvm-pvm emulates what hardware KVM runs natively."""
    for module, label in (("kvm_pvm", "kvm-pvm (software KVM, no VMX/SVM)"),
                          ("kvm_intel", "kvm-intel (VMX)"), ("kvm_amd", "kvm-amd (SVM)")):
        if os.path.isdir(f"/sys/module/{module}"):
            return label
    return "unknown"


def host_facts(work):
    cpu = re.search(r"^model name\s*:\s*(.*)$", read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", read("/proc/meminfo"), re.M)
    return {
        "kernel": platform.release(),
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "cores": os.cpu_count(),
        "mem_total_mib": int(mem.group(1)) // 1024 if mem else None,
        "kvm": kvm_flavour(),
        "kvm_pvm": os.path.isdir("/sys/module/kvm_pvm"),
        "loadavg_before": read(os.path.join(work, "loadavg.before")).strip(),
        "loadavg_after": " ".join(read("/proc/loadavg").split()[:3]),
    }


def versions(nvmm, guest):
    # The revision of the work tree that holds the binary (its target directory), if any.
    repo = os.path.dirname(nvmm)
    rev = command_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo)
    if rev and command_output(["git", "status", "--porcelain", "--untracked-files=no"],
                              cwd=repo):
        rev += "-dirty"
    return {
        "nvmm": command_output([nvmm, "--version"]),
        "nvmm_binary": nvmm,
        "nvmm_git_revision": rev,
        "test_guest": guest,
        "qemu": (command_output(["qemu-system-x86_64", "--version"]).splitlines() or [""])[0],
        "nix": command_output(["nix", "--version"]),
        "python": platform.python_version(),
    }


def benchmark(work, name):
    """One script's record: status, argv, duration, its JSON, or why it failed."""
    rc, start, end, limit = read(os.path.join(work, f"{name}.status"), "1 0 0 0").split()
    record = {"argv": read(os.path.join(work, f"{name}.args")).splitlines(),
              "duration_s": round(float(end) - float(start), 1), "limit_s": int(limit),
              "exit_status": int(rc)}
    data = read(os.path.join(work, f"{name}.json"))
    reason = {"0": None if data else "exited 0 but wrote no JSON",
              "124": f"ran past its {limit} s limit",
              "137": f"killed after its {limit} s limit"}.get(rc, f"exit status {rc}")
    if reason is None:
        try:
            record["result"] = json.loads(data)
        except ValueError as e:
            reason = f"its JSON does not parse: {e}"
    if reason is None:
        record["status"] = "ok"
    else:
        record.update(status="failed", reason=reason,
                      stderr_tail=read(os.path.join(work, f"{name}.err"))[-3000:])
    return record


def row(bench, key, label, unit, nvmm=None, qemu=None, host=None, checks=(), ratio_host=None):
    """One figure. checks: (target text, test of (nvmm, nvmm/QEMU, nvmm/host)) pairs.
    ratio_host: nvmm/host where the benchmark pairs its runs, else the ratio of the figures."""
    ratio = nvmm / qemu if nvmm is not None and qemu else None
    if ratio_host is None:
        ratio_host = nvmm / host if nvmm is not None and host else None
    missed = [text for text, test in checks if not test(nvmm, ratio, ratio_host)]
    status = "" if not checks else f"missed ({', '.join(missed)})" if missed else "met"
    return {"benchmark": bench, "key": key, "figure": label, "unit": unit, "nvmm": nvmm,
            "qemu": qemu, "ratio_nvmm_over_qemu": ratio, "host": host,
            "ratio_nvmm_over_host": ratio_host,
            "target": ", ".join(text for text, _ in checks), "status": status}


def boot_rows(r):
    m = r["monitors"]
    return [
        row("boot", "spawn_to_marker_p50", "spawn → first guest marker, p50", "ms",
            m["nvmm"]["spawn_to_marker_ms"]["p50"], m["qemu"]["spawn_to_marker_ms"]["p50"],
            checks=[("≤ 0.25× QEMU", lambda n, q, h: q <= 0.25)]),
        row("boot", "spawn_to_marker_p90", "spawn → first guest marker, p90", "ms",
            m["nvmm"]["spawn_to_marker_ms"]["p90"], m["qemu"]["spawn_to_marker_ms"]["p90"]),
        row("boot", "rss_overhead_p50", "VMM RSS overhead (beyond guest RAM), p50", "MiB",
            m["nvmm"]["rss_overhead_mib"]["p50"], m["qemu"]["rss_overhead_mib"]["p50"],
            checks=[("≤ 3 MiB", lambda n, q, h: n <= 3)]),
    ]


def blk_rows(r):
    med = r["median"]
    labels = [("seq_read", "seq read MiB/s", "virtio-blk sequential read", "MiB/s"),
              ("seq_write", "seq write MiB/s", "virtio-blk sequential write", "MiB/s"),
              ("rand_read", "4K rand read IOPS", "virtio-blk 4 KiB random read", "IOPS")]
    return [row("blk", key, label, unit, med["nvmm"][k], med["qemu"][k], med["host"][k],
                [("≥ 1.0× QEMU", lambda n, q, h: q >= 1.0),
                 ("≥ 0.8× host", lambda n, q, h: h >= 0.8)],
                ratio_host=r["ratio_nvmm_over_host"][k])
            for key, k, label, unit in labels]


def net_rows(r):
    med = r["median"]
    return [row("net", key, label, "MiB/s", med["nvmm"][k], med["qemu"][k], med["host"][k],
                [("≥ 1.0× QEMU", lambda n, q, h: q >= 1.0)])
            for key, k, label in (
                ("guest_to_host", "guest->host MiB/s", "virtio-net TCP guest → host"),
                ("host_to_guest", "host->guest MiB/s", "virtio-net TCP host → guest"))]


def console_rows(r):
    med = r["median"]
    return [
        row("console", "virtio_mbps", "virtio console output", "MB/s",
            med["nvmm"]["virtio"]["mbps"], med["qemu"]["virtio"]["mbps"]),
        row("console", "serial_mbps", "serial (8250) console output", "MB/s",
            med["nvmm"]["serial"]["mbps"], med["qemu"]["serial"]["mbps"]),
        row("console", "virtio_rtt_p50", "virtio console keystroke round trip, p50", "ms",
            med["nvmm"]["virtio"]["rtt_p50"], med["qemu"]["virtio"]["rtt_p50"]),
    ]


def up16_rows(r):
    fig, count = r["figures"], r["count"]
    at = f"{count} VMs at once → all at marker"
    return [
        row("up16", "up_all_at_marker", f"{at}: `nvmm up`", "ms",
            fig["up"]["all_markers"]["p50"], fig["qemu"]["all_markers"]["p50"],
            checks=[("≤ 0.5× QEMU", lambda n, q, h: q <= 0.5)]),
        row("up16", "run_all_at_marker", f"{at}: {count} × `nvmm run` (VMM alone)", "ms",
            fig["run"]["all_markers"]["p50"], fig["qemu"]["all_markers"]["p50"],
            checks=[("≤ 0.5× QEMU", lambda n, q, h: q <= 0.5)]),
        row("up16", "up_pss", f"{count} VMs: Pss summed over the VMM processes (`nvmm up`)",
            "MiB", fig["up"]["pss_mib"]["p50"], fig["qemu"]["pss_mib"]["p50"]),
    ]


def nix_boot_rows(r):
    ms = r["ms"]
    return [row("nix-boot", "boot_overhead", "`nvmm boot` beyond `nix build`, p50", "ms",
                ms["B"]["exit"]["p50"] - ms["A"]["exit"]["p50"],
                ms["peer"]["exit"]["p50"] - ms["A"]["exit"]["p50"],
                checks=[(f"≤ {r['target_overhead_ms']:.0f} ms",
                         lambda n, q, h: n <= r["target_overhead_ms"])]),
            row("nix-boot", "boot_to_guest_line",
                "`nvmm boot` → guest's first line, nix included, p50", "ms",
                ms["B"]["guest_line"]["p50"], ms["peer"]["guest_line"]["p50"])]


def emulated_rows(r):
    per = r["per_unit"]
    what = {"boot": "boot → power-off", "rand_read": "per 4 KiB random read",
            "seq_mib": "per MiB sequential, read + written",
            "net_mib": "per MiB TCP, sent + received"}
    rows = [row("emulated", f"emulated_{key}", f"guest instructions KVM emulated, {what[key]}",
                "instr.", per[key]["emulated"]["nvmm"], per[key]["emulated"]["qemu"])
            for key in ("boot", "rand_read", "seq_mib", "net_mib")]
    rows += [row("emulated", f"exits_{key}", f"exits to the monitor, {what[key]}", "exits",
                 per[key]["exits"]["nvmm"], per[key]["exits"]["qemu"])
             for key in ("boot", "seq_mib", "net_mib")]
    return rows


ROWS = {"boot": boot_rows, "blk": blk_rows, "net": net_rows, "console": console_rows,
        "up16": up16_rows, "nix-boot": nix_boot_rows, "emulated": emulated_rows}


def fmt(v, ratio=False):
    if v is None:
        return "—"
    if ratio:
        return f"{v:#.3g}×"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:#.3g}"


def markdown(doc):
    h, v = doc["host"], doc["versions"]
    lines = [
        f"## bench/run {doc['mode']}, {doc['date']}",
        "",
        f"- host: {h['cpu']}, {h['cores']} cores, {h['mem_total_mib']} MiB; Linux {h['kernel']};"
        f" KVM: {h['kvm']}; load average before {h['loadavg_before']}, after "
        f"{h['loadavg_after']}",
        f"- nvmm {v['nvmm_git_revision'] or '(no git revision)'} ({v['nvmm']}); "
        f"{v['qemu']}; {v['nix']}",
        f"- took {doc['duration_s']:.0f} s; each benchmark's runs and sizes are in the JSON "
        "(`benchmarks.NAME.argv`)",
        "",
        "| figure | unit | nvmm | QEMU | nvmm/QEMU | host | nvmm/host | target | |",
        "|---|---|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in doc["figures"]:
        lines.append(
            f"| {r['figure']} | {r['unit']} | {fmt(r['nvmm'])} | {fmt(r['qemu'])} | "
            f"{fmt(r['ratio_nvmm_over_qemu'], True)} | {fmt(r['host'])} | "
            f"{fmt(r['ratio_nvmm_over_host'], True)} | {r['target']} | {r['status']} |")
    for name, b in doc["benchmarks"].items():
        if b["status"] == "failed":
            lines.append(f"| {name}: **failed** ({b['reason']}) | | | | | | | | failed |")
    missed = [r for r in doc["figures"] if r["status"].startswith("missed")]
    lines += ["", "Missed targets:" + ("" if missed else " none.")]
    for r in missed:
        figures = f"nvmm {fmt(r['nvmm'])} {r['unit']}"
        if r["qemu"] is not None:
            figures += f", {fmt(r['ratio_nvmm_over_qemu'], True)} QEMU"
        if r["host"] is not None:
            figures += f", {fmt(r['ratio_nvmm_over_host'], True)} host"
        lines.append(f"- {r['figure']}: {figures}; target {r['target']}")
    for name, b in doc["benchmarks"].items():
        if b["status"] == "failed":
            tail = "\n".join(b["stderr_tail"].rstrip().splitlines()[-15:])
            lines += ["", f"bench/{name}.sh failed ({b['reason']}); end of its stderr:", "",
                      "```", tail, "```"]
    return "\n".join(lines) + "\n"


def figure_rows(benches, work=None):
    """The table's rows from each benchmark's figures; a benchmark whose JSON lacks one fails."""
    figures = []
    for name, b in benches.items():
        if b["status"] != "ok":
            continue
        try:
            figures += ROWS[name](b["result"])
        except (KeyError, TypeError, ZeroDivisionError) as e:
            b.update(status="failed", reason=f"its JSON lacks a figure: {e!r}",
                     stderr_tail=read(os.path.join(work, f"{name}.err"))[-3000:] if work else "")
    return figures


def summarise(doc):
    doc["figures"] = figure_rows(doc["benchmarks"], doc.pop("_work", None))
    doc["targets_missed"] = [f"{r['benchmark']}.{r['key']}" for r in doc["figures"]
                             if r["status"].startswith("missed")]
    doc["failed"] = [name for name, b in doc["benchmarks"].items() if b["status"] == "failed"]
    return doc


def main():
    if sys.argv[1:2] == ["--render"]:
        with open(sys.argv[2]) as f:
            doc = json.load(f)
        print(markdown(summarise(doc)), end="")
        return 0
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--started", type=float, required=True)
    p.add_argument("--stamp", required=True)
    p.add_argument("--nvmm", required=True)
    p.add_argument("--guest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--names", nargs="+", required=True)
    a = p.parse_args()

    doc = summarise({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(a.started)),
        "mode": a.mode,
        "duration_s": round(time.time() - a.started, 1),
        "host": host_facts(a.dir),
        "versions": versions(a.nvmm, a.guest),
        "benchmarks": {name: benchmark(a.dir, name) for name in a.names},
        "_work": a.dir,
    })
    text = markdown(doc)
    base = os.path.join(a.out, a.stamp)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(text)
    print()
    print(text, end="")
    print(f"\nwritten: {base}.json, {base}.md")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
