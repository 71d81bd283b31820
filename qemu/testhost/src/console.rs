//! The PL011 console: one line at a time under a lock.

use core::fmt;

use baremetal::console::Console;
use boot_contract::EARLY_UART;

// SAFETY: QEMU virt's PL011, identity-mapped as device memory by BOOT_PT;
// only this console writes to it.
static CONSOLE: Console = unsafe { Console::new(EARLY_UART) };

/// Uses the UART at `base`.
pub fn set_base(base: u64) {
    // SAFETY: the device tree's PL011 lies in the first GiB, which BOOT_PT
    // maps as device memory; only this console writes to it.
    unsafe { CONSOLE.set_base(base) }
}

/// Prints one line.
pub fn print(args: fmt::Arguments<'_>) {
    CONSOLE.print_line("", args);
}

/// Prints one line without the lock (fatal paths).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    CONSOLE.print_line_unlocked("", args);
}

/// `say!("...")` prints one console line.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::console::print(format_args!($($t)*)) };
}
