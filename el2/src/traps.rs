//! Counts of the exceptions el2 takes from the host, by cause
//! (docs/DESIGN.md §5, "Trap counts").
//!
//! The trap handler calls one `record_*` per exception; each is one relaxed
//! atomic add (no lock, no allocation), so counting costs a few
//! instructions per trap. [`TrapCounts::lines`] renders them as
//! `group: name=count ...` lines, which el2 prints when the host powers the
//! machine off or resets it (PSCI `SYSTEM_OFF`/`SYSTEM_RESET`) and which
//! `cargo xtask bench boot` reads. Only what the host causes is counted:
//! a guest's exits are taken on the guest vector table during
//! `HYP_VCPU_RUN` and are the VM's counters (ABI `HYP_VM_COUNTERS`).

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::string::String;
use alloc::vec::Vec;
use hypercalls::HostFunction;

use crate::exception::{Esr, ExceptionClass};
use crate::pkvm::AbortOutcome;
use crate::psci;

/// The host's PSCI and other SMC calls, by function: the counters' names.
const SMC_NAMES: [&str; 12] = [
    "version",
    "cpu_suspend",
    "cpu_off",
    "cpu_on",
    "affinity_info",
    "features",
    "system_off",
    "system_reset",
    "migrate_info_type",
    "refused_psci",
    "other_psci",
    "non_psci",
];

/// The counter index of an SMC with function id `fid` (W0), named by
/// `SMC_NAMES`: `refused_psci` are the PSCI calls el2 answers
/// `NOT_SUPPORTED` itself (`psci::route`), `non_psci` every SMC outside the
/// PSCI range.
#[must_use]
pub fn smc_index(fid: u32) -> usize {
    if !psci::is_psci(fid) {
        return 11;
    }
    match fid {
        psci::PSCI_VERSION => 0,
        psci::PSCI_CPU_SUSPEND_32 | psci::PSCI_CPU_SUSPEND_64 => 1,
        psci::PSCI_CPU_OFF => 2,
        psci::PSCI_CPU_ON_32 | psci::PSCI_CPU_ON_64 => 3,
        psci::PSCI_AFFINITY_INFO_32 | psci::PSCI_AFFINITY_INFO_64 => 4,
        psci::PSCI_FEATURES => 5,
        psci::PSCI_SYSTEM_OFF => 6,
        psci::PSCI_SYSTEM_RESET => 7,
        psci::PSCI_MIGRATE_INFO_TYPE => 8,
        _ if psci::route(&[u64::from(fid), 0, 0, 0]) == psci::Action::NotSupported => 9,
        _ => 10,
    }
}

/// Slots for host HVC #0 calls: one per [`HostFunction`], then one for an
/// unknown function id, then one for an HVC with a non-zero immediate.
const HVC_SLOTS: usize = 32;
const HVC_UNKNOWN: usize = HVC_SLOTS - 2;
const HVC_IMM: usize = HVC_SLOTS - 1;
const _: () = assert!(HostFunction::ALL.len() <= HVC_UNKNOWN);

/// The counter index of a host `HVC #imm` with x0 = `x0`.
#[must_use]
pub fn hvc_index(imm16: u16, x0: u64) -> usize {
    if imm16 != 0 {
        return HVC_IMM;
    }
    let f = u32::try_from(x0).ok().and_then(HostFunction::from_id);
    f.and_then(|f| HostFunction::ALL.iter().position(|&g| g == f))
        .unwrap_or(HVC_UNKNOWN)
}

fn hvc_name(i: usize) -> &'static str {
    match i {
        HVC_UNKNOWN => "unknown_function",
        HVC_IMM => "nonzero_imm",
        _ => HostFunction::ALL.get(i).map_or("?", |f| f.name()),
    }
}

/// Names of the stage-2 abort outcomes, indexed by [`abort_index`].
const ABORT_NAMES: [&str; 9] = [
    "mmio_map_1g",
    "mmio_map_2m",
    "mmio_map_4k",
    "ram_map_4k",
    "already_mapped",
    "inject_not_host_ram",
    "inject_beyond_ipa",
    "inject_not_translation",
    "inject_map_failed",
];

/// The counter index of one host stage-2 abort's outcome.
#[must_use]
pub fn abort_index(o: AbortOutcome) -> usize {
    match o {
        AbortOutcome::MappedMmio { size } if size >= 1 << 30 => 0,
        AbortOutcome::MappedMmio { size } if size >= 2 << 20 => 1,
        AbortOutcome::MappedMmio { .. } => 2,
        AbortOutcome::MappedRam => 3,
        AbortOutcome::AlreadyMapped => 4,
        AbortOutcome::NotHostRam => 5,
        AbortOutcome::BeyondIpa => 6,
        AbortOutcome::NotTranslation => 7,
        AbortOutcome::MapFailed => 8,
    }
}

/// Which vector of the lower EL: the synchronous one is counted by class.
const VECTOR_NAMES: [&str; 4] = ["irq", "fiq", "serror", "aarch32"];

/// Everything counted, shared by all CPUs (relaxed atomics: the counts are
/// statistics, ordered with nothing else).
#[derive(Debug)]
pub struct TrapCounts {
    /// Synchronous exceptions by exception class (ESR_EL2.EC).
    ec: [AtomicU64; 64],
    /// IRQ, FIQ, SError and AArch32 vectors.
    vector: [AtomicU64; VECTOR_NAMES.len()],
    /// Stage-2 aborts (EC 0x20/0x24) by outcome.
    abort: [AtomicU64; ABORT_NAMES.len()],
    /// Trapped SMCs by function.
    smc: [AtomicU64; SMC_NAMES.len()],
    /// HVCs by call.
    hvc: [AtomicU64; HVC_SLOTS],
}

impl Default for TrapCounts {
    fn default() -> Self {
        Self::new()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Appends ` name=count` for every non-zero counter; `none` if all are zero.
fn push_counts<N: core::fmt::Display>(line: &mut String, named: impl Iterator<Item = (N, u64)>) {
    let mut any = false;
    for (name, n) in named.filter(|(_, n)| *n != 0) {
        let _ = write!(line, " {name}={n}");
        any = true;
    }
    if !any {
        line.push_str(" none");
    }
}

/// The name of exception class `ec` in the `sync:` line.
fn ec_name(ec: u8) -> Option<&'static str> {
    Some(match Esr(u64::from(ec) << 26).class() {
        ExceptionClass::Hvc64 => "hvc",
        ExceptionClass::Smc64 => "smc",
        ExceptionClass::SysReg => "sysreg",
        ExceptionClass::DataAbortLower => "data_abort",
        ExceptionClass::InstructionAbortLower => "instruction_abort",
        ExceptionClass::WfxTrap => "wfx",
        ExceptionClass::FpAccess => "fp",
        _ => return None,
    })
}

impl TrapCounts {
    /// All zero.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            ec: [const { AtomicU64::new(0) }; 64],
            vector: [const { AtomicU64::new(0) }; VECTOR_NAMES.len()],
            abort: [const { AtomicU64::new(0) }; ABORT_NAMES.len()],
            smc: [const { AtomicU64::new(0) }; SMC_NAMES.len()],
            hvc: [const { AtomicU64::new(0) }; HVC_SLOTS],
        }
    }

    /// A synchronous exception from the host, before it is handled.
    pub fn record_sync(&self, esr: Esr) {
        bump(&self.ec[usize::from(esr.ec())]);
    }

    /// An IRQ (0), FIQ (1), SError (2) or AArch32 (3) exception.
    pub fn record_vector(&self, which: usize) {
        if let Some(c) = self.vector.get(which) {
            bump(c);
        }
    }

    /// A host stage-2 abort's outcome.
    pub fn record_abort(&self, o: AbortOutcome) {
        bump(&self.abort[abort_index(o)]);
    }

    /// A trapped SMC with function id `fid`.
    pub fn record_smc(&self, fid: u32) {
        bump(&self.smc[smc_index(fid)]);
    }

    /// A host `HVC #imm16` with x0 = `x0`.
    pub fn record_hvc(&self, imm16: u16, x0: u64) {
        bump(&self.hvc[hvc_index(imm16, x0)]);
    }

    /// Every exception counted.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.ec.iter().chain(&self.vector).map(get).sum()
    }

    /// The counts as lines `group: name=count ...` (zero counters left
    /// out), in a fixed order: `total`, `sync` (by class; other classes as
    /// `ec_0xNN`), `async` (the other vectors), `stage2` (aborts by
    /// outcome), `smc` (by PSCI function), `hvc` (by call).
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.push(alloc::format!("total: exceptions={}", self.total()));
        let mut sync = String::from("sync:");
        let by_class = self.ec.iter().enumerate().map(|(ec, c)| {
            let name = match ec_name(ec as u8) {
                Some(name) => String::from(name),
                None => alloc::format!("ec_{ec:#04x}"),
            };
            (name, get(c))
        });
        push_counts(&mut sync, by_class);
        out.push(sync);
        let groups: [(&str, &[&str], &[AtomicU64]); 3] = [
            ("async:", &VECTOR_NAMES, &self.vector),
            ("stage2:", &ABORT_NAMES, &self.abort),
            ("smc:", &SMC_NAMES, &self.smc),
        ];
        for (group, names, counts) in groups {
            let mut line = String::from(group);
            push_counts(&mut line, names.iter().copied().zip(counts.iter().map(get)));
            out.push(line);
        }
        let mut hvc = String::from("hvc:");
        push_counts(
            &mut hvc,
            (0..HVC_SLOTS).map(|i| (hvc_name(i), get(&self.hvc[i]))),
        );
        out.push(hvc);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn every_psci_function_has_its_counter() {
        assert_eq!(SMC_NAMES[smc_index(psci::PSCI_VERSION)], "version");
        assert_eq!(SMC_NAMES[smc_index(psci::PSCI_CPU_ON_64)], "cpu_on");
        assert_eq!(SMC_NAMES[smc_index(psci::PSCI_CPU_ON_32)], "cpu_on");
        assert_eq!(SMC_NAMES[smc_index(psci::PSCI_SYSTEM_OFF)], "system_off");
        assert_eq!(
            SMC_NAMES[smc_index(psci::PSCI_SYSTEM_RESET)],
            "system_reset"
        );
        assert_eq!(
            SMC_NAMES[smc_index(psci::PSCI_SYSTEM_SUSPEND_64)],
            "refused_psci"
        );
        assert_eq!(SMC_NAMES[smc_index(psci::PSCI_MIGRATE_32)], "refused_psci");
        // PSCI_STAT_COUNT_64: PSCI, forwarded, not named.
        assert_eq!(SMC_NAMES[smc_index(0xc400_0011)], "other_psci");
        assert_eq!(SMC_NAMES[smc_index(0x8000_0000)], "non_psci");
        assert_eq!(SMC_NAMES[smc_index(0xc600_0000)], "non_psci");
    }

    #[test]
    fn every_host_call_has_its_counter() {
        for (i, f) in HostFunction::ALL.iter().enumerate() {
            assert_eq!(hvc_index(0, u64::from(f.id())), i);
            assert_eq!(hvc_name(i), f.name());
        }
        let id = u64::from(HostFunction::Version.id());
        assert_eq!(hvc_name(hvc_index(1, id)), "nonzero_imm");
        assert_eq!(hvc_name(hvc_index(0, 0x8400_0000)), "unknown_function");
        // The upper half of x0 makes it no function id.
        assert_eq!(hvc_name(hvc_index(0, id | 1 << 32)), "unknown_function");
    }

    #[test]
    fn lines_name_each_count_once() {
        let t = TrapCounts::new();
        assert_eq!(
            t.lines(),
            [
                "total: exceptions=0",
                "sync: none",
                "async: none",
                "stage2: none",
                "smc: none",
                "hvc: none"
            ]
        );
        let smc = Esr(0x17 << 26);
        let dabt = Esr(0x24 << 26 | 0x07);
        for _ in 0..3 {
            t.record_sync(smc);
            t.record_smc(psci::PSCI_CPU_ON_64);
        }
        t.record_sync(dabt);
        t.record_abort(AbortOutcome::MappedMmio { size: 1 << 30 });
        t.record_sync(dabt);
        t.record_abort(AbortOutcome::NotHostRam);
        t.record_sync(Esr(0x16 << 26));
        t.record_hvc(0, u64::from(HostFunction::Share.id()));
        t.record_sync(Esr(0x3c << 26));
        t.record_vector(2);
        let lines = t.lines();
        assert_eq!(lines[0], "total: exceptions=8");
        assert_eq!(lines[1], "sync: hvc=1 smc=3 data_abort=2 ec_0x3c=1");
        assert_eq!(lines[2], "async: serror=1");
        assert_eq!(lines[3], "stage2: mmio_map_1g=1 inject_not_host_ram=1");
        assert_eq!(lines[4], "smc: cpu_on=3");
        assert_eq!(lines[5], "hvc: HYP_SHARE=1".to_string());
    }

    #[test]
    fn abort_outcomes_have_distinct_counters() {
        let all = [
            AbortOutcome::MappedMmio { size: 1 << 30 },
            AbortOutcome::MappedMmio { size: 2 << 20 },
            AbortOutcome::MappedMmio { size: 4096 },
            AbortOutcome::MappedRam,
            AbortOutcome::AlreadyMapped,
            AbortOutcome::NotHostRam,
            AbortOutcome::BeyondIpa,
            AbortOutcome::NotTranslation,
            AbortOutcome::MapFailed,
        ];
        let idx: Vec<usize> = all.iter().map(|&o| abort_index(o)).collect();
        assert_eq!(idx, (0..ABORT_NAMES.len()).collect::<Vec<_>>());
    }
}
