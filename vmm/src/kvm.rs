//! KVM itself: opening /dev/kvm, guest memory, and a VM with the in-kernel irqchip and PIT.

use std::ops::Range;
use std::sync::OnceLock;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::coalesced::CoalescedRing;
use crate::layout;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// The size of a transparent huge page on x86_64.
const HUGE_PAGE: u64 = 2 << 20;
/// APIC IDs are 8 bits in the MADT entries nvmm writes, and 0xff is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// Errors from KVM setup.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Unexpected API version.
    #[error("/dev/kvm reports API version {0}, nvmm needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// More vCPUs than KVM or the MADT allow.
    #[error("{requested} vCPUs requested; this host allows at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u8,
        /// Limit.
        max: usize,
    },
    /// mmap of guest RAM failed.
    #[error("cannot allocate {mib} MiB of guest memory")]
    AllocateMemory {
        /// Size requested.
        mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A VM-level ioctl failed.
    #[error("cannot {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
}

/// Opens /dev/kvm and checks its API version.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    Ok(kvm)
}

/// KVM_GET_SUPPORTED_CPUID, asked once per process: the kernel runs CPUID for every leaf,
/// and on a nested host each one traps to the host below (0.4 ms per VM on kvm-pvm, a tenth
/// of a background VM's set-up). `nvmm up` asks before it forks its VMs, which inherit it.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    static SUPPORTED: OnceLock<CpuId> = OnceLock::new();
    if let Some(cpuid) = SUPPORTED.get() {
        return Ok(cpuid.clone());
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| KvmError::Setup("read the supported CPUID", e))?;
    Ok(SUPPORTED.get_or_init(|| cpuid).clone())
}

/// Checks `vcpus` against KVM's limit and the MADT's.
pub fn check_vcpu_count(kvm: &Kvm, vcpus: u8) -> Result<(), KvmError> {
    let max = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
    if usize::from(vcpus) > max {
        return Err(KvmError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    Ok(())
}

/// Maps guest RAM (anonymous, MAP_NORESERVE: pages are only allocated when touched).
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, KvmError> {
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_mib << 20)
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    let mem =
        GuestMemoryMmap::from_ranges(&regions).map_err(|source| KvmError::AllocateMemory {
            mib: mem_mib,
            source,
        })?;
    for region in mem.iter() {
        // Transparent huge pages: fewer host page faults and TLB misses for the guest (QEMU
        // asks for the same).
        advise(region.as_ptr(), region.len() as usize, libc::MADV_HUGEPAGE);
    }
    // The boot structures below 1 MiB (layout.rs) are a few scattered pages: with 16 test
    // guests started at once, zeroing the huge page around them was 9% of all CPU time.
    small_pages_at_edges(&mem, 0..layout::HIGH_MEMORY_START);
    Ok(mem)
}

/// Huge pages only where nvmm's writes fill them: the 2 MiB chunks that `range`, about to be
/// written, covers only in part go on 4 KiB pages, as a huge page there would be zeroed
/// whole to hold a fraction of the write. For the 150 KiB test guest kernel that zeroing was
/// half of each VM's own set-up time with 16 starting at once on kvm-pvm. Chunks that the
/// write fills stay huge.
pub fn small_pages_at_edges(mem: &GuestMemoryMmap, range: Range<u64>) {
    if range.is_empty() {
        return;
    }
    for edge in [range.start, range.end] {
        if edge % HUGE_PAGE == 0 {
            continue;
        }
        let chunk = GuestAddress(edge - edge % HUGE_PAGE);
        let Some(region) = mem.find_region(chunk) else {
            continue;
        };
        let Some(offset) = chunk.checked_offset_from(region.start_addr()) else {
            continue;
        };
        let len = HUGE_PAGE.min(region.len() - offset);
        advise(
            region.as_ptr().wrapping_add(offset as usize),
            len as usize,
            libc::MADV_NOHUGEPAGE,
        );
    }
}

/// madvise on a range of guest RAM. Only a hint: failure just means other page sizes.
fn advise(start: *mut u8, len: usize, advice: libc::c_int) {
    // SAFETY: callers pass a range inside one live mapping of guest RAM; MADV_HUGEPAGE and
    // MADV_NOHUGEPAGE change no contents and no protections.
    if unsafe { libc::madvise(start.cast(), len, advice) } != 0 {
        log::debug!(
            "madvise({advice}) on guest RAM failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Creates the VM: one memory slot per RAM region, TSS, in-kernel IOAPIC/PIC/LAPIC, PIT.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, KvmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| KvmError::Setup("create the VM", e))?;
    // Memory first: registering a slot once the in-kernel irqchip exists took 5-10 ms on
    // kvm-pvm, against 0.05 ms before it (Firecracker registers memory first too).
    for (slot, region) in mem.iter().enumerate() {
        let region_info = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `mem`,
        // which the caller keeps alive (in `Vm`) for as long as the VM fd exists; slots do not
        // overlap because the regions come from a GuestMemoryMmap.
        unsafe { vm.set_user_memory_region(region_info) }
            .map_err(|e| KvmError::Setup("register guest memory with KVM", e))?;
    }
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(|e| KvmError::Setup("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| KvmError::Setup("create the in-kernel irqchip", e))?;
    // The speaker port (0x61) is emulated as a dummy so PIT calibration in guests works.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| KvmError::Setup("create the in-kernel PIT", e))?;
    Ok(vm)
}

/// Has KVM queue the guest's writes to the UART's data register instead of exiting for each
/// (see coalesced.rs); the ring they queue in, mapped through `vcpu`. None where KVM cannot:
/// the writes then exit as any other.
pub fn coalesced_serial_ring(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Option<CoalescedRing> {
    if !kvm.check_extension(Cap::CoalescedPio) {
        return None;
    }
    let ring = match CoalescedRing::map(vcpu) {
        Ok(ring) => ring,
        Err(err) => {
            log::debug!("no coalesced serial output: cannot map the ring: {err}");
            return None;
        }
    };
    if let Err(err) = vm.register_coalesced_mmio(IoEventAddress::Pio(layout::ports::COM1), 1) {
        log::debug!("no coalesced serial output: {err}");
        return None;
    }
    Some(ring)
}

/// True when /dev/kvm is kvm-pvm: a software, pagetable-based KVM that runs nested without
/// VMX/SVM. Stock Linux kernels cannot boot there (see ENVIRONMENT notes in the README).
pub fn is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the mapping that holds `address` in /proc/self/smaps.
    fn vm_flags(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines().skip_while(|line| {
            let range = line.split_whitespace().next().unwrap_or_default();
            let Some((start, end)) = range.split_once('-') else {
                return true;
            };
            let parse = |hex| usize::from_str_radix(hex, 16).unwrap_or(0);
            !(parse(start) <= address && address < parse(end))
        });
        assert!(lines.next().is_some(), "no mapping holds {address:#x}");
        let flags = lines.find(|l| l.starts_with("VmFlags:")).unwrap();
        flags.to_owned()
    }

    #[test]
    fn guest_ram_below_2_mib_is_kept_off_huge_pages() {
        let mem = create_guest_memory(64).unwrap();
        let region = mem.iter().next().unwrap();
        let base = region.as_ptr() as usize;
        let small = HUGE_PAGE as usize;
        // madvise splits the mapping: its own flags for the low part, huge pages above.
        let (low, rest) = (vm_flags(base), vm_flags(base + small));
        assert!(low.contains(" nh"), "{low}");
        assert!(rest.contains(" hg"), "{rest}");
    }

    #[test]
    fn copies_leave_the_huge_page_chunks_they_fill_only_in_part_on_small_pages() {
        let mem = create_guest_memory(64).unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as usize;
        let mib = 1 << 20;
        // 3 MiB .. 7 MiB: the chunks at 2 and 6 MiB in part, the one at 4 MiB whole.
        small_pages_at_edges(&mem, 3 << 20..7 << 20);
        // Ends on a chunk boundary: only the chunk at 10 MiB is in part.
        small_pages_at_edges(&mem, 11 << 20..12 << 20);
        small_pages_at_edges(&mem, 20 << 20..20 << 20);
        for (mib_offset, flag) in [
            (2, " nh"),
            (3, " nh"),
            (4, " hg"),
            (6, " nh"),
            (8, " hg"),
            (10, " nh"),
            (12, " hg"),
            (20, " hg"),
        ] {
            let flags = vm_flags(base + mib_offset * mib);
            assert!(flags.contains(flag), "{mib_offset} MiB: {flags}");
        }
    }
}
