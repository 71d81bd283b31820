//! Mode 7: malformed guest calls. Each must come back with the error the
//! ABI gives (`docs/ABI.md` §2.1, §2.2, §4) or, where the call is well
//! formed but absurd, exit to the VMM and come back with 0; none may hurt
//! the hypervisor or the host (the test host checks that side).

use core::fmt::Write;

use guest::Console;
use hypercalls::{GuestCall, GuestFunction, HostFunction, Regs};

use crate::arch;

const NOT_SUPPORTED: i64 = -1;
const E2BIG: i64 = -7;
const EINVAL: i64 = -22;
const ERANGE: i64 = -34;
const PSCI_CPU_ON_64: u64 = 0xc400_0003;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;

fn id(f: GuestFunction) -> u64 {
    u64::from(f.id())
}

fn regs(v: &[u64]) -> Regs {
    let mut r = [0u64; 8];
    for (d, s) in r.iter_mut().zip(v) {
        *d = *s;
    }
    r
}

/// Runs the calls, printing one line each; returns (passed, failed).
pub fn run(out: &mut Console<impl FnMut(GuestCall)>) -> (u32, u32) {
    let console = id(GuestFunction::ConsoleWrite);
    let share = id(GuestFunction::ShareRequest);
    let unshare = id(GuestFunction::UnshareRequest);
    let top = 1u64 << 40;
    // (what, registers, acceptable x0 values, conduit is SMC)
    let cases: [(&str, Regs, &[i64], bool); 22] = [
        ("console len 0", regs(&[console, 0, 0, 0]), &[EINVAL], false),
        (
            "console len 17",
            regs(&[console, 17, u64::MAX, u64::MAX]),
            &[EINVAL],
            false,
        ),
        (
            "console len 2^63",
            regs(&[console, 1 << 63, 0x41, 0]),
            &[EINVAL],
            false,
        ),
        (
            "console len -1",
            regs(&[console, u64::MAX, 0x41, 0]),
            &[EINVAL],
            false,
        ),
        (
            "console bytes past len",
            regs(&[console, 2, u64::MAX, 0]),
            &[EINVAL],
            false,
        ),
        (
            "console x4 set",
            regs(&[console, 1, 0x41, 0, 1]),
            &[EINVAL],
            false,
        ),
        (
            "console x7 set",
            regs(&[console, 1, 0x41, 0, 0, 0, 0, 1]),
            &[EINVAL],
            false,
        ),
        (
            "share-request gfn 2^40",
            regs(&[share, top, 1]),
            &[EINVAL],
            false,
        ),
        (
            "share-request gfn 2^64-1",
            regs(&[share, u64::MAX, 1]),
            &[EINVAL],
            false,
        ),
        (
            "share-request 0 pages",
            regs(&[share, 0x40000, 0]),
            &[EINVAL],
            false,
        ),
        (
            "share-request 513 pages",
            regs(&[share, 0x40000, 513]),
            &[E2BIG],
            false,
        ),
        (
            "share-request 2^63 pages",
            regs(&[share, 0x40000, 1 << 63]),
            &[E2BIG, EINVAL],
            false,
        ),
        // Well formed, absurd: the VMM sees the request, cannot honour it.
        (
            "share-request last gfn",
            regs(&[share, top - 1, 1]),
            &[0, ERANGE],
            false,
        ),
        (
            "share-request past 2^40",
            regs(&[share, top - 1, 512]),
            &[0, ERANGE],
            false,
        ),
        (
            "unshare-request of nothing",
            regs(&[unshare, 0x12345, 512]),
            &[0, ERANGE],
            false,
        ),
        (
            "unknown guest id 0x1ff",
            regs(&[0xc600_01ff]),
            &[NOT_SUPPORTED],
            false,
        ),
        (
            "guest id with bits 63:32",
            regs(&[id(GuestFunction::Version) | 1 << 32]),
            &[NOT_SUPPORTED],
            false,
        ),
        (
            "host VM_CREATE from a guest",
            regs(&[u64::from(HostFunction::VmCreate.id()), 40, 1, 0x80000]),
            &[NOT_SUPPORTED],
            false,
        ),
        (
            "host TEARDOWN_START of VM 1",
            regs(&[u64::from(HostFunction::TeardownStart.id()), 0x1_0000]),
            &[NOT_SUPPORTED],
            false,
        ),
        (
            "guest call over SMC",
            regs(&[id(GuestFunction::Version)]),
            &[NOT_SUPPORTED, 0],
            true,
        ),
        (
            "PSCI CPU_ON of vCPU 63",
            regs(&[PSCI_CPU_ON_64, 63, 0x4008_0000, 0]),
            &[-2, -3, -1],
            false,
        ),
        (
            // No vCPU has Aff3 = 0xff: OFF (as KVM) or INVALID_PARAMETERS.
            "PSCI AFFINITY_INFO of an absent MPIDR",
            regs(&[PSCI_AFFINITY_INFO_64, 0xff_0000_0000, 0]),
            &[1, -2],
            false,
        ),
    ];
    let mut pass = 0;
    let mut fail = 0;
    // HVC #1: a guest call with a non-zero immediate (§4).
    let got = arch::hvc1(&GuestCall::Version.encode())[0] as i64;
    if got == NOT_SUPPORTED {
        pass += 1;
        let _ = writeln!(out, "guest: PASS HVC #1");
    } else {
        fail += 1;
        let _ = writeln!(out, "guest: FAIL HVC #1: x0 = {got}");
    }
    for (what, r, want, smc) in cases {
        let got = if smc { arch::smc(&r) } else { arch::hvc(&r) };
        let x0 = got[0] as i64;
        if want.contains(&x0) {
            pass += 1;
            let _ = writeln!(out, "guest: PASS {what}");
        } else {
            fail += 1;
            let _ = writeln!(out, "guest: FAIL {what}: x0 = {x0}");
        }
    }
    (pass, fail)
}
