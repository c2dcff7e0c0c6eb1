//! virtio-console queues: random transmit chains (guest output), receive buffers for staged host
//! input, host input of any size, terminal resizes, failing output, any bytes in guest memory,
//! resets. The device must never panic or hang, and never stage more input than it said it has
//! room for.
#![no_main]

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nvmm_devices::InputSink;
use nvmm_devices::virtio::console::{Console, QUEUE_SIZE};
use nvmm_devices::virtio::{IrqTrigger, VirtioDevice};
use nvmm_fuzz::{Driver, QueueSize, RingLayout, RingOp};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The terminal: discards output, or fails when told to.
struct Screen(Arc<AtomicBool>);

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.load(Ordering::Relaxed) {
            Err(io::Error::other("injected output failure"))
        } else {
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct Setup {
    rx_size: QueueSize,
    tx_size: QueueSize,
    event_idx: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cols: u16,
    rows: u16,
    setup: Setup,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Ring(RingOp),
    /// Host keystrokes: `count` copies of `byte`, or explicit bytes.
    Input {
        byte: u8,
        count: u16,
    },
    InputBytes(Vec<u8>),
    ProcessRx,
    ProcessTx,
    Resize {
        cols: u16,
        rows: u16,
    },
    ReadConfig {
        offset: u8,
        len: u8,
    },
    OutputFails(bool),
    Reset(Setup),
}

fn room_fd() -> &'static EventFd {
    static ROOM: OnceLock<EventFd> = OnceLock::new();
    ROOM.get_or_init(|| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
}

fn activate(console: &mut Console, mem: &GuestMemoryMmap, driver: &mut Driver, setup: &Setup) {
    let mut queues = Vec::new();
    for (index, size) in [setup.rx_size, setup.tx_size].into_iter().enumerate() {
        let mut layout = RingLayout::fixed(index, size.0);
        let queue = layout.queue(QUEUE_SIZE, setup.event_idx);
        layout.size = queue.size();
        driver.set_ring(index, layout);
        queues.push(queue);
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let _ = console.activate(mem.clone(), Arc::new(IrqTrigger::new(irq)), 1, queues);
}

fn push(console: &mut Console, bytes: &[u8]) {
    let room = console.room();
    let taken = console.push(bytes);
    assert!(taken <= room && taken <= bytes.len());
}

fuzz_target!(|input: Input| {
    let mem = nvmm_fuzz::guest_memory();
    let fails = Arc::new(AtomicBool::new(false));
    let room = room_fd().try_clone().expect("dup eventfd");
    let mut console = Console::new(
        Box::new(Screen(fails.clone())),
        room,
        input.cols,
        input.rows,
    )
    .expect("eventfds");
    let mut driver = Driver::default();
    activate(&mut console, &mem, &mut driver, &input.setup);
    for op in &input.ops {
        match op {
            Op::Ring(ring_op) => driver.apply(&mem, ring_op),
            Op::Input { byte, count } => push(&mut console, &vec![*byte; usize::from(*count)]),
            Op::InputBytes(bytes) => push(&mut console, bytes),
            Op::ProcessRx => {
                let _ = console.queue_events()[0].read();
                console.process_rx();
            }
            Op::ProcessTx => {
                let _ = console.queue_events()[1].read();
                console.process_tx();
            }
            Op::Resize { cols, rows } => {
                console.set_size(*cols, *rows);
                assert_eq!(console.size(), (*cols, *rows));
            }
            Op::ReadConfig { offset, len } => {
                let mut data = vec![0u8; usize::from(*len % 16)];
                console.read_config(u64::from(*offset), &mut data);
            }
            Op::OutputFails(fail) => fails.store(*fail, Ordering::Relaxed),
            Op::Reset(setup) => {
                console.reset();
                activate(&mut console, &mem, &mut driver, setup);
            }
        }
    }
    let _ = room_fd().read();
});
