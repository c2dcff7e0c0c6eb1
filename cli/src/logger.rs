//! A small stderr logger. Every line carries microseconds since nvmm started, the level and the
//! module. stdout is never used: it belongs to the guest console.
//!
//! Levels: error = nvmm cannot go on; warn = something the user should know (default);
//! info (-v) = boot steps, guest debug-port writes, why the VM ended; debug (-vv) = device
//! details and ignored guest accesses; trace (-vvv) = everything else.

use std::io::{IsTerminal, Write};
use std::time::Instant;

struct StderrLogger {
    started: Instant,
    level: log::LevelFilter,
    // In raw terminal mode "\n" does not return the carriage, so a TTY gets "\r\n".
    line_end: &'static str,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "[{:>9} us {:<5} {}] {}{}",
            self.started.elapsed().as_micros(),
            record.level(),
            record.target(),
            record.args(),
            self.line_end
        );
        // Logging must never fail the VMM; a closed stderr just loses the line.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`.
pub fn init(level: log::LevelFilter, started: Instant) {
    let logger = StderrLogger {
        started,
        level,
        line_end: if std::io::stderr().is_terminal() {
            "\r\n"
        } else {
            "\n"
        },
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
