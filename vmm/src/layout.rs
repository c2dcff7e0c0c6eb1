//! The guest-physical memory map: where nvmm puts boot structures, RAM and the MMIO hole.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_9000  PML4 / PDPT / PD (identity map, 1 GiB)
//! 0x0000_0520  IDT (empty)             0x0002_0000  kernel command line
//! 0x0000_7000  boot_params (zero page) 0x0009_fc00  EBDA .. 1 MiB: reserved
//! 0x0000_8ff0  boot stack (grows down) 0x000e_0000  ACPI tables, RSDP first
//! 0x0010_0000  high memory: kernel, then free RAM, initrd at the top of low RAM
//! 0xc000_0000  MMIO hole up to 4 GiB (IOAPIC, LAPIC, KVM's TSS); RAM beyond 3 GiB moves above 4 GiB
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table for the 64-bit boot CPU state.
pub const GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x520;
/// The Linux `boot_params` structure; RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB pages = the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area; from here to 1 MiB is not RAM for the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP is first, inside the BIOS area that guests scan for it.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = HIGH_MEMORY_START;
/// Kernels load at or above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; guest RAM never overlaps it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM beyond [`MMIO_HOLE_START`] continues here.
pub const FIRST_ADDR_PAST_4GIB: u64 = 1 << 32;
/// First virtio-mmio window; each device gets 4 KiB.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers (every vCPU sees its own here).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel hosts, inside the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// I/O ports of the legacy devices.
pub mod ports {
    /// POST/debug port.
    pub const DEBUG: u64 = 0x80;
    /// i8042 data port (the device decodes by absolute port).
    pub const I8042_DATA: u64 = nvmm_devices::legacy::I8042_DATA_PORT;
    /// i8042 status/command port.
    pub const I8042_COMMAND: u64 = nvmm_devices::legacy::I8042_COMMAND_PORT;
    /// COM1.
    pub const COM1: u64 = 0x3f8;
    /// COM1 has eight registers.
    pub const COM1_LEN: u64 = 8;
    /// ACPI sleep control, sleep status and reset registers (in that order).
    pub const ACPI_POWER: u64 = 0x600;
}

/// Interrupt lines (GSIs) of the legacy devices.
pub mod irqs {
    /// i8042 keyboard.
    pub const I8042: u32 = 1;
    /// COM1.
    pub const COM1: u32 = 4;
    /// Lines for virtio devices, in allocation order: the free ISA IRQs first (no PIT=0, kbd=1,
    /// cascade=2, COM2=3, COM1=4, RTC=8, FPU=13), then the IOAPIC-only GSIs 16..=23.
    pub const VIRTIO: [u32; 17] = [
        5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
    ];
}

// The fixed boot structures must not overlap each other; checked at compile time.
const _: () = {
    assert!(GDT_START + 4 * 8 <= IDT_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + 0x1_0000 <= EBDA_START);
    assert!(MMIO_HOLE_START < IOAPIC_START && LAPIC_START < KVM_TSS_START);
    assert!(MMIO_HOLE_START <= VIRTIO_MMIO_START && VIRTIO_MMIO_START + 0x1000 * 17 < IOAPIC_START);
};

/// The guest RAM regions for `mem_bytes` of memory: everything below the MMIO hole, the rest
/// above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (
                GuestAddress(FIRST_ADDR_PAST_4GIB),
                mem_bytes - MMIO_HOLE_START,
            ),
        ]
    }
}

/// Kind of an e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Not usable by the OS.
    Reserved = 2,
}

/// The e820 map the guest gets for `mem_bytes` of RAM: (start, length, kind).
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, E820Kind)> {
    let mut map = vec![
        (0, EBDA_START, E820Kind::Ram),
        (
            EBDA_START,
            HIGH_MEMORY_START - EBDA_START,
            E820Kind::Reserved,
        ),
    ];
    for (start, len) in ram_regions(mem_bytes) {
        let start = start.0;
        let end = start + len;
        let usable_start = start.max(HIGH_MEMORY_START);
        if end > usable_start {
            map.push((usable_start, end - usable_start, E820Kind::Ram));
        }
    }
    map
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(
            e820_map(512 * MIB),
            vec![
                (0, EBDA_START, E820Kind::Ram),
                (
                    EBDA_START,
                    HIGH_MEMORY_START - EBDA_START,
                    E820Kind::Reserved
                ),
                (
                    HIGH_MEMORY_START,
                    512 * MIB - HIGH_MEMORY_START,
                    E820Kind::Ram
                ),
            ]
        );
    }

    #[test]
    fn memory_beyond_the_hole_moves_above_4_gib() {
        let regions = ram_regions(4 * GIB);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]
        );
        let map = e820_map(4 * GIB);
        assert_eq!(map.last(), Some(&(4 * GIB, GIB, E820Kind::Ram)));
        let ram: u64 = map
            .iter()
            .filter(|e| e.2 == E820Kind::Ram)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram, 4 * GIB - (HIGH_MEMORY_START - EBDA_START));
        assert_eq!(low_ram_end(4 * GIB), MMIO_HOLE_START);
    }
}
