//! Property test: random map/unmap/protect/set_state/split sequences over a
//! small IPA window, checked after every step against a plain per-page model,
//! plus structural invariants of the raw tables and the TLB batching rule.

use std::collections::BTreeMap;

use proptest::prelude::*;
use stage2::desc::{Descriptor, OA_MASK, PENDING, TABLE_OR_PAGE, VALID};
use stage2::mm::{ArenaMemory, TableMemory};
use stage2::pgtable::{Attrs, Error, Granule, MemType, PageState, Perms, Stage2, MAX_TLBI_OPS};
use stage2::tlb::{RecordingTlb, TlbOp};
use stage2::{Hpa, Ipa, Vmid};

/// Window of the test: 16 MiB straddling the 1 GiB boundary.
const WIN_BASE: u64 = (1 << 18) - 2048; // in pages
const WIN_PAGES: u64 = 4096;

type S2 = Stage2<ArenaMemory, RecordingTlb>;
type Model = BTreeMap<u64, (u64, Perms, PageState)>;

const PERMS: [Perms; 4] = [Perms::RWX, Perms::RW, Perms::R, Perms::RX];
const STATES: [PageState; 3] = [
    PageState::Owned,
    PageState::SharedOwned,
    PageState::SharedBorrowed,
];
const GRANULES: [Granule; 3] = [Granule::Page, Granule::Block2M, Granule::Largest];

#[derive(Clone, Debug)]
enum Step {
    Map {
        gfn: u64,
        pages: u64,
        delta: u64,
        perms: usize,
        state: usize,
        granule: usize,
    },
    Unmap {
        gfn: u64,
        pages: u64,
    },
    Protect {
        gfn: u64,
        pages: u64,
        perms: usize,
    },
    SetState {
        gfn: u64,
        pages: u64,
        state: usize,
    },
    Split {
        gfn: u64,
        pages: u64,
        granule: usize,
    },
}

/// A range in the window, biased towards 2 MiB alignment and sizes.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..WIN_PAGES, 1..600u64),
        (0..WIN_PAGES / 512, 1..4u64).prop_map(|(b, n)| (b * 512, n * 512)),
        (0..WIN_PAGES, 1..WIN_PAGES),
    ]
    .prop_map(|(g, n)| {
        let n = n.min(WIN_PAGES - g).max(1);
        (WIN_BASE + g, n)
    })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (range(), prop::sample::select(vec![0u64, 512, 1024, 1, 7]), 0..4usize, 0..3usize, 0..3usize)
            .prop_map(|((gfn, pages), delta, perms, state, granule)| Step::Map { gfn, pages, delta, perms, state, granule }),
        2 => range().prop_map(|(gfn, pages)| Step::Unmap { gfn, pages }),
        2 => (range(), 0..4usize).prop_map(|((gfn, pages), perms)| Step::Protect { gfn, pages, perms }),
        1 => (range(), 0..3usize).prop_map(|((gfn, pages), state)| Step::SetState { gfn, pages, state }),
        1 => (range(), 0..3usize).prop_map(|((gfn, pages), granule)| Step::Split { gfn, pages, granule }),
    ]
}

/// Every page the table maps in the window, from a walk.
fn pages_of(s: &S2) -> (Model, Vec<(u64, u64)>) {
    let mut m = Model::new();
    let mut leaves = Vec::new();
    s.walk(Ipa::new(WIN_BASE << 12), WIN_PAGES << 12, |l| {
        leaves.push((l.ipa.raw(), l.size));
        assert_eq!(l.attrs.mem, MemType::Normal);
        for p in 0..l.size >> 12 {
            let gfn = (l.ipa.raw() >> 12) + p;
            if (WIN_BASE..WIN_BASE + WIN_PAGES).contains(&gfn) {
                m.insert(gfn, ((l.hpa.raw() >> 12) + p, l.attrs.perms, l.attrs.state));
            }
        }
    })
    .unwrap();
    (m, leaves)
}

/// Raw snapshot of every reachable table, and structural checks: no pending
/// marker, invalid entries are 0, no empty non-root table.
fn snapshot(s: &S2) -> Vec<(u64, Vec<u64>)> {
    fn rec(s: &S2, level: u8, table: Hpa, root: bool, out: &mut Vec<(u64, Vec<u64>)>) {
        let t = s.mm().table(table);
        out.push((table.raw(), t.to_vec()));
        assert!(
            root || t.iter().any(|d| d & VALID != 0),
            "empty table left at level {level}"
        );
        for &d in t.iter() {
            assert_eq!(d & PENDING, 0);
            if d & VALID == 0 {
                assert_eq!(d, 0, "invalid descriptors are zero");
            } else if level < 3 && d & TABLE_OR_PAGE != 0 {
                let child = s.mm().table(Hpa::new(d & OA_MASK));
                let valid = child.iter().filter(|&&c| c & VALID != 0).count() as u64;
                assert_eq!(
                    Descriptor(d).table_count(),
                    valid,
                    "entry count in table descriptor"
                );
                rec(s, level + 1, Hpa::new(d & OA_MASK), false, out);
            }
        }
    }
    let mut out = Vec::new();
    let c = s.config();
    for k in 0..c.root_tables as u64 {
        rec(
            s,
            c.start_level,
            Hpa::new(s.root().raw() + k * 4096),
            true,
            &mut out,
        );
    }
    out
}

fn apply_model(model: &mut Model, step: &Step) -> Result<u64, Error> {
    match *step {
        Step::Map {
            gfn,
            pages,
            delta,
            perms,
            state,
            ..
        } => {
            if model.range(gfn..gfn + pages).next().is_some() {
                return Err(Error::AlreadyMapped);
            }
            for p in 0..pages {
                model.insert(gfn + p, (gfn + delta + p, PERMS[perms], STATES[state]));
            }
            Ok(0)
        }
        Step::Unmap { gfn, pages } => {
            let keys: Vec<u64> = model.range(gfn..gfn + pages).map(|(k, _)| *k).collect();
            for k in &keys {
                model.remove(k);
            }
            Ok(keys.len() as u64)
        }
        Step::Protect { gfn, pages, perms } => {
            let mut n = 0;
            for (_, v) in model.range_mut(gfn..gfn + pages) {
                if v.1 != PERMS[perms] {
                    v.1 = PERMS[perms];
                    n += 1;
                }
            }
            Ok(n)
        }
        Step::SetState { gfn, pages, state } => {
            let mut n = 0;
            for (_, v) in model.range_mut(gfn..gfn + pages) {
                if v.2 != STATES[state] {
                    v.2 = STATES[state];
                    n += 1;
                }
            }
            Ok(n)
        }
        Step::Split { .. } => Ok(0),
    }
}

fn apply(s: &mut S2, step: &Step) -> Result<u64, Error> {
    let r = |gfn: u64, pages: u64| (Ipa::new(gfn << 12), pages << 12);
    match *step {
        Step::Map {
            gfn,
            pages,
            delta,
            perms,
            state,
            granule,
        } => {
            let attrs = Attrs {
                perms: PERMS[perms],
                mem: MemType::Normal,
                state: STATES[state],
            };
            let (ipa, size) = r(gfn, pages);
            s.map(
                ipa,
                Hpa::new((gfn + delta) << 12),
                size,
                attrs,
                GRANULES[granule],
            )
            .map(|()| 0)
        }
        Step::Unmap { gfn, pages } => {
            let (ipa, size) = r(gfn, pages);
            s.unmap(ipa, size)
        }
        Step::Protect { gfn, pages, perms } => {
            let (ipa, size) = r(gfn, pages);
            s.protect(ipa, size, PERMS[perms])
        }
        Step::SetState { gfn, pages, state } => {
            let (ipa, size) = r(gfn, pages);
            s.set_state(ipa, size, STATES[state])
        }
        Step::Split {
            gfn,
            pages,
            granule,
        } => {
            let (ipa, size) = r(gfn, pages);
            s.split(ipa, size, GRANULES[granule]).map(|()| 0)
        }
    }
}

fn step_range(step: &Step) -> (u64, u64) {
    match *step {
        Step::Map { gfn, pages, .. }
        | Step::Unmap { gfn, pages }
        | Step::Protect { gfn, pages, .. }
        | Step::SetState { gfn, pages, .. }
        | Step::Split { gfn, pages, .. } => (gfn, pages),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn matches_model(steps in prop::collection::vec((step(), prop::option::weighted(0.15, 0..4usize)), 1..24)) {
        let mut s = S2::new(40, Vmid(9), ArenaMemory::new(), RecordingTlb::new()).unwrap();
        let start = s.mm().live();
        let mut model = Model::new();
        for (step, squeeze) in &steps {
            // Sometimes run the step with too little memory: it must either
            // succeed or fail with NoMemory and change nothing.
            if let Some(extra) = squeeze {
                let live = s.mm().live();
                s.mm_mut().set_limit(live + extra);
            }
            let before = snapshot(&s);
            let live_before = s.mm().live();
            s.tlb_mut().ops.clear();
            let got = apply(&mut s, step);
            s.mm_mut().set_limit(usize::MAX);
            if got == Err(Error::NoMemory) {
                prop_assert!(squeeze.is_some());
                prop_assert_eq!(snapshot(&s), before);
                prop_assert_eq!(s.mm().live(), live_before);
                prop_assert!(s.tlb().ops.is_empty());
                continue;
            }
            let want = apply_model(&mut model, step);
            prop_assert_eq!(got, want, "{:?}", step);
            if got.is_err() {
                prop_assert_eq!(snapshot(&s), before);
                prop_assert!(s.tlb().ops.is_empty());
            }
            let (pages, leaves) = pages_of(&s);
            prop_assert_eq!(&pages, &model, "after {:?}", step);
            snapshot(&s);
            // Split: every leaf intersecting the range is at most the granule.
            if let Step::Split { gfn, pages: n, granule } = *step {
                let max = match GRANULES[granule] { Granule::Page => 1 << 12, Granule::Block2M => 1 << 21, Granule::Largest => 1 << 30 };
                for (ipa, size) in leaves {
                    if ipa < (gfn + n) << 12 && ipa + size > gfn << 12 {
                        prop_assert!(size <= max);
                    }
                }
            }
            // The TLB batching rule.
            let (_, n) = step_range(step);
            let ops = &s.tlb().ops;
            let by_vmid = ops.iter().filter(|o| matches!(o, TlbOp::InvalidateVmid { .. })).count();
            let by_ipa = ops.iter().filter(|o| matches!(o, TlbOp::InvalidateIpa { .. })).count();
            if n > MAX_TLBI_OPS {
                prop_assert_eq!(by_ipa, 0);
                prop_assert!(by_vmid <= 1);
                if by_vmid == 1 {
                    prop_assert_eq!(ops, &vec![TlbOp::SyncWrites, TlbOp::InvalidateVmid { vmid: Vmid(9) }]);
                }
            } else {
                prop_assert_eq!(by_vmid, 0);
                prop_assert_eq!(ops.len(), 2 * by_ipa);
            }
            if matches!(step, Step::Map { .. }) {
                prop_assert!(ops.is_empty());
            }
        }
        // Unmapping everything frees every table but the root.
        let n = s.unmap(Ipa::new(WIN_BASE << 12), WIN_PAGES << 12).unwrap();
        prop_assert_eq!(n, model.len() as u64);
        prop_assert_eq!(s.mm().live(), start);
        let (mm, _) = s.destroy();
        prop_assert_eq!(mm.live(), 0);
    }
}
