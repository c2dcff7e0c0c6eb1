//! A thin, synchronous rtnetlink client with exactly the operations nvmm's host networking
//! needs: create a bridge, delete a link, set a link up, attach a link to a bridge and set it
//! up, add an IPv4 address, look up a link by name, and list links, IPv4 addresses and IPv4
//! routes. Messages are rust-netlink's `netlink-packet-route` types sent over a plain blocking
//! `netlink-sys` socket: no async runtime, no `ip` command.
//!
//! A socket belongs to the network namespace of the thread that opened it, which is what lets
//! the tests work in private namespaces.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// Errors of netlink requests. Each names the interface it was about; a refusal for lack of
/// privilege reads as such (see [`NetlinkError::is_permission_denied`]).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// No rtnetlink socket could be opened.
    #[error("cannot open a netlink socket")]
    OpenSocket(#[source] io::Error),
    /// Creating a bridge failed.
    #[error("cannot create bridge {name}")]
    CreateBridge {
        /// The bridge.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Deleting an interface failed.
    #[error("cannot delete interface {name}")]
    DeleteLink {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Bringing an interface up failed.
    #[error("cannot set interface {name} up")]
    SetUp {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Attaching an interface to a bridge failed.
    #[error("cannot attach interface {name} to bridge {bridge}")]
    SetController {
        /// The interface.
        name: String,
        /// The bridge.
        bridge: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Adding an address failed.
    #[error("cannot add address {address}/{prefix_len} to interface {name}")]
    AddAddress {
        /// The interface.
        name: String,
        /// The address.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Looking up one interface failed.
    #[error("cannot look up network interface {name}")]
    GetLink {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Listing interfaces failed.
    #[error("cannot list network interfaces")]
    ListLinks(#[source] io::Error),
    /// Listing addresses failed.
    #[error("cannot list IPv4 addresses")]
    ListAddresses(#[source] io::Error),
    /// Dumping routes failed.
    #[error("cannot list IPv4 routes")]
    DumpRoutes(#[source] io::Error),
    /// An operation needed an interface that does not exist.
    #[error("no network interface is named {name}")]
    NoSuchLink {
        /// The name looked up.
        name: String,
    },
    /// Test-only operations (veth, namespaces) failed.
    #[cfg(test)]
    #[error("test netlink operation {what} failed")]
    Test {
        /// Which.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl NetlinkError {
    /// Whether the kernel refused for lack of `CAP_NET_ADMIN`.
    pub fn is_permission_denied(&self) -> bool {
        use std::error::Error;
        self.source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// A network interface as a link dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND`: "bridge", "tun", "veth", "dummy", …; `None` for physical devices and
    /// loopback.
    pub kind: Option<String>,
    /// Index of the bridge (or bond) the interface is attached to.
    pub controller: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Address {
    /// Interface index.
    pub index: u32,
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// An IPv4 route from any routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Route {
    /// Destination network (0.0.0.0 for the default route).
    pub destination: Ipv4Addr,
    /// Destination prefix length (0..=32).
    pub prefix_len: u8,
    /// The output interface's name, if the route has one and it could be resolved.
    pub device: Option<String>,
    /// Routing table.
    pub table: u32,
    /// Whether the route is one of the kernel's bookkeeping kinds (local, broadcast, multicast,
    /// anycast) rather than one that sends traffic to a network.
    pub host_only: bool,
}

impl std::fmt::Display for Ipv4Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.destination, self.prefix_len)?;
        if let Some(device) = &self.device {
            write!(f, " dev {device}")?;
        }
        Ok(())
    }
}

/// A blocking rtnetlink socket in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// Opens a socket. This needs no privilege; changing interfaces needs `CAP_NET_ADMIN`.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::OpenSocket)?;
        socket.bind_auto().map_err(NetlinkError::OpenSocket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::OpenSocket)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Creates bridge `name` with MAC address `mac` (a fixed MAC stops the bridge from taking
    /// its ports' addresses as they come and go). Fails if the name is taken.
    pub fn create_bridge(&mut self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(mac.to_vec()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|source| NetlinkError::CreateBridge {
                name: name.into(),
                source,
            })
    }

    /// Deletes interface `name`; `false` if there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![LinkAttribute::IfName(name.into())];
        match self.request(RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(NetlinkError::DeleteLink {
                name: name.into(),
                source,
            }),
        }
    }

    /// Sets interface `name` administratively up.
    pub fn set_up(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes = vec![LinkAttribute::IfName(name.into())];
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|source| NetlinkError::SetUp {
                name: name.into(),
                source,
            })
    }

    /// Attaches interface `name` to bridge `bridge` as a port and sets it up, in one request.
    pub fn attach_up(&mut self, name: &str, bridge: &str) -> Result<(), NetlinkError> {
        let bridge_index = self.require_link(bridge)?.index;
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Controller(bridge_index),
        ];
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|source| NetlinkError::SetController {
                name: name.into(),
                bridge: bridge.into(),
                source,
            })
    }

    /// Adds `address/prefix_len` to interface `name` (which also adds the connected route).
    pub fn add_ipv4_address(
        &mut self,
        name: &str,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let index = self.require_link(name)?.index;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(address)),
            AddressAttribute::Address(IpAddr::V4(address)),
        ];
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|source| NetlinkError::AddAddress {
            name: name.into(),
            address,
            prefix_len,
            source,
        })
    }

    /// Every interface in the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(NetlinkError::ListLinks)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(msg) => Some(link_from_message(msg)),
                _ => None,
            })
            .collect())
    }

    /// The interface called `name`, if there is one. One request for that link, not a dump of
    /// every link: joining N VMs looks up N taps' bridge, and dumps made that quadratic.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        // The kernel refuses a name no interface can have (EINVAL); none is called that.
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Ok(None);
        }
        let mut msg = LinkMessage::default();
        msg.attributes = vec![LinkAttribute::IfName(name.into())];
        let get_error = |source| NetlinkError::GetLink {
            name: name.into(),
            source,
        };
        match self.get(RouteNetlinkMessage::GetLink(msg)) {
            Ok(RouteNetlinkMessage::NewLink(msg)) => Ok(Some(link_from_message(msg))),
            Ok(other) => Err(get_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the kernel answered with {other:?}"),
            ))),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(get_error(e)),
        }
    }

    /// Every IPv4 address in the namespace.
    pub fn ipv4_addresses(&mut self) -> Result<Vec<Ipv4Address>, NetlinkError> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self
            .dump(RouteNetlinkMessage::GetAddress(request))
            .map_err(NetlinkError::ListAddresses)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| {
                let RouteNetlinkMessage::NewAddress(msg) = reply else {
                    return None;
                };
                // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
                // point-to-point links and the same otherwise.
                let local = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                let address = local.or_else(|| {
                    msg.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                })?;
                Some(Ipv4Address {
                    index: msg.header.index,
                    address,
                    prefix_len: msg.header.prefix_len,
                })
            })
            .collect())
    }

    /// Every IPv4 route of every table, with output interfaces resolved to names.
    pub fn ipv4_routes(&mut self) -> Result<Vec<Ipv4Route>, NetlinkError> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let replies = self
            .dump(RouteNetlinkMessage::GetRoute(request))
            .map_err(NetlinkError::DumpRoutes)?;
        let links = self.links()?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewRoute(msg) => Some(route_from_message(msg, &links)),
                _ => None,
            })
            .collect())
    }

    fn require_link(&mut self, name: &str) -> Result<Link, NetlinkError> {
        self.link_by_name(name)?
            .ok_or_else(|| NetlinkError::NoSuchLink { name: name.into() })
    }

    /// Sends `msg` and returns its sequence number.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.sequence)
    }

    /// Receives one datagram and splits it into the messages it holds.
    fn receive(&mut self) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        let (buf, _) = self.socket.recv_from_full()?;
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < buf.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            // Messages are padded to 4 bytes.
            offset += len.next_multiple_of(4);
            messages.push(msg);
        }
        Ok(messages)
    }

    /// Sends a request that changes something and waits for the kernel's acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let sequence = self.send(msg, NLM_F_ACK | flags)?;
        self.await_replies(sequence, |payload| match payload {
            NetlinkPayload::Error(error) => Some(match error.code {
                None => Ok(()),
                Some(code) => Err(kernel_error(code.get())),
            }),
            _ => None,
        })
    }

    /// Sends a request for one object and waits for it.
    fn get(&mut self, msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        let sequence = self.send(msg, 0)?;
        self.await_replies(sequence, |payload| match payload {
            NetlinkPayload::InnerMessage(inner) => Some(Ok(inner)),
            NetlinkPayload::Error(error) => Some(Err(match error.code {
                Some(code) => kernel_error(code.get()),
                None => io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the kernel acknowledged a request for an object",
                ),
            })),
            _ => None,
        })
    }

    /// Sends a dump request and collects every reply until the kernel says it is done.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let sequence = self.send(msg, NLM_F_DUMP)?;
        let mut replies = Vec::new();
        self.await_replies(sequence, |payload| match payload {
            NetlinkPayload::InnerMessage(inner) => {
                replies.push(inner);
                None
            }
            NetlinkPayload::Done(_) => Some(Ok(std::mem::take(&mut replies))),
            NetlinkPayload::Error(error) => error.code.map(|code| Err(kernel_error(code.get()))),
            _ => None,
        })
    }

    /// Reads the kernel's replies to request `sequence`, handing each to `on_reply`, until it
    /// returns the request's outcome. Replies to other requests are skipped.
    fn await_replies<T>(
        &mut self,
        sequence: u32,
        mut on_reply: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        loop {
            for reply in self.receive()? {
                if reply.header.sequence_number != sequence {
                    continue;
                }
                if let Some(outcome) = on_reply(reply.payload) {
                    return outcome;
                }
            }
        }
    }
}

/// `RT_TABLE_LOCAL`: the kernel's table of the host's own and broadcast addresses.
const RT_TABLE_LOCAL: u32 = 255;

/// The kernel's negative errno as an error; EPERM says what privilege is missing.
fn kernel_error(code: i32) -> io::Error {
    let errno = code.saturating_abs();
    if errno == libc::EPERM {
        return not_permitted();
    }
    io::Error::from_raw_os_error(errno)
}

/// EPERM from a request that changes host interfaces (netlink or a tun ioctl), saying which
/// privilege it needs.
pub fn not_permitted() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "operation not permitted: changing host network interfaces needs CAP_NET_ADMIN (run nvmm \
         as root)",
    )
}

fn link_from_message(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attribute in msg.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Controller(index) => link.controller = Some(index),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

fn route_from_message(msg: RouteMessage, links: &[Link]) -> Ipv4Route {
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut table = u32::from(msg.header.table);
    let mut oif = None;
    for attribute in msg.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(addr)) => destination = addr,
            // Tables above 255 only fit in the attribute.
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Oif(index) => oif = Some(index),
            _ => {}
        }
    }
    let host_only = matches!(
        msg.header.kind,
        RouteType::Local | RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast
    ) || table == RT_TABLE_LOCAL;
    Ipv4Route {
        destination,
        prefix_len: msg.header.destination_prefix_length,
        device: oif.and_then(|index| {
            links
                .iter()
                .find(|l| l.index == index)
                .map(|l| l.name.clone())
        }),
        table,
        host_only,
    }
}

/// Operations only the tests need, to build a scene around the code under test.
#[cfg(test)]
impl Netlink {
    fn test_request(
        &mut self,
        what: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        self.request(msg, flags)
            .map_err(|source| NetlinkError::Test {
                what: what.into(),
                source,
            })
    }

    /// Creates a veth pair.
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        use netlink_packet_route::link::{InfoData, InfoVeth};
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = vec![LinkAttribute::IfName(peer.into())];
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
            ]),
        ];
        self.test_request(
            "create veth",
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Moves interface `name` into the network namespace open as `netns_fd`.
    pub fn move_to_netns(
        &mut self,
        name: &str,
        netns_fd: std::os::fd::RawFd,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::NetNsFd(netns_fd),
        ];
        self.test_request("move to netns", RouteNetlinkMessage::SetLink(msg), 0)
    }
}
