"""The test guest's "blkbench" scenario as blk.sh and emulated.sh run it: both monitors on one
scratch disk, with the same guest memory.
"""
from markers import QEMU_DEBUGCON

MEM_MIB = 64


def cmdline(mib, ios, cpl3):
    """With `cpl3`, the guest runs the benchmark at CPL 3 (natively on kvm-pvm: see
    tests/guest/src/ring3.rs)."""
    return f"nvmm_test=blkbench bench_mib={mib} bench_ios={ios}" + (" nvmm_cpl3=1" if cpl3 else "")


def argv(name, nvmm, guest, disk, guest_cmdline, markers):
    """The monitor's argv; with `markers`, port-0x80 writes reach the harness (see markers.py),
    and QEMU's serial console is dropped (its stdout carries the markers)."""
    if name == "nvmm":
        return [nvmm, "run"] + (["-v"] if markers else []) + [
            "--kernel", guest, "--mem", str(MEM_MIB), "--cmdline", guest_cmdline, "--disk", disk]
    # With ACPI on, microvm announces virtio-mmio devices only in its DSDT, which the test guest
    # does not read; with acpi=off it appends virtio_mmio.device= to the command line.
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-m", str(MEM_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", guest,
            "-append", guest_cmdline,
            "-drive", f"id=d0,file={disk},format=raw,if=none,cache=writeback",
            "-device", "virtio-blk-device,drive=d0",
            # Without ACPI the guest's power-off falls back to an i8042 reset, which ends nvmm;
            # microvm has no i8042, so this device ends QEMU at the same point.
            "-device", "isa-debug-exit,iobase=0x64,iosize=1"] + (
                ["-serial", "null"] + QEMU_DEBUGCON if markers else ["-serial", "stdio"])
