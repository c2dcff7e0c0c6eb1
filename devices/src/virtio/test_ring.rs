//! A split virtqueue driven by hand, the way a guest driver would, for device tests: lay it out,
//! then add descriptor chains and read the used ring.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The guest side of one queue.
pub struct TestRing {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
}

impl TestRing {
    /// A ring of `size` entries at `base`, and the device's view of it.
    ///
    /// Laid out here rather than by virtio-queue's `MockSplitQueue`, which puts the used ring
    /// `size` bytes after the start of the available ring's entries instead of `2 * size`: for
    /// queues of more than a few entries its rings overlap.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> (Queue, TestRing) {
        let entries = u64::from(size);
        let desc = base;
        let avail = desc + 16 * entries;
        // flags, idx, the entries, used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * entries).next_multiple_of(4);
        let end = used + 6 + 8 * entries;
        mem.write_slice(&vec![0; (end - base) as usize], GuestAddress(base))
            .unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        let ring = TestRing {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
        };
        (queue, ring)
    }

    /// Makes a chain of (addr, len, device-writable) descriptors available.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) {
        let start = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let index = (start + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(desc, GuestAddress(self.desc + u64::from(index) * 16))
                .unwrap();
        }
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(start % self.size, GuestAddress(slot))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        self.next_desc = (start + descs.len() as u16) % self.size;
    }

    /// Makes `head` available as it is, even a descriptor index the queue does not have.
    pub fn add_head(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets the available ring's index, as a driver that broke its ring might.
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Where the available ring is.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Where the used ring is.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `index`: (head, length).
    pub fn used(&self, mem: &GuestMemoryMmap, index: u16) -> (u32, u32) {
        let base = self.used + 4 + 8 * u64::from(index % self.size);
        (
            mem.read_obj(GuestAddress(base)).unwrap(),
            mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    /// Every used element so far.
    pub fn all_used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        (0..self.used_idx(mem)).map(|i| self.used(mem, i)).collect()
    }
}

/// Runs `f` on a thread and fails the test unless it returns within five seconds: whatever a
/// guest writes, a device must never spin.
pub fn returns_promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(f()));
    result
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the device did not return (it spins)")
}
