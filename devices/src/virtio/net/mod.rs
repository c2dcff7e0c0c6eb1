//! virtio-net: one receive and one transmit queue over a [`FrameBackend`] (a tap in
//! production, a datagram socket in tests).
//!
//! Receive is driven by backend readability (edge-triggered) and by the guest posting receive
//! buffers: a frame read from the backend is held until the guest has room for it, so no frame
//! is dropped while the guest has buffers, and nothing spins while it has none. Transmit runs
//! on queue notifications. Frames larger than the guest's buffers (or than the protocol allows)
//! are dropped and counted, never a panic.

pub mod tap;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use self::tap::{FrameBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::{
    ActivateError, InterruptKind, IrqTrigger, LogOnce, VirtioDevice, checked_queues,
    read_config_bytes,
};

/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Received frames put into the used ring together, at most (vhost-net's VHOST_NET_BATCH).
const RX_BATCH: usize = 64;
const RX: usize = 0;
const TX: usize = 1;
/// The largest frame a tap hands over with TSO: a 64 KiB segment plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_562;
/// Byte offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Frame counters (also what the drop warnings are based on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames dropped because the guest's buffers could not hold them.
    pub rx_dropped_too_large: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Guest frames dropped: malformed, too large, or refused by the backend.
    pub tx_dropped: u64,
}

/// Kinds of trouble, each logged once.
mod trouble {
    pub const RX_TOO_LARGE: u32 = 0;
    pub const TX_MALFORMED: u32 = 1;
    pub const TX_TOO_LARGE: u32 = 2;
    pub const BACKEND_SEND: u32 = 3;
    pub const BACKEND_RECV: u32 = 4;
    pub const QUEUE: u32 = 5;
    pub const OFFLOAD: u32 = 6;
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
    mergeable_rx: bool,
}

/// A virtio-net device.
pub struct Net<B: FrameBackend> {
    backend: B,
    config_space: [u8; 10],
    queue_events: [EventFd; 2],
    state: DeviceState,
    /// A frame read from the backend but not yet delivered (`pending_len` bytes of it).
    rx_frame: Vec<u8>,
    pending_len: usize,
    /// Receive chains filled but not yet in the used ring (see `process_rx`).
    rx_used: Vec<(u16, u32)>,
    tx_frame: Vec<u8>,
    counters: NetCounters,
    trouble: LogOnce,
}

impl<B: FrameBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Where one receive chain's writable buffers are.
struct RxChain {
    head: u16,
    buffers: Vec<(vm_memory::GuestAddress, u32)>,
    capacity: usize,
}

enum Delivery {
    Delivered,
    NoBuffers,
    TooLarge,
}

impl<B: FrameBackend> Net<B> {
    /// A device with MAC address `mac` on `backend`.
    pub fn new(backend: B, mac: [u8; 6]) -> std::io::Result<Self> {
        let mut config_space = [0u8; 10];
        config_space[..6].copy_from_slice(&mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Ok(Self {
            backend,
            config_space,
            queue_events: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            state: DeviceState::Inactive,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            pending_len: 0,
            rx_used: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            tx_frame: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME_LEN),
            counters: NetCounters::default(),
            trouble: LogOnce::default(),
        })
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// The backend (for tests and diagnostics).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn warn_once(&mut self, kind: u32, what: std::fmt::Arguments<'_>) {
        if self.trouble.first(kind) {
            log::warn!("virtio-net: {what} (further such events are only counted)");
        }
    }

    /// Moves frames from the backend into the guest until the backend is empty or the guest
    /// has no room; then interrupts the guest if it asked for it.
    ///
    /// The frames of one pass go into the used ring together, after their bytes are in guest
    /// memory (at most `RX_BATCH`, 64, at a time, as vhost-net does): a guest that polls the ring
    /// then takes them in one go and answers once (one TCP ACK for the batch, not one per
    /// frame), and one that waits for interrupts gets one.
    pub fn process_rx(&mut self) {
        let mut delivered = false;
        loop {
            if self.rx_used.len() >= RX_BATCH {
                self.publish_rx();
            }
            if self.pending_len == 0 {
                match self.backend.recv(&mut self.rx_frame) {
                    Ok(0) => break,
                    Ok(len) => self.pending_len = len,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) => {
                        self.warn_once(
                            trouble::BACKEND_RECV,
                            format_args!("receive failed: {err}"),
                        );
                        break;
                    }
                }
            }
            match self.deliver_pending() {
                Delivery::Delivered => {
                    self.pending_len = 0;
                    self.counters.rx_frames += 1;
                    delivered = true;
                }
                Delivery::TooLarge => {
                    let len = self.pending_len;
                    self.pending_len = 0;
                    self.counters.rx_dropped_too_large += 1;
                    self.warn_once(
                        trouble::RX_TOO_LARGE,
                        format_args!("dropped a {len}-byte frame larger than the guest's buffers"),
                    );
                }
                // The frame stays pending; the guest's next receive notification resumes here.
                Delivery::NoBuffers => break,
            }
        }
        self.publish_rx();
        if delivered {
            self.signal_used(RX);
        }
    }

    /// Puts the filled receive chains into the used ring.
    fn publish_rx(&mut self) {
        let DeviceState::Activated(state) = &mut self.state else {
            return;
        };
        for &(head, len) in &self.rx_used {
            if super::add_used(&mut state.rx, &state.mem, head, len).is_err() {
                break;
            }
        }
        self.rx_used.clear();
    }

    fn queues(&mut self) -> Option<&mut ActiveState> {
        match &mut self.state {
            DeviceState::Activated(state) => Some(state),
            DeviceState::Inactive => None,
        }
    }

    /// Writes the pending frame into one receive chain, or several with MRG_RXBUF.
    fn deliver_pending(&mut self) -> Delivery {
        let frame_len = self.pending_len;
        let Some(state) = self.queues() else {
            return Delivery::NoBuffers;
        };
        let mem = state.mem.clone();
        let mut chains: Vec<RxChain> = Vec::new();
        let mut room = 0;
        // Where to rewind to if the chains taken cannot be used after all.
        let first_avail = state.rx.next_avail();
        while room < frame_len {
            // Even every buffer of the queue together cannot hold this frame: drop it.
            if chains.len() >= usize::from(state.rx.size()) {
                break;
            }
            if let Some(chain) = pop_rx_chain(&mut state.rx, &mem) {
                room += chain.capacity;
                chains.push(chain);
                if !state.mergeable_rx {
                    break;
                }
                continue;
            }
            // Not enough buffers yet: ask to be notified, then give back what was taken; if the
            // guest added buffers meanwhile, start over with them. Notifications are re-enabled
            // before rewinding, so the guest's index is compared with where popping stopped
            // (compared with the chains given back, it always looks like more and this loops
            // forever), and with event idx the guest is asked to notify for its next buffer.
            let more = super::more_available(&mut state.rx, &mem);
            chains.clear();
            state.rx.set_next_avail(first_avail);
            room = 0;
            match more {
                Ok(true) => {
                    let _ = state.rx.disable_notification(&mem);
                }
                _ => return Delivery::NoBuffers,
            }
        }
        if room < frame_len {
            // Without MRG_RXBUF one chain must hold the whole frame; give the chains back.
            state.rx.set_next_avail(first_avail);
            return Delivery::TooLarge;
        }
        let count = chains.len() as u16;
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for chain in &chains {
            let start = offset;
            for &(addr, len) in &chain.buffers {
                if offset == frame_len {
                    break;
                }
                let n = (len as usize).min(frame_len - offset);
                if mem
                    .write_slice(&self.rx_frame[offset..offset + n], addr)
                    .is_err()
                {
                    break;
                }
                offset += n;
            }
            self.rx_used.push((chain.head, (offset - start) as u32));
        }
        Delivery::Delivered
    }

    /// Sends every frame the guest queued.
    pub fn process_tx(&mut self) {
        let Some(state) = self.queues() else {
            return;
        };
        let mem = state.mem.clone();
        let mut sent_any = false;
        loop {
            let Some(state) = self.queues() else {
                return;
            };
            if state.tx.disable_notification(&mem).is_err() {
                self.warn_once(trouble::QUEUE, format_args!("transmit queue is broken"));
                break;
            }
            while let Some(chain) = self
                .queues()
                .and_then(|s| super::pop_chain(&mut s.tx, &mem).ok().flatten())
            {
                let head = chain.head_index();
                self.transmit(chain, &mem);
                sent_any = true;
                if let Some(state) = self.queues() {
                    let _ = super::add_used(&mut state.tx, &mem, head, 0);
                }
            }
            match self
                .queues()
                .map(|s| super::more_available(&mut s.tx, &mem))
            {
                Some(Ok(true)) => continue,
                Some(Err(err)) => {
                    self.warn_once(
                        trouble::QUEUE,
                        format_args!("transmit queue is broken: {err}"),
                    );
                    break;
                }
                _ => break,
            }
        }
        if sent_any {
            self.signal_used(TX);
        }
    }

    fn transmit(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) {
        self.tx_frame.clear();
        for desc in chain {
            if desc.is_write_only() {
                self.counters.tx_dropped += 1;
                self.warn_once(
                    trouble::TX_MALFORMED,
                    format_args!("transmit chain has a writable buffer"),
                );
                return;
            }
            let len = desc.len() as usize;
            if self.tx_frame.len() + len > VNET_HDR_LEN + MAX_FRAME_LEN {
                self.counters.tx_dropped += 1;
                self.warn_once(
                    trouble::TX_TOO_LARGE,
                    format_args!("dropped an oversized transmit frame"),
                );
                return;
            }
            let start = self.tx_frame.len();
            self.tx_frame.resize(start + len, 0);
            if mem
                .read_slice(&mut self.tx_frame[start..], desc.addr())
                .is_err()
            {
                self.counters.tx_dropped += 1;
                self.warn_once(
                    trouble::TX_MALFORMED,
                    format_args!("transmit buffer outside guest memory"),
                );
                return;
            }
        }
        if self.tx_frame.len() <= VNET_HDR_LEN {
            self.counters.tx_dropped += 1;
            self.warn_once(
                trouble::TX_MALFORMED,
                format_args!("transmit chain without a frame"),
            );
            return;
        }
        match self.backend.send(&self.tx_frame) {
            Ok(()) => self.counters.tx_frames += 1,
            Err(err) => {
                self.counters.tx_dropped += 1;
                self.warn_once(trouble::BACKEND_SEND, format_args!("send failed: {err}"));
            }
        }
    }

    fn signal_used(&mut self, queue: usize) {
        let Some(state) = self.queues() else {
            return;
        };
        let mem = state.mem.clone();
        let q = if queue == RX {
            &mut state.rx
        } else {
            &mut state.tx
        };
        if q.needs_notification(&mem).unwrap_or(true) {
            state.interrupt.trigger(InterruptKind::Queue);
        }
    }
}

/// Pops one receive chain and collects its writable buffers.
fn pop_rx_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<RxChain> {
    let chain = super::pop_chain(queue, mem).ok().flatten()?;
    let head = chain.head_index();
    let buffers: Vec<_> = chain
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr(), d.len()))
        .collect();
    let capacity = buffers.iter().map(|(_, len)| *len as usize).sum();
    Some(RxChain {
        head,
        buffers,
        capacity,
    })
}

fn offload_flags(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

impl<B: FrameBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0, |features, bit| features | (1u64 << bit))
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is only writable with VIRTIO_NET_F_CTRL_MAC_ADDR, which is not offered.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = checked_queues(queues, &mem)?;
        if let Err(err) = self.backend.set_offload(offload_flags(features)) {
            self.warn_once(
                trouble::OFFLOAD,
                format_args!("cannot set tap offloads: {err}"),
            );
        }
        self.state = DeviceState::Activated(ActiveState {
            mem,
            interrupt,
            rx,
            tx,
            mergeable_rx: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.pending_len = 0;
        // Empty outside process_rx already; never to be published into the next rings.
        self.rx_used.clear();
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Activated(_))
    }
}

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const BACKEND: u32 = 2;

impl<B: FrameBackend> MutEventSubscriber for Net<B> {
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
            // Edge-triggered: drain until the backend is empty or the guest is full.
            BACKEND => self.process_rx(),
            other => log::warn!("virtio-net: unexpected event data {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let rx = Events::with_data(&self.queue_events[RX], RX_QUEUE, EventSet::IN);
        let tx = Events::with_data(&self.queue_events[TX], TX_QUEUE, EventSet::IN);
        let backend = Events::with_data(
            &self.backend,
            BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        for events in [rx, tx, backend] {
            if let Err(err) = ops.add(events) {
                log::error!("virtio-net: cannot watch an event source: {err:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
