//! Parsing a virtio-blk descriptor chain into a plain [`Request`], before any I/O happens.
//!
//! Layout (virtio 1.x, 5.2.6): a device-readable header `{type: u32, reserved: u32, sector:
//! u64}`, data descriptors (device-writable for IN and GET_ID, device-readable otherwise), and a
//! last, device-writable descriptor whose first byte receives the status.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes per virtio-blk sector, whatever the advertised block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header.
const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes segment `{sector: u64, num_sectors: u32, flags: u32}`.
pub const SEGMENT_LEN: u32 = 16;

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else (answered with UNSUPP).
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }

    /// Whether the data descriptors are written by the device.
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

/// A validated request: plain data, ready for the I/O engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Operation.
    pub kind: RequestType,
    /// First sector (IN / OUT).
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data length.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, len)| u64::from(*len)).sum()
    }
}

/// Why a chain is not a valid request.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Fewer than two descriptors (header and status at least).
    #[error("descriptor chain too short")]
    ChainTooShort,
    /// The header descriptor is shorter than 16 bytes or device-writable.
    #[error("invalid request header descriptor")]
    InvalidHeader,
    /// The last descriptor is not device-writable or has length 0.
    #[error("status descriptor is missing, empty or read-only")]
    InvalidStatus,
    /// A data descriptor points in the wrong direction for this request type.
    #[error("data descriptor has the wrong direction for the request")]
    WrongDirection,
    /// A descriptor points outside guest memory.
    #[error("descriptor points outside guest memory")]
    OutsideGuestMemory,
    /// IN / OUT data not a multiple of 512 bytes.
    #[error("data length is not a multiple of the sector size")]
    UnalignedLength,
    /// The chain itself is broken (loops, bad indirect tables).
    #[error("malformed descriptor chain")]
    MalformedChain,
    /// DISCARD / WRITE_ZEROES data that is not one segment in one descriptor: the device offers
    /// one segment per request (`max_discard_seg`, `max_write_zeroes_seg`), and working through
    /// more, a system call each, would let one request hold up every device for hours.
    #[error("discard or write-zeroes request without exactly one segment")]
    SegmentCount,
}

impl RequestError {
    /// A small number per kind, for log de-duplication.
    pub fn kind(self) -> u32 {
        self as u32
    }
}

/// The outcome of parsing: the request, or an error plus the status address if one is usable
/// (so the driver still gets IOERR instead of a lost request).
#[derive(Debug)]
pub struct ParsedChain {
    /// Index of the chain's head descriptor (for the used ring).
    pub head: u16,
    /// The request, or why it is invalid.
    pub request: Result<Request, RequestError>,
    /// Status byte address when the chain has a usable one.
    pub status: Option<GuestAddress>,
}

/// Most descriptors a request may have; longer chains are rejected rather than buffered.
pub const MAX_DESCRIPTORS: usize = 1024;

impl ParsedChain {
    /// Reads and validates `chain` against guest memory `mem`. `descriptors` is scratch space,
    /// kept by the caller so that a request costs no allocation for it.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        descriptors: &mut Vec<Descriptor>,
    ) -> Self {
        let head = chain.head_index();
        descriptors.clear();
        for desc in chain {
            if descriptors.len() == MAX_DESCRIPTORS {
                return Self::invalid(head, RequestError::MalformedChain, None);
            }
            descriptors.push(desc);
        }
        let status = descriptors
            .last()
            .filter(|d| d.is_write_only() && d.len() >= 1 && mem.address_in_range(d.addr()))
            .map(|d| d.addr());
        let request = parse_descriptors(descriptors, status, mem);
        Self {
            head,
            request,
            status,
        }
    }

    fn invalid(head: u16, err: RequestError, status: Option<GuestAddress>) -> Self {
        Self {
            head,
            request: Err(err),
            status,
        }
    }
}

fn parse_descriptors(
    descriptors: &[Descriptor],
    status: Option<GuestAddress>,
    mem: &GuestMemoryMmap,
) -> Result<Request, RequestError> {
    let [header, data @ .., _status] = descriptors else {
        return Err(RequestError::ChainTooShort);
    };
    let status = status.ok_or(RequestError::InvalidStatus)?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::InvalidHeader);
    }
    // One read of the whole header, through one region look-up: this is the device's busiest
    // path, and vm-memory's `Bytes` accesses walk a slice iterator for every call.
    let raw_header: [u8; HEADER_LEN as usize] = mem
        .get_slice(header.addr(), HEADER_LEN as usize)
        .map_err(|_| RequestError::OutsideGuestMemory)?
        .read_obj(0)
        .map_err(|_| RequestError::OutsideGuestMemory)?;
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = raw_header;
    let kind = RequestType::from_raw(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes(s);

    let mut buffers = Vec::with_capacity(data.len());
    for desc in data {
        if desc.is_write_only() != kind.device_writes_data() {
            return Err(RequestError::WrongDirection);
        }
        // One region: the I/O engine hands the kernel one pointer per buffer.
        if mem.get_slice(desc.addr(), desc.len() as usize).is_err() {
            return Err(RequestError::OutsideGuestMemory);
        }
        buffers.push((desc.addr(), desc.len()));
    }
    let request = Request {
        kind,
        sector,
        data: buffers,
        status,
    };
    if matches!(kind, RequestType::In | RequestType::Out) && request.data_len() % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength);
    }
    let zeroing = matches!(kind, RequestType::Discard | RequestType::WriteZeroes);
    if zeroing && !matches!(request.data.as_slice(), [(_, SEGMENT_LEN)]) {
        return Err(RequestError::SegmentCount);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    use super::*;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Builds a chain from (addr, len, device_writable) and parses it.
    fn parse(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        header: Option<(u32, u64)>,
    ) -> ParsedChain {
        if let Some((kind, sector)) = header {
            mem.write_obj(kind, GuestAddress(descs[0].0)).unwrap();
            mem.write_obj(sector, GuestAddress(descs[0].0 + 8)).unwrap();
        }
        let queue = MockSplitQueue::create(mem, GuestAddress(0x8_0000), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, writable))| {
                let mut flags = if *writable { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, (i + 1) as u16))
            })
            .collect();
        queue.build_desc_chain(&raw).unwrap();
        let mut q: Queue = queue.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(mem).unwrap();
        ParsedChain::parse(chain, mem, &mut Vec::new())
    }

    #[test]
    fn a_read_request_parses_into_plain_data() {
        let mem = mem();
        let parsed = parse(
            &mem,
            &[
                (0x1000, 16, false),
                (0x2000, 512, true),
                (0x3000, 1024, true),
                (0x4000, 1, true),
            ],
            Some((VIRTIO_BLK_T_IN, 7)),
        );
        let request = parsed.request.unwrap();
        assert_eq!(request.kind, RequestType::In);
        assert_eq!(request.sector, 7);
        assert_eq!(
            request.data,
            vec![(GuestAddress(0x2000), 512), (GuestAddress(0x3000), 1024)]
        );
        assert_eq!(request.data_len(), 1536);
        assert_eq!(request.status, GuestAddress(0x4000));
    }

    #[test]
    fn flush_has_no_data() {
        let mem = mem();
        let parsed = parse(
            &mem,
            &[(0x1000, 16, false), (0x4000, 1, true)],
            Some((VIRTIO_BLK_T_FLUSH, 0)),
        );
        assert_eq!(parsed.request.unwrap().kind, RequestType::Flush);
    }

    #[test]
    fn unknown_types_parse_as_unsupported() {
        let mem = mem();
        let parsed = parse(
            &mem,
            &[(0x1000, 16, false), (0x4000, 1, true)],
            Some((99, 0)),
        );
        assert_eq!(parsed.request.unwrap().kind, RequestType::Unsupported(99));
    }

    #[test]
    fn too_short_chains_are_rejected_with_a_status_when_possible() {
        let mem = mem();
        let parsed = parse(&mem, &[(0x4000, 1, true)], None);
        assert_eq!(parsed.request, Err(RequestError::ChainTooShort));
        assert_eq!(parsed.status, Some(GuestAddress(0x4000)));
    }

    #[test]
    fn header_must_be_readable_and_long_enough() {
        let mem = mem();
        let short = parse(&mem, &[(0x1000, 8, false), (0x4000, 1, true)], Some((0, 0)));
        assert_eq!(short.request, Err(RequestError::InvalidHeader));
        let writable = parse(&mem, &[(0x1000, 16, true), (0x4000, 1, true)], Some((0, 0)));
        assert_eq!(writable.request, Err(RequestError::InvalidHeader));
    }

    #[test]
    fn status_must_be_writable_and_non_empty() {
        let mem = mem();
        let ro = parse(
            &mem,
            &[(0x1000, 16, false), (0x4000, 1, false)],
            Some((0, 0)),
        );
        assert_eq!(ro.request, Err(RequestError::InvalidStatus));
        assert_eq!(ro.status, None);
        let empty = parse(
            &mem,
            &[(0x1000, 16, false), (0x4000, 0, true)],
            Some((0, 0)),
        );
        assert_eq!(empty.request, Err(RequestError::InvalidStatus));
    }

    #[test]
    fn data_direction_must_match_the_type() {
        let mem = mem();
        let read_into_readonly = parse(
            &mem,
            &[(0x1000, 16, false), (0x2000, 512, false), (0x4000, 1, true)],
            Some((VIRTIO_BLK_T_IN, 0)),
        );
        assert_eq!(
            read_into_readonly.request,
            Err(RequestError::WrongDirection)
        );
        let write_from_writable = parse(
            &mem,
            &[(0x1000, 16, false), (0x2000, 512, true), (0x4000, 1, true)],
            Some((VIRTIO_BLK_T_OUT, 0)),
        );
        assert_eq!(
            write_from_writable.request,
            Err(RequestError::WrongDirection)
        );
    }

    #[test]
    fn buffers_outside_guest_memory_are_rejected() {
        let mem = mem();
        let parsed = parse(
            &mem,
            &[
                (0x1000, 16, false),
                (0xff800, 0x1000, true),
                (0x4000, 1, true),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
        );
        assert_eq!(parsed.request, Err(RequestError::OutsideGuestMemory));
        assert_eq!(parsed.status, Some(GuestAddress(0x4000)));
    }

    #[test]
    fn zeroing_requests_carry_exactly_one_segment() {
        let mem = mem();
        let kind = Some((VIRTIO_BLK_T_WRITE_ZEROES, 0));
        let one = parse(
            &mem,
            &[(0x1000, 16, false), (0x2000, 16, false), (0x4000, 1, true)],
            kind,
        );
        assert_eq!(one.request.unwrap().kind, RequestType::WriteZeroes);
        for data in [
            &[][..],
            &[(0x2000, 32, false)][..],
            &[(0x2000, 8, false), (0x2008, 8, false)][..],
            &[(0x2000, 16, false), (0x2000, 16, false)][..],
        ] {
            let mut chain = vec![(0x1000, 16, false)];
            chain.extend_from_slice(data);
            chain.push((0x4000, 1, true));
            let parsed = parse(&mem, &chain, Some((VIRTIO_BLK_T_DISCARD, 0)));
            assert_eq!(parsed.request, Err(RequestError::SegmentCount), "{data:?}");
            assert_eq!(parsed.status, Some(GuestAddress(0x4000)));
        }
    }

    #[test]
    fn io_lengths_must_be_whole_sectors() {
        let mem = mem();
        let parsed = parse(
            &mem,
            &[(0x1000, 16, false), (0x2000, 100, false), (0x4000, 1, true)],
            Some((VIRTIO_BLK_T_OUT, 0)),
        );
        assert_eq!(parsed.request, Err(RequestError::UnalignedLength));
    }
}
