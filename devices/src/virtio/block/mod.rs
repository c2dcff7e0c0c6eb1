//! virtio-blk: a disk image file as a virtio block device.
//!
//! Requests are parsed into plain data first ([`request`]) and then executed by a synchronous
//! file engine ([`io`]). A malformed chain completes with IOERR when it has a usable status
//! byte, and is otherwise returned to the driver with length 0 and a warning (logged once per
//! kind): never a panic, never a stuck queue.

pub mod io;
pub mod request;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use self::io::{FileEngine, SyncFileEngine};
use self::request::{ParsedChain, Request, RequestType, SECTOR_SIZE, SEGMENT_LEN};
use super::{
    ActivateError, InterruptKind, IrqTrigger, LogOnce, VirtioDevice, checked_queues,
    read_config_bytes,
};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Largest single data segment the driver may use (SIZE_MAX).
const SEGMENT_SIZE_MAX: u32 = 1 << 20;
/// Most discard / write-zeroes sectors per segment.
const MAX_ZEROING_SECTORS: u32 = 0x3fff_ffff;
/// Discard granularity in sectors (4 KiB: what file systems punch holes in).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// Completions added to the used ring together.
const USED_BATCH: usize = 8;

/// Size of the config space nvmm fills (virtio 1.2 `struct virtio_blk_config` up to
/// `write_zeroes_may_unmap`).
const CONFIG_LEN: usize = 60;

/// What a disk is: plain data, from the VM config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// Opened read-only and offered with VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes); defaults to the file name.
    pub serial: Option<String>,
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened with the needed access.
    #[error("cannot open disk {} {}", .path.display(), if *.read_only { "read-only" } else { "read-write" })]
    Open {
        /// Image path.
        path: PathBuf,
        /// Access asked for.
        read_only: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory or other non-disk file.
    #[error("disk {} is not a regular file or block device", .0.display())]
    NotADisk(PathBuf),
    /// The serial is longer than virtio allows.
    #[error("disk serial {0:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    SerialTooLong(String),
    /// Creating the queue eventfd failed.
    #[error("cannot create an eventfd for the disk queue")]
    EventFd(#[source] std::io::Error),
}

/// Kinds of guest mistakes, logged once each (after the request-parse errors).
mod mistake {
    pub const OUT_OF_RANGE: u32 = 32;
    pub const IO_FAILED: u32 = 33;
    pub const QUEUE_ERROR: u32 = 34;
    pub const BEFORE_ACTIVATION: u32 = 35;
    pub const WRITE_TO_READ_ONLY: u32 = 36;
}

enum DeviceState {
    Inactive,
    Activated(ActiveState),
}

struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqTrigger>,
    queue: Queue,
}

/// A virtio-blk device.
pub struct Block {
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config_space: [u8; CONFIG_LEN],
    engine: FileEngine,
    queue_events: [EventFd; 1],
    state: DeviceState,
    mistakes: LogOnce,
    /// Scratch space for parsing a chain, kept so that requests cost no allocation for it.
    descriptors: Vec<Descriptor>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens the disk with the least access needed (read-only disks are never opened writable).
    pub fn new(config: &DiskConfig) -> Result<Self, BlockError> {
        let file = open_disk(&config.path, config.read_only)?;
        let size = disk_size(&file).map_err(|source| BlockError::Open {
            path: config.path.clone(),
            read_only: config.read_only,
            source,
        })?;
        let serial_text = match &config.serial {
            Some(serial) => serial.clone(),
            None => config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = serial_text.as_bytes();
        if config.serial.is_some() && bytes.len() > serial.len() {
            return Err(BlockError::SerialTooLong(serial_text));
        }
        let n = bytes.len().min(serial.len());
        serial[..n].copy_from_slice(&bytes[..n]);
        let capacity_sectors = size / SECTOR_SIZE;
        Ok(Self {
            path: config.path.clone(),
            read_only: config.read_only,
            capacity_sectors,
            serial,
            config_space: config_space(capacity_sectors),
            engine: FileEngine::Sync(SyncFileEngine::new(file)),
            queue_events: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            state: DeviceState::Inactive,
            mistakes: LogOnce::default(),
            descriptors: Vec::new(),
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn mistake(&mut self, kind: u32, what: std::fmt::Arguments<'_>) {
        if self.mistakes.first(kind) {
            log::warn!(
                "virtio-blk {}: {what} (further such guest errors are not logged)",
                self.path.display()
            );
        }
    }

    /// Handles every available request, with notification suppression: disable notifications,
    /// drain, re-enable, and drain again if the driver added requests meanwhile. Interrupts the
    /// driver only if it asked to be (event idx).
    ///
    /// Requests go to the used ring as they are done, `USED_BATCH` at a time, not at the end of
    /// the drain: a driver that polls the used ring refills those slots while the device works
    /// through the rest, and the device finds the new requests without a notification (an
    /// exit) and without sleeping. The driver is interrupted at the end of every pass over the
    /// available ring, so a driver that keeps the ring full still hears of its completions.
    pub fn process_queue(&mut self) {
        let DeviceState::Activated(state) = &self.state else {
            return;
        };
        let mem = state.mem.clone();
        loop {
            match self.drain_pass(&mem) {
                Ok(0) => {}
                Ok(_) => self.interrupt_if_due(&mem),
                Err(err) => {
                    // The requests done before the ring broke are in the used ring: say so.
                    self.interrupt_if_due(&mem);
                    self.mistake(mistake::QUEUE_ERROR, format_args!("broken queue: {err}"));
                    return;
                }
            }
            let DeviceState::Activated(state) = &mut self.state else {
                return;
            };
            match super::more_available(&mut state.queue, &mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(err) => {
                    self.mistake(mistake::QUEUE_ERROR, format_args!("broken queue: {err}"));
                    return;
                }
            }
        }
    }

    /// Completes available requests, with notifications off, until the ring is empty or a
    /// queue's worth is done (so that interrupts are not held back for as long as the driver
    /// keeps up); returns how many. Requests are taken `USED_BATCH` at a time, with one read of
    /// the available index, and their completions reach the used ring together.
    fn drain_pass(&mut self, mem: &GuestMemoryMmap) -> Result<u16, virtio_queue::Error> {
        if let DeviceState::Activated(state) = &mut self.state {
            state.queue.disable_notification(mem)?;
        }
        let mut batch: Vec<ParsedChain> = Vec::with_capacity(USED_BATCH);
        let mut used: Vec<(u16, u32)> = Vec::with_capacity(USED_BATCH);
        let mut done: u16 = 0;
        loop {
            let DeviceState::Activated(state) = &mut self.state else {
                return Ok(done);
            };
            let room = usize::from(state.queue.size().saturating_sub(done)).min(USED_BATCH);
            if room == 0 {
                return Ok(done);
            }
            let descriptors = &mut self.descriptors;
            let popped = super::pop_chains(&mut state.queue, mem, room, |chain| {
                batch.push(ParsedChain::parse(chain, mem, descriptors));
            });
            for parsed in batch.drain(..) {
                let len = self.complete(&parsed, mem);
                used.push((parsed.head, len));
                done += 1;
            }
            self.publish_used(&mut used, mem);
            if popped? == 0 {
                return Ok(done);
            }
        }
    }

    /// Adds `used` to the used ring and empties it.
    fn publish_used(&mut self, used: &mut Vec<(u16, u32)>, mem: &GuestMemoryMmap) {
        let DeviceState::Activated(state) = &mut self.state else {
            return;
        };
        let mut failed = None;
        for (head, len) in used.drain(..) {
            if let Err(err) = super::add_used(&mut state.queue, mem, head, len) {
                failed = Some(err);
            }
        }
        if let Some(err) = failed {
            self.mistake(
                mistake::QUEUE_ERROR,
                format_args!("cannot return a request: {err}"),
            );
        }
    }

    /// Interrupts the driver if it asked to hear of the completions since the last interrupt.
    fn interrupt_if_due(&mut self, mem: &GuestMemoryMmap) {
        let DeviceState::Activated(state) = &mut self.state else {
            return;
        };
        if state.queue.needs_notification(mem).unwrap_or(true) {
            state.interrupt.trigger(InterruptKind::Queue);
        }
    }

    /// Runs one parsed chain and writes its status; returns the used length.
    fn complete(&mut self, parsed: &ParsedChain, mem: &GuestMemoryMmap) -> u32 {
        let (status, written) = match &parsed.request {
            Ok(request) => self.execute(request, mem),
            Err(err) => {
                self.mistake(err.kind(), format_args!("invalid request: {err}"));
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        // A one-byte store through one region look-up: the busiest write of the device.
        let stored = parsed
            .status
            .is_some_and(|addr| match mem.get_slice(addr, 1) {
                Ok(slice) => slice.store(status as u8, 0, Ordering::Relaxed).is_ok(),
                Err(_) => false,
            });
        written + u32::from(stored)
    }

    fn check_range(&mut self, sector: u64, bytes: u64) -> bool {
        let fits = sector
            .checked_add(bytes / SECTOR_SIZE)
            .is_some_and(|end| end <= self.capacity_sectors);
        if !fits {
            self.mistake(
                mistake::OUT_OF_RANGE,
                format_args!("access to sector {sector} (+{bytes} bytes) past the end"),
            );
        }
        fits
    }

    /// Returns (status, bytes written into guest buffers).
    fn execute(&mut self, request: &Request, mem: &GuestMemoryMmap) -> (u32, u32) {
        let len = request.data_len();
        let writes_disk = matches!(
            request.kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes_disk && self.read_only {
            self.mistake(
                mistake::WRITE_TO_READ_ONLY,
                format_args!("write to a read-only disk"),
            );
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let result = match request.kind {
            RequestType::In | RequestType::Out if !self.check_range(request.sector, len) => {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            RequestType::In => self
                .engine
                .read(request.sector * SECTOR_SIZE, mem, &request.data)
                .map(|()| len as u32),
            RequestType::Out => self
                .engine
                .write(request.sector * SECTOR_SIZE, mem, &request.data)
                .map(|()| 0),
            RequestType::Flush if self.read_only => Ok(0),
            RequestType::Flush => self.engine.flush().map(|()| 0),
            RequestType::GetId => Ok(self.write_serial(mem, &request.data)),
            RequestType::Discard | RequestType::WriteZeroes => {
                return self.zero_segments(request, mem);
            }
            RequestType::Unsupported(_) => return (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(err) => {
                self.mistake(mistake::IO_FAILED, format_args!("I/O failed: {err}"));
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn write_serial(&self, mem: &GuestMemoryMmap, bufs: &[(GuestAddress, u32)]) -> u32 {
        let mut remaining: &[u8] = &self.serial;
        let mut written = 0;
        for &(addr, len) in bufs {
            let n = remaining.len().min(len as usize);
            if mem.write_slice(&remaining[..n], addr).is_err() {
                break;
            }
            remaining = &remaining[n..];
            written += n as u32;
        }
        written
    }

    fn zero_segments(&mut self, request: &Request, mem: &GuestMemoryMmap) -> (u32, u32) {
        for &(addr, len) in &request.data {
            for index in 0..len / SEGMENT_LEN {
                let Some(segment) = addr.checked_add(u64::from(index * SEGMENT_LEN)) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let (Ok(sector), Ok(sectors)) = (
                    mem.read_obj::<u64>(segment),
                    segment
                        .checked_add(8)
                        .map_or(Err(()), |a| mem.read_obj::<u32>(a).map_err(|_| ())),
                ) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                if !self.check_range(sector, bytes) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let result = match request.kind {
                    RequestType::Discard => self.engine.discard(sector * SECTOR_SIZE, bytes),
                    _ => self.engine.write_zeroes(sector * SECTOR_SIZE, bytes),
                };
                if let Err(err) = result {
                    self.mistake(mistake::IO_FAILED, format_args!("zeroing failed: {err}"));
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }
}

fn open_disk(path: &Path, read_only: bool) -> Result<File, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_owned(),
            read_only,
            source,
        })?;
    let kind = file
        .metadata()
        .map_err(|source| BlockError::Open {
            path: path.to_owned(),
            read_only,
            source,
        })?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(BlockError::NotADisk(path.to_owned()));
    }
    Ok(file)
}

fn disk_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Seeking to the end works for regular files and block devices alike.
    let mut file = file;
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(size)
}

fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &capacity_sectors.to_le_bytes());
    put(8, &SEGMENT_SIZE_MAX.to_le_bytes());
    put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max: header and status take two
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_ZEROING_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
    put(48, &MAX_ZEROING_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let common = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            common | (1 << VIRTIO_BLK_F_RO)
        } else {
            common | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The writeback field is the only writable one and nvmm does not offer CONFIG_WCE.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        _features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [queue] = checked_queues(queues, &mem)?;
        self.state = DeviceState::Activated(ActiveState {
            mem,
            interrupt,
            queue,
        });
        // Requests queued before DRIVER_OK (unusual, but allowed) are served by the event loop,
        // like every request: this runs on a vCPU thread, whose seccomp filter has no disk I/O.
        if let Err(err) = self.queue_events[0].write(1) {
            log::warn!("virtio-blk: cannot signal requests queued before activation: {err}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Activated(_))
    }
}

const QUEUE_AVAIL: u32 = 0;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            QUEUE_AVAIL => {
                // Reading resets the eventfd counter; its value does not matter.
                let _ = self.queue_events[0].read();
                if self.is_activated() {
                    self.process_queue();
                } else {
                    self.mistake(
                        mistake::BEFORE_ACTIVATION,
                        format_args!("queue notification before the device was activated"),
                    );
                }
            }
            other => log::warn!("virtio-blk: unexpected event data {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::with_data(
            &self.queue_events[0],
            QUEUE_AVAIL,
            EventSet::IN,
        )) {
            log::error!(
                "virtio-blk {}: cannot watch the queue: {err:?}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests;
