//! The virtio-mmio transport in front of each device type (virtio-blk on a scratch disk,
//! virtio-net on a fake tap, virtio-console): sequences of register reads and writes of any
//! width and value, device status transitions, feature pages, queue set-up with random
//! addresses and sizes, notifications, interrupt acks, config space, and the event loop serving
//! the queue eventfds in between. Guest memory holds whatever the input puts there. Neither the
//! transport nor the device behind it may panic or hang.
#![no_main]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nvmm_devices::bus::BusDevice;
use nvmm_devices::virtio::block::{Block, DiskConfig};
use nvmm_devices::virtio::console::Console;
use nvmm_devices::virtio::mmio::MmioTransport;
use nvmm_devices::virtio::net::Net;
use nvmm_devices::virtio::net::tap::FrameBackend;
use nvmm_devices::virtio::{IrqTrigger, VirtioDevice};
use nvmm_devices::{InputSink, lock};
use nvmm_fuzz::{Addr, Driver, QueueSize, RingLayout, RingOp, ScratchFile};
use vmm_sys_util::eventfd::EventFd;

// Register offsets (virtio 1.x, MMIO layout version 2).
const DEVICE_FEATURES_SEL: u16 = 0x14;
const DRIVER_FEATURES: u16 = 0x20;
const DRIVER_FEATURES_SEL: u16 = 0x24;
const QUEUE_SEL: u16 = 0x30;
const QUEUE_NUM: u16 = 0x38;
const QUEUE_READY: u16 = 0x44;
const QUEUE_NOTIFY: u16 = 0x50;
const INTERRUPT_ACK: u16 = 0x64;
const STATUS: u16 = 0x70;
const QUEUE_DESC_LOW: u16 = 0x80;
const QUEUE_DESC_HIGH: u16 = 0x84;
const QUEUE_AVAIL_LOW: u16 = 0x90;
const QUEUE_AVAIL_HIGH: u16 = 0x94;
const QUEUE_USED_LOW: u16 = 0xa0;
const QUEUE_USED_HIGH: u16 = 0xa4;
/// Every register, for reads and writes that hit one.
const REGISTERS: [u16; 25] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xfc, 0x100, 0x108,
];

/// An offset in the 4 KiB window: a register, config space, or anything.
#[derive(Debug, Clone, Copy)]
struct Offset(u64);

impl<'a> Arbitrary<'a> for Offset {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(match u.int_in_range(0u8..=3)? {
            0 | 1 => u64::from(*u.choose(&REGISTERS)?),
            2 => 0x100 + u64::from(u.int_in_range(0u8..=0x40)?),
            _ => u64::from(u.int_in_range(0u16..=0xfff)?),
        }))
    }
}

/// A status value: the driver's steps, FAILED, reset, or anything.
#[derive(Debug, Clone, Copy)]
struct Status(u32);

impl<'a> Arbitrary<'a> for Status {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(if u.ratio(7u8, 8)? {
            *u.choose(&[0, 0x1, 0x3, 0xb, 0xf, 0x83, 0x8b, 0x8f, 0x4b, 0x40])?
        } else {
            u32::arbitrary(u)?
        }))
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: Offset,
        width: u8,
    },
    Write {
        offset: Offset,
        width: u8,
        value: u64,
    },
    Status(Status),
    /// DRIVER_FEATURES_SEL = page; DRIVER_FEATURES = value.
    Features {
        page: u32,
        value: u32,
    },
    /// What a driver does up to FEATURES_OK: ACKNOWLEDGE, DRIVER, both feature pages (with
    /// VERSION_1, without which FEATURES_OK is refused), FEATURES_OK.
    Handshake {
        low: u32,
        high: u32,
    },
    /// What a driver writes to set up one queue (ready last).
    QueueSetup {
        index: u8,
        size: QueueSize,
        desc: Addr,
        avail: Addr,
        used: Addr,
        ready: bool,
    },
    Notify(u32),
    InterruptAck(u32),
    /// The guest writes its memory (rings as the driver set them up, or anywhere).
    Ring(RingOp),
    /// The event loop serves whatever queue eventfds fired.
    EventLoop,
    /// Host input: keystrokes for the console, a frame for net.
    HostInput(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum DeviceKind {
    Block { read_only: bool, disk_len: u16 },
    Net,
    Console { cols: u16, rows: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: DeviceKind,
    ops: Vec<Op>,
}

/// A tap stand-in holding frames for the guest.
struct FakeTap(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        static FD: OnceLock<EventFd> = OnceLock::new();
        FD.get_or_init(|| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .as_raw_fd()
    }
}

impl FrameBackend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = lock(&self.0).pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// The device behind the transport, typed, so the "event loop" can call its queue handlers.
enum Device {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net<FakeTap>>>, Arc<Mutex<VecDeque<Vec<u8>>>>),
    Console(Arc<Mutex<Console>>),
}

impl Device {
    fn new(kind: &DeviceKind) -> Self {
        match kind {
            DeviceKind::Block {
                read_only,
                disk_len,
            } => {
                static DISK: OnceLock<ScratchFile> = OnceLock::new();
                let disk = DISK.get_or_init(|| ScratchFile::new("disk"));
                let config = DiskConfig {
                    path: disk.with_len(u64::from(*disk_len) * 8),
                    read_only: *read_only,
                    serial: None,
                };
                Self::Block(Arc::new(Mutex::new(
                    Block::new(&config).expect("the scratch disk opens"),
                )))
            }
            DeviceKind::Net => {
                let wire = Arc::new(Mutex::new(VecDeque::new()));
                let net =
                    Net::new(FakeTap(wire.clone()), [0x52, 0x54, 0, 0, 0, 2]).expect("eventfds");
                Self::Net(Arc::new(Mutex::new(net)), wire)
            }
            DeviceKind::Console { cols, rows } => {
                let room = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
                let console =
                    Console::new(Box::new(io::sink()), room, *cols, *rows).expect("eventfds");
                Self::Console(Arc::new(Mutex::new(console)))
            }
        }
    }

    fn as_virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block(d) => d.clone(),
            Self::Net(d, _) => d.clone(),
            Self::Console(d) => d.clone(),
        }
    }

    /// What the VMM's event loop does when the device's eventfds fire.
    fn event_loop(&self) {
        match self {
            Self::Block(d) => {
                let mut d = lock(d);
                if d.queue_events()[0].read().is_ok() && d.is_activated() {
                    d.process_queue();
                }
            }
            Self::Net(d, _) => {
                let mut d = lock(d);
                if d.queue_events()[0].read().is_ok() {
                    d.process_rx();
                }
                if d.queue_events()[1].read().is_ok() {
                    d.process_tx();
                }
            }
            Self::Console(d) => {
                let mut d = lock(d);
                if d.queue_events()[0].read().is_ok() {
                    d.process_rx();
                }
                if d.queue_events()[1].read().is_ok() {
                    d.process_tx();
                }
            }
        }
    }

    fn host_input(&self, bytes: &[u8]) {
        match self {
            Self::Block(_) => {}
            Self::Net(d, wire) => {
                lock(wire).push_back(bytes.to_vec());
                // The tap became readable (edge-triggered).
                lock(d).process_rx();
            }
            Self::Console(d) => {
                let mut d = lock(d);
                let room = d.room();
                assert!(d.push(bytes) <= room);
            }
        }
    }
}

/// The driver's own record of what it wrote to the queue registers, so ring operations land
/// where it told the device its rings are.
#[derive(Default)]
struct Shadow {
    queue_sel: u32,
    queues: Vec<RingLayout>,
}

impl Shadow {
    fn observe(&mut self, offset: u64, data: &[u8], driver: &mut Driver) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let Ok(offset) = u16::try_from(offset) else {
            return;
        };
        if offset == QUEUE_SEL {
            self.queue_sel = value;
            return;
        }
        let index = self.queue_sel as usize;
        if index >= 4 {
            return;
        }
        if self.queues.len() <= index {
            self.queues.resize(index + 1, RingLayout::default());
        }
        let ring = &mut self.queues[index];
        let low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM => ring.size = value as u16,
            QUEUE_DESC_LOW => low(&mut ring.desc),
            QUEUE_DESC_HIGH => high(&mut ring.desc),
            QUEUE_AVAIL_LOW => low(&mut ring.avail),
            QUEUE_AVAIL_HIGH => high(&mut ring.avail),
            QUEUE_USED_LOW => low(&mut ring.used),
            QUEUE_USED_HIGH => high(&mut ring.used),
            _ => return,
        }
        driver.set_ring(index, *ring);
    }
}

struct Guest {
    transport: MmioTransport,
    shadow: Shadow,
    driver: Driver,
}

impl Guest {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.shadow.observe(offset, data, &mut self.driver);
        self.transport.write(0, offset, data);
    }

    fn write32(&mut self, offset: u16, value: u32) {
        self.write(u64::from(offset), &value.to_le_bytes());
    }
}

fuzz_target!(|input: Input| {
    let mem = nvmm_fuzz::guest_memory();
    let device = Device::new(&input.device);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(IrqTrigger::new(irq));
    let transport = MmioTransport::new(device.as_virtio(), mem.clone(), interrupt)
        .expect("device queue sizes are valid");
    let mut guest = Guest {
        transport,
        shadow: Shadow::default(),
        driver: Driver::default(),
    };
    for op in &input.ops {
        match op {
            Op::Read { offset, width } => {
                let mut data = vec![0u8; usize::from(*width % 9)];
                guest.transport.read(0, offset.0, &mut data);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                let len = usize::from(*width % 9);
                guest.write(offset.0, &value.to_le_bytes()[..len]);
            }
            Op::Status(status) => guest.write32(STATUS, status.0),
            Op::Features { page, value } => {
                guest.write32(DRIVER_FEATURES_SEL, *page);
                guest.write32(DRIVER_FEATURES, *value);
                guest.write32(DEVICE_FEATURES_SEL, *page);
            }
            Op::Handshake { low, high } => {
                guest.write32(STATUS, 0x1);
                guest.write32(STATUS, 0x3);
                for (page, value) in [(0, *low), (1, *high | 1)] {
                    guest.write32(DEVICE_FEATURES_SEL, page);
                    guest.write32(DRIVER_FEATURES_SEL, page);
                    guest.write32(DRIVER_FEATURES, value);
                }
                guest.write32(STATUS, 0xb);
            }
            Op::QueueSetup {
                index,
                size,
                desc,
                avail,
                used,
                ready,
            } => {
                guest.write32(QUEUE_SEL, u32::from(*index % 4));
                guest.write32(QUEUE_NUM, u32::from(size.0));
                for (low, addr) in [
                    (QUEUE_DESC_LOW, desc),
                    (QUEUE_AVAIL_LOW, avail),
                    (QUEUE_USED_LOW, used),
                ] {
                    guest.write32(low, addr.0 as u32);
                    guest.write32(low + 4, (addr.0 >> 32) as u32);
                }
                guest.write32(QUEUE_READY, u32::from(*ready));
            }
            Op::Notify(queue) => guest.write32(QUEUE_NOTIFY, *queue),
            Op::InterruptAck(bits) => guest.write32(INTERRUPT_ACK, *bits),
            Op::Ring(ring_op) => guest.driver.apply(&mem, ring_op),
            Op::EventLoop => device.event_loop(),
            Op::HostInput(bytes) => device.host_input(bytes),
        }
    }
});
