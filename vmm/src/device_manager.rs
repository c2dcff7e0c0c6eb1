//! Creates the devices, puts them on the buses, and wires their interrupts (irqfds) and
//! requests (eventfds) up at attach time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use nvmm_devices::EventFdTrigger;
use nvmm_devices::bus::{Bus, BusError};
use nvmm_devices::legacy::{AcpiPowerRegisters, DebugPort, I8042, SerialPort, SerialWriter};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{irqs, ports};

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// eventfd creation failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
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
}

/// The buses and the host side of the devices' events.
#[derive(Debug)]
pub struct Devices {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// What the event loop watches.
    pub events: DeviceEvents,
}

/// Host-side handles the event loop needs.
#[derive(Debug)]
pub struct DeviceEvents {
    /// COM1, shared with the console input.
    pub serial: Arc<Mutex<SerialPort>>,
    /// Signalled when the guest drains the serial receive FIFO.
    pub serial_fifo_room: EventFd,
    /// Signalled when the guest powers off (ACPI S5).
    pub poweroff: EventFd,
    /// Signalled when the guest resets (i8042 or ACPI reset register).
    pub reset: EventFd,
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
    pio.insert(i8042, ports::I8042_COMMAND, 1)?;

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
        },
    })
}
