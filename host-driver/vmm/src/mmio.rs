//! The guest payload's MMIO test device (`qemu/guest` `MMIO_TEST_BASE`):
//! a read of `base + off` returns `mmio_test_value(off)` until something is
//! written there; a write stores the value (truncated to the access size)
//! for later reads of the same offset.

use std::collections::BTreeMap;

use crate::layout::{MMIO_BASE, MMIO_SIZE};

/// Offsets written so far, at most this many (a guest cannot grow the VMM).
const MAX_WRITTEN: usize = 512;

/// The device's state.
#[derive(Debug, Default)]
pub struct TestDevice {
    written: BTreeMap<u64, u64>,
}

/// An access the device does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// Outside the device's window.
    #[error("MMIO access at {0:#x} is outside every emulated device")]
    NoDevice(u64),
    /// Not 1, 2, 4 or 8 bytes.
    #[error("MMIO access of {0} bytes")]
    Size(u32),
}

/// Keeps the low `len` bytes.
#[must_use]
pub fn truncate(v: u64, len: u32) -> u64 {
    if len >= 8 {
        v
    } else {
        v & ((1u64 << (len * 8)) - 1)
    }
}

impl TestDevice {
    fn offset(addr: u64, len: u32) -> Result<u64, MmioError> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(MmioError::Size(len));
        }
        match addr.checked_sub(MMIO_BASE) {
            Some(off) if off < MMIO_SIZE => Ok(off),
            _ => Err(MmioError::NoDevice(addr)),
        }
    }

    /// A read of `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: u32) -> Result<u64, MmioError> {
        let off = Self::offset(addr, len)?;
        let v = self
            .written
            .get(&off)
            .copied()
            .unwrap_or_else(|| guest::mmio_test_value(off));
        Ok(truncate(v, len))
    }

    /// A write of `len` bytes of `data` at `addr`.
    pub fn write(&mut self, addr: u64, len: u32, data: u64) -> Result<(), MmioError> {
        let off = Self::offset(addr, len)?;
        if self.written.len() < MAX_WRITTEN || self.written.contains_key(&off) {
            self.written.insert(off, truncate(data, len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pattern_until_written() {
        let mut d = TestDevice::default();
        assert_eq!(d.read(MMIO_BASE, 8), Ok(guest::mmio_test_value(0)));
        assert_eq!(
            d.read(MMIO_BASE + 0x10, 4),
            Ok(guest::mmio_test_value(0x10) & 0xffff_ffff)
        );
        d.write(MMIO_BASE + 0x10, 8, 0xdead_beef_cafe_f00d).unwrap();
        assert_eq!(d.read(MMIO_BASE + 0x10, 8), Ok(0xdead_beef_cafe_f00d));
        assert_eq!(d.read(MMIO_BASE + 0x10, 1), Ok(0x0d));
        d.write(MMIO_BASE + 0x18, 2, 0x1234_5678).unwrap();
        assert_eq!(d.read(MMIO_BASE + 0x18, 8), Ok(0x5678));
        // Other offsets keep the pattern.
        assert_eq!(d.read(MMIO_BASE + 8, 8), Ok(guest::mmio_test_value(8)));
    }

    #[test]
    fn bad_accesses_are_errors() {
        let mut d = TestDevice::default();
        assert_eq!(
            d.read(MMIO_BASE - 1, 8),
            Err(MmioError::NoDevice(MMIO_BASE - 1))
        );
        assert_eq!(
            d.read(MMIO_BASE + MMIO_SIZE, 1),
            Err(MmioError::NoDevice(MMIO_BASE + MMIO_SIZE))
        );
        assert_eq!(d.read(MMIO_BASE, 3), Err(MmioError::Size(3)));
        assert_eq!(d.write(0, 8, 1), Err(MmioError::NoDevice(0)));
        assert_eq!(d.write(u64::MAX, 8, 1), Err(MmioError::NoDevice(u64::MAX)));
    }

    #[test]
    fn the_state_is_bounded() {
        let mut d = TestDevice::default();
        for off in 0..MMIO_SIZE {
            d.write(MMIO_BASE + off, 1, 0).unwrap();
        }
        assert_eq!(d.written.len(), MAX_WRITTEN);
    }
}
