//! Memory that virtio devices read and write behind the compiler's back.
//!
//! Two kinds, both at fixed places so that nothing is allocated at run time
//! beyond a pointer bump:
//!
//! - **Ring pages**: one set of two pages per queue, reserved in the image's
//!   `.noinit` section (untouched pages cost nothing, which matters on kvm-pvm
//!   where first touch of a page is slow). Page 1 is the descriptor table,
//!   page 2 holds the available ring (at 0) and the used ring (at 1 KiB).
//! - **The buffer arena**: 2 MiB at 16 MiB for request headers, data and
//!   indirect tables, handed out by a bump allocator. The guest checks that
//!   the e820 map calls it RAM and that the image, the boot data and the
//!   initrd are elsewhere before using it.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::bootinfo::{BootInfo, Region};

/// Most virtio devices the guest drives in one boot, and most queues: there
/// are this many ring sets, one per queue (a block device has one queue, a
/// network device two).
pub const MAX_DEVICES: usize = 8;

const PAGE_SIZE: u64 = 4096;
/// Descriptor table page, then the page with the available and used rings.
const RING_SET_SIZE: u64 = 2 * PAGE_SIZE;
/// Offset of the used ring in the second page. The available ring of a
/// 256-entry queue takes 518 bytes, the used ring 2054, so both fit.
const USED_RING_OFFSET: u64 = 1024;

/// Start of the buffer arena: above the image (loaded at 2 MiB, well under
/// 1 MiB long) and the low memory where VMMs put boot data, and below the top
/// of the smallest guest the tests boot (32 MiB), where initrds usually go.
const ARENA_BASE: u64 = 16 << 20;
/// The tests promise to need at most this much DMA memory.
const ARENA_SIZE: u64 = 2 << 20;

global_asm!(
    ".pushsection .noinit.nvmm_virtio_rings, \"aw\", @nobits",
    ".balign 4096",
    ".globl nvmm_virtio_rings",
    "nvmm_virtio_rings:",
    ".skip {size}",
    ".popsection",
    size = const MAX_DEVICES as u64 * RING_SET_SIZE,
);

unsafe extern "C" {
    /// The ring pages reserved above.
    static nvmm_virtio_rings: u8;
    /// End of the image in memory, from link.ld.
    static __image_end: u8;
}

/// Which ring sets are in use, one bit each: a set is handed out only once.
static RING_SETS_CLAIMED: AtomicU32 = AtomicU32::new(0);

/// Whether the arena has been handed out (it is handed out only once).
static ARENA_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Guest physical addresses of one queue's three rings, page aligned, not yet
/// cleared. Only one `RingPages` per set ever exists.
pub struct RingPages {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A set of ring pages nobody has claimed yet, or `None` when all
/// [`MAX_DEVICES`] are taken. Each set is handed out once per boot.
pub fn claim_ring_pages() -> Option<RingPages> {
    let n = (0..MAX_DEVICES).find(|&n| {
        let bit = 1 << n;
        RING_SETS_CLAIMED.fetch_or(bit, Ordering::AcqRel) & bit == 0
    })?;
    let base = (&raw const nvmm_virtio_rings) as u64 + n as u64 * RING_SET_SIZE;
    Some(RingPages {
        desc: base,
        avail: base + PAGE_SIZE,
        used: base + PAGE_SIZE + USED_RING_OFFSET,
    })
}

/// A range of arena memory that devices may read or write. Not `Copy`: the
/// owner decides when a device may use it and when the guest may look at it.
pub struct DmaBuf {
    addr: u64,
    len: usize,
}

/// A piece of a [`DmaBuf`] as a device sees it: an address and a length.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
}

impl DmaBuf {
    /// Guest physical (and, identity-mapped, virtual) address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The bytes `offset..offset + len` as a device segment.
    ///
    /// # Panics
    /// If the range is not inside the buffer (a bug in the caller).
    pub fn seg(&self, offset: usize, len: usize) -> Seg {
        assert!(
            offset <= self.len && len <= self.len - offset && len <= u32::MAX as usize,
            "segment {offset}+{len} outside a {}-byte DMA buffer",
            self.len
        );
        Seg {
            addr: self.addr + offset as u64,
            len: len as u32,
        }
    }

    /// The buffer's bytes, for reading.
    ///
    /// # Safety
    /// No request that lets a device write these bytes may be in flight while
    /// the slice lives.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the arena range is RAM that only this buffer covers (bump
        // allocation, checked against the e820 map and everything else the
        // guest uses); the caller rules out concurrent device writes.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// Hands the buffer over to the guest for good, as plain memory that no
    /// device ever sees (smoltcp's socket buffers): arena memory is never
    /// freed, and this `DmaBuf` was the only handle on its bytes.
    pub fn into_guest_memory(self) -> &'static mut [u8] {
        // SAFETY: as in `bytes`; consuming `self` ends the only other way to
        // reach these bytes, and the arena never hands them out again.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// The buffer's bytes, for writing.
    ///
    /// # Safety
    /// No request that lets a device read or write these bytes may be in
    /// flight while the slice lives.
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only slice.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// The bump allocator over the buffer arena. Nothing is ever freed.
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// Checks that the arena is free RAM in this VM and hands it out (once).
    pub fn claim(boot: &BootInfo) -> Result<Arena, &'static str> {
        let arena = Region {
            addr: ARENA_BASE,
            size: ARENA_SIZE,
        };
        if !boot.memmap.is_ram(&arena) {
            return Err("dma-arena-not-ram");
        }
        let image_end = (&raw const __image_end) as u64;
        let initrd_overlaps = boot.initrd.is_some_and(|initrd| initrd.overlaps(&arena));
        if image_end > ARENA_BASE || boot.uses(&arena) || initrd_overlaps {
            return Err("dma-arena-busy");
        }
        if ARENA_CLAIMED.swap(true, Ordering::AcqRel) {
            return Err("dma-arena-claimed");
        }
        Ok(Arena {
            next: ARENA_BASE,
            end: ARENA_BASE + ARENA_SIZE,
        })
    }

    /// `len` bytes aligned to `align` (a power of two), contents undefined.
    pub fn alloc(&mut self, len: usize, align: u64) -> Result<DmaBuf, &'static str> {
        let addr = self.next.next_multiple_of(align);
        let end = addr.checked_add(len as u64).ok_or("dma-arena-full")?;
        if end > self.end {
            return Err("dma-arena-full");
        }
        self.next = end;
        Ok(DmaBuf { addr, len })
    }
}
