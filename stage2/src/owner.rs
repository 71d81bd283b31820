//! Page-ownership tracker: who owns each host page frame of RAM.
//!
//! One compact entry (8 bytes, no per-entry allocation) per page frame of
//! a RAM range `[base, base + nr_pages)`. An entry records the page's single
//! owner ([`Owner`]) and its exact share count: the number of guest stage-2
//! mappings that borrow the page. The owner's state is derived from the
//! count, so the two can never disagree:
//!
//! * count == 0: the owner has the page exclusively (OWNED);
//! * count > 0: the owner has shared it (SHARED_OWNED).
//!
//! Only the host shares pages (host -> VM); a page owned by the hypervisor or
//! by a VM always has count 0. A borrower's view (SHARED_BORROWED) lives in
//! the borrower's own stage-2 descriptor, so the tracker alone cannot say
//! *which* VM borrows a shared page: [`PageTracker::state`] answers
//! [`TrackerView::MaybeBorrowed`] for that case, and
//! [`crate::transition::guest_view`] resolves it through the guest table.
//!
//! Every mutating method checks the whole range first and changes nothing if
//! any page fails its check. The tracker is only the bookkeeping half of a
//! transition; [`crate::transition`] combines it with the stage-2 tables.

use alloc::vec::Vec;
use core::fmt;

use crate::addr::Pfn;
use crate::pgtable;

/// Identifier of a VM as the ownership tracker knows it.
///
/// This is the hypervisor's handle for a VM, not the hardware VMID
/// ([`crate::Vmid`]), which may be recycled; the EL2 layer keeps the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VmId(pub u16);

/// The single owner of a page frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// The host kernel.
    Host,
    /// The hypervisor itself (its page tables, VM metadata, ...).
    Hyp,
    /// A guest VM.
    Vm(VmId),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Hyp => f.write_str("hyp"),
            Self::Vm(id) => write!(f, "vm{}", id.0),
        }
    }
}

/// One party's view of a page (pKVM's `PKVM_PAGE_*` states plus "no page").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageView {
    /// The party owns the page exclusively.
    Owned,
    /// The party owns the page and has shared it with at least one VM.
    SharedOwned,
    /// The page belongs to someone else, who shared it with this party.
    SharedBorrowed,
    /// The party has no access to the page.
    None,
}

/// What the tracker alone can say about one party's view of a page.
///
/// The difference from [`PageView`]: whether a VM borrows a shared page is
/// recorded only in that VM's stage-2 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrackerView {
    /// The party owns the page exclusively.
    Owned,
    /// The party owns the page and has shared it.
    SharedOwned,
    /// The party certainly has no access: it is not the owner, and either
    /// the page is not shared or the party cannot borrow (only VMs borrow).
    None,
    /// The party is a VM that does not own the page, and the page is shared:
    /// the VM may or may not be one of the borrowers. Its stage-2 tells.
    MaybeBorrowed,
}

/// Why an ownership operation failed. A failed operation changed nothing.
///
/// The EL2 layer maps each variant to an ABI error code; the suggested errno
/// is given for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// A page frame of the range is not tracked RAM, or the frame range
    /// overflows (`-EINVAL`).
    NotRam,
    /// A guest frame range overflows or leaves the guest's IPA space
    /// (`-ERANGE`).
    OutOfRange,
    /// An argument is malformed: zero pages, a misaligned or unsupported
    /// request (`-EINVAL`).
    InvalidArgument,
    /// A page is not in the state the transition requires: wrong owner,
    /// shared when exclusive ownership is needed, not shared, or the guest
    /// maps it with the wrong ownership annotation (`-EPERM`).
    BadState,
    /// Not enough table memory for the stage-2 changes; top up the memcache
    /// and retry (`-ENOMEM`).
    NoMemory,
    /// A guest frame of the range is already mapped (`-EEXIST`).
    AlreadyMapped,
    /// A guest frame of the range is not mapped (`-ENOENT`).
    NotMapped,
    /// A share count would exceed the tracker's limit (`-EOVERFLOW`).
    Overflow,
    /// The stage-2 tables disagree with the tracker. This is a hypervisor
    /// bug, never the caller's doing; reported rather than panicking
    /// (`-EFAULT`).
    Inconsistent,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::NotRam => "page frame is not tracked RAM",
            Self::OutOfRange => "guest frame outside the IPA space",
            Self::InvalidArgument => "invalid argument",
            Self::BadState => "page not in the required state",
            Self::NoMemory => "not enough table memory",
            Self::AlreadyMapped => "guest frame already mapped",
            Self::NotMapped => "guest frame not mapped",
            Self::Overflow => "share count overflow",
            Self::Inconsistent => "stage-2 tables disagree with the ownership tracker",
        };
        f.write_str(s)
    }
}

impl From<pgtable::Error> for Error {
    fn from(e: pgtable::Error) -> Self {
        match e {
            pgtable::Error::NoMemory => Self::NoMemory,
            pgtable::Error::Misaligned | pgtable::Error::BadConfig => Self::InvalidArgument,
            pgtable::Error::OutOfRange => Self::OutOfRange,
            pgtable::Error::AlreadyMapped => Self::AlreadyMapped,
        }
    }
}

/// Everything the tracker records about one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageInfo {
    /// The owner.
    pub owner: Owner,
    /// Number of guest mappings borrowing the page (0 unless the owner is
    /// the host and has shared it).
    pub shares: u32,
}

impl PageInfo {
    /// The owner's own view: [`PageView::Owned`] or [`PageView::SharedOwned`].
    #[must_use]
    pub fn owner_view(&self) -> PageView {
        if self.shares == 0 {
            PageView::Owned
        } else {
            PageView::SharedOwned
        }
    }
}

const KIND_HOST: u8 = 0;
const KIND_HYP: u8 = 1;
const KIND_VM: u8 = 2;

/// Packed per-page record: 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Entry {
    /// Exact number of borrow mappings.
    shares: u32,
    /// The VM id when `kind == KIND_VM`, else 0.
    vm: u16,
    /// `KIND_HOST`, `KIND_HYP` or `KIND_VM`.
    kind: u8,
    _reserved: u8,
}

const _: () = assert!(core::mem::size_of::<Entry>() == 8);

impl Entry {
    const HOST: Self = Self::owned_by(Owner::Host);

    const fn owned_by(owner: Owner) -> Self {
        let (kind, vm) = match owner {
            Owner::Host => (KIND_HOST, 0),
            Owner::Hyp => (KIND_HYP, 0),
            Owner::Vm(id) => (KIND_VM, id.0),
        };
        Self {
            shares: 0,
            vm,
            kind,
            _reserved: 0,
        }
    }

    fn owner(self) -> Owner {
        match self.kind {
            KIND_HOST => Owner::Host,
            KIND_HYP => Owner::Hyp,
            // Only `owned_by` writes `kind`, so anything else is KIND_VM.
            _ => Owner::Vm(VmId(self.vm)),
        }
    }

    fn info(self) -> PageInfo {
        PageInfo {
            owner: self.owner(),
            shares: self.shares,
        }
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner(), self.shares)
    }
}

/// The ownership record of every page frame of one RAM range.
///
/// Created with every page owned exclusively by the host.
#[derive(Clone, PartialEq, Eq)]
pub struct PageTracker {
    base: Pfn,
    entries: Vec<Entry>,
    share_limit: u32,
}

impl fmt::Debug for PageTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTracker")
            .field("base", &self.base)
            .field("nr_pages", &self.entries.len())
            .field("share_limit", &self.share_limit)
            .finish_non_exhaustive()
    }
}

impl PageTracker {
    /// A tracker for RAM `[base, base + nr_pages)`, all of it host-owned.
    ///
    /// Errors: [`Error::InvalidArgument`] if `nr_pages` is 0,
    /// [`Error::NotRam`] if the range does not fit the physical address
    /// space, [`Error::NoMemory`] if the entry array cannot be allocated.
    pub fn new(base: Pfn, nr_pages: u64) -> Result<Self, Error> {
        Self::with_share_limit(base, nr_pages, u32::MAX)
    }

    /// As [`new`](Self::new), with at most `share_limit` borrow mappings per
    /// page (sharing beyond it fails with [`Error::Overflow`]). The EL2
    /// layer may lower the limit to bound per-page state; tests use it to
    /// reach the overflow path.
    pub fn with_share_limit(base: Pfn, nr_pages: u64, share_limit: u32) -> Result<Self, Error> {
        if nr_pages == 0 {
            return Err(Error::InvalidArgument);
        }
        let last = base.checked_add(nr_pages - 1).ok_or(Error::NotRam)?;
        // The frame after the last one must still be addressable, so that
        // `pfn + n` arithmetic on any tracked range cannot overflow.
        if last.checked_add(1).and_then(Pfn::hpa).is_none() {
            return Err(Error::NotRam);
        }
        let n = usize::try_from(nr_pages).map_err(|_| Error::NoMemory)?;
        let mut entries = Vec::new();
        entries.try_reserve_exact(n).map_err(|_| Error::NoMemory)?;
        entries.resize(n, Entry::HOST);
        Ok(Self {
            base,
            entries,
            share_limit,
        })
    }

    /// First tracked page frame.
    #[must_use]
    pub fn base(&self) -> Pfn {
        self.base
    }

    /// Number of tracked page frames.
    #[must_use]
    pub fn nr_pages(&self) -> u64 {
        self.entries.len() as u64
    }

    /// One past the last tracked page frame.
    #[must_use]
    pub fn end(&self) -> Pfn {
        Pfn(self.base.0 + self.nr_pages())
    }

    /// The per-page share limit.
    #[must_use]
    pub fn share_limit(&self) -> u32 {
        self.share_limit
    }

    /// Whether `pfn` is tracked RAM.
    #[must_use]
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn >= self.base && pfn < self.end()
    }

    /// Checks that `[pfn, pfn + nr)` is a non-empty range of tracked RAM.
    ///
    /// Errors: [`Error::InvalidArgument`] for `nr == 0`, [`Error::NotRam`]
    /// if any frame is outside RAM (or the range overflows).
    pub fn check_range(&self, pfn: Pfn, nr: u64) -> Result<(), Error> {
        self.slice_range(pfn, nr).map(|_| ())
    }

    /// Index range of `[pfn, pfn + nr)` in `entries`.
    fn slice_range(&self, pfn: Pfn, nr: u64) -> Result<core::ops::Range<usize>, Error> {
        if nr == 0 {
            return Err(Error::InvalidArgument);
        }
        let end = pfn.checked_add(nr).ok_or(Error::NotRam)?;
        if pfn < self.base || end > self.end() {
            return Err(Error::NotRam);
        }
        // Both fit in usize: they are at most `entries.len()`.
        let start = (pfn.0 - self.base.0) as usize;
        Ok(start..start + nr as usize)
    }

    fn entry(&self, pfn: Pfn) -> Result<Entry, Error> {
        let r = self.slice_range(pfn, 1)?;
        Ok(self.entries[r.start])
    }

    /// What the tracker records about `pfn`.
    pub fn page(&self, pfn: Pfn) -> Result<PageInfo, Error> {
        self.entry(pfn).map(Entry::info)
    }

    /// The owner of `pfn`.
    pub fn owner(&self, pfn: Pfn) -> Result<Owner, Error> {
        self.entry(pfn).map(Entry::owner)
    }

    /// The number of borrow mappings of `pfn`.
    pub fn shares(&self, pfn: Pfn) -> Result<u32, Error> {
        self.entry(pfn).map(|e| e.shares)
    }

    /// What the tracker alone knows of `who`'s view of `pfn`.
    pub fn state(&self, pfn: Pfn, who: Owner) -> Result<TrackerView, Error> {
        let e = self.entry(pfn)?;
        Ok(if e.owner() == who {
            if e.shares == 0 {
                TrackerView::Owned
            } else {
                TrackerView::SharedOwned
            }
        } else if e.shares > 0 && matches!(who, Owner::Vm(_)) {
            TrackerView::MaybeBorrowed
        } else {
            TrackerView::None
        })
    }

    /// Every tracked page with its record, in frame order.
    pub fn iter(&self) -> impl Iterator<Item = (Pfn, PageInfo)> + '_ {
        let base = self.base.0;
        self.entries
            .iter()
            .enumerate()
            .map(move |(i, e)| (Pfn(base + i as u64), e.info()))
    }

    /// Checks that every page of `[pfn, pfn + nr)` can be shared once more:
    /// owned by the host (exclusively or already shared) with a share count
    /// below the limit.
    ///
    /// Checked page by page in frame order; for each page ownership
    /// ([`Error::BadState`]) before the count ([`Error::Overflow`]).
    pub fn check_share(&self, pfn: Pfn, nr: u64) -> Result<(), Error> {
        let r = self.slice_range(pfn, nr)?;
        for e in &self.entries[r] {
            if e.owner() != Owner::Host {
                return Err(Error::BadState);
            }
            if e.shares >= self.share_limit {
                return Err(Error::Overflow);
            }
        }
        Ok(())
    }

    /// Records one more borrow mapping of every page of the range
    /// (host OWNED or SHARED_OWNED -> SHARED_OWNED). All or nothing; see
    /// [`check_share`](Self::check_share).
    pub fn share(&mut self, pfn: Pfn, nr: u64) -> Result<(), Error> {
        self.check_share(pfn, nr)?;
        let r = self.slice_range(pfn, nr)?;
        for e in &mut self.entries[r] {
            // Cannot overflow: checked against share_limit <= u32::MAX above.
            e.shares += 1;
        }
        Ok(())
    }

    /// Checks that every page of the range is a host page with at least one
    /// borrow mapping ([`Error::BadState`] otherwise).
    pub fn check_unshare(&self, pfn: Pfn, nr: u64) -> Result<(), Error> {
        let r = self.slice_range(pfn, nr)?;
        if self.entries[r]
            .iter()
            .any(|e| e.owner() != Owner::Host || e.shares == 0)
        {
            return Err(Error::BadState);
        }
        Ok(())
    }

    /// Records the removal of one borrow mapping of every page of the range
    /// (count 0 -> host OWNED again). All or nothing.
    pub fn unshare(&mut self, pfn: Pfn, nr: u64) -> Result<(), Error> {
        self.check_unshare(pfn, nr)?;
        let r = self.slice_range(pfn, nr)?;
        for e in &mut self.entries[r] {
            // Cannot underflow: checked non-zero above.
            e.shares -= 1;
        }
        Ok(())
    }

    /// Checks that every page of the range is owned exclusively by `from`
    /// (owner `from`, share count 0); [`Error::BadState`] otherwise.
    pub fn check_transfer(&self, pfn: Pfn, nr: u64, from: Owner) -> Result<(), Error> {
        let r = self.slice_range(pfn, nr)?;
        if self.entries[r]
            .iter()
            .any(|e| e.owner() != from || e.shares != 0)
        {
            return Err(Error::BadState);
        }
        Ok(())
    }

    /// Moves exclusive ownership of every page of the range from `from` to
    /// `to`. All or nothing; see [`check_transfer`](Self::check_transfer).
    pub fn transfer(&mut self, pfn: Pfn, nr: u64, from: Owner, to: Owner) -> Result<(), Error> {
        self.check_transfer(pfn, nr, from)?;
        let r = self.slice_range(pfn, nr)?;
        self.entries[r].fill(Entry::owned_by(to));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Pfn = Pfn(0x40000);
    const VM1: Owner = Owner::Vm(VmId(1));
    const VM2: Owner = Owner::Vm(VmId(2));

    fn tracker() -> PageTracker {
        PageTracker::new(BASE, 16).unwrap()
    }

    fn p(i: u64) -> Pfn {
        Pfn(BASE.0 + i)
    }

    #[test]
    fn entry_is_small() {
        assert_eq!(core::mem::size_of::<Entry>(), 8);
    }

    #[test]
    fn construction_checks_arguments() {
        assert_eq!(PageTracker::new(BASE, 0), Err(Error::InvalidArgument));
        assert_eq!(PageTracker::new(Pfn(u64::MAX), 2), Err(Error::NotRam));
        // The last frame whose successor is still addressable.
        let top = Pfn(u64::MAX >> crate::PAGE_SHIFT);
        assert_eq!(
            PageTracker::new(top, 1).map(|t| t.nr_pages()),
            Err(Error::NotRam)
        );
        let t = PageTracker::new(Pfn(top.0 - 1), 1).unwrap();
        assert_eq!(t.end(), top);
    }

    #[test]
    fn starts_host_owned() {
        let t = tracker();
        assert_eq!(t.nr_pages(), 16);
        assert_eq!(t.base(), BASE);
        assert_eq!(t.end(), p(16));
        for (pfn, info) in t.iter() {
            assert!(t.contains(pfn));
            assert_eq!(
                info,
                PageInfo {
                    owner: Owner::Host,
                    shares: 0
                }
            );
            assert_eq!(info.owner_view(), PageView::Owned);
            assert_eq!(t.state(pfn, Owner::Host), Ok(TrackerView::Owned));
            assert_eq!(t.state(pfn, Owner::Hyp), Ok(TrackerView::None));
            assert_eq!(t.state(pfn, VM1), Ok(TrackerView::None));
        }
        assert_eq!(t.iter().count(), 16);
    }

    #[test]
    fn range_checks() {
        let t = tracker();
        assert!(!t.contains(p(16)));
        assert!(!t.contains(Pfn(BASE.0 - 1)));
        assert_eq!(t.page(p(16)), Err(Error::NotRam));
        assert_eq!(t.owner(Pfn(BASE.0 - 1)), Err(Error::NotRam));
        assert_eq!(t.shares(Pfn(0)), Err(Error::NotRam));
        assert_eq!(t.state(p(16), Owner::Host), Err(Error::NotRam));
        assert_eq!(t.check_range(p(0), 16), Ok(()));
        assert_eq!(t.check_range(p(15), 1), Ok(()));
        assert_eq!(t.check_range(p(15), 2), Err(Error::NotRam));
        assert_eq!(t.check_range(p(0), 0), Err(Error::InvalidArgument));
        assert_eq!(t.check_range(p(3), u64::MAX), Err(Error::NotRam));
        assert_eq!(t.check_range(Pfn(BASE.0 - 1), 2), Err(Error::NotRam));
    }

    #[test]
    fn share_and_unshare_count_exactly() {
        let mut t = tracker();
        t.share(p(2), 3).unwrap();
        t.share(p(3), 1).unwrap();
        assert_eq!(t.shares(p(1)), Ok(0));
        assert_eq!(t.shares(p(2)), Ok(1));
        assert_eq!(t.shares(p(3)), Ok(2));
        assert_eq!(t.shares(p(4)), Ok(1));
        assert_eq!(t.shares(p(5)), Ok(0));
        assert_eq!(t.state(p(3), Owner::Host), Ok(TrackerView::SharedOwned));
        assert_eq!(t.page(p(3)).unwrap().owner_view(), PageView::SharedOwned);
        assert_eq!(t.state(p(3), VM1), Ok(TrackerView::MaybeBorrowed));
        assert_eq!(t.state(p(3), Owner::Hyp), Ok(TrackerView::None));

        t.unshare(p(3), 1).unwrap();
        assert_eq!(t.shares(p(3)), Ok(1));
        t.unshare(p(2), 3).unwrap();
        for i in 0..16 {
            assert_eq!(t.state(p(i), Owner::Host), Ok(TrackerView::Owned));
        }
        assert_eq!(t, tracker());
    }

    #[test]
    fn unshare_refuses_unshared_pages_without_change() {
        let mut t = tracker();
        t.share(p(0), 2).unwrap();
        let before = t.clone();
        // p(2) is not shared: the whole range is refused.
        assert_eq!(t.unshare(p(0), 3), Err(Error::BadState));
        assert_eq!(t, before);
        assert_eq!(t.unshare(p(15), 2), Err(Error::NotRam));
        assert_eq!(t.unshare(p(0), 0), Err(Error::InvalidArgument));
        assert_eq!(t, before);
    }

    #[test]
    fn share_overflow_is_checked() {
        let mut t = PageTracker::with_share_limit(BASE, 4, 2).unwrap();
        assert_eq!(t.share_limit(), 2);
        t.share(p(1), 1).unwrap();
        t.share(p(1), 1).unwrap();
        let before = t.clone();
        assert_eq!(t.share(p(0), 2), Err(Error::Overflow));
        assert_eq!(t, before);
        assert_eq!(t.share(p(0), 1), Ok(()));

        // The full u32 range: the last count is refused, not wrapped.
        let mut t = tracker();
        t.entries[0].shares = u32::MAX - 1;
        t.share(p(0), 1).unwrap();
        assert_eq!(t.shares(p(0)), Ok(u32::MAX));
        assert_eq!(t.share(p(0), 1), Err(Error::Overflow));
        assert_eq!(t.shares(p(0)), Ok(u32::MAX));
    }

    #[test]
    fn share_check_order_is_per_page() {
        let mut t = PageTracker::with_share_limit(BASE, 4, 1).unwrap();
        t.share(p(0), 1).unwrap();
        t.transfer(p(1), 1, Owner::Host, Owner::Hyp).unwrap();
        // Page 0 overflows before page 1's bad owner is seen.
        assert_eq!(t.check_share(p(0), 2), Err(Error::Overflow));
        assert_eq!(t.check_share(p(1), 2), Err(Error::BadState));
    }

    #[test]
    fn only_host_pages_are_shared() {
        let mut t = tracker();
        t.transfer(p(0), 1, Owner::Host, Owner::Hyp).unwrap();
        t.transfer(p(1), 1, Owner::Host, VM1).unwrap();
        assert_eq!(t.share(p(0), 1), Err(Error::BadState));
        assert_eq!(t.share(p(1), 1), Err(Error::BadState));
        assert_eq!(t.share(p(1), 2), Err(Error::BadState));
        assert_eq!(t.shares(p(2)), Ok(0));
        assert_eq!(t.unshare(p(0), 1), Err(Error::BadState));
        assert_eq!(t.unshare(p(1), 1), Err(Error::BadState));
    }

    #[test]
    fn transfer_between_every_owner() {
        let mut t = tracker();
        t.transfer(p(4), 2, Owner::Host, VM1).unwrap();
        assert_eq!(t.owner(p(4)), Ok(VM1));
        assert_eq!(t.owner(p(5)), Ok(VM1));
        assert_eq!(t.owner(p(6)), Ok(Owner::Host));
        assert_eq!(t.state(p(4), VM1), Ok(TrackerView::Owned));
        assert_eq!(t.state(p(4), VM2), Ok(TrackerView::None));
        assert_eq!(t.state(p(4), Owner::Host), Ok(TrackerView::None));

        // Wrong `from` is refused.
        assert_eq!(t.transfer(p(4), 1, VM2, Owner::Host), Err(Error::BadState));
        assert_eq!(t.transfer(p(4), 1, Owner::Host, VM2), Err(Error::BadState));
        t.transfer(p(4), 2, VM1, Owner::Host).unwrap();

        t.transfer(p(7), 1, Owner::Host, Owner::Hyp).unwrap();
        assert_eq!(t.state(p(7), Owner::Hyp), Ok(TrackerView::Owned));
        assert_eq!(t.state(p(7), Owner::Host), Ok(TrackerView::None));
        t.transfer(p(7), 1, Owner::Hyp, Owner::Host).unwrap();
        assert_eq!(t, tracker());
    }

    #[test]
    fn transfer_refuses_shared_pages_without_change() {
        let mut t = tracker();
        t.share(p(3), 1).unwrap();
        let before = t.clone();
        assert_eq!(t.transfer(p(0), 4, Owner::Host, VM1), Err(Error::BadState));
        assert_eq!(
            t.transfer(p(3), 1, Owner::Host, Owner::Hyp),
            Err(Error::BadState)
        );
        assert_eq!(
            t.transfer(p(14), 3, Owner::Host, Owner::Hyp),
            Err(Error::NotRam)
        );
        assert_eq!(t, before);
    }

    #[test]
    fn vm_ids_are_distinct_owners() {
        let mut t = tracker();
        t.transfer(p(0), 1, Owner::Host, Owner::Vm(VmId(0)))
            .unwrap();
        t.transfer(p(1), 1, Owner::Host, Owner::Vm(VmId(u16::MAX)))
            .unwrap();
        assert_eq!(t.owner(p(0)), Ok(Owner::Vm(VmId(0))));
        assert_eq!(t.owner(p(1)), Ok(Owner::Vm(VmId(u16::MAX))));
        assert_eq!(
            t.transfer(p(0), 1, Owner::Vm(VmId(u16::MAX)), Owner::Host),
            Err(Error::BadState)
        );
    }

    #[test]
    fn pgtable_errors_map() {
        assert_eq!(Error::from(pgtable::Error::NoMemory), Error::NoMemory);
        assert_eq!(
            Error::from(pgtable::Error::AlreadyMapped),
            Error::AlreadyMapped
        );
        assert_eq!(Error::from(pgtable::Error::OutOfRange), Error::OutOfRange);
        assert_eq!(
            Error::from(pgtable::Error::Misaligned),
            Error::InvalidArgument
        );
        assert_eq!(
            Error::from(pgtable::Error::BadConfig),
            Error::InvalidArgument
        );
    }
}
