//! virtio-blk request parsing and execution on a scratch disk: random descriptor chains (headers,
//! lengths, flags, out-of-range addresses, loops, indirect tables), well-formed requests of every
//! type with random sectors and segments, any bytes in guest memory, resets. The device must never
//! panic or hang, whatever the guest writes.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::block::{Block, DiskConfig, QUEUE_SIZE};
use nvmm_devices::virtio::{IrqTrigger, VirtioDevice};
use nvmm_fuzz::{Addr, Buffer, Driver, Len, QueueSize, RingLayout, RingOp, ScratchFile};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Disk size in bytes (not always whole sectors), up to 256 KiB.
    disk_len: u32,
    read_only: bool,
    queue_size: QueueSize,
    event_idx: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl Kind {
    fn raw(&self) -> u32 {
        match self {
            Self::In => 0,
            Self::Out => 1,
            Self::Flush => 4,
            Self::GetId => 8,
            Self::Discard => 11,
            Self::WriteZeroes => 13,
            Self::Other(raw) => *raw,
        }
    }
}

/// A sector: mostly around the disk, sometimes anything.
#[derive(Debug)]
struct Sector(u64);

impl<'a> Arbitrary<'a> for Sector {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(if u.ratio(3u8, 4)? {
            u64::from(u.int_in_range(0u16..=520)?)
        } else {
            u64::arbitrary(u)?
        }))
    }
}

/// A discard / write-zeroes segment.
#[derive(Arbitrary, Debug)]
struct Segment {
    sector: Sector,
    sectors: u32,
    flags: u32,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Ring(RingOp),
    /// A well-formed request: header, data buffers (discard / write-zeroes segments written into
    /// the first one), status byte.
    Request {
        kind: Kind,
        sector: Sector,
        header: Addr,
        data: Vec<Buffer>,
        segments: Vec<Segment>,
        status: Addr,
        indirect: Option<Addr>,
    },
    /// The queue's eventfd fired: the event loop processes the queue.
    Process,
    ReadConfig {
        offset: u8,
        len: u8,
    },
    /// The driver resets the device and sets the queue up again.
    Reset {
        size: QueueSize,
        event_idx: bool,
    },
}

fn disk() -> &'static ScratchFile {
    static DISK: OnceLock<ScratchFile> = OnceLock::new();
    DISK.get_or_init(|| ScratchFile::new("disk"))
}

fn activate(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    driver: &mut Driver,
    size: QueueSize,
    event_idx: bool,
) {
    let mut layout = RingLayout::fixed(0, size.0);
    let queue = layout.queue(QUEUE_SIZE, event_idx);
    layout.size = queue.size();
    driver.set_ring(0, layout);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(IrqTrigger::new(irq));
    let _ = block.activate(mem.clone(), interrupt, 0, vec![queue]);
}

fn request(mem: &GuestMemoryMmap, op: &Op) -> Option<RingOp> {
    let Op::Request {
        kind,
        sector,
        header,
        data,
        segments,
        status,
        indirect,
    } = op
    else {
        return None;
    };
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.raw().to_le_bytes());
    raw[8..].copy_from_slice(&sector.0.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(header.0));
    if let Some(first) = data.first() {
        for (i, segment) in segments.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&segment.sector.0.to_le_bytes());
            raw[8..12].copy_from_slice(&segment.sectors.to_le_bytes());
            raw[12..].copy_from_slice(&segment.flags.to_le_bytes());
            let at = first.addr.0.wrapping_add(16 * i as u64);
            let _ = mem.write_slice(&raw, GuestAddress(at));
        }
    }
    let mut buffers = Vec::with_capacity(data.len() + 2);
    buffers.push(Buffer {
        addr: *header,
        len: Len(16),
        writable: false,
    });
    buffers.extend_from_slice(data);
    buffers.push(Buffer {
        addr: *status,
        len: Len(1),
        writable: true,
    });
    Some(RingOp::Chain {
        queue: 0,
        buffers,
        indirect: *indirect,
        publish: true,
    })
}

fuzz_target!(|input: Input| {
    let mem = nvmm_fuzz::guest_memory();
    let path = disk().with_len(u64::from(input.disk_len % (256 * 1024 + 1)));
    let config = DiskConfig {
        path,
        read_only: input.read_only,
        serial: None,
    };
    let mut block = Block::new(&config).expect("the scratch disk opens");
    let mut driver = Driver::default();
    activate(
        &mut block,
        &mem,
        &mut driver,
        input.queue_size,
        input.event_idx,
    );
    for op in &input.ops {
        match op {
            Op::Ring(ring_op) => driver.apply(&mem, ring_op),
            Op::Request { .. } => {
                if let Some(chain) = request(&mem, op) {
                    driver.apply(&mem, &chain);
                }
            }
            Op::Process => {
                let _ = block.queue_events()[0].read();
                block.process_queue();
            }
            Op::ReadConfig { offset, len } => {
                let mut data = vec![0u8; usize::from(*len % 16)];
                block.read_config(u64::from(*offset), &mut data);
            }
            Op::Reset { size, event_idx } => {
                block.reset();
                activate(&mut block, &mem, &mut driver, *size, *event_idx);
            }
        }
    }
});
