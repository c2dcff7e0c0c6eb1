//! vCPUs: initial register state for the 64-bit Linux boot protocol, and the run loop that
//! routes exits to the buses.
//!
//! The boot vCPU starts in long mode at the kernel entry with RSI = boot_params; the others
//! wait in the in-kernel LAPIC for INIT/SIPI from the guest, as on real hardware.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};
use nvmm_devices::bus::Bus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BOOT_GDT, KernelEntry};
use crate::coalesced::CoalescedWrites;
use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_DELIVERY_MODE_NMI: u32 = 0b100;
const APIC_DELIVERY_MODE_EXTINT: u32 = 0b111;

/// KVM system event types (`KVM_SYSTEM_EVENT_*`).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Errors setting up or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl that sets up the vCPU failed.
    #[error("cannot {what} for vCPU {vcpu}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed on vCPU {vcpu}")]
    Run {
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}")]
    SpawnThread {
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread could not install its seccomp filter.
    #[error("cannot sandbox vCPU {vcpu}")]
    Seccomp {
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: crate::seccomp::SeccompError,
    },
}

/// The guest did something that ends the VM with a failure.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestFault {
    /// Triple fault or similar: KVM_EXIT_SHUTDOWN.
    #[error("guest triple-faulted on vCPU {vcpu} (KVM_EXIT_SHUTDOWN)")]
    TripleFault {
        /// vCPU index.
        vcpu: u8,
    },
    /// KVM could not emulate something (kvm-pvm hosts hit this with stock kernels).
    #[error(
        "KVM internal error on vCPU {vcpu}: suberror {suberror} at RIP {rip:#x}, \
         instruction bytes [{}], data {data:x?}",
        hex_bytes(.instruction)
    )]
    InternalError {
        /// vCPU index.
        vcpu: u8,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// Guest RIP.
        rip: u64,
        /// Up to 15 instruction bytes at RIP, if they could be read.
        instruction: Vec<u8>,
        /// `kvm_run.internal.data`.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    #[error("KVM could not enter vCPU {vcpu}: hardware entry failure reason {reason:#x}")]
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware reason code.
        reason: u64,
    },
    /// The guest reported a crash through a KVM system event.
    #[error("guest reported a crash on vCPU {vcpu}")]
    Crash {
        /// vCPU index.
        vcpu: u8,
    },
    /// An exit nvmm does not handle.
    #[error("unexpected KVM exit {exit} on vCPU {vcpu}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u8,
        /// Exit description.
        exit: String,
    },
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a vCPU thread stopped.
#[derive(Debug)]
pub enum VcpuOutcome {
    /// The VMM asked it to stop.
    Stopped,
    /// The guest asked to power off (KVM system event).
    PowerOff,
    /// The guest asked to reset (KVM system event).
    Reset,
    /// The guest failed.
    Fault(GuestFault),
    /// KVM failed.
    Error(VcpuError),
}

/// The devices a vCPU can reach.
#[derive(Debug, Clone)]
pub struct Peripherals {
    /// I/O ports.
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// One virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    peripherals: Peripherals,
    /// The VM's coalesced writes, replayed before every exit is handled.
    coalesced: Option<Arc<CoalescedWrites>>,
    mem: GuestMemoryMmap,
}

fn setup_err(what: &'static str, vcpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Setup { what, vcpu, source }
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(
        fd: VcpuFd,
        index: u8,
        peripherals: Peripherals,
        coalesced: Option<Arc<CoalescedWrites>>,
        mem: GuestMemoryMmap,
    ) -> Self {
        Self {
            fd,
            index,
            peripherals,
            coalesced,
            mem,
        }
    }

    /// CPUID, MSRs, FPU and LAPIC: the state every vCPU needs.
    pub fn configure(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        let index = self.index;
        self.fd
            .set_cpuid2(cpuid)
            .map_err(setup_err("set CPUID", index))?;
        self.setup_msrs()?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(setup_err("set FPU", index))?;
        let mut lapic = self.fd.get_lapic().map_err(setup_err("get LAPIC", index))?;
        // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs, as a BIOS leaves them.
        set_delivery_mode(&mut lapic, APIC_LVT0, APIC_DELIVERY_MODE_EXTINT);
        set_delivery_mode(&mut lapic, APIC_LVT1, APIC_DELIVERY_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(setup_err("set LAPIC", index))
    }

    fn setup_msrs(&self) -> Result<(), VcpuError> {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_STAR, 0),
            entry(MSR_CSTAR, 0),
            entry(MSR_KERNEL_GS_BASE, 0),
            entry(MSR_SYSCALL_MASK, 0),
            entry(MSR_LSTAR, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
            what: "build the MSR list",
            vcpu: self.index,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(setup_err("set MSRs", self.index))?;
        if written != entries.len() {
            log::debug!(
                "vCPU {}: KVM accepted {written} of {} boot MSRs",
                self.index,
                entries.len()
            );
        }
        Ok(())
    }

    /// Long mode at the kernel entry: the boot vCPU only.
    pub fn enter_kernel(&self, entry: KernelEntry) -> Result<(), VcpuError> {
        let index = self.index;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(setup_err("get special registers", index))?;
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        sregs.gdt.base = layout::GDT_START;
        sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
        sregs.idt.base = layout::IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.fd
            .set_sregs(&sregs)
            .map_err(setup_err("set special registers", index))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.entry.0,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: entry.boot_params.0,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(setup_err("set registers", index))
    }

    /// Runs until the guest or the VMM stops this vCPU. `stop` is checked after every exit;
    /// the VMM sets it and then kicks the thread with a signal to interrupt KVM_RUN.
    pub fn run(&mut self, stop: &AtomicBool) -> VcpuOutcome {
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuOutcome::Stopped;
            }
            let exit = self.fd.run();
            // The guest made the queued writes before this exit: the devices see them first.
            if let Some(writes) = &self.coalesced {
                writes.on_exit(&exit);
            }
            let step = handle_kvm_exit(&self.peripherals, self.index, exit);
            match step {
                Ok(VcpuEmulation::Handled) | Ok(VcpuEmulation::Interrupted) => {}
                Ok(VcpuEmulation::Stop(outcome)) => return outcome,
                Ok(VcpuEmulation::InternalError) => {
                    return VcpuOutcome::Fault(self.internal_error());
                }
                Err(err) => return VcpuOutcome::Error(err),
            }
        }
    }

    fn internal_error(&mut self) -> GuestFault {
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the exit union in this vCPU's kvm_run page.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        GuestFault::InternalError {
            vcpu: self.index,
            suberror: internal.suberror,
            rip,
            instruction: self.instruction_bytes(rip),
            data: internal.data[..ndata].to_vec(),
        }
    }

    fn instruction_bytes(&self, rip: u64) -> Vec<u8> {
        let Ok(translation) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if translation.valid == 0 {
            return Vec::new();
        }
        let mut bytes = [0u8; 15];
        match self
            .mem
            .read_slice(&mut bytes, GuestAddress(translation.physical_address))
        {
            Ok(()) => bytes.to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

fn set_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: &mut [u8] = lapic_bytes(lapic);
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[reg..reg + 4]);
    let value = (u32::from_le_bytes(word) & !0x700) | (mode << 8);
    bytes[reg..reg + 4].copy_from_slice(&value.to_le_bytes());
}

fn lapic_bytes(lapic: &mut kvm_lapic_state) -> &mut [u8] {
    let regs = &mut lapic.regs;
    // SAFETY: `regs` is a [c_char; 1024]; c_char and u8 have the same size and alignment and
    // every bit pattern is valid for both, so viewing it as bytes is sound for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

/// Decodes a GDT descriptor into the segment KVM loads.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bits = |shift: u32, width: u32| ((entry >> shift) & ((1 << width) - 1)) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let granular = bits(55, 1);
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(47, 1);
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: bits(40, 4),
        present,
        dpl: bits(45, 2),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: granular,
        avl: bits(52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// What to do after one KVM_RUN.
#[derive(Debug)]
pub enum VcpuEmulation {
    /// Exit handled; run again.
    Handled,
    /// KVM_RUN was interrupted by a signal (the VMM may be stopping us).
    Interrupted,
    /// KVM reported an internal error; the caller gathers the details.
    InternalError,
    /// This vCPU is done.
    Stop(VcpuOutcome),
}

/// Routes one KVM_RUN result: PIO and MMIO to the buses, guest power requests and failures to
/// a [`VcpuOutcome`].
pub fn handle_kvm_exit(
    io: &Peripherals,
    vcpu: u8,
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Result<VcpuEmulation, VcpuError> {
    let stop = |outcome| Ok(VcpuEmulation::Stop(outcome));
    let fault = |fault| Ok(VcpuEmulation::Stop(VcpuOutcome::Fault(fault)));
    match exit {
        Ok(VcpuExit::IoIn(port, data)) => {
            io.pio.read(u64::from(port), data);
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            io.pio.write(u64::from(port), data);
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            io.mmio.read(addr, data);
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            io.mmio.write(addr, data);
            Ok(VcpuEmulation::Handled)
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is just a wake-up.
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => Ok(VcpuEmulation::Handled),
        Ok(VcpuExit::Shutdown) => fault(GuestFault::TripleFault { vcpu }),
        Ok(VcpuExit::InternalError) => Ok(VcpuEmulation::InternalError),
        Ok(VcpuExit::FailEntry(reason, _cpu)) => fault(GuestFault::FailEntry { vcpu, reason }),
        Ok(VcpuExit::SystemEvent(kind, _data)) => match kind {
            SYSTEM_EVENT_SHUTDOWN => stop(VcpuOutcome::PowerOff),
            SYSTEM_EVENT_RESET => stop(VcpuOutcome::Reset),
            SYSTEM_EVENT_CRASH => fault(GuestFault::Crash { vcpu }),
            other => fault(GuestFault::UnexpectedExit {
                vcpu,
                exit: format!("system event {other}"),
            }),
        },
        Ok(other) => fault(GuestFault::UnexpectedExit {
            vcpu,
            exit: format!("{other:?}"),
        }),
        Err(err) if err.errno() == libc::EINTR => Ok(VcpuEmulation::Interrupted),
        Err(err) if err.errno() == libc::EAGAIN => Ok(VcpuEmulation::Handled),
        Err(source) => Err(VcpuError::Run { vcpu, source }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nvmm_devices::bus::BusDevice;

    use super::*;

    struct Port(Vec<u8>);
    impl BusDevice for Port {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    fn peripherals() -> (Peripherals, Arc<Mutex<Port>>) {
        let port = Arc::new(Mutex::new(Port(Vec::new())));
        let mut pio = Bus::new("pio");
        pio.insert(port.clone(), 0x3f8, 8).unwrap();
        let io = Peripherals {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new("mmio")),
        };
        (io, port)
    }

    #[test]
    fn pio_goes_through_the_bus() {
        let (io, port) = peripherals();
        let out = handle_kvm_exit(&io, 0, Ok(VcpuExit::IoOut(0x3f8, b"A"))).unwrap();
        assert!(matches!(out, VcpuEmulation::Handled));
        assert_eq!(port.lock().unwrap().0, b"A");
        let mut data = [0u8; 1];
        handle_kvm_exit(&io, 0, Ok(VcpuExit::IoIn(0x3f8, &mut data))).unwrap();
        assert_eq!(data, [0x5a]);
    }

    #[test]
    fn unknown_mmio_reads_all_ones() {
        let (io, _) = peripherals();
        let mut data = [0u8; 4];
        handle_kvm_exit(&io, 0, Ok(VcpuExit::MmioRead(0xd000_0000, &mut data))).unwrap();
        assert_eq!(data, [0xff; 4]);
        handle_kvm_exit(&io, 0, Ok(VcpuExit::MmioWrite(0xd000_0000, &[1, 2]))).unwrap();
    }

    #[test]
    fn shutdown_is_a_triple_fault_and_errnos_are_classified() {
        let (io, _) = peripherals();
        let out = handle_kvm_exit(&io, 2, Ok(VcpuExit::Shutdown)).unwrap();
        assert!(matches!(
            out,
            VcpuEmulation::Stop(VcpuOutcome::Fault(GuestFault::TripleFault { vcpu: 2 }))
        ));
        let eintr = handle_kvm_exit(&io, 0, Err(kvm_ioctls::Error::new(libc::EINTR))).unwrap();
        assert!(matches!(eintr, VcpuEmulation::Interrupted));
        let eagain = handle_kvm_exit(&io, 0, Err(kvm_ioctls::Error::new(libc::EAGAIN))).unwrap();
        assert!(matches!(eagain, VcpuEmulation::Handled));
        assert!(handle_kvm_exit(&io, 0, Err(kvm_ioctls::Error::new(libc::EFAULT))).is_err());
    }

    #[test]
    fn system_events_map_to_outcomes() {
        let (io, _) = peripherals();
        let power = handle_kvm_exit(
            &io,
            0,
            Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, &[])),
        );
        assert!(matches!(
            power,
            Ok(VcpuEmulation::Stop(VcpuOutcome::PowerOff))
        ));
        let reset = handle_kvm_exit(&io, 0, Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, &[])));
        assert!(matches!(reset, Ok(VcpuEmulation::Stop(VcpuOutcome::Reset))));
    }

    #[test]
    fn internal_error_message_names_rip_and_bytes() {
        let fault = GuestFault::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            instruction: vec![0xf0, 0x48, 0x0f, 0xc7, 0x0f],
            data: vec![0x1],
        };
        let text = fault.to_string();
        assert!(text.contains("suberror 1"), "{text}");
        assert!(text.contains("RIP 0xffffffff81000000"), "{text}");
        assert!(text.contains("f0 48 0f c7 0f"), "{text}");
    }

    #[test]
    fn boot_segments_decode() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!(
            (code.type_, code.s, code.g, code.limit),
            (0xb, 1, 1, 0xffff_ffff)
        );
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
    }
}
