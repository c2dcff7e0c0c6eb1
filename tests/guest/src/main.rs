//! nvmm's test guest: a small bare-metal x86_64 program that the host tests
//! boot to check the VMM. It prints `nvmm-test: ` lines on COM1, runs the
//! scenario named by `nvmm_test=` on its command line, and powers off.
//!
//! Boot: `entry` (assembly, both boot protocols) -> [`rust_start`] ->
//! [`main`] -> `scenarios::run`. README.md is the contract with the host tests.

#![no_std]
#![no_main]

// First, so that `say!` is visible in the modules after it.
#[macro_use]
mod serial;

mod acpi;
mod blk;
mod blk_scenarios;
mod bootinfo;
mod checksum;
mod console;
mod console_scenarios;
mod dma;
mod entry;
mod hostile;
mod io;
mod keyboard;
mod mem;
mod net;
mod net_scenarios;
mod net_stack;
mod power;
mod ring3;
mod scenarios;
mod serial_irq;
mod smp;
mod time;
mod tso;
mod virtio_mmio;
mod virtqueue;

use core::panic::PanicInfo;

// Cargo does not know that the link depends on the linker script; naming it
// here makes rustc record it, so editing link.ld relinks the guest.
const _: &[u8] = include_bytes!("../link.ld");

use bootinfo::{BootInfo, Protocol};
use serial::Escaped;

/// Called once by the entry code on the boot CPU: own stack, own page tables,
/// `.bss` clear, SSE on. `protocol` is a [`Protocol`] value and `boot_struct`
/// the address of `boot_params` or `hvm_start_info`.
extern "C" fn rust_start(protocol: u32, boot_struct: u64) -> ! {
    serial::init();
    time::init();
    let Some(protocol) = Protocol::from_entry(protocol) else {
        panic!("unknown boot protocol {protocol}");
    };
    match BootInfo::parse(protocol, boot_struct) {
        Ok(boot) => main(boot),
        Err(reason) => {
            say!("boot protocol={}", protocol.name());
            say!("result=fail reason={reason}");
            power::power_off(&BootInfo::empty(protocol))
        }
    }
}

fn main(boot: BootInfo) -> ! {
    say!("boot protocol={}", boot.protocol.name());
    say!("cmdline=\"{}\"", Escaped(boot.cmdline));
    say!(
        "e820 entries={} usable_mib={}",
        boot.memmap.len(),
        boot.memmap.usable_mib()
    );
    scenarios::run(&boot)
}

/// Reports the panic on one line and stops the VM with a triple fault, which
/// every VMM notices (a shutdown exit), even one without ACPI.
#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // Unlocked: this CPU may have panicked while holding the line lock.
    match info.location() {
        Some(location) => {
            serial::say_unlocked(format_args!("PANIC {} at {}", info.message(), location))
        }
        None => serial::say_unlocked(format_args!("PANIC {}", info.message())),
    }
    power::triple_fault()
}

/// The precompiled `core` is built for unwinding, and its unwind tables name
/// this personality routine. Release builds drop them (LTO); dev builds still
/// link them, so the symbol must exist. With `panic = "abort"` nothing ever
/// unwinds, so it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
