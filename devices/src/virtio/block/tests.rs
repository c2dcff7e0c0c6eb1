//! virtio-blk tests with virtio-queue's mock queues: no KVM involved.

use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::*;
use crate::virtio::test_log::{assert_logged_once, logged};
use crate::virtio::test_ring::{TestRing, returns_promptly};

const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x18_0000;

struct Harness {
    mem: GuestMemoryMmap,
    block: Block,
    irq: EventFd,
    path: PathBuf,
    ring: TestRing,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn harness(name: &str, read_only: bool) -> Harness {
    let path = std::env::temp_dir().join(format!("nvmm-blk-{}-{name}", std::process::id()));
    let file = File::create(&path).unwrap();
    file.set_len(64 * 1024).unwrap();
    let pattern: Vec<u8> = (0..64 * 1024u32).map(|i| (i / 512) as u8).collect();
    file.write_all_at(&pattern, 0).unwrap();
    let block = Block::new(&DiskConfig {
        path: path.clone(),
        read_only,
        serial: Some("disk-serial".into()),
    })
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (mut queue, ring) = TestRing::new(&mem, 0, QUEUE_SIZE);
    let mut h = Harness {
        mem,
        block,
        irq,
        path,
        ring,
    };
    queue.set_event_idx(false);
    let interrupt = Arc::new(IrqTrigger::new(h.irq.try_clone().unwrap()));
    h.block
        .activate(h.mem.clone(), interrupt, 0, vec![queue])
        .unwrap();
    h
}

impl Harness {
    /// Adds a chain of (addr, len, device-writable) descriptors to the avail ring.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) {
        self.ring.add_chain(&self.mem, descs);
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used(&self, index: u16) -> (u32, u32) {
        self.ring.used(&self.mem, index)
    }

    fn used_idx(&self) -> u16 {
        self.ring.used_idx(&self.mem)
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.header(kind, sector);
        let mut chain = vec![(HEADER, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        let before = self.used_idx();
        self.add_chain(&chain);
        self.block.process_queue();
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "request not completed"
        );
        (self.status(), self.used(before).1)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut data, offset)
            .unwrap();
        data
    }
}

#[test]
fn read_fills_guest_buffers_across_descriptors() {
    let mut h = harness("read", false);
    let (status, len) = h.request(
        VIRTIO_BLK_T_IN,
        2,
        &[(DATA, 512, true), (DATA + 0x1000, 1024, true)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 1536 + 1));
    let mut first = [0u8; 512];
    h.mem.read_slice(&mut first, GuestAddress(DATA)).unwrap();
    assert!(first.iter().all(|b| *b == 2));
    let mut rest = [0u8; 1024];
    h.mem
        .read_slice(&mut rest, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(rest[..512].iter().all(|b| *b == 3) && rest[512..].iter().all(|b| *b == 4));
    assert_eq!(h.irq.read().unwrap(), 1, "driver interrupted");
}

#[test]
fn write_and_flush_reach_the_file() {
    let mut h = harness("write", false);
    h.mem
        .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    let (status, len) = h.request(VIRTIO_BLK_T_OUT, 10, &[(DATA, 1024, false)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 1));
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK as u8
    );
    assert!(h.file_bytes(10 * 512, 1024).iter().all(|b| *b == 0xab));
    assert!(h.file_bytes(12 * 512, 512).iter().all(|b| *b == 12));
}

#[test]
fn read_only_disks_refuse_writes_and_keep_the_file() {
    let mut h = harness("ro", true);
    assert_ne!(h.block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.block.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    h.mem
        .write_slice(&[0xcdu8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK as u8
    );
    assert!(h.file_bytes(0, 512).iter().all(|b| *b == 0));
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = harness("id", false);
    let (status, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"disk-serial");
    assert!(id[11..].iter().all(|b| *b == 0));
}

#[test]
fn access_past_the_end_is_an_io_error() {
    let mut h = harness("end", false);
    let capacity = h.block.capacity_sectors();
    assert_eq!(capacity, 128);
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, capacity, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, capacity - 1, &[(DATA, 1024, true)])
            .0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, capacity - 1, &[(DATA, 512, true)])
            .0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn write_zeroes_clears_a_range() {
    let mut h = harness("zeroes", false);
    // One segment: sector 4, 2 sectors, flags 0.
    h.mem.write_obj(4u64, GuestAddress(DATA)).unwrap();
    h.mem.write_obj(2u32, GuestAddress(DATA + 8)).unwrap();
    h.mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)])
            .0,
        VIRTIO_BLK_S_OK as u8
    );
    assert!(h.file_bytes(4 * 512, 1024).iter().all(|b| *b == 0));
    assert!(h.file_bytes(6 * 512, 512).iter().all(|b| *b == 6));
}

#[test]
fn a_zeroing_request_with_many_segments_is_refused_at_once() {
    // Found by the hostile test guest: the device offers one segment per request, but worked
    // through every segment it was given, a system call each. A million of them in one request
    // held up the event loop (every device, and nvmm's own stop) for seconds; a queue of such
    // requests, for hours.
    let mut h = harness("segments", false);
    let segments = 16 * 1024u32;
    for index in 0..u64::from(segments) {
        let segment = DATA + 16 * index;
        h.mem.write_obj(4u64, GuestAddress(segment)).unwrap();
        h.mem.write_obj(1u32, GuestAddress(segment + 8)).unwrap();
        h.mem.write_obj(0u32, GuestAddress(segment + 12)).unwrap();
    }
    let (status, _) = returns_promptly(move || {
        let result = h.request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[(DATA, 16 * segments, false)],
        );
        assert!(
            h.file_bytes(4 * 512, 512).iter().all(|b| *b == 4),
            "sector 4 kept"
        );
        result
    });
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = harness("unsupp", false);
    assert_eq!(h.request(42, 0, &[]).0, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn malformed_chains_complete_without_stalling_the_queue() {
    let mut h = harness("malformed", false);
    // Status descriptor read-only: no status can be written, the chain is returned with len 0.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.add_chain(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    // Data outside guest memory: IOERR in the status byte.
    h.add_chain(&[
        (HEADER, 16, false),
        (0x1f_ff00, 0x1000, true),
        (STATUS + 16, 1, true),
    ]);
    // Header alone.
    h.add_chain(&[(HEADER, 16, false)]);
    // A good request after them still completes.
    h.add_chain(&[
        (HEADER, 16, false),
        (DATA, 512, true),
        (STATUS + 32, 1, true),
    ]);
    h.block.process_queue();
    assert_eq!(h.used_idx(), 4);
    assert_eq!(h.used(0).1, 0);
    let status = |offset| h.mem.read_obj::<u8>(GuestAddress(STATUS + offset)).unwrap();
    assert_eq!(status(16), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(status(32), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn notifications_before_activation_are_drained() {
    let path = std::env::temp_dir().join(format!("nvmm-blk-{}-inactive", std::process::id()));
    File::create(&path).unwrap().set_len(4096).unwrap();
    let mut block = Block::new(&DiskConfig {
        path: path.clone(),
        read_only: false,
        serial: None,
    })
    .unwrap();
    block.queue_events()[0].write(1).unwrap();
    block.process_queue();
    assert!(!block.is_activated());
    let mut id = [0u8; 4];
    block.read_config(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 8, "capacity in sectors");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn opening_rejects_directories_and_missing_files() {
    let dir = DiskConfig {
        path: std::env::temp_dir(),
        read_only: true,
        serial: None,
    };
    assert!(matches!(Block::new(&dir), Err(BlockError::NotADisk(_))));
    let missing = DiskConfig {
        path: "/nonexistent/disk.img".into(),
        read_only: false,
        serial: None,
    };
    assert!(matches!(Block::new(&missing), Err(BlockError::Open { .. })));
    let long_serial = DiskConfig {
        path: "/dev/null".into(),
        read_only: true,
        serial: Some("x".repeat(21)),
    };
    assert!(Block::new(&long_serial).is_err());
}

#[test]
fn activation_needs_exactly_one_valid_queue() {
    let mut h = harness("activate", false);
    h.block.reset();
    assert!(!h.block.is_activated());
    let interrupt = Arc::new(IrqTrigger::new(h.irq.try_clone().unwrap()));
    let err = h
        .block
        .activate(h.mem.clone(), interrupt.clone(), 0, vec![])
        .unwrap_err();
    assert_eq!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    );
    let invalid = Queue::new(QUEUE_SIZE).unwrap();
    assert_eq!(
        h.block
            .activate(h.mem.clone(), interrupt, 0, vec![invalid])
            .unwrap_err(),
        ActivateError::InvalidQueue(0)
    );
}

#[test]
fn an_available_index_more_than_a_queue_ahead_does_not_hang() {
    // Found by fuzz/blk: the driver claims more chains than the ring holds; virtio-queue pops
    // none of them, and the drain loop used to spin on "more available" forever.
    let mut h = harness("avail-too-far", false);
    h.ring.set_avail_idx(&h.mem, QUEUE_SIZE + 1);
    let h = returns_promptly(move || {
        h.block.process_queue();
        h
    });
    assert_eq!(h.ring.used_idx(&h.mem), 0);
}

#[test]
fn a_broken_ring_is_logged_once_not_on_every_notification() {
    // Found by the hostile test guest: virtio-queue logged an error of its own every time the
    // device met a head index the queue does not have, or a ring whose available index ran more
    // than a queue ahead, so a driver that kept notifying filled nvmm's log.
    let mut h = harness("broken-ring-log", false);
    let mut lines = Vec::new();
    for _ in 0..3 {
        h.ring.add_head(&h.mem, QUEUE_SIZE);
        h.ring.add_head(&h.mem, u16::MAX);
        lines.extend(logged(|| h.block.process_queue()));
    }
    h.ring.set_avail_idx(&h.mem, 6 + QUEUE_SIZE + 1);
    for _ in 0..3 {
        lines.extend(logged(|| h.block.process_queue()));
    }
    assert_eq!(h.used_idx(), 0, "nothing to give back");
    assert_logged_once(&lines);
    assert_eq!(lines.len(), 2, "{lines:#?}");
}

#[test]
fn completions_reach_the_used_ring_a_batch_at_a_time_during_the_pass() {
    let mut h = harness("batches", false);
    // Every request writes one sector from guest memory; those at `snapshots` take it from the
    // used ring itself, so the disk keeps the used index as it was when the device got there.
    let batch = USED_BATCH as u16;
    let count = 2 * batch + 1;
    let snapshots = [(batch / 2, 0), (batch + 1, batch), (count - 1, 2 * batch)];
    for i in 0..count {
        let header = HEADER + 16 * u64::from(i);
        h.mem
            .write_obj(VIRTIO_BLK_T_OUT, GuestAddress(header))
            .unwrap();
        h.mem
            .write_obj(u64::from(i), GuestAddress(header + 8))
            .unwrap();
        let data = match snapshots.iter().any(|&(at, _)| at == i) {
            true => h.ring.used_addr(),
            false => DATA,
        };
        h.add_chain(&[
            (header, 16, false),
            (data, 512, false),
            (STATUS + u64::from(i), 1, true),
        ]);
    }
    h.block.process_queue();
    assert_eq!(h.used_idx(), count);
    for (at, published) in snapshots {
        let ring = h.file_bytes(u64::from(at) * 512, 4);
        assert_eq!(
            u16::from_le_bytes([ring[2], ring[3]]),
            published,
            "used index when request {at} ran"
        );
    }
    // One pass over the ring: one interrupt.
    assert_eq!(h.irq.read().unwrap(), 1);
}

#[test]
fn requests_done_before_the_ring_breaks_are_returned_with_an_interrupt() {
    let mut h = harness("broken-mid-pass", false);
    // The request reads sector 100 (every byte 100) over the available ring from its index on:
    // the driver's index jumps 25,700 ahead, more than a queue, and the next pop fails.
    h.header(VIRTIO_BLK_T_IN, 100);
    let avail_idx = h.ring.avail_addr() + 2;
    h.add_chain(&[
        (HEADER, 16, false),
        (avail_idx, 512, true),
        (STATUS, 1, true),
    ]);
    let lines = logged(|| h.block.process_queue());
    assert_eq!(
        h.mem.read_obj::<u16>(GuestAddress(avail_idx)).unwrap(),
        0x6464
    );
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.irq.read().unwrap(), 1, "the completion is announced");
    assert!(
        lines.iter().any(|l| l.contains("broken queue")),
        "{lines:#?}"
    );
}
