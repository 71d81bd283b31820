//! Injecting a synchronous external abort into EL1.
//!
//! When the host touches memory it may not (the hypervisor's, or a page
//! donated to a guest), the stage-2 abort comes to EL2. We hand it back to
//! the host as the exception the architecture would have taken at EL1 had the
//! memory system reported an external abort, so that the host's own fault
//! handling reports it. The PSTATE rules follow the ARM ARM's
//! "exception entry" pseudocode (and KVM's `enter_exception64`).

use crate::sysreg::{pstate, sctlr_el1};

/// The EL1 register state an injection writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// New ELR_EL2: the EL1 vector to run.
    pub elr_el2: u64,
    /// New SPSR_EL2: the PSTATE the vector runs with.
    pub spsr_el2: u64,
    /// ESR_EL1 the host's handler reads.
    pub esr_el1: u64,
    /// FAR_EL1: the faulting virtual address.
    pub far_el1: u64,
    /// ELR_EL1: where the faulting context was.
    pub elr_el1: u64,
    /// SPSR_EL1: the faulting context's PSTATE.
    pub spsr_el1: u64,
}

/// What was interrupted, and the EL1 registers the injection depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faulting {
    /// ELR_EL2 at the trap: the faulting instruction.
    pub elr: u64,
    /// SPSR_EL2 at the trap.
    pub spsr: u64,
    /// FAR_EL2 at the trap.
    pub far: u64,
    /// Whether the trapped instruction was 32 bits (ESR_EL2.IL).
    pub il: bool,
    /// An instruction fetch rather than a data access.
    pub instruction: bool,
    /// VBAR_EL1.
    pub vbar_el1: u64,
    /// SCTLR_EL1.
    pub sctlr_el1: u64,
}

/// Fault status code of a synchronous external abort, not on a table walk.
pub const FSC_SEA: u64 = 0x10;

/// Computes the injection of a synchronous external abort for `f`.
///
/// Returns `None` if the faulting context was not AArch64 EL0 or EL1, which
/// the host never is; the caller then leaves the trap unhandled and logs it.
#[must_use]
pub fn external_abort(f: &Faulting) -> Option<Injection> {
    exception(f, Kind::ExternalAbort)
}

/// Computes the injection of an undefined-instruction exception for `f`
/// (ESR class 0, "unknown reason"), for traps the hypervisor does not emulate.
#[must_use]
pub fn undefined(f: &Faulting) -> Option<Injection> {
    exception(f, Kind::Undefined)
}

#[derive(Clone, Copy)]
enum Kind {
    ExternalAbort,
    Undefined,
}

fn exception(f: &Faulting, kind: Kind) -> Option<Injection> {
    let mode = f.spsr & pstate::M_AARCH64;
    if f.spsr & (1 << 4) != 0 {
        return None; // AArch32
    }
    let (offset, same_el) = match mode {
        pstate::EL1T => (0x000, true),
        pstate::EL1H => (0x200, true),
        pstate::EL0T => (0x400, false),
        _ => return None,
    };
    let esr = match kind {
        Kind::ExternalAbort => {
            let ec: u64 = match (f.instruction, same_el) {
                (false, true) => 0x25,
                (false, false) => 0x24,
                (true, true) => 0x21,
                (true, false) => 0x20,
            };
            (ec << 26) | (u64::from(f.il) << 25) | FSC_SEA
        }
        Kind::Undefined => u64::from(f.il) << 25,
    };

    let old = f.spsr;
    let mut new = old & (pstate::NZCV | pstate::DIT);
    // PAN is kept, and set when SCTLR_EL1.SPAN is 0. UAO, SS, IL, BTYPE clear.
    new |= old & pstate::PAN;
    if f.sctlr_el1 & sctlr_el1::SPAN == 0 {
        new |= pstate::PAN;
    }
    if f.sctlr_el1 & sctlr_el1::DSSBS != 0 {
        new |= pstate::SSBS;
    }
    new |= pstate::DAIF | pstate::EL1H;

    Some(Injection {
        elr_el2: f.vbar_el1.wrapping_add(offset),
        spsr_el2: new,
        esr_el1: esr,
        far_el1: f.far,
        elr_el1: f.elr,
        spsr_el1: old,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(spsr: u64) -> Faulting {
        Faulting {
            elr: 0xffff_8000_1000_0000,
            spsr,
            far: 0xffff_0000_dead_0000,
            il: true,
            instruction: false,
            vbar_el1: 0xffff_8000_0801_0000,
            sctlr_el1: 0,
        }
    }

    #[test]
    fn from_el1h_goes_to_current_spx_vector() {
        let i = external_abort(&fault(0x2000_03c5)).unwrap();
        assert_eq!(i.elr_el2, 0xffff_8000_0801_0200);
        assert_eq!(i.esr_el1, 0x9600_0010);
        assert_eq!(i.elr_el1, 0xffff_8000_1000_0000);
        assert_eq!(i.spsr_el1, 0x2000_03c5);
        assert_eq!(i.far_el1, 0xffff_0000_dead_0000);
        // NZCV kept, PAN set (SPAN = 0), DAIF masked, EL1h.
        assert_eq!(i.spsr_el2, 0x2000_0000 | pstate::PAN | 0x3c5);
    }

    #[test]
    fn from_el0_goes_to_lower_vector() {
        let mut f = fault(0x0);
        f.sctlr_el1 = sctlr_el1::SPAN | sctlr_el1::DSSBS;
        f.instruction = true;
        let i = external_abort(&f).unwrap();
        assert_eq!(i.elr_el2, 0xffff_8000_0801_0400);
        assert_eq!(i.esr_el1 >> 26, 0x20);
        assert_eq!(i.spsr_el2, pstate::SSBS | 0x3c5);
    }

    #[test]
    fn undefined_has_class_zero() {
        let i = undefined(&fault(0x3c5)).unwrap();
        assert_eq!(i.esr_el1, 1 << 25);
        assert_eq!(i.elr_el2, 0xffff_8000_0801_0200);
    }

    #[test]
    fn refuses_aarch32_and_el2() {
        assert_eq!(external_abort(&fault(0x10)), None);
        assert_eq!(external_abort(&fault(0x9)), None);
    }
}
