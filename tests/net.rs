//! virtio-net end to end: the test guest (smoltcp on nvmm's virtio-net) on a tap inside a
//! network namespace the test made.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod netns;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use netns::Netns;

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";

/// A namespace with a persistent tap `tap0` at 10.77.0.1/24.
fn namespace_with_tap(test: &str) -> Option<Netns> {
    if !kvm_or_skip(test) {
        return None;
    }
    let ns = Netns::new(test)?;
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    Some(ns)
}

fn connect_with_retry(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            Ok(stream) => return stream,
            Err(err) if Instant::now() > deadline => panic!("cannot connect to {addr}: {err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn echo_bytes(stream: TcpStream, payload: Vec<u8>) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    (&stream).read_to_end(&mut echoed).unwrap();
    sender.join().unwrap();
    echoed
}

#[test]
fn host_and_guest_talk_tcp_and_icmp_over_a_tap() {
    let Some(ns) = namespace_with_tap("net tap") else {
        return;
    };
    let mut cmd = ns.command(NVMM);
    cmd.args([
        "run",
        "--kernel",
        GUEST,
        "--mem",
        "64",
        "--tap",
        "tap0,mac=52:54:00:12:34:56",
    ])
    .args([
        "--cmdline",
        &format!("nvmm_test=net_echo nvmm_ip={GUEST_IP}/24 nvmm_gw={HOST_IP} echo_port=7"),
    ]);
    let (mut child, mut stdout) = spawn_reading_stdout(cmd);
    let boot = read_until(&mut stdout, "net_echo listening port=7");
    assert!(boot.contains("mac=52:54:00:12:34:56"), "{boot}");

    let ping = ns
        .command("ping")
        .args(["-c", "3", "-W", "5", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let payload: Vec<u8> = (0..(1u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = payload.clone();
    let echoed = ns.run(move || echo_bytes(connect_with_retry(&format!("{GUEST_IP}:7")), payload));
    assert_eq!(echoed.len(), expected.len());
    assert!(echoed == expected, "echo differs");

    child.kill().unwrap();
    child.stdout = Some(stdout);
    let out = wait_with_guard(child);
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

/// Private state directories, so tests never touch /run/nvmm or /var/lib/nvmm.
struct StateDirs(std::path::PathBuf);

impl StateDirs {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("nvmm-net-{}-{n}", std::process::id())))
    }

    fn apply(&self, cmd: &mut std::process::Command) {
        cmd.env("NVMM_RUNTIME_DIR", self.0.join("run"))
            .env("NVMM_STATE_DIR", self.0.join("state"));
    }

    /// Member records of running VMs.
    fn members(&self) -> Vec<String> {
        std::fs::read_dir(self.0.join("run/net/nvmm0/members"))
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for StateDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The number after `name=` in the guest's `net dev=N rx_frames=...` line.
fn stat(stdout: &str, name: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|line| line.contains("rx_frames="))
        .unwrap_or_else(|| panic!("no statistics line in {stdout}"));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// Starts `nvmm run --net --name NAME` inside `ns` with the guest scenario `cmdline`.
fn start_on_network(
    ns: &Netns,
    dirs: &StateDirs,
    name: &str,
    cmdline: &str,
    extra: &[&str],
) -> std::process::Child {
    let mut cmd = ns.command(NVMM);
    cmd.args([
        "run",
        "--kernel",
        GUEST,
        "--mem",
        "64",
        "--net",
        "--name",
        name,
        "--cmdline",
        cmdline,
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    dirs.apply(&mut cmd);
    cmd.spawn().unwrap()
}

/// Reads nvmm's "NAME is ADDR/PREFIX on BRIDGE ..." and "forwarding A -> B" lines.
fn network_lines(stderr: &mut impl Read, forwards: usize) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut buf = [0u8; 1];
    let deadline = Instant::now() + HANG_GUARD;
    while text.matches('\n').count() < 1 + forwards {
        assert!(Instant::now() < deadline, "no network lines: {text}");
        assert_eq!(stderr.read(&mut buf).unwrap(), 1, "stderr closed: {text}");
        text.push(buf[0] as char);
    }
    let mut lines = text.lines();
    let first = lines.next().unwrap();
    let address = first
        .split(" is ")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let forwarded = lines
        .map(|l| {
            l.split("forwarding ")
                .nth(1)
                .unwrap()
                .split(" -> ")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    (address, forwarded)
}

#[test]
fn the_host_reaches_a_guest_by_ip_and_through_a_forwarded_port() {
    if !kvm_or_skip("net forward") {
        return;
    }
    let Some(ns) = Netns::new("net forward") else {
        return;
    };
    let dirs = StateDirs::new();
    let mut child = start_on_network(
        &ns,
        &dirs,
        "echo",
        "nvmm_test=net_echo echo_port=7",
        &["--forward", "0:7"],
    );
    let (address, forwarded) = network_lines(child.stderr.as_mut().unwrap(), 1);
    let mut stdout = child.stdout.take().unwrap();
    read_until(&mut stdout, "net_echo listening port=7");
    assert!(
        ns.links().iter().any(|l| l == "nvmm0"),
        "bridge exists: {:?}",
        ns.links()
    );

    let record = std::fs::read_to_string(dirs.0.join("run/vms/echo/vm.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    let forwards = record["network"]["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), 2, "{record}");
    assert!(
        forwards[0]["host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
            && forwards[0]["guest"] == 22,
        "ssh first: {record}"
    );
    assert_eq!(forwards[1]["host"], forwarded[0].as_str(), "{record}");
    assert_eq!(forwards[1]["guest"], 7, "{record}");
    assert_eq!(record["network"]["address"], address.as_str(), "{record}");

    let ping = ns
        .command("ping")
        .args(["-c", "2", "-W", "5", &address])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping {address}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let payload: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let expected = payload.clone();
    let target = forwarded[0].clone();
    let echoed = ns.run(move || echo_bytes(connect_with_retry(&target), payload));
    assert!(
        echoed == expected,
        "echo through the forwarded port differs"
    );

    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.stdout = Some(stdout);
    let out = wait_with_guard(child);
    assert_eq!(out.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert_eq!(ns.links(), vec!["lo".to_owned()], "tap and bridge are gone");
    assert!(
        dirs.members().is_empty(),
        "no member left: {:?}",
        dirs.members()
    );
    assert!(
        !dirs.0.join("run/vms/echo").exists(),
        "forward record removed"
    );
}

#[test]
fn a_forward_to_a_port_in_use_is_a_clear_error_and_leaves_nothing() {
    if !kvm_or_skip("net port in use") {
        return;
    }
    let Some(ns) = Netns::new("net port in use") else {
        return;
    };
    let dirs = StateDirs::new();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let path = format!("/var/run/netns/{}", ns.name);
    let holder = std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: setns only changes this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        port_tx.send(listener.local_addr().unwrap().port()).unwrap();
        let _ = done_rx.recv();
    });
    let port = port_rx.recv().unwrap();
    let forward = format!("{port}:80");
    let child = start_on_network(
        &ns,
        &dirs,
        "busy",
        "nvmm_test=hello",
        &["--forward", &forward],
    );
    let out = wait_with_guard(child);
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains(&format!("127.0.0.1:{port}")), "{out:?}");
    assert!(
        out.stderr.contains("hint: pick another host port"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(ns.links(), vec!["lo".to_owned()], "no tap, no bridge left");
    assert!(dirs.members().is_empty(), "{:?}", dirs.members());
}

#[test]
fn guests_reach_each_other_by_address_and_by_name() {
    if !kvm_or_skip("net guest to guest") {
        return;
    }
    let Some(ns) = Netns::new("net guest to guest") else {
        return;
    };
    let dirs = StateDirs::new();
    let mut server = start_on_network(&ns, &dirs, "beta", "nvmm_test=net_echo echo_port=7", &[]);
    let (beta, _) = network_lines(server.stderr.as_mut().unwrap(), 0);
    read_until(server.stdout.as_mut().unwrap(), "net_echo listening port=7");

    // The first client sends large TCP frames (segmentation offload), which the host cuts up for
    // beta, whose echo comes back the same way; the second sends plain frames only.
    for (target, tso) in [(format!("{beta}:7"), true), ("beta:7".to_owned(), false)] {
        let client = start_on_network(
            &ns,
            &dirs,
            "alpha",
            &format!(
                "nvmm_test=net_client connect={target} bytes=200000 virtio_net_tso={}",
                u8::from(tso)
            ),
            &[],
        );
        let out = wait_with_guard(client);
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert!(
            out.stdout
                .contains(&format!("net_client connected to={beta}:7")),
            "{out:?}"
        );
        assert!(
            out.stdout.contains("net_client echoed bytes=200000 ok"),
            "{out:?}"
        );
        assert!(
            out.stdout.contains(&format!("tso={}", u8::from(tso))),
            "{out:?}"
        );
        let large_frames = stat(&out.stdout, "tso_frames");
        assert_eq!(large_frames > 0, tso, "{out:?}");
    }
    server.kill().unwrap();
    let _ = server.wait();
}

#[test]
fn a_killed_vm_is_cleaned_up_by_the_next_start() {
    if !kvm_or_skip("net sigkill") {
        return;
    }
    let Some(ns) = Netns::new("net sigkill") else {
        return;
    };
    let dirs = StateDirs::new();
    let mut first = start_on_network(&ns, &dirs, "gone", "nvmm_test=halt", &[]);
    read_until(first.stdout.as_mut().unwrap(), "halting");
    first.kill().unwrap();
    let _ = first.wait();
    assert!(
        ns.links().iter().any(|l| l.starts_with("nv-gone")),
        "the SIGKILLed VM left its tap"
    );

    let second = start_on_network(&ns, &dirs, "next", "nvmm_test=hello", &[]);
    let out = wait_with_guard(second);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(
        ns.links(),
        vec!["lo".to_owned()],
        "stale tap, new tap and bridge are gone"
    );
    assert!(dirs.members().is_empty(), "{:?}", dirs.members());
}
