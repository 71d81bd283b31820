//! The PL011 console behind `log`.
//!
//! The hypervisor shares the UART with the host: after the host boots it
//! prints only warnings and errors, each line prefixed with `el2: `.

use core::fmt;

use baremetal::console::Console;

use el2::layout::EARLY_UART;

// SAFETY: QEMU virt's PL011, identity-mapped as device memory in the EL2
// stage-1 table; only this console writes to it from EL2 (the host shares
// the UART, and its lines and ours may interleave).
static CONSOLE: Console = unsafe { Console::new(EARLY_UART) };

/// Switches the console to the UART the device tree names.
pub fn set_base(base: u64) {
    // SAFETY: the device tree's PL011 lies in the first GiB, which the EL2
    // stage-1 table maps as device memory; only this console writes to it
    // from EL2.
    unsafe { CONSOLE.set_base(base) }
}

/// Prints one line, prefixed with `el2: `.
pub fn print_line(args: fmt::Arguments<'_>) {
    CONSOLE.print_line("el2: ", args);
}

/// Prints one line without taking the lock: for the panic path, where the
/// lock may be held by the CPU that panicked.
pub fn print_line_unlocked(args: fmt::Arguments<'_>) {
    CONSOLE.print_line_unlocked("el2: ", args);
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            print_line(format_args!("{:<5} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
