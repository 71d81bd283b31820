//! The PL011 UART as a `core::fmt::Write`: polled, transmit only.
//!
//! Only the writer lives here; each program keeps its own base address,
//! locking and line format around it (el2's `el2: ` prefix and `log`
//! adapter, the test host's `say!`).

use core::fmt;

/// Data register (offset from the base).
const UARTDR: u64 = 0x000;
/// Flag register.
const UARTFR: u64 = 0x018;
/// UARTFR: transmit FIFO full.
const FR_TXFF: u32 = 1 << 5;

/// A PL011 at `base`; writing sends each byte, `\n` as `\r\n`, waiting while
/// the transmit FIFO is full.
#[derive(Debug)]
pub struct Pl011 {
    base: u64,
}

impl Pl011 {
    /// The PL011 whose registers start at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the address, in the current translation regime, of a
    /// PL011's register block, mapped as device memory for as long as the
    /// value is used, and no other writer may use that UART at the same time
    /// (except where garbled output is acceptable, as on a fatal path).
    pub const unsafe fn new(base: u64) -> Self {
        Self { base }
    }

    fn putc(&mut self, byte: u8) {
        let fr = (self.base + UARTFR) as *const u32;
        let dr = (self.base + UARTDR) as *mut u32;
        // SAFETY: by the contract of `new`, `base` is a mapped PL011 register
        // block that only this writer uses; UARTFR and UARTDR are aligned
        // 32-bit registers at these offsets, and volatile accesses of that
        // size are how the device is driven.
        unsafe {
            while fr.read_volatile() & FR_TXFF != 0 {}
            dr.write_volatile(u32::from(byte));
        }
    }
}

/// Calls `put` for every byte of `s`, `\n` as `\r\n`.
fn crlf(s: &str, mut put: impl FnMut(u8)) {
    for b in s.bytes() {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

impl fmt::Write for Pl011 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        crlf(s, |b| self.putc(b));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::crlf;

    fn sent(s: &str) -> ([u8; 16], usize) {
        let mut out = [0u8; 16];
        let mut n = 0;
        crlf(s, |b| {
            out[n] = b;
            n += 1;
        });
        (out, n)
    }

    #[test]
    fn newlines_go_out_as_crlf_and_other_bytes_unchanged() {
        let (out, n) = sent("a\nbc\n\n");
        assert_eq!(&out[..n], b"a\r\nbc\r\n\r\n");
        let (out, n) = sent("x\ry");
        assert_eq!(&out[..n], b"x\ry");
        assert_eq!(sent("").1, 0);
    }
}
