//! ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT}, written at [`layout::ACPI_START`].
//!
//! The platform is "hardware-reduced" (no PM1 blocks, no SCI): power-off goes through the FADT's
//! sleep control register and `\_S5_`, reboot through its reset register, both served by
//! [`nvmm_devices::legacy::AcpiPowerRegisters`]. The MADT lists one local APIC per vCPU and the
//! IOAPIC; the DSDT describes COM1. Later devices (virtio-mmio) are added to the DSDT here.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use nvmm_devices::legacy::{AcpiPowerRegisters, RESET_VALUE, S5_SLEEP_TYPE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device_manager::VirtioSlot;
use crate::layout::{self, irqs, ports};

const OEM_ID: [u8; 6] = *b"NVMM  ";
const OEM_REVISION: u32 = 1;

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes the tables for `vcpus` processors and the `virtio` devices; returns the RSDP address.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[VirtioSlot],
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter::new(mem);
    let rsdp_addr = writer.reserve(Rsdp::len() as u64);

    let dsdt = writer.write(&dsdt(virtio))?;
    let fadt = writer.write(&fadt(dsdt))?;
    let madt = writer.write(&madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"NVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    let xsdt = writer.write(&xsdt)?;

    writer.write_at(rsdp_addr, &Rsdp::new(OEM_ID, xsdt.0))?;
    Ok(rsdp_addr)
}

/// The DSDT: `\_S5_` for power-off, COM1 (so guests that enumerate devices through ACPI find
/// the UART without legacy probing), and one `LNRO0005` device per virtio-mmio window, which
/// Linux's virtio_mmio driver matches on kernels without command-line devices.
fn dsdt(virtio: &[VirtioSlot]) -> Sdt {
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(
        ports::COM1 as u16,
        ports::COM1 as u16,
        1,
        ports::COM1_LEN as u8,
    );
    let com1_irq = aml::Interrupt::new(true, true, false, false, irqs::COM1);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    com1.to_aml_bytes(&mut body);
    for (index, slot) in virtio.iter().enumerate() {
        body.extend_from_slice(&virtio_device(index, slot));
    }

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"NVMMDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt
}

/// `Device (\_SB.Vnnn) { _HID "LNRO0005", _UID n, _CCA 1, _CRS { Memory32Fixed, Interrupt } }`.
fn virtio_device(index: usize, slot: &VirtioSlot) -> Vec<u8> {
    let memory = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
    let resources = aml::ResourceTemplate::new(vec![&memory, &irq]);
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid_value = index;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let path = format!("_SB_.V{index:03}");
    let mut bytes = Vec::new();
    aml::Device::new(path.as_str().into(), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt: GuestAddress) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"NVMMFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed power/sleep buttons: power requests arrive through the registers below.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt.0);
    fadt.sleep_control_reg =
        io_register(ports::ACPI_POWER + AcpiPowerRegisters::SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg =
        io_register(ports::ACPI_POWER + AcpiPowerRegisters::SLEEP_STATUS_OFFSET);
    fadt.reset_reg = io_register(ports::ACPI_POWER + AcpiPowerRegisters::RESET_OFFSET);
    fadt.reset_value = RESET_VALUE;
    fadt.finalize()
}

fn madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"NVMMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    madt
}

/// Places tables one after another in the ACPI area.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl<'a> TableWriter<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            next: layout::ACPI_START,
        }
    }

    fn reserve(&mut self, len: u64) -> GuestAddress {
        let addr = GuestAddress(self.next);
        // Tables are 16-byte aligned (the RSDP must be, the others like it).
        self.next = (self.next + len).next_multiple_of(16);
        addr
    }

    fn write(&mut self, table: &dyn Aml) -> Result<GuestAddress, AcpiError> {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        let addr = self.reserve(bytes.len() as u64);
        self.write_bytes(addr, &bytes)?;
        Ok(addr)
    }

    fn write_at(&mut self, addr: GuestAddress, table: &dyn Aml) -> Result<(), AcpiError> {
        let mut bytes = Vec::new();
        table.to_aml_bytes(&mut bytes);
        self.write_bytes(addr, &bytes)
    }

    fn write_bytes(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), AcpiError> {
        let end = addr.0 + bytes.len() as u64;
        if end > layout::ACPI_END {
            return Err(AcpiError::TooLarge {
                needed: end - layout::ACPI_START,
                available: layout::ACPI_END - layout::ACPI_START,
            });
        }
        self.mem.write_slice(bytes, addr).map_err(AcpiError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn checksum_ok(mem: &GuestMemoryMmap, addr: u64) -> bool {
        let len = read_u32(mem, addr + 4) as usize;
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, 4, &[]).unwrap();
        assert_eq!(rsdp.0, layout::ACPI_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");

        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        assert!(checksum_ok(&mem, xsdt));
        let entries = (read_u32(&mem, xsdt + 4) as u64 - 36) / 8;
        assert_eq!(entries, 2);
        let fadt: u64 = mem.read_obj(GuestAddress(xsdt + 36)).unwrap();
        let madt: u64 = mem.read_obj(GuestAddress(xsdt + 44)).unwrap();
        assert!(checksum_ok(&mem, fadt) && checksum_ok(&mem, madt));

        // Hardware-reduced, sleep control at the power registers' port.
        assert_ne!(read_u32(&mem, fadt + 112) & (1 << 20), 0);
        let sleep_port: u64 = mem.read_obj(GuestAddress(fadt + 244 + 4)).unwrap();
        assert_eq!(sleep_port, ports::ACPI_POWER);

        // One local APIC per vCPU (type 0, 8 bytes each) after the 44-byte header.
        let madt_len = read_u32(&mem, madt + 4) as u64;
        let mut cpus = 0;
        let mut off = 44;
        while off < madt_len {
            let kind: u8 = mem.read_obj(GuestAddress(madt + off)).unwrap();
            let len: u8 = mem.read_obj(GuestAddress(madt + off + 1)).unwrap();
            cpus += u32::from(kind == 0);
            off += u64::from(len.max(1));
        }
        assert_eq!(cpus, 4);

        let dsdt: u64 = mem.read_obj(GuestAddress(fadt + 140)).unwrap();
        assert!(checksum_ok(&mem, dsdt));
        let len = read_u32(&mem, dsdt + 4) as usize;
        let mut body = vec![0u8; len];
        mem.read_slice(&mut body, GuestAddress(dsdt)).unwrap();
        let s5 = body.windows(4).position(|w| w == b"_S5_").unwrap();
        // Name(_S5_, Package(1) { 5 }): PackageOp, PkgLength, NumElements, BytePrefix, 5.
        assert_eq!(&body[s5 + 4..s5 + 9], &[0x12, 4, 1, 0x0a, S5_SLEEP_TYPE]);
    }

    #[test]
    fn virtio_devices_are_in_the_dsdt() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let slots = crate::device_manager::test_slots(2);
        let rsdp = write_acpi_tables(&mem, 1, &slots).unwrap();
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let fadt: u64 = mem.read_obj(GuestAddress(xsdt + 36)).unwrap();
        let dsdt: u64 = mem.read_obj(GuestAddress(fadt + 140)).unwrap();
        assert!(checksum_ok(&mem, dsdt));
        let len = read_u32(&mem, dsdt + 4) as usize;
        let mut body = vec![0u8; len];
        mem.read_slice(&mut body, GuestAddress(dsdt)).unwrap();
        let count = body.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        // Memory32Fixed descriptor (0x86, length 9, read-write) with the second window's base.
        let mut second = vec![0x86, 9, 0, 1];
        second.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        second.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(body.windows(second.len()).any(|w| w == second.as_slice()));
        assert!(body.windows(4).any(|w| w == b"V001"));
    }

    #[test]
    fn many_vcpus_still_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(write_acpi_tables(&mem, 254, &[]).is_ok());
    }
}
