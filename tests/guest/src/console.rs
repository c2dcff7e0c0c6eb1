//! A polled virtio-console driver (virtio 1.x, section 5.3) on one
//! virtio-mmio device.
//!
//! One port and no MULTIPORT, so there is no control queue: queue 0 is port
//! 0's receiveq (device to guest) and queue 1 its transmitq. Features
//! accepted when offered: SIZE, and the transport's VERSION_1, EVENT_IDX and
//! INDIRECT_DESC (accepted so that the device's side of the negotiation is
//! tested; every buffer goes out as one direct descriptor all the same).
//! MULTIPORT and EMERG_WRITE are never accepted.
//!
//! **Receive**: up to [`RX_BUFFERS`] device-writable buffers of
//! [`RX_BUFFER_LEN`] bytes stay posted. [`ConsoleDevice::read`] copies bytes
//! out of the used buffers in order and gives each buffer back to the device
//! as soon as it has been read to the end. The device can only deliver input
//! while a buffer is posted, so a guest that reads slowly holds the host back
//! rather than losing bytes.
//!
//! **Transmit**: a fixed set of slots whose size and number the scenario
//! chooses (small ones for an echo, large ones for a flood). Each write fills
//! free slots, one device-readable descriptor each, and waits for the device
//! to give one back when none is free.
//!
//! The device is notified after every change to a queue when it asked to be
//! ([`Virtqueue::needs_notification`]): with EVENT_IDX that is once it has
//! caught up, so a burst of buffers costs few notifications.
//!
//! **Size**: `cols` and `rows` (valid with SIZE) are read as 16-bit fields
//! between two reads of ConfigGeneration, and again after a config-change
//! interrupt, which the guest notices by polling InterruptStatus (it takes no
//! interrupts).

use core::hint::spin_loop;
use core::iter::once;

use crate::dma::{Arena, DmaBuf};
use crate::mem::zeroed;
use crate::time::Deadline;
use crate::virtio_mmio::{F_EVENT_IDX, F_INDIRECT_DESC, INTERRUPT_CONFIG, Options, Transport};
use crate::virtqueue::{Buf, Virtqueue};

/// Device feature bit: `cols` and `rows` in the configuration are valid.
pub const F_SIZE: u64 = 1 << 0;

// Configuration space (struct virtio_console_config): cols, rows,
// max_nr_ports, emerg_wr. Only the first two are read.
const CFG_COLS: u64 = 0;
const CFG_ROWS: u64 = 2;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// Bytes per receive buffer: small, as keystrokes come a few at a time.
pub const RX_BUFFER_LEN: usize = 256;
/// Receive buffers kept posted (fewer if the queue is smaller).
const RX_BUFFERS: usize = 8;
/// Most transmit slots, whatever the scenario asks for.
pub const MAX_TX_SLOTS: usize = 32;

/// How long a write waits for the device to give a transmit slot back
/// before it gives up.
const TX_TIMEOUT_US: u64 = 10_000_000;

/// The transmit slots a scenario wants: how many, and how large each is.
#[derive(Clone, Copy)]
pub struct TxLayout {
    pub slots: usize,
    pub slot_len: usize,
}

/// A used receive buffer that has not been read to the end yet.
#[derive(Clone, Copy)]
struct Pending {
    slot: u16,
    /// Bytes the device wrote into it.
    len: usize,
    /// Bytes already read out of it.
    read: usize,
}

/// Counters for the end-of-scenario line.
#[derive(Clone, Copy, Default)]
pub struct Stats {
    /// Buffers handed to the transmit queue.
    pub tx_buffers: u64,
    /// Bytes in them.
    pub tx_bytes: u64,
    /// QueueNotify writes, both queues.
    pub notifications: u64,
}

/// One initialised virtio-console device.
pub struct ConsoleDevice {
    index: usize,
    transport: Transport,
    features: u64,
    rx: Virtqueue,
    /// Receive buffer `n` is `rx_buffers[n * RX_BUFFER_LEN..][..RX_BUFFER_LEN]`;
    /// its token is `n`.
    rx_buffers: DmaBuf,
    pending: Option<Pending>,
    tx: Virtqueue,
    /// Transmit slot `n` is `tx_slots[n * tx_slot_len..][..tx_slot_len]`;
    /// its token is `n`.
    tx_slots: DmaBuf,
    tx_slot_len: usize,
    tx_count: usize,
    /// Free slot numbers, `tx_free[..tx_free_count]`.
    tx_free: [u16; MAX_TX_SLOTS],
    tx_free_count: usize,
    stats: Stats,
}

impl ConsoleDevice {
    /// Brings up the console device behind `transport` (virtio device number
    /// `index`): features, both queues, DRIVER_OK, receive buffers posted.
    pub fn init(
        index: usize,
        transport: Transport,
        arena: &mut Arena,
        options: Options,
        layout: TxLayout,
    ) -> Result<ConsoleDevice, &'static str> {
        let mut wanted = F_SIZE;
        if options.event_idx {
            wanted |= F_EVENT_IDX;
        }
        if options.indirect {
            wanted |= F_INDIRECT_DESC;
        }
        let features = transport.negotiate(wanted)?;
        let event_idx = features & F_EVENT_IDX != 0;
        let rx = transport.new_queue(RX_QUEUE, options, event_idx)?;
        let tx = transport.new_queue(TX_QUEUE, options, event_idx)?;

        let rx_count = usize::from(rx.size()).min(RX_BUFFERS);
        let tx_count = usize::from(tx.size()).min(layout.slots).min(MAX_TX_SLOTS);
        assert!(tx_count > 0 && layout.slot_len > 0 && layout.slot_len <= u32::MAX as usize);
        let rx_buffers = arena.alloc(rx_count * RX_BUFFER_LEN, 64)?;
        let tx_slots = arena.alloc(tx_count * layout.slot_len, 4096)?;
        transport.driver_ok()?;

        let mut dev = ConsoleDevice {
            index,
            transport,
            features,
            rx,
            rx_buffers,
            pending: None,
            tx,
            tx_slots,
            tx_slot_len: layout.slot_len,
            tx_count,
            tx_free: zeroed(),
            tx_free_count: tx_count,
            stats: Stats::default(),
        };
        for slot in 0..tx_count {
            dev.tx_free[slot] = slot as u16;
        }
        for slot in 0..rx_count {
            dev.post_rx(slot as u16);
        }
        dev.kick();
        Ok(dev)
    }

    /// The virtio device number (`dev=N`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Negotiated features (transport and device bits).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether SIZE was negotiated.
    pub fn has_size(&self) -> bool {
        self.features & F_SIZE != 0
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Bytes per transmit slot.
    pub fn tx_slot_len(&self) -> usize {
        self.tx_slot_len
    }

    /// `(cols, rows)`, if SIZE was negotiated: read between two reads of
    /// ConfigGeneration, again until both give the same value, so the two
    /// fields come from the same configuration.
    pub fn size(&self) -> Option<(u16, u16)> {
        if !self.has_size() {
            return None;
        }
        loop {
            let generation = self.transport.config_generation();
            let cols = self.transport.config16(CFG_COLS);
            let rows = self.transport.config16(CFG_ROWS);
            if self.transport.config_generation() == generation {
                return Some((cols, rows));
            }
        }
    }

    /// Whether the device raised a config-change interrupt since the last
    /// call: reads InterruptStatus and acknowledges what it shows.
    pub fn take_config_change(&self) -> bool {
        self.transport.take_interrupt_status() & INTERRUPT_CONFIG != 0
    }

    /// Copies received bytes into `out`, as many as have arrived (at most
    /// `out.len()`), without waiting. Returns how many; 0 if none. Buffers
    /// read to the end go back to the device.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, &'static str> {
        let mut done = 0;
        let mut reposted = false;
        while done < out.len() {
            let mut pending = match self.pending.take() {
                Some(pending) => pending,
                None => {
                    let Some(used) = self.rx.pop_used()? else {
                        break;
                    };
                    let len = used.len as usize;
                    if len > RX_BUFFER_LEN {
                        return Err("rx-used-len-too-long");
                    }
                    Pending {
                        slot: used.token,
                        len,
                        read: 0,
                    }
                }
            };
            let count = (pending.len - pending.read).min(out.len() - done);
            let src = self.rx_addr(pending.slot) + pending.read as u64;
            // SAFETY: the device has returned this buffer and gets it back
            // only through `post_rx` below; `read..read + count` lies inside
            // its `len` bytes, which the check above keeps inside the buffer.
            unsafe {
                core::ptr::copy_nonoverlapping(src as *const u8, out[done..].as_mut_ptr(), count);
            }
            done += count;
            pending.read += count;
            if pending.read == pending.len {
                self.post_rx(pending.slot);
                reposted = true;
            } else {
                self.pending = Some(pending);
            }
        }
        if reposted {
            // The device may be holding input back for want of buffers.
            self.kick();
        }
        Ok(done)
    }

    /// Sends `bytes`, in as many transmit slots as they need, waiting for
    /// free slots as necessary. Returns once every byte is in the queue.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        for piece in bytes.chunks(self.tx_slot_len) {
            let slot = self.free_tx_slot()?;
            let dest = self.tx_addr(slot);
            // SAFETY: the slot is free (the device does not read it until it
            // is sent below), and the piece is at most a slot long.
            unsafe {
                core::ptr::copy_nonoverlapping(piece.as_ptr(), dest as *mut u8, piece.len());
            }
            self.send_slot(slot, piece.len());
        }
        Ok(())
    }

    /// Writes the same contents into every transmit slot, once, for
    /// [`send_prefilled`](Self::send_prefilled). Call before anything is sent.
    ///
    /// # Panics
    /// If a slot is in flight.
    pub fn prefill_tx(&mut self, fill: impl Fn(&mut [u8])) {
        assert_eq!(
            self.tx_free_count, self.tx_count,
            "transmit slots in flight"
        );
        for slot in 0..self.tx_count {
            let addr = self.tx_addr(slot as u16);
            // SAFETY: every slot is free, so the device reads none of them;
            // the slot lies inside `tx_slots`, which only the transmit queue
            // uses.
            let bytes =
                unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, self.tx_slot_len) };
            fill(bytes);
        }
    }

    /// Sends the first `len` bytes of a free slot as [`prefill_tx`] left
    /// them, waiting for a free slot if necessary.
    ///
    /// [`prefill_tx`]: Self::prefill_tx
    pub fn send_prefilled(&mut self, len: usize) -> Result<(), &'static str> {
        assert!(len <= self.tx_slot_len);
        let slot = self.free_tx_slot()?;
        self.send_slot(slot, len);
        Ok(())
    }

    /// Waits until the device has given back every transmit slot: all that
    /// was written has left the guest.
    pub fn drain_tx(&mut self) -> Result<(), &'static str> {
        let mut deadline = Deadline::after_us(TX_TIMEOUT_US);
        while self.tx_free_count < self.tx_count {
            let before = self.tx_free_count;
            self.reclaim_tx()?;
            if self.tx_free_count != before {
                deadline = Deadline::after_us(TX_TIMEOUT_US);
            } else if deadline.expired() {
                return Err("vcon-tx-timeout");
            } else {
                spin_loop();
            }
        }
        Ok(())
    }

    /// A free transmit slot, waiting (up to [`TX_TIMEOUT_US`]) for the
    /// device to give one back if none is.
    fn free_tx_slot(&mut self) -> Result<u16, &'static str> {
        self.reclaim_tx()?;
        if self.tx_free_count == 0 {
            let deadline = Deadline::after_us(TX_TIMEOUT_US);
            while self.tx_free_count == 0 {
                if deadline.expired() {
                    return Err("vcon-tx-timeout");
                }
                spin_loop();
                self.reclaim_tx()?;
            }
        }
        self.tx_free_count -= 1;
        Ok(self.tx_free[self.tx_free_count])
    }

    /// Hands the first `len` bytes of transmit slot `slot` to the device.
    fn send_slot(&mut self, slot: u16, len: usize) {
        let buf = Buf {
            addr: self.tx_addr(slot),
            len: len as u32,
            device_writes: false,
        };
        // SAFETY: the slot is the device's until its token comes back in
        // `reclaim_tx`, and the guest does not touch it meanwhile; there is
        // a descriptor for every slot (the count is at most the queue size),
        // so the queue has room.
        let added = unsafe { self.tx.add(once(buf), 1, slot) };
        debug_assert!(added.is_ok(), "transmit queue full");
        self.stats.tx_buffers += 1;
        self.stats.tx_bytes += len as u64;
        self.kick();
    }

    /// Takes back the slots the device has finished with.
    fn reclaim_tx(&mut self) -> Result<(), &'static str> {
        while let Some(used) = self.tx.pop_used()? {
            self.tx_free[self.tx_free_count] = used.token;
            self.tx_free_count += 1;
        }
        Ok(())
    }

    /// Gives receive buffer `slot` back to the device.
    fn post_rx(&mut self, slot: u16) {
        let buf = Buf {
            addr: self.rx_addr(slot),
            len: RX_BUFFER_LEN as u32,
            device_writes: true,
        };
        // SAFETY: the buffer is this slot's part of `rx_buffers`, which only
        // the receive queue uses; the guest reads it again only after the
        // device returns it. There is a descriptor for every buffer (the
        // count is at most the queue size), so the queue cannot be full.
        let added = unsafe { self.rx.add(once(buf), 1, slot) };
        debug_assert!(added.is_ok(), "receive queue full");
    }

    /// Notifies each queue that has new buffers, if the device asked to
    /// hear about them.
    fn kick(&mut self) {
        for (index, queue) in [(RX_QUEUE, &mut self.rx), (TX_QUEUE, &mut self.tx)] {
            if queue.needs_notification() {
                self.transport.notify(index);
                self.stats.notifications += 1;
            }
        }
    }

    fn rx_addr(&self, slot: u16) -> u64 {
        self.rx_buffers.addr() + (usize::from(slot) * RX_BUFFER_LEN) as u64
    }

    fn tx_addr(&self, slot: u16) -> u64 {
        self.tx_slots.addr() + (usize::from(slot) * self.tx_slot_len) as u64
    }
}
