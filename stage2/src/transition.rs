//! Memory transitions: the ownership tracker and the stage-2 tables together.
//!
//! Each transition moves a range of pages between parties (see
//! `docs/DESIGN.md` / the page-state machine) and updates, all or nothing:
//!
//! * the [`PageTracker`] (owner and share count of each host page frame; it
//!   is the authoritative record of the *host's* view);
//! * the host's stage-2 (identity map of host-owned RAM, VMID 0): pages the
//!   host does not own are never mapped there. Host leaves always carry
//!   [`PageState::Owned`]; whether the host has shared a page is recorded in
//!   the tracker only (as Linux pKVM does since it moved the host state into
//!   the hyp vmemmap), so sharing does not rewrite host descriptors;
//! * a guest's stage-2: borrowed pages are mapped with
//!   [`PageState::SharedBorrowed`], donated pages with [`PageState::Owned`].
//!   A share or donation that covers a whole 2 MiB-aligned guest range
//!   whose host frames are 2 MiB-aligned too is mapped as one 2 MiB block
//!   ([`GUEST_GRANULE`]); everything else as 4 KiB pages. An unshare or
//!   reclaim of part of a block splits it (one table page from the guest's
//!   table memory, [`Error::NoMemory`] with nothing changed if there is
//!   none); the tracker stays per 4 KiB page either way.
//!
//! # All or nothing
//!
//! Every transition runs in two phases:
//!
//! 1. **Check.** Arguments, then the tracker for the whole range, then the
//!    guest's stage-2 for the whole range, then (as a consistency check) the
//!    host's stage-2, then table memory. Nothing is written.
//! 2. **Commit.** The stage-2 operations, then the tracker update (which
//!    cannot fail after the checks, as nothing else runs in between: the
//!    caller holds `&mut` to everything).
//!
//! `Stage2::map`/`unmap` fail with `NoMemory` *without any change*, so a
//! transition with one stage-2 operation simply does it first. Transitions
//! with two (donate, reclaim) must make sure the second cannot fail once the
//! first has happened; each says why in a comment. The argument rests on
//! [`map_tables_bound`], an upper bound on the tables a `map` can allocate,
//! checked against `TableMemory::available()` before committing, and on
//! `unmap` needing no table when no block crosses the edges of its range.
//! The host and guest tables are assumed to use separate table memories (as
//! two `Stage2` values owning their `M`), so an operation on one cannot
//! consume memory reserved for the other.
//!
//! # Order of errors
//!
//! Checks run in a fixed order, and the first failing one is reported: `nr
//! == 0` ([`Error::InvalidArgument`]), the host frame range
//! ([`Error::NotRam`]), the guest frame range ([`Error::OutOfRange`]), the
//! tracker page by page, the guest table page by page, the host table
//! ([`Error::Inconsistent`]), table memory ([`Error::NoMemory`]). The
//! reference model in `tests/ownership_common/mod.rs` follows the same order.

use crate::addr::{Gfn, Hpa, Ipa, Pfn, PAGE_SHIFT};
use crate::mm::TableMemory;
use crate::owner::{Error, Owner, PageTracker, PageView, TrackerView, VmId};
use crate::pgtable::{Attrs, Granule, IpaConfig, Leaf, MemType, PageState, Perms, Stage2};
use crate::tlb::TlbMaintenance;

/// Attributes of host RAM in the host's stage-2: read, write, execute (the
/// host's own stage-1 decides what is executable), Normal memory, owned.
pub const HOST_RAM_ATTRS: Attrs = Attrs {
    perms: Perms::RWX,
    mem: MemType::Normal,
    state: PageState::Owned,
};

/// The largest leaf a guest mapping made by [`share`] or [`donate`] uses:
/// 2 MiB blocks where the guest range covers a whole 2 MiB-aligned block and
/// the host frames are aligned alike (the frames of a range are contiguous
/// by construction), 4 KiB pages elsewhere.
pub const GUEST_GRANULE: Granule = Granule::Block2M;

/// A range of host page frames and the guest frames they are mapped at:
/// `pfn + i` at `gfn + i` for `i` in `0..nr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// First host page frame.
    pub pfn: Pfn,
    /// First guest frame.
    pub gfn: Gfn,
    /// Number of pages.
    pub nr: u64,
}

impl PageRange {
    /// `nr` pages from `pfn`, mapped at `gfn`.
    #[must_use]
    pub const fn new(pfn: Pfn, gfn: Gfn, nr: u64) -> Self {
        Self { pfn, gfn, nr }
    }
}

/// Upper bound on the number of tables [`Stage2::map`] can allocate to map
/// `[ipa, ipa + size)` (`size > 0`) in a table of geometry `config`: one
/// table per level below the root for every region that level's tables
/// cover (2 MiB for level 3, 1 GiB for level 2, 512 GiB for level 1) and the
/// range touches. A map can never need more, whatever is already mapped.
#[must_use]
pub fn map_tables_bound(config: IpaConfig, ipa: Ipa, size: u64) -> usize {
    if size == 0 {
        return 0;
    }
    let first = ipa.raw();
    let last = first.saturating_add(size - 1);
    let mut total: u64 = 0;
    for level in u32::from(config.start_level) + 1..=3 {
        // A table at `level` covers 512 entries of 4 KiB * 512^(3 - level).
        let shift = PAGE_SHIFT + 9 * (4 - level);
        total = total.saturating_add((last >> shift) - (first >> shift) + 1);
    }
    usize::try_from(total).unwrap_or(usize::MAX)
}

/// The host IPA (= host PA: the host's stage-2 is an identity map) of `pfn`.
fn host_ipa(pfn: Pfn) -> Ipa {
    Ipa(pfn.raw() << PAGE_SHIFT)
}

/// The host physical address of `pfn` (tracked RAM, so it fits).
fn host_pa(pfn: Pfn) -> Hpa {
    Hpa(pfn.raw() << PAGE_SHIFT)
}

/// The size of `nr` pages. Callers have checked `[pfn, pfn + nr)` against
/// the tracker, whose RAM ends below 2^64 bytes, so this cannot overflow.
fn pages_size(nr: u64) -> u64 {
    nr << PAGE_SHIFT
}

/// The guest IPA range of `[gfn, gfn + nr)`, if inside the guest's IPA space.
fn guest_span(config: IpaConfig, gfn: Gfn, nr: u64) -> Result<(Ipa, u64), Error> {
    let end = gfn.raw().checked_add(nr).ok_or(Error::OutOfRange)?;
    let limit = 1u64
        .checked_shl(u32::from(config.ipa_bits).saturating_sub(PAGE_SHIFT))
        .unwrap_or(u64::MAX);
    if end > limit {
        return Err(Error::OutOfRange);
    }
    Ok((Ipa(gfn.raw() << PAGE_SHIFT), pages_size(nr)))
}

/// Checks the arguments common to guest transitions: `nr`, the host range,
/// the guest range. Returns the guest IPA range.
fn check_guest_args<M: TableMemory, T: TlbMaintenance>(
    tracker: &PageTracker,
    guest: &Stage2<M, T>,
    r: PageRange,
) -> Result<(Ipa, u64), Error> {
    tracker.check_range(r.pfn, r.nr)?;
    guest_span(guest.config(), r.gfn, r.nr)
}

/// Guest check: nothing is mapped in `[ipa, ipa + size)`.
fn check_unmapped<M: TableMemory, T: TlbMaintenance>(
    s2: &Stage2<M, T>,
    ipa: Ipa,
    size: u64,
) -> Result<(), Error> {
    let mut mapped = false;
    s2.walk(ipa, size, |_| mapped = true)?;
    if mapped {
        Err(Error::AlreadyMapped)
    } else {
        Ok(())
    }
}

/// Guest check: every page of `[ipa, ipa + size)` is mapped, to the host
/// pages from `hpa` on in order, with ownership annotation `state`.
///
/// Reports the first failing page: [`Error::NotMapped`] for a hole,
/// [`Error::BadState`] for a page mapping another frame or with another
/// annotation.
fn check_mapped<M: TableMemory, T: TlbMaintenance>(
    s2: &Stage2<M, T>,
    ipa: Ipa,
    size: u64,
    hpa: Hpa,
    state: PageState,
) -> Result<(), Error> {
    let end = ipa.raw() + size;
    let mut next = ipa.raw();
    let mut err = None;
    s2.walk(ipa, size, |leaf| {
        if err.is_some() {
            return;
        }
        let start = leaf.ipa.raw().max(ipa.raw());
        if start > next {
            err = Some(Error::NotMapped);
            return;
        }
        // The leaf is linear, as is the wanted mapping: they agree on every
        // page of the overlap iff they have the same IPA -> PA offset.
        let offset_ok =
            leaf.hpa.raw().wrapping_sub(leaf.ipa.raw()) == hpa.raw().wrapping_sub(ipa.raw());
        if !offset_ok || leaf.attrs.state != state {
            err = Some(Error::BadState);
            return;
        }
        next = leaf.ipa.raw().saturating_add(leaf.size).min(end);
    })?;
    match err {
        Some(e) => Err(e),
        None if next < end => Err(Error::NotMapped),
        None => Ok(()),
    }
}

/// Host consistency check for pages the tracker says the host owns: each is
/// either identity-mapped as owned or (lazily) not mapped at all.
fn check_host_owned<M: TableMemory, T: TlbMaintenance>(
    host: &Stage2<M, T>,
    ipa: Ipa,
    size: u64,
) -> Result<(), Error> {
    let mut ok = true;
    host.walk(ipa, size, |leaf| {
        ok &= leaf.hpa.raw() == leaf.ipa.raw() && leaf.attrs.state == PageState::Owned;
    })
    .map_err(|_| Error::Inconsistent)?;
    if ok {
        Ok(())
    } else {
        Err(Error::Inconsistent)
    }
}

/// Host consistency check for pages the host does not own: none is mapped.
fn check_host_unmapped<M: TableMemory, T: TlbMaintenance>(
    host: &Stage2<M, T>,
    ipa: Ipa,
    size: u64,
) -> Result<(), Error> {
    match check_unmapped(host, ipa, size) {
        Ok(()) => Ok(()),
        Err(_) => Err(Error::Inconsistent),
    }
}

/// Memory check: a later `map` of `[ipa, ipa + size)` in `s2` cannot fail
/// for lack of table memory.
fn ensure_map_memory<M: TableMemory, T: TlbMaintenance>(
    s2: &Stage2<M, T>,
    ipa: Ipa,
    size: u64,
) -> Result<(), Error> {
    if s2.mm().available() < map_tables_bound(s2.config(), ipa, size) {
        Err(Error::NoMemory)
    } else {
        Ok(())
    }
}

/// Shares host pages with a guest: host OWNED or SHARED_OWNED ->
/// SHARED_OWNED with one more borrow each; guest frames (unmapped) ->
/// SHARED_BORROWED mappings with `perms`. The host keeps its access.
///
/// Errors, in check order: [`Error::InvalidArgument`] (`nr == 0`),
/// [`Error::NotRam`], [`Error::OutOfRange`] (guest range),
/// [`Error::BadState`] (a page not owned by the host) or
/// [`Error::Overflow`] (share limit), [`Error::AlreadyMapped`] (a guest
/// frame is mapped), [`Error::NoMemory`] (guest tables). A failed call
/// changed nothing.
pub fn share<GM: TableMemory, GT: TlbMaintenance>(
    tracker: &mut PageTracker,
    guest: &mut Stage2<GM, GT>,
    r: PageRange,
    perms: Perms,
) -> Result<(), Error> {
    let (ipa, size) = check_guest_args(tracker, guest, r)?;
    tracker.check_share(r.pfn, r.nr)?;

    // Commit. The guest map is the only operation that can fail, with no
    // change: `AlreadyMapped` (a guest frame is mapped) before `NoMemory`,
    // which is the check order; the tracker update cannot fail after
    // check_share.
    let attrs = Attrs {
        perms,
        mem: MemType::Normal,
        state: PageState::SharedBorrowed,
    };
    guest.map(ipa, host_pa(r.pfn), size, attrs, GUEST_GRANULE)?;
    tracker.share(r.pfn, r.nr).map_err(|_| Error::Inconsistent)
}

/// Ends shares: the guest frames must map exactly these host pages as
/// SHARED_BORROWED; the mappings are removed and each page loses one
/// borrow (the host's view goes back to OWNED at zero).
///
/// Errors, in check order: [`Error::InvalidArgument`], [`Error::NotRam`],
/// [`Error::OutOfRange`], [`Error::BadState`] (a page not shared by the
/// host), [`Error::NotMapped`] / [`Error::BadState`] (a guest frame not
/// mapped / mapping something else), [`Error::NoMemory`] (only if a guest
/// block crosses the range's edges and must be split). A failed call changed
/// nothing.
pub fn unshare<GM: TableMemory, GT: TlbMaintenance>(
    tracker: &mut PageTracker,
    guest: &mut Stage2<GM, GT>,
    r: PageRange,
) -> Result<(), Error> {
    let (ipa, size) = check_guest_args(tracker, guest, r)?;
    tracker.check_unshare(r.pfn, r.nr)?;
    let hpa = host_pa(r.pfn);
    check_mapped(guest, ipa, size, hpa, PageState::SharedBorrowed)?;

    // Commit: one fallible stage-2 operation first, then the tracker.
    guest.unmap(ipa, size)?;
    tracker
        .unshare(r.pfn, r.nr)
        .map_err(|_| Error::Inconsistent)
}

/// Above this many leaves, [`unshare_range`] invalidates the guest's TLB
/// with one whole-VMID invalidation instead of one invalidation by IPA per
/// leaf (and per emptied table). A broadcast invalidation by IPA is a
/// message to every CPU of the inner-shareable domain; past a few dozen
/// of them, letting the guest walk its other translations again after one
/// VMID-wide invalidation is the cheaper side (Linux's x86 TLB code draws
/// the same line at 33 single-page flushes).
pub const UNSHARE_RANGE_PER_IPA_MAX: u64 = 32;

/// Ends the shares of every mapped guest frame of `[gfn, gfn + nr)`,
/// whatever host frame each maps: for each leaf in the range, what
/// [`unshare`] does to its pages (guest mapping removed, each frame loses
/// one borrow). Holes are skipped. Returns the number of pages unshared.
///
/// Errors, in check order: [`Error::InvalidArgument`] (`nr == 0`),
/// [`Error::OutOfRange`] (guest range), [`Error::BadState`] (a mapped page
/// of the range is not SHARED_BORROWED, e.g. donated), [`Error::Inconsistent`]
/// (the tracker does not record the borrow of a frame the guest maps
/// SHARED_BORROWED: a bug), [`Error::NoMemory`] (a block crossing an edge
/// of the range must be split and table memory is short). Every check
/// covers the whole range before the first change: a failed call changed
/// nothing.
///
/// TLB: up to [`UNSHARE_RANGE_PER_IPA_MAX`] leaves, one invalidation by
/// IPA per broken descriptor, as [`Stage2::unmap`] of a small range; more
/// leaves, one whole-VMID invalidation for the call
/// ([`Stage2::unmap_flush_vmid`]).
pub fn unshare_range<GM: TableMemory, GT: TlbMaintenance>(
    tracker: &mut PageTracker,
    guest: &mut Stage2<GM, GT>,
    gfn: Gfn,
    nr: u64,
) -> Result<u64, Error> {
    if nr == 0 {
        return Err(Error::InvalidArgument);
    }
    let (ipa, size) = guest_span(guest.config(), gfn, nr)?;
    let end = ipa.raw() + size;
    // The part of `leaf` inside the range: (first frame, pages).
    let run = |leaf: &Leaf| {
        let a = leaf.ipa.raw().max(ipa.raw());
        let b = (leaf.ipa.raw() + leaf.size).min(end);
        let pfn = Pfn((leaf.hpa.raw() + (a - leaf.ipa.raw())) >> PAGE_SHIFT);
        (pfn, (b - a) >> PAGE_SHIFT)
    };

    // Check: every mapped page SHARED_BORROWED, and the tracker agrees.
    let mut err = None;
    let mut leaves: u64 = 0;
    let mut pages: u64 = 0;
    guest.walk(ipa, size, |leaf| {
        if err.is_some() {
            return;
        }
        if leaf.attrs.state != PageState::SharedBorrowed {
            err = Some(Error::BadState);
            return;
        }
        let (pfn, n) = run(leaf);
        if tracker.check_unshare(pfn, n).is_err() {
            err = Some(Error::Inconsistent);
            return;
        }
        leaves += 1;
        pages += n;
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    if pages == 0 {
        return Ok(0);
    }
    if guest.unmap_tables_needed(ipa, size)? > guest.mm().available() {
        return Err(Error::NoMemory);
    }

    // Commit. The tracker first (it cannot fail after the checks: each
    // borrow is counted once per mapping), then the guest unmap, which
    // cannot fail with the memory checked above. The caller holds `&mut`
    // to both, so nobody sees the state in between.
    let mut broken = false;
    guest.walk(ipa, size, |leaf| {
        let (pfn, n) = run(leaf);
        broken |= tracker.unshare(pfn, n).is_err();
    })?;
    let unmapped = if leaves > UNSHARE_RANGE_PER_IPA_MAX {
        guest.unmap_flush_vmid(ipa, size)
    } else {
        guest.unmap(ipa, size)
    };
    match unmapped {
        Ok(n) if n == pages && !broken => Ok(pages),
        _ => Err(Error::Inconsistent),
    }
}

/// Donates host pages to a VM: host OWNED (not shared) -> owner `vm`, the
/// host's stage-2 unmaps them; guest frames (unmapped) -> OWNED mappings
/// with `perms`.
///
/// Errors, in check order: [`Error::InvalidArgument`], [`Error::NotRam`],
/// [`Error::OutOfRange`], [`Error::BadState`] (a page not exclusively
/// host-owned), [`Error::AlreadyMapped`], [`Error::Inconsistent`],
/// [`Error::NoMemory`] (guest tables, or host tables to split a block). A
/// failed call changed nothing.
pub fn donate<HM, HT, GM, GT>(
    tracker: &mut PageTracker,
    host: &mut Stage2<HM, HT>,
    vm: VmId,
    guest: &mut Stage2<GM, GT>,
    r: PageRange,
    perms: Perms,
) -> Result<(), Error>
where
    HM: TableMemory,
    HT: TlbMaintenance,
    GM: TableMemory,
    GT: TlbMaintenance,
{
    let (gipa, size) = check_guest_args(tracker, guest, r)?;
    tracker.check_transfer(r.pfn, r.nr, Owner::Host)?;
    check_unmapped(guest, gipa, size)?;
    let hipa = host_ipa(r.pfn);
    check_host_owned(host, hipa, size)?;
    // The guest map comes second; with this much memory it cannot fail
    // (exactly the tables it will add: the host unmap does not touch the
    // guest's tables or memory).
    let attrs = Attrs {
        perms,
        mem: MemType::Normal,
        state: PageState::Owned,
    };
    let needed = guest.map_tables_needed(gipa, host_pa(r.pfn), size, attrs, GUEST_GRANULE)?;
    if guest.mm().available() < needed {
        return Err(Error::NoMemory);
    }

    // Commit. The host loses access before the guest gains it, so no
    // instant has both able to write the page.
    //
    // 1. Host unmap: may need memory to split a host block at the range's
    //    edges; if it fails, nothing changed.
    host.unmap(hipa, size)?;
    // 2. Guest map: needs the tables counted above, which the guest memory
    //    had, and the host unmap did not touch the guest's tables or memory.
    //    So this cannot fail; should it anyway (a broken count), give the
    //    host its pages back and report the inconsistency.
    if guest
        .map(gipa, host_pa(r.pfn), size, attrs, GUEST_GRANULE)
        .is_err()
    {
        let _ = host.map(hipa, host_pa(r.pfn), size, HOST_RAM_ATTRS, Granule::Page);
        return Err(Error::Inconsistent);
    }
    tracker
        .transfer(r.pfn, r.nr, Owner::Host, Owner::Vm(vm))
        .map_err(|_| Error::Inconsistent)
}

/// Takes donated pages back from a VM: the pages must be owned by `vm` and
/// mapped OWNED at the guest frames. The guest mappings are removed, each
/// page is passed to `zero` (which must clear it), the host owns the pages
/// again and its stage-2 maps them.
///
/// Errors, in check order: [`Error::InvalidArgument`], [`Error::NotRam`],
/// [`Error::OutOfRange`], [`Error::BadState`] (a page not owned by `vm`),
/// [`Error::NotMapped`] / [`Error::BadState`] (guest frame not mapped /
/// mapping something else), [`Error::Inconsistent`], [`Error::NoMemory`]
/// (host tables, or guest tables to split a block). A failed call changed
/// nothing and zeroed nothing.
pub fn reclaim<HM, HT, GM, GT>(
    tracker: &mut PageTracker,
    host: &mut Stage2<HM, HT>,
    vm: VmId,
    guest: &mut Stage2<GM, GT>,
    r: PageRange,
    mut zero: impl FnMut(Pfn),
) -> Result<(), Error>
where
    HM: TableMemory,
    HT: TlbMaintenance,
    GM: TableMemory,
    GT: TlbMaintenance,
{
    let (gipa, size) = check_guest_args(tracker, guest, r)?;
    tracker.check_transfer(r.pfn, r.nr, Owner::Vm(vm))?;
    let hipa = host_ipa(r.pfn);
    check_mapped(guest, gipa, size, host_pa(r.pfn), PageState::Owned)?;
    check_host_unmapped(host, hipa, size)?;
    // The host map comes last; with this much memory it cannot fail.
    ensure_map_memory(host, hipa, size)?;

    // Commit, in the only safe order: the guest loses access, the pages are
    // cleared, and only then can the host see them.
    //
    // 1. Guest unmap: needs memory only to split a guest block crossing the
    //    range's edges; if it fails, nothing changed.
    guest.unmap(gipa, size)?;
    // 2. Zero. Nothing can fail from here on.
    for i in 0..r.nr {
        zero(Pfn(r.pfn.raw() + i));
    }
    tracker
        .transfer(r.pfn, r.nr, Owner::Vm(vm), Owner::Host)
        .map_err(|_| Error::Inconsistent)?;
    // 3. Host map: at most map_tables_bound tables, available above, and the
    //    guest unmap did not touch the host's memory: cannot fail. Were the
    //    bound broken, the pages would stay host-owned but unmapped, which
    //    the host's stage-2 tolerates (lazy mapping); report it.
    host.map(hipa, host_pa(r.pfn), size, HOST_RAM_ATTRS, Granule::Page)
        .map_err(|_| Error::Inconsistent)
}

/// Donates host pages to the hypervisor (page-table memory, VM metadata):
/// host OWNED (not shared) -> owner hyp; the host's stage-2 unmaps them.
///
/// Errors: [`Error::InvalidArgument`], [`Error::NotRam`],
/// [`Error::BadState`], [`Error::Inconsistent`], [`Error::NoMemory`] (host
/// tables to split a block). A failed call changed nothing.
pub fn donate_to_hyp<HM: TableMemory, HT: TlbMaintenance>(
    tracker: &mut PageTracker,
    host: &mut Stage2<HM, HT>,
    pfn: Pfn,
    nr: u64,
) -> Result<(), Error> {
    tracker.check_range(pfn, nr)?;
    tracker.check_transfer(pfn, nr, Owner::Host)?;
    let (ipa, size) = (host_ipa(pfn), pages_size(nr));
    check_host_owned(host, ipa, size)?;
    // Commit: one fallible stage-2 operation first, then the tracker.
    host.unmap(ipa, size)?;
    tracker
        .transfer(pfn, nr, Owner::Host, Owner::Hyp)
        .map_err(|_| Error::Inconsistent)
}

/// Returns hypervisor pages to the host: owner hyp -> host OWNED; each page
/// is passed to `zero` before the host's stage-2 maps it again.
///
/// Errors: [`Error::InvalidArgument`], [`Error::NotRam`],
/// [`Error::BadState`] (a page not owned by the hypervisor),
/// [`Error::Inconsistent`], [`Error::NoMemory`] (host tables). A failed call
/// changed nothing and zeroed nothing.
pub fn return_from_hyp<HM: TableMemory, HT: TlbMaintenance>(
    tracker: &mut PageTracker,
    host: &mut Stage2<HM, HT>,
    pfn: Pfn,
    nr: u64,
    mut zero: impl FnMut(Pfn),
) -> Result<(), Error> {
    tracker.check_range(pfn, nr)?;
    tracker.check_transfer(pfn, nr, Owner::Hyp)?;
    let (ipa, size) = (host_ipa(pfn), pages_size(nr));
    check_host_unmapped(host, ipa, size)?;
    ensure_map_memory(host, ipa, size)?;
    // Commit: zero before the host can see the pages. The map cannot fail
    // (memory ensured above), so the zeroing is never wasted on a failed
    // call; were the bound broken, the pages stay host-owned and unmapped.
    for i in 0..nr {
        zero(Pfn(pfn.raw() + i));
    }
    tracker
        .transfer(pfn, nr, Owner::Hyp, Owner::Host)
        .map_err(|_| Error::Inconsistent)?;
    host.map(ipa, host_pa(pfn), size, HOST_RAM_ATTRS, Granule::Page)
        .map_err(|_| Error::Inconsistent)
}

/// The host's view of `pfn` (the tracker is authoritative for it).
pub fn host_view(tracker: &PageTracker, pfn: Pfn) -> Result<PageView, Error> {
    Ok(match tracker.state(pfn, Owner::Host)? {
        TrackerView::Owned => PageView::Owned,
        TrackerView::SharedOwned => PageView::SharedOwned,
        // The host never borrows.
        TrackerView::None | TrackerView::MaybeBorrowed => PageView::None,
    })
}

/// VM `vm`'s view of whatever its frame `gfn` maps, checked against the
/// tracker: `None` if unmapped, else the host frame and the view.
///
/// Errors: [`Error::OutOfRange`] (gfn outside the IPA space),
/// [`Error::Inconsistent`] (the guest's annotation disagrees with the
/// tracker). Mappings of frames outside tracked RAM (MMIO) report the
/// guest's own annotation.
pub fn guest_view<GM: TableMemory, GT: TlbMaintenance>(
    tracker: &PageTracker,
    vm: VmId,
    guest: &Stage2<GM, GT>,
    gfn: Gfn,
) -> Result<Option<(Pfn, PageView)>, Error> {
    let (ipa, _) = guest_span(guest.config(), gfn, 1)?;
    let Some(leaf) = guest.query(ipa) else {
        return Ok(None);
    };
    let pfn = Pfn((leaf.hpa.raw() + (ipa.raw() - leaf.ipa.raw())) >> PAGE_SHIFT);
    let annotated = match leaf.attrs.state {
        PageState::Owned => PageView::Owned,
        PageState::SharedOwned => PageView::SharedOwned,
        PageState::SharedBorrowed => PageView::SharedBorrowed,
    };
    let Ok(info) = tracker.page(pfn) else {
        return Ok(Some((pfn, annotated)));
    };
    let consistent = match annotated {
        PageView::Owned => info.owner == Owner::Vm(vm) && info.shares == 0,
        PageView::SharedBorrowed => info.owner == Owner::Host && info.shares > 0,
        // VMs do not share their pages in this design.
        PageView::SharedOwned | PageView::None => false,
    };
    if consistent {
        Ok(Some((pfn, annotated)))
    } else {
        Err(Error::Inconsistent)
    }
}

/// Smallest window [`Teardown::step`] walks at once.
const WINDOW_MIN: u64 = 1 << 21;
/// Largest window [`Teardown::step`] grows to while skipping empty space.
const WINDOW_MAX: u64 = 1 << 39;
/// Leaves collected per walk.
const CHUNK: usize = 16;

/// What one [`Teardown::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeardownStep {
    /// Guest leaves removed.
    pub leaves: u64,
    /// 4 KiB pages those leaves covered (each one also a host leaf written
    /// for reclaimed pages).
    pub pages: u64,
}

/// How much one teardown step may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// Leaves until they cover this many pages, at least one leaf.
    AtLeastOne(u64),
    /// At most one leaf, and only if it covers at most this many pages.
    OneWithin(u64),
}

impl Budget {
    /// Whether a step that did `done` must stop.
    fn full(self, done: TeardownStep) -> bool {
        match self {
            Self::AtLeastOne(max) => done.leaves > 0 && done.pages >= max,
            Self::OneWithin(_) => done.leaves > 0,
        }
    }

    /// Whether a leaf of `pages` pages may be handled after `done`.
    fn fits(self, done: TeardownStep, pages: u64) -> bool {
        match self {
            Self::AtLeastOne(_) => true,
            Self::OneWithin(max) => done.pages.saturating_add(pages) <= max,
        }
    }
}

/// Bounded-step teardown of a VM's stage-2: every leaf is removed; borrowed
/// pages are unshared, donated pages zeroed and returned to the host,
/// mappings of non-RAM frames (MMIO) just removed.
///
/// Each [`step`](Self::step) handles leaves in IPA order until it has covered
/// its page budget, so the work done with the locks held is bounded. When
/// [`is_done`](Self::is_done), the guest table maps nothing and can be
/// destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Teardown {
    vm: VmId,
    /// Every IPA below the cursor has been emptied.
    cursor: u64,
    done: bool,
}

impl Teardown {
    /// Starts tearing down VM `vm`.
    #[must_use]
    pub fn new(vm: VmId) -> Self {
        Self {
            vm,
            cursor: 0,
            done: false,
        }
    }

    /// The VM being torn down.
    #[must_use]
    pub fn vm(&self) -> VmId {
        self.vm
    }

    /// Whether every leaf has been removed.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Removes leaves of `guest` (the stage-2 of [`vm`](Self::vm)) in IPA
    /// order until they cover `max_pages` 4 KiB pages (at least one leaf,
    /// even if larger), reclaiming or unsharing their pages. Each leaf is
    /// handled all or nothing; on error the leaves before it stay handled
    /// and the next step retries from the failing one.
    ///
    /// Errors: [`Error::NoMemory`] (host tables to map reclaimed pages back:
    /// top up and retry), [`Error::Inconsistent`] (a leaf disagrees with the
    /// tracker).
    pub fn step<HM, HT, GM, GT>(
        &mut self,
        tracker: &mut PageTracker,
        host: &mut Stage2<HM, HT>,
        guest: &mut Stage2<GM, GT>,
        max_pages: u64,
        zero: impl FnMut(Pfn),
    ) -> Result<TeardownStep, Error>
    where
        HM: TableMemory,
        HT: TlbMaintenance,
        GM: TableMemory,
        GT: TlbMaintenance,
    {
        self.run(tracker, host, guest, Budget::AtLeastOne(max_pages), zero)
    }

    /// Removes the next leaf of `guest` as [`step`](Self::step) does, but
    /// only if it covers at most `max_pages` 4 KiB pages: a larger leaf (a
    /// 2 MiB block when less than 512 pages of a caller's batch are left)
    /// is left for a later call, and the step returns with nothing done
    /// (`leaves == 0`) while [`is_done`](Self::is_done) stays false. With
    /// `max_pages` of 512 or more every guest leaf fits (guests have no
    /// leaves above 2 MiB), so a caller that starts each batch with at
    /// least 512 always makes progress. With `max_pages` 0 it changes
    /// nothing and only finds out whether a leaf is left (`is_done`).
    ///
    /// Errors as [`step`](Self::step).
    pub fn step_leaf<HM, HT, GM, GT>(
        &mut self,
        tracker: &mut PageTracker,
        host: &mut Stage2<HM, HT>,
        guest: &mut Stage2<GM, GT>,
        max_pages: u64,
        zero: impl FnMut(Pfn),
    ) -> Result<TeardownStep, Error>
    where
        HM: TableMemory,
        HT: TlbMaintenance,
        GM: TableMemory,
        GT: TlbMaintenance,
    {
        self.run(tracker, host, guest, Budget::OneWithin(max_pages), zero)
    }

    fn run<HM, HT, GM, GT>(
        &mut self,
        tracker: &mut PageTracker,
        host: &mut Stage2<HM, HT>,
        guest: &mut Stage2<GM, GT>,
        budget: Budget,
        mut zero: impl FnMut(Pfn),
    ) -> Result<TeardownStep, Error>
    where
        HM: TableMemory,
        HT: TlbMaintenance,
        GM: TableMemory,
        GT: TlbMaintenance,
    {
        let end = 1u64
            .checked_shl(u32::from(guest.config().ipa_bits))
            .unwrap_or(u64::MAX);
        let mut done = TeardownStep::default();
        let mut window = WINDOW_MIN;
        while self.cursor < end {
            if budget.full(done) {
                return Ok(done);
            }
            let start = self.cursor;
            let wend = start.saturating_add(window).min(end);
            let mut buf: [Option<Leaf>; CHUNK] = [None; CHUNK];
            let mut found = 0usize;
            guest
                .walk(Ipa(start), wend - start, |leaf| {
                    if let Some(slot) = buf.get_mut(found) {
                        *slot = Some(*leaf);
                    }
                    found += 1;
                })
                .map_err(|_| Error::Inconsistent)?;
            if found == 0 {
                // Skip empty space faster and faster.
                self.cursor = wend;
                window = window.saturating_mul(2).min(WINDOW_MAX);
                continue;
            }
            window = WINDOW_MIN;
            for leaf in buf.iter().flatten() {
                if budget.full(done) || !budget.fits(done, leaf.size >> PAGE_SHIFT) {
                    return Ok(done);
                }
                self.teardown_leaf(tracker, host, guest, leaf, &mut zero)?;
                done.leaves += 1;
                done.pages += leaf.size >> PAGE_SHIFT;
                self.cursor = self.cursor.max(leaf.ipa.raw().saturating_add(leaf.size));
            }
            if found <= CHUNK {
                // Everything in the window is gone.
                self.cursor = self.cursor.max(wend);
            }
        }
        self.done = true;
        Ok(done)
    }

    fn teardown_leaf<HM, HT, GM, GT>(
        &self,
        tracker: &mut PageTracker,
        host: &mut Stage2<HM, HT>,
        guest: &mut Stage2<GM, GT>,
        leaf: &Leaf,
        zero: &mut impl FnMut(Pfn),
    ) -> Result<(), Error>
    where
        HM: TableMemory,
        HT: TlbMaintenance,
        GM: TableMemory,
        GT: TlbMaintenance,
    {
        let nr = leaf.size >> PAGE_SHIFT;
        let r = PageRange::new(leaf.hpa.pfn(), leaf.ipa.gfn(), nr);
        let in_ram = tracker.check_range(r.pfn, nr).is_ok();
        let disjoint =
            r.pfn >= tracker.end() || r.pfn.raw().saturating_add(nr) <= tracker.base().raw();
        let result = match leaf.attrs.state {
            _ if disjoint => guest
                .unmap(leaf.ipa, leaf.size)
                .map(|_| ())
                .map_err(Error::from),
            PageState::SharedBorrowed if in_ram => unshare(tracker, guest, r),
            PageState::Owned if in_ram => reclaim(tracker, host, self.vm, guest, r, &mut *zero),
            _ => Err(Error::Inconsistent),
        };
        result.map_err(|e| match e {
            Error::NoMemory => Error::NoMemory,
            _ => Error::Inconsistent,
        })
    }
}
