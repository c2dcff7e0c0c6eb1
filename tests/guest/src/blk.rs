//! A polled virtio-blk driver (virtio 1.x, section 5.2) on one virtio-mmio
//! device with one queue.
//!
//! A request is a chain of a 16-byte header {type, reserved, sector} the
//! device reads, the data segments, and one status byte the device writes.
//! Each request in flight owns a *slot* in the arena: its header, its status
//! byte and room for its indirect descriptor table. The caller owns the data
//! buffers and gets a [`Completion`] with its own tag back for each request.
//!
//! Requests are published at once and the device is notified (if it asked to
//! be, see [`Virtqueue::needs_notification`]) before the driver waits, so a
//! caller that submits several requests and then waits notifies once.

use core::hint::spin_loop;
use core::ptr::{read_volatile, write_volatile};

use crate::dma::{Arena, DmaBuf, Seg};
use crate::mem::zeroed;
use crate::time::Deadline;
use crate::virtio_mmio::{F_EVENT_IDX, F_INDIRECT_DESC, Options, Transport};
use crate::virtqueue::{Buf, Virtqueue};

/// Bytes per sector: the unit of `sector` and `capacity`, whatever `blk_size` says.
pub const SECTOR_SIZE: usize = 512;
/// Length of a GET_ID answer (a NUL-padded serial number).
pub const ID_BYTES: usize = 20;

// Device feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

// Configuration space offsets (struct virtio_blk_config).
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;
const CFG_BLK_SIZE: u64 = 20;

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RequestType {
    In = 0,
    Out = 1,
    Flush = 4,
    GetId = 8,
    Discard = 11,
    WriteZeroes = 13,
}

impl RequestType {
    /// Whether the device writes the data segments (rather than reading them).
    fn device_writes_data(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// Status byte values.
pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
/// What the status byte holds until the device writes it: a completion that
/// still shows it means the device forgot to.
const STATUS_UNSET: u8 = 0xff;

/// Most data segments in one request (after splitting to `size_max`).
pub const MAX_DATA_SEGS: usize = 32;
/// Header, data, status.
const MAX_BUFS: usize = MAX_DATA_SEGS + 2;
/// Most requests in flight on one device (one bit each in `free_slots`).
pub const MAX_IN_FLIGHT: usize = 32;

// Slot layout: header, status byte, indirect table (16-byte aligned).
const SLOT_HEADER: usize = 0;
const SLOT_STATUS: usize = 16;
const SLOT_TABLE: usize = 32;
const SLOT_SIZE: usize = SLOT_TABLE + MAX_BUFS * 16;

/// How long the driver waits for any one completion before giving up.
const REQUEST_TIMEOUT_US: u64 = 10_000_000;

/// A finished request.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The tag given to [`BlkDevice::submit`].
    pub tag: u32,
    /// The status byte the device wrote (0xff if it wrote none).
    pub status: u8,
}

/// Whether [`BlkDevice::submit`] queued the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    Queued,
    /// No slot or not enough descriptors now: wait for a completion and retry.
    Busy,
}

/// One initialised virtio-blk device.
pub struct BlkDevice {
    /// The virtio device number (`dev=N`).
    index: usize,
    transport: Transport,
    queue: Virtqueue,
    features: u64,
    capacity: u64,
    blk_size: u32,
    /// Largest data segment (`u32::MAX` when the device sets no limit).
    size_max: u32,
    /// Most data segments per request.
    max_segments: usize,
    slots: DmaBuf,
    /// One bit per free slot.
    free_slots: u32,
    tags: [u32; MAX_IN_FLIGHT],
    notifications: u64,
}

impl BlkDevice {
    /// Brings up the block device behind `transport` (virtio device number
    /// `index`): features, queue 0, DRIVER_OK.
    pub fn init(
        index: usize,
        transport: Transport,
        arena: &mut Arena,
        options: Options,
    ) -> Result<BlkDevice, &'static str> {
        let mut wanted =
            F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;
        if options.event_idx {
            wanted |= F_EVENT_IDX;
        }
        if options.indirect {
            wanted |= F_INDIRECT_DESC;
        }
        let features = transport.negotiate(wanted)?;

        let queue = transport.new_queue(0, options, features & F_EVENT_IDX != 0)?;

        let has = |bit| features & bit != 0;
        let size_max = match transport.config32(CFG_SIZE_MAX) {
            0 => u32::MAX,
            n if has(F_SIZE_MAX) => n,
            _ => u32::MAX,
        };
        let seg_max = match transport.config32(CFG_SEG_MAX) {
            n if has(F_SEG_MAX) && n > 0 => n as usize,
            _ => MAX_DATA_SEGS,
        };
        let blk_size = match transport.config32(CFG_BLK_SIZE) {
            n if has(F_BLK_SIZE) && n > 0 => n,
            _ => SECTOR_SIZE as u32,
        };
        let capacity = transport.config64(CFG_CAPACITY);
        let slots = arena.alloc(MAX_IN_FLIGHT * SLOT_SIZE, 64)?;
        transport.driver_ok()?;

        Ok(BlkDevice {
            index,
            transport,
            queue,
            features,
            capacity,
            blk_size,
            size_max,
            max_segments: seg_max.min(MAX_DATA_SEGS),
            slots,
            free_slots: u32::MAX,
            tags: zeroed(),
            notifications: 0,
        })
    }

    /// The virtio device number (`dev=N`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Negotiated features (transport and device bits).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether `bit` was negotiated.
    pub fn has(&self, bit: u64) -> bool {
        self.features & bit != 0
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The device's block size (512 unless it says otherwise).
    pub fn blk_size(&self) -> u32 {
        self.blk_size
    }

    /// Largest data segment the device accepts.
    pub fn size_max(&self) -> u32 {
        self.size_max
    }

    /// Most data segments per request.
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// Entries in the queue.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free_slots.count_ones() as usize
    }

    /// How many times the driver wrote QueueNotify.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// InterruptStatus, acknowledged.
    pub fn take_interrupt_status(&self) -> u32 {
        self.transport.take_interrupt_status()
    }

    /// Publishes one request. `data` is split further where a segment is
    /// longer than `size_max`; `indirect` asks for an indirect table (used
    /// only when negotiated). `tag` comes back in the [`Completion`].
    ///
    /// # Safety
    /// The data segments must be arena memory that the device may read (or,
    /// for IN and GET_ID, write) and that the guest leaves alone until this
    /// request's completion has been returned by [`wait`](Self::wait).
    pub unsafe fn submit(
        &mut self,
        kind: RequestType,
        sector: u64,
        data: &[Seg],
        indirect: bool,
        tag: u32,
    ) -> Result<Submit, &'static str> {
        if self.free_slots == 0 {
            return Ok(Submit::Busy);
        }
        let slot = self.free_slots.trailing_zeros() as usize;
        let slot_addr = self.slots.addr() + (slot * SLOT_SIZE) as u64;

        // Header, data segments split to `size_max`, status byte.
        let data_bufs: usize = data
            .iter()
            .map(|seg| seg.len.div_ceil(self.size_max) as usize)
            .sum();
        if data_bufs > self.max_segments {
            return Err("too-many-segments");
        }
        let count = data_bufs + 2;
        let bufs = RequestBufs {
            header: Some(Buf {
                addr: slot_addr + SLOT_HEADER as u64,
                len: 16,
                device_writes: false,
            }),
            data: data.iter(),
            rest: Seg { addr: 0, len: 0 },
            size_max: self.size_max,
            device_writes: kind.device_writes_data(),
            status: Some(Buf {
                addr: slot_addr + SLOT_STATUS as u64,
                len: 1,
                device_writes: true,
            }),
        };

        let indirect = indirect && self.has(F_INDIRECT_DESC);
        let needed = if indirect { 1 } else { count };
        if needed > usize::from(self.queue.size()) {
            return Err("request-longer-than-queue");
        }
        if needed > usize::from(self.queue.num_free()) {
            return Ok(Submit::Busy);
        }

        // SAFETY: the slot is free, so neither the device nor another request
        // uses its header, status byte or table; all three lie inside `slots`.
        unsafe {
            write_volatile((slot_addr + SLOT_HEADER as u64) as *mut u32, kind as u32);
            write_volatile((slot_addr + SLOT_HEADER as u64 + 4) as *mut u32, 0);
            write_volatile((slot_addr + SLOT_HEADER as u64 + 8) as *mut u64, sector);
            write_volatile((slot_addr + SLOT_STATUS as u64) as *mut u8, STATUS_UNSET);
        }
        let token = slot as u16;
        // SAFETY: the header, status and table belong to the free slot until
        // `wait` returns this request; the caller vouches for the data
        // segments. Both `add` calls were checked to fit above.
        let added = unsafe {
            if indirect {
                let table = slot_addr + SLOT_TABLE as u64;
                self.queue.add_indirect(table, bufs, count, token)
            } else {
                self.queue.add(bufs, count, token)
            }
        };
        if added.is_err() {
            return Ok(Submit::Busy);
        }
        self.free_slots &= !(1 << slot);
        self.tags[slot] = tag;
        Ok(Submit::Queued)
    }

    /// Notifies the device of new requests, if it wants to be notified.
    pub fn kick(&mut self) {
        if self.queue.needs_notification() {
            self.transport.notify(0);
            self.notifications += 1;
        }
    }

    /// Waits for the next completion (in the device's order). Kicks first.
    pub fn wait(&mut self) -> Result<Completion, &'static str> {
        self.kick();
        if self.in_flight() == 0 {
            return Err("wait-with-nothing-in-flight");
        }
        let deadline = Deadline::after_us(REQUEST_TIMEOUT_US);
        let mut polls: u32 = 0;
        loop {
            if let Some(used) = self.queue.pop_used()? {
                let slot = usize::from(used.token);
                if slot >= MAX_IN_FLIGHT || self.free_slots & (1 << slot) != 0 {
                    return Err("bad-used-id");
                }
                let status_addr = self.slots.addr() + (slot * SLOT_SIZE + SLOT_STATUS) as u64;
                // SAFETY: the status byte of a slot whose request the device
                // has just returned; volatile because the device wrote it.
                let status = unsafe { read_volatile(status_addr as *const u8) };
                self.free_slots |= 1 << slot;
                return Ok(Completion {
                    tag: self.tags[slot],
                    status,
                });
            }
            // Every instruction costs about 0.5 us on kvm-pvm: look at the
            // clock only now and then.
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64) && deadline.expired() {
                return Err("blk-timeout");
            }
            spin_loop();
        }
    }

    /// Submits one request with nothing else in flight and waits for its status.
    ///
    /// # Safety
    /// As for [`submit`](Self::submit), until this returns.
    pub unsafe fn run(
        &mut self,
        kind: RequestType,
        sector: u64,
        data: &[Seg],
        indirect: bool,
    ) -> Result<u8, &'static str> {
        if self.in_flight() != 0 {
            return Err("run-with-requests-in-flight");
        }
        // SAFETY: passed on from the caller.
        match unsafe { self.submit(kind, sector, data, indirect, 0) }? {
            Submit::Queued => Ok(self.wait()?.status),
            // Nothing is in flight, so it can never fit.
            Submit::Busy => Err("request-does-not-fit"),
        }
    }
}

/// The buffers of one request in chain order, made as the queue writes the
/// descriptors (no array to fill and clear on every request): the header,
/// the data segments cut to at most `size_max` bytes, the status byte.
struct RequestBufs<'a> {
    header: Option<Buf>,
    data: core::slice::Iter<'a, Seg>,
    /// What is left of the data segment being cut.
    rest: Seg,
    size_max: u32,
    device_writes: bool,
    status: Option<Buf>,
}

impl Iterator for RequestBufs<'_> {
    type Item = Buf;

    fn next(&mut self) -> Option<Buf> {
        if let Some(header) = self.header.take() {
            return Some(header);
        }
        while self.rest.len == 0 {
            match self.data.next() {
                Some(&seg) => self.rest = seg,
                None => return self.status.take(),
            }
        }
        let len = self.rest.len.min(self.size_max);
        let buf = Buf {
            addr: self.rest.addr,
            len,
            device_writes: self.device_writes,
        };
        self.rest.addr += u64::from(len);
        self.rest.len -= len;
        Some(buf)
    }
}
