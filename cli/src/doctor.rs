//! `nvmm doctor`: what this host can do, and a real boot of nvmm's built-in test guest.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::args::DoctorArgs;
use crate::exit::{CliError, Outcome};

/// The no_std test guest, built by build.rs from tests/guest.
static TEST_GUEST: &[u8] = include_bytes!(env!("NVMM_TEST_GUEST_ELF"));
/// Memory for the test boot: small, so first-touch costs little on slow hosts.
const TEST_GUEST_MEM_MIB: &str = "32";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
    }
}

/// Runs every check; fails (exit 1) if KVM or the test boot fails.
pub fn doctor(args: &DoctorArgs) -> Result<Outcome, CliError> {
    let mut checks = vec![check_kvm()];
    if nvmm_vmm::kvm::is_kvm_pvm() {
        checks.push(check(
            "kvm flavour",
            Status::Warn,
            "kvm-pvm (software KVM nested without VMX/SVM): stock Linux kernels cannot boot \
             here; nvmm's test guest can",
        ));
    }
    checks.push(check_tun());
    checks.push(check_net_admin());
    checks.push(check_nix());
    if checks[0].status != Status::Fail {
        checks.push(boot_test_guest());
    }
    let healthy = checks.iter().all(|c| c.status != Status::Fail);
    let text = if args.json {
        to_json(&checks, healthy)
    } else {
        to_text(&checks)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(CliError::Stdout)?;
    Ok(Outcome::Done(healthy))
}

fn check_kvm() -> Check {
    const NAME: &str = "/dev/kvm";
    if !Path::new(NAME).exists() {
        return check(
            NAME,
            Status::Fail,
            "missing: enable virtualization and load kvm_intel or kvm_amd",
        );
    }
    if let Err(err) = OpenOptions::new().read(true).write(true).open(NAME) {
        return check(
            NAME,
            Status::Fail,
            format!("cannot open read/write ({err}): join the kvm group or run as root"),
        );
    }
    match nvmm_vmm::kvm::open_kvm() {
        Ok(kvm) => check(
            NAME,
            Status::Ok,
            format!(
                "KVM API {}, up to {} vCPUs",
                kvm.get_api_version(),
                kvm.get_max_vcpus()
                    .min(usize::from(nvmm_vmm::kvm::MAX_VCPUS))
            ),
        ),
        Err(err) => check(NAME, Status::Fail, crate::exit::error_chain(&err)),
    }
}

fn check_tun() -> Check {
    const NAME: &str = "/dev/net/tun";
    match OpenOptions::new().read(true).write(true).open(NAME) {
        Ok(_) => check(NAME, Status::Ok, "tap devices can be created"),
        Err(err) => check(
            NAME,
            Status::Warn,
            format!("{err}: VM networking needs the tun module (modprobe tun)"),
        ),
    }
}

fn check_net_admin() -> Check {
    const NAME: &str = "CAP_NET_ADMIN";
    const CAP_NET_ADMIN: u32 = 12;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        });
    match effective {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => {
            check(NAME, Status::Ok, "bridges and taps can be set up")
        }
        Some(_) => check(
            NAME,
            Status::Warn,
            "missing: VM networking (bridge, taps) needs root or CAP_NET_ADMIN",
        ),
        None => check(
            NAME,
            Status::Warn,
            "cannot read this process's capabilities",
        ),
    }
}

fn check_nix() -> Check {
    const NAME: &str = "nix";
    match Command::new("nix").arg("--version").output() {
        Ok(out) if out.status.success() => check(
            NAME,
            Status::Ok,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ),
        Ok(out) => check(
            NAME,
            Status::Warn,
            format!(
                "`nix --version` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(_) => check(
            NAME,
            Status::Warn,
            "not found: `nvmm boot` needs Nix with flakes (Debian: apt-get install nix-bin)",
        ),
    }
}

/// Boots the embedded guest through `nvmm run` in a child process, as a user would.
fn boot_test_guest() -> Check {
    const NAME: &str = "test guest";
    let path = std::env::temp_dir().join(format!("nvmm-doctor-guest-{}.elf", std::process::id()));
    let result = write_and_boot(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(detail) => check(NAME, Status::Ok, detail),
        Err(detail) => check(NAME, Status::Fail, detail),
    }
}

fn write_and_boot(path: &PathBuf) -> Result<String, String> {
    std::fs::write(path, TEST_GUEST)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the nvmm binary: {e}"))?;
    let started = Instant::now();
    let out = Command::new(exe)
        .args([
            "run",
            "-v",
            "--mem",
            TEST_GUEST_MEM_MIB,
            "--cmdline",
            "nvmm_test=hello",
        ])
        .arg("--kernel")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start nvmm run: {e}"))?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stdout.contains("nvmm-test: result=ok") {
        let last_error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("no error message");
        return Err(format!("boot failed ({}): {last_error}", out.status));
    }
    let marker = stderr
        .lines()
        .find_map(|l| l.split("debug port 0x80: 0x10 at ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|us| us.parse::<u64>().ok());
    Ok(match marker {
        Some(us) => format!(
            "booted and powered off in {:.1} ms; guest code ran {:.2} ms after nvmm started",
            elapsed.as_secs_f64() * 1e3,
            us as f64 / 1e3
        ),
        None => format!(
            "booted and powered off in {:.1} ms",
            elapsed.as_secs_f64() * 1e3
        ),
    })
}

fn to_text(checks: &[Check]) -> String {
    let mut text = String::new();
    for c in checks {
        text.push_str(&format!(
            "{:<5} {:<14} {}\n",
            c.status.label(),
            c.name,
            c.detail
        ));
    }
    text
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn to_json(checks: &[Check], healthy: bool) -> String {
    let items: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "{{\"name\":{},\"status\":{},\"detail\":{}}}",
                json_string(c.name),
                json_string(&c.status.label().to_lowercase()),
                json_string(&c.detail)
            )
        })
        .collect();
    format!(
        "{{\"healthy\":{healthy},\"checks\":[{}]}}\n",
        items.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let json = to_json(&[check("x", Status::Warn, "d")], true);
        assert_eq!(
            json,
            "{\"healthy\":true,\"checks\":[{\"name\":\"x\",\"status\":\"warn\",\"detail\":\"d\"}]}\n"
        );
    }

    #[test]
    fn embedded_guest_is_an_elf() {
        assert_eq!(&TEST_GUEST[..4], b"\x7fELF");
    }
}
