//! Tests of `host.rs` against the real kernel, each in a private network namespace made by the
//! test itself (root only; skipped with a message elsewhere): nothing they create is visible on
//! the host, everything disappears with the namespace, and the tests can run in parallel.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::tests::{Dirs, ip, kill, sleeper, subnet};
use super::*;

/// Runs `body` on a thread of its own in a new, private network namespace: nothing it does
/// is visible on the host, the namespace (and every interface in it) disappears with the
/// thread, and tests stay independent. Skips, saying so, where namespaces cannot be made.
fn in_netns(test: &str, body: impl FnOnce() + Send + 'static) {
    let test = test.to_owned();
    let result = std::thread::spawn(move || {
        if let Err(e) = unshare_netns() {
            let _ = writeln!(
                io::stderr(),
                "SKIPPED {test}: cannot create a network namespace ({e}); needs root"
            );
            return;
        }
        body();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Moves the calling thread (only) into a new network namespace.
fn unshare_netns() -> io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET changes this thread's namespace and
    // nothing in this process's memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens an existing tap exactly as the VMM does.
fn open_tap(name: &str) -> io::Result<nvmm_vmm::devices::Tap> {
    nvmm_vmm::devices::Tap::open(name)
}

fn link(name: &str) -> Option<Link> {
    Netlink::open().unwrap().link_by_name(name).unwrap()
}

/// An interface with `addr/prefix`, up: a host route to clash with. A veth pair, as this
/// kernel may lack the dummy driver; the route exists without a carrier.
fn uplink_with_route(name: &str, addr: &str, prefix_len: u8) {
    let mut nl = Netlink::open().unwrap();
    nl.create_veth(name, &format!("{name}-p")).unwrap();
    nl.add_ipv4_address(name, ip(addr), prefix_len).unwrap();
    nl.set_up(name).unwrap();
}

#[test]
fn join_creates_bridge_and_tap_and_leave_removes_them() {
    in_netns("join_creates_bridge_and_tap_and_leave_removes_them", || {
        let dirs = Dirs::new("join");
        let (net, m) = dirs.join_default("web");
        assert_eq!(net.name, "nvmm0");
        assert_eq!(net.bridge, "nvmm0");
        assert_eq!(net.subnet, subnet("10.213.0.0/24"), "the first default");
        assert_eq!(net.host_addr, ip("10.213.0.1"));
        assert_eq!(m.tap, "nv-web");
        assert_eq!(m.address, ip("10.213.0.2"));
        assert_eq!(m.prefix_len, 24);
        assert_eq!(m.gateway, ip("10.213.0.1"));
        assert_eq!(m.mac, mac_address("nvmm0", "web"));
        assert_eq!(m.hosts, vec![("web".to_owned(), ip("10.213.0.2"))]);

        let mut nl = Netlink::open().unwrap();
        let bridge = nl.link_by_name("nvmm0").unwrap().expect("bridge");
        assert_eq!(bridge.kind.as_deref(), Some("bridge"));
        assert!(bridge.up);
        let tap = nl.link_by_name("nv-web").unwrap().expect("tap");
        assert_eq!(tap.kind.as_deref(), Some("tun"));
        assert_eq!(tap.controller, Some(bridge.index));
        assert!(tap.up);
        let addresses = nl.ipv4_addresses().unwrap();
        assert!(
            addresses.iter().any(|a| a.index == bridge.index
                && a.address == ip("10.213.0.1")
                && a.prefix_len == 24),
            "{addresses:?}"
        );
        // The VMM can open the tap by name, with its flags, and closing it keeps the tap.
        open_tap("nv-web").unwrap();
        assert!(link("nv-web").is_some());

        let member = fs::read_to_string(dirs.member_file("nvmm0", "web")).unwrap();
        assert!(
            member.starts_with(&format!("{} ", std::process::id())),
            "{member}"
        );
        let state = dirs.state().join("net/nvmm0");
        assert_eq!(
            fs::read_to_string(state.join("subnet")).unwrap(),
            "10.213.0.0/24\n"
        );
        assert_eq!(
            fs::read_to_string(state.join("addresses")).unwrap(),
            "web 10.213.0.2\n"
        );

        m.leave().unwrap();
        assert_eq!(link("nv-web"), None);
        assert_eq!(link("nvmm0"), None);
        assert!(!dirs.member_file("nvmm0", "web").exists());
        assert!(state.join("addresses").exists(), "addresses outlive the VM");
    });
}

#[test]
fn two_vms_share_the_bridge_with_distinct_addresses() {
    in_netns("two_vms_share_the_bridge_with_distinct_addresses", || {
        let dirs = Dirs::new("two");
        let (net_a, a) = dirs.join_default("a");
        let (net_b, b) = dirs.join_default("b");
        assert_eq!(net_a, net_b);
        assert_ne!(a.address, b.address);
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.tap, b.tap);
        assert_eq!(
            b.hosts,
            vec![("a".to_owned(), a.address), ("b".to_owned(), b.address)]
        );
        let bridge = link("nvmm0").unwrap();
        for tap in [&a.tap, &b.tap] {
            assert_eq!(link(tap).unwrap().controller, Some(bridge.index), "{tap}");
        }

        let err = dirs.join(&NetworkConfig::default(), "a").unwrap_err();
        assert!(matches!(err, NetError::VmAlreadyRunning { .. }), "{err}");
        let err = dirs
            .join(
                &NetworkConfig {
                    subnet: Some(subnet("10.50.0.0/24")),
                    ..NetworkConfig::default()
                },
                "c",
            )
            .unwrap_err();
        assert!(matches!(err, NetError::SubnetInUse { .. }), "{err}");

        let (a_address, b_address) = (a.address, b.address);
        a.leave().unwrap();
        assert_eq!(link("nv-a"), None);
        assert!(link("nvmm0").is_some(), "b still uses the bridge");
        assert!(link("nv-b").is_some());
        drop(b); // the Drop path leaves too
        assert_eq!(link("nv-b"), None);
        assert_eq!(link("nvmm0"), None);

        // Addresses are stable across boots, whatever the order.
        let (_, b) = dirs.join_default("b");
        let (_, a) = dirs.join_default("a");
        assert_eq!((a.address, b.address), (a_address, b_address));
        a.leave().unwrap();
        b.leave().unwrap();
    });
}

#[test]
fn concurrent_joins_are_serialized() {
    in_netns("concurrent_joins_are_serialized", || {
        let dirs = std::sync::Arc::new(Dirs::new("race"));
        // Threads start in this thread's namespace.
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let dirs = dirs.clone();
                std::thread::spawn(move || dirs.join_default(&format!("vm{i}")).1)
            })
            .collect();
        let members: Vec<Membership> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let mut addresses: Vec<_> = members.iter().map(|m| m.address).collect();
        addresses.sort();
        addresses.dedup();
        assert_eq!(addresses.len(), 4);
        for m in members {
            m.leave().unwrap();
        }
        assert_eq!(link("nvmm0"), None);
    });
}

#[test]
fn stale_members_are_reaped_with_their_taps() {
    in_netns("stale_members_are_reaped_with_their_taps", || {
        let dirs = Dirs::new("stale");
        let config = NetworkConfig::default();
        let owner = sleeper();
        let (_, old) =
            Network::join(&config, &dirs.runtime(), &dirs.state(), "old", owner.id()).unwrap();
        // The VM dies without leaving: SIGKILL runs no destructor.
        std::mem::forget(old);
        kill(owner);
        assert!(
            link("nv-old").is_some(),
            "a persistent tap outlives its process"
        );

        let (_, new) = dirs.join_default("new");
        assert_eq!(link("nv-old"), None, "reaped on the next join");
        assert!(!dirs.member_file("nvmm0", "old").exists());
        new.leave().unwrap();
        assert_eq!(link("nvmm0"), None);

        // Only a dead VM left: `reap_stale` removes its tap and the bridge.
        let owner = sleeper();
        let (_, old) =
            Network::join(&config, &dirs.runtime(), &dirs.state(), "old", owner.id()).unwrap();
        std::mem::forget(old);
        kill(owner);
        assert_eq!(reap_stale(&dirs.runtime()).unwrap(), 1);
        assert_eq!(link("nv-old"), None);
        assert_eq!(link("nvmm0"), None);
        assert!(!dirs.member_file("nvmm0", "old").exists());
        assert_eq!(reap_stale(&dirs.runtime()).unwrap(), 0);

        // A leftover bridge with no member file at all goes at the next join too.
        Netlink::open()
            .unwrap()
            .create_bridge("nvmm0", bridge_mac("nvmm0"))
            .unwrap();
        let (_, m) = dirs.join_default("web");
        m.leave().unwrap();
        assert_eq!(link("nvmm0"), None);
    });
}

#[test]
fn reaping_keeps_running_vms() {
    in_netns("reaping_keeps_running_vms", || {
        let dirs = Dirs::new("reap-live");
        let (_, m) = dirs.join_default("web");
        assert_eq!(reap_stale(&dirs.runtime()).unwrap(), 0);
        assert!(link("nv-web").is_some());
        assert!(link("nvmm0").is_some());
        m.leave().unwrap();
        assert_eq!(reap_stale(&Dirs::new("empty").runtime()).unwrap(), 0);
    });
}

#[test]
fn a_subnet_that_clashes_with_a_route_is_refused_by_name() {
    in_netns(
        "a_subnet_that_clashes_with_a_route_is_refused_by_name",
        || {
            let dirs = Dirs::new("clash");
            uplink_with_route("uplink0", "10.99.0.1", 24);
            let config = NetworkConfig {
                subnet: Some(subnet("10.99.0.0/16")),
                ..NetworkConfig::default()
            };
            let err = dirs.join(&config, "web").unwrap_err();
            assert!(matches!(err, NetError::SubnetClash { .. }), "{err}");
            let message = err.to_string();
            for part in ["10.99.0.0/16", "10.99.0.0/24 dev uplink0", "--subnet"] {
                assert!(message.contains(part), "{part:?} in {message}");
            }
            assert_eq!(link("nvmm0"), None, "nothing is created");
            assert!(!dirs.state().join("net/nvmm0/subnet").exists());

            // The default avoids it, and a route of the first candidate too.
            uplink_with_route("uplink1", "10.213.0.1", 24);
            let (net, m) = dirs.join_default("web");
            assert_eq!(net.subnet, subnet("10.213.1.0/24"));
            m.leave().unwrap();

            // A saved subnet that later clashes says so.
            uplink_with_route("vpn0", "10.213.1.77", 28);
            let err = dirs.join(&NetworkConfig::default(), "web").unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with("saved subnet 10.213.1.0/24"),
                "{message}"
            );
            assert!(message.contains("10.213.1.64/28 dev vpn0"), "{message}");
        },
    );
}

#[test]
fn networks_get_distinct_default_subnets() {
    in_netns("networks_get_distinct_default_subnets", || {
        let dirs = Dirs::new("two-nets");
        let (one, a) = dirs.join_default("a");
        a.leave().unwrap();
        // nvmm0 is down but keeps its subnet: another network must not take it.
        let lab = NetworkConfig {
            name: "lab".into(),
            subnet: None,
        };
        let (two, b) = dirs.join(&lab, "a").unwrap();
        assert!(
            !one.subnet.overlaps(&two.subnet),
            "{} {}",
            one.subnet,
            two.subnet
        );
        assert_eq!(two.bridge, "lab");
        assert_ne!(b.tap, "nv-a", "tap names are unique per network");
        assert!(link(&b.tap).is_some());
        // Both can run at once.
        let (again, a) = dirs.join_default("a");
        assert_eq!(again.subnet, one.subnet);
        a.leave().unwrap();
        b.leave().unwrap();
    });
}

#[test]
fn a_taken_tap_name_is_an_error_and_leaves_nothing() {
    in_netns("a_taken_tap_name_is_an_error_and_leaves_nothing", || {
        let dirs = Dirs::new("taken");
        Netlink::open()
            .unwrap()
            .create_veth("nv-web", "nv-web-p")
            .unwrap();
        let err = dirs.join(&NetworkConfig::default(), "web").unwrap_err();
        assert!(matches!(err, NetError::TapExists { .. }), "{err}");
        assert_eq!(link("nvmm0"), None, "the new bridge is removed again");
        assert_eq!(link("nv-web").unwrap().kind.as_deref(), Some("veth"));
        assert!(!dirs.member_file("nvmm0", "web").exists());
    });
}

/// Drops CAP_NET_ADMIN from this thread's effective set (capabilities are per thread, so
/// the rest of the test process keeps it).
fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` (version 3) into `data`, which has room for them.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads the header and two `Data`; pid 0 is this thread only.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    in_netns("without_cap_net_admin_the_error_says_so", || {
        let dirs = Dirs::new("eperm");
        drop_net_admin();
        let err = dirs.join(&NetworkConfig::default(), "web").unwrap_err();
        assert!(err.is_permission_denied(), "{err:?}");
        let message = error_chain(&err);
        assert!(
            message.starts_with("cannot create bridge nvmm0: "),
            "{message}"
        );
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
        assert_eq!(link("nvmm0"), None);
    });
}

#[test]
fn the_host_reaches_a_guest_through_the_bridge() {
    in_netns("the_host_reaches_a_guest_through_the_bridge", || {
        let dirs = Dirs::new("ping");
        let (net, m) = dirs.join_default("vm");
        let mut nl = Netlink::open().unwrap();
        // A veth pair stands in for a guest: one end in the bridge, the other in a second
        // private namespace with an address from the subnet.
        nl.create_veth("veth-host", "veth-guest").unwrap();
        nl.attach_up("veth-host", &net.bridge).unwrap();
        let (mut guest_nl, guest_ns) = std::thread::spawn(|| {
            unshare_netns().unwrap();
            // Both keep the namespace alive after this thread ends.
            (
                Netlink::open().unwrap(),
                File::open("/proc/thread-self/ns/net").unwrap(),
            )
        })
        .join()
        .unwrap();
        nl.move_to_netns("veth-guest", guest_ns.as_raw_fd())
            .unwrap();
        assert_eq!(nl.link_by_name("veth-guest").unwrap(), None);
        let guest = net.subnet.nth(200).unwrap();
        guest_nl
            .add_ipv4_address("veth-guest", guest, net.subnet.prefix_len())
            .unwrap();
        guest_nl.set_up("veth-guest").unwrap();

        assert!(ping(guest), "no echo reply from {guest}");
        m.leave().unwrap();
        nl.delete_link("veth-host").unwrap();
    });
}

/// Sends ICMP echo requests to `to` from this thread's namespace (a raw socket: ping
/// sockets are off in a new namespace) and waits up to ~3 s for a reply.
fn ping(to: Ipv4Addr) -> bool {
    // SAFETY: socket takes no pointers; the fd is checked and then owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given size from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let id: u16 = 0x6e76; // "nv"
    for seq in 0..15u16 {
        let mut packet = [0u8; 16];
        packet[0] = 8; // echo request
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        packet[8..].copy_from_slice(b"nvmmping");
        let checksum = icmp_checksum(&packet);
        packet[2..4].copy_from_slice(&checksum.to_be_bytes());
        // SAFETY: the buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            packet.len() as isize,
            "{}",
            io::Error::last_os_error()
        );
        let mut buf = [0u8; 1500];
        // SAFETY: the buffer is valid for its length; recv writes at most that much.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else {
            continue; // timed out: try again
        };
        // A raw socket gets the IP header first.
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        let source = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        let icmp = &buf[ihl.min(n)..n];
        if source == to && icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
            return true;
        }
    }
    false
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Forks; the child runs `body` and exits at once (no destructors, no atexit handlers: as a
/// VM's process that ends without unwinding). Returns once the child is gone.
fn in_forked_child(body: impl FnOnce()) {
    // SAFETY: the child runs only `body` (file and netlink calls of this module, no locks
    // another thread could hold: the test's own thread is the only one that uses them) and
    // then _exit; the parent only waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        body();
        // SAFETY: ends the child without running the parent's destructors twice.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child this function forked; status is a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
}

#[test]
fn several_vms_join_at_once_and_their_processes_take_over() {
    in_netns(
        "several_vms_join_at_once_and_their_processes_take_over",
        || {
            let dirs = Dirs::new("join-all");
            let (net, mut members) = dirs.join_all(&["a", "b", "c"]).unwrap();
            assert_eq!(net.bridge, "nvmm0");
            let mut addresses: Vec<_> = members.iter().map(|m| m.address).collect();
            addresses.dedup();
            assert_eq!(addresses.len(), 3);
            for m in &members {
                assert!(link(&m.tap).is_some(), "{} has its tap", m.vm_name);
                let hosts: Vec<&str> = m.hosts.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(hosts, ["a", "b", "c"], "each sees all three");
            }

            // A forked process's copies are not its own: dropping them leaves nothing.
            in_forked_child(|| drop(std::mem::take(&mut members)));
            assert!(members.iter().all(|m| link(&m.tap).is_some()));

            // "a"'s process adopts it, then dies without leaving: its record names that
            // process, so the next join reaps "a" while "b" and "c" (still this process's)
            // stay.
            let a = members.remove(0);
            in_forked_child(|| {
                let mut a = a;
                a.adopt().unwrap();
                std::mem::forget(a);
            });
            let (_, d) = dirs.join_default("d");
            assert_eq!(link("nv-a"), None, "reaped: its adopter is gone");
            assert!(!dirs.member_file("nvmm0", "a").exists());
            assert!(link("nv-b").is_some() && link("nv-c").is_some());
            d.leave().unwrap();
            drop(members);
            assert_eq!(link("nvmm0"), None, "the last one out takes the bridge");
        },
    );
}

#[test]
fn a_failed_join_of_several_undoes_all_of_it() {
    in_netns("a_failed_join_of_several_undoes_all_of_it", || {
        let dirs = Dirs::new("join-all-fail");
        Netlink::open()
            .unwrap()
            .create_veth("nv-b", "nv-b-p")
            .unwrap();
        let err = dirs.join_all(&["a", "b"]).unwrap_err();
        assert!(matches!(err, NetError::TapExists { .. }), "{err}");
        assert_eq!(link("nv-a"), None, "a's tap is removed again");
        assert!(!dirs.member_file("nvmm0", "a").exists());
        assert_eq!(link("nvmm0"), None);
    });
}

#[test]
fn a_link_is_looked_up_by_name_as_the_full_list_has_it() {
    in_netns(
        "a_link_is_looked_up_by_name_as_the_full_list_has_it",
        || {
            let mut nl = Netlink::open().unwrap();
            nl.create_veth("look-a", "look-b").unwrap();
            nl.set_up("look-a").unwrap();
            let listed = nl.links().unwrap();
            for name in ["lo", "look-a", "look-b"] {
                let found = nl.link_by_name(name).unwrap();
                assert_eq!(
                    found.as_ref(),
                    listed.iter().find(|l| l.name == name),
                    "{name}"
                );
            }
            assert_eq!(nl.link_by_name("look-c").unwrap(), None);
            // Longer than any interface name may be: the kernel would refuse the request.
            assert_eq!(nl.link_by_name("a-name-too-long-for-linux").unwrap(), None);
            assert_eq!(nl.link_by_name("").unwrap(), None);
        },
    );
}
