//! A hostile guest: the test guest's `hostile` scenario abuses every virtio device nvmm gives it
//! (two disks, a virtio console and, where this host allows network namespaces, a tap) with
//! descriptor loops, buffers outside RAM, huge lengths, bad queue sizes, status writes out of
//! order, notifications for queues never set up and random register values (tests/guest/README.md
//! lists them), then resets each device and uses it properly. nvmm must keep running, log each
//! kind of guest error at most once per device, stay idle while the guest does nothing to it,
//! and every device must work afterwards.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod netns;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use netns::Netns;

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const ROUNDS: usize = 2;
/// How long the guest leaves nvmm alone after the abuse, while the test watches its event loop.
const IDLE_MS: u64 = 500;
/// The most of that time the event loop may spend on the CPU.
const IDLE_CPU_SHARE: f64 = 0.25;

/// The abuses of every device, as the guest names them in `hostile dev=N <abuse> done`.
const ABUSES: [&str; 17] = [
    "read-registers",
    "odd-widths",
    "random-registers",
    "random-queue-registers",
    "config-space",
    "status-order",
    "queue-sizes",
    "notify-unset",
    "rings-outside-ram",
    "descriptor-loops",
    "buffers-outside-ram",
    "huge-lengths",
    "bad-heads",
    "indirect-tables",
    "avail-index-jumps",
    "reset-in-flight",
    "late-queue-writes",
];
/// The abuses of block devices only.
const BLOCK_ABUSES: [&str; 1] = ["many-segments"];

/// Typed on the virtio console before the abuse (it may land in the abused receive queue and be
/// lost), and after the guest says it is ready to echo (it must come back).
const EARLY_INPUT: &[u8] = b"early input\r";
const LATE_INPUT: &[u8] = b"hostile echo\r";

/// A zeroed disk image in the temp dir, removed on drop.
struct Image(PathBuf);

impl Image {
    fn zeroed(name: &str, sectors: u64) -> Self {
        let path = std::env::temp_dir().join(format!("nvmm-{}-{name}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn sectors(&self) -> Vec<Vec<u8>> {
        let file = std::fs::File::open(&self.0).unwrap();
        let len = file.metadata().unwrap().len();
        (0..len / 512)
            .map(|sector| {
                let mut data = vec![0u8; 512];
                file.read_exact_at(&mut data, sector * 512).unwrap();
                data
            })
            .collect()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The bytes the guest writes to a sector (the `blk` scenario's pattern).
fn pattern(sector: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (sector.wrapping_mul(31).wrapping_add(i) as u8) ^ 0x5a)
        .collect()
}

/// A namespace with a tap `tap0` at 10.77.0.1/24, or None (after saying why).
fn namespace_with_tap() -> Option<Netns> {
    let ns = Netns::new("hostile (network device part)")?;
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    Some(ns)
}

/// CPU time of `pid`'s main thread (nvmm's event loop), in clock ticks.
fn event_loop_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')': state is the first, utime
    // and stime the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// What a run showed: stdout, stderr, and the event loop's share of the CPU while idle.
struct Run {
    out: Output,
    idle_cpu_share: f64,
}

/// Runs `child` (nvmm with the hostile scenario): types on its console, samples its event loop
/// around the guest's idle window, and waits for it to end.
fn drive(mut child: Child) -> Run {
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(EARLY_INPUT).unwrap();
    stdin.flush().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if lines
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });

    let deadline = Instant::now() + HANG_GUARD;
    let mut stdout = String::new();
    let mut idle_start = None;
    let mut idle_cpu_share = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match received.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("nvmm did not finish within {HANG_GUARD:?}: {stdout}");
            }
        };
        if line.contains("nvmm-test: hostile idle ms=") {
            idle_start = Some((Instant::now(), event_loop_ticks(pid)));
        } else if line.contains("nvmm-test: hostile idle done") {
            let (start, ticks) = idle_start.take().expect("idle window start");
            let used = (event_loop_ticks(pid) - ticks) as f64 / clock_ticks_per_second();
            idle_cpu_share = Some(used / start.elapsed().as_secs_f64());
        } else if line.contains("vcon ready") {
            stdin.write_all(LATE_INPUT).unwrap();
            stdin.write_all(b"\x04").unwrap();
            stdin.flush().unwrap();
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    drop(stdin);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nvmm did not exit within {HANG_GUARD:?}: {stdout}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        out: Output {
            status,
            stdout,
            stderr: stderr.join().unwrap(),
        },
        idle_cpu_share: idle_cpu_share.expect("no idle window in the guest's output"),
    }
}

/// `virtio dev=N base=0x... irq=I id=ID ...` lines: device number -> (base, device id).
fn devices(stdout: &str) -> BTreeMap<usize, (String, u32)> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.split("nvmm-test: virtio dev=").nth(1)?;
            let (index, rest) = rest.split_once(' ')?;
            let base = rest.strip_prefix("base=")?.split(' ').next()?;
            let id = rest.split(" id=").nth(1)?.split(' ').next()?;
            Some((index.parse().ok()?, (base.to_owned(), id.parse().ok()?)))
        })
        .collect()
}

/// The device a guest-error log line is about and the kind of error (its message without
/// numbers), or None for a line that is not a device's guest error.
fn device_warning(line: &str) -> Option<(String, String)> {
    let message = line.split_once("] ")?.1;
    let (device, what) = message.split_once(": ")?;
    if !device.starts_with("virtio") {
        return None;
    }
    let kind: String = what
        .split(' ')
        .map(|word| {
            let number = word.trim_start_matches("0x");
            if !number.is_empty() && number.chars().all(|c| c.is_ascii_hexdigit()) {
                "N"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    Some((device.to_owned(), kind))
}

#[test]
fn a_hostile_guest_cannot_break_nvmm_and_its_devices_work_after_a_reset() {
    if !kvm_or_skip("hostile") {
        return;
    }
    let disk0 = Image::zeroed("hostile0", 128);
    let disk1 = Image::zeroed("hostile1", 64);
    let ns = namespace_with_tap();

    let mut cmdline = format!(
        "nvmm_test=hostile hostile_seed=7 hostile_rounds={ROUNDS} hostile_idle_ms={IDLE_MS}"
    );
    let mut cmd = match &ns {
        Some(ns) => {
            cmdline.push_str(&format!(" nvmm_ip={GUEST_IP}/24 target={HOST_IP}"));
            ns.command(NVMM)
        }
        None => Command::new(NVMM),
    };
    cmd.args(["run", "-v", "--kernel", GUEST, "--mem", MEM])
        .args(["--disk", disk0.path(), "--disk", disk1.path()])
        .args(["--console", "virtio", "--cmdline", &cmdline]);
    if ns.is_some() {
        cmd.args(["--tap", "tap0,mac=52:54:00:12:34:56"]);
    }
    // The host's ARP requests and pings reach the network device while it is abused: its
    // receive path meets the broken rings too.
    let mut pinger = ns.as_ref().map(|ns| {
        ns.command("ping")
            .args(["-q", "-i", "0.2", "-w", "30", GUEST_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = drive(child);
    if let Some(pinger) = &mut pinger {
        let _ = pinger.kill();
        let _ = pinger.wait();
    }
    let out = &run.out;
    let (stdout, stderr) = (&out.stdout, &out.stderr);

    // nvmm kept running until the guest powered off, and the guest found every device working.
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(stdout.contains("nvmm-test: result=ok"), "{stdout}");
    assert!(!stdout.contains("PANIC"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Every abuse ran on every device, every round.
    let devices = devices(stdout);
    let expected = if ns.is_some() { 4 } else { 3 };
    assert_eq!(devices.len(), expected, "{devices:?}\n{stdout}");
    for (index, (_, id)) in &devices {
        let block_only = BLOCK_ABUSES.iter().filter(|_| *id == 2);
        for abuse in ABUSES.iter().chain(block_only) {
            let line = format!("nvmm-test: hostile dev={index} {abuse} done");
            assert_eq!(stdout.matches(&line).count(), ROUNDS, "{line}\n{stdout}");
        }
        let recovered = format!("nvmm-test: hostile dev={index} recovered");
        assert!(stdout.contains(&recovered), "{recovered}\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("nvmm-test: hostile recovered={expected}")),
        "{stdout}"
    );

    // The disks work after the abuse, and the abuse never wrote to them: only the sectors the
    // guest wrote afterwards hold data.
    assert!(
        stdout.contains("blk dev=0 wrote sectors=0,127 readback=ok"),
        "{stdout}"
    );
    assert!(
        stdout.contains("blk dev=1 wrote sectors=0,63 readback=ok"),
        "{stdout}"
    );
    for (disk, last) in [(&disk0, 127), (&disk1, 63)] {
        for (sector, data) in disk.sectors().into_iter().enumerate() {
            let sector = sector as u64;
            let want = match sector {
                0 => pattern(0),
                s if s == last => pattern(last),
                _ => vec![0; 512],
            };
            assert!(data == want, "{} sector {sector}", disk.path());
        }
    }

    // The console echoes what is typed after the abuse.
    assert!(stdout.contains("hostile echo\r\n"), "{stdout:?}");
    assert!(stdout.contains("vcon echoed bytes="), "{stdout}");
    if ns.is_some() {
        assert!(stdout.contains("net_ping reply from=10.77.0.1"), "{stdout}");
    }

    // Each kind of guest error is logged at most once per device, by nvmm's devices only (not
    // by virtio-queue, which logs on every occurrence), and nothing is an error for nvmm itself.
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in stderr.lines() {
        assert!(!line.contains(" ERROR "), "{line}\n{stderr}");
        assert!(!line.contains("virtio_queue"), "{line}\n{stderr}");
        if !line.contains(" WARN ") {
            continue;
        }
        let (device, kind) = device_warning(line).unwrap_or_else(|| panic!("{line}"));
        assert!(line.contains("(further such"), "not limited: {line}");
        *seen.entry((device, kind)).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "{repeated:#?}\n{stderr}");
    for (base, _) in devices.values() {
        let device = format!("virtio-mmio {base}");
        assert!(
            seen.keys().any(|(logged, _)| logged.starts_with(&device)),
            "nothing logged about {device}: {stderr}"
        );
    }

    // While the guest leaves it alone, nvmm's event loop is idle: no broken ring keeps it busy.
    assert!(
        run.idle_cpu_share < IDLE_CPU_SHARE,
        "event loop busy {:.0}% of the idle window",
        run.idle_cpu_share * 100.0
    );
}
