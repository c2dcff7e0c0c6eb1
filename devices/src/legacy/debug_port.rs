//! The POST/debug port at 0x80: guests write progress codes there; nvmm logs them with a
//! timestamp, and the benchmarks use the first write as the "guest is running" marker.

use std::time::Instant;

use crate::bus::BusDevice;

/// Logs each byte written to port 0x80 at info level (`nvmm -v`).
#[derive(Debug)]
pub struct DebugPort {
    process_start: Instant,
    last: u8,
}

impl DebugPort {
    /// `process_start` is when nvmm started; log lines carry microseconds since then.
    pub fn new(process_start: Instant) -> Self {
        Self {
            process_start,
            last: 0,
        }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.last);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.last = value;
            log::info!(
                "debug port 0x80: {value:#04x} at {} us",
                self.process_start.elapsed().as_micros()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_the_last_code() {
        let mut port = DebugPort::new(Instant::now());
        port.write(0x80, 0, &[0x42]);
        let mut data = [0u8; 2];
        port.read(0x80, 0, &mut data);
        assert_eq!(data, [0x42, 0x42]);
        port.write(0x80, 0, &[]);
    }
}
