//! `nvmm run`: boot a kernel with the console on this terminal.

use std::net::{IpAddr, SocketAddr};

use crate::args::{LogsArgs, RunArgs};
use crate::background::{self, Daemon, ReadyPipe, VmDir};
use crate::exit::{CliError, Outcome};
use crate::net::forward::{ForwardSpec, Forwarder};
use crate::net::host::{self, Membership, Network, NetworkConfig};
use crate::terminal::{self, RawTerminal};

/// The guest's ssh port, forwarded for every VM on a network.
const GUEST_SSH_PORT: u16 = 22;

/// `nvmm run`: boots the kernel and serves it until it ends.
pub fn run(args: &RunArgs) -> Result<Outcome, CliError> {
    let launch = Launch {
        name: args.vm_name(),
        config: args.vm_config(),
        detach: args.detach,
        network: args.net.as_ref().map(|network| NetworkRequest {
            config: NetworkConfig {
                name: network.clone(),
                subnet: args.subnet,
            },
            forwards: args.forward.clone(),
        }),
        cmdline_network: true,
        system_disks: None,
    };
    Ok(match launch.start()? {
        Launched::InBackground(started) => Outcome::Done(started),
        Launched::Ended(outcome) => outcome,
    })
}

/// One VM to start: what `nvmm run` and `nvmm boot` hand over once they know what to boot.
#[derive(Debug)]
pub struct Launch {
    /// The VM's name.
    pub name: String,
    /// The machine.
    pub config: nvmm_vmm::VmConfig,
    /// Run in the background.
    pub detach: bool,
    /// The network to join, if any.
    pub network: Option<NetworkRequest>,
    /// Tell the guest its network on the kernel command line (`nvmm_ip=` …).
    pub cmdline_network: bool,
    /// The store, overlay and seed disks of a system booted with `nvmm boot`.
    pub system_disks: Option<crate::boot::SystemDisks>,
}

/// A network to join and the ports to forward into the VM.
#[derive(Debug, Clone)]
pub struct NetworkRequest {
    /// Which network.
    pub config: NetworkConfig,
    /// Ports beyond ssh.
    pub forwards: Vec<ForwardSpec>,
}

/// What [`Launch::start`] returns in the process that called it.
#[derive(Debug)]
pub enum Launched {
    /// The VM was handed to a background process; `true` if it started.
    InBackground(bool),
    /// The VM ran in this process (the foreground, or the background process itself) and ended.
    Ended(Outcome),
}

impl Launch {
    /// Starts the VM: in a background process (`detach`), else here, attached to this terminal.
    pub fn start(self) -> Result<Launched, CliError> {
        let Launch {
            name,
            mut config,
            detach,
            network,
            cmdline_network,
            system_disks,
        } = self;
        let (runtime_dir, state_dir) = host::state_dirs();
        let vm_dir = VmDir::new(&runtime_dir, &name);
        let mut background = None;
        // Held while the VM runs: the pid file says who serves this name.
        let _pid_file;
        if detach {
            // Before anything starts a thread: the daemon is forked here.
            match background::daemonize(&vm_dir, &name)? {
                Daemon::Parent(started) => {
                    if started {
                        eprintln!(
                            "nvmm: {name} runs in the background; `nvmm console {name}` attaches, \
                             `nvmm logs {name}` shows its console"
                        );
                    }
                    return Ok(Launched::InBackground(started));
                }
                Daemon::Child(ready) => {
                    config.console.backend = vm_dir.console_backend();
                    config.console.stdin = false;
                    _pid_file = vm_dir.pid_file();
                    background = Some(ready);
                }
            }
        } else {
            _pid_file = background::claim(&vm_dir, &name)?;
        }
        // On an error below, dropping it still stops forwarding and removes the tap.
        let network = match &network {
            Some(request) => Some(join_network(&name, request, cmdline_network, &mut config)?),
            None => None,
        };
        // Removed when the VM ends (fresh overlay, seed), after the VM has let go of them.
        let _disks = match &system_disks {
            Some(disks) => Some(disks.attach(
                &name,
                network.as_ref().map(|n| &n.membership),
                (&runtime_dir, &state_dir),
                &mut config,
            )?),
            None => None,
        };
        let exit = boot_and_serve(&config, background.as_mut())?;
        if let Some(network) = network {
            network.leave();
        }
        Ok(Launched::Ended(Outcome::Vm(exit)))
    }
}

fn boot_and_serve(
    config: &nvmm_vmm::VmConfig,
    background: Option<&mut ReadyPipe>,
) -> Result<nvmm_vmm::VmExit, CliError> {
    let vm = nvmm_vmm::build_and_boot(config)?;
    terminal::stop_on_signals(vm.stop_handle()).map_err(CliError::Signals)?;
    if let Some(ready) = background {
        ready.ready();
        return Ok(vm.run_until_exit()?);
    }
    terminal::follow_window_size(vm.resize_handle()).map_err(CliError::Signals)?;
    let _raw = RawTerminal::enter().map_err(CliError::Terminal)?;
    // Lets tests prove the panic path restores the terminal; never set in normal use.
    if std::env::var_os("NVMM_TEST_PANIC_AFTER_BOOT").is_some() {
        panic!("panic injected by NVMM_TEST_PANIC_AFTER_BOOT");
    }
    Ok(vm.run_until_exit()?)
}

/// A VM's place on a network, for as long as it runs.
struct VmNetwork {
    // Fields drop in order: the record, the forwarders, then the tap.
    record: ForwardRecord,
    forwarders: Vec<Forwarder>,
    membership: Membership,
}

/// `RUNTIME_DIR/vms/NAME/forwards`: one `HOSTADDR:PORT GUESTPORT` line per forwarded port, the
/// first being ssh, so `nvmm ssh` finds the port. Removed when the VM ends.
struct ForwardRecord(std::path::PathBuf);

impl ForwardRecord {
    fn write(
        runtime_dir: &std::path::Path,
        vm_name: &str,
        forwarders: &[Forwarder],
    ) -> std::io::Result<Self> {
        let dir = runtime_dir.join("vms").join(vm_name);
        std::fs::create_dir_all(&dir)?;
        let text: String = forwarders
            .iter()
            .map(|f| format!("{} {}\n", f.local_addr(), f.target().port()))
            .collect();
        let path = dir.join("forwards");
        std::fs::write(&path, text)?;
        Ok(Self(path))
    }
}

impl Drop for ForwardRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl VmNetwork {
    /// Stops forwarding and leaves the network, reporting (not failing on) clean-up errors:
    /// the VM has already ended the way the user will be told.
    fn leave(self) {
        drop(self.record);
        for forwarder in self.forwarders {
            forwarder.stop();
        }
        if let Err(err) = self.membership.leave() {
            log::warn!("leaving the network: {}", crate::exit::error_chain(&err));
        }
    }
}

/// Joins the requested network, adds the tap to `config`, tells the guest its address, name
/// and peers on the command line (`cmdline_network`), and starts the port forwarders.
fn join_network(
    vm_name: &str,
    request: &NetworkRequest,
    cmdline_network: bool,
    config: &mut nvmm_vmm::VmConfig,
) -> Result<VmNetwork, CliError> {
    let (runtime_dir, state_dir) = host::state_dirs();
    host::reap_stale(&runtime_dir)?;
    let (network, membership) = Network::join(
        &request.config,
        &runtime_dir,
        &state_dir,
        vm_name,
        std::process::id(),
    )?;
    config.nets.push(nvmm_vmm::NetConfig {
        tap: membership.tap.clone(),
        mac: membership.mac,
    });
    if cmdline_network {
        config.cmdline = format!("{} {}", guest_network_cmdline(&membership), config.cmdline);
    }

    let guest = IpAddr::V4(membership.address);
    let ssh = Forwarder::start(
        SocketAddr::new(ForwardSpec::DEFAULT_HOST_ADDR, 0),
        SocketAddr::new(guest, GUEST_SSH_PORT),
    )?;
    let mut forwarders = vec![ssh];
    for spec in &request.forwards {
        forwarders.push(Forwarder::start(spec.listen_addr(), spec.target(guest))?);
    }
    eprintln!(
        "nvmm: {vm_name} is {}/{} on {} (host {}); ssh: 127.0.0.1:{}",
        membership.address,
        membership.prefix_len,
        network.bridge,
        network.host_addr,
        forwarders[0].local_addr().port()
    );
    for forwarder in &forwarders[1..] {
        eprintln!(
            "nvmm: forwarding {} -> {}",
            forwarder.local_addr(),
            forwarder.target()
        );
    }
    let record =
        ForwardRecord::write(&runtime_dir, vm_name, &forwarders).map_err(CliError::Record)?;
    Ok(VmNetwork {
        record,
        forwarders,
        membership,
    })
}

/// What the guest needs to configure itself: `nvmm_ip=ADDR/PREFIX nvmm_gw=HOST
/// nvmm_hostname=NAME nvmm_hosts=NAME=ADDR,...` (every VM with an address in the network).
fn guest_network_cmdline(membership: &Membership) -> String {
    let hosts: Vec<String> = membership
        .hosts
        .iter()
        .map(|(name, addr)| format!("{name}={addr}"))
        .collect();
    format!(
        "nvmm_ip={}/{} nvmm_gw={} nvmm_hostname={} nvmm_hosts={}",
        membership.address,
        membership.prefix_len,
        membership.gateway,
        membership.vm_name,
        hosts.join(",")
    )
}

/// `nvmm console NAME`.
pub fn console(name: &str) -> Result<Outcome, CliError> {
    let (runtime_dir, _) = host::state_dirs();
    background::attach(&VmDir::new(&runtime_dir, name), name)?;
    Ok(Outcome::Done(true))
}

/// `nvmm logs NAME [-f]`.
pub fn logs(args: &LogsArgs) -> Result<Outcome, CliError> {
    let (runtime_dir, _) = host::state_dirs();
    background::logs(
        &VmDir::new(&runtime_dir, &args.name),
        &args.name,
        args.follow,
    )?;
    Ok(Outcome::Done(true))
}
