//! Guest 2 MiB blocks made by transitions: which calls make one, what a
//! split costs, that a split without table memory changes nothing, the TLB
//! sequence of a whole-block removal, and teardown's leaf budget.

use stage2::mm::ArenaMemory;
use stage2::owner::{Error, Owner, PageTracker, VmId};
use stage2::pgtable::{Granule, Leaf, PageState, Perms, Stage2};
use stage2::tlb::{RecordingTlb, TlbOp};
use stage2::transition::{self, PageRange, Teardown, HOST_RAM_ATTRS};
use stage2::{Gfn, Ipa, Pfn, Vmid, PAGE_SHIFT};

type S2 = Stage2<ArenaMemory, RecordingTlb>;

/// RAM: 4 MiB at 1 GiB, two aligned 2 MiB ranges.
const RAM: u64 = 0x4_0000;
const PAGES: u64 = 1024;
const BLOCK: u64 = 512;
const VM: VmId = VmId(1);

struct World {
    tracker: PageTracker,
    host: S2,
    guest: S2,
}

fn world(guest_tables: usize) -> World {
    let mut host = Stage2::new(40, Vmid(0), ArenaMemory::new(), RecordingTlb::new()).unwrap();
    host.map(
        Ipa(RAM << PAGE_SHIFT),
        Pfn(RAM).hpa().unwrap(),
        PAGES << PAGE_SHIFT,
        HOST_RAM_ATTRS,
        Granule::Largest,
    )
    .unwrap();
    // A 32-bit guest: its root is at level 2, so a block needs no table.
    let guest = Stage2::new(
        32,
        Vmid(1),
        ArenaMemory::with_limit(guest_tables + 4),
        RecordingTlb::new(),
    )
    .unwrap();
    World {
        tracker: PageTracker::new(Pfn(RAM), PAGES).unwrap(),
        host,
        guest,
    }
}

fn range(p: u64, g: u64, nr: u64) -> PageRange {
    PageRange::new(Pfn(RAM + p), Gfn(g), nr)
}

fn leaves(s2: &S2) -> Vec<Leaf> {
    let mut v = Vec::new();
    s2.walk(Ipa(0), 1 << 32, |l| v.push(*l)).unwrap();
    v
}

/// Everything a failed call must leave alone.
fn state(w: &World) -> (PageTracker, Vec<Leaf>, Vec<Leaf>, usize, usize) {
    (
        w.tracker.clone(),
        leaves(&w.host),
        leaves(&w.guest),
        w.guest.mm().live(),
        w.guest.tlb().ops.len(),
    )
}

#[test]
fn only_an_aligned_whole_2m_is_a_block() {
    let mut w = world(0);
    // Aligned pfn and gfn, 512 pages: one level-2 leaf, no table.
    transition::share(
        &mut w.tracker,
        &mut w.guest,
        range(0, 0x200, BLOCK),
        Perms::RW,
    )
    .unwrap();
    let l = leaves(&w.guest);
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].level, l[0].size), (2, 2 << 20));
    assert_eq!(w.guest.mm().live(), 4, "only the root");
    // Ownership is per page.
    for k in [0, 1, 511] {
        assert_eq!(w.tracker.shares(Pfn(RAM + k)).unwrap(), 1);
    }
    // The other aligned range at an unaligned gfn: pages, which need a
    // table the guest's memory does not have.
    let before = state(&w);
    assert_eq!(
        transition::share(
            &mut w.tracker,
            &mut w.guest,
            range(BLOCK, 0x401, BLOCK),
            Perms::RW
        ),
        Err(Error::NoMemory)
    );
    assert!(state(&w) == before);
}

#[test]
fn splits_need_a_table_or_change_nothing() {
    let mut w = world(0);
    transition::share(
        &mut w.tracker,
        &mut w.guest,
        range(0, 0x200, BLOCK),
        Perms::RW,
    )
    .unwrap();
    let before = state(&w);
    assert_eq!(
        transition::unshare(&mut w.tracker, &mut w.guest, range(3, 0x203, 1)),
        Err(Error::NoMemory)
    );
    assert_eq!(
        w.guest
            .protect(Ipa(0x3ff << PAGE_SHIFT), 2 << PAGE_SHIFT, Perms::R),
        Err(stage2::pgtable::Error::NoMemory)
    );
    assert!(state(&w) == before);

    // With one table page the split happens: one break of the block.
    w.guest.mm_mut().set_limit(5);
    w.guest.tlb_mut().ops.clear();
    transition::unshare(&mut w.tracker, &mut w.guest, range(3, 0x203, 1)).unwrap();
    assert_eq!(
        w.guest.tlb().ops,
        [
            TlbOp::SyncWrites,
            TlbOp::InvalidateIpa {
                vmid: Vmid(1),
                ipa: Ipa(0x200 << PAGE_SHIFT),
                level: 2
            }
        ]
    );
    assert_eq!(w.guest.mm().live(), 5);
    let l = leaves(&w.guest);
    assert_eq!(l.len(), 511);
    assert!(l.iter().all(|l| l.size == 1 << PAGE_SHIFT));
    assert!(w.guest.query(Ipa(0x203 << PAGE_SHIFT)).is_none());
    assert_eq!(w.tracker.shares(Pfn(RAM + 3)).unwrap(), 0);
    assert_eq!(w.tracker.shares(Pfn(RAM + 4)).unwrap(), 1);
    // The rest unshared: the split table goes back.
    transition::unshare(&mut w.tracker, &mut w.guest, range(0, 0x200, 3)).unwrap();
    transition::unshare(&mut w.tracker, &mut w.guest, range(4, 0x204, BLOCK - 4)).unwrap();
    assert_eq!(w.guest.mm().live(), 4);
    assert!(leaves(&w.guest).is_empty());
}

#[test]
fn a_whole_block_goes_with_one_invalidation() {
    let mut w = world(0);
    transition::share(
        &mut w.tracker,
        &mut w.guest,
        range(0, 0x200, BLOCK),
        Perms::RW,
    )
    .unwrap();
    w.guest.tlb_mut().ops.clear();
    transition::unshare(&mut w.tracker, &mut w.guest, range(0, 0x200, BLOCK)).unwrap();
    assert_eq!(w.guest.tlb().invalidations(), 1);
    assert!(leaves(&w.guest).is_empty());
    assert_eq!(w.tracker.shares(Pfn(RAM + 511)).unwrap(), 0);

    // The same 512 pages as pages (a table to spare): 512 + 1.
    let mut w = world(1);
    let r = range(0, 0x200, BLOCK);
    let guest = &mut w.guest;
    let attrs = stage2::pgtable::Attrs {
        perms: Perms::RW,
        mem: stage2::pgtable::MemType::Normal,
        state: PageState::SharedBorrowed,
    };
    guest
        .map(
            Ipa(0x200 << PAGE_SHIFT),
            Pfn(RAM).hpa().unwrap(),
            BLOCK << PAGE_SHIFT,
            attrs,
            Granule::Page,
        )
        .unwrap();
    w.tracker.share(r.pfn, r.nr).unwrap();
    w.guest.tlb_mut().ops.clear();
    transition::unshare(&mut w.tracker, &mut w.guest, r).unwrap();
    assert_eq!(w.guest.tlb().invalidations(), 512 + 1);
}

#[test]
fn donated_block_reclaims_whole_or_splits() {
    let mut w = world(1);
    transition::donate(
        &mut w.tracker,
        &mut w.host,
        VM,
        &mut w.guest,
        range(BLOCK, 0x400, BLOCK),
        Perms::RWX,
    )
    .unwrap();
    assert_eq!(leaves(&w.guest).len(), 1);
    assert_eq!(w.tracker.owner(Pfn(RAM + BLOCK)).unwrap(), Owner::Vm(VM));
    // Part of it back: a split (the one spare table), the rest stays.
    let mut zeroed = Vec::new();
    transition::reclaim(
        &mut w.tracker,
        &mut w.host,
        VM,
        &mut w.guest,
        range(BLOCK + 10, 0x40a, 2),
        |p| zeroed.push(p),
    )
    .unwrap();
    assert_eq!(zeroed, [Pfn(RAM + BLOCK + 10), Pfn(RAM + BLOCK + 11)]);
    assert_eq!(leaves(&w.guest).len(), 510);
    assert_eq!(w.tracker.owner(Pfn(RAM + BLOCK + 10)).unwrap(), Owner::Host);
    assert_eq!(
        w.tracker.owner(Pfn(RAM + BLOCK + 12)).unwrap(),
        Owner::Vm(VM)
    );
}

#[test]
fn teardown_takes_a_block_only_within_the_budget() {
    let mut w = world(1);
    transition::share(&mut w.tracker, &mut w.guest, range(0, 0x10, 2), Perms::RW).unwrap();
    transition::donate(
        &mut w.tracker,
        &mut w.host,
        VM,
        &mut w.guest,
        range(BLOCK, 0x400, BLOCK),
        Perms::RWX,
    )
    .unwrap();
    let mut td = Teardown::new(VM);
    let mut zero = |_| {};
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 100, &mut zero)
        .unwrap();
    assert_eq!((s.leaves, s.pages), (1, 1));
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 100, &mut zero)
        .unwrap();
    assert_eq!((s.leaves, s.pages), (1, 1));
    // A probe (budget 0) changes nothing.
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 0, &mut zero)
        .unwrap();
    assert_eq!((s.leaves, td.is_done()), (0, false));
    // The block does not fit in 511 pages: nothing done, not finished.
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 511, &mut zero)
        .unwrap();
    assert_eq!((s.leaves, s.pages), (0, 0));
    assert!(!td.is_done());
    assert_eq!(leaves(&w.guest).len(), 1);
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 512, &mut zero)
        .unwrap();
    assert_eq!((s.leaves, s.pages), (1, 512));
    let s = td
        .step_leaf(&mut w.tracker, &mut w.host, &mut w.guest, 0, &mut zero)
        .unwrap();
    assert_eq!(s.leaves, 0);
    assert!(td.is_done());
    assert!(leaves(&w.guest).is_empty());
    assert_eq!(w.tracker.owner(Pfn(RAM + BLOCK + 7)).unwrap(), Owner::Host);
}

/// `unshare_range` (ABI §3.21): every mapped gfn whatever its frame, holes
/// skipped; a donated page in the range or a split without table memory
/// changes nothing; up to `UNSHARE_RANGE_PER_IPA_MAX` leaves one
/// invalidation by IPA each, more one whole-VMID invalidation and none by
/// IPA, the emptied table freed after it.
#[test]
fn unshare_range_by_gfn_whatever_the_frames() {
    // gfn 0x200 + i maps frame 600 - i (reverse order), a hole at 0x203.
    let scattered = || {
        let mut w = world(1);
        for i in (0..40).filter(|&i| i != 3) {
            transition::share(
                &mut w.tracker,
                &mut w.guest,
                range(600 - i, 0x200 + i, 1),
                Perms::RW,
            )
            .unwrap();
        }
        w
    };
    // A donated page at 0x203 makes the call EACCES (BadState), no change.
    let mut wd = scattered();
    transition::donate(
        &mut wd.tracker,
        &mut wd.host,
        VM,
        &mut wd.guest,
        range(10, 0x203, 1),
        Perms::RW,
    )
    .unwrap();
    let before = state(&wd);
    assert_eq!(
        transition::unshare_range(&mut wd.tracker, &mut wd.guest, Gfn(0x200), 8),
        Err(Error::BadState)
    );
    assert!(state(&wd) == before);

    let mut w = scattered();
    w.guest.tlb_mut().ops.clear();
    assert_eq!(
        transition::unshare_range(&mut w.tracker, &mut w.guest, Gfn(0x200), 5),
        Ok(4)
    );
    let per_ipa = w
        .guest
        .tlb()
        .ops
        .iter()
        .filter(|o| matches!(o, TlbOp::InvalidateIpa { .. }))
        .count();
    assert_eq!((w.guest.tlb().invalidations(), per_ipa), (4, 4));
    for i in [0, 1, 2, 4] {
        assert_eq!(w.tracker.shares(Pfn(RAM + 600 - i)).unwrap(), 0);
    }
    // The other 35: one VMID-wide invalidation, and the table is freed.
    let live = w.guest.mm().live();
    w.guest.tlb_mut().ops.clear();
    assert_eq!(
        transition::unshare_range(&mut w.tracker, &mut w.guest, Gfn(0x200), 512),
        Ok(35)
    );
    assert!(w
        .guest
        .tlb()
        .ops
        .iter()
        .all(|o| !matches!(o, TlbOp::InvalidateIpa { .. })));
    assert_eq!(w.guest.tlb().invalidations(), 1);
    assert_eq!(w.guest.mm().live(), live - 1);
    assert!(leaves(&w.guest).is_empty());
    assert!((0..40).all(|i| w.tracker.shares(Pfn(RAM + 600 - i)).unwrap() == 0));
    // Nothing mapped: 0, nothing issued.
    w.guest.tlb_mut().ops.clear();
    assert_eq!(
        transition::unshare_range(&mut w.tracker, &mut w.guest, Gfn(0x200), 512),
        Ok(0)
    );
    assert!(w.guest.tlb().ops.is_empty());
}

#[test]
fn unshare_range_splits_a_block_only_with_memory() {
    let mut w = world(0);
    transition::share(
        &mut w.tracker,
        &mut w.guest,
        range(0, 0x200, BLOCK),
        Perms::RW,
    )
    .unwrap();
    let before = state(&w);
    assert_eq!(
        transition::unshare_range(&mut w.tracker, &mut w.guest, Gfn(0x1ff), 2),
        Err(Error::NoMemory)
    );
    assert!(state(&w) == before);
    // The whole block: one leaf, one invalidation by IPA, no memory.
    assert_eq!(
        transition::unshare_range(&mut w.tracker, &mut w.guest, Gfn(0x200), 512),
        Ok(512)
    );
    assert_eq!(w.guest.tlb().invalidations(), 1);
    assert_eq!(w.tracker.shares(Pfn(RAM + 300)).unwrap(), 0);
}
