//! TLB maintenance for stage-2 changes.
//!
//! Every invalidation carries the VMID of the table it belongs to: there is no
//! "current VMID" hidden in global state. The EL2 implementation switches
//! `VTTBR_EL2` as needed and issues `tlbi ipas2e1is` / `tlbi vmalls12e1is`
//! with the barriers the architecture requires; [`RecordingTlb`] records the
//! exact sequence so tests can assert it.

use alloc::vec::Vec;

use crate::addr::{Ipa, Vmid};

/// Hardware TLB maintenance for stage-2 translations.
pub trait TlbMaintenance {
    /// Completes descriptor writes before any following invalidation
    /// (`dsb ishst`).
    fn sync_writes(&mut self);

    /// Invalidates the stage-2 entry (and any combined stage-1+2 entries) for
    /// `ipa` in `vmid`. `level` is the lookup level of the leaf (1, 2 or 3),
    /// which hardware may use as a TTL hint. Completes with `dsb ish`.
    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, level: u8);

    /// Invalidates every stage-1 and stage-2 entry of `vmid`. Completes with
    /// `dsb ish`.
    fn invalidate_vmid(&mut self, vmid: Vmid);
}

/// One recorded TLB maintenance operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbOp {
    /// [`TlbMaintenance::sync_writes`].
    SyncWrites,
    /// [`TlbMaintenance::invalidate_ipa`].
    InvalidateIpa {
        /// VMID of the table.
        vmid: Vmid,
        /// Address invalidated.
        ipa: Ipa,
        /// Level of the leaf that was removed or changed.
        level: u8,
    },
    /// [`TlbMaintenance::invalidate_vmid`].
    InvalidateVmid {
        /// VMID flushed.
        vmid: Vmid,
    },
}

/// A fake that records every operation, for tests.
#[derive(Debug, Default, Clone)]
pub struct RecordingTlb {
    /// Operations in the order they were issued.
    pub ops: Vec<TlbOp>,
}

impl RecordingTlb {
    /// An empty recorder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of invalidations (by IPA or by VMID), not counting barriers.
    #[must_use]
    pub fn invalidations(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| !matches!(op, TlbOp::SyncWrites))
            .count()
    }
}

impl TlbMaintenance for RecordingTlb {
    fn sync_writes(&mut self) {
        self.ops.push(TlbOp::SyncWrites);
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, level: u8) {
        self.ops.push(TlbOp::InvalidateIpa { vmid, ipa, level });
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        self.ops.push(TlbOp::InvalidateVmid { vmid });
    }
}

/// A fake that only counts, for benchmarks where recording would dominate.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingTlb {
    /// Number of `sync_writes` calls.
    pub syncs: u64,
    /// Number of by-IPA invalidations.
    pub by_ipa: u64,
    /// Number of whole-VMID invalidations.
    pub by_vmid: u64,
}

impl TlbMaintenance for CountingTlb {
    fn sync_writes(&mut self) {
        self.syncs += 1;
    }

    fn invalidate_ipa(&mut self, _vmid: Vmid, _ipa: Ipa, _level: u8) {
        self.by_ipa += 1;
    }

    fn invalidate_vmid(&mut self, _vmid: Vmid) {
        self.by_vmid += 1;
    }
}
