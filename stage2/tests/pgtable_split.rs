//! Splitting 1 GiB and 2 MiB blocks, the exact TLB sequences of
//! break-before-make, the batching rule, and failure without change.

use stage2::mm::{ArenaMemory, TableMemory};
use stage2::pgtable::{
    Attrs, Error, Granule, Leaf, MemType, PageState, Perms, Stage2, TLBI_LEVEL_TABLE,
};
use stage2::tlb::{RecordingTlb, TlbOp};
use stage2::{Hpa, Ipa, Vmid};

const RWX: Attrs = Attrs {
    perms: Perms::RWX,
    mem: MemType::Normal,
    state: PageState::SharedOwned,
};
const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;
const VMID: Vmid = Vmid(7);

type S2 = Stage2<ArenaMemory, RecordingTlb>;

fn new40() -> S2 {
    Stage2::new(40, VMID, ArenaMemory::new(), RecordingTlb::new()).unwrap()
}

fn leaves(s: &S2, ipa: u64, size: u64) -> Vec<Leaf> {
    let mut v = Vec::new();
    s.walk(Ipa::new(ipa), size, |l| v.push(*l)).unwrap();
    v
}

fn inv(ipa: u64, level: u8) -> TlbOp {
    TlbOp::InvalidateIpa {
        vmid: VMID,
        ipa: Ipa::new(ipa),
        level,
    }
}

/// Checks that `[G1, 2G)` maps `hpa_base + off` contiguously with `attrs`
/// except where `f(off)` gives other permissions / nothing.
fn check_1g(s: &S2, hpa_base: u64, f: impl Fn(u64) -> Option<Perms>) {
    let mut expect_off = 0;
    for l in leaves(s, G1, G1) {
        let off = l.ipa.raw() - G1;
        assert!(off >= expect_off);
        for p in (expect_off..off).step_by(K4 as usize) {
            assert_eq!(f(p), None, "hole at {p:#x}");
        }
        assert_eq!(l.hpa.raw(), hpa_base + off);
        assert_eq!(l.attrs.mem, MemType::Normal);
        assert_eq!(l.attrs.state, PageState::SharedOwned);
        for p in (off..off + l.size).step_by(K4 as usize) {
            assert_eq!(f(p), Some(l.attrs.perms), "at {p:#x}");
        }
        expect_off = off + l.size;
    }
    for p in (expect_off..G1).step_by(K4 as usize) {
        assert_eq!(f(p), None);
    }
}

#[test]
fn partial_unmap_splits_1g_block() {
    let mut s = new40();
    let start = s.mm().live();
    s.map(Ipa::new(G1), Hpa::new(3 * G1), G1, RWX, Granule::Largest)
        .unwrap();
    assert_eq!(s.mm().live(), start);
    // Unmap 3 pages straddling a 2M boundary in the middle of the block.
    let hole = G1 + 5 * M2 - K4;
    assert_eq!(s.unmap(Ipa::new(hole), 3 * K4), Ok(3));
    assert_eq!(s.tlb().ops, vec![TlbOp::SyncWrites, inv(G1, 1)]);
    // One L2 table and two L3 tables.
    assert_eq!(s.mm().live(), start + 3);
    let v = leaves(&s, G1, G1);
    assert_eq!(v.len(), 510 + 511 + 510);
    check_1g(&s, 3 * G1, |off| {
        let p = G1 + off;
        if (hole..hole + 3 * K4).contains(&p) {
            None
        } else {
            Some(Perms::RWX)
        }
    });
    assert_eq!(s.query(Ipa::new(G1 + 100 * M2)).unwrap().level, 2);
    // Unmap the rest: everything is freed again.
    s.tlb_mut().ops.clear();
    assert_eq!(s.unmap(Ipa::new(G1), G1), Ok(262_144 - 3));
    assert_eq!(
        s.tlb().ops,
        vec![TlbOp::SyncWrites, TlbOp::InvalidateVmid { vmid: VMID }]
    );
    assert_eq!(s.mm().live(), start);
}

#[test]
fn partial_protect_splits_1g_and_2m_blocks() {
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(G1), G1, RWX, Granule::Largest)
        .unwrap();
    let start = s.mm().live();
    // 4 MiB + 4 KiB starting 2M-aligned: the L1 block splits into an L2
    // table; two 2M blocks change whole, one 2M block splits for one page.
    let a = G1 + 10 * M2;
    let size = 2 * M2 + K4;
    assert_eq!(s.protect(Ipa::new(a), size, Perms::R), Ok(1025));
    assert_eq!(s.mm().live(), start + 2);
    check_1g(&s, G1, |off| {
        if (a..a + size).contains(&(G1 + off)) {
            Some(Perms::R)
        } else {
            Some(Perms::RWX)
        }
    });
    assert_eq!(s.query(Ipa::new(a)).unwrap().size, M2);
    assert_eq!(s.query(Ipa::new(a + 2 * M2)).unwrap().size, K4);
    assert_eq!(
        s.query(Ipa::new(a + 2 * M2 + K4)).unwrap().perms_rwx(),
        Perms::RWX
    );
    // Same permissions again: nothing to do, no TLBI, no split.
    s.tlb_mut().ops.clear();
    assert_eq!(s.protect(Ipa::new(a), size, Perms::R), Ok(0));
    assert!(s.tlb().ops.is_empty());
    assert_eq!(s.mm().live(), start + 2);
}

trait PermsOf {
    fn perms_rwx(&self) -> Perms;
}
impl PermsOf for Leaf {
    fn perms_rwx(&self) -> Perms {
        self.attrs.perms
    }
}

#[test]
fn protect_2m_block_whole_and_page_sequences() {
    let mut s = new40();
    s.map(Ipa::new(M2), Hpa::new(M2), 2 * M2, RWX, Granule::Block2M)
        .unwrap();
    // Whole block: one BBM at level 2, no table.
    let live = s.mm().live();
    assert_eq!(s.protect(Ipa::new(M2), M2, Perms::RX), Ok(512));
    assert_eq!(s.tlb().ops, vec![TlbOp::SyncWrites, inv(M2, 2)]);
    assert_eq!(s.mm().live(), live);
    // Two pages of the second block: one split, nothing else (the new
    // table is written before it is linked).
    s.tlb_mut().ops.clear();
    assert_eq!(
        s.protect(Ipa::new(2 * M2 + 8 * K4), 2 * K4, Perms::R),
        Ok(2)
    );
    assert_eq!(s.tlb().ops, vec![TlbOp::SyncWrites, inv(2 * M2, 2)]);
    // Now the two pages back to RWX: one BBM per live page.
    s.tlb_mut().ops.clear();
    assert_eq!(
        s.protect(Ipa::new(2 * M2 + 8 * K4), 2 * K4, Perms::RWX),
        Ok(2)
    );
    assert_eq!(
        s.tlb().ops,
        vec![
            TlbOp::SyncWrites,
            inv(2 * M2 + 8 * K4, 3),
            TlbOp::SyncWrites,
            inv(2 * M2 + 9 * K4, 3)
        ]
    );
}

#[test]
fn unmap_last_pages_frees_tables_with_table_invalidations() {
    let mut s = new40();
    let start = s.mm().live();
    s.map(Ipa::new(G1 + M2), Hpa::new(0), 2 * K4, RWX, Granule::Page)
        .unwrap();
    assert_eq!(s.mm().live(), start + 2);
    assert_eq!(s.unmap(Ipa::new(G1 + M2), 2 * K4), Ok(2));
    assert_eq!(
        s.tlb().ops,
        vec![
            TlbOp::SyncWrites,
            inv(G1 + M2, 3),
            TlbOp::SyncWrites,
            inv(G1 + M2 + K4, 3),
            // The L3 table became empty: its L2 entry goes.
            TlbOp::SyncWrites,
            inv(G1 + M2, TLBI_LEVEL_TABLE),
            // Then the L2 table: its L1 (root) entry goes.
            TlbOp::SyncWrites,
            inv(G1, TLBI_LEVEL_TABLE),
        ]
    );
    assert_eq!(s.mm().live(), start);
}

#[test]
fn batching_rule_over_512_pages() {
    let mut s = new40();
    s.map(Ipa::new(0), Hpa::new(0), 4 * M2, RWX, Granule::Page)
        .unwrap();
    // Exactly 512 pages: per IPA.
    assert_eq!(s.protect(Ipa::new(K4), M2, Perms::R), Ok(512));
    assert_eq!(s.tlb().invalidations(), 512);
    assert!(s
        .tlb()
        .ops
        .iter()
        .all(|o| !matches!(o, TlbOp::InvalidateVmid { .. })));
    // 513 pages: one VMID flush.
    s.tlb_mut().ops.clear();
    assert_eq!(s.protect(Ipa::new(0), M2 + K4, Perms::RW), Ok(513));
    assert_eq!(
        s.tlb().ops,
        vec![TlbOp::SyncWrites, TlbOp::InvalidateVmid { vmid: VMID }]
    );
    // A big range with nothing to change: nothing at all.
    s.tlb_mut().ops.clear();
    assert_eq!(s.protect(Ipa::new(0), M2 + K4, Perms::RW), Ok(0));
    assert_eq!(s.unmap(Ipa::new(G1), G1), Ok(0));
    assert!(s.tlb().ops.is_empty());
    // Big unmap: one flush, then all tables freed.
    assert_eq!(s.unmap(Ipa::new(0), G1), Ok(2048));
    assert_eq!(
        s.tlb().ops,
        vec![TlbOp::SyncWrites, TlbOp::InvalidateVmid { vmid: VMID }]
    );
    assert_eq!(s.mm().live(), 2);
}

fn raw_tables(s: &S2) -> Vec<Vec<u64>> {
    fn rec(s: &S2, level: u8, t: Hpa, out: &mut Vec<Vec<u64>>) {
        let tab = s.mm().table(t);
        out.push(tab.to_vec());
        for &d in tab.iter() {
            if level < 3 && d & 3 == 3 {
                rec(s, level + 1, Hpa::new(d & 0xffff_ffff_f000), out);
            }
        }
    }
    let mut out = Vec::new();
    for k in 0..s.config().root_tables as u64 {
        rec(
            s,
            s.config().start_level,
            Hpa::new(s.root().raw() + k * K4),
            &mut out,
        );
    }
    out
}

#[test]
fn no_memory_changes_nothing() {
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(G1), G1, RWX, Granule::Largest)
        .unwrap();
    s.map(Ipa::new(0), Hpa::new(0), K4, RWX, Granule::Page)
        .unwrap();
    let before = raw_tables(&s);
    let live = s.mm().live();
    // Splitting the 1G block to pages needs 513 tables.
    s.mm_mut().set_limit(live + 512);
    assert_eq!(
        s.split(Ipa::new(G1), G1, Granule::Page),
        Err(Error::NoMemory)
    );
    // A partial unmap in the middle of it needs 2.
    s.mm_mut().set_limit(live + 1);
    assert_eq!(s.unmap(Ipa::new(G1 + K4), K4), Err(Error::NoMemory));
    assert_eq!(
        s.protect(Ipa::new(G1 + K4), K4, Perms::R),
        Err(Error::NoMemory)
    );
    // A map needing one L3 table under the existing L2 table.
    s.mm_mut().set_limit(live);
    assert_eq!(
        s.map(Ipa::new(M2), Hpa::new(0), K4, RWX, Granule::Page),
        Err(Error::NoMemory)
    );
    assert_eq!(raw_tables(&s), before);
    assert_eq!(s.mm().live(), live);
    assert!(s.tlb().ops.is_empty());
    // With exactly enough it works.
    s.mm_mut().set_limit(live + 513);
    s.split(Ipa::new(G1), G1, Granule::Page).unwrap();
    assert_eq!(s.mm().available(), 0);
    assert_eq!(leaves(&s, G1, G1).len(), 262_144);
}

#[test]
fn split_1g_to_pages_and_partial_split() {
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(5 * G1), G1, RWX, Granule::Largest)
        .unwrap();
    let start = s.mm().live();
    s.split(Ipa::new(G1), G1, Granule::Page).unwrap();
    assert_eq!(
        s.tlb().ops,
        vec![TlbOp::SyncWrites, TlbOp::InvalidateVmid { vmid: VMID }]
    );
    assert_eq!(s.mm().live(), start + 513);
    check_1g(&s, 5 * G1, |_| Some(Perms::RWX));
    assert!(leaves(&s, G1, G1).iter().all(|l| l.size == K4 && l.young));

    // Partial: split [1G + 4K, +4K) only: L1 -> L2 table, one L2 -> L3.
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(5 * G1), G1, RWX, Granule::Largest)
        .unwrap();
    s.split(Ipa::new(G1 + K4), K4, Granule::Page).unwrap();
    assert_eq!(s.tlb().ops, vec![TlbOp::SyncWrites, inv(G1, 1)]);
    assert_eq!(s.mm().live(), start + 2);
    let v = leaves(&s, G1, G1);
    assert_eq!(v.len(), 512 + 511);
    check_1g(&s, 5 * G1, |_| Some(Perms::RWX));
    // Block2M over the whole block: only the L1 split is needed.
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(5 * G1), G1, RWX, Granule::Largest)
        .unwrap();
    s.split(Ipa::new(0), 4 * G1, Granule::Block2M).unwrap();
    assert_eq!(s.mm().live(), start + 1);
    assert_eq!(leaves(&s, G1, G1).len(), 512);
    // Splitting again changes nothing.
    s.tlb_mut().ops.clear();
    s.split(Ipa::new(0), 4 * G1, Granule::Block2M).unwrap();
    assert!(s.tlb().ops.is_empty());
}

#[test]
fn young_and_set_state() {
    let mut s = new40();
    s.map(Ipa::new(M2), Hpa::new(M2), M2 + K4, RWX, Granule::Block2M)
        .unwrap();
    assert_eq!(s.test_and_clear_young(Ipa::new(M2 + K4), K4), Ok(true));
    // The whole block was cleared.
    assert!(!s.query(Ipa::new(M2)).unwrap().young);
    assert!(s.query(Ipa::new(2 * M2)).unwrap().young);
    assert_eq!(s.test_and_clear_young(Ipa::new(M2), M2), Ok(false));
    assert_eq!(s.test_and_clear_young(Ipa::new(0), G1), Ok(true));
    assert_eq!(s.test_and_clear_young(Ipa::new(0), G1), Ok(false));
    assert!(s.tlb().ops.is_empty());
    assert_eq!(
        s.set_state(Ipa::new(M2), M2 + K4, PageState::SharedBorrowed),
        Ok(513)
    );
    let l = s.query(Ipa::new(2 * M2)).unwrap();
    assert_eq!(l.attrs.state, PageState::SharedBorrowed);
    assert_eq!(l.attrs.perms, Perms::RWX);
    let (mm, tlb) = s.destroy();
    assert_eq!(mm.live(), 0);
    assert_eq!(tlb.ops.last(), Some(&TlbOp::InvalidateVmid { vmid: VMID }));
}

#[test]
fn every_ipa_size_maps_its_edges() {
    for bits in 32..=48u8 {
        let mut s: S2 = Stage2::new(bits, VMID, ArenaMemory::new(), RecordingTlb::new()).unwrap();
        let top = 1u64 << bits;
        s.map(Ipa::new(0), Hpa::new(0), K4, RWX, Granule::Page)
            .unwrap();
        s.map(
            Ipa::new(top - 2 * M2),
            Hpa::new(M2),
            2 * M2,
            RWX,
            Granule::Largest,
        )
        .unwrap();
        assert_eq!(s.query(Ipa::new(top - K4)).unwrap().hpa, Hpa::new(2 * M2));
        assert_eq!(
            s.map(Ipa::new(top - K4), Hpa::new(0), 2 * K4, RWX, Granule::Page),
            Err(Error::OutOfRange)
        );
        let mut n = 0;
        s.walk(Ipa::new(0), top, |_| n += 1).unwrap();
        assert_eq!(n, 3);
        assert_eq!(s.unmap(Ipa::new(0), top), Ok(1025));
        assert_eq!(s.mm().live(), s.config().root_tables);
        let (mm, _) = s.destroy();
        assert_eq!(mm.live(), 0);
    }
}
