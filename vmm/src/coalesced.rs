//! Coalesced port writes: KVM appends the guest's writes to a registered port to a ring page
//! instead of exiting to the VMM, which replays them in order at the next exit.
//!
//! Why: every exit to user space costs a return from KVM_RUN and a fresh vCPU load; on
//! nested, software KVM (kvm-pvm) that load alone measured ~6.5 µs. A guest printing through
//! the UART by polling (Linux's console, the test guest) reads LSR and writes THR for each
//! byte: coalescing THR halves its exits.
//!
//! The ring is one page per VM, mapped through a vCPU fd. Every vCPU thread replays it before
//! it handles an exit, under one lock, so the devices see the writes in the guest's order.
//!
//! A guest that writes and then goes quiet makes no exit that would replay its last writes,
//! and one that waits for the UART's transmit interrupt waits for its writes to be seen. So
//! the event loop replays the ring on a timer too: 1 ms after an exit at the UART (a polling
//! driver writes right after its status read; its next read replays the rest, so the timer
//! only matters once output stops), every 250 µs while the UART's transmit interrupt is
//! enabled (Linux enables it only while it has output queued, and waits for the interrupt
//! that the replayed write raises), and otherwise as a backstop for a guest that writes
//! without reading first: 50 ms after the guest's last output, doubling each time the timer
//! finds nothing, up to a second, so that an idle VM's event loop wakes once a second rather
//! than twenty times.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::{KVM_COALESCED_MMIO_PAGE_OFFSET, kvm_coalesced_mmio, kvm_coalesced_mmio_ring};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::layout::ports::{COM1, COM1_LEN};
use crate::vcpu::Peripherals;

/// The UART's registers: an exit there may be a polling driver about to write.
const UART: std::ops::Range<u64> = COM1..COM1 + COM1_LEN;

/// How soon queued writes are replayed while the guest waits for the transmit interrupt: a
/// 16-byte transmit FIFO per period is 64 KiB/s, faster than a real 115200-baud line.
const REPLAY_FOR_INTERRUPT: Duration = Duration::from_micros(250);
/// How soon writes queued after an exit at the UART are replayed if no exit comes first.
const REPLAY_AFTER_EXIT: Duration = Duration::from_millis(1);
/// How late a write that no exit follows is replayed at worst, soon after earlier output.
const REPLAY_BACKSTOP: Duration = Duration::from_millis(50);
/// How late it is replayed at worst after a quiet spell: the backstop doubles up to this.
const REPLAY_BACKSTOP_IDLE: Duration = Duration::from_secs(1);

/// The mapped ring page.
#[derive(Debug)]
pub struct CoalescedRing {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries the page holds (the kernel's KVM_COALESCED_MMIO_MAX).
    capacity: u32,
}

// SAFETY: the page is plain shared memory; the kernel and the consumer coordinate through the
// `first`/`last` indices with acquire/release ordering, and `drain` takes `&mut self`, so one
// thread consumes at a time (callers share the ring behind a Mutex).
unsafe impl Send for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring through `vcpu`.
    pub fn map(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: sysconf has no memory effects.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a new shared mapping of one page of the vCPU fd at the offset KVM documents
        // for the coalesced ring; nothing else is at the address the kernel picks.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(page.cast::<kvm_coalesced_mmio_ring>())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let capacity = ((page_size - header) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self {
            page,
            page_size,
            capacity,
        })
    }

    /// The ring's `first` (the consumer's, ours) or `last` (the kernel's) index.
    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: both indices are aligned u32s at the start of the mapped page, which lives as
        // long as `self`; the kernel updates them concurrently, which is why they are only
        // accessed atomically.
        unsafe {
            &*self
                .page
                .as_ptr()
                .cast::<u8>()
                .add(offset)
                .cast::<AtomicU32>()
        }
    }

    fn first(&self) -> &AtomicU32 {
        self.index(std::mem::offset_of!(kvm_coalesced_mmio_ring, first))
    }

    fn last(&self) -> &AtomicU32 {
        self.index(std::mem::offset_of!(kvm_coalesced_mmio_ring, last))
    }

    /// Replays every queued write, oldest first: `write(port_or_address, is_pio, data)`.
    /// Returns how many there were.
    pub fn drain(&mut self, mut write: impl FnMut(u64, bool, &[u8])) -> usize {
        let (first, last) = (self.first(), self.last());
        let mut replayed = 0;
        loop {
            let head = first.load(Ordering::Relaxed);
            let tail = last.load(Ordering::Acquire);
            if head == tail || head >= self.capacity {
                return replayed;
            }
            // SAFETY: head < capacity, so the entry lies inside the page; the acquire load of
            // `last` orders this read after the kernel's write of the entry.
            let entry: kvm_coalesced_mmio = unsafe {
                std::ptr::read_volatile(
                    (*self.page.as_ptr())
                        .coalesced_mmio
                        .as_ptr()
                        .add(head as usize),
                )
            };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: both union members are u32s; `pio` is what KVM sets.
            let is_pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            write(entry.phys_addr, is_pio, &entry.data[..len]);
            first.store((head + 1) % self.capacity, Ordering::Release);
            replayed += 1;
        }
    }
}

/// The VM's coalesced writes: the ring, and the timer that replays it when no exit does.
#[derive(Debug)]
pub struct CoalescedWrites {
    ring: Mutex<CoalescedRing>,
    io: Peripherals,
    timer: Mutex<ReplayTimerFd>,
    /// The timer is set to replay soon (not the backstop) and has not fired yet.
    soon: AtomicBool,
    /// The UART's transmit interrupt is enabled: the guest may wait for its writes to be seen.
    transmit_interrupt: Arc<AtomicBool>,
}

impl CoalescedWrites {
    /// Writes queued in `ring`, for the devices on `io`; `transmit_interrupt` follows the
    /// UART's. The timer starts with the backstop period.
    pub fn new(
        ring: CoalescedRing,
        io: Peripherals,
        transmit_interrupt: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // Setting the timer again clears a pending expiry, so the event loop must not block
        // reading one that epoll reported just before.
        // SAFETY: F_SETFL on a descriptor this function owns.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let writes = Self {
            ring: Mutex::new(ring),
            io,
            timer: Mutex::new(ReplayTimerFd {
                fd: timer,
                backstop: REPLAY_BACKSTOP,
            }),
            soon: AtomicBool::new(false),
            transmit_interrupt,
        };
        writes.set_timer(REPLAY_BACKSTOP);
        Ok(writes)
    }

    /// Hands the queued writes to the buses, oldest first; returns how many there were. Also
    /// called before output that must not overtake them.
    pub fn replay(&self) -> usize {
        // Devices are written with the ring locked, so that no other thread's later replay
        // reaches a device first. A poisoned lock only means a thread panicked mid-replay;
        // the ring's indices are still KVM's.
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(|addr, is_pio, data| {
                let bus = if is_pio { &self.io.pio } else { &self.io.mmio };
                bus.write(addr, data);
            })
    }

    /// A vCPU exited: replays what the guest queued before the exit. If the exit was at the
    /// UART (a polling driver's status read) or writes were queued, sets the timer to replay
    /// soon what the guest may queue right after.
    pub fn on_exit(&self, exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        let at_uart = match exit {
            Ok(VcpuExit::IoIn(port, _)) | Ok(VcpuExit::IoOut(port, _)) => {
                UART.contains(&u64::from(*port))
            }
            _ => false,
        };
        let replayed = self.replay();
        if (at_uart || replayed > 0) && !self.soon.swap(true, Ordering::AcqRel) {
            self.set_timer(match self.transmit_interrupt.load(Ordering::Acquire) {
                true => REPLAY_FOR_INTERRUPT,
                false => REPLAY_AFTER_EXIT,
            });
        }
    }

    /// The timer fired: replays, and sets it again: soon while the guest waits for the
    /// transmit interrupt, else the backstop, which grows while the guest is quiet.
    fn on_timer(&self) {
        let was_soon = self.soon.swap(false, Ordering::AcqRel);
        let replayed = self.replay();
        if self.transmit_interrupt.load(Ordering::Acquire) {
            if !self.soon.swap(true, Ordering::AcqRel) {
                self.set_timer(REPLAY_FOR_INTERRUPT);
            }
            return;
        }
        let mut timer = self.timer.lock().unwrap_or_else(PoisonError::into_inner);
        // A vCPU's exit since the swap above set the timer to replay soon (or is about to,
        // behind this lock): the backstop must not push that back.
        if self.soon.load(Ordering::Acquire) {
            return;
        }
        timer.backstop = next_backstop(timer.backstop, was_soon || replayed > 0);
        let backstop = timer.backstop;
        timer.reset(backstop);
    }

    fn set_timer(&self, delay: Duration) {
        self.timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset(delay);
    }
}

/// The replay timer and its current backstop period.
#[derive(Debug)]
struct ReplayTimerFd {
    fd: TimerFd,
    backstop: Duration,
}

impl ReplayTimerFd {
    fn reset(&mut self, delay: Duration) {
        if let Err(err) = self.fd.reset(delay, None) {
            log::warn!("cannot set the serial output timer: {err}");
        }
    }
}

/// The backstop after one that ran: the shortest again if the guest had output since the
/// last, else twice as long, up to the idle period.
fn next_backstop(last: Duration, guest_had_output: bool) -> Duration {
    match guest_had_output {
        true => REPLAY_BACKSTOP,
        false => (last * 2).min(REPLAY_BACKSTOP_IDLE),
    }
}

/// The event-loop side of [`CoalescedWrites`]: replays the ring when its timer fires.
#[derive(Debug)]
pub struct ReplayTimer(pub Arc<CoalescedWrites>);

impl MutEventSubscriber for ReplayTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        {
            let mut timer = self.0.timer.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(err) = timer.fd.wait() {
                log::debug!("serial output timer: {err}");
            }
        }
        self.0.on_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let timer = self.0.timer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = ops.add(Events::new(&timer.fd, EventSet::IN)) {
            log::error!("cannot watch the serial output timer: {err}");
        }
    }
}

#[cfg(test)]
impl CoalescedRing {
    /// A ring on an anonymous page, as KVM would share it: for tests without KVM.
    fn anonymous() -> Self {
        let page_size = 4096;
        // SAFETY: a new private anonymous mapping; nothing else is at the address.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        Self {
            page: NonNull::new(page.cast()).unwrap(),
            page_size,
            capacity: ((page_size - header) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32,
        }
    }

    /// Queues a write as KVM does: the entry, then `last`.
    fn push(&self, port: u64, data: &[u8]) {
        let last = self.last().load(Ordering::Relaxed);
        let mut entry = kvm_coalesced_mmio {
            phys_addr: port,
            len: data.len() as u32,
            ..Default::default()
        };
        entry.__bindgen_anon_1.pio = 1;
        entry.data[..data.len()].copy_from_slice(data);
        // SAFETY: last < capacity, inside the page.
        unsafe {
            (*self.page.as_ptr())
                .coalesced_mmio
                .as_mut_ptr()
                .add(last as usize)
                .write(entry)
        };
        self.last()
            .store((last + 1) % self.capacity, Ordering::Release);
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map` mapped; no reference into it outlives `self`.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn drained(ring: &mut CoalescedRing) -> Vec<(u64, bool, Vec<u8>)> {
        let mut seen = Vec::new();
        let count = ring.drain(|addr, is_pio, data| seen.push((addr, is_pio, data.to_vec())));
        assert_eq!(count, seen.len());
        seen
    }

    /// How long until the replay timer fires.
    fn armed_for(writes: &CoalescedWrites) -> Duration {
        let timer = writes.timer.lock().unwrap();
        // SAFETY: itimerspec is plain integers, for which all zeros is a valid value.
        let mut state: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: timerfd_gettime fills `state`, which lives across the call.
        let read = unsafe { libc::timerfd_gettime(timer.fd.as_raw_fd(), &mut state) };
        assert_eq!(read, 0);
        Duration::new(state.it_value.tv_sec as u64, state.it_value.tv_nsec as u32)
    }

    fn assert_armed_for(writes: &CoalescedWrites, period: Duration) {
        let left = armed_for(writes);
        assert!(
            left <= period && left > period - period / 5,
            "armed for {left:?}, not about {period:?}"
        );
    }

    #[test]
    fn the_backstop_doubles_while_the_guest_is_quiet_up_to_a_second() {
        let mut period = REPLAY_BACKSTOP;
        let mut periods = Vec::new();
        for _ in 0..6 {
            period = next_backstop(period, false);
            periods.push(period.as_millis());
        }
        assert_eq!(periods, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(next_backstop(period, true), REPLAY_BACKSTOP);
    }

    #[test]
    fn the_replay_timer_backs_off_while_idle_and_comes_back_with_output() {
        let io = Peripherals {
            pio: Arc::new(nvmm_devices::bus::Bus::new("pio")),
            mmio: Arc::new(nvmm_devices::bus::Bus::new("mmio")),
        };
        let transmit_interrupt = Arc::new(AtomicBool::new(false));
        let writes =
            CoalescedWrites::new(CoalescedRing::anonymous(), io, transmit_interrupt).unwrap();
        assert_armed_for(&writes, REPLAY_BACKSTOP);
        writes.on_timer();
        assert_armed_for(&writes, 2 * REPLAY_BACKSTOP);
        writes.on_timer();
        assert_armed_for(&writes, 4 * REPLAY_BACKSTOP);

        // A write the guest queued without an exit: replayed, and the backstop is short again.
        writes.ring.lock().unwrap().push(0x3f8, b"x");
        writes.on_timer();
        assert_eq!(writes.replay(), 0, "the timer replayed the write");
        assert_armed_for(&writes, REPLAY_BACKSTOP);

        // A status read at the UART after a quiet spell: a replay soon, then the short backstop.
        writes.on_timer();
        assert_armed_for(&writes, 2 * REPLAY_BACKSTOP);
        let mut status = [0u8];
        writes.on_exit(&Ok(VcpuExit::IoIn(0x3fd, &mut status)));
        assert_armed_for(&writes, REPLAY_AFTER_EXIT);
        writes.on_timer();
        assert_armed_for(&writes, REPLAY_BACKSTOP);
    }

    #[test]
    fn writes_come_out_in_order_across_the_wrap() {
        let mut ring = CoalescedRing::anonymous();
        assert_eq!(ring.capacity, 170, "KVM_COALESCED_MMIO_MAX for 4 KiB pages");
        assert!(drained(&mut ring).is_empty());
        // Twice around the ring, a little at a time, as a guest and its exits would go.
        let mut expected = Vec::new();
        let mut seen = Vec::new();
        for round in 0..40u32 {
            for byte in 0..9u8 {
                let value = (round as u8).wrapping_mul(9).wrapping_add(byte);
                ring.push(0x3f8, &[value]);
                expected.push((0x3f8, true, vec![value]));
            }
            seen.extend(drained(&mut ring));
        }
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_length_beyond_the_entry_is_cut_and_a_bad_index_stops_the_drain() {
        let mut ring = CoalescedRing::anonymous();
        ring.push(0x3f8, b"A");
        // SAFETY: entry 0 is inside the page; a length no entry has.
        unsafe { (*(*ring.page.as_ptr()).coalesced_mmio.as_mut_ptr()).len = 1000 };
        assert_eq!(
            drained(&mut ring),
            vec![(0x3f8, true, b"A\0\0\0\0\0\0\0".to_vec())]
        );

        ring.first().store(ring.capacity + 5, Ordering::Relaxed);
        ring.last().store(3, Ordering::Relaxed);
        assert!(drained(&mut ring).is_empty());
    }
}
