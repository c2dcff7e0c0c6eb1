//! Virtio devices: the device-side [`VirtioDevice`] trait, the interrupt a device raises, and
//! the virtio-mmio transport ([`mmio::MmioTransport`]) that owns the register file.
//!
//! A device never sees MMIO: the transport negotiates features, collects the queue layout and
//! calls [`VirtioDevice::activate`] when the driver sets DRIVER_OK. Notifications reach the
//! device through one eventfd per queue (a KVM ioeventfd in production), and the device answers
//! only through its [`IrqTrigger`].

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_log;
#[cfg(test)]
mod test_ring;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: virtio 1.x (modern) semantics.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`: notification suppression with used/avail event indexes.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Features every nvmm device offers: virtio-queue implements them for any device.
pub const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver did not set up a queue the device needs.
    #[error("queue {0} is not ready or not valid in guest memory")]
    InvalidQueue(usize),
    /// Wrong number of queues.
    #[error("device needs {expected} queues, driver configured {got}")]
    QueueCount {
        /// Needed.
        expected: usize,
        /// Given.
        got: usize,
    },
}

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used ring was updated.
    Queue,
    /// The device configuration changed.
    Config,
}

/// A device's interrupt line: the InterruptStatus bits the driver reads, and an eventfd (a KVM
/// irqfd in production) that injects the interrupt.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl IrqTrigger {
    /// `irq` is signalled for every interrupt.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// Sets the status bit for `kind` and injects the interrupt.
    pub fn trigger(&self, kind: InterruptKind) {
        let bit = match kind {
            InterruptKind::Queue => virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG
            }
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(err) = self.irq.write(1) {
            log::warn!("cannot inject a virtio interrupt: {err}");
        }
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// ConfigGeneration: changes whenever the device raises a config interrupt.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// The eventfd behind the interrupt (registered as an irqfd).
    pub fn event_fd(&self) -> &EventFd {
        &self.irq
    }
}

/// A virtio device's own logic, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block, 1 = net, 3 = console).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits offered (the transport adds [`TRANSPORT_FEATURES`]).
    fn device_features(&self) -> u64;
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features` and the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial, inactive state (queues dropped).
    fn reset(&mut self);
    /// Whether [`Self::activate`] succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
}

/// The driver's queues as exactly `N` queues that are all valid in guest memory: the check
/// every device makes on activation.
pub fn checked_queues<const N: usize>(
    queues: Vec<Queue>,
    mem: &GuestMemoryMmap,
) -> Result<[Queue; N], ActivateError> {
    if let Some(index) = queues.iter().position(|q| !usable(q, mem)) {
        return Err(ActivateError::InvalidQueue(index));
    }
    queues
        .try_into()
        .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
            expected: N,
            got: q.len(),
        })
}

/// Whether the driver made `queue` ready and its three rings lie in guest memory.
///
/// This is virtio-queue's `is_valid` without its error log: a driver may set DRIVER_OK with a
/// bad ring after every reset, as often as it likes, and the transport logs a failed activation
/// once per device.
fn usable(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let size = u64::from(queue.size());
    // Descriptors of 16 bytes; flags, index, entries of 2 (available) or 8 (used) bytes, event.
    let fits = |addr: u64, len: u64| mem.check_range(GuestAddress(addr), len as usize);
    queue.ready()
        && fits(queue.desc_table(), 16 * size)
        && fits(queue.avail_ring(), 6 + 2 * size)
        && fits(queue.used_ring(), 6 + 8 * size)
}

/// Re-enables notifications on `queue` and says whether the driver made more chains available
/// meanwhile, so the caller should drain the queue again.
///
/// virtio-queue's `enable_notification` answers that by comparing the available index with the
/// next one to pop. On a ring the driver broke (the available index more than a queue size
/// ahead, or the available ring at address 0) `pop_descriptor_chain` refuses to pop anything
/// while that comparison still says "more", and a drain loop would spin forever on the VMM's
/// event-loop thread. Such a ring is an error here instead.
pub fn more_available(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.enable_notification(mem)? {
        return Ok(false);
    }
    queue.iter(mem).map(|_| true)
}

/// The next chain the driver made available, if any.
///
/// virtio-queue's `pop_descriptor_chain` logs an error on every call that finds the ring broken
/// (the available index more than a queue size ahead), so a driver that broke its ring and kept
/// notifying would fill nvmm's log. Here a broken ring is an error, for the device to log once.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    use virtio_queue::QueueOwnedT;
    Ok(queue.iter(mem)?.next())
}

/// Hands up to `max` chains the driver made available to `take`, with one read of the
/// available index for all of them; returns how many. Errors as [`pop_chain`].
pub fn pop_chains<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    max: usize,
    mut take: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>),
) -> Result<usize, virtio_queue::Error> {
    use virtio_queue::QueueOwnedT;
    let mut popped = 0;
    for chain in queue.iter(mem)?.take(max) {
        take(chain);
        popped += 1;
    }
    Ok(popped)
}

/// Gives chain `head` back to the driver, `len` bytes written into it.
///
/// virtio-queue's `add_used` logs an error on every head index outside the queue, and only a
/// driver that put such an index in its available ring makes a device return one. Here that is
/// an error, for the device to log once.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::QueueT;
    if head >= queue.size() {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    queue.add_used(mem, head, len)
}

/// Logs each kind of guest error once per device, so a hostile guest cannot flood the log.
#[derive(Debug, Default)]
pub struct LogOnce {
    seen: u64,
}

impl LogOnce {
    /// True the first time `kind` (0..64) is seen.
    pub fn first(&mut self, kind: u32) -> bool {
        let bit = 1u64 << (kind % 64);
        let first = self.seen & bit == 0;
        self.seen |= bit;
        first
    }
}

/// Copies `value`'s little-endian bytes at `offset` of a config space read into `data`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_and_generation() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger = IrqTrigger::new(irq.try_clone().unwrap());
        trigger.trigger(InterruptKind::Queue);
        assert_eq!(trigger.status(), 1);
        trigger.trigger(InterruptKind::Config);
        assert_eq!(trigger.status(), 3);
        assert_eq!(trigger.config_generation(), 1);
        assert_eq!(irq.read().unwrap(), 2);
        trigger.ack(1);
        assert_eq!(trigger.status(), 2);
    }

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn chains_are_popped_at_most_max_at_a_time_from_one_look_at_the_ring() {
        use vm_memory::GuestAddress;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let (mut queue, mut ring) = test_ring::TestRing::new(&mem, 0, 16);
        for i in 0..5 {
            ring.add_chain(&mem, &[(0x8000 + 0x100 * i, 16, false)]);
        }
        let mut heads = Vec::new();
        let pop = |queue: &mut Queue, heads: &mut Vec<u16>, max| {
            pop_chains(queue, &mem, max, |chain| heads.push(chain.head_index())).unwrap()
        };
        assert_eq!(pop(&mut queue, &mut heads, 3), 3);
        // A chain made available after the look at the ring waits for the next one.
        let mut late_heads = Vec::new();
        let late = pop_chains(&mut queue, &mem, 8, |chain| {
            late_heads.push(chain.head_index());
            if late_heads.len() == 1 {
                ring.add_chain(&mem, &[(0x9000, 16, false)]);
            }
        })
        .unwrap();
        assert_eq!((late, late_heads), (2, vec![3, 4]));
        assert_eq!(pop(&mut queue, &mut heads, 8), 1);
        assert_eq!(pop(&mut queue, &mut heads, 8), 0);
        assert_eq!(heads, [0, 1, 2, 5]);
    }

    #[test]
    fn unusable_queues_are_refused_without_a_log_line_each() {
        // Found by the hostile test guest: this used virtio-queue's is_valid, which logs an error
        // for every activation with a queue not ready or a ring outside guest memory, and a
        // driver can activate like that after every reset.
        use virtio_queue::QueueT;
        use vm_memory::GuestAddress;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let queue = |ready, desc| {
            let mut queue = Queue::new(16).unwrap();
            queue.set_ready(ready);
            queue
                .try_set_desc_table_address(GuestAddress(desc))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(0x1000))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(0x2000))
                .unwrap();
            queue
        };
        let lines = test_log::logged(|| {
            for _ in 0..3 {
                for bad in [
                    queue(false, 0),
                    queue(true, 0xff80),
                    queue(true, u64::MAX - 15),
                ] {
                    let refused = checked_queues::<1>(vec![bad], &mem).err();
                    assert_eq!(refused, Some(ActivateError::InvalidQueue(0)));
                }
            }
        });
        assert_eq!(lines, Vec::<String>::new());
        assert!(checked_queues::<1>(vec![queue(true, 0)], &mem).is_ok());
    }

    #[test]
    fn log_once_per_kind() {
        let mut log = LogOnce::default();
        assert!(log.first(3));
        assert!(!log.first(3));
        assert!(log.first(4));
    }
}
