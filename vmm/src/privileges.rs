//! Capabilities after set-up. A VM's nvmm often runs as root only to make its network (a tap and
//! a bridge need `CAP_NET_ADMIN`); once its VM is set up it needs almost nothing of that. Linux
//! keeps capabilities per thread, so each thread drops its own: the vCPU, control and forwarder
//! threads as they start (they need none), the main thread once the VM is set up, keeping
//! `CAP_NET_ADMIN` only if the VM is on a network, because leaving it deletes the VM's tap (and,
//! with the last VM, the bridge) when the VM ends.
//!
//! The user id stays 0: the files the VM's process still writes and removes (its console log,
//! its fresh disks, its runtime directory) are root's own, so no capability is needed for them,
//! and a root process without capabilities cannot read other users' files, load modules,
//! mount, trace processes or change the network.

use std::io;

/// `CAP_NET_ADMIN`: changing network interfaces.
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SETPCAP`: needed to shrink the bounding set.
const CAP_SETPCAP: u32 = 8;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Capability numbers are below this (the kernel has 41 today).
const MAX_CAPABILITIES: u32 = 64;

/// Errors of dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    /// Reading or changing the thread's capability sets failed.
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability but `keep` from the calling thread: its effective, permitted and
/// inheritable sets, its ambient set, and its bounding set where it may shrink it; and sets
/// no_new_privs, so no exec can ever grant them back. A thread without them (nvmm not run as
/// root) loses nothing and succeeds.
pub fn drop_capabilities(keep: &[u32]) -> Result<(), PrivilegeError> {
    let keep_mask = keep.iter().fold(0u64, |mask, cap| mask | (1 << cap));
    // SAFETY: prctl with integer arguments only; it changes this thread's flags.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::NoNewPrivs(io::Error::last_os_error()));
    }
    let (effective, permitted) = capabilities().map_err(PrivilegeError::Capabilities)?;
    // SAFETY: as above. Kernels before 4.3 have no ambient set (EINVAL): nothing to clear.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if cleared != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(PrivilegeError::Capabilities(io::Error::last_os_error()));
    }
    // The bounding set first: shrinking it takes CAP_SETPCAP, which the capset below drops.
    if effective & (1 << CAP_SETPCAP) != 0 {
        for cap in (0..MAX_CAPABILITIES).filter(|cap| keep_mask & (1 << cap) == 0) {
            // SAFETY: as above.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                match io::Error::last_os_error() {
                    // Past the last capability this kernel knows.
                    e if e.raw_os_error() == Some(libc::EINVAL) => break,
                    e => return Err(PrivilegeError::Capabilities(e)),
                }
            }
        }
    }
    let kept = permitted & keep_mask;
    set_capabilities(kept, kept).map_err(PrivilegeError::Capabilities)
}

/// The calling thread's effective and permitted sets.
fn capabilities() -> io::Result<(u64, u64)> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two `CapData` (version 3) into `data` and may write the header's
    // version; both are locals of the layout the kernel expects. pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Sets the calling thread's effective and permitted sets, and empties its inheritable set.
fn set_capabilities(effective: u64, permitted: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Truncations on purpose: each set is passed as its low and high 32 bits.
    let data = [
        CapData {
            effective: effective as u32,
            permitted: permitted as u32,
            inheritable: 0,
        },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads the header and two `CapData` (version 3), all locals of the layout
    // the kernel expects; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a thread of its own: capabilities are per thread, so the test's drop
    /// stays there.
    fn on_own_thread(body: impl FnOnce() + Send + 'static) {
        if let Err(panic) = std::thread::spawn(body).join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn status_line(field: &str) -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .map(|value| value.trim().to_owned())
            .unwrap_or_default()
    }

    #[test]
    fn everything_but_what_is_kept_goes() {
        on_own_thread(|| {
            let root = capabilities().unwrap().1 & (1 << CAP_NET_ADMIN) != 0;
            drop_capabilities(&[CAP_NET_ADMIN]).unwrap();
            let kept = if root { 1u64 << CAP_NET_ADMIN } else { 0 };
            assert_eq!(capabilities().unwrap(), (kept, kept));
            assert_eq!(status_line("NoNewPrivs:"), "1");
            assert_eq!(status_line("CapInh:"), format!("{:016x}", 0));
            assert_eq!(status_line("CapAmb:"), format!("{:016x}", 0));
            if root {
                assert_eq!(status_line("CapBnd:"), format!("{kept:016x}"));
            }
            // Dropping again (or everything) is fine, and nothing comes back.
            drop_capabilities(&[]).unwrap();
            assert_eq!(capabilities().unwrap(), (0, 0));
        });
    }
}
