//! Rough time from the TSC, for bounded waits without timer interrupts.
//!
//! The TSC rate comes from CPUID when the VMM tells it (leaf 0x15, leaf 0x16,
//! or the hypervisor leaf 0x40000010 that KVM-based VMMs may fill); otherwise a
//! guess of 3 GHz is used. Guessing high only makes waits longer, never too
//! short to matter, which is the safe side for "give up after about N ms".

use core::arch::x86_64::__cpuid;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::io::rdtsc;

const GUESSED_TSC_KHZ: u64 = 3_000_000;
const HYPERVISOR_BASE_LEAF: u32 = 0x4000_0000;
const HYPERVISOR_TSC_LEAF: u32 = 0x4000_0010;

/// TSC ticks per millisecond, set once by [`init`] on the boot CPU.
static TSC_KHZ: AtomicU64 = AtomicU64::new(GUESSED_TSC_KHZ);

/// Works out the TSC rate. Call once, before any wait.
pub fn init() {
    if let Some(khz) = tsc_khz_from_cpuid() {
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
}

fn tsc_khz_from_cpuid() -> Option<u64> {
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        // TSC = crystal clock * ebx / eax.
        let leaf = __cpuid(0x15);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            return Some(u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000);
        }
    }
    if max_leaf >= 0x16 {
        // Processor base frequency in MHz, which the TSC runs at on recent CPUs.
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    // The hypervisor leaves only exist when CPUID says a hypervisor is present.
    let hypervisor_present = __cpuid(1).ecx & (1 << 31) != 0;
    if hypervisor_present && __cpuid(HYPERVISOR_BASE_LEAF).eax >= HYPERVISOR_TSC_LEAF {
        let khz = __cpuid(HYPERVISOR_TSC_LEAF).eax;
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    None
}

/// A point in time, for "until done or until this passes" loops.
pub struct Deadline(u64);

impl Deadline {
    /// The time `us` microseconds from now.
    pub fn after_us(us: u64) -> Deadline {
        let ticks = us.saturating_mul(TSC_KHZ.load(Ordering::Relaxed)) / 1000;
        Deadline(rdtsc().saturating_add(ticks))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Microseconds since `start` (a [`rdtsc`] value), at the rate [`init`] found
/// or guessed: rough, for reports; hosts time benchmarks themselves.
pub fn us_since(start: u64) -> u64 {
    rdtsc().saturating_sub(start).saturating_mul(1000) / TSC_KHZ.load(Ordering::Relaxed)
}

/// Microseconds since the TSC started (about when the VM did): the clock
/// smoltcp runs on.
pub fn now_us() -> u64 {
    us_since(0)
}

/// Busy-waits for about `us` microseconds.
pub fn delay_us(us: u64) {
    let deadline = Deadline::after_us(us);
    while !deadline.expired() {
        spin_loop();
    }
}
