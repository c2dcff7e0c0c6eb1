//! Device models for nvmm, written against small traits so they can be unit-tested without KVM.
//!
//! - [`bus`]: the PIO and MMIO buses the vCPU threads dispatch exits to.
//! - [`legacy`]: the 8250 UART, a minimal i8042, the port-0x80 debug port and the ACPI
//!   power-management registers (sleep control and reset).
//! - [`EventFdTrigger`]: how a device raises an interrupt or tells the VMM something happened.

pub mod bus;
pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// Locks a device (or any state shared with one). Nothing in nvmm panics while holding such a
/// lock (guest input cannot make it), so a poisoned lock is recovered rather than turned into a
/// second panic.
pub fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where host console input goes (the UART or the virtio console): it takes only as much as it
/// has room for, so the reader can stop reading the terminal instead of dropping keystrokes.
pub trait InputSink: Send {
    /// Bytes it can take now.
    fn room(&self) -> usize;
    /// Takes up to [`Self::room`] bytes of `input`; returns how many.
    fn push(&mut self, input: &[u8]) -> usize;
}

/// An eventfd used as an edge: writing 1 raises an interrupt (when registered as an irqfd) or
/// wakes the event loop (exit requests).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }

    /// Signals the eventfd.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }

    /// The wrapped eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        EventFdTrigger::trigger(self)
    }
}
