//! virtio-net transmit and receive over a fake frame backend: random transmit chains, frames of
//! any length from the host (up to the largest a tap hands over, and beyond), receive buffers with
//! and without MRG_RXBUF, backend failures, any bytes in guest memory, resets. The device must
//! never panic or hang.
#![no_main]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::tap::{FrameBackend, VNET_HDR_LEN};
use nvmm_devices::virtio::net::{MAX_FRAME_LEN, Net, QUEUE_SIZE};
use nvmm_devices::virtio::{IrqTrigger, VirtioDevice};
use nvmm_fuzz::{Driver, QueueSize, RingLayout, RingOp};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// What the fake tap holds: frames waiting for the guest, and injected failures.
#[derive(Debug, Default)]
struct Wire {
    incoming: VecDeque<Vec<u8>>,
    fail_send: bool,
    fail_recv: bool,
}

/// A tap stand-in. Its fd (an eventfd, for `AsRawFd`) is never polled here.
struct FakeTap(Arc<Mutex<Wire>>);

fn fd() -> RawFd {
    static FD: OnceLock<EventFd> = OnceLock::new();
    FD.get_or_init(|| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .as_raw_fd()
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        fd()
    }
}

impl FrameBackend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut wire = nvmm_devices::lock(&self.0);
        if wire.fail_recv {
            return Err(io::Error::other("injected receive failure"));
        }
        let Some(frame) = wire.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // Like a tap, a frame longer than the buffer is truncated.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() > VNET_HDR_LEN && frame.len() <= VNET_HDR_LEN + MAX_FRAME_LEN);
        if nvmm_devices::lock(&self.0).fail_send {
            return Err(io::Error::other("injected send failure"));
        }
        Ok(())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// A frame from the host: its length (mostly ordinary, sometimes the largest or more) and a
/// fill byte, or explicit bytes.
#[derive(Debug)]
enum Frame {
    Sized { len: usize, fill: u8 },
    Bytes(Vec<u8>),
}

impl<'a> Arbitrary<'a> for Frame {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=3)? {
            0 => Self::Bytes(Vec::arbitrary(u)?),
            1 => Self::Sized {
                len: u.int_in_range(
                    VNET_HDR_LEN + MAX_FRAME_LEN - 16..=VNET_HDR_LEN + MAX_FRAME_LEN + 16,
                )?,
                fill: u8::arbitrary(u)?,
            },
            _ => Self::Sized {
                len: usize::from(u.int_in_range(0u16..=9100)?),
                fill: u8::arbitrary(u)?,
            },
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Setup {
    /// Negotiated features (MRG_RXBUF = bit 15 matters most).
    features: u64,
    mergeable: bool,
    rx_size: QueueSize,
    tx_size: QueueSize,
    event_idx: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Ring(RingOp),
    /// A frame arrives on the tap; the edge-triggered tap event processes receive.
    Frame(Frame),
    /// The receive queue's eventfd fired (the guest posted buffers).
    ProcessRx,
    /// The transmit queue's eventfd fired.
    ProcessTx,
    Failures {
        send: bool,
        recv: bool,
    },
    Reset(Setup),
}

const MRG_RXBUF: u64 = 1 << 15;

fn activate(net: &mut Net<FakeTap>, mem: &GuestMemoryMmap, driver: &mut Driver, setup: &Setup) {
    let mut queues = Vec::new();
    for (index, size) in [setup.rx_size, setup.tx_size].into_iter().enumerate() {
        let mut layout = RingLayout::fixed(index, size.0);
        let queue = layout.queue(QUEUE_SIZE, setup.event_idx);
        layout.size = queue.size();
        driver.set_ring(index, layout);
        queues.push(queue);
    }
    let features = if setup.mergeable {
        setup.features | MRG_RXBUF
    } else {
        setup.features & !MRG_RXBUF
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let _ = net.activate(
        mem.clone(),
        Arc::new(IrqTrigger::new(irq)),
        features,
        queues,
    );
}

fuzz_target!(|input: Input| {
    let mem = nvmm_fuzz::guest_memory();
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut net = Net::new(FakeTap(wire.clone()), [0x52, 0x54, 0, 0, 0, 1]).expect("eventfds");
    let mut driver = Driver::default();
    activate(&mut net, &mem, &mut driver, &input.setup);
    for op in &input.ops {
        match op {
            Op::Ring(ring_op) => driver.apply(&mem, ring_op),
            Op::Frame(frame) => {
                let bytes = match frame {
                    Frame::Sized { len, fill } => vec![*fill; *len],
                    Frame::Bytes(bytes) => bytes.clone(),
                };
                nvmm_devices::lock(&wire).incoming.push_back(bytes);
                net.process_rx();
            }
            Op::ProcessRx => {
                let _ = net.queue_events()[0].read();
                net.process_rx();
            }
            Op::ProcessTx => {
                let _ = net.queue_events()[1].read();
                net.process_tx();
            }
            Op::Failures { send, recv } => {
                let mut wire = nvmm_devices::lock(&wire);
                wire.fail_send = *send;
                wire.fail_recv = *recv;
            }
            Op::Reset(setup) => {
                net.reset();
                activate(&mut net, &mem, &mut driver, setup);
            }
        }
    }
});
