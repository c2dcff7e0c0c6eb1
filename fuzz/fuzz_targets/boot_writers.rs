//! The boot writers, in `build_and_boot`'s order, with random but bounded configurations:
//! memory sizes (including past the MMIO hole), vCPU counts up to the MADT's limit, up to as many
//! virtio devices as there are interrupt lines (with any window and line), any command line, an
//! initrd, and kernel images whose headers are random (ELF program headers, bzImage setup
//! headers: `cmdline_size`, `initrd_addr_max`, `xloadflags`, ...). Every step may refuse its input
//! with an error; none may panic. What is written is checked: ACPI checksums, the command line in
//! guest memory, the initrd inside free low RAM.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nvmm_fuzz::ScratchFile;
use nvmm_vmm::device_manager::VirtioSlot;
use nvmm_vmm::{MIN_MEM_MIB, acpi, boot, kvm, layout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An address for a kernel segment: mostly in the first 64 MiB, sometimes anything.
#[derive(Debug, Clone, Copy)]
struct Phys(u64);

impl<'a> Arbitrary<'a> for Phys {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(if u.ratio(3u8, 4)? {
            u64::from(u.int_in_range(0u32..=64 << 20)?)
        } else {
            u64::arbitrary(u)?
        }))
    }
}

#[derive(Arbitrary, Debug)]
struct Segment {
    /// PT_LOAD (1), PT_NOTE (4) or anything.
    kind: u8,
    paddr: Phys,
    filesz: u16,
    memsz: u64,
    /// Taken from `memsz` as is, or bounded to a few MiB.
    wild_memsz: bool,
}

#[derive(Arbitrary, Debug)]
enum Kernel {
    Elf {
        entry: Phys,
        segments: Vec<Segment>,
        notes: Vec<u8>,
    },
    BzImage {
        setup_sects: u8,
        version: u16,
        loadflags: u8,
        code32_start: u32,
        initrd_addr_max: u32,
        xloadflags: u16,
        cmdline_size: u32,
        body_len: u16,
    },
    Garbage(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Slot {
    base: u32,
    size: u32,
    irq: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mem_mib: u32,
    vcpus: u8,
    kernel: Kernel,
    initrd: Option<u32>,
    slots: Vec<Slot>,
    /// Use the device manager's real slots instead of random ones.
    real_slots: bool,
    cmdline: String,
}

fn scratch(which: usize) -> &'static ScratchFile {
    static FILES: OnceLock<[ScratchFile; 2]> = OnceLock::new();
    &FILES.get_or_init(|| [ScratchFile::new("kernel"), ScratchFile::new("initrd")])[which]
}

fn elf(entry: u64, segments: &[Segment], notes: &[u8]) -> Vec<u8> {
    let segments = &segments[..segments.len().min(8)];
    let data_start = 64 + 56 * segments.len() as u64;
    let mut image = Vec::new();
    image.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    image.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    image.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    image.extend_from_slice(&1u32.to_le_bytes());
    image.extend_from_slice(&entry.to_le_bytes());
    image.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    image.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    image.extend_from_slice(&0u32.to_le_bytes());
    image.extend_from_slice(&64u16.to_le_bytes());
    image.extend_from_slice(&56u16.to_le_bytes());
    image.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    image.extend_from_slice(&[0; 6]);
    let mut offset = data_start;
    for segment in segments {
        let kind = match segment.kind % 4 {
            0 | 1 => 1,
            2 => 4,
            _ => u32::from(segment.kind),
        };
        let memsz = if segment.wild_memsz {
            segment.memsz
        } else {
            segment.memsz % (4 << 20)
        };
        let filesz = if kind == 4 {
            notes.len() as u64
        } else {
            u64::from(segment.filesz)
        };
        image.extend_from_slice(&kind.to_le_bytes());
        image.extend_from_slice(&7u32.to_le_bytes());
        image.extend_from_slice(&offset.to_le_bytes());
        image.extend_from_slice(&segment.paddr.0.to_le_bytes());
        image.extend_from_slice(&segment.paddr.0.to_le_bytes());
        image.extend_from_slice(&filesz.to_le_bytes());
        image.extend_from_slice(&memsz.to_le_bytes());
        image.extend_from_slice(&0x1000u64.to_le_bytes());
        offset += filesz;
    }
    for segment in segments {
        if segment.kind % 4 == 2 {
            image.extend_from_slice(notes);
        } else {
            image.resize(image.len() + usize::from(segment.filesz), 0x90);
        }
    }
    image
}

#[allow(clippy::too_many_arguments)]
fn bzimage(
    setup_sects: u8,
    version: u16,
    loadflags: u8,
    code32_start: u32,
    initrd_addr_max: u32,
    xloadflags: u16,
    cmdline_size: u32,
    body_len: u16,
) -> Vec<u8> {
    let setup_len = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
    let mut image = vec![0u8; setup_len.max(0x280) + usize::from(body_len)];
    let mut put = |offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0x1f1, &[setup_sects]);
    put(0x1fe, &0xaa55u16.to_le_bytes());
    put(0x202, b"HdrS");
    put(0x206, &version.to_le_bytes());
    put(0x211, &[loadflags]);
    put(0x214, &code32_start.to_le_bytes());
    put(0x22c, &initrd_addr_max.to_le_bytes());
    put(0x236, &xloadflags.to_le_bytes());
    put(0x238, &cmdline_size.to_le_bytes());
    image
}

fn checksum_ok(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .expect("a table the writer wrote is in guest memory");
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// The RSDP's and every table's checksum, following RSDP -> XSDT -> FADT -> DSDT, MADT.
fn check_acpi(mem: &GuestMemoryMmap, rsdp: GuestAddress) {
    let read_u32 = |addr: u64| {
        mem.read_obj::<u32>(GuestAddress(addr))
            .expect("table in RAM")
    };
    let read_u64 = |addr: u64| {
        mem.read_obj::<u64>(GuestAddress(addr))
            .expect("table in RAM")
    };
    assert!(checksum_ok(mem, rsdp.0, 20), "RSDP checksum");
    assert!(checksum_ok(mem, rsdp.0, 36), "RSDP extended checksum");
    let xsdt = read_u64(rsdp.0 + 24);
    let xsdt_len = read_u32(xsdt + 4) as usize;
    assert!(checksum_ok(mem, xsdt, xsdt_len), "XSDT checksum");
    for entry in 0..(xsdt_len as u64 - 36) / 8 {
        let table = read_u64(xsdt + 36 + 8 * entry);
        assert!(
            (layout::ACPI_START..layout::ACPI_END).contains(&table),
            "table in the ACPI area"
        );
        assert!(checksum_ok(mem, table, read_u32(table + 4) as usize));
    }
    let fadt = read_u64(xsdt + 36);
    let dsdt = read_u64(fadt + 140);
    assert!(
        checksum_ok(mem, dsdt, read_u32(dsdt + 4) as usize),
        "DSDT checksum"
    );
}

fuzz_target!(|input: Input| {
    // Bounded as validate_config and check_vcpu_count bound them: at least MIN_MEM_MIB, vCPUs
    // 1..=MAX_VCPUS, and as many virtio devices as there are interrupt lines.
    let mem_mib = MIN_MEM_MIB + u64::from(input.mem_mib % (64 << 10));
    let mem_bytes = mem_mib << 20;
    let vcpus = 1 + input.vcpus % kvm::MAX_VCPUS;
    let max_slots = layout::irqs::VIRTIO.len();
    let slots: Vec<VirtioSlot> = if input.real_slots {
        (0..input.slots.len().min(max_slots))
            .map(|index| VirtioSlot {
                base: layout::VIRTIO_MMIO_START + index as u64 * 0x1000,
                size: 0x1000,
                irq: layout::irqs::VIRTIO[index],
            })
            .collect()
    } else {
        input
            .slots
            .iter()
            .take(max_slots)
            .map(|slot| VirtioSlot {
                base: u64::from(slot.base),
                size: u64::from(slot.size),
                irq: slot.irq,
            })
            .collect()
    };

    // As kvm::create_guest_memory maps it, without the huge-page hint (which only costs the
    // fuzzer time: every run would fault in and zero 2 MiB pages).
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_bytes)
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&regions).expect("anonymous guest memory");

    let image = match &input.kernel {
        Kernel::Elf {
            entry,
            segments,
            notes,
        } => elf(entry.0, segments, notes),
        &Kernel::BzImage {
            setup_sects,
            version,
            loadflags,
            code32_start,
            initrd_addr_max,
            xloadflags,
            cmdline_size,
            body_len,
        } => bzimage(
            setup_sects,
            version,
            loadflags,
            code32_start,
            initrd_addr_max,
            xloadflags,
            cmdline_size,
            body_len,
        ),
        Kernel::Garbage(bytes) => bytes.clone(),
    };
    let Ok(kernel) = boot::load_kernel(&mem, &scratch(0).with_contents(&image)) else {
        return;
    };
    let initrd = match input.initrd {
        Some(len) => {
            let path = scratch(1).with_len(u64::from(len % (256 << 10)));
            match boot::load_initrd(&mem, &kernel, &path, mem_bytes) {
                Ok(location) => {
                    let end = location.addr.0 + location.size;
                    assert!(end <= layout::low_ram_end(mem_bytes), "initrd in low RAM");
                    Some(location)
                }
                Err(_) => return,
            }
        }
        None => None,
    };
    let Ok(cmdline) = boot::build_cmdline(&kernel, &slots, &input.cmdline) else {
        return;
    };
    let rsdp = match acpi::write_acpi_tables(&mem, vcpus, &slots) {
        Ok(rsdp) => {
            check_acpi(&mem, rsdp);
            rsdp
        }
        Err(_) => return,
    };
    if boot::write_long_mode_tables(&mem).is_err() {
        return;
    }
    if let Ok(entry) = boot::write_boot_params(&mem, &kernel, &cmdline, initrd, mem_bytes, rsdp) {
        let text = cmdline
            .as_cstring()
            .expect("a built command line has no NUL");
        let mut written = vec![0u8; text.as_bytes_with_nul().len()];
        mem.read_slice(&mut written, GuestAddress(layout::CMDLINE_START))
            .expect("the command line is in guest memory");
        assert_eq!(written, text.as_bytes_with_nul());
        let rsdp_field: u64 = mem
            .read_obj(GuestAddress(entry.boot_params.0 + 0x70))
            .expect("boot_params in guest memory");
        assert_eq!(rsdp_field, rsdp.0);
    }
});
