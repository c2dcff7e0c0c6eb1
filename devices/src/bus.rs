//! A bus maps address ranges (I/O ports or guest-physical MMIO addresses) to devices.
//!
//! vCPU threads route every PIO and MMIO exit through [`Bus::read`] / [`Bus::write`]; there are no
//! hard-coded port ranges in the exit handler. Accesses that hit no device read as all-ones (what
//! real hardware returns for an unclaimed address) and are logged once per address.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::lock;

/// A device that decodes accesses to the range(s) it was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `base + offset`, where `base` is the start of the range
    /// the device was inserted at (a device may be inserted at several ranges).
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one that is already taken.
    #[error("{bus} range {base:#x}..{end:#x} overlaps a device already on the bus")]
    Overlap {
        /// Which bus.
        bus: &'static str,
        /// Start of the rejected range.
        base: u64,
        /// End (exclusive) of the rejected range.
        end: u64,
    },
    /// Empty or wrapping range.
    #[error("{bus} range at {base:#x} with length {len:#x} is empty or wraps")]
    InvalidRange {
        /// Which bus.
        bus: &'static str,
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared device as stored on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// At most this many distinct unclaimed addresses are remembered for log de-duplication, so a
/// guest probing the whole address space cannot grow the set without bound.
const MAX_LOGGED_UNCLAIMED: usize = 256;

/// An address space of devices.
pub struct Bus {
    name: &'static str,
    // Keyed by range start; value is (end exclusive, device).
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
    logged_unclaimed: Mutex<HashSet<u64>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<_> = self
            .ranges
            .iter()
            .map(|(base, (end, _))| format!("{base:#x}..{end:#x}"))
            .collect();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus; `name` ("pio", "mmio") appears in logs and errors.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ranges: BTreeMap::new(),
            logged_unclaimed: Mutex::new(HashSet::new()),
        }
    }

    /// Claims `base..base + len` for `device`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange {
                bus: self.name,
                base,
                len,
            })?;
        let overlaps_previous = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, (prev_end, _))| *prev_end > base);
        if overlaps_previous {
            return Err(BusError::Overlap {
                bus: self.name,
                base,
                end,
            });
        }
        self.ranges.insert(base, (end, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (end, device)) = self.ranges.range(..=addr).next_back()?;
        (addr < *end).then_some((*base, device))
    }

    /// Dispatches a read; returns false (and fills `data` with all-ones) when no device claims
    /// `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                lock(device).read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                self.log_unclaimed(addr, "read");
                false
            }
        }
    }

    /// Dispatches a write; returns false (and drops it) when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                lock(device).write(base, addr - base, data);
                true
            }
            None => {
                self.log_unclaimed(addr, "write");
                false
            }
        }
    }

    fn log_unclaimed(&self, addr: u64, access: &str) {
        let mut logged = lock(&self.logged_unclaimed);
        if logged.len() < MAX_LOGGED_UNCLAIMED && logged.insert(addr) {
            log::debug!(
                "{} {access} at unclaimed address {addr:#x} ignored (logged once)",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_the_device_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio");
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fb, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0x3f8, 0, vec![7])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let bus = Bus::new("mmio");
        let mut data = [0u8; 4];
        assert!(!bus.read(0x1234, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x1234, &[1]));
    }

    #[test]
    fn end_of_range_is_exclusive() {
        let mut bus = Bus::new("pio");
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 1)
            .unwrap();
        let mut data = [0u8; 1];
        assert!(!bus.read(0x61, &mut data));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new("pio");
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(dev(), 0xf8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x110, 0x8).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn unclaimed_log_set_is_bounded() {
        let bus = Bus::new("mmio");
        let mut data = [0u8; 1];
        for addr in 0..10_000u64 {
            bus.read(addr * 0x1000, &mut data);
        }
        assert_eq!(
            bus.logged_unclaimed.lock().unwrap().len(),
            MAX_LOGGED_UNCLAIMED
        );
    }
}
