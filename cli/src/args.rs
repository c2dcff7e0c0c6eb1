//! Command-line flags (clap derive). Flags become a [`nvmm_vmm::VmConfig`] here and nowhere else.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nvmm_vmm::{
    ConsoleConfig, CpuidPolicy, DEFAULT_MEM_MIB, DiskConfig, NetConfig, VirtioDiscovery, VmConfig,
};

/// Run NixOS configurations, or any Linux kernel, as microVMs on KVM.
#[derive(Debug, Parser)]
#[command(name = "nvmm", version, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr: -v info (boot steps, guest debug port), -vv debug, -vvv trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log level the flags ask for.
    pub fn verbosity(&self) -> log::LevelFilter {
        if self.quiet {
            return log::LevelFilter::Error;
        }
        match self.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            2 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel with the console in this terminal (Ctrl-A x quits).
    Run(Box<RunArgs>),
    /// Build NixOS configurations of a flake and boot them as VMs on one network (the first
    /// on this terminal, the others in the background).
    Boot(Box<BootArgs>),
    /// Boot a flake's configurations (all, or those named) in the background on one network.
    Up(UpArgs),
    /// List running VMs (and VMs whose nvmm died, which it then cleans up).
    Ps(PsArgs),
    /// Shut VMs down cleanly (the guest powers off), forcing them after a timeout.
    Stop(StopArgs),
    /// Stop every VM of a flake.
    Down(DownArgs),
    /// Log in to a VM as root over ssh (or run a command there).
    Ssh(SshArgs),
    /// List a flake's NixOS configurations and which of them run.
    List(ListArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Check this host (KVM, networking, nix) and boot nvmm's built-in test guest.
    Doctor(DoctorArgs),
    /// Attach this terminal to a background VM's console (Ctrl-A d detaches, Ctrl-A x stops it).
    Console(VmNameArgs),
    /// Print a background VM's console log.
    Logs(LogsArgs),
}

/// A VM by name.
#[derive(Debug, Args)]
pub struct VmNameArgs {
    /// The VM's name (`--name` of `nvmm run -d`).
    pub name: String,
}

/// `nvmm logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM's name.
    pub name: String,
    /// Keep printing new output until the VM ends.
    #[arg(short, long)]
    pub follow: bool,
}

/// `nvmm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Names in the flake's nixosConfigurations (`NAME`, or `FLAKE#NAME`).
    #[arg(value_name = "NAME", required_unless_present = "runner")]
    pub names: Vec<String>,
    /// The flake: a directory, or any reference nix takes (`github:owner/repo`).
    #[arg(long, value_name = "REF", default_value = ".")]
    pub flake: String,
    /// Boot a runner directory (docs/runner.md) instead of building one with nix.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["names", "flake"])]
    pub runner: Option<PathBuf>,
    /// The VM's name with --runner [default: the runner's `name`, else the directory's].
    #[arg(long, value_name = "NAME", requires = "runner")]
    pub name: Option<String>,
    /// Run every VM in the background (`nvmm console NAME` attaches).
    #[arg(short, long)]
    pub detach: bool,
    /// Keep the writable disk across boots instead of a fresh one each time.
    #[arg(long)]
    pub keep: bool,
    /// Guest memory in MiB [default: the configuration's nvmm.memory].
    #[arg(long, value_name = "MIB")]
    pub mem: Option<u64>,
    /// Number of vCPUs [default: the configuration's nvmm.vcpus].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=i64::from(nvmm_vmm::kvm::MAX_VCPUS)))]
    pub cpus: Option<u8>,
    /// Forward a host port to a guest port, beyond the configuration's nvmm.forwardPorts
    /// (repeatable; only with one NAME).
    #[arg(long, value_name = "[HOSTADDR:]HOSTPORT:GUESTPORT",
          value_parser = crate::net::forward::ForwardSpec::parse)]
    pub forward: Vec<crate::net::forward::ForwardSpec>,
    /// The network the VMs join.
    #[arg(long, value_name = "NETWORK", default_value = "nvmm0")]
    pub net: String,
    /// The network's subnet when nvmm creates it [default: a free private /24].
    #[arg(long, value_name = "CIDR", value_parser = parse_subnet)]
    pub subnet: Option<crate::net::addr::Ipv4Subnet>,
    /// Show the build logs of everything nix builds (also with -v).
    #[arg(short = 'L', long)]
    pub print_build_logs: bool,
    /// Run without seccomp filters. For debugging nvmm only: use it when nvmm stopped with
    /// "made a forbidden system call", and report that as a bug.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// `nvmm up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Names in the flake's nixosConfigurations [default: all of them].
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// The flake: a directory, or any reference nix takes.
    #[arg(long, value_name = "REF", default_value = ".")]
    pub flake: String,
    /// Keep each VM's writable disk across boots.
    #[arg(long)]
    pub keep: bool,
    /// The network the VMs join.
    #[arg(long, value_name = "NETWORK", default_value = "nvmm0")]
    pub net: String,
    /// The network's subnet when nvmm creates it [default: a free private /24].
    #[arg(long, value_name = "CIDR", value_parser = parse_subnet)]
    pub subnet: Option<crate::net::addr::Ipv4Subnet>,
    /// Show the build logs of everything nix builds (also with -v).
    #[arg(short = 'L', long)]
    pub print_build_logs: bool,
    /// Run without seccomp filters. For debugging nvmm only: use it when nvmm stopped with
    /// "made a forbidden system call", and report that as a bug.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// `nvmm ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nvmm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VMs to stop.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// Stop at once instead of asking the guest to shut down.
    #[arg(short, long)]
    pub force: bool,
    /// Seconds to wait for a clean shutdown before forcing it.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub timeout: u64,
}

/// `nvmm down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// The flake whose VMs to stop.
    #[arg(long, value_name = "REF", default_value = ".")]
    pub flake: String,
    /// Stop at once instead of asking the guests to shut down.
    #[arg(short, long)]
    pub force: bool,
    /// Seconds to wait for a clean shutdown before forcing it.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub timeout: u64,
}

/// `nvmm ssh`.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// The VM.
    pub name: String,
    /// A command to run instead of a login shell (after `--`), word for word: for a shell
    /// line, `-- sh -c 'a | b'`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `nvmm completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `nvmm list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The flake: a directory, or any reference nix takes.
    #[arg(long, value_name = "REF", default_value = ".")]
    pub flake: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nvmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to nvmm's defaults.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(nvmm_vmm::kvm::MAX_VCPUS)))]
    pub cpus: u8,
    /// CPU features to hide from the guest (comma-separated).
    #[arg(long, value_name = "FEATURE", value_delimiter = ',')]
    pub cpu_hide: Vec<HiddenCpuFeature>,
    /// A virtio-blk disk: an image file or block device, with options `ro` (read-only) and
    /// `serial=ID` (what the guest reads as its ID). Repeatable; the guest sees vda, vdb, ...
    #[arg(long, value_name = "PATH[,ro][,serial=ID]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,
    /// Run in the background: the console is kept on a socket (`nvmm console NAME` attaches)
    /// and in a log (`nvmm logs NAME`).
    #[arg(short, long)]
    pub detach: bool,
    /// Where your typing goes: the serial port (ttyS0), or a virtio console (hvc0) that nvmm
    /// adds and whose size follows this terminal. Kernel messages stay on ttyS0 either way.
    #[arg(long, value_name = "KIND", default_value = "serial")]
    pub console: ConsoleKind,
    /// A virtio-net interface on an existing tap device you manage yourself, with an optional
    /// MAC address (default: derived from the tap name). Repeatable.
    #[arg(long, value_name = "TAP[,mac=MAC]", value_parser = parse_tap)]
    pub tap: Vec<NetConfig>,
    /// The VM's name: its hostname, and how other VMs on its network reach it
    /// [default: the kernel's file name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Put the VM on an nvmm network: a host bridge (created with the first VM) where guests
    /// reach each other by name and the host reaches them by IP. ssh (guest port 22) is
    /// forwarded from a free 127.0.0.1 port.
    #[arg(long, value_name = "NETWORK", num_args = 0..=1, default_missing_value = "nvmm0")]
    pub net: Option<String>,
    /// The network's subnet when nvmm creates it [default: a free private /24].
    #[arg(long, value_name = "CIDR", requires = "net", value_parser = parse_subnet)]
    pub subnet: Option<crate::net::addr::Ipv4Subnet>,
    /// Forward a host port to a guest port (repeatable); HOSTADDR defaults to 127.0.0.1 and
    /// HOSTPORT 0 picks a free port.
    #[arg(long, value_name = "[HOSTADDR:]HOSTPORT:GUESTPORT", requires = "net",
          value_parser = crate::net::forward::ForwardSpec::parse)]
    pub forward: Vec<crate::net::forward::ForwardSpec>,
    /// How the guest learns about virtio devices: the kernel command line, ACPI, or both.
    #[arg(long, value_name = "HOW", default_value = "both")]
    pub virtio_discovery: Discovery,
    /// Run without seccomp filters. For debugging nvmm only: use it when nvmm stopped with
    /// "made a forbidden system call", and report that as a bug.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// `--console` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleKind {
    /// The 8250 UART (ttyS0).
    Serial,
    /// A virtio console (hvc0).
    Virtio,
}

/// `--virtio-discovery` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Discovery {
    /// `virtio_mmio.device=` on the command line and `LNRO0005` devices in ACPI.
    Both,
    /// Command line only (kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, e.g. NixOS).
    Cmdline,
    /// ACPI only (e.g. Debian's kernels).
    Acpi,
}

impl From<Discovery> for VirtioDiscovery {
    fn from(value: Discovery) -> Self {
        match value {
            Discovery::Both => VirtioDiscovery::Both,
            Discovery::Cmdline => VirtioDiscovery::Cmdline,
            Discovery::Acpi => VirtioDiscovery::Acpi,
        }
    }
}

fn parse_subnet(text: &str) -> Result<crate::net::addr::Ipv4Subnet, String> {
    crate::net::addr::Ipv4Subnet::parse(text).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The VM name: `--name`, else the kernel's file name reduced to a valid hostname.
    pub fn vm_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let stem = self
                .kernel
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let name: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .take(32)
                .collect();
            let name = name.trim_matches('-').to_owned();
            if name.is_empty() {
                "vm".to_owned()
            } else {
                name
            }
        })
    }
}

/// `TAP[,mac=52:54:00:12:34:56]`.
fn parse_tap(spec: &str) -> Result<NetConfig, String> {
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty())
        .ok_or("the tap name is empty")?;
    let mut mac = derived_mac(tap.as_bytes());
    for option in parts {
        match option.split_once('=') {
            Some(("mac", value)) => mac = parse_mac(value)?,
            _ => return Err(format!("unknown tap option {option:?} (known: mac=MAC)")),
        }
    }
    Ok(NetConfig {
        tap: tap.to_owned(),
        mac,
    })
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| format!("invalid MAC address {text:?}")))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| format!("invalid MAC address {text:?}"))?;
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

/// A locally administered unicast MAC from a stable hash (FNV-1a) of `seed`.
pub fn derived_mac(seed: &[u8]) -> [u8; 6] {
    let hash = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let b = hash.to_le_bytes();
    [0x52, 0x56, b[0], b[1], b[2], b[3]]
}

/// `PATH[,ro][,serial=ID]`. A path containing a comma cannot be given this way.
fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("the disk path is empty")?;
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => disk.read_only = true,
            Some(("serial", id)) if !id.is_empty() && id.len() <= 20 => {
                disk.serial = Some(id.to_owned())
            }
            Some(("serial", _)) => return Err("serial must be 1 to 20 bytes".into()),
            _ => {
                return Err(format!(
                    "unknown disk option {option:?} (known: ro, serial=ID)"
                ));
            }
        }
    }
    Ok(disk)
}

/// CPU features `--cpu-hide` can hide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HiddenCpuFeature {
    /// CMPXCHG16B.
    Cx16,
    /// XSAVE and everything that needs it (AVX, AVX2, AVX-512).
    Xsave,
}

impl RunArgs {
    /// The VM these flags describe.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_mib: self.mem,
            vcpus: self.cpus,
            cpuid: CpuidPolicy {
                hide_cx16: self.cpu_hide.contains(&HiddenCpuFeature::Cx16),
                hide_xsave: self.cpu_hide.contains(&HiddenCpuFeature::Xsave),
            },
            console: ConsoleConfig {
                stdin: true,
                escape: true,
                virtio: self.console == ConsoleKind::Virtio,
                backend: nvmm_vmm::ConsoleBackend::Terminal,
            },
            disks: self.disk.clone(),
            nets: self.tap.clone(),
            virtio_discovery: self.virtio_discovery.into(),
            seccomp: !self.no_seccomp,
        }
    }
}

/// `nvmm doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_become_a_vm_config() {
        let cli = Cli::try_parse_from([
            "nvmm",
            "run",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--cmdline",
            "quiet",
            "--mem",
            "64",
            "--cpus",
            "3",
            "--cpu-hide",
            "cx16,xsave",
            "-vv",
        ])
        .unwrap();
        assert_eq!(cli.verbosity(), log::LevelFilter::Debug);
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let config = run.vm_config();
        assert_eq!(config.kernel, PathBuf::from("k"));
        assert_eq!(config.initrd, Some(PathBuf::from("i")));
        assert_eq!((config.mem_mib, config.vcpus), (64, 3));
        assert!(config.cpuid.hide_cx16 && config.cpuid.hide_xsave);
    }

    #[test]
    fn disk_specs_parse() {
        let disk = parse_disk("/img/store.erofs,ro,serial=nix-store").unwrap();
        assert_eq!(disk.path, PathBuf::from("/img/store.erofs"));
        assert!(disk.read_only);
        assert_eq!(disk.serial.as_deref(), Some("nix-store"));
        assert!(!parse_disk("disk.img").unwrap().read_only);
        assert!(parse_disk("").is_err());
        assert!(parse_disk("d.img,rw").is_err());
        assert!(parse_disk("d.img,serial=").is_err());
        assert!(parse_disk(&format!("d.img,serial={}", "x".repeat(21))).is_err());
    }

    #[test]
    fn vm_names_default_to_the_kernel_file() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["nvmm", "run"];
            argv.extend_from_slice(args);
            let Command::Run(run) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("expected run")
            };
            run
        };
        assert_eq!(
            parse(&["--kernel", "/k/vmlinux-6.1.elf"]).vm_name(),
            "vmlinux-6-1"
        );
        assert_eq!(parse(&["--kernel", "/k/__"]).vm_name(), "vm");
        assert_eq!(parse(&["--kernel", "k", "--name", "web"]).vm_name(), "web");
        let net = parse(&["--kernel", "k", "--net"]);
        assert_eq!(net.net.as_deref(), Some("nvmm0"));
        assert!(
            Cli::try_parse_from(["nvmm", "run", "--kernel", "k", "--forward", "80:80"]).is_err(),
            "--forward needs --net"
        );
    }

    #[test]
    fn tap_specs_parse() {
        let tap = parse_tap("tap0,mac=52:54:00:ab:cd:ef").unwrap();
        assert_eq!(tap.tap, "tap0");
        assert_eq!(tap.mac, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        let derived = parse_tap("tap1").unwrap().mac;
        assert_eq!(derived, parse_tap("tap1").unwrap().mac, "stable");
        assert_eq!(derived[0] & 0b11, 0b10, "locally administered unicast");
        assert!(parse_tap("tap0,mac=01:00:00:00:00:00").is_err());
        assert!(parse_tap("tap0,mac=zz").is_err());
        assert!(parse_tap(",mac=52:54:00:00:00:01").is_err());
    }

    #[test]
    fn cpu_count_is_range_checked() {
        for bad in ["0", "255", "-1", "many"] {
            assert!(Cli::try_parse_from(["nvmm", "run", "--kernel", "k", "--cpus", bad]).is_err());
        }
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
