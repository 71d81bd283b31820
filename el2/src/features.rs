//! The CPU features that decide what a guest can reach, decoded from the
//! ID registers (a value: nothing here reads the machine).
//!
//! Every EL1/EL0 register a guest can reach without a trap must be switched
//! per vCPU; every other one must trap. docs/DESIGN.md §8 has the whole
//! inventory. This module holds the part that depends on the CPU:
//!
//! - registers that exist only with a feature and are switched when it is
//!   there: `TPIDR2_EL0` (SME), `VDISR_EL2` (RAS: the guest's `DISR_EL1`),
//!   the pointer-authentication keys, the GIC virtual CPU interface (how
//!   many list registers and active-priority registers `ICH_VTR_EL2` says);
//! - trap bits that exist only with a feature and are set for guests when
//!   it is there ([`CpuFeatures::guest_hcr`], [`CpuFeatures::guest_cptr`],
//!   [`CpuFeatures::guest_mdcr`]): a trap bit of a missing feature is RES0
//!   and is left clear;
//! - [`CpuFeatures::uncovered`]: features this hypervisor neither switches
//!   nor traps. The boot log names them; on the CPUs the project runs on
//!   (QEMU `max`, `cortex-a57`) the list is empty, and the boot suite checks
//!   that.

use crate::sysreg::{cptr, hcr, mdcr};

/// The raw ID registers the decision depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdRegs {
    /// ID_AA64PFR0_EL1.
    pub pfr0: u64,
    /// ID_AA64PFR1_EL1.
    pub pfr1: u64,
    /// ID_AA64DFR0_EL1.
    pub dfr0: u64,
    /// ID_AA64MMFR1_EL1.
    pub mmfr1: u64,
    /// ID_AA64MMFR2_EL1.
    pub mmfr2: u64,
    /// ID_AA64MMFR3_EL1 (RAZ before Armv8.9).
    pub mmfr3: u64,
    /// ID_AA64ISAR1_EL1.
    pub isar1: u64,
    /// ID_AA64ISAR2_EL1 (RAZ before Armv8.7).
    pub isar2: u64,
    /// ICH_VTR_EL2 (read only when `pfr0` says the GIC system registers
    /// exist; 0 otherwise).
    pub ich_vtr: u64,
}

/// The 4-bit ID field at `shift`.
const fn field(reg: u64, shift: u32) -> u64 {
    (reg >> shift) & 0xf
}

/// Most GIC list registers (ICH_LR0..15_EL2).
pub const MAX_LRS: usize = 16;
/// Most active-priority registers per group (ICH_AP{0,1}R0..3_EL2).
pub const MAX_APRS: usize = 4;

/// What the CPU has, as far as guest isolation is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// FEAT_SME: `TPIDR2_EL0` exists (switched), `SVCR` (streaming mode
    /// and ZA) exists.
    pub sme: bool,
    /// FEAT_SVE.
    pub sve: bool,
    /// FEAT_RAS: `DISR_EL1` is `VDISR_EL2` for a guest (switched); the
    /// error-record registers trap (`HCR_EL2.TERR`).
    pub ras: bool,
    /// FEAT_LOR: the LORegion registers trap (`HCR_EL2.TLOR`).
    pub lor: bool,
    /// Pointer authentication: the five key registers (switched).
    pub pauth: bool,
    /// FEAT_MTE2: the tag registers trap (`HCR_EL2.ATA` is never set).
    pub mte: bool,
    /// FEAT_AMU: the activity monitors trap (`CPTR_EL2.TAM`).
    pub amu: bool,
    /// FEAT_SPE: the profiling registers trap (`MDCR_EL2.TPMS`).
    pub spe: bool,
    /// FEAT_TRF: `TRFCR_EL1` traps (`MDCR_EL2.TTRF`).
    pub trf: bool,
    /// The GIC CPU interface is system registers (GICv3/v4).
    pub gic_sysregs: bool,
    /// Implemented list registers (ICH_VTR_EL2.ListRegs + 1), 0 without a
    /// GICv3 CPU interface.
    pub nr_lrs: usize,
    /// Implemented active-priority registers per group (1, 2 or 4 for 5, 6
    /// or 7 preemption bits), 0 without a GICv3 CPU interface.
    pub nr_aprs: usize,
    /// EL1-visible state this hypervisor neither switches nor traps
    /// ([`uncovered`] bits).
    pub uncovered: u32,
}

/// Features whose EL1 registers would be neither switched nor trapped.
pub mod uncovered {
    /// FEAT_S1PIE / FEAT_S1POE / FEAT_TCR2 / FEAT_SCTLR2 (ID_AA64MMFR3):
    /// PIR_EL1, POR_EL1, TCR2_EL1, SCTLR2_EL1.
    pub const MMFR3_REGS: u32 = 1 << 0;
    /// FEAT_GCS (ID_AA64PFR1.GCS): GCSCR_EL1, GCSPR_EL1/EL0.
    pub const GCS: u32 = 1 << 1;
    /// FEAT_THE (ID_AA64PFR1.THE): RCWMASK_EL1, RCWSMASK_EL1.
    pub const THE: u32 = 1 << 2;
    /// FEAT_MPAM (ID_AA64PFR0.MPAM): MPAM1_EL1, MPAM0_EL1.
    pub const MPAM: u32 = 1 << 3;
    /// FEAT_BRBE (ID_AA64DFR0.BRBE): the branch record buffer.
    pub const BRBE: u32 = 1 << 4;
    /// FEAT_NMI (ID_AA64PFR1.NMI): ALLINT.
    pub const NMI: u32 = 1 << 5;
    /// A list register or priority-bit count beyond what a vCPU context
    /// holds.
    pub const GIC_SHAPE: u32 = 1 << 6;

    /// Each bit's name, for the boot log.
    pub const NAMES: [(u32, &str); 7] = [
        (MMFR3_REGS, "S1PIE/S1POE/TCR2/SCTLR2"),
        (GCS, "GCS"),
        (THE, "THE"),
        (MPAM, "MPAM"),
        (BRBE, "BRBE"),
        (NMI, "NMI"),
        (GIC_SHAPE, "GIC list/priority registers"),
    ];
}

impl CpuFeatures {
    /// Decodes the ID registers.
    #[must_use]
    pub fn decode(id: &IdRegs) -> Self {
        let gic_sysregs = field(id.pfr0, 24) != 0;
        let (mut nr_lrs, mut nr_aprs, mut gic_shape_ok) = (0, 0, true);
        if gic_sysregs {
            nr_lrs = (id.ich_vtr & 0x1f) as usize + 1;
            let pre_bits = ((id.ich_vtr >> 26) & 0x7) + 1;
            nr_aprs = match pre_bits {
                5 => 1,
                6 => 2,
                7 => 4,
                _ => {
                    gic_shape_ok = false;
                    MAX_APRS
                }
            };
            if nr_lrs > MAX_LRS {
                gic_shape_ok = false;
                nr_lrs = MAX_LRS;
            }
        }
        let mut uncovered = 0;
        // TCRX (3:0), SCTLRX (7:4), S1PIE (11:8), S1POE (19:16).
        if id.mmfr3 & 0x000f_0fff != 0 {
            uncovered |= uncovered::MMFR3_REGS;
        }
        if field(id.pfr1, 44) != 0 {
            uncovered |= uncovered::GCS;
        }
        if field(id.pfr1, 48) != 0 {
            uncovered |= uncovered::THE;
        }
        if field(id.pfr0, 40) != 0 || field(id.pfr1, 16) != 0 {
            uncovered |= uncovered::MPAM;
        }
        if field(id.dfr0, 52) != 0 {
            uncovered |= uncovered::BRBE;
        }
        if field(id.pfr1, 36) != 0 {
            uncovered |= uncovered::NMI;
        }
        if !gic_shape_ok {
            uncovered |= uncovered::GIC_SHAPE;
        }
        Self {
            sme: field(id.pfr1, 24) != 0,
            sve: field(id.pfr0, 32) != 0,
            ras: field(id.pfr0, 28) != 0,
            lor: field(id.mmfr1, 16) != 0,
            // APA (7:4), API (11:8), GPA (27:24), GPI (31:28); ISAR2 APA3
            // (15:12), GPA3 (11:8).
            pauth: id.isar1 & 0xff00_0ff0 != 0 || id.isar2 & 0xff00 != 0,
            mte: field(id.pfr1, 8) >= 2,
            amu: field(id.pfr0, 44) != 0,
            spe: field(id.dfr0, 32) != 0,
            trf: field(id.dfr0, 40) != 0,
            gic_sysregs,
            nr_lrs,
            nr_aprs,
            uncovered,
        }
    }

    /// HCR_EL2 for a guest: [`HCR_GUEST`](crate::sysreg::HCR_GUEST) plus the
    /// traps of the features this CPU has.
    #[must_use]
    pub const fn guest_hcr(&self) -> u64 {
        let mut v = crate::sysreg::HCR_GUEST;
        if self.lor {
            v |= hcr::TLOR;
        }
        if self.ras {
            v |= hcr::TERR;
        }
        v
    }

    /// CPTR_EL2 bits a guest adds to the host's (nVHE layout).
    #[must_use]
    pub const fn guest_cptr(&self) -> u64 {
        let mut v = cptr::TZ | cptr::TSM;
        if self.amu {
            v |= cptr::TAM;
        }
        v
    }

    /// MDCR_EL2 bits a guest adds to the host's.
    #[must_use]
    pub const fn guest_mdcr(&self) -> u64 {
        let mut v = mdcr::GUEST_TRAPS;
        if self.spe {
            v |= mdcr::TPMS;
        }
        if self.trf {
            v |= mdcr::TTRF;
        }
        v
    }

    /// The names of the [`uncovered`] features this CPU has.
    pub fn uncovered_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        uncovered::NAMES
            .iter()
            .filter(|(bit, _)| self.uncovered & bit != 0)
            .map(|(_, name)| *name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2 `-cpu max`'s values that matter here (SVE, SME, RAS, LOR,
    /// PAuth, MTE with `mte=on`, GICv3 with 4 LRs and 5 preemption bits).
    fn qemu_max() -> IdRegs {
        IdRegs {
            pfr0: (1 << 32) | (1 << 28) | (1 << 24) | 0x11,
            pfr1: (1 << 24) | (2 << 8) | 1,
            dfr0: 0x6,
            mmfr1: 1 << 16,
            isar1: 1 << 4,
            ich_vtr: (4 << 26) | 3,
            ..IdRegs::default()
        }
    }

    #[test]
    fn qemu_max_is_fully_covered() {
        let f = CpuFeatures::decode(&qemu_max());
        assert!(f.sme && f.sve && f.ras && f.lor && f.pauth && f.mte && f.gic_sysregs);
        assert!(!f.amu && !f.spe && !f.trf);
        assert_eq!((f.nr_lrs, f.nr_aprs), (4, 1));
        assert_eq!(f.uncovered, 0);
        assert_eq!(f.uncovered_names().count(), 0);
    }

    #[test]
    fn feature_traps_follow_the_id_registers() {
        let f = CpuFeatures::decode(&qemu_max());
        assert_ne!(f.guest_hcr() & hcr::TLOR, 0);
        assert_ne!(f.guest_hcr() & hcr::TERR, 0);
        let bare = CpuFeatures::decode(&IdRegs::default());
        assert_eq!(
            bare.guest_hcr(),
            crate::sysreg::HCR_GUEST,
            "RES0 trap bits stay clear"
        );
        assert_eq!(bare.guest_cptr(), cptr::TZ | cptr::TSM);
        assert_eq!(bare.guest_mdcr(), mdcr::GUEST_TRAPS);
        assert_eq!((bare.nr_lrs, bare.nr_aprs), (0, 0));
        let mut id = IdRegs::default();
        id.pfr0 |= 1 << 44;
        id.dfr0 |= (1 << 32) | (1 << 40);
        let f = CpuFeatures::decode(&id);
        assert_eq!(f.guest_cptr() & cptr::TAM, cptr::TAM);
        assert_eq!(
            f.guest_mdcr() & (mdcr::TPMS | mdcr::TTRF),
            mdcr::TPMS | mdcr::TTRF
        );
        // Never allocation-tag access, whatever the CPU has.
        assert_eq!(f.guest_hcr() & (1 << 56), 0);
    }

    #[test]
    fn apr_count_follows_preemption_bits() {
        for (pre, aprs) in [(4, 1), (5, 2), (6, 4)] {
            let id = IdRegs {
                pfr0: 1 << 24,
                ich_vtr: (pre << 26) | 15,
                ..IdRegs::default()
            };
            let f = CpuFeatures::decode(&id);
            assert_eq!((f.nr_lrs, f.nr_aprs, f.uncovered), (16, aprs, 0));
        }
        // 3 preemption bits (a field value the architecture does not allow
        // with the system-register interface): not covered, yet bounded.
        let f = CpuFeatures::decode(&IdRegs {
            pfr0: 1 << 24,
            ich_vtr: 2 << 26,
            ..IdRegs::default()
        });
        assert_eq!(f.uncovered, uncovered::GIC_SHAPE);
        assert!(f.nr_aprs <= MAX_APRS && f.nr_lrs <= MAX_LRS);
    }

    #[test]
    fn unknown_state_is_named() {
        let id = IdRegs {
            mmfr3: 1,
            pfr1: (1 << 44) | (1 << 36),
            ..IdRegs::default()
        };
        let f = CpuFeatures::decode(&id);
        let names: std::vec::Vec<_> = f.uncovered_names().collect();
        assert_eq!(names, ["S1PIE/S1POE/TCR2/SCTLR2", "GCS", "NMI"]);
    }
}
