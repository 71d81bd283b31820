//! The PL011 console behind `log`.
//!
//! The hypervisor shares the UART with the host: after the host boots it
//! prints only warnings and errors, each line prefixed with `el2: `.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use el2::layout::EARLY_UART;

/// PL011 registers: data, flags, flag "transmit FIFO full".
const UARTDR: u64 = 0x000;
const UARTFR: u64 = 0x018;
const FR_TXFF: u32 = 1 << 5;

static BASE: AtomicU64 = AtomicU64::new(EARLY_UART);
static LOCK: Mutex<()> = Mutex::new(());

struct Pl011(u64);

impl Pl011 {
    fn putc(&self, c: u8) {
        // SAFETY: `self.0` is the PL011 base from the device tree (or QEMU
        // virt's fixed address before it is parsed), identity-mapped as device
        // memory in the EL2 stage-1 table; UARTFR and UARTDR are 32-bit
        // registers at these offsets, and the console lock serialises access.
        unsafe {
            let fr = (self.0 + UARTFR) as *const u32;
            let dr = (self.0 + UARTDR) as *mut u32;
            while fr.read_volatile() & FR_TXFF != 0 {}
            dr.write_volatile(u32::from(c));
        }
    }
}

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

/// Switches the console to the UART the device tree names.
pub fn set_base(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

/// Prints one line, prefixed with `el2: `.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _guard = LOCK.lock();
    let mut uart = Pl011(BASE.load(Ordering::Relaxed));
    let _ = writeln!(uart, "el2: {args}");
}

/// Prints one line without taking the lock: for the panic path, where the
/// lock may be held by the CPU that panicked.
pub fn print_line_unlocked(args: fmt::Arguments<'_>) {
    let mut uart = Pl011(BASE.load(Ordering::Relaxed));
    let _ = writeln!(uart, "el2: {args}");
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
