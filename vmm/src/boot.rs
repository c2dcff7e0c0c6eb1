//! Loading a kernel the way Linux expects on x86_64: ELF vmlinux or bzImage, an initrd at the
//! top of low RAM, the command line, and `boot_params` (the "zero page") with the e820 map.
//! The vCPU then enters the 64-bit entry point with RSI pointing at `boot_params`, exactly as
//! Firecracker starts a vmlinux.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::device_manager::VirtioSlot;
use crate::{kvm, layout};

/// The command line nvmm always gives the kernel, before the user's:
/// - `console=ttyS0`: kernel messages and the first console on the 8250 UART (COM1). With
///   `--console virtio` nothing more is added: the virtio console (hvc0) carries the
///   interactive login (a getty there, which the NixOS module sets up), while early boot and
///   kernel messages stay on ttyS0; both reach the terminal.
/// - `reboot=k`: reboot through the i8042 reset line (0xFE to port 0x64), which ends the VM.
/// - `panic=1`: reboot one second after a kernel panic, so a crashed guest ends the VM too.
/// - `pci=off`: there is no PCI bus; skip probing for one.
/// - `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`: the i8042 has a keyboard port only,
///   is not described by PnP, and needs no further probing.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Command line size when the kernel does not state one (an ELF vmlinux): Linux's
/// `COMMAND_LINE_SIZE` on x86, including the terminating NUL.
const DEFAULT_CMDLINE_CAPACITY: usize = 2048;
/// Highest initrd address when the kernel does not state one (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// Where a bzImage's setup header starts (boot protocol: offset 0x1f1 of the file).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// The 64-bit entry of a bzImage is 0x200 bytes into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit saying the kernel has that 64-bit entry.
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 0x1000;

/// Errors while loading the kernel and writing boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Cannot open or read the kernel.
    #[error("cannot read kernel {}", .path.display())]
    ReadKernel {
        /// Kernel path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{} is neither an ELF vmlinux nor a bzImage", .0.display())]
    UnknownKernelFormat(PathBuf),
    /// A bzImage without a 64-bit entry point.
    #[error("{} is a bzImage without a 64-bit entry point (xloadflags lacks XLF_KERNEL_64)", .0.display())]
    NoLongModeEntry(PathBuf),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {}", .path.display())]
    LoadKernel {
        /// Kernel path.
        path: PathBuf,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Cannot open or read the initrd.
    #[error("cannot read initrd {}", .path.display())]
    ReadInitrd {
        /// Initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of usable low RAM.
    #[error(
        "initrd {} is {size} bytes but only {available} bytes are free above the kernel",
        .path.display()
    )]
    InitrdTooLarge {
        /// Initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        available: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {} into guest memory", .path.display())]
    CopyInitrd {
        /// Initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length including nvmm's defaults.
        len: usize,
        /// The kernel's limit (excluding the NUL).
        max: usize,
    },
    /// The command line is malformed (e.g. contains a NUL byte).
    #[error("invalid kernel command line")]
    InvalidCmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing boot_params failed.
    #[error("cannot write boot_params into guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// Writing the boot page tables or GDT failed.
    #[error("cannot write the boot page tables into guest memory")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
}

/// What the vCPUs need to know after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// Address of `boot_params`, passed in RSI.
    pub boot_params: GuestAddress,
}

/// A loaded kernel image, before boot_params are written.
#[derive(Debug)]
pub struct LoadedKernel {
    entry: GuestAddress,
    end: u64,
    setup_header: Option<setup_header>,
}

/// Loads an ELF vmlinux at its physical addresses, or a bzImage's protected-mode code at
/// `code32_start`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    let is_elf = read_magic(&mut file, &mut magic).map_err(read_err)? && magic == *b"\x7fELF";
    let is_bzimage = !is_elf && has_bzimage_header(&mut file).map_err(read_err)?;
    let load_err = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    // Where the image goes, told to guest memory before it is copied. A file these cannot
    // read gets no advice; the loader says what is wrong with it.
    let copies = if is_elf {
        elf_copy_ranges(&mut file).unwrap_or_default()
    } else if is_bzimage {
        bzimage_copy_range(&mut file).into_iter().collect()
    } else {
        Vec::new()
    };
    for range in copies {
        kvm::small_pages_at_edges(mem, range);
    }
    if is_elf {
        let result = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
        Ok(LoadedKernel {
            entry: result.kernel_load,
            end: result.kernel_end,
            setup_header: None,
        })
    } else if is_bzimage {
        let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
        let header = result
            .setup_header
            .ok_or_else(|| BootError::UnknownKernelFormat(path.to_owned()))?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::NoLongModeEntry(path.to_owned()));
        }
        Ok(LoadedKernel {
            entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            end: result.kernel_end,
            setup_header: Some(header),
        })
    } else {
        Err(BootError::UnknownKernelFormat(path.to_owned()))
    }
}

/// Where `Elf::load` copies an ELF kernel: each loadable segment's bytes in the file, at its
/// physical address (the zero-filled rest of a segment is left to fresh memory).
fn elf_copy_ranges(file: &mut File) -> std::io::Result<Vec<Range<u64>>> {
    let mut header = Elf64_Ehdr::default();
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(header.as_mut_slice())?;
    file.seek(SeekFrom::Start(header.e_phoff))?;
    let mut ranges = Vec::new();
    for _ in 0..header.e_phnum {
        let mut segment = Elf64_Phdr::default();
        file.read_exact(segment.as_mut_slice())?;
        if segment.p_type == PT_LOAD {
            let start = segment.p_paddr;
            ranges.push(start..start.saturating_add(segment.p_filesz));
        }
    }
    Ok(ranges)
}

/// Where `BzImage::load` copies a bzImage's protected-mode kernel: everything after the
/// setup sectors, to `code32_start`.
fn bzimage_copy_range(file: &mut File) -> std::io::Result<Range<u64>> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))?;
    file.read_exact(header.as_mut_slice())?;
    // The boot protocol's rule for a zero count.
    let setup_sectors = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let start = u64::from(header.code32_start);
    Ok(start..start.saturating_add(len.saturating_sub((setup_sectors + 1) * 512)))
}

fn has_bzimage_header(file: &mut File) -> std::io::Result<bool> {
    // "HdrS" at 0x202 marks a kernel with a boot-protocol setup header.
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    Ok(read_magic(file, &mut magic)? && u32::from_le_bytes(magic) == HDRS_MAGIC)
}

/// Fills `buf` from the file's position: `false` if the file ends first (too short to be that
/// format). Other errors stay errors: a directory or a failing disk is not "another format".
fn read_magic(file: &mut File, buf: &mut [u8]) -> std::io::Result<bool> {
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where an initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdLocation {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Copies the initrd to the highest page-aligned address that is below the kernel's
/// `initrd_addr_max`, inside low RAM, and above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    path: &Path,
    mem_bytes: u64,
) -> Result<InitrdLocation, BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = layout::low_ram_end(mem_bytes).min(addr_max + 1);
    // A kernel image whose segments end in the last page of the address space leaves no room.
    let lowest = kernel
        .end
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let available = top.saturating_sub(lowest);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        available,
    };
    let start = top
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|s| *s >= lowest)
        .ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    kvm::small_pages_at_edges(mem, start..start + size);
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|source| BootError::CopyInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok(InitrdLocation {
        addr: GuestAddress(start),
        size,
    })
}

/// Builds the full command line within the kernel's limit: nvmm's defaults, one
/// `virtio_mmio.device=SIZE@BASE:IRQ` per virtio device (for kernels with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), then `extra`.
pub fn build_cmdline(
    kernel: &LoadedKernel,
    virtio: &[VirtioSlot],
    extra: &str,
) -> Result<Cmdline, BootError> {
    // cmdline_size excludes the NUL; Cmdline's capacity includes it.
    let capacity = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize + 1)
        .filter(|c| *c > 1)
        .unwrap_or(DEFAULT_CMDLINE_CAPACITY);
    let mut full = DEFAULT_CMDLINE.to_owned();
    for slot in virtio {
        full.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            slot.size >> 10,
            slot.base,
            slot.irq
        ));
    }
    if !extra.trim().is_empty() {
        full.push(' ');
        full.push_str(extra.trim());
    }
    if full.len() >= capacity {
        return Err(BootError::CmdlineTooLong {
            len: full.len(),
            max: capacity - 1,
        });
    }
    let mut cmdline = Cmdline::new(capacity).map_err(BootError::InvalidCmdline)?;
    cmdline
        .insert_str(&full)
        .map_err(BootError::InvalidCmdline)?;
    Ok(cmdline)
}

/// `boot_params` as a byte-valued page.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a repr(C, packed) struct of integers and arrays of integers generated
// from the kernel's headers: it has no padding, no pointers and every bit pattern is valid.
unsafe impl ByteValued for ZeroPage {}

/// Writes the command line and `boot_params` (header, initrd, e820 map, RSDP) into guest
/// memory.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdLocation>,
    mem_bytes: u64,
    rsdp: GuestAddress,
) -> Result<KernelEntry, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline.as_cstring().map_or(0, |c| c.as_bytes().len());

    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // Low RAM ends below 4 GiB, so the 32-bit fields always suffice.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    let map = layout::e820_map(mem_bytes);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = *addr;
        slot.size = *size;
        slot.r#type = *kind as u32;
    }
    params.e820_entries = map.len() as u8;

    let zero_page = ZeroPage(params);
    let boot_params = GuestAddress(layout::ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&zero_page, boot_params), mem)
        .map_err(BootError::WriteBootParams)?;
    Ok(KernelEntry {
        entry: kernel.entry,
        boot_params,
    })
}

/// GDT entries: null, 64-bit code, data, TSS (selectors 0x8, 0x10, 0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encodes a GDT descriptor from its flags (access byte in the low 8 bits, granularity flags in
/// bits 12..16), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Writes the boot GDT, an empty IDT and an identity map of the first GiB (2 MiB pages).
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(BootError::WritePageTables)
    };
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        write(*entry, layout::GDT_START + 8 * index as u64)?;
    }
    write(0, layout::IDT_START)?;
    // Present | writable on each level; PS (huge page) on the page-directory entries.
    write(layout::PDPTE_START | 0x03, layout::PML4_START)?;
    write(layout::PDE_START | 0x03, layout::PDPTE_START)?;
    for index in 0..512u64 {
        write((index << 21) | 0x83, layout::PDE_START + index * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    /// `bytes` in a file of the temporary directory named after `name` and this process.
    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("nvmm-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(0x20_0000),
            end: 0x30_0000,
            setup_header: None,
        }
    }

    #[test]
    fn gdt_entries_match_the_long_mode_descriptors() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn cmdline_puts_defaults_first_and_respects_the_limit() {
        let kernel = elf_kernel();
        let cmdline = build_cmdline(&kernel, &[], " quiet ").unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(text, format!("{DEFAULT_CMDLINE} quiet"));
        let long = "x".repeat(DEFAULT_CMDLINE_CAPACITY);
        assert!(matches!(
            build_cmdline(&kernel, &[], &long),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));
    }

    #[test]
    fn virtio_devices_are_announced_before_the_user_cmdline() {
        let slots = crate::device_manager::test_slots(2);
        let cmdline = build_cmdline(&elf_kernel(), &slots, "root=/dev/vda").unwrap();
        let text = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            text,
            format!(
                "{DEFAULT_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 \
                 virtio_mmio.device=4K@0xd0001000:6 root=/dev/vda"
            )
        );
    }

    #[test]
    fn bzimage_limit_comes_from_its_header() {
        let header = setup_header {
            cmdline_size: 200,
            ..Default::default()
        };
        let kernel = LoadedKernel {
            setup_header: Some(header),
            ..elf_kernel()
        };
        assert!(build_cmdline(&kernel, &[], &"y".repeat(30)).is_ok());
        assert!(matches!(
            build_cmdline(&kernel, &[], &"y".repeat(150)),
            Err(BootError::CmdlineTooLong { max: 200, .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_ram_page_aligned() {
        let dir = temp_file("initrd", &[0xab; 5000]);
        let mem = mem(16);
        let loc = load_initrd(&mem, &elf_kernel(), &dir, 16 << 20).unwrap();
        assert_eq!(loc.size, 5000);
        assert_eq!(loc.addr.0 % PAGE_SIZE, 0);
        assert!(loc.addr.0 + 5000 <= 16 << 20 && loc.addr.0 + 5000 + PAGE_SIZE > 16 << 20);
        let byte: u8 = mem.read_obj(loc.addr).unwrap();
        assert_eq!(byte, 0xab);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn initrd_larger_than_free_ram_is_rejected() {
        let path = std::env::temp_dir().join(format!("nvmm-big-initrd-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(15 << 20).unwrap();
        let err = load_initrd(&mem(16), &elf_kernel(), &path, 16 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { size, .. } if size == 15 << 20));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_kernel_ending_at_the_top_of_the_address_space_leaves_no_room_for_an_initrd() {
        // Found by fuzz/boot_writers: an ELF segment with p_memsz near 2^64 made rounding the
        // kernel's end up to a page overflow (a panic in debug builds, an initrd over the
        // kernel in release builds).
        let path = temp_file("initrd-top", &[0; 100]);
        let kernel = LoadedKernel {
            end: u64::MAX - 10,
            ..elf_kernel()
        };
        let err = load_initrd(&mem(16), &kernel, &path, 16 << 20).unwrap_err();
        assert!(matches!(
            err,
            BootError::InitrdTooLarge { available: 0, .. }
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_e820_and_rsdp() {
        let mem = mem(64);
        let kernel = elf_kernel();
        let cmdline = build_cmdline(&kernel, &[], "nvmm_test=hello").unwrap();
        let initrd = InitrdLocation {
            addr: GuestAddress(0x300_0000),
            size: 123,
        };
        let entry = write_boot_params(
            &mem,
            &kernel,
            &cmdline,
            Some(initrd),
            64 << 20,
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!(entry.entry, GuestAddress(0x20_0000));
        let zp = entry.boot_params.0;
        let read_u32 = |off: u64| mem.read_obj::<u32>(GuestAddress(zp + off)).unwrap();
        assert_eq!(read_u32(0x202), HDRS_MAGIC);
        assert_eq!(read_u32(0x228), layout::CMDLINE_START as u32);
        assert_eq!(read_u32(0x218), 0x300_0000);
        assert_eq!(read_u32(0x21c), 123);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(zp + 0x70)).unwrap(),
            0xe0000
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp + 0x1e8)).unwrap(), 3);
        let mut text = vec![0u8; cmdline.as_cstring().unwrap().as_bytes().len()];
        mem.read_slice(&mut text, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert!(
            String::from_utf8(text)
                .unwrap()
                .ends_with("nvmm_test=hello")
        );
    }

    #[test]
    fn non_kernels_are_rejected() {
        let path = temp_file("notakernel", b"#!/bin/sh\necho hi\n");
        let err = load_kernel(&mem(16), &path).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_directory_is_an_unreadable_kernel_not_another_format() {
        let err = load_kernel(&mem(16), &std::env::temp_dir()).unwrap_err();
        assert!(
            matches!(&err, BootError::ReadKernel { source, .. }
                if source.raw_os_error() == Some(libc::EISDIR)),
            "{err:?}"
        );
    }

    #[test]
    fn an_elf_kernel_is_copied_where_its_loadable_segments_say() {
        let phdr_size = std::mem::size_of::<Elf64_Phdr>();
        let header = Elf64_Ehdr {
            e_phoff: 64,
            e_phentsize: phdr_size as u16,
            e_phnum: 3,
            ..Default::default()
        };
        let segment = |p_type, p_paddr, p_filesz| Elf64_Phdr {
            p_type,
            p_paddr,
            p_filesz,
            p_memsz: p_filesz + 0x1000,
            ..Default::default()
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.resize(64, 0);
        for phdr in [
            segment(PT_LOAD, 0x20_0000, 0x1_e754),
            segment(4, 0x21_e73c, 0x18), // PT_NOTE: not copied
            segment(PT_LOAD, 0x21_f000, 0x7210),
        ] {
            bytes.extend_from_slice(phdr.as_slice());
        }
        let path = temp_file("elf-ranges", &bytes);
        assert_eq!(
            elf_copy_ranges(&mut File::open(&path).unwrap()).unwrap(),
            vec![0x20_0000..0x21_e754, 0x21_f000..0x22_6210]
        );
        // Cut short: no ranges, and the loader reports the file.
        let short_path = temp_file("elf-ranges-short", &bytes[..64 + phdr_size]);
        assert!(elf_copy_ranges(&mut File::open(&short_path).unwrap()).is_err());
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&short_path).unwrap();
    }

    #[test]
    fn a_bzimage_kernel_is_copied_after_its_setup_sectors_to_code32_start() {
        let header = setup_header {
            setup_sects: 27,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let mut bytes = vec![0u8; SETUP_HEADER_OFFSET as usize];
        bytes.extend_from_slice(header.as_slice());
        bytes.resize(28 * 512 + 5000, 0);
        let path = temp_file("bzimage-range", &bytes);
        assert_eq!(
            bzimage_copy_range(&mut File::open(&path).unwrap()).unwrap(),
            0x10_0000..0x10_0000 + 5000
        );
        std::fs::remove_file(&path).unwrap();
    }
}
