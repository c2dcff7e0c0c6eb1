//! Creates the devices, puts them on the buses, and wires their interrupts (irqfds) and
//! requests (eventfds) up at attach time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use nvmm_devices::EventFdTrigger;
use nvmm_devices::bus::{Bus, BusError};
use nvmm_devices::legacy::{AcpiPowerRegisters, DebugPort, I8042, SerialPort, SerialWriter};
use nvmm_devices::virtio::block::{Block, BlockError, DiskConfig};
use nvmm_devices::virtio::console::Console;
use nvmm_devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioError, MmioTransport};
use nvmm_devices::virtio::net::Net;
use nvmm_devices::virtio::net::tap::Tap;
use nvmm_devices::virtio::{IrqTrigger, VirtioDevice};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::NetConfig;
use crate::layout::{self, irqs, ports};

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// eventfd creation failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The timer that replays coalesced serial output could not be made.
    #[error("cannot create the serial output timer")]
    SerialTimer(#[source] std::io::Error),
    /// irqfd registration failed.
    #[error("cannot register irqfd for IRQ {irq}")]
    RegisterIrqFd {
        /// The interrupt line.
        irq: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Bus conflict.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// The virtio-mmio transport could not be created.
    #[error("cannot create a virtio-mmio transport")]
    Transport(#[from] MmioError),
    /// ioeventfd registration failed.
    #[error("cannot register the notification eventfd of queue {queue} at {addr:#x}")]
    RegisterIoEvent {
        /// Queue index.
        queue: usize,
        /// MMIO address.
        addr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A tap could not be opened.
    #[error("cannot open tap device {tap}")]
    OpenTap {
        /// Tap name.
        tap: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No MMIO window or interrupt line left.
    #[error("too many virtio devices (disks and network interfaces): at most {} are supported", irqs::VIRTIO.len())]
    TooManyVirtioDevices,
}

/// Where a virtio-mmio device lives, for the command line and the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Start of its 4 KiB MMIO window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
}

/// The MMIO window and interrupt line of the `index`th virtio device, if there is one left.
fn virtio_slot(index: usize) -> Option<VirtioSlot> {
    Some(VirtioSlot {
        base: layout::VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
        size: MMIO_WINDOW_SIZE,
        irq: *irqs::VIRTIO.get(index)?,
    })
}

/// The first `count` slots, for tests of the command line and DSDT.
#[cfg(test)]
pub(crate) fn test_slots(count: usize) -> Vec<VirtioSlot> {
    (0..count).filter_map(virtio_slot).collect()
}

/// An event-loop subscriber a device needs.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The buses and the host side of the devices' events.
pub struct Devices {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// What the event loop watches.
    pub events: DeviceEvents,
    /// virtio-mmio devices, in attach order.
    pub virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("virtio", &self.virtio)
            .finish_non_exhaustive()
    }
}

/// Host-side handles the event loop needs.
pub struct DeviceEvents {
    /// COM1, shared with the console input.
    pub serial: Arc<Mutex<SerialPort>>,
    /// Signalled when the guest drains the serial receive FIFO.
    pub serial_fifo_room: EventFd,
    /// Signalled when the guest powers off (ACPI S5).
    pub poweroff: EventFd,
    /// Signalled when the guest resets (i8042 or ACPI reset register).
    pub reset: EventFd,
    /// Devices that process their own events (virtio queues).
    pub subscribers: Vec<Subscriber>,
    /// The virtio console and its "input room" event, if attached.
    pub virtio_console: Option<(Arc<Mutex<Console>>, EventFd)>,
    /// The keyboard controller, where a clean shutdown is requested (Ctrl-Alt-Del).
    pub i8042: Arc<Mutex<I8042>>,
}

impl std::fmt::Debug for DeviceEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEvents")
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

fn clone(fd: &EventFd) -> Result<EventFd, DeviceError> {
    fd.try_clone().map_err(DeviceError::EventFd)
}

fn irq_line(vm: &VmFd, irq: u32) -> Result<EventFdTrigger, DeviceError> {
    let fd = eventfd()?;
    vm.register_irqfd(&fd, irq)
        .map_err(|source| DeviceError::RegisterIrqFd { irq, source })?;
    Ok(EventFdTrigger::new(fd))
}

/// COM1, the i8042, the debug port and the ACPI power registers on the PIO bus.
pub fn attach_legacy_devices(
    vm: &VmFd,
    serial_out: SerialWriter,
    process_start: Instant,
) -> Result<Devices, DeviceError> {
    let mut pio = Bus::new("pio");
    let poweroff = eventfd()?;
    let reset = eventfd()?;
    let serial_fifo_room = eventfd()?;

    let serial = Arc::new(Mutex::new(SerialPort::new(
        irq_line(vm, irqs::COM1)?,
        clone(&serial_fifo_room)?,
        serial_out,
    )));
    pio.insert(serial.clone(), ports::COM1, ports::COM1_LEN)?;

    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger::new(clone(&reset)?),
        irq_line(vm, irqs::I8042)?,
    )));
    pio.insert(i8042.clone(), ports::I8042_DATA, 1)?;
    pio.insert(i8042.clone(), ports::I8042_COMMAND, 1)?;

    pio.insert(
        Arc::new(Mutex::new(DebugPort::new(process_start))),
        ports::DEBUG,
        1,
    )?;
    let power = AcpiPowerRegisters::new(
        EventFdTrigger::new(clone(&poweroff)?),
        EventFdTrigger::new(clone(&reset)?),
    );
    pio.insert(
        Arc::new(Mutex::new(power)),
        ports::ACPI_POWER,
        AcpiPowerRegisters::LEN,
    )?;

    Ok(Devices {
        pio,
        mmio: Bus::new("mmio"),
        events: DeviceEvents {
            serial,
            serial_fifo_room,
            poweroff,
            reset,
            subscribers: Vec::new(),
            virtio_console: None,
            i8042,
        },
        virtio: Vec::new(),
    })
}

/// Opens every disk and attaches it as a virtio-blk device, in order.
pub fn attach_disks(
    vm: &VmFd,
    devices: &mut Devices,
    mem: &GuestMemoryMmap,
    disks: &[DiskConfig],
) -> Result<(), DeviceError> {
    for disk in disks {
        let block = Arc::new(Mutex::new(Block::new(disk)?));
        attach_virtio(vm, devices, mem, block)?;
    }
    Ok(())
}

/// Opens every tap and attaches it as a virtio-net device, in order.
pub fn attach_nets(
    vm: &VmFd,
    devices: &mut Devices,
    mem: &GuestMemoryMmap,
    nets: &[NetConfig],
) -> Result<(), DeviceError> {
    for net in nets {
        let open_err = |source| DeviceError::OpenTap {
            tap: net.tap.clone(),
            source,
        };
        let tap = Tap::open(&net.tap).map_err(open_err)?;
        let device = Net::new(tap, net.mac).map_err(DeviceError::EventFd)?;
        attach_virtio(vm, devices, mem, Arc::new(Mutex::new(device)))?;
    }
    Ok(())
}

/// Attaches a virtio console of `cols` x `rows` writing to `output`.
pub fn attach_console(
    vm: &VmFd,
    devices: &mut Devices,
    mem: &GuestMemoryMmap,
    output: SerialWriter,
    (cols, rows): (u16, u16),
) -> Result<(), DeviceError> {
    let room = eventfd()?;
    let console = Console::new(output, clone(&room)?, cols, rows).map_err(DeviceError::EventFd)?;
    let console = Arc::new(Mutex::new(console));
    attach_virtio(vm, devices, mem, console.clone())?;
    devices.events.virtio_console = Some((console, room));
    Ok(())
}

/// Puts `device` behind a virtio-mmio transport in the next free window: one ioeventfd per
/// queue (QueueNotify with the queue index as datamatch) and one irqfd, registered here; the
/// device is also an event-loop subscriber for those queue events.
fn attach_virtio<D>(
    vm: &VmFd,
    devices: &mut Devices,
    mem: &GuestMemoryMmap,
    device: Arc<Mutex<D>>,
) -> Result<(), DeviceError>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let slot = virtio_slot(devices.virtio.len()).ok_or(DeviceError::TooManyVirtioDevices)?;
    let irq = slot.irq;
    let irq_fd = eventfd()?;
    vm.register_irqfd(&irq_fd, irq)
        .map_err(|source| DeviceError::RegisterIrqFd { irq, source })?;
    let notify = slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY);
    {
        let locked = nvmm_devices::lock(&device);
        for (queue, event) in locked.queue_events().iter().enumerate() {
            vm.register_ioevent(event, &IoEventAddress::Mmio(notify), queue as u32)
                .map_err(|source| DeviceError::RegisterIoEvent {
                    queue,
                    addr: notify,
                    source,
                })?;
        }
    }
    let transport = MmioTransport::new(
        device.clone(),
        mem.clone(),
        Arc::new(IrqTrigger::new(irq_fd)),
    )?;
    devices
        .mmio
        .insert(Arc::new(Mutex::new(transport)), slot.base, slot.size)?;
    devices.events.subscribers.push(device);
    devices.virtio.push(slot);
    Ok(())
}
