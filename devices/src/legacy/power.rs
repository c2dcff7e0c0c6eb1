//! ACPI hardware-reduced power management: the FADT's sleep control, sleep status and reset
//! registers, as three I/O ports. A guest `poweroff` writes S5 to the sleep control register;
//! a guest reboot through ACPI writes [`RESET_VALUE`] to the reset register.

use crate::EventFdTrigger;
use crate::bus::BusDevice;

/// `SLP_EN` in the hardware-reduced sleep control register (ACPI 6.5, 4.8.3.7).
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// The sleep type nvmm's DSDT gives `\_S5_`; the guest writes `(S5 << 2) | SLP_EN`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// What the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

/// The three registers; they occupy ports `base..base + 3`.
#[derive(Debug)]
pub struct AcpiPowerRegisters {
    poweroff: EventFdTrigger,
    reset: EventFdTrigger,
}

impl AcpiPowerRegisters {
    /// Number of I/O ports used.
    pub const LEN: u64 = 3;
    /// Offset of the sleep control register.
    pub const SLEEP_CONTROL_OFFSET: u64 = SLEEP_CONTROL;
    /// Offset of the sleep status register.
    pub const SLEEP_STATUS_OFFSET: u64 = SLEEP_STATUS;
    /// Offset of the reset register.
    pub const RESET_OFFSET: u64 = RESET;

    /// Registers that signal `poweroff` on S5 and `reset` on a reset write.
    pub fn new(poweroff: EventFdTrigger, reset: EventFdTrigger) -> Self {
        Self { poweroff, reset }
    }
}

impl BusDevice for AcpiPowerRegisters {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status reads 0 (no wake event); the others are write-only.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let result = match offset {
            SLEEP_CONTROL if value & SLEEP_ENABLE != 0 => {
                let sleep_type = (value >> 2) & 0b111;
                if sleep_type == S5_SLEEP_TYPE {
                    log::info!("guest requested ACPI S5 (power off)");
                    self.poweroff.trigger()
                } else {
                    log::warn!("guest requested unsupported sleep type {sleep_type}; ignored");
                    Ok(())
                }
            }
            RESET if value == RESET_VALUE => {
                log::info!("guest requested reset through the ACPI reset register");
                self.reset.trigger()
            }
            _ => Ok(()),
        };
        if let Err(err) = result {
            log::error!("cannot signal a guest power request: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn registers() -> (AcpiPowerRegisters, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let regs = AcpiPowerRegisters::new(
            EventFdTrigger::new(off.try_clone().unwrap()),
            EventFdTrigger::new(reset.try_clone().unwrap()),
        );
        (regs, off, reset)
    }

    #[test]
    fn s5_powers_off() {
        let (mut regs, off, reset) = registers();
        regs.write(0, SLEEP_CONTROL, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err(), "no reset expected");
    }

    #[test]
    fn other_sleep_states_and_values_are_ignored() {
        let (mut regs, off, reset) = registers();
        regs.write(0, SLEEP_CONTROL, &[(3 << 2) | SLEEP_ENABLE]);
        regs.write(0, SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]);
        regs.write(0, RESET, &[0x42]);
        regs.write(0, SLEEP_STATUS, &[0xff]);
        regs.write(0, RESET, &[]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
    }

    #[test]
    fn reset_register_resets() {
        let (mut regs, _off, reset) = registers();
        regs.write(0, RESET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
