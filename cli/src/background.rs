//! VMs in the background: `nvmm run -d` (daemonize, console on a socket, output to a log),
//! `nvmm console NAME` (attach), `nvmm logs NAME [-f]`.
//!
//! A background VM's directory (state.rs) also has `console.sock`, `console.log` (rotated to
//! `console.log.1`) and `nvmm.log` (nvmm's own log lines).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nvmm_vmm::ConsoleBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

pub use crate::state::VmDir;
use crate::terminal::RawTerminal;

/// A background VM's console log is rotated beyond this size.
pub const CONSOLE_LOG_LIMIT: u64 = 4 << 20;
/// What the daemon writes on the set-up pipe once its VM runs.
const READY: &[u8] = b"\nnvmm-ready\n";

/// Errors of the background commands.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// A VM of that name already runs.
    #[error("VM {name} is already running (process {pid})")]
    AlreadyRunning {
        /// VM name.
        name: String,
        /// Its nvmm process.
        pid: u32,
    },
    /// No VM of that name runs.
    #[error("no VM named {0} is running in the background")]
    NotRunning(String),
    /// Files under the runtime directory.
    #[error("cannot set up {}", .path.display())]
    Files {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// fork/pipe/setsid failed.
    #[error("cannot start nvmm in the background")]
    Daemonize(#[source] io::Error),
    /// The console connection failed.
    #[error("console connection failed")]
    Console(#[source] io::Error),
}

impl VmDir {
    /// The console backend for a background VM.
    pub fn console_backend(&self) -> ConsoleBackend {
        ConsoleBackend::Socket {
            socket: self.file("console.sock"),
            log: self.file("console.log"),
            log_limit: CONSOLE_LOG_LIMIT,
        }
    }
}

/// What `daemonize` returns in each process.
#[derive(Debug)]
pub enum Daemon {
    /// The caller's process: the background VM is starting.
    Parent(Starting),
    /// The background process: call [`ReadyPipe::ready`] once the VM runs.
    Child(ReadyPipe),
}

/// The daemon's end of the set-up pipe (its stderr until the VM runs).
#[derive(Debug)]
pub struct ReadyPipe {
    vm_dir: VmDir,
}

/// Forks a background nvmm for the VM in `vm_dir`. The parent relays what the child prints
/// while it sets up (errors, addresses) and returns once the VM runs or the child gave up.
pub fn daemonize(vm_dir: &VmDir, name: &str) -> Result<Daemon, BackgroundError> {
    if let Some(pid) = vm_dir.running_pid() {
        return Err(BackgroundError::AlreadyRunning {
            name: name.to_owned(),
            pid,
        });
    }
    std::fs::create_dir_all(&vm_dir.0).map_err(|source| BackgroundError::Files {
        path: vm_dir.0.clone(),
        source,
    })?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(BackgroundError::Daemonize(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these fds; nothing else owns them.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: nvmm has started no threads yet (this runs before any VM or forwarder exists), so
    // the child is a complete copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => Err(BackgroundError::Daemonize(io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid detaches from the terminal (no SIGHUP when it closes); dup2 only
            // replaces fds 0-2 with valid fds.
            unsafe {
                libc::setsid();
                redirect(libc::STDIN_FILENO, "/dev/null");
                redirect(libc::STDOUT_FILENO, "/dev/null");
                libc::dup2(write_end.as_raw_fd(), libc::STDERR_FILENO);
            }
            Ok(Daemon::Child(ReadyPipe {
                vm_dir: vm_dir.clone(),
            }))
        }
        _child => {
            drop(write_end);
            Ok(Daemon::Parent(Starting {
                name: name.to_owned(),
                setup_output: File::from(read_end),
            }))
        }
    }
}

/// A background VM being set up; several can start at once (`nvmm up`), each waited for after.
#[derive(Debug)]
pub struct Starting {
    name: String,
    setup_output: File,
}

/// How the start of a background VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The VM runs.
    Running,
    /// Its nvmm gave up and said why: its `error:` and `hint:` lines were relayed, so the
    /// caller adds no error of its own (the user gets one error line, not two).
    Failed,
    /// Its nvmm ended without an error message (killed, crashed).
    Vanished,
}

impl Starting {
    /// Waits until the VM runs or its nvmm gave up, relaying what it printed meanwhile (its
    /// errors, its address).
    pub fn wait(mut self) -> Started {
        let mut text = Vec::new();
        let _ = self.setup_output.read_to_end(&mut text);
        let ready = text.windows(READY.len()).position(|w| w == READY);
        let shown = ready.map_or(&text[..], |at| &text[..at]);
        let _ = io::stderr().write_all(shown);
        let name = &self.name;
        if ready.is_some() {
            eprintln!(
                "nvmm: {name} runs in the background; `nvmm console {name}` attaches, \
                 `nvmm logs {name}` shows its console"
            );
            return Started::Running;
        }
        let said_why = String::from_utf8_lossy(shown)
            .lines()
            .any(|line| line.starts_with("error: "));
        match said_why {
            true => {
                eprintln!("nvmm: {name} did not start");
                Started::Failed
            }
            false => Started::Vanished,
        }
    }
}

/// # Safety
/// Only replaces `fd` with a fresh open of `path`.
unsafe fn redirect(fd: RawFd, path: &str) {
    if let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        // SAFETY: both fds are valid; dup2 closes `fd` first.
        unsafe { libc::dup2(file.as_raw_fd(), fd) };
    }
}

impl ReadyPipe {
    /// Tells the waiting parent the VM runs, and moves stderr to `nvmm.log`.
    pub fn ready(&mut self) {
        let _ = io::stderr().write_all(READY);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.vm_dir.file("nvmm.log"));
        // SAFETY: dup2 replaces stderr with a valid fd; the pipe's last writer closes with it.
        unsafe {
            match &log {
                Ok(file) => libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO),
                Err(_) => {
                    redirect(libc::STDERR_FILENO, "/dev/null");
                    0
                }
            };
        }
    }
}

static WAKE: OnceLock<EventFd> = OnceLock::new();
const WAKE_RESIZE: u64 = 1;
const WAKE_QUIT: u64 = 1 << 32;

extern "C" fn on_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if let Some(wake) = WAKE.get() {
        let _ = wake.write(if signal == libc::SIGWINCH {
            WAKE_RESIZE
        } else {
            WAKE_QUIT
        });
    }
}

/// `nvmm console NAME`: attaches this terminal until `Ctrl-A d`, the VM ends, or this
/// terminal closes.
pub fn attach(vm_dir: &VmDir, name: &str) -> Result<(), BackgroundError> {
    let socket = vm_dir.file("console.sock");
    let mut stream =
        UnixStream::connect(&socket).map_err(|_| BackgroundError::NotRunning(name.to_owned()))?;
    let (cols, rows) = nvmm_vmm::console::terminal_size().unwrap_or(nvmm_vmm::DEFAULT_CONSOLE_SIZE);
    writeln!(stream, "attach {cols} {rows}").map_err(BackgroundError::Console)?;
    let wake = WAKE.get_or_init(|| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd for signals"));
    for signal in [libc::SIGWINCH, libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
        register_signal_handler(signal, on_signal)
            .map_err(|e| BackgroundError::Console(io::Error::from_raw_os_error(e.errno())))?;
    }
    let _raw = RawTerminal::enter().map_err(BackgroundError::Console)?;
    pump(&mut stream, wake, &socket).map_err(BackgroundError::Console)
}

fn pump(stream: &mut UnixStream, wake: &EventFd, socket: &Path) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        fds[0].fd = if stdin_open { libc::STDIN_FILENO } else { -1 };
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[2].revents != 0 {
            let events = wake.read().unwrap_or(0);
            if events >= WAKE_QUIT {
                return Ok(());
            }
            if let (Some((cols, rows)), Ok(mut resize)) = (
                nvmm_vmm::console::terminal_size(),
                UnixStream::connect(socket),
            ) {
                let _ = writeln!(resize, "resize {cols} {rows}");
            }
        }
        if fds[1].revents != 0 {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            write_stdout(&buf[..n])?;
        }
        if fds[0].revents != 0 {
            // SAFETY: `buf` is valid for writes of its length; read does not keep the pointer.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                stdin_open = false;
            } else {
                stream.write_all(&buf[..n as usize])?;
            }
        }
    }
}

fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// `nvmm logs NAME [-f]`: the console log (older rotation first); with `follow`, keeps
/// printing until the VM ends.
pub fn logs(vm_dir: &VmDir, name: &str, follow: bool) -> Result<(), BackgroundError> {
    let log = vm_dir.file("console.log");
    if !log.exists() {
        return Err(BackgroundError::NotRunning(name.to_owned()));
    }
    let io_err = |source| BackgroundError::Files {
        path: log.clone(),
        source,
    };
    let mut old = log.clone().into_os_string();
    old.push(".1");
    if let Ok(bytes) = std::fs::read(&old) {
        write_stdout(&bytes).map_err(io_err)?;
    }
    let mut file = File::open(&log).map_err(io_err)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io_err)?;
    write_stdout(&buf).map_err(io_err)?;
    if !follow {
        return Ok(());
    }
    loop {
        let running = vm_dir.running_pid().is_some();
        std::thread::sleep(Duration::from_millis(200));
        buf.clear();
        // A rotation replaced the file: continue with the new one from its start.
        let position = file.metadata().map(|m| m.len()).unwrap_or(0);
        let current = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if current < position || !same_file(&file, &log) {
            file.read_to_end(&mut buf).map_err(io_err)?;
            file = File::open(&log).map_err(io_err)?;
        }
        file.read_to_end(&mut buf).map_err(io_err)?;
        write_stdout(&buf).map_err(io_err)?;
        if !running {
            break;
        }
    }
    Ok(())
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}
