//! The PL011 console: one line at a time under a lock.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use baremetal::pl011::Pl011;
use boot_contract::EARLY_UART;
use spin::Mutex;

static BASE: AtomicU64 = AtomicU64::new(EARLY_UART);
static LOCK: Mutex<()> = Mutex::new(());

/// The console UART.
fn uart() -> Pl011 {
    // SAFETY: BASE is the PL011 (from the device tree or QEMU virt's fixed
    // address), identity-mapped as device memory by BOOT_PT; the console lock
    // serialises writers (or we are on the fatal path, `print_unlocked`).
    unsafe { Pl011::new(BASE.load(Ordering::Relaxed)) }
}

/// Uses the UART at `base`.
pub fn set_base(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

/// Prints one line.
pub fn print(args: fmt::Arguments<'_>) {
    let _g = LOCK.lock();
    let _ = writeln!(uart(), "{args}");
}

/// Prints one line without the lock (fatal paths).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    let _ = writeln!(uart(), "{args}");
}

/// `say!("...")` prints one console line.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::console::print(format_args!($($t)*)) };
}
