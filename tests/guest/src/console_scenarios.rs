//! The console scenarios: `vcon_echo` (an echo through the virtio console),
//! `vcon_size` (the console size and its changes), `vcon_flood` (bulk output
//! for the throughput benchmark, virtio console or 8250) and `vcon_rtt`
//! (keystroke round trips, virtio console or 8250). README.md lists their
//! exact lines and command-line options.
//!
//! Scenario lines always go to the serial port; only the echo, the flood and
//! `vcon: ready` go through the virtio console.

use core::hint::spin_loop;

use crate::bootinfo::BootInfo;
use crate::console::{ConsoleDevice, RX_BUFFER_LEN, TxLayout};
use crate::dma::Arena;
use crate::io::{outb, rdtsc};
use crate::mem::zeroed;
use crate::scenarios::{Outcome, cmdline_value, number_option};
use crate::serial::{read_byte, write_byte};
use crate::time::{Deadline, delay_us, us_since};
use crate::virtio_mmio::{DEVICE_ID_CONSOLE, Devices, Options, discover};

/// Ends `vcon_echo` (Ctrl-D), as it ends the serial `echo`.
const END_OF_INPUT: u8 = 0x04;

/// Transmit slots for the echoes: a slot holds the echo of a whole receive
/// buffer even if every byte is a `\r` (echoed as two).
pub const ECHO_TX: TxLayout = TxLayout {
    slots: 16,
    slot_len: 2 * RX_BUFFER_LEN,
};

/// How long `vcon_size` waits for each change.
const SIZE_TIMEOUT_US: u64 = 60_000_000;
/// How often it looks at InterruptStatus (each look is an exit to the VMM).
const SIZE_POLL_US: u64 = 1_000;
const DEFAULT_SIZE_CHANGES: u64 = 1;

/// The flood text: line `k` (from 0) is 79 characters, character `c` being
/// `0x21 + (k + c) % 94` (printable ASCII without the space, rotated one
/// place per line), then `\r\n`. It repeats every 94 lines.
const LINE_TEXT: usize = 79;
const LINE_LEN: usize = LINE_TEXT + 2;
const CHARSET: usize = 94;
/// Bytes after which the flood text repeats: one transmit slot, so that every
/// slot holds the same bytes and is filled once, before the flood.
const FLOOD_PERIOD: usize = CHARSET * LINE_LEN;
/// Transmit slots of the flood, all in flight at once if the queue allows.
const FLOOD_TX: TxLayout = TxLayout {
    slots: 16,
    slot_len: FLOOD_PERIOD,
};
const DEFAULT_FLOOD_KIB: u64 = 1024;
/// Every line's text is a slice of this: line `k` starts at `k % 94`.
static CYCLE: [u8; CHARSET + LINE_TEXT] = {
    let mut table = [0; CHARSET + LINE_TEXT];
    let mut i = 0;
    while i < table.len() {
        table[i] = 0x21 + (i % CHARSET) as u8;
        i += 1;
    }
    table
};

/// The 79 characters of flood line `k`.
fn flood_line(k: usize) -> &'static [u8] {
    &CYCLE[k % CHARSET..][..LINE_TEXT]
}

/// Writes the flood text from its start into `buf`, cut off at its end.
fn fill_flood(buf: &mut [u8]) {
    for (k, line) in buf.chunks_mut(LINE_LEN).enumerate() {
        let text = line.len().min(LINE_TEXT);
        line[..text].copy_from_slice(&flood_line(k)[..text]);
        for (byte, &end) in line[text..].iter_mut().zip(b"\r\n") {
            *byte = end;
        }
    }
}

/// Writes a marker to port 0x80 for the host to time.
fn post(code: u8) {
    // SAFETY: port 0x80 is the POST code port; writing it has no effect on the guest.
    unsafe { outb(0x80, code) };
}

/// Where a scenario's console traffic goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Virtio,
    Serial,
}

/// `key=virtio` (the default) or `key=serial`.
fn target_option(boot: &BootInfo, key: &[u8], bad: &'static str) -> Result<Target, &'static str> {
    match cmdline_value(boot.cmdline, key) {
        None | Some(b"virtio") => Ok(Target::Virtio),
        Some(b"serial") => Ok(Target::Serial),
        Some(_) => Err(bad),
    }
}

/// Brings up every console device, printing a line for each, and returns
/// the first.
fn bring_up(boot: &BootInfo, layout: TxLayout) -> Result<ConsoleDevice, &'static str> {
    let options = Options::from_cmdline(boot.cmdline)?;
    let mut arena = Arena::claim(boot)?;
    let mut devices = discover(boot.cmdline)?;
    bring_up_with(&mut arena, &mut devices, options, layout)
}

/// [`bring_up`] with the arena and devices of a scenario that has them already.
pub fn bring_up_with(
    arena: &mut Arena,
    devices: &mut Devices,
    options: Options,
    layout: TxLayout,
) -> Result<ConsoleDevice, &'static str> {
    let mut first = None;
    for found in devices.take_all(DEVICE_ID_CONSOLE) {
        let index = found.index;
        let dev = ConsoleDevice::init(index, found.transport, arena, options, layout)
            .inspect_err(|reason| say!("virtio dev={index} failed reason={reason}"))?;
        let (cols, rows) = dev.size().unwrap_or((0, 0));
        say!(
            "console dev={index} features=0x{:x} size={} cols={cols} rows={rows}",
            dev.features(),
            u8::from(dev.has_size())
        );
        // The others stay up, buffers posted, but unused.
        first.get_or_insert(dev);
    }
    first.ok_or("no-console-device")
}

// ---- vcon_echo ----

/// Echoes what the virtio console receives back to it (`\r` as `\r\n`)
/// until Ctrl-D.
pub fn vcon_echo(boot: &BootInfo) -> Outcome {
    let mut dev = bring_up(boot, ECHO_TX)?;
    say!("vcon_echo ready");
    dev.write(b"vcon: ready\r\n")?;
    let count = echo_until_eot(&mut dev)?;
    say!("vcon_echo done bytes={count}");
    Ok(())
}

/// Echoes what `dev` receives back to it (`\r` as `\r\n`) until Ctrl-D, and
/// waits until every echo has left the guest. Returns the bytes echoed, not
/// counting the Ctrl-D (a `\r` counts 1).
pub fn echo_until_eot(dev: &mut ConsoleDevice) -> Result<u64, &'static str> {
    let mut input: [u8; RX_BUFFER_LEN] = zeroed();
    let mut output: [u8; 2 * RX_BUFFER_LEN] = zeroed();
    let mut count: u64 = 0;
    loop {
        let got = dev.read(&mut input)?;
        if got == 0 {
            spin_loop();
            continue;
        }
        let mut len = 0;
        let mut finished = false;
        for &byte in &input[..got] {
            if byte == END_OF_INPUT {
                finished = true;
                break;
            }
            output[len] = byte;
            len += 1;
            if byte == b'\r' {
                output[len] = b'\n';
                len += 1;
            }
            count += 1;
        }
        // Waits for a free slot if the host has not taken the last echoes
        // yet; meanwhile no receive buffer is reposted, which holds the host's
        // input back.
        dev.write(&output[..len])?;
        if finished {
            break;
        }
    }
    // Everything echoed has left the guest before the line that ends it.
    dev.drain_tx()?;
    Ok(count)
}

// ---- vcon_size ----

/// Prints the console size, then each size after a config-change interrupt,
/// `size_changes=N` times.
pub fn vcon_size(boot: &BootInfo) -> Outcome {
    let changes = number_option(
        boot,
        b"size_changes",
        DEFAULT_SIZE_CHANGES,
        "bad-size-changes",
    )?;
    if changes == 0 {
        return Err("bad-size-changes");
    }
    let dev = bring_up(boot, ECHO_TX)?;
    if !dev.has_size() {
        return Err("no-console-size");
    }
    // A change already signalled is covered by the size read after it; one
    // that comes after the acknowledgement raises the bit again.
    dev.take_config_change();
    let Some((cols, rows)) = dev.size() else {
        return Err("no-console-size");
    };
    say!("vcon_size cols={cols} rows={rows}");
    for _ in 0..changes {
        let deadline = Deadline::after_us(SIZE_TIMEOUT_US);
        while !dev.take_config_change() {
            if deadline.expired() {
                return Err("no-size-change");
            }
            delay_us(SIZE_POLL_US);
        }
        let Some((cols, rows)) = dev.size() else {
            return Err("no-console-size");
        };
        say!("vcon_size changed cols={cols} rows={rows}");
    }
    Ok(())
}

// ---- vcon_flood ----

/// Writes `flood_kib=N` KiB of text to the virtio console (or, with
/// `flood_target=serial`, to COM1) as fast as it can, between port 0x80
/// markers.
pub fn vcon_flood(boot: &BootInfo) -> Outcome {
    let kib = number_option(boot, b"flood_kib", DEFAULT_FLOOD_KIB, "bad-flood-kib")?;
    let total = kib
        .checked_mul(1024)
        .filter(|&total| total > 0)
        .ok_or("bad-flood-kib")?;
    match target_option(boot, b"flood_target", "bad-flood-target")? {
        Target::Virtio => flood_virtio(boot, total),
        Target::Serial => {
            flood_serial(total);
            Ok(())
        }
    }
}

fn flood_virtio(boot: &BootInfo, total: u64) -> Outcome {
    let mut dev = bring_up(boot, FLOOD_TX)?;
    // Every slot is one period of the text, so every slot holds the same
    // bytes: filled once here, sent as they are (no copying in the flood).
    debug_assert_eq!(dev.tx_slot_len(), FLOOD_PERIOD);
    dev.prefill_tx(fill_flood);
    let start = rdtsc();
    post(0x40);
    let mut left = total;
    while left > 0 {
        let len = left.min(FLOOD_PERIOD as u64);
        dev.send_prefilled(len as usize)?;
        left -= len;
    }
    dev.drain_tx()?;
    post(0x41);
    let guest_us = us_since(start);
    let stats = dev.stats();
    say!(
        "vcon_flood target=virtio dev={} bytes={} buffers={} notifications={} guest_us={guest_us}",
        dev.index(),
        stats.tx_bytes,
        stats.tx_buffers,
        stats.notifications
    );
    Ok(())
}

fn flood_serial(total: u64) {
    let start = rdtsc();
    post(0x42);
    let mut left = total;
    let mut k = 0;
    while left > 0 {
        let line = flood_line(k).iter().chain(b"\r\n");
        let len = left.min(LINE_LEN as u64);
        for &byte in line.take(len as usize) {
            write_byte(byte);
        }
        left -= len;
        k += 1;
    }
    post(0x43);
    let guest_us = us_since(start);
    // Keep the next line a line of its own, so that it starts with the prefix.
    if !total.is_multiple_of(LINE_LEN as u64) {
        write_byte(b'\r');
        write_byte(b'\n');
    }
    say!("vcon_flood target=serial bytes={total} guest_us={guest_us}");
}

// ---- vcon_rtt ----

/// Echoes every byte at once, as it is (no `\r\n`), through the virtio
/// console (or, with `rtt_target=serial`, COM1), until the host kills the VM.
pub fn vcon_rtt(boot: &BootInfo) -> Outcome {
    match target_option(boot, b"rtt_target", "bad-rtt-target")? {
        Target::Virtio => {
            let mut dev = bring_up(boot, ECHO_TX)?;
            say!("vcon_rtt ready");
            let mut input: [u8; RX_BUFFER_LEN] = zeroed();
            loop {
                let got = dev.read(&mut input)?;
                if got == 0 {
                    spin_loop();
                } else {
                    dev.write(&input[..got])?;
                }
            }
        }
        Target::Serial => {
            say!("vcon_rtt ready");
            loop {
                write_byte(read_byte());
            }
        }
    }
}
