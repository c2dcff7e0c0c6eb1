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
    let mut child = ns
        .command(NVMM)
        .args([
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
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
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
    let out = wait_with_guard(child);
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}
