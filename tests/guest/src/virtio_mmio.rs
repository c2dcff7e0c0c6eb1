//! virtio-mmio (virtio 1.x, section 4.2), modern devices (version 2) only:
//! discovery from the command line as Linux does it, and the register file.
//!
//! Linux's `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` parameter (one per
//! device, `drivers/virtio/virtio_mmio.c`) names each device: size and base in
//! `memparse` forms (decimal, `0x` hex, leading-`0` octal, optional K/M/G/T/P/E
//! suffix), a decimal IRQ that is not 0, and an optional platform device id
//! that only Linux's device model uses.

use crate::dma::{MAX_DEVICES, claim_ring_pages};
use crate::io::{
    MAPPED_LIMIT, mmio_read8, mmio_read16, mmio_read32, mmio_read64, mmio_write8, mmio_write16,
    mmio_write32, mmio_write64,
};
use crate::scenarios::{cmdline_value, cmdline_values, parse_decimal};
use crate::virtqueue::{MAX_QUEUE_SIZE, Virtqueue};

/// "virt" in little-endian ASCII.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern register layout; 1 is the legacy (pre-1.0) one.
pub const VERSION_MODERN: u32 = 2;
/// The device registers end where the device configuration starts.
pub const CONFIG: u64 = 0x100;
/// Smallest window the driver accepts: the registers and 256 bytes of config.
const MIN_WINDOW: u64 = 0x200;

// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

// Transport feature bits.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Device id of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// Device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device id of a console device.
pub const DEVICE_ID_CONSOLE: u32 = 3;

/// InterruptStatus bit: the device used a buffer.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// Which optional transport features to accept when the device offers them,
/// and how large a queue to set up: the options every virtio scenario takes.
#[derive(Clone, Copy)]
pub struct Options {
    pub event_idx: bool,
    pub indirect: bool,
    /// Largest queue to set up (a power of two, at most 256).
    pub max_queue_size: u16,
}

impl Options {
    /// The `virtio_event_idx=0`, `virtio_indirect=0` and `virtio_queue_size=N` options.
    pub fn from_cmdline(cmdline: &[u8]) -> Result<Options, &'static str> {
        let switch = |key: &[u8], reason| match cmdline_value(cmdline, key) {
            None | Some(b"1") => Ok(true),
            Some(b"0") => Ok(false),
            Some(_) => Err(reason),
        };
        let max_queue_size = match cmdline_value(cmdline, b"virtio_queue_size") {
            None => u64::from(MAX_QUEUE_SIZE),
            Some(text) => parse_decimal(text).ok_or("bad-virtio-queue-size")?,
        };
        let max_queue_size = u16::try_from(max_queue_size)
            .ok()
            .filter(|&size| size.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(&size))
            .ok_or("bad-virtio-queue-size")?;
        Ok(Options {
            event_idx: switch(b"virtio_event_idx", "bad-virtio-event-idx")?,
            indirect: switch(b"virtio_indirect", "bad-virtio-indirect")?,
            max_queue_size,
        })
    }

    /// The queue size to use for a queue whose QueueNumMax is `max` (not 0):
    /// the largest power of two within both limits (split rings have
    /// power-of-two sizes; the ring pages hold 256 entries).
    pub fn queue_size(&self, max: u32) -> u16 {
        let limit = max.min(u32::from(self.max_queue_size.min(MAX_QUEUE_SIZE)));
        1u16 << (31 - limit.leading_zeros())
    }
}

/// One `virtio_mmio.device=` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

/// Every `virtio_mmio.device=` value on the command line, in order, parsed.
pub fn device_specs(cmdline: &[u8]) -> impl Iterator<Item = Result<DeviceSpec, &'static str>> {
    cmdline_values(cmdline, b"virtio_mmio.device").map(parse_spec)
}

/// Parses `<size>@<base>:<irq>[:<id>]` the way Linux's `vm_cmdline_set` does
/// (it also allows a size suffix on the base, which Linux does not).
fn parse_spec(value: &[u8]) -> Result<DeviceSpec, &'static str> {
    const BAD: &str = "bad-virtio-mmio-device";
    let (size, rest) = memparse(value).ok_or(BAD)?;
    let rest = rest.strip_prefix(b"@").ok_or(BAD)?;
    let (base, rest) = memparse(rest).ok_or(BAD)?;
    let rest = rest.strip_prefix(b":").ok_or(BAD)?;
    let (irq, rest) = parse_number(rest, 10).ok_or(BAD)?;
    let irq = u32::try_from(irq).ok().filter(|&irq| irq != 0).ok_or(BAD)?;
    // The platform device id: checked for form, otherwise unused here.
    let rest = match rest.strip_prefix(b":") {
        Some(id) => {
            let id = id.strip_prefix(b"-").unwrap_or(id);
            parse_number(id, 10).ok_or(BAD)?.1
        }
        None => rest,
    };
    if !rest.is_empty() {
        return Err(BAD);
    }
    Ok(DeviceSpec { size, base, irq })
}

/// Linux `memparse`: a number in C notation (`0x` hex, leading `0` octal,
/// else decimal) and an optional binary suffix. Returns the value and the rest.
fn memparse(text: &[u8]) -> Option<(u64, &[u8])> {
    let (value, rest) = if let Some(hex) = text
        .strip_prefix(b"0x")
        .or_else(|| text.strip_prefix(b"0X"))
        .filter(|hex| hex.first().is_some_and(u8::is_ascii_hexdigit))
    {
        parse_number(hex, 16)?
    } else if text.first() == Some(&b'0') {
        parse_number(text, 8)?
    } else {
        parse_number(text, 10)?
    };
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Some((value, rest)),
    };
    let scaled = value.checked_mul(1 << shift)?;
    Some((scaled, &rest[1..]))
}

/// Leading digits of `text` in `radix` (at least one). Returns the value and the rest.
fn parse_number(text: &[u8], radix: u32) -> Option<(u64, &[u8])> {
    let digits = text
        .iter()
        .take_while(|&&b| char::from(b).is_digit(radix))
        .count();
    if digits == 0 {
        return None;
    }
    let value = text[..digits].iter().try_fold(0u64, |value, &b| {
        let digit = char::from(b).to_digit(radix)?;
        value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })?;
    Some((value, &text[digits..]))
}

/// What a device's first registers say.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub magic: u32,
    pub version: u32,
    pub device_id: u32,
}

/// The register window of one virtio-mmio device.
pub struct Transport {
    base: u64,
    size: u64,
}

impl Transport {
    /// The window a `virtio_mmio.device=` parameter names, if the guest can
    /// use it: inside the identity map, 4-byte aligned, and at least 512 bytes
    /// (registers and 256 bytes of configuration, as QEMU's; Linux does not check).
    ///
    /// # Safety
    /// The window must really be a virtio-mmio device (the VMM said so on the
    /// command line), not RAM the guest uses, and only one `Transport` may
    /// exist per device.
    pub unsafe fn new(spec: &DeviceSpec) -> Result<Transport, &'static str> {
        let end = spec
            .base
            .checked_add(spec.size)
            .ok_or("mmio-window-unmapped")?;
        if end > MAPPED_LIMIT {
            return Err("mmio-window-unmapped");
        }
        if spec.size < MIN_WINDOW || !spec.base.is_multiple_of(4) {
            return Err("mmio-window-too-small");
        }
        Ok(Transport {
            base: spec.base,
            size: spec.size,
        })
    }

    fn read(&self, offset: u64) -> u32 {
        debug_assert!(offset + 4 <= self.size);
        // SAFETY: `new` checked that the window is mapped, aligned and large
        // enough for every register offset and the config space read here,
        // and the caller of `new` vouched that it is this device's registers.
        unsafe { mmio_read32(self.base + offset) }
    }

    fn write(&self, offset: u64, value: u32) {
        debug_assert!(offset + 4 <= self.size);
        // SAFETY: as in `read`; register writes only affect this device.
        unsafe { mmio_write32(self.base + offset, value) }
    }

    /// Magic value, version and device id.
    pub fn identity(&self) -> Identity {
        Identity {
            magic: self.read(REG_MAGIC),
            version: self.read(REG_VERSION),
            device_id: self.read(REG_DEVICE_ID),
        }
    }

    /// Whether the magic value is right.
    pub fn magic_ok(identity: &Identity) -> bool {
        identity.magic == MAGIC
    }

    /// Resets the device and negotiates features (spec 3.1.1 steps 1-6):
    /// reset, ACKNOWLEDGE, DRIVER, read the 64 device feature bits, accept
    /// those in `wanted` (VERSION_1 must be offered), FEATURES_OK, and check
    /// the device kept it. Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        self.reset()?;
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        let offered = u64::from(high) << 32 | u64::from(low);
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("no-version-1");
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);

        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(status);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err("features-not-ok");
        }
        Ok(accepted)
    }

    /// Largest size the device allows for queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u32) -> u32 {
        self.write(REG_QUEUE_SEL, index);
        self.read(REG_QUEUE_NUM_MAX)
    }

    /// Sets up queue `index` with ring pages of its own, as large as `options` and the device
    /// allow.
    pub fn new_queue(
        &self,
        index: u32,
        options: Options,
        event_idx: bool,
    ) -> Result<Virtqueue, &'static str> {
        let max = self.queue_max(index);
        if max == 0 {
            self.fail();
            return Err("no-queue");
        }
        let Some(pages) = claim_ring_pages() else {
            self.fail();
            return Err("too-many-virtio-devices");
        };
        let size = options.queue_size(max);
        // SAFETY: the pages were just claimed for this queue alone, and
        // `queue_size` returns a power of two no larger than MAX_QUEUE_SIZE.
        let queue = unsafe { Virtqueue::new(pages, size, event_idx) };
        self.setup_queue(index, &queue)?;
        Ok(queue)
    }

    /// Tells the device where queue `index` lives and enables it.
    pub fn setup_queue(&self, index: u32, queue: &Virtqueue) -> Result<(), &'static str> {
        self.write(REG_QUEUE_SEL, index);
        if self.read(REG_QUEUE_READY) != 0 {
            self.fail();
            return Err("queue-already-ready");
        }
        let (desc, avail, used) = queue.addresses();
        self.write(REG_QUEUE_NUM, u32::from(queue.size()));
        self.write(REG_QUEUE_DESC_LOW, desc as u32);
        self.write(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.write(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(REG_QUEUE_DEVICE_LOW, used as u32);
        self.write(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        if self.read(REG_QUEUE_READY) != 1 {
            self.fail();
            return Err("queue-not-ready");
        }
        Ok(())
    }

    /// The last step of initialisation: the driver is ready.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.set_status(status);
        if self.status() & STATUS_FAILED != 0 || self.status() & STATUS_DRIVER_OK == 0 {
            return Err("driver-ok-refused");
        }
        Ok(())
    }

    /// Tells the device that queue `index` has new buffers.
    pub fn notify(&self, index: u32) {
        self.write(REG_QUEUE_NOTIFY, index);
    }

    /// Reads InterruptStatus and acknowledges the bits it had set.
    pub fn take_interrupt_status(&self) -> u32 {
        let status = self.read(REG_INTERRUPT_STATUS);
        if status != 0 {
            self.write(REG_INTERRUPT_ACK, status);
        }
        status
    }

    /// Reads an 8-bit configuration field: virtio-mmio asks for accesses as
    /// wide as the field (4.2.2.2), so byte fields such as a MAC address are
    /// read a byte at a time.
    pub fn config8(&self, offset: u64) -> u8 {
        assert!(CONFIG + offset < MIN_WINDOW);
        // SAFETY: as in `read`: `new` checked the window covers the whole
        // configuration space the assertion allows.
        unsafe { mmio_read8(self.base + CONFIG + offset) }
    }

    /// Reads a 16-bit configuration field at `offset` (2-byte aligned).
    pub fn config16(&self, offset: u64) -> u16 {
        assert!(offset.is_multiple_of(2) && CONFIG + offset + 2 <= MIN_WINDOW);
        // SAFETY: as in `config8`; the field is aligned.
        unsafe { mmio_read16(self.base + CONFIG + offset) }
    }

    /// The configuration generation: reads of several fields that see the
    /// same value before and after belong together.
    pub fn config_generation(&self) -> u32 {
        self.read(REG_CONFIG_GENERATION)
    }

    /// Reads 32 bits of device configuration at `offset` (4-byte aligned).
    pub fn config32(&self, offset: u64) -> u32 {
        assert!(offset.is_multiple_of(4) && CONFIG + offset + 4 <= MIN_WINDOW);
        self.read(CONFIG + offset)
    }

    /// Reads a 64-bit configuration field as two 32-bit reads (the spec
    /// forbids wider accesses), retried until the configuration generation is
    /// the same before and after, so that the halves belong together.
    pub fn config64(&self, offset: u64) -> u64 {
        loop {
            let generation = self.read(REG_CONFIG_GENERATION);
            let low = self.config32(offset);
            let high = self.config32(offset + 4);
            if self.read(REG_CONFIG_GENERATION) == generation {
                return u64::from(high) << 32 | u64::from(low);
            }
        }
    }

    /// Guest physical address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the register window, in bytes.
    pub fn window(&self) -> u64 {
        self.size
    }

    /// Reads `width` (1, 2, 4 or 8) bytes at `offset` of the window, whatever
    /// register or configuration field is there: for the hostile scenario.
    ///
    /// # Panics
    /// If the access is not aligned to its width or does not fit the window.
    pub fn peek(&self, offset: u64, width: u64) -> u64 {
        let addr = self.raw_address(offset, width);
        // SAFETY: `raw_address` checked that the access lies in the window
        // `new` accepted (mapped, the device's own registers) and is aligned;
        // a read has no effect the device does not expect from any driver.
        unsafe {
            match width {
                1 => u64::from(mmio_read8(addr)),
                2 => u64::from(mmio_read16(addr)),
                4 => u64::from(mmio_read32(addr)),
                _ => mmio_read64(addr),
            }
        }
    }

    /// Writes the low `width` (1, 2, 4 or 8) bytes of `value` at `offset` of
    /// the window: for the hostile scenario.
    ///
    /// # Panics
    /// As for [`peek`](Self::peek).
    pub fn poke(&self, offset: u64, width: u64, value: u64) {
        let addr = self.raw_address(offset, width);
        // SAFETY: as in `peek`; whatever the value, a write reaches only
        // this device, and the guest gives the device no memory but what
        // the caller set up for it.
        unsafe {
            match width {
                1 => mmio_write8(addr, value as u8),
                2 => mmio_write16(addr, value as u16),
                4 => mmio_write32(addr, value as u32),
                _ => mmio_write64(addr, value),
            }
        }
    }

    fn raw_address(&self, offset: u64, width: u64) -> u64 {
        assert!(
            matches!(width, 1 | 2 | 4 | 8)
                && offset.is_multiple_of(width)
                && offset + width <= self.size,
            "{width}-byte access at 0x{offset:x} outside the window"
        );
        self.base + offset
    }

    /// Marks the device FAILED: the driver gave up on it.
    pub fn fail(&self) {
        self.set_status(self.status() | STATUS_FAILED);
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    /// Writes the Status register.
    pub fn set_status(&self, status: u32) {
        self.write(REG_STATUS, status);
    }

    /// Writes 0 to Status and waits (about a second at most) for the device
    /// to read back 0, which says the reset is complete.
    pub fn reset(&self) -> Result<(), &'static str> {
        self.set_status(0);
        let deadline = crate::time::Deadline::after_us(1_000_000);
        while self.status() != 0 {
            if deadline.expired() {
                return Err("reset-timeout");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }
}

/// A device from the command line that the guest can drive: modern, present.
pub struct Found {
    /// Position among the `virtio_mmio.device=` parameters (the `dev=N`).
    pub index: usize,
    pub device_id: u32,
    pub transport: Transport,
}

/// The usable devices in command-line order (at most [`MAX_DEVICES`]: one
/// set of ring pages each).
pub struct Devices {
    found: [Option<Found>; MAX_DEVICES],
}

impl Devices {
    /// Every device, in command-line order.
    pub fn iter(&self) -> impl Iterator<Item = &Found> + '_ {
        self.found.iter().flatten()
    }

    /// The devices with `device_id`, in command-line order, taken out of the list.
    pub fn take_all(&mut self, device_id: u32) -> impl Iterator<Item = Found> + '_ {
        self.found
            .iter_mut()
            .filter(move |slot| slot.as_ref().is_some_and(|f| f.device_id == device_id))
            .filter_map(Option::take)
    }
}

/// Finds the virtio-mmio devices the command line names and prints one line
/// for each, in order:
///
/// `virtio dev=N base=0x<hex> irq=I id=<device id> version=<version>`,
/// followed by `virtio dev=N skipped reason=...` for a device the guest
/// cannot drive (legacy version 1, no device behind the window, too many).
/// A window it cannot reach, or a bad magic value, is reported as
/// `virtio dev=N base=... irq=I skipped reason=...` alone. A malformed
/// parameter fails the scenario.
pub fn discover(cmdline: &[u8]) -> Result<Devices, &'static str> {
    let mut devices = Devices {
        found: [const { None }; MAX_DEVICES],
    };
    let mut usable = 0;
    for (index, spec) in device_specs(cmdline).enumerate() {
        let Ok(spec) = spec else {
            say!("virtio dev={index} invalid");
            return Err("bad-virtio-mmio-device");
        };
        let where_ = Where(&spec);
        // SAFETY: the VMM put this window on the command line as a
        // virtio-mmio device, and each parameter gets one Transport.
        let transport = match unsafe { Transport::new(&spec) } {
            Ok(transport) => transport,
            Err(reason) => {
                say!("virtio dev={index} {where_} skipped reason={reason}");
                continue;
            }
        };
        let identity = transport.identity();
        if !Transport::magic_ok(&identity) {
            say!(
                "virtio dev={index} {where_} skipped reason=bad-magic magic=0x{:x}",
                identity.magic
            );
            continue;
        }
        say!(
            "virtio dev={index} {where_} id={} version={}",
            identity.device_id,
            identity.version
        );
        let skip = if identity.version == 1 {
            Some("legacy")
        } else if identity.version != VERSION_MODERN {
            Some("unknown-version")
        } else if identity.device_id == 0 {
            Some("no-device")
        } else if usable == MAX_DEVICES {
            Some("too-many-virtio-devices")
        } else {
            None
        };
        match skip {
            Some(reason) => say!("virtio dev={index} skipped reason={reason}"),
            None => {
                devices.found[usable] = Some(Found {
                    index,
                    device_id: identity.device_id,
                    transport,
                });
                usable += 1;
            }
        }
    }
    Ok(devices)
}

/// `base=0x<hex> irq=I` for a device line.
struct Where<'a>(&'a DeviceSpec);

impl core::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "base=0x{:x} irq={}", self.0.base, self.0.irq)
    }
}
