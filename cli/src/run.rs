//! `nvmm run`: boot a kernel with the console on this terminal.

use std::net::{IpAddr, SocketAddr};

use crate::args::{LogsArgs, RunArgs};
use crate::background::{self, Daemon, ReadyPipe, Started};
use crate::control::{self, Controls};
use crate::exit::{CliError, Outcome};
use crate::net::forward::{ForwardSpec, Forwarder};
use crate::net::host::{self, Membership, Network, NetworkConfig};
use crate::sandbox;
use crate::state::{self, ForwardRecord, NetworkRecord, VmDir, VmRecord};
use crate::terminal::{self, RawTerminal};

/// The guest's ssh port, forwarded for every VM on a network.
const GUEST_SSH_PORT: u16 = 22;

/// `nvmm run`: boots the kernel and serves it until it ends.
pub fn run(args: &RunArgs) -> Result<Outcome, CliError> {
    let registered = args.name.is_some() || args.detach || args.net.is_some();
    if registered {
        state::reap_dead(&host::state_dirs().0);
    }
    let launch = Launch {
        name: args.vm_name(),
        registered,
        flake: None,
        config: args.vm_config(),
        detach: args.detach,
        network: args.net.as_ref().map(|network| NetworkRequest {
            joined: None,
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
        Launched::InBackground(starting) => match starting.wait() {
            Started::Running => Outcome::Done(true),
            Started::Failed => Outcome::Done(false),
            Started::Vanished => {
                return Err(CliError::BackgroundStart {
                    name: args.vm_name(),
                });
            }
        },
        Launched::Ended(outcome) => outcome,
    })
}

/// One VM to start: what `nvmm run` and `nvmm boot` hand over once they know what to boot.
#[derive(Debug)]
pub struct Launch {
    /// The VM's name.
    pub name: String,
    /// Whether the VM holds its name in nvmm's state (lock, `vm.json`, control socket), so that
    /// `ps`, `stop`, `ssh` see it and a second VM of that name is refused. Every VM but a
    /// foreground `nvmm run` without `--name`, `--net` or `-d`: several of those may boot the
    /// same kernel at once.
    pub registered: bool,
    /// The flake it comes from (`nvmm boot`), for `ps` and `down`.
    pub flake: Option<String>,
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
#[derive(Debug)]
pub struct NetworkRequest {
    /// Which network.
    pub config: NetworkConfig,
    /// Ports beyond ssh.
    pub forwards: Vec<ForwardSpec>,
    /// The VM's place in it, when the process starting several VMs joined them all at once
    /// ([`Network::join_all`]); the VM's own process adopts it.
    pub joined: Option<(Network, Membership)>,
}

/// What [`Launch::start`] returns in the process that called it.
#[derive(Debug)]
pub enum Launched {
    /// The VM was handed to a background process, which is setting it up.
    InBackground(background::Starting),
    /// The VM ran in this process (the foreground, or the background process itself) and ended.
    Ended(Outcome),
}

impl Launch {
    /// Starts the VM: in a background process (`detach`), else here, attached to this terminal.
    /// Callers reap dead VMs first ([`state::reap_dead`]), once for all they start.
    pub fn start(self) -> Result<Launched, CliError> {
        let Launch {
            name,
            registered,
            flake,
            mut config,
            detach,
            network,
            cmdline_network,
            system_disks,
        } = self;
        let started = std::time::Instant::now();
        // Sizes that cannot work fail here, before a background process, a network or disks
        // exist: one error, nothing to undo.
        nvmm_vmm::validate_config(&config).map_err(nvmm_vmm::Error::from)?;
        let sandboxed = config.seccomp;
        let (runtime_dir, state_dir) = host::state_dirs();
        let vm_dir = VmDir::new(&runtime_dir, &name);
        let mut background = None;
        if detach {
            // Before anything starts a thread: the daemon is forked here.
            match background::daemonize(&vm_dir, &name)? {
                Daemon::Parent(starting) => {
                    // The VM's process has the membership now (forked with it).
                    if let Some((_, membership)) = network.and_then(|n| n.joined) {
                        membership.hand_over();
                    }
                    return Ok(Launched::InBackground(starting));
                }
                Daemon::Child(ready) => {
                    config.console.backend = vm_dir.console_backend();
                    config.console.stdin = false;
                    background = Some(ready);
                }
            }
        }
        // Before the first filter: a forbidden call is reported, not a silent SIGSYS death.
        match sandboxed {
            true => sandbox::report_violations().map_err(CliError::Signals)?,
            false => log::warn!(
                "--no-seccomp: every thread runs without its seccomp filter (for debugging only)"
            ),
        }
        // The name is this process's until it ends; the lock's drop removes the runtime files.
        let _lock = match registered {
            true => Some(vm_dir.lock()?),
            false => None,
        };
        // On an error below, dropping it still stops forwarding and removes the tap.
        let network = match network {
            Some(request) => Some(join_network(&name, request, cmdline_network, &mut config)?),
            None => None,
        };
        // Removed when the VM ends (fresh overlay, seed), after the VM has let go of them.
        let disks = match &system_disks {
            Some(disks) => Some(disks.attach(
                &name,
                network.as_ref().map(|n| &n.membership),
                (&runtime_dir, &state_dir),
                &mut config,
            )?),
            None => None,
        };

        let record = VmRecord {
            name: name.clone(),
            flake,
            pid: std::process::id(),
            started_ms: state::now_ms(),
            memory_mib: config.mem_mib,
            vcpus: config.vcpus,
            background: detach,
            network: network.as_ref().map(VmNetwork::record),
            ssh: disks.as_ref().and_then(|d| d.ssh.clone()),
        };
        if registered {
            vm_dir.write_record(&record)?;
        }
        let vm = nvmm_vmm::build_and_boot(&config)?;
        if registered {
            control::serve(
                &vm_dir.file("control.sock"),
                Controls {
                    name: name.clone(),
                    stop: vm.stop_handle(),
                    shutdown: vm.shutdown_handle(),
                    console: detach.then(|| vm_dir.file("console.sock")),
                    started,
                },
                sandboxed,
            )
            .map_err(|source| CliError::Control {
                path: vm_dir.file("control.sock"),
                source,
            })?;
        }
        let exit = serve(vm, background.as_mut(), sandboxed, network.is_some())?;
        if let Some(network) = network {
            network.leave();
        }
        drop(disks);
        Ok(Launched::Ended(Outcome::Vm(exit)))
    }
}

/// Runs the booted VM until it ends: in the background, or on this terminal. Once its set-up is
/// done, before the event loop, this thread drops its capabilities (but `CAP_NET_ADMIN` when
/// `on_network`) and, with `sandboxed`, installs its seccomp filter.
fn serve(
    vm: nvmm_vmm::Vm,
    background: Option<&mut ReadyPipe>,
    sandboxed: bool,
    on_network: bool,
) -> Result<nvmm_vmm::VmExit, CliError> {
    terminal::stop_on_signals(vm.stop_handle()).map_err(CliError::Signals)?;
    if let Some(ready) = background {
        ready.ready();
        sandbox::confine_main_thread(sandboxed, on_network)?;
        return Ok(vm.run_until_exit()?);
    }
    terminal::follow_window_size(vm.resize_handle()).map_err(CliError::Signals)?;
    let _raw = RawTerminal::enter().map_err(CliError::Terminal)?;
    sandbox::confine_main_thread(sandboxed, on_network)?;
    // Lets tests prove the panic path restores the terminal (under the main thread's filter);
    // never set in normal use.
    if std::env::var_os("NVMM_TEST_PANIC_AFTER_BOOT").is_some() {
        panic!("panic injected by NVMM_TEST_PANIC_AFTER_BOOT");
    }
    Ok(vm.run_until_exit()?)
}

/// A VM's place on a network, for as long as it runs.
struct VmNetwork {
    // Fields drop in order: the forwarders, then the tap.
    forwarders: Vec<Forwarder>,
    membership: Membership,
    network: String,
}

impl VmNetwork {
    /// What `vm.json` says of it.
    fn record(&self) -> NetworkRecord {
        NetworkRecord {
            name: self.network.clone(),
            address: self.membership.address,
            forwards: self
                .forwarders
                .iter()
                .map(|f| ForwardRecord {
                    host: f.local_addr(),
                    guest: f.target().port(),
                })
                .collect(),
        }
    }

    /// Stops forwarding and leaves the network, reporting (not failing on) clean-up errors:
    /// the VM has already ended the way the user will be told.
    fn leave(self) {
        for forwarder in self.forwarders {
            forwarder.stop();
        }
        if let Err(err) = self.membership.leave() {
            log::warn!("leaving the network: {}", crate::exit::error_chain(&err));
        }
    }
}

/// Joins the requested network (or adopts the place joined for it), adds the tap to `config`,
/// tells the guest its address, name and peers on the command line (`cmdline_network`), and
/// starts the port forwarders.
fn join_network(
    vm_name: &str,
    request: NetworkRequest,
    cmdline_network: bool,
    config: &mut nvmm_vmm::VmConfig,
) -> Result<VmNetwork, CliError> {
    let (network, membership) = match request.joined {
        Some((network, mut membership)) => {
            membership.adopt()?;
            (network, membership)
        }
        None => {
            let (runtime_dir, state_dir) = host::state_dirs();
            Network::join(
                &request.config,
                &runtime_dir,
                &state_dir,
                vm_name,
                std::process::id(),
            )?
        }
    };
    config.nets.push(nvmm_vmm::NetConfig {
        tap: membership.tap.clone(),
        mac: membership.mac,
    });
    if cmdline_network {
        config.cmdline = format!("{} {}", guest_network_cmdline(&membership), config.cmdline);
    }

    let guest = IpAddr::V4(membership.address);
    let sandboxed = config.seccomp;
    let ssh = Forwarder::start(
        SocketAddr::new(ForwardSpec::DEFAULT_HOST_ADDR, 0),
        SocketAddr::new(guest, GUEST_SSH_PORT),
        sandboxed,
    )?;
    let mut forwarders = vec![ssh];
    for spec in &request.forwards {
        forwarders.push(Forwarder::start(
            spec.listen_addr(),
            spec.target(guest),
            sandboxed,
        )?);
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
    Ok(VmNetwork {
        forwarders,
        membership,
        network: request.config.name.clone(),
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
