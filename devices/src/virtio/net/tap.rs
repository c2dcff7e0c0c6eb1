//! Host side of a virtio-net device: a frame backend. [`Tap`] is a Linux tap device opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame carries the same 12-byte
//! `virtio_net_hdr_v1` the guest uses, and checksum/segmentation offloads pass through untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;

/// Something that carries Ethernet frames, each prefixed with a 12-byte virtio-net header.
pub trait FrameBackend: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Tells the backend which offloads the guest accepts on receive (`TUN_F_*` bits).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// `TUN_F_CSUM`: the guest accepts partially checksummed frames.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: u32 = 0x04;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail with EBUSY instead of attaching to an existing device of that name.
const IFF_TUN_EXCL: libc::c_short = 0x8000u16 as libc::c_short;
// _IOW('T', 202, int), _IOW('T', 203, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int)
// from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `TUNSETOFFLOAD`: what virtio-net activation calls on a vCPU thread (its seccomp filter allows it).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `sizeof(struct virtio_net_hdr_v1)`.
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) the tap `name`, non-blocking, with virtio-net headers.
    pub fn open(name: &str) -> io::Result<Self> {
        let (file, name) = set_iff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, libc::O_NONBLOCK)?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { file, name })
    }

    /// Creates the tap `name` with the flags [`Tap::open`] uses and makes it persistent, so it
    /// outlives this process until deleted; fails with EBUSY if an interface of that name
    /// already exists.
    pub fn create_persistent(name: &str) -> io::Result<()> {
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL;
        let (file, _) = set_iff(name, flags, 0)?;
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(1u8)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Opens /dev/net/tun and attaches it to interface `name` with `flags` (TUNSETIFF); returns the
/// fd and the name the kernel used.
fn set_iff(name: &str, flags: libc::c_short, open_flags: i32) -> io::Result<(File, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid tap name",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(open_flags | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    // Shorter than IFNAMSIZ (checked above), so the name stays NUL-terminated.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may update the name of) a struct ifreq; `req` has the
    // kernel's layout and size and lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = req
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(req.name.len());
    Ok((file, String::from_utf8_lossy(&req.name[..end]).into_owned()))
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap write is one frame; it never writes part of one.
        self.file.write(frame).map(|_| ())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A datagram socket as a frame backend: what tests use instead of a tap.
impl FrameBackend for UnixDatagram {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        UnixDatagram::recv(self, buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        UnixDatagram::send(self, frame).map(|_| ())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked() {
        assert!(Tap::open("").is_err());
        assert!(Tap::open("a-name-that-is-far-too-long").is_err());
        assert!(Tap::open("a/b").is_err());
    }

    #[test]
    fn a_tap_opens_with_vnet_headers_and_offloads() {
        let name = format!("nvmmt{}", std::process::id() % 100_000);
        let mut tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(err) => {
                // Needs CAP_NET_ADMIN and /dev/net/tun; say so instead of failing.
                let _ = writeln!(std::io::stderr(), "SKIPPED tap test: {err}");
                return;
            }
        };
        assert_eq!(tap.name(), name);
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .unwrap();
        // The interface is down: nothing to read, and reading does not block.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
