//! The guest payload: bare-metal EL1 code that a VM runs (see lib.rs for
//! what it does and its argument).

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod exits;

#[cfg(target_os = "none")]
mod run {
    use core::fmt::Write;

    use guest::{Arg, Console, Mode, TEST_ALIGN};
    use hypercalls::GuestCall;

    use crate::arch;

    const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;

    unsafe extern "C" {
        static __image_end: u8;
    }

    fn console() -> Console<impl FnMut(GuestCall)> {
        Console::new(|c| {
            arch::call(c);
        })
    }

    fn shutdown() -> ! {
        loop {
            arch::call(GuestCall::Shutdown);
        }
    }

    /// The tested memory: N MiB from the first 2 MiB boundary after the image.
    fn memory(arg: &Arg) -> (u64, &'static mut [u64]) {
        let end = core::ptr::addr_of!(__image_end) as u64;
        let base = end.next_multiple_of(TEST_ALIGN);
        // SAFETY: guest RAM above the image belongs to this program alone
        // (the VMM gives it at least N MiB there, identity-mapped by PT);
        // nothing else refers to it, and this is taken once.
        let words = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, arg.bytes() / 8) };
        (base, words)
    }

    #[unsafe(no_mangle)]
    extern "C" fn guest_main(x0: u64) -> ! {
        let mut out = console();
        let arg = match Arg::decode(x0) {
            Ok(a) => a,
            Err(e) => {
                let _ = writeln!(out, "guest: bad argument {x0:#x}: {e:?}");
                shutdown()
            }
        };
        let (base, words) = memory(&arg);
        match arg.mode {
            Mode::Fill => {
                let _ = writeln!(out, "guest: fill {} MiB at {base:#x}", arg.mib);
                guest::fill(words, base);
                let (sum, bad) = guest::verify(words, base);
                match bad {
                    None => {
                        let _ = writeln!(out, "guest: checksum {sum:#018x} PASS");
                    }
                    Some(m) => {
                        let _ = writeln!(
                            out,
                            "guest: FAIL at {:#x}: {:#x} != {:#x}, checksum {sum:#018x}",
                            m.addr, m.got, m.expected
                        );
                    }
                }
            }
            Mode::Touch => {
                let _ = writeln!(out, "guest: touch {} MiB at {base:#x}", arg.mib);
                let every = 1u64 << arg.passes_log2;
                let mut passes = 0u64;
                let mut reports = 0u32;
                loop {
                    guest::touch(words);
                    passes += 1;
                    if passes.is_multiple_of(every) {
                        let _ = writeln!(out, "guest: passes {passes}");
                        reports += 1;
                        if arg.reports != 0 && reports >= u32::from(arg.reports) {
                            break;
                        }
                    }
                }
            }
            Mode::Exits => {
                let (pass, fail) = crate::exits::run(&mut out);
                let _ = writeln!(out, "guest: exits: {pass} passed, {fail} failed");
                // Ends with PSCI SYSTEM_OFF rather than the ABI's shutdown call.
                let mut r = [0u64; 8];
                r[0] = PSCI_SYSTEM_OFF;
                arch::hvc(&r);
            }
        }
        shutdown()
    }

    #[unsafe(no_mangle)]
    extern "C" fn guest_exception(slot: u64, esr: u64, elr: u64, far: u64) -> ! {
        let _ = writeln!(
            console(),
            "guest: exception slot {slot} ESR {esr:#x} ELR {elr:#x} FAR {far:#x}"
        );
        shutdown()
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
        let _ = writeln!(console(), "guest: panic");
        shutdown()
    }
}

/// On the build machine the binary does nothing; `cargo test -p guest` tests the library.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("guest is a bare-metal image: build it with --target aarch64-unknown-none-softfloat");
}
