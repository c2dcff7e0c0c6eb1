"""Port-0x80 markers: how the bench harnesses time guest phases the same way for both monitors.

nvmm logs each write to port 0x80 at -v on stderr ("debug port 0x80: 0xNN at ... us"); QEMU
gets an isa-debugcon on port 0x80 whose bytes arrive on a stream. Either way the harness
timestamps a marker when it arrives.
"""
import os
import select
import sys
import time

# QEMU arguments that put port-0x80 writes on stdout.
QEMU_DEBUGCON = ["-device", "isa-debugcon,iobase=0x80,chardev=dbg", "-chardev", "stdio,id=dbg"]


def marker_codes(monitor, data):
    """The marker bytes in `data` (everything read from the marker stream so far), in order."""
    if monitor == "qemu":
        return list(data)
    return [int(line.split("debug port 0x80: ")[1].split()[0], 16)
            for line in data.decode(errors="replace").splitlines() if "debug port 0x80: " in line]


def time_markers(monitor, stream, last, timeout_s, what):
    """Reads `stream` until marker `last` arrives; returns {marker: arrival time}.

    Exits with a message naming `what` if the monitor ends or `timeout_s` passes first."""
    data, seen, when = b"", 0, {}
    deadline = time.monotonic() + timeout_s
    while last not in when:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            sys.exit(f"{what}: no marker {last:#04x} within {timeout_s:.0f} s")
        piece = os.read(stream.fileno(), 65536)
        if not piece:
            tail = data[-2000:].decode(errors="replace")
            sys.exit(f"{what}: the monitor exited before marker {last:#04x}: {tail}")
        now = time.monotonic()
        data += piece
        codes = marker_codes(monitor, data)
        for code in codes[seen:]:
            when.setdefault(code, now)
        seen = len(codes)
    return when
