//! Ending the VM: ACPI soft-off, the i8042 reset line, and a triple fault.

use core::arch::asm;

use crate::acpi::SoftOff;
use crate::bootinfo::BootInfo;
use crate::io::{halt_forever, outb};
use crate::time::delay_us;

/// How long to wait for a poweroff or reset to take effect before reporting
/// that it did not. A VMM stops the vCPU on the very exit, so this is generous.
const SETTLE_US: u64 = 100_000;

const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_PULSE_RESET: u8 = 0xfe;

/// Tries ACPI S5. Returns `Ok` if the sleep registers were written but the
/// machine is still running after a short wait, or the reason it could not try.
pub fn try_acpi_poweroff(boot: &BootInfo) -> Result<(), &'static str> {
    SoftOff::find(boot)?.enter()?;
    delay_us(SETTLE_US);
    Ok(())
}

/// Pulses the reset line through the i8042 keyboard controller, as Linux's
/// `reboot=k` does. Returns only if the machine is still running shortly after.
pub fn i8042_reset() {
    // SAFETY: this write asks the keyboard controller to reset the machine,
    // which is what the caller wants.
    unsafe { outb(I8042_COMMAND_PORT, I8042_PULSE_RESET) };
    delay_us(SETTLE_US);
}

/// The end of every scenario: ACPI poweroff; failing that, an i8042 reset;
/// failing that, halt with interrupts off so the VMM at least sees an idle vCPU.
pub fn power_off(boot: &BootInfo) -> ! {
    match try_acpi_poweroff(boot) {
        Ok(()) => say!("acpi poweroff returned, falling back to i8042 reset"),
        Err(_) => say!("no acpi poweroff, falling back to i8042 reset"),
    }
    i8042_reset();
    halt_forever()
}

/// Resets the CPU the hard way: with an empty IDT, the `ud2` exception cannot
/// be delivered, nor can the double fault that follows, so the CPU shuts down
/// (a triple fault). A VMM sees a shutdown exit.
pub fn triple_fault() -> ! {
    // The IDT register image: limit 0 (no gates at all), base 0.
    let empty_idt = [0u8; 10];
    // SAFETY: deliberately ends this CPU; nothing runs after the `ud2`.
    unsafe {
        asm!(
            "lidt [{idtr}]",
            "ud2",
            idtr = in(reg) empty_idt.as_ptr(),
            options(noreturn, nostack)
        )
    }
}
