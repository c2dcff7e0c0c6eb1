//! The sandbox of a VM's nvmm process: the seccomp filters of the threads the CLI owns, and what
//! happens when any thread breaks its filter.
//!
//! | thread | filter | installed |
//! |---|---|---|
//! | `vcpuN` | [`nvmm_vmm::seccomp::vcpu`] | by the VMM, in the thread, before its first KVM_RUN |
//! | main | [`main_thread`]: the event loop, then tearing the VM down | in `run::serve`, before the event loop |
//! | `control` | [`control_thread`] | first thing in the thread |
//! | `fwd:PORT` and its connection threads | [`forwarder`] | first thing in the acceptor; its connection threads inherit it |
//!
//! A forbidden call raises SIGSYS in the thread that made it. The handler ([`on_violation`])
//! restores the terminal, prints an `error:` and a `hint:` line naming the thread and the call,
//! and exits with [`crate::exit::EXIT_SANDBOX`]. `--no-seccomp` runs without filters.

use std::io;

use nvmm_vmm::seccomp::{self, Allowlist, Arg, SeccompError};
use vmm_sys_util::signal::register_signal_handler;

use crate::exit::EXIT_SANDBOX;

/// The main thread: the VMM's event loop ([`seccomp::event_loop`]), then what the CLI does once
/// the VM has ended (`run::Launch::start`): stop the port forwarders (join their threads), leave
/// the network (take the network's lock file, read the member files and the members'
/// `/proc/PID/stat`, delete the tap and maybe the bridge over an rtnetlink socket), remove the
/// VM's disks and state files, and report. That teardown is why this list keeps file-system
/// calls (files opened read-only, directories, and the network's lock file opened read-write)
/// and netlink sockets. It still has no KVM ioctl, no exec, no clone (this thread starts no
/// thread or process), no IP socket and no file opened for writing but that lock and the
/// console log.
pub fn main_thread() -> Allowlist {
    use libc::*;
    let mut list = seccomp::event_loop();
    list.allow(&[
        // State files, member files, /proc/PID/stat, directories.
        SYS_newfstatat,
        SYS_statx,
        SYS_getdents64,
        SYS_mkdir,
        SYS_unlink,
        SYS_rmdir,
        SYS_flock,
        // rtnetlink (the socket is created below, AF_NETLINK only).
        SYS_bind,
        SYS_connect,
        SYS_getsockname,
    ]);
    for flags in [
        O_RDONLY | O_CLOEXEC,
        O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_DIRECTORY,
        O_RDWR | O_CREAT | O_CLOEXEC,
    ] {
        list.allow_when(SYS_openat, &[Arg::eq(2, flags as u64)]);
    }
    list.allow_when(SYS_socket, &[Arg::eq(0, AF_NETLINK as u64)]);
    list.allow_when(SYS_sendto, &[Arg::eq(3, 0)]);
    list
}

/// The control thread (`control.rs`): accept a connection, read one request line with a
/// timeout, answer. `status` reads `/proc/self/status` (opened read-only); `stop` presses
/// Ctrl-Alt-Del on the i8042 (an irqfd write) or wakes the event loop (an eventfd write).
pub fn control_thread() -> Allowlist {
    use libc::*;
    let mut list = seccomp::common();
    list.allow(&[
        SYS_accept4,
        SYS_read,
        SYS_recvfrom,
        SYS_setsockopt,
        SYS_statx,
    ]);
    list.allow_when(SYS_openat, &[Arg::eq(2, (O_RDONLY | O_CLOEXEC) as u64)]);
    list.allow_when(SYS_sendto, &[Arg::eq(3, MSG_NOSIGNAL as u64)]);
    list
}

/// The clone flags of glibc's pthread_create.
const THREAD_CLONE_FLAGS: libc::c_int = libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID;

/// A port forwarder's acceptor thread and the connection threads it starts, which inherit its
/// filter: epoll, accept, a thread per connection and per direction, a TCP connection to the
/// guest (non-blocking connect with a timeout), copies both ways, half-close, join.
///
/// Starting threads widens this list: mmap and mprotect (never executable), clone, and the
/// new thread's set-up in glibc and std (robust futex list, restartable sequences, CPU
/// affinity, name). clone is allowed with pthread_create's flags only, so no process can be
/// made; clone3, whose flags are out of seccomp's reach, fails with ENOSYS and glibc falls back
/// to clone. openat fails with ENOENT: glibc opens /sys/devices/system/cpu/online the first
/// time a process makes its ninth malloc arena, which may be in a connection thread, and copes
/// without it.
pub fn forwarder() -> Allowlist {
    use libc::*;
    let mut list = seccomp::common();
    list.allow(&[
        SYS_epoll_wait,
        SYS_accept4,
        SYS_connect,
        SYS_poll,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_recvfrom,
        SYS_shutdown,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_getaffinity,
    ]);
    list.allow_when(SYS_clone, &[Arg::eq(0, THREAD_CLONE_FLAGS as u64)]);
    list.allow_when(SYS_prctl, &[Arg::eq(0, PR_SET_NAME as u64)]);
    list.allow_when(SYS_sendto, &[Arg::eq(3, MSG_NOSIGNAL as u64)]);
    list.ioctls(&[FIONBIO]);
    for family in [AF_INET, AF_INET6] {
        list.allow_when(SYS_socket, &[Arg::eq(0, family as u64)]);
    }
    list.refuse(&[SYS_clone3], ENOSYS);
    list.refuse(&[SYS_openat], ENOENT);
    list
}

/// Confines the main thread once the VM is set up: drops its capabilities but `CAP_NET_ADMIN`
/// when `on_network` (leaving the network deletes the VM's tap, and the last VM's bridge), then
/// installs its filter when `sandboxed`.
pub fn confine_main_thread(sandboxed: bool, on_network: bool) -> Result<(), SeccompError> {
    let filter = match sandboxed {
        true => Some(main_thread().compile("main")?),
        false => None,
    };
    let keep: &[u32] = match on_network {
        true => &[nvmm_vmm::privileges::CAP_NET_ADMIN],
        false => &[],
    };
    seccomp::confine("main", filter.as_ref(), keep)
}

/// The layout of `siginfo_t` for SIGSYS on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// A line built without allocating: a signal handler may not.
struct Line {
    bytes: [u8; 320],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Self {
            bytes: [0; 320],
            len: 0,
        }
    }

    fn push(&mut self, text: &[u8]) -> &mut Self {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
        self
    }

    fn number(&mut self, value: i64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..])
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What the SIGSYS handler prints, for thread `label` and system call `call` (`None`: SIGSYS
/// that seccomp did not send).
fn violation_report(label: &[u8], call: Option<i64>) -> Line {
    let mut line = Line::new();
    line.push(b"error: thread ");
    line.push(if label.is_empty() { b"?" } else { label });
    match call {
        Some(call) => {
            line.push(b" made a forbidden system call (")
                .number(call)
                .push(b"); the VM is stopped\n");
        }
        None => {
            line.push(b" received SIGSYS; the VM is stopped\n");
        }
    }
    line.push(
        b"hint: this is a bug in nvmm, please report it; --no-seccomp runs without filters \
          (for debugging only)\n",
    );
    line
}

/// The SIGSYS handler. Async-signal-safe: an atomic load and tcsetattr (terminal::restore), a
/// thread-local read, write(2) and _exit; each of these calls is allowed by every filter.
extern "C" fn on_violation(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS the
    // union holds `_sigsys`, which `SigsysInfo` lays out.
    let (code, call) = unsafe {
        let sigsys = &*info.cast::<SigsysInfo>();
        (sigsys.code, sigsys.syscall)
    };
    crate::terminal::restore();
    let (label, len) = seccomp::thread_label();
    let line = violation_report(
        &label[..len],
        (code == SYS_SECCOMP).then_some(i64::from(call)),
    );
    let bytes = line.as_bytes();
    // SAFETY: write(2) reads `bytes` only; _exit ends the process without running destructors
    // or atexit handlers, which could deadlock in a signal handler.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(i32::from(EXIT_SANDBOX));
    }
}

/// Installs the SIGSYS handler (for the whole process); call it before any filter.
pub fn report_violations() -> io::Result<()> {
    register_signal_handler(libc::SIGSYS, on_violation)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_for_x86_64() {
        for (label, list) in [
            ("main", main_thread()),
            ("control", control_thread()),
            ("fwd:2222", forwarder()),
        ] {
            let filter = list.compile(label).unwrap();
            assert!(
                filter.longest_program() <= 4096,
                "{label}: {}",
                filter.len()
            );
            for call in [
                seccomp::FORBIDDEN_FOR_TESTS,
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_kill,
            ] {
                assert!(!list.allows(call), "{label} allows {call}");
            }
        }
        assert!(
            !main_thread().allows(libc::SYS_clone3),
            "the main thread starts no thread"
        );
        assert!(!control_thread().allows(libc::SYS_socket));
        assert!(
            !forwarder().allows(libc::SYS_clone3),
            "refused: glibc falls back to clone"
        );
        assert!(!forwarder().allows(libc::SYS_openat), "refused");
    }

    #[test]
    fn the_report_names_thread_and_call() {
        let line = violation_report(b"vcpu0", Some(41));
        let text = std::str::from_utf8(line.as_bytes()).unwrap();
        assert_eq!(
            text,
            "error: thread vcpu0 made a forbidden system call (41); the VM is stopped\n\
             hint: this is a bug in nvmm, please report it; --no-seccomp runs without filters \
             (for debugging only)\n"
        );
        let line = violation_report(b"", None);
        assert!(
            std::str::from_utf8(line.as_bytes())
                .unwrap()
                .starts_with("error: thread ? received SIGSYS"),
        );
        assert_eq!(Line::new().number(-12).number(0).as_bytes(), b"-120");
    }
}
