//! The network scenarios: `net_echo` (ARP, ping and a TCP echo server that
//! runs until the host kills the VM), `net_client` (a checked echo through a
//! server elsewhere), `net_ping` and `net_bench` (timed bulk TCP both ways).
//! README.md lists their exact lines and command-line options.
//!
//! The echo pattern is byte `i` of the stream = `(i * 7 + 3) as u8`, which
//! repeats every 256 bytes: one table of 256 bytes more than the longest
//! piece serves every offset.

use smoltcp::iface::{SocketHandle, SocketStorage};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, Ipv4Address};

use crate::bootinfo::BootInfo;
use crate::io::{outb, rdtsc};
use crate::keyboard::CtrlAltDel;
use crate::net_stack::{Stack, parse_port};
use crate::scenarios::{Outcome, cmdline_value, number_option};
use crate::time::{Deadline, us_since};

/// Socket buffers of the echo server, each way, per connection.
const ECHO_BUFFER: usize = 64 * 1024;
/// Connections the echo server takes at once: more than one, so that a
/// client that connects again at once never finds the port closed while the
/// last connection's socket is still shutting down.
const ECHO_SOCKETS: usize = 2;
/// Bytes moved from a receive buffer to a send buffer per step.
const ECHO_CHUNK: usize = 16 * 1024;
const DEFAULT_ECHO_PORT: u64 = 7;

/// Socket buffers of `net_client` and `net_bench`, each way. Larger than
/// 64 KiB, so that smoltcp offers window scaling.
const STREAM_BUFFER: usize = 256 * 1024;
const DEFAULT_CLIENT_BYTES: u64 = 65536;
const DEFAULT_BENCH_MIB: u64 = 64;

/// How long a transfer may make no progress before the scenario gives up.
const STALL_TIMEOUT_US: u64 = 10_000_000;
/// How long a graceful close may take before the scenario goes on anyway.
const CLOSE_TIMEOUT_US: u64 = 3_000_000;

const PING_COUNT: u16 = 3;
const PING_INTERVAL_US: u64 = 1_000_000;
/// The ICMP identifier of the guest's echo requests.
const PING_IDENT: u16 = 0x6e76;
const PING_PAYLOAD: &[u8] = b"nvmm-test ping payload, 32 bytes";

/// The longest piece of pattern handed out at once.
const PATTERN_PIECE: usize = 4096;
/// Byte `k` is `(k * 7 + 3) as u8`; the pattern from stream offset `i` is
/// the table from `i % 256`.
static PATTERN: [u8; 256 + PATTERN_PIECE] = {
    let mut table = [0; 256 + PATTERN_PIECE];
    let mut k = 0;
    while k < table.len() {
        table[k] = (k * 7 + 3) as u8;
        k += 1;
    }
    table
};

/// The pattern bytes at stream offset `offset`, `len` of them (at most
/// [`PATTERN_PIECE`]).
fn pattern(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % 256) as usize;
    &PATTERN[start..start + len]
}

/// Fills `buf` with the pattern from stream offset `offset`.
fn fill_pattern(buf: &mut [u8], offset: u64) {
    // Pieces are a multiple of 256 long, so each starts at the same phase.
    for piece in buf.chunks_mut(PATTERN_PIECE) {
        piece.copy_from_slice(pattern(offset, piece.len()));
    }
}

/// Where `buf` differs from the pattern from stream offset `offset`, if it does.
fn pattern_mismatch(buf: &[u8], offset: u64) -> Option<u64> {
    for (index, piece) in buf.chunks(PATTERN_PIECE).enumerate() {
        let expected = pattern(offset, piece.len());
        // Slice equality is one `memcmp` (8 bytes per step); only a
        // difference is searched byte by byte.
        if piece != expected {
            let at = piece.iter().zip(expected).position(|(a, b)| a != b);
            let at = (index * PATTERN_PIECE + at.unwrap_or(0)) as u64;
            return Some(offset + at);
        }
    }
    None
}

/// Writes a marker to port 0x80 for the host to time.
fn post(code: u8) {
    // SAFETY: port 0x80 is the POST code port; writing it has no effect on the guest.
    unsafe { outb(0x80, code) };
}

// ---- net_echo ----

/// ARP, ping (smoltcp answers both) and a TCP echo server on `echo_port=N`.
/// Serves until the host kills the VM, or asks it to shut down (Ctrl-Alt-Del).
pub fn net_echo(boot: &BootInfo) -> Outcome {
    let port = match cmdline_value(boot.cmdline, b"echo_port") {
        None => DEFAULT_ECHO_PORT as u16,
        Some(text) => parse_port(text).ok_or("bad-echo-port")?,
    };
    let mut storage = [SocketStorage::EMPTY; ECHO_SOCKETS];
    let mut stack = Stack::bring_up(boot, &mut storage)?;
    let chunk = stack.scratch(ECHO_CHUNK)?;
    let mut servers = [(None, 0u64, false); ECHO_SOCKETS];
    for server in &mut servers {
        let handle = stack.add_tcp(ECHO_BUFFER, ECHO_BUFFER)?;
        stack
            .tcp(handle)
            .listen(port)
            .map_err(|_| "listen-failed")?;
        server.0 = Some(handle);
    }
    say!("net_echo listening port={port}");
    let mut keyboard = CtrlAltDel::new();
    loop {
        if keyboard.pressed() {
            say!("ctrl-alt-del: shutting down");
            return Ok(());
        }
        stack.poll()?;
        for (handle, bytes, connected) in &mut servers {
            let Some(handle) = *handle else { continue };
            echo_step(&mut stack, handle, port, chunk, bytes, connected)?;
        }
    }
}

/// Moves what one echo connection has received to its send buffer, closes
/// it when the client has finished, and listens again once it is over.
fn echo_step(
    stack: &mut Stack,
    handle: SocketHandle,
    port: u16,
    chunk: &mut [u8],
    bytes: &mut u64,
    connected: &mut bool,
) -> Outcome {
    let socket = stack.tcp(handle);
    if !socket.is_open() {
        if *connected {
            say!("net_echo closed bytes={bytes}");
            *connected = false;
            *bytes = 0;
        }
        socket.listen(port).map_err(|_| "listen-failed")?;
        return Ok(());
    }
    if socket.state() == tcp::State::Established {
        *connected = true;
    }
    while socket.can_recv() && socket.can_send() {
        let room = socket.send_capacity() - socket.send_queue();
        let want = room.min(chunk.len());
        let got = socket.recv_slice(&mut chunk[..want]).unwrap_or(0);
        if got == 0 {
            break;
        }
        // There is room for all of it (measured above).
        let sent = socket.send_slice(&chunk[..got]).unwrap_or(0);
        if sent != got {
            return Err("echo-send-short");
        }
        *bytes += got as u64;
    }
    // The client closed its side and everything it sent has been echoed.
    if socket.state() == tcp::State::CloseWait && !socket.can_recv() {
        socket.close();
    }
    Ok(())
}

// ---- net_client ----

/// Connects to `connect=HOST:PORT`, sends `bytes=N` of the pattern while
/// reading the echo, checks every byte, and closes.
pub fn net_client(boot: &BootInfo) -> Outcome {
    let total = number_option(boot, b"bytes", DEFAULT_CLIENT_BYTES, "bad-bytes")?;
    let mut storage = [SocketStorage::EMPTY; 1];
    let mut stack = Stack::bring_up(boot, &mut storage)?;
    let remote = remote_endpoint(boot, &stack)?;
    let handle = stack.add_tcp(STREAM_BUFFER, STREAM_BUFFER)?;
    stack.connect(handle, remote)?;
    say!("net_client connected to={}:{}", remote.0, remote.1);

    let (mut sent, mut received) = (0u64, 0u64);
    let mut stall = Deadline::after_us(STALL_TIMEOUT_US);
    while received < total {
        stack.poll()?;
        let socket = stack.tcp(handle);
        let before = (sent, received);
        if sent < total && socket.can_send() {
            sent += socket
                .send(|buf| {
                    let n = buf.len().min((total - sent) as usize);
                    fill_pattern(&mut buf[..n], sent);
                    (n, n as u64)
                })
                .map_err(|_| "send-failed")?;
        }
        if socket.can_recv() {
            let (got, mismatch) = socket
                .recv(|buf| {
                    let n = buf.len().min((total - received) as usize);
                    (n, (n as u64, pattern_mismatch(&buf[..n], received)))
                })
                .map_err(|_| "connection-closed")?;
            if let Some(at) = mismatch {
                // Everything before the first wrong byte came back right.
                say!("net_client mismatch at={at}");
                say!("net_client echoed bytes={at} fail reason=echo-mismatch");
                return Err("echo-mismatch");
            }
            received += got;
        } else if !socket.may_recv() {
            say!("net_client echoed bytes={received} fail reason=connection-closed");
            return Err("connection-closed");
        }
        if (sent, received) != before {
            stall = Deadline::after_us(STALL_TIMEOUT_US);
        } else if stall.expired() {
            say!("net_client echoed bytes={received} fail reason=echo-timeout");
            return Err("echo-timeout");
        }
    }
    say!("net_client echoed bytes={received} ok");
    stack.close(handle, CLOSE_TIMEOUT_US)?;
    stack.say_stats();
    Ok(())
}

/// `connect=HOST:PORT`, resolved.
fn remote_endpoint(boot: &BootInfo, stack: &Stack) -> Result<(Ipv4Address, u16), &'static str> {
    let text = cmdline_value(boot.cmdline, b"connect").ok_or("no-connect")?;
    stack.config.resolve_endpoint(text)
}

// ---- net_ping ----

/// Sends `PING_COUNT` echo requests to `target=HOST`, a second apart, and
/// reports each reply. Fine if at least one comes back.
pub fn net_ping(boot: &BootInfo) -> Outcome {
    let mut storage = [SocketStorage::EMPTY; 1];
    let mut metadata = [icmp::PacketMetadata::EMPTY; 8];
    let mut stack = Stack::bring_up(boot, &mut storage)?;
    let replies = ping(boot, &mut stack, &mut metadata)?;
    stack.say_stats();
    if replies == 0 {
        return Err("no-reply");
    }
    Ok(())
}

/// The ping of `net_ping` on `stack`, to `target=HOST`: prints a line per
/// reply and `net_ping sent=... received=...`, and returns the replies.
pub fn ping<'s>(
    boot: &BootInfo,
    stack: &mut Stack<'s>,
    metadata: &'s mut [icmp::PacketMetadata],
) -> Result<u32, &'static str> {
    let target = cmdline_value(boot.cmdline, b"target").ok_or("no-target")?;
    let target = stack.config.resolve(target)?;
    let handle = stack.add_icmp(metadata, 1024)?;
    let socket = stack.sockets.get_mut::<icmp::Socket>(handle);
    socket
        .bind(icmp::Endpoint::Ident(PING_IDENT))
        .map_err(|_| "bind-failed")?;
    let checksums = ChecksumCapabilities::default();

    let mut replies = 0u32;
    for seq in 1..=PING_COUNT {
        let socket = stack.sockets.get_mut::<icmp::Socket>(handle);
        let request = Icmpv4Repr::EchoRequest {
            ident: PING_IDENT,
            seq_no: seq,
            data: PING_PAYLOAD,
        };
        let buf = socket
            .send(request.buffer_len(), IpAddress::Ipv4(target))
            .map_err(|_| "ping-send-failed")?;
        request.emit(&mut Icmpv4Packet::new_unchecked(buf), &checksums);

        // Wait for replies until the next request is due (the first one may
        // wait for ARP; smoltcp keeps it queued meanwhile).
        let deadline = Deadline::after_us(PING_INTERVAL_US);
        while !deadline.expired() {
            stack.poll()?;
            let socket = stack.sockets.get_mut::<icmp::Socket>(handle);
            while let Ok((data, from)) = socket.recv() {
                let Ok(packet) = Icmpv4Packet::new_checked(data) else {
                    continue;
                };
                if let Ok(Icmpv4Repr::EchoReply {
                    ident: PING_IDENT,
                    seq_no,
                    ..
                }) = Icmpv4Repr::parse(&packet, &checksums)
                {
                    say!("net_ping reply from={from} seq={seq_no}");
                    replies += 1;
                }
            }
        }
    }
    say!("net_ping sent={PING_COUNT} received={replies}");
    Ok(replies)
}

// ---- net_bench ----

/// Timed bulk TCP to `connect=HOST:PORT`: sends `bench_mib=N` MiB (port 0x80
/// 0x30 .. 0x31, the last when all is acknowledged), then sends `R` and
/// receives N MiB (0x32 .. 0x33).
pub fn net_bench(boot: &BootInfo) -> Outcome {
    let mib = number_option(boot, b"bench_mib", DEFAULT_BENCH_MIB, "bad-bench-mib")?;
    let total = mib.checked_mul(1 << 20).ok_or("bad-bench-mib")?;
    let mut storage = [SocketStorage::EMPTY; 1];
    let mut stack = Stack::bring_up(boot, &mut storage)?;
    let remote = remote_endpoint(boot, &stack)?;
    let handle = stack.add_tcp(STREAM_BUFFER, STREAM_BUFFER)?;
    stack.connect(handle, remote)?;
    say!(
        "net_bench connected to={}:{} bytes={total}",
        remote.0,
        remote.1
    );

    // (a) Send. The bytes are whatever the send buffer held: the host only
    // counts them, and writing them would cost the guest a copy per byte.
    post(0x30);
    let start = rdtsc();
    let mut sent = 0u64;
    let mut stall = Deadline::after_us(STALL_TIMEOUT_US);
    loop {
        stack.poll()?;
        let socket = stack.tcp(handle);
        let queued = socket.send_queue();
        if sent < total && socket.can_send() {
            sent += socket
                .send(|buf| {
                    let n = buf.len().min((total - sent) as usize);
                    (n, n as u64)
                })
                .map_err(|_| "send-failed")?;
        } else if sent == total && queued == 0 {
            break;
        } else if !socket.may_send() {
            return Err("connection-closed");
        }
        if socket.send_queue() != queued {
            stall = Deadline::after_us(STALL_TIMEOUT_US);
        } else if stall.expired() {
            return Err("send-timeout");
        }
    }
    post(0x31);
    say!("net_bench sent bytes={sent} guest_us={}", us_since(start));

    // (b) Receive.
    post(0x32);
    let start = rdtsc();
    stack
        .tcp(handle)
        .send_slice(b"R")
        .map_err(|_| "send-failed")?;
    let mut received = 0u64;
    let mut stall = Deadline::after_us(STALL_TIMEOUT_US);
    while received < total {
        stack.poll()?;
        let socket = stack.tcp(handle);
        if socket.can_recv() {
            received += socket
                .recv(|buf| {
                    let n = buf.len().min((total - received) as usize);
                    (n, n as u64)
                })
                .map_err(|_| "connection-closed")?;
            stall = Deadline::after_us(STALL_TIMEOUT_US);
        } else if !socket.may_recv() {
            return Err("connection-closed");
        } else if stall.expired() {
            return Err("receive-timeout");
        }
    }
    post(0x33);
    say!(
        "net_bench received bytes={received} guest_us={}",
        us_since(start)
    );
    stack.close(handle, CLOSE_TIMEOUT_US)?;
    stack.say_stats();
    Ok(())
}
