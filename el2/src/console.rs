//! The PL011 console behind `log`.
//!
//! The hypervisor shares the UART with the host: after the host boots it
//! prints only warnings and errors, each line prefixed with `el2: `.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use baremetal::pl011::Pl011;
use spin::Mutex;

use el2::layout::EARLY_UART;

static BASE: AtomicU64 = AtomicU64::new(EARLY_UART);
static LOCK: Mutex<()> = Mutex::new(());

/// The console UART.
fn uart() -> Pl011 {
    // SAFETY: BASE is the PL011 base from the device tree (or QEMU virt's
    // fixed address before it is parsed), identity-mapped as device memory
    // in the EL2 stage-1 table; writers hold the console lock, except on the
    // panic path (`print_line_unlocked`), where interleaving is accepted.
    unsafe { Pl011::new(BASE.load(Ordering::Relaxed)) }
}

/// Switches the console to the UART the device tree names.
pub fn set_base(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

/// Prints one line, prefixed with `el2: `.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _guard = LOCK.lock();
    let _ = writeln!(uart(), "el2: {args}");
}

/// Prints one line without taking the lock: for the panic path, where the
/// lock may be held by the CPU that panicked.
pub fn print_line_unlocked(args: fmt::Arguments<'_>) {
    let _ = writeln!(uart(), "el2: {args}");
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
