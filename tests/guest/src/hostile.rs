//! The `hostile` scenario: a driver that does everything wrong, to show that
//! the VMM survives it. For every virtio device on the command line it runs a
//! battery of abuses ([`ABUSES`]; README.md lists them), each ending with a
//! reset, and prints `hostile dev=N <abuse> done` after each. Then it brings
//! every device up properly and uses it with the code of the other scenarios
//! (the blk write and read-back, the ping, the console echo): ok if every
//! device still works.
//!
//! Whatever an abuse hands a device to read or write lies in one scratch area
//! of the DMA arena ([`Scratch`]), or outside RAM altogether, so a device
//! that follows the guest's descriptors can only ever touch that area. The
//! data the devices read is `\r\n` over and over: what a console prints of it
//! is blank lines, a frame made of it is garbage to the host, and a block
//! request made of it has an unknown type (0x0a0d0a0d), which never reaches
//! the disk.
//!
//! Every abuse ends with a reset (Status 0): once the device has taken it,
//! it no longer looks at the scratch area, which the next abuse rewrites.

use core::hint::spin_loop;
use core::ptr::{read_volatile, write_volatile};

use smoltcp::iface::SocketStorage;
use smoltcp::socket::icmp;

use crate::blk::F_RO;
use crate::bootinfo::{BootInfo, E820_RAM};
use crate::console_scenarios::{self, ECHO_TX};
use crate::dma::{Arena, DmaBuf};
use crate::net::F_MRG_RXBUF;
use crate::net_stack::Stack;
use crate::scenarios::{Outcome, number_option};
use crate::time::{Deadline, delay_us};
use crate::virtio_mmio::{
    CONFIG, DEVICE_ID_BLOCK, DEVICE_ID_CONSOLE, DEVICE_ID_NET, Devices, F_EVENT_IDX,
    F_INDIRECT_DESC, Found, Options, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL,
    REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX,
    REG_QUEUE_READY, REG_QUEUE_SEL, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, Transport, VERSION_MODERN, discover,
};
use crate::{blk_scenarios, net_scenarios};

const DEFAULT_SEED: u64 = 1;
const DEFAULT_ROUNDS: u64 = 2;
const DEFAULT_IDLE_MS: u64 = 200;

/// Queues the abuses give rings to: the first two (a block device has one,
/// a network device and a console two). The others stay unset.
const RING_QUEUES: u32 = 2;
/// Queue indexes probed for QueueNumMax (the device's queues come first).
const PROBED_QUEUES: u32 = 8;
/// Entries in the abuses' queues.
const QUEUE_SIZE: u16 = 16;
/// How long an abuse waits for the device to use what it published.
const SETTLE_US: u64 = 10_000;
/// Passes of random values over the registers.
const RANDOM_PASSES: usize = 4;
/// Requests published at once by `reset-in-flight`, and how often.
const IN_FLIGHT: u16 = 8;
const RESETS_IN_FLIGHT: usize = 3;
/// Discard / write-zeroes segments in the buffer `many-segments` repeats,
/// and their size.
const SEGMENTS: usize = 4096;
const SEGMENT_LEN: usize = 16;
/// Data descriptors of each `many-segments` request: an indirect table of
/// a page holds them and the header and status.
const SEGMENT_DESCS: u16 = 254;
/// How long a device may take over a request it should refuse at once.
const STALL_US: u64 = 1_000_000;
/// Block request types.
const BLK_T_DISCARD: u32 = 11;
const BLK_T_WRITE_ZEROES: u32 = 13;

const PAGE: u64 = 4096;
/// Pages of data (what descriptors point at) in the scratch area.
const DATA_PAGES: u64 = 3;
/// Per ring queue a descriptor table page and a page with the available ring
/// (at 0) and the used ring (at [`USED_OFFSET`]), then a page for indirect
/// tables, then the data.
const SCRATCH_PAGES: u64 = 2 * RING_QUEUES as u64 + 1 + DATA_PAGES;
/// Room for 256 available entries before it, and 256 used entries after.
const USED_OFFSET: u64 = 1024;
/// What the data pages hold: `\r\n` over and over.
const DATA_FILL: u64 = 0x0a0d_0a0d_0a0d_0a0d;

// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;

/// A Status bit only the device may set.
const STATUS_NEEDS_RESET: u32 = 0x40;
const ACK: u32 = STATUS_ACKNOWLEDGE;
const ACK_DRIVER: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
const FEATURES_DONE: u32 = ACK_DRIVER | STATUS_FEATURES_OK;
const ALL_DONE: u32 = FEATURES_DONE | STATUS_DRIVER_OK;

/// One abuse: what it is called in its line, the device id it is for (0:
/// any device), and what it does.
type Abuse = (&'static str, u32, fn(&mut Abuser) -> Outcome);

/// The battery, in the order it runs (README.md describes each).
const ABUSES: [Abuse; 18] = [
    ("read-registers", 0, read_registers),
    ("odd-widths", 0, odd_widths),
    ("random-registers", 0, random_registers),
    ("random-queue-registers", 0, random_queue_registers),
    ("config-space", 0, config_space),
    ("status-order", 0, status_order),
    ("queue-sizes", 0, queue_sizes),
    ("notify-unset", 0, notify_unset),
    ("rings-outside-ram", 0, rings_outside_ram),
    ("descriptor-loops", 0, descriptor_loops),
    ("buffers-outside-ram", 0, buffers_outside_ram),
    ("huge-lengths", 0, huge_lengths),
    ("bad-heads", 0, bad_heads),
    ("indirect-tables", 0, indirect_tables),
    ("avail-index-jumps", 0, avail_index_jumps),
    ("reset-in-flight", 0, reset_in_flight),
    ("late-queue-writes", 0, late_queue_writes),
    ("many-segments", DEVICE_ID_BLOCK, many_segments),
];

/// The `hostile` scenario (see the module docs and README.md).
pub fn hostile(boot: &BootInfo) -> Outcome {
    let seed = number_option(boot, b"hostile_seed", DEFAULT_SEED, "bad-hostile-seed")?;
    let rounds = number_option(
        boot,
        b"hostile_rounds",
        DEFAULT_ROUNDS,
        "bad-hostile-rounds",
    )?;
    if rounds == 0 {
        return Err("bad-hostile-rounds");
    }
    let idle_ms = number_option(
        boot,
        b"hostile_idle_ms",
        DEFAULT_IDLE_MS,
        "bad-hostile-idle-ms",
    )?;
    let idle_us = idle_ms.checked_mul(1000).ok_or("bad-hostile-idle-ms")?;
    let options = Options::from_cmdline(boot.cmdline)?;
    let mut arena = Arena::claim(boot)?;
    let mut devices = discover(boot.cmdline)?;
    let scratch = Scratch::new(&mut arena)?;
    let ram_end = ram_end(boot);
    let count = devices.iter().count();
    say!("hostile seed={seed} rounds={rounds} devices={count} ram_end=0x{ram_end:x}");
    if count == 0 {
        return Err("no-virtio-device");
    }

    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        // Every other round with event indexes (and mergeable receive buffers, which only a
        // network device offers): the device then reads and writes the event fields too.
        let features = match round % 2 {
            0 => F_INDIRECT_DESC,
            _ => F_INDIRECT_DESC | F_EVENT_IDX | F_MRG_RXBUF,
        };
        for found in devices.iter() {
            let mut abuser = Abuser::new(found, &scratch, ram_end, features, &mut rng);
            for (name, _, abuse) in ABUSES
                .into_iter()
                .filter(|&(_, id, _)| id == 0 || id == found.device_id)
            {
                let index = found.index;
                abuse(&mut abuser).inspect_err(|reason| {
                    say!("hostile dev={index} {name} failed reason={reason}")
                })?;
                say!("hostile dev={index} {name} done");
            }
        }
    }
    if idle_us > 0 {
        // The host watches nvmm's event loop meanwhile: it must be idle.
        say!("hostile idle ms={idle_ms}");
        delay_us(idle_us);
        say!("hostile idle done");
    }
    recover(boot, arena, &mut devices, options)
}

/// Brings every block, console and network device up as the other scenarios
/// do, and uses them.
fn recover(boot: &BootInfo, mut arena: Arena, devices: &mut Devices, options: Options) -> Outcome {
    let mut recovered = 0;
    for found in devices.take_all(DEVICE_ID_BLOCK) {
        let index = found.index;
        let mut dev = blk_scenarios::init(found, &mut arena, options)?;
        blk_scenarios::blk_identify(index, &mut dev, &mut arena)?;
        if dev.capacity() == 0 {
            return Err("zero-capacity");
        }
        if dev.has(F_RO) {
            blk_scenarios::blk_read_only(index, &mut dev, &mut arena)?;
        } else {
            let sectors = [0, dev.capacity() - 1];
            blk_scenarios::blk_write_read(index, &mut dev, &mut arena, &sectors)?;
        }
        say!("hostile dev={index} recovered");
        recovered += 1;
    }

    // Before the network, which takes the rest of the arena.
    let mut console = None;
    if devices
        .iter()
        .any(|found| found.device_id == DEVICE_ID_CONSOLE)
    {
        console = Some(console_scenarios::bring_up_with(
            &mut arena, devices, options, ECHO_TX,
        )?);
    }

    if devices.iter().any(|found| found.device_id == DEVICE_ID_NET) {
        let mut storage = [SocketStorage::EMPTY; 1];
        let mut metadata = [icmp::PacketMetadata::EMPTY; 8];
        let mut stack = Stack::bring_up_with(boot, arena, devices, &mut storage)?;
        let replies = net_scenarios::ping(boot, &mut stack, &mut metadata)?;
        stack.say_stats();
        if replies == 0 {
            return Err("no-reply");
        }
        say!("hostile dev={} recovered", stack.dev.index());
        recovered += 1;
    }

    if let Some(mut dev) = console {
        let index = dev.index();
        say!("hostile dev={index} vcon ready");
        dev.write(b"vcon: hostile ready\r\n")?;
        let count = console_scenarios::echo_until_eot(&mut dev)?;
        say!("hostile dev={index} vcon echoed bytes={count}");
        say!("hostile dev={index} recovered");
        recovered += 1;
    }
    say!("hostile recovered={recovered}");
    Ok(())
}

/// The end of the highest RAM entry: everything from there up is not RAM.
fn ram_end(boot: &BootInfo) -> u64 {
    boot.memmap
        .entries()
        .filter(|entry| entry.kind == E820_RAM)
        .map(|entry| entry.region.addr.saturating_add(entry.region.size))
        .max()
        .unwrap_or(0)
}

/// xorshift64, seeded from `hostile_seed=N`: the same seed writes the same
/// values.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // xorshift never leaves 0.
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 32) as u32
    }
}

/// The memory the abuses give devices: rings, indirect tables and data, in
/// the DMA arena, for this scenario alone. Only ever accessed with volatile
/// reads and writes (devices write it too), and only through methods that
/// check the address is inside.
struct Scratch {
    buf: DmaBuf,
    /// [`SEGMENTS`] discard / write-zeroes segments `{sector 0, 1 sector,
    /// flags 0}`, for `many-segments`; devices only read them.
    segments: DmaBuf,
}

impl Scratch {
    fn new(arena: &mut Arena) -> Result<Scratch, &'static str> {
        let buf = arena.alloc((SCRATCH_PAGES * PAGE) as usize, PAGE)?;
        let mut segments = arena.alloc(SEGMENTS * SEGMENT_LEN, PAGE)?;
        // SAFETY: no device knows this buffer yet.
        for segment in unsafe { segments.bytes_mut() }.chunks_exact_mut(SEGMENT_LEN) {
            // Volatile stores: a plain loop of them would become SSE code.
            // SAFETY: each segment is 16 bytes of the buffer; unaligned
            // writes are fine.
            unsafe {
                write_volatile(segment.as_mut_ptr().cast::<u64>(), 0);
                write_volatile(segment.as_mut_ptr().add(8).cast::<u64>(), 1);
            }
        }
        Ok(Scratch { buf, segments })
    }

    fn desc(&self, queue: u32) -> u64 {
        self.buf.addr() + u64::from(queue) * 2 * PAGE
    }

    fn avail(&self, queue: u32) -> u64 {
        self.desc(queue) + PAGE
    }

    fn used(&self, queue: u32) -> u64 {
        self.avail(queue) + USED_OFFSET
    }

    fn table(&self) -> u64 {
        self.buf.addr() + 2 * u64::from(RING_QUEUES) * PAGE
    }

    fn data(&self) -> u64 {
        self.table() + PAGE
    }

    /// Zeroes the rings and tables and fills the data with `\r\n`. Only
    /// while no device uses the area (after a reset).
    fn clear(&self) {
        let start = self.buf.addr();
        // SAFETY: the rings and tables are the first part of the scratch
        // area, which is this scenario's arena memory, reached only through
        // raw addresses (no reference into it exists).
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, (self.data() - start) as usize) };
        for word in (self.data()..start + SCRATCH_PAGES * PAGE).step_by(8) {
            // One volatile word at a time: LLVM would turn a loop of plain
            // stores of this constant into SSE code kvm-pvm cannot run.
            self.write64(word, DATA_FILL);
        }
    }

    fn check(&self, addr: u64, len: u64) {
        let start = self.buf.addr();
        assert!(
            addr >= start && addr + len <= start + SCRATCH_PAGES * PAGE,
            "0x{addr:x} outside the scratch area"
        );
    }

    fn write16(&self, addr: u64, value: u16) {
        self.check(addr, 2);
        // SAFETY: inside the scratch area (checked), which is this scenario's
        // arena memory; devices may write it at the same time, hence volatile.
        unsafe { write_volatile(addr as *mut u16, value) }
    }

    fn write32(&self, addr: u64, value: u32) {
        self.check(addr, 4);
        // SAFETY: as in `write16`.
        unsafe { write_volatile(addr as *mut u32, value) }
    }

    fn write64(&self, addr: u64, value: u64) {
        self.check(addr, 8);
        // SAFETY: as in `write16`.
        unsafe { write_volatile(addr as *mut u64, value) }
    }

    fn read16(&self, addr: u64) -> u16 {
        self.check(addr, 2);
        // SAFETY: as in `write16`, for a read.
        unsafe { read_volatile(addr as *const u16) }
    }

    /// Writes the descriptor at `at` (in a descriptor table or an indirect table).
    fn put_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        self.write64(at, addr);
        self.write32(at + 8, len);
        self.write16(at + 12, flags);
        self.write16(at + 14, next);
    }
}

/// One device under abuse.
struct Abuser<'a> {
    index: usize,
    device_id: u32,
    transport: &'a Transport,
    /// Queues the device has (QueueNumMax not 0).
    queues: u32,
    scratch: &'a Scratch,
    ram_end: u64,
    /// The features to accept (when offered) on every negotiation.
    features: u64,
    rng: &'a mut Rng,
}

impl<'a> Abuser<'a> {
    fn new(
        found: &'a Found,
        scratch: &'a Scratch,
        ram_end: u64,
        features: u64,
        rng: &'a mut Rng,
    ) -> Abuser<'a> {
        let transport = &found.transport;
        let queues = (0..PROBED_QUEUES)
            .take_while(|&queue| transport.queue_max(queue) != 0)
            .count() as u32;
        Abuser {
            index: found.index,
            device_id: found.device_id,
            transport,
            queues,
            scratch,
            ram_end,
            features,
            rng,
        }
    }

    fn peek(&self, offset: u64) -> u32 {
        self.transport.peek(offset, 4) as u32
    }

    fn poke(&self, offset: u64, value: u32) {
        self.transport.poke(offset, 4, u64::from(value));
    }

    fn poke64(&self, low: u64, value: u64) {
        self.poke(low, value as u32);
        self.poke(low + 4, (value >> 32) as u32);
    }

    fn random(&mut self) -> u32 {
        self.rng.next()
    }

    fn random64(&mut self) -> u64 {
        u64::from(self.rng.next()) << 32 | u64::from(self.rng.next())
    }

    /// The queues that get scratch rings.
    fn ring_queues(&self) -> u32 {
        self.queues.min(RING_QUEUES)
    }

    /// A clean scratch area (every abuse ends with a reset, so no device
    /// uses it between abuses).
    fn clear(&self) {
        self.scratch.clear();
    }

    /// Reset, ACKNOWLEDGE, DRIVER, VERSION_1 and the round's features,
    /// FEATURES_OK.
    fn negotiate(&self) -> Outcome {
        self.transport.negotiate(self.features).map(|_| ())
    }

    /// Points every ring queue at its scratch rings ([`QUEUE_SIZE`] entries)
    /// and enables it.
    fn set_rings(&self) {
        for queue in 0..self.ring_queues() {
            self.poke(REG_QUEUE_SEL, queue);
            self.poke(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.poke64(REG_QUEUE_DESC_LOW, self.scratch.desc(queue));
            self.poke64(REG_QUEUE_DRIVER_LOW, self.scratch.avail(queue));
            self.poke64(REG_QUEUE_DEVICE_LOW, self.scratch.used(queue));
            self.poke(REG_QUEUE_READY, 1);
        }
    }

    /// A clean scratch area, negotiation, rings and DRIVER_OK: a working
    /// device with empty rings.
    fn start(&self) -> Outcome {
        self.clear();
        self.negotiate()?;
        self.set_rings();
        self.transport.driver_ok()
    }

    /// Writes descriptor `index` of queue `queue`'s table.
    fn desc(&self, queue: u32, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.scratch.desc(queue) + u64::from(index) * 16;
        self.scratch.put_desc(at, addr, len, flags, next);
    }

    /// Puts `heads` in queue `queue`'s available ring from slot 0 and
    /// publishes them (the available index becomes their count).
    fn publish(&self, queue: u32, heads: &[u16]) {
        let avail = self.scratch.avail(queue);
        for (slot, &head) in heads.iter().enumerate() {
            self.scratch.write16(avail + 4 + 2 * slot as u64, head);
        }
        self.set_avail_idx(queue, heads.len() as u16);
    }

    fn set_avail_idx(&self, queue: u32, idx: u16) {
        self.scratch.write16(self.scratch.avail(queue) + 2, idx);
    }

    fn notify(&self, queue: u32) {
        self.poke(REG_QUEUE_NOTIFY, queue);
    }

    fn notify_all(&self) {
        for queue in 0..self.ring_queues() {
            self.notify(queue);
        }
    }

    /// Waits until the device has used `count` chains of the last ring
    /// queue (the only one of a block device, the transmit queue of a
    /// network device or console: receive queues see no traffic here), or
    /// [`SETTLE_US`] have passed.
    fn settle(&self, count: u16) {
        let Some(queue) = self.ring_queues().checked_sub(1) else {
            return;
        };
        let deadline = Deadline::after_us(SETTLE_US);
        while self.scratch.read16(self.scratch.used(queue) + 2) < count && !deadline.expired() {
            spin_loop();
        }
    }

    /// Resets the device and checks it still says what it is.
    fn end(&self) -> Outcome {
        self.transport.reset()?;
        let identity = self.transport.identity();
        if !Transport::magic_ok(&identity)
            || identity.version != VERSION_MODERN
            || identity.device_id != self.device_id
        {
            return Err("hostile-identity-changed");
        }
        Ok(())
    }
}

// ---- the abuses: each leaves the device reset ----

/// Reads every register, and the whole window past them (the
/// configuration space and beyond) with every access width.
fn read_registers(a: &mut Abuser) -> Outcome {
    for offset in (0..CONFIG).step_by(4) {
        a.peek(offset);
    }
    for offset in (CONFIG..a.transport.window()).step_by(4) {
        a.peek(offset);
    }
    for width in [1, 2, 8] {
        for offset in (CONFIG..CONFIG + 0x100).step_by(width as usize) {
            a.transport.peek(offset, width);
        }
    }
    a.end()
}

/// Reads and writes (random values) every register 1, 2 and 8 bytes at a
/// time, which virtio-mmio does not allow.
fn odd_widths(a: &mut Abuser) -> Outcome {
    for width in [1, 2, 8] {
        for offset in (0..CONFIG).step_by(width as usize) {
            a.transport.peek(offset, width);
            let value = a.random64();
            a.transport.poke(offset, width, value);
        }
    }
    a.end()
}

/// Random values to every register, from a reset device.
fn random_registers(a: &mut Abuser) -> Outcome {
    a.transport.reset()?;
    for _ in 0..RANDOM_PASSES {
        for offset in (0..CONFIG).step_by(4) {
            let value = a.random();
            a.poke(offset, value);
        }
    }
    a.end()
}

/// After FEATURES_OK, random values to every register from QueueNum on, for
/// each of the device's queues; then QueueReady and DRIVER_OK, which the
/// device must survive (the rings are wherever the values put them: almost
/// surely outside RAM).
fn random_queue_registers(a: &mut Abuser) -> Outcome {
    a.negotiate()?;
    for queue in 0..a.queues {
        for _ in 0..RANDOM_PASSES {
            a.poke(REG_QUEUE_SEL, queue);
            for offset in (REG_QUEUE_NUM..=REG_QUEUE_DEVICE_HIGH).step_by(4) {
                let value = a.random();
                a.poke(offset, value);
            }
        }
        a.poke(REG_QUEUE_SEL, queue);
        a.poke(REG_QUEUE_READY, 1);
    }
    a.transport.set_status(ALL_DONE);
    a.notify_all();
    a.end()
}

/// Random writes of every width to the configuration space (and past it),
/// then reads of all of it.
fn config_space(a: &mut Abuser) -> Outcome {
    for width in [1, 2, 4, 8] {
        for offset in (CONFIG..CONFIG + 0x100).step_by(width as usize) {
            let value = a.random64();
            a.transport.poke(offset, width, value);
        }
    }
    for offset in (CONFIG + 0x100..a.transport.window()).step_by(4) {
        let value = a.random();
        a.poke(offset, value);
    }
    for offset in (CONFIG..a.transport.window()).step_by(4) {
        a.peek(offset);
    }
    a.end()
}

/// Status writes in every wrong order, each sequence from a reset: steps
/// skipped, bits cleared, FAILED and NEEDS_RESET set by the driver,
/// FEATURES_OK without VERSION_1 and with every feature bit, DRIVER_OK
/// twice and taken back.
fn status_order(a: &mut Abuser) -> Outcome {
    const SEQUENCES: [&[u32]; 11] = [
        &[STATUS_DRIVER_OK],
        &[STATUS_FEATURES_OK],
        &[ALL_DONE],
        &[ACK, ACK | STATUS_FEATURES_OK],
        &[ACK, ACK_DRIVER, ACK_DRIVER | STATUS_DRIVER_OK],
        &[ACK, ACK_DRIVER, ACK],
        &[
            ACK,
            ACK_DRIVER,
            ACK_DRIVER | STATUS_FAILED,
            FEATURES_DONE | STATUS_FAILED,
        ],
        &[0xff],
        &[u32::MAX],
        &[STATUS_NEEDS_RESET],
        &[ACK, ACK | STATUS_NEEDS_RESET, ACK_DRIVER],
    ];
    for sequence in SEQUENCES {
        a.transport.reset()?;
        for &status in sequence {
            a.transport.set_status(status);
            a.transport.status();
        }
    }

    // FEATURES_OK without VERSION_1 (a legacy driver), then with every bit
    // of every feature page, then DRIVER_OK with no queue set up.
    for pages in [[0, 0, 0, 0], [u32::MAX; 4]] {
        a.transport.reset()?;
        a.transport.set_status(ACK);
        a.transport.set_status(ACK_DRIVER);
        for (select, &bits) in pages.iter().enumerate() {
            a.poke(REG_DRIVER_FEATURES_SEL, select as u32);
            a.poke(REG_DRIVER_FEATURES, bits);
        }
        a.transport.set_status(FEATURES_DONE);
        a.transport.set_status(ALL_DONE);
        a.transport.status();
    }

    // FEATURES_OK taken back, DRIVER_OK written twice, then taken back bit
    // by bit from a working device.
    a.negotiate()?;
    a.transport.set_status(ACK_DRIVER);
    a.transport.set_status(ACK);
    a.start()?;
    for status in [
        ALL_DONE,
        FEATURES_DONE,
        ACK_DRIVER | STATUS_DRIVER_OK,
        ACK,
        ALL_DONE,
    ] {
        a.transport.set_status(status);
    }
    a.transport.set_status(ALL_DONE | STATUS_NEEDS_RESET);
    a.notify_all();
    a.end()
}

/// Queue sizes of 0, 3 (not a power of two), the maximum plus one, 0xffff,
/// and values over 16 bits, on every queue; a queue that does not exist
/// set up; then DRIVER_OK on the scratch rings (room for 256 entries).
fn queue_sizes(a: &mut Abuser) -> Outcome {
    a.clear();
    a.negotiate()?;
    for queue in 0..a.queues + 1 {
        a.poke(REG_QUEUE_SEL, queue);
        let max = a.peek(REG_QUEUE_NUM_MAX);
        for size in [
            0,
            3,
            max + 1,
            0xffff,
            0x1_0000 | u32::from(QUEUE_SIZE),
            u32::MAX,
        ] {
            a.poke(REG_QUEUE_NUM, size);
        }
        if queue < a.ring_queues() {
            a.poke64(REG_QUEUE_DESC_LOW, a.scratch.desc(queue));
            a.poke64(REG_QUEUE_DRIVER_LOW, a.scratch.avail(queue));
            a.poke64(REG_QUEUE_DEVICE_LOW, a.scratch.used(queue));
        }
        a.poke(REG_QUEUE_READY, 1);
    }
    a.transport.set_status(ALL_DONE);
    a.notify_all();
    a.end()
}

/// QueueNotify for every queue of a device with none set up (after a reset,
/// and again after FEATURES_OK), for queues it does not have, and for
/// indexes far out of range.
fn notify_unset(a: &mut Abuser) -> Outcome {
    a.transport.reset()?;
    for _ in 0..3 {
        for queue in 0..a.queues + 2 {
            a.notify(queue);
        }
        a.notify(0xffff);
        a.notify(u32::MAX);
    }
    a.negotiate()?;
    for queue in 0..a.queues + 2 {
        a.notify(queue);
    }
    a.end()
}

/// DRIVER_OK with one ring outside RAM: the descriptor table just past RAM,
/// at the device's own registers, or where its end overflows 64 bits, the
/// available ring near the top of the address space, the used ring
/// misaligned. The device must refuse the first four (no DRIVER_OK).
fn rings_outside_ram(a: &mut Abuser) -> Outcome {
    let outside: [(u64, u64); 5] = [
        (REG_QUEUE_DESC_LOW, a.ram_end),
        (REG_QUEUE_DESC_LOW, a.transport.base()),
        (REG_QUEUE_DESC_LOW, u64::MAX - 15),
        (REG_QUEUE_DRIVER_LOW, 0xffff_ffff_ffff_f000),
        (REG_QUEUE_DEVICE_LOW, a.scratch.used(0) + 1),
    ];
    for (variant, &(register, addr)) in outside.iter().enumerate() {
        a.clear();
        a.negotiate()?;
        a.set_rings();
        a.poke(REG_QUEUE_SEL, 0);
        a.poke64(register, addr);
        a.transport.set_status(ALL_DONE);
        let status = a.transport.status();
        let must_refuse = register != REG_QUEUE_DEVICE_LOW;
        if must_refuse && status & STATUS_DRIVER_OK != 0 {
            say!(
                "hostile dev={} ring outside ram variant={variant} status=0x{status:x}",
                a.index
            );
            return Err("hostile-ring-outside-ram-accepted");
        }
        // A refused activation is signalled with a configuration interrupt.
        let interrupt = a.peek(REG_INTERRUPT_STATUS);
        a.poke(REG_INTERRUPT_ACK, interrupt);
        a.notify_all();
        a.transport.reset()?;
    }
    a.end()
}

/// Chains that loop: two descriptors pointing at each other, one pointing
/// at itself, a long chain whose last entry points back into it, and a head
/// in the middle of a loop.
fn descriptor_loops(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    for queue in 0..a.ring_queues() {
        a.desc(queue, 0, data, 64, DESC_NEXT, 1);
        a.desc(queue, 1, data + 64, 64, DESC_NEXT | DESC_WRITE, 0);
        a.desc(queue, 2, data + 128, 64, DESC_NEXT | DESC_WRITE, 2);
        for index in 3..QUEUE_SIZE {
            let next = if index + 1 == QUEUE_SIZE {
                3
            } else {
                index + 1
            };
            let flags = DESC_NEXT | if index % 2 == 0 { DESC_WRITE } else { 0 };
            a.desc(
                queue,
                index,
                data + 256 + 16 * u64::from(index),
                16,
                flags,
                next,
            );
        }
        a.publish(queue, &[0, 2, 3, 1, 9]);
        a.notify(queue);
    }
    a.settle(5);
    a.end()
}

/// Buffers outside RAM: just past it, near the top of the address space,
/// where address plus length overflows, at the device's own registers,
/// straddling the end of RAM (read only), and a status byte at u64::MAX.
fn buffers_outside_ram(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    let end = a.ram_end;
    let base = a.transport.base();
    for queue in 0..a.ring_queues() {
        a.desc(queue, 0, end, 512, DESC_NEXT, 1);
        a.desc(
            queue,
            1,
            0xffff_ffff_ffff_f000,
            4096,
            DESC_NEXT | DESC_WRITE,
            2,
        );
        a.desc(queue, 2, u64::MAX - 7, 16, DESC_WRITE, 0);
        a.desc(queue, 3, base, 256, DESC_NEXT, 4);
        a.desc(queue, 4, end - 8, 64, 0, 0);
        a.desc(queue, 5, data, 16, DESC_NEXT, 6);
        a.desc(queue, 6, u64::MAX, 1, DESC_WRITE, 0);
        a.desc(queue, 7, end + (1 << 30), 64, DESC_WRITE, 0);
        a.publish(queue, &[0, 3, 5, 7, 4]);
        a.notify(queue);
    }
    a.settle(5);
    a.end()
}

/// Lengths of 0xffff_ffff, 0, and two of 2 GiB whose sum overflows 32 bits.
fn huge_lengths(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    for queue in 0..a.ring_queues() {
        a.desc(queue, 0, data, u32::MAX, DESC_NEXT, 1);
        a.desc(queue, 1, data, u32::MAX, DESC_WRITE, 0);
        a.desc(queue, 2, data, 0, DESC_NEXT, 3);
        a.desc(queue, 3, data, 0, DESC_WRITE, 0);
        a.desc(queue, 4, data, 0x8000_0000, DESC_NEXT, 5);
        a.desc(queue, 5, data + 256, 0x8000_0000, DESC_NEXT, 6);
        a.desc(queue, 6, data + 512, 16, DESC_WRITE, 0);
        a.desc(queue, 7, data, u32::MAX, 0, 0);
        a.publish(queue, &[0, 2, 4, 7]);
        a.notify(queue);
    }
    a.settle(4);
    a.end()
}

/// Available ring entries naming descriptors the queue does not have, and
/// a valid descriptor whose `next` is out of range.
fn bad_heads(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    for queue in 0..a.ring_queues() {
        a.desc(queue, 0, data, 16, DESC_NEXT, 0xffff);
        a.publish(queue, &[QUEUE_SIZE, 255, 0x8000, 0xffff, 0]);
        a.notify(queue);
    }
    a.settle(5);
    a.end()
}

/// Indirect tables that point at themselves (nested), at the ring's own
/// descriptor table, outside RAM, that are misaligned in length, empty, too
/// long, loop inside, come with NEXT set, or overflow the address space.
fn indirect_tables(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    let table = a.scratch.table();
    let scratch = a.scratch;
    // Table at +0: its only entry is an indirect descriptor naming itself.
    scratch.put_desc(table, table, 64, DESC_INDIRECT, 0);
    // Table at +256: two entries pointing at each other.
    scratch.put_desc(table + 256, data, 64, DESC_NEXT, 1);
    scratch.put_desc(table + 272, data + 64, 64, DESC_NEXT | DESC_WRITE, 0);
    // Table at +512: a buffer outside RAM, then a status byte.
    scratch.put_desc(table + 512, a.ram_end, 64, DESC_NEXT, 1);
    scratch.put_desc(table + 528, data + 128, 16, DESC_WRITE, 0);
    for queue in 0..a.ring_queues() {
        let own = a.scratch.desc(queue);
        a.desc(queue, 0, table, 64, DESC_INDIRECT, 0);
        a.desc(queue, 1, own, 16 * u32::from(QUEUE_SIZE), DESC_INDIRECT, 0);
        a.desc(queue, 2, a.ram_end, 64, DESC_INDIRECT, 0);
        a.desc(queue, 3, table + 256, 15, DESC_INDIRECT, 0);
        a.desc(queue, 4, table + 256, 0, DESC_INDIRECT, 0);
        a.desc(queue, 5, table + 256, 0xffff_fff0, DESC_INDIRECT, 0);
        a.desc(queue, 6, table + 256, 32, DESC_INDIRECT, 0);
        a.desc(queue, 7, table + 512, 32, DESC_INDIRECT | DESC_NEXT, 8);
        a.desc(queue, 8, data + 192, 16, DESC_WRITE, 0);
        a.desc(queue, 9, u64::MAX - 15, 64, DESC_INDIRECT, 0);
        a.desc(queue, 10, table + 256, 32, DESC_INDIRECT | DESC_WRITE, 0);
        a.publish(queue, &[0, 1, 2, 3, 4, 5, 6, 7, 9, 10]);
        a.notify(queue);
    }
    a.settle(10);
    a.end()
}

/// The available index jumps more than a queue size ahead, half the index
/// space ahead, back behind what the device has seen, and forward again,
/// with a notification (two) after each.
fn avail_index_jumps(a: &mut Abuser) -> Outcome {
    a.start()?;
    for idx in [QUEUE_SIZE + 1, 0x8000, 0xffff, 0, 3, QUEUE_SIZE * 4] {
        for queue in 0..a.ring_queues() {
            a.set_avail_idx(queue, idx);
            a.notify(queue);
            a.notify(queue);
        }
        a.settle(idx.min(QUEUE_SIZE));
    }
    a.end()
}

/// Requests published and notified, then a reset at once, while the device
/// may be working on them; three times.
fn reset_in_flight(a: &mut Abuser) -> Outcome {
    for _ in 0..RESETS_IN_FLIGHT {
        a.start()?;
        let data = a.scratch.data();
        let heads: [u16; IN_FLIGHT as usize] = core::array::from_fn(|i| {
            let stride = if a.device_id == DEVICE_ID_BLOCK { 3 } else { 1 };
            i as u16 * stride
        });
        for queue in 0..a.ring_queues() {
            for i in 0..IN_FLIGHT {
                let at = data + 64 * u64::from(i);
                if a.device_id == DEVICE_ID_BLOCK {
                    // GET_ID: header, 20 bytes of serial, status: harmless.
                    a.scratch.write32(at, 8);
                    a.scratch.write32(at + 4, 0);
                    a.scratch.write64(at + 8, 0);
                    let head = 3 * i;
                    a.desc(queue, head, at, 16, DESC_NEXT, head + 1);
                    a.desc(
                        queue,
                        head + 1,
                        at + 16,
                        20,
                        DESC_NEXT | DESC_WRITE,
                        head + 2,
                    );
                    a.desc(queue, head + 2, at + 40, 1, DESC_WRITE, 0);
                } else {
                    // Receive buffers on queue 0, two bytes of `\r\n` to send on the others.
                    let (len, flags) = if queue == 0 { (64, DESC_WRITE) } else { (2, 0) };
                    a.desc(queue, i, at, len, flags, 0);
                }
            }
            a.publish(queue, &heads);
            a.notify(queue);
        }
        a.transport.reset()?;
    }
    a.end()
}

/// Queue and feature registers written after DRIVER_OK (QueueReady 0, a new
/// size and new ring addresses, new driver features), then DRIVER_OK taken
/// back, then the rings used.
fn late_queue_writes(a: &mut Abuser) -> Outcome {
    a.start()?;
    for queue in 0..a.queues {
        a.poke(REG_QUEUE_SEL, queue);
        a.poke(REG_QUEUE_READY, 0);
        a.poke(REG_QUEUE_NUM, 8);
        a.poke64(REG_QUEUE_DESC_LOW, a.ram_end);
        a.poke64(REG_QUEUE_DRIVER_LOW, a.ram_end);
        a.poke64(REG_QUEUE_DEVICE_LOW, a.ram_end);
    }
    for select in 0..2 {
        a.poke(REG_DRIVER_FEATURES_SEL, select);
        a.poke(REG_DRIVER_FEATURES, u32::MAX);
    }
    a.transport.set_status(FEATURES_DONE);
    a.notify_all();
    a.end()
}

/// Block devices only: a WRITE_ZEROES and a DISCARD request, each with
/// 254 data descriptors of 4096 segments (sector 0, one sector) through an
/// indirect table: a million segments, where the device offers one per
/// request (`max_write_zeroes_seg`, `max_discard_seg`). It must answer at
/// once (within a second), not spend a system call on every segment.
fn many_segments(a: &mut Abuser) -> Outcome {
    a.start()?;
    let data = a.scratch.data();
    let table = a.scratch.table();
    let segments = a.scratch.segments.addr();
    let segments_len = (SEGMENTS * SEGMENT_LEN) as u32;
    for (slot, kind) in [BLK_T_WRITE_ZEROES, BLK_T_DISCARD].into_iter().enumerate() {
        let header = data + 64 * slot as u64;
        a.scratch.write32(header, kind);
        a.scratch.write32(header + 4, 0);
        a.scratch.write64(header + 8, 0);
        let status = header + 16;
        // One table for both: the device reads it before it completes the
        // request, and the second request is only published afterwards.
        a.scratch.put_desc(table, header, 16, DESC_NEXT, 1);
        for index in 1..=SEGMENT_DESCS {
            let at = table + 16 * u64::from(index);
            a.scratch
                .put_desc(at, segments, segments_len, DESC_NEXT, index + 1);
        }
        let last = table + 16 * u64::from(SEGMENT_DESCS + 1);
        a.scratch.put_desc(last, status, 1, DESC_WRITE, 0);
        let count = u32::from(SEGMENT_DESCS + 2);
        a.desc(0, slot as u16, table, 16 * count, DESC_INDIRECT, 0);
        let avail = a.scratch.avail(0);
        a.scratch.write16(avail + 4 + 2 * slot as u64, slot as u16);
        a.set_avail_idx(0, slot as u16 + 1);
        a.notify(0);
        let deadline = Deadline::after_us(STALL_US);
        while a.scratch.read16(a.scratch.used(0) + 2) <= slot as u16 {
            if deadline.expired() {
                return Err("hostile-device-stalled");
            }
            spin_loop();
        }
    }
    a.end()
}
