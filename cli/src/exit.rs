//! Turning results into what the user sees: one `error:` line (the whole cause chain), one
//! `hint:` line, and an exit code.
//!
//! Exit codes: 0 the VM ended normally (power-off, reset, Ctrl-A x) or the command succeeded;
//! 1 nvmm could not do what was asked; 2 bad command-line usage (clap); 3 the guest crashed
//! (triple fault, KVM emulation failure); 4 nvmm broke its own sandbox (a thread made a system
//! call its seccomp filter forbids: a bug in nvmm, reported by the SIGSYS handler in
//! sandbox.rs); 128 + N stopped by signal N.
//!
//! The sandbox gets a code of its own rather than 128 + SIGSYS (159): 128 + N means that
//! something outside asked nvmm to stop and it stopped cleanly, while 4 continues the "whose
//! fault" scale of 1 to 3 (the host or the request, the command line, the guest) with nvmm
//! itself, and a script can tell it apart from a guest crash.

use std::process::ExitCode;

use nvmm_vmm::boot::BootError;
use nvmm_vmm::device_manager::DeviceError;
use nvmm_vmm::devices::BlockError;
use nvmm_vmm::kvm::KvmError;
use nvmm_vmm::vcpu::GuestFault;
use nvmm_vmm::{ConfigError, VmExit};

/// Generic failure.
pub const EXIT_ERROR: u8 = 1;
/// The guest crashed.
pub const EXIT_GUEST_FAILED: u8 = 3;
/// A thread made a system call its seccomp filter forbids (a bug in nvmm).
pub const EXIT_SANDBOX: u8 = 4;

/// Errors of the nvmm command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] nvmm_vmm::Error),
    /// Raw mode could not be set.
    #[error("cannot put the terminal in raw mode")]
    Terminal(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] nvmm_vmm::seccomp::SeccompError),
    /// Network set-up failed.
    #[error(transparent)]
    Net(#[from] crate::net::host::NetError),
    /// A port forward could not start.
    #[error(transparent)]
    Forward(#[from] crate::net::forward::ForwardError),
    /// VM state files.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The control socket could not be set up.
    #[error("cannot serve the control socket {}", .path.display())]
    Control {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Background VMs.
    #[error(transparent)]
    Background(#[from] crate::background::BackgroundError),
    /// Evaluating or building with nix failed.
    #[error(transparent)]
    Nix(#[from] crate::nix::NixError),
    /// A runner directory is unusable.
    #[error(transparent)]
    Runner(#[from] crate::runner::RunnerError),
    /// A VM's disks could not be made.
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    /// No such VM runs.
    #[error("no VM named {name} runs")]
    NotRunning {
        /// The name.
        name: String,
    },
    /// `nvmm ssh` cannot log in.
    #[error("cannot ssh into {name}: {why}")]
    NoSsh {
        /// The VM.
        name: String,
        /// Why.
        why: String,
    },
    /// A program could not be run.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Arguments that parse but do not go together.
    #[error("{0}")]
    Usage(String),
    /// A background VM's nvmm ended while it set up, without an error message.
    #[error("{name} did not start: its nvmm ended without an error message")]
    BackgroundStart {
        /// The VM.
        name: String,
    },
    /// Writing the report failed.
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
}

/// What a successful command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A VM ran and ended this way.
    Vm(VmExit),
    /// A command finished; `true` if everything it checked passed.
    Done(bool),
}

/// Prints the outcome or the error and returns the process exit code.
pub fn report(result: Result<Outcome, CliError>) -> ExitCode {
    match result {
        Ok(Outcome::Vm(exit)) => {
            let code = match exit {
                VmExit::PowerOff => 0,
                VmExit::Reset => {
                    eprintln!("nvmm: guest requested reset; the VM has ended");
                    0
                }
                VmExit::Quit => 0,
                VmExit::Signal(signal) => {
                    log::info!("stopped by signal {signal}");
                    128u8.wrapping_add(signal as u8)
                }
            };
            ExitCode::from(code)
        }
        Ok(Outcome::Done(true)) => ExitCode::SUCCESS,
        Ok(Outcome::Done(false)) => ExitCode::from(EXIT_ERROR),
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            if let Some(hint) = hint(&err) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

/// "outer: cause: root cause" on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Transparent wrappers repeat their inner message; print each message once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn exit_code(err: &CliError) -> u8 {
    match err {
        CliError::Nix(crate::nix::NixError::Interrupted { signal }) => {
            128u8.wrapping_add(*signal as u8)
        }
        CliError::Vmm(nvmm_vmm::Error::Guest(_)) => EXIT_GUEST_FAILED,
        _ => EXIT_ERROR,
    }
}

fn hint(err: &CliError) -> Option<String> {
    use crate::net::forward::ForwardError;
    use crate::net::host::NetError;
    let err = match err {
        CliError::Vmm(err) => err,
        CliError::Net(net) if net.is_permission_denied() => {
            return Some(
                "VM networking needs root or CAP_NET_ADMIN: run nvmm as root (only `nvmm run` \
                 without --net boots without a network)"
                    .into(),
            );
        }
        CliError::Net(NetError::CreateTap { source, .. }) if is_tun_missing(source) => {
            return Some(TUN_MISSING.into());
        }
        CliError::Net(NetError::InvalidNetworkName { .. }) => {
            return Some("--net names the host bridge, e.g. --net nvmm1".into());
        }
        CliError::NoSsh { name, .. } => {
            return Some(format!(
                "`nvmm console {name}` attaches to its console instead"
            ));
        }
        CliError::Net(NetError::VmAlreadyRunning { .. }) => {
            return Some("give this VM another --name, or stop the running one".into());
        }
        CliError::Net(
            NetError::SubnetClash { .. }
            | NetError::NoFreeSubnet { .. }
            | NetError::SubnetInUse { .. },
        ) => {
            return Some(
                "choose a free private range with --subnet, e.g. --subnet 10.214.0.0/24".into(),
            );
        }
        CliError::Background(crate::background::BackgroundError::AlreadyRunning {
            name, ..
        }) => {
            return Some(format!(
                "attach to it with `nvmm console {name}`, or pick another --name"
            ));
        }
        CliError::State(crate::state::StateError::AlreadyRunning { name, .. }) => {
            return Some(format!(
                "attach to it with `nvmm console {name}`, or stop it with `nvmm stop {name}`"
            ));
        }
        CliError::Background(crate::background::BackgroundError::NotRunning(_)) => {
            return Some("start one with `nvmm run -d --name NAME ...`".into());
        }
        CliError::Nix(nix) => return nix_hint(nix),
        CliError::NotRunning { .. } => {
            return Some("`nvmm ps` lists the VMs that run; `nvmm up NAME` starts one".into());
        }
        CliError::Runner(_) => {
            return Some("docs/runner.md describes the runner directory and nvmm.json".into());
        }
        CliError::Forward(ForwardError::PortInUse { .. }) => {
            return Some(
                "pick another host port (in --forward, or nvmm.forwardPorts of the \
                 configuration), or 0 for a free one"
                    .into(),
            );
        }
        _ => return None,
    };
    let hint = match err {
        nvmm_vmm::Error::Kvm(KvmError::OpenKvm(e)) => match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => {
                "KVM is not available: enable virtualization in the firmware and load the \
                 kvm_intel or kvm_amd module (`nvmm doctor` checks this host)"
                    .into()
            }
            libc::EACCES | libc::EPERM => {
                "you may not open /dev/kvm: add yourself to the kvm group \
                 (`sudo usermod -aG kvm $USER`, then log in again) or run as root"
                    .into()
            }
            _ => "run `nvmm doctor` to check this host's KVM".into(),
        },
        nvmm_vmm::Error::Kvm(KvmError::TooManyVcpus { max, .. }) => {
            format!("choose --cpus between 1 and {max}")
        }
        nvmm_vmm::Error::Kvm(KvmError::AllocateMemory { .. }) => {
            "choose a smaller --mem or free memory on the host".into()
        }
        nvmm_vmm::Error::Config(ConfigError::MemoryTooSmall(_)) => format!(
            "choose --mem {} or more (for nvmm boot and up also nvmm.memory)",
            nvmm_vmm::MIN_MEM_MIB
        ),
        nvmm_vmm::Error::Config(ConfigError::MemoryExceedsHost { host, .. }) => {
            format!("choose --mem below {host} (for nvmm boot and up also nvmm.memory)")
        }
        nvmm_vmm::Error::Boot(boot) => match boot {
            BootError::ReadKernel { .. } => "check the path given to --kernel".into(),
            BootError::UnknownKernelFormat(_) | BootError::LoadKernel { .. } => {
                "--kernel takes an x86_64 ELF vmlinux or a bzImage (vmlinuz)".into()
            }
            BootError::NoLongModeEntry(_) => "use a 64-bit kernel (Linux 3.x or newer)".into(),
            BootError::ReadInitrd { .. } => "check the path given to --initrd".into(),
            BootError::InitrdTooLarge { size, .. } => format!(
                "give the VM more memory, e.g. --mem {}",
                (size >> 20) * 2 + 64
            ),
            BootError::CmdlineTooLong { .. } | BootError::InvalidCmdline(_) => {
                "shorten --cmdline (nvmm adds its own defaults first)".into()
            }
            _ => return None,
        },
        nvmm_vmm::Error::Devices(DeviceError::Disk(disk)) => match disk {
            BlockError::Open {
                read_only: false,
                source,
                ..
            } if matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::EPERM)
            ) =>
            {
                "the disk is not writable: add ,ro to --disk to attach it read-only".into()
            }
            BlockError::Open { .. } => "check the path given to --disk".into(),
            BlockError::NotADisk(_) => "--disk takes an image file or a block device".into(),
            _ => return None,
        },
        nvmm_vmm::Error::Devices(DeviceError::TooManyVirtioDevices) => {
            "attach fewer disks or network interfaces".into()
        }
        nvmm_vmm::Error::Devices(DeviceError::OpenTap { source, .. }) => {
            match source.raw_os_error() {
                _ if is_tun_missing(source) => TUN_MISSING.into(),
                Some(libc::EPERM | libc::EACCES) => {
                    "opening a tap needs root or CAP_NET_ADMIN (or a tap owned by you)".into()
                }
                Some(libc::EBUSY) => "the tap is in use by another process".into(),
                _ => "check the tap name (`ip link show`)".into(),
            }
        }
        nvmm_vmm::Error::Guest(GuestFault::InternalError { .. }) if nvmm_vmm::kvm::is_kvm_pvm() => {
            "this host's KVM is kvm-pvm (software, nested): stock Linux kernels cannot run \
             here; nvmm's own test guest can (`nvmm doctor`)"
                .into()
        }
        nvmm_vmm::Error::Guest(GuestFault::InternalError { .. }) => {
            "the guest ran an instruction KVM could not emulate; try --cpu-hide cx16,xsave".into()
        }
        nvmm_vmm::Error::Guest(_) => {
            "the guest crashed; run with -v to see more, and check that the kernel is a 64-bit \
             x86 kernel"
                .into()
        }
        _ => return None,
    };
    Some(hint)
}

/// The hint for a host without the tun driver.
const TUN_MISSING: &str = "VM networking needs the tun driver and /dev/net/tun: `modprobe tun` \
     (`nvmm doctor` checks this host)";

/// Opening /dev/net/tun failed: the node is not there (ENOENT) or no driver is behind it
/// (ENODEV).
fn is_tun_missing(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
}

fn nix_hint(err: &crate::nix::NixError) -> Option<String> {
    use crate::nix::NixError;
    Some(match err {
        NixError::NotInstalled => "install Nix (Debian: `apt-get install nix-bin`; elsewhere see \
             https://nixos.org/download), or boot a runner directory with `nvmm boot --runner DIR`"
            .into(),
        NixError::TooOld { .. } => "install Nix 2.4 or later".into(),
        NixError::FlakeNotFound { .. } => {
            "run nvmm in the directory of your flake.nix, or point --flake at it".into()
        }
        NixError::NoConfigurations { .. } => "define nixosConfigurations.NAME = \
             nixpkgs.lib.nixosSystem { ... } in flake.nix (nvmm's flake has an example: \
             templates/default)"
            .into(),
        NixError::NoSuchConfiguration { .. } => match err.suggestion() {
            // Not `nvmm boot NAME`: the name may have come to `up`, `boot` or `list`.
            Some(name) => format!("did you mean `{name}`?"),
            None => "`nvmm list` shows the flake's configurations".into(),
        },
        NixError::Evaluation { .. } => "that is nix's message about the configuration; \
             `nix eval --show-trace FLAKE#nixosConfigurations.NAME.config.system.build.toplevel` \
             prints the whole trace"
            .into(),
        NixError::Build {
            derivation: Some(drv),
            ..
        } => format!("`nix log {drv}` shows the whole build log"),
        NixError::Build { .. } => "run again with -L to see the build logs".into(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_is_one_line() {
        let err = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            error_chain(&err),
            "outer: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn guest_faults_exit_3() {
        let err = CliError::Vmm(nvmm_vmm::Error::Guest(GuestFault::TripleFault { vcpu: 0 }));
        assert_eq!(exit_code(&err), EXIT_GUEST_FAILED);
        assert!(hint(&err).is_some());
    }
}
