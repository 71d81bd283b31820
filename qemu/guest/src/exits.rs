//! Mode 3: make each kind of exit once and check what comes back.

use core::fmt::Write;

use guest::{mmio_test_value, Console, MMIO_TEST_BASE};
use hypercalls::{GuestCall, GuestFunction, Regs};

use crate::arch;

const PSCI_VERSION: u64 = 0x8400_0000;
const PSCI_FEATURES: u64 = 0x8400_000a;
const PSCI_CPU_ON_64: u64 = 0xc400_0003;
/// PSCI NOT_SUPPORTED and the ABI's NOT_SUPPORTED are both -1.
const NOT_SUPPORTED: u64 = u64::MAX;

fn regs(x0: u64, x1: u64) -> Regs {
    let mut r = [0u64; 8];
    r[0] = x0;
    r[1] = x1;
    r
}

/// Runs the checks, printing one line each; returns (passed, failed).
pub fn run(out: &mut Console<impl FnMut(GuestCall)>) -> (u32, u32) {
    let mut pass = 0;
    let mut fail = 0;
    let mut check = |out: &mut Console<_>, name: &str, ok: bool, got: u64| {
        if ok {
            pass += 1;
            let _ = writeln!(out, "guest: PASS {name}");
        } else {
            fail += 1;
            let _ = writeln!(out, "guest: FAIL {name} (got {got:#x})");
        }
    };

    // FP/SIMD and EL1 registers set now must survive every exit below.
    let v0 = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
    let v31 = [0xdead_beef_0000_0001, 0x0000_0002_cafe_f00d];
    let fpcr = 0x00c0_0000; // RMode = round towards zero
    arch::fp_set(v0, v31, fpcr);
    let ids = [0x7e1d_0001, 0x7e1d_0002, 0x7e1d_0003];
    arch::ids_set(ids);

    let r = arch::call(GuestCall::Version);
    check(
        out,
        "guest call VERSION answered at EL2",
        r[0] == 0
            && r[1] == u64::from(hypercalls::ABI_VERSION_MAJOR)
            && r[2] == u64::from(hypercalls::ABI_VERSION_MINOR),
        r[0],
    );
    let r = arch::hvc(&regs(PSCI_VERSION, 0));
    // PSCI 1.1 (docs/ABI.md §4.6).
    check(out, "PSCI_VERSION over HVC", r[0] == 0x1_0001, r[0]);
    let r = arch::smc(&regs(PSCI_VERSION, 0));
    check(out, "PSCI_VERSION over SMC", r[0] == 0x1_0001, r[0]);
    let r = arch::hvc(&regs(PSCI_FEATURES, PSCI_CPU_ON_64));
    check(out, "PSCI_FEATURES(CPU_ON) supported", r[0] == 0, r[0]);
    let r = arch::smc(&regs(0x8200_0000, 0));
    check(
        out,
        "non-PSCI SMC not supported",
        r[0] == NOT_SUPPORTED,
        r[0],
    );
    let host_version = u64::from(hypercalls::HostFunction::Version.id());
    let r = arch::hvc(&regs(host_version, 0));
    check(
        out,
        "host call id from a guest not supported",
        r[0] == NOT_SUPPORTED,
        r[0],
    );
    let mut bad = GuestCall::Shutdown.encode();
    bad[1] = 1; // reserved register not zero
    let r = arch::hvc(&bad);
    check(
        out,
        "guest call with reserved bits: EINVAL",
        r[0] as i64 == -22,
        r[0],
    );
    let _ = GuestFunction::Shutdown; // (decoding is tested in the hypercalls crate)

    let v = arch::mmio_read32(MMIO_TEST_BASE + 4);
    check(
        out,
        "MMIO 32-bit read emulated",
        u64::from(v) == mmio_test_value(4) & 0xffff_ffff,
        u64::from(v),
    );
    arch::mmio_write64(MMIO_TEST_BASE + 8, 0xabcd_0123_4567_89ef);
    let v = arch::mmio_read64(MMIO_TEST_BASE + 8);
    check(
        out,
        "MMIO 64-bit write then read",
        v == 0xabcd_0123_4567_89ef,
        v,
    );

    arch::wfi();
    check(out, "WFI exits and resumes", true, 0);

    let (vct, pct, frq) = arch::counters();
    check(
        out,
        "virtual counter offset (CNTVOFF) applied",
        vct < pct && vct < 60 * frq,
        vct,
    );
    let mpidr = arch::mpidr();
    check(
        out,
        "MPIDR from VMPIDR_EL2",
        mpidr & 0xff_00ff_ffff == 0,
        mpidr,
    );

    let (g0, g31, gfpcr) = arch::fp_get();
    check(out, "V0 kept across exits", g0 == v0, g0[0]);
    check(out, "V31 kept across exits", g31 == v31, g31[1]);
    check(out, "FPCR kept across exits", gfpcr == fpcr, gfpcr);
    let g = arch::ids_get();
    check(out, "TPIDR_EL1/EL0, CONTEXTIDR kept", g == ids, g[0]);
    (pass, fail)
}
