//! The memory routines the compiler calls (`memcpy` and friends).
//!
//! On the Linux target these normally come from libc, which the guest does not
//! link. They are written with string instructions in inline assembly because
//! a plain Rust loop can be recognised by LLVM as "a memcpy" and compiled back
//! into a call to the very function being defined. The direction flag is clear
//! on entry, as the System V ABI promises.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dest` for `n` bytes of
/// writes, and the two ranges must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies forwards
    // exactly `n` bytes and touches nothing else.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
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
    // SAFETY: the caller guarantees the range; `rep stosb` writes exactly `n` bytes.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes; returns the difference of the first unequal pair (as
/// unsigned bytes), or 0.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes of reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let (a_next, b_next): (*const u8, *const u8);
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` reads at most `n`
    // bytes of each and stops one past the first unequal pair (or the end).
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => _,
            inout("rsi") a => a_next,
            inout("rdi") b => b_next,
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
