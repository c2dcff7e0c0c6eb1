//! The pure parts of an nvmm network: IPv4 subnets, the tap name and MAC address each VM gets
//! (derived from the network and VM names, so they are the same on every boot and on every
//! host), and the address book that keeps a VM's IPv4 address stable across boots.
//!
//! Nothing here touches the host; `host.rs` reads and writes the files and interfaces.

use std::fmt;
use std::net::{AddrParseError, Ipv4Addr};
use std::str::FromStr;

/// The network every VM joins unless told otherwise; also its bridge's name.
pub const DEFAULT_NETWORK: &str = "nvmm0";

/// The longest interface name Linux accepts (`IFNAMSIZ` less the NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Every tap nvmm creates starts with this, so `ip link` shows which taps are nvmm's.
pub const TAP_PREFIX: &str = "nv-";

/// Errors of subnet parsing and address assignment.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The text has no `/prefix` part.
    #[error("subnet {text:?} has no prefix length (write it as in 10.213.0.0/24)")]
    MissingPrefix {
        /// The text given.
        text: String,
    },
    /// The part before `/` is not an IPv4 address.
    #[error("subnet {text:?} does not start with an IPv4 address")]
    InvalidAddress {
        /// The text given.
        text: String,
        /// Why it is not an address.
        #[source]
        source: AddrParseError,
    },
    /// The prefix length is not a number nvmm can use.
    #[error(
        "subnet {text:?} needs a prefix length from {MIN_PREFIX} to {MAX_PREFIX} (room for the \
         host and at least one VM)"
    )]
    InvalidPrefix {
        /// The text given.
        text: String,
    },
    /// The address has bits set beyond the prefix.
    #[error("subnet {text:?} has host bits set; its network address is {network}")]
    HostBitsSet {
        /// The text given.
        text: String,
        /// The network the text probably meant.
        network: Ipv4Subnet,
    },
    /// Every guest address of the subnet belongs to a running VM.
    #[error("no free address left in {subnet}: every one belongs to a running VM")]
    SubnetFull {
        /// The subnet.
        subnet: Ipv4Subnet,
    },
}

/// The shortest prefix `--subnet` accepts (/1 would be half the Internet, but it is the user's
/// host: only the route check stands in the way).
pub const MIN_PREFIX: u8 = 1;
/// The longest prefix that still leaves a host address and one guest address.
pub const MAX_PREFIX: u8 = 30;

/// An IPv4 network nvmm can use for VMs: a network address and a prefix of
/// [`MIN_PREFIX`]..=[`MAX_PREFIX`] bits. The host takes the first usable address, VMs the
/// ones after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Subnet {
    /// Parses `A.B.C.D/N`; the address must be the network address (no host bits).
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let (addr, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| AddrError::MissingPrefix { text: text.into() })?;
        let addr: Ipv4Addr = addr.parse().map_err(|source| AddrError::InvalidAddress {
            text: text.into(),
            source,
        })?;
        let prefix_len = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| (MIN_PREFIX..=MAX_PREFIX).contains(p))
            .ok_or_else(|| AddrError::InvalidPrefix { text: text.into() })?;
        let subnet = Self::containing(addr, prefix_len);
        if subnet.network != addr {
            return Err(AddrError::HostBitsSet {
                text: text.into(),
                network: subnet,
            });
        }
        Ok(subnet)
    }

    /// The subnet of `prefix_len` bits (clamped to the usable range) that holds `addr`.
    pub fn containing(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = prefix_len.clamp(MIN_PREFIX, MAX_PREFIX);
        Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        }
    }

    /// The network address.
    #[cfg(test)]
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` is inside the subnet (network and broadcast addresses included).
    #[cfg(test)]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        self.overlaps_prefix(other.network, other.prefix_len)
    }

    /// Whether the subnet shares any address with `dest/prefix_len` (0..=32 bits, as in a
    /// route): two prefixes overlap exactly when the shorter one contains the other.
    pub fn overlaps_prefix(&self, dest: Ipv4Addr, prefix_len: u8) -> bool {
        let shorter = mask(self.prefix_len.min(prefix_len));
        u32::from(self.network) & shorter == u32::from(dest) & shorter
    }

    /// The host's address on the network's bridge: the first usable address.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The `n`th usable address (1 is the host's), or `None` past the last one (the broadcast
    /// address is never handed out).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        (1..=self.usable())
            .contains(&n)
            .then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    /// How many usable addresses the subnet has: all but the network and broadcast ones.
    pub fn usable(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix_len))) - 2
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// The netmask of a `prefix_len`-bit prefix (0..=32).
fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

/// 64-bit FNV-1a over the parts, each followed by a NUL (names never contain one), so
/// ("ab", "c") and ("a", "bc") differ. Chosen because it is tiny and fixed forever: std's
/// `DefaultHasher` may change between Rust releases, and these values must not.
fn name_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `52:56:0a:0b:0c:0d`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let bytes: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}

/// A locally administered (bit 1 of the first byte set), unicast (bit 0 clear) MAC address
/// from a hash: the first byte is always `x2`.
fn mac_from_hash(hash: u64) -> [u8; 6] {
    let b = hash.to_be_bytes();
    [(b[0] & 0xf0) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The MAC address of VM `vm` in `network`: stable across boots and hosts, so the guest's
/// interface (and any DHCP lease or neighbour entry keyed on it) does not change.
pub fn mac_address(network: &str, vm: &str) -> [u8; 6] {
    mac_from_hash(name_hash(&[network, vm]))
}

/// The MAC address of the network's bridge. A Linux bridge otherwise takes the lowest MAC of
/// its ports, which changes as VMs come and go and leaves stale neighbour entries in guests.
pub fn bridge_mac(network: &str) -> [u8; 6] {
    // VM names cannot contain NUL, so no VM hashes to the same input.
    mac_from_hash(name_hash(&[network, "\0bridge"]))
}

/// Whether `name` can be used as an interface name as is: 1..=15 bytes of letters, digits,
/// `-`, `_` and `.` (the kernel refuses `/`, `:` and whitespace; the rest would confuse
/// tools), and not `.` or `..`.
pub fn is_valid_ifname(name: &str) -> bool {
    (1..=MAX_IFNAME_LEN).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The tap of VM `vm` in `network`: `nv-<vm>` when that is a valid interface name and the
/// network is [`DEFAULT_NETWORK`]. Otherwise the name is cut to fit and made unique with a
/// 16-bit hash of both names: `nv-<up to 7 valid chars>-<4 hex digits>`. Tap names are global
/// on the host, so a VM of the same name in another network must get a different one.
pub fn tap_name(network: &str, vm: &str) -> String {
    let plain = format!("{TAP_PREFIX}{vm}");
    if network == DEFAULT_NETWORK && is_valid_ifname(&plain) {
        return plain;
    }
    let hash = name_hash(&[network, vm]) & 0xffff;
    let room = MAX_IFNAME_LEN - TAP_PREFIX.len() - 5;
    let kept: String = vm
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(room)
        .collect();
    let kept = match kept.trim_end_matches(['-', '_']) {
        "" => "vm",
        kept => kept,
    };
    format!("{TAP_PREFIX}{kept}-{hash:04x}")
}

/// Which VM has which address in one network, oldest use first; the `addresses` state file.
/// A VM keeps its address for as long as it is listed; when the subnet runs out, the address
/// of the VM that has not booted for longest (and is not running) is reused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressBook {
    entries: Vec<(String, Ipv4Addr)>,
}

impl AddressBook {
    /// Reads the file's text: `name address` lines. Lines that do not parse, and later
    /// duplicates of a name or an address, are dropped: the file is nvmm's own, and a damaged
    /// line only costs that VM its old address.
    pub fn parse(text: &str) -> Self {
        let mut book = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(addr), None) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            let Ok(addr) = addr.parse::<Ipv4Addr>() else {
                continue;
            };
            if book.entries.iter().all(|(n, a)| n != name && *a != addr) {
                book.entries.push((name.to_owned(), addr));
            }
        }
        book
    }

    /// The file's text, one `name address` line per VM.
    pub fn to_text(&self) -> String {
        self.entries
            .iter()
            .map(|(name, addr)| format!("{name} {addr}\n"))
            .collect()
    }

    /// The address of `vm`, if it has one.
    #[cfg(test)]
    pub fn get(&self, vm: &str) -> Option<Ipv4Addr> {
        self.entries.iter().find(|(n, _)| n == vm).map(|(_, a)| *a)
    }

    /// Gives `vm` its address in `subnet`: the one it had, else the lowest free guest address,
    /// else the address of the least recently booted VM for which `is_running` is false. Marks
    /// `vm` as the most recent. Entries outside `subnet` (the subnet changed) are dropped.
    pub fn assign(
        &mut self,
        vm: &str,
        subnet: &Ipv4Subnet,
        is_running: impl Fn(&str) -> bool,
    ) -> Result<Ipv4Addr, AddrError> {
        self.retain_guest_addresses(subnet);
        if let Some(pos) = self.entries.iter().position(|(n, _)| n == vm) {
            let entry = self.entries.remove(pos);
            let addr = entry.1;
            self.entries.push(entry);
            return Ok(addr);
        }
        let free = (2..=subnet.usable())
            .filter_map(|n| subnet.nth(n))
            .find(|addr| self.entries.iter().all(|(_, a)| a != addr));
        let addr = match free {
            Some(addr) => addr,
            None => {
                let pos = self
                    .entries
                    .iter()
                    .position(|(n, _)| !is_running(n))
                    .ok_or(AddrError::SubnetFull { subnet: *subnet })?;
                self.entries.remove(pos).1
            }
        };
        self.entries.push((vm.to_owned(), addr));
        Ok(addr)
    }

    /// Every VM with an address, in address order.
    pub fn hosts(&self) -> Vec<(String, Ipv4Addr)> {
        let mut hosts = self.entries.clone();
        hosts.sort_by_key(|(_, addr)| *addr);
        hosts
    }

    /// Drops entries that are not guest addresses of `subnet` (network, host, broadcast or
    /// outside it).
    fn retain_guest_addresses(&mut self, subnet: &Ipv4Subnet) {
        let first = subnet.nth(2);
        let last = subnet.nth(subnet.usable());
        self.entries
            .retain(|(_, a)| first.is_some_and(|f| *a >= f) && last.is_some_and(|l| *a <= l));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Ipv4Subnet {
        Ipv4Subnet::parse(text).unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_subnets() {
        let s = subnet("10.213.0.0/24");
        assert_eq!(s.network(), ip("10.213.0.0"));
        assert_eq!(s.prefix_len(), 24);
        assert_eq!(s.to_string(), "10.213.0.0/24");
        assert_eq!(
            " 192.168.4.0/22 ".parse::<Ipv4Subnet>().unwrap(),
            subnet("192.168.4.0/22")
        );
        assert_eq!(subnet("10.0.0.0/8").usable(), (1 << 24) - 2);
        assert_eq!(subnet("10.0.0.0/30").usable(), 2);
    }

    #[test]
    fn refuses_bad_subnets_with_the_reason() {
        assert!(matches!(
            Ipv4Subnet::parse("10.0.0.0"),
            Err(AddrError::MissingPrefix { .. })
        ));
        assert!(matches!(
            Ipv4Subnet::parse("10.0.0/24"),
            Err(AddrError::InvalidAddress { .. })
        ));
        for bad in [
            "10.0.0.0/31",
            "10.0.0.0/32",
            "0.0.0.0/0",
            "10.0.0.0/x",
            "10.0.0.0/",
        ] {
            assert!(
                matches!(Ipv4Subnet::parse(bad), Err(AddrError::InvalidPrefix { .. })),
                "{bad}"
            );
        }
        let err = Ipv4Subnet::parse("10.0.0.1/24").unwrap_err();
        assert!(
            matches!(err, AddrError::HostBitsSet { network, .. } if network == subnet("10.0.0.0/24"))
        );
        assert!(err.to_string().contains("10.0.0.0/24"), "{err}");
    }

    #[test]
    fn contains_and_nth() {
        let s = subnet("10.213.0.0/24");
        assert!(s.contains(ip("10.213.0.0")));
        assert!(s.contains(ip("10.213.0.255")));
        assert!(!s.contains(ip("10.213.1.0")));
        assert!(!s.contains(ip("10.212.255.255")));
        assert_eq!(s.host_addr(), ip("10.213.0.1"));
        assert_eq!(s.nth(1), Some(ip("10.213.0.1")));
        assert_eq!(s.nth(2), Some(ip("10.213.0.2")));
        assert_eq!(s.nth(254), Some(ip("10.213.0.254")));
        assert_eq!(
            s.nth(255),
            None,
            "the broadcast address is never handed out"
        );
        assert_eq!(s.nth(0), None, "nor is the network address");
    }

    #[test]
    fn overlaps() {
        let s = subnet("10.213.0.0/24");
        assert!(s.overlaps(&subnet("10.213.0.0/24")));
        assert!(s.overlaps(&subnet("10.0.0.0/8")));
        assert!(s.overlaps(&subnet("10.213.0.128/25")));
        assert!(!s.overlaps(&subnet("10.213.1.0/24")));
        assert!(!s.overlaps(&subnet("172.16.0.0/12")));
        assert!(s.overlaps_prefix(ip("10.213.0.7"), 32));
        assert!(!s.overlaps_prefix(ip("10.213.1.7"), 32));
        assert!(s.overlaps_prefix(ip("0.0.0.0"), 0));
    }

    #[test]
    fn macs_are_local_unicast_stable_and_distinct() {
        let a = mac_address("nvmm0", "web");
        assert_eq!(
            a[0] & 0x0f,
            0x02,
            "first byte is x2: locally administered, unicast"
        );
        assert_eq!(a, mac_address("nvmm0", "web"));
        // Pinned: a change here changes every guest's MAC.
        assert_eq!(a, [0x52, 0xf7, 0x37, 0x49, 0x2f, 0xee]);
        assert_ne!(a, mac_address("nvmm0", "db"));
        assert_ne!(a, mac_address("lab", "web"));
        assert_ne!(mac_address("ab", "c"), mac_address("a", "bc"));
        let bridge = bridge_mac("nvmm0");
        assert_eq!(bridge[0] & 0x0f, 0x02);
        assert_ne!(bridge, a);
        for vm in ["a", "b", "server", "x".repeat(60).as_str()] {
            assert_eq!(mac_address("n", vm)[0] & 0x03, 0x02, "{vm}");
        }
    }

    #[test]
    fn name_hash_is_fnv1a() {
        // FNV-1a 64 of "a\0" (reference values of the algorithm: "" and "a").
        assert_eq!(name_hash(&[]), 0xcbf2_9ce4_8422_2325);
        let a = 0xaf63_dc4c_8601_ec8c_u64; // FNV-1a 64 of "a"
        assert_eq!(name_hash(&["a"]), a.wrapping_mul(0x0000_0100_0000_01b3));
    }

    #[test]
    fn tap_names_are_plain_when_they_fit() {
        assert_eq!(tap_name("nvmm0", "web"), "nv-web");
        assert_eq!(tap_name("nvmm0", "abcdefghijkl"), "nv-abcdefghijkl");
        assert_eq!(tap_name("nvmm0", "abcdefghijkl").len(), MAX_IFNAME_LEN);
    }

    #[test]
    fn tap_names_are_cut_and_hashed_otherwise() {
        for (network, vm) in [
            ("nvmm0", "abcdefghijklm"),
            ("nvmm0", "a-very-long-vm-name-indeed"),
            ("nvmm0", "web server"),
            ("nvmm0", "wéb"),
            ("nvmm0", "a/b"),
            ("nvmm0", "ééé"),
            ("lab", "web"),
        ] {
            let tap = tap_name(network, vm);
            assert!(tap.starts_with(TAP_PREFIX), "{tap}");
            assert!(is_valid_ifname(&tap), "{tap:?} from {network}/{vm}");
            assert!(tap.len() <= MAX_IFNAME_LEN, "{tap}");
            assert_eq!(tap, tap_name(network, vm), "stable");
        }
        assert!(tap_name("nvmm0", "a-very-long-vm-name-indeed").starts_with("nv-a-very-"));
        // Pinned: a change here renames taps of running VMs from an older nvmm.
        assert_eq!(tap_name("lab", "web"), "nv-web-08ae");
        assert_eq!(
            tap_name("nvmm0", "a-very-long-vm-name-indeed"),
            "nv-a-very-9eaa"
        );
        // Names that cut to the same prefix, or that differ only in invalid characters, or
        // the same VM in another network, still differ.
        let taps = [
            tap_name("nvmm0", "a-very-long-name-1"),
            tap_name("nvmm0", "a-very-long-name-2"),
            tap_name("nvmm0", "web server"),
            tap_name("nvmm0", "web:server"),
            tap_name("lab", "web"),
            tap_name("lab2", "web"),
            tap_name("nvmm0", "web"),
        ];
        for (i, a) in taps.iter().enumerate() {
            for b in &taps[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn valid_ifnames() {
        assert!(is_valid_ifname("nvmm0"));
        assert!(is_valid_ifname("br-lab_1.2"));
        for bad in ["", ".", "..", "a b", "a/b", "a:b", "0123456789abcdef"] {
            assert!(!is_valid_ifname(bad), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_stable_and_persist() {
        let s = subnet("10.213.0.0/24");
        let mut book = AddressBook::default();
        let web = book.assign("web", &s, |_| false).unwrap();
        let db = book.assign("db", &s, |_| false).unwrap();
        assert_eq!(web, ip("10.213.0.2"), "the host has .1");
        assert_eq!(db, ip("10.213.0.3"));
        assert_eq!(book.assign("web", &s, |_| false).unwrap(), web);

        let mut reread = AddressBook::parse(&book.to_text());
        assert_eq!(reread, book);
        assert_eq!(reread.assign("db", &s, |_| false).unwrap(), db);
        assert_eq!(
            reread.assign("cache", &s, |_| false).unwrap(),
            ip("10.213.0.4")
        );
        assert_eq!(
            reread.hosts(),
            vec![
                ("web".to_owned(), web),
                ("db".to_owned(), db),
                ("cache".to_owned(), ip("10.213.0.4"))
            ]
        );
    }

    #[test]
    fn damaged_lines_and_duplicates_are_dropped() {
        let book = AddressBook::parse(
            "web 10.213.0.2\nbroken\ndb not-an-ip\nweb 10.213.0.9\ncopy 10.213.0.2\n\
             db 10.213.0.3 extra\nok 10.213.0.4\n",
        );
        assert_eq!(book.to_text(), "web 10.213.0.2\nok 10.213.0.4\n");
        assert_eq!(book.get("ok"), Some(ip("10.213.0.4")));
        assert_eq!(book.get("db"), None);
    }

    #[test]
    fn a_new_subnet_reassigns_addresses() {
        let mut book = AddressBook::parse("web 10.213.0.2\ndb 10.213.0.3\n");
        let s = subnet("172.29.0.0/24");
        assert_eq!(book.assign("db", &s, |_| false).unwrap(), ip("172.29.0.2"));
        assert_eq!(book.to_text(), "db 172.29.0.2\n");
        // The host's address is never a guest's, even if the file says so.
        let mut book = AddressBook::parse("web 172.29.0.1\n");
        assert_eq!(book.assign("web", &s, |_| false).unwrap(), ip("172.29.0.2"));
    }

    #[test]
    fn a_full_subnet_reuses_the_oldest_stopped_vm() {
        let s = subnet("10.0.0.0/29"); // .1 host, .2 to .6 guests
        let mut book = AddressBook::default();
        for vm in ["a", "b", "c", "d", "e"] {
            book.assign(vm, &s, |_| false).unwrap();
        }
        book.assign("a", &s, |_| false).unwrap(); // a booted again: b is now the oldest
        let running = |vm: &str| vm == "b";
        assert_eq!(
            book.assign("f", &s, running).unwrap(),
            ip("10.0.0.4"),
            "c's address"
        );
        assert_eq!(book.get("c"), None);
        let err = book.assign("g", &s, |_| true).unwrap_err();
        assert!(matches!(err, AddrError::SubnetFull { .. }), "{err}");
    }
}
