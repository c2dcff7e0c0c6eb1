//! `nvmm`'s command-line front end as a library: the `nvmm` binary (src/main.rs) parses the
//! arguments and calls the [`commands`], and the fuzz targets (fuzz/) reach the parsers and
//! writers that take outside input ([`runner`], [`disks`]) without starting a process.

pub mod args;
mod background;
mod boot;
mod control;
pub mod disks;
mod doctor;
pub mod exit;
mod fleet;
pub mod logger;
mod net;
mod nix;
mod run;
pub mod runner;
mod sandbox;
mod ssh;
mod state;
pub mod terminal;

/// One function per subcommand, taking its parsed arguments; `completions` needs none (clap
/// writes the script).
pub mod commands {
    pub use crate::boot::{boot, list};
    pub use crate::doctor::doctor;
    pub use crate::fleet::{down, ps, ssh, stop, up};
    pub use crate::run::{console, logs, run};
}
