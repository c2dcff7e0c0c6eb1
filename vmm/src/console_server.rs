//! The console of a VM running in the background (`nvmm run -d`): guest output goes to a
//! bounded, rotated log file and to the attached client, if any; `nvmm console` attaches over a
//! unix socket, and a new attach takes over from the previous one with a notice.
//!
//! Socket protocol: a client's first line says what it wants —
//! `attach COLS ROWS\n` (then raw bytes both ways until either side closes) or
//! `resize COLS ROWS\n` (the attached terminal changed size; the connection then closes).
//! `Ctrl-A d` from the client detaches it, `Ctrl-A x` stops the VM.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nvmm_devices::lock;
use nvmm_devices::virtio::console::Console;
use vmm_sys_util::eventfd::EventFd;

use crate::StopHandle;
use crate::console::{EscapeCommand, EscapeParser, SharedSink};

/// How long a stuck client may block guest output before it is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new connection has to send its first line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const DETACHED: &[u8] = b"\r\n[nvmm: detached; the VM keeps running]\r\n";
const TAKEN_OVER: &[u8] = b"\r\n[nvmm: another `nvmm console` took over this console]\r\n";

/// Where a background VM's console output goes.
#[derive(Debug)]
pub struct ConsoleHub {
    log_path: PathBuf,
    log: Option<File>,
    log_size: u64,
    log_limit: u64,
    client: Option<UnixStream>,
}

impl ConsoleHub {
    /// A hub appending to `log_path`, rotated to `<log_path>.1` beyond `log_limit` bytes.
    pub fn new(log_path: &Path, log_limit: u64) -> io::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let log_size = log.metadata()?.len();
        Ok(Self {
            log_path: log_path.to_owned(),
            log: Some(log),
            log_size,
            log_limit,
            client: None,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.log_path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.log_path, &old)?;
        self.log = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)?,
        );
        self.log_size = 0;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.log_size + bytes.len() as u64 > self.log_limit && self.log_size > 0 {
            if let Err(err) = self.rotate() {
                log::warn!("cannot rotate the console log: {err}");
            }
        }
        if let Some(log) = &mut self.log {
            match log.write_all(bytes) {
                Ok(()) => self.log_size += bytes.len() as u64,
                Err(err) => {
                    log::warn!("console log write failed ({err}); logging stops");
                    self.log = None;
                }
            }
        }
        if let Some(client) = &mut self.client {
            if client.write_all(bytes).is_err() {
                log::info!("console client stopped reading; dropping it");
                self.client = None;
            }
        }
    }
}

/// The `Write` end of a hub, given to the UART and the virtio console.
#[derive(Debug, Clone)]
pub struct HubWriter(pub Arc<Mutex<ConsoleHub>>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const LISTENER: u32 = 0;
const CLIENT: u32 = 1;
const SINK_ROOM: u32 = 2;

/// Serves the console socket: attach, take-over, detach, resize, and input back pressure.
pub struct ConsoleServer {
    listener: UnixListener,
    client: Option<UnixStream>,
    hub: Arc<Mutex<ConsoleHub>>,
    sink: SharedSink,
    sink_room: EventFd,
    resize: Option<Arc<Mutex<Console>>>,
    escape: EscapeParser,
    stop: StopHandle,
    pending: Vec<u8>,
    polling_client: bool,
}

impl std::fmt::Debug for ConsoleServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleServer")
            .field("attached", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsoleServer {
    /// Serves `listener`, feeding clients' input into `sink`; a virtio console in `resize`
    /// follows the attached terminal's size.
    pub fn new(
        listener: UnixListener,
        hub: Arc<Mutex<ConsoleHub>>,
        sink: SharedSink,
        sink_room: EventFd,
        resize: Option<Arc<Mutex<Console>>>,
        stop: StopHandle,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            client: None,
            hub,
            sink,
            sink_room,
            resize,
            escape: EscapeParser::detachable(),
            stop,
            pending: Vec::new(),
            polling_client: false,
        })
    }

    fn resize_to(&self, cols: u16, rows: u16) {
        if let Some(console) = &self.resize {
            lock(console).set_size(cols, rows);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            match read_handshake(&stream) {
                Some(Handshake::Attach(cols, rows)) => {
                    self.drop_client(ops, Some(TAKEN_OVER));
                    if stream
                        .set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))
                        .is_err()
                    {
                        continue;
                    }
                    match stream.try_clone() {
                        Ok(output) => lock(&self.hub).client = Some(output),
                        Err(_) => continue,
                    }
                    log::info!("console attached");
                    self.client = Some(stream);
                    self.escape = EscapeParser::detachable();
                    self.resize_to(cols, rows);
                }
                Some(Handshake::Resize(cols, rows)) => self.resize_to(cols, rows),
                None => log::debug!("console socket: connection without a valid first line"),
            }
        }
    }

    fn drop_client(&mut self, ops: &mut EventOps, notice: Option<&[u8]>) {
        if let Some(mut client) = self.client.take() {
            if self.polling_client {
                let _ = ops.remove(Events::with_data_raw(
                    client.as_raw_fd(),
                    CLIENT,
                    EventSet::IN,
                ));
                self.polling_client = false;
            }
            lock(&self.hub).client = None;
            if let Some(notice) = notice {
                let _ = client.write_all(notice);
            }
            let _ = client.shutdown(std::net::Shutdown::Both);
            log::info!("console detached");
        }
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let queued = lock(&self.sink).push(&self.pending);
            self.pending.drain(..queued);
        }
    }

    fn read_client(&mut self, ops: &mut EventOps) {
        let Some(client) = &self.client else {
            return;
        };
        let room = lock(&self.sink).room();
        if room == 0 {
            return;
        }
        let mut buf = [0u8; 256];
        let want = room.min(buf.len());
        match recv_nonblocking(client.as_raw_fd(), &mut buf[..want]) {
            Ok(0) => self.drop_client(ops, None),
            Ok(n) => {
                let command = self.escape.feed(&buf[..n], &mut self.pending);
                self.flush_pending();
                match command {
                    Some(EscapeCommand::Quit) => {
                        log::info!("Ctrl-A x from the attached console: stopping the VM");
                        self.stop.quit();
                    }
                    Some(EscapeCommand::Detach) => self.drop_client(ops, Some(DETACHED)),
                    None => {}
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.drop_client(ops, None),
        }
    }

    fn update_interest(&mut self, ops: &mut EventOps) {
        let Some(client) = &self.client else {
            return;
        };
        let want = self.pending.is_empty() && lock(&self.sink).room() > 0;
        if want == self.polling_client {
            return;
        }
        let event = Events::with_data_raw(client.as_raw_fd(), CLIENT, EventSet::IN);
        let result = if want {
            ops.add(event)
        } else {
            ops.remove(event)
        };
        if result.is_ok() {
            self.polling_client = want;
        }
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            CLIENT => {
                if events.event_set().contains(EventSet::IN) {
                    self.read_client(ops);
                } else {
                    self.drop_client(ops, None);
                }
            }
            SINK_ROOM => {
                let _ = self.sink_room.read();
                self.flush_pending();
            }
            other => log::warn!("console server: unexpected event data {other}"),
        }
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let listener = Events::with_data(&self.listener, LISTENER, EventSet::IN);
        let room = Events::with_data(&self.sink_room, SINK_ROOM, EventSet::IN);
        for event in [listener, room] {
            if let Err(err) = ops.add(event) {
                log::error!("console server: cannot watch its sockets: {err:?}");
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Handshake {
    Attach(u16, u16),
    Resize(u16, u16),
}

fn read_handshake(stream: &UnixStream) -> Option<Handshake> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    let mut reader = stream;
    while line.len() < 64 {
        if reader.read(&mut byte).ok()? == 0 {
            return None;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    stream.set_read_timeout(None).ok()?;
    parse_handshake(std::str::from_utf8(&line).ok()?)
}

fn parse_handshake(line: &str) -> Option<Handshake> {
    let mut words = line.split_whitespace();
    let kind = words.next()?;
    let cols = words.next()?.parse().ok()?;
    let rows = words.next()?.parse().ok()?;
    match kind {
        "attach" => Some(Handshake::Attach(cols, rows)),
        "resize" => Some(Handshake::Resize(cols, rows)),
        _ => None,
    }
}

/// One non-blocking recv on a socket that stays blocking for the writers.
fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; recv does not keep the pointer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_parse() {
        assert_eq!(
            parse_handshake("attach 120 40"),
            Some(Handshake::Attach(120, 40))
        );
        assert_eq!(
            parse_handshake("resize 80 24"),
            Some(Handshake::Resize(80, 24))
        );
        assert_eq!(parse_handshake("attach 80"), None);
        assert_eq!(parse_handshake("hello 1 2"), None);
        assert_eq!(parse_handshake("attach 99999 1"), None);
    }

    #[test]
    fn the_log_rotates_at_its_limit() {
        let dir = std::env::temp_dir().join(format!("nvmm-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut hub = ConsoleHub::new(&path, 100).unwrap();
        hub.write(&[b'a'; 60]);
        hub.write(&[b'b'; 60]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'b'; 60]);
        assert_eq!(
            std::fs::read(dir.join("console.log.1")).unwrap(),
            vec![b'a'; 60]
        );
        hub.write(&[b'c'; 30]);
        assert_eq!(std::fs::read(&path).unwrap().len(), 90);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guest output reaches the log, its rotation and the client from a vCPU thread (the UART)
    /// and from the event loop (the virtio console), under their seccomp filters. A forbidden
    /// call fails with EPERM here instead of ending the test process.
    #[test]
    fn the_log_rotates_under_the_seccomp_filters() {
        use crate::seccomp::{self, OnViolation};
        for (label, list) in [
            ("vcpu0", seccomp::vcpu(true)),
            ("main", seccomp::event_loop()),
        ] {
            let dir =
                std::env::temp_dir().join(format!("nvmm-hub3-{}-{label}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("console.log");
            let mut hub = ConsoleHub::new(&path, 100).unwrap();
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            hub.client = Some(ours);
            let filter = list
                .compile_with(label, OnViolation::Errno(libc::EPERM))
                .unwrap();
            std::thread::spawn(move || {
                seccomp::install(&filter).unwrap();
                hub.write(&[b'a'; 60]);
                hub.write(&[b'b'; 60]);
                assert!(hub.log.is_some() && hub.client.is_some(), "{label}");
            })
            .join()
            .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), vec![b'b'; 60], "{label}");
            assert_eq!(
                std::fs::read(dir.join("console.log.1")).unwrap(),
                vec![b'a'; 60]
            );
            let mut got = [0u8; 120];
            theirs.read_exact(&mut got).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn output_reaches_the_attached_client() {
        let dir = std::env::temp_dir().join(format!("nvmm-hub2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut hub = ConsoleHub::new(&dir.join("console.log"), 1 << 20).unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        hub.client = Some(ours);
        hub.write(b"hello");
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(theirs);
        hub.write(b"gone");
        hub.write(b"gone");
        assert!(hub.client.is_none(), "a client that went away is dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
