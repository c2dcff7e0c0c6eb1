//! Boots nvmm's test guest through `nvmm run` for every scenario and checks serial output and
//! exit codes; also checks nvmm's errors for bad input.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nvmm-test-{}-{name}", std::process::id()))
}

#[test]
fn hello_boots_through_the_linux_64bit_protocol_and_powers_off() {
    if !kvm_or_skip("hello") {
        return;
    }
    let out = run(guest_command("nvmm_test=hello", &[]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("nvmm-test: boot protocol=linux64"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("console=ttyS0 reboot=k"),
        "nvmm's defaults come first: {out:?}"
    );
    assert!(
        out.stdout.contains("hello from the nvmm test guest"),
        "{out:?}"
    );
    assert!(out.stdout.contains("nvmm-test: result=ok"), "{out:?}");
    assert!(!out.stderr.contains("error"), "{out:?}");
}

#[test]
fn e820_map_reports_the_configured_memory() {
    if !kvm_or_skip("e820") {
        return;
    }
    let out = run(guest_command_with_mem("48", "nvmm_test=hello", &[]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    // 48 MiB minus the 384 KiB between the EBDA and 1 MiB, rounded down.
    assert!(out.stdout.contains("usable_mib=47"), "{out:?}");
}

#[test]
fn stdin_reaches_the_guest_and_its_echo_reaches_stdout() {
    if !kvm_or_skip("echo") {
        return;
    }
    let out = run_with_input(guest_command("nvmm_test=echo", &[]), b"hello nvmm\r\x04");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("echo ready"), "{out:?}");
    assert!(out.stdout.contains("hello nvmm\r\n"), "{out:?}");
    assert!(out.stdout.contains("echo done bytes=11"), "{out:?}");
}

#[test]
fn input_larger_than_the_uart_fifo_is_not_lost() {
    if !kvm_or_skip("echo back pressure") {
        return;
    }
    // 64 × the 64-byte FIFO, written at once: nvmm must hold it back until the guest reads.
    let mut input: Vec<u8> = (0..4096u32).map(|i| b'a' + (i % 26) as u8).collect();
    input.push(0x04);
    let out = run_with_input(guest_command("nvmm_test=echo", &[]), &input);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("echo done bytes=4096"),
        "{}",
        out.stdout
    );
    let echoed: String = String::from_utf8_lossy(&input[..4096]).into_owned();
    assert!(out.stdout.contains(&echoed), "echo differs");
}

#[test]
fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one_ctrl_a() {
    if !kvm_or_skip("escape keys") {
        return;
    }
    let out = run_with_input(guest_command("nvmm_test=echo", &[]), b"a\x01\x01b\x04");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("echo done bytes=3"), "{out:?}");

    let out = run_with_input(guest_command("nvmm_test=halt", &[]), b"\x01x");
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn initrd_arrives_intact() {
    if !kvm_or_skip("initrd") {
        return;
    }
    let path = temp_path("initrd");
    // 300 KiB of pseudo-random bytes.
    let mut state = 0x1234_5678u32;
    let data: Vec<u8> = (0..300 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    std::fs::write(&path, &data).unwrap();
    let sum = format!("{:016x}", fnv1a64(&data));
    let initrd = path.to_str().unwrap();

    let ok = run(guest_command(
        &format!("nvmm_test=initrd initrd_sum={sum}"),
        &["--initrd", initrd],
    ));
    let bad = run(guest_command(
        "nvmm_test=initrd initrd_sum=0000000000000001",
        &["--initrd", initrd],
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(
        ok.stdout.contains(&format!("size=307200 fnv1a64={sum}")),
        "{ok:?}"
    );
    assert!(ok.stdout.contains("result=ok"), "{ok:?}");
    assert!(
        bad.stdout.contains("result=fail reason=initrd-mismatch"),
        "{bad:?}"
    );
}

#[test]
fn every_vcpu_is_in_the_madt_and_starts() {
    if !kvm_or_skip("smp") {
        return;
    }
    let out = run(guest_command("nvmm_test=smp", &["--cpus", "4"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("madt cpus=4"), "{out:?}");
    for cpu in 1..4 {
        assert!(out.stdout.contains(&format!("cpu {cpu} online")), "{out:?}");
    }
    assert!(out.stdout.contains("smp online=4/4"), "{out:?}");
    assert!(out.stdout.contains("result=ok"), "{out:?}");
}

#[test]
fn acpi_poweroff_exits_zero() {
    if !kvm_or_skip("poweroff") {
        return;
    }
    let out = run(guest_command("nvmm_test=poweroff", &["-v"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("poweroff via acpi"), "{out:?}");
    assert!(!out.stdout.contains("poweroff-returned"), "{out:?}");
    assert!(out.stderr.contains("ACPI S5"), "{out:?}");
}

#[test]
fn i8042_reset_exits_zero_and_says_so() {
    if !kvm_or_skip("reset") {
        return;
    }
    let out = run(guest_command("nvmm_test=reset", &[]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("reset via i8042"), "{out:?}");
    assert!(out.stderr.contains("guest requested reset"), "{out:?}");
}

#[test]
fn triple_fault_exits_nonzero_with_a_message() {
    if !kvm_or_skip("triple fault") {
        return;
    }
    let out = run(guest_command("nvmm_test=triplefault", &[]));
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.stdout.contains("nvmm-test: triple fault"), "{out:?}");
    assert!(
        out.stderr.contains("error: guest triple-faulted on vCPU 0"),
        "{out:?}"
    );
    assert!(out.stderr.contains("hint:"), "{out:?}");
}

#[test]
fn debug_port_writes_are_logged_with_a_timestamp() {
    if !kvm_or_skip("port80") {
        return;
    }
    let out = run(guest_command("nvmm_test=port80", &["-v"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let entered = out
        .stderr
        .lines()
        .find(|l| l.contains("debug port 0x80: 0x10 at "))
        .expect("boot marker logged");
    let us: u64 = entered
        .rsplit("at ")
        .next()
        .and_then(|t| t.trim_end_matches(" us").parse().ok())
        .expect("microseconds");
    assert!(us > 0);
    assert!(out.stderr.contains("debug port 0x80: 0x42 at "), "{out:?}");
    // Without -v, nothing is logged.
    let quiet = run(guest_command("nvmm_test=port80", &[]));
    assert!(!quiet.stderr.contains("debug port"), "{quiet:?}");
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / hz as f64
}

#[test]
fn halted_guest_does_not_spin_and_sigterm_stops_cleanly() {
    if !kvm_or_skip("halt") {
        return;
    }
    let mut child = guest_command("nvmm_test=halt", &["--cpus", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closing stdin (EOF) must not stop the guest.
    drop(child.stdin.take());
    let mut stdout = child.stdout.take().unwrap();
    // The line's end too: the UART's data writes are coalesced (vmm/src/coalesced.rs), and a
    // guest that halts with interrupts off makes no exit that would hand its last ones over.
    read_until(&mut stdout, "halting with interrupts off\r\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "EOF on stdin stopped the VM"
    );

    let pid = child.id();
    let before = cpu_seconds(pid);
    let window = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu_seconds(pid) - before;
    let wall = window.elapsed().as_secs_f64();
    // A spinning vCPU would use ~1 CPU-second per second; an idle VMM uses next to nothing.
    assert!(
        used < 0.25 * wall,
        "halted guest used {used:.2} s CPU in {wall:.2} s"
    );

    // SAFETY: kill with a valid pid and signal has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let out = wait_with_guard(child_with_stdout(child, stdout));
    assert_eq!(out.code(), Some(128 + 15), "{out:?}");
    assert!(!out.stderr.contains("error"), "{out:?}");
}

#[test]
fn serial_output_that_no_exit_follows_still_arrives() {
    if !kvm_or_skip("serial late") {
        return;
    }
    let (mut child, mut stdout) = spawn_reading_stdout(guest_command("nvmm_test=serial_late", &[]));
    // Queued by KVM with no exit after it: only nvmm's replay timer hands it over.
    read_until(&mut stdout, "serial_late: written after the quiet\r\n");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn interrupt_driven_serial_output_arrives_whole() {
    if !kvm_or_skip("serial irq tx") {
        return;
    }
    let out = run(guest_command("nvmm_test=serial_irq_tx", &[]));
    assert_eq!(out.code(), Some(0), "{out:?}");
    // Each burst waits for the interrupt that only the replay of the one before raises.
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("nvmm-test: serial_irq_tx line "))
        .collect();
    let expected: Vec<String> = (0..60)
        .map(|n| format!("nvmm-test: serial_irq_tx line {n:02} abcdefghijklmnopqrstuvwxyz"))
        .collect();
    assert_eq!(lines, expected, "{out:?}");
    assert!(out.stdout.contains("serial_irq_tx: done bytes="), "{out:?}");
    assert!(out.stdout.contains("result=ok"), "{out:?}");
}

fn child_with_stdout(
    mut child: std::process::Child,
    stdout: std::process::ChildStdout,
) -> std::process::Child {
    child.stdout = Some(stdout);
    child
}

#[test]
fn several_vcpus_boot() {
    if !kvm_or_skip("cpus") {
        return;
    }
    let out = run(guest_command("nvmm_test=hello", &["--cpus", "8"]));
    assert_eq!(out.code(), Some(0), "{out:?}");
}

// ---- bad input: one `error:` line, one `hint:` line, exit != 0, nothing booted ----

fn assert_user_error(out: &Output, message: &str) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "expected error + hint: {out:?}");
    assert!(lines[0].starts_with("error: "), "{out:?}");
    assert!(lines[0].contains(message), "{message:?} not in {out:?}");
    assert!(lines[1].starts_with("hint: "), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "the guest must not have run: {out:?}"
    );
}

fn nvmm_run(args: &[&str]) -> Output {
    let mut cmd = Command::new(NVMM);
    cmd.arg("run").args(args);
    run(cmd)
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let out = nvmm_run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_user_error(
        &out,
        "cannot read kernel /nonexistent/vmlinux: No such file",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_a_clear_error() {
    if !kvm_or_skip("not a kernel") {
        return;
    }
    let path = temp_path("notakernel");
    std::fs::write(&path, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let out = nvmm_run(&["--kernel", path.to_str().unwrap(), "--mem", MEM]);
    std::fs::remove_file(&path).unwrap();
    assert_user_error(&out, "is neither an ELF vmlinux nor a bzImage");
}

#[test]
fn unreadable_kernel_is_a_clear_error() {
    let out = nvmm_run(&["--kernel", "/", "--mem", MEM]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.starts_with("error: "), "{out:?}");
}

#[test]
fn initrd_too_large_for_memory_is_a_clear_error() {
    if !kvm_or_skip("initrd too large") {
        return;
    }
    let path = temp_path("hugeinitrd");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(40 << 20).unwrap();
    let out = nvmm_run(&[
        "--kernel",
        GUEST,
        "--mem",
        MEM,
        "--initrd",
        path.to_str().unwrap(),
    ]);
    std::fs::remove_file(&path).unwrap();
    assert_user_error(&out, "bytes are free above the kernel");
    assert!(out.stderr.contains("--mem"), "{out:?}");
}

#[test]
fn impossible_memory_sizes_are_clear_errors() {
    let out = nvmm_run(&["--kernel", GUEST, "--mem", "0"]);
    assert_user_error(&out, "0 MiB of memory is too little");
    let out = nvmm_run(&["--kernel", GUEST, "--mem", "100000000"]);
    assert_user_error(&out, "100000000 MiB of memory requested but this host has");
}

#[test]
fn impossible_cpu_counts_are_usage_errors() {
    for cpus in ["0", "255"] {
        let out = nvmm_run(&["--kernel", GUEST, "--cpus", cpus]);
        assert_eq!(out.code(), Some(2), "{out:?}");
        assert!(out.stderr.starts_with("error: "), "{out:?}");
        assert!(out.stderr.contains("--cpus"), "{out:?}");
    }
}

#[test]
fn command_line_longer_than_the_kernel_accepts_is_a_clear_error() {
    if !kvm_or_skip("cmdline too long") {
        return;
    }
    let long = "x".repeat(3000);
    let out = nvmm_run(&["--kernel", GUEST, "--mem", MEM, "--cmdline", &long]);
    assert_user_error(&out, "this kernel accepts at most 2047");
}

fn root_only(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(test, "needs root (mount namespaces, setpriv)");
    }
    root
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    if !root_only("missing /dev/kvm") {
        return;
    }
    // An empty /dev in a private mount namespace: /dev/kvm does not exist there.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c"]).arg(format!(
        "mount -t tmpfs none /dev && exec {NVMM} run --kernel {GUEST} --mem {MEM}"
    ));
    let out = run(cmd);
    assert_user_error(&out, "cannot open /dev/kvm: No such file or directory");
    assert!(out.stderr.contains("kvm_intel or kvm_amd"), "{out:?}");
}

#[test]
fn dev_kvm_without_permission_is_a_clear_error() {
    if !root_only("/dev/kvm not permitted") || !kvm_or_skip("/dev/kvm not permitted") {
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        NVMM,
        "run",
    ])
    .args(["--kernel", GUEST, "--mem", MEM]);
    let out = run(cmd);
    if out.stderr.contains("cannot read kernel") {
        skip(
            "/dev/kvm not permitted",
            "the test guest is not readable by nobody",
        );
        return;
    }
    assert_user_error(&out, "cannot open /dev/kvm: Permission denied");
    assert!(out.stderr.contains("kvm group"), "{out:?}");
}

#[test]
fn doctor_boots_the_embedded_guest() {
    if !kvm_or_skip("doctor") {
        return;
    }
    let mut doctor = Command::new(NVMM);
    doctor.arg("doctor");
    let out = run(doctor);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("ok    /dev/kvm"), "{out:?}");
    assert!(
        out.stdout
            .contains("ok    test guest     booted and powered off"),
        "{out:?}"
    );
    let mut doctor_json = Command::new(NVMM);
    doctor_json.args(["doctor", "--json"]);
    let json = run(doctor_json);
    assert!(
        json.stdout.starts_with("{\"healthy\":true,\"checks\":["),
        "{json:?}"
    );
    let _ = std::io::stderr().write_all(out.stdout.as_bytes());
}
