//! The system-register facts el2 relies on, each in one place: the bits it
//! sets or tests (Arm ARM names, nVHE layouts) and the values it programs:
//! SCTLR_EL1 at reset, HCR_EL2 for the host and for guests, the PSTATE a
//! vCPU starts with, and the CPTR_EL2, MDCR_EL2, CNTHCTL_EL2, ICC_SRE_EL2
//! and CNTV_CTL_EL0 bits. Only constants: the binary's `arch` writes them to
//! the CPU, the library (vCPUs, exception injection, CPU features) computes
//! with them.

/// HCR_EL2 bits.
pub mod hcr {
    /// Stage-2 translation on.
    pub const VM: u64 = 1 << 0;
    /// Set/way invalidation becomes clean+invalidate.
    pub const SWIO: u64 = 1 << 1;
    /// Physical FIQs go to EL2.
    pub const FMO: u64 = 1 << 3;
    /// Physical IRQs go to EL2.
    pub const IMO: u64 = 1 << 4;
    /// SErrors go to EL2.
    pub const AMO: u64 = 1 << 5;
    /// EL1 TLB and I-cache maintenance is broadcast (inner shareable).
    pub const FB: u64 = 1 << 9;
    /// Barriers at EL1 are upgraded to inner shareable.
    pub const BSU_IS: u64 = 1 << 10;
    /// WFI traps to EL2.
    pub const TWI: u64 = 1 << 13;
    /// WFE traps to EL2.
    pub const TWE: u64 = 1 << 14;
    /// SMC traps to EL2.
    pub const TSC: u64 = 1 << 19;
    /// Implementation-defined system registers trap.
    pub const TIDCP: u64 = 1 << 20;
    /// ACTLR_EL1 accesses trap.
    pub const TACR: u64 = 1 << 21;
    /// Data cache maintenance by set/way traps.
    pub const TSW: u64 = 1 << 22;
    /// EL1 is AArch64.
    pub const RW: u64 = 1 << 31;
    /// LORegion registers trap (FEAT_LOR; RES0 without it).
    pub const TLOR: u64 = 1 << 35;
    /// RAS error-record registers trap (FEAT_RAS; RES0 without it).
    pub const TERR: u64 = 1 << 36;
    /// Pointer-auth key registers do not trap.
    pub const APK: u64 = 1 << 40;
    /// Pointer-auth instructions do not trap.
    pub const API: u64 = 1 << 41;
}

/// HCR_EL2 while a guest runs.
///
/// - `VM`: its stage-2 is on. `IMO | FMO | AMO`: physical interrupts and
///   SErrors come to EL2, so an interrupt for the host ends the run
///   ([`GuestExit::Interrupted`](crate::vcpu::GuestExit::Interrupted)) and the host handles it.
/// - `FB | BSU_IS`: a vCPU may run on any CPU, so its TLB maintenance and
///   barriers must reach all of them.
/// - `SWIO | TSW`: set/way cache operations mean nothing in a VM (KVM traps
///   them too); a trapped one is an unhandled trap.
/// - `TWI`: a guest WFI exits to the host (which may schedule something
///   else); WFE does not trap, so spinlocks stay cheap.
/// - `TSC`: SMCs trap (guest PSCI over SMC, see [`crate::vcpu`]).
/// - `TIDCP | TACR`: implementation-defined registers and ACTLR_EL1 are
///   not switched, so the guest may not touch them.
/// - `RW | API | APK`: AArch64 EL1, pointer authentication usable without
///   traps (its keys are switched).
///
/// - `TLOR | TERR` (LORegions, RAS error records) are added where the CPU
///   has them ([`CpuFeatures::guest_hcr`](crate::features::CpuFeatures::guest_hcr)):
///   they are RES0 otherwise.
/// - Never set: `ATA` (so the MTE tag registers trap and no tag check
///   happens at EL1/EL0), `EnSCXT` (so `SCXTNUM_EL0/EL1` trap), `TGE`,
///   `E2H`. docs/DESIGN.md §8 lists every register and how it is kept.
///
/// ID registers are not trapped (no `TID3`): the guest sees the CPU's,
/// including SVE/SME, which `CPTR_EL2` traps; a guest that uses them gets
/// an unhandled-trap exit.
pub const HCR_GUEST: u64 = hcr::VM
    | hcr::SWIO
    | hcr::FMO
    | hcr::IMO
    | hcr::AMO
    | hcr::FB
    | hcr::BSU_IS
    | hcr::TWI
    | hcr::TSC
    | hcr::TIDCP
    | hcr::TACR
    | hcr::TSW
    | hcr::RW
    | hcr::APK
    | hcr::API;

/// HCR_EL2 while the host runs: its stage-2 is on, SMCs trap (the PSCI
/// relay, [`crate::psci::route`]), EL1 is AArch64, pointer authentication
/// is usable without traps. Everything else the host reaches is its own.
pub const HCR_HOST: u64 = hcr::VM | hcr::TSC | hcr::RW | hcr::APK | hcr::API;

/// SCTLR_EL1 bits.
pub mod sctlr_el1 {
    /// The value at reset: RES1 bits, MMU and caches off (what Linux and
    /// a fresh vCPU expect at entry).
    pub const RESET: u64 = 0x30d0_0800;
    /// SPAN: PSTATE.PAN is left alone (0 = set) on an exception to EL1.
    pub const SPAN: u64 = 1 << 23;
    /// DSSBS: PSTATE.SSBS on an exception to EL1.
    pub const DSSBS: u64 = 1 << 44;
}

/// PSTATE (SPSR) fields.
pub mod pstate {
    /// M\[4:0\]: execution state and mode.
    pub const M: u64 = 0x1f;
    /// M\[3:0\]: AArch64 exception level and stack pointer.
    pub const M_AARCH64: u64 = 0xf;
    /// EL0 (SP_EL0).
    pub const EL0T: u64 = 0x0;
    /// EL1 with SP_EL0.
    pub const EL1T: u64 = 0x4;
    /// EL1 with SP_EL1.
    pub const EL1H: u64 = 0x5;
    /// N, Z, C, V.
    pub const NZCV: u64 = 0xf << 28;
    /// DIT.
    pub const DIT: u64 = 1 << 24;
    /// PAN.
    pub const PAN: u64 = 1 << 22;
    /// SSBS.
    pub const SSBS: u64 = 1 << 12;
    /// D, A, I, F: every exception masked.
    pub const DAIF: u64 = 0xf << 6;
    /// A fresh vCPU (and an injected exception): EL1h, D, A, I, F masked.
    pub const EL1H_MASKED: u64 = DAIF | EL1H;
}

/// CPTR_EL2 bits (nVHE layout).
pub mod cptr {
    /// RES1 bits (13, 9, 7:0): with nothing else set, nothing traps (TZ,
    /// TFP, TSM, TTA clear). The host's value.
    pub const RES1: u64 = (1 << 13) | (1 << 9) | 0xff;
    /// TZ: SVE instructions and ZCR_EL1 trap.
    pub const TZ: u64 = 1 << 8;
    /// TSM: SME instructions, SVCR, SMCR_EL1, SMPRI_EL1 trap.
    pub const TSM: u64 = 1 << 12;
    /// TAM: activity-monitor registers trap.
    pub const TAM: u64 = 1 << 30;
}

/// MDCR_EL2 bits.
pub mod mdcr {
    /// HPMN: the event counters EL1 may use (`PMCR_EL0.N` for all).
    pub const HPMN: u64 = 0x1f;
    /// TPMCR: PMCR_EL0 traps.
    pub const TPMCR: u64 = 1 << 5;
    /// TPM: the other PMU registers trap.
    pub const TPM: u64 = 1 << 6;
    /// TDA: debug registers trap.
    pub const TDA: u64 = 1 << 9;
    /// TDOSA: OS-lock and power-down debug registers trap.
    pub const TDOSA: u64 = 1 << 10;
    /// TDRA: debug ROM registers trap.
    pub const TDRA: u64 = 1 << 11;
    /// TPMS: statistical-profiling registers trap.
    pub const TPMS: u64 = 1 << 14;
    /// TTRF: trace-filter control (TRFCR_EL1) traps.
    pub const TTRF: u64 = 1 << 19;
    /// For guests: PMU (TPM, TPMCR) and debug registers (TDA, TDOSA, TDRA)
    /// trap, so a guest neither reads nor changes the host's counters,
    /// breakpoints and watchpoints (they are not switched).
    pub const GUEST_TRAPS: u64 = TPMCR | TPM | TDA | TDOSA | TDRA;
}

/// CNTHCTL_EL2 bits (nVHE layout).
pub mod cnthctl {
    /// EL1PCTEN: EL1 and EL0 read the physical counter without a trap.
    pub const EL1PCTEN: u64 = 1 << 0;
    /// EL1PCEN: EL1 and EL0 use the physical timer without a trap.
    pub const EL1PCEN: u64 = 1 << 1;
    /// The host's: counter and timer.
    pub const HOST: u64 = EL1PCTEN | EL1PCEN;
    /// A guest's: the counter, but the physical timer traps.
    pub const GUEST: u64 = EL1PCTEN;
}

/// ICC_SRE_EL2 bits.
pub mod icc_sre_el2 {
    /// SRE: the GIC CPU interface is used through system registers.
    pub const SRE: u64 = 1 << 0;
    /// Enable: EL1 may use ICC_SRE_EL1.
    pub const ENABLE: u64 = 1 << 3;
}

/// CNTV_CTL_EL0 (and the other timers' CTL) bits.
pub mod cnt_ctl {
    /// ENABLE: the timer runs.
    pub const ENABLE: u64 = 1 << 0;
    /// IMASK: its interrupt is masked.
    pub const IMASK: u64 = 1 << 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_hcr() {
        for bit in [
            hcr::VM,
            hcr::IMO,
            hcr::FMO,
            hcr::AMO,
            hcr::FB,
            hcr::TSC,
            hcr::RW,
            hcr::API,
            hcr::APK,
            hcr::TWI,
        ] {
            assert_ne!(HCR_GUEST & bit, 0, "{bit:#x}");
        }
        assert_eq!(HCR_GUEST & hcr::TWE, 0);
        // E2H (34) and TGE (27) must be clear: this is nVHE.
        assert_eq!(HCR_GUEST & ((1 << 34) | (1 << 27)), 0);
    }

    #[test]
    fn host_hcr_and_fresh_pstate() {
        assert_eq!(
            HCR_HOST & (hcr::TWI | hcr::IMO),
            0,
            "the host handles its own"
        );
        assert_eq!(pstate::EL1H_MASKED, 0x3c5);
        assert_eq!(sctlr_el1::RESET & 1, 0, "MMU off");
        assert_eq!(
            mdcr::GUEST_TRAPS,
            (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11)
        );
    }
}
