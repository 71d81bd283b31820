//! The PL011 console: one line at a time under a lock.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

/// QEMU virt's PL011, until the device tree says otherwise.
const EARLY_UART: u64 = 0x0900_0000;
const UARTDR: u64 = 0x000;
const UARTFR: u64 = 0x018;
const FR_TXFF: u32 = 1 << 5;

static BASE: AtomicU64 = AtomicU64::new(EARLY_UART);
static LOCK: Mutex<()> = Mutex::new(());

struct Pl011(u64);

impl Write for Pl011 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.putc(b'\r');
            }
            self.putc(b);
        }
        Ok(())
    }
}

impl Pl011 {
    fn putc(&self, c: u8) {
        // SAFETY: `self.0` is the PL011 (from the device tree or QEMU virt's
        // fixed address), identity-mapped as device memory by BOOT_PT; the
        // console lock serialises writers (or we are on the fatal path).
        unsafe {
            let fr = (self.0 + UARTFR) as *const u32;
            let dr = (self.0 + UARTDR) as *mut u32;
            while fr.read_volatile() & FR_TXFF != 0 {}
            dr.write_volatile(u32::from(c));
        }
    }
}

/// Uses the UART at `base`.
pub fn set_base(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

/// Prints one line.
pub fn print(args: fmt::Arguments<'_>) {
    let _g = LOCK.lock();
    let _ = writeln!(Pl011(BASE.load(Ordering::Relaxed)), "{args}");
}

/// Prints one line without the lock (fatal paths).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    let _ = writeln!(Pl011(BASE.load(Ordering::Relaxed)), "{args}");
}

/// `say!("...")` prints one console line.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::console::print(format_args!($($t)*)) };
}
