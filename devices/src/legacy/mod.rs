//! Legacy PC devices on the PIO bus.

mod debug_port;
mod i8042;
mod power;
mod serial;

pub use debug_port::DebugPort;
pub use i8042::{COMMAND_PORT as I8042_COMMAND_PORT, DATA_PORT as I8042_DATA_PORT, I8042};
pub use power::{AcpiPowerRegisters, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_ENABLE};
pub use serial::{SerialPort, SerialWriter};
