//! The scenarios, chosen by `nvmm_test=NAME` on the command line. Each one
//! ends with `result=ok` or `result=fail reason=...` and a poweroff, unless its
//! point is to end some other way (README.md lists the exact lines).

use crate::bootinfo::BootInfo;
use crate::io::{halt_forever, outb, phys_bytes};
use crate::keyboard::CtrlAltDel;
use crate::power::{i8042_reset, power_off, triple_fault, try_acpi_poweroff};
use crate::serial::{read_byte, write_byte};
use crate::{blk_scenarios, console_scenarios, hostile, net_scenarios, smp};

/// What a scenario returns: `Err` carries the `reason=` word.
pub type Outcome = Result<(), &'static str>;

/// The scenario when the command line names none.
const DEFAULT_SCENARIO: &[u8] = b"hello";

/// Runs the scenario the command line asks for, reports, and powers off.
pub fn run(boot: &BootInfo) -> ! {
    let name = cmdline_value(boot.cmdline, b"nvmm_test").unwrap_or(DEFAULT_SCENARIO);
    if cmdline_value(boot.cmdline, b"nvmm_cpl3") == Some(b"1") {
        crate::ring3::enter();
        say!("running at CPL {}", crate::ring3::current_level());
    }
    let outcome = match name {
        b"hello" => hello(),
        b"echo" => echo(),
        b"initrd" => initrd(boot),
        b"smp" => smp::run(boot),
        b"poweroff" => poweroff(boot),
        b"reset" => reset(),
        b"port80" => port80(),
        b"halt" => halt(),
        b"serial_late" => serial_late(),
        b"serial_irq_tx" => crate::serial_irq::serial_irq_tx(),
        b"wait" => wait(),
        b"triplefault" => triplefault(),
        b"blk" => blk_scenarios::blk(boot),
        b"blkhash" => blk_scenarios::blkhash(boot),
        b"blkwrite" => blk_scenarios::blkwrite(boot),
        b"blkbench" => blk_scenarios::blkbench(boot),
        b"net_echo" => net_scenarios::net_echo(boot),
        b"net_client" => net_scenarios::net_client(boot),
        b"net_ping" => net_scenarios::net_ping(boot),
        b"net_bench" => net_scenarios::net_bench(boot),
        b"vcon_echo" => console_scenarios::vcon_echo(boot),
        b"vcon_size" => console_scenarios::vcon_size(boot),
        b"vcon_flood" => console_scenarios::vcon_flood(boot),
        b"vcon_rtt" => console_scenarios::vcon_rtt(boot),
        b"hostile" => hostile::hostile(boot),
        b"panic" => panic!("on purpose (nvmm_test=panic)"),
        _ => Err("unknown-scenario"),
    };
    match outcome {
        Ok(()) => say!("result=ok"),
        Err(reason) => say!("result=fail reason={reason}"),
    }
    power_off(boot)
}

/// The value of the first `key=value` word on the command line.
pub fn cmdline_value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline_values(cmdline, key).next()
}

/// The values of every `key=value` word on the command line, in order.
pub fn cmdline_values<'a>(cmdline: &'a [u8], key: &[u8]) -> impl Iterator<Item = &'a [u8]> {
    cmdline
        .split(u8::is_ascii_whitespace)
        .filter_map(move |word| word.strip_prefix(key)?.strip_prefix(b"="))
}

/// A decimal number option, or `default` if absent.
pub fn number_option(
    boot: &BootInfo,
    key: &[u8],
    default: u64,
    bad: &'static str,
) -> Result<u64, &'static str> {
    match cmdline_value(boot.cmdline, key) {
        None => Ok(default),
        Some(text) => parse_decimal(text).ok_or(bad),
    }
}

/// A plain decimal number (digits only, no sign, no overflow).
pub fn parse_decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |value, &b| {
        let digit = char::from(b).to_digit(10)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn hello() -> Outcome {
    say!("hello from the nvmm test guest");
    Ok(())
}

/// Echoes serial input until Ctrl-D, turning a received `\r` into `\r\n`.
fn echo() -> Outcome {
    const END_OF_INPUT: u8 = 0x04;
    say!("echo ready");
    let mut count: u64 = 0;
    let mut at_line_start = true;
    loop {
        let byte = read_byte();
        if byte == END_OF_INPUT {
            break;
        }
        write_byte(byte);
        if byte == b'\r' {
            write_byte(b'\n');
        }
        at_line_start = byte == b'\r' || byte == b'\n';
        count += 1;
    }
    // Keep the next line a line of its own, so that it starts with the prefix.
    if !at_line_start {
        write_byte(b'\r');
        write_byte(b'\n');
    }
    say!("echo done bytes={count}");
    Ok(())
}

/// Checks the initrd against `initrd_sum=<FNV-1a 64, 16 hex digits>`.
fn initrd(boot: &BootInfo) -> Outcome {
    let initrd = boot.initrd.ok_or("no-initrd")?;
    // SAFETY: the initrd is RAM the VMM filled for the guest, outside the
    // guest image; nothing writes it while the guest reads it.
    let bytes = unsafe { phys_bytes(initrd.addr, initrd.size) }.ok_or("initrd-unmapped")?;
    let sum = fnv1a64(bytes);
    say!("initrd size={} fnv1a64={sum:016x}", bytes.len());
    let expected = cmdline_value(boot.cmdline, b"initrd_sum").ok_or("no-initrd-sum")?;
    if parse_hex_u64(expected).ok_or("bad-initrd-sum")? == sum {
        Ok(())
    } else {
        Err("initrd-mismatch")
    }
}

/// FNV-1a 64 of no bytes: where [`fnv1a64_extend`] starts.
pub const FNV1A64_START: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a, the checksum the host computes over the initrd file.
fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_extend(FNV1A64_START, bytes)
}

/// Continues an FNV-1a 64 sum `hash` over `bytes`.
pub fn fnv1a64_extend(hash: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let step = |hash: u64, b: &u8| (hash ^ u64::from(*b)).wrapping_mul(PRIME);
    // Eight bytes per turn, written out: kvm-pvm emulates every instruction,
    // and this halves them (load, xor, multiply per byte; the loop's own
    // count, compare and branch once per eight).
    let mut chunks = bytes.chunks_exact(8);
    let hash = chunks.by_ref().fold(hash, |h, c| {
        let h = step(step(step(step(h, &c[0]), &c[1]), &c[2]), &c[3]);
        step(step(step(step(h, &c[4]), &c[5]), &c[6]), &c[7])
    });
    chunks.remainder().iter().fold(hash, step)
}

/// Exactly 16 lowercase hex digits.
fn parse_hex_u64(digits: &[u8]) -> Option<u64> {
    if digits.len() != 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u64::from(nibble))
    })
}

/// Powers off through ACPI; only returns (as a failure) if that did not work.
fn poweroff(boot: &BootInfo) -> ! {
    say!("poweroff via acpi");
    match try_acpi_poweroff(boot) {
        Ok(()) => say!("result=fail reason=poweroff-returned"),
        Err(reason) => say!("result=fail reason={reason}"),
    }
    // Still end the VM, so the host test does not wait for its timeout.
    i8042_reset();
    halt_forever()
}

fn reset() -> Outcome {
    say!("reset via i8042");
    i8042_reset();
    Err("reset-returned")
}

fn port80() -> Outcome {
    // SAFETY: port 0x80 is the POST code port; writing it has no effect on the guest.
    unsafe { outb(0x80, 0x42) };
    say!("port80 wrote 0x42");
    Ok(())
}

/// Waits for nvmm's shutdown request (Ctrl-Alt-Del), then reports and powers
/// off as every scenario does.
fn wait() -> Outcome {
    say!("waiting for ctrl-alt-del");
    let mut keyboard = CtrlAltDel::new();
    while !keyboard.pressed() {
        crate::time::delay_us(1000);
    }
    say!("ctrl-alt-del: shutting down");
    Ok(())
}

/// A line written long after the guest's last VM exit, without reading the
/// line status, then a halt: nothing the guest does afterwards would make the
/// VMM look at writes it has queued (coalesced) and not yet handed over.
fn serial_late() -> ! {
    say!("serial_late: quiet for 200 ms");
    crate::time::delay_us(200_000);
    crate::serial::write_blind(b"nvmm-test: serial_late: written after the quiet\r\n");
    halt_forever()
}

fn halt() -> ! {
    say!("halting with interrupts off");
    halt_forever()
}

fn triplefault() -> ! {
    say!("triple fault");
    triple_fault()
}
