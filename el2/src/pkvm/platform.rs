//! The hardware the dispatcher needs, behind traits.
//!
//! At EL2 the binary implements these with the identity map and the TLB
//! instructions (it is the only place with `unsafe`); host tests and the
//! fuzzer use `super::fake`.

use stage2::mm::Table;
use stage2::pgtable::IpaConfig;
use stage2::tlb::TlbMaintenance;
use stage2::{Pfn, Vmid};

use crate::vcpu::{RawExit, VcpuContext};

/// What [`Platform::enter_guest`] needs besides the vCPU context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestEntry {
    /// `VTTBR_EL2` of the VM's stage-2 (root | VMID << 48).
    pub vttbr: u64,
    /// The VM's stage-2 geometry (the platform builds `VTCR_EL2` from it
    /// and the CPU's physical address size).
    pub ipa: IpaConfig,
    /// Another vCPU of the VM ran on this CPU last: invalidate this CPU's
    /// EL1 TLB entries of the VMID before entry.
    pub flush_local_tlb: bool,
    /// How many exits `enter_guest` may answer itself and resume the guest
    /// (the fast path: `crate::vcpu::fast_answer`) before it must return
    /// one; each counts as one guest entry of the run's bound.
    pub fast_budget: u32,
}

/// Access to the contents of hypervisor-owned pages used as a VM's stage-2
/// tables (pages of that VM's memcache).
///
/// One value per VM, owned by the VM's memcache, so `&mut self` is
/// exclusive access to every page the memcache holds. The dispatcher only
/// passes frames that are owned by the hypervisor (tracker owner `Hyp`) and
/// belong to this memcache; an implementation may check that and must not
/// be reachable with any other frame.
pub trait PageAccess {
    /// The 4 KiB page `pfn` as a translation table. Its contents are
    /// whatever was last written (unspecified for a page never written
    /// through this accessor: the stage-2 code zeroes tables before use).
    fn table(&self, pfn: Pfn) -> &Table;

    /// The page `pfn` as a translation table, mutably.
    fn table_mut(&mut self, pfn: Pfn) -> &mut Table;

    /// `pfn` leaves this memcache (it goes back to the host). The EL2
    /// identity map has nothing to do; fakes drop their copy.
    fn release(&mut self, _pfn: Pfn) {}
}

/// The machine services of the hypervisor. One value, shared by every CPU
/// (`Sync`); every method is safe to call concurrently.
pub trait Platform: Sync {
    /// Table-page access for one VM's memcache (see [`PageAccess`]).
    type Pages: PageAccess + Send + core::fmt::Debug;
    /// TLB maintenance for one VM's stage-2.
    type GuestTlb: TlbMaintenance + Send + core::fmt::Debug;

    /// A new accessor for the memcache of a VM being created.
    fn page_access(&self) -> Self::Pages;

    /// TLB maintenance for the guest stage-2 with `vmid` whose `VTTBR_EL2`
    /// value (root table | VMID << 48) is `vttbr`. The EL2 implementation
    /// loads `vttbr` into `VTTBR_EL2` around each invalidation (the
    /// `tlbi ipas2e1is` / `vmalls12e1is` instructions use the current
    /// VMID) and restores the host's value afterwards. Every invalidation
    /// the stage-2 code issues through it names `vmid`.
    fn guest_tlb(&self, vmid: Vmid, vttbr: u64) -> Self::GuestTlb;

    /// Fills the 4 KiB page `pfn` with zeros. Called with the page owned by
    /// the hypervisor or a VM and mapped by nobody but (possibly) the
    /// hypervisor: before a page is returned to the host, and before a page
    /// becomes vCPU state. At EL2: a store loop (or `dc zva`) through the
    /// identity map, followed by `dsb ish` before the host can map it.
    fn zero_page(&self, pfn: Pfn);

    /// Index of the calling physical CPU, for the per-VM record of which
    /// vCPU ran where last (any value at or beyond
    /// [`crate::layout::MAX_CPUS`] means unknown: the local TLB is then
    /// flushed at every entry).
    fn cpu_index(&self) -> usize;

    /// The physical counter now (`CNTPCT_EL0`): a new VM's virtual counter
    /// offset, so its virtual counter starts near 0.
    fn counter(&self) -> u64;

    /// Runs `f` on the vCPU context kept in the vCPU state page `state`.
    /// The dispatcher passes only the state page of a vCPU it has loaded
    /// on the calling CPU (so nothing else touches the page meanwhile);
    /// the page was zeroed when the vCPU was created. At EL2 the page is
    /// the context (`VcpuContext` fits in 4 KiB); fakes keep a copy.
    fn with_vcpu<R>(&self, state: Pfn, f: impl FnOnce(&mut VcpuContext) -> R) -> R;

    /// Enters the guest once with `ctx` (loaded on the calling CPU) on the
    /// stage-2 `entry` names, until its next exception to EL2, and returns
    /// what the exit saved (the guest's registers are back in `ctx`).
    fn enter_guest(&self, ctx: &mut VcpuContext, entry: &GuestEntry) -> RawExit;
}

/// VTTBR_EL2.VMID (bits 63:48; 8- or 16-bit VMIDs).
const VTTBR_VMID_MASK: u64 = 0xffff << 48;

/// `vttbr` with its VMID replaced by `vmid`: what `VTTBR_EL2` must hold for
/// a `tlbi ipas2e1is` / `vmalls12e1is` to act on `vmid` (these instructions
/// take the VMID from `VTTBR_EL2`). The EL2 TLB implementations load this
/// around every invalidation, so each one acts on the VMID it is given
/// (stage2's `TlbMaintenance` contract), never on one captured elsewhere.
#[must_use]
pub const fn vttbr_with_vmid(vttbr: u64, vmid: Vmid) -> u64 {
    (vttbr & !VTTBR_VMID_MASK) | ((vmid.0 as u64) << 48)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vttbr_with_vmid_replaces_only_the_vmid() {
        let root = 0x4567_8000;
        assert_eq!(vttbr_with_vmid(root | 3 << 48, Vmid(3)), root | 3 << 48);
        assert_eq!(vttbr_with_vmid(root | 3 << 48, Vmid(4)), root | 4 << 48);
        assert_eq!(vttbr_with_vmid(root | 0xffff << 48, Vmid(0)), root);
        assert_eq!(vttbr_with_vmid(root, Vmid(0xffff)), root | 0xffff << 48);
    }
}
