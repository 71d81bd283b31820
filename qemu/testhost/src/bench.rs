//! `cargo xtask bench hvc`: counter ticks around round trips, on a
//! machine booted with `-icount shift=0 -smp 1` (xtask `guest.rs` explains
//! the tick/instruction relation). Prints `BENCH` lines the xtask parses.

use alloc::format;
use alloc::string::String;
use core::arch::asm;

use guest::Arg;
use hypercalls::{Hypercall, Prot};

use hypercalls::VcpuExit;

use crate::vmm::{self, End, Event, Flow, Frames, Vm, TEST_IPA};
use crate::{arch, say};

/// log2 of the iterations of each measurement.
const LOG2_N: u8 = 10;
const N: u64 = 1 << LOG2_N;
/// Iterations of the calibration loop (2 instructions each).
const CALIB_LOOPS: u64 = 1 << 20;

fn ticks() -> u64 {
    arch::timer().0
}

/// `CALIB_LOOPS` iterations of `subs; b.ne`: 2 * CALIB_LOOPS instructions.
fn calibrate() -> u64 {
    let t0 = ticks();
    // SAFETY: a register-only countdown loop.
    unsafe {
        asm!(
            "1:",
            "subs {n}, {n}, #1",
            "b.ne 1b",
            n = inout(reg) CALIB_LOOPS => _,
            options(nomem, nostack)
        )
    };
    ticks() - t0
}

/// Parses `guest: bench <what> <n> <ticks>`.
fn guest_row(vm: &Vm, what: &str) -> Result<(u64, u64), String> {
    let prefix = format!("guest: bench {what} ");
    let lines = vm.lines(0);
    let l = lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .ok_or_else(|| format!("no `{prefix}` line: {lines:?}"))?;
    let mut it = l.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(n)), Some(Ok(t))) => Ok((n, t)),
        _ => Err(format!("bad line `{l}`")),
    }
}

fn measure() -> Result<(), String> {
    let (_, freq) = arch::timer();
    say!("BENCH freq {freq}");
    let t = calibrate();
    say!("BENCH calib {} {t}", 2 * CALIB_LOOPS);

    // Host null call, for comparison.
    let t0 = ticks();
    for _ in 0..N {
        let _ = crate::hv::call(&Hypercall::Version);
    }
    say!(
        "BENCH row host null hypercall (HYP_VERSION)|{N}|{}",
        ticks() - t0
    );

    // The guest: null calls, then first touches of N fresh pages.
    let img = vmm::payload().ok_or("no payload")?;
    let mib = (N * 4096).div_ceil(1 << 20) + 1;
    let arg = Arg::bench(TEST_IPA >> 12, LOG2_N).encode();
    let vm = Vm::new(40, 1, mib, arg, img)?;
    // Map the image and the memcache's tables first, so that the fault
    // loop measures faults only (the guest's first pages fault in anyway).
    vm.topup(32)?;
    // HYP_VCPU_RUN answers at most 64 guest exits at EL2 before it returns
    // HYP_EXIT_INTERRUPTED: count those returns during the null loop.
    let (mut interrupted, mut in_null) = (0u64, None);
    let end = vm.serve(0, &mut |_, ev| {
        match ev {
            Event::Exit(VcpuExit::Interrupted) => interrupted += 1,
            Event::Line(l) if l.starts_with("guest: bench null ") => in_null = Some(interrupted),
            _ => {}
        }
        Flow::Default
    })?;
    if end != End::Done {
        return Err(format!("the bench guest ended with {end:?}"));
    }
    let in_null = in_null.ok_or("no null-loop line")?;
    say!(
        "BENCH info the {N} guest null calls returned to the host {in_null} times (HYP_EXIT_INTERRUPTED: HYP_VCPU_RUN answers at most 64 guest exits at EL2 per call), included in the row"
    );
    let (n, t) = guest_row(&vm, "null")?;
    say!("BENCH row guest null hypercall (HYP_GUEST_VERSION)|{n}|{t}");
    let (n, t) = guest_row(&vm, "fault")?;
    say!("BENCH row guest stage-2 fault, host HYP_SHARE, resume|{n}|{t}");

    // Host share + unshare of one page.
    let p = Frames::alloc(1, 1)?;
    let g = (TEST_IPA >> 12) + 2 * N;
    vm.share(p, g, Prot::RW)?;
    vm.unshare(p, g)?;
    let t0 = ticks();
    for _ in 0..N {
        vm.share(p, g, Prot::RW)?;
        vm.unshare(p, g)?;
    }
    say!(
        "BENCH row host HYP_SHARE + HYP_UNSHARE of one page|{N}|{}",
        ticks() - t0
    );
    vm.destroy()
}

/// Runs the benchmark as one case.
pub fn run(passed: &mut u32, failed: &mut u32) {
    say!("CASE bench hvc");
    match measure() {
        Ok(()) => {
            *passed += 1;
            say!("PASS bench hvc");
        }
        Err(e) => {
            *failed += 1;
            say!("FAIL bench hvc: {e}");
        }
    }
}
