//! virtio-console with one port and `VIRTIO_CONSOLE_F_SIZE`: the host terminal's size is in
//! config space and a config interrupt tells the guest when it changes, so `stty size` in the
//! guest follows the host window (a serial console cannot do that).
//!
//! Output (transmitq) goes to the same writer as the serial console. Input is accepted only as
//! far as [`InputSink::room`] allows: a small staging buffer that drains into the guest's
//! receive buffers, so typed bytes wait for the guest instead of being lost.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, InterruptKind, IrqTrigger, LogOnce, VirtioDevice, checked_queues,
    read_config_bytes,
};
use crate::InputSink;

/// `VIRTIO_CONSOLE_F_SIZE`.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Queue size for both queues.
pub const QUEUE_SIZE: u16 = 64;
/// Input staged for the guest at most; beyond it the terminal is not read.
pub const INPUT_STAGING: usize = 4096;
/// Guest output is copied in pieces of at most this many bytes, whatever a descriptor's length.
const TX_CHUNK: usize = 64 * 1024;
const RX: usize = 0;
const TX: usize = 1;

mod trouble {
    pub const TX_MALFORMED: u32 = 0;
    pub const OUTPUT: u32 = 1;
    pub const QUEUE: u32 = 2;
    pub const BROKEN_QUEUE: u32 = 3;
}

enum DeviceState {
    Inactive,
    Activated(ActiveState),
}

struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqTrigger>,
    rx: Queue,
    tx: Queue,
}

/// A virtio console.
pub struct Console {
    cols: u16,
    rows: u16,
    queue_events: [EventFd; 2],
    state: DeviceState,
    output: Box<dyn Write + Send>,
    staged: VecDeque<u8>,
    /// Guest output is copied through this buffer of [`TX_CHUNK`] bytes, allocated once.
    tx_buf: Vec<u8>,
    room: EventFd,
    trouble: LogOnce,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("cols", &self.cols)
            .field("rows", &self.rows)
            .field("staged", &self.staged.len())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing guest output to `output`, signalling `room` when staged input drained
    /// into the guest (so a paused input reader can resume).
    pub fn new(
        output: Box<dyn Write + Send>,
        room: EventFd,
        cols: u16,
        rows: u16,
    ) -> std::io::Result<Self> {
        Ok(Self {
            cols,
            rows,
            queue_events: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            state: DeviceState::Inactive,
            output,
            staged: VecDeque::with_capacity(INPUT_STAGING),
            tx_buf: vec![0; TX_CHUNK],
            room,
            trouble: LogOnce::default(),
        })
    }

    /// The host terminal changed size: update config space and tell the guest.
    pub fn set_size(&mut self, cols: u16, rows: u16) {
        if (cols, rows) == (self.cols, self.rows) {
            return;
        }
        self.cols = cols;
        self.rows = rows;
        if let DeviceState::Activated(state) = &self.state {
            state.interrupt.trigger(InterruptKind::Config);
        }
    }

    /// Current size as the guest sees it.
    pub fn size(&self) -> (u16, u16) {
        (self.cols, self.rows)
    }

    fn warn_once(&mut self, kind: u32, what: std::fmt::Arguments<'_>) {
        if self.trouble.first(kind) {
            log::warn!("virtio-console: {what} (further such events are not logged)");
        }
    }

    /// Moves staged input into the guest's receive buffers.
    pub fn process_rx(&mut self) {
        let DeviceState::Activated(state) = &mut self.state else {
            return;
        };
        let mem = state.mem.clone();
        let before = self.staged.len();
        let mut used_any = false;
        while !self.staged.is_empty() {
            let Ok(Some(chain)) = super::pop_chain(&mut state.rx, &mem) else {
                // Ask to be told when the guest posts buffers again.
                match super::more_available(&mut state.rx, &mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.filter(|d| d.is_write_only()) {
                let n = (desc.len() as usize).min(self.staged.len());
                let (front, back) = self.staged.as_slices();
                let bytes: Vec<u8> = front.iter().chain(back).take(n).copied().collect();
                if mem.write_slice(&bytes, desc.addr()).is_err() {
                    break;
                }
                self.staged.drain(..n);
                written += n as u32;
                if self.staged.is_empty() {
                    break;
                }
            }
            used_any |= super::add_used(&mut state.rx, &mem, head, written).is_ok();
        }
        if used_any && state.rx.needs_notification(&mem).unwrap_or(true) {
            state.interrupt.trigger(InterruptKind::Queue);
        }
        if self.staged.len() < before {
            // Only fails if the counter would overflow, and then it is already signalled.
            let _ = self.room.write(1);
        }
    }

    /// Writes everything the guest queued to the output.
    pub fn process_tx(&mut self) {
        let DeviceState::Activated(state) = &mut self.state else {
            return;
        };
        let mem = state.mem.clone();
        let mut used_any = false;
        let mut malformed = false;
        let mut output_failed = None;
        let mut broken = None;
        loop {
            if state.tx.disable_notification(&mem).is_err() {
                break;
            }
            while let Ok(Some(chain)) = super::pop_chain(&mut state.tx, &mem) {
                let head = chain.head_index();
                'descriptors: for desc in chain {
                    let len = desc.len() as usize;
                    if desc.is_write_only() || !mem.check_range(desc.addr(), len) {
                        malformed = true;
                        break;
                    }
                    // In pieces of at most TX_CHUNK bytes: a descriptor may be 4 GiB long.
                    let mut copied = 0;
                    while copied < len {
                        let n = (len - copied).min(TX_CHUNK);
                        let buf = &mut self.tx_buf[..n];
                        let read = desc
                            .addr()
                            .checked_add(copied as u64)
                            .is_some_and(|addr| mem.read_slice(buf, addr).is_ok());
                        if !read {
                            malformed = true;
                            break 'descriptors;
                        }
                        if let Err(err) = self.output.write_all(buf) {
                            output_failed = Some(err);
                        }
                        copied += n;
                    }
                }
                used_any |= super::add_used(&mut state.tx, &mem, head, 0).is_ok();
            }
            match super::more_available(&mut state.tx, &mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    broken = Some(err);
                    break;
                }
            }
        }
        if used_any && state.tx.needs_notification(&mem).unwrap_or(true) {
            state.interrupt.trigger(InterruptKind::Queue);
        }
        if malformed {
            self.warn_once(
                trouble::TX_MALFORMED,
                format_args!("malformed transmit chain dropped"),
            );
        }
        if let Some(err) = output_failed {
            self.warn_once(trouble::OUTPUT, format_args!("console output lost: {err}"));
        }
        if let Some(err) = broken {
            self.warn_once(
                trouble::BROKEN_QUEUE,
                format_args!("transmit queue is broken: {err}"),
            );
        }
    }
}

impl InputSink for Console {
    fn room(&self) -> usize {
        INPUT_STAGING - self.staged.len()
    }

    fn push(&mut self, input: &[u8]) -> usize {
        let n = input.len().min(self.room());
        self.staged.extend(&input[..n]);
        self.process_rx();
        n
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_CONSOLE_F_SIZE
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[0..2].copy_from_slice(&self.cols.to_le_bytes());
        config[2..4].copy_from_slice(&self.rows.to_le_bytes());
        config[4..8].copy_from_slice(&1u32.to_le_bytes()); // max_nr_ports
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is only writable with VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        _features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = checked_queues(queues, &mem)?;
        self.state = DeviceState::Activated(ActiveState {
            mem,
            interrupt,
            rx,
            tx,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Activated(_))
    }
}

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

impl MutEventSubscriber for Console {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RX_QUEUE => {
                let _ = self.queue_events[RX].read();
                self.process_rx();
            }
            TX_QUEUE => {
                let _ = self.queue_events[TX].read();
                self.process_tx();
            }
            other => log::warn!("virtio-console: unexpected event data {other}"),
        }
        if !self.is_activated() {
            self.warn_once(
                trouble::QUEUE,
                format_args!("notification before activation ignored"),
            );
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, data) in [(RX, RX_QUEUE), (TX, TX_QUEUE)] {
            if let Err(err) = ops.add(Events::with_data(
                &self.queue_events[index],
                data,
                EventSet::IN,
            )) {
                log::error!("virtio-console: cannot watch queue {index}: {err:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
