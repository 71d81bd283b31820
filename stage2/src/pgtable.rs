//! Stage-2 translation tables (VMSAv8-64, 4 KiB granule).
//!
//! Descriptor encoding is in [`crate::desc`], IPA geometry and `VTCR_EL2`
//! in [`crate::vtcr`]. This module walks and changes the tables.
//!
//! # Leaves
//!
//! [`Stage2::map`] uses 1 GiB (level 1) and 2 MiB (level 2) blocks wherever
//! the [`Granule`] allows it, the IPA range covers the whole block and the
//! output address is aligned like the IPA; everything else is 4 KiB pages.
//! A partial [`unmap`](Stage2::unmap), [`protect`](Stage2::protect) or
//! [`set_state`](Stage2::set_state) splits the blocks crossing the range
//! edges: the new table keeps the block's other pages mapped with the same
//! attributes. Tables that become empty during an unmap are freed; the root
//! is never freed before [`destroy`](Stage2::destroy). Blocks are never
//! coalesced back.
//!
//! # Prepare, then commit
//!
//! Every changing operation first validates its arguments, then walks the
//! tables read-only to compute exactly how many tables it will allocate
//! (missing tables for `map`, block splits for the others). If
//! [`TableMemory::available`] is smaller it fails with [`Error::NoMemory`]
//! and nothing changed. Only then does it write. A failed operation never
//! changes a descriptor, allocates or frees a table, or touches the TLB.
//!
//! # Break-before-make and TLB maintenance (exact rule)
//!
//! Invalid -> valid writes (new mappings, linking a new table) need no TLB
//! maintenance and get none. New tables (fresh or from a split) are filled
//! completely before they are linked, so they are never live while being
//! written.
//!
//! Every change of a *valid* descriptor (removal, permission/state change,
//! block -> table split, removal of a table that became empty) is a break:
//! the descriptor is first made invalid, and the new value (if any) is
//! written only after the TLB was invalidated. Which invalidation is used
//! depends only on the size of the operation's range (and
//! [`unmap_flush_vmid`](Stage2::unmap_flush_vmid), which always batches):
//!
//! * **Per-IPA** (`size <= MAX_TLBI_OPS * 4 KiB`, i.e. at most 2 MiB): for each
//!   broken descriptor, in IPA order: write 0, `sync_writes()`,
//!   `invalidate_ipa(vmid, first IPA of the descriptor's span, level)`, then
//!   write the new value. `level` is the descriptor's level for a leaf (1, 2,
//!   3) and **0 (no TTL hint)** for a table descriptor removed because its
//!   table became empty; that removal comes right after the leaves of that
//!   table were invalidated.
//! * **Batched** (`size > 2 MiB`): every break first writes an invalid
//!   descriptor; then, if at least one valid descriptor was broken, exactly one
//!   `sync_writes()` and one `invalidate_vmid(vmid)`; then the new values are
//!   made valid and unlinked tables freed. No `invalidate_ipa` at all. A
//!   whole table covered by an unmap range is dropped with one break instead
//!   of clearing its entries one by one.
//!
//! Nothing is issued when nothing valid changes (e.g. unmapping a hole, or
//! protecting with the permissions already set).
//! [`test_and_clear_young`](Stage2::test_and_clear_young) only clears access
//! flags and issues no maintenance (as KVM). [`destroy`](Stage2::destroy)
//! issues one `invalidate_vmid` and then frees every table.
//!
//! Tables are freed only after the invalidation that removed the last
//! reference to them, so walk caches never point into reused memory.

use crate::addr::{Hpa, Ipa, Vmid, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE};
use crate::desc::{
    leaf_attr_bits, perm_bits, state_bits, Descriptor, AF, OA_MASK, PENDING, PERMS_MASK,
    SW_STATE_MASK, TABLE_COUNT_MASK, TABLE_COUNT_SHIFT, TABLE_OR_PAGE, VALID,
};
use crate::mm::{TableMemory, ENTRIES};
use crate::tlb::TlbMaintenance;
use crate::vtcr::MAX_PA_BITS;

/// Largest number of per-IPA invalidations an operation issues before it
/// switches to one whole-VMID invalidation (Linux's `MAX_TLBI_OPS`): an
/// operation whose range spans more than this many 4 KiB pages is batched.
pub const MAX_TLBI_OPS: u64 = 512;

/// TLB level hint used when a table descriptor (not a leaf) is removed.
pub const TLBI_LEVEL_TABLE: u8 = 0;

/// Largest range (bytes) still invalidated per IPA.
const PER_IPA_MAX_BYTES: u64 = MAX_TLBI_OPS * PAGE_SIZE;

/// Shift of the span of one entry at `level`.
const fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + 9 * (3 - level as u32)
}

/// Bytes mapped by one entry at `level`.
const fn level_span(level: u8) -> u64 {
    1 << level_shift(level)
}

/// Number of valid entries of the table a table descriptor points to.
#[inline]
const fn table_count(td: u64) -> u64 {
    (td & TABLE_COUNT_MASK) >> TABLE_COUNT_SHIFT
}

/// Index range `[i0, i1)` of the entries of a table at `level` whose span
/// starts at `tbase` that intersect `[a, b)`, which lies inside the table.
#[inline]
fn entry_range(level: u8, tbase: u64, a: u64, b: u64) -> (usize, usize) {
    let sh = level_shift(level);
    let i0 = ((a - tbase) >> sh) as usize;
    let i1 = (((b - 1 - tbase) >> sh) + 1) as usize;
    (i0, i1)
}

/// Access permissions of a stage-2 mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    /// Readable (S2AP\[0\]).
    pub read: bool,
    /// Writable (S2AP\[1\]).
    pub write: bool,
    /// Executable (XN clear).
    pub exec: bool,
}

impl Perms {
    /// Read, write and execute.
    pub const RWX: Self = Self {
        read: true,
        write: true,
        exec: true,
    };
    /// Read and write, no execute.
    pub const RW: Self = Self {
        read: true,
        write: true,
        exec: false,
    };
    /// Read only.
    pub const R: Self = Self {
        read: true,
        write: false,
        exec: false,
    };
    /// Read and execute.
    pub const RX: Self = Self {
        read: true,
        write: false,
        exec: true,
    };
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

impl Granule {
    /// The lowest level at which a leaf of this granule may be placed.
    #[must_use]
    pub const fn min_level(self) -> u8 {
        match self {
            Self::Page => 3,
            Self::Block2M => 2,
            Self::Largest => 1,
        }
    }
}

/// What a modifying walk does to leaves in its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Remove leaves.
    Unmap,
    /// Replace the bits under `mask` by `bits`.
    Set { mask: u64, bits: u64 },
    /// Split leaves above this level.
    Split(u8),
}

/// State of a modifying walk.
#[derive(Debug)]
struct Ctx {
    /// Batched invalidation (see the module docs).
    batch: bool,
    /// A valid descriptor was broken in batched mode.
    broke: bool,
    /// Pages removed or changed.
    pages: u64,
}

/// Parameters of a map.
#[derive(Clone, Copy, Debug)]
struct MapPlan {
    /// `hpa - ipa`, wrapping.
    off: u64,
    /// Lowest level a leaf may use.
    min_level: u8,
    /// Leaf bits apart from the address and the page bit.
    bits: u64,
}

impl MapPlan {
    /// Whether blocks may be used at `level` (1 or 2).
    #[inline]
    fn block_ok(&self, level: u8) -> bool {
        level >= self.min_level && self.off & (level_span(level) - 1) == 0
    }

    /// Whether an invalid entry at `level` spanning from `ebase` becomes a
    /// leaf when `[ea, eb)` of it is mapped.
    #[inline]
    fn leaf_ok(&self, level: u8, ebase: u64, ea: u64, eb: u64) -> bool {
        level == 3 || (self.block_ok(level) && ea == ebase && eb == ebase + level_span(level))
    }

    /// Tables allocated when mapping `[ea, eb)` through an invalid entry at
    /// `level` spanning from `ebase`.
    fn entry_cost(&self, level: u8, ebase: u64, ea: u64, eb: u64) -> usize {
        if self.leaf_ok(level, ebase, ea, eb) {
            0
        } else {
            1 + self.fresh_cost(level + 1, ebase, ea, eb)
        }
    }

    /// Tables allocated below a new table at `level` spanning from `tbase`
    /// when `[a, b)` is mapped into it.
    fn fresh_cost(&self, level: u8, tbase: u64, a: u64, b: u64) -> usize {
        if level == 3 {
            return 0;
        }
        let span = level_span(level);
        let (i0, i1) = entry_range(level, tbase, a, b);
        let first = tbase + ((i0 as u64) << level_shift(level));
        if i1 - i0 == 1 {
            return self.entry_cost(level, first, a, b);
        }
        let last = tbase + (((i1 - 1) as u64) << level_shift(level));
        let mut n =
            self.entry_cost(level, first, a, first + span) + self.entry_cost(level, last, last, b);
        if i1 - i0 > 2 {
            let mid = first + span;
            n += (i1 - i0 - 2) * self.entry_cost(level, mid, mid, mid + span);
        }
        n
    }
}

/// Tables needed to split a whole block at `level` down to leaves at
/// `min_level` or below.
fn full_split_cost(level: u8, min_level: u8) -> usize {
    if level >= min_level {
        0
    } else {
        1 + ENTRIES * full_split_cost(level + 1, min_level)
    }
}

/// Tables needed to split a block at `level` spanning from `ebase` and apply
/// `op` to `[ea, eb)` of it.
fn split_cost(level: u8, ebase: u64, ea: u64, eb: u64, op: Op) -> usize {
    let cl = level + 1;
    if cl == 3 {
        return 1;
    }
    let span = level_span(cl);
    let (c0, c1) = entry_range(cl, ebase, ea, eb);
    let first = ebase + ((c0 as u64) << level_shift(cl));
    let last = ebase + (((c1 - 1) as u64) << level_shift(cl));
    // Cost of one child leaf at `cl` intersecting `[ca, cb)`.
    let child = |cbase: u64, ca: u64, cb: u64| -> usize {
        let full = ca == cbase && cb == cbase + span;
        match op {
            Op::Split(min) if cl < min => {
                if full {
                    full_split_cost(cl, min)
                } else {
                    split_cost(cl, cbase, ca, cb, op)
                }
            }
            Op::Split(_) => 0,
            Op::Unmap | Op::Set { .. } => {
                if full {
                    0
                } else {
                    split_cost(cl, cbase, ca, cb, op)
                }
            }
        }
    };
    let mut n = 1;
    if c1 - c0 == 1 {
        return n + child(first, ea, eb);
    }
    n += child(first, ea, first + span) + child(last, last, eb);
    if c1 - c0 > 2 {
        if let Op::Split(min) = op {
            n += (c1 - c0 - 2) * full_split_cost(cl, min);
        }
    }
    n
}

impl<M: TableMemory, T: TlbMaintenance> Stage2<M, T> {
    /// Creates an empty table for `vmid` over an `ipa_bits` IPA space, with
    /// its root taken from `mm`.
    ///
    /// Fails with [`Error::BadConfig`] if `ipa_bits` is outside `32..=48`
    /// and [`Error::NoMemory`] if the root cannot be allocated. The root
    /// (1 to 16 concatenated tables, see [`crate::vtcr`]) is zeroed.
    pub fn new(ipa_bits: u8, vmid: Vmid, mut mm: M, tlb: T) -> Result<Self, Error> {
        let config = IpaConfig::new(ipa_bits)?;
        let root = if config.root_tables == 1 {
            mm.alloc_table()
        } else {
            mm.alloc_contiguous(config.root_tables)
        }
        .ok_or(Error::NoMemory)?;
        for k in 0..config.root_tables {
            mm.table_mut(root.wrapping_add(k as u64 * PAGE_SIZE))
                .fill(0);
        }
        Ok(Self {
            mm,
            tlb,
            vmid,
            config,
            root,
        })
    }

    /// Checks that `[ipa, ipa + size)` is a page-aligned, non-empty range
    /// inside the IPA space and returns its bounds.
    fn check_range(&self, ipa: Ipa, size: u64) -> Result<(u64, u64), Error> {
        if size == 0 || size & PAGE_MASK != 0 || !ipa.is_page_aligned() {
            return Err(Error::Misaligned);
        }
        let end = ipa.raw().checked_add(size).ok_or(Error::OutOfRange)?;
        if end > self.config.ipa_size() {
            return Err(Error::OutOfRange);
        }
        Ok((ipa.raw(), end))
    }

    /// Span of one root table (512 entries at the start level).
    fn root_table_span(&self) -> u64 {
        level_span(self.config.start_level) << 9
    }

    /// Address of root table `k`.
    fn root_table(&self, k: u64) -> Hpa {
        self.root.wrapping_add(k * PAGE_SIZE)
    }

    /// Takes one table page; the prepare step guarantees success.
    fn alloc(&mut self) -> Result<Hpa, Error> {
        // Only a `TableMemory` breaking its `available` contract gets here.
        self.mm.alloc_table().ok_or(Error::NoMemory)
    }

    // ----- map -----

    /// Maps `[ipa, ipa + size)` to `[hpa, hpa + size)`; the whole range must
    /// be unmapped. Uses blocks up to `granule` where alignment allows.
    ///
    /// Errors: [`Error::Misaligned`] (unaligned `ipa`, `hpa` or `size`, or
    /// `size == 0`), [`Error::OutOfRange`] (range beyond the IPA space or
    /// output beyond 48-bit PA), [`Error::AlreadyMapped`] (any valid leaf in
    /// the range), [`Error::NoMemory`]. On error nothing changed.
    pub fn map(
        &mut self,
        ipa: Ipa,
        hpa: Hpa,
        size: u64,
        attrs: Attrs,
        granule: Granule,
    ) -> Result<(), Error> {
        let (a, b, plan) = self.map_plan(ipa, hpa, size, attrs, granule)?;
        let needed = self.map_needed(a, b, &plan)?;
        if self.mm.available() < needed {
            return Err(Error::NoMemory);
        }
        let rl = self.config.start_level;
        let tspan = self.root_table_span();
        for k in a / tspan..=(b - 1) / tspan {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            self.map_commit(rl, self.root_table(k), tbase, ta, tb, &plan)?;
        }
        Ok(())
    }

    /// The table pages [`Self::map`] with the same arguments would take
    /// from the table memory now (exact: tables that already exist cost
    /// nothing). Changes nothing. Errors as [`Self::map`], but never
    /// [`Error::NoMemory`].
    pub fn map_tables_needed(
        &self,
        ipa: Ipa,
        hpa: Hpa,
        size: u64,
        attrs: Attrs,
        granule: Granule,
    ) -> Result<usize, Error> {
        let (a, b, plan) = self.map_plan(ipa, hpa, size, attrs, granule)?;
        self.map_needed(a, b, &plan)
    }

    /// Checks a map's arguments: the IPA range `[a, b)` and its plan.
    fn map_plan(
        &self,
        ipa: Ipa,
        hpa: Hpa,
        size: u64,
        attrs: Attrs,
        granule: Granule,
    ) -> Result<(u64, u64, MapPlan), Error> {
        if !hpa.is_page_aligned() {
            return Err(Error::Misaligned);
        }
        let (a, b) = self.check_range(ipa, size)?;
        match hpa.raw().checked_add(size) {
            Some(end) if end <= 1u64 << MAX_PA_BITS => {}
            _ => return Err(Error::OutOfRange),
        }
        let plan = MapPlan {
            off: hpa.raw().wrapping_sub(a),
            min_level: granule.min_level(),
            bits: leaf_attr_bits(attrs),
        };
        Ok((a, b, plan))
    }

    /// Tables needed to map `[a, b)` under every root table it touches.
    fn map_needed(&self, a: u64, b: u64, plan: &MapPlan) -> Result<usize, Error> {
        let rl = self.config.start_level;
        let tspan = self.root_table_span();
        let mut needed = 0;
        for k in a / tspan..=(b - 1) / tspan {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            needed += self.map_prepare(rl, self.root_table(k), tbase, ta, tb, plan)?;
        }
        Ok(needed)
    }

    /// Read-only: tables needed to map `[a, b)` into `table`, or
    /// `AlreadyMapped`.
    fn map_prepare(
        &self,
        level: u8,
        table: Hpa,
        tbase: u64,
        a: u64,
        b: u64,
        plan: &MapPlan,
    ) -> Result<usize, Error> {
        let (i0, i1) = entry_range(level, tbase, a, b);
        let t = self.mm.table(table);
        if level == 3 {
            return if t[i0..i1].iter().any(|&d| d & VALID != 0) {
                Err(Error::AlreadyMapped)
            } else {
                Ok(0)
            };
        }
        let sh = level_shift(level);
        let span = level_span(level);
        let mut n = 0;
        for (i, &d) in (i0..i1).zip(&t[i0..i1]) {
            let ebase = tbase + ((i as u64) << sh);
            let (ea, eb) = (a.max(ebase), b.min(ebase + span));
            if d & VALID == 0 {
                n += plan.entry_cost(level, ebase, ea, eb);
            } else if d & TABLE_OR_PAGE != 0 {
                n += self.map_prepare(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb, plan)?;
            } else {
                return Err(Error::AlreadyMapped);
            }
        }
        Ok(n)
    }

    /// Maps `[a, b)` into the existing `table` (all target entries invalid
    /// or tables, as checked by [`Self::map_prepare`]). Returns the number
    /// of entries of `table` that became valid.
    fn map_commit(
        &mut self,
        level: u8,
        table: Hpa,
        tbase: u64,
        a: u64,
        b: u64,
        plan: &MapPlan,
    ) -> Result<u64, Error> {
        let (i0, i1) = entry_range(level, tbase, a, b);
        if level == 3 {
            let t = self.mm.table_mut(table);
            let mut d = plan.bits | TABLE_OR_PAGE | (a.wrapping_add(plan.off) & OA_MASK);
            for e in &mut t[i0..i1] {
                *e = d;
                d += PAGE_SIZE;
            }
            return Ok((i1 - i0) as u64);
        }
        let mut added = 0;
        let sh = level_shift(level);
        let span = level_span(level);
        let mut i = i0;
        while i < i1 {
            let ebase = tbase + ((i as u64) << sh);
            let (ea, eb) = (a.max(ebase), b.min(ebase + span));
            if plan.leaf_ok(level, ebase, ea, eb) {
                // A run of blocks: every entry fully inside [a, b).
                let end = (((b - tbase) >> sh) as usize).min(i1);
                let t = self.mm.table_mut(table);
                let mut d = plan.bits | (ebase.wrapping_add(plan.off) & OA_MASK);
                for e in &mut t[i..end] {
                    *e = d;
                    d += span;
                }
                added += (end - i) as u64;
                i = end;
                continue;
            }
            let d = self.mm.table(table)[i];
            if d & VALID != 0 {
                let n = self.map_commit(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb, plan)?;
                self.mm.table_mut(table)[i] = d + (n << TABLE_COUNT_SHIFT);
            } else {
                let (new, n) = self.map_fresh(level + 1, ebase, ea, eb, plan)?;
                self.mm.table_mut(table)[i] = Descriptor::table_with_count(new, n).raw();
                added += 1;
            }
            i += 1;
        }
        Ok(added)
    }

    /// Builds a new, fully initialised table at `level` spanning from
    /// `tbase` that maps `[a, b)`, and returns it (not yet linked) with its
    /// number of valid entries.
    fn map_fresh(
        &mut self,
        level: u8,
        tbase: u64,
        a: u64,
        b: u64,
        plan: &MapPlan,
    ) -> Result<(Hpa, u64), Error> {
        // Only a `TableMemory` breaking its `available` contract fails here.
        let (new, zeroed) = self.mm.alloc_table_zeroed().ok_or(Error::NoMemory)?;
        let n;
        if level == 3 {
            let (i0, i1) = entry_range(level, tbase, a, b);
            let t = self.mm.table_mut(new);
            if !zeroed {
                t[..i0].fill(0);
            }
            let mut d = plan.bits | TABLE_OR_PAGE | (a.wrapping_add(plan.off) & OA_MASK);
            for e in &mut t[i0..i1] {
                *e = d;
                d += PAGE_SIZE;
            }
            if !zeroed {
                t[i1..].fill(0);
            }
            n = (i1 - i0) as u64;
        } else {
            if !zeroed {
                self.mm.table_mut(new).fill(0);
            }
            n = self.map_commit(level, new, tbase, a, b, plan)?;
        }
        Ok((new, n))
    }

    // ----- unmap / protect / set_state / split -----

    /// Runs a modifying operation over `[a, b)`: prepare, commit, and the
    /// batched invalidation and make pass if needed.
    /// `batch` forces the batched invalidation whatever the size (see
    /// [`unmap_flush_vmid`](Self::unmap_flush_vmid)); otherwise the size decides.
    fn modify_range(&mut self, a: u64, b: u64, op: Op, batch: bool) -> Result<u64, Error> {
        let rl = self.config.start_level;
        let tspan = self.root_table_span();
        let (k0, k1) = (a / tspan, (b - 1) / tspan);
        let needed = self.modify_needed(a, b, op);
        if self.mm.available() < needed {
            return Err(Error::NoMemory);
        }
        let mut cx = Ctx {
            batch: batch || b - a > PER_IPA_MAX_BYTES,
            broke: false,
            pages: 0,
        };
        for k in k0..=k1 {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            self.modify(rl, self.root_table(k), tbase, ta, tb, op, true, &mut cx)?;
        }
        if cx.broke {
            self.tlb.sync_writes();
            self.tlb.invalidate_vmid(self.vmid);
            let leaves = matches!(op, Op::Set { .. });
            for k in k0..=k1 {
                let tbase = k * tspan;
                let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
                cx.pages += self.finish(rl, self.root_table(k), tbase, ta, tb, leaves);
            }
        }
        Ok(cx.pages)
    }

    /// Read-only: tables `op` over `[a, b)` will allocate.
    fn modify_needed(&self, a: u64, b: u64, op: Op) -> usize {
        let rl = self.config.start_level;
        let tspan = self.root_table_span();
        let mut needed = 0;
        for k in a / tspan..=(b - 1) / tspan {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            needed += self.modify_prepare(rl, self.root_table(k), tbase, ta, tb, op);
        }
        needed
    }

    /// Read-only: tables `op` over `[a, b)` in `table` will allocate.
    fn modify_prepare(&self, level: u8, table: Hpa, tbase: u64, a: u64, b: u64, op: Op) -> usize {
        if level == 3 {
            return 0;
        }
        let (i0, i1) = entry_range(level, tbase, a, b);
        let sh = level_shift(level);
        let span = level_span(level);
        let t = self.mm.table(table);
        let mut n = 0;
        let visit = |i: usize, n: &mut usize| {
            let d = t[i];
            if d & VALID == 0 {
                return;
            }
            let ebase = tbase + ((i as u64) << sh);
            let (ea, eb) = (a.max(ebase), b.min(ebase + span));
            let full = ea == ebase && eb == ebase + span;
            if d & TABLE_OR_PAGE != 0 {
                let descend = match op {
                    Op::Split(min) => level + 1 < min,
                    Op::Unmap | Op::Set { .. } => !full,
                };
                if descend {
                    *n += self.modify_prepare(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb, op);
                }
                return;
            }
            match op {
                Op::Split(min) if level < min => {
                    *n += if full {
                        full_split_cost(level, min)
                    } else {
                        split_cost(level, ebase, ea, eb, op)
                    };
                }
                Op::Split(_) => {}
                Op::Set { mask, bits } if d & mask == bits => {}
                Op::Unmap | Op::Set { .. } => {
                    if !full {
                        *n += split_cost(level, ebase, ea, eb, op);
                    }
                }
            }
        };
        match op {
            Op::Split(_) => {
                for i in i0..i1 {
                    visit(i, &mut n);
                }
            }
            // Only the edge entries can be partially covered.
            Op::Unmap | Op::Set { .. } => {
                visit(i0, &mut n);
                if i1 - 1 > i0 {
                    visit(i1 - 1, &mut n);
                }
            }
        }
        n
    }

    /// Changes the valid descriptor `table[i]` (at `level`, spanning from
    /// `ebase`) to `new` (0: remove), with break-before-make if `live`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn replace(
        &mut self,
        table: Hpa,
        i: usize,
        ebase: u64,
        level: u8,
        new: u64,
        live: bool,
        cx: &mut Ctx,
    ) {
        let t = self.mm.table_mut(table);
        if !live {
            t[i] = new;
        } else if cx.batch {
            t[i] = if new == 0 {
                0
            } else {
                (new & !VALID) | PENDING
            };
            cx.broke = true;
        } else {
            t[i] = 0;
            self.tlb.sync_writes();
            self.tlb.invalidate_ipa(self.vmid, Ipa::new(ebase), level);
            if new != 0 {
                self.mm.table_mut(table)[i] = new;
            }
        }
    }

    /// Applies `op` to `[a, b)` in `table` at `level`. `live` says whether
    /// the table is reachable by hardware. Returns how many entries of
    /// `table` were removed (unmap only), for the count kept in the
    /// descriptor pointing at it.
    #[allow(clippy::too_many_arguments)]
    fn modify(
        &mut self,
        level: u8,
        table: Hpa,
        tbase: u64,
        a: u64,
        b: u64,
        op: Op,
        live: bool,
        cx: &mut Ctx,
    ) -> Result<u64, Error> {
        let (i0, i1) = entry_range(level, tbase, a, b);
        if level == 3 {
            Ok(self.modify_pages(table, tbase, i0, i1, op, live, cx))
        } else {
            self.modify_upper(level, table, tbase, a, b, (i0, i1), op, live, cx)
        }
    }

    /// [`Self::modify`] for a level-3 table, entries `i0..i1`.
    #[allow(clippy::too_many_arguments)]
    fn modify_pages(
        &mut self,
        table: Hpa,
        tbase: u64,
        i0: usize,
        i1: usize,
        op: Op,
        live: bool,
        cx: &mut Ctx,
    ) -> u64 {
        let (mask, bits) = match op {
            Op::Split(_) => return 0,
            Op::Unmap => (u64::MAX, 0),
            Op::Set { mask, bits } => (mask, bits),
        };
        if !live || cx.batch {
            let pending = if live { PENDING } else { 0 };
            let t = self.mm.table_mut(table);
            let mut n = 0;
            for e in &mut t[i0..i1] {
                let d = *e;
                if d & VALID != 0 && d & mask != bits {
                    n += 1;
                    *e = if op == Op::Unmap {
                        0
                    } else if live {
                        (((d & !mask) | bits) & !VALID) | pending
                    } else {
                        (d & !mask) | bits
                    };
                }
            }
            cx.pages += n;
            cx.broke |= live && n != 0;
            return if op == Op::Unmap { n } else { 0 };
        }
        // Per-IPA break-before-make.
        let Self { mm, tlb, vmid, .. } = self;
        let t = mm.table_mut(table);
        let mut n = 0;
        for (i, e) in (i0..i1).zip(&mut t[i0..i1]) {
            let d = *e;
            if d & VALID == 0 || d & mask == bits {
                continue;
            }
            n += 1;
            *e = 0;
            tlb.sync_writes();
            tlb.invalidate_ipa(*vmid, Ipa::new(tbase + ((i as u64) << PAGE_SHIFT)), 3);
            if op != Op::Unmap {
                *e = (d & !mask) | bits;
            }
        }
        cx.pages += n;
        if op == Op::Unmap {
            n
        } else {
            0
        }
    }

    /// [`Self::modify`] for a table at level 0..=2.
    #[allow(clippy::too_many_arguments)]
    fn modify_upper(
        &mut self,
        level: u8,
        table: Hpa,
        tbase: u64,
        a: u64,
        b: u64,
        (i0, i1): (usize, usize),
        op: Op,
        live: bool,
        cx: &mut Ctx,
    ) -> Result<u64, Error> {
        let sh = level_shift(level);
        let span = level_span(level);
        let mut removed = 0;
        for i in i0..i1 {
            let d = self.mm.table(table)[i];
            if d & VALID == 0 {
                continue;
            }
            let ebase = tbase + ((i as u64) << sh);
            let (ea, eb) = (a.max(ebase), b.min(ebase + span));
            let full = ea == ebase && eb == ebase + span;
            if d & TABLE_OR_PAGE != 0 {
                let child = Hpa::new(d & OA_MASK);
                match op {
                    Op::Unmap if full && live && cx.batch => {
                        // Drop the whole subtree; freed (and its pages
                        // counted) after the flush.
                        self.mm.table_mut(table)[i] = d & !VALID;
                        cx.broke = true;
                        removed += 1;
                        continue;
                    }
                    Op::Split(min) if level + 1 >= min => continue,
                    _ => {}
                }
                let r = self.modify(level + 1, child, ebase, ea, eb, op, live, cx)?;
                if r == 0 {
                    continue;
                }
                let left = table_count(d) - r;
                if left != 0 {
                    self.mm.table_mut(table)[i] = d - (r << TABLE_COUNT_SHIFT);
                    continue;
                }
                // The child table is empty: unlink it.
                removed += 1;
                let dead = d & !(VALID | TABLE_COUNT_MASK);
                if live && cx.batch {
                    self.mm.table_mut(table)[i] = dead;
                    cx.broke = true;
                } else {
                    self.mm.table_mut(table)[i] = 0;
                    if live {
                        self.tlb.sync_writes();
                        self.tlb
                            .invalidate_ipa(self.vmid, Ipa::new(ebase), TLBI_LEVEL_TABLE);
                    }
                    // Not batched, so every entry this operation removed
                    // was written 0, and an invalid entry is always 0
                    // between operations: the empty child is all zeros
                    // and the next table allocation need not clear it.
                    self.mm.free_zeroed_table(child);
                }
                continue;
            }
            // A block.
            match op {
                Op::Split(min) if level >= min => {}
                Op::Set { mask, bits } if d & mask == bits => {}
                Op::Unmap if full => {
                    cx.pages += span >> PAGE_SHIFT;
                    removed += 1;
                    self.replace(table, i, ebase, level, 0, live, cx);
                }
                Op::Set { mask, bits } if full => {
                    cx.pages += span >> PAGE_SHIFT;
                    self.replace(table, i, ebase, level, (d & !mask) | bits, live, cx);
                }
                _ => {
                    let (new, n) = self.split_block(level, d, ebase, ea, eb, op, cx)?;
                    let td = Descriptor::table_with_count(new, n).raw();
                    self.replace(table, i, ebase, level, td, live, cx);
                }
            }
        }
        Ok(removed)
    }

    /// Builds the table replacing block `d` at `level` spanning from
    /// `ebase`, with `op` already applied to `[ea, eb)` of it. Not linked.
    /// Returns it with its number of valid entries.
    #[allow(clippy::too_many_arguments)]
    fn split_block(
        &mut self,
        level: u8,
        d: u64,
        ebase: u64,
        ea: u64,
        eb: u64,
        op: Op,
        cx: &mut Ctx,
    ) -> Result<(Hpa, u64), Error> {
        let new = self.alloc()?;
        let cl = level + 1;
        let cspan = level_span(cl);
        let mut c = (d & !OA_MASK) | if cl == 3 { TABLE_OR_PAGE } else { 0 } | (d & OA_MASK);
        for e in self.mm.table_mut(new).iter_mut() {
            *e = c;
            c += cspan;
        }
        let removed = self.modify(cl, new, ebase, ea, eb, op, false, cx)?;
        Ok((new, ENTRIES as u64 - removed))
    }

    /// After a batched flush: makes pending descriptors in `[a, b)` valid and
    /// frees dropped subtrees. Descends to level 3 only if `leaves`. Returns
    /// the pages found in dropped subtrees.
    fn finish(&mut self, level: u8, table: Hpa, tbase: u64, a: u64, b: u64, leaves: bool) -> u64 {
        let (i0, i1) = entry_range(level, tbase, a, b);
        if level == 3 {
            for e in &mut self.mm.table_mut(table)[i0..i1] {
                if *e & PENDING != 0 {
                    *e = (*e & !PENDING) | VALID;
                }
            }
            return 0;
        }
        let sh = level_shift(level);
        let span = level_span(level);
        let mut pages = 0;
        for i in i0..i1 {
            let d = self.mm.table(table)[i];
            if d == 0 {
                continue;
            }
            if d & VALID != 0 {
                if d & TABLE_OR_PAGE != 0 && (leaves || level + 1 < 3) {
                    let ebase = tbase + ((i as u64) << sh);
                    let (ea, eb) = (a.max(ebase), b.min(ebase + span));
                    pages += self.finish(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb, leaves);
                }
            } else if d & PENDING != 0 {
                self.mm.table_mut(table)[i] = (d & !PENDING) | VALID;
            } else {
                self.mm.table_mut(table)[i] = 0;
                if d & TABLE_OR_PAGE != 0 {
                    pages += self.free_subtree(level + 1, d);
                }
            }
        }
        pages
    }

    /// Frees the table at `level` that table descriptor `td` (valid or
    /// not) points to, and every table below it; returns the number of
    /// pages its valid leaves mapped, from the counts kept in the table
    /// descriptors.
    fn free_subtree(&mut self, level: u8, td: u64) -> u64 {
        let table = Hpa::new(td & OA_MASK);
        let mut pages = 0;
        if level == 3 {
            pages = table_count(td);
        } else {
            let leaf_pages = level_span(level) >> PAGE_SHIFT;
            for i in 0..ENTRIES {
                let d = self.mm.table(table)[i];
                if d & TABLE_OR_PAGE != 0 {
                    pages += self.free_subtree(level + 1, d);
                } else if d & VALID != 0 {
                    pages += leaf_pages;
                }
            }
        }
        self.mm.free_table(table);
        pages
    }

    /// Unmaps every leaf in `[ipa, ipa + size)`, splitting blocks that cross
    /// the edges, freeing tables that become empty. Holes are skipped.
    /// Returns the number of 4 KiB pages that were mapped and now are not.
    pub fn unmap(&mut self, ipa: Ipa, size: u64) -> Result<u64, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        self.modify_range(a, b, Op::Unmap, false)
    }

    /// As [`unmap`](Self::unmap), but with the batched invalidation whatever
    /// the size of the range: every break first, then (if anything valid
    /// was broken) one `sync_writes` and one `invalidate_vmid`, then the
    /// frees. For callers that know the range holds many leaves, where one
    /// whole-VMID invalidation is cheaper than one per leaf.
    pub fn unmap_flush_vmid(&mut self, ipa: Ipa, size: u64) -> Result<u64, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        self.modify_range(a, b, Op::Unmap, true)
    }

    /// The table pages [`unmap`](Self::unmap) of `[ipa, ipa + size)` would
    /// take from table memory now: one per block crossing an edge of the
    /// range (split). Read-only; range errors as `unmap`'s.
    pub fn unmap_tables_needed(&self, ipa: Ipa, size: u64) -> Result<usize, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        Ok(self.modify_needed(a, b, Op::Unmap))
    }

    /// Sets the permissions of every leaf in `[ipa, ipa + size)`, splitting
    /// blocks that cross the edges. Holes are skipped. Returns the number of
    /// 4 KiB pages changed: pages that already had `perms` are not counted,
    /// not touched, and cause no split.
    pub fn protect(&mut self, ipa: Ipa, size: u64, perms: Perms) -> Result<u64, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        self.modify_range(
            a,
            b,
            Op::Set {
                mask: PERMS_MASK,
                bits: perm_bits(perms),
            },
            false,
        )
    }

    /// Sets the page state (software bits) of every leaf in
    /// `[ipa, ipa + size)`, like [`protect`](Self::protect) does for
    /// permissions (same splitting, same break-before-make, same count).
    pub fn set_state(&mut self, ipa: Ipa, size: u64, state: PageState) -> Result<u64, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        self.modify_range(
            a,
            b,
            Op::Set {
                mask: SW_STATE_MASK,
                bits: state_bits(state),
            },
            false,
        )
    }

    /// Splits every block in `[ipa, ipa + size)` into leaves of at most
    /// `granule`'s size, without changing what is mapped.
    ///
    /// A block crossing an edge of the range is split only as far as needed:
    /// the part outside the range stays in blocks as large as possible.
    pub fn split(&mut self, ipa: Ipa, size: u64, granule: Granule) -> Result<(), Error> {
        let (a, b) = self.check_range(ipa, size)?;
        self.modify_range(a, b, Op::Split(granule.min_level()), false)
            .map(|_| ())
    }

    // ----- read-only and access flags -----

    /// The leaf mapping `ipa`, if any.
    #[must_use]
    pub fn query(&self, ipa: Ipa) -> Option<Leaf> {
        let ipa = ipa.raw();
        if ipa >= self.config.ipa_size() {
            return None;
        }
        let mut level = self.config.start_level;
        let tspan = self.root_table_span();
        let mut table = self.root_table(ipa / tspan);
        loop {
            let sh = level_shift(level);
            let d = self.mm.table(table)[((ipa >> sh) & 511) as usize];
            if d & VALID == 0 {
                return None;
            }
            if level < 3 && d & TABLE_OR_PAGE != 0 {
                table = Hpa::new(d & OA_MASK);
                level += 1;
                continue;
            }
            return Some(leaf(level, ipa & !(level_span(level) - 1), d));
        }
    }

    /// Calls `f` for every valid leaf intersecting `[ipa, ipa + size)`, in
    /// IPA order. Errors as [`unmap`](Self::unmap)'s range checks.
    pub fn walk(&self, ipa: Ipa, size: u64, mut f: impl FnMut(&Leaf)) -> Result<(), Error> {
        let (a, b) = self.check_range(ipa, size)?;
        let tspan = self.root_table_span();
        for k in a / tspan..=(b - 1) / tspan {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            self.walk_table(
                self.config.start_level,
                self.root_table(k),
                tbase,
                ta,
                tb,
                &mut f,
            );
        }
        Ok(())
    }

    fn walk_table<F: FnMut(&Leaf)>(
        &self,
        level: u8,
        table: Hpa,
        tbase: u64,
        a: u64,
        b: u64,
        f: &mut F,
    ) {
        let (i0, i1) = entry_range(level, tbase, a, b);
        let sh = level_shift(level);
        let span = level_span(level);
        let t = self.mm.table(table);
        for (i, &d) in (i0..i1).zip(&t[i0..i1]) {
            if d & VALID == 0 {
                continue;
            }
            let ebase = tbase + ((i as u64) << sh);
            if level < 3 && d & TABLE_OR_PAGE != 0 {
                let (ea, eb) = (a.max(ebase), b.min(ebase + span));
                self.walk_table(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb, f);
            } else {
                f(&leaf(level, ebase, d));
            }
        }
    }

    /// Clears the access flag of every leaf in the range; returns whether
    /// any was set. No TLB invalidation (as KVM's `test_clear_young`). A
    /// block crossing the range edges is cleared as a whole.
    pub fn test_and_clear_young(&mut self, ipa: Ipa, size: u64) -> Result<bool, Error> {
        let (a, b) = self.check_range(ipa, size)?;
        let tspan = self.root_table_span();
        let mut young = false;
        for k in a / tspan..=(b - 1) / tspan {
            let tbase = k * tspan;
            let (ta, tb) = (a.max(tbase), b.min(tbase + tspan));
            young |= self.young_table(self.config.start_level, self.root_table(k), tbase, ta, tb);
        }
        Ok(young)
    }

    fn young_table(&mut self, level: u8, table: Hpa, tbase: u64, a: u64, b: u64) -> bool {
        let (i0, i1) = entry_range(level, tbase, a, b);
        let mut young = false;
        if level == 3 {
            for e in &mut self.mm.table_mut(table)[i0..i1] {
                if *e & (VALID | AF) == VALID | AF {
                    young = true;
                    *e &= !AF;
                }
            }
            return young;
        }
        let sh = level_shift(level);
        let span = level_span(level);
        for i in i0..i1 {
            let d = self.mm.table(table)[i];
            if d & VALID == 0 {
                continue;
            }
            if d & TABLE_OR_PAGE != 0 {
                let ebase = tbase + ((i as u64) << sh);
                let (ea, eb) = (a.max(ebase), b.min(ebase + span));
                young |= self.young_table(level + 1, Hpa::new(d & OA_MASK), ebase, ea, eb);
            } else if d & AF != 0 {
                young = true;
                self.mm.table_mut(table)[i] = d & !AF;
            }
        }
        young
    }

    /// Frees every table including the root and returns the memory and TLB
    /// objects. Flushes the VMID (one `invalidate_vmid`) before freeing.
    pub fn destroy(mut self) -> (M, T) {
        self.tlb.invalidate_vmid(self.vmid);
        let rl = self.config.start_level;
        for k in 0..self.config.root_tables {
            let table = self.root_table(k as u64);
            for i in 0..ENTRIES {
                let d = self.mm.table(table)[i];
                if rl < 3 && d & (VALID | TABLE_OR_PAGE) == VALID | TABLE_OR_PAGE {
                    self.free_subtree(rl + 1, d);
                }
            }
        }
        if self.config.root_tables == 1 {
            self.mm.free_table(self.root);
        } else {
            self.mm.free_contiguous(self.root, self.config.root_tables);
        }
        (self.mm, self.tlb)
    }

    /// The VMID.
    #[must_use]
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }
    /// The geometry.
    #[must_use]
    pub fn config(&self) -> IpaConfig {
        self.config
    }
    /// Physical address of the root table(s).
    #[must_use]
    pub fn root(&self) -> Hpa {
        self.root
    }
    /// `VTTBR_EL2` value: root address and VMID.
    #[must_use]
    pub fn vttbr(&self) -> u64 {
        self.root.raw() | (u64::from(self.vmid.0) << 48)
    }
    /// The table memory.
    #[must_use]
    pub fn mm(&self) -> &M {
        &self.mm
    }
    /// The table memory, mutably (e.g. to top up a memcache).
    pub fn mm_mut(&mut self) -> &mut M {
        &mut self.mm
    }
    /// The TLB maintenance object.
    #[must_use]
    pub fn tlb(&self) -> &T {
        &self.tlb
    }
    /// The TLB maintenance object, mutably.
    pub fn tlb_mut(&mut self) -> &mut T {
        &mut self.tlb
    }
}

/// The [`Leaf`] for descriptor `d` at `level` whose span starts at `ebase`.
fn leaf(level: u8, ebase: u64, d: u64) -> Leaf {
    let desc = Descriptor(d);
    Leaf {
        ipa: Ipa::new(ebase),
        hpa: desc.address(),
        size: level_span(level),
        level,
        attrs: desc.attrs(),
        young: desc.young(),
    }
}
