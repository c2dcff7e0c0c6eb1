//! Many VMs, one person: `nvmm up`, `ps`, `stop`, `down` and `ssh`. Everything here reads the
//! VMs' state (state.rs) and talks to them over their control sockets (control.rs); nothing is
//! kept anywhere else, so a VM whose nvmm died is simply found dead and cleaned up.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::args::{BootArgs, DownArgs, PsArgs, SshArgs, StopArgs, UpArgs};
use crate::boot::{self, start_targets};
use crate::control::{self, Request};
use crate::exit::{CliError, Outcome};
use crate::net::host;
use crate::nix::{FlakeRef, Selection};
use crate::state::{self, Liveness, VmDir, VmRecord};

/// After a forced stop, how long the VM's nvmm gets to exit before it is killed.
const FORCE_GRACE: Duration = Duration::from_secs(5);
/// How often stop and down look at the VMs they wait for.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `nvmm up`.
pub fn up(args: &UpArgs) -> Result<Outcome, CliError> {
    let flake = FlakeRef::resolve(&args.flake)?;
    let (runtime_dir, _) = host::state_dirs();
    let is_running = |name: &String| VmDir::new(&runtime_dir, name).running_pid().is_some();
    let boot_args = |names: Vec<String>| BootArgs {
        names,
        flake: flake.to_string(),
        runner: None,
        name: None,
        detach: true,
        keep: args.keep,
        mem: None,
        cpus: None,
        forward: Vec::new(),
        net: args.net.clone(),
        subnet: args.subnet,
        print_build_logs: args.print_build_logs,
        no_seccomp: args.no_seccomp,
    };
    // Without names, one nix evaluation both lists the flake's configurations and evaluates
    // the ones that do not run yet.
    let (names, targets) = match args.names.is_empty() {
        true => {
            let running: Vec<String> = state::vm_dirs(&runtime_dir)
                .into_iter()
                .map(|dir| dir.name())
                .filter(is_running)
                .collect();
            let (names, targets) = boot::build_targets(
                flake.clone(),
                Selection::AllBut(&running),
                args.print_build_logs,
            )?;
            if names.is_empty() {
                return Err(crate::nix::NixError::NoConfigurations {
                    flake: flake.to_string(),
                }
                .into());
            }
            (names, Some(targets))
        }
        false => {
            let to_boot: Vec<String> = args
                .names
                .iter()
                .filter(|n| !is_running(n))
                .cloned()
                .collect();
            let targets = match to_boot.is_empty() {
                true => None,
                false => Some(
                    boot::build_targets(
                        flake.clone(),
                        Selection::Named(&to_boot),
                        args.print_build_logs,
                    )?
                    .1,
                ),
            };
            (args.names.clone(), targets)
        }
    };
    let to_boot: Vec<String> = targets
        .iter()
        .flat_map(|t| t.runners.iter().map(|(name, _)| name.clone()))
        .collect();
    let running: Vec<String> = names
        .iter()
        .filter(|n| !to_boot.contains(n))
        .cloned()
        .collect();
    for name in &running {
        eprintln!("nvmm: {name} already runs");
    }
    let mut all_started = true;
    if let Some(targets) = targets.filter(|t| !t.runners.is_empty()) {
        match start_targets(&boot_args(to_boot), &targets)? {
            // A VM's own process, after its VM ended.
            outcome @ Outcome::Vm(_) => return Ok(outcome),
            // Some did not start (each said why): the table shows which run.
            Outcome::Done(all) => all_started = all,
        }
    }
    let mut table = Table::new(["NAME", "ADDRESS", "SSH", "STATE"]);
    for name in &names {
        let dir = VmDir::new(&runtime_dir, name);
        let record = dir.record();
        let network = record.as_ref().and_then(|r| r.network.as_ref());
        table.row([
            name.clone(),
            network.map_or("-".into(), |n| n.address.to_string()),
            network
                .and_then(|n| n.ssh_port())
                .map_or("-".into(), |p| format!("127.0.0.1:{p}")),
            match (dir.running_pid(), running.contains(name)) {
                (Some(_), true) => "running (already)".into(),
                (Some(_), false) => "running".into(),
                (None, _) => "not running".into(),
            },
        ]);
    }
    print_stdout(&table.render())?;
    Ok(Outcome::Done(all_started))
}

/// One VM in `nvmm ps`.
#[derive(Debug, Serialize)]
struct PsEntry {
    name: String,
    state: &'static str,
    flake: Option<String>,
    network: Option<String>,
    address: Option<String>,
    ssh_port: Option<u16>,
    forwards: Vec<String>,
    pid: Option<u32>,
    uptime_s: Option<u64>,
    memory_kib: Option<u64>,
    background: Option<bool>,
}

/// `nvmm ps`.
pub fn ps(args: &PsArgs) -> Result<Outcome, CliError> {
    let (runtime_dir, _) = host::state_dirs();
    let mut entries = Vec::new();
    for dir in state::vm_dirs(&runtime_dir) {
        let state = match dir.liveness() {
            Liveness::Running { .. } => "running",
            Liveness::Dead => "dead",
            Liveness::Absent => continue,
        };
        entries.push(ps_entry(&dir, state));
    }
    // Shown once as dead, then gone: their files, taps and (if last) bridges.
    state::reap_dead(&runtime_dir);
    let text = if args.json {
        let mut json =
            serde_json::to_string_pretty(&entries).map_err(|e| CliError::Stdout(e.into()))?;
        json.push('\n');
        json
    } else {
        let mut table = Table::new([
            "NAME", "STATE", "ADDRESS", "SSH", "PID", "UPTIME", "MEMORY", "FORWARDS", "FLAKE",
        ]);
        for entry in &entries {
            let dash = || "-".to_owned();
            table.row([
                entry.name.clone(),
                entry.state.to_owned(),
                entry.address.clone().unwrap_or_else(dash),
                entry.ssh_port.map_or_else(dash, |p| p.to_string()),
                entry.pid.map_or_else(dash, |p| p.to_string()),
                entry.uptime_s.map_or_else(dash, format_duration),
                entry
                    .memory_kib
                    .map_or_else(dash, |k| format!("{} MiB", k / 1024)),
                match entry.forwards.is_empty() {
                    true => dash(),
                    false => entry.forwards.join(","),
                },
                entry.flake.clone().unwrap_or_else(dash),
            ]);
        }
        table.render()
    };
    print_stdout(&text)?;
    Ok(Outcome::Done(true))
}

fn ps_entry(dir: &VmDir, state: &'static str) -> PsEntry {
    let record = dir.record();
    let network = record.as_ref().and_then(|r| r.network.as_ref());
    let status = match state {
        "running" => control::request(&dir.file("control.sock"), &Request::Status).ok(),
        _ => None,
    };
    let now = state::now_ms();
    PsEntry {
        name: dir.name(),
        state,
        flake: record.as_ref().and_then(|r| r.flake.clone()),
        network: network.map(|n| n.name.clone()),
        address: network.map(|n| n.address.to_string()),
        ssh_port: network.and_then(|n| n.ssh_port()),
        forwards: network
            .map(|n| {
                n.forwards
                    .iter()
                    .filter(|f| f.guest != 22)
                    .map(|f| format!("{}->{}", f.host, f.guest))
                    .collect()
            })
            .unwrap_or_default(),
        pid: record.as_ref().map(|r| r.pid),
        uptime_s: match (&status, &record) {
            (Some(status), _) => status["uptime_ms"].as_u64().map(|ms| ms / 1000),
            (None, Some(record)) if state == "running" => {
                Some(now.saturating_sub(record.started_ms) / 1000)
            }
            _ => None,
        },
        memory_kib: status.as_ref().and_then(|s| s["rss_kib"].as_u64()),
        background: record.as_ref().map(|r| r.background),
    }
}

fn format_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `nvmm stop`.
pub fn stop(args: &StopArgs) -> Result<Outcome, CliError> {
    let (runtime_dir, _) = host::state_dirs();
    let names: BTreeSet<&String> = args.names.iter().collect();
    let mut dirs = Vec::new();
    for name in names {
        let dir = VmDir::new(&runtime_dir, name);
        match dir.liveness() {
            Liveness::Running { .. } => dirs.push(dir),
            Liveness::Dead => {
                state::reap_dead(&runtime_dir);
                eprintln!("nvmm: {name} was not running (its nvmm had died; cleaned up)");
            }
            Liveness::Absent => {
                return Err(CliError::NotRunning { name: name.clone() });
            }
        }
    }
    stop_all(&dirs, args.force, Duration::from_secs(args.timeout));
    state::reap_dead(&runtime_dir);
    Ok(Outcome::Done(true))
}

/// `nvmm down`.
pub fn down(args: &DownArgs) -> Result<Outcome, CliError> {
    let flake = match FlakeRef::resolve(&args.flake) {
        Ok(flake) => flake.to_string(),
        // The flake may be gone while its VMs still run: match what they recorded.
        Err(_) => std::path::absolute(&args.flake)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| args.flake.clone()),
    };
    let (runtime_dir, _) = host::state_dirs();
    state::reap_dead(&runtime_dir);
    let dirs: Vec<VmDir> = state::vm_dirs(&runtime_dir)
        .into_iter()
        .filter(|dir| dir.running_pid().is_some())
        .filter(|dir| dir.record().and_then(|r| r.flake).as_deref() == Some(&flake))
        .collect();
    if dirs.is_empty() {
        eprintln!("nvmm: no VM of flake {flake} runs");
    }
    stop_all(&dirs, args.force, Duration::from_secs(args.timeout));
    // Taps and bridges of anything that had to be killed.
    state::reap_dead(&runtime_dir);
    Ok(Outcome::Done(true))
}

/// Stops every VM in `dirs` together: a clean shutdown request (unless `force`), then after
/// `timeout` a forced stop, then SIGKILL for an nvmm that does not answer at all.
fn stop_all(dirs: &[VmDir], force: bool, timeout: Duration) {
    let started = Instant::now();
    let mut waiting: Vec<(VmDir, u32, Instant, &'static str)> = Vec::new();
    for dir in dirs {
        let Some(pid) = dir.running_pid() else {
            continue;
        };
        let socket = dir.file("control.sock");
        let asked = control::request(&socket, &Request::Stop { force });
        let (deadline, how) = match (asked, force) {
            (Ok(_), false) => (started + timeout, "shut down cleanly"),
            (Ok(_), true) => (started + FORCE_GRACE, "stopped"),
            (Err(err), _) => {
                log::warn!("{}: control socket: {err}; sending SIGTERM", dir.name());
                signal(pid, libc::SIGTERM);
                (started + FORCE_GRACE, "stopped by SIGTERM")
            }
        };
        waiting.push((dir.clone(), pid, deadline, how));
    }
    while !waiting.is_empty() {
        std::thread::sleep(POLL_INTERVAL);
        let now = Instant::now();
        waiting.retain_mut(|(dir, pid, deadline, how)| {
            if dir.running_pid().is_none() {
                eprintln!(
                    "nvmm: {} {how} ({:.1} s)",
                    dir.name(),
                    started.elapsed().as_secs_f64()
                );
                return false;
            }
            if now < *deadline {
                return true;
            }
            match *how {
                "shut down cleanly" => {
                    log::info!("{} did not shut down in time; forcing it", dir.name());
                    let _ =
                        control::request(&dir.file("control.sock"), &Request::Stop { force: true });
                    *how = "forced after the timeout";
                    *deadline = now + FORCE_GRACE;
                    true
                }
                "killed" => {
                    eprintln!("nvmm: {} (process {pid}) cannot be killed", dir.name());
                    false
                }
                _ => {
                    log::warn!("{}'s nvmm does not stop; killing it", dir.name());
                    signal(*pid, libc::SIGKILL);
                    *how = "killed";
                    *deadline = now + FORCE_GRACE;
                    true
                }
            }
        });
    }
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(pid, signal) };
    }
}

/// `nvmm ssh`: replaces this process with ssh, so the remote command's exit status is nvmm's.
pub fn ssh(args: &SshArgs) -> Result<Outcome, CliError> {
    use std::os::unix::process::CommandExt;
    let (runtime_dir, _) = host::state_dirs();
    let dir = VmDir::new(&runtime_dir, &args.name);
    let not_running = || CliError::NotRunning {
        name: args.name.clone(),
    };
    dir.running_pid().ok_or_else(not_running)?;
    let record: VmRecord = dir.record().ok_or_else(not_running)?;
    let port = record
        .network
        .as_ref()
        .and_then(|n| n.ssh_port())
        .ok_or_else(|| CliError::NoSsh {
            name: args.name.clone(),
            why: "it is on no network".into(),
        })?;
    let keys = record.ssh.as_ref().ok_or_else(|| CliError::NoSsh {
        name: args.name.clone(),
        why: "nvmm gave it no ssh keys (was ssh-keygen missing when it booted?)".into(),
    })?;
    // The guest's host key is the one nvmm put on its seed disk: pinned, never asked about.
    let alias = format!("nvmm-{}", args.name);
    let known_hosts = dir.file("known_hosts");
    std::fs::write(&known_hosts, format!("{alias} {}\n", keys.host_key)).map_err(|source| {
        CliError::State(state::StateError::Files {
            path: known_hosts.clone(),
            source,
        })
    })?;
    let mut command = std::process::Command::new("ssh");
    command
        .arg("-i")
        .arg(&keys.identity)
        .args(["-o", "IdentitiesOnly=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
        ])
        .arg(format!("HostKeyAlias={alias}"))
        .args([
            "-o",
            "LogLevel=ERROR",
            "-p",
            &port.to_string(),
            "root@127.0.0.1",
        ]);
    if !args.command.is_empty() {
        // ssh joins its arguments into one line for the remote shell: quote each word so the
        // guest runs exactly these words (`-- sh -c 'a | b'` for a shell line).
        let words: Vec<String> = args.command.iter().map(|w| shell_quote(w)).collect();
        command.arg("--").arg(words.join(" "));
    }
    log::info!("running {command:?}");
    let err = command.exec();
    Err(match err.kind() {
        std::io::ErrorKind::NotFound => CliError::NoSsh {
            name: args.name.clone(),
            why: "ssh is not installed (Debian: apt-get install openssh-client)".into(),
        },
        _ => CliError::Spawn {
            program: "ssh".into(),
            source: err,
        },
    })
}

/// `word` for a POSIX shell, in single quotes.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A plain text table: columns padded to their widest cell.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new<const N: usize>(header: [&str; N]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row.
    pub fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows.push(cells.to_vec());
    }

    /// The table as text, one line per row.
    pub fn render(&self) -> String {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect();
            text.push_str(line.join("  ").trim_end());
            text.push('\n');
        }
        text
    }
}

/// Writes `text` to stdout.
pub fn print_stdout(text: &str) -> Result<(), CliError> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(CliError::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_trim_line_ends() {
        let mut table = Table::new(["NAME", "STATE"]);
        table.row(["server".into(), "running".into()]);
        table.row(["db".into(), "-".into()]);
        assert_eq!(
            table.render(),
            "NAME    STATE\nserver  running\ndb      -\n"
        );
    }

    #[test]
    fn words_are_quoted_for_the_remote_shell() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's $HOME; ls"), r"'it'\''s $HOME; ls'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn durations_read_like_ps() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(125), "2m05s");
        assert_eq!(format_duration(7300), "2h01m");
    }
}
