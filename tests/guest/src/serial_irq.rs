//! Interrupt-driven UART output, the way Linux's 8250 driver sends a tty's
//! output: enable the transmitter-empty interrupt, then write up to a FIFO's
//! worth (16 bytes) each time it fires, waiting for it with `sti; hlt`. The
//! handler reads IIR (which acknowledges the interrupt) before the burst is
//! written; nothing is read between a burst and the next interrupt, so a VMM that
//! queues the writes (KVM's coalesced I/O) must hand them over on its own.
//!
//! The interrupt comes through the 8259 PIC (IRQ 4 at vector 0x24) to LINT0,
//! which the VMM sets to ExtINT; the IOAPIC keeps its reset state (masked).
//! Only this scenario enables interrupts, and only while it waits.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::entry::GDT_CODE64;
use crate::io::outb;
use crate::scenarios::Outcome;
use crate::serial::write_blind;

const PIC1_COMMAND: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_COMMAND: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
/// The PIC's vectors start here, clear of the CPU's exceptions.
const PIC1_VECTOR_BASE: u8 = 0x20;
const UART_IRQ: u8 = 4;
const UART_VECTOR: usize = PIC1_VECTOR_BASE as usize + UART_IRQ as usize;
/// A spurious interrupt from the PIC arrives as its lowest-priority line, 7.
const SPURIOUS_VECTOR: usize = PIC1_VECTOR_BASE as usize + 7;

const COM1_IER: u16 = 0x3f9;
const IER_TRANSMIT_EMPTY: u8 = 0x02;
/// The 16550's transmit FIFO.
const BURST: usize = 16;
const LINES: usize = 60;

/// Transmitter-empty interrupts taken so far.
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

global_asm!(
    ".globl nvmm_uart_interrupt",
    "nvmm_uart_interrupt:",
    "lock inc dword ptr [rip + {count}]",
    "push rax",
    "push rdx",
    // Read IIR, as Linux's handler does first: that acknowledges the
    // transmitter-empty interrupt, so the next write can raise it again.
    "mov dx, 0x3fa",
    "in al, dx",
    // Non-specific end of interrupt to the master PIC.
    "mov al, 0x20",
    "out 0x20, al",
    "pop rdx",
    "pop rax",
    "iretq",
    ".globl nvmm_spurious_interrupt",
    "nvmm_spurious_interrupt:",
    "iretq",
    count = sym INTERRUPTS,
);

unsafe extern "C" {
    fn nvmm_uart_interrupt();
    fn nvmm_spurious_interrupt();
}

/// 256 16-byte long-mode gates; all absent but the two this scenario sets.
#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);

// SAFETY: written once, by the boot CPU, before interrupts are enabled; the
// other CPUs (if any) never load it.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

/// A present, ring-0, 64-bit interrupt gate to `handler`.
fn gate(handler: usize) -> [u64; 2] {
    let handler = handler as u64;
    let low = (handler & 0xffff)
        | (u64::from(GDT_CODE64) << 16)
        | (0x8e << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

fn load_idt() {
    // SAFETY: nothing else touches the table; interrupts are still off.
    let table = unsafe { &mut *IDT.0.get() };
    table[UART_VECTOR] = gate(nvmm_uart_interrupt as *const () as usize);
    table[SPURIOUS_VECTOR] = gate(nvmm_spurious_interrupt as *const () as usize);
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    pointer[2..].copy_from_slice(&(table.as_ptr() as u64).to_le_bytes());
    // SAFETY: the table is static and its gates point at handlers that return
    // with iretq; interrupts stay off until the scenario waits.
    unsafe { asm!("lidt [{}]", in(reg) pointer.as_ptr(), options(nostack)) };
}

/// The PICs remapped to vectors 0x20 and 0x28, every line masked but COM1's.
fn program_pic() {
    let writes = [
        (PIC1_COMMAND, 0x11), // ICW1: edge triggered, cascade, ICW4 follows
        (PIC2_COMMAND, 0x11),
        (PIC1_DATA, PIC1_VECTOR_BASE), // ICW2: vector base
        (PIC2_DATA, PIC1_VECTOR_BASE + 8),
        (PIC1_DATA, 0x04), // ICW3: the slave is on line 2
        (PIC2_DATA, 0x02),
        (PIC1_DATA, 0x01), // ICW4: 8086 mode
        (PIC2_DATA, 0x01),
        (PIC1_DATA, !(1 << UART_IRQ)),
        (PIC2_DATA, 0xff),
    ];
    for (port, value) in writes {
        // SAFETY: programs the PICs, which only this scenario uses.
        unsafe { outb(port, value) };
    }
}

/// Waits until more than `seen` interrupts were taken.
fn wait_for_interrupt(seen: u32) {
    while INTERRUPTS.load(Ordering::Acquire) == seen {
        // SAFETY: `sti` holds interrupts off for one more instruction, so one
        // cannot land between the check and the halt; the handler only counts.
        unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    }
}

/// Sends LINES lines in FIFO-sized bursts, one burst per interrupt.
pub fn serial_irq_tx() -> Outcome {
    load_idt();
    program_pic();
    say!("serial_irq_tx: sending {LINES} lines by interrupt");
    let mut text = [0u8; 64 * LINES];
    let mut len = 0;
    for line in 0..LINES {
        let digits = [b'0' + (line / 10) as u8, b'0' + (line % 10) as u8];
        let parts: [&[u8]; 3] = [
            b"nvmm-test: serial_irq_tx line ",
            &digits,
            b" abcdefghijklmnopqrstuvwxyz\r\n",
        ];
        for part in parts {
            text[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
    }
    let mut seen = INTERRUPTS.load(Ordering::Acquire);
    // SAFETY: enabling the UART's transmit interrupt: the UART raises it at
    // once, its transmitter being empty.
    unsafe { outb(COM1_IER, IER_TRANSMIT_EMPTY) };
    for burst in text[..len].chunks(BURST) {
        wait_for_interrupt(seen);
        seen = INTERRUPTS.load(Ordering::Acquire);
        write_blind(burst);
    }
    wait_for_interrupt(seen);
    // SAFETY: transmit interrupt off again; the guest polls from here on.
    unsafe { outb(COM1_IER, 0) };
    say!(
        "serial_irq_tx: done bytes={len} interrupts={}",
        INTERRUPTS.load(Ordering::Acquire)
    );
    Ok(())
}
