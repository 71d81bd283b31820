//! The PSCI relay: which host SMCs go to the firmware, rewritten or not.
//!
//! The host's PSCI conduit is SMC (the `/psci` node says `method = "smc"`).
//! HCR_EL2.TSC traps every host SMC to EL2. Calls that carry an entry point
//! (CPU_ON, CPU_SUSPEND) are rewritten so that the CPU comes back through the
//! hypervisor first; the rest pass through unchanged. Anything that is not
//! PSCI gets SMCCC `NOT_SUPPORTED` from us and never reaches the firmware.

use smccc::psci;

/// PSCI return code: not supported.
pub const NOT_SUPPORTED: i32 = -1;
/// PSCI return code: invalid parameters.
pub const INVALID_PARAMETERS: i32 = -2;
/// PSCI return code: already on.
pub const ALREADY_ON: i32 = -4;
/// PSCI return code: on pending.
pub const ON_PENDING: i32 = -5;

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
        psci::PSCI_SYSTEM_SUSPEND_32
            | psci::PSCI_SYSTEM_SUSPEND_64
            | psci::PSCI_CPU_DEFAULT_SUSPEND_32
            | psci::PSCI_CPU_DEFAULT_SUSPEND_64
            | psci::PSCI_MIGRATE_32
            | psci::PSCI_MIGRATE_64
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
        psci::PSCI_CPU_ON_32 | psci::PSCI_CPU_ON_64 => Action::CpuOn {
            target: narrow(x[1]),
            entry: narrow(x[2]),
            context: narrow(x[3]),
        },
        psci::PSCI_CPU_SUSPEND_32 | psci::PSCI_CPU_SUSPEND_64 => Action::CpuSuspend {
            power_state: narrow(x[1]),
            entry: narrow(x[2]),
            context: narrow(x[3]),
        },
        psci::PSCI_CPU_OFF => Action::CpuOff,
        psci::PSCI_FEATURES => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_on_is_rewritten() {
        assert_eq!(
            route(&[u64::from(psci::PSCI_CPU_ON_64), 0x1, 0x4020_0000, 7]),
            Action::CpuOn {
                target: 1,
                entry: 0x4020_0000,
                context: 7
            }
        );
        assert_eq!(
            route(&[
                u64::from(psci::PSCI_CPU_ON_32),
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
            psci::PSCI_VERSION,
            psci::PSCI_AFFINITY_INFO_64,
            psci::PSCI_SYSTEM_OFF,
            psci::PSCI_SYSTEM_RESET,
            psci::PSCI_MIGRATE_INFO_TYPE,
        ] {
            assert_eq!(
                route(&[u64::from(fid), 0, 0, 0]),
                Action::Forward,
                "{fid:#x}"
            );
        }
        assert_eq!(
            route(&[u64::from(psci::PSCI_CPU_OFF), 0, 0, 0]),
            Action::CpuOff
        );
    }

    #[test]
    fn upper_half_of_x0_is_ignored() {
        assert_eq!(
            route(&[
                0xdead_beef_0000_0000 | u64::from(psci::PSCI_VERSION),
                0,
                0,
                0
            ]),
            Action::Forward
        );
    }

    #[test]
    fn non_psci_and_unsupported_are_refused() {
        // SMCCC_VERSION, a vendor hypervisor call, garbage.
        for x0 in [0x8000_0000, 0xc600_0000, 0xffff_ffff, 0] {
            assert_eq!(route(&[x0, 0, 0, 0]), Action::NotSupported, "{x0:#x}");
        }
        assert_eq!(
            route(&[u64::from(psci::PSCI_SYSTEM_SUSPEND_64), 0, 0, 0]),
            Action::NotSupported
        );
        // FEATURES of something we refuse says so too.
        let f = u64::from(psci::PSCI_FEATURES);
        assert_eq!(
            route(&[f, u64::from(psci::PSCI_SYSTEM_SUSPEND_64), 0, 0]),
            Action::NotSupported
        );
        assert_eq!(route(&[f, 0x8000_0000, 0, 0]), Action::NotSupported);
        assert_eq!(
            route(&[f, u64::from(psci::PSCI_CPU_ON_64), 0, 0]),
            Action::Forward
        );
    }
}
