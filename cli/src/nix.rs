//! Driving the user's Nix: evaluate `nixosConfigurations.NAME` with nvmm's guest module injected
//! (`extendModules`, so the configuration itself stays untouched), build its runner directory
//! (docs/runner.md), and list a flake's configurations.
//!
//! Two nix processes per boot: `nix eval` turns every name into the derivation of its runner,
//! then `nix build` builds them together. Splitting the steps tells an evaluation error from a
//! build failure, and maps each result back to its name by derivation path (`nix build --json`
//! does not keep the order of its arguments). Works with Nix 2.4 and later; nvmm enables the
//! `nix-command` and `flakes` features for its own calls, so nothing needs configuring.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Deserialize;

use crate::exit::error_chain;

/// Features every nix call needs; `--extra-` adds them to whatever the user configured.
const FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
/// Markers the evaluation expression throws, recognised in nix's error output.
const NO_CONFIGURATIONS: &str = "nvmm-no-nixos-configurations";
const NO_SUCH_CONFIGURATION: &str = "nvmm-no-such-configuration";
/// Lines of a nix error message kept in nvmm's error (nix's traces can run to hundreds).
const MAX_MESSAGE_LINES: usize = 30;

/// Errors of evaluating and building with nix.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// `nix` is not on PATH.
    #[error("nix is not installed (no `nix` on PATH)")]
    NotInstalled,
    /// A nix without flakes.
    #[error("nix {version} is too old: nvmm needs Nix 2.4 or later (flakes)")]
    TooOld {
        /// What `nix --version` said.
        version: String,
    },
    /// nix could not be started or talked to.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A path flake reference without a flake.nix.
    #[error("no flake.nix in {}", .path.display())]
    FlakeNotFound {
        /// The directory.
        path: PathBuf,
    },
    /// The flake has no `nixosConfigurations`.
    #[error("flake {flake} has no nixosConfigurations")]
    NoConfigurations {
        /// The flake reference.
        flake: String,
    },
    /// `nixosConfigurations.NAME` does not exist.
    #[error("flake {flake} has no configuration {name:?} (it has: {})", list_or_none(.available))]
    NoSuchConfiguration {
        /// The name asked for.
        name: String,
        /// The flake reference.
        flake: String,
        /// The names it has.
        available: Vec<String>,
    },
    /// Evaluation failed; nix's message, trimmed.
    #[error("evaluating {what} failed:\n{message}")]
    Evaluation {
        /// What was evaluated.
        what: String,
        /// nix's error.
        message: String,
    },
    /// A build failed; nix's message, trimmed.
    #[error("building {what} failed:\n{message}")]
    Build {
        /// What was built.
        what: String,
        /// The derivation that failed, if nix named one.
        derivation: Option<String>,
        /// nix's error.
        message: String,
    },
    /// Ctrl-C (or another stop signal) while nix ran.
    #[error("interrupted while nix was running")]
    Interrupted {
        /// The signal.
        signal: i32,
    },
    /// The guest module could not be written out.
    #[error("cannot write the guest module to {}", .path.display())]
    WriteModule {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// nix succeeded but printed something nvmm cannot read.
    #[error("unexpected output from {program}: {detail}")]
    UnexpectedOutput {
        /// The program.
        program: String,
        /// What was wrong.
        detail: String,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl NixError {
    /// The configuration name closest to the one asked for, for "did you mean".
    pub fn suggestion(&self) -> Option<&str> {
        let NixError::NoSuchConfiguration {
            name, available, ..
        } = self
        else {
            return None;
        };
        available
            .iter()
            .map(|candidate| (edit_distance(name, candidate), candidate))
            .filter(|(distance, candidate)| *distance <= candidate.len().max(name.len()) / 2)
            .min()
            .map(|(_, candidate)| candidate.as_str())
    }
}

/// Levenshtein distance, for suggestions among a flake's few configuration names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A flake reference as nix's `builtins.getFlake` takes it: a local directory made absolute,
/// anything else (`github:…`, `git+https://…`) as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef(String);

impl FlakeRef {
    /// Resolves `reference` (default `.`) against the current directory.
    pub fn resolve(reference: &str) -> Result<FlakeRef, NixError> {
        let is_path = reference.starts_with('/')
            || reference.starts_with('.')
            || reference.starts_with('~')
            || !reference.contains(':');
        if !is_path {
            return Ok(FlakeRef(reference.to_owned()));
        }
        let path = match reference {
            "~" => home_dir(),
            tilde if tilde.starts_with("~/") => home_dir().join(&tilde[2..]),
            plain => PathBuf::from(plain),
        };
        let absolute = std::path::absolute(&path).unwrap_or(path);
        if !absolute.join("flake.nix").is_file() {
            return Err(NixError::FlakeNotFound { path: absolute });
        }
        Ok(FlakeRef(absolute.to_string_lossy().into_owned()))
    }

    /// The reference as nix reads it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for FlakeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/guest_module.rs"));
}

/// The guest module to inject: the copy installed with nvmm when the build named one (the
/// flake's package does), else nvmm's embedded copy, written once per content under
/// `STATE/guest-module/VERSION-HASH` so that every boot imports the same files.
pub fn guest_module(state_dir: &Path) -> Result<PathBuf, NixError> {
    if let Some(installed) = option_env!("NVMM_GUEST_MODULE") {
        return Ok(PathBuf::from(installed).join("default.nix"));
    }
    let hash = embedded::GUEST_MODULE_FILES
        .iter()
        .flat_map(|(name, contents)| name.as_bytes().iter().chain(contents.iter()))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    let dir = state_dir
        .join("guest-module")
        .join(format!("{}-{hash:016x}", env!("CARGO_PKG_VERSION")));
    let entry = dir.join("default.nix");
    if entry.is_file() {
        return Ok(entry);
    }
    let write_error = |source| NixError::WriteModule {
        path: dir.clone(),
        source,
    };
    // Written beside, then renamed into place: a racing nvmm sees all files or none.
    let staging = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    for (name, contents) in embedded::GUEST_MODULE_FILES {
        let path = staging.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        std::fs::write(&path, contents).map_err(write_error)?;
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => {}
        // Another nvmm won the race with the same contents.
        Err(_) if entry.is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(write_error(source));
        }
    }
    if !entry.is_file() {
        return Err(write_error(io::Error::new(
            io::ErrorKind::NotFound,
            "this nvmm was built without nix/guest/default.nix",
        )));
    }
    Ok(entry)
}

/// How much of nix's own output the user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NixLog {
    /// Progress: what is built and fetched (nix's progress bar on a terminal).
    Progress,
    /// Progress and every build's log (`-L`).
    BuildLogs,
}

/// The installed nix. Making one starts nothing: the first nix call finds out whether nix is
/// there, and its version comes with the first evaluation (each nix process costs ~20 ms).
#[derive(Debug)]
pub struct Nix {
    log: NixLog,
}

/// Which configurations [`Nix::build_runners`] evaluates and builds.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// These names, in this order; one the flake lacks is an error.
    Named(&'a [String]),
    /// Every configuration of the flake but these (the ones already running): one nix call
    /// both lists the flake's configurations and evaluates them.
    AllBut(&'a [String]),
}

/// What [`Nix::build_runners`] evaluated and built.
#[derive(Debug)]
pub struct Built {
    /// Every configuration the flake has.
    pub configurations: Vec<String>,
    /// The selected configurations' runner directories, in order.
    pub runners: Vec<(String, PathBuf)>,
}

/// What the evaluation expression returns.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Evaluated {
    nix_version: String,
    configurations: Vec<String>,
    runners: Vec<EvaluatedRunner>,
}

#[derive(Debug, Deserialize)]
struct EvaluatedRunner {
    name: String,
    drv: String,
    /// The runner's output path.
    out: String,
    /// The output is in the store and valid: nix checked it during the evaluation.
    realised: bool,
}

impl Nix {
    /// nix, with `log` deciding how much of its output the user sees.
    pub fn new(log: NixLog) -> Nix {
        Nix { log }
    }

    /// After a failed nix call: [`NixError::TooOld`] if nix predates flakes (its error then
    /// says less than this), else nothing, and the caller reports nix's own error.
    fn refuse_old_nix(&self) -> Result<(), NixError> {
        let Ok(output) = Command::new("nix")
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&output.stdout);
        match parse_version(&text) {
            Some(version) if version < (2, 4) => Err(NixError::TooOld {
                version: text.trim().to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The names in `flake`'s `nixosConfigurations`.
    pub fn configurations(&self, flake: &FlakeRef) -> Result<Vec<String>, NixError> {
        let expr = format!(
            "let flake = builtins.getFlake {}; in \
             if flake ? nixosConfigurations \
             then builtins.attrNames flake.nixosConfigurations else null",
            nix_string(flake.as_str())
        );
        let stdout = self.run_nix("nix eval", &["eval", "--json", "--impure", "--expr", &expr])?;
        let stdout = match stdout {
            Ok(stdout) => stdout,
            Err(message) => {
                self.refuse_old_nix()?;
                return Err(NixError::Evaluation {
                    what: format!("flake {flake}"),
                    message,
                });
            }
        };
        let names: Option<Vec<String>> =
            serde_json::from_str(&stdout).map_err(|e| NixError::UnexpectedOutput {
                program: "nix eval".into(),
                detail: e.to_string(),
            })?;
        names.ok_or_else(|| NixError::NoConfigurations {
            flake: flake.to_string(),
        })
    }

    /// Evaluates and builds the runner directory of each configuration `selection` names,
    /// with the guest module at `module` injected: one `nix eval`, then one `nix build` of the
    /// runners that are not in the store yet (none when all are, or nothing is selected).
    pub fn build_runners(
        &self,
        flake: &FlakeRef,
        selection: Selection<'_>,
        module: &Path,
    ) -> Result<Built, NixError> {
        let asked = match selection {
            Selection::Named(names) => names.join(", "),
            Selection::AllBut(_) => "the configurations".into(),
        };
        eprintln!("nvmm: evaluating {asked} (flake {flake})");
        let expr = runner_expression(flake, selection, module);
        // The expression reads built runners through their outputs to have nix check them:
        // import from derivation, which a user may have turned off for their own code.
        let args = [
            "eval",
            "--json",
            "--impure",
            "--option",
            "allow-import-from-derivation",
            "true",
            "--expr",
            &expr,
        ];
        let stdout = self.run_nix("nix eval", &args)?;
        let stdout = match stdout {
            Ok(stdout) => stdout,
            Err(message) => {
                // A nix too old for flakes fails here too: say that rather than what it said.
                self.refuse_old_nix()?;
                return Err(self.evaluation_error(flake, &asked, message));
            }
        };
        let evaluated: Evaluated =
            serde_json::from_str(&stdout).map_err(|e| NixError::UnexpectedOutput {
                program: "nix eval".into(),
                detail: e.to_string(),
            })?;
        // Runners the evaluation found built need no `nix build`: on a warm store, one nix
        // process in all.
        let (built, unbuilt): (Vec<&EvaluatedRunner>, Vec<&EvaluatedRunner>) =
            evaluated.runners.iter().partition(|r| r.realised);
        if !built.is_empty() {
            let names: Vec<&str> = built.iter().map(|r| r.name.as_str()).collect();
            eprintln!("nvmm: {} already built", names.join(", "));
        }
        // One directory per unbuilt runner, in their order.
        let mut fresh = Vec::new().into_iter();
        if !unbuilt.is_empty() {
            let derivations: Vec<String> = unbuilt.iter().map(|r| r.drv.clone()).collect();
            let names: Vec<&str> = unbuilt.iter().map(|r| r.name.as_str()).collect();
            fresh = self
                .build(&names.join(", "), &evaluated.nix_version, &derivations)?
                .into_iter();
        }
        let runners = evaluated
            .runners
            .into_iter()
            .map(|runner| {
                let dir = match runner.realised {
                    true => PathBuf::from(runner.out),
                    false => fresh.next().ok_or_else(|| NixError::UnexpectedOutput {
                        program: "nix build".into(),
                        detail: format!("no output for {}", runner.drv),
                    })?,
                };
                Ok((runner.name, dir))
            })
            .collect::<Result<_, NixError>>()?;
        Ok(Built {
            configurations: evaluated.configurations,
            runners,
        })
    }

    /// `nix build` of `derivations` (the runners of `what`); their output directories, in
    /// order.
    fn build(
        &self,
        what: &str,
        nix_version: &str,
        derivations: &[String],
    ) -> Result<Vec<PathBuf>, NixError> {
        eprintln!("nvmm: building {what}");
        let mut args = vec!["build", "--no-link", "--json"];
        if self.log == NixLog::BuildLogs {
            args.push("--print-build-logs");
        }
        // Nix 2.13 made `DRV^*` the way to name a derivation's outputs; older ones read a
        // plain .drv path that way.
        let version = parse_version(nix_version).ok_or_else(|| NixError::UnexpectedOutput {
            program: "nix eval".into(),
            detail: format!("builtins.nixVersion is {nix_version:?}"),
        })?;
        let installables: Vec<String> = derivations
            .iter()
            .map(|drv| match version >= (2, 13) {
                true => format!("{drv}^*"),
                false => drv.clone(),
            })
            .collect();
        args.extend(installables.iter().map(String::as_str));
        let stdout = self.run_nix("nix build", &args)?;
        let stdout = stdout.map_err(|message| NixError::Build {
            what: what.to_owned(),
            derivation: failed_derivation(&message),
            message,
        })?;
        runners_in_order(&stdout, derivations)
    }

    fn evaluation_error(&self, flake: &FlakeRef, what: &str, message: String) -> NixError {
        if message.contains(NO_CONFIGURATIONS) {
            return NixError::NoConfigurations {
                flake: flake.to_string(),
            };
        }
        if let Some(at) = message.find(NO_SUCH_CONFIGURATION) {
            // `nvmm-no-such-configuration NAME ["a","b"]`, as the expression throws it.
            let rest = &message[at + NO_SUCH_CONFIGURATION.len()..];
            let rest = rest.lines().next().unwrap_or("").trim();
            if let Some((name, available)) = rest.split_once(' ')
                && let Ok(available) = serde_json::from_str::<Vec<String>>(available)
                && let Ok(name) = serde_json::from_str::<String>(name)
            {
                return NixError::NoSuchConfiguration {
                    name,
                    flake: flake.to_string(),
                    available,
                };
            }
        }
        NixError::Evaluation {
            what: what.to_owned(),
            message,
        }
    }

    /// Runs `nix ARGS…` with nix's progress on stderr; `Ok(Ok(stdout))` on success,
    /// `Ok(Err(message))` with nix's trimmed error when nix failed.
    fn run_nix(&self, program: &str, args: &[&str]) -> Result<Result<String, String>, NixError> {
        let mut command = Command::new("nix");
        command.args(FEATURES).args(args);
        // nix draws its progress bar only on a terminal; it writes through nvmm's pipe here,
        // so ask for the bar when that pipe ends on one.
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
            command.args([
                "--log-format",
                if self.log == NixLog::BuildLogs {
                    "bar-with-logs"
                } else {
                    "bar"
                },
            ]);
        }
        let spawn_error = |source| NixError::Spawn {
            program: program.to_owned(),
            source,
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => NixError::NotInstalled,
                _ => spawn_error(source),
            })?;
        let _relay = SignalRelay::install(child.id());

        // stdout carries a few hundred bytes of JSON, so reading stderr to its end first cannot
        // block nix on a full stdout pipe.
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| spawn_error(io::ErrorKind::BrokenPipe.into()))?;
        let error_text = relay_progress(&mut stderr).map_err(spawn_error)?;
        let mut stdout = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_string(&mut stdout).map_err(spawn_error)?;
        }
        let status = child.wait().map_err(spawn_error)?;
        if let Some(signal) = SignalRelay::take_signal() {
            return Err(NixError::Interrupted { signal });
        }
        if status.success() {
            Ok(Ok(stdout))
        } else if error_text.trim().is_empty() {
            Ok(Err(format!(
                "{program} failed ({status}) without a message"
            )))
        } else {
            Ok(Err(error_text))
        }
    }
}

/// Copies nix's stderr to ours as it comes, up to its error message: that is kept (trimmed)
/// and returned instead, so the user reads it once, in nvmm's error.
fn relay_progress(stderr: &mut impl Read) -> io::Result<String> {
    let mut pending = Vec::new();
    let mut error = String::new();
    let mut in_error = false;
    let mut buffer = [0u8; 8192];
    let mut out = io::stderr();
    loop {
        let n = match stderr.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buffer[..n]);
        // Whole lines only: whether a line starts an error is known at its start, but the bar
        // redraws with `\r`, so the start of a line is the text after its last `\r`.
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = strip_terminal_codes(&String::from_utf8_lossy(&line));
            let visible = text.rsplit('\r').next().unwrap_or("");
            if !in_error && visible.starts_with("error:") {
                in_error = true;
            }
            if in_error {
                error.push_str(visible);
            } else if !is_noise(visible) {
                let _ = out.write_all(&line);
            }
        }
        // A partial line is the progress bar being drawn: show it now.
        if !in_error && !pending.is_empty() && !pending.contains(&b'\n') {
            let _ = out.write_all(&pending);
            pending.clear();
        }
    }
    let tail = strip_terminal_codes(&String::from_utf8_lossy(&pending));
    if in_error {
        error.push_str(&tail);
    } else if tail.trim_start().starts_with("error:") {
        error = tail;
    }
    // The bar leaves its last frame on the line: clear it before nvmm prints more.
    // SAFETY: isatty only inspects the fd.
    if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
        let _ = out.write_all(b"\r\x1b[K");
    }
    Ok(trim_message(&error))
}

/// Lines nix prints that say nothing to an nvmm user.
fn is_noise(line: &str) -> bool {
    // nvmm builds with --no-link on purpose: the VM holds the files it needs open.
    line.starts_with("warning: you did not specify '--add-root'")
        // Another nix process holds the store's database; nix waits and retries by itself.
        || (line.starts_with("warning: error: SQLite database") && line.contains("is busy"))
}

/// At most [`MAX_MESSAGE_LINES`] lines, without trailing blank ones, and without nix's
/// `error:` (nvmm prints its own): indented as nix indents the lines that follow.
fn trim_message(message: &str) -> String {
    let message = match message.strip_prefix("error:") {
        Some(rest) => format!("      {rest}"),
        None => message.to_owned(),
    };
    let lines: Vec<&str> = message.trim_end().lines().collect();
    if lines.len() <= MAX_MESSAGE_LINES {
        return lines.join("\n");
    }
    let mut kept = lines[..MAX_MESSAGE_LINES].join("\n");
    kept.push_str(&format!(
        "\n       … ({} more lines)",
        lines.len() - MAX_MESSAGE_LINES
    ));
    kept
}

/// Removes ANSI escape sequences (colours, cursor movement) from nix's output.
fn strip_terminal_codes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The derivation nix says failed: `builder for '/nix/store/…drv' failed`.
fn failed_derivation(message: &str) -> Option<String> {
    let after = message.split("builder for '").nth(1)?;
    let drv = after.split('\'').next()?;
    drv.ends_with(".drv").then(|| drv.to_owned())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BuildResult {
    drv_path: String,
    outputs: std::collections::BTreeMap<String, String>,
}

/// Maps `nix build --json` results back to `derivations`' order (nix sorts them its own way).
fn runners_in_order(stdout: &str, derivations: &[String]) -> Result<Vec<PathBuf>, NixError> {
    let unexpected = |detail: String| NixError::UnexpectedOutput {
        program: "nix build".into(),
        detail,
    };
    let results: Vec<BuildResult> =
        serde_json::from_str(stdout).map_err(|e| unexpected(e.to_string()))?;
    derivations
        .iter()
        .map(|drv| {
            results
                .iter()
                .find(|result| &result.drv_path == drv)
                .and_then(|result| result.outputs.get("out"))
                .map(PathBuf::from)
                .ok_or_else(|| unexpected(format!("no output for {drv}")))
        })
        .collect()
}

/// The `nix eval` expression: nix's version, the flake's configuration names, and the
/// runner derivation of each selected name, in order, with its output and whether that is
/// built. A configuration that already imports the guest module (by hand) is used as it is;
/// the others get it through `extendModules`.
fn runner_expression(flake: &FlakeRef, selection: Selection<'_>, module: &Path) -> String {
    let list = |names: &[String]| {
        let quoted: Vec<String> = names.iter().map(|name| nix_string(name)).collect();
        format!("[ {} ]", quoted.join(" "))
    };
    let selected = match selection {
        Selection::Named(names) => list(names),
        Selection::AllBut(running) => format!(
            "builtins.filter (name: ! builtins.elem name {}) names",
            list(running)
        ),
    };
    format!(
        r#"let
  flake = builtins.getFlake {flake};
  module = /. + {module};
  configurations = flake.nixosConfigurations or (throw "{NO_CONFIGURATIONS}");
  names = builtins.attrNames configurations;
  runner = name:
    if ! configurations ? ${{name}} then
      throw "{NO_SUCH_CONFIGURATION} ${{builtins.toJSON name}} ${{builtins.toJSON names}}"
    else
      let
        system = configurations.${{name}};
        withModule =
          if system ? options && system.options ? nvmm then system
          else system.extendModules {{ modules = [ module ]; }};
      in withModule.config.system.build.nvmm;
  # A runner output on disk may still be unfinished or half deleted: nix knows. Checking a
  # path with the derivation's context has nix realise it, which for a valid output is a
  # look-up (and otherwise builds it); outputs not on disk are left to one parallel build.
  evaluated = name:
    let
      built = runner name;
      out = builtins.unsafeDiscardStringContext built.outPath;
    in {{
      inherit name out;
      drv = built.drvPath;
      realised = builtins.pathExists out && builtins.pathExists "${{built}}";
    }};
in {{
  nixVersion = builtins.nixVersion;
  configurations = names;
  runners = map evaluated ({selected});
}}"#,
        flake = nix_string(flake.as_str()),
        module = nix_string(&module.to_string_lossy()),
    )
}

/// `text` as a Nix string literal.
fn nix_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `nix (Nix) 2.8.0` (or `builtins.nixVersion`'s `2.8.0`) → (2, 8).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().last()?;
    let mut parts = version.split(['.', 'p', 'r', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The pid of the nix process a stop signal is relayed to (0: none).
static NIX_PID: AtomicI32 = AtomicI32::new(0);
/// The stop signal that arrived while nix ran (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn relay_stop_signal(
    signal: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
    let pid = NIX_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe. Ctrl-C already reached nix through the terminal's
        // process group; a SIGTERM sent to nvmm alone did not.
        unsafe { libc::kill(pid, signal) };
    }
}

/// While alive, SIGINT/SIGTERM/SIGHUP stop nix (not nvmm), which then exits and nvmm reports
/// the interruption: no half-evaluated state and no orphaned nix.
struct SignalRelay;

impl SignalRelay {
    fn install(pid: u32) -> SignalRelay {
        NIX_PID.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // The handler only does atomic operations and kill(2).
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, relay_stop_signal)
            {
                log::warn!("cannot relay signal {signal} to nix: {}", error_chain(&e));
            }
        }
        SignalRelay
    }

    fn take_signal() -> Option<i32> {
        match STOP_SIGNAL.swap(0, Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }
}

impl Drop for SignalRelay {
    fn drop(&mut self) {
        NIX_PID.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nix (Nix) 2.8.0\n"), Some((2, 8)));
        assert_eq!(parse_version("nix (Nix) 2.24.10"), Some((2, 24)));
        assert_eq!(parse_version("nix (Nix) 2.3pre2020"), Some((2, 3)));
        assert_eq!(parse_version("2.8.0"), Some((2, 8)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn nix_strings_cannot_break_out() {
        assert_eq!(nix_string("a\"b"), r#""a\"b""#);
        assert_eq!(nix_string("${x}"), r#""\${x}""#);
        assert_eq!(nix_string("a\\b\n"), r#""a\\b\n""#);
    }

    #[test]
    fn the_closest_configuration_is_suggested() {
        let err = |name: &str| NixError::NoSuchConfiguration {
            name: name.into(),
            flake: "/f".into(),
            available: vec!["server".into(), "client".into(), "db".into()],
        };
        assert_eq!(err("sever").suggestion(), Some("server"));
        assert_eq!(err("clients").suggestion(), Some("client"));
        assert_eq!(err("zzzzzz").suggestion(), None);
        assert!(err("x").to_string().contains("it has: server, client, db"));
    }

    #[test]
    fn progress_is_relayed_and_the_error_kept() {
        let output = "building '/nix/store/a.drv'...\n\
                      warning: you did not specify '--add-root'; the result might be removed\n\
                      warning: error: SQLite database '/nix/var/nix/db/db.sqlite' is busy\n\
                      \x1b[31;1merror:\x1b[0m builder for '/nix/store/abc-x.drv' failed with exit code 3;\n       \
                      last 1 log lines:\n       > failing\n";
        let error = relay_progress(&mut output.as_bytes()).unwrap();
        assert!(error.starts_with("       builder for"), "{error:?}");
        assert!(error.ends_with("> failing"), "{error:?}");
        assert_eq!(
            failed_derivation(&error).as_deref(),
            Some("/nix/store/abc-x.drv")
        );
    }

    #[test]
    fn nix_retry_notices_are_not_relayed() {
        assert!(is_noise(
            "warning: error: SQLite database '/nix/var/nix/db/db.sqlite' is busy"
        ));
        assert!(is_noise(
            "warning: you did not specify '--add-root'; the result might be removed"
        ));
        assert!(!is_noise("warning: Git tree '/src' is dirty"));
        assert!(!is_noise("building '/nix/store/a.drv'..."));
    }

    #[test]
    fn long_messages_are_trimmed() {
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let trimmed = trim_message(&long);
        assert_eq!(trimmed.lines().count(), MAX_MESSAGE_LINES + 1);
        assert!(trimmed.ends_with("(70 more lines)"), "{trimmed}");
    }

    #[test]
    fn build_results_map_back_to_their_names() {
        let stdout = r#"[{"drvPath":"/nix/store/b.drv","outputs":{"out":"/nix/store/b"}},
                         {"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/a"}}]"#;
        let derivations = ["/nix/store/a.drv".to_owned(), "/nix/store/b.drv".to_owned()];
        assert_eq!(
            runners_in_order(stdout, &derivations).unwrap(),
            [PathBuf::from("/nix/store/a"), PathBuf::from("/nix/store/b")]
        );
        assert!(runners_in_order("[]", &derivations).is_err());
    }

    #[test]
    fn path_references_must_hold_a_flake() {
        let err = FlakeRef::resolve("/nonexistent-nvmm-flake").unwrap_err();
        assert!(matches!(err, NixError::FlakeNotFound { .. }), "{err}");
        assert_eq!(
            FlakeRef::resolve("github:owner/repo").unwrap().as_str(),
            "github:owner/repo"
        );
    }
}
