//! A line console on a PL011: one line at a time under a spin lock, with
//! an unlocked path for fatal errors. el2 (behind `log`, lines prefixed
//! `el2: `) and the test host (`say!`) each keep one in a static.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::pl011::Pl011;

/// The console: the UART's base and the line lock.
#[derive(Debug)]
pub struct Console {
    base: AtomicU64,
    locked: AtomicBool,
}

impl Console {
    /// A console on the PL011 at `base` until [`set_base`](Self::set_base).
    ///
    /// # Safety
    ///
    /// `base` must be a PL011 register block, mapped as device memory
    /// whenever the console prints, that nothing but this console writes to
    /// (as for [`Pl011::new`]).
    #[must_use]
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            base: AtomicU64::new(base),
            locked: AtomicBool::new(false),
        }
    }

    /// Switches to the PL011 at `base` (the one the device tree names).
    ///
    /// # Safety
    ///
    /// As for [`new`](Self::new), for `base`.
    pub unsafe fn set_base(&self, base: u64) {
        self.base.store(base, Ordering::Relaxed);
    }

    fn uart(&self) -> Pl011 {
        // SAFETY: the base is a mapped PL011 only this console writes to
        // (the contract of `new` and `set_base`); lines are serialised by
        // the lock, except on the unlocked fatal path, where interleaving
        // is accepted.
        unsafe { Pl011::new(self.base.load(Ordering::Relaxed)) }
    }

    /// Prints `prefix`, `args` and a newline, under the lock.
    pub fn print_line(&self, prefix: &str, args: fmt::Arguments<'_>) {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        self.print_line_unlocked(prefix, args);
        self.locked.store(false, Ordering::Release);
    }

    /// As [`print_line`](Self::print_line) without taking the lock: for
    /// fatal paths, where the CPU that failed may hold it.
    pub fn print_line_unlocked(&self, prefix: &str, args: fmt::Arguments<'_>) {
        let _ = writeln!(self.uart(), "{prefix}{args}");
    }
}
