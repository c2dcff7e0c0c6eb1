//! The host side of an nvmm network: a Linux bridge per network, one persistent tap per VM
//! attached to it, and the files that make addresses stable and crashes harmless.
//!
//! With zero configuration every VM joins network [`DEFAULT_NETWORK`] (bridge `nvmm0`): the host
//! has the subnet's first address on the bridge, each VM a stable address after it, so the host
//! reaches VMs by IP and VMs reach each other (by name, through [`Membership::hosts`]) and the
//! host. Nothing is forwarded or NATed beyond that.
//!
//! Files (the caller picks both directories, see [`state_dirs`]):
//!
//! | path | what |
//! |---|---|
//! | `RUNTIME/net/NET/lock` | `flock`ed for every change to the network, so racing nvmm processes take turns |
//! | `RUNTIME/net/NET/members/VM` | `pid start-time tap` of each running VM |
//! | `STATE/net/NET/subnet` | the network's subnet, kept so addresses survive reboots of the host |
//! | `STATE/net/NET/addresses` | `name address` per VM, oldest use first |
//!
//! Taps are persistent (they outlive the process that made them, so the VMM can open them by
//! name), so a VM killed with SIGKILL leaves its tap behind. Every join, and [`reap_stale`],
//! removes members whose process is gone (a pid whose start time no longer matches is another
//! process) together with their taps, and the bridge once no VM is left. A bridge of the
//! network's name that no running VM uses is taken for such a leftover and made anew.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::addr::{
    AddrError, AddressBook, DEFAULT_NETWORK, Ipv4Subnet, bridge_mac, is_valid_ifname, mac_address,
    tap_name,
};
use super::netlink::{self, Ipv4Route, Link, Netlink, NetlinkError};
use crate::exit::error_chain;

/// Errors of joining and leaving a network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The network name cannot name a bridge.
    #[error(
        "network name {name:?} cannot name a bridge (1 to 15 letters, digits, `-`, `_` or `.`)"
    )]
    InvalidNetworkName {
        /// The name given.
        name: String,
    },
    /// The VM name cannot name a member file.
    #[error(
        "VM name {name:?} cannot be used (empty, `.`, `..`, or contains `/`, whitespace or NUL)"
    )]
    InvalidVmName {
        /// The name given.
        name: String,
    },
    /// The process that is to own the membership does not exist.
    #[error("no process {pid} to own the network membership")]
    NoSuchProcess {
        /// The pid given.
        pid: u32,
    },
    /// A runtime or state directory could not be created.
    #[error("cannot create directory {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The network's lock could not be taken.
    #[error("cannot lock {}", .path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state or member file could not be read.
    #[error("cannot read {}", .path.display())]
    ReadState {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state or member file could not be written.
    #[error("cannot write {}", .path.display())]
    WriteState {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A member file could not be removed.
    #[error("cannot remove {}", .path.display())]
    RemoveMember {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The saved subnet does not parse.
    #[error("invalid subnet saved in {}", .path.display())]
    SavedSubnet {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: AddrError,
    },
    /// A VM of this name is already in the network.
    #[error("VM {vm} is already running in network {network} (process {pid})")]
    VmAlreadyRunning {
        /// The VM.
        vm: String,
        /// The network.
        network: String,
        /// Its process.
        pid: u32,
    },
    /// An interface with the network's name exists and is not a bridge.
    #[error(
        "interface {name} exists and is not a bridge (it is a {kind}); choose another network name"
    )]
    NotABridge {
        /// The interface.
        name: String,
        /// What it is.
        kind: String,
    },
    /// Running VMs use another subnet than the one asked for.
    #[error(
        "network {network} uses {current} for its running VMs, not {requested}; stop them or \
         leave out --subnet"
    )]
    SubnetInUse {
        /// The network.
        network: String,
        /// Its subnet now.
        current: Ipv4Subnet,
        /// The one asked for.
        requested: Ipv4Subnet,
    },
    /// The subnet overlaps a route the host already has.
    #[error(
        "{origin} subnet {subnet} of network {network} overlaps the host's route {route}; choose \
         another with --subnet CIDR"
    )]
    SubnetClash {
        /// The network.
        network: String,
        /// "requested" or "saved".
        origin: &'static str,
        /// The subnet.
        subnet: Ipv4Subnet,
        /// The route it overlaps, as `dest/prefix dev NAME`.
        route: String,
    },
    /// Every default candidate overlaps a host route or another nvmm network.
    #[error(
        "no free subnet for network {network}: every default candidate (10.213.0-15.0/24, \
         172.29.0-15.0/24, 192.168.213-228.0/24) overlaps a host route or another nvmm network; \
         choose one with --subnet CIDR"
    )]
    NoFreeSubnet {
        /// The network.
        network: String,
    },
    /// No address could be given to the VM.
    #[error("cannot give VM {vm} an address in network {network}")]
    AssignAddress {
        /// The VM.
        vm: String,
        /// The network.
        network: String,
        /// Why.
        #[source]
        source: AddrError,
    },
    /// The VM's tap name is taken by an interface that is not this VM's.
    #[error("interface {tap} already exists and is not a tap of a stopped nvmm VM; remove it")]
    TapExists {
        /// The tap name.
        tap: String,
    },
    /// Creating the tap failed.
    #[error("cannot create tap {tap}")]
    CreateTap {
        /// The tap name.
        tap: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A netlink request failed (the error names the interface).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl NetError {
    /// Whether the failure was a missing `CAP_NET_ADMIN`.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            NetError::Netlink(e) => e.is_permission_denied(),
            NetError::CreateTap { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }
}

/// Which network a VM joins: plain data, filled from `--net`/`--subnet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Network name, also its bridge's name.
    pub name: String,
    /// The subnet to use; `None` keeps the saved one or picks a free default.
    pub subnet: Option<Ipv4Subnet>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_NETWORK.into(),
            subnet: None,
        }
    }
}

/// A network as a VM joined it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// The bridge's interface name (the network name).
    pub bridge: String,
    /// The subnet.
    pub subnet: Ipv4Subnet,
    /// The host's address on the bridge: the guests' gateway.
    pub host_addr: Ipv4Addr,
}

/// One VM's place in a network: its tap and what its guest should configure. Dropping it (or
/// [`Membership::leave`]) in the process that owns it (the one that joined, or the one that
/// adopted it) removes the tap, and the bridge if no VM is left.
#[derive(Debug)]
pub struct Membership {
    /// The VM's name.
    pub vm_name: String,
    /// The persistent tap the VMM opens by name.
    pub tap: String,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The host's address, for the guest's route to it.
    pub gateway: Ipv4Addr,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Every VM with an address in the network (this one included), for the guest's
    /// `/etc/hosts`.
    pub hosts: Vec<(String, Ipv4Addr)>,
    paths: NetworkPaths,
    network: String,
    left: bool,
    /// The process that leaves the network on drop: a forked process's copy is not its own.
    owner: u32,
}

/// The default subnets tried, in order, when a network has none yet (`NetError::NoFreeSubnet`
/// lists them too): the first that overlaps
/// no host route and no other nvmm network wins. 10.213.0.0/16 is used by no common tool
/// (Docker takes 172.17+ and 192.168/16, libvirt 192.168.122, Podman 10.88, Kubernetes
/// distributions 10.42/10.43/10.96/10.244); 172.29 and 192.168.213+ are there for hosts whose
/// VPN routes all of 10/8.
pub fn default_subnet_candidates() -> impl Iterator<Item = Ipv4Subnet> {
    let ranges: [(u8, u8, std::ops::Range<u8>); 3] =
        [(10, 213, 0..16), (172, 29, 0..16), (192, 168, 213..229)];
    ranges.into_iter().flat_map(|(a, b, thirds)| {
        thirds.map(move |c| Ipv4Subnet::containing(Ipv4Addr::new(a, b, c, 0), 24))
    })
}

/// The runtime and state directories: `NVMM_RUNTIME_DIR` / `NVMM_STATE_DIR` if set; else
/// `/run/nvmm` and `/var/lib/nvmm` for root; else `$XDG_RUNTIME_DIR/nvmm` and
/// `$XDG_STATE_HOME/nvmm` (default `~/.local/state/nvmm`), with `/tmp/nvmm-UID` fallbacks.
pub fn state_dirs() -> (PathBuf, PathBuf) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    resolve_dirs(uid, |key| std::env::var_os(key))
}

fn resolve_dirs(uid: u32, env: impl Fn(&str) -> Option<OsString>) -> (PathBuf, PathBuf) {
    // XDG says empty or relative values are to be ignored.
    let var = |key: &str| {
        env(key)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    let runtime = var("NVMM_RUNTIME_DIR").unwrap_or_else(|| match uid {
        0 => "/run/nvmm".into(),
        _ => var("XDG_RUNTIME_DIR")
            .map(|dir| dir.join("nvmm"))
            .unwrap_or_else(|| format!("/tmp/nvmm-{uid}").into()),
    });
    let state = var("NVMM_STATE_DIR").unwrap_or_else(|| match uid {
        0 => "/var/lib/nvmm".into(),
        _ => var("XDG_STATE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".local/state")))
            .map(|dir| dir.join("nvmm"))
            .unwrap_or_else(|| format!("/tmp/nvmm-{uid}-state").into()),
    });
    (runtime, state)
}

impl Network {
    /// Puts VM `vm_name`, run by process `pid`, on the network: see the module doc for the
    /// steps. Everything happens under the network's lock.
    pub fn join(
        config: &NetworkConfig,
        runtime_dir: &Path,
        state_dir: &Path,
        vm_name: &str,
        pid: u32,
    ) -> Result<(Network, Membership), NetError> {
        let names = [vm_name.to_owned()];
        let (network, memberships) =
            Network::join_all(config, runtime_dir, state_dir, &names, pid)?;
        let membership = memberships
            .into_iter()
            .next()
            .ok_or(NetError::NoSuchProcess { pid })?;
        Ok((network, membership))
    }

    /// Puts every VM of `vm_names` on the network at once, for process `pid`: one turn of the
    /// network's lock, one address book write, every tap made. VMs started together (`nvmm
    /// up`) are joined by the process that forks them, before it forks: joined one by one in
    /// their own processes, each would wait its turn for the lock while the others' guests
    /// already boot beside it. Each VM's own process then takes its membership over
    /// ([`Membership::adopt`]); until it does, the records name `pid`.
    pub fn join_all(
        config: &NetworkConfig,
        runtime_dir: &Path,
        state_dir: &Path,
        vm_names: &[String],
        pid: u32,
    ) -> Result<(Network, Vec<Membership>), NetError> {
        for vm_name in vm_names {
            check_names(&config.name, vm_name)?;
        }
        let start_time = process_start_time(pid).ok_or(NetError::NoSuchProcess { pid })?;
        let paths = NetworkPaths::new(runtime_dir, state_dir, &config.name);
        let _lock = lock_network(&paths)?;
        let mut nl = Netlink::open()?;

        let live = reap_members(&mut nl, &paths, &config.name)?;
        if let Some((vm, member)) = live.iter().find(|(vm, _)| vm_names.contains(vm)) {
            return Err(NetError::VmAlreadyRunning {
                vm: vm.clone(),
                network: config.name.clone(),
                pid: member.pid,
            });
        }
        let bridge = existing_bridge(&mut nl, &config.name, !live.is_empty())?;
        let subnet = choose_subnet(&mut nl, &paths, state_dir, config, bridge.as_ref())?;
        write_atomically(
            &paths.subnet_file(),
            &format!("{subnet}\n"),
            Durability::Flushed,
        )?;
        ensure_bridge(&mut nl, &config.name, &subnet, bridge.as_ref())?;

        let mut made = Vec::new();
        let added = assign_addresses(&paths, &config.name, vm_names, &subnet, &live).and_then(
            |(addresses, hosts)| {
                for (vm_name, address) in vm_names.iter().zip(addresses) {
                    let tap = add_member(&mut nl, &paths, &config.name, vm_name, pid, start_time)?;
                    made.push((vm_name.clone(), tap, address));
                }
                Ok(hosts)
            },
        );
        let hosts = match added {
            Ok(hosts) => hosts,
            Err(e) => {
                for (vm_name, tap, _) in &made {
                    let _ = nl.delete_link(tap);
                    let _ = remove_if_present(&paths.member_file(vm_name));
                }
                if live.is_empty() {
                    // The bridge is ours alone; do not leave it behind.
                    let _ = nl.delete_link(&config.name);
                }
                return Err(e);
            }
        };

        let network = Network {
            name: config.name.clone(),
            bridge: config.name.clone(),
            subnet,
            host_addr: subnet.host_addr(),
        };
        let memberships = made
            .into_iter()
            .map(|(vm_name, tap, address)| {
                log::info!(
                    "VM {vm_name} joined network {} ({subnet}) as {address} on tap {tap}",
                    config.name
                );
                Membership {
                    mac: mac_address(&config.name, &vm_name),
                    vm_name,
                    tap,
                    address,
                    prefix_len: subnet.prefix_len(),
                    gateway: subnet.host_addr(),
                    hosts: hosts.clone(),
                    paths: paths.clone(),
                    network: config.name.clone(),
                    left: false,
                    owner: std::process::id(),
                }
            })
            .collect();
        Ok((network, memberships))
    }
}

/// Writes VM `vm_name`'s member record (owned by process `pid`, started at `start_time`), then
/// makes its tap; returns the tap's name.
fn add_member(
    nl: &mut Netlink,
    paths: &NetworkPaths,
    network: &str,
    vm_name: &str,
    pid: u32,
    start_time: u64,
) -> Result<String, NetError> {
    let tap = tap_name(network, vm_name);
    // The record before the tap: a process killed from here on leaves a record that names its
    // tap, and whoever reaps it removes both. A tap made first would be nobody's until the
    // record was written, and a kill in between left it for good.
    let member = MemberRecord {
        pid,
        start_time,
        tap: tap.clone(),
    };
    write_member(paths, vm_name, &member)?;
    if let Err(e) = create_tap(nl, &tap, network) {
        let _ = remove_if_present(&paths.member_file(vm_name));
        return Err(e);
    }
    stop_here_for_tests("tap");
    Ok(tap)
}

/// Replaces VM `vm_name`'s member record (runtime state: renamed into place, not flushed).
fn write_member(
    paths: &NetworkPaths,
    vm_name: &str,
    member: &MemberRecord,
) -> Result<(), NetError> {
    write_atomically(
        &paths.member_file(vm_name),
        &member.to_text(),
        Durability::Renamed,
    )
}

impl Membership {
    /// Makes this process (the VM's own, forked with the membership) the VM's owner, in the
    /// network's records and for the drop. No lock: the record is replaced whole by a rename,
    /// and its old owner, the process that joined for the VM, waits for the VM to run before
    /// it exits.
    pub fn adopt(&mut self) -> Result<(), NetError> {
        let pid = std::process::id();
        let start_time = process_start_time(pid).ok_or(NetError::NoSuchProcess { pid })?;
        self.owner = pid;
        let member = MemberRecord {
            pid,
            start_time,
            tap: self.tap.clone(),
        };
        write_member(&self.paths, &self.vm_name, &member)
    }

    /// Lets go of the membership without leaving: the VM's own process has it now.
    pub fn hand_over(mut self) {
        self.left = true;
    }

    /// Leaves the network: deletes the tap and the member file, then the bridge if no running
    /// VM is left.
    pub fn leave(mut self) -> Result<(), NetError> {
        self.left = true;
        self.teardown()
    }

    fn teardown(&self) -> Result<(), NetError> {
        let _lock = lock_network(&self.paths)?;
        let mut nl = Netlink::open()?;
        nl.delete_link(&self.tap)?;
        remove_if_present(&self.paths.member_file(&self.vm_name))?;
        let live = reap_members(&mut nl, &self.paths, &self.network)?;
        if live.is_empty() {
            delete_bridge(&mut nl, &self.network)?;
        }
        log::info!("VM {} left network {}", self.vm_name, self.network);
        Ok(())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if self.left || self.owner != std::process::id() {
            return;
        }
        self.left = true;
        if let Err(e) = self.teardown() {
            log::warn!(
                "VM {} could not leave network {} cleanly (the next nvmm command retries): {}",
                self.vm_name,
                self.network,
                error_chain(&e)
            );
        }
    }
}

/// Cleans up after VMs that died without leaving, in every network under `runtime_dir`: their
/// member files and taps, and each bridge with no running VM left. Call it before a boot so a
/// crash costs nothing. Returns how many dead VMs were reaped.
pub fn reap_stale(runtime_dir: &Path) -> Result<usize, NetError> {
    let net_dir = runtime_dir.join("net");
    let entries = match fs::read_dir(&net_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(NetError::ReadState {
                path: net_dir,
                source,
            });
        }
    };
    let mut networks: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| is_valid_ifname(name))
        .collect();
    networks.sort();
    if networks.is_empty() {
        return Ok(0);
    }
    let mut nl = Netlink::open()?;
    let mut reaped = 0;
    for network in networks {
        // The state directory is not needed to reap.
        let paths = NetworkPaths::new(runtime_dir, Path::new(""), &network);
        let _lock = lock_network(&paths)?;
        let before = read_members(&paths)?.len();
        let live = reap_members(&mut nl, &paths, &network)?;
        reaped += before - live.len();
        if live.is_empty() {
            delete_bridge(&mut nl, &network)?;
        }
    }
    Ok(reaped)
}

/// Where one network's files are.
#[derive(Debug, Clone)]
struct NetworkPaths {
    runtime: PathBuf,
    state: PathBuf,
}

impl NetworkPaths {
    fn new(runtime_dir: &Path, state_dir: &Path, network: &str) -> Self {
        Self {
            runtime: runtime_dir.join("net").join(network),
            state: state_dir.join("net").join(network),
        }
    }

    fn lock_file(&self) -> PathBuf {
        self.runtime.join("lock")
    }

    fn members_dir(&self) -> PathBuf {
        self.runtime.join("members")
    }

    fn member_file(&self, vm: &str) -> PathBuf {
        self.members_dir().join(vm)
    }

    fn subnet_file(&self) -> PathBuf {
        self.state.join("subnet")
    }

    fn addresses_file(&self) -> PathBuf {
        self.state.join("addresses")
    }
}

fn check_names(network: &str, vm: &str) -> Result<(), NetError> {
    if !is_valid_ifname(network) {
        return Err(NetError::InvalidNetworkName {
            name: network.into(),
        });
    }
    // The name is a file name in members/ and a word in the addresses file.
    let bad_vm = vm.is_empty()
        || vm == "."
        || vm == ".."
        || vm
            .chars()
            .any(|c| c == '/' || c == '\0' || c.is_whitespace());
    if bad_vm {
        return Err(NetError::InvalidVmName { name: vm.into() });
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), NetError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| NetError::CreateDir {
            path: path.into(),
            source,
        })
}

/// Held while a network is being changed; the kernel drops the `flock` when the file closes,
/// even if the process is killed.
#[derive(Debug)]
struct NetworkLock {
    // Held for its lock; closing the file releases it.
    _file: File,
}

fn lock_network(paths: &NetworkPaths) -> Result<NetworkLock, NetError> {
    create_dir(&paths.members_dir())?;
    let path = paths.lock_file();
    let lock_error = |source| NetError::Lock {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(lock_error)?;
    loop {
        // SAFETY: flock takes an fd this function owns (open for the whole call) and flags; it
        // touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(NetworkLock { _file: file });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(lock_error(e));
        }
    }
}

/// What [`write_atomically`] appends to a file's name while it writes it.
const TMP_SUFFIX: &str = " (new)";

/// How much a state file's write must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// A power cut: flushed to disk before the rename (the subnet and the address book, kept
    /// across reboots).
    Flushed,
    /// A crash of nvmm: renamed into place unflushed (member records in the runtime
    /// directory, which a reboot leaves stale anyway and whose pids are then dead).
    Renamed,
}

/// Writes `text` to `path` through a temporary file and a rename, so readers (and a crash) see
/// the old file or the new one, never half of one. A file that already holds `text` is left
/// alone: joins mostly find the subnet and their address saved already, and a flush costs
/// milliseconds under the network's lock, which every VM starting at once waits for.
fn write_atomically(path: &Path, text: &str, durability: Durability) -> Result<(), NetError> {
    if fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    // The space keeps the name from ever being a VM's (member files are named after VMs).
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = path.with_file_name(tmp_name);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        if durability == Durability::Flushed {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        NetError::WriteState {
            path: path.into(),
            source,
        }
    })
}

/// The file's text, or `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, NetError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetError::ReadState {
            path: path.into(),
            source,
        }),
    }
}

fn remove_if_present(path: &Path) -> Result<(), NetError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::RemoveMember {
            path: path.into(),
            source,
        }),
    }
}

/// What a member file says: the VM's process (pid plus start time, which tells a live VM from
/// an unrelated process that got the same pid later) and its tap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemberRecord {
    pid: u32,
    start_time: u64,
    tap: String,
}

impl MemberRecord {
    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        let record = Self {
            pid: words.next()?.parse().ok()?,
            start_time: words.next()?.parse().ok()?,
            tap: words.next()?.into(),
        };
        words.next().is_none().then_some(record)
    }

    fn to_text(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start_time, self.tap)
    }

    fn is_running(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Every member file: the VM name and the record, `None` if the file is damaged.
fn read_members(paths: &NetworkPaths) -> Result<Vec<(String, Option<MemberRecord>)>, NetError> {
    let dir = paths.members_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetError::ReadState { path: dir, source }),
    };
    let mut members = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetError::ReadState {
            path: dir.clone(),
            source,
        })?;
        let Ok(vm) = entry.file_name().into_string() else {
            continue;
        };
        // Leftovers of an interrupted atomic write.
        if vm.ends_with(TMP_SUFFIX) {
            let _ = fs::remove_file(entry.path());
            continue;
        }
        let record = read_optional(&entry.path())?.and_then(|text| MemberRecord::parse(&text));
        members.push((vm, record));
    }
    members.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(members)
}

/// Removes the members whose process is gone, with their taps; returns the running ones.
fn reap_members(
    nl: &mut Netlink,
    paths: &NetworkPaths,
    network: &str,
) -> Result<Vec<(String, MemberRecord)>, NetError> {
    let mut live = Vec::new();
    for (vm, record) in read_members(paths)? {
        match record {
            Some(record) if record.is_running() => live.push((vm, record)),
            record => {
                let tap = record.map_or_else(|| tap_name(network, &vm), |r| r.tap);
                // Only a tun/tap device of that name can be the dead VM's.
                let link = nl.link_by_name(&tap)?;
                if link.is_some_and(|l| l.kind.as_deref() == Some("tun")) {
                    nl.delete_link(&tap)?;
                }
                remove_if_present(&paths.member_file(&vm))?;
                log::info!("reaped VM {vm} of network {network}: its process is gone");
            }
        }
    }
    Ok(live)
}

/// The network's bridge, if it exists and running VMs use it. A bridge that no running VM uses
/// is what a crash left behind: it is deleted, so the network starts clean.
fn existing_bridge(
    nl: &mut Netlink,
    name: &str,
    has_members: bool,
) -> Result<Option<Link>, NetError> {
    let Some(link) = nl.link_by_name(name)? else {
        return Ok(None);
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(NetError::NotABridge {
            name: name.into(),
            kind: link.kind.unwrap_or_else(|| "device".into()),
        });
    }
    if has_members {
        return Ok(Some(link));
    }
    nl.delete_link(name)?;
    Ok(None)
}

fn delete_bridge(nl: &mut Netlink, name: &str) -> Result<(), NetError> {
    let link = nl.link_by_name(name)?;
    if link.is_some_and(|l| l.kind.as_deref() == Some("bridge")) {
        nl.delete_link(name)?;
    }
    Ok(())
}

/// The subnet for the network: the one its running VMs use, else the requested one, else the
/// saved one, else the first free default. A requested or saved subnet must not overlap a host
/// route (other than the network's own bridge's).
fn choose_subnet(
    nl: &mut Netlink,
    paths: &NetworkPaths,
    state_dir: &Path,
    config: &NetworkConfig,
    bridge: Option<&Link>,
) -> Result<Ipv4Subnet, NetError> {
    let current = match bridge {
        Some(bridge) => bridge_subnet(nl, bridge.index)?,
        None => None,
    };
    if let Some(current) = current {
        return match config.subnet {
            Some(requested) if requested != current => Err(NetError::SubnetInUse {
                network: config.name.clone(),
                current,
                requested,
            }),
            _ => Ok(current),
        };
    }
    let routes = nl.ipv4_routes()?;
    let saved = read_saved_subnet(&paths.subnet_file())?;
    let chosen = match (config.subnet, saved) {
        (Some(subnet), _) => Some((subnet, "requested")),
        (None, Some(subnet)) => Some((subnet, "saved")),
        (None, None) => None,
    };
    if let Some((subnet, origin)) = chosen {
        if let Some(route) = clashing_route(&subnet, &routes, &config.name) {
            return Err(NetError::SubnetClash {
                network: config.name.clone(),
                origin,
                subnet,
                route: route.to_string(),
            });
        }
        return Ok(subnet);
    }
    let taken = other_networks_subnets(state_dir, &config.name)?;
    pick_default_subnet(&routes, &config.name, &taken).ok_or_else(|| NetError::NoFreeSubnet {
        network: config.name.clone(),
    })
}

/// The subnet of the host's address on the bridge, if it has one.
fn bridge_subnet(nl: &mut Netlink, index: u32) -> Result<Option<Ipv4Subnet>, NetError> {
    Ok(nl
        .ipv4_addresses()?
        .into_iter()
        .filter(|a| a.index == index)
        .map(|a| (a.address, Ipv4Subnet::containing(a.address, a.prefix_len)))
        .find(|(address, subnet)| subnet.host_addr() == *address)
        .map(|(_, subnet)| subnet))
}

fn read_saved_subnet(path: &Path) -> Result<Option<Ipv4Subnet>, NetError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    Ipv4Subnet::parse(text.trim())
        .map(Some)
        .map_err(|source| NetError::SavedSubnet {
            path: path.into(),
            source,
        })
}

/// The subnets other nvmm networks have saved: a default must not take one, or the two
/// networks could not run at the same time.
fn other_networks_subnets(state_dir: &Path, network: &str) -> Result<Vec<Ipv4Subnet>, NetError> {
    let dir = state_dir.join("net");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetError::ReadState { path: dir, source }),
    };
    let mut subnets = Vec::new();
    for entry in entries.flatten() {
        if entry.file_name() == network {
            continue;
        }
        // Another network's damaged file is that network's problem, not this one's.
        if let Ok(Some(subnet)) = read_saved_subnet(&entry.path().join("subnet")) {
            subnets.push(subnet);
        }
    }
    Ok(subnets)
}

/// The first host route that `subnet` overlaps, ignoring default routes (everything overlaps
/// them), the kernel's local/broadcast bookkeeping and the network's own bridge.
fn clashing_route<'a>(
    subnet: &Ipv4Subnet,
    routes: &'a [Ipv4Route],
    bridge: &str,
) -> Option<&'a Ipv4Route> {
    routes.iter().find(|route| {
        route.prefix_len > 0
            && !route.host_only
            && route.device.as_deref() != Some(bridge)
            && subnet.overlaps_prefix(route.destination, route.prefix_len)
    })
}

/// The first default candidate that clashes with no route and no `taken` subnet.
fn pick_default_subnet(
    routes: &[Ipv4Route],
    bridge: &str,
    taken: &[Ipv4Subnet],
) -> Option<Ipv4Subnet> {
    default_subnet_candidates().find(|candidate| {
        clashing_route(candidate, routes, bridge).is_none()
            && taken.iter().all(|t| !t.overlaps(candidate))
    })
}

/// Creates the bridge if needed, gives the host the subnet's first address on it and sets it
/// up.
fn ensure_bridge(
    nl: &mut Netlink,
    name: &str,
    subnet: &Ipv4Subnet,
    existing: Option<&Link>,
) -> Result<(), NetError> {
    let index = match existing {
        Some(link) => link.index,
        None => {
            nl.create_bridge(name, bridge_mac(name))?;
            nl.link_by_name(name)?
                .ok_or_else(|| NetlinkError::NoSuchLink { name: name.into() })?
                .index
        }
    };
    let has_address = nl
        .ipv4_addresses()?
        .iter()
        .any(|a| a.index == index && a.address == subnet.host_addr());
    let configured = (|| {
        if !has_address {
            nl.add_ipv4_address(name, subnet.host_addr(), subnet.prefix_len())?;
        }
        nl.set_up(name)
    })();
    if let Err(e) = configured {
        if existing.is_none() {
            let _ = nl.delete_link(name);
        }
        return Err(e.into());
    }
    Ok(())
}

/// Every VM with an address in a network: name and address.
type HostsTable = Vec<(String, Ipv4Addr)>;

/// Gives each VM of `vms` its address and saves the address book once; returns their
/// addresses, in order, and every VM's.
fn assign_addresses(
    paths: &NetworkPaths,
    network: &str,
    vms: &[String],
    subnet: &Ipv4Subnet,
    live: &[(String, MemberRecord)],
) -> Result<(Vec<Ipv4Addr>, HostsTable), NetError> {
    let file = paths.addresses_file();
    let mut book = AddressBook::parse(&read_optional(&file)?.unwrap_or_default());
    // The VMs joining now count as running: one must not take another's address.
    let is_running =
        |name: &str| live.iter().any(|(n, _)| n == name) || vms.iter().any(|v| v == name);
    let addresses = vms
        .iter()
        .map(|vm| {
            book.assign(vm, subnet, is_running)
                .map_err(|source| NetError::AssignAddress {
                    vm: vm.clone(),
                    network: network.into(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    write_atomically(&file, &book.to_text(), Durability::Flushed)?;
    Ok((addresses, book.hosts()))
}

/// `NVMM_TEST_STOP_AT=POINT` (tests only; never set in normal use): the process stops itself
/// with SIGSTOP at `point`, so a test can kill it exactly there. `tap`: in
/// [`Network::join_all`], right after a VM's tap exists.
fn stop_here_for_tests(point: &str) {
    if std::env::var_os("NVMM_TEST_STOP_AT").is_some_and(|p| p == point) {
        // SAFETY: raise only sends a signal to this thread; SIGSTOP stops the whole process.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// Creates the VM's persistent tap, attaches it to the bridge and sets it up.
fn create_tap(nl: &mut Netlink, tap: &str, bridge: &str) -> Result<(), NetError> {
    create_persistent_tap(tap).map_err(|source| match source.raw_os_error() {
        // IFF_TUN_EXCL: the name is taken by a device this VM did not leave behind.
        Some(libc::EBUSY) | Some(libc::EEXIST) => NetError::TapExists { tap: tap.into() },
        Some(libc::EPERM) => NetError::CreateTap {
            tap: tap.into(),
            source: netlink::not_permitted(),
        },
        _ => NetError::CreateTap {
            tap: tap.into(),
            source,
        },
    })?;
    let attached = nl.attach_up(tap, bridge);
    if let Err(e) = attached {
        let _ = nl.delete_link(tap);
        return Err(e.into());
    }
    Ok(())
}

/// Creates tap `name` as the VMM opens it, persistent so it stays when this process's fd
/// closes.
fn create_persistent_tap(name: &str) -> io::Result<()> {
    if !is_valid_ifname(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid interface name",
        ));
    }
    nvmm_vmm::devices::Tap::create_persistent(name)
}

/// The start time (clock ticks since boot, field 22 of `/proc/PID/stat`) of process `pid`, or
/// `None` if there is no such process.
fn process_start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time of a live process; `None` for a zombie (state Z or X): it has exited, only
/// its parent has not collected it yet (orphans wait for an init that may be slow to).
fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself;
    // the fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

#[cfg(test)]
mod netns_tests;

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A runtime and a state directory under the system temp dir, removed on drop.
    pub(super) struct Dirs(PathBuf);

    impl Dirs {
        pub(super) fn new(name: &str) -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "nvmm-net-{}-{}-{name}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Dirs(path)
        }

        pub(super) fn runtime(&self) -> PathBuf {
            self.0.join("run")
        }

        pub(super) fn state(&self) -> PathBuf {
            self.0.join("state")
        }

        pub(super) fn join(
            &self,
            config: &NetworkConfig,
            vm: &str,
        ) -> Result<(Network, Membership), NetError> {
            Network::join(
                config,
                &self.runtime(),
                &self.state(),
                vm,
                std::process::id(),
            )
        }

        pub(super) fn join_default(&self, vm: &str) -> (Network, Membership) {
            self.join(&NetworkConfig::default(), vm).unwrap()
        }

        /// `vms` joining the default network together, for this process.
        pub(super) fn join_all(
            &self,
            vms: &[&str],
        ) -> Result<(Network, Vec<Membership>), NetError> {
            let names: Vec<String> = vms.iter().map(|vm| vm.to_string()).collect();
            Network::join_all(
                &NetworkConfig::default(),
                &self.runtime(),
                &self.state(),
                &names,
                std::process::id(),
            )
        }

        pub(super) fn member_file(&self, network: &str, vm: &str) -> PathBuf {
            NetworkPaths::new(&self.runtime(), &self.state(), network).member_file(vm)
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(super) fn subnet(text: &str) -> Ipv4Subnet {
        Ipv4Subnet::parse(text).unwrap()
    }

    pub(super) fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    /// A child process that lives until killed: the owner of a VM that will crash.
    pub(super) fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().unwrap()
    }

    pub(super) fn kill(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn route(dest: &str, prefix_len: u8, device: &str) -> Ipv4Route {
        Ipv4Route {
            destination: ip(dest),
            prefix_len,
            device: Some(device.into()),
            table: 254,
            host_only: false,
        }
    }

    #[test]
    fn route_clash_decision() {
        let s = subnet("10.213.0.0/24");
        let default = route("0.0.0.0", 0, "eth0");
        let own = route("10.213.0.0", 24, "nvmm0");
        let mut local = route("10.213.0.1", 32, "lo");
        local.host_only = true;
        let elsewhere = route("192.168.1.0", 24, "eth0");
        let routes = [default, own, local, elsewhere];
        assert_eq!(clashing_route(&s, &routes, "nvmm0"), None);
        // The same route on another device is a clash; so is a wider or narrower one.
        assert!(clashing_route(&s, &routes, "lab").is_some());
        for clash in [
            route("10.0.0.0", 8, "tun0"),
            route("10.213.0.128", 25, "wg0"),
            route("10.213.0.9", 32, "eth1"),
        ] {
            let text = clash.to_string();
            let routes = [clash];
            assert_eq!(
                clashing_route(&s, &routes, "nvmm0").map(|r| r.to_string()),
                Some(text)
            );
        }
        let unnamed = Ipv4Route {
            device: None,
            ..route("10.213.0.0", 16, "x")
        };
        assert_eq!(unnamed.to_string(), "10.213.0.0/16");
    }

    #[test]
    fn default_subnet_choice() {
        let candidates: Vec<_> = default_subnet_candidates().collect();
        assert_eq!(candidates[0], subnet("10.213.0.0/24"));
        assert_eq!(candidates.len(), 48);
        // The ranges `NetError::NoFreeSubnet` names.
        assert_eq!(candidates[15], subnet("10.213.15.0/24"));
        assert_eq!(candidates[16], subnet("172.29.0.0/24"));
        assert_eq!(candidates[31], subnet("172.29.15.0/24"));
        assert_eq!(candidates[32], subnet("192.168.213.0/24"));
        assert_eq!(candidates[47], subnet("192.168.228.0/24"));
        assert!(candidates.contains(&subnet("172.29.0.0/24")));
        assert!(candidates.contains(&subnet("192.168.213.0/24")));

        assert_eq!(pick_default_subnet(&[], "nvmm0", &[]), Some(candidates[0]));
        let routes = [
            route("10.213.0.0", 24, "eth0"),
            route("10.213.1.0", 24, "eth1"),
        ];
        assert_eq!(
            pick_default_subnet(&routes, "nvmm0", &[subnet("10.213.2.0/24")]),
            Some(subnet("10.213.3.0/24"))
        );
        // Our own bridge's route is no obstacle.
        let routes = [route("10.213.0.0", 24, "nvmm0")];
        assert_eq!(
            pick_default_subnet(&routes, "nvmm0", &[]),
            Some(candidates[0])
        );
        // A VPN that routes all of 10/8 and 172.16/12 pushes it to 192.168.
        let routes = [
            route("10.0.0.0", 8, "tun0"),
            route("172.16.0.0", 12, "tun0"),
        ];
        assert_eq!(
            pick_default_subnet(&routes, "nvmm0", &[]),
            Some(subnet("192.168.213.0/24"))
        );
        let routes = [
            route("10.0.0.0", 8, "tun0"),
            route("172.16.0.0", 12, "tun0"),
            route("192.168.0.0", 16, "tun0"),
        ];
        assert_eq!(pick_default_subnet(&routes, "nvmm0", &[]), None);
    }

    #[test]
    fn clash_error_names_route_and_flag() {
        let err = NetError::SubnetClash {
            network: "nvmm0".into(),
            origin: "requested",
            subnet: subnet("10.99.0.0/16"),
            route: route("10.99.0.0", 24, "eth0").to_string(),
        };
        assert_eq!(
            err.to_string(),
            "requested subnet 10.99.0.0/16 of network nvmm0 overlaps the host's route \
             10.99.0.0/24 dev eth0; choose another with --subnet CIDR"
        );
    }

    #[test]
    fn member_records() {
        let record = MemberRecord {
            pid: 42,
            start_time: 1234,
            tap: "nv-web".into(),
        };
        assert_eq!(record.to_text(), "42 1234 nv-web\n");
        assert_eq!(MemberRecord::parse(&record.to_text()), Some(record));
        for bad in ["", "42", "42 1234", "x 1234 nv-web", "42 1234 nv-web extra"] {
            assert_eq!(MemberRecord::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn liveness_is_pid_and_start_time() {
        let pid = std::process::id();
        let start_time = process_start_time(pid).unwrap();
        let me = MemberRecord {
            pid,
            start_time,
            tap: "nv-x".into(),
        };
        assert!(me.is_running());
        // The same pid with another start time is another process: the VM is gone.
        let reused = MemberRecord {
            start_time: start_time + 1,
            ..me.clone()
        };
        assert!(!reused.is_running());
        let child = sleeper();
        let dead = MemberRecord {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap(),
            tap: "nv-x".into(),
        };
        assert!(dead.is_running());
        kill(child);
        assert!(!dead.is_running());
    }

    #[test]
    fn start_time_parsing() {
        let fields: String = (3..=30).map(|n| format!(" {n}")).collect();
        assert_eq!(parse_start_time(&format!("7 (a b) c){fields}")), Some(22));
        assert_eq!(parse_start_time("7 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
        let zombie: String = (4..=30).map(|n| format!(" {n}")).collect();
        assert_eq!(parse_start_time(&format!("7 (x) S{zombie}")), Some(22));
        assert_eq!(parse_start_time(&format!("7 (x) Z{zombie}")), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names("nvmm0", "web-1.example").is_ok());
        for bad in ["", "a b", "a/b", "this-is-too-long-0"] {
            assert!(matches!(
                check_names(bad, "web"),
                Err(NetError::InvalidNetworkName { .. })
            ));
        }
        for bad in ["", ".", "..", "a b", "a/b", "a\nb", "a\0b"] {
            assert!(
                matches!(
                    check_names("nvmm0", bad),
                    Err(NetError::InvalidVmName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn directories_follow_root_env_and_xdg() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            resolve_dirs(0, env(&[("XDG_RUNTIME_DIR", "/run/user/0")])),
            ("/run/nvmm".into(), "/var/lib/nvmm".into())
        );
        assert_eq!(
            resolve_dirs(
                1000,
                env(&[
                    ("XDG_RUNTIME_DIR", "/run/user/1000"),
                    ("XDG_STATE_HOME", "/s")
                ])
            ),
            ("/run/user/1000/nvmm".into(), "/s/nvmm".into())
        );
        assert_eq!(
            resolve_dirs(1000, env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "rel")])),
            ("/tmp/nvmm-1000".into(), "/home/u/.local/state/nvmm".into())
        );
        assert_eq!(
            resolve_dirs(
                0,
                env(&[("NVMM_RUNTIME_DIR", "/r"), ("NVMM_STATE_DIR", "/st")])
            ),
            ("/r".into(), "/st".into())
        );
        assert_eq!(
            resolve_dirs(5, env(&[("NVMM_RUNTIME_DIR", ""), ("XDG_RUNTIME_DIR", "")])),
            ("/tmp/nvmm-5".into(), "/tmp/nvmm-5-state".into())
        );
    }

    #[test]
    fn state_files_are_written_whole() {
        let dirs = Dirs::new("atomic");
        let file = dirs.state().join("net/nvmm0/subnet");
        assert_eq!(read_optional(&file).unwrap(), None);
        write_atomically(&file, "10.213.0.0/24\n", Durability::Flushed).unwrap();
        write_atomically(&file, "10.213.1.0/24\n", Durability::Flushed).unwrap();
        assert_eq!(
            read_saved_subnet(&file).unwrap(),
            Some(subnet("10.213.1.0/24"))
        );
        assert!(!file.with_file_name("subnet (new)").exists());
        write_atomically(&file, "junk\n", Durability::Flushed).unwrap();
        let err = read_saved_subnet(&file).unwrap_err();
        assert!(matches!(err, NetError::SavedSubnet { .. }), "{err}");
    }

    #[test]
    fn permission_errors_are_recognised() {
        let err = NetError::CreateTap {
            tap: "nv-web".into(),
            source: netlink::not_permitted(),
        };
        assert!(err.is_permission_denied());
        assert!(
            error_chain(&err).contains("CAP_NET_ADMIN"),
            "{}",
            error_chain(&err)
        );
        let err = NetError::Netlink(NetlinkError::SetUp {
            name: "nvmm0".into(),
            source: netlink::not_permitted(),
        });
        assert!(err.is_permission_denied());
        assert!(!NetError::NoSuchProcess { pid: 1 }.is_permission_denied());
    }
}
