//! A polled virtio-net driver (virtio 1.x, section 5.1) on one virtio-mmio
//! device, and smoltcp's [`Device`] on top of it.
//!
//! Queue 0 receives, queue 1 transmits; there is no control queue. Features
//! accepted when offered: MAC, STATUS, MRG_RXBUF (unless
//! `virtio_net_mrg_rxbuf=0`), CSUM with HOST_TSO4 (unless `virtio_net_tso=0`
//! or `virtio_net_tx_split=1`), and the transport's VERSION_1, EVENT_IDX and
//! INDIRECT_DESC. No offload on receive: each received frame is a plain
//! Ethernet frame of at most [`MAX_FRAME`] bytes, with a virtio-net header
//! that is all zero but `num_buffers`, and a received TCP segment with a
//! wrong checksum is dropped here. The guest computes every checksum of what
//! it sends itself (TCP's in this driver, see [`checksum`], the rest in
//! smoltcp), but for the large frames of [`tso`](crate::tso).
//!
//! **Receive**: the receive queue holds up to [`MAX_RX_BUFFERS`] buffers of
//! `rx_buffer` bytes (2 KiB unless `virtio_net_rx_buffer=N`), one
//! device-writable descriptor each, and every buffer goes back into the queue
//! as soon as its frame has been handed to smoltcp. A frame normally sits in
//! one buffer, right after its 12-byte header, and smoltcp reads it in place.
//! With MRG_RXBUF the header's `num_buffers` may say that the frame goes on in
//! the next used buffers (no header in those): the pieces are copied into an
//! assembly buffer, and those buffers are reposted at once.
//!
//! **Transmit**: each frame has a 2 KiB slot: the zero header, then the frame
//! smoltcp writes in place, sent as one device-readable descriptor (or, with
//! `virtio_net_tx_split=1`, as two: the header and the frame 64 bytes further,
//! through an indirect table in the slot when INDIRECT_DESC is negotiated, as
//! Linux sends multi-segment frames). With HOST_TSO4, the device that smoltcp
//! uses also has [`TSO_SLOTS`] slots for large frames: a TCP data segment
//! that could start one is copied into a free one and its small slot freed at
//! once, the segments after it that carry on its stream are appended, and the
//! large frame is queued (one descriptor) when a segment does not fit on, or
//! at the first [`NetDevice::flush`] after a poll that added nothing to it.
//! Frames go to the device in the order smoltcp wrote them.
//!
//! Notifications follow the event-index rules ([`Virtqueue::needs_notification`]);
//! the driver decides once per [`NetDevice::flush`], which the stack calls after
//! every smoltcp poll, so a burst of frames costs one notification at most.

use core::iter::once;
use core::ptr::{read_volatile, write_volatile};

use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::checksum;
use crate::dma::{Arena, DmaBuf};
use crate::mem::zeroed;
use crate::tso::{OpenFrame, Segment};
use crate::virtio_mmio::{F_EVENT_IDX, F_INDIRECT_DESC, Options, Transport};
use crate::virtqueue::{Buf, Virtqueue};

// Device feature bits.
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CSUM: u64 = 1 << 0;
pub const F_HOST_TSO4: u64 = 1 << 11;

// Configuration space (struct virtio_net_config).
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const CONFIG_STATUS_LINK_UP: u16 = 1;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// `struct virtio_net_hdr` with VERSION_1: flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers.
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const HEADER_NUM_BUFFERS: u64 = 10;

/// Largest Ethernet frame without segmentation offloads: a 1500-byte IP
/// packet and the 14-byte Ethernet header (the FCS never reaches the guest).
pub const MAX_FRAME: usize = 1514;
/// Room for a received frame that a device sends with a VLAN tag, or one a
/// little larger than it should be: the assembly buffer's size.
const MAX_RX_FRAME: usize = 2048;

/// Default receive buffer size: a whole frame and its header fit.
pub const DEFAULT_RX_BUFFER: usize = 2048;
/// Smallest receive buffer `virtio_net_rx_buffer=` allows with MRG_RXBUF
/// (the header must fit in the first buffer of a frame).
pub const MIN_RX_BUFFER: usize = 64;
/// Smallest receive buffer without MRG_RXBUF: every frame must fit in one
/// (spec 5.1.6.3.1: 1526 bytes, header included).
const MIN_RX_BUFFER_NO_MERGE: usize = HEADER_LEN + MAX_FRAME;
/// Largest receive buffer `virtio_net_rx_buffer=` allows (the DMA arena
/// holds [`MAX_RX_BUFFERS`] of them per device).
pub const MAX_RX_BUFFER: usize = 2048;
/// Most receive buffers posted (fewer if the queue is smaller).
const MAX_RX_BUFFERS: usize = 128;

/// Bytes per transmit slot, and where its parts go.
const TX_SLOT: usize = 2048;
/// Where the frame goes when the header has a descriptor of its own.
const TX_SPLIT_FRAME: usize = 64;
/// Where the two-entry indirect table goes (16-byte aligned, after the frame).
const TX_TABLE: usize = TX_SPLIT_FRAME + MAX_FRAME + 6;
/// Most frames in flight (fewer if the queue is smaller).
const MAX_TX_SLOTS: usize = 128;

/// Slots for large frames (segmentation offload): as many as smoltcp's
/// 256 KiB send buffers of the stream scenarios keep in flight.
const TSO_SLOTS: usize = 4;
/// A large frame's slot: its header, then up to a whole IPv4 packet and the
/// Ethernet header.
const TSO_SLOT: usize = 66 * 1024;
/// Tokens of large frames' slots start here (small slots' are below).
const TSO_TOKEN_BASE: u16 = MAX_TX_SLOTS as u16;

const _: () = assert!(HEADER_LEN + 14 + 65_535 <= TSO_SLOT);
const _: () = assert!(TX_TABLE.is_multiple_of(16) && TX_TABLE + 32 <= TX_SLOT);
const _: () = assert!(HEADER_LEN + MAX_FRAME <= TX_SLOT);

/// The virtio-net options of the command line, besides the virtio ones.
#[derive(Clone, Copy)]
pub struct NetOptions {
    pub virtio: Options,
    /// Accept MRG_RXBUF when offered (`virtio_net_mrg_rxbuf=0` refuses it).
    pub mrg_rxbuf: bool,
    /// Receive buffer size (`virtio_net_rx_buffer=N`; only with MRG_RXBUF may
    /// it be smaller than a whole frame).
    pub rx_buffer: usize,
    /// Header and frame in separate descriptors (`virtio_net_tx_split=1`).
    pub tx_split: bool,
    /// Accept CSUM and HOST_TSO4 (`virtio_net_tso=0` refuses them).
    pub tso: bool,
}

/// Counters for the end-of-scenario line.
#[derive(Clone, Copy, Default)]
pub struct Stats {
    pub rx_frames: u64,
    /// Frames that came in more than one buffer (MRG_RXBUF).
    pub rx_merged: u64,
    /// Frames dropped: shorter than a header, too long, or with a wrong TCP
    /// checksum.
    pub rx_dropped: u64,
    /// Frames given to the device; a large one counts once.
    pub tx_frames: u64,
    /// Large frames (segmentation offload), and the segments they hold.
    pub tso_frames: u64,
    pub tso_segments: u64,
    /// QueueNotify writes, both queues.
    pub notifications: u64,
}

/// One initialised virtio-net device.
pub struct NetDevice {
    index: usize,
    transport: Transport,
    features: u64,
    mac: [u8; 6],
    link_up: bool,
    rx: RxRing,
    tx: TxRing,
    /// Frames still to hand out in this poll (see [`begin_poll`](Self::begin_poll)).
    rx_budget: usize,
    /// The first thing the device did wrong; the stack checks after each poll.
    error: Option<&'static str>,
    notifications: u64,
}

impl NetDevice {
    /// Brings up the network device behind `transport` (virtio device number
    /// `index`): features, both queues, DRIVER_OK, receive buffers posted.
    /// `fallback_mac` is used when the device offers no MAC.
    pub fn init(
        index: usize,
        transport: Transport,
        arena: &mut Arena,
        options: NetOptions,
        fallback_mac: [u8; 6],
    ) -> Result<NetDevice, &'static str> {
        let mut wanted = F_MAC | F_STATUS;
        if options.mrg_rxbuf {
            wanted |= F_MRG_RXBUF;
        }
        if options.virtio.event_idx {
            wanted |= F_EVENT_IDX;
        }
        if options.virtio.indirect {
            wanted |= F_INDIRECT_DESC;
        }
        // Large frames go as one descriptor; split mode keeps Linux's
        // header-apart layout for plain frames only.
        if options.tso && !options.tx_split {
            wanted |= F_CSUM | F_HOST_TSO4;
        }
        let features = transport.negotiate(wanted)?;
        let has = |bit| features & bit != 0;
        let mrg_rxbuf = has(F_MRG_RXBUF);
        let buf_len = if mrg_rxbuf {
            options.rx_buffer
        } else {
            options.rx_buffer.max(MIN_RX_BUFFER_NO_MERGE)
        };

        let rx_queue = transport.new_queue(RX_QUEUE, options.virtio, has(F_EVENT_IDX))?;
        let tx_queue = transport.new_queue(TX_QUEUE, options.virtio, has(F_EVENT_IDX))?;

        let mac = if has(F_MAC) {
            Self::read_mac(&transport)
        } else {
            fallback_mac
        };
        let link_up = !has(F_STATUS) || transport.config16(CFG_STATUS) & CONFIG_STATUS_LINK_UP != 0;

        let rx_count = usize::from(rx_queue.size()).min(MAX_RX_BUFFERS);
        // All the buffers together must hold a full-size frame, or the
        // device waits forever for room to put one.
        if rx_count * buf_len < MIN_RX_BUFFER_NO_MERGE {
            transport.fail();
            return Err("rx-queue-too-small");
        }
        let rx = RxRing {
            queue: rx_queue,
            buffers: arena.alloc(rx_count * buf_len, 4096)?,
            buf_len,
            mrg_rxbuf,
            assembly: arena.alloc(MAX_RX_FRAME, 64)?,
            partial: None,
            stats: Stats::default(),
        };
        let indirect = options.tx_split && has(F_INDIRECT_DESC);
        // A direct split frame takes two descriptors.
        let per_frame = if options.tx_split && !indirect { 2 } else { 1 };
        let tx_count = (usize::from(tx_queue.size()) / per_frame).min(MAX_TX_SLOTS);
        let mut tx = TxRing {
            queue: tx_queue,
            slots: arena.alloc(tx_count * TX_SLOT, 4096)?,
            free: [0; MAX_TX_SLOTS],
            free_count: 0,
            split: options.tx_split,
            indirect,
            tso: None,
            frames: 0,
        };
        for slot in 0..tx_count {
            // The header stays all zero for good (no offloads): written once.
            tx.write_header(slot);
            tx.free[slot] = slot as u16;
        }
        tx.free_count = tx_count;

        transport.driver_ok()?;
        let mut dev = NetDevice {
            index,
            transport,
            features,
            mac,
            link_up,
            rx,
            tx,
            rx_budget: 0,
            error: None,
            notifications: 0,
        };
        for slot in 0..rx_count {
            dev.rx.post(slot as u16);
        }
        dev.flush();
        Ok(dev)
    }

    /// Gives the device large-frame slots from `arena`, if it offered
    /// segmentation offload and its transmit queue has a descriptor for each
    /// beside the small slots. Only the device smoltcp uses needs them.
    pub fn enable_tso(&mut self, arena: &mut Arena) -> Result<(), &'static str> {
        let offered = self.features & (F_CSUM | F_HOST_TSO4) == F_CSUM | F_HOST_TSO4;
        let small = self.tx.free_count;
        if !offered || small + TSO_SLOTS > usize::from(self.tx.queue.size()) {
            return Ok(());
        }
        let mut free = [0; TSO_SLOTS];
        for (slot, entry) in free.iter_mut().enumerate() {
            *entry = slot as u16;
        }
        self.tx.tso = Some(Tso {
            slots: arena.alloc(TSO_SLOTS * TSO_SLOT, 4096)?,
            free,
            free_count: TSO_SLOTS,
            open: None,
            grew: false,
            // Opaque zeroes: LLVM would zero the two counters with `xorps`
            // (see `zeroed`).
            frames: zeroed(),
            segments: zeroed(),
        });
        Ok(())
    }

    /// Whether large frames are in use.
    pub fn tso(&self) -> bool {
        self.tx.tso.is_some()
    }

    /// The six MAC bytes, read a byte at a time until the configuration
    /// generation says they belong together.
    fn read_mac(transport: &Transport) -> [u8; 6] {
        loop {
            let generation = transport.config_generation();
            let mut mac = [0u8; 6];
            for (offset, byte) in (CFG_MAC..).zip(mac.iter_mut()) {
                *byte = transport.config8(offset);
            }
            if transport.config_generation() == generation {
                return mac;
            }
        }
    }

    /// The virtio device number (`dev=N`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Negotiated features (transport and device bits).
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the device said the link was up at initialisation (always,
    /// without STATUS).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    pub fn mrg_rxbuf(&self) -> bool {
        self.rx.mrg_rxbuf
    }

    pub fn stats(&self) -> Stats {
        let (tso_frames, tso_segments) = match &self.tx.tso {
            Some(tso) => (tso.frames, tso.segments),
            None => (0, 0),
        };
        Stats {
            tx_frames: self.tx.frames,
            tso_frames,
            tso_segments,
            notifications: self.notifications,
            ..self.rx.stats
        }
    }

    /// The first error the device caused (a used ring entry naming a buffer
    /// that was not in the queue), if any.
    pub fn error(&self) -> Option<&'static str> {
        self.error
    }

    /// Call before each smoltcp poll: it then takes at most a queue's worth
    /// of frames before it transmits, so that acknowledgements go out even
    /// while frames keep arriving.
    pub fn begin_poll(&mut self) {
        self.rx_budget = MAX_RX_BUFFERS;
    }

    /// Reclaims sent frames and notifies each queue that has new buffers, if
    /// the device asked to hear about them. Call after each smoltcp poll.
    pub fn flush(&mut self) {
        self.tx.flush_large_frame();
        self.reclaim_tx();
        for (index, queue) in [
            (RX_QUEUE, &mut self.rx.queue),
            (TX_QUEUE, &mut self.tx.queue),
        ] {
            if queue.needs_notification() {
                self.transport.notify(index);
                self.notifications += 1;
            }
        }
    }

    fn reclaim_tx(&mut self) {
        if let Err(reason) = self.tx.reclaim() {
            self.error.get_or_insert(reason);
        }
    }
}

/// The receive queue and its buffers.
struct RxRing {
    queue: Virtqueue,
    /// Buffer `n` is `buffers[n * buf_len..][..buf_len]`; its token is `n`.
    buffers: DmaBuf,
    buf_len: usize,
    mrg_rxbuf: bool,
    /// Where a frame that spans several buffers is put together.
    assembly: DmaBuf,
    /// A frame being put together whose later buffers have not come yet.
    partial: Option<Partial>,
    stats: Stats,
}

#[derive(Clone, Copy)]
struct Partial {
    /// Buffers still to come.
    remaining: u16,
    /// Bytes assembled so far.
    len: usize,
    /// The frame is longer than the assembly buffer: consume it, then drop it.
    too_long: bool,
}

/// Where the next received frame is.
#[derive(Clone, Copy)]
enum Frame {
    /// In place, after the header of receive buffer `slot`; `len` frame bytes.
    InPlace { slot: u16, len: usize },
    /// In the assembly buffer, `len` bytes.
    Assembled { len: usize },
}

impl RxRing {
    fn buffer_addr(&self, slot: u16) -> u64 {
        self.buffers.addr() + (usize::from(slot) * self.buf_len) as u64
    }

    /// The bytes of a frame the device has delivered. Valid until its
    /// buffer is posted again (or, assembled, until the next frame is).
    fn frame_bytes(&self, frame: Frame) -> &[u8] {
        match frame {
            Frame::InPlace { slot, len } => {
                let addr = self.buffer_addr(slot) + HEADER_LEN as u64;
                // SAFETY: the device has returned this buffer and gets it
                // back only through `post`, which needs `&mut self` and so
                // ends this borrow; the frame lies inside the buffer (the
                // used length was checked against buf_len).
                unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
            }
            // SAFETY: the assembly buffer is guest-only, and `len` is at
            // most its size (checked while assembling).
            Frame::Assembled { len } => unsafe { &self.assembly.bytes()[..len] },
        }
    }

    /// Gives receive buffer `slot` back to the device.
    fn post(&mut self, slot: u16) {
        let buf = Buf {
            addr: self.buffer_addr(slot),
            len: self.buf_len as u32,
            device_writes: true,
        };
        // SAFETY: the buffer is this slot's part of `buffers`, which only the
        // receive queue uses; the guest reads it again only after the device
        // returns it. There is a descriptor for every slot (the count is at
        // most the queue size), so the queue cannot be full.
        let added = unsafe { self.queue.add(once(buf), 1, slot) };
        debug_assert!(added.is_ok(), "receive queue full");
    }

    /// The next complete frame, if the device has delivered one.
    fn next_frame(&mut self) -> Result<Option<Frame>, &'static str> {
        loop {
            if let Some(partial) = self.partial {
                match self.continue_frame(partial)? {
                    Some(frame) => return Ok(Some(frame)),
                    None if self.partial.is_some() => return Ok(None),
                    None => continue,
                }
            }
            let Some(used) = self.queue.pop_used()? else {
                return Ok(None);
            };
            let slot = used.token;
            let len = used.len as usize;
            if !(HEADER_LEN..=self.buf_len).contains(&len) {
                self.stats.rx_dropped += 1;
                self.post(slot);
                continue;
            }
            let num_buffers = if self.mrg_rxbuf {
                // SAFETY: the device has returned this buffer, so the guest
                // may read it; the header lies inside it (len >= HEADER_LEN).
                unsafe {
                    read_volatile((self.buffer_addr(slot) + HEADER_NUM_BUFFERS) as *const u16)
                }
            } else {
                1
            };
            self.stats.rx_frames += 1;
            if num_buffers <= 1 {
                let frame = Frame::InPlace {
                    slot,
                    len: len - HEADER_LEN,
                };
                if checksum::tcp_ok(self.frame_bytes(frame)) {
                    return Ok(Some(frame));
                }
                self.stats.rx_dropped += 1;
                self.post(slot);
                continue;
            }
            self.stats.rx_merged += 1;
            let mut partial = Partial {
                remaining: num_buffers - 1,
                len: 0,
                too_long: false,
            };
            self.append(&mut partial, slot, HEADER_LEN, len);
            self.partial = Some(partial);
        }
    }

    /// Takes the further buffers of a merged frame as they come.
    fn continue_frame(&mut self, mut partial: Partial) -> Result<Option<Frame>, &'static str> {
        while partial.remaining > 0 {
            let Some(used) = self.queue.pop_used()? else {
                self.partial = Some(partial);
                return Ok(None);
            };
            let len = (used.len as usize).min(self.buf_len);
            self.append(&mut partial, used.token, 0, len);
            partial.remaining -= 1;
        }
        self.partial = None;
        let frame = Frame::Assembled { len: partial.len };
        if partial.too_long || !checksum::tcp_ok(self.frame_bytes(frame)) {
            self.stats.rx_dropped += 1;
            return Ok(None);
        }
        Ok(Some(frame))
    }

    /// Copies bytes `from..to` of buffer `slot` to the end of the frame being
    /// assembled, and gives the buffer back.
    fn append(&mut self, partial: &mut Partial, slot: u16, from: usize, to: usize) {
        let piece = to.saturating_sub(from);
        if partial.len + piece > MAX_RX_FRAME {
            partial.too_long = true;
        }
        if !partial.too_long {
            let src = self.buffer_addr(slot) + from as u64;
            // SAFETY: the device has returned buffer `slot`, and `from..to`
            // lies inside it (`to` is at most `buf_len`); the assembly buffer
            // is guest-only and the copy fits (checked above).
            unsafe {
                let dest = self.assembly.bytes_mut().as_mut_ptr().add(partial.len);
                core::ptr::copy_nonoverlapping(src as *const u8, dest, piece);
            }
            partial.len += piece;
        }
        self.post(slot);
    }
}

/// The transmit queue and its slots.
struct TxRing {
    queue: Virtqueue,
    /// Slot `n` is `slots[n * TX_SLOT..][..TX_SLOT]`; its token is `n`.
    slots: DmaBuf,
    /// Free slot numbers, `free[..free_count]`.
    free: [u16; MAX_TX_SLOTS],
    free_count: usize,
    split: bool,
    indirect: bool,
    /// Large frames' slots, on the device smoltcp uses when it offers TSO.
    tso: Option<Tso>,
    frames: u64,
}

/// Slots for large frames, and the one being put together.
struct Tso {
    /// Slot `n` is `slots[n * TSO_SLOT..][..TSO_SLOT]`; its token is
    /// `TSO_TOKEN_BASE + n`.
    slots: DmaBuf,
    free: [u16; TSO_SLOTS],
    free_count: usize,
    open: Option<OpenFrame>,
    /// A segment joined or started the open frame since the last flush.
    grew: bool,
    frames: u64,
    segments: u64,
}

impl Tso {
    fn slot_addr(&self, slot: u16) -> u64 {
        self.slots.addr() + (usize::from(slot) * TSO_SLOT) as u64
    }

    /// Slot `slot`'s header and frame areas.
    ///
    /// # Safety
    /// The slot must be the guest's: free, or holding the open frame.
    unsafe fn areas(&mut self, slot: u16) -> (&mut [u8], &mut [u8]) {
        let addr = self.slot_addr(slot);
        // SAFETY: the slot lies inside `slots` and the device does not read
        // it (the caller's promise); `&mut self` keeps the two areas the only
        // references to it.
        let bytes = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, TSO_SLOT) };
        bytes.split_at_mut(HEADER_LEN)
    }

    /// Takes `frame` (a segment smoltcp wrote, in a small slot) into the
    /// open large frame, or, with none open, into a new one. False if it is
    /// not that kind of segment, does not carry on the open frame, or no
    /// large slot is free.
    fn take(&mut self, frame: &[u8]) -> bool {
        let Some(segment) = Segment::parse(frame) else {
            return false;
        };
        if let Some(mut open) = self.open {
            // SAFETY: the open frame's slot is the guest's until queued.
            let (_, bytes) = unsafe { self.areas(open.slot) };
            if open.accepts(bytes, &segment, frame) {
                open.append(bytes, &segment, frame);
                self.open = Some(open);
                self.grew = true;
                return true;
            }
            return false;
        }
        if self.free_count == 0 {
            return false;
        }
        self.free_count -= 1;
        let slot = self.free[self.free_count];
        // SAFETY: the slot was free.
        let (_, bytes) = unsafe { self.areas(slot) };
        bytes[..frame.len()].copy_from_slice(frame);
        self.open = Some(OpenFrame::start(slot, segment));
        self.grew = true;
        true
    }
}

impl TxRing {
    fn slot_addr(&self, slot: usize) -> u64 {
        self.slots.addr() + (slot * TX_SLOT) as u64
    }

    fn frame_offset(&self) -> usize {
        if self.split {
            TX_SPLIT_FRAME
        } else {
            HEADER_LEN
        }
    }

    fn write_header(&mut self, slot: usize) {
        let addr = self.slot_addr(slot);
        // SAFETY: the header lies at the start of this free slot, which no
        // request in flight uses; 12 bytes as three aligned 32-bit stores.
        unsafe {
            for offset in [0, 4, 8] {
                write_volatile((addr + offset) as *mut u32, 0);
            }
        }
    }

    /// Takes back the slots of frames the device has sent.
    fn reclaim(&mut self) -> Result<(), &'static str> {
        while let Some(used) = self.queue.pop_used()? {
            match (&mut self.tso, used.token.checked_sub(TSO_TOKEN_BASE)) {
                (Some(tso), Some(slot)) => {
                    tso.free[tso.free_count] = slot;
                    tso.free_count += 1;
                }
                _ => {
                    self.free[self.free_count] = used.token;
                    self.free_count += 1;
                }
            }
        }
        Ok(())
    }

    /// Queues the open large frame unless it grew since the last flush:
    /// smoltcp writes one segment per poll, so a frame stays open for as
    /// many polls as its stream keeps sending, and goes out at the first
    /// poll that sends nothing more (a full window, an empty buffer).
    fn flush_large_frame(&mut self) {
        match self.tso.as_mut() {
            Some(tso) if tso.grew => tso.grew = false,
            Some(_) => {
                self.close_large_frame();
            }
            None => {}
        }
    }

    /// Queues the large frame being put together, if there is one (and
    /// says whether there was).
    fn close_large_frame(&mut self) -> bool {
        let Some(tso) = self.tso.as_mut() else {
            return false;
        };
        let Some(open) = tso.open.take() else {
            return false;
        };
        let addr = tso.slot_addr(open.slot);
        // SAFETY: the open frame's slot is the guest's until queued below.
        let (header, frame) = unsafe { tso.areas(open.slot) };
        open.finish(header, frame);
        tso.frames += u64::from(open.segments > 1);
        tso.segments += u64::from(open.segments);
        let whole = Buf {
            addr,
            len: (HEADER_LEN + open.len) as u32,
            device_writes: false,
        };
        // SAFETY: the slot is the device's until its token comes back in
        // `reclaim`; the queue has a descriptor for every small and large
        // slot (`enable_tso` checked).
        let added = unsafe { self.queue.add(once(whole), 1, TSO_TOKEN_BASE + open.slot) };
        debug_assert!(added.is_ok(), "transmit queue full");
        self.frames += 1;
        true
    }

    /// Sends the `len`-byte frame that `fill` writes, in a free slot.
    ///
    /// # Panics
    /// If no slot is free (the caller checks first) or `len` is over
    /// [`MAX_FRAME`] (smoltcp never asks for more than the MTU).
    fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(len <= MAX_FRAME, "frame of {len} bytes");
        self.free_count -= 1;
        let slot = usize::from(self.free[self.free_count]);
        let addr = self.slot_addr(slot);
        let frame_addr = addr + self.frame_offset() as u64;
        // SAFETY: the slot is free, so the device does not read it; the frame
        // area lies inside the slot (see the TX_* layout checks).
        let frame = unsafe { core::slice::from_raw_parts_mut(frame_addr as *mut u8, len) };
        let result = fill(frame);
        let mut taken = self.tso.as_mut().is_some_and(|tso| tso.take(frame));
        // A segment that does not carry on the open large frame may start
        // the next one; whatever happens, the open one goes first.
        if !taken && self.close_large_frame() {
            taken = self.tso.as_mut().is_some_and(|tso| tso.take(frame));
        }
        if taken {
            // The segment's bytes are in a large slot now.
            self.free_count += 1;
            if self
                .tso
                .as_ref()
                .is_some_and(|tso| tso.open.is_some_and(|open| open.ended()))
            {
                self.close_large_frame();
            }
            return result;
        }
        checksum::fill_tcp(frame);
        let header = Buf {
            addr,
            len: HEADER_LEN as u32,
            device_writes: false,
        };
        let frame = Buf {
            addr: frame_addr,
            len: len as u32,
            device_writes: false,
        };
        let token = slot as u16;
        // SAFETY: the slot is the device's until its token comes back in
        // `reclaim`; the queue has room (one slot per descriptor, or two in
        // direct split mode, which `init` sized the slots for); the table
        // is the slot's own 16-byte aligned room for two descriptors.
        let added = unsafe {
            if !self.split {
                let whole = Buf {
                    len: (HEADER_LEN + len) as u32,
                    ..header
                };
                self.queue.add(once(whole), 1, token)
            } else if self.indirect {
                let table = addr + TX_TABLE as u64;
                self.queue
                    .add_indirect(table, [header, frame].into_iter(), 2, token)
            } else {
                self.queue.add([header, frame].into_iter(), 2, token)
            }
        };
        debug_assert!(added.is_ok(), "transmit queue full");
        self.frames += 1;
        result
    }
}

impl Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.rx_budget == 0 {
            return None;
        }
        // smoltcp may answer the frame at once (ARP, ping): keep a slot for it.
        if self.tx.free_count == 0 {
            self.reclaim_tx();
            if self.tx.free_count == 0 {
                return None;
            }
        }
        let frame = match self.rx.next_frame() {
            Ok(frame) => frame?,
            Err(reason) => {
                self.error.get_or_insert(reason);
                return None;
            }
        };
        self.rx_budget -= 1;
        Some((
            RxToken {
                rx: &mut self.rx,
                frame,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if self.tx.free_count == 0 {
            self.reclaim_tx();
            if self.tx.free_count == 0 {
                // Let the device catch up before smoltcp tries again.
                self.flush();
                return None;
            }
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // The driver does TCP checksums itself, faster (see `checksum`).
        caps.checksum.tcp = Checksum::None;
        caps
    }
}

/// A received frame for smoltcp; its buffer goes back to the device when
/// the token is dropped.
pub struct RxToken<'a> {
    rx: &'a mut RxRing,
    frame: Frame,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        // The buffer goes back to the device when the token is dropped, after `f`.
        f(self.rx.frame_bytes(self.frame))
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        if let Frame::InPlace { slot, .. } = self.frame {
            self.rx.post(slot);
        }
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    tx: &'a mut TxRing,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(len, f)
    }
}
