//! virtio-console tests with mock queues.

use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;
use crate::virtio::test_log::{assert_logged_once, logged};
use crate::virtio::test_ring::{TestRing, returns_promptly};

#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    console: Console,
    screen: Screen,
    irq: EventFd,
    room: EventFd,
    rx: TestRing,
    tx: TestRing,
}

fn harness() -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let screen = Screen::default();
    let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut console =
        Console::new(Box::new(screen.clone()), room.try_clone().unwrap(), 80, 24).unwrap();
    let (rxq, rx) = TestRing::new(&mem, 0, QUEUE_SIZE);
    let (txq, tx) = TestRing::new(&mem, 0x1_0000, QUEUE_SIZE);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    console
        .activate(
            mem.clone(),
            Arc::new(IrqTrigger::new(irq.try_clone().unwrap())),
            0,
            vec![rxq, txq],
        )
        .unwrap();
    Harness {
        mem,
        console,
        screen,
        irq,
        room,
        rx,
        tx,
    }
}

#[test]
fn guest_output_reaches_the_screen() {
    let mut h = harness();
    h.mem
        .write_slice(b"login: ", GuestAddress(0x10_0000))
        .unwrap();
    h.tx.add_chain(&h.mem, &[(0x10_0000, 7, false)]);
    h.console.process_tx();
    assert_eq!(*h.screen.0.lock().unwrap(), b"login: ");
    assert_eq!(h.tx.all_used(&h.mem), vec![(0, 0)]);
    assert_eq!(h.irq.read().unwrap(), 1);
}

#[test]
fn input_waits_for_guest_buffers_and_is_not_lost() {
    let mut h = harness();
    let typed: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(
        h.console.push(&typed),
        1000,
        "staged while the guest has no buffers"
    );
    assert_eq!(h.console.room(), INPUT_STAGING - 1000);
    assert!(h.room.read().is_err(), "nothing drained yet");
    let mut received = Vec::new();
    for i in 0..4u64 {
        h.rx.add_chain(&h.mem, &[(0x20_0000 + i * 0x1000, 256, true)]);
    }
    h.console.process_rx();
    assert_eq!(
        h.room.read().unwrap(),
        1,
        "the reader is told there is room"
    );
    for (i, (_, len)) in h.rx.all_used(&h.mem).into_iter().enumerate() {
        let mut chunk = vec![0u8; len as usize];
        h.mem
            .read_slice(&mut chunk, GuestAddress(0x20_0000 + i as u64 * 0x1000))
            .unwrap();
        received.extend(chunk);
    }
    assert_eq!(received, typed[..1000].to_vec());
    assert_eq!(h.console.room(), INPUT_STAGING);
}

#[test]
fn staging_is_bounded() {
    let mut h = harness();
    assert_eq!(
        h.console.push(&vec![b'x'; INPUT_STAGING + 100]),
        INPUT_STAGING
    );
    assert_eq!(h.console.room(), 0);
    assert_eq!(h.console.push(b"more"), 0);
}

#[test]
fn resizing_updates_config_and_interrupts() {
    let mut h = harness();
    let mut size = [0u8; 4];
    h.console.read_config(0, &mut size);
    assert_eq!(size, [80, 0, 24, 0]);
    h.console.set_size(120, 40);
    h.console.read_config(0, &mut size);
    assert_eq!(u16::from_le_bytes([size[0], size[1]]), 120);
    assert_eq!(u16::from_le_bytes([size[2], size[3]]), 40);
    assert_eq!(h.irq.read().unwrap(), 1);
    h.console.set_size(120, 40);
    assert!(h.irq.read().is_err(), "no interrupt without a change");
    assert_ne!(
        h.console.device_features() & 1,
        0,
        "VIRTIO_CONSOLE_F_SIZE offered"
    );
}

#[test]
fn writable_transmit_buffers_are_dropped() {
    let mut h = harness();
    h.tx.add_chain(&h.mem, &[(0x10_0000, 16, true)]);
    h.console.process_tx();
    assert!(h.screen.0.lock().unwrap().is_empty());
    assert_eq!(h.tx.all_used(&h.mem).len(), 1, "returned anyway");
}

#[test]
fn an_available_index_more_than_a_queue_ahead_does_not_hang() {
    // Found by fuzz/console: see the same test in block/tests.rs.
    let mut h = harness();
    h.tx.set_avail_idx(&h.mem, QUEUE_SIZE + 1);
    h.rx.set_avail_idx(&h.mem, QUEUE_SIZE + 1);
    let h = returns_promptly(move || {
        h.console.process_tx();
        assert_eq!(h.console.push(b"typed"), 5, "staged");
        h
    });
    assert_eq!(h.tx.used_idx(&h.mem), 0);
    assert_eq!(h.rx.used_idx(&h.mem), 0);
}

#[test]
fn long_transmit_descriptors_are_copied_through_a_bounded_buffer() {
    // Found by fuzz/console: each transmit descriptor was copied through a buffer of its own
    // length, so a guest could make the VMM allocate and zero up to 4 GiB per descriptor.
    let mut h = harness();
    h.tx.add_chain(&h.mem, &[(0x30_0000, 0x100_0000, false)]); // past guest memory: dropped
    h.mem
        .write_slice(&[b'z'; 0x20_0000], GuestAddress(0x20_0000))
        .unwrap();
    h.tx.add_chain(&h.mem, &[(0x20_0000, 0x20_0000, false)]);
    h.console.process_tx();
    let screen = h.screen.0.lock().unwrap();
    assert_eq!(screen.len(), 0x20_0000);
    assert!(screen.iter().all(|b| *b == b'z'));
    assert!(h.console.tx_buf.capacity() <= TX_CHUNK);
    assert_eq!(h.tx.all_used(&h.mem).len(), 2, "both returned");
}

#[test]
fn a_broken_transmit_ring_is_logged_once_not_on_every_notification() {
    // Found by the hostile test guest: virtio-queue logged an error of its own every time the
    // device met a head index the queue does not have, or a ring whose available index ran more
    // than a queue ahead.
    let mut h = harness();
    let mut lines = Vec::new();
    for _ in 0..3 {
        h.tx.add_head(&h.mem, QUEUE_SIZE);
        h.tx.add_head(&h.mem, u16::MAX);
        lines.extend(logged(|| h.console.process_tx()));
    }
    h.tx.set_avail_idx(&h.mem, 6 + QUEUE_SIZE + 1);
    for _ in 0..3 {
        lines.extend(logged(|| h.console.process_tx()));
    }
    assert_eq!(h.tx.used_idx(&h.mem), 0, "nothing to give back");
    assert_logged_once(&lines);
    assert_eq!(lines.len(), 1, "{lines:#?}");
}
