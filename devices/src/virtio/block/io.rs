//! The block I/O engine: synchronous and positional (`pread`/`pwrite` for one buffer,
//! `preadv`/`pwritev` for more), straight between the disk file and guest memory.
//! [`FileEngine`] is the seam for a future async engine.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// How a disk file is accessed.
#[derive(Debug)]
pub enum FileEngine {
    /// Blocking syscalls on the event-loop thread.
    Sync(SyncFileEngine),
}

impl FileEngine {
    /// The engine's file.
    pub fn file(&self) -> &File {
        match self {
            Self::Sync(engine) => &engine.file,
        }
    }

    /// Reads `offset..` into the guest buffers.
    pub fn read(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        match self {
            Self::Sync(engine) => engine.transfer(Direction::Read, offset, mem, bufs),
        }
    }

    /// Writes the guest buffers at `offset..`.
    pub fn write(
        &mut self,
        offset: u64,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        match self {
            Self::Sync(engine) => engine.transfer(Direction::Write, offset, mem, bufs),
        }
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Sync(engine) => engine.file.sync_data(),
        }
    }

    /// Deallocates a byte range (the range then reads as zeros).
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Self::Sync(engine) => engine.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        }
    }

    /// Zeroes a byte range, unmapping it where the file system can.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Self::Sync(engine) => engine.write_zeroes(offset, len),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Read,
    Write,
}

/// `pread`/`pwrite` and `preadv`/`pwritev` on one file.
#[derive(Debug)]
pub struct SyncFileEngine {
    file: File,
}

/// Linux's IOV_MAX: more iovecs per call are rejected with EINVAL.
const IOV_MAX: usize = 1024;

impl SyncFileEngine {
    /// An engine for `file`.
    pub fn new(file: File) -> Self {
        Self { file }
    }

    fn transfer(
        &mut self,
        direction: Direction,
        mut offset: u64,
        mem: &GuestMemoryMmap,
        bufs: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        // A request with one buffer (a 4 KiB read) builds its iovec on the stack.
        let (mut one, mut many);
        let mut pending: &mut [libc::iovec] = match *bufs {
            [(addr, len)] => {
                one = [guest_iovec(mem, addr, len)?];
                &mut one
            }
            _ => {
                many = bufs
                    .iter()
                    .map(|&(addr, len)| guest_iovec(mem, addr, len))
                    .collect::<io::Result<Vec<libc::iovec>>>()?;
                &mut many
            }
        };
        while !pending.is_empty() {
            let count = pending.len().min(IOV_MAX);
            let fd = self.file.as_raw_fd();
            let offset_arg = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: every iovec is a guest memory slice, with its exact length, in a mapping
            // that `mem`, borrowed for this whole call, keeps alive; the kernel reads or writes
            // at most those bytes and keeps no pointer after returning.
            let done = unsafe {
                let one = pending[0];
                match (direction, count) {
                    // One buffer (a 4 KiB request): no iovec for the kernel to import.
                    (Direction::Read, 1) => libc::pread(fd, one.iov_base, one.iov_len, offset_arg),
                    (Direction::Write, 1) => {
                        libc::pwrite(fd, one.iov_base, one.iov_len, offset_arg)
                    }
                    (Direction::Read, _) => {
                        libc::preadv(fd, pending.as_ptr(), count as i32, offset_arg)
                    }
                    (Direction::Write, _) => {
                        libc::pwritev(fd, pending.as_ptr(), count as i32, offset_arg)
                    }
                }
            };
            if done < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if done == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            offset += done as u64;
            pending = advance(pending, done as usize);
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        // SAFETY: fallocate only takes integers; the fd is open for the engine's lifetime.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(zero_range, offset, len) {
            Ok(()) => Ok(()),
            // Not every file system (or block device) supports both; fall back to the other,
            // then to writing zeros.
            Err(_) => self
                .fallocate(punch, offset, len)
                .or_else(|_| self.write_zero_bytes(offset, len)),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let zeros = [0u8; 64 * 1024];
        let end = offset + len;
        while offset < end {
            let chunk = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..chunk], offset)?;
            offset += chunk as u64;
        }
        Ok(())
    }
}

/// The host address and length of a guest buffer, which must lie in one memory region.
fn guest_iovec(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> io::Result<libc::iovec> {
    let slice = mem
        .get_slice(addr, len as usize)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: slice.len(),
    })
}

/// Drops the first `done` bytes from a list of iovecs.
fn advance(iovecs: &mut [libc::iovec], mut done: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iovecs.len() && done >= iovecs[first].iov_len {
        done -= iovecs[first].iov_len;
        first += 1;
    }
    let rest = &mut iovecs[first..];
    if let Some(partial) = rest.first_mut() {
        // SAFETY: `done` < iov_len here, so the new base stays inside the same buffer.
        partial.iov_base = unsafe { partial.iov_base.cast::<u8>().add(done) }.cast();
        partial.iov_len -= done;
    }
    rest
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

    use super::*;

    fn scratch(name: &str, len: u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("nvmm-io-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        (path, file)
    }

    #[test]
    fn vectored_write_then_read_round_trips() {
        let (path, file) = scratch("rw", 8192);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[1u8; 512], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 1024], GuestAddress(0x3000)).unwrap();
        let mut engine = FileEngine::Sync(SyncFileEngine::new(file));
        let bufs = [(GuestAddress(0x1000), 512), (GuestAddress(0x3000), 1024)];
        engine.write(512, &mem, &bufs).unwrap();
        let mut on_disk = vec![0u8; 1536];
        engine.file().read_exact_at(&mut on_disk, 512).unwrap();
        assert!(on_disk[..512].iter().all(|b| *b == 1));
        assert!(on_disk[512..].iter().all(|b| *b == 2));

        engine
            .read(512, &mem, &[(GuestAddress(0x8000), 1536)])
            .unwrap();
        let mut back = vec![0u8; 1536];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, on_disk);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (path, file) = scratch("eof", 512);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut engine = FileEngine::Sync(SyncFileEngine::new(file));
        assert!(engine.read(512, &mem, &[(GuestAddress(0), 512)]).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zeroing_and_discarding_clear_data() {
        let (path, file) = scratch("zero", 16384);
        file.write_all_at(&[7u8; 16384], 0).unwrap();
        let mut engine = FileEngine::Sync(SyncFileEngine::new(file));
        engine.write_zeroes(4096, 4096).unwrap();
        engine.discard(8192, 4096).unwrap();
        let mut data = vec![0u8; 16384];
        engine.file().read_exact_at(&mut data, 0).unwrap();
        assert!(data[..4096].iter().all(|b| *b == 7));
        assert!(data[4096..12288].iter().all(|b| *b == 0));
        assert!(data[12288..].iter().all(|b| *b == 7));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let mut iovecs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 4,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 4,
            },
        ];
        let rest = advance(&mut iovecs, 5);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 3);
        assert_eq!(rest[0].iov_base.cast::<u8>(), b[1..].as_mut_ptr());
    }
}
