//! Userspace TCP port forwarding: a host address such as `127.0.0.1:2222` relays every connection
//! to a guest address such as `10.0.2.15:22`, with no iptables or nft rules.
//!
//! [`ForwardSpec`] is the plain data of a `--forward [HOSTADDR:]HOSTPORT:GUESTPORT` value;
//! [`Forwarder`] listens on one host address and relays to one target.
//!
//! # Design: a thread pair per connection
//!
//! One acceptor thread waits in epoll for the listener and a stop eventfd. Each accepted
//! connection gets a thread that connects to the target and copies client → target, and a
//! second (scoped) thread that copies target → client. Blocking copies make half-close simple
//! to get right: a read of 0 bytes is the EOF, passed on with `shutdown(Write)`, and the other
//! direction carries on in its own thread. One poll thread for everything would need
//! per-direction buffers, partial writes, write-readiness interest and a non-blocking connect
//! (which std cannot do), which is more state to get wrong for a tool that forwards a few
//! interactive connections.
//!
//! The cost is bounded: at most [`MAX_CONNECTIONS`] connections (two threads each) are served at
//! once. Past that, a new connection is accepted and closed at once: the client sees EOF and a
//! warning is logged. This is better than leaving it in the backlog, where the client would hang.
//!
//! Stopping ([`Forwarder::stop`] or drop) wakes the acceptor through the eventfd. The acceptor
//! closes the listener, shuts down every open socket (which wakes the blocked copies with EOF)
//! and joins every thread. A connection still connecting to its target can hold the stop back
//! for up to [`CONNECT_TIMEOUT`].
//!
//! Logs: debug for each connection, warn for what the user should know (refused connections,
//! accept failures). Nothing goes to stdout.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use std::{fmt, io};

use nvmm_vmm::seccomp;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// Most connections one [`Forwarder`] serves at once. This is plenty for ssh sessions and a dev
/// server, and it bounds the threads (two per connection) a runaway client can make nvmm start.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection to the target may take. The target is a guest on this host, so a live
/// guest answers at once and a missing service refuses at once. This only runs out while the
/// guest's network is not up yet (no ARP answer), and the client then sees its connection
/// closed and can retry. It also bounds how long a stop waits for a connection that is still
/// connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the acceptor waits after an accept error other than "nothing to accept" (for
/// example EMFILE). The pending connection stays in the backlog, so the listener stays readable,
/// and retrying at once would spin.
const ACCEPT_BACKOFF_MS: i32 = 100;

/// epoll data for the listening socket.
const LISTENER: u64 = 0;
/// epoll data for the stop eventfd.
const STOP: u64 = 1;

/// Errors from parsing a forward or starting a [`Forwarder`]. Each names the value or address
/// involved.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A `--forward` value does not have the `[HOSTADDR:]HOSTPORT:GUESTPORT` shape.
    #[error(
        "forward {spec:?} is not [HOSTADDR:]HOSTPORT:GUESTPORT (for example 2222:22 or \
         0.0.0.0:8080:80)"
    )]
    InvalidSpec {
        /// The value given.
        spec: String,
    },
    /// A port in a `--forward` value is not a number from 0 to 65535.
    #[error(
        "forward {spec:?}: {port:?} is not a port number (0-65535); the form is \
         [HOSTADDR:]HOSTPORT:GUESTPORT"
    )]
    InvalidPort {
        /// The value given.
        spec: String,
        /// The part that should have been a port.
        port: String,
    },
    /// The guest port of a `--forward` value is 0, which no service listens on.
    #[error("forward {spec:?}: the guest port cannot be 0")]
    ZeroGuestPort {
        /// The value given.
        spec: String,
    },
    /// HOSTADDR in a `--forward` value is not an IP address in a form nvmm accepts.
    #[error(
        "forward {spec:?}: {addr:?} is not an IPv4 address or a bracketed IPv6 address such as \
         [::1]"
    )]
    InvalidHostAddr {
        /// The value given.
        spec: String,
        /// The HOSTADDR part.
        addr: String,
    },
    /// Another socket already listens on the host address.
    #[error(
        "cannot listen on {addr}: the port is already in use; pick another host port, or 0 for \
         any free one"
    )]
    PortInUse {
        /// The host address asked for.
        addr: SocketAddr,
    },
    /// The listening socket could not be set up for another reason (for example, the address
    /// is not on this host, or the port is below 1024 and nvmm runs unprivileged).
    #[error("cannot listen on {addr}")]
    Listen {
        /// The host address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The acceptor's stop eventfd or epoll instance could not be created.
    #[error("cannot set up accepting connections on {addr}")]
    AcceptLoop {
        /// The bound host address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The acceptor thread could not install its seccomp filter.
    #[error("cannot sandbox the thread that accepts connections on {addr}")]
    Sandbox {
        /// The bound host address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: nvmm_vmm::seccomp::SeccompError,
    },
    /// The acceptor thread could not be started.
    #[error("cannot start the thread that accepts connections on {addr}")]
    SpawnThread {
        /// The bound host address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A `--forward [HOSTADDR:]HOSTPORT:GUESTPORT` value: listen on `HOSTADDR:HOSTPORT` on the host
/// and relay each connection to `GUESTPORT` on the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForwardSpec {
    /// Host address to listen on.
    pub host_addr: IpAddr,
    /// Host port; 0 picks a free one (see [`Forwarder::local_addr`]).
    pub host_port: u16,
    /// Guest port to connect to; never 0.
    pub guest_port: u16,
}

impl ForwardSpec {
    /// The host address used when a spec names none. It is loopback, so a guest is not exposed
    /// to the network unless the user asks for that.
    pub const DEFAULT_HOST_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// Parses `[HOSTADDR:]HOSTPORT:GUESTPORT`. HOSTADDR is an IPv4 address or a bracketed IPv6
    /// address (`[::1]`) and defaults to 127.0.0.1. HOSTPORT may be 0 (any free port);
    /// GUESTPORT may not. Host names are not accepted: `localhost` could mean either family.
    pub fn parse(spec: &str) -> Result<Self, ForwardError> {
        let invalid = || ForwardError::InvalidSpec {
            spec: spec.to_owned(),
        };
        let (host, guest_port) = spec.rsplit_once(':').ok_or_else(invalid)?;
        let (host_addr, host_port) = if let Some(bracketed) = host.strip_prefix('[') {
            // `[v6]:PORT`: split at "]:" because the address has colons of its own.
            let (addr, port) = bracketed.split_once("]:").ok_or_else(invalid)?;
            let addr = addr
                .parse::<Ipv6Addr>()
                .map_err(|_| ForwardError::InvalidHostAddr {
                    spec: spec.to_owned(),
                    addr: format!("[{addr}]"),
                })?;
            (IpAddr::V6(addr), port)
        } else if let Some((addr, port)) = host.rsplit_once(':') {
            // An unbracketed IPv6 address lands here too (its colons split wrongly), and fails
            // as an IPv4 address with a message that asks for brackets.
            let addr = addr
                .parse::<Ipv4Addr>()
                .map_err(|_| ForwardError::InvalidHostAddr {
                    spec: spec.to_owned(),
                    addr: addr.to_owned(),
                })?;
            (IpAddr::V4(addr), port)
        } else {
            (Self::DEFAULT_HOST_ADDR, host)
        };
        let host_port = parse_port(spec, host_port)?;
        let guest_port = parse_port(spec, guest_port)?;
        if guest_port == 0 {
            return Err(ForwardError::ZeroGuestPort {
                spec: spec.to_owned(),
            });
        }
        Ok(Self {
            host_addr,
            host_port,
            guest_port,
        })
    }

    /// The host address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_addr, self.host_port)
    }

    /// The address to relay to, for a guest at `guest_ip`.
    pub fn target(&self, guest_ip: IpAddr) -> SocketAddr {
        SocketAddr::new(guest_ip, self.guest_port)
    }
}

/// Only decimal digits: `u16::from_str` would also take `+22`, which is not a port as users
/// write them.
fn parse_port(spec: &str, port: &str) -> Result<u16, ForwardError> {
    let invalid = || ForwardError::InvalidPort {
        spec: spec.to_owned(),
        port: port.to_owned(),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    port.parse().map_err(|_| invalid())
}

impl FromStr for ForwardSpec {
    type Err = ForwardError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        Self::parse(spec)
    }
}

/// The canonical form, which [`ForwardSpec::parse`] reads back: `127.0.0.1:2222:22`,
/// `[::1]:2222:22`.
impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.listen_addr(), self.guest_port)
    }
}

/// A running TCP forward from a host address to a target. Threads are named `fwd:PORT`
/// (acceptor), `fwd:PORT>` (client → target) and `fwd:PORT<` (target → client), after the
/// bound host port. Dropping it stops it; see the module docs.
#[derive(Debug)]
pub struct Forwarder {
    local_addr: SocketAddr,
    target: SocketAddr,
    stop: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `listen` and relays every connection to `target` in the background. The
    /// socket is bound before this returns, so a port that is taken is reported here as
    /// [`ForwardError::PortInUse`], not later in a log line. With `sandboxed`, the acceptor
    /// installs the seccomp filter [`crate::sandbox::forwarder`] before it accepts anything, and
    /// its connection threads inherit it.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        sandboxed: bool,
    ) -> Result<Self, ForwardError> {
        Self::start_with_limit(listen, target, MAX_CONNECTIONS, sandboxed)
    }

    /// [`Forwarder::start`] with a connection cap other than [`MAX_CONNECTIONS`], so that tests
    /// can reach it.
    fn start_with_limit(
        listen: SocketAddr,
        target: SocketAddr,
        max_connections: usize,
        sandboxed: bool,
    ) -> Result<Self, ForwardError> {
        let listener = TcpListener::bind(listen).map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => ForwardError::PortInUse { addr: listen },
            _ => ForwardError::Listen {
                addr: listen,
                source,
            },
        })?;
        let listen_error = |source| ForwardError::Listen {
            addr: listen,
            source,
        };
        let local_addr = listener.local_addr().map_err(listen_error)?;
        // Non-blocking so that one wake-up can drain the backlog and end on WouldBlock.
        listener.set_nonblocking(true).map_err(listen_error)?;

        let setup_error = |source| ForwardError::AcceptLoop {
            addr: local_addr,
            source,
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(setup_error)?);
        let acceptor = Acceptor::new(
            listener,
            local_addr,
            target,
            Arc::clone(&stop),
            max_connections,
            sandboxed,
        )
        .map_err(setup_error)?;
        let name = thread_name(local_addr, "");
        let sandbox_error = |source| ForwardError::Sandbox {
            addr: local_addr,
            source,
        };
        let filter = match sandboxed {
            true => Some(
                crate::sandbox::forwarder()
                    .compile(&name)
                    .map_err(sandbox_error)?,
            ),
            false => None,
        };
        let (installed, filter_installed) = mpsc::sync_channel(1);
        let label = name.clone();
        let handle = thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(err) = seccomp::confine(&label, filter.as_ref(), &[]) {
                    let _ = installed.send(Err(err));
                    return;
                }
                let _ = installed.send(Ok(()));
                acceptor.run();
            })
            .map_err(|source| ForwardError::SpawnThread {
                addr: local_addr,
                source,
            })?;
        // The thread sends before anything else, so this only fails if it could not.
        if let Ok(Err(err)) = filter_installed.recv() {
            let _ = handle.join();
            return Err(sandbox_error(err));
        }
        log::debug!("forwarding {local_addr} to {target}");
        Ok(Self {
            local_addr,
            target,
            stop,
            acceptor: Some(handle),
        })
    }

    /// The bound host address; with port 0 asked for, this holds the port the system picked.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address connections are relayed to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Stops accepting, closes every relayed connection and waits for all threads to end. This
    /// is the same as dropping the forwarder, but reads better at a call site.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            // Without the wake-up the acceptor never returns; joining it would hang nvmm.
            log::warn!(
                "forward {}: cannot wake the acceptor to stop it, leaving it running: {e}",
                self.local_addr
            );
            return;
        }
        if acceptor.join().is_err() {
            log::warn!("forward {}: the acceptor thread panicked", self.local_addr);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// `fwd:PORT` plus a suffix. Linux keeps 15 bytes of a thread name; this is at most 11.
fn thread_name(local_addr: SocketAddr, suffix: &str) -> String {
    format!("fwd:{}{suffix}", local_addr.port())
}

/// The acceptor thread's state.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    local_addr: SocketAddr,
    target: SocketAddr,
    /// Read by `epoll` and `stop_only`; held here so the fd outlives both registrations.
    _stop: Arc<EventFd>,
    /// Waits for the listener and the stop eventfd.
    epoll: Epoll,
    /// Waits for the stop eventfd alone: the back-off after an accept error, which must not be
    /// woken by the listener that is still readable.
    stop_only: Epoll,
    max_connections: usize,
    /// Whether this thread runs under a seccomp filter, which its connection threads inherit.
    sandboxed: bool,
    /// One thread per open connection; finished ones are joined before each new connection.
    connections: Vec<JoinHandle<()>>,
    registry: Arc<Registry>,
}

impl Acceptor {
    fn new(
        listener: TcpListener,
        local_addr: SocketAddr,
        target: SocketAddr,
        stop: Arc<EventFd>,
        max_connections: usize,
        sandboxed: bool,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let stop_only = Epoll::new()?;
        stop_only.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(Self {
            listener,
            local_addr,
            target,
            _stop: stop,
            epoll,
            stop_only,
            max_connections,
            sandboxed,
            connections: Vec::new(),
            registry: Arc::default(),
        })
    }

    /// Accepts until the stop eventfd fires, then closes everything.
    fn run(mut self) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => &events[..n],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!(
                        "forward {}: cannot wait for connections, no longer accepting: {e}",
                        self.local_addr
                    );
                    break;
                }
            };
            // The eventfd is never read, so once written it stays readable: stop wins over
            // pending connections, which the closing listener then refuses.
            if ready.iter().any(|event| event.data() == STOP) {
                break;
            }
            if ready.iter().any(|event| event.data() == LISTENER) {
                self.accept_pending();
            }
        }
        self.close_all();
    }

    /// Accepts every connection in the backlog.
    fn accept_pending(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((client, peer)) => self.serve(client, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The client gave up between SYN and accept, or a signal came in: nothing lost.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!(
                        "forward {}: cannot accept a connection: {e}",
                        self.local_addr
                    );
                    let mut events = [EpollEvent::default()];
                    // Whether this ends by timeout, by stop or by an error, the main loop
                    // looks again, and sees the stop if there was one.
                    let _ = self.stop_only.wait(ACCEPT_BACKOFF_MS, &mut events);
                    return;
                }
            }
        }
    }

    /// Starts relaying one accepted connection, or closes it if the cap is reached.
    fn serve(&mut self, client: TcpStream, peer: SocketAddr) {
        self.join_finished();
        if self.connections.len() >= self.max_connections {
            log::warn!(
                "forward {}: {} connections already open; closing the new one from {peer}",
                self.local_addr,
                self.connections.len()
            );
            return;
        }
        // Linux does not pass the listener's O_NONBLOCK to accepted sockets, but the copies
        // depend on blocking I/O, so do not rely on it.
        if let Err(e) = client.set_nonblocking(false) {
            log::warn!(
                "forward {}: cannot set up the connection from {peer}, closing it: {e}",
                self.local_addr
            );
            return;
        }
        let client = Arc::new(client);
        let registration = Registration::new(&self.registry, Arc::clone(&client));
        let (local_addr, target, sandboxed) = (self.local_addr, self.target, self.sandboxed);
        let spawned = thread::Builder::new()
            .name(thread_name(local_addr, ">"))
            .spawn(move || relay(&client, peer, local_addr, target, sandboxed, &registration));
        match spawned {
            Ok(handle) => self.connections.push(handle),
            // The closure, and with it the client socket, is dropped: the client sees EOF.
            Err(e) => log::warn!(
                "forward {local_addr}: cannot start a thread for the connection from {peer}, \
                 closing it: {e}"
            ),
        }
    }

    /// Joins the threads of connections that have ended, so that finished threads do not
    /// count against the cap or pile up.
    fn join_finished(&mut self) {
        let (finished, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.connections)
            .into_iter()
            .partition(JoinHandle::is_finished);
        self.connections = open;
        for handle in finished {
            join_connection(self.local_addr, handle);
        }
    }

    /// Refuses new connections, ends the open ones and joins their threads.
    fn close_all(self) {
        let Self {
            listener,
            local_addr,
            connections,
            registry,
            ..
        } = self;
        // Closing the listener first refuses the connections still in the backlog.
        drop(listener);
        registry.close_all();
        for handle in connections {
            join_connection(local_addr, handle);
        }
        log::debug!("forward {local_addr}: stopped");
    }
}

fn join_connection(local_addr: SocketAddr, handle: JoinHandle<()>) {
    if handle.join().is_err() {
        log::warn!("forward {local_addr}: a connection thread panicked");
    }
}

/// The sockets of every open connection, so that a stop can shut them down from the acceptor
/// thread and wake the copies blocked on them.
#[derive(Debug, Default)]
struct Registry {
    state: Mutex<RegistryState>,
}

#[derive(Debug, Default)]
struct RegistryState {
    /// Set by [`Registry::close_all`]; a connection that connects its target after that closes
    /// itself instead of registering.
    closing: bool,
    next_id: u64,
    sockets: HashMap<u64, Vec<Arc<TcpStream>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        // Nothing panics while holding the lock; if something did, the map is still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close_all(&self) {
        let mut state = self.lock();
        state.closing = true;
        for socket in state.sockets.values().flatten() {
            // A socket whose peer is gone may refuse with ENOTCONN; it needs no waking then.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// One connection's entry in the [`Registry`]; removed when the connection's thread ends.
#[derive(Debug)]
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Registration {
    fn new(registry: &Arc<Registry>, client: Arc<TcpStream>) -> Self {
        let mut state = registry.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.sockets.insert(id, vec![client]);
        Self {
            registry: Arc::clone(registry),
            id,
        }
    }

    /// Registers the target socket. Returns false if the forwarder is stopping, in which case
    /// the caller closes the connection.
    fn add(&self, socket: Arc<TcpStream>) -> bool {
        let mut state = self.registry.lock();
        if state.closing {
            return false;
        }
        state.sockets.entry(self.id).or_default().push(socket);
        true
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().sockets.remove(&self.id);
    }
}

/// A connection's thread: connects to the target, then copies both ways until both are done.
/// With `sandboxed`, it and its copy thread run under the acceptor's filter, and name themselves
/// for a violation report.
fn relay(
    client: &TcpStream,
    peer: SocketAddr,
    local_addr: SocketAddr,
    target: SocketAddr,
    sandboxed: bool,
    registration: &Registration,
) {
    if sandboxed {
        seccomp::set_label(&thread_name(local_addr, ">"));
    }
    let upstream = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(upstream) => Arc::new(upstream),
        Err(e) => {
            // Expected while the guest boots; the client sees its connection closed and retries.
            log::debug!(
                "forward {local_addr}: cannot connect to {target} for {peer}, closing it: {e}"
            );
            return;
        }
    };
    if !registration.add(Arc::clone(&upstream)) {
        return;
    }
    // Interactive traffic (ssh keystrokes) must not wait for Nagle's algorithm on either hop.
    for socket in [client, &*upstream] {
        if let Err(e) = socket.set_nodelay(true) {
            log::debug!("forward {local_addr}: cannot set TCP_NODELAY for {peer}: {e}");
        }
    }
    log::debug!("forward {local_addr}: {peer} connected to {target}");
    let copies = thread::scope(|scope| {
        let back = thread::Builder::new()
            .name(thread_name(local_addr, "<"))
            .spawn_scoped(scope, || {
                if sandboxed {
                    seccomp::set_label(&thread_name(local_addr, "<"));
                }
                copy_half(&upstream, client)
            })
            .inspect_err(|e| {
                log::warn!(
                    "forward {local_addr}: cannot start a thread for the connection from \
                     {peer}, closing it: {e}"
                );
            })?;
        let sent = copy_half(client, &upstream)?;
        let received = back
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the copy thread panicked")))?;
        Ok::<_, io::Error>((sent, received))
    });
    match copies {
        Ok((sent, received)) => log::debug!(
            "forward {local_addr}: {peer} closed ({sent} bytes to {target}, {received} back)"
        ),
        Err(e) => log::debug!("forward {local_addr}: {peer} closed: {e}"),
    }
}

/// Copies `from` to `to` until `from` ends and returns the byte count.
///
/// A clean EOF is passed on as a half-close (`shutdown(Write)` on `to`) and the other direction
/// goes on: ssh, `nc -N` and HTTP/1.0 clients send EOF and then wait for the reply. A failure
/// (reset, or a write to a closed peer: EPIPE, as Rust ignores SIGPIPE) ends the connection, so
/// both sockets are shut down to wake the other direction too.
fn copy_half(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let copied = io::copy(&mut &*from, &mut &*to);
    match copied {
        // `to` may be shut down already (a stop, or the other direction failed); then there is
        // nobody left to tell.
        Ok(_) => _ = to.shutdown(Shutdown::Write),
        Err(_) => {
            _ = from.shutdown(Shutdown::Both);
            _ = to.shutdown(Shutdown::Both);
        }
    }
    copied
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use super::*;

    /// Every socket in these tests is on loopback, and port 0 lets parallel tests never collide.
    const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    /// The longest any test socket blocks: a broken forwarder fails a test instead of hanging
    /// the suite.
    const IO_TIMEOUT: Duration = Duration::from_secs(10);

    fn with_timeouts(stream: TcpStream) -> TcpStream {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        with_timeouts(TcpStream::connect(addr).unwrap())
    }

    /// The "guest": echoes `connections` connections on `listener`, each in its own thread, and
    /// passes EOF back as a half-close. Errors are ignored: the clients check what they get.
    fn echo_on(listener: TcpListener, connections: usize) -> JoinHandle<()> {
        thread::spawn(move || {
            thread::scope(|scope| {
                for _ in 0..connections {
                    let (stream, _) = listener.accept().unwrap();
                    scope.spawn(move || {
                        let stream = with_timeouts(stream);
                        if io::copy(&mut &stream, &mut &stream).is_ok() {
                            _ = stream.shutdown(Shutdown::Write);
                        }
                    });
                }
            });
        })
    }

    fn echo_server(connections: usize) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(LOOPBACK).unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, echo_on(listener, connections))
    }

    /// xorshift64: incompressible, repeatable test data.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    /// Sends `data` and half-closes from one thread while another reads the reply to EOF, so
    /// that neither direction waits on the other's socket buffers.
    fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
        let stream = connect(addr);
        thread::scope(|scope| {
            let writer = scope.spawn(|| {
                (&stream).write_all(data).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
            });
            let mut reply = Vec::new();
            (&stream).read_to_end(&mut reply).unwrap();
            writer.join().unwrap();
            reply
        })
    }

    /// A closed connection reads as EOF or, if the peer reset it, as an error; either is "closed".
    fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0; 16];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("expected a closed connection, read {n} bytes"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    /// Threads of the forwarder bound to `port`, by the names [`Forwarder`] documents.
    fn forwarder_threads(port: u16) -> usize {
        let names = [
            format!("fwd:{port}"),
            format!("fwd:{port}>"),
            format!("fwd:{port}<"),
        ];
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| names.iter().any(|name| name == comm.trim_end()))
            .count()
    }

    /// Polls `condition` for up to two seconds.
    fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        condition()
    }

    #[test]
    fn relays_megabytes_both_ways_at_once() {
        let (target, server) = echo_server(1);
        let forwarder = Forwarder::start(LOOPBACK, target, true).unwrap();
        assert_ne!(forwarder.local_addr().port(), 0);
        assert_eq!(forwarder.target(), target);
        // Odd-sized so that no buffer size divides it.
        let data = pseudo_random(3 * 1024 * 1024 + 17, 1);
        let reply = round_trip(forwarder.local_addr(), &data);
        assert_eq!(reply.len(), data.len());
        assert!(reply == data, "the echo differs from what was sent");
        forwarder.stop();
        server.join().unwrap();
    }

    #[test]
    fn passes_half_close_both_ways() {
        let listener = TcpListener::bind(LOOPBACK).unwrap();
        let target = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut stream = with_timeouts(stream);
            // Reading to EOF proves the client's half-close arrived.
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            assert_eq!(request, b"GET / HTTP/1.0\r\n\r\n");
            // The reply goes out after that EOF, on the half that is still open.
            stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
        });
        let forwarder = Forwarder::start(LOOPBACK, target, true).unwrap();
        let mut client = connect(forwarder.local_addr());
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"HTTP/1.0 200 OK\r\n\r\nhello");
        server.join().unwrap();
    }

    #[test]
    fn port_in_use_names_the_address() {
        let holder = TcpListener::bind(LOOPBACK).unwrap();
        let taken = holder.local_addr().unwrap();
        let err = Forwarder::start(taken, LOOPBACK, true).unwrap_err();
        assert!(
            matches!(err, ForwardError::PortInUse { addr } if addr == taken),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&taken.to_string()), "{message}");
        assert!(message.contains("or 0"), "{message}");
    }

    #[test]
    fn unreachable_target_closes_the_client_and_keeps_serving() {
        // A port with no listener: bound for its number, then released.
        let target = TcpListener::bind(LOOPBACK).unwrap().local_addr().unwrap();
        let forwarder = Forwarder::start(LOOPBACK, target, true).unwrap();

        let started = Instant::now();
        let mut client = connect(forwarder.local_addr());
        assert_closed(&mut client);
        // A refusal, not the connect timeout.
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );

        // The same forwarder serves once the target listens.
        let server = echo_on(TcpListener::bind(target).unwrap(), 1);
        assert_eq!(round_trip(forwarder.local_addr(), b"later"), b"later");
        server.join().unwrap();
    }

    #[test]
    fn serves_parallel_connections_separately() {
        const CLIENTS: usize = 20;
        let (target, server) = echo_server(CLIENTS);
        let forwarder = Forwarder::start(LOOPBACK, target, true).unwrap();
        let addr = forwarder.local_addr();
        thread::scope(|scope| {
            for seed in 0..CLIENTS as u64 {
                scope.spawn(move || {
                    let data = pseudo_random(64 * 1024, seed + 100);
                    assert!(round_trip(addr, &data) == data, "client {seed}: wrong echo");
                });
            }
        });
        server.join().unwrap();
    }

    #[test]
    fn closes_connections_past_the_cap() {
        // The first and the last connection reach the target; the second is refused before.
        let (target, server) = echo_server(2);
        let forwarder = Forwarder::start_with_limit(LOOPBACK, target, 1, true).unwrap();
        let addr = forwarder.local_addr();

        let mut first = connect(addr);
        first.write_all(b"one").unwrap();
        let mut buf = [0; 3];
        first.read_exact(&mut buf).unwrap();

        let mut second = connect(addr);
        assert_closed(&mut second);

        // Once the first connection is over, its slot is free again. Its thread ends just
        // after the client sees EOF, so a new connection may come a moment too early.
        first.shutdown(Shutdown::Write).unwrap();
        first.read_to_end(&mut Vec::new()).unwrap();
        assert!(
            eventually(|| {
                let mut third = connect(addr);
                third.write_all(b"3").is_ok()
                    && third.read(&mut buf).is_ok_and(|n| n == 1 && buf[0] == b'3')
            }),
            "no connection got through after the first one closed"
        );
        server.join().unwrap();
    }

    #[test]
    fn drop_closes_everything_and_joins_threads() {
        let (target, server) = echo_server(1);
        let forwarder = Forwarder::start(LOOPBACK, target, true).unwrap();
        let addr = forwarder.local_addr();

        let mut client = connect(addr);
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        client.read_exact(&mut buf).unwrap();
        // The acceptor and both copy threads of the open connection. A listing of
        // /proc/self/task ends early when the thread it has reached exits meanwhile (other
        // tests' threads do), so look again until it shows all three.
        assert!(
            eventually(|| forwarder_threads(addr.port()) == 3),
            "{}",
            forwarder_threads(addr.port())
        );

        let started = Instant::now();
        drop(forwarder);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        assert_closed(&mut client);
        let refused = TcpStream::connect(addr).unwrap_err();
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
        // The threads were joined; the kernel may list one for a moment after it has exited.
        assert!(eventually(|| forwarder_threads(addr.port()) == 0));
        server.join().unwrap();
    }

    #[test]
    fn forwards_from_ipv6_loopback() {
        let listen = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
        if TcpListener::bind(listen).is_err() {
            eprintln!("skipped: this host has no IPv6 loopback");
            return;
        }
        let (target, server) = echo_server(1);
        let forwarder = Forwarder::start(listen, target, true).unwrap();
        assert!(forwarder.local_addr().is_ipv6());
        assert_eq!(round_trip(forwarder.local_addr(), b"six"), b"six");
        server.join().unwrap();
    }

    #[test]
    fn parses_forward_specs() {
        let spec = |host_addr: &str, host_port, guest_port| ForwardSpec {
            host_addr: host_addr.parse().unwrap(),
            host_port,
            guest_port,
        };
        for (text, expected, canonical) in [
            ("2222:22", spec("127.0.0.1", 2222, 22), "127.0.0.1:2222:22"),
            ("0:22", spec("127.0.0.1", 0, 22), "127.0.0.1:0:22"),
            (
                "65535:65535",
                spec("127.0.0.1", 65535, 65535),
                "127.0.0.1:65535:65535",
            ),
            (
                "0.0.0.0:8080:80",
                spec("0.0.0.0", 8080, 80),
                "0.0.0.0:8080:80",
            ),
            ("[::1]:2222:22", spec("::1", 2222, 22), "[::1]:2222:22"),
            ("[::]:0:22", spec("::", 0, 22), "[::]:0:22"),
        ] {
            let parsed = ForwardSpec::parse(text).unwrap();
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), canonical, "{text}");
            assert_eq!(canonical.parse::<ForwardSpec>().unwrap(), parsed, "{text}");
        }
        let parsed = ForwardSpec::parse("[::1]:2222:22").unwrap();
        assert_eq!(parsed.listen_addr(), "[::1]:2222".parse().unwrap());
        let guest = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(parsed.target(guest), "10.0.2.15:22".parse().unwrap());
    }

    #[test]
    fn works_as_a_clap_value_parser() {
        let command = clap::Command::new("nvmm").arg(
            clap::Arg::new("forward")
                .long("forward")
                .action(clap::ArgAction::Append)
                .value_parser(ForwardSpec::parse),
        );
        let matches = command
            .clone()
            .try_get_matches_from(["nvmm", "--forward", "8080:80", "--forward", "[::1]:0:22"])
            .unwrap();
        let specs: Vec<ForwardSpec> = matches
            .get_many::<ForwardSpec>("forward")
            .unwrap()
            .copied()
            .collect();
        assert_eq!(specs[0].listen_addr(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(specs[1].guest_port, 22);
        let err = command
            .try_get_matches_from(["nvmm", "--forward", "8080"])
            .unwrap_err();
        assert!(err.to_string().contains("HOSTPORT:GUESTPORT"), "{err}");
    }

    #[test]
    fn rejects_bad_forward_specs() {
        use ForwardError::*;
        for text in ["", "22", "[::1]:22", "[::1]2222:22"] {
            let err = ForwardSpec::parse(text).unwrap_err();
            assert!(matches!(err, InvalidSpec { .. }), "{text}: {err:?}");
        }
        for text in [
            "2222:",
            ":22",
            "a:22",
            "+1:22",
            "65536:22",
            " 2222:22",
            "2222:-1",
            "1.2.3.4:80",
            "127.0.0.1::22",
        ] {
            let err = ForwardSpec::parse(text).unwrap_err();
            assert!(matches!(err, InvalidPort { .. }), "{text}: {err:?}");
        }
        for text in [
            "::1:2222:22",
            "localhost:2222:22",
            "1.2.3:2222:22",
            "[fe80::1%eth0]:2222:22",
            "[1.2.3.4]:2222:22",
        ] {
            let err = ForwardSpec::parse(text).unwrap_err();
            assert!(matches!(err, InvalidHostAddr { .. }), "{text}: {err:?}");
        }
        let err = ForwardSpec::parse("2222:0").unwrap_err();
        assert!(matches!(err, ZeroGuestPort { .. }), "{err:?}");
        // Every message quotes what the user typed.
        assert!(err.to_string().contains("\"2222:0\""), "{err}");
        let err = ForwardSpec::parse("::1:2222:22").unwrap_err();
        assert!(err.to_string().contains("[::1]"), "{err}");
    }
}
