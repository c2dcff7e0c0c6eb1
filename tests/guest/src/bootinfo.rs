//! What the VMM told the guest, taken from either boot protocol: the Linux
//! `boot_params` ("zero page") or the PVH `hvm_start_info`.
//!
//! Only the fields the guest uses are read; offsets are from Linux's
//! `Documentation/arch/x86/zero-page.rst` and `boot.rst`, and Xen's
//! `public/arch-x86/hvm/start_info.h`.

use crate::io::{phys_bytes, u8_at, u32_at, u64_at};

/// Which entry point the VMM used; the value is passed in `edi` by the entry code.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    /// 64-bit Linux boot protocol (`_start64`, `rsi` = `boot_params`).
    Linux64 = 0,
    /// PVH (`_start32`, `ebx` = `hvm_start_info`).
    Pvh = 1,
}

impl Protocol {
    /// The value entry.rs passes for this protocol, back as a `Protocol`.
    pub fn from_entry(value: u32) -> Option<Protocol> {
        match value {
            0 => Some(Protocol::Linux64),
            1 => Some(Protocol::Pvh),
            _ => None,
        }
    }

    /// The name printed in `nvmm-test: boot protocol=<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Linux64 => "linux64",
            Protocol::Pvh => "pvh",
        }
    }
}

/// A range of guest physical memory.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub addr: u64,
    pub size: u64,
}

impl Region {
    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.addr < other.addr.saturating_add(other.size)
            && other.addr < self.addr.saturating_add(self.size)
    }
}

/// e820 type of ordinary RAM (the same value in the PVH memory map).
pub const E820_RAM: u32 = 1;

/// One memory map entry.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    pub region: Region,
    pub kind: u32,
}

/// The memory map, read in place. Both protocols store address (u64), size
/// (u64) and type (u32) at the same offsets; only the entry size differs.
#[derive(Clone, Copy)]
pub struct MemMap {
    table: &'static [u8],
    entry_size: usize,
}

impl MemMap {
    const EMPTY: MemMap = MemMap {
        table: &[],
        entry_size: 1,
    };

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.table.len() / self.entry_size
    }

    /// The entries in table order.
    pub fn entries(&self) -> impl Iterator<Item = MemRegion> + '_ {
        self.table
            .chunks_exact(self.entry_size)
            .map(|entry| MemRegion {
                region: Region {
                    addr: u64_at(entry, 0).unwrap_or(0),
                    size: u64_at(entry, 8).unwrap_or(0),
                },
                kind: u32_at(entry, 16).unwrap_or(0),
            })
    }

    /// Total size of RAM entries, in whole MiB.
    pub fn usable_mib(&self) -> u64 {
        let bytes: u64 = self
            .entries()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.region.size)
            .fold(0, u64::saturating_add);
        bytes >> 20
    }

    /// Whether `region` lies entirely inside one RAM entry.
    pub fn is_ram(&self, region: &Region) -> bool {
        self.entries().any(|e| {
            e.kind == E820_RAM
                && e.region.addr <= region.addr
                && region.addr.saturating_add(region.size)
                    <= e.region.addr.saturating_add(e.region.size)
        })
    }

    /// Where the table itself lies.
    fn location(&self) -> Region {
        Region {
            addr: self.table.as_ptr() as u64,
            size: self.table.len() as u64,
        }
    }
}

/// Everything the scenarios need from the boot protocol.
pub struct BootInfo {
    pub protocol: Protocol,
    /// The command line, without its terminating NUL (empty if none).
    pub cmdline: &'static [u8],
    /// The initrd (PVH: the first module), if any.
    pub initrd: Option<Region>,
    pub memmap: MemMap,
    /// Physical address of the ACPI RSDP if the VMM passed one.
    pub rsdp: Option<u64>,
    /// The `boot_params` page or `hvm_start_info` structure itself.
    boot_struct: Region,
}

/// Longest command line the guest reads; the rest is ignored.
const CMDLINE_MAX: u64 = 64 * 1024;

// boot_params ("zero page") offsets.
const ZP_SIZE: u64 = 4096;
const ZP_ACPI_RSDP_ADDR: usize = 0x070;
const ZP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const ZP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const ZP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const ZP_E820_ENTRIES: usize = 0x1e8;
const ZP_RAMDISK_IMAGE: usize = 0x218;
const ZP_RAMDISK_SIZE: usize = 0x21c;
const ZP_CMD_LINE_PTR: usize = 0x228;
const ZP_E820_TABLE: usize = 0x2d0;
const ZP_E820_ENTRY_SIZE: usize = 20;
const ZP_E820_MAX: usize = 128;

// hvm_start_info offsets.
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_SIZE_V0: u64 = 40;
const PVH_SIZE_V1: u64 = 56;
const PVH_VERSION: usize = 4;
const PVH_NR_MODULES: usize = 12;
const PVH_MODLIST_PADDR: usize = 16;
const PVH_CMDLINE_PADDR: usize = 24;
const PVH_RSDP_PADDR: usize = 32;
const PVH_MEMMAP_PADDR: usize = 40;
const PVH_MEMMAP_ENTRIES: usize = 48;
const PVH_MODULE_SIZE: u64 = 32;
const PVH_MEMMAP_ENTRY_SIZE: usize = 24;
const PVH_MEMMAP_MAX: u64 = 1024;

impl BootInfo {
    /// A `BootInfo` with nothing in it, for when the boot structure is unusable.
    pub fn empty(protocol: Protocol) -> BootInfo {
        BootInfo {
            protocol,
            cmdline: &[],
            initrd: None,
            memmap: MemMap::EMPTY,
            rsdp: None,
            boot_struct: Region { addr: 0, size: 0 },
        }
    }

    /// Reads the boot structure at `addr` as the given protocol describes it.
    pub fn parse(protocol: Protocol, addr: u64) -> Result<BootInfo, &'static str> {
        match protocol {
            Protocol::Linux64 => Self::from_zero_page(addr),
            Protocol::Pvh => Self::from_pvh(addr),
        }
    }

    fn from_zero_page(addr: u64) -> Result<BootInfo, &'static str> {
        // SAFETY: the Linux boot protocol hands the guest a 4 KiB boot_params
        // page that nothing else writes; the guest image does not overlap it.
        let zp = unsafe { phys_bytes(addr, ZP_SIZE) }.ok_or("bad-boot-params-address")?;
        let field32 = |offset| u64::from(u32_at(zp, offset).unwrap_or(0));

        let cmdline_addr = field32(ZP_CMD_LINE_PTR) | field32(ZP_EXT_CMD_LINE_PTR) << 32;
        let initrd = Region {
            addr: field32(ZP_RAMDISK_IMAGE) | field32(ZP_EXT_RAMDISK_IMAGE) << 32,
            size: field32(ZP_RAMDISK_SIZE) | field32(ZP_EXT_RAMDISK_SIZE) << 32,
        };
        let entries = usize::from(u8_at(zp, ZP_E820_ENTRIES).unwrap_or(0)).min(ZP_E820_MAX);
        let table = &zp[ZP_E820_TABLE..ZP_E820_TABLE + entries * ZP_E820_ENTRY_SIZE];
        let rsdp = u64_at(zp, ZP_ACPI_RSDP_ADDR).unwrap_or(0);

        Ok(BootInfo {
            protocol: Protocol::Linux64,
            cmdline: read_cmdline(cmdline_addr),
            initrd: (initrd.size != 0).then_some(initrd),
            memmap: MemMap {
                table,
                entry_size: ZP_E820_ENTRY_SIZE,
            },
            rsdp: (rsdp != 0).then_some(rsdp),
            boot_struct: Region {
                addr,
                size: ZP_SIZE,
            },
        })
    }

    fn from_pvh(addr: u64) -> Result<BootInfo, &'static str> {
        // SAFETY: PVH hands the guest an hvm_start_info that nothing else
        // writes. Version 0 is 40 bytes; read that much first to learn the version.
        let v0 = unsafe { phys_bytes(addr, PVH_SIZE_V0) }.ok_or("bad-start-info-address")?;
        if u32_at(v0, 0) != Some(PVH_MAGIC) {
            return Err("bad-start-info-magic");
        }
        let version = u32_at(v0, PVH_VERSION).unwrap_or(0);
        let size = if version >= 1 {
            PVH_SIZE_V1
        } else {
            PVH_SIZE_V0
        };
        // SAFETY: as above; version 1 and later are at least 56 bytes long.
        let info = unsafe { phys_bytes(addr, size) }.ok_or("bad-start-info-address")?;

        let initrd = if u32_at(info, PVH_NR_MODULES).unwrap_or(0) > 0 {
            let modlist = u64_at(info, PVH_MODLIST_PADDR).unwrap_or(0);
            // SAFETY: the module list is part of the start info the VMM wrote
            // for the guest; the first entry is 32 bytes: paddr, size, ...
            let module = unsafe { phys_bytes(modlist, PVH_MODULE_SIZE) };
            module.map(|m| Region {
                addr: u64_at(m, 0).unwrap_or(0),
                size: u64_at(m, 8).unwrap_or(0),
            })
        } else {
            None
        };

        let memmap = if version >= 1 {
            let entries =
                u64::from(u32_at(info, PVH_MEMMAP_ENTRIES).unwrap_or(0)).min(PVH_MEMMAP_MAX);
            let table_addr = u64_at(info, PVH_MEMMAP_PADDR).unwrap_or(0);
            // SAFETY: the memory map is part of the start info the VMM wrote.
            unsafe { phys_bytes(table_addr, entries * PVH_MEMMAP_ENTRY_SIZE as u64) }.map_or(
                MemMap::EMPTY,
                |table| MemMap {
                    table,
                    entry_size: PVH_MEMMAP_ENTRY_SIZE,
                },
            )
        } else {
            MemMap::EMPTY
        };
        let rsdp = u64_at(info, PVH_RSDP_PADDR).unwrap_or(0);

        Ok(BootInfo {
            protocol: Protocol::Pvh,
            cmdline: read_cmdline(u64_at(info, PVH_CMDLINE_PADDR).unwrap_or(0)),
            initrd: initrd.filter(|r| r.size != 0),
            memmap,
            rsdp: (rsdp != 0).then_some(rsdp),
            boot_struct: Region { addr, size },
        })
    }

    /// Whether overwriting `region` would destroy something this `BootInfo`
    /// still points to (the command line, the memory map, the boot structure).
    pub fn uses(&self, region: &Region) -> bool {
        // An absent command line is an empty slice that points nowhere.
        let cmdline = Region {
            addr: self.cmdline.as_ptr() as u64,
            size: match self.cmdline.len() {
                0 => 0,
                len => len as u64 + 1, // with its NUL
            },
        };
        [cmdline, self.memmap.location(), self.boot_struct]
            .iter()
            .any(|r| r.size != 0 && r.overlaps(region))
    }
}

/// The NUL-terminated command line at `addr`, without the NUL.
fn read_cmdline(addr: u64) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    // Never look past the identity map while searching for the NUL.
    let max = CMDLINE_MAX.min(crate::io::MAPPED_LIMIT.saturating_sub(addr));
    let mut len = 0;
    // SAFETY: the boot protocol points at a NUL-terminated command line the
    // VMM wrote for the guest; bytes are read one by one up to the NUL (or
    // `max`), all inside the identity map.
    while len < max && unsafe { *((addr + len) as *const u8) } != 0 {
        len += 1;
    }
    // SAFETY: the same command line, now of known length; nothing writes it.
    unsafe { phys_bytes(addr, len) }.unwrap_or(&[])
}
