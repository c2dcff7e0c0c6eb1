//! `nvmm boot` and `nvmm list`: from configuration names in a flake (or a runner directory) to
//! running VMs on one network.
//!
//! The recipe: build every runner (nix.rs) → read each `nvmm.json` (runner.rs) → give every
//! name its address first, so VMs booted together know each other → start the background VMs →
//! the first one (unless `-d`) on this terminal. Each VM's own process makes its disks: the
//! store image read-only, a fresh overlay (or the kept one), and the seed (docs/runner.md).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::args::{BootArgs, ListArgs};
use crate::background::Started;
use crate::disks::{self, DiskError, OverlayDisk, SeedDisk};
use crate::exit::{CliError, Outcome, error_chain};
use crate::fleet::{Table, print_stdout};
use crate::net::addr::format_mac;
use crate::net::host::{self, Membership, Network, NetworkConfig};
use crate::nix::{FlakeRef, Nix, NixLog, Selection};
use crate::run::{Launch, Launched, NetworkRequest};
use crate::runner::{Runner, RunnerConsole, RunnerDiscovery};
use crate::ssh;
use crate::state::{self, SshRecord, VmDir};

/// The name the host has in every guest's hosts table.
pub const HOST_NAME_IN_GUEST: &str = "nvmm-host";
/// Disk serials, as the guest module finds the disks (`/dev/disk/by-id/virtio-SERIAL`).
const STORE_SERIAL: &str = "nvmm-store";
const OVERLAY_SERIAL: &str = "nvmm-overlay";
const SEED_SERIAL: &str = "nvmm-seed";
/// The seed archive's format version (docs/runner.md).
const SEED_VERSION: &str = "1";

/// What to boot: runners by VM name, and the flake they came from.
#[derive(Debug)]
pub struct Targets {
    /// The flake, unless the runner came from `--runner`.
    pub flake: Option<FlakeRef>,
    /// (VM name, runner), in the order given.
    pub runners: Vec<(String, Runner)>,
}

/// `nvmm boot`.
pub fn boot(args: &BootArgs) -> Result<Outcome, CliError> {
    if !args.forward.is_empty() && args.names.len() > 1 {
        return Err(CliError::Usage(
            "--forward applies to one VM: boot with one NAME, or use nvmm.forwardPorts".into(),
        ));
    }
    let targets = match &args.runner {
        Some(dir) => runner_target(dir, args.name.as_deref())?,
        None => {
            let (flake, names) = split_names(&args.flake, &args.names)?;
            build_targets(flake, Selection::Named(&names), args.print_build_logs)?.1
        }
    };
    start_targets(args, &targets)
}

/// Joins every target to the network, then starts them: the background ones first, so that the
/// one on this terminal (the first, unless `-d`) starts among running peers. Returns in the
/// parent once all run, or in a VM's own process once its VM has ended.
pub fn start_targets(args: &BootArgs, targets: &Targets) -> Result<Outcome, CliError> {
    let (runtime_dir, state_dir) = host::state_dirs();
    state::reap_dead(&runtime_dir);
    for (name, _) in &targets.runners {
        if let Some(pid) = VmDir::new(&runtime_dir, name).running_pid() {
            return Err(CliError::State(state::StateError::AlreadyRunning {
                name: name.clone(),
                pid,
            }));
        }
    }
    let network = NetworkConfig {
        name: args.net.clone(),
        subnet: args.subnet,
    };
    // Every VM on the network before any starts: one turn of the network's lock for all, and
    // each guest finds all the others in its hosts table.
    let names: Vec<String> = targets.runners.iter().map(|(n, _)| n.clone()).collect();
    let (joined_network, memberships) = Network::join_all(
        &network,
        &runtime_dir,
        &state_dir,
        &names,
        std::process::id(),
    )?;
    // In the runners' order, so the attached VM's comes first. Those not handed to a VM yet
    // leave the network with the iterator if this returns early.
    let mut joined = memberships
        .into_iter()
        .map(|membership| (joined_network.clone(), membership));

    let flake = targets.flake.as_ref().map(FlakeRef::as_str);
    let (attached, background) = match args.detach {
        true => (None, &targets.runners[..]),
        false => (Some(&targets.runners[0]), &targets.runners[1..]),
    };
    let attached_joined = attached.and_then(|_| joined.next());
    // Asked once here, inherited by every fork. Where it fails, each VM reports why.
    if let Ok(kvm) = nvmm_vmm::kvm::open_kvm() {
        let _ = nvmm_vmm::kvm::supported_cpuid(&kvm);
    }
    // Forked all at once, so that they set up side by side; then waited for in order.
    let mut starting = Vec::new();
    for ((name, runner), membership) in background.iter().zip(joined.by_ref()) {
        let launch = launch(args, name, runner, &network, Some(membership), true, flake)?;
        match launch.start()? {
            Launched::InBackground(vm) => starting.push((name, vm)),
            // This is the background process; its VM has ended.
            Launched::Ended(outcome) => return Ok(outcome),
        }
    }
    let started: Vec<(&String, Started)> = starting
        .into_iter()
        .map(|(name, vm)| (name, vm.wait()))
        .collect();
    if let Some((name, _)) = started.iter().find(|(_, s)| *s == Started::Vanished) {
        return Err(CliError::BackgroundStart {
            name: (*name).clone(),
        });
    }
    // Each failed VM's nvmm printed its own error and hint.
    if started.iter().any(|(_, s)| *s == Started::Failed) {
        return Ok(Outcome::Done(false));
    }
    match attached {
        Some((name, runner)) => {
            match launch(args, name, runner, &network, attached_joined, false, flake)?.start()? {
                Launched::Ended(outcome) => Ok(outcome),
                Launched::InBackground(vm) => Ok(Outcome::Done(vm.wait() == Started::Running)),
            }
        }
        None => Ok(Outcome::Done(true)),
    }
}

/// `--runner DIR`: one VM, named by `--name`, the runner's `name`, or the directory's.
fn runner_target(dir: &Path, name: Option<&str>) -> Result<Targets, CliError> {
    let runner = Runner::load(dir)?;
    let name = name
        .map(str::to_owned)
        .or_else(|| runner.name.clone())
        .or_else(|| {
            dir.canonicalize()
                .ok()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "vm".into());
    Ok(Targets {
        flake: None,
        runners: vec![(name, runner)],
    })
}

/// Builds the runners `selection` names in `flake` with nix; also returns every configuration
/// name the flake has.
pub fn build_targets(
    flake: FlakeRef,
    selection: Selection<'_>,
    print_build_logs: bool,
) -> Result<(Vec<String>, Targets), CliError> {
    let build_logs = print_build_logs || log::max_level() >= log::LevelFilter::Info;
    let nix = Nix::new(match build_logs {
        true => NixLog::BuildLogs,
        false => NixLog::Progress,
    });
    let (_, state_dir) = host::state_dirs();
    let module = crate::nix::guest_module(&state_dir)?;
    let built = nix.build_runners(&flake, selection, &module)?;
    let runners = built
        .runners
        .into_iter()
        .map(|(name, dir)| Ok((name, Runner::load(&dir)?)))
        .collect::<Result<_, CliError>>()?;
    let targets = Targets {
        flake: Some(flake),
        runners,
    };
    Ok((built.configurations, targets))
}

/// `--flake REF` and `NAME...`, where a name may be `REF#NAME` (all from one flake). Duplicate
/// names are refused: one name is one VM.
fn split_names(flake: &str, names: &[String]) -> Result<(FlakeRef, Vec<String>), CliError> {
    let mut reference = None;
    let mut plain = Vec::new();
    for name in names {
        let (this_flake, name) = match name.rsplit_once('#') {
            Some((flake, name)) => (flake, name),
            None => (flake, name.as_str()),
        };
        if reference.get_or_insert(this_flake) != &this_flake {
            return Err(CliError::Usage(
                "all names must come from one flake (boot the others with another command)".into(),
            ));
        }
        if plain.iter().any(|n| n == name) {
            return Err(CliError::Usage(format!("{name} is named twice")));
        }
        plain.push(name.to_owned());
    }
    let reference = FlakeRef::resolve(reference.unwrap_or(flake))?;
    Ok((reference, plain))
}

/// The [`Launch`] of one VM: the runner's machine, the flags' overrides.
fn launch(
    args: &BootArgs,
    name: &str,
    runner: &Runner,
    network: &NetworkConfig,
    joined: Option<(Network, Membership)>,
    detach: bool,
    flake: Option<&str>,
) -> Result<Launch, CliError> {
    if let Some(version) = &runner.module_version
        && version != env!("CARGO_PKG_VERSION")
    {
        log::warn!(
            "{name} was built by nvmm guest module {version}; this is nvmm {}",
            env!("CARGO_PKG_VERSION")
        );
    }
    let mut forwards = runner.forwards.clone();
    forwards.extend(args.forward.iter().copied());
    let config = nvmm_vmm::VmConfig {
        kernel: runner.kernel.clone(),
        initrd: runner.initrd.clone(),
        cmdline: runner.cmdline.clone(),
        mem_mib: args.mem.unwrap_or(runner.memory_mib),
        vcpus: args.cpus.unwrap_or(runner.vcpus),
        cpuid: nvmm_vmm::CpuidPolicy::default(),
        console: nvmm_vmm::ConsoleConfig {
            stdin: true,
            escape: true,
            virtio: runner.console == RunnerConsole::Virtio,
            backend: nvmm_vmm::ConsoleBackend::Terminal,
        },
        disks: Vec::new(),
        nets: Vec::new(),
        virtio_discovery: match runner.virtio_discovery {
            RunnerDiscovery::Cmdline => nvmm_vmm::VirtioDiscovery::Cmdline,
            RunnerDiscovery::Acpi => nvmm_vmm::VirtioDiscovery::Acpi,
            RunnerDiscovery::Both => nvmm_vmm::VirtioDiscovery::Both,
        },
        seccomp: !args.no_seccomp,
    };
    Ok(Launch {
        name: name.to_owned(),
        registered: true,
        flake: flake.map(str::to_owned),
        config,
        detach,
        network: Some(NetworkRequest {
            config: network.clone(),
            forwards,
            joined,
        }),
        cmdline_network: runner.cmdline_network,
        system_disks: Some(SystemDisks {
            store_image: runner.store_image.clone(),
            overlay_bytes: runner.disk_size_mib << 20,
            keep: args.keep,
            system: runner.dir.to_string_lossy().into_owned(),
            scope: flake.map_or_else(|| "runners".to_owned(), state::scope_of_flake),
        }),
    })
}

/// The disks of a booted system, made by the VM's own process.
#[derive(Debug, Clone)]
pub struct SystemDisks {
    /// The read-only store image.
    pub store_image: Option<PathBuf>,
    /// The writable disk's size.
    pub overlay_bytes: u64,
    /// Keep the writable disk across boots (`--keep`).
    pub keep: bool,
    /// What the kept disk's record names as its system (the runner).
    pub system: String,
    /// Where the VM's keys and kept disk live: `STATE/vms/SCOPE/NAME` (state.rs).
    pub scope: String,
}

/// Files that live as long as the VM: dropped after it ends.
#[derive(Debug)]
pub struct AttachedDisks {
    _overlay: OverlayDisk,
    _seed: RemoveOnDrop,
    /// The keys the seed gave the guest, for `nvmm ssh`.
    pub ssh: Option<SshRecord>,
}

#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl SystemDisks {
    /// Makes the overlay and seed disks of VM `name` and adds the three disks to `config`, in
    /// the order and with the serials of docs/runner.md.
    pub fn attach(
        &self,
        name: &str,
        membership: Option<&Membership>,
        (runtime_dir, state_dir): (&Path, &Path),
        config: &mut nvmm_vmm::VmConfig,
    ) -> Result<AttachedDisks, CliError> {
        let disk = |path: PathBuf, read_only: bool, serial: &str| nvmm_vmm::DiskConfig {
            path,
            read_only,
            serial: Some(serial.to_owned()),
        };
        if let Some(store) = &self.store_image {
            let store = disks::open_store_image(store)?;
            config.disks.push(disk(store, true, STORE_SERIAL));
        }
        let persistent = state::persistent_vm_dir(state_dir, &self.scope, name);
        let overlay = if self.keep {
            let scope_dir = persistent.parent().unwrap_or(state_dir);
            let (overlay, warning) =
                OverlayDisk::keep(scope_dir, name, self.overlay_bytes, &self.system)?;
            if let Some(warning) = warning {
                log::warn!("{warning}");
            }
            overlay
        } else {
            OverlayDisk::create_fresh(&runtime_dir.join("vms"), name, self.overlay_bytes)?
        };
        log::info!(
            "{name}: {} writable disk {} ({} MiB)",
            if overlay.is_kept() { "kept" } else { "fresh" },
            overlay.path().display(),
            overlay.size_bytes() >> 20
        );
        config
            .disks
            .push(disk(overlay.path().to_path_buf(), false, OVERLAY_SERIAL));
        let seed_path = runtime_dir.join("vms").join(name).join("seed.img");
        let network = membership.map(SeedNetwork::of);
        let (seed_image, ssh) = seed_disk(name, network.as_ref(), &persistent)?;
        seed_image.write_to(&seed_path)?;
        let seed = RemoveOnDrop(seed_path.clone());
        config.disks.push(disk(seed_path, true, SEED_SERIAL));
        Ok(AttachedDisks {
            _overlay: overlay,
            _seed: seed,
            ssh,
        })
    }
}

/// The seed archive of VM `name` (docs/runner.md), and what `nvmm ssh` needs to log in. The
/// VM's keys live in `persistent`. Without `ssh-keygen` the ssh files are left out, with a
/// warning: the VM still boots, only `nvmm ssh` cannot log in.
fn seed_disk(
    name: &str,
    network: Option<&SeedNetwork>,
    persistent: &Path,
) -> Result<(SeedDisk, Option<SshRecord>), DiskError> {
    let mut seed = SeedDisk::builder();
    seed.dir("nvmm")
        .file("nvmm/version", format!("{SEED_VERSION}\n"), 0o644)
        .file("nvmm/hostname", format!("{name}\n"), 0o644);
    if let Some(network) = network {
        seed.file("nvmm/network", network.network_file(), 0o644)
            .file("nvmm/hosts", network.hosts_file(), 0o644);
    }
    let keys =
        ssh::host_key(persistent, name).and_then(|host| Ok((host, ssh::client_key(persistent)?)));
    let record = match keys {
        Ok((host, client)) => {
            seed.file("nvmm/ssh_host_ed25519_key", &host.private, 0o600)
                .file(
                    "nvmm/ssh_host_ed25519_key.pub",
                    format!("{}\n", host.public),
                    0o644,
                )
                .file(
                    "nvmm/authorized_keys",
                    format!("{}\n", client.public),
                    0o644,
                );
            Some(SshRecord {
                identity: ssh::client_key_path(persistent),
                host_key: host.public,
            })
        }
        Err(err) => {
            log::warn!(
                "{name} gets no ssh keys (`nvmm ssh` cannot log in): {}",
                error_chain(&err)
            );
            None
        }
    };
    Ok((seed.build()?, record))
}

/// What the seed says about the VM's network.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeedNetwork {
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    hosts: Vec<(String, Ipv4Addr)>,
}

impl SeedNetwork {
    fn of(membership: &Membership) -> SeedNetwork {
        SeedNetwork {
            mac: membership.mac,
            address: membership.address,
            prefix_len: membership.prefix_len,
            gateway: membership.gateway,
            hosts: membership.hosts.clone(),
        }
    }

    /// `nvmm/network`: which interface, its address, the gateway.
    fn network_file(&self) -> String {
        format!(
            "MAC={}\nADDRESS={}/{}\nGATEWAY={}\n",
            format_mac(&self.mac),
            self.address,
            self.prefix_len,
            self.gateway
        )
    }

    /// `nvmm/hosts`: the host, then every VM of the network.
    fn hosts_file(&self) -> String {
        let mut text = format!("{} {HOST_NAME_IN_GUEST}\n", self.gateway);
        for (name, address) in &self.hosts {
            text.push_str(&format!("{address} {name}\n"));
        }
        text
    }
}

/// One line of `nvmm list --json`.
#[derive(Debug, Serialize)]
struct ListedConfiguration {
    name: String,
    running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

/// `nvmm list`.
pub fn list(args: &ListArgs) -> Result<Outcome, CliError> {
    let flake = FlakeRef::resolve(&args.flake)?;
    let names = Nix::new(NixLog::Progress).configurations(&flake)?;
    let (runtime_dir, _) = host::state_dirs();
    let listed: Vec<ListedConfiguration> = names
        .into_iter()
        .map(|name| {
            let pid = VmDir::new(&runtime_dir, &name).running_pid();
            ListedConfiguration {
                name,
                running: pid.is_some(),
                pid,
            }
        })
        .collect();
    let text = if args.json {
        let mut json =
            serde_json::to_string_pretty(&listed).map_err(|e| CliError::Stdout(e.into()))?;
        json.push('\n');
        json
    } else if listed.is_empty() {
        format!("flake {flake} has no nixosConfigurations entries\n")
    } else {
        let mut table = Table::new(["NAME", "STATUS"]);
        for configuration in &listed {
            table.row([
                configuration.name.clone(),
                match configuration.pid {
                    Some(pid) => format!("running (pid {pid})"),
                    None => "-".to_owned(),
                },
            ]);
        }
        table.render()
    };
    print_stdout(&text)?;
    Ok(Outcome::Done(true))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::disks::test_util::TempDir;

    /// Unpacks the seed with the host's tar, as the guest does.
    #[test]
    fn the_seed_unpacks_with_tar_into_the_documented_files() {
        let dir = TempDir::new("seed");
        let network = SeedNetwork {
            mac: [0x52, 0x56, 0, 1, 2, 0xab],
            address: Ipv4Addr::new(10, 213, 0, 3),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            hosts: vec![
                ("server".into(), Ipv4Addr::new(10, 213, 0, 2)),
                ("client".into(), Ipv4Addr::new(10, 213, 0, 3)),
            ],
        };
        let image = dir.path().join("seed.img");
        let (seed, ssh) = seed_disk("client", Some(&network), &dir.path().join("state")).unwrap();
        seed.write_to(&image).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&image)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let read = |name: &str| std::fs::read_to_string(out.join("nvmm").join(name)).unwrap();
        assert_eq!(read("version"), "1\n");
        assert_eq!(read("hostname"), "client\n");
        assert_eq!(
            read("network"),
            "MAC=52:56:00:01:02:ab\nADDRESS=10.213.0.3/24\nGATEWAY=10.213.0.1\n"
        );
        assert_eq!(
            read("hosts"),
            "10.213.0.1 nvmm-host\n10.213.0.2 server\n10.213.0.3 client\n"
        );
        if Command::new("ssh-keygen").arg("-?").output().is_ok() {
            use std::os::unix::fs::PermissionsExt;
            let key = out.join("nvmm/ssh_host_ed25519_key");
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(read("ssh_host_ed25519_key.pub").contains("root@client"));
            assert!(read("authorized_keys").starts_with("ssh-ed25519 "));
            let ssh = ssh.unwrap();
            assert_eq!(
                format!("{}\n", ssh.host_key),
                read("ssh_host_ed25519_key.pub")
            );
            assert!(ssh.identity.is_file());
        }
    }

    #[test]
    fn names_may_carry_their_flake() {
        let dir = crate::disks::test_util::TempDir::new("flake");
        std::fs::write(dir.path().join("flake.nix"), "{}").unwrap();
        let flake = dir.path().to_string_lossy().into_owned();
        let (reference, names) = split_names(
            "/nonexistent",
            &[format!("{flake}#server"), format!("{flake}#client")],
        )
        .unwrap();
        assert_eq!(reference.as_str(), flake);
        assert_eq!(names, ["server", "client"]);

        let (_, names) = split_names(&flake, &["server".into()]).unwrap();
        assert_eq!(names, ["server"]);
        assert!(split_names(&flake, &["a".into(), "a".into()]).is_err());
        assert!(split_names(&flake, &["a".into(), format!("{flake}/x#b")]).is_err());
    }
}
