//! Seccomp filters: each nvmm thread runs with an allowlist of the system calls it makes; any
//! other call raises SIGSYS (`SECCOMP_RET_TRAP`), whose handler (the CLI's) reports the thread
//! and the call, restores the terminal and ends nvmm.
//!
//! A thread installs its own filter ([`install`]) once its set-up is done, so set-up (opening
//! /dev/kvm, files, taps, sockets) is never constrained:
//! - a vCPU thread ([`vcpu`]) before its first KVM_RUN;
//! - the event-loop thread ([`event_loop`], which the CLI extends with what it does after the
//!   VM ends) right before it serves the devices.
//!
//! The CLI builds the filters of its own threads (control socket, port forwarders) from the same
//! parts: [`Allowlist`] and [`common`].
//!
//! Arguments are checked where that is cheap and means something: ioctl request codes (a vCPU
//! thread can run KVM_RUN, read its registers and set tap offloads, nothing else), no executable
//! mappings, only the futex operations std and glibc use, the flags of files a thread may open,
//! the only signals a thread may send. Pointers (paths, buffers) cannot be checked by seccomp.
//!
//! The numbers are x86_64's, the only architecture nvmm runs on.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Test hook: with `NVMM_TEST_FORBIDDEN_SYSCALL=LABEL`, the thread whose label starts with
/// `LABEL` (`vcpu`, `main`, `control`, `fwd`) makes [`FORBIDDEN_FOR_TESTS`] right after its
/// filter is installed, so that tests can see a violation end nvmm. Never set in normal use.
pub const TEST_FORBIDDEN_SYSCALL_ENV: &str = "NVMM_TEST_FORBIDDEN_SYSCALL";

/// The call the test hook makes: getppid, harmless, and no nvmm thread has a reason to make it,
/// so no filter allows it.
pub const FORBIDDEN_FOR_TESTS: i64 = libc::SYS_getppid;

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allowlist does not compile to BPF (a bug in the list).
    #[error("cannot compile the seccomp filter of thread {thread}")]
    Compile {
        /// The thread's label.
        thread: String,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of thread {thread}")]
    Install {
        /// The thread's label.
        thread: String,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The thread could not drop its capabilities.
    #[error("cannot drop the capabilities of thread {thread}")]
    Privileges {
        /// The thread's label.
        thread: String,
        /// Why.
        #[source]
        source: crate::privileges::PrivilegeError,
    },
}

/// A compiled filter, ready for [`install`]: the allowlist's program, after one program per
/// errno of its refusals ([`Allowlist::refuse`]).
#[derive(Clone, Debug)]
pub struct Filter {
    label: String,
    programs: Vec<BpfProgram>,
}

impl Filter {
    /// The label of the thread it is for.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// BPF instructions, all programs together.
    pub fn len(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }

    /// Never true for a compiled filter (it checks the architecture at least).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest program, which the kernel takes up to 4096 instructions long.
    pub fn longest_program(&self) -> usize {
        self.programs.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// What a call outside the list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnViolation {
    /// SIGSYS: the handler reports and ends nvmm.
    Trap,
    /// The call fails with this errno: for tests, which must survive a forbidden call.
    Errno(i32),
}

/// One condition on an argument: `(arg & mask) == value`, on the low 32 bits (every argument
/// checked here is an int, a flag word or an ioctl request, which the kernel truncates too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    index: u8,
    mask: Option<u64>,
    value: u64,
}

impl Arg {
    /// Argument `index` (0-based) equals `value`.
    pub const fn eq(index: u8, value: u64) -> Self {
        Self {
            index,
            mask: None,
            value,
        }
    }

    /// Argument `index` has none of the bits of `mask` set.
    pub const fn clear(index: u8, mask: u64) -> Self {
        Self {
            index,
            mask: Some(mask),
            value: 0,
        }
    }

    /// `(argument & mask) == value`.
    pub const fn masked(index: u8, mask: u64, value: u64) -> Self {
        Self {
            index,
            mask: Some(mask),
            value,
        }
    }

    fn condition(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let op = match self.mask {
            Some(mask) => SeccompCmpOp::MaskedEq(mask),
            None => SeccompCmpOp::Eq,
        };
        SeccompCondition::new(self.index, SeccompCmpArgLen::Dword, op, self.value)
    }
}

/// The system calls a thread may make: each with any arguments, or only with arguments that
/// match one of its rules (each rule a list of conditions that must all hold). Some calls may be
/// refused with an errno instead of trapping ([`Allowlist::refuse`]): for calls that glibc makes
/// on its own and copes with failing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    // None: any arguments.
    calls: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
    refused: BTreeMap<i64, i32>,
}

impl Allowlist {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `calls` with any arguments.
    pub fn allow(&mut self, calls: &[i64]) -> &mut Self {
        for &call in calls {
            self.calls.insert(call, None);
        }
        self
    }

    /// Allows `call` when every condition in `rule` holds (on top of rules added before).
    pub fn allow_when(&mut self, call: i64, rule: &[Arg]) -> &mut Self {
        // None: already allowed with any arguments.
        if let Some(rules) = self.calls.entry(call).or_insert_with(|| Some(Vec::new()))
            && !rules.iter().any(|r| r == rule)
        {
            rules.push(rule.to_vec());
        }
        self
    }

    /// Allows ioctl with these request codes, on any fd.
    pub fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        for &request in requests {
            self.allow_when(libc::SYS_ioctl, &[Arg::eq(1, request)]);
        }
        self
    }

    /// Makes `calls` fail with `errno` (whatever their arguments) instead of trapping. The
    /// kernel runs every installed program and the strictest answer wins, so a refusal takes
    /// effect only where the allowlist itself lets the call through: [`Allowlist::compile`]
    /// adds it there.
    pub fn refuse(&mut self, calls: &[i64], errno: i32) -> &mut Self {
        for &call in calls {
            self.refused.insert(call, errno);
        }
        self
    }

    /// Everything `other` allows, too.
    pub fn extend(&mut self, other: &Allowlist) -> &mut Self {
        for (&call, &errno) in &other.refused {
            self.refuse(&[call], errno);
        }
        for (&call, rules) in &other.calls {
            match rules {
                None => {
                    self.allow(&[call]);
                }
                Some(rules) => {
                    for rule in rules {
                        self.allow_when(call, rule);
                    }
                }
            }
        }
        self
    }

    /// How many system calls are allowed (with any or some arguments).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// True if nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Whether `call` is allowed with some arguments.
    pub fn allows(&self, call: i64) -> bool {
        self.calls.contains_key(&call) && !self.refused.contains_key(&call)
    }

    /// Compiles the list for thread `label`; calls outside it trap.
    pub fn compile(&self, label: &str) -> Result<Filter, SeccompError> {
        self.compile_with(label, OnViolation::Trap)
    }

    /// Compiles the list for thread `label` with the given action on calls outside it.
    pub fn compile_with(
        &self,
        label: &str,
        on_violation: OnViolation,
    ) -> Result<Filter, SeccompError> {
        let error = |source| SeccompError::Compile {
            thread: label.to_owned(),
            source,
        };
        let program = |rules, mismatch, matched| {
            SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
                .and_then(BpfProgram::try_from)
                .map_err(error)
        };
        // Installed first: each refusal program answers its calls with the errno and lets the
        // rest through to the allowlist's program, which lets refused calls pass.
        let mut by_errno: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for (&call, &errno) in &self.refused {
            by_errno.entry(errno).or_default().push(call);
        }
        let mut programs = Vec::new();
        for (errno, calls) in by_errno {
            let rules = calls.into_iter().map(|call| (call, Vec::new())).collect();
            programs.push(program(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
            )?);
        }
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = self
            .refused
            .keys()
            .map(|&call| (call, Vec::new()))
            .collect();
        for (&call, conditions) in &self.calls {
            if self.refused.contains_key(&call) {
                continue;
            }
            let compiled = match conditions {
                None => Vec::new(),
                Some(list) => list
                    .iter()
                    .map(|rule| {
                        let conditions = rule
                            .iter()
                            .map(|arg| arg.condition())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(error)?,
            };
            rules.insert(call, compiled);
        }
        let mismatch = match on_violation {
            OnViolation::Trap => SeccompAction::Trap,
            OnViolation::Errno(errno) => SeccompAction::Errno(errno as u32),
        };
        programs.push(program(rules, mismatch, SeccompAction::Allow)?);
        Ok(Filter {
            label: label.to_owned(),
            programs,
        })
    }
}

/// Linux keeps 15 bytes of a thread name; labels are as short.
const LABEL_LEN: usize = 16;

thread_local! {
    // Const-initialised and without a destructor: reading it is a plain TLS load, safe in a
    // signal handler.
    static LABEL: Cell<[u8; LABEL_LEN]> = const { Cell::new([0; LABEL_LEN]) };
}

/// Confines the calling thread once its set-up is done: drops every capability but `keep`
/// ([`crate::privileges::drop_capabilities`]; always, `--no-seccomp` or not), then installs
/// `filter`, if any. `thread` names it in an error.
pub fn confine(thread: &str, filter: Option<&Filter>, keep: &[u32]) -> Result<(), SeccompError> {
    crate::privileges::drop_capabilities(keep).map_err(|source| SeccompError::Privileges {
        thread: thread.to_owned(),
        source,
    })?;
    filter.map_or(Ok(()), install)
}

/// Installs `filter` on the calling thread, for the rest of its life (and of the threads it
/// starts). The thread is known by the filter's label in a violation report ([`thread_label`]).
pub fn install(filter: &Filter) -> Result<(), SeccompError> {
    set_label(&filter.label);
    let hook = std::env::var_os(TEST_FORBIDDEN_SYSCALL_ENV).is_some_and(|wanted| {
        !wanted.is_empty()
            && filter
                .label
                .as_bytes()
                .starts_with(wanted.as_encoded_bytes())
    });
    // glibc gives a thread its malloc arena at its first allocation, and the ninth arena of a
    // process first reads /sys/devices/system/cpu/online: allocate before the filter.
    drop(std::hint::black_box(Box::new(0u64)));
    for program in &filter.programs {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            thread: filter.label.clone(),
            source,
        })?;
    }
    if hook {
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::syscall(FORBIDDEN_FOR_TESTS) };
    }
    Ok(())
}

/// Names the calling thread in a violation report: for threads that inherit their filter from
/// the thread that started them ([`install`] names the others). At most 16 bytes are kept.
pub fn set_label(label: &str) {
    let mut bytes = [0u8; LABEL_LEN];
    let len = label.len().min(LABEL_LEN);
    bytes[..len].copy_from_slice(&label.as_bytes()[..len]);
    LABEL.with(|cell| cell.set(bytes));
}

/// Whether the calling thread runs under a filter (it has a label): for the panic hook, which
/// must not symbolize a backtrace there (that needs calls no filter allows).
pub fn is_sandboxed() -> bool {
    thread_label().1 > 0
}

/// The label of the calling thread's filter (empty before [`install`]), as bytes.
/// Async-signal-safe: for the SIGSYS handler.
pub fn thread_label() -> ([u8; LABEL_LEN], usize) {
    let label = LABEL.with(Cell::get);
    let len = label.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    (label, len)
}

// The x86_64 values of the ioctl requests nvmm's threads make after set-up.
mod request {
    use kvm_bindings::{kvm_regs, kvm_translation};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
}

/// What every nvmm thread may do, whatever its job: allocate and free memory (never
/// executable), wait on and wake futexes, return from signal handlers (the SIGRTMIN kick, the
/// stop signals that any thread may receive), read the clock, log to stderr (write), restore
/// the terminal (TCSETS and TCGETS on fd 0, from the panic hook or the SIGSYS handler), close
/// files, and end: the thread, the process, or an abort (SIGABRT to itself).
pub fn common() -> Allowlist {
    use libc::*;
    let mut list = Allowlist::new();
    list.allow(&[
        // Memory: the allocator, thread-local data, a thread's own signal stack.
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        // Signals: handlers return; glibc blocks signals around thread exit and pthread_kill;
        // std removes the thread's alternate signal stack at exit.
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        // Time for log lines and timeouts; usually the vDSO, a real call on some clocksources.
        SYS_clock_gettime,
        // std's channels back off with sched_yield; hash maps seed from getrandom.
        SYS_sched_yield,
        SYS_getrandom,
        // Logs to stderr, eventfd signals; every thread writes.
        SYS_write,
        SYS_close,
        SYS_exit,
        SYS_exit_group,
        // abort(): raise(SIGABRT) is tgkill(getpid(), gettid(), SIGABRT).
        SYS_getpid,
        SYS_gettid,
    ]);
    for call in [SYS_mmap, SYS_mprotect] {
        list.allow_when(call, &[Arg::clear(2, PROT_EXEC as u64)]);
    }
    // glibc gives freed memory of thread arenas and stacks back with MADV_DONTNEED.
    list.allow_when(SYS_madvise, &[Arg::eq(2, MADV_DONTNEED as u64)]);
    // With or without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME; never requeue or PI.
    for op in [FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET] {
        list.allow_when(
            SYS_futex,
            &[Arg::masked(1, FUTEX_CMD_MASK as u64, op as u64)],
        );
    }
    list.allow_when(SYS_tgkill, &[Arg::eq(2, SIGABRT as u64)]);
    list.allow_when(SYS_rt_sigaction, &[Arg::eq(0, SIGABRT as u64)]);
    // std's debug builds check that a file descriptor is open before closing it.
    list.allow_when(SYS_fcntl, &[Arg::eq(1, F_GETFD as u64)]);
    // glibc's tcsetattr reads the settings back (TCGETS) after setting them (TCSETS).
    for request in [TCSETS, TCGETS] {
        list.allow_when(
            SYS_ioctl,
            &[Arg::eq(0, STDIN_FILENO as u64), Arg::eq(1, request)],
        );
    }
    list
}

/// File flags of the console log, opened again when it is rotated.
const LOG_OPEN_FLAGS: u64 =
    (libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC) as u64;

/// A vCPU thread: KVM_RUN and the device models its exits reach (UART and virtio registers,
/// i8042, ACPI, debug port), and the coalesced serial output's replay timer. Those write guest output (stdout, or a background VM's log and
/// attached client), signal eventfds and log. On a KVM internal error it reads the registers
/// and translates RIP. Virtio-net activation sets tap offloads. `console_log`: guest output goes
/// to a log that this thread may rotate (rename, then open for appending).
pub fn vcpu(console_log: bool) -> Allowlist {
    let mut list = common();
    list.ioctls(&[
        request::KVM_RUN(),
        request::KVM_GET_REGS(),
        request::KVM_TRANSLATE(),
        nvmm_devices::virtio::net::tap::TUNSETOFFLOAD,
    ]);
    // Coalesced serial output: each exit sets the timer that replays what follows it.
    list.allow(&[libc::SYS_timerfd_settime]);
    if console_log {
        list.allow(&[libc::SYS_rename]);
        list.allow_when(libc::SYS_openat, &[Arg::eq(2, LOG_OPEN_FLAGS)]);
        // std writes to a unix socket with send(MSG_NOSIGNAL): the attached console client.
        list.allow_when(libc::SYS_sendto, &[Arg::eq(3, libc::MSG_NOSIGNAL as u64)]);
    }
    list
}

/// The event-loop thread while it serves the VM ([`crate::Vm::run_until_exit`]) and as the VM
/// is dropped: epoll; eventfds; stdin and stdout; TIOCGWINSZ; virtio-blk's positional I/O
/// (pread, pwrite, preadv, pwritev), fdatasync and fallocate; the tap; a
/// background VM's console socket (accept, timeouts, non-blocking recv, dup for the output
/// side, shutdown) and log rotation; the coalesced serial output's replay timer; kicking vCPU
/// threads (SIGRTMIN) and sleeping between kicks.
/// No KVM ioctl: everything the devices need from KVM (irqfds, ioeventfds) was set up before.
pub fn event_loop() -> Allowlist {
    use libc::*;
    let mut list = common();
    list.allow(&[
        SYS_epoll_wait,
        SYS_epoll_ctl,
        SYS_read,
        SYS_preadv,
        SYS_pwritev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_accept4,
        SYS_recvfrom,
        SYS_setsockopt,
        SYS_shutdown,
        SYS_rename,
        SYS_clock_nanosleep,
        // Coalesced serial output's replay timer.
        SYS_timerfd_settime,
    ]);
    list.ioctls(&[TIOCGWINSZ, FIONBIO]);
    list.allow_when(SYS_fcntl, &[Arg::eq(1, F_DUPFD_CLOEXEC as u64)]);
    list.allow_when(SYS_openat, &[Arg::eq(2, LOG_OPEN_FLAGS)]);
    list.allow_when(SYS_sendto, &[Arg::eq(3, MSG_NOSIGNAL as u64)]);
    list.allow_when(
        SYS_tgkill,
        &[Arg::eq(2, vmm_sys_util::signal::SIGRTMIN() as u64)],
    );
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists() -> Vec<(&'static str, Allowlist)> {
        vec![
            ("vcpu0", vcpu(false)),
            ("vcpu0", vcpu(true)),
            ("main", event_loop()),
        ]
    }

    #[test]
    fn every_filter_compiles_for_x86_64() {
        for (label, list) in lists() {
            let filter = list.compile(label).unwrap();
            // The kernel takes at most 4096 instructions (BPF_MAXINSNS).
            assert!(filter.len() > 10, "{label}: {}", filter.len());
            assert!(
                filter.longest_program() <= 4096,
                "{label}: {}",
                filter.len()
            );
        }
    }

    #[test]
    fn no_filter_allows_the_test_call_or_process_control() {
        for (label, list) in lists() {
            for call in [
                FORBIDDEN_FOR_TESTS,
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_socket,
                libc::SYS_kill,
            ] {
                assert!(!list.allows(call), "{label} allows {call}");
            }
        }
        assert!(!vcpu(false).allows(libc::SYS_openat));
    }

    #[test]
    fn rules_merge() {
        let mut list = Allowlist::new();
        list.allow_when(libc::SYS_ioctl, &[Arg::eq(1, 1)]);
        list.allow_when(libc::SYS_ioctl, &[Arg::eq(1, 1)]);
        list.allow_when(libc::SYS_ioctl, &[Arg::eq(1, 2)]);
        assert_eq!(list.calls[&libc::SYS_ioctl].as_ref().unwrap().len(), 2);
        let mut any = Allowlist::new();
        any.allow(&[libc::SYS_ioctl]);
        list.extend(&any);
        assert_eq!(list.calls[&libc::SYS_ioctl], None, "any arguments wins");
        list.allow_when(libc::SYS_ioctl, &[Arg::eq(1, 3)]);
        assert_eq!(list.calls[&libc::SYS_ioctl], None);
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn kvm_request_codes() {
        assert_eq!(request::KVM_RUN(), 0xae80);
        assert_eq!(request::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(request::KVM_TRANSLATE(), 0xc018_ae85);
    }

    /// Installs a list on a thread of its own with EPERM instead of SIGSYS, and checks what it
    /// lets through.
    #[test]
    fn an_installed_filter_refuses_what_it_does_not_list() {
        let mut list = common();
        list.ioctls(&[libc::FIONREAD]);
        list.refuse(&[libc::SYS_pipe, libc::SYS_pipe2], libc::ENOSYS);
        let filter = list
            .compile_with("probe", OnViolation::Errno(libc::EPERM))
            .unwrap();
        let outcome = std::thread::spawn(move || {
            install(&filter).unwrap();
            let (label, len) = thread_label();
            assert_eq!(&label[..len], b"probe");
            // SAFETY: getppid takes no arguments.
            let ppid = unsafe { libc::syscall(FORBIDDEN_FOR_TESTS) };
            let ppid_errno = std::io::Error::last_os_error().raw_os_error();
            let mut fds = [0; 2];
            // SAFETY: pipe writes two fds into the array (when allowed).
            let pipe = unsafe { libc::pipe(fds.as_mut_ptr()) };
            let pipe_errno = std::io::Error::last_os_error().raw_os_error();
            // Allocation and formatting still work under the filter.
            let text = format!("{:?}", vec![1u8; 100_000].len());
            (ppid, ppid_errno, pipe, pipe_errno, text)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, -1);
        assert_eq!(outcome.1, Some(libc::EPERM));
        assert_eq!(outcome.2, -1);
        assert_eq!(outcome.3, Some(libc::ENOSYS), "refused, not trapped");
        assert_eq!(outcome.4, "100000");
        // This thread is not filtered.
        // SAFETY: getppid takes no arguments.
        assert!(unsafe { libc::syscall(FORBIDDEN_FOR_TESTS) } > 0);
    }
}
