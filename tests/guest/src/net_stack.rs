//! What every network scenario shares: the guest's address configuration
//! from the command line, bringing up the virtio-net devices, and smoltcp's
//! interface and sockets on the first of them, with a poll loop.
//!
//! Nothing is allocated beyond the DMA arena's bump pointer: the socket
//! buffers are arena memory handed to smoltcp for good
//! ([`DmaBuf::into_guest_memory`](crate::dma::DmaBuf::into_guest_memory)),
//! and the socket table lives in the scenario's stack frame.

use core::fmt;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use crate::bootinfo::BootInfo;
use crate::dma::Arena;
use crate::io::rdtsc;
use crate::net::{DEFAULT_RX_BUFFER, MAX_RX_BUFFER, MIN_RX_BUFFER, NetDevice, NetOptions};
use crate::scenarios::{Outcome, cmdline_value, number_option};
use crate::time::{Deadline, now_us};
use crate::virtio_mmio::{DEVICE_ID_NET, Devices, Options, discover};

/// Most `name=address` pairs in `nvmm_hosts=`.
const MAX_HOSTS: usize = 16;

/// How long a connection attempt keeps retrying (the peer may still boot).
const CONNECT_TIMEOUT_US: u64 = 10_000_000;
/// Pause between connection attempts that the peer refused.
const CONNECT_RETRY_US: u64 = 200_000;
/// First local port of outgoing connections (the dynamic range).
const EPHEMERAL_PORT_BASE: u16 = 49152;

/// The guest's addresses: `nvmm_ip=A.B.C.D/P`, `nvmm_gw=A.B.C.D` (optional)
/// and `nvmm_hosts=name=A.B.C.D,...` (optional).
pub struct NetConfig {
    pub ip: Ipv4Address,
    pub prefix: u8,
    pub gateway: Option<Ipv4Address>,
    hosts: [(&'static [u8], Ipv4Address); MAX_HOSTS],
    host_count: usize,
}

impl NetConfig {
    pub fn from_cmdline(cmdline: &'static [u8]) -> Result<NetConfig, &'static str> {
        let ip_text = cmdline_value(cmdline, b"nvmm_ip").ok_or("no-nvmm-ip")?;
        let (ip, prefix) = parse_cidr(ip_text).ok_or("bad-nvmm-ip")?;
        let gateway = match cmdline_value(cmdline, b"nvmm_gw") {
            None => None,
            Some(text) => Some(parse_ipv4(text).ok_or("bad-nvmm-gw")?),
        };
        let mut config = NetConfig {
            ip,
            prefix,
            gateway,
            hosts: [(&[], Ipv4Address::UNSPECIFIED); MAX_HOSTS],
            host_count: 0,
        };
        if let Some(list) = cmdline_value(cmdline, b"nvmm_hosts") {
            for entry in list.split(|&b| b == b',') {
                let (name, address) = split_once(entry, b'=').ok_or("bad-nvmm-hosts")?;
                let address = parse_ipv4(address).ok_or("bad-nvmm-hosts")?;
                let slot = config.hosts.get_mut(config.host_count);
                let slot = slot.filter(|_| !name.is_empty()).ok_or("bad-nvmm-hosts")?;
                *slot = (name, address);
                config.host_count += 1;
            }
        }
        Ok(config)
    }

    /// An IPv4 address, or a name from `nvmm_hosts`.
    pub fn resolve(&self, host: &[u8]) -> Result<Ipv4Address, &'static str> {
        if let Some(address) = parse_ipv4(host) {
            return Ok(address);
        }
        self.hosts[..self.host_count]
            .iter()
            .find(|(name, _)| *name == host)
            .map(|&(_, address)| address)
            .ok_or("unknown-host")
    }

    /// `HOST:PORT` with HOST as for [`resolve`](Self::resolve).
    pub fn resolve_endpoint(&self, text: &[u8]) -> Result<(Ipv4Address, u16), &'static str> {
        let colon = text.iter().rposition(|&b| b == b':').ok_or("bad-connect")?;
        let port = parse_port(&text[colon + 1..]).ok_or("bad-connect")?;
        Ok((self.resolve(&text[..colon])?, port))
    }

    /// The MAC address used when the device offers none: locally
    /// administered, with the guest's IPv4 address in it, so that guests on
    /// one bridge differ.
    fn fallback_mac(&self, device: usize) -> [u8; 6] {
        let [a, b, c, d] = self.ip.octets();
        [0x02, device as u8, a, b, c, d]
    }
}

/// `A.B.C.D`: four decimal numbers up to 255.
pub fn parse_ipv4(text: &[u8]) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = part.iter().fold(0u32, |v, &b| v * 10 + u32::from(b - b'0'));
        *octet = u8::try_from(value).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Address::from(octets))
}

/// `A.B.C.D/P` with P at most 32.
fn parse_cidr(text: &[u8]) -> Option<(Ipv4Address, u8)> {
    let (address, prefix) = split_once(text, b'/')?;
    let prefix = parse_small(prefix, 32)? as u8;
    Some((parse_ipv4(address)?, prefix))
}

/// A port number, 1 to 65535.
pub fn parse_port(text: &[u8]) -> Option<u16> {
    let port = parse_small(text, 65535)?;
    u16::try_from(port).ok().filter(|&port| port != 0)
}

/// A decimal number of at most five digits, no larger than `max`.
fn parse_small(text: &[u8], max: u32) -> Option<u32> {
    if text.is_empty() || text.len() > 5 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = text.iter().fold(0u32, |v, &b| v * 10 + u32::from(b - b'0'));
    (value <= max).then_some(value)
}

fn split_once(text: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = text.iter().position(|&b| b == separator)?;
    Some((&text[..at], &text[at + 1..]))
}

/// A MAC address as `xx:xx:xx:xx:xx:xx`.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The `virtio_*` options and `virtio_net_mrg_rxbuf=0`,
/// `virtio_net_rx_buffer=N`, `virtio_net_tx_split=1`, `virtio_net_tso=0`.
fn net_options(boot: &BootInfo) -> Result<NetOptions, &'static str> {
    let switch = |key: &[u8], default, reason| match cmdline_value(boot.cmdline, key) {
        None => Ok(default),
        Some(b"1") => Ok(true),
        Some(b"0") => Ok(false),
        Some(_) => Err(reason),
    };
    let rx_buffer = number_option(
        boot,
        b"virtio_net_rx_buffer",
        DEFAULT_RX_BUFFER as u64,
        "bad-virtio-net-rx-buffer",
    )?;
    let rx_buffer = usize::try_from(rx_buffer)
        .ok()
        .filter(|size| (MIN_RX_BUFFER..=MAX_RX_BUFFER).contains(size))
        .ok_or("bad-virtio-net-rx-buffer")?;
    Ok(NetOptions {
        virtio: Options::from_cmdline(boot.cmdline)?,
        mrg_rxbuf: switch(b"virtio_net_mrg_rxbuf", true, "bad-virtio-net-mrg-rxbuf")?,
        rx_buffer,
        tx_split: switch(b"virtio_net_tx_split", false, "bad-virtio-net-tx-split")?,
        tso: switch(b"virtio_net_tso", true, "bad-virtio-net-tso")?,
    })
}

/// smoltcp's clock: the TSC in microseconds.
fn now() -> Instant {
    Instant::from_micros(now_us() as i64)
}

/// The first network device, with smoltcp's interface and sockets on it.
pub struct Stack<'s> {
    pub config: NetConfig,
    pub dev: NetDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'s>,
    /// What is left of the DMA arena, for socket buffers.
    arena: Arena,
    next_local_port: u16,
}

impl<'s> Stack<'s> {
    /// Reads the configuration, brings up every network device (printing
    /// `net dev=N ...` for each) and sets up smoltcp on the first one, with
    /// `storage` as its socket table. Prints `net ip=... gw=...`.
    pub fn bring_up(
        boot: &BootInfo,
        storage: &'s mut [SocketStorage<'s>],
    ) -> Result<Stack<'s>, &'static str> {
        let config = NetConfig::from_cmdline(boot.cmdline)?;
        let options = net_options(boot)?;
        let arena = Arena::claim(boot)?;
        let mut devices = discover(boot.cmdline)?;
        Self::start(config, options, arena, &mut devices, storage)
    }

    /// [`bring_up`](Self::bring_up) for a scenario that has claimed the arena
    /// and found the devices already: the stack takes what is left of the
    /// arena, and the network devices out of `devices`.
    pub fn bring_up_with(
        boot: &BootInfo,
        arena: Arena,
        devices: &mut Devices,
        storage: &'s mut [SocketStorage<'s>],
    ) -> Result<Stack<'s>, &'static str> {
        let config = NetConfig::from_cmdline(boot.cmdline)?;
        let options = net_options(boot)?;
        Self::start(config, options, arena, devices, storage)
    }

    fn start(
        config: NetConfig,
        options: NetOptions,
        mut arena: Arena,
        devices: &mut Devices,
        storage: &'s mut [SocketStorage<'s>],
    ) -> Result<Stack<'s>, &'static str> {
        let mut first = None;
        for found in devices.take_all(DEVICE_ID_NET) {
            let index = found.index;
            let fallback_mac = config.fallback_mac(index);
            let dev = NetDevice::init(index, found.transport, &mut arena, options, fallback_mac)
                .inspect_err(|reason| say!("virtio dev={index} failed reason={reason}"))?;
            say!(
                "net dev={index} mac={} status={} features=0x{:x} mrg_rxbuf={}",
                Mac(dev.mac()),
                u8::from(dev.link_up()),
                dev.features(),
                u8::from(dev.mrg_rxbuf())
            );
            // The others stay up, buffers posted, but unused.
            first.get_or_insert(dev);
        }
        let mut dev = first.ok_or("no-net-device")?;
        dev.enable_tso(&mut arena)?;
        say!("net dev={} tso={}", dev.index(), u8::from(dev.tso()));

        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac())));
        iface_config.random_seed = rdtsc();
        let mut iface = Interface::new(iface_config, &mut dev, now());
        let cidr = IpCidr::new(IpAddress::Ipv4(config.ip), config.prefix);
        iface.update_ip_addrs(|addresses| {
            // The list is empty, so there is room for one.
            let _ = addresses.push(cidr);
        });
        if let Some(gateway) = config.gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gateway)
                .map_err(|_| "route-table-full")?;
        }
        match config.gateway {
            Some(gateway) => say!("net ip={}/{} gw={gateway}", config.ip, config.prefix),
            None => say!("net ip={}/{} gw=none", config.ip, config.prefix),
        }
        let next_local_port = EPHEMERAL_PORT_BASE + (rdtsc() % 8192) as u16;
        Ok(Stack {
            config,
            dev,
            iface,
            sockets: SocketSet::new(storage),
            arena,
            next_local_port,
        })
    }

    /// One round: everything received goes through smoltcp, everything
    /// smoltcp wants to send goes out, the device hears about new buffers.
    pub fn poll(&mut self) -> Outcome {
        self.dev.begin_poll();
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        self.dev.flush();
        match self.dev.error() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Polls for about `us` microseconds.
    pub fn poll_for(&mut self, us: u64) -> Outcome {
        let deadline = Deadline::after_us(us);
        while !deadline.expired() {
            self.poll()?;
        }
        Ok(())
    }

    /// A TCP socket with buffers of `rx` and `tx` bytes from the arena, tuned
    /// for throughput: no Nagle, no delayed acknowledgements (smoltcp would
    /// wait 10 ms before acknowledging less than a segment).
    pub fn add_tcp(&mut self, rx: usize, tx: usize) -> Result<SocketHandle, &'static str> {
        let rx = self.arena.alloc(rx, 4096)?.into_guest_memory();
        let tx = self.arena.alloc(tx, 4096)?.into_guest_memory();
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        Ok(self.sockets.add(socket))
    }

    /// An ICMP socket with `bytes` of payload room each way; `metadata`
    /// holds the packet slots, half for each direction.
    pub fn add_icmp(
        &mut self,
        metadata: &'s mut [icmp::PacketMetadata],
        bytes: usize,
    ) -> Result<SocketHandle, &'static str> {
        let (rx_meta, tx_meta) = metadata.split_at_mut(metadata.len() / 2);
        let rx = self.arena.alloc(bytes, 64)?.into_guest_memory();
        let tx = self.arena.alloc(bytes, 64)?.into_guest_memory();
        let socket = icmp::Socket::new(
            icmp::PacketBuffer::new(rx_meta, rx),
            icmp::PacketBuffer::new(tx_meta, tx),
        );
        Ok(self.sockets.add(socket))
    }

    /// Arena memory for the scenario's own use (never given to a device).
    pub fn scratch(&mut self, len: usize) -> Result<&'static mut [u8], &'static str> {
        Ok(self.arena.alloc(len, 64)?.into_guest_memory())
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'s> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Connects `handle` to `remote`, trying again for up to about 10 s while
    /// the peer refuses (it may still be booting) or does not answer.
    pub fn connect(&mut self, handle: SocketHandle, remote: (Ipv4Address, u16)) -> Outcome {
        let deadline = Deadline::after_us(CONNECT_TIMEOUT_US);
        let mut attempts = 0u32;
        loop {
            if !self.tcp(handle).is_open() {
                if attempts > 0 {
                    self.poll_for(CONNECT_RETRY_US)?;
                }
                attempts += 1;
                let local_port = self.next_local_port;
                self.next_local_port = match local_port.checked_add(1) {
                    Some(port) => port,
                    None => EPHEMERAL_PORT_BASE,
                };
                let context = self.iface.context();
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                socket
                    .connect(context, (IpAddress::Ipv4(remote.0), remote.1), local_port)
                    .map_err(|_| "connect-failed")?;
                // Without a timeout smoltcp would retransmit the SYN forever.
                socket.set_timeout(Some(Duration::from_secs(10)));
            }
            self.poll()?;
            let socket = self.tcp(handle);
            if socket.state() == tcp::State::Established {
                socket.set_timeout(None);
                return Ok(());
            }
            if deadline.expired() {
                socket.abort();
                return Err("connect-timeout");
            }
        }
    }

    /// Closes `handle` gracefully and polls until the connection is over
    /// (or about `us` microseconds have passed).
    pub fn close(&mut self, handle: SocketHandle, us: u64) -> Outcome {
        self.tcp(handle).close();
        let deadline = Deadline::after_us(us);
        while self.tcp(handle).is_open() && !deadline.expired() {
            self.poll()?;
        }
        Ok(())
    }

    /// `net stats ...` for the device in use.
    pub fn say_stats(&self) {
        let stats = self.dev.stats();
        say!(
            "net dev={} rx_frames={} rx_merged={} rx_dropped={} tx_frames={} tso_frames={} \
             tso_segments={} notifications={}",
            self.dev.index(),
            stats.rx_frames,
            stats.rx_merged,
            stats.rx_dropped,
            stats.tx_frames,
            stats.tso_frames,
            stats.tso_segments,
            stats.notifications
        );
    }
}
