//! The two ways into the guest, and the common 64-bit path both take to Rust.
//!
//! 1. `_start64`, the ELF entry point: the 64-bit Linux boot protocol. The VMM
//!    enters it like a vmlinux: long mode, paging on with an identity map of at
//!    least the first GiB, interrupts off, `rsi` = address of `boot_params`.
//! 2. `_start32`, named by the PVH ELF note: 32-bit protected mode, paging off,
//!    `ebx` = address of `hvm_start_info`. It turns on long mode itself, with
//!    the guest's own page tables, and joins the common path.
//!
//! The common path loads our own GDT and page tables, clears `.bss`, enables
//! SSE (Rust code uses it freely) and calls [`rust_start`](crate::rust_start)
//! with the protocol and the boot structure. Nothing here relies on the VMM's
//! GDT or page tables beyond what the two protocols promise.
//!
//! The page tables (identity map of 0..4 GiB in 2 MiB pages; the local APIC
//! and virtio-mmio devices live in the 3..4 GiB hole) are built by the
//! assembler into `.data`, not by a loop at boot. That costs 24 KiB of file,
//! but kvm-pvm emulates this guest instruction by instruction (about 0.5 us
//! each): clearing and filling the tables at boot took about 23 ms there,
//! loading them from the image takes the VMM microseconds.

use core::arch::global_asm;

use crate::bootinfo::Protocol;

/// GDT selector of the flat 32-bit code segment (PVH and AP trampoline).
pub const GDT_CODE32: u16 = 0x08;
/// GDT selector of the 64-bit code segment.
pub const GDT_CODE64: u16 = 0x10;
/// GDT selector of the flat data segment.
pub const GDT_DATA: u16 = 0x18;
/// GDT selector of the flat data segment for CPL 3 (see `ring3.rs`).
pub const GDT_USER_DATA: u16 = 0x20;
/// GDT selector of the 64-bit code segment for CPL 3.
pub const GDT_USER_CODE64: u16 = 0x28;
/// The GDT's limit (size - 1): null, CODE32, CODE64, DATA, USER_DATA,
/// USER_CODE64. Shared with the AP trampoline, which may be assembled in
/// another object file.
pub const GDT_LIMIT: u16 = 6 * 8 - 1;

/// Size of the boot CPU's stack. The network scenarios need about 24 KiB
/// (smoltcp's interface and socket table live in their frames); untouched
/// pages cost nothing, so there is room to spare.
const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .set CODE32, {code32}
    .set CODE64, {code64}
    .set DATA, {data}
    .set PROTOCOL_LINUX64, {linux64}
    .set PROTOCOL_PVH, {pvh}

    .set CR0_PE, 1 << 0
    .set CR0_MP, 1 << 1
    .set CR0_EM, 1 << 2
    .set CR0_TS, 1 << 3
    .set CR0_PG, 1 << 31
    .set CR4_PAE, 1 << 5
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 1 << 8

    /* Page table entry bits. */
    .set PTE_PRESENT_RW, 0x3
    .set PTE_USER, 0x4
    .set PTE_ACCESSED, 0x20
    .set PTE_DIRTY, 0x40
    .set PTE_LARGE, 0x80
    .set PTE_PWT_PCD, 0x18

    /* POST code port: the "entered" marker the benchmarks time. */
    .set BOOT_MARKER_PORT, 0x80
    .set BOOT_MARKER, 0x10

    /*
     * PVH: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen". The descriptor is the
     * 32-bit entry's physical address stored as 8 bytes, as Linux does; loaders
     * read either the low 4 bytes or all 8.
     */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad _start32
    .balign 4
    .popsection

    /*
     * Our GDT. The accessed bits are preset so the CPU never writes to it.
     * The AP trampoline loads it too.
     */
    .pushsection .rodata.nvmm_gdt, "a"
    .balign 16
    .globl nvmm_gdt
nvmm_gdt:
    .quad 0                       /* null */
    .quad 0x00cf9b000000ffff      /* CODE32: flat 4 GiB, 32-bit */
    .quad 0x00af9b000000ffff      /* CODE64: long mode */
    .quad 0x00cf93000000ffff      /* DATA: flat 4 GiB, writable */
    .quad 0x00cff3000000ffff      /* USER_DATA: DATA at DPL 3 */
    .quad 0x00affb000000ffff      /* USER_CODE64: CODE64 at DPL 3 */
nvmm_gdt_end:
    .if nvmm_gdt_end - nvmm_gdt - 1 - {gdt_limit}
    .error "GDT_LIMIT does not match the GDT"
    .endif
    /* Pseudo-descriptor: lgdt reads a 32-bit base outside long mode, 64 bits in it. */
    .balign 16
    .globl nvmm_gdt_ptr
nvmm_gdt_ptr:
    .word {gdt_limit}
    .quad nvmm_gdt
    .popsection

    /*
     * The identity map, complete in the image. Accessed and dirty bits are
     * preset so the CPU never needs to write to these tables. Every page is
     * user-accessible, so that a scenario can go on at CPL 3 (ring3.rs); the
     * guest sets neither SMEP nor SMAP, so CPL 0 is unaffected.
     */
    .set PTE_TABLE, PTE_PRESENT_RW | PTE_USER | PTE_ACCESSED
    .set PTE_2M, PTE_PRESENT_RW | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_LARGE
    .pushsection .data.nvmm_page_tables, "aw"
    .balign 4096
    .globl nvmm_pml4
nvmm_pml4:
    .quad nvmm_pdpt + PTE_TABLE
    .fill 511, 8, 0
nvmm_pdpt:
    .quad nvmm_pd + 0x0000 + PTE_TABLE
    .quad nvmm_pd + 0x1000 + PTE_TABLE
    .quad nvmm_pd + 0x2000 + PTE_TABLE
    .quad nvmm_pd + 0x3000 + PTE_TABLE
    .fill 508, 8, 0
nvmm_pd:
    /* 0..3 GiB: RAM, cached. */
    .set .Lpage, 0
    .rept 3 * 512
    .quad (.Lpage << 21) | PTE_2M
    .set .Lpage, .Lpage + 1
    .endr
    /* 3..4 GiB: device registers only, uncached. */
    .rept 512
    .quad (.Lpage << 21) | PTE_2M | PTE_PWT_PCD
    .set .Lpage, .Lpage + 1
    .endr
    .popsection

    /* Not cleared: the boot stack (only the pages used are ever touched). */
    .pushsection .noinit.nvmm_boot, "aw", @nobits
    .balign 4096
nvmm_boot_stack:
    .skip {boot_stack_size}
nvmm_boot_stack_top:
    .popsection

    .pushsection .text.nvmm_entry, "ax"

    /* ---- 64-bit Linux boot protocol: rsi = boot_params ---- */
    .code64
    .globl _start64
_start64:
    cli
    cld
    mov $nvmm_boot_stack_top, %rsp
    mov $BOOT_MARKER, %al
    out %al, $BOOT_MARKER_PORT
    mov $PROTOCOL_LINUX64, %edi
    jmp nvmm_common64

    /* ---- PVH: 32-bit protected mode, paging off, ebx = hvm_start_info ---- */
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov $nvmm_boot_stack_top, %esp
    mov $BOOT_MARKER, %al
    out %al, $BOOT_MARKER_PORT
    mov %ebx, %esi

    lgdt nvmm_gdt_ptr
    mov $DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss

    /* Long mode: our page tables, PAE, EFER.LME, then paging. */
    mov $nvmm_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $CODE64, $.Lpvh_long_mode

    .code64
.Lpvh_long_mode:
    /* Upper register halves are undefined after the switch. */
    mov %esi, %esi
    mov $PROTOCOL_PVH, %edi
    /* fall through */

    /* ---- common path: edi = protocol, rsi = boot structure ---- */
nvmm_common64:
    mov $nvmm_boot_stack_top, %rsp
    lgdt nvmm_gdt_ptr
    /* Reload CS from our GDT with a far return. */
    pushq $CODE64
    lea .Lcommon_reloaded(%rip), %rax
    push %rax
    lretq
.Lcommon_reloaded:
    mov $DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs

    /* Our own identity map (already ours on the PVH path). */
    mov $nvmm_pml4, %eax
    mov %rax, %cr3

    /* Clear .bss (the stack is not in it), keeping the arguments in callee-saved registers. */
    mov %edi, %r12d
    mov %rsi, %r13
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    /* SSE: no FPU emulation, monitor coprocessor, OS supports fxsave and SIMD exceptions. */
    mov %cr0, %rax
    and $~(CR0_EM | CR0_TS), %rax
    or $CR0_MP, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov %rax, %cr4

    /* The stack top is 16-byte aligned, as the call expects. */
    mov %r12d, %edi
    mov %r13, %rsi
    call {rust_start}
.Lcommon_stop:
    cli
    hlt
    jmp .Lcommon_stop

    .popsection
    .code64
"#,
    code32 = const GDT_CODE32,
    code64 = const GDT_CODE64,
    data = const GDT_DATA,
    gdt_limit = const GDT_LIMIT,
    linux64 = const Protocol::Linux64 as u32,
    pvh = const Protocol::Pvh as u32,
    boot_stack_size = const BOOT_STACK_SIZE,
    rust_start = sym crate::rust_start,
    options(att_syntax)
);
