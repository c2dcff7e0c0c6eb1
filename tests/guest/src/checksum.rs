//! TCP checksums of whole Ethernet frames, computed by the guest in the
//! driver instead of in smoltcp.
//!
//! Receive checksum offload is refused and transmit checksum offload is used
//! only for the large frames of segmentation offload ([`seed_tcp_partial`],
//! see `tso.rs`): every other checksum is computed in software. This module
//! does the TCP ones (smoltcp is told to skip them) because of cost: smoltcp
//! sums 16-bit words one at a time, about three instructions per two bytes,
//! and kvm-pvm emulates every instruction of this guest at CPL 0 (about
//! 0.5 us each), so a full-size segment cost over a millisecond to sum. Here
//! the sum takes 64-bit words with add-with-carry, seven instructions per 32
//! bytes. The IPv4 header and ICMP checksums, which cover a few bytes, stay
//! with smoltcp (but a large frame's IPv4 header, [`fill_ipv4_header`]).

use core::arch::asm;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERNET_HEADER: usize = 14;
const IP_PROTOCOL_TCP: u8 = 6;
/// Offset of the checksum in the IPv4 header.
const IPV4_CHECKSUM: usize = 10;
/// Offset of the checksum in the TCP header.
const TCP_CHECKSUM: usize = 16;
const TCP_HEADER_MIN: usize = 20;

/// Where a frame's TCP segment is: its bounds in the frame and the bytes of
/// the pseudo-header sum (addresses, protocol, length).
pub struct TcpSegment {
    pub start: usize,
    pub end: usize,
    pseudo_sum: u64,
}

/// Finds the TCP segment of an unfragmented IPv4 frame; `None` for anything
/// else (including frames too short for what their headers claim, which
/// smoltcp then drops itself).
pub fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETHERNET_HEADER..)?;
    let version_ihl = *ip.first()?;
    let header_len = usize::from(version_ihl & 0xf) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 || ip.len() < header_len {
        return None;
    }
    // A fragment's checksum covers the whole datagram: not checkable here
    // (smoltcp, built without reassembly, drops fragments anyway).
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ip[9] != IP_PROTOCOL_TCP || fragment != 0 {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total_len > ip.len() || total_len < header_len + TCP_HEADER_MIN {
        return None;
    }
    let tcp_len = (total_len - header_len) as u16;
    // Source and destination addresses, then zero, protocol, TCP length: as
    // 16-bit big-endian words, summed here as little-endian ones (see `sum`).
    let addresses = u64::from(u32::from_le_bytes([ip[12], ip[13], ip[14], ip[15]]))
        + u64::from(u32::from_le_bytes([ip[16], ip[17], ip[18], ip[19]]));
    let [len_high, len_low] = tcp_len.to_be_bytes();
    let rest = u64::from(u32::from_le_bytes([0, IP_PROTOCOL_TCP, len_high, len_low]));
    let start = ETHERNET_HEADER + header_len;
    Some(TcpSegment {
        start,
        end: ETHERNET_HEADER + total_len,
        pseudo_sum: addresses + rest,
    })
}

/// Fills in the TCP checksum of an outgoing frame, if it is IPv4 TCP.
pub fn fill_tcp(frame: &mut [u8]) {
    let Some(segment) = tcp_segment(frame) else {
        return;
    };
    let field = segment.start + TCP_CHECKSUM;
    frame[field..field + 2].copy_from_slice(&[0, 0]);
    let sum = fold(add(
        segment.pseudo_sum,
        sum(&frame[segment.start..segment.end]),
    ));
    // The sum is of little-endian words: its complement, stored
    // little-endian, is the big-endian checksum (RFC 1071, 2(B)).
    frame[field..field + 2].copy_from_slice(&(!sum).to_le_bytes());
}

/// Fills in the IPv4 header checksum of a frame (IPv4, as [`fill_tcp`]
/// finds it; anything else is left alone).
pub fn fill_ipv4_header(frame: &mut [u8]) {
    let Some(segment) = tcp_segment(frame) else {
        return;
    };
    let header = ETHERNET_HEADER..segment.start;
    let field = ETHERNET_HEADER + IPV4_CHECKSUM;
    frame[field..field + 2].copy_from_slice(&[0, 0]);
    let sum = fold(sum(&frame[header]));
    frame[field..field + 2].copy_from_slice(&(!sum).to_le_bytes());
}

/// Puts the pseudo-header sum (not its complement) in a TCP frame's
/// checksum field, for a device that finishes the checksum: the
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM` convention, as Linux's `tcp_v4_send_check`.
pub fn seed_tcp_partial(frame: &mut [u8]) {
    let Some(segment) = tcp_segment(frame) else {
        return;
    };
    let field = segment.start + TCP_CHECKSUM;
    frame[field..field + 2].copy_from_slice(&fold(segment.pseudo_sum).to_le_bytes());
}

/// Whether an incoming frame's TCP checksum is right (true for anything that
/// is not IPv4 TCP).
pub fn tcp_ok(frame: &[u8]) -> bool {
    match tcp_segment(frame) {
        None => true,
        Some(segment) => {
            let sum = add(segment.pseudo_sum, sum(&frame[segment.start..segment.end]));
            fold(sum) == 0xffff
        }
    }
}

/// Ones' complement addition of two partial sums.
fn add(a: u64, b: u64) -> u64 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u64::from(carry)
}

/// Folds a 64-bit partial sum to 16 bits, carries added back in.
fn fold(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The ones' complement sum of `data` as 16-bit little-endian words (the
/// last odd byte padded with zero), as a 64-bit partial sum. Any word size
/// gives the same folded result, so the bulk goes 8 bytes at a time.
fn sum(data: &[u8]) -> u64 {
    const BLOCK: usize = 32;
    let blocks = data.len() / BLOCK;
    let mut total: u64 = 0;
    if blocks > 0 {
        // SAFETY: reads exactly `blocks * 32` bytes from the start of `data`
        // (unaligned 8-byte loads are fine on x86); only registers and flags
        // change. `lea` and `dec` leave the carry flag alone, so one carry
        // chain runs through the whole loop, closed by the final `adc`.
        unsafe {
            asm!(
                "clc",
                "2:",
                "adc {total}, qword ptr [{ptr}]",
                "adc {total}, qword ptr [{ptr} + 8]",
                "adc {total}, qword ptr [{ptr} + 16]",
                "adc {total}, qword ptr [{ptr} + 24]",
                "lea {ptr}, [{ptr} + 32]",
                "dec {count}",
                "jnz 2b",
                "adc {total}, 0",
                total = inout(reg) total,
                ptr = inout(reg) data.as_ptr() => _,
                count = inout(reg) blocks => _,
                options(nostack, readonly)
            );
        }
    }
    let mut rest = &data[blocks * BLOCK..];
    let mut tail: u64 = 0;
    while let Some((word, after)) = rest.split_first_chunk::<4>() {
        tail += u64::from(u32::from_le_bytes(*word));
        rest = after;
    }
    if let Some((word, after)) = rest.split_first_chunk::<2>() {
        tail += u64::from(u16::from_le_bytes(*word));
        rest = after;
    }
    if let Some(&last) = rest.first() {
        tail += u64::from(last);
    }
    add(total, tail)
}
