//! The driver side of a split virtqueue (virtio 1.x, section 2.7), polled.
//!
//! The guest never takes interrupts: it publishes buffers in the available
//! ring, notifies the device when the device wants to hear about it, and polls
//! the used ring for completions. With `VIRTIO_RING_F_EVENT_IDX` both
//! directions use event indexes: the driver writes `used_event` (the used
//! index after which it wants an interrupt: the next one, as an
//! interrupt-driven driver that re-enables its callback would) and honours the
//! device's `avail_event` with the spec's `vring_need_event`. Without it, the
//! used ring's `VRING_USED_F_NO_NOTIFY` flag decides.
//!
//! The descriptor table's free entries form a list through their `next`
//! fields. A chain is freed by walking its `NEXT` flags when its head comes
//! back in the used ring.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, fence};

use crate::dma::RingPages;

/// Largest queue the driver sets up (the ring pages are sized for it).
pub const MAX_QUEUE_SIZE: u16 = 256;

const DESC_SIZE: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;

// Offsets in the available ring: flags, idx, ring[size], used_event.
const AVAIL_IDX: u64 = 2;
const AVAIL_RING: u64 = 4;
// Offsets in the used ring: flags, idx, ring[size] of {id: u32, len: u32}, avail_event.
const USED_FLAGS: u64 = 0;
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;

/// Marks a descriptor that is not the head of a chain in flight.
const NO_TOKEN: u16 = u16::MAX;

/// One buffer of a request as the device sees it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub device_writes: bool,
}

/// A finished request, from the used ring.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// The token given to [`Virtqueue::add`] for this chain.
    pub token: u16,
    /// Bytes the device says it wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// The queue is too full for the chain right now (it may fit later).
#[derive(Debug)]
pub struct Full;

/// A split virtqueue in ring pages that belong to it alone.
pub struct Virtqueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    /// Head of the free descriptor list (meaningless when `num_free` is 0).
    free_head: u16,
    num_free: u16,
    /// The available index the driver has published.
    avail_idx: u16,
    /// The available index at the last notification decision.
    kicked_avail_idx: u16,
    /// The used index up to which completions have been taken.
    last_used_idx: u16,
    /// Per descriptor: the caller's token if it heads a chain in flight.
    tokens: [u16; MAX_QUEUE_SIZE as usize],
}

impl Virtqueue {
    /// Clears the rings and makes every descriptor free.
    ///
    /// # Safety
    /// `pages` must be the ring pages of exactly one queue (no other code
    /// reads or writes them), and `size` a power of two no larger than
    /// [`MAX_QUEUE_SIZE`]. The device may only use them once the transport has
    /// been told their addresses.
    pub unsafe fn new(pages: RingPages, size: u16, event_idx: bool) -> Virtqueue {
        assert!(size.is_power_of_two() && size <= MAX_QUEUE_SIZE);
        // The spec asks for zeroed rings. The descriptor table needs no
        // clearing (the device reads only descriptors the driver published),
        // and clearing costs about 0.1 us a byte on kvm-pvm: only the two
        // rings are cleared, each with its trailing event field.
        let ring = u64::from(size);
        let avail_len = (AVAIL_RING + 2 * ring + 2) as usize;
        let used_len = (USED_RING + USED_ELEM_SIZE * ring + 2) as usize;
        // SAFETY: the caller gives this queue its ring pages alone, and both
        // rings of a queue of at most MAX_QUEUE_SIZE entries lie inside them
        // (see `dma::claim_ring_pages`).
        unsafe {
            core::ptr::write_bytes(pages.avail as *mut u8, 0, avail_len);
            core::ptr::write_bytes(pages.used as *mut u8, 0, used_len);
        }
        let queue = Virtqueue {
            size,
            desc: pages.desc,
            avail: pages.avail,
            used: pages.used,
            event_idx,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            kicked_avail_idx: 0,
            last_used_idx: 0,
            tokens: [NO_TOKEN; MAX_QUEUE_SIZE as usize],
        };
        for i in 0..size {
            queue.set_desc_next(i, i.wrapping_add(1));
        }
        queue
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Free descriptors in the table.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Publishes `bufs` (exactly `count` of them) as one chain of direct
    /// descriptors. `token` (any value but `u16::MAX`) comes back in [`Used`]
    /// when the device is done.
    ///
    /// # Safety
    /// Every buffer must be memory the device may access as flagged (read, or
    /// write when `device_writes`) until the chain comes back from
    /// [`pop_used`](Self::pop_used), and that the guest does not use meanwhile.
    pub unsafe fn add(
        &mut self,
        bufs: impl Iterator<Item = Buf>,
        count: usize,
        token: u16,
    ) -> Result<(), Full> {
        assert!(count > 0 && token != NO_TOKEN);
        if count > usize::from(self.num_free) {
            return Err(Full);
        }
        let head = self.free_head;
        let mut index = head;
        for (i, buf) in bufs.take(count).enumerate() {
            let next = self.desc_next(index);
            let last = i + 1 == count;
            let flags = if buf.device_writes { DESC_F_WRITE } else { 0 }
                | if last { 0 } else { DESC_F_NEXT };
            // The free list already links the descriptors in order, so `next`
            // stays as it is; only the last one's is rewritten when freed.
            self.write_desc(self.desc_addr(index), buf.addr, buf.len, flags, next);
            index = next;
        }
        self.free_head = index;
        self.num_free -= count as u16;
        self.publish(head, token);
        Ok(())
    }

    /// Publishes `bufs` (exactly `count`) through an indirect table at
    /// `table`: one descriptor of the ring points at it.
    ///
    /// # Safety
    /// As for [`add`](Self::add); in addition `table` must be 16-byte aligned
    /// memory for `count` descriptors that the guest does not use until the
    /// chain comes back.
    pub unsafe fn add_indirect(
        &mut self,
        table: u64,
        bufs: impl Iterator<Item = Buf>,
        count: usize,
        token: u16,
    ) -> Result<(), Full> {
        assert!(count > 0 && token != NO_TOKEN && table.is_multiple_of(DESC_SIZE));
        if self.num_free == 0 {
            return Err(Full);
        }
        for (i, buf) in bufs.take(count).enumerate() {
            let last = i + 1 == count;
            let flags = if buf.device_writes { DESC_F_WRITE } else { 0 }
                | if last { 0 } else { DESC_F_NEXT };
            let next = if last { 0 } else { i as u16 + 1 };
            self.write_desc(table + i as u64 * DESC_SIZE, buf.addr, buf.len, flags, next);
        }
        let head = self.free_head;
        let next_free = self.desc_next(head);
        let table_len = count as u32 * DESC_SIZE as u32;
        self.write_desc(
            self.desc_addr(head),
            table,
            table_len,
            DESC_F_INDIRECT,
            next_free,
        );
        self.free_head = next_free;
        self.num_free -= 1;
        self.publish(head, token);
        Ok(())
    }

    /// Whether the device wants a notification for the buffers published
    /// since the last call. Call after adding, and notify if it says so.
    pub fn needs_notification(&mut self) -> bool {
        let old = self.kicked_avail_idx;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        self.kicked_avail_idx = new;
        // The new available index must be visible to the device before the
        // driver reads what the device last asked for (a store-load order,
        // which x86 keeps only with a full fence; LLVM emits `lock or`, which
        // kvm-pvm's emulator runs, not `mfence`), or both could miss a wakeup.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event = self.read16(self.used + USED_RING + USED_ELEM_SIZE * self.ring_len());
            // vring_need_event(): notify if avail_event lies in [old, new).
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read16(self.used + USED_FLAGS) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next completion from the used ring, if there is one. Fails if
    /// the device names a descriptor that does not head a chain in flight.
    pub fn pop_used(&mut self) -> Result<Option<Used>, &'static str> {
        let used_idx = self.read16(self.used + USED_IDX);
        if used_idx == self.last_used_idx {
            return Ok(None);
        }
        // Read the entry only after the index that covers it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used_idx & (self.size - 1));
        let elem = self.used + USED_RING + slot * USED_ELEM_SIZE;
        let id = self.read32(elem);
        let len = self.read32(elem + 4);
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        if self.event_idx {
            // Ask for an interrupt at the next completion, as a driver that
            // re-enables its callback after each batch does.
            let used_event = self.avail + AVAIL_RING + 2 * self.ring_len();
            self.write16(used_event, self.last_used_idx);
        }

        let head = u16::try_from(id)
            .ok()
            .filter(|&head| head < self.size)
            .ok_or("bad-used-id")?;
        let token = self.tokens[usize::from(head)];
        if token == NO_TOKEN {
            return Err("bad-used-id");
        }
        self.tokens[usize::from(head)] = NO_TOKEN;
        self.free_chain(head);
        Ok(Some(Used { token, len }))
    }

    /// Puts the chain headed by `head` back on the free list.
    fn free_chain(&mut self, head: u16) {
        let mut tail = head;
        let mut count = 1;
        // An indirect head has no NEXT flag: it is one descriptor here.
        while self.desc_flags(tail) & DESC_F_NEXT != 0 {
            tail = self.desc_next(tail);
            count += 1;
        }
        self.set_desc_next(tail, self.free_head);
        self.free_head = head;
        self.num_free += count;
    }

    /// Makes the chain at `head` visible to the device.
    fn publish(&mut self, head: u16, token: u16) {
        self.tokens[usize::from(head)] = token;
        let slot = u64::from(self.avail_idx & (self.size - 1));
        self.write16(self.avail + AVAIL_RING + 2 * slot, head);
        // The descriptors and the ring entry before the index that publishes them.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write16(self.avail + AVAIL_IDX, self.avail_idx);
    }

    fn ring_len(&self) -> u64 {
        u64::from(self.size)
    }

    fn desc_addr(&self, index: u16) -> u64 {
        self.desc + u64::from(index & (self.size - 1)) * DESC_SIZE
    }

    fn desc_next(&self, index: u16) -> u16 {
        self.read16(self.desc_addr(index) + 14)
    }

    fn desc_flags(&self, index: u16) -> u16 {
        self.read16(self.desc_addr(index) + 12)
    }

    fn set_desc_next(&self, index: u16, next: u16) {
        self.write16(self.desc_addr(index) + 14, next);
    }

    fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: `at` is a descriptor in this queue's table or in an indirect
        // table the caller of `add_indirect` handed over; both are 16-byte
        // aligned memory reserved for descriptors.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile((at + 8) as *mut u32, len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, next);
        }
    }

    fn read16(&self, addr: u64) -> u16 {
        // SAFETY: every caller passes an aligned field inside this queue's
        // ring pages, which `new` was given for this queue alone; volatile
        // because the device writes them.
        unsafe { read_volatile(addr as *const u16) }
    }

    fn read32(&self, addr: u64) -> u32 {
        // SAFETY: as in `read16` (a used ring element field).
        unsafe { read_volatile(addr as *const u32) }
    }

    fn write16(&self, addr: u64, value: u16) {
        // SAFETY: as in `read16`; the driver owns these fields.
        unsafe { write_volatile(addr as *mut u16, value) }
    }
}
