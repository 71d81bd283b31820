//! Basic behaviour of `Stage2`: mapping, block selection, query and walk.

use stage2::mm::ArenaMemory;
use stage2::pgtable::{Attrs, Error, Granule, Leaf, MemType, PageState, Perms, Stage2};
use stage2::tlb::{RecordingTlb, TlbOp};
use stage2::{Hpa, Ipa, Vmid};

const RW: Attrs = Attrs {
    perms: Perms::RW,
    mem: MemType::Normal,
    state: PageState::Owned,
};
const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;

fn new40() -> Stage2<ArenaMemory, RecordingTlb> {
    Stage2::new(40, Vmid(3), ArenaMemory::new(), RecordingTlb::new()).unwrap()
}

fn leaves(s: &Stage2<ArenaMemory, RecordingTlb>) -> Vec<Leaf> {
    let mut v = Vec::new();
    s.walk(Ipa::new(0), 1 << s.config().ipa_bits, |l| v.push(*l))
        .unwrap();
    v
}

#[test]
fn map_query_unmap_round_trip() {
    let mut s = new40();
    let start = s.mm().live();
    assert_eq!(start, 2, "40-bit IPA: two concatenated level-1 root tables");
    s.map(
        Ipa::new(0x1000),
        Hpa::new(0x9000),
        3 * K4,
        RW,
        Granule::Largest,
    )
    .unwrap();
    let l = s.query(Ipa::new(0x2000)).unwrap();
    assert_eq!(
        (l.ipa, l.hpa, l.size, l.level),
        (Ipa::new(0x2000), Hpa::new(0xa000), K4, 3)
    );
    assert_eq!(l.attrs, RW);
    assert!(l.young);
    assert_eq!(s.query(Ipa::new(0x4000)), None);
    assert_eq!(s.query(Ipa::new(0)), None);
    assert_eq!(s.mm().live(), start + 2, "one L2 and one L3 table");
    assert!(s.tlb().ops.is_empty(), "invalid->valid needs no TLBI");
    assert_eq!(s.unmap(Ipa::new(0), 2 * M2), Ok(3));
    assert_eq!(s.mm().live(), start);
    assert!(leaves(&s).is_empty());
}

#[test]
fn block_selection_by_alignment_and_granule() {
    let mut s = new40();
    // 1 GiB + 2 MiB + 4 KiB, all aligned: one of each.
    let size = G1 + M2 + K4;
    s.map(Ipa::new(G1), Hpa::new(2 * G1), size, RW, Granule::Largest)
        .unwrap();
    let v = leaves(&s);
    let sizes: Vec<u64> = v.iter().map(|l| l.size).collect();
    assert_eq!(sizes, vec![G1, M2, K4]);
    assert_eq!(v[1].hpa, Hpa::new(3 * G1));
    assert_eq!(v[2].hpa, Hpa::new(3 * G1 + M2));

    // Block2M: the 1 GiB becomes 512 2 MiB blocks.
    let mut s = new40();
    s.map(Ipa::new(G1), Hpa::new(2 * G1), G1, RW, Granule::Block2M)
        .unwrap();
    let v = leaves(&s);
    assert_eq!(v.len(), 512);
    assert!(v.iter().all(|l| l.size == M2 && l.level == 2));

    // hpa only 2M-aligned relative to ipa: no 1G block even with Largest.
    let mut s = new40();
    s.map(
        Ipa::new(G1),
        Hpa::new(2 * G1 + M2),
        G1,
        RW,
        Granule::Largest,
    )
    .unwrap();
    assert_eq!(leaves(&s).len(), 512);

    // hpa only page-aligned relative to ipa: pages.
    let mut s = new40();
    s.map(Ipa::new(0), Hpa::new(K4), M2, RW, Granule::Largest)
        .unwrap();
    assert_eq!(leaves(&s).len(), 512);
    assert_eq!(s.query(Ipa::new(M2 - K4)).unwrap().hpa, Hpa::new(M2));
}

#[test]
fn memory_is_exactly_the_leaf_tables() {
    let mut s = new40();
    let start = s.mm().live();
    s.map(Ipa::new(G1), Hpa::new(G1), G1, RW, Granule::Page)
        .unwrap();
    assert_eq!(s.mm().live() - start, 513);
    assert_eq!(s.unmap(Ipa::new(G1), G1), Ok(262_144));
    assert_eq!(s.mm().live(), start);
    s.map(Ipa::new(G1), Hpa::new(G1), G1, RW, Granule::Block2M)
        .unwrap();
    assert_eq!(s.mm().live() - start, 1);
}

#[test]
fn argument_errors() {
    let mut s = new40();
    let m = |s: &mut Stage2<_, _>, ipa, hpa, size| {
        s.map(Ipa::new(ipa), Hpa::new(hpa), size, RW, Granule::Page)
    };
    assert_eq!(m(&mut s, 0x800, 0, K4), Err(Error::Misaligned));
    assert_eq!(m(&mut s, 0, 0x800, K4), Err(Error::Misaligned));
    assert_eq!(m(&mut s, 0, 0, 0x800), Err(Error::Misaligned));
    assert_eq!(m(&mut s, 0, 0, 0), Err(Error::Misaligned));
    assert_eq!(m(&mut s, (1 << 40) - K4, 0, 2 * K4), Err(Error::OutOfRange));
    assert_eq!(m(&mut s, 0, (1 << 48) - K4, 2 * K4), Err(Error::OutOfRange));
    assert_eq!(m(&mut s, !0xfff, 0, K4), Err(Error::OutOfRange));
    assert_eq!(s.unmap(Ipa::new(0), 0), Err(Error::Misaligned));
    assert_eq!(
        s.protect(Ipa::new(1 << 40), K4, Perms::R),
        Err(Error::OutOfRange)
    );
    m(&mut s, 0, 0, K4).unwrap();
    assert_eq!(m(&mut s, 0, 0x5000, M2), Err(Error::AlreadyMapped));
    assert_eq!(leaves(&s).len(), 1);
    assert!(s.tlb().ops.is_empty());
    assert!(matches!(
        Stage2::new(31, Vmid(1), ArenaMemory::new(), RecordingTlb::new()),
        Err(Error::BadConfig)
    ));
    assert!(matches!(
        Stage2::new(40, Vmid(1), ArenaMemory::with_limit(1), RecordingTlb::new()),
        Err(Error::NoMemory)
    ));
}

#[test]
fn protect_one_page_in_2m_block_bbm_sequence() {
    let mut s = new40();
    s.map(Ipa::new(M2), Hpa::new(4 * M2), M2, RW, Granule::Block2M)
        .unwrap();
    assert_eq!(s.protect(Ipa::new(M2 + 5 * K4), K4, Perms::R), Ok(1));
    assert_eq!(
        s.tlb().ops,
        vec![
            TlbOp::SyncWrites,
            TlbOp::InvalidateIpa {
                vmid: Vmid(3),
                ipa: Ipa::new(M2),
                level: 2
            }
        ]
    );
    let v = leaves(&s);
    assert_eq!(v.len(), 512);
    assert!(v
        .iter()
        .enumerate()
        .all(|(i, l)| l.hpa == Hpa::new(4 * M2 + i as u64 * K4)
            && l.attrs.perms == if i == 5 { Perms::R } else { Perms::RW }));
}
