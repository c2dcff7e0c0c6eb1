//! Transmit segmentation offload (`VIRTIO_NET_F_HOST_TSO4` with `F_CSUM`),
//! as Linux's TCP uses it: the stack hands its virtio-net driver TCP segments
//! of up to 64 KiB, and the device (here the host's own stack, behind a tap)
//! deals with them whole, or cuts them into MSS-sized ones when it must.
//!
//! smoltcp only writes MSS-sized segments, one per poll, so the driver puts
//! together what Linux's TCP would have built: consecutive segments of one
//! stream, written poll after poll, become one large frame ([`OpenFrame`]). A segment joins the
//! frame being built when everything but its sequence number, IP
//! identification, checksums and PSH flag equals the first one's, it carries
//! on where the frame ends, and the frame's segments so far are all
//! full-sized. The large frame's TCP checksum field holds the pseudo-header
//! sum, and its virtio-net header asks the device to finish the checksum of
//! each segment it makes (spec 5.1.6.2).

use crate::checksum;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
const GSO_TCPV4: u8 = 1;

const ETHERNET_HEADER: usize = 14;
/// The only IPv4 header length taken: no options.
const IPV4_HEADER: usize = 20;
const TCP_START: usize = ETHERNET_HEADER + IPV4_HEADER;
/// Offsets in the frame.
const IP_TOTAL_LEN: usize = ETHERNET_HEADER + 2;
const IP_CHECKSUM: usize = ETHERNET_HEADER + 10;
const TCP_SEQ: usize = TCP_START + 4;
const TCP_DATA_OFFSET: usize = TCP_START + 12;
const TCP_FLAGS: usize = TCP_START + 13;
/// Where the TCP checksum is, from the start of the TCP header.
const TCP_CHECKSUM_OFFSET: usize = 16;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// The largest IPv4 packet: a large frame may hold this much after its
/// Ethernet header.
const MAX_IP_PACKET: usize = 65_535;

/// Header bytes that may differ between segments of one large frame: total
/// length and identification, the IP header checksum, the sequence number,
/// the flags (PSH) and the TCP checksum. Everything else must match.
const VARYING: [(usize, usize); 5] = [
    (IP_TOTAL_LEN, ETHERNET_HEADER + 6),
    (IP_CHECKSUM, IP_CHECKSUM + 2),
    (TCP_SEQ, TCP_SEQ + 4),
    (TCP_FLAGS, TCP_FLAGS + 1),
    (
        TCP_START + TCP_CHECKSUM_OFFSET,
        TCP_START + TCP_CHECKSUM_OFFSET + 2,
    ),
];

/// A TCP segment that could be part of a large frame: IPv4 without options,
/// unfragmented, only ACK and maybe PSH set, some payload.
#[derive(Clone, Copy)]
pub struct Segment {
    /// Ethernet, IPv4 and TCP headers.
    headers: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

impl Segment {
    /// The segment in `frame`, if it is one of that kind and its lengths add up.
    pub fn parse(frame: &[u8]) -> Option<Segment> {
        // An unfragmented IPv4 TCP segment (checksum.rs checks that and the
        // lengths), with no IP options and nothing after the packet.
        let tcp = checksum::tcp_segment(frame)?;
        if tcp.start != TCP_START || tcp.end != frame.len() {
            return None;
        }
        let tcp_header = usize::from(frame[TCP_DATA_OFFSET] >> 4) * 4;
        let headers = TCP_START + tcp_header;
        let flags = frame[TCP_FLAGS];
        if tcp_header < 20 || headers >= frame.len() || flags & !TCP_PSH != TCP_ACK {
            return None;
        }
        Some(Segment {
            headers,
            payload: frame.len() - headers,
            seq: be32(frame, TCP_SEQ),
            psh: flags & TCP_PSH != 0,
        })
    }
}

/// A large frame being put together in a transmit slot of its own.
#[derive(Clone, Copy)]
pub struct OpenFrame {
    /// The slot's token.
    pub slot: u16,
    /// Frame bytes so far: the first segment's headers and every payload.
    pub len: usize,
    headers: usize,
    /// The first segment's payload length: the size the device cuts to.
    mss: usize,
    /// The sequence number the next segment must carry.
    next_seq: u32,
    pub segments: u16,
    /// A short segment or PSH ended the frame: nothing more may join.
    ended: bool,
}

impl OpenFrame {
    /// Starts a large frame in `slot` with the segment `first`, whose bytes
    /// the caller has put at the start of the slot's frame area.
    pub fn start(slot: u16, first: Segment) -> OpenFrame {
        OpenFrame {
            slot,
            len: first.headers + first.payload,
            headers: first.headers,
            mss: first.payload,
            next_seq: first.seq.wrapping_add(first.payload as u32),
            segments: 1,
            ended: first.psh,
        }
    }

    /// Whether `segment` (whose frame is `bytes`) carries on this frame,
    /// whose bytes so far are `frame`.
    pub fn accepts(&self, frame: &[u8], segment: &Segment, bytes: &[u8]) -> bool {
        !self.ended
            && segment.headers == self.headers
            && segment.seq == self.next_seq
            && segment.payload <= self.mss
            && self.len + segment.payload - ETHERNET_HEADER <= MAX_IP_PACKET
            && same_headers(&frame[..self.headers], &bytes[..self.headers])
    }

    /// Appends the payload of `segment` (accepted, its frame `bytes`) to the
    /// frame, whose slot's frame area is `frame` (room for a whole IP packet).
    pub fn append(&mut self, frame: &mut [u8], segment: &Segment, bytes: &[u8]) {
        frame[self.len..self.len + segment.payload].copy_from_slice(&bytes[segment.headers..]);
        self.len += segment.payload;
        self.next_seq = self.next_seq.wrapping_add(segment.payload as u32);
        self.segments += 1;
        if segment.psh {
            frame[TCP_FLAGS] |= TCP_PSH;
        }
        // A short segment is the last one a device may make; a frame one
        // more full segment would overflow is done too.
        self.ended = segment.psh
            || segment.payload < self.mss
            || self.len + self.mss - ETHERNET_HEADER > MAX_IP_PACKET;
    }

    /// Whether nothing more can join.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Writes the virtio-net `header` and finishes the frame's own headers:
    /// a lone segment becomes a plain frame with its checksum filled in; two
    /// or more become one segmentation-offload frame.
    pub fn finish(&self, header: &mut [u8], frame: &mut [u8]) {
        header.fill(0);
        let frame = &mut frame[..self.len];
        if self.segments == 1 {
            checksum::fill_tcp(frame);
            return;
        }
        let ip_total = (self.len - ETHERNET_HEADER) as u16;
        frame[IP_TOTAL_LEN..IP_TOTAL_LEN + 2].copy_from_slice(&ip_total.to_be_bytes());
        checksum::fill_ipv4_header(frame);
        checksum::seed_tcp_partial(frame);
        header[0] = HDR_F_NEEDS_CSUM;
        header[1] = GSO_TCPV4;
        header[2..4].copy_from_slice(&(self.headers as u16).to_le_bytes());
        header[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
        header[6..8].copy_from_slice(&(TCP_START as u16).to_le_bytes());
        header[8..10].copy_from_slice(&(TCP_CHECKSUM_OFFSET as u16).to_le_bytes());
    }
}

/// Whether two segments' headers are the same but for [`VARYING`].
fn same_headers(a: &[u8], b: &[u8]) -> bool {
    let mut from = 0;
    for (start, end) in VARYING {
        if a[from..start] != b[from..start] {
            return false;
        }
        from = end;
    }
    a[from..] == b[from..]
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
