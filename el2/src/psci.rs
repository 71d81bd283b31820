//! PSCI, the one home of its facts in el2. Function ids and return codes
//! are the `smccc` crate's (`smccc::psci`), re-exported here; this module
//! adds what the hypervisor decides about them:
//!
//! - **The host's relay** ([`route`]): which host SMCs go to the firmware,
//!   rewritten or not. The host's PSCI conduit is SMC (the `/psci` node says
//!   `method = "smc"`). HCR_EL2.TSC traps every host SMC to EL2. Calls that
//!   carry an entry point (CPU_ON, CPU_SUSPEND) are rewritten so that the
//!   CPU comes back through the hypervisor first; the rest pass through
//!   unchanged. Anything that is not PSCI gets SMCCC `NOT_SUPPORTED` from us
//!   and never reaches the firmware.
//! - **The guests' PSCI** ([`GuestPsci`], [`decode_guest`]): PSCI 1.1 as the
//!   hypervisor implements it for a VM's vCPUs (docs/ABI.md §4.6).

pub use smccc::psci::error::{ALREADY_ON, INVALID_PARAMETERS, NOT_SUPPORTED, ON_PENDING};
pub use smccc::psci::{
    PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64, PSCI_CPU_DEFAULT_SUSPEND_32,
    PSCI_CPU_DEFAULT_SUSPEND_64, PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64, PSCI_CPU_SUSPEND_32,
    PSCI_CPU_SUSPEND_64, PSCI_FEATURES, PSCI_MIGRATE_32, PSCI_MIGRATE_64, PSCI_MIGRATE_INFO_TYPE,
    PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET, PSCI_SYSTEM_SUSPEND_32, PSCI_SYSTEM_SUSPEND_64,
    PSCI_VERSION,
};

/// A PSCI return code as the x0 value its caller reads (sign-extended).
#[must_use]
pub const fn ret(code: i32) -> u64 {
    code as i64 as u64
}

/// The PSCI version guests see: 1.1.
pub const GUEST_VERSION: u64 = 0x1_0001;

/// AFFINITY_INFO: the target is on.
pub const AFFINITY_ON: u64 = 0;
/// AFFINITY_INFO: the target is off.
pub const AFFINITY_OFF: u64 = 1;
/// AFFINITY_INFO: the target is being turned on.
pub const AFFINITY_ON_PENDING: u64 = 2;

/// What to do with one trapped SMC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pass x0..x3 to the firmware unchanged and return its x0..x3.
    Forward,
    /// CPU_ON: start `target` at the hypervisor's secondary entry, and
    /// enter the host at `entry` with `context` from there.
    CpuOn {
        /// MPIDR of the CPU to start.
        target: u64,
        /// Host entry point.
        entry: u64,
        /// Host context id (x0 at entry).
        context: u64,
    },
    /// CPU_SUSPEND: a power-down state resumes at `entry` with `context`.
    CpuSuspend {
        /// PSCI power state.
        power_state: u64,
        /// Host entry point.
        entry: u64,
        /// Host context id.
        context: u64,
    },
    /// CPU_OFF for the calling CPU.
    CpuOff,
    /// Answer `NOT_SUPPORTED` without calling the firmware.
    NotSupported,
}

/// Whether `fid` lies in the PSCI function range (SMC32 or SMC64).
#[must_use]
pub fn is_psci(fid: u32) -> bool {
    matches!(fid & 0xffff_ffe0, 0x8400_0000 | 0xc400_0000)
}

/// Calls whose entry point we would have to rewrite but do not support.
fn unsupported(fid: u32) -> bool {
    matches!(
        fid,
        PSCI_SYSTEM_SUSPEND_32
            | PSCI_SYSTEM_SUSPEND_64
            | PSCI_CPU_DEFAULT_SUSPEND_32
            | PSCI_CPU_DEFAULT_SUSPEND_64
            | PSCI_MIGRATE_32
            | PSCI_MIGRATE_64
    )
}

/// Routes one trapped SMC from its argument registers.
#[must_use]
pub fn route(x: &[u64; 4]) -> Action {
    // SMCCC: the function id is W0; the upper half of X0 is ignored.
    let fid = x[0] as u32;
    if !is_psci(fid) || unsupported(fid) {
        return Action::NotSupported;
    }
    let narrow = |v: u64| {
        if fid & (1 << 30) == 0 {
            v & 0xffff_ffff
        } else {
            v
        }
    };
    match fid {
        PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => Action::CpuOn {
            target: narrow(x[1]),
            entry: narrow(x[2]),
            context: narrow(x[3]),
        },
        PSCI_CPU_SUSPEND_32 | PSCI_CPU_SUSPEND_64 => Action::CpuSuspend {
            power_state: narrow(x[1]),
            entry: narrow(x[2]),
            context: narrow(x[3]),
        },
        PSCI_CPU_OFF => Action::CpuOff,
        PSCI_FEATURES => {
            let queried = x[1] as u32;
            if is_psci(queried) && !unsupported(queried) {
                Action::Forward
            } else {
                Action::NotSupported
            }
        }
        _ => Action::Forward,
    }
}

/// The guest's PSCI calls (PSCI 1.1, SMC64/SMC32 ids as the guest passed them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPsci {
    /// PSCI_VERSION.
    Version,
    /// PSCI_FEATURES of a function id.
    Features(u32),
    /// CPU_ON: start the vCPU with MPIDR `target` at `entry` with x0 = `context`.
    CpuOn {
        /// Target MPIDR.
        target: u64,
        /// Entry point (guest IPA or VA as the guest's MMU dictates: MMU is off at entry).
        entry: u64,
        /// Value for the new vCPU's x0.
        context: u64,
    },
    /// CPU_OFF.
    CpuOff,
    /// AFFINITY_INFO of an MPIDR.
    AffinityInfo(u64),
    /// SYSTEM_OFF.
    SystemOff,
    /// SYSTEM_RESET.
    SystemReset,
    /// Any other PSCI function: answered `NOT_SUPPORTED`.
    Other(u32),
}

/// The PSCI function id in a guest's `x0`, if it is one (a PSCI id with
/// the upper half of x0 zero).
#[must_use]
pub fn guest_fid(x0: u64) -> Option<u32> {
    u32::try_from(x0).ok().filter(|&fid| is_psci(fid))
}

/// Decodes the guest's PSCI call `fid` with arguments x1.. in `regs`
/// (SMC32 forms take the low halves).
#[must_use]
pub fn decode_guest(fid: u32, regs: &[u64; 8]) -> GuestPsci {
    let arg32 = |v: u64| v & 0xffff_ffff;
    match fid {
        PSCI_VERSION => GuestPsci::Version,
        PSCI_FEATURES => GuestPsci::Features(arg32(regs[1]) as u32),
        PSCI_CPU_OFF => GuestPsci::CpuOff,
        PSCI_CPU_ON_64 => GuestPsci::CpuOn {
            target: regs[1],
            entry: regs[2],
            context: regs[3],
        },
        PSCI_CPU_ON_32 => GuestPsci::CpuOn {
            target: arg32(regs[1]),
            entry: arg32(regs[2]),
            context: arg32(regs[3]),
        },
        PSCI_AFFINITY_INFO_64 => GuestPsci::AffinityInfo(regs[1]),
        PSCI_AFFINITY_INFO_32 => GuestPsci::AffinityInfo(arg32(regs[1])),
        PSCI_SYSTEM_OFF => GuestPsci::SystemOff,
        PSCI_SYSTEM_RESET => GuestPsci::SystemReset,
        other => GuestPsci::Other(other),
    }
}

/// Whether guests have PSCI function `fid` (PSCI_FEATURES answers 0 for
/// these, `NOT_SUPPORTED` for the rest).
#[must_use]
pub fn guest_supports(fid: u32) -> bool {
    matches!(
        fid,
        PSCI_VERSION
            | PSCI_FEATURES
            | PSCI_CPU_ON_32
            | PSCI_CPU_ON_64
            | PSCI_CPU_OFF
            | PSCI_AFFINITY_INFO_32
            | PSCI_AFFINITY_INFO_64
            | PSCI_SYSTEM_OFF
            | PSCI_SYSTEM_RESET
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_on_is_rewritten() {
        assert_eq!(
            route(&[u64::from(PSCI_CPU_ON_64), 0x1, 0x4020_0000, 7]),
            Action::CpuOn {
                target: 1,
                entry: 0x4020_0000,
                context: 7
            }
        );
        assert_eq!(
            route(&[
                u64::from(PSCI_CPU_ON_32),
                0xffff_ffff_0000_0002,
                0xffff_ffff_4020_0000,
                1
            ]),
            Action::CpuOn {
                target: 2,
                entry: 0x4020_0000,
                context: 1
            }
        );
    }

    #[test]
    fn plain_calls_forward() {
        for fid in [
            PSCI_VERSION,
            PSCI_AFFINITY_INFO_64,
            PSCI_SYSTEM_OFF,
            PSCI_SYSTEM_RESET,
            PSCI_MIGRATE_INFO_TYPE,
        ] {
            assert_eq!(
                route(&[u64::from(fid), 0, 0, 0]),
                Action::Forward,
                "{fid:#x}"
            );
        }
        assert_eq!(route(&[u64::from(PSCI_CPU_OFF), 0, 0, 0]), Action::CpuOff);
    }

    #[test]
    fn upper_half_of_x0_is_ignored() {
        assert_eq!(
            route(&[0xdead_beef_0000_0000 | u64::from(PSCI_VERSION), 0, 0, 0]),
            Action::Forward
        );
    }

    #[test]
    fn guest_ids_need_a_clean_upper_half() {
        assert_eq!(guest_fid(u64::from(PSCI_CPU_ON_64)), Some(PSCI_CPU_ON_64));
        assert_eq!(guest_fid(1 << 32 | u64::from(PSCI_VERSION)), None);
        assert_eq!(guest_fid(0xc600_0000), None);
        assert_eq!(ret(NOT_SUPPORTED), u64::MAX);
        assert!(guest_supports(PSCI_CPU_ON_32) && !guest_supports(PSCI_CPU_SUSPEND_64));
    }

    #[test]
    fn non_psci_and_unsupported_are_refused() {
        // SMCCC_VERSION, a vendor hypervisor call, garbage.
        for x0 in [0x8000_0000, 0xc600_0000, 0xffff_ffff, 0] {
            assert_eq!(route(&[x0, 0, 0, 0]), Action::NotSupported, "{x0:#x}");
        }
        assert_eq!(
            route(&[u64::from(PSCI_SYSTEM_SUSPEND_64), 0, 0, 0]),
            Action::NotSupported
        );
        // FEATURES of something we refuse says so too.
        let f = u64::from(PSCI_FEATURES);
        assert_eq!(
            route(&[f, u64::from(PSCI_SYSTEM_SUSPEND_64), 0, 0]),
            Action::NotSupported
        );
        assert_eq!(route(&[f, 0x8000_0000, 0, 0]), Action::NotSupported);
        assert_eq!(
            route(&[f, u64::from(PSCI_CPU_ON_64), 0, 0]),
            Action::Forward
        );
    }
}
