//! Shared helpers for the integration tests: run the nvmm binary on the test guest, with a
//! hang guard, and skip loudly when this host cannot run VMs.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The no_std test guest built by cli/build.rs.
pub const GUEST: &str = env!("NVMM_TEST_GUEST_ELF");
/// The nvmm binary under test.
pub const NVMM: &str = env!("CARGO_BIN_EXE_nvmm");
/// No boot in these tests takes more than a fraction of a second; this only stops a hung VMM
/// from hanging the test suite.
pub const HANG_GUARD: Duration = Duration::from_secs(60);
/// Small guests touch little memory (first touch is slow on nested KVM).
pub const MEM: &str = "32";

/// Prints past libtest's capture, so skips are visible in every run.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// True if /dev/kvm can be opened; otherwise reports the skip.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(err) => {
            skip(test, &format!("/dev/kvm is not usable here ({err})"));
            false
        }
    }
}

/// What a finished nvmm process printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// `nvmm run --kernel GUEST --mem MEM --cmdline "nvmm_test=SCENARIO ..." EXTRA...`.
pub fn guest_command(cmdline: &str, extra: &[&str]) -> Command {
    guest_command_with_mem(MEM, cmdline, extra)
}

/// Like [`guest_command`] with `mem` MiB of guest memory.
pub fn guest_command_with_mem(mem: &str, cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(NVMM);
    cmd.args(["run", "--kernel", GUEST, "--mem", mem, "--cmdline", cmdline])
        .args(extra);
    cmd
}

/// Runs `cmd` with `input` on stdin (then EOF) and waits, killing it after [`HANG_GUARD`].
pub fn run_with_input(cmd: Command, input: &[u8]) -> Output {
    run_with_guard(cmd, input, HANG_GUARD)
}

/// Like [`run_with_input`], killing it after `guard`.
pub fn run_with_guard(mut cmd: Command, input: &[u8], guard: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nvmm");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The guest may end before reading everything; a broken pipe is fine.
        let _ = stdin.write_all(&input);
    });
    let out = wait_with(child, guard);
    let _ = writer.join();
    out
}

/// Runs `cmd` with stdin at EOF.
pub fn run(cmd: Command) -> Output {
    run_with_input(cmd, b"")
}

/// Waits for `child`, collecting its output; kills it after [`HANG_GUARD`].
pub fn wait_with_guard(child: Child) -> Output {
    wait_with(child, HANG_GUARD)
}

fn wait_with(mut child: Child, guard: Duration) -> Output {
    let mut stdout_pipe = child.stdout.take().expect("stdout");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stdout = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + guard;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nvmm did not finish within {guard:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: String::from_utf8_lossy(&stdout.join().expect("stdout reader")).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

/// Makes the process `cmd` starts die with the thread that starts it: a test that fails before
/// it stops a VM it left running (a server, say) must not leave it burning CPU after the test.
/// Processes the VM forks (`--detach`, `nvmm up`) are not affected: fork clears the setting.
pub fn kill_with_test_thread(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Starts `cmd` with stdin at EOF and its output piped; returns it with its stdout taken, for
/// [`read_until`] while it runs. It dies with the calling thread ([`kill_with_test_thread`]).
pub fn spawn_reading_stdout(mut cmd: Command) -> (Child, ChildStdout) {
    let mut child = kill_with_test_thread(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    (child, stdout)
}

/// Reads from `pipe` until `needle` appears (or panics after [`HANG_GUARD`]); returns all text.
pub fn read_until(pipe: &mut impl Read, needle: &str) -> String {
    let deadline = Instant::now() + HANG_GUARD;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(&text)
        );
        let n = pipe.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "EOF before {needle:?}: {:?}",
            String::from_utf8_lossy(&text)
        );
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// FNV-1a, 64 bit: the checksum the test guest computes over the initrd.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
