//! Just enough ACPI to count CPUs (MADT) and to power off (FADT + the DSDT's
//! `\_S5_` package), read the way Linux reads them.
//!
//! Tables are parsed from byte slices with bounds-checked readers, so a short
//! or malformed table is reported as missing rather than read past its end.

use crate::bootinfo::BootInfo;
use crate::io::{self, phys_bytes, u8_at, u32_at, u64_at};

/// Every system description table starts with this 36-byte header.
const SDT_HEADER_LEN: usize = 36;
/// Larger tables are taken as corrupt (real DSDTs are well under this).
const SDT_MAX_LEN: u32 = 16 << 20;

/// Where legacy firmware leaves the RSDP when nobody says where it is.
const RSDP_SCAN_START: u64 = 0xe0000;
const RSDP_SCAN_END: u64 = 0x100000;
const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: u64 = 20;
const RSDP_V2_LEN: u64 = 36;

/// The root table (XSDT, or RSDT on ACPI 1.0 firmware), ready for lookups.
pub struct Tables {
    root: &'static [u8],
    /// 8 for the XSDT's 64-bit pointers, 4 for the RSDT's 32-bit ones.
    pointer_size: usize,
}

impl Tables {
    /// Finds the RSDP (from the boot protocol, else by scanning the BIOS area)
    /// and its root table.
    pub fn find(boot: &BootInfo) -> Result<Tables, &'static str> {
        let rsdp_addr = boot.rsdp.or_else(scan_for_rsdp).ok_or("no-rsdp")?;
        // SAFETY: the RSDP is firmware memory that nothing writes.
        let rsdp = unsafe { phys_bytes(rsdp_addr, RSDP_V1_LEN) }.ok_or("bad-rsdp")?;
        if !is_rsdp(rsdp) {
            return Err("bad-rsdp");
        }
        if u8_at(rsdp, 15).unwrap_or(0) >= 2 {
            // SAFETY: as above; revision 2 and later RSDPs are 36 bytes.
            let rsdp = unsafe { phys_bytes(rsdp_addr, RSDP_V2_LEN) }.ok_or("bad-rsdp")?;
            let xsdt = u64_at(rsdp, 24).unwrap_or(0);
            if checksum_ok(rsdp)
                && let Some(root) = load_table(xsdt)
            {
                return Ok(Tables {
                    root,
                    pointer_size: 8,
                });
            }
        }
        let rsdt = u64::from(u32_at(rsdp, 16).unwrap_or(0));
        let root = load_table(rsdt).ok_or("bad-rsdt")?;
        Ok(Tables {
            root,
            pointer_size: 4,
        })
    }

    /// The first table with this signature (such as `b"APIC"` for the MADT).
    pub fn table(&self, signature: &[u8; 4]) -> Option<&'static [u8]> {
        self.root[SDT_HEADER_LEN..]
            .chunks_exact(self.pointer_size)
            .map(|pointer| match self.pointer_size {
                8 => u64_at(pointer, 0).unwrap_or(0),
                _ => u64::from(u32_at(pointer, 0).unwrap_or(0)),
            })
            .filter_map(load_table)
            .find(|table| table.starts_with(signature))
    }
}

/// Looks for the RSDP on 16-byte boundaries in 0xe0000..0x100000.
fn scan_for_rsdp() -> Option<u64> {
    // SAFETY: the BIOS area is firmware memory (or unbacked, reading as
    // 0xff) that nothing writes while the guest runs.
    let area = unsafe { phys_bytes(RSDP_SCAN_START, RSDP_SCAN_END - RSDP_SCAN_START) }?;
    (0..area.len())
        .step_by(16)
        .find(|&offset| is_rsdp(&area[offset..]))
        .map(|offset| RSDP_SCAN_START + offset as u64)
}

/// Whether `bytes` starts with a valid ACPI 1.0 RSDP (signature and checksum of the first 20 bytes).
fn is_rsdp(bytes: &[u8]) -> bool {
    bytes.len() >= RSDP_V1_LEN as usize
        && bytes.starts_with(RSDP_SIGNATURE)
        && checksum_ok(&bytes[..RSDP_V1_LEN as usize])
}

/// ACPI checksums: all bytes of the structure sum to zero.
fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

/// The whole table at `addr`, if it has a sane length and a valid checksum.
fn load_table(addr: u64) -> Option<&'static [u8]> {
    // SAFETY: ACPI tables are firmware memory that nothing writes.
    let header = unsafe { phys_bytes(addr, SDT_HEADER_LEN as u64) }?;
    let len = u32_at(header, 4)?;
    if (len as usize) < SDT_HEADER_LEN || len > SDT_MAX_LEN {
        return None;
    }
    // SAFETY: as above, for the length the header gives.
    let table = unsafe { phys_bytes(addr, u64::from(len)) }?;
    checksum_ok(table).then_some(table)
}

/// The local APIC IDs of the enabled processors, as listed by the MADT.
pub struct Madt {
    /// Physical address of the local APIC registers.
    pub lapic_addr: u64,
    /// Number of enabled processors.
    pub enabled: usize,
    ids: [u32; Madt::MAX_IDS],
}

impl Madt {
    /// How many APIC IDs are remembered; processors beyond are counted only.
    pub const MAX_IDS: usize = 256;

    const ENTRIES_OFFSET: usize = 44;
    const LOCAL_APIC: u8 = 0;
    const LOCAL_APIC_ADDRESS_OVERRIDE: u8 = 5;
    const LOCAL_X2APIC: u8 = 9;
    const ENABLED: u32 = 1 << 0;

    /// Reads the MADT ("APIC").
    pub fn find(tables: &Tables) -> Option<Madt> {
        let madt = tables.table(b"APIC")?;
        let mut result = Madt {
            lapic_addr: u64::from(u32_at(madt, SDT_HEADER_LEN)?),
            enabled: 0,
            ids: [0; Madt::MAX_IDS],
        };
        let mut offset = Self::ENTRIES_OFFSET;
        while let (Some(kind), Some(len)) = (u8_at(madt, offset), u8_at(madt, offset + 1)) {
            if len < 2 {
                return None; // Malformed: the walk would never advance.
            }
            let entry = madt.get(offset..offset + usize::from(len))?;
            match kind {
                Self::LOCAL_APIC => {
                    let id = u32::from(u8_at(entry, 3)?);
                    result.add_if_enabled(id, u32_at(entry, 4)?);
                }
                Self::LOCAL_X2APIC => {
                    result.add_if_enabled(u32_at(entry, 4)?, u32_at(entry, 8)?);
                }
                Self::LOCAL_APIC_ADDRESS_OVERRIDE => {
                    result.lapic_addr = u64_at(entry, 4)?;
                }
                _ => {}
            }
            offset += usize::from(len);
        }
        Some(result)
    }

    fn add_if_enabled(&mut self, id: u32, flags: u32) {
        if flags & Self::ENABLED == 0 {
            return;
        }
        if let Some(slot) = self.ids.get_mut(self.enabled) {
            *slot = id;
        }
        self.enabled += 1;
    }

    /// The APIC IDs remembered (at most [`Madt::MAX_IDS`]).
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.enabled.min(Self::MAX_IDS)]
    }
}

/// An ACPI Generic Address Structure, reduced to what a one-byte write needs.
pub struct GenericAddress {
    space: u8,
    address: u64,
}

const SPACE_SYSTEM_MEMORY: u8 = 0;
const SPACE_SYSTEM_IO: u8 = 1;

impl GenericAddress {
    fn parse(bytes: &[u8]) -> Option<GenericAddress> {
        Some(GenericAddress {
            space: u8_at(bytes, 0)?,
            address: u64_at(bytes, 4)?,
        })
    }

    /// Writes one byte to the register.
    ///
    /// # Safety
    /// The register must be one whose write the caller intends (here, a sleep
    /// control register: the write ends the VM).
    unsafe fn write_u8(&self, value: u8) -> Result<(), &'static str> {
        match self.space {
            SPACE_SYSTEM_IO => {
                let port = u16::try_from(self.address).map_err(|_| "bad-sleep-register")?;
                // SAFETY: the caller wants this write.
                unsafe { io::outb(port, value) };
            }
            SPACE_SYSTEM_MEMORY if self.address < io::MAPPED_LIMIT => {
                // SAFETY: the caller wants this write; the address is mapped.
                unsafe { io::mmio_write8(self.address, value) };
            }
            _ => return Err("bad-sleep-register"),
        }
        Ok(())
    }
}

// FADT offsets and bits.
const FADT_DSDT: usize = 40;
const FADT_PM1A_CNT_BLK: usize = 64;
const FADT_PM1B_CNT_BLK: usize = 68;
const FADT_FLAGS: usize = 112;
const FADT_X_DSDT: usize = 140;
const FADT_X_PM1A_CNT_BLK: usize = 172;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const GAS_LEN: usize = 12;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

// Sleep control bits.
const PM1_SLP_TYP_SHIFT: u16 = 10;
const PM1_SLP_EN: u16 = 1 << 13;
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;

/// How to enter the S5 (soft off) sleep state on this machine.
pub enum SoftOff {
    /// Hardware-reduced ACPI: one byte to the FADT's sleep control register.
    SleepControl {
        register: GenericAddress,
        slp_typ: u8,
    },
    /// Classic ACPI: 16 bits to the PM1a (and PM1b, if any) control ports.
    Pm1 {
        pm1a: u16,
        pm1b: Option<u16>,
        slp_typ_a: u8,
        slp_typ_b: u8,
    },
}

impl SoftOff {
    /// Reads the FADT and the DSDT's `\_S5_` to learn how to power off.
    pub fn find(boot: &BootInfo) -> Result<SoftOff, &'static str> {
        let tables = Tables::find(boot)?;
        let fadt = tables.table(b"FACP").ok_or("no-fadt")?;
        let x_dsdt = u64_at(fadt, FADT_X_DSDT).unwrap_or(0);
        let dsdt_addr = if x_dsdt != 0 {
            x_dsdt
        } else {
            u64::from(u32_at(fadt, FADT_DSDT).unwrap_or(0))
        };
        let dsdt = load_table(dsdt_addr).ok_or("no-dsdt")?;
        let (slp_typ_a, slp_typ_b) = find_s5(&dsdt[SDT_HEADER_LEN..]).ok_or("no-s5")?;

        let flags = u32_at(fadt, FADT_FLAGS).unwrap_or(0);
        if flags & FADT_HW_REDUCED_ACPI != 0 {
            let register = fadt
                .get(FADT_SLEEP_CONTROL_REG..FADT_SLEEP_CONTROL_REG + GAS_LEN)
                .and_then(GenericAddress::parse)
                .filter(|gas| gas.address != 0)
                .ok_or("no-sleep-control-register")?;
            return Ok(SoftOff::SleepControl {
                register,
                slp_typ: slp_typ_a,
            });
        }

        let pm1a = match u32_at(fadt, FADT_PM1A_CNT_BLK).unwrap_or(0) {
            // ACPI 2.0+ firmware may give the port only in the extended field.
            0 => fadt
                .get(FADT_X_PM1A_CNT_BLK..FADT_X_PM1A_CNT_BLK + GAS_LEN)
                .and_then(GenericAddress::parse)
                .filter(|gas| gas.space == SPACE_SYSTEM_IO)
                .map_or(0, |gas| gas.address),
            port => u64::from(port),
        };
        let pm1a = u16::try_from(pm1a)
            .ok()
            .filter(|&port| port != 0)
            .ok_or("no-pm1a-control")?;
        let pm1b = u32_at(fadt, FADT_PM1B_CNT_BLK)
            .and_then(|port| u16::try_from(port).ok())
            .filter(|&port| port != 0);
        Ok(SoftOff::Pm1 {
            pm1a,
            pm1b,
            slp_typ_a,
            slp_typ_b,
        })
    }

    /// Writes the sleep registers. On a working machine this does not return
    /// for long: the VM ends. It returns an error if the register is unusable.
    pub fn enter(&self) -> Result<(), &'static str> {
        match self {
            SoftOff::SleepControl { register, slp_typ } => {
                let value = (slp_typ & 0x7) << SLEEP_CONTROL_SLP_TYP_SHIFT | SLEEP_CONTROL_SLP_EN;
                // SAFETY: entering S5 is exactly what the guest wants now.
                unsafe { register.write_u8(value) }
            }
            SoftOff::Pm1 {
                pm1a,
                pm1b,
                slp_typ_a,
                slp_typ_b,
            } => {
                let value =
                    |slp_typ: u8| u16::from(slp_typ & 0x7) << PM1_SLP_TYP_SHIFT | PM1_SLP_EN;
                // SAFETY: entering S5 is exactly what the guest wants now.
                unsafe { io::outw(*pm1a, value(*slp_typ_a)) };
                if let Some(pm1b) = pm1b {
                    // SAFETY: as above, for the second register block.
                    unsafe { io::outw(*pm1b, value(*slp_typ_b)) };
                }
                Ok(())
            }
        }
    }
}

/// Finds `Name(_S5_, Package() { SLP_TYPa, SLP_TYPb, ... })` in AML and
/// returns the two values (SLP_TYPb defaults to SLP_TYPa).
fn find_s5(aml: &[u8]) -> Option<(u8, u8)> {
    const PACKAGE_OP: u8 = 0x12;
    aml.windows(4)
        .enumerate()
        .filter(|(_, window)| *window == b"_S5_")
        .find_map(|(at, _)| {
            let rest = &aml[at + 4..];
            if *rest.first()? != PACKAGE_OP {
                return None; // A reference to _S5_, not its definition.
            }
            // PkgLength: bits 7..6 of the lead byte count the bytes that follow it.
            let pkg_length_bytes = 1 + usize::from(*rest.get(1)? >> 6);
            // Then NumElements (one byte), then the elements.
            let elements = rest.get(1 + pkg_length_bytes + 1..)?;
            let (slp_typ_a, elements) = aml_small_integer(elements)?;
            let slp_typ_b = aml_small_integer(elements).map_or(slp_typ_a, |(value, _)| value);
            Some((slp_typ_a, slp_typ_b))
        })
}

/// Decodes one small integer package element: BytePrefix + byte, ZeroOp,
/// OneOp, or (as some firmware writes it) a plain byte.
fn aml_small_integer(aml: &[u8]) -> Option<(u8, &[u8])> {
    const ZERO_OP: u8 = 0x00;
    const ONE_OP: u8 = 0x01;
    const BYTE_PREFIX: u8 = 0x0a;
    match *aml.first()? {
        BYTE_PREFIX => Some((*aml.get(1)?, aml.get(2..)?)),
        ZERO_OP => Some((0, &aml[1..])),
        ONE_OP => Some((1, &aml[1..])),
        plain => Some((plain, &aml[1..])),
    }
}
