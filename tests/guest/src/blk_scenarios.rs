//! The virtio-blk scenarios: `blk` (identity, write/flush/read-back, errors),
//! `blkhash` (checksum of the disk), `blkwrite` (write forever, to be killed)
//! and `blkbench` (timed sequential and random I/O). README.md lists their
//! exact lines and command-line options.
//!
//! Every data pattern is [`pattern_of`]: byte `i` of sector `s` is
//! `((s * 31 + i) as u8) ^ 0x5a`, which the host tests recompute. It repeats
//! every 256 sectors, so one 128 KiB buffer holds the data for any request
//! that starts on a multiple of its (power-of-two) length.

use core::cell::Cell;

use crate::blk::{
    BlkDevice, Completion, F_DISCARD, F_FLUSH, F_RO, F_WRITE_ZEROES, ID_BYTES, MAX_IN_FLIGHT,
    RequestType, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, Submit,
};
use crate::bootinfo::BootInfo;
use crate::dma::{Arena, DmaBuf, MAX_DEVICES, Seg};
use crate::io::{outb, rdtsc};
use crate::mem::{fill_bytes, zeroed};
use crate::scenarios::{
    FNV1A64_START, Outcome, cmdline_value, fnv1a64_extend, number_option, parse_decimal,
};
use crate::serial::Escaped;
use crate::time::us_since;
use crate::virtio_mmio::{
    DEVICE_ID_BLOCK, Devices, F_EVENT_IDX, F_INDIRECT_DESC, Found, INTERRUPT_USED_BUFFER, Options,
    discover,
};

/// Sectors after which the pattern repeats (31 is odd, so s * 31 mod 256 has period 256).
const PATTERN_PERIOD: u64 = 256;

/// Bytes `k` of this table are `(k as u8) ^ 0x5a`; sector `s`'s pattern is the
/// 512 bytes from `(s * 31) mod 256`, so filling a sector is one copy.
static PATTERN_TABLE: [u8; 256 + SECTOR_SIZE] = {
    let mut table = [0; 256 + SECTOR_SIZE];
    let mut k = 0;
    while k < table.len() {
        table[k] = (k as u8) ^ 0x5a;
        k += 1;
    }
    table
};

/// Sector `sector`'s 512 pattern bytes.
fn pattern_of(sector: u64) -> &'static [u8] {
    let start = (sector.wrapping_mul(31) % PATTERN_PERIOD) as usize;
    &PATTERN_TABLE[start..start + SECTOR_SIZE]
}

/// Fills `buf` (whole sectors) with the pattern of the sectors from `first`.
fn fill_pattern(buf: &mut [u8], first: u64) {
    for (sector, chunk) in (first..).zip(buf.chunks_exact_mut(SECTOR_SIZE)) {
        chunk.copy_from_slice(pattern_of(sector));
    }
}

/// Most sectors `blk_sectors=` may list.
const MAX_LISTED_SECTORS: usize = 16;
/// Largest request of the hash, write and bench scenarios.
const LARGE_REQUEST: u64 = 128 * 1024;
/// Large requests in flight at once (and their buffers: 8 x 128 KiB).
const LARGE_DEPTH: usize = 8;
/// Size of a random read.
const RANDOM_READ: usize = 4096;
/// Random reads in flight at once.
const RANDOM_DEPTH: usize = MAX_IN_FLIGHT;

const DEFAULT_WRITE_SECTORS: u64 = 2048;
const DEFAULT_BENCH_MIB: u64 = 64;
const DEFAULT_BENCH_IOS: u64 = 2000;

/// What every blk scenario starts with: the arena and the devices.
fn setup(boot: &BootInfo) -> Result<(Arena, Devices, Options), &'static str> {
    let options = Options::from_cmdline(boot.cmdline)?;
    let arena = Arena::claim(boot)?;
    let devices = discover(boot.cmdline)?;
    Ok((arena, devices, options))
}

pub fn init(found: Found, arena: &mut Arena, options: Options) -> Result<BlkDevice, &'static str> {
    let index = found.index;
    BlkDevice::init(index, found.transport, arena, options).inspect_err(|reason| {
        say!("virtio dev={index} failed reason={reason}");
    })
}

/// Submits one request, first waiting for completions (handed to `done`)
/// while the queue has no room for it. `indirect` asks for an indirect table
/// (used when negotiated); the large-request scenarios always ask, as Linux
/// does for every request of more than one descriptor.
///
/// # Safety
/// As for [`BlkDevice::submit`].
unsafe fn submit(
    dev: &mut BlkDevice,
    kind: RequestType,
    sector: u64,
    data: &[Seg],
    indirect: bool,
    tag: u32,
    done: &mut impl FnMut(Completion) -> Outcome,
) -> Outcome {
    loop {
        // SAFETY: passed on from the caller.
        match unsafe { dev.submit(kind, sector, data, indirect, tag) }? {
            Submit::Queued => return Ok(()),
            Submit::Busy => done(dev.wait()?)?,
        }
    }
}

/// Waits for every request in flight, handing each completion to `done`.
fn drain(dev: &mut BlkDevice, done: &mut impl FnMut(Completion) -> Outcome) -> Outcome {
    while dev.in_flight() > 0 {
        done(dev.wait()?)?;
    }
    Ok(())
}

/// A completion handler that only checks for `STATUS_OK`.
fn expect_ok(
    index: usize,
    what: &'static str,
    reason: &'static str,
) -> impl FnMut(Completion) -> Outcome {
    move |completion| check_status(index, what, completion.status, STATUS_OK, reason)
}

/// Prints `blk dev=N <what> status=S` and fails with `reason` unless `status == want`.
fn check_status(index: usize, what: &str, status: u8, want: u8, reason: &'static str) -> Outcome {
    if status == want {
        return Ok(());
    }
    say!("blk dev={index} {what} status={status}");
    Err(reason)
}

/// `len` bytes from `offset` of `buf` as `pieces` segments of (nearly) equal size.
fn split(buf: &DmaBuf, offset: usize, len: usize, pieces: usize) -> ([Seg; 2], usize) {
    let pieces = pieces.clamp(1, 2);
    let first = if pieces == 2 { len / 2 } else { len };
    let segs = [buf.seg(offset, first), buf.seg(offset + first, len - first)];
    (segs, pieces)
}

/// The size of the large requests this device takes, in sectors: at most
/// 128 KiB, a power of two, and within its segment limits when the data is
/// given as two equal segments. Returns the sectors and the segment count.
fn large_request(dev: &BlkDevice) -> Result<(u64, usize), &'static str> {
    let pieces = dev.max_segments().min(2);
    let per_piece = (dev.max_segments() / pieces) as u64 * u64::from(dev.size_max());
    let bytes = LARGE_REQUEST.min(per_piece * pieces as u64);
    let sectors = bytes / SECTOR_SIZE as u64;
    if sectors == 0 {
        return Err("segments-too-small");
    }
    Ok((1 << sectors.ilog2(), pieces))
}

// ---- blk ----

/// The `blk` scenario (see the module docs and README.md).
pub fn blk(boot: &BootInfo) -> Outcome {
    let (mut arena, mut devices, options) = setup(boot)?;
    let listed = listed_sectors(boot)?;
    let mut count = 0;
    for found in devices.take_all(DEVICE_ID_BLOCK) {
        count += 1;
        let index = found.index;
        let mut dev = init(found, &mut arena, options)?;
        blk_identify(index, &mut dev, &mut arena)?;
        if dev.capacity() == 0 {
            return Err("zero-capacity");
        }
        let mut sectors: [u64; MAX_LISTED_SECTORS] = zeroed();
        let sectors = match listed {
            Some((list, len)) => {
                sectors[..len].copy_from_slice(&list[..len]);
                &sectors[..len]
            }
            None => {
                sectors[..3].copy_from_slice(&[0, 1, dev.capacity() - 1]);
                &sectors[..3]
            }
        };
        if dev.has(F_RO) {
            blk_read_only(index, &mut dev, &mut arena)?;
        } else {
            blk_write_read(index, &mut dev, &mut arena, sectors)?;
        }
        blk_past_end(index, &mut dev, &mut arena)?;
        if !dev.has(F_RO) {
            blk_zeroes_and_discard(index, &mut dev, &mut arena, sectors[0])?;
        }
    }
    say!("blk devices={count}");
    if count == 0 {
        return Err("no-blk-device");
    }
    Ok(())
}

/// `blk_sectors=a,b,c`, if given.
fn listed_sectors(
    boot: &BootInfo,
) -> Result<Option<([u64; MAX_LISTED_SECTORS], usize)>, &'static str> {
    let Some(text) = cmdline_value(boot.cmdline, b"blk_sectors") else {
        return Ok(None);
    };
    let mut list: [u64; MAX_LISTED_SECTORS] = zeroed();
    let mut len = 0;
    for item in text.split(|&b| b == b',') {
        let slot = list.get_mut(len).ok_or("bad-blk-sectors")?;
        *slot = parse_decimal(item).ok_or("bad-blk-sectors")?;
        len += 1;
    }
    Ok(Some((list, len)))
}

/// GET_ID and the device's summary lines; checks the device raised an interrupt.
pub fn blk_identify(index: usize, dev: &mut BlkDevice, arena: &mut Arena) -> Outcome {
    let mut id = arena.alloc(ID_BYTES, 64)?;
    // SAFETY: nothing is in flight yet; the buffer is this request's alone.
    fill_bytes(unsafe { id.bytes_mut() }, 0);
    // SAFETY: `id` is arena memory the guest leaves alone until `run` returns.
    let status = unsafe { dev.run(RequestType::GetId, 0, &[id.seg(0, ID_BYTES)], false) }?;
    // SAFETY: the request is complete; nothing else writes `id`.
    let bytes = unsafe { id.bytes() };
    let serial = match status {
        STATUS_OK => bytes.split(|&b| b == 0).next().unwrap_or(&[]),
        _ => &[],
    };
    say!(
        "blk dev={index} capacity={} ro={} blk_size={} flush={} serial=\"{}\"",
        dev.capacity(),
        u8::from(dev.has(F_RO)),
        dev.blk_size(),
        u8::from(dev.has(F_FLUSH)),
        Escaped(serial)
    );
    if status != STATUS_OK {
        say!("blk dev={index} get-id status={status}");
    }
    let interrupt = dev.take_interrupt_status();
    say!(
        "blk dev={index} features=0x{:x} queue_size={} event_idx={} indirect={} interrupt_status=0x{interrupt:x}",
        dev.features(),
        dev.queue_size(),
        u8::from(dev.has(F_EVENT_IDX)),
        u8::from(dev.has(F_INDIRECT_DESC)),
    );
    if interrupt & INTERRUPT_USED_BUFFER == 0 {
        return Err("no-used-buffer-interrupt");
    }
    Ok(())
}

/// Writes the listed sectors (all in flight, two segments each), flushes,
/// reads them back (three segments each, indirect) and compares.
pub fn blk_write_read(
    index: usize,
    dev: &mut BlkDevice,
    arena: &mut Arena,
    sectors: &[u64],
) -> Outcome {
    if sectors.iter().any(|&s| s >= dev.capacity()) {
        return Err("blk-sector-out-of-range");
    }
    let bytes = sectors.len() * SECTOR_SIZE;
    let mut written = arena.alloc(bytes, 4096)?;
    let mut read = arena.alloc(bytes, 4096)?;
    // SAFETY: no request uses either buffer yet.
    unsafe {
        for (&sector, chunk) in sectors
            .iter()
            .zip(written.bytes_mut().chunks_exact_mut(SECTOR_SIZE))
        {
            chunk.copy_from_slice(pattern_of(sector));
        }
        // Never the pattern of any sector, so stale bytes cannot pass.
        fill_bytes(read.bytes_mut(), 0xee);
    }

    let mut done = expect_ok(index, "write", "blk-write-failed");
    for (k, &sector) in sectors.iter().enumerate() {
        let at = k * SECTOR_SIZE;
        let data = [written.seg(at, 200), written.seg(at + 200, 312)];
        // SAFETY: `written` is only read by devices until the drain below.
        unsafe {
            submit(
                dev,
                RequestType::Out,
                sector,
                &data,
                false,
                k as u32,
                &mut done,
            )
        }?;
    }
    drain(dev, &mut done)?;
    if dev.has(F_FLUSH) {
        // SAFETY: FLUSH has no data.
        let status = unsafe { dev.run(RequestType::Flush, 0, &[], false) }?;
        check_status(index, "flush", status, STATUS_OK, "blk-flush-failed")?;
    }

    let mut done = expect_ok(index, "read", "blk-read-failed");
    for (k, &sector) in sectors.iter().enumerate() {
        let at = k * SECTOR_SIZE;
        let data = [
            read.seg(at, 64),
            read.seg(at + 64, 384),
            read.seg(at + 448, 64),
        ];
        // SAFETY: the guest does not touch `read` until the drain below.
        unsafe {
            submit(
                dev,
                RequestType::In,
                sector,
                &data,
                true,
                k as u32,
                &mut done,
            )
        }?;
    }
    drain(dev, &mut done)?;

    let list = SectorList(sectors);
    // SAFETY: every request on `read` has completed.
    let read = unsafe { read.bytes() };
    for (&sector, chunk) in sectors.iter().zip(read.chunks_exact(SECTOR_SIZE)) {
        if chunk != pattern_of(sector) {
            say!("blk dev={index} wrote sectors={list} readback=mismatch sector={sector}");
            return Err("readback-mismatch");
        }
    }
    say!("blk dev={index} wrote sectors={list} readback=ok");
    Ok(())
}

/// A read-only disk must refuse a write with IOERR and still read.
pub fn blk_read_only(index: usize, dev: &mut BlkDevice, arena: &mut Arena) -> Outcome {
    let mut buf = arena.alloc(SECTOR_SIZE, 4096)?;
    // SAFETY: no request uses the buffer yet.
    fill_pattern(unsafe { buf.bytes_mut() }, 0);
    // SAFETY: `buf` is left alone while each request runs.
    let status = unsafe { dev.run(RequestType::Out, 0, &[buf.seg(0, SECTOR_SIZE)], false) }?;
    say!("blk dev={index} ro write status={status}");
    if status != STATUS_IOERR {
        return Err("ro-write-not-ioerr");
    }
    // SAFETY: as above.
    let status = unsafe { dev.run(RequestType::In, 0, &[buf.seg(0, SECTOR_SIZE)], true) }?;
    check_status(index, "ro read", status, STATUS_OK, "ro-read-failed")
}

/// A read of the sector just past the end must fail with IOERR.
fn blk_past_end(index: usize, dev: &mut BlkDevice, arena: &mut Arena) -> Outcome {
    let buf = arena.alloc(SECTOR_SIZE, 4096)?;
    let sector = dev.capacity();
    // SAFETY: `buf` is left alone while the request runs.
    let status = unsafe { dev.run(RequestType::In, sector, &[buf.seg(0, SECTOR_SIZE)], false) }?;
    say!("blk dev={index} past-end status={status}");
    if status != STATUS_IOERR {
        return Err("past-end-not-ioerr");
    }
    Ok(())
}

/// WRITE_ZEROES (then read back: all zero) and DISCARD of `sector`, each
/// when negotiated, each followed by rewriting the pattern there.
fn blk_zeroes_and_discard(
    index: usize,
    dev: &mut BlkDevice,
    arena: &mut Arena,
    sector: u64,
) -> Outcome {
    if !dev.has(F_WRITE_ZEROES) && !dev.has(F_DISCARD) {
        return Ok(());
    }
    // {sector: u64, num_sectors: u32, flags: u32}, then one sector of data.
    let mut range = arena.alloc(16, 16)?;
    let mut data = arena.alloc(SECTOR_SIZE, 4096)?;
    // SAFETY: no request uses either buffer yet.
    unsafe {
        let range = range.bytes_mut();
        range[..8].copy_from_slice(&sector.to_le_bytes());
        range[8..12].copy_from_slice(&1u32.to_le_bytes());
        range[12..].copy_from_slice(&0u32.to_le_bytes());
    }
    let range_seg = [range.seg(0, 16)];
    let data_seg = [data.seg(0, SECTOR_SIZE)];

    if dev.has(F_WRITE_ZEROES) {
        // SAFETY: no request uses `data` yet.
        fill_bytes(unsafe { data.bytes_mut() }, 0xee);
        // SAFETY: the buffers are left alone while each request runs.
        let status = unsafe { dev.run(RequestType::WriteZeroes, 0, &range_seg, false) }?;
        check_status(
            index,
            "write-zeroes",
            status,
            STATUS_OK,
            "write-zeroes-failed",
        )?;
        // SAFETY: as above.
        let status = unsafe { dev.run(RequestType::In, sector, &data_seg, true) }?;
        check_status(
            index,
            "write-zeroes read",
            status,
            STATUS_OK,
            "blk-read-failed",
        )?;
        // SAFETY: the read has completed.
        if unsafe { data.bytes() }.iter().any(|&b| b != 0) {
            return Err("write-zeroes-not-zero");
        }
        say!("blk dev={index} write-zeroes ok");
        rewrite_pattern(index, dev, &mut data, sector)?;
    }
    if dev.has(F_DISCARD) {
        // SAFETY: the buffer is left alone while the request runs.
        let status = unsafe { dev.run(RequestType::Discard, 0, &range_seg, false) }?;
        check_status(index, "discard", status, STATUS_OK, "discard-failed")?;
        say!("blk dev={index} discard ok");
        rewrite_pattern(index, dev, &mut data, sector)?;
    }
    Ok(())
}

/// Writes `sector`'s pattern back (and flushes), so the host's check of the
/// disk file still holds after a zeroing or discarding test.
fn rewrite_pattern(index: usize, dev: &mut BlkDevice, data: &mut DmaBuf, sector: u64) -> Outcome {
    // SAFETY: no request uses `data` now.
    fill_pattern(unsafe { data.bytes_mut() }, sector);
    // SAFETY: `data` is left alone while the request runs.
    let status = unsafe { dev.run(RequestType::Out, sector, &[data.seg(0, SECTOR_SIZE)], false) }?;
    check_status(index, "rewrite", status, STATUS_OK, "blk-write-failed")?;
    if dev.has(F_FLUSH) {
        // SAFETY: FLUSH has no data.
        let status = unsafe { dev.run(RequestType::Flush, 0, &[], false) }?;
        check_status(index, "flush", status, STATUS_OK, "blk-flush-failed")?;
    }
    Ok(())
}

/// Prints a sector list as `a,b,c`.
struct SectorList<'a>(&'a [u64]);

impl core::fmt::Display for SectorList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (k, sector) in self.0.iter().enumerate() {
            if k > 0 {
                f.write_str(",")?;
            }
            write!(f, "{sector}")?;
        }
        Ok(())
    }
}

// ---- blkhash ----

/// The `blkhash` scenario: FNV-1a 64 of each disk (or its first `hash_sectors=N`).
pub fn blkhash(boot: &BootInfo) -> Outcome {
    let (mut arena, mut devices, options) = setup(boot)?;
    let limit = number_option(boot, b"hash_sectors", u64::MAX, "bad-hash-sectors")?;
    let mut buffers = arena.alloc(LARGE_DEPTH * LARGE_REQUEST as usize, 4096)?;
    let mut count = 0;
    for found in devices.take_all(DEVICE_ID_BLOCK) {
        count += 1;
        let index = found.index;
        let mut dev = init(found, &mut arena, options)?;
        let sectors = limit.min(dev.capacity());
        let (chunk, pieces) = large_request(&dev)?;
        let chunk_bytes = (chunk as usize) * SECTOR_SIZE;
        let mut hash = FNV1A64_START;
        let mut next = 0;
        let mut done = expect_ok(index, "read", "blk-read-failed");
        while next < sectors {
            // A batch of consecutive reads, one buffer each, hashed in order
            // once all are back (they may complete in any order).
            let mut lens: [usize; LARGE_DEPTH] = zeroed();
            let mut batch = 0;
            while batch < LARGE_DEPTH && next < sectors {
                let len = chunk.min(sectors - next);
                let bytes = len as usize * SECTOR_SIZE;
                let (segs, count) = split(&buffers, batch * chunk_bytes, bytes, pieces);
                // SAFETY: the guest reads `buffers` only after the drain below.
                match unsafe {
                    dev.submit(RequestType::In, next, &segs[..count], true, batch as u32)
                }? {
                    Submit::Queued => {}
                    Submit::Busy if batch > 0 => break,
                    Submit::Busy => return Err("request-does-not-fit"),
                }
                lens[batch] = bytes;
                next += len;
                batch += 1;
            }
            drain(&mut dev, &mut done)?;
            // SAFETY: every request on `buffers` has completed.
            let bytes = unsafe { buffers.bytes_mut() };
            for (k, &len) in lens[..batch].iter().enumerate() {
                hash = fnv1a64_extend(hash, &bytes[k * chunk_bytes..k * chunk_bytes + len]);
            }
        }
        say!("blk dev={index} sectors={sectors} fnv1a64={hash:016x}");
    }
    if count == 0 {
        return Err("no-blk-device");
    }
    Ok(())
}

// ---- blkwrite ----

/// The `blkwrite` scenario: writes the pattern over the first
/// `write_sectors=N` sectors of every writable disk, forever.
pub fn blkwrite(boot: &BootInfo) -> Outcome {
    let (mut arena, mut devices, options) = setup(boot)?;
    let wanted = number_option(
        boot,
        b"write_sectors",
        DEFAULT_WRITE_SECTORS,
        "bad-write-sectors",
    )?;
    let pattern = pattern_buffer(&mut arena)?;
    let mut writable: [Option<BlkDevice>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let mut count = 0;
    for found in devices.take_all(DEVICE_ID_BLOCK) {
        let dev = init(found, &mut arena, options)?;
        if !dev.has(F_RO) {
            writable[count] = Some(dev);
            count += 1;
        }
    }
    if count == 0 {
        return Err("no-writable-blk-device");
    }
    let mut started = false;
    loop {
        for dev in writable.iter_mut().flatten() {
            let index = dev.index();
            let (chunk, pieces) = large_request(dev)?;
            let sectors = wanted.min(dev.capacity());
            let mut done = |completion: Completion| {
                check_status(
                    index,
                    "write",
                    completion.status,
                    STATUS_OK,
                    "blk-write-failed",
                )?;
                if !started {
                    started = true;
                    say!("blkwrite started");
                }
                Ok(())
            };
            let mut next = 0;
            while next < sectors {
                let len = chunk.min(sectors - next);
                let offset = (next % PATTERN_PERIOD) as usize * SECTOR_SIZE;
                let (segs, count) = split(&pattern, offset, len as usize * SECTOR_SIZE, pieces);
                // SAFETY: devices only read `pattern`, which is never written again.
                unsafe {
                    submit(
                        dev,
                        RequestType::Out,
                        next,
                        &segs[..count],
                        true,
                        0,
                        &mut done,
                    )
                }?;
                next += len;
            }
            drain(dev, &mut done)?;
            if dev.has(F_FLUSH) {
                // SAFETY: FLUSH has no data.
                let status = unsafe { dev.run(RequestType::Flush, 0, &[], false) }?;
                check_status(index, "flush", status, STATUS_OK, "blk-flush-failed")?;
            }
        }
    }
}

/// 128 KiB holding the pattern of sectors 0..256 (and so of any 256 in a row
/// that start on a multiple of 256).
fn pattern_buffer(arena: &mut Arena) -> Result<DmaBuf, &'static str> {
    let mut buf = arena.alloc(PATTERN_PERIOD as usize * SECTOR_SIZE, 4096)?;
    // SAFETY: freshly allocated; no request uses it yet.
    fill_pattern(unsafe { buf.bytes_mut() }, 0);
    Ok(buf)
}

// ---- blkbench ----

/// POST codes bracketing the benchmark phases (start, end).
const BENCH_SEQ_READ: (u8, u8) = (0x20, 0x21);
const BENCH_SEQ_WRITE: (u8, u8) = (0x22, 0x23);
const BENCH_RANDOM_READ: (u8, u8) = (0x24, 0x25);

fn post(code: u8) {
    // SAFETY: port 0x80 is the POST code port; writing it has no effect on the guest.
    unsafe { outb(0x80, code) };
}

/// The `blkbench` scenario, on the first block device.
pub fn blkbench(boot: &BootInfo) -> Outcome {
    let (mut arena, mut devices, options) = setup(boot)?;
    let mib = number_option(boot, b"bench_mib", DEFAULT_BENCH_MIB, "bad-bench-mib")?;
    let ios = number_option(boot, b"bench_ios", DEFAULT_BENCH_IOS, "bad-bench-ios")?;
    let found = devices
        .take_all(DEVICE_ID_BLOCK)
        .next()
        .ok_or("no-blk-device")?;
    let index = found.index;
    let mut dev = init(found, &mut arena, options)?;
    let (chunk, pieces) = large_request(&dev)?;
    say!(
        "blkbench dev={index} capacity={} request_bytes={} queue_size={} event_idx={} indirect={}",
        dev.capacity(),
        chunk * SECTOR_SIZE as u64,
        dev.queue_size(),
        u8::from(dev.has(F_EVENT_IDX)),
        u8::from(dev.has(F_INDIRECT_DESC)),
    );
    if dev.capacity() < (RANDOM_READ / SECTOR_SIZE) as u64 {
        return Err("disk-too-small");
    }
    let buffers = arena.alloc(LARGE_DEPTH * (chunk as usize) * SECTOR_SIZE, 4096)?;
    let pattern = pattern_buffer(&mut arena)?;
    let small = arena.alloc(RANDOM_DEPTH * RANDOM_READ, 4096)?;
    let total = mib.checked_mul(1 << 20).ok_or("bad-bench-mib")? / SECTOR_SIZE as u64;

    let phase = Phase::start(&dev, BENCH_SEQ_READ);
    let requests = bench_sequential(&mut dev, RequestType::In, total, (chunk, pieces), &buffers)?;
    phase.end(
        &dev,
        "seq-read",
        requests,
        total * SECTOR_SIZE as u64,
        LARGE_DEPTH,
    );

    if dev.has(F_RO) {
        say!("blkbench seq-write skipped reason=read-only");
    } else {
        let phase = Phase::start(&dev, BENCH_SEQ_WRITE);
        let requests =
            bench_sequential(&mut dev, RequestType::Out, total, (chunk, pieces), &pattern)?;
        phase.end(
            &dev,
            "seq-write",
            requests,
            total * SECTOR_SIZE as u64,
            LARGE_DEPTH,
        );
    }

    let phase = Phase::start(&dev, BENCH_RANDOM_READ);
    bench_random(&mut dev, ios, &small)?;
    phase.end(
        &dev,
        "rand-read",
        ios,
        ios * RANDOM_READ as u64,
        RANDOM_DEPTH,
    );
    Ok(())
}

/// One timed phase: POST codes around it, a line after it.
struct Phase {
    end_code: u8,
    tsc: u64,
    notifications: u64,
}

impl Phase {
    fn start(dev: &BlkDevice, (start_code, end_code): (u8, u8)) -> Phase {
        let phase = Phase {
            end_code,
            tsc: rdtsc(),
            notifications: dev.notifications(),
        };
        post(start_code);
        phase
    }

    fn end(self, dev: &BlkDevice, name: &str, requests: u64, bytes: u64, depth: usize) {
        post(self.end_code);
        let us = us_since(self.tsc);
        say!(
            "blkbench {name} bytes={bytes} requests={requests} qd={depth} notifications={} guest_us={us}",
            dev.notifications() - self.notifications
        );
    }
}

/// Reads or writes `total` sectors from sector 0 in large requests, up to
/// [`LARGE_DEPTH`] in flight, wrapping at the end of the disk. Reads go to
/// `buffers` (one slot per request in flight, never compared); writes come
/// from the pattern buffer. Returns the number of requests.
fn bench_sequential(
    dev: &mut BlkDevice,
    kind: RequestType,
    total: u64,
    (chunk, pieces): (u64, usize),
    buffers: &DmaBuf,
) -> Result<u64, &'static str> {
    let chunk_bytes = chunk as usize * SECTOR_SIZE;
    let capacity = dev.capacity();
    let free = BufferSlots::new(LARGE_DEPTH);
    let mut done = free.handler(dev.index());
    let mut sector = 0;
    let mut left = total;
    let mut requests = 0;
    while left > 0 {
        let slot = free.take(dev, &mut done)?;
        let len = chunk.min(capacity - sector).min(left);
        let bytes = len as usize * SECTOR_SIZE;
        let offset = match kind {
            RequestType::In => slot as usize * chunk_bytes,
            _ => (sector % PATTERN_PERIOD) as usize * SECTOR_SIZE,
        };
        let (segs, count) = split(buffers, offset, bytes, pieces);
        // SAFETY: the read buffers are never looked at; the pattern buffer is
        // only read by devices.
        unsafe { submit(dev, kind, sector, &segs[..count], true, slot, &mut done) }?;
        requests += 1;
        left -= len;
        sector += len;
        if sector == capacity {
            sector = 0;
        }
    }
    drain(dev, &mut done)?;
    Ok(requests)
}

/// Which of a benchmark's buffers are free: requests carry their buffer's
/// number as their tag and give it back when they complete.
struct BufferSlots(Cell<u32>);

impl BufferSlots {
    fn new(count: usize) -> BufferSlots {
        BufferSlots(Cell::new(u32::MAX >> (32 - count)))
    }

    /// The completion handler: frees the buffer and checks the status.
    fn handler(&self, index: usize) -> impl FnMut(Completion) -> Outcome + '_ {
        move |completion| {
            self.0.set(self.0.get() | 1 << completion.tag);
            check_status(
                index,
                "bench",
                completion.status,
                STATUS_OK,
                "bench-io-failed",
            )
        }
    }

    /// A free buffer, after waiting for completions if there is none.
    fn take(
        &self,
        dev: &mut BlkDevice,
        done: &mut impl FnMut(Completion) -> Outcome,
    ) -> Result<u32, &'static str> {
        while self.0.get() == 0 {
            done(dev.wait()?)?;
        }
        let slot = self.0.get().trailing_zeros();
        self.0.set(self.0.get() & !(1 << slot));
        Ok(slot)
    }
}

/// `ios` 4 KiB reads at random 4 KiB-aligned places, [`RANDOM_DEPTH`] in flight.
fn bench_random(dev: &mut BlkDevice, ios: u64, buffers: &DmaBuf) -> Outcome {
    let per_read = (RANDOM_READ / SECTOR_SIZE) as u64;
    let places = dev.capacity() / per_read;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let free = BufferSlots::new(RANDOM_DEPTH);
    let mut done = free.handler(dev.index());
    for _ in 0..ios {
        let slot = free.take(dev, &mut done)?;
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let sector = (state % places) * per_read;
        let data = [buffers.seg(slot as usize * RANDOM_READ, RANDOM_READ)];
        // SAFETY: the read buffers are never looked at.
        unsafe { submit(dev, RequestType::In, sector, &data, true, slot, &mut done) }?;
    }
    drain(dev, &mut done)
}
