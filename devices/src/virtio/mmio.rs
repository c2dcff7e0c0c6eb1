//! The virtio-mmio transport (virtio 1.x, register layout version 2): the register file, feature
//! negotiation, queue set-up and the device status state machine.
//!
//! Every status write is checked against the table of valid transitions in
//! [`MmioTransport::write_status`]; invalid ones are refused (and logged once), never panicked on.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{
    ActivateError, InterruptKind, IrqTrigger, LogOnce, TRANSPORT_FEATURES, VIRTIO_F_VERSION_1,
    VirtioDevice,
};
use crate::bus::BusDevice;
use crate::lock;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x); version 1 is the legacy layout.
const VERSION: u32 = 2;
/// "NVMM" in little endian.
const VENDOR_ID: u32 = 0x4d4d_564e;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Kinds of driver mistakes, each logged once per device.
mod mistake {
    pub const BAD_ACCESS_SIZE: u32 = 0;
    pub const INVALID_STATUS: u32 = 1;
    pub const QUEUE_WRITE_OUT_OF_PHASE: u32 = 2;
    pub const FEATURE_WRITE_OUT_OF_PHASE: u32 = 3;
    pub const BAD_QUEUE_INDEX: u32 = 4;
    pub const UNKNOWN_REGISTER: u32 = 5;
    pub const NO_VERSION_1: u32 = 6;
    pub const ACTIVATE_FAILED: u32 = 7;
    pub const BAD_QUEUE_VALUE: u32 = 8;
}

/// `addr` with the half that queue register `offset` holds (the `_HIGH` registers sit 4 bytes
/// after their `_LOW` ones) replaced by `value`.
fn with_half(addr: u64, offset: u32, value: u32) -> GuestAddress {
    let value = u64::from(value);
    GuestAddress(match offset {
        reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
        | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
        | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => (addr & 0xffff_ffff) | (value << 32),
        _ => (addr & !0xffff_ffff) | value,
    })
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the device asked for is not a power of two up to 32768.
    #[error("invalid virtqueue size {0}")]
    QueueSize(u16, #[source] virtio_queue::Error),
}

/// One virtio device behind a 4 KiB MMIO window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<IrqTrigger>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    mistakes: LogOnce,
    /// Where the bus put the register window (learnt from the first access), and the device
    /// type: what the log names the device by.
    base: u64,
    device_type: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, raising interrupts through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<Self, MmioError> {
        let (queues, device_type) = {
            let device = lock(&device);
            let queues = device
                .queue_max_sizes()
                .iter()
                .map(|&size| Queue::new(size).map_err(|e| MmioError::QueueSize(size, e)))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, device.device_type())
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            mistakes: LogOnce::default(),
            base: 0,
            device_type,
        })
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features both sides agreed on.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn mistake(&mut self, kind: u32, what: std::fmt::Arguments<'_>) {
        if self.mistakes.first(kind) {
            let device = match self.device_type {
                VIRTIO_ID_NET => "net",
                VIRTIO_ID_BLOCK => "block",
                VIRTIO_ID_CONSOLE => "console",
                _ => "device",
            };
            log::warn!(
                "virtio-mmio {:#x} ({device}): {what} (further such guest errors are not logged)",
                self.base
            );
        }
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).device_features() | TRANSPORT_FEATURES
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| q.max_size().into())
            }
            reg::VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            other => {
                self.mistake(
                    mistake::UNKNOWN_REGISTER,
                    format_args!("read of register {other:#x}"),
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            other => self.mistake(
                mistake::UNKNOWN_REGISTER,
                format_args!("write of {value:#x} to register {other:#x}"),
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let status = self.status;
        if status != ACK | DRIVER {
            self.mistake(
                mistake::FEATURE_WRITE_OUT_OF_PHASE,
                format_args!("driver features written in status {status:#x}"),
            );
            return;
        }
        let (shift, mask) = match self.driver_features_select {
            0 => (0, 0x0000_0000_ffff_ffff),
            1 => (32, 0xffff_ffff_0000_0000),
            _ => return,
        };
        let page = (u64::from(value) << shift) & self.offered_features();
        self.acked_features = (self.acked_features & !mask) | page;
    }

    /// Queue registers may only change after FEATURES_OK and before DRIVER_OK.
    fn write_queue_register(&mut self, offset: u32, value: u32) {
        let status = self.status;
        if status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            self.mistake(
                mistake::QUEUE_WRITE_OUT_OF_PHASE,
                format_args!("queue register {offset:#x} written in status {status:#x}"),
            );
            return;
        }
        let index = self.queue_select;
        let Some(queue) = self.selected_queue() else {
            self.mistake(
                mistake::BAD_QUEUE_INDEX,
                format_args!("queue {index} does not exist"),
            );
            return;
        };
        // A size that is not a power of two up to the maximum, or a misaligned ring, is refused
        // and the register keeps its value (virtio-queue's own setters would log every refusal).
        let result = match offset {
            reg::VIRTIO_MMIO_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            reg::VIRTIO_MMIO_QUEUE_READY => {
                queue.set_ready(value == 1);
                Ok(())
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let addr = with_half(queue.desc_table(), offset, value);
                queue.try_set_desc_table_address(addr)
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let addr = with_half(queue.avail_ring(), offset, value);
                queue.try_set_avail_ring_address(addr)
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let addr = with_half(queue.used_ring(), offset, value);
                queue.try_set_used_ring_address(addr)
            }
            _ => Ok(()),
        };
        if let Err(err) = result {
            self.mistake(
                mistake::BAD_QUEUE_VALUE,
                format_args!("queue {index} register {offset:#x} refused {value:#x}: {err}"),
            );
        }
    }

    /// A notification that did not go through an ioeventfd (none registered, e.g. in tests).
    fn notify(&mut self, queue: u32) {
        let device = lock(&self.device);
        match device.queue_events().get(queue as usize) {
            Some(event) => {
                if let Err(err) = event.write(1) {
                    log::warn!("virtio-mmio: cannot signal queue {queue}: {err}");
                }
            }
            None => {
                drop(device);
                self.mistake(
                    mistake::BAD_QUEUE_INDEX,
                    format_args!("notify for queue {queue}"),
                );
            }
        }
    }

    /// The device status state machine (virtio 1.x, 3.1.1). Valid writes:
    ///
    /// | from                              | to                                   |
    /// |-----------------------------------|--------------------------------------|
    /// | anything                          | 0 (reset)                            |
    /// | anything                          | the same value, or it plus FAILED    |
    /// | 0                                 | ACK                                  |
    /// | ACK                               | ACK, DRIVER                          |
    /// | ACK, DRIVER                       | ACK, DRIVER, FEATURES_OK (if VERSION_1 was accepted) |
    /// | ACK, DRIVER, FEATURES_OK          | ACK, DRIVER, FEATURES_OK, DRIVER_OK (activates the device) |
    pub fn write_status(&mut self, new: u32) {
        let current = self.status;
        if new == 0 {
            self.reset();
            return;
        }
        if new == current {
            return;
        }
        if new == current | FAILED {
            self.status = new;
            return;
        }
        match (current, new) {
            (0, ACK) | (ACK, 0x3) => self.status = new,
            (0x3, 0xb) => {
                if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                    // A legacy driver: refuse FEATURES_OK; the driver reads it back and gives up.
                    self.mistake(
                        mistake::NO_VERSION_1,
                        format_args!("driver did not accept VIRTIO_F_VERSION_1"),
                    );
                } else {
                    self.status = new;
                }
            }
            (0xb, 0xf) => self.activate(),
            _ => self.mistake(
                mistake::INVALID_STATUS,
                format_args!("invalid status change {current:#x} -> {new:#x}"),
            ),
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        // The device gets its own copies; the transport keeps the registers' view.
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(index))
            })
            .collect::<Result<Vec<_>, _>>();
        let result = queues.and_then(|queues| {
            lock(&self.device).activate(
                self.mem.clone(),
                self.interrupt.clone(),
                self.acked_features,
                queues,
            )
        });
        match result {
            Ok(()) => self.status |= DRIVER_OK,
            Err(err) => {
                self.mistake(
                    mistake::ACTIVATE_FAILED,
                    format_args!("activation failed: {err}"),
                );
                self.status |= NEEDS_RESET;
                self.interrupt.trigger(InterruptKind::Config);
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt.reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.base = base;
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            self.mistake(
                mistake::BAD_ACCESS_SIZE,
                format_args!("{}-byte register read", data.len()),
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.base = base;
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.mistake(
                mistake::BAD_ACCESS_SIZE,
                format_args!("{}-byte register write", data.len()),
            );
            return;
        };
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::test_log::{assert_logged_once, logged};

    struct Dummy {
        events: Vec<EventFd>,
        active: bool,
        activations: usize,
        features: u64,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            1 << 5
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            _interrupt: Arc<IrqTrigger>,
            features: u64,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if let Some(i) = queues.iter().position(|q| !q.is_valid(&mem)) {
                return Err(ActivateError::InvalidQueue(i));
            }
            self.features = features;
            self.active = true;
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.active = false;
        }
        fn is_activated(&self) -> bool {
            self.active
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>, GuestMemoryMmap, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dummy = Arc::new(Mutex::new(Dummy {
            events: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            active: false,
            activations: 0,
            features: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(IrqTrigger::new(irq.try_clone().unwrap()));
        let t = MmioTransport::new(dummy.clone(), mem.clone(), interrupt).unwrap();
        (t, dummy, mem, irq)
    }

    fn r(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(0, u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn w(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(0, u64::from(offset), &value.to_le_bytes());
    }

    /// Drives the transport like a Linux driver up to (not including) DRIVER_OK.
    fn negotiate(t: &mut MmioTransport, mem: &GuestMemoryMmap) {
        w(t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(
            t,
            reg::VIRTIO_MMIO_DRIVER_FEATURES,
            (1 << 5) | (1 << 29) | (1 << 7),
        );
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        for (index, base) in [(0u32, 0x1_0000u64), (1, 0x2_0000)] {
            let queue = MockSplitQueue::create(mem, GuestAddress(base), 16);
            w(t, reg::VIRTIO_MMIO_QUEUE_SEL, index);
            w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
            w(
                t,
                reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
                queue.desc_table_addr().0 as u32,
            );
            w(
                t,
                reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                queue.avail_addr().0 as u32,
            );
            w(
                t,
                reg::VIRTIO_MMIO_QUEUE_USED_LOW,
                queue.used_addr().0 as u32,
            );
            w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        }
    }

    #[test]
    fn identifies_itself() {
        let (mut t, ..) = transport();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn features_are_paged_and_include_the_transport_ones() {
        let (mut t, ..) = transport();
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
        assert_eq!(low, (1 << 5) | (1 << 28) | (1 << 29));
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_negotiation_activates_with_the_common_features() {
        let (mut t, dummy, mem, _irq) = transport();
        negotiate(&mut t, &mem);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(t.status(), 0xf);
        let d = dummy.lock().unwrap();
        assert!(d.active);
        // Bit 7 was not offered, so it is not acked.
        assert_eq!(d.features, VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 29));
    }

    #[test]
    fn device_status_invalid_transitions_are_refused() {
        let (mut t, dummy, mem, _irq) = transport();
        for bad in [DRIVER, FEATURES_OK, DRIVER_OK, ACK | DRIVER_OK, 0xff] {
            w(&mut t, reg::VIRTIO_MMIO_STATUS, bad);
            assert_eq!(t.status(), 0, "{bad:#x} from 0");
        }
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | FEATURES_OK);
        assert_eq!(t.status(), ACK);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | DRIVER_OK);
        assert_eq!(t.status(), ACK | DRIVER);
        assert!(!dummy.lock().unwrap().active);
        // FAILED may be set from anywhere; reset goes back to 0.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FAILED);
        assert_eq!(t.status(), ACK | DRIVER | FAILED);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
        negotiate(&mut t, &mem);
        assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let (mut t, ..) = transport();
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER);
        w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(t.status(), ACK | DRIVER, "legacy drivers are refused");
    }

    #[test]
    fn queue_registers_are_only_writable_between_features_ok_and_driver_ok() {
        let (mut t, _, mem, _irq) = transport();
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        negotiate(&mut t, &mem);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0xf);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY),
            1,
            "locked after DRIVER_OK"
        );
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn guest_errors_are_logged_once_per_device_and_name_it() {
        // With several devices, the hostile test guest's log said "virtio-mmio: invalid status
        // change" once per device, with nothing to tell which device it was about.
        let (mut first, ..) = transport();
        let (mut second, ..) = transport();
        let lines = logged(|| {
            for _ in 0..3 {
                first.write(0xd000_0000, 0x70, &4u32.to_le_bytes());
                second.write(0xd000_1000, 0x70, &4u32.to_le_bytes());
            }
        });
        assert_logged_once(&lines);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains("virtio-mmio 0xd0000000 (block): invalid status change"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("virtio-mmio 0xd0001000 (block)"),
            "{lines:#?}"
        );
    }

    #[test]
    fn invalid_queue_values_are_refused_and_logged_once() {
        // Found by the hostile test guest: virtio-queue's setters logged an error for every queue
        // size that is not a power of two and every misaligned ring address, so a driver writing
        // them in a loop filled nvmm's log. A size over 16 bits was cut to its low 16 bits.
        let (mut t, _, mem, _irq) = transport();
        negotiate(&mut t, &mem);
        let before = t.queues[0].state();
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        let lines = logged(|| {
            for _ in 0..3 {
                w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 3);
                w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0008);
                w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0001);
                w(&mut t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2_0001);
                w(&mut t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3_0002);
            }
        });
        assert_logged_once(&lines);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(t.queues[0].state(), before, "every value refused");
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 1);
        assert_eq!(t.queues[0].size(), 8);
        assert_eq!(t.queues[0].desc_table(), 1 << 32 | before.desc_table);
    }

    #[test]
    fn activation_with_a_bad_queue_sets_needs_reset() {
        let (mut t, dummy, mem, irq) = transport();
        negotiate(&mut t, &mem);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 3); // not a power of two: refused
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_f000); // outside guest memory
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(t.status(), 0xb | NEEDS_RESET);
        assert!(!dummy.lock().unwrap().active);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 1);
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let (mut t, dummy, mem, _irq) = transport();
        negotiate(&mut t, &mem);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0xf);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.acked_features(), 0);
        assert!(!dummy.lock().unwrap().active);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        negotiate(&mut t, &mem);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(dummy.lock().unwrap().activations, 2);
    }

    #[test]
    fn interrupt_ack_and_config_space() {
        let (mut t, ..) = transport();
        t.interrupt.trigger(InterruptKind::Queue);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        let mut byte = [0u8; 1];
        t.read(0, 0x102, &mut byte);
        assert_eq!(byte, [3]);
        let mut wide = [0u8; 8];
        t.read(0, 0x104, &mut wide);
        assert_eq!(wide, [5, 6, 7, 8, 0, 0, 0, 0]);
    }

    #[test]
    fn notify_without_ioeventfd_signals_the_queue_event() {
        let (mut t, dummy, ..) = transport();
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(dummy.lock().unwrap().events[1].read().unwrap(), 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 9);
    }

    #[test]
    fn hostile_register_traffic_never_panics() {
        let (mut t, _, mem, _irq) = transport();
        let mut state = 0x9e37_79b9u32;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let offset = u64::from(state % 0x140) & !0x3;
            match state % 5 {
                0 => {
                    let mut data = [0u8; 4];
                    t.read(0, offset, &mut data);
                }
                1 => t.write(0, offset, &[state as u8]),
                2 => {
                    let mut data = [0u8; 2];
                    t.read(0, offset, &mut data);
                }
                _ => t.write(0, offset, &state.to_le_bytes()),
            }
            if state % 97 == 0 {
                negotiate(&mut t, &mem);
                w(&mut t, reg::VIRTIO_MMIO_STATUS, 0xf);
            }
        }
    }
}
