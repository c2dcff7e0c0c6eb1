//! Pseudo-terminals for the terminal and console tests: a master the test types into and
//! reads from, a slave that nvmm gets as its terminal.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::HANG_GUARD;

pub struct Pty {
    pub master: File,
    pub slave: OwnedFd,
}

pub fn open_pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the provided ints; name, termios and winsize may be
    // null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

/// The parts of termios raw mode changes, comparable.
pub fn settings(fd: &OwnedFd) -> (u32, u32, u32, u32, Vec<u8>) {
    // SAFETY: termios is plain data and tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid and writable; `fd` is an open terminal.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
}

pub fn is_raw(fd: &OwnedFd) -> bool {
    settings(fd).3 & (libc::ICANON | libc::ECHO) == 0
}

/// Runs `cmd` on the pty and collects what it writes to the master side.
pub fn spawn_on(pty: &Pty, mut cmd: Command) -> (Child, Arc<Mutex<String>>) {
    let stdio = || Stdio::from(pty.slave.try_clone().unwrap());
    cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
    let child = cmd.spawn().unwrap();
    let screen = Arc::new(Mutex::new(String::new()));
    let mut master = pty.master.try_clone().unwrap();
    let sink = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        // Ends with EIO once every slave fd is closed.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, screen)
}

pub fn wait_for(screen: &Arc<Mutex<String>>, needle: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    while !screen.lock().unwrap().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared: {:?}",
            screen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_exit(mut child: Child) -> Option<i32> {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nvmm did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sets the terminal size of `pty` (what TIOCGWINSZ on the slave reports).
pub fn set_size(pty: &Pty, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

/// What the kernel does for a terminal's foreground process group when its size changes.
pub fn send_sigwinch(child: &Child) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) }, 0);
}
