//! nvmm's clean-shutdown request: Ctrl-Alt-Del pressed on the i8042 keyboard,
//! which arrives as the scancode set 2 make codes of Ctrl, Alt and Del. The
//! guest takes no interrupts, so the long-running scenarios poll for it.

use crate::io::inb;
use crate::time::Deadline;

const DATA_PORT: u16 = 0x60;
const STATUS_PORT: u16 = 0x64;
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Ctrl, Alt, Del (extended: 0xe0 0x71).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// Port reads are VM exits: a few per 10 ms cost nothing, one per loop turn would.
const POLL_INTERVAL_US: u64 = 10_000;

/// Watches the keyboard for Ctrl-Alt-Del.
pub struct CtrlAltDel {
    matched: usize,
    next_poll: Deadline,
}

impl CtrlAltDel {
    pub fn new() -> CtrlAltDel {
        CtrlAltDel {
            matched: 0,
            next_poll: Deadline::after_us(0),
        }
    }

    /// Whether Ctrl-Alt-Del has been pressed; reads the controller at most
    /// every 10 ms.
    pub fn pressed(&mut self) -> bool {
        if !self.next_poll.expired() {
            return false;
        }
        self.next_poll = Deadline::after_us(POLL_INTERVAL_US);
        // SAFETY: reading the i8042's status and data ports has no effect
        // beyond taking the byte the host queued.
        while unsafe { inb(STATUS_PORT) } & STATUS_OUTPUT_FULL != 0 {
            // SAFETY: as above; the status said a byte is there.
            let byte = unsafe { inb(DATA_PORT) };
            self.matched = match byte {
                _ if byte == CTRL_ALT_DEL[self.matched] => self.matched + 1,
                _ if byte == CTRL_ALT_DEL[0] => 1,
                _ => 0,
            };
            if self.matched == CTRL_ALT_DEL.len() {
                return true;
            }
        }
        false
    }
}
