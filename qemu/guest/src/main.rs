//! The guest payload: bare-metal EL1 code that a VM runs (see lib.rs for
//! what it does and its argument).

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod exits;
#[cfg(target_os = "none")]
mod hostile;

#[cfg(target_os = "none")]
mod run {
    use core::fmt::Write;
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use guest::{Arg, Console, Mode, Op, TEST_ALIGN};
    use hypercalls::GuestCall;

    use crate::arch;

    const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
    const PSCI_CPU_ON_64: u64 = 0xc400_0003;
    const PSCI_CPU_OFF: u64 = 0x8400_0002;
    /// Spins vCPU 0 waits for vCPU 1 at most.
    const WAIT_SPINS: u64 = 1 << 32;

    /// The argument, for the other vCPUs (written before CPU_ON).
    static ARG: AtomicU64 = AtomicU64::new(0);
    /// Set by vCPU 1 when its half is written and checked: 1 pass, 2 fail.
    static DONE: AtomicU64 = AtomicU64::new(0);

    unsafe extern "C" {
        static __image_end: u8;
    }

    /// The argument asked for the UART console and PSCI power-off (so
    /// that the payload runs under any hypervisor: `Arg::uart`).
    static UART: AtomicBool = AtomicBool::new(false);

    fn console() -> Console<impl FnMut(GuestCall)> {
        Console::new(|c| match c {
            GuestCall::ConsoleWrite(bytes) if UART.load(Ordering::Relaxed) => {
                bytes
                    .as_bytes()
                    .iter()
                    .for_each(|&b| arch::mmio_write8(guest::UART_BASE, b));
            }
            c => {
                arch::call(c);
            }
        })
    }

    fn shutdown() -> ! {
        loop {
            if UART.load(Ordering::Relaxed) {
                let mut r = [0u64; 8];
                r[0] = PSCI_SYSTEM_OFF;
                arch::hvc(&r);
            } else {
                arch::call(GuestCall::Shutdown);
            }
        }
    }

    /// The tested memory: N MiB from the first 2 MiB boundary after the image.
    fn memory(arg: &Arg) -> (u64, &'static mut [u64]) {
        let (base, len) = region(arg);
        // SAFETY: guest RAM above the image belongs to this program alone
        // (the VMM gives it at least N MiB there, identity-mapped by PT);
        // vCPU 0 takes it once; other vCPUs write only their own half
        // (`half`, before vCPU 0 takes this) or their own N MiB after it
        // (`touch_memory`).
        let words = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, len) };
        (base, words)
    }

    /// Base and length in words of the tested memory.
    fn region(arg: &Arg) -> (u64, usize) {
        let end = core::ptr::addr_of!(__image_end) as u64;
        (end.next_multiple_of(TEST_ALIGN), arg.bytes() / 8)
    }

    /// The touch mode's memory of vCPU `i` > 0: its own N MiB after vCPU
    /// 0's, so that no two vCPUs write the same words.
    fn touch_memory(arg: &Arg, i: u64) -> Option<&'static mut [u64]> {
        let (base, len) = region(arg);
        let i = usize::try_from(i).ok().filter(|&i| i < guest::MAX_VCPUS)?;
        let start = base + (i * len * 8) as u64;
        // SAFETY: as `memory`: vCPU i alone takes [start, start + N MiB),
        // once (the VMM gives the RAM, at most MAX_VCPUS * N MiB).
        Some(unsafe { core::slice::from_raw_parts_mut(start as *mut u64, len) })
    }

    /// vCPU `i`'s half (of two) of the tested memory.
    fn half(arg: &Arg, i: usize) -> (u64, &'static mut [u64]) {
        let (base, len) = region(arg);
        let n = len / 2;
        let start = base + (i * n * 8) as u64;
        // SAFETY: as `memory`: the halves are disjoint, each vCPU takes its
        // own once; vCPU 0 reads vCPU 1's half only after DONE (Acquire).
        let words = unsafe { core::slice::from_raw_parts_mut(start as *mut u64, n) };
        (start, words)
    }

    #[unsafe(no_mangle)]
    extern "C" fn guest_main(x0: u64) -> ! {
        let decoded = Arg::decode(x0);
        UART.store(decoded.is_ok_and(|a| a.uart), Ordering::SeqCst);
        let mut out = console();
        let arg = match decoded {
            Ok(a) => a,
            Err(e) => {
                let _ = writeln!(out, "guest: bad argument {x0:#x}: {e:?}");
                shutdown()
            }
        };
        // For vCPUs started later (SMP mode, or touch mode on more vCPUs).
        ARG.store(arg.encode(), Ordering::SeqCst);
        match arg.mode {
            Mode::Smp => smp_primary(&arg, &mut out),
            Mode::Poke => {
                poke(&arg, &mut out);
                shutdown()
            }
            Mode::Hostile => {
                let (pass, fail) = crate::hostile::run(&mut out);
                let _ = writeln!(out, "guest: hostile: {pass} passed, {fail} failed");
                shutdown()
            }
            Mode::Bench => {
                bench(&arg, &mut out);
                shutdown()
            }
            _ => {}
        }
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
                touch_loop(&arg, words, &mut out, 0);
            }
            Mode::Smp | Mode::Poke | Mode::Hostile | Mode::Bench => {}
            Mode::Regs => regs(&mut out),
            Mode::Probe => {
                if let Some(p) = guest::Probe::from_n(arg.mib) {
                    let _ = writeln!(out, "guest: probe {p:?}");
                    let v = arch::probe(p);
                    let _ = writeln!(out, "guest: probe {p:?} was allowed: {v:#x}");
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

    /// Mode 9: report the registers a fresh vCPU sees, write sentinels,
    /// exit to the host, then check that each kept its value.
    fn regs(out: &mut Console<impl FnMut(GuestCall)>) {
        let present = || guest::Reg::ALL.into_iter().filter(|r| arch::has(r.needs()));
        for r in present() {
            let _ = writeln!(out, "guest: reg {} {:#x}", r.name(), arch::reg_read(r));
        }
        for r in present() {
            arch::reg_write(r, r.sentinel());
        }
        // The console exits below give the host its turn with these
        // values in the vCPU.
        let _ = writeln!(out, "guest: regs written");
        let mut bad = 0;
        for r in present() {
            let v = arch::reg_read(r) & r.mask();
            if v != r.sentinel() {
                bad += 1;
                let _ = writeln!(out, "guest: FAIL {} became {v:#x}", r.name());
            }
        }
        let _ = writeln!(out, "guest: regs kept, {bad} changed");
    }

    /// Touches `words` pass after pass, reporting every 2^k passes, until
    /// the argument's number of reports (0: forever).
    fn touch_loop(
        arg: &Arg,
        words: &mut [u64],
        out: &mut Console<impl FnMut(GuestCall)>,
        vcpu: u64,
    ) {
        let every = 1u64 << arg.passes_log2;
        let mut passes = 0u64;
        let mut reports = 0u32;
        loop {
            guest::touch(words);
            passes += 1;
            if passes.is_multiple_of(every) {
                if vcpu == 0 {
                    let _ = writeln!(out, "guest: passes {passes}");
                } else {
                    let _ = writeln!(out, "guest: vcpu{vcpu} passes {passes}");
                }
                reports += 1;
                if arg.reports != 0 && reports >= u32::from(arg.reports) {
                    return;
                }
            }
        }
    }

    /// Mode 6: one operation on the page at `arg.gfn`, each step reported.
    fn poke(arg: &Arg, out: &mut Console<impl FnMut(GuestCall)>) {
        let base = arg.gfn << 12;
        match arg.op {
            Op::Read => {
                for _ in 0..arg.count.max(1) {
                    let v = arch::read_word(base);
                    let _ = writeln!(out, "guest: read {v:#x}");
                }
            }
            Op::Write => {
                for i in 0..512 {
                    let a = base + 8 * i;
                    arch::write_word(a, guest::pattern(a));
                }
                let _ = writeln!(out, "guest: wrote");
            }
            Op::ReadWrite => {
                let v = arch::read_word(base);
                let _ = writeln!(out, "guest: read {v:#x}");
                arch::write_word(base, guest::pattern(base));
                let _ = writeln!(out, "guest: wrote");
            }
            Op::Spin => {
                let limit = 1u64 << arg.count.min(40);
                let counter = base + 4096;
                let mut n = 0;
                while n < limit {
                    let _ = arch::read_word(base);
                    n += 1;
                    arch::write_word(counter, n);
                }
                let _ = writeln!(out, "guest: spin ended after {n}");
            }
        }
    }

    /// Mode 8: counter ticks around 2^k null calls and 2^k first touches.
    fn bench(arg: &Arg, out: &mut Console<impl FnMut(GuestCall)>) {
        let n = 1u64 << arg.count;
        let t0 = arch::counters().0;
        for _ in 0..n {
            arch::call(GuestCall::Version);
        }
        let t1 = arch::counters().0;
        let _ = writeln!(out, "guest: bench null {n} {}", t1 - t0);
        let base = arg.gfn << 12;
        let t0 = arch::counters().0;
        for i in 0..n {
            arch::write_word(base + i * 4096, i);
        }
        let t1 = arch::counters().0;
        let _ = writeln!(out, "guest: bench fault {n} {}", t1 - t0);
    }

    fn smp_primary(arg: &Arg, out: &mut Console<impl FnMut(GuestCall)>) -> ! {
        let mut r = [0u64; 8];
        r[0] = PSCI_CPU_ON_64;
        r[1] = 1; // MPIDR of vCPU 1
        r[2] = arch::secondary_entry_ipa();
        r[3] = 1; // its index
        let on = arch::hvc(&r)[0];
        let _ = writeln!(out, "guest: vcpu0: CPU_ON(1) = {}", on as i64);
        let (base0, mine) = half(arg, 0);
        guest::fill(mine, base0);
        let (_, bad0) = guest::verify(mine, base0);
        let mut spins = 0u64;
        let theirs = loop {
            match DONE.load(Ordering::Acquire) {
                0 if spins < WAIT_SPINS => spins += 1,
                d => break d,
            }
        };
        let (base, words) = memory(arg);
        let (sum, bad) = guest::verify(words, base);
        let ok = on == 0 && bad0.is_none() && theirs == 1 && bad.is_none();
        let _ = writeln!(
            out,
            "guest: vcpu0: vcpu1 said {theirs}, both halves checksum {sum:#018x} {}",
            if ok { "PASS" } else { "FAIL" }
        );
        if let Some(m) = bad {
            let _ = writeln!(out, "guest: first bad word at {:#x}", m.addr);
        }
        let mut r = [0u64; 8];
        r[0] = PSCI_SYSTEM_OFF;
        arch::hvc(&r);
        shutdown()
    }

    #[unsafe(no_mangle)]
    extern "C" fn guest_secondary(index: u64) -> ! {
        let mut out = console();
        let arg = Arg::decode(ARG.load(Ordering::SeqCst));
        let ok = match arg {
            Ok(arg) if arg.mode == Mode::Touch => {
                // Touch mode on another vCPU: its own memory and count.
                match touch_memory(&arg, index) {
                    Some(words) => {
                        touch_loop(&arg, words, &mut out, index);
                        true
                    }
                    None => false,
                }
            }
            Ok(arg) if index == 1 => {
                let (base, mine) = half(&arg, 1);
                guest::fill(mine, base);
                let (sum, bad) = guest::verify(mine, base);
                let _ = writeln!(
                    out,
                    "guest: vcpu1: mpidr {:#x}, half at {base:#x} checksum {sum:#018x} {}",
                    arch::mpidr(),
                    if bad.is_none() { "PASS" } else { "FAIL" }
                );
                bad.is_none()
            }
            _ => false,
        };
        DONE.store(if ok { 1 } else { 2 }, Ordering::Release);
        let mut r = [0u64; 8];
        r[0] = PSCI_CPU_OFF;
        loop {
            arch::hvc(&r);
        }
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
