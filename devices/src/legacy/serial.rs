//! The 8250/16550 UART at COM1, backed by vm-superio, writing to the host console.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::EventFdTrigger;
use crate::bus::BusDevice;

/// Where guest serial output goes (stdout in the CLI, a buffer in tests).
pub type SerialWriter = Box<dyn Write + Send>;

/// Tells the event loop when the guest drained the receive FIFO, so stdin polling (paused while
/// the FIFO was full) can resume without busy-looping on a readable stdin.
#[derive(Debug)]
struct FifoRoomEvents {
    room: EventFd,
    lost_byte_logged: AtomicBool,
}

impl SerialEvents for FifoRoomEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        if !self.lost_byte_logged.swap(true, Ordering::Relaxed) {
            log::warn!("serial output could not be written; further losses are not logged");
        }
    }
    fn in_buffer_empty(&self) {
        if let Err(err) = self.room.write(1) {
            log::warn!("cannot signal serial FIFO room: {err}");
        }
    }
}

/// Line control register: bit 7 switches registers 0 and 1 to the divisor latch.
const LCR: u8 = 3;
const LCR_DIVISOR_LATCH: u8 = 0x80;
/// Interrupt enable register: bit 1 enables the transmitter-empty interrupt.
const IER: u8 = 1;
const IER_TRANSMIT_EMPTY: u8 = 0x02;

/// COM1: an 8-register UART whose interrupt line is an irqfd.
pub struct SerialPort {
    uart: Serial<EventFdTrigger, FifoRoomEvents, SerialWriter>,
    divisor_latch: bool,
    /// The guest enabled the transmitter-empty interrupt: it may be waiting for its output to
    /// be taken (the VMM replays coalesced writes on a timer meanwhile).
    transmit_interrupt: Arc<AtomicBool>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    /// A UART raising `interrupt`, writing to `out`, and signalling `fifo_room` whenever the
    /// guest empties its receive FIFO.
    pub fn new(interrupt: EventFdTrigger, fifo_room: EventFd, out: SerialWriter) -> Self {
        let events = FifoRoomEvents {
            room: fifo_room,
            lost_byte_logged: AtomicBool::new(false),
        };
        Self {
            uart: Serial::with_events(interrupt, events, out),
            divisor_latch: false,
            transmit_interrupt: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True while the guest has the transmitter-empty interrupt enabled.
    pub fn transmit_interrupt(&self) -> Arc<AtomicBool> {
        self.transmit_interrupt.clone()
    }

    /// Free space in the receive FIFO.
    pub fn fifo_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit (never more than
    /// [`Self::fifo_room`]).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let fits = &input[..input.len().min(self.fifo_room())];
        if fits.is_empty() {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(fits) {
            Ok(queued) => queued,
            Err(err) => {
                log::warn!("serial input dropped: {err:?}");
                0
            }
        }
    }
}

impl crate::InputSink for SerialPort {
    fn room(&self) -> usize {
        self.fifo_room()
    }

    fn push(&mut self, input: &[u8]) -> usize {
        self.enqueue_input(input)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            match reg {
                LCR => self.divisor_latch = value & LCR_DIVISOR_LATCH != 0,
                IER if !self.divisor_latch => self
                    .transmit_interrupt
                    .store(value & IER_TRANSMIT_EMPTY != 0, Ordering::Release),
                _ => {}
            }
            if let Err(err) = self.uart.write(reg, value) {
                log::debug!("serial write to register {reg}: {err:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn port() -> (SerialPort, SharedBuf, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let port = SerialPort::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            room.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (port, out, irq, room)
    }

    #[test]
    fn guest_writes_reach_the_host() {
        let (mut port, out, _irq, _room) = port();
        for b in b"hi" {
            port.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_respects_fifo_room_and_signals_when_drained() {
        let (mut port, _out, _irq, room) = port();
        let capacity = port.fifo_room();
        let input = vec![b'a'; capacity + 10];
        assert_eq!(port.enqueue_input(&input), capacity);
        assert_eq!(port.fifo_room(), 0);
        assert_eq!(port.enqueue_input(b"more"), 0);
        let mut byte = [0u8];
        for _ in 0..capacity {
            port.read(0x3f8, 0, &mut byte);
            assert_eq!(byte, [b'a']);
        }
        assert_eq!(room.read().unwrap(), 1);
        assert_eq!(port.fifo_room(), capacity);
    }

    #[test]
    fn the_transmit_interrupt_enable_is_followed_but_not_through_the_divisor_latch() {
        let (mut port, _out, _irq, _room) = port();
        let enabled = port.transmit_interrupt();
        port.write(0x3f8, 1, &[0x02]);
        assert!(enabled.load(Ordering::Acquire));
        // DLAB set: register 1 is the divisor's high byte.
        port.write(0x3f8, 3, &[0x83]);
        port.write(0x3f8, 1, &[0x00]);
        assert!(enabled.load(Ordering::Acquire));
        port.write(0x3f8, 3, &[0x03]);
        port.write(0x3f8, 1, &[0x01]);
        assert!(!enabled.load(Ordering::Acquire));
    }

    #[test]
    fn odd_offsets_and_sizes_do_not_panic() {
        let (mut port, _out, _irq, _room) = port();
        let mut wide = [0u8; 8];
        port.read(0x3f8, 0x1_0000, &mut wide);
        port.read(0x3f8, 5, &mut []);
        port.write(0x3f8, 0x1_0000, &[1]);
        port.write(0x3f8, 1, &[]);
    }
}
