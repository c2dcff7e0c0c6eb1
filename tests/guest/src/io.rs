//! The guest's only doors to hardware: port I/O, memory-mapped registers and
//! plain reads of physical memory. Everything unsafe about talking to the
//! machine lives in these leaf helpers; callers say why each use is sound.

use core::arch::asm;

/// Everything below 4 GiB is identity-mapped by the entry code; nothing above is.
pub const MAPPED_LIMIT: u64 = 1 << 32;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The write must not break an invariant of the running program (for example,
/// a device reprogramming memory the guest uses).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the effect of the write; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`]: reads of device registers can have side effects.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the effect of the read; `in` touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes 16 bits to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller vouches for the effect of the write; `out` touches no memory.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit memory-mapped device register.
///
/// # Safety
/// `addr` must be a 4-byte aligned device register below [`MAPPED_LIMIT`], and
/// reading it must not break an invariant of the running program.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees a mapped, aligned register; volatile keeps
    // the access exactly as written.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Reads an 8-bit memory-mapped device register.
///
/// # Safety
/// As for [`mmio_read32`], for a one-byte read.
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: the caller guarantees a mapped register.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Reads a 16-bit memory-mapped device register.
///
/// # Safety
/// As for [`mmio_read32`], for a 2-byte aligned 16-bit read.
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: the caller guarantees a mapped, aligned register.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Writes a 32-bit memory-mapped device register.
///
/// # Safety
/// As for [`mmio_read32`], for a write.
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: the caller guarantees a mapped, aligned register.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads 64 bits of memory-mapped device registers at once.
///
/// # Safety
/// As for [`mmio_read32`], for an 8-byte aligned 64-bit read.
pub unsafe fn mmio_read64(addr: u64) -> u64 {
    // SAFETY: the caller guarantees mapped, aligned registers.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes 64 bits of memory-mapped device registers at once.
///
/// # Safety
/// As for [`mmio_read32`], for an 8-byte aligned 64-bit write.
pub unsafe fn mmio_write64(addr: u64, value: u64) {
    // SAFETY: the caller guarantees mapped, aligned registers.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

/// Writes a 16-bit memory-mapped device register.
///
/// # Safety
/// As for [`mmio_read32`], for a 2-byte aligned 16-bit write.
pub unsafe fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: the caller guarantees a mapped, aligned register.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// Writes an 8-bit memory-mapped device register.
///
/// # Safety
/// As for [`mmio_read32`], for a one-byte write.
pub unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: the caller guarantees a mapped register.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Returns `len` bytes of physical memory at `addr` as a slice, or `None` if
/// the range is empty-addressed (0), wraps, or reaches beyond the identity map.
///
/// # Safety
/// The range must be memory (RAM or firmware tables, not device registers)
/// that nothing writes while the slice is alive, and that the guest image
/// itself does not use.
pub unsafe fn phys_bytes(addr: u64, len: u64) -> Option<&'static [u8]> {
    let end = addr.checked_add(len)?;
    if addr == 0 || end > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the range is non-null and inside the identity map (checked
    // above, so `len` also fits in `usize` and `isize`); the caller promises
    // it is ordinary memory that stays unchanged.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}

/// Stops this CPU for good: interrupts off, then halt (again, should an NMI
/// wake it). The VMM sees an idle vCPU, not a spinning one.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; they touch no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads a counter (CR4.TSD is never set by this guest).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Little-endian readers that return `None` instead of panicking when a table
/// is shorter than its format promises.
pub fn u8_at(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

/// See [`u8_at`].
pub fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// See [`u8_at`].
pub fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}
