//! Going on at CPL 3 (`nvmm_cpl3=1` on the command line), for the benchmarks.
//!
//! kvm-pvm, the development machines' software KVM, runs this guest's CPL 0
//! code through KVM's instruction emulator, one instruction at a time (about
//! 0.7 us each), and its CPL 3 code natively: three million instructions of a
//! loop take about 1 ms at CPL 3, where at CPL 0 they would take about two
//! seconds. A benchmark whose driver loops run at CPL 3 measures the monitor's
//! device paths there, as hardware KVM (which runs both natively) would,
//! rather than the emulator.
//!
//! The switch is one way: an `iretq` to the CPL 3 code segment on the same
//! stack, with IOPL 3 so that port I/O (COM1, the POST port, ACPI power-off,
//! the i8042) and `cli` still work. Pages are all user-accessible (entry.rs).
//! What needs CPL 0 afterwards (`hlt`, `lidt`, MSRs, control registers)
//! faults, and with no IDT that is a triple fault: a scenario that halts, or a
//! power-off that fails and ends in `halt_forever`, ends the VM that way.

use core::arch::asm;

use crate::entry::{GDT_USER_CODE64, GDT_USER_DATA};

/// RFLAGS.IOPL = 3: port I/O allowed at CPL 3.
const RFLAGS_IOPL3: u64 = 3 << 12;
/// The requested privilege level in a selector.
const RPL3: u16 = 3;

/// Returns at CPL 3.
pub fn enter() {
    // SAFETY: the frame returns to the next instruction with this stack, flat
    // segments of the same base and limit, and the same flags but IOPL; the
    // identity map lets CPL 3 reach every page this guest uses. Data segment
    // registers become null, which long mode ignores for ordinary accesses.
    unsafe {
        asm!(
            "mov {sp}, rsp",
            "push {ss}",
            "push {sp}",
            "pushfq",
            "or qword ptr [rsp], {iopl}",
            "push {cs}",
            "lea {sp}, [rip + 2f]",
            "push {sp}",
            "iretq",
            "2:",
            sp = out(reg) _,
            ss = const GDT_USER_DATA | RPL3,
            cs = const GDT_USER_CODE64 | RPL3,
            iopl = const RFLAGS_IOPL3,
        );
    }
}

/// The current privilege level (the low bits of CS).
pub fn current_level() -> u16 {
    let cs: u16;
    // SAFETY: reads CS, which any privilege level may.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}
