//! The runner description parser, `Runner::parse` (`nvmm.json`, docs/runner.md): any bytes, and
//! documents built member by member from the input, mostly well formed, so that the fuzzer gets
//! past serde to the checks behind it. Members come in any order, duplicated, missing, with
//! values of the wrong type or out of range, with escaped keys, unknown members beside them, and
//! sometimes a broken end.
//!
//! What must hold:
//! - no panic;
//! - for a generated document, the outcome this target predicts from the members alone: the
//!   runner with every documented default, or the kind of error (`Version`, `Missing` naming the
//!   member, `Invalid` for the rest);
//! - for any accepted description: what `Runner` promises (memory, vCPUs and disk size at
//!   least 1, the disk's size in bytes representable, no forward to guest port 0, every path
//!   absolute and present), and writing it back out as `nvmm.json` reads back as the same runner.
#![no_main]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nvmm_cli::disks::DEFAULT_OVERLAY_SIZE;
use nvmm_cli::runner::{Runner, RunnerConsole, RunnerDiscovery, RunnerError};

/// The runner directory: this crate's own directory, so that the paths below exist (or not)
/// without the target writing any files.
fn runner_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Paths that exist under [`runner_dir`] (a file, a directory, the directory itself, `..`).
const PRESENT: &[&str] = &[
    "Cargo.toml",
    "README.md",
    "./smoke.sh",
    "fuzz_targets/runner_json.rs",
    "fuzz_targets/../Cargo.toml",
    "fuzz_targets",
    "",
    ".",
    "..",
    "/",
];
/// Paths that do not.
const ABSENT: &[&str] = &[
    "kernel",
    "Cargo.toml/x",
    "no/such/file",
    "/nonexistent-nvmm-fuzz",
    "nul\0byte",
];

#[derive(Arbitrary, Debug)]
enum Input {
    /// Any bytes, as UTF-8 (lossily: the parser takes a `&str`).
    Bytes(Vec<u8>),
    Document(Document),
}

#[derive(Arbitrary, Debug)]
struct Document {
    /// Adds `version`, `kernel` and `cmdline`, well formed, where `members` lacks them: most
    /// documents then get past serde, to the checks behind it.
    skeleton: bool,
    members: Vec<Member>,
    /// Line breaks and indentation between tokens.
    pretty: bool,
    end: End,
}

/// How the document ends.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Whole,
    /// The last `n % len + 1` bytes cut off: never valid JSON.
    Truncated(u16),
    /// A stray token after the object.
    Trailing,
}

#[derive(Arbitrary, Debug)]
struct Member {
    key: Key,
    /// Writes the key's first character as a `\u` escape (the same key to serde).
    escape_key: bool,
    value: Value,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Version,
    Name,
    Kernel,
    Initrd,
    Cmdline,
    StoreImage,
    MemoryMib,
    Vcpus,
    DiskSizeMib,
    ForwardPorts,
    Console,
    VirtioDiscovery,
    CmdlineNetwork,
    ModuleVersion,
    /// A member this nvmm does not know (ignored), some of them near misses of known ones.
    Unknown(u8),
}

const UNKNOWN_KEYS: &[&str] = &[
    "futureMember",
    "Version",
    "memoryMib",
    "disk_size_mib",
    "forward_ports",
    "store_image",
    "",
    "kernel ",
];

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Version => "version",
            Key::Name => "name",
            Key::Kernel => "kernel",
            Key::Initrd => "initrd",
            Key::Cmdline => "cmdline",
            Key::StoreImage => "storeImage",
            Key::MemoryMib => "memoryMiB",
            Key::Vcpus => "vcpus",
            Key::DiskSizeMib => "diskSizeMiB",
            Key::ForwardPorts => "forwardPorts",
            Key::Console => "console",
            Key::VirtioDiscovery => "virtioDiscovery",
            Key::CmdlineNetwork => "cmdlineNetwork",
            Key::ModuleVersion => "moduleVersion",
            Key::Unknown(i) => UNKNOWN_KEYS[usize::from(i) % UNKNOWN_KEYS.len()],
        }
    }
}

/// A member's value: one of every JSON type, the strings and numbers the members expect most
/// of the time, and forward entries.
#[derive(Arbitrary, Debug)]
enum Value {
    Scalar(Scalar),
    Forwards(Vec<Forward>),
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Null,
    Bool(bool),
    Small(u8),
    UInt(u64),
    /// `-n`, n at least 1 (`-0` reads as a float).
    Negative(u64),
    /// `n.5`.
    Float(u16),
    /// 2^64 + n: past `u64`, so a float to serde_json.
    Huge(u16),
    Str(String),
    Path(PathChoice),
    Word(u8),
    EmptyArray,
    EmptyObject,
    /// Well-formed but of no member's type: `[{"a": [1, null]}, "x"]`.
    Nested,
}

/// Strings the enum and address members accept, and near misses.
const WORDS: &[&str] = &[
    "virtio",
    "serial",
    "cmdline",
    "acpi",
    "both",
    "Virtio",
    "vga",
    "127.0.0.1",
    "0.0.0.0",
    "::1",
    "::",
    "fe80::1",
    "10.213.0.2",
    "[::1]",
    "localhost",
    "256.0.0.1",
    "1",
];

#[derive(Arbitrary, Debug)]
enum PathChoice {
    Present(u8),
    Absent(u8),
    /// An absolute path under the runner directory.
    AbsolutePresent(u8),
    Any(String),
}

impl PathChoice {
    fn text(&self) -> String {
        match self {
            PathChoice::Present(i) => PRESENT[usize::from(*i) % PRESENT.len()].to_owned(),
            PathChoice::Absent(i) => ABSENT[usize::from(*i) % ABSENT.len()].to_owned(),
            PathChoice::AbsolutePresent(i) => runner_dir()
                .join(PRESENT[usize::from(*i) % PRESENT.len()])
                .to_string_lossy()
                .into_owned(),
            PathChoice::Any(text) => text.clone(),
        }
    }
}

/// One `forwardPorts` entry, as an object with these members.
#[derive(Arbitrary, Debug)]
struct Forward {
    members: Vec<(ForwardKey, Scalar)>,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum ForwardKey {
    Host,
    Guest,
    Address,
    /// Unknown members are refused in entries (`deny_unknown_fields`).
    Other,
}

impl ForwardKey {
    fn name(self) -> &'static str {
        match self {
            ForwardKey::Host => "host",
            ForwardKey::Guest => "guest",
            ForwardKey::Address => "address",
            ForwardKey::Other => "port",
        }
    }
}

/// A JSON string literal.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}

impl Scalar {
    fn write(&self, out: &mut String) {
        match self {
            Scalar::Null => out.push_str("null"),
            Scalar::Bool(b) => write!(out, "{b}").expect("String"),
            Scalar::Small(n) => write!(out, "{n}").expect("String"),
            Scalar::UInt(n) => write!(out, "{n}").expect("String"),
            Scalar::Negative(n) => write!(out, "-{}", (*n).max(1)).expect("String"),
            Scalar::Float(n) => write!(out, "{n}.5").expect("String"),
            Scalar::Huge(n) => {
                write!(out, "{}", u128::from(u64::MAX) + 1 + u128::from(*n)).expect("String")
            }
            Scalar::Str(_) | Scalar::Path(_) | Scalar::Word(_) => {
                let text = self.as_str().expect("a string scalar");
                out.push_str(&quoted(&text));
            }
            Scalar::EmptyArray => out.push_str("[]"),
            Scalar::EmptyObject => out.push_str("{}"),
            Scalar::Nested => out.push_str(r#"[{"a": [1, null]}, "x"]"#),
        }
    }

    /// The value as serde reads a `u64`: non-negative integers only.
    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Small(n) => Some(u64::from(*n)),
            Scalar::UInt(n) => Some(*n),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<String> {
        match self {
            Scalar::Str(text) => Some(text.clone()),
            Scalar::Path(path) => Some(path.text()),
            Scalar::Word(i) => Some(WORDS[usize::from(*i) % WORDS.len()].to_owned()),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An optional member: `null` is "not set".
    fn as_option<T>(&self, read: impl Fn(&Scalar) -> Option<T>) -> Option<Option<T>> {
        match self {
            Scalar::Null => Some(None),
            other => read(other).map(Some),
        }
    }
}

impl Value {
    fn write(&self, out: &mut String) {
        match self {
            Value::Scalar(scalar) => scalar.write(out),
            Value::Forwards(entries) => {
                out.push('[');
                for (i, entry) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('{');
                    for (j, (key, value)) in entry.members.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        write!(out, "{}:", quoted(key.name())).expect("String");
                        value.write(out);
                    }
                    out.push('}');
                }
                out.push(']');
            }
        }
    }

    fn scalar(&self) -> Option<&Scalar> {
        match self {
            Value::Scalar(scalar) => Some(scalar),
            Value::Forwards(_) => None,
        }
    }

    /// `forwardPorts` as (address, host, guest), if serde takes it.
    fn as_forwards(&self) -> Option<Vec<(IpAddr, u16, u16)>> {
        match self {
            Value::Scalar(Scalar::EmptyArray) => Some(Vec::new()),
            Value::Scalar(_) => None,
            Value::Forwards(entries) => entries.iter().map(Forward::read).collect(),
        }
    }
}

impl Forward {
    fn read(&self) -> Option<(IpAddr, u16, u16)> {
        let mut host = None;
        let mut guest = None;
        let mut address = None;
        for (key, value) in &self.members {
            let port = || value.as_u64().and_then(|n| u16::try_from(n).ok());
            let slot_was_empty = match key {
                ForwardKey::Host => host.replace(port()?).is_none(),
                ForwardKey::Guest => guest.replace(port()?).is_none(),
                ForwardKey::Address => address
                    .replace(value.as_str()?.parse::<IpAddr>().ok()?)
                    .is_none(),
                ForwardKey::Other => false,
            };
            if !slot_was_empty {
                return None;
            }
        }
        Some((
            address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            host?,
            guest?,
        ))
    }
}

impl Document {
    /// The document with the [`skeleton`](Document::skeleton) members added, if asked for.
    fn completed(mut self) -> Document {
        if self.skeleton {
            let skeleton = [
                (Key::Version, Scalar::Small(1)),
                (Key::Kernel, Scalar::Path(PathChoice::Present(0))),
                (Key::Cmdline, Scalar::Str("console=hvc0".to_owned())),
            ];
            for (key, value) in skeleton {
                if !self.members.iter().any(|m| m.key == key) {
                    let member = Member {
                        key,
                        escape_key: false,
                        value: Value::Scalar(value),
                    };
                    self.members.insert(0, member);
                }
            }
        }
        self
    }

    fn text(&self) -> String {
        let (open, separator, close) = if self.pretty {
            ("{\n    ", ",\n    ", "\n}")
        } else {
            ("{", ",", "}")
        };
        let mut out = String::from(open);
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                out.push_str(separator);
            }
            let name = member.key.name();
            match name.chars().next() {
                Some(first) if member.escape_key => {
                    // `quoted(rest)` less its opening quote: the rest, then the closing quote.
                    let rest = &quoted(&name[first.len_utf8()..])[1..];
                    write!(out, "\"\\u{:04x}{rest}", u32::from(first)).expect("String");
                }
                _ => out.push_str(&quoted(name)),
            }
            out.push_str(if self.pretty { ": " } else { ":" });
            member.value.write(&mut out);
        }
        out.push_str(close);
        match self.end {
            End::Whole => {}
            End::Truncated(n) => {
                let mut cut = out.len() - (usize::from(n) % out.len() + 1);
                while !out.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.truncate(cut);
            }
            End::Trailing => out.push_str(" 1"),
        }
        out
    }
}

/// What `Runner::parse` must make of a generated document.
#[derive(Debug)]
enum Expected {
    Runner(Box<ExpectedRunner>),
    Version(u64),
    Missing(&'static str),
    Invalid,
}

/// The fields of `Runner`, written out (the forward type is private to nvmm).
#[derive(Debug, PartialEq, Eq)]
struct ExpectedRunner {
    name: Option<String>,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    store_image: Option<PathBuf>,
    memory_mib: u64,
    vcpus: u8,
    disk_size_mib: u64,
    forwards: Vec<(IpAddr, u16, u16)>,
    console: RunnerConsole,
    virtio_discovery: RunnerDiscovery,
    cmdline_network: bool,
    module_version: Option<String>,
}

impl ExpectedRunner {
    fn of(runner: &Runner) -> ExpectedRunner {
        ExpectedRunner {
            name: runner.name.clone(),
            kernel: runner.kernel.clone(),
            initrd: runner.initrd.clone(),
            cmdline: runner.cmdline.clone(),
            store_image: runner.store_image.clone(),
            memory_mib: runner.memory_mib,
            vcpus: runner.vcpus,
            disk_size_mib: runner.disk_size_mib,
            forwards: runner
                .forwards
                .iter()
                .map(|f| (f.host_addr, f.host_port, f.guest_port))
                .collect(),
            console: runner.console,
            virtio_discovery: runner.virtio_discovery,
            cmdline_network: runner.cmdline_network,
            module_version: runner.module_version.clone(),
        }
    }
}

/// The outcome docs/runner.md and runner.rs describe for `doc`, worked out from its members.
fn expected(doc: &Document, dir: &Path) -> Expected {
    if doc.end != End::Whole {
        return Expected::Invalid;
    }
    // The version is read first, on its own.
    let versions: Vec<&Value> = doc
        .members
        .iter()
        .filter(|m| m.key == Key::Version)
        .map(|m| &m.value)
        .collect();
    let [version] = versions[..] else {
        return Expected::Invalid; // missing or duplicated
    };
    match version.scalar().and_then(Scalar::as_u64) {
        Some(1) => {}
        Some(found) => return Expected::Version(found),
        None => return Expected::Invalid,
    }

    let mut seen = Vec::new();
    for member in &doc.members {
        if !matches!(member.key, Key::Unknown(_)) {
            if seen.contains(&member.key) {
                return Expected::Invalid; // a duplicate member
            }
            seen.push(member.key);
        }
    }
    let value = |key: Key| doc.members.iter().find(|m| m.key == key).map(|m| &m.value);
    // `Some(default)` when absent, `None` when present but not of the member's type.
    fn member<T>(
        value: Option<&Value>,
        default: T,
        read: impl Fn(&Scalar) -> Option<T>,
    ) -> Option<T> {
        match value {
            None => Some(default),
            Some(value) => value.scalar().and_then(read),
        }
    }
    let required = |key: Key| value(key).and_then(Value::scalar).and_then(Scalar::as_str);
    let optional_str = |key: Key| member(value(key), None, |s| s.as_option(Scalar::as_str));
    let (Some(kernel), Some(cmdline)) = (required(Key::Kernel), required(Key::Cmdline)) else {
        return Expected::Invalid;
    };
    let Some(name) = optional_str(Key::Name) else {
        return Expected::Invalid;
    };
    let Some(initrd) = optional_str(Key::Initrd) else {
        return Expected::Invalid;
    };
    let Some(store_image) = optional_str(Key::StoreImage) else {
        return Expected::Invalid;
    };
    let Some(module_version) = optional_str(Key::ModuleVersion) else {
        return Expected::Invalid;
    };
    let Some(memory_mib) = member(value(Key::MemoryMib), 1024, Scalar::as_u64) else {
        return Expected::Invalid;
    };
    let Some(vcpus) = member(value(Key::Vcpus), 1, |s| {
        s.as_u64().and_then(|n| u8::try_from(n).ok())
    }) else {
        return Expected::Invalid;
    };
    let Some(disk_size_mib) = member(
        value(Key::DiskSizeMib),
        DEFAULT_OVERLAY_SIZE >> 20,
        Scalar::as_u64,
    ) else {
        return Expected::Invalid;
    };
    let forwards = match value(Key::ForwardPorts) {
        None => Some(Vec::new()),
        Some(value) => value.as_forwards(),
    };
    let Some(forwards) = forwards else {
        return Expected::Invalid;
    };
    let Some(console) = member(value(Key::Console), RunnerConsole::Virtio, |s| {
        match s.as_str()?.as_str() {
            "virtio" => Some(RunnerConsole::Virtio),
            "serial" => Some(RunnerConsole::Serial),
            _ => None,
        }
    }) else {
        return Expected::Invalid;
    };
    let Some(virtio_discovery) = member(
        value(Key::VirtioDiscovery),
        RunnerDiscovery::Cmdline,
        |s| match s.as_str()?.as_str() {
            "cmdline" => Some(RunnerDiscovery::Cmdline),
            "acpi" => Some(RunnerDiscovery::Acpi),
            "both" => Some(RunnerDiscovery::Both),
            _ => None,
        },
    ) else {
        return Expected::Invalid;
    };
    let Some(cmdline_network) = member(value(Key::CmdlineNetwork), false, Scalar::as_bool) else {
        return Expected::Invalid;
    };

    // The checks after serde.
    if memory_mib == 0
        || vcpus == 0
        || forwards.iter().any(|&(_, _, guest)| guest == 0)
        || disk_size_mib == 0
        || disk_size_mib.checked_mul(1 << 20).is_none()
    {
        return Expected::Invalid;
    }
    let resolve = |member: &'static str, path: &str| {
        let resolved = dir.join(path);
        if resolved.is_file() {
            Ok(resolved)
        } else {
            Err(Expected::Missing(member))
        }
    };
    let resolved = (|| {
        Ok(ExpectedRunner {
            kernel: resolve("kernel", &kernel)?,
            initrd: initrd.map(|p| resolve("initrd", &p)).transpose()?,
            store_image: store_image.map(|p| resolve("storeImage", &p)).transpose()?,
            name,
            cmdline,
            memory_mib,
            vcpus,
            disk_size_mib,
            forwards,
            console,
            virtio_discovery,
            cmdline_network,
            module_version,
        })
    })();
    match resolved {
        Ok(runner) => Expected::Runner(Box::new(runner)),
        Err(missing) => missing,
    }
}

/// `runner` written back out as `nvmm.json` (paths absolute, so they resolve to themselves).
fn write_back(runner: &Runner) -> String {
    let path = |p: &Path| quoted(p.to_str().expect("the paths come from JSON strings"));
    let optional = |value: Option<String>| value.unwrap_or_else(|| "null".to_owned());
    let forwards: Vec<String> = runner
        .forwards
        .iter()
        .map(|f| {
            format!(
                r#"{{"host": {}, "guest": {}, "address": {}}}"#,
                f.host_port,
                f.guest_port,
                quoted(&f.host_addr.to_string())
            )
        })
        .collect();
    format!(
        r#"{{"version": 1, "name": {}, "kernel": {}, "initrd": {}, "cmdline": {},
            "storeImage": {}, "memoryMiB": {}, "vcpus": {}, "diskSizeMiB": {},
            "forwardPorts": [{}], "console": {}, "virtioDiscovery": {},
            "cmdlineNetwork": {}, "moduleVersion": {}}}"#,
        optional(runner.name.as_deref().map(quoted)),
        path(&runner.kernel),
        optional(runner.initrd.as_deref().map(path)),
        quoted(&runner.cmdline),
        optional(runner.store_image.as_deref().map(path)),
        runner.memory_mib,
        runner.vcpus,
        runner.disk_size_mib,
        forwards.join(", "),
        quoted(match runner.console {
            RunnerConsole::Virtio => "virtio",
            RunnerConsole::Serial => "serial",
        }),
        quoted(match runner.virtio_discovery {
            RunnerDiscovery::Cmdline => "cmdline",
            RunnerDiscovery::Acpi => "acpi",
            RunnerDiscovery::Both => "both",
        }),
        runner.cmdline_network,
        optional(runner.module_version.as_deref().map(quoted)),
    )
}

/// What every accepted description promises, whatever its text.
fn check_accepted(runner: &Runner, dir: &Path) {
    assert_eq!(runner.dir, dir);
    assert!(runner.memory_mib >= 1 && runner.vcpus >= 1 && runner.disk_size_mib >= 1);
    assert!(
        runner.disk_size_mib.checked_mul(1 << 20).is_some(),
        "diskSizeMiB {} overflows a byte count",
        runner.disk_size_mib
    );
    assert!(runner.forwards.iter().all(|f| f.guest_port != 0));
    let paths = [
        Some(&runner.kernel),
        runner.initrd.as_ref(),
        runner.store_image.as_ref(),
    ];
    for path in paths.into_iter().flatten() {
        assert!(path.is_absolute() && path.is_file(), "{}", path.display());
    }
    let again = Runner::parse(dir, &write_back(runner));
    assert_eq!(again.as_ref().ok(), Some(runner), "{again:?}");
}

fuzz_target!(|input: Input| {
    let dir = runner_dir();
    match input {
        Input::Bytes(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            match Runner::parse(dir, &text) {
                Ok(runner) => check_accepted(&runner, dir),
                Err(err) => assert!(!err.to_string().is_empty()),
            }
        }
        Input::Document(doc) => {
            let doc = doc.completed();
            let text = doc.text();
            let got = Runner::parse(dir, &text);
            match (&got, expected(&doc, dir)) {
                (Ok(runner), Expected::Runner(want)) => {
                    assert_eq!(ExpectedRunner::of(runner), *want, "{text}");
                    check_accepted(runner, dir);
                }
                (Err(RunnerError::Version { found, .. }), Expected::Version(want)) => {
                    assert_eq!(*found, want, "{text}");
                }
                (Err(RunnerError::Missing { member, .. }), Expected::Missing(want)) => {
                    assert_eq!(*member, want, "{text}");
                }
                (Err(RunnerError::Invalid { .. }), Expected::Invalid) => {}
                (got, want) => panic!("{text}\nparsed as {got:?}, expected {want:?}"),
            }
        }
    }
});
