//! The VM description: plain data, no CLI types. `nvmm` turns its flags into a [`VmConfig`].

use std::path::PathBuf;

pub use nvmm_devices::virtio::block::DiskConfig;

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: an ELF vmlinux (64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk, loaded high in guest memory.
    pub initrd: Option<PathBuf>,
    /// Kernel command line appended after nvmm's own defaults
    /// ([`crate::boot::DEFAULT_CMDLINE`]).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// CPU features hidden from the guest.
    pub cpuid: CpuidPolicy,
    /// Where the guest console meets the host.
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, ...).
    pub nets: Vec<NetConfig>,
    /// How the guest learns about virtio-mmio devices.
    pub virtio_discovery: VirtioDiscovery,
    /// Run each vCPU thread under its seccomp filter ([`crate::seccomp::vcpu`]); the caller
    /// filters the thread that runs [`crate::Vm::run_until_exit`]. Off only for debugging.
    pub seccomp: bool,
}

/// A virtio-net interface backed by an existing tap device (the CLI creates the tap and puts
/// it on a bridge; the VMM only opens it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// How virtio-mmio devices are announced to the guest. Linux kernels with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (NixOS) read `virtio_mmio.device=` from the command
/// line; others (Debian) only find them as ACPI devices (`LNRO0005` in the DSDT). A kernel that
/// reads both registers each device twice: the second registration of the same MMIO window
/// fails its resource claim, so the device still appears once (with one probe error in
/// dmesg). See ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VirtioDiscovery {
    /// Command line and ACPI: works with every kernel.
    #[default]
    Both,
    /// `virtio_mmio.device=` only.
    Cmdline,
    /// DSDT only.
    Acpi,
}

impl VirtioDiscovery {
    /// Whether devices go on the kernel command line.
    pub fn cmdline(self) -> bool {
        matches!(self, Self::Both | Self::Cmdline)
    }

    /// Whether devices go in the DSDT.
    pub fn acpi(self) -> bool {
        matches!(self, Self::Both | Self::Acpi)
    }
}

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 512;

impl VmConfig {
    /// A VM with default memory, one vCPU and no initrd.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            cpuid: CpuidPolicy::default(),
            console: ConsoleConfig::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            virtio_discovery: VirtioDiscovery::default(),
            seccomp: true,
        }
    }
}

/// CPUID features that can be hidden from the guest, like a Firecracker CPU template. All off by
/// default: the guest sees what KVM supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// Hide `CMPXCHG16B` (CPUID.1:ECX.CX16).
    pub hide_cx16: bool,
    /// Hide XSAVE, OSXSAVE, AVX and the XSAVE leaf 0xD.
    pub hide_xsave: bool,
}

/// How the guest's serial console is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Feed the host's stdin into the guest's serial port.
    pub stdin: bool,
    /// Interpret `Ctrl-A x` (quit) and `Ctrl-A Ctrl-A` (send one Ctrl-A) in the input.
    pub escape: bool,
    /// Attach a virtio console (hvc0) whose size follows the host terminal, and send input
    /// there instead of to the UART. Kernel messages stay on the UART (`console=ttyS0`).
    pub virtio: bool,
    /// Where the console is: this process's terminal, or a socket for `nvmm console`.
    pub backend: ConsoleBackend,
}

/// Where a VM's console meets its user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// stdin and stdout of the nvmm process.
    #[default]
    Terminal,
    /// A background VM: output to a rotated log, attach through a unix socket.
    Socket {
        /// Socket `nvmm console` connects to.
        socket: PathBuf,
        /// Console log.
        log: PathBuf,
        /// Size at which the log is rotated to `<log>.1`.
        log_limit: u64,
    },
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            stdin: true,
            escape: true,
            virtio: false,
            backend: ConsoleBackend::Terminal,
        }
    }
}
