//! The control socket of a running VM (`RUNTIME/vms/NAME/control.sock`): one JSON request per
//! connection, one JSON reply line.
//!
//! | request | reply |
//! |---|---|
//! | `{"op":"status"}` | `{"ok":true,"name":…,"pid":…,"uptime_ms":…,"rss_kib":…}` |
//! | `{"op":"stop"}` | `{"ok":true}`, then the guest is asked to shut down (Ctrl-Alt-Del) |
//! | `{"op":"stop","force":true}` | `{"ok":true}`, then the VM ends at once |
//! | `{"op":"attach"}` | `{"ok":true,"console":PATH}`: the console socket to attach to |
//!
//! Errors are `{"ok":false,"error":"…"}`. The server is a thread of the VM's nvmm, so it answers
//! whatever the guest does.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nvmm_vmm::{ShutdownHandle, StopHandle};
use serde::{Deserialize, Serialize};

/// How long a client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// A request is one short line; more is not a request.
const MAX_REQUEST: u64 = 4096;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// How the VM is doing.
    Status,
    /// End the VM: cleanly (the guest shuts down) or at once.
    Stop {
        /// At once.
        #[serde(default)]
        force: bool,
    },
    /// Where the console is.
    Attach,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The VM's name.
    pub name: String,
    /// The nvmm process.
    pub pid: u32,
    /// Since the VM started.
    pub uptime_ms: u64,
    /// The nvmm process's resident memory (guest RAM it touched included).
    pub rss_kib: u64,
}

/// What the server acts on.
#[derive(Debug)]
pub struct Controls {
    /// The VM's name.
    pub name: String,
    /// Ends the VM at once.
    pub stop: StopHandle,
    /// Asks the guest to shut down.
    pub shutdown: ShutdownHandle,
    /// The console socket, for a background VM.
    pub console: Option<PathBuf>,
    /// When the VM started.
    pub started: Instant,
}

/// Serves `path` on a thread of its own until the process ends. The thread drops its
/// capabilities and, with `sandboxed`, installs its seccomp filter
/// ([`crate::sandbox::control_thread`]) before it answers anything.
pub fn serve(path: &Path, controls: Controls, sandboxed: bool) -> io::Result<()> {
    // A socket file left by a dead VM of this name; the VM lock says this process owns the name.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let filter = match sandboxed {
        true => Some(
            crate::sandbox::control_thread()
                .compile("control")
                .map_err(io::Error::other)?,
        ),
        false => None,
    };
    let (installed, filter_installed) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            if let Err(err) = nvmm_vmm::seccomp::confine("control", filter.as_ref(), &[]) {
                let _ = installed.send(Err(err));
                return;
            }
            let _ = installed.send(Ok(()));
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(err) = answer(stream, &controls) {
                            log::debug!("control connection: {err}");
                        }
                    }
                    Err(err) => log::warn!("control socket: {err}"),
                }
            }
        })?;
    // The thread sends before anything else, so this only fails if it could not.
    match filter_installed.recv() {
        Ok(Err(err)) => Err(io::Error::other(err)),
        _ => Ok(()),
    }
}

fn answer(stream: UnixStream, controls: &Controls) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(&stream, MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(err) => serde_json::json!({"ok": false, "error": format!("bad request: {err}")}),
        Ok(Request::Status) => {
            let status = Status {
                name: controls.name.clone(),
                pid: std::process::id(),
                uptime_ms: controls.started.elapsed().as_millis() as u64,
                rss_kib: own_rss_kib().unwrap_or(0),
            };
            let mut value = serde_json::to_value(status).unwrap_or_default();
            value["ok"] = true.into();
            value
        }
        Ok(Request::Stop { force: false }) => {
            controls.shutdown.request_shutdown();
            serde_json::json!({"ok": true})
        }
        Ok(Request::Stop { force: true }) => {
            log::info!("stopping at once, as asked on the control socket");
            controls.stop.quit();
            serde_json::json!({"ok": true})
        }
        Ok(Request::Attach) => match &controls.console {
            Some(console) => serde_json::json!({"ok": true, "console": console}),
            None => serde_json::json!({
                "ok": false,
                "error": format!("{}'s console is on the terminal that started it", controls.name),
            }),
        },
    };
    let mut stream = stream;
    writeln!(stream, "{reply}")
}

/// VmRSS of this process.
fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `request` to the VM whose control socket is `path` and returns the reply, or the
/// reply's error as an `io::Error`.
pub fn request(path: &Path, request: &Request) -> io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let text = serde_json::to_string(request).map_err(io::Error::other)?;
    writeln!(stream, "{text}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let reply: serde_json::Value = serde_json::from_str(&line).map_err(io::Error::other)?;
    if reply["ok"] == true {
        Ok(reply)
    } else {
        let error = reply["error"]
            .as_str()
            .unwrap_or("the VM refused")
            .to_owned();
        Err(io::Error::other(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines() {
        assert_eq!(
            serde_json::to_string(&Request::Stop { force: true }).unwrap(),
            r#"{"op":"stop","force":true}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"stop"}"#).unwrap(),
            Request::Stop { force: false }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn own_memory_is_readable() {
        assert!(own_rss_kib().unwrap() > 0);
    }
}
