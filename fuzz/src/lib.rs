//! What nvmm's fuzz targets share: a small guest memory, the guest (driver) side of split
//! virtqueues, and arbitrary addresses and lengths biased towards that memory.
//!
//! A guest controls every byte of its memory, so nothing here keeps the rings consistent: the
//! operations write descriptors, available-ring entries and indexes, and raw bytes wherever the
//! input says, including over the rings themselves. Well-formed chains are offered too, so the
//! fuzzer reaches the request handling behind the parsers quickly. Modelled on
//! `devices/src/virtio/test_ring.rs`, written by hand rather than with virtio-queue's mock queues
//! so that every field can be wrong.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Result, Unstructured};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Low guest RAM: the rings, then data buffers.
pub const LOW_LEN: u64 = 0x4_0000;
/// A second RAM region after a hole, so buffers can straddle or miss RAM.
pub const HIGH_START: u64 = 0x10_0000;
/// Length of the second region.
pub const HIGH_LEN: u64 = 0x2_0000;
/// Where data buffers start in low RAM (rings live below).
pub const DATA_START: u64 = 0x1_0000;
/// Ring layout of queue `q` in the device targets: `RING_STRIDE * q` + 0 / 0x1000 / 0x2000.
pub const RING_STRIDE: u64 = 0x4000;

/// A fresh guest memory: `[0, LOW_LEN)` and `[HIGH_START, HIGH_START + HIGH_LEN)`.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_LEN as usize),
        (GuestAddress(HIGH_START), HIGH_LEN as usize),
    ])
    .expect("a few hundred KiB of anonymous memory")
}

/// A guest-physical address: mostly inside the data area or near a region's end, sometimes on
/// the rings, sometimes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr(pub u64);

impl<'a> Arbitrary<'a> for Addr {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let addr = match u.int_in_range(0u8..=9)? {
            0..=3 => DATA_START + u64::from(u.int_in_range(0..=(LOW_LEN - DATA_START) as u32)?),
            4 | 5 => HIGH_START + u64::from(u.int_in_range(0..=HIGH_LEN as u32)?),
            // Just below the end of a region: buffers that run past it.
            6 => LOW_LEN - u64::from(u.int_in_range(0u16..=0x1000)?),
            7 => HIGH_START + HIGH_LEN - u64::from(u.int_in_range(0u16..=0x1000)?),
            // On the rings.
            8 => u64::from(u.int_in_range(0..=(DATA_START as u32 - 1))?),
            _ => u64::arbitrary(u)?,
        };
        Ok(Self(addr))
    }
}

/// A descriptor length: mostly small or whole sectors, sometimes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Len(pub u32);

impl<'a> Arbitrary<'a> for Len {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let len = match u.int_in_range(0u8..=7)? {
            0..=2 => u32::from(u.int_in_range(0u16..=4096)?),
            3 | 4 => 512 * u32::from(u.int_in_range(0u8..=128)?),
            5 => *u.choose(&[0, 1, 12, 16])?,
            _ => u32::arbitrary(u)?,
        };
        Ok(Self(len))
    }
}

/// A queue size the driver asks for: mostly a power of two, sometimes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSize(pub u16);

impl<'a> Arbitrary<'a> for QueueSize {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self(if u.ratio(7u8, 8)? {
            1 << u.int_in_range(0u8..=8)?
        } else {
            u16::arbitrary(u)?
        }))
    }
}

/// One buffer of a chain.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Buffer {
    /// Where.
    pub addr: Addr,
    /// How long.
    pub len: Len,
    /// Device-writable.
    pub writable: bool,
}

/// What a driver (or a hostile guest) does to one ring in guest memory.
#[derive(Arbitrary, Clone, Debug)]
pub enum RingOp {
    /// A chain in the next free descriptors (or, with `indirect`, in a table there), made
    /// available if `publish`.
    Chain {
        /// Which queue.
        queue: u8,
        /// The buffers, in order.
        buffers: Vec<Buffer>,
        /// Put the chain in an indirect table at this address.
        indirect: Option<Addr>,
        /// Add the head to the available ring.
        publish: bool,
    },
    /// One raw descriptor-table entry.
    Desc {
        /// Which queue.
        queue: u8,
        /// Entry (taken modulo the queue size unless `raw_index`).
        index: u16,
        /// Fields, all guest-chosen.
        addr: Addr,
        /// Length.
        len: Len,
        /// NEXT = 1, WRITE = 2, INDIRECT = 4, anything else.
        flags: u16,
        /// Next index.
        next: u16,
    },
    /// `avail.ring[avail.idx % size] = head; avail.idx += 1`.
    Publish {
        /// Which queue.
        queue: u8,
        /// Any head index, valid or not.
        head: u16,
    },
    /// `avail.idx = idx`: possibly behind, or more than a queue size ahead.
    AvailIdx {
        /// Which queue.
        queue: u8,
        /// New index.
        idx: u16,
    },
    /// `avail.flags` and the used event (event idx) at `avail.ring[size]`.
    AvailFlags {
        /// Which queue.
        queue: u8,
        /// Flags.
        flags: u16,
        /// used_event.
        used_event: u16,
    },
    /// Any bytes anywhere.
    Poke {
        /// Where.
        addr: Addr,
        /// What.
        bytes: Vec<u8>,
    },
}

/// Where a driver put one split virtqueue (the driver's belief: the device may disagree).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
}

impl RingLayout {
    /// The layout of queue `index` in the device targets, with `size` entries.
    pub fn fixed(index: usize, size: u16) -> Self {
        let base = RING_STRIDE * index as u64;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
        }
    }

    /// A device-side queue at this layout, as the transport would hand it over on DRIVER_OK
    /// (virtio-queue refuses sizes that are no power of two or exceed `max`).
    pub fn queue(&self, max: u16, event_idx: bool) -> Queue {
        let mut queue = Queue::new(max).expect("device queue sizes are powers of two");
        queue.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = split(self.desc);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(self.avail);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(self.used);
        queue.set_used_ring_address(low, high);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The driver side of a set of rings: applies [`RingOp`]s to guest memory. Writes that miss
/// guest memory are dropped, as a guest's would be.
#[derive(Debug, Default)]
pub struct Driver {
    /// Each queue's layout.
    pub rings: Vec<RingLayout>,
    next_desc: Vec<u16>,
}

impl Driver {
    /// A driver for `rings`.
    pub fn new(rings: Vec<RingLayout>) -> Self {
        let next_desc = vec![0; rings.len()];
        Self { rings, next_desc }
    }

    /// Changes a ring's layout (the driver re-initialised it).
    pub fn set_ring(&mut self, index: usize, layout: RingLayout) {
        if index >= self.rings.len() {
            self.rings.resize(index + 1, RingLayout::default());
            self.next_desc.resize(index + 1, 0);
        }
        self.rings[index] = layout;
        self.next_desc[index] = 0;
    }

    fn ring(&self, queue: u8) -> Option<(usize, RingLayout)> {
        if self.rings.is_empty() {
            return None;
        }
        let index = usize::from(queue) % self.rings.len();
        Some((index, self.rings[index]))
    }

    /// Applies `op` to `mem`.
    pub fn apply(&mut self, mem: &GuestMemoryMmap, op: &RingOp) {
        match op {
            RingOp::Chain {
                queue,
                buffers,
                indirect,
                publish,
            } => {
                let Some((index, ring)) = self.ring(*queue) else {
                    return;
                };
                let size = ring.size.max(1);
                let head = self.next_desc[index] % size;
                match indirect {
                    Some(table) => {
                        write_chain(mem, table.0, buffers, |i| i as u16 + 1);
                        let len = (buffers.len() * 16) as u32;
                        write_desc(mem, ring.desc, head, table.0, len, F_INDIRECT, 0);
                        self.next_desc[index] = head.wrapping_add(1) % size;
                    }
                    None => {
                        write_chain(mem, ring.desc + u64::from(head) * 16, buffers, |i| {
                            (head.wrapping_add(i as u16 + 1)) % size
                        });
                        self.next_desc[index] = head.wrapping_add(buffers.len() as u16) % size;
                    }
                }
                if *publish {
                    publish_head(mem, &ring, head);
                }
            }
            RingOp::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                if let Some((_, ring)) = self.ring(*queue) {
                    let slot = index % ring.size.max(1);
                    write_desc(mem, ring.desc, slot, addr.0, len.0, *flags, *next);
                }
            }
            RingOp::Publish { queue, head } => {
                if let Some((_, ring)) = self.ring(*queue) {
                    publish_head(mem, &ring, *head);
                }
            }
            RingOp::AvailIdx { queue, idx } => {
                if let Some((_, ring)) = self.ring(*queue) {
                    let _ = mem.write_obj(*idx, GuestAddress(ring.avail.wrapping_add(2)));
                }
            }
            RingOp::AvailFlags {
                queue,
                flags,
                used_event,
            } => {
                if let Some((_, ring)) = self.ring(*queue) {
                    let _ = mem.write_obj(*flags, GuestAddress(ring.avail));
                    let event = ring.avail.wrapping_add(4 + 2 * u64::from(ring.size));
                    let _ = mem.write_obj(*used_event, GuestAddress(event));
                }
            }
            RingOp::Poke { addr, bytes } => {
                let _ = mem.write_slice(bytes, GuestAddress(addr.0));
            }
        }
    }
}

/// Writes `buffers` as descriptors at `table`, linked with NEXT to `next(i)`.
fn write_chain(mem: &GuestMemoryMmap, table: u64, buffers: &[Buffer], next: impl Fn(usize) -> u16) {
    for (i, buffer) in buffers.iter().enumerate() {
        let mut flags = if buffer.writable { F_WRITE } else { 0 };
        if i + 1 < buffers.len() {
            flags |= F_NEXT;
        }
        let addr = table.wrapping_add(16 * i as u64);
        write_desc_at(mem, addr, buffer.addr.0, buffer.len.0, flags, next(i));
    }
}

fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    write_desc_at(
        mem,
        table.wrapping_add(u64::from(index) * 16),
        addr,
        len,
        flags,
        next,
    );
}

fn write_desc_at(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

fn publish_head(mem: &GuestMemoryMmap, ring: &RingLayout, head: u16) {
    let idx_addr = GuestAddress(ring.avail.wrapping_add(2));
    let Ok(idx) = mem.read_obj::<u16>(idx_addr) else {
        return;
    };
    let slot = ring
        .avail
        .wrapping_add(4 + 2 * u64::from(idx % ring.size.max(1)));
    let _ = mem.write_obj(head, GuestAddress(slot));
    let _ = mem.write_obj(idx.wrapping_add(1), idx_addr);
}

/// A scratch file (a disk image, a kernel, an initrd): created once per process and unlinked at
/// once, so a fuzzing run leaves no files behind; the code under test opens it again through
/// `/proc/self/fd`.
#[derive(Debug)]
pub struct ScratchFile {
    file: File,
}

impl ScratchFile {
    /// Creates and unlinks `nvmm-fuzz-NAME-PID` in /dev/shm (the temporary directory where
    /// there is none): rewriting a file on a disk file system costs more than a run.
    pub fn new(name: &str) -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("nvmm-fuzz-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("scratch file in the temporary directory");
        std::fs::remove_file(&path).expect("unlink the scratch file");
        Self { file }
    }

    /// A path that opens the file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Sets the file's size (any size, including 0 and partial sectors); returns its path.
    pub fn with_len(&self, len: u64) -> PathBuf {
        self.file.set_len(len).expect("resize the scratch file");
        self.path()
    }

    /// Replaces the file's contents; returns its path.
    pub fn with_contents(&self, bytes: &[u8]) -> PathBuf {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(bytes, 0)
            .expect("write the scratch file");
        self.with_len(bytes.len() as u64)
    }
}
