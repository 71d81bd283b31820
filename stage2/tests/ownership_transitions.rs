//! Unit tests of the memory transitions: every transition from every page
//! state (success and refusal), against the real page tables, with the
//! reference model as a second opinion.

mod ownership_common;

use ownership_common::*;
use stage2::mm::ArenaMemory;
use stage2::owner::{Error, Owner, PageTracker, PageView, VmId};
use stage2::pgtable::{Attrs, Granule, IpaConfig, MemType, PageState, Perms, Stage2};
use stage2::tlb::{RecordingTlb, TlbOp};
use stage2::transition::{self, map_tables_bound, PageRange, Teardown, HOST_RAM_ATTRS};
use stage2::{Gfn, Hpa, Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};

/// The page under test and the guest frame it goes to.
const P: u64 = RAM_BASE + 8;
const G: u64 = 0x1ff; // just below a 2 MiB boundary
const OTHER_G: u64 = 0x300;

#[derive(Clone, Copy, Debug)]
enum Start {
    HostOwned,
    SharedWithOther,
    SharedWithSelf,
    DonatedToSelf,
    DonatedToOther,
    Hyp,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Share,
    Unshare,
    Donate,
    Reclaim,
    DonateToHyp,
    ReturnFromHyp,
}

fn setup(start: Start) -> (World, Model) {
    let mut w = World::new(2, u32::MAX);
    let mut m = Model::new(2, u32::MAX);
    match start {
        Start::HostOwned => {}
        Start::SharedWithOther => {
            w.share(1, P, OTHER_G, 1, Perms::RW).unwrap();
            m.share(1, P, OTHER_G, 1, Perms::RW).unwrap();
        }
        Start::SharedWithSelf => {
            w.share(0, P, G, 1, Perms::RW).unwrap();
            m.share(0, P, G, 1, Perms::RW).unwrap();
        }
        Start::DonatedToSelf => {
            w.donate(0, P, G, 1, Perms::RWX).unwrap();
            m.donate(0, P, G, 1, Perms::RWX).unwrap();
        }
        Start::DonatedToOther => {
            w.donate(1, P, OTHER_G, 1, Perms::RWX).unwrap();
            m.donate(1, P, OTHER_G, 1, Perms::RWX).unwrap();
        }
        Start::Hyp => {
            w.donate_to_hyp(P, 1).unwrap();
            m.donate_to_hyp(P, 1).unwrap();
        }
    }
    m.assert_matches(&w);
    w.check_invariants();
    (w, m)
}

fn apply(w: &mut World, m: &mut Model, op: Op) -> (Result<(), Error>, Result<(), Error>) {
    match op {
        Op::Share => (w.share(0, P, G, 1, Perms::R), m.share(0, P, G, 1, Perms::R)),
        Op::Unshare => (w.unshare(0, P, G, 1), m.unshare(0, P, G, 1)),
        Op::Donate => (
            w.donate(0, P, G, 1, Perms::RW),
            m.donate(0, P, G, 1, Perms::RW),
        ),
        Op::Reclaim => (w.reclaim(0, P, G, 1), m.reclaim(0, P, G, 1).map(|_| ())),
        Op::DonateToHyp => (w.donate_to_hyp(P, 1), m.donate_to_hyp(P, 1)),
        Op::ReturnFromHyp => (w.return_from_hyp(P, 1), m.return_from_hyp(P, 1).map(|_| ())),
    }
}

#[test]
fn every_transition_from_every_state() {
    use Error::*;
    use Op::*;
    use Start::*;
    let ok = Ok(());
    let table: [(Start, [Result<(), Error>; 6]); 6] = [
        (
            HostOwned,
            [ok, Err(BadState), ok, Err(BadState), ok, Err(BadState)],
        ),
        (
            SharedWithOther,
            [
                ok,
                Err(NotMapped),
                Err(BadState),
                Err(BadState),
                Err(BadState),
                Err(BadState),
            ],
        ),
        (
            SharedWithSelf,
            [
                Err(AlreadyMapped),
                ok,
                Err(BadState),
                Err(BadState),
                Err(BadState),
                Err(BadState),
            ],
        ),
        (
            DonatedToSelf,
            [
                Err(BadState),
                Err(BadState),
                Err(BadState),
                ok,
                Err(BadState),
                Err(BadState),
            ],
        ),
        (DonatedToOther, [Err(BadState); 6]),
        (
            Hyp,
            [
                Err(BadState),
                Err(BadState),
                Err(BadState),
                Err(BadState),
                Err(BadState),
                ok,
            ],
        ),
    ];
    let ops = [Share, Unshare, Donate, Reclaim, DonateToHyp, ReturnFromHyp];
    for (start, expected) in table {
        for (op, want) in ops.into_iter().zip(expected) {
            let (mut w, mut m) = setup(start);
            let before = w.snapshot();
            let (got, model) = apply(&mut w, &mut m, op);
            assert_eq!(got, want, "{op:?} from {start:?}");
            assert_eq!(model, want, "model: {op:?} from {start:?}");
            if got.is_err() {
                assert_eq!(
                    w.snapshot(),
                    before,
                    "{op:?} from {start:?} changed something"
                );
            }
            m.assert_matches(&w);
            w.check_invariants();
        }
    }
}

#[test]
fn views_follow_the_transitions() {
    let mut w = World::new(2, u32::MAX);
    let (vm0, vm1) = (vm_id(0), vm_id(1));
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(P)),
        Ok(PageView::Owned)
    );
    assert_eq!(
        transition::guest_view(&w.tracker, vm0, &w.guests[0], Gfn(G)),
        Ok(None)
    );

    w.share(0, P, G, 1, Perms::R).unwrap();
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(P)),
        Ok(PageView::SharedOwned)
    );
    assert_eq!(
        transition::guest_view(&w.tracker, vm0, &w.guests[0], Gfn(G)),
        Ok(Some((Pfn(P), PageView::SharedBorrowed)))
    );
    w.unshare(0, P, G, 1).unwrap();

    w.donate(1, P, G, 1, Perms::RW).unwrap();
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(P)),
        Ok(PageView::None)
    );
    assert_eq!(
        transition::guest_view(&w.tracker, vm1, &w.guests[1], Gfn(G)),
        Ok(Some((Pfn(P), PageView::Owned)))
    );
    // The same table presented as another VM's disagrees with the tracker.
    assert_eq!(
        transition::guest_view(&w.tracker, vm0, &w.guests[1], Gfn(G)),
        Err(Error::Inconsistent)
    );
    assert_eq!(
        transition::guest_view(&w.tracker, vm0, &w.guests[0], Gfn(GUEST_GFNS)),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(RAM_BASE - 1)),
        Err(Error::NotRam)
    );
}

#[test]
fn share_counts_are_exact_across_vms_and_gfns() {
    let mut w = World::new(3, u32::MAX);
    w.share(0, P, G, 2, Perms::R).unwrap();
    w.share(0, P, OTHER_G, 1, Perms::RW).unwrap();
    w.share(2, P, G, 1, Perms::RW).unwrap();
    assert_eq!(w.tracker.shares(Pfn(P)), Ok(3));
    assert_eq!(w.tracker.shares(Pfn(P + 1)), Ok(1));
    w.check_invariants();
    // Shared pages cannot be donated, to a VM or to the hypervisor.
    assert_eq!(w.donate(1, P, G, 1, Perms::RW), Err(Error::BadState));
    assert_eq!(w.donate_to_hyp(P + 1, 1), Err(Error::BadState));
    w.unshare(0, P, OTHER_G, 1).unwrap();
    w.unshare(2, P, G, 1).unwrap();
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(P)),
        Ok(PageView::SharedOwned)
    );
    w.unshare(0, P, G, 2).unwrap();
    assert_eq!(
        transition::host_view(&w.tracker, Pfn(P)),
        Ok(PageView::Owned)
    );
    assert_eq!(w.tracker.shares(Pfn(P + 1)), Ok(0));
    w.check_invariants();
    assert!(leaves(&w.guests[0]).is_empty());
}

#[test]
fn share_limit_overflow_refused_without_change() {
    let mut w = World::new(1, 2);
    w.share(0, P, 0x10, 1, Perms::R).unwrap();
    w.share(0, P, 0x11, 1, Perms::R).unwrap();
    let before = w.snapshot();
    assert_eq!(w.share(0, P - 1, 0x12, 2, Perms::R), Err(Error::Overflow));
    assert_eq!(w.snapshot(), before);
    w.check_invariants();
}

#[test]
fn argument_errors() {
    let mut w = World::new(1, u32::MAX);
    let before = w.snapshot();
    assert_eq!(w.share(0, P, G, 0, Perms::R), Err(Error::InvalidArgument));
    assert_eq!(
        w.donate(0, RAM_BASE - 1, G, 2, Perms::R),
        Err(Error::NotRam)
    );
    assert_eq!(
        w.donate(0, RAM_BASE + RAM_PAGES - 1, G, 2, Perms::R),
        Err(Error::NotRam)
    );
    assert_eq!(w.share(0, u64::MAX, G, 2, Perms::R), Err(Error::NotRam));
    assert_eq!(
        w.share(0, P, GUEST_GFNS - 1, 2, Perms::R),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        w.donate(0, P, u64::MAX, 1, Perms::R),
        Err(Error::OutOfRange)
    );
    assert_eq!(w.unshare(0, P, GUEST_GFNS, 1), Err(Error::OutOfRange));
    assert_eq!(w.donate_to_hyp(RAM_BASE + RAM_PAGES, 1), Err(Error::NotRam));
    assert_eq!(w.return_from_hyp(P, 0), Err(Error::InvalidArgument));
    // The last page of RAM and of the IPA space are fine.
    assert_eq!(
        w.share(0, RAM_BASE + RAM_PAGES - 1, GUEST_GFNS - 1, 1, Perms::R),
        Ok(())
    );
    w.unshare(0, RAM_BASE + RAM_PAGES - 1, GUEST_GFNS - 1, 1)
        .unwrap();
    // A failed call or a share and unshare leave no trace but table memory
    // reuse.
    let after = w.snapshot();
    assert_eq!(
        (after.tracker, after.host, after.guests),
        (before.tracker, before.host, before.guests)
    );
}

#[test]
fn guest_side_refusals() {
    let mut w = World::new(1, u32::MAX);
    w.share(0, P, G, 1, Perms::R).unwrap();
    w.share(0, P + 2, G + 1, 1, Perms::R).unwrap();
    w.share(0, P + 1, 0x50, 1, Perms::R).unwrap();
    w.share(0, P + 4, 0x51, 1, Perms::R).unwrap();
    let before = w.snapshot();
    // G + 1 maps P + 2, not P + 1.
    assert_eq!(w.unshare(0, P, G, 2), Err(Error::BadState));
    // G + 2 is a hole.
    assert_eq!(w.unshare(0, P + 1, G + 1, 2), Err(Error::BadState));
    assert_eq!(w.unshare(0, P + 2, G + 1, 2), Err(Error::BadState));
    // A range ending in a hole.
    w.share(0, P + 3, G + 2, 1, Perms::R).unwrap();
    let before2 = w.snapshot();
    assert_eq!(w.unshare(0, P + 2, G + 1, 3), Err(Error::NotMapped));
    assert_eq!(w.snapshot(), before2);
    w.unshare(0, P + 3, G + 2, 1).unwrap();
    // Donating or sharing over an existing mapping.
    assert_eq!(
        w.donate(0, P + 10, G - 1, 2, Perms::RW),
        Err(Error::AlreadyMapped)
    );
    assert_eq!(
        w.share(0, P + 10, G + 1, 1, Perms::RW),
        Err(Error::AlreadyMapped)
    );
    let after = w.snapshot();
    assert_eq!(
        (after.tracker, after.host, after.guests),
        (before.tracker, before.host, before.guests)
    );

    // Reclaiming a borrowed page: the tracker refuses (the host owns it).
    assert_eq!(w.reclaim(0, P, G, 1), Err(Error::BadState));
    // Reclaiming through a gfn that maps another donated page.
    w.donate(0, P + 20, 0x60, 2, Perms::RW).unwrap();
    assert_eq!(w.reclaim(0, P + 21, 0x60, 1), Err(Error::BadState));
    assert_eq!(w.reclaim(0, P + 20, 0x62, 1), Err(Error::NotMapped));
    w.reclaim(0, P + 20, 0x60, 2).unwrap();
    w.check_invariants();
}

#[test]
fn donate_and_reclaim_move_the_page_and_zero_it() {
    let mut w = World::new(2, u32::MAX);
    w.donate(1, P, G, 2, Perms::RWX).unwrap();
    // The host lost the pages and its TLB was told.
    let ipa = |p: u64| Ipa(p << PAGE_SHIFT);
    assert!(w.host.query(ipa(P)).is_none());
    assert!(w.host.query(ipa(P + 1)).is_none());
    assert!(w.host.query(ipa(P + 2)).is_some());
    let flushed = |t: &RecordingTlb, vmid: Vmid, a: Ipa| {
        t.ops.iter().any(|op| match *op {
            TlbOp::InvalidateIpa { vmid: v, ipa, .. } => v == vmid && ipa == a,
            TlbOp::InvalidateVmid { vmid: v } => v == vmid,
            TlbOp::SyncWrites => false,
        })
    };
    assert!(flushed(w.host.tlb(), Vmid(0), ipa(P)));
    assert!(flushed(w.host.tlb(), Vmid(0), ipa(P + 1)));
    let leaf = w.guests[1].query(Ipa(G << PAGE_SHIFT)).unwrap();
    assert_eq!(leaf.hpa, Hpa(P << PAGE_SHIFT));
    assert_eq!(
        leaf.attrs,
        Attrs {
            perms: Perms::RWX,
            mem: MemType::Normal,
            state: PageState::Owned
        }
    );
    assert_eq!(w.tracker.owner(Pfn(P)), Ok(Owner::Vm(vm_id(1))));
    assert_eq!(w.data[8], VM_SECRET);

    // A refused reclaim zeroes nothing.
    assert_eq!(w.reclaim(0, P, G, 2), Err(Error::BadState));
    assert!(w.zeroed.is_empty());

    w.reclaim(1, P, G, 2).unwrap();
    assert_eq!(w.zeroed, vec![Pfn(P), Pfn(P + 1)]);
    assert_eq!(w.data[8], 0);
    assert!(flushed(w.guests[1].tlb(), Vmid(2), Ipa(G << PAGE_SHIFT)));
    assert!(flushed(
        w.guests[1].tlb(),
        Vmid(2),
        Ipa((G + 1) << PAGE_SHIFT)
    ));
    assert_eq!(w.host.query(ipa(P)).unwrap().attrs, HOST_RAM_ATTRS);
    assert_eq!(
        w.host.query(ipa(P + 1)).unwrap().hpa,
        Hpa((P + 1) << PAGE_SHIFT)
    );
    assert!(leaves(&w.guests[1]).is_empty());
    w.check_invariants();
}

#[test]
fn hyp_donation_round_trip() {
    let mut w = World::new(1, u32::MAX);
    w.donate_to_hyp(P, 3).unwrap();
    assert_eq!(w.tracker.owner(Pfn(P + 2)), Ok(Owner::Hyp));
    assert!(w.host.query(Ipa((P + 1) << PAGE_SHIFT)).is_none());
    // Hyp pages are never shared or donated on.
    assert_eq!(w.share(0, P, G, 1, Perms::R), Err(Error::BadState));
    assert_eq!(w.donate(0, P + 1, G, 1, Perms::R), Err(Error::BadState));
    assert_eq!(w.donate_to_hyp(P + 2, 1), Err(Error::BadState));
    // Partly hyp-owned range: refused whole.
    assert_eq!(w.return_from_hyp(P + 1, 3), Err(Error::BadState));
    assert!(w.zeroed.is_empty());
    w.return_from_hyp(P, 3).unwrap();
    assert_eq!(w.zeroed, vec![Pfn(P), Pfn(P + 1), Pfn(P + 2)]);
    assert_eq!(w.tracker.owner(Pfn(P + 2)), Ok(Owner::Host));
    w.check_invariants();
}

/// Runs `f` against a world whose table `which` (0 host, 1.. guests) is
/// limited to `extra` more tables; asserts a NoMemory failure changed
/// nothing, then that the call succeeds with the limit lifted.
fn no_memory_then_ok(
    w: &mut World,
    which: usize,
    extra: usize,
    f: impl Fn(&mut World) -> Result<(), Error>,
) {
    let s2 = if which == 0 {
        &mut w.host
    } else {
        &mut w.guests[which - 1]
    };
    let live = s2.mm().live();
    s2.mm_mut().set_limit(live + extra);
    let before = w.snapshot();
    assert_eq!(f(w), Err(Error::NoMemory));
    assert_eq!(w.snapshot(), before);
    let s2 = if which == 0 {
        &mut w.host
    } else {
        &mut w.guests[which - 1]
    };
    s2.mm_mut().set_limit(usize::MAX);
    assert_eq!(f(w), Ok(()));
    w.check_invariants();
}

#[test]
fn no_memory_changes_nothing() {
    let mut w = World::new(2, u32::MAX);
    // Guest tables (32-bit IPA: level-2 root): a level-3 table per 2 MiB.
    no_memory_then_ok(&mut w, 1, 0, |w| w.share(0, P, G, 1, Perms::R));
    no_memory_then_ok(&mut w, 1, 0, |w| w.share(0, P, 0x4000, 1, Perms::R));
    // Across a 2 MiB boundary: two level-3 tables.
    no_memory_then_ok(&mut w, 2, 1, |w| w.donate(1, P + 1, G, 2, Perms::R));
    // Reclaim maps the host back: refused up front when the host is short,
    // before the guest lost anything.
    no_memory_then_ok(&mut w, 0, 0, |w| w.reclaim(1, P + 1, G, 2));
    w.donate_to_hyp(P + 4, 1).unwrap();
    no_memory_then_ok(&mut w, 0, 0, |w| w.return_from_hyp(P + 4, 1));
}

/// A donate needs exactly the guest tables it adds, like a share: none next
/// to a page already mapped in the same 2 MiB (ABI §2.4: ENOMEM means too
/// few pages for the tables the call needs).
#[test]
fn donate_needs_only_the_tables_it_adds() {
    let mut w = World::new(1, u32::MAX);
    w.share(0, P, G, 1, Perms::R).unwrap();
    let live = w.guests[0].mm().live();
    w.guests[0].mm_mut().set_limit(live);
    assert_eq!(w.share(0, P + 1, G - 1, 1, Perms::R), Ok(()));
    assert_eq!(w.donate(0, P + 2, G - 2, 1, Perms::R), Ok(()));
    // A gfn in another 2 MiB still needs its level-3 table.
    let before = w.snapshot();
    assert_eq!(w.donate(0, P + 3, G + 1, 1, Perms::R), Err(Error::NoMemory));
    assert_eq!(w.snapshot(), before);
    w.check_invariants();
}

/// A world whose RAM is one 2 MiB block in the host's stage-2, so that
/// taking a page away from the host needs a table to split the block.
#[test]
fn host_block_split_needs_memory() {
    let base = 0x40000u64; // 2 MiB aligned
    let mut tracker = PageTracker::new(Pfn(base), 512).unwrap();
    let mut host = Stage2::new(
        HOST_IPA_BITS,
        Vmid(0),
        ArenaMemory::new(),
        RecordingTlb::new(),
    )
    .unwrap();
    host.map(
        Ipa(base << PAGE_SHIFT),
        Hpa(base << PAGE_SHIFT),
        512 * PAGE_SIZE,
        HOST_RAM_ATTRS,
        Granule::Largest,
    )
    .unwrap();
    assert_eq!(host.query(Ipa(base << PAGE_SHIFT)).unwrap().size, 2 << 20);
    let mut guest = Stage2::new(
        GUEST_IPA_BITS,
        Vmid(1),
        ArenaMemory::new(),
        RecordingTlb::new(),
    )
    .unwrap();
    let vm = VmId(7);
    let r = PageRange::new(Pfn(base + 5), Gfn(0), 1);

    let live = host.mm().live();
    host.mm_mut().set_limit(live);
    let before = (
        tracker.clone(),
        leaves(&host),
        leaves(&guest),
        guest.mm().live(),
    );
    assert_eq!(
        transition::donate(&mut tracker, &mut host, vm, &mut guest, r, Perms::RW),
        Err(Error::NoMemory)
    );
    assert_eq!(
        transition::donate_to_hyp(&mut tracker, &mut host, Pfn(base + 6), 1),
        Err(Error::NoMemory)
    );
    assert_eq!(
        before,
        (
            tracker.clone(),
            leaves(&host),
            leaves(&guest),
            guest.mm().live()
        )
    );

    host.mm_mut().set_limit(live + 1);
    transition::donate(&mut tracker, &mut host, vm, &mut guest, r, Perms::RW).unwrap();
    assert!(host.query(Ipa((base + 5) << PAGE_SHIFT)).is_none());
    assert!(host.query(Ipa((base + 4) << PAGE_SHIFT)).is_some());
    // Now the block is split: giving a page to the hypervisor needs nothing.
    transition::donate_to_hyp(&mut tracker, &mut host, Pfn(base + 6), 1).unwrap();
    assert_eq!(tracker.owner(Pfn(base + 5)), Ok(Owner::Vm(vm)));

    host.mm_mut().set_limit(usize::MAX);
    transition::reclaim(&mut tracker, &mut host, vm, &mut guest, r, |_| {}).unwrap();
    transition::return_from_hyp(&mut tracker, &mut host, Pfn(base + 6), 1, |_| {}).unwrap();
    let mut n = 0;
    host.walk(Ipa(base << PAGE_SHIFT), 512 * PAGE_SIZE, |l| {
        assert_eq!(l.ipa.raw(), l.hpa.raw());
        n += l.size >> PAGE_SHIFT;
    })
    .unwrap();
    assert_eq!(n, 512);
}

#[test]
fn teardown_in_bounded_steps() {
    let mut w = World::new(2, u32::MAX);
    let mut m = Model::new(2, u32::MAX);
    let root_only = w.guests[0].mm().live();
    for (p, g, nr) in [
        (0u64, 0x1f0u64, 4u64),
        (10, 0x1fe, 3),
        (20, 0x9000, 1),
        (30, GUEST_GFNS - 2, 2),
    ] {
        w.donate(0, RAM_BASE + p, g, nr, Perms::RW).unwrap();
        m.donate(0, RAM_BASE + p, g, nr, Perms::RW).unwrap();
    }
    for (p, g, nr) in [(0x28u64, 0x10u64, 2u64), (0x28, 0x3_0000, 1)] {
        w.share(0, RAM_BASE + p, g, nr, Perms::R).unwrap();
        m.share(0, RAM_BASE + p, g, nr, Perms::R).unwrap();
        w.share(1, RAM_BASE + p, g, nr, Perms::R).unwrap();
        m.share(1, RAM_BASE + p, g, nr, Perms::R).unwrap();
    }
    // An MMIO mapping (outside RAM) is just removed.
    let mmio = Attrs {
        perms: Perms::RW,
        mem: MemType::Device,
        state: PageState::Owned,
    };
    w.guests[0]
        .map(
            Ipa(0x8000_0000),
            Hpa(0x0900_0000),
            PAGE_SIZE,
            mmio,
            Granule::Page,
        )
        .unwrap();
    let mut td = Teardown::new(vm_id(0));
    let mut steps = 0;
    let mut mmio_mapped = true;
    while !td.is_done() {
        let before = guest_pages(&w.guests[0]).len();
        let z = w.zeroed.len();
        let step = w.teardown_step(&mut td, 0, 2).unwrap();
        assert!(step.leaves <= 2 && step.pages <= 2, "{step:?}");
        assert_eq!(
            guest_pages(&w.guests[0]).len() as u64,
            before as u64 - step.pages
        );
        // Mirror in the model the RAM leaves just removed (the model does
        // not know the MMIO leaf).
        let mmio_gone = mmio_mapped && w.guests[0].query(Ipa(0x8000_0000)).is_none();
        mmio_mapped &= !mmio_gone;
        let zeroed = m.teardown(0, (step.leaves - u64::from(mmio_gone)) as usize);
        assert_eq!(&w.zeroed[z..], &zeroed[..], "zeroed pages, step {steps}");
        w.check_invariants();
        steps += 1;
        assert!(steps < 100, "teardown does not progress");
    }
    assert!(leaves(&w.guests[0]).is_empty());
    assert_eq!(w.guests[0].mm().live(), root_only);
    m.assert_matches(&w);
    // The page VM 1 still borrows stays shared.
    assert_eq!(w.tracker.shares(Pfn(RAM_BASE + 0x28)), Ok(2));
    // A finished teardown has nothing more to do.
    assert_eq!(w.teardown_step(&mut td, 0, 2).unwrap().leaves, 0);
}

#[test]
fn teardown_retries_after_no_memory_and_flags_inconsistency() {
    let mut w = World::new(1, u32::MAX);
    w.donate(0, P, 0x10, 2, Perms::RW).unwrap();
    w.host.mm_mut().set_limit(0);
    let mut td = Teardown::new(vm_id(0));
    let before = w.snapshot();
    assert_eq!(w.teardown_step(&mut td, 0, 8), Err(Error::NoMemory));
    assert_eq!(w.snapshot(), before);
    w.host.mm_mut().set_limit(usize::MAX);
    w.teardown_step(&mut td, 0, 1).unwrap();
    assert_eq!(w.tracker.owner(Pfn(P)), Ok(Owner::Host));
    assert_eq!(w.tracker.owner(Pfn(P + 1)), Ok(Owner::Vm(vm_id(0))));

    // A guest leaf claiming a host page as its own is reported, not
    // reclaimed.
    let bogus = Attrs {
        perms: Perms::RW,
        mem: MemType::Normal,
        state: PageState::Owned,
    };
    w.guests[0]
        .map(
            Ipa(0x20 << PAGE_SHIFT),
            Hpa((P + 5) << PAGE_SHIFT),
            PAGE_SIZE,
            bogus,
            Granule::Page,
        )
        .unwrap();
    let before = w.snapshot();
    assert_eq!(w.teardown_step(&mut td, 0, 8), Err(Error::Inconsistent));
    // The good leaf before it was handled, the bad one left alone.
    assert_eq!(w.tracker.owner(Pfn(P + 1)), Ok(Owner::Host));
    assert_eq!(w.snapshot().guests[0].len(), 1);
    assert_eq!(
        w.snapshot().tracker.page(Pfn(P + 5)),
        before.tracker.page(Pfn(P + 5))
    );
    assert!(!td.is_done());
}

#[test]
fn tables_bound_formula() {
    let l1 = IpaConfig {
        ipa_bits: 40,
        start_level: 1,
        root_tables: 2,
    };
    let l0 = IpaConfig {
        ipa_bits: 48,
        start_level: 0,
        root_tables: 1,
    };
    assert_eq!(map_tables_bound(l1, Ipa(0x1000), PAGE_SIZE), 2);
    assert_eq!(map_tables_bound(l0, Ipa(0x1000), PAGE_SIZE), 3);
    assert_eq!(map_tables_bound(l1, Ipa(0x1f_f000), 2 * PAGE_SIZE), 3);
    assert_eq!(map_tables_bound(l1, Ipa(0x3fff_f000), 2 * PAGE_SIZE), 4);
    assert_eq!(map_tables_bound(l1, Ipa(0), 4 << 20), 3);
    assert_eq!(map_tables_bound(l1, Ipa(0), 0), 0);
}

/// The all-or-nothing argument of `donate`/`reclaim` rests on two properties
/// of the page tables; check them on the real implementation.
#[test]
fn page_table_assumptions_hold() {
    for (ipa_bits, ranges) in [
        (32u8, [(0x1ffu64, 2u64), (0, 1), (0x3ffff, 1), (0x1000, 40)]),
        (40, [(0x3ffff, 2), (0x40000, 513), (0x7f_ffff, 3), (5, 1)]),
        (
            48,
            [(0x7ff_ffff, 2), (0, 1), (0x1_0000_0000, 600), (0x40000, 1)],
        ),
    ] {
        let mut s2 =
            Stage2::new(ipa_bits, Vmid(3), ArenaMemory::new(), RecordingTlb::new()).unwrap();
        let attrs = Attrs {
            perms: Perms::RW,
            mem: MemType::Normal,
            state: PageState::Owned,
        };
        for (gfn, nr) in ranges {
            // 1. map needs no more than map_tables_bound tables.
            let ipa = Ipa(gfn << PAGE_SHIFT);
            let bound = map_tables_bound(s2.config(), ipa, nr * PAGE_SIZE);
            let live = s2.mm().live();
            s2.mm_mut().set_limit(live + bound);
            s2.map(ipa, Hpa(0x4000_0000), nr * PAGE_SIZE, attrs, Granule::Page)
                .unwrap_or_else(|e| {
                    panic!("{ipa_bits}-bit map of {gfn:#x}+{nr} with {bound} tables: {e:?}")
                });
            assert!(s2.mm().live() <= live + bound);
            // 2. unmapping page-granular leaves needs no table.
            let live = s2.mm().live();
            s2.mm_mut().set_limit(live);
            s2.unmap(Ipa((gfn + nr / 2) << PAGE_SHIFT), (nr - nr / 2) * PAGE_SIZE)
                .unwrap();
            s2.mm_mut().set_limit(usize::MAX);
        }
        let (mm, _) = s2.destroy();
        assert_eq!(mm.live(), 0);
    }
}
