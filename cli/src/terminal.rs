//! The host terminal: raw mode while a guest console is attached, restored on every exit path
//! (normal return, error, nvmm panic, SIGTERM/SIGINT/SIGHUP), and the signal handlers that stop
//! the VM cleanly.
//!
//! When stdin is not a TTY (pipes, CI) nothing here touches termios.

use std::io;
use std::sync::OnceLock;

use nvmm_vmm::StopHandle;
use nvmm_vmm::console::ResizeHandle;
use vmm_sys_util::signal::register_signal_handler;

/// The terminal settings found at start-up, for every restore path (including the panic hook
/// and signal handlers, which cannot reach a guard on the stack).
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
/// Where the signal handlers send their stop request once a VM runs.
static STOP: OnceLock<StopHandle> = OnceLock::new();
/// Where SIGWINCH goes once a VM runs.
static RESIZE: OnceLock<ResizeHandle> = OnceLock::new();

/// Puts stdin's terminal in raw mode for as long as it lives.
#[derive(Debug)]
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Raw mode if stdin is a terminal; a no-op guard otherwise.
    pub fn enter() -> io::Result<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(Self { active: false });
        }
        // SAFETY: termios is plain data; all-zero is a valid value for tcgetattr to overwrite.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid, writable termios and fd 0 is open.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = *SAVED_TERMIOS.get_or_init(|| original);
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios and fd 0 is a terminal.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { active: true })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore();
        }
    }
}

/// Restores the saved terminal settings, if raw mode was ever entered. Async-signal-safe:
/// tcsetattr is an ioctl and the saved value is only read.
pub fn restore() {
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: `saved` is the termios tcgetattr returned for fd 0; restoring it cannot
        // violate memory safety, and a failure leaves the terminal as it was.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

/// Restores the terminal before the panic message is printed. A thread under a seccomp filter
/// prints the message without a backtrace: symbolizing one reads the executable, which no
/// filter allows (the call would end nvmm as a sandbox violation instead of a panic).
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        if nvmm_vmm::seccomp::is_sandboxed() {
            let thread = std::thread::current();
            eprintln!(
                "\nthread '{}' {info}\nnote: no backtrace from a sandboxed thread; \
                 run with --no-seccomp for one",
                thread.name().unwrap_or("<unnamed>")
            );
        } else {
            default_hook(info);
        }
    }));
}

extern "C" fn on_stop_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    match STOP.get() {
        // The VM stops, the event loop returns, and the RawTerminal guard restores the terminal.
        Some(stop) => stop.stop_for_signal(signal),
        None => {
            restore();
            // SAFETY: _exit is async-signal-safe and ends the process without running
            // destructors that could deadlock inside a signal handler.
            unsafe { libc::_exit(128 + signal) };
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP stop `vm` cleanly (terminal restored, exit 128 + signal).
pub fn stop_on_signals(stop: StopHandle) -> io::Result<()> {
    let _ = STOP.set(stop);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // The handler only does an atomic load, an atomic store and write(2) (or tcsetattr and
        // _exit before a VM exists): all async-signal-safe.
        register_signal_handler(signal, on_stop_signal)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

extern "C" fn on_window_change(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if let Some(resize) = RESIZE.get() {
        resize.notify();
    }
}

/// SIGWINCH tells the VM to follow the terminal's new size.
pub fn follow_window_size(resize: ResizeHandle) -> io::Result<()> {
    let _ = RESIZE.set(resize);
    // The handler does an atomic load and one write(2): async-signal-safe.
    register_signal_handler(libc::SIGWINCH, on_window_change)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}
