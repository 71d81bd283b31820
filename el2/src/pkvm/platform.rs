//! The hardware the dispatcher needs, behind traits.
//!
//! At EL2 the binary implements these with the identity map and the TLB
//! instructions (it is the only place with `unsafe`); host tests and the
//! fuzzer use [`super::fake`].

use stage2::mm::Table;
use stage2::tlb::TlbMaintenance;
use stage2::{Pfn, Vmid};

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
}
