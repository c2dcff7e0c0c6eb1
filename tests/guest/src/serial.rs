//! COM1 (a 16550 UART at I/O port 0x3f8), polled, and the `say!` macro that
//! prints one `nvmm-test: ` line. Interrupts stay off for the guest's whole
//! life, so every read and write waits on the line status register.

use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// How often a write polls for room before sending anyway. A missing UART
/// reads as 0xff (always "empty"), but a broken one must not hang the guest.
const WRITE_POLL_LIMIT: u32 = 1_000_000;

/// Every line the guest prints starts with this, so host tests can grep.
pub const LINE_PREFIX: &str = "nvmm-test: ";

/// Puts COM1 into a known state: no interrupts, 8N1, FIFOs on, DTR/RTS up.
/// The baud rate is left alone: virtual UARTs ignore it.
pub fn init() {
    // SAFETY: these writes only configure the COM1 UART, which this guest owns.
    unsafe {
        outb(COM1 + REG_IER, 0x00);
        outb(COM1 + REG_LCR, 0x03);
        outb(COM1 + REG_FCR, 0x07);
        outb(COM1 + REG_MCR, 0x03);
    }
}

/// Sends one byte as is.
pub fn write_byte(byte: u8) {
    for _ in 0..WRITE_POLL_LIMIT {
        // SAFETY: reading COM1's line status has no side effect.
        if unsafe { inb(COM1 + REG_LSR) } & LSR_THR_EMPTY != 0 {
            break;
        }
        spin_loop();
    }
    // SAFETY: writing the transmit register only sends the byte.
    unsafe { outb(COM1 + REG_DATA, byte) };
}

/// Sends bytes without looking at the line status first, as a guest that trusts
/// the FIFO to have room does: no read, so no VM exit of its own.
pub fn write_blind(bytes: &[u8]) {
    for &byte in bytes {
        // SAFETY: writing the transmit register only sends the byte.
        unsafe { outb(COM1 + REG_DATA, byte) };
    }
}

/// Waits for and returns one received byte.
pub fn read_byte() -> u8 {
    // SAFETY: reading COM1's line status has no side effect.
    while unsafe { inb(COM1 + REG_LSR) } & LSR_DATA_READY == 0 {
        spin_loop();
    }
    // SAFETY: reading the receive register only consumes the byte that is ready.
    unsafe { inb(COM1 + REG_DATA) }
}

/// A `fmt::Write` sink on COM1 that turns `\n` into `\r\n`.
pub struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                write_byte(b'\r');
            }
            write_byte(byte);
        }
        Ok(())
    }
}

/// Keeps lines from different CPUs whole.
static LINE_LOCK: AtomicBool = AtomicBool::new(false);

/// Prints `nvmm-test: <args>\r\n` as one line, even with several CPUs printing.
pub fn say(args: fmt::Arguments) {
    while LINE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spin_loop();
    }
    say_unlocked(args);
    LINE_LOCK.store(false, Ordering::Release);
}

/// Prints a line without taking the lock: for the panic handler, which may run
/// while this CPU already holds it.
pub fn say_unlocked(args: fmt::Arguments) {
    // Com1 never fails; there is nowhere to report a formatting error anyway.
    let _ = Com1.write_str(LINE_PREFIX);
    let _ = Com1.write_fmt(args);
    let _ = Com1.write_str("\n");
}

/// Prints one `nvmm-test: ` line, with `format!` syntax.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::serial::say(format_args!($($arg)*))
    };
}

/// Shows bytes that may not be text (the command line): printable ASCII as is,
/// anything else, and `"` and `\\`, as `\xNN`. The output stays one line of
/// plain ASCII that can sit inside double quotes unambiguously.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &byte in self.0 {
            if (byte == b' ' || byte.is_ascii_graphic()) && byte != b'"' && byte != b'\\' {
                f.write_char(char::from(byte))?;
            } else {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}
