//! The host side of the guest console: host stdin → escape keys → the input device (the UART's
//! receive FIFO or the virtio console), and guest output → host stdout.
//!
//! Input is read only when the device has room (and only as much as fits), so nothing typed is
//! lost while the guest is slow; while it is full, stdin is taken out of the event loop until
//! the device signals room again. EOF on stdin stops input, never the guest.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nvmm_devices::InputSink;
use vmm_sys_util::eventfd::EventFd;

use crate::StopHandle;

/// The escape key: Ctrl-A, as in screen, tmux and QEMU.
pub const ESCAPE_KEY: u8 = 0x01;
/// After the escape key: quit nvmm (the guest is stopped).
pub const QUIT_KEY: u8 = b'x';
/// After the escape key: detach from a background VM's console (it keeps running).
pub const DETACH_KEY: u8 = b'd';

/// What an escape sequence asks nvmm to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscapeCommand {
    /// `Ctrl-A x`.
    Quit,
    /// `Ctrl-A d` (only on a detachable console).
    Detach,
}

/// Turns typed bytes into guest input, catching `Ctrl-A x` (quit), `Ctrl-A d` (detach, where
/// the console allows it) and `Ctrl-A Ctrl-A` (one literal Ctrl-A). `Ctrl-A` followed by any
/// other key passes both bytes through.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
    detachable: bool,
}

impl EscapeParser {
    /// A parser that also recognises `Ctrl-A d`.
    pub fn detachable() -> Self {
        Self {
            after_escape: false,
            detachable: true,
        }
    }

    /// Appends the guest-bound bytes of `input` to `out`; stops at and returns a command.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<EscapeCommand> {
        for &byte in input {
            if self.after_escape {
                self.after_escape = false;
                match byte {
                    QUIT_KEY | b'X' => return Some(EscapeCommand::Quit),
                    DETACH_KEY | b'D' if self.detachable => return Some(EscapeCommand::Detach),
                    ESCAPE_KEY => out.push(ESCAPE_KEY),
                    other => out.extend_from_slice(&[ESCAPE_KEY, other]),
                }
            } else if byte == ESCAPE_KEY {
                self.after_escape = true;
            } else {
                out.push(byte);
            }
        }
        None
    }
}

/// Writes guest output straight to fd 1, unbuffered, so prompts without a newline show at once.
#[derive(Debug, Default)]
pub struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: fd 1 is owned by the process for its lifetime; `buf` is a valid slice for
            // `buf.len()` bytes and write(2) does not retain the pointer.
            let n = unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const STDIN_READY: u32 = 0;
const SINK_ROOM: u32 = 1;

/// The device console input goes to, and the eventfd it signals when it has room again.
pub type SharedSink = Arc<Mutex<dyn InputSink>>;

/// Event-loop subscriber feeding an input fd (normally stdin) into the guest's console.
pub struct ConsoleInput {
    input: RawFd,
    sink: SharedSink,
    sink_room: EventFd,
    escape: Option<EscapeParser>,
    stop: StopHandle,
    /// Bytes read and parsed but not yet accepted by the FIFO.
    pending: Vec<u8>,
    polling_input: bool,
    input_closed: bool,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleInput")
            .field("input", &self.input)
            .field("pending", &self.pending.len())
            .field("polling_input", &self.polling_input)
            .finish_non_exhaustive()
    }
}

impl ConsoleInput {
    /// Feeds `input` into `sink`; `sink_room` is the sink's "room again" event. With `escape`,
    /// `Ctrl-A x` stops the VM through `stop`.
    pub fn new(
        input: &impl AsRawFd,
        sink: SharedSink,
        sink_room: EventFd,
        escape: bool,
        stop: StopHandle,
    ) -> Self {
        Self {
            input: input.as_raw_fd(),
            sink,
            sink_room,
            escape: escape.then(EscapeParser::default),
            stop,
            pending: Vec::new(),
            polling_input: false,
            input_closed: false,
        }
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, dyn InputSink + 'static> {
        nvmm_devices::lock(&self.sink)
    }

    /// Moves pending bytes into the FIFO; returns true when all of them fit.
    fn flush_pending(&mut self) -> bool {
        if !self.pending.is_empty() {
            let queued = self.sink().push(&self.pending);
            self.pending.drain(..queued);
        }
        self.pending.is_empty()
    }

    fn read_input(&mut self) {
        let room = self.sink().room();
        if room == 0 {
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: `buf` is valid for writes of `want` <= buf.len() bytes; read(2) does not keep
        // the pointer. The fd stays open for the process's lifetime (it is stdin).
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), want) };
        match n {
            0 => {
                log::debug!("console input reached EOF; the guest keeps running");
                self.input_closed = true;
            }
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if !matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    log::warn!("cannot read console input ({err}); input disabled");
                    self.input_closed = true;
                }
            }
            n => {
                let bytes = &buf[..n as usize];
                let command = match self.escape.as_mut() {
                    Some(parser) => parser.feed(bytes, &mut self.pending),
                    None => {
                        self.pending.extend_from_slice(bytes);
                        None
                    }
                };
                if command == Some(EscapeCommand::Quit) {
                    log::info!("Ctrl-A x: stopping the VM");
                    self.stop.quit();
                }
                self.flush_pending();
            }
        }
    }

    /// Polls the input only while the FIFO can take more and no parsed bytes are waiting.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = !self.input_closed && self.pending.is_empty() && self.sink().room() > 0;
        if want == self.polling_input {
            return;
        }
        let event = Events::with_data_raw(self.input, STDIN_READY, EventSet::IN);
        let result = if want {
            ops.add(event)
        } else {
            ops.remove(event)
        };
        match result {
            Ok(()) => self.polling_input = want,
            Err(err) => {
                // Regular files and /dev/null cannot be polled: the guest simply gets no input.
                log::info!("console input cannot be polled ({err:?}); guest input disabled");
                self.input_closed = true;
                self.polling_input = false;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STDIN_READY => {
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    && !events.event_set().contains(EventSet::IN)
                {
                    self.input_closed = true;
                } else {
                    self.read_input();
                }
            }
            SINK_ROOM => {
                // Reading clears the eventfd; the value itself does not matter.
                let _ = self.sink_room.read();
                self.flush_pending();
            }
            other => log::warn!("console: unexpected event data {other}"),
        }
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::with_data(&self.sink_room, SINK_ROOM, EventSet::IN)) {
            log::warn!("cannot watch the console input device ({err:?}); console input disabled");
            return;
        }
        self.update_interest(ops);
    }
}

/// Tells the VMM that the host terminal changed size (from a SIGWINCH handler).
#[derive(Clone, Debug)]
pub struct ResizeHandle {
    event: Arc<EventFd>,
}

impl ResizeHandle {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Async-signal-safe: one write(2).
    pub fn notify(&self) {
        // Only fails if the counter would overflow, and then it is already signalled.
        let _ = self.event.write(1);
    }
}

/// The size of the terminal on stdin (or stdout): (columns, rows).
pub fn terminal_size() -> Option<(u16, u16)> {
    [libc::STDIN_FILENO, libc::STDOUT_FILENO]
        .into_iter()
        .find_map(|fd| {
            // SAFETY: winsize is plain data; all-zero is valid for TIOCGWINSZ to overwrite.
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is valid.
            let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
            (rc == 0 && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
        })
}

/// Follows the host terminal's size into the virtio console.
pub struct ConsoleResize {
    handle: ResizeHandle,
    console: Arc<Mutex<nvmm_devices::virtio::console::Console>>,
}

impl std::fmt::Debug for ConsoleResize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleResize").finish_non_exhaustive()
    }
}

impl ConsoleResize {
    /// Resizes `console` whenever `handle` is notified.
    pub fn new(
        handle: ResizeHandle,
        console: Arc<Mutex<nvmm_devices::virtio::console::Console>>,
    ) -> Self {
        Self { handle, console }
    }
}

impl MutEventSubscriber for ConsoleResize {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.handle.event.read();
        if let Some((cols, rows)) = terminal_size() {
            log::debug!("terminal resized to {cols}x{rows}");
            nvmm_devices::lock(&self.console).set_size(cols, rows);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&*self.handle.event, EventSet::IN)) {
            log::warn!("cannot follow the terminal size: {err:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(parser: &mut EscapeParser, input: &[u8]) -> (Vec<u8>, Option<EscapeCommand>) {
        let mut out = Vec::new();
        let command = parser.feed(input, &mut out);
        (out, command)
    }

    #[test]
    fn plain_bytes_pass_through() {
        let mut p = EscapeParser::default();
        assert_eq!(
            parse(&mut p, b"ls -l\r\x03"),
            (b"ls -l\r\x03".to_vec(), None)
        );
    }

    #[test]
    fn ctrl_a_x_quits_and_drops_the_rest() {
        let mut p = EscapeParser::default();
        assert_eq!(
            parse(&mut p, b"ab\x01xcd"),
            (b"ab".to_vec(), Some(EscapeCommand::Quit))
        );
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"\x01X").1, Some(EscapeCommand::Quit));
    }

    #[test]
    fn double_ctrl_a_sends_one() {
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"\x01\x01a"), (b"\x01a".to_vec(), None));
    }

    #[test]
    fn ctrl_a_then_other_key_sends_both() {
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"\x01c"), (b"\x01c".to_vec(), None));
    }

    #[test]
    fn ctrl_a_d_detaches_only_where_allowed() {
        let mut p = EscapeParser::detachable();
        assert_eq!(
            parse(&mut p, b"ls\x01d"),
            (b"ls".to_vec(), Some(EscapeCommand::Detach))
        );
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"\x01d"), (b"\x01d".to_vec(), None));
    }

    #[test]
    fn escape_state_survives_across_reads() {
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"abc\x01"), (b"abc".to_vec(), None));
        assert_eq!(parse(&mut p, b"x"), (Vec::new(), Some(EscapeCommand::Quit)));
        let mut p = EscapeParser::default();
        assert_eq!(parse(&mut p, b"\x01"), (Vec::new(), None));
        assert_eq!(parse(&mut p, b"\x01"), (b"\x01".to_vec(), None));
        assert_eq!(parse(&mut p, b"\x01"), (Vec::new(), None));
        assert_eq!(parse(&mut p, b"q"), (b"\x01q".to_vec(), None));
    }
}
