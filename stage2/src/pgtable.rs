//! Stage-2 translation tables (VMSAv8-64, 4 KiB granule).
//!
//! CONTRACT STUB: the signatures below are the agreed public API; the bodies
//! are being written. Do not depend on behaviour beyond the doc comments.

use crate::addr::{Hpa, Ipa, Vmid};
use crate::mm::TableMemory;
use crate::tlb::TlbMaintenance;

/// Access permissions of a stage-2 mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    /// Readable (S2AP[0]).
    pub read: bool,
    /// Writable (S2AP[1]).
    pub write: bool,
    /// Executable (XN clear).
    pub exec: bool,
}

impl Perms {
    /// Read, write and execute.
    pub const RWX: Self = Self { read: true, write: true, exec: true };
    /// Read and write, no execute.
    pub const RW: Self = Self { read: true, write: true, exec: false };
    /// Read only.
    pub const R: Self = Self { read: true, write: false, exec: false };
    /// Read and execute.
    pub const RX: Self = Self { read: true, write: false, exec: true };
}

/// Memory type of a stage-2 mapping (MemAttr).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Normal memory, inner and outer write-back cacheable.
    Normal,
    /// Device-nGnRE memory (MMIO).
    Device,
}

/// Ownership state of a page as seen through this table, kept in the
/// descriptor's software bits (pKVM's `PKVM_PAGE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// The table's owner has the page exclusively.
    Owned,
    /// The table's owner owns the page and has shared it with someone else.
    SharedOwned,
    /// The page belongs to someone else who shared it with this table's owner.
    SharedBorrowed,
}

/// Everything a leaf descriptor says apart from its output address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attrs {
    /// Access permissions.
    pub perms: Perms,
    /// Memory type.
    pub mem: MemType,
    /// Ownership annotation in the software bits.
    pub state: PageState,
}

/// How large a leaf [`Stage2::map`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granule {
    /// 4 KiB pages only.
    Page,
    /// Up to 2 MiB blocks.
    Block2M,
    /// The largest block that alignment and size allow (up to 1 GiB).
    Largest,
}

/// One valid leaf found by a query or a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First IPA the leaf maps.
    pub ipa: Ipa,
    /// Output address of `ipa`.
    pub hpa: Hpa,
    /// Size of the leaf in bytes (4 KiB, 2 MiB or 1 GiB).
    pub size: u64,
    /// Lookup level of the leaf (1, 2 or 3).
    pub level: u8,
    /// Attributes.
    pub attrs: Attrs,
    /// Access flag.
    pub young: bool,
}

/// Why a page-table operation failed. A failed operation changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not enough table memory for the worst case of the operation.
    NoMemory,
    /// An address or size is not page aligned, or the size is zero.
    Misaligned,
    /// The range leaves the IPA space, or the output address leaves the PA space.
    OutOfRange,
    /// Part of the range is already mapped.
    AlreadyMapped,
    /// The configuration (IPA size, PA size) is not supported.
    BadConfig,
}

/// Geometry of a stage-2 IPA space, derived from its size by the `VTCR_EL2` rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpaConfig {
    /// IPA size in bits (32..=48).
    pub ipa_bits: u8,
    /// Level of the root table (0, 1 or 2).
    pub start_level: u8,
    /// Number of concatenated root tables (1..=16).
    pub root_tables: usize,
}

/// A stage-2 translation table.
#[derive(Debug)]
pub struct Stage2<M: TableMemory, T: TlbMaintenance> {
    mm: M,
    tlb: T,
    vmid: Vmid,
    config: IpaConfig,
    root: Hpa,
}

impl<M: TableMemory, T: TlbMaintenance> Stage2<M, T> {
    /// Creates an empty table for `vmid` over an `ipa_bits` IPA space, with
    /// its root taken from `mm`.
    pub fn new(ipa_bits: u8, vmid: Vmid, mm: M, tlb: T) -> Result<Self, Error> {
        let _ = (ipa_bits, vmid, mm, tlb);
        unimplemented!()
    }

    /// Maps `[ipa, ipa + size)` to `[hpa, hpa + size)`; the whole range must
    /// be unmapped. Uses blocks up to `granule` where alignment allows.
    pub fn map(&mut self, ipa: Ipa, hpa: Hpa, size: u64, attrs: Attrs, granule: Granule) -> Result<(), Error> {
        let _ = (ipa, hpa, size, attrs, granule);
        unimplemented!()
    }

    /// Unmaps every leaf in `[ipa, ipa + size)`, splitting blocks that cross
    /// the edges, freeing tables that become empty. Holes are skipped.
    /// Returns the number of 4 KiB pages that were mapped and now are not.
    pub fn unmap(&mut self, ipa: Ipa, size: u64) -> Result<u64, Error> {
        let _ = (ipa, size);
        unimplemented!()
    }

    /// Sets the permissions of every leaf in `[ipa, ipa + size)`, splitting
    /// blocks that cross the edges. Holes are skipped. Returns the number of
    /// 4 KiB pages changed.
    pub fn protect(&mut self, ipa: Ipa, size: u64, perms: Perms) -> Result<u64, Error> {
        let _ = (ipa, size, perms);
        unimplemented!()
    }

    /// Splits every block in `[ipa, ipa + size)` into leaves of at most
    /// `granule`'s size, without changing what is mapped.
    pub fn split(&mut self, ipa: Ipa, size: u64, granule: Granule) -> Result<(), Error> {
        let _ = (ipa, size, granule);
        unimplemented!()
    }

    /// The leaf mapping `ipa`, if any.
    #[must_use]
    pub fn query(&self, ipa: Ipa) -> Option<Leaf> {
        let _ = ipa;
        unimplemented!()
    }

    /// Calls `f` for every valid leaf intersecting `[ipa, ipa + size)`, in
    /// IPA order.
    pub fn walk(&self, ipa: Ipa, size: u64, f: impl FnMut(&Leaf)) -> Result<(), Error> {
        let _ = (ipa, size, f);
        unimplemented!()
    }

    /// Clears the access flag of every leaf in the range; returns whether
    /// any was set. No TLB invalidation (as KVM's `test_clear_young`).
    pub fn test_and_clear_young(&mut self, ipa: Ipa, size: u64) -> Result<bool, Error> {
        let _ = (ipa, size);
        unimplemented!()
    }

    /// Frees every table including the root and returns the memory and TLB
    /// objects. Flushes the VMID.
    pub fn destroy(self) -> (M, T) {
        unimplemented!()
    }

    /// The VMID.
    #[must_use]
    pub fn vmid(&self) -> Vmid { self.vmid }
    /// The geometry.
    #[must_use]
    pub fn config(&self) -> IpaConfig { self.config }
    /// Physical address of the root table(s).
    #[must_use]
    pub fn root(&self) -> Hpa { self.root }
    /// `VTTBR_EL2` value: root address and VMID.
    #[must_use]
    pub fn vttbr(&self) -> u64 { self.root.raw() | (u64::from(self.vmid.0) << 48) }
    /// The table memory.
    #[must_use]
    pub fn mm(&self) -> &M { &self.mm }
    /// The table memory, mutably (e.g. to top up a memcache).
    pub fn mm_mut(&mut self) -> &mut M { &mut self.mm }
    /// The TLB maintenance object.
    #[must_use]
    pub fn tlb(&self) -> &T { &self.tlb }
    /// The TLB maintenance object, mutably.
    pub fn tlb_mut(&mut self) -> &mut T { &mut self.tlb }
}
