//! The `smp` scenario: count the CPUs in the MADT, start every other one with
//! INIT, SIPI, SIPI through the local APIC, and wait for each to say hello.
//!
//! An application processor (AP) wakes in 16-bit real mode at the SIPI vector
//! (physical 0x10000 here). The trampoline below is copied there; it switches
//! to protected mode with the boot CPU's GDT, then to long mode with the boot
//! CPU's page tables, takes the stack the boot CPU left in the trampoline's
//! data slot, and calls [`ap_start`]. APs are started one at a time, so that
//! one slot is enough.

use core::arch::global_asm;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::acpi::{Madt, Tables};
use crate::bootinfo::{BootInfo, Region};
use crate::entry::{GDT_CODE32, GDT_CODE64, GDT_DATA, GDT_LIMIT};
use crate::io::{MAPPED_LIMIT, halt_forever, mmio_read32, mmio_write32};
use crate::scenarios::Outcome;
use crate::time::{Deadline, delay_us};

/// Where the trampoline is copied; the SIPI vector is its page number.
const TRAMPOLINE_ADDR: u64 = 0x10000;
const TRAMPOLINE_PAGE: Region = Region {
    addr: TRAMPOLINE_ADDR,
    size: 4096,
};

/// One page of stack per AP: `ap_start` only prints a line.
const AP_STACK_SIZE: usize = 4096;
/// The most APs this guest starts (their stacks are reserved, not touched).
const MAX_APS: usize = 63;

/// How long to wait for all APs together.
const STARTUP_TIMEOUT_US: u64 = 2_000_000;
/// Delays from the MP specification's INIT-SIPI-SIPI sequence.
const INIT_DELAY_US: u64 = 10_000;
const SIPI_DELAY_US: u64 = 200;

// Local APIC registers and ICR fields.
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const SVR_APIC_ENABLE: u32 = 1 << 8;
const SVR_SPURIOUS_VECTOR: u32 = 0xff;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// xAPIC destinations are 8-bit; APs with larger (x2APIC) IDs cannot be reached.
const XAPIC_MAX_ID: u32 = 0xff;

/// APs that reached `ap_start` and printed their line.
static APS_ONLINE: AtomicU32 = AtomicU32::new(0);
/// The local APIC base, for `ap_start`.
static LAPIC_BASE: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .set AP_BASE, {trampoline_addr}
    .set AP_CODE32, {code32}
    .set AP_CODE64, {code64}
    .set AP_DATA, {data}
    /* PAE, and SSE as on the boot CPU (OSFXSR, OSXMMEXCPT). */
    .set AP_CR4, (1 << 5) | (1 << 9) | (1 << 10)
    /* PG, NE, ET, MP, PE: paging on, caches on (CD and NW clear), SSE usable (EM clear). */
    .set AP_CR0, (1 << 31) | (1 << 5) | (1 << 4) | (1 << 1) | (1 << 0)
    .set AP_MSR_EFER, 0xc0000080
    .set AP_EFER_LME, 1 << 8

    /* Per-AP stacks; reserved here so untouched pages cost nothing. */
    .pushsection .noinit.nvmm_ap_stacks, "aw", @nobits
    .balign 4096
    .globl nvmm_ap_stacks
nvmm_ap_stacks:
    .skip {stacks_size}
    .popsection

    /*
     * Position-dependent: runs at AP_BASE, so every address below is
     * AP_BASE + (label - nvmm_ap_trampoline_start).
     */
    .pushsection .rodata.nvmm_ap_trampoline, "a"
    .balign 16
    .globl nvmm_ap_trampoline_start
nvmm_ap_trampoline_start:
    .code16
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl .Lap_gdt_ptr - nvmm_ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $AP_CODE32, $(AP_BASE + .Lap_protected - nvmm_ap_trampoline_start)

    .code32
.Lap_protected:
    mov $AP_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $AP_CR4, %eax
    mov %eax, %cr4
    mov $nvmm_pml4, %eax
    mov %eax, %cr3
    mov $AP_MSR_EFER, %ecx
    rdmsr
    or $AP_EFER_LME, %eax
    wrmsr
    mov $AP_CR0, %eax
    mov %eax, %cr0
    ljmp $AP_CODE64, $(AP_BASE + .Lap_long - nvmm_ap_trampoline_start)

    .code64
.Lap_long:
    mov $AP_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov AP_BASE + nvmm_ap_trampoline_stack - nvmm_ap_trampoline_start, %rsp
    mov ${ap_start}, %eax
    call *%rax
.Lap_stop:
    cli
    hlt
    jmp .Lap_stop

    .balign 8
.Lap_gdt_ptr:
    .word {gdt_limit}
    .quad nvmm_gdt
    .balign 8
    .globl nvmm_ap_trampoline_stack
nvmm_ap_trampoline_stack:
    .quad 0
    .globl nvmm_ap_trampoline_end
nvmm_ap_trampoline_end:
    .popsection
    .code64
"#,
    trampoline_addr = const TRAMPOLINE_ADDR,
    code32 = const GDT_CODE32,
    code64 = const GDT_CODE64,
    data = const GDT_DATA,
    gdt_limit = const GDT_LIMIT,
    stacks_size = const MAX_APS * AP_STACK_SIZE,
    ap_start = sym ap_start,
    options(att_syntax)
);

unsafe extern "C" {
    static nvmm_ap_trampoline_start: u8;
    static nvmm_ap_trampoline_stack: u8;
    static nvmm_ap_trampoline_end: u8;
    static nvmm_ap_stacks: u8;
}

/// The `smp` scenario.
pub fn run(boot: &BootInfo) -> Outcome {
    let tables = Tables::find(boot)?;
    let madt = Madt::find(&tables).ok_or("no-madt")?;
    say!("madt cpus={}", madt.enabled);

    if madt.lapic_addr >= MAPPED_LIMIT {
        return Err("lapic-unmapped");
    }
    let lapic = LocalApic {
        base: madt.lapic_addr,
    };
    LAPIC_BASE.store(lapic.base, Ordering::SeqCst);
    let boot_cpu = lapic.id();
    install_trampoline(boot)?;
    lapic.software_enable();

    let deadline = Deadline::after_us(STARTUP_TIMEOUT_US);
    let aps = madt
        .ids()
        .iter()
        .copied()
        .filter(|&id| id != boot_cpu && id <= XAPIC_MAX_ID);
    for (index, apic_id) in aps.take(MAX_APS).enumerate() {
        if !start_ap(&lapic, apic_id, ap_stack_top(index), &deadline) {
            break; // Out of time: the rest would not make it either.
        }
    }

    let online = 1 + APS_ONLINE.load(Ordering::SeqCst) as usize;
    say!("smp online={}/{}", online, madt.enabled);
    if online == madt.enabled {
        Ok(())
    } else {
        Err("cpus-missing")
    }
}

/// Copies the trampoline to its page, after checking the page is free RAM.
fn install_trampoline(boot: &BootInfo) -> Outcome {
    if !boot.memmap.is_ram(&TRAMPOLINE_PAGE) {
        return Err("trampoline-page-not-ram");
    }
    if boot.uses(&TRAMPOLINE_PAGE)
        || boot
            .initrd
            .is_some_and(|initrd| initrd.overlaps(&TRAMPOLINE_PAGE))
    {
        return Err("trampoline-page-busy");
    }
    let start = &raw const nvmm_ap_trampoline_start;
    let len = &raw const nvmm_ap_trampoline_end as usize - start as usize;
    assert!(
        len <= TRAMPOLINE_PAGE.size as usize,
        "AP trampoline larger than a page"
    );
    // SAFETY: the source is the trampoline in our image; the destination is a
    // RAM page (checked above) that neither the image, the stacks nor any boot
    // data we still read occupy.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len) };
    Ok(())
}

/// The top of AP number `index`'s stack.
fn ap_stack_top(index: usize) -> u64 {
    (&raw const nvmm_ap_stacks) as u64 + ((index + 1) * AP_STACK_SIZE) as u64
}

/// Starts one AP and waits until it is online or `deadline` passes.
fn start_ap(lapic: &LocalApic, apic_id: u32, stack_top: u64, deadline: &Deadline) -> bool {
    let before = APS_ONLINE.load(Ordering::SeqCst);
    let is_online = || APS_ONLINE.load(Ordering::SeqCst) != before;

    let slot_offset =
        &raw const nvmm_ap_trampoline_stack as u64 - &raw const nvmm_ap_trampoline_start as u64;
    // SAFETY: the slot lies in the trampoline page we own (installed above),
    // 8-byte aligned by the assembler; no AP reads it before the SIPI below.
    unsafe { core::ptr::write_volatile((TRAMPOLINE_ADDR + slot_offset) as *mut u64, stack_top) };
    // The AP must see the trampoline and the stack before it wakes.
    fence(Ordering::SeqCst);

    lapic.send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
    delay_us(INIT_DELAY_US);
    for _ in 0..2 {
        if is_online() {
            return true;
        }
        // A second SIPI is ignored by an AP that already started.
        lapic.send_ipi(apic_id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12) as u32);
        delay_us(SIPI_DELAY_US);
    }
    while !deadline.expired() {
        if is_online() {
            return true;
        }
        spin_loop();
    }
    is_online()
}

/// Where an AP arrives in Rust, on its own stack, in long mode with SSE on.
extern "C" fn ap_start() -> ! {
    let lapic = LocalApic {
        base: LAPIC_BASE.load(Ordering::SeqCst),
    };
    say!("cpu {} online", lapic.id());
    APS_ONLINE.fetch_add(1, Ordering::SeqCst);
    halt_forever()
}

/// The xAPIC register page (memory-mapped, identity-mapped uncached).
struct LocalApic {
    base: u64,
}

impl LocalApic {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` is the local APIC from the MADT, inside the identity
        // map; reading these registers has no side effect.
        unsafe { mmio_read32(self.base + reg) }
    }

    fn write(&self, reg: u64, value: u32) {
        // SAFETY: `base` is the local APIC from the MADT, inside the identity
        // map; the callers below write only the SVR and the ICR.
        unsafe { mmio_write32(self.base + reg, value) }
    }

    /// This CPU's APIC ID.
    fn id(&self) -> u32 {
        self.read(LAPIC_ID) >> 24
    }

    /// Sets the APIC-enable bit in the spurious vector register, as Linux does
    /// before sending IPIs. Interrupts stay off (RFLAGS.IF is clear).
    fn software_enable(&self) {
        let svr = self.read(LAPIC_SVR);
        self.write(LAPIC_SVR, svr | SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR);
    }

    /// Sends an IPI to `apic_id` and waits (briefly) until the APIC has sent it.
    fn send_ipi(&self, apic_id: u32, icr_low: u32) {
        self.write(LAPIC_ICR_HIGH, apic_id << 24);
        self.write(LAPIC_ICR_LOW, icr_low);
        let sent = Deadline::after_us(SIPI_DELAY_US);
        while self.read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 && !sent.expired() {
            spin_loop();
        }
    }
}
