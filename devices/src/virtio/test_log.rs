//! A logger for device tests: what the code under test logs on the test's own thread, so a test
//! can check that a misbehaving guest is logged once, not on every occurrence.

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    /// The lines logged on this thread while [`logged`] runs.
    static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LINES.with(|lines| {
            if let Some(lines) = lines.borrow_mut().as_mut() {
                lines.push(format!(
                    "{} {}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ));
            }
        });
    }

    fn flush(&self) {}
}

/// Runs `f` and returns what it logged on this thread, one `LEVEL target: message` per record.
pub fn logged(f: impl FnOnce()) -> Vec<String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Only this logger is ever installed in the test binary.
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
    f();
    LINES.with(|lines| lines.borrow_mut().take().unwrap_or_default())
}

/// Checks that `lines` has no line of virtio-queue's own and no line twice.
pub fn assert_logged_once(lines: &[String]) {
    assert!(
        lines.iter().all(|line| !line.contains("virtio_queue")),
        "virtio-queue logged on its own: {lines:#?}"
    );
    for (i, line) in lines.iter().enumerate() {
        assert!(!lines[..i].contains(line), "logged twice: {lines:#?}");
    }
}
