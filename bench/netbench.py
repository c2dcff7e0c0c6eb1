"""The test guest's "net_bench" scenario as net.sh and emulated.sh run it: both monitors on the
tap `tap0` (10.77.0.1/24, made by bench_netns in lib.sh), and the host end of its TCP stream.
"""
import socket

from markers import QEMU_DEBUGCON

HOST, PORT, MAC = "10.77.0.1", 5001, "52:54:00:12:34:56"


def cmdline(mib, cpl3, tso=True):
    """With `cpl3`, the guest runs the benchmark at CPL 3 (natively on kvm-pvm: see
    tests/guest/src/ring3.rs). Without `tso`, the guest sends plain frames only (no
    segmentation offload: virtio_net_tso=0)."""
    return (f"nvmm_test=net_bench nvmm_ip=10.77.0.2/24 nvmm_gw={HOST} "
            f"connect={HOST}:{PORT} bench_mib={mib}" + (" nvmm_cpl3=1" if cpl3 else "")
            + ("" if tso else " virtio_net_tso=0"))


def argv(name, nvmm, guest, mib, markers, cpl3, tso=True):
    """The monitor's argv; with `markers`, port-0x80 writes reach the harness (see markers.py),
    and QEMU's serial console is dropped (its stdout carries the markers)."""
    if name == "nvmm":
        return [nvmm, "run"] + (["-v"] if markers else []) + [
            "--kernel", guest, "--mem", "64", "--cmdline", cmdline(mib, cpl3, tso),
            "--tap", f"tap0,mac={MAC}"]
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-m", "64",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", guest,
            "-append", cmdline(mib, cpl3, tso),
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
            # Without ACPI the guest's power-off falls back to an i8042 reset, which ends nvmm;
            # microvm has no i8042, so this device ends QEMU at the same point.
            "-device", "isa-debug-exit,iobase=0x64,iosize=1"] + (
                ["-serial", "null"] + QEMU_DEBUGCON if markers else ["-serial", "stdio"])


def serve(listener, total, errors):
    """Receives `total` bytes and the guest's 'R', then sends `total` bytes; an exception goes
    to `errors` (this runs in a thread; the caller reports it)."""
    try:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got = 0
            while got < total + 1:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise RuntimeError(f"guest closed after {got} bytes")
                got += len(chunk)
            block = bytes(range(256)) * 4096
            sent = 0
            while sent < total:
                sent += conn.send(block[: min(len(block), total - sent)])
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
    except Exception as e:  # reported by the caller
        errors.append(e)
