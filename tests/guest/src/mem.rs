//! The memory routines the compiler calls (`memcpy` and friends).
//!
//! On the Linux target these normally come from libc, which the guest does not
//! link. They are written with string instructions in inline assembly because
//! a plain Rust loop can be recognised by LLVM as "a memcpy" and compiled back
//! into a call to the very function being defined. The direction flag is clear
//! on entry, as the System V ABI promises.
//!
//! They move eight bytes per step (`rep movsq`/`rep stosq`, then the odd
//! bytes one by one): kvm-pvm runs this guest on KVM's instruction emulator,
//! which takes about 0.9 us per *iteration* of a string instruction, so a
//! byte-wise `rep movsb` of 128 KiB took 113 ms there and the quad-word form
//! takes an eighth of that.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dest` for `n` bytes of
/// writes, and the two ranges must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsq` copies n / 8
    // quad words forwards and `rep movsb` the n % 8 bytes after them: exactly
    // `n` bytes, nothing else touched.
    unsafe {
        asm!(
            "rep movsq",
            "mov ecx, {rest:e}",
            "rep movsb",
            rest = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dest` for `n` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let dest_addr = dest as usize;
    let src_addr = src as usize;
    if dest_addr <= src_addr || dest_addr >= src_addr.wrapping_add(n) {
        // A forward copy never reads a byte it has already overwritten.
        // SAFETY: as for `memcpy`; forwards is correct for this overlap.
        unsafe { memcpy(dest, src, n) };
    } else if n > 0 {
        // `dest` is inside the source: copy backwards, from the last byte down,
        // with the direction flag set for the duration of the copy only.
        // SAFETY: the caller guarantees both ranges; the pointers start at the
        // last byte of each range and `rep movsb` walks down exactly `n` bytes.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dest
}

/// Sets `n` bytes at `dest` to the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe { store_bytes(dest, c as u8, n) };
    dest
}

/// Writes `byte` to the `n` bytes at `dest`, eight at a time where it can.
///
/// # Safety
/// `dest` must be valid for `n` bytes of writes.
unsafe fn store_bytes(dest: *mut u8, byte: u8, n: usize) {
    // SAFETY: the caller guarantees the range; `rep stosq` writes n / 8 quad
    // words of the repeated byte and `rep stosb` (the low byte of rax) the
    // n % 8 bytes after them: exactly `n` bytes.
    unsafe {
        asm!(
            "rep stosq",
            "mov ecx, {rest:e}",
            "rep stosb",
            rest = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") dest => _,
            in("rax") u64::from(byte) * 0x0101_0101_0101_0101,
            options(nostack, preserves_flags)
        );
    }
}

/// Compares `n` bytes; returns the difference of the first unequal pair (as
/// unsigned bytes), or 0.
///
/// Equal quad words are skipped eight bytes per step (`repe cmpsq`, one
/// emulated iteration per eight bytes on kvm-pvm); only the quad word that
/// differs, or the last `n % 8` bytes, are compared byte by byte.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes of reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let words = n / 8;
    if words > 0 {
        let (a_next, b_next): (*const u8, *const u8);
        // SAFETY: the caller guarantees both ranges; `repe cmpsq` reads at
        // most `words` quad words of each, from the start, and stops one
        // past the first unequal pair (or at the end).
        unsafe {
            asm!(
                "repe cmpsq",
                inout("rcx") words => _,
                inout("rsi") a => a_next,
                inout("rdi") b => b_next,
                options(nostack, readonly)
            );
        }
        // The last pair compared is the first unequal one, or the final
        // (equal) pair: either way its bytes decide, or the tail does.
        // SAFETY: at least one quad word was compared, so the 8 bytes
        // before each pointer are inside their ranges.
        let (x, y) = unsafe {
            let (x, y) = (a_next.sub(8), b_next.sub(8));
            (
                x.cast::<u64>().read_unaligned(),
                y.cast::<u64>().read_unaligned(),
            )
        };
        if x != y {
            // Little-endian: the lowest differing byte comes first in memory.
            let shift = (x ^ y).trailing_zeros() / 8 * 8;
            return i32::from((x >> shift) as u8) - i32::from((y >> shift) as u8);
        }
    }
    let done = words * 8;
    if done == n {
        return 0;
    }
    let (a_next, b_next): (*const u8, *const u8);
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` reads the
    // `n - done` (at least one) bytes after the quad words, at most, and
    // stops one past the first unequal pair (or the end).
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n - done => _,
            inout("rsi") a.add(done) => a_next,
            inout("rdi") b.add(done) => b_next,
            options(nostack, readonly)
        );
    }
    // The last pair compared is the first unequal one, or the final (equal) pair.
    // SAFETY: at least one byte was compared, so both pointers moved forward
    // and the byte before each is inside its range.
    let (x, y) = unsafe { (*a_next.sub(1), *b_next.sub(1)) };
    i32::from(x) - i32::from(y)
}

/// Like [`memcmp`], but only zero versus non-zero matters.
///
/// # Safety
/// As for [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Types whose all-zero bytes are a valid value.
///
/// # Safety
/// Implement only for types where every byte zero is a valid value.
pub unsafe trait Zeroable: Sized {}

// SAFETY: zero is a valid integer.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for u16 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for usize {}
// SAFETY: an array of zero-valid elements is zero-valid.
unsafe impl<T: Zeroable, const N: usize> Zeroable for [T; N] {}

/// A `T` with every byte zero, written by string instructions the compiler
/// cannot see into.
///
/// Use it instead of `[0; N]` for arrays of 16 bytes or more. kvm-pvm runs
/// this guest on KVM's instruction emulator, which knows the SSE moves
/// (`movups`, `movaps`) but not `xorps`, and LLVM zeroes such arrays with
/// `xorps xmm0, xmm0` and 16-byte stores (the guest then dies with
/// `KVM_EXIT_INTERNAL_ERROR`). `check-instructions.sh` catches any that slip in.
pub fn zeroed<T: Zeroable>() -> T {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: `store_bytes` is opaque assembly that writes exactly
    // size_of::<T>() bytes, all inside `value`; afterwards every byte is
    // zero, which `Zeroable` says is a valid `T`.
    unsafe {
        store_bytes(value.as_mut_ptr().cast(), 0, core::mem::size_of::<T>());
        value.assume_init()
    }
}

/// Sets every byte of `dest` to `byte` with string instructions the compiler
/// cannot see into: `slice::fill` with a constant can become `xorps` (see
/// [`zeroed`]).
pub fn fill_bytes(dest: &mut [u8], byte: u8) {
    // SAFETY: exactly `dest.len()` bytes from its start, which the exclusive
    // borrow allows.
    unsafe { store_bytes(dest.as_mut_ptr(), byte, dest.len()) }
}
