//! A minimal i8042 keyboard controller: enough for Linux to probe it without errors, and the
//! CPU reset line (command 0xFE on port 0x64) that `reboot=k` uses to end the VM.
//!
//! One key combination is ever pressed: Ctrl-Alt-Del, nvmm's request for a clean shutdown
//! (as Firecracker's SendCtrlAltDel; Linux hands it to init, which NixOS under nvmm turns
//! into a power-off). Otherwise the keyboard only answers the commands a driver sends while
//! probing (self-tests, the command byte, keyboard reset/identify).

use std::collections::VecDeque;

use crate::EventFdTrigger;
use crate::bus::BusDevice;

/// Data port.
pub const DATA_PORT: u64 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND_PORT: u64 = 0x64;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
const STATUS_KEYBOARD_UNLOCKED: u8 = 1 << 4;

const CONTROL_KEYBOARD_INTERRUPT: u8 = 1 << 0;
const CONTROL_SYSTEM_FLAG: u8 = 1 << 2;
const CONTROL_KEYBOARD_DISABLED: u8 = 1 << 4;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KEYBOARD_BUFFER: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_ECHO: u8 = 0xee;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
const AUX_ABSENT: u8 = 0xff;

/// Ctrl, Alt, Del pressed, in scancode set 2 (the controller does not translate: the control
/// byte leaves XLATE clear, as Linux's atkbd then expects).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// A guest can queue replies faster than it reads them; beyond this they are dropped.
const OUTPUT_CAPACITY: usize = 16;

/// The i8042 controller; insert it on the PIO bus at ports 0x60 and 0x64
/// (one port each; port 0x61 in between belongs to the in-kernel PIT's speaker).
#[derive(Debug)]
pub struct I8042 {
    reset: EventFdTrigger,
    keyboard_irq: EventFdTrigger,
    control: u8,
    status: u8,
    output: VecDeque<u8>,
    pending_command: Option<u8>,
}

impl I8042 {
    /// A controller that signals `reset` on command 0xFE and raises `keyboard_irq` (IRQ 1)
    /// when a reply is ready and the guest enabled keyboard interrupts.
    pub fn new(reset: EventFdTrigger, keyboard_irq: EventFdTrigger) -> Self {
        Self {
            reset,
            keyboard_irq,
            control: CONTROL_KEYBOARD_INTERRUPT | CONTROL_SYSTEM_FLAG,
            status: STATUS_KEYBOARD_UNLOCKED,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            pending_command: None,
        }
    }

    /// Presses Ctrl-Alt-Del: the guest's keyboard driver gets the three make codes.
    pub fn press_ctrl_alt_del(&mut self) {
        for byte in CTRL_ALT_DEL {
            self.push_output(byte);
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_CAPACITY {
            return;
        }
        self.output.push_back(byte);
        self.status |= STATUS_OUTPUT_FULL;
        self.raise_interrupt();
    }

    fn raise_interrupt(&self) {
        if self.control & CONTROL_KEYBOARD_INTERRUPT != 0 {
            if let Err(err) = self.keyboard_irq.trigger() {
                log::warn!("i8042 cannot raise IRQ 1: {err}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if self.output.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        } else {
            // The next byte is ready: a driver reads one byte per interrupt (Linux's does).
            self.raise_interrupt();
        }
        byte
    }

    fn read_status(&self) -> u8 {
        let system = if self.control & CONTROL_SYSTEM_FLAG != 0 {
            STATUS_SYSTEM_FLAG
        } else {
            0
        };
        self.status | system
    }

    fn write_command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        self.pending_command = None;
        match command {
            CMD_READ_CONTROL => self.push_output(self.control),
            CMD_WRITE_CONTROL | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KEYBOARD_BUFFER => {
                self.pending_command = Some(command)
            }
            CMD_SELF_TEST => self.push_output(SELF_TEST_PASSED),
            CMD_TEST_KEYBOARD => self.push_output(INTERFACE_TEST_PASSED),
            CMD_TEST_AUX => self.push_output(AUX_ABSENT),
            CMD_DISABLE_KEYBOARD => self.control |= CONTROL_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.control &= !CONTROL_KEYBOARD_DISABLED,
            CMD_RESET_CPU => {
                log::info!("guest requested reset through the i8042");
                if let Err(err) = self.reset.trigger() {
                    log::error!("cannot signal the guest's reset request: {err}");
                }
            }
            other => log::debug!("i8042 command {other:#04x} ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONTROL) => self.control = value,
            Some(CMD_WRITE_KEYBOARD_BUFFER) => self.push_output(value),
            Some(_) => {} // Output port: the reset line is driven by 0xFE only.
            None => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, command: u8) {
        match command {
            KBD_ECHO => self.push_output(KBD_ECHO),
            KBD_RESET => {
                self.push_output(KBD_ACK);
                self.push_output(KBD_SELF_TEST_PASSED);
            }
            KBD_IDENTIFY => {
                // An MF2 keyboard.
                self.push_output(KBD_ACK);
                self.push_output(0xab);
                self.push_output(0x83);
            }
            _ => self.push_output(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match base + offset {
            DATA_PORT => self.read_data(),
            COMMAND_PORT => self.read_status(),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base + offset {
            DATA_PORT => self.write_data(value),
            COMMAND_PORT => self.write_command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn controller() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
        );
        (dev, reset, irq)
    }

    fn inb(dev: &mut I8042, port: u64) -> u8 {
        let mut data = [0u8];
        dev.read(port, 0, &mut data);
        data[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut dev, reset, _irq) = controller();
        dev.write(COMMAND_PORT, 0, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_control_byte_round_trip() {
        let (mut dev, reset, irq) = controller();
        dev.write(COMMAND_PORT, 0, &[CMD_SELF_TEST]);
        assert_ne!(inb(&mut dev, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(inb(&mut dev, DATA_PORT), SELF_TEST_PASSED);
        assert_eq!(inb(&mut dev, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(irq.read().unwrap(), 1);

        dev.write(COMMAND_PORT, 0, &[CMD_WRITE_CONTROL]);
        dev.write(DATA_PORT, 0, &[0x45]);
        dev.write(COMMAND_PORT, 0, &[CMD_READ_CONTROL]);
        assert_eq!(inb(&mut dev, DATA_PORT), 0x45);
        assert!(reset.read().is_err());
    }

    #[test]
    fn keyboard_reset_is_acknowledged() {
        let (mut dev, _reset, _irq) = controller();
        dev.write(DATA_PORT, 0, &[KBD_RESET]);
        assert_eq!(inb(&mut dev, DATA_PORT), KBD_ACK);
        assert_eq!(inb(&mut dev, DATA_PORT), KBD_SELF_TEST_PASSED);
        assert_eq!(inb(&mut dev, DATA_PORT), 0);
    }

    #[test]
    fn interrupts_follow_the_control_byte() {
        let (mut dev, _reset, irq) = controller();
        dev.write(COMMAND_PORT, 0, &[CMD_WRITE_CONTROL]);
        dev.write(DATA_PORT, 0, &[0]);
        dev.write(DATA_PORT, 0, &[KBD_ECHO]);
        assert!(irq.read().is_err());
        assert_eq!(inb(&mut dev, DATA_PORT), KBD_ECHO);
    }

    #[test]
    fn ctrl_alt_del_arrives_one_interrupt_per_byte() {
        let (mut dev, _, irq) = controller();
        dev.press_ctrl_alt_del();
        let mut received = Vec::new();
        while inb(&mut dev, COMMAND_PORT) & STATUS_OUTPUT_FULL != 0 {
            assert!(
                irq.read().is_ok(),
                "no interrupt for byte {}",
                received.len()
            );
            received.push(inb(&mut dev, DATA_PORT));
        }
        assert_eq!(received, CTRL_ALT_DEL);
        assert!(irq.read().is_err(), "an interrupt with nothing to read");
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut dev, _reset, _irq) = controller();
        for _ in 0..1000 {
            dev.write(DATA_PORT, 0, &[KBD_IDENTIFY]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
        dev.write(COMMAND_PORT, 0, &[]);
        let mut wide = [0u8; 4];
        dev.read(COMMAND_PORT, 0, &mut wide);
    }
}
