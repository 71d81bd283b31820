//! Unit tests of every call against the fakes: success and every refusal
//! (checking that a refused call changed nothing), lifecycle, teardown
//! bounds, the abort policy. The property test and the concurrency test
//! are in `prop.rs` (against the ABI model) and `smp.rs`.

use std::vec::Vec;

use hypercalls::{
    CounterGroup, Counters, GuestPage, HostFunction, HostPageInfo, HypError, Hypercall, IpaBits,
    Owner, OwnerState, PageCount, PageState, Prot, Reply, RuntimeCounters, Stage2Counters,
    TeardownProgress, VcpuCount, VcpuIndex, VmHandle,
};
use stage2::Pfn as HPfn;

use super::fake::{fake_hyp, FakeHyp};
use super::{AbortAction, AbortKind, AbortOutcome, MAX_VMS, SERVED};

mod prop;
mod run;
mod smp;

pub(super) use super::fake::{run, HOLE, HOST0, HOST1, HYP0};

pub(super) fn pfn(raw: u64) -> hypercalls::Pfn {
    hypercalls::Pfn::new(raw).unwrap()
}

pub(super) fn gfn(raw: u64) -> hypercalls::Gfn {
    hypercalls::Gfn::new(raw).unwrap()
}

pub(super) fn count(n: u32) -> PageCount {
    PageCount::new(n).unwrap()
}

pub(super) fn hyp() -> FakeHyp {
    fake_hyp(256, u32::MAX).unwrap()
}

pub(super) fn ok(h: &FakeHyp, call: Hypercall) -> Reply {
    let r = run(h, call);
    h.check_invariants().unwrap();
    r.unwrap_or_else(|e| panic!("{call:?}: {e:?}"))
}

/// `call` fails with `err` and changes nothing.
pub(super) fn refused(h: &FakeHyp, call: Hypercall, err: HypError) {
    let before = h.snapshot();
    let zeroed = h.platform().zero_calls();
    assert_eq!(run(h, call), Err(err), "{call:?}");
    assert!(h.snapshot() == before, "{call:?} changed the state");
    assert_eq!(h.platform().zero_calls(), zeroed, "{call:?} zeroed pages");
    h.check_invariants().unwrap();
}

pub(super) fn create(h: &FakeHyp, ipa_bits: u8, root: u64) -> VmHandle {
    match ok(
        h,
        Hypercall::VmCreate {
            ipa_bits: IpaBits::new(ipa_bits).unwrap(),
            nr_vcpus: VcpuCount::new(2).unwrap(),
            root: pfn(root),
            memory: None,
        },
    ) {
        Reply::VmCreated { vm } => vm,
        r => panic!("{r:?}"),
    }
}

pub(super) fn topup(h: &FakeHyp, vm: VmHandle, first: u64, n: u32) {
    ok(
        h,
        Hypercall::MemcacheTopup {
            vm,
            pfn: pfn(first),
            nr: count(n),
        },
    );
}

fn host_page(h: &FakeHyp, p: u64) -> HostPageInfo {
    match ok(h, Hypercall::HostPageState { pfn: pfn(p) }) {
        Reply::HostPage(i) => i,
        r => panic!("{r:?}"),
    }
}

fn guest_page(h: &FakeHyp, vm: VmHandle, g: u64) -> GuestPage {
    match ok(h, Hypercall::GuestPageState { vm, gfn: gfn(g) }) {
        Reply::GuestPage(p) => p,
        r => panic!("{r:?}"),
    }
}

fn stage2_counters(h: &FakeHyp, vm: VmHandle) -> Stage2Counters {
    match ok(
        h,
        Hypercall::VmCounters {
            vm,
            group: CounterGroup::Stage2,
        },
    ) {
        Reply::Counters(Counters::Stage2(c)) => c,
        r => panic!("{r:?}"),
    }
}

pub(super) fn runtime_counters(h: &FakeHyp, vm: VmHandle) -> RuntimeCounters {
    match ok(
        h,
        Hypercall::VmCounters {
            vm,
            group: CounterGroup::Runtime,
        },
    ) {
        Reply::Counters(Counters::Runtime(c)) => c,
        r => panic!("{r:?}"),
    }
}

pub(super) fn share(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Share {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
        prot: Prot::RW,
    }
}

pub(super) fn unshare(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Unshare {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
    }
}

pub(super) fn donate(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Donate {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
        prot: Prot::RWX,
    }
}

pub(super) fn reclaim(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Reclaim {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
    }
}

const HOST_OWNED: HostPageInfo = HostPageInfo {
    owner: Owner::Host,
    state: OwnerState::Owned,
    share_count: 0,
};
const HYP_OWNED: HostPageInfo = HostPageInfo {
    owner: Owner::Hyp,
    state: OwnerState::Owned,
    share_count: 0,
};

/// A VM with a 40-bit IPA (2 root pages at HOST0) and 8 memcache pages.
fn vm_with_memcache(h: &FakeHyp) -> VmHandle {
    let vm = create(h, 40, HOST0);
    topup(h, vm, HOST0 + 2, 8);
    vm
}

/// Tears `vm` down completely; returns the progress of each reclaim call.
pub(super) fn teardown(h: &FakeHyp, vm: VmHandle) -> Vec<TeardownProgress> {
    ok(h, Hypercall::TeardownStart { vm });
    let mut steps = Vec::new();
    loop {
        match ok(h, Hypercall::TeardownReclaim { vm }) {
            Reply::Teardown(t) => {
                steps.push(t);
                if !t.more {
                    break;
                }
            }
            r => panic!("{r:?}"),
        }
        assert!(steps.len() < 100, "teardown does not end");
    }
    ok(h, Hypercall::TeardownFinalize { vm });
    steps
}

#[test]
fn version_and_features() {
    let h = hyp();
    assert!(matches!(ok(&h, Hypercall::Version), Reply::Version(_)));
    for f in HostFunction::ALL {
        let r = ok(&h, Hypercall::Features { func: f.id() });
        assert_eq!(r, Reply::Features { supported: true }, "{f:?}");
        assert!(SERVED.contains(f));
    }
    assert_eq!(
        ok(&h, Hypercall::Features { func: 0xc600_0100 }),
        Reply::Features { supported: false }
    );
    let vm = create(&h, 40, HOST0);
    refused(
        &h,
        Hypercall::VcpuRun {
            vm,
            vcpu: VcpuIndex::new(0).unwrap(),
            mmio_data: 0,
        },
        HypError::NoEntry,
    );
}

#[test]
fn unknown_ids_are_not_supported() {
    let h = hyp();
    let not_supported = HypError::NotSupported.to_i64() as u64;
    for id in [
        0xc600_ffff,
        0,
        0xc600_0100,
        0x8600_0000,
        0x1_c600_0000,
        u64::MAX,
    ] {
        let out = h.host_call(&[id, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, [not_supported, 0, 0, 0, 0, 0, 0, 0], "{id:#x}");
    }
    // A known call with a reserved register set is malformed.
    let mut regs = Hypercall::Version.encode();
    regs[3] = 1;
    assert_eq!(
        h.host_call(&regs)[0] as i64,
        HypError::InvalidArgument.to_i64()
    );
}

#[test]
fn vm_create_and_refusals() {
    let h = hyp();
    let make = |bits: u8, root: u64| Hypercall::VmCreate {
        ipa_bits: IpaBits::new(bits).unwrap(),
        nr_vcpus: VcpuCount::new(1).unwrap(),
        root: pfn(root),
        memory: None,
    };
    // Not RAM: the hole, a range running into the hole, far away.
    refused(&h, make(48, HOLE), HypError::OutOfRange);
    refused(&h, make(48, 0x1000), HypError::OutOfRange);
    // Hypervisor memory.
    refused(&h, make(48, HYP0), HypError::Denied);
    // Misaligned root is a decode error.
    let mut regs = make(32, HOST0).encode();
    regs[3] = HOST0 + 2;
    assert_eq!(
        h.host_call(&regs)[0] as i64,
        HypError::InvalidArgument.to_i64()
    );

    let vm = create(&h, 32, HOST0);
    assert_eq!((vm.index(), vm.generation()), (0, 1));
    for i in 0..4 {
        assert_eq!(host_page(&h, HOST0 + i), HYP_OWNED);
    }
    assert_eq!(host_page(&h, HOST0 + 4), HOST_OWNED);
    assert_eq!(stage2_counters(&h, vm), Stage2Counters::default());
    assert_eq!(
        runtime_counters(&h, vm),
        RuntimeCounters {
            table_pages: 4,
            ..RuntimeCounters::default()
        }
    );
    assert_eq!(guest_page(&h, vm, 0), GuestPage::Unmapped);
    // The root is the hypervisor's now.
    refused(&h, make(48, HOST0 + 1), HypError::Denied);

    // Fill every slot; the next create finds none.
    for i in 1..MAX_VMS as u64 {
        let v = create(&h, 48, HOST0 + 4 + i);
        assert_eq!(u64::from(v.index()), i);
    }
    refused(&h, make(48, HOST0 + 100), HypError::NoSpace);
    // ENOSPC comes before the range check.
    refused(&h, make(48, HOLE), HypError::NoSpace);
}

#[test]
fn bad_handles() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    let other_gen = VmHandle::new(vm.index(), 2).unwrap();
    let other_slot = VmHandle::new(1, 1).unwrap();
    let beyond = VmHandle::new(MAX_VMS as u16, 1).unwrap();
    for bad in [
        other_gen,
        other_slot,
        beyond,
        VmHandle::new(0xffff, 0xffff).unwrap(),
    ] {
        refused(&h, share(bad, HOST0 + 10, 0, 1), HypError::NoEntry);
        refused(
            &h,
            Hypercall::MemcacheReclaim { vm: bad },
            HypError::NoEntry,
        );
        refused(&h, Hypercall::TeardownStart { vm: bad }, HypError::NoEntry);
        refused(
            &h,
            Hypercall::VmCounters {
                vm: bad,
                group: CounterGroup::Stage2,
            },
            HypError::NoEntry,
        );
        refused(
            &h,
            Hypercall::GuestPageState {
                vm: bad,
                gfn: gfn(0),
            },
            HypError::NoEntry,
        );
    }
    // Handle 0 is a decode error.
    let mut regs = share(vm, HOST0 + 10, 0, 1).encode();
    regs[1] = 0;
    assert_eq!(
        h.host_call(&regs)[0] as i64,
        HypError::InvalidArgument.to_i64()
    );
}

#[test]
fn memcache_topup_and_reclaim() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    let top = |p: u64, n: u32| Hypercall::MemcacheTopup {
        vm,
        pfn: pfn(p),
        nr: count(n),
    };
    refused(&h, top(HOLE - 1, 2), HypError::OutOfRange);
    refused(&h, top(HOST1 + 511, 2), HypError::OutOfRange);
    refused(&h, top(HYP0 + 0xff, 2), HypError::Denied);
    refused(&h, top(HOST0 + 1, 1), HypError::Denied);
    // A shared page cannot be donated to the hypervisor.
    topup(&h, vm, HOST0 + 2, 4);
    ok(&h, share(vm, HOST0 + 20, 0, 1));
    refused(&h, top(HOST0 + 19, 2), HypError::Denied);
    // The share took two tables (levels 2 and 3).
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 2);
    let tables = runtime_counters(&h, vm).table_pages;
    assert!(tables > 2);

    topup(&h, vm, HOST1, 10);
    assert_eq!(host_page(&h, HOST1 + 9), HYP_OWNED);
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 12);
    h.platform().write(HPfn(HOST1 + 9), 0xabc);
    let mut returned = Vec::new();
    loop {
        match ok(&h, Hypercall::MemcacheReclaim { vm }) {
            Reply::MemcacheReclaimed(p) if p.as_slice().is_empty() => break,
            Reply::MemcacheReclaimed(p) => {
                assert!(p.as_slice().len() <= hypercalls::MEMCACHE_RECLAIM_MAX);
                returned.extend(p.as_slice().iter().map(|p| p.raw()));
            }
            r => panic!("{r:?}"),
        }
    }
    returned.sort_unstable();
    assert_eq!(returned.len(), 12);
    for p in &returned {
        assert_eq!(host_page(&h, *p), HOST_OWNED);
    }
    assert_eq!(
        h.platform().read(HPfn(HOST1 + 9)),
        0,
        "returned page not zeroed"
    );
    // The tables in use stay.
    assert_eq!(runtime_counters(&h, vm).table_pages, tables);
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 0);
}

#[test]
fn share_unshare() {
    let h = fake_hyp(256, 2).unwrap();
    let vm = vm_with_memcache(&h);
    let p = HOST0 + 100;
    refused(&h, share(vm, HOLE - 1, 0, 2), HypError::OutOfRange);
    // Beyond the 40-bit IPA space.
    refused(&h, share(vm, p, (1 << 28) - 1, 2), HypError::OutOfRange);
    refused(&h, share(vm, HYP0, 0, 1), HypError::Denied);

    ok(&h, share(vm, p, 0x10, 4));
    assert_eq!(
        host_page(&h, p),
        HostPageInfo {
            owner: Owner::Host,
            state: OwnerState::SharedOwned,
            share_count: 1
        }
    );
    assert_eq!(
        guest_page(&h, vm, 0x13),
        GuestPage::Mapped {
            state: PageState::SharedBorrowed,
            pfn: pfn(p + 3),
            prot: Prot::RW
        }
    );
    // Overlapping gfn: EEXIST; share again elsewhere: count 2; the limit
    // (2 here) is ERANGE.
    refused(&h, share(vm, p + 10, 0x13, 2), HypError::Exists);
    ok(&h, share(vm, p, 0x20, 1));
    assert_eq!(host_page(&h, p).share_count, 2);
    refused(&h, share(vm, p, 0x30, 1), HypError::OutOfRange);
    // Host side before guest side: the over-shared page decides even
    // though the gfn is mapped.
    refused(&h, share(vm, p, 0x13, 1), HypError::OutOfRange);

    // Unshare refusals.
    refused(&h, unshare(vm, p + 50, 0x10, 1), HypError::Denied); // not shared
    refused(&h, unshare(vm, p, 0x40, 1), HypError::NoEntry); // gfn unmapped
    refused(&h, unshare(vm, p + 1, 0x10, 1), HypError::Denied); // other frame
    refused(&h, unshare(vm, p, 0x10, 5), HypError::Denied); // p+4 not shared
    let before = stage2_counters(&h, vm);
    ok(&h, unshare(vm, p, 0x10, 4));
    ok(&h, unshare(vm, p, 0x20, 1));
    assert_eq!(host_page(&h, p), HOST_OWNED);
    assert_eq!(guest_page(&h, vm, 0x10), GuestPage::Unmapped);
    let after = stage2_counters(&h, vm);
    assert_eq!(after.unshares - before.unshares, 5);
    assert_eq!(after.unmaps - before.unmaps, 5);
    // One per page, and one per table emptied by the last unshare (the
    // level-3 and level-2 tables).
    assert_eq!(after.tlbi - before.tlbi, 5 + 2);
    assert_eq!(after.shares, 5);
    assert_eq!(after.maps, 5);
}

/// A 2 MiB-aligned share of 512 frames maps one block (ABI §2.8): fewer
/// table pages, every page reported on its own, one invalidation to
/// remove it whole; a change to part of it splits it with one memcache
/// page, or fails with `HYP_ENOMEM` and changes nothing.
#[test]
fn blocks() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 8);
    // A page at gfn 0x10 brings the level-2 table of the first GiB.
    ok(&h, share(vm, HOST0 + 20, 0x10, 1));
    let rt0 = runtime_counters(&h, vm);
    let s0 = stage2_counters(&h, vm);
    // The block: both pfn and gfn 2 MiB-aligned. No new table.
    let (p, g) = (HOST0 + 0x100, 0x400);
    ok(&h, share(vm, p, g, 512));
    let rt1 = runtime_counters(&h, vm);
    assert_eq!(rt1.table_pages, rt0.table_pages);
    assert_eq!(rt1.memcache_pages, rt0.memcache_pages);
    for k in [0, 1, 255, 511] {
        assert_eq!(
            guest_page(&h, vm, g + k),
            GuestPage::Mapped {
                state: PageState::SharedBorrowed,
                pfn: pfn(p + k),
                prot: Prot::RW
            }
        );
        assert_eq!(host_page(&h, p + k).share_count, 1);
    }
    // The same 512 pages at an unaligned gfn: 4 KiB pages, two level-3
    // tables (the range crosses a 2 MiB boundary).
    ok(&h, share(vm, p, 0x801, 512));
    let rt2 = runtime_counters(&h, vm);
    assert_eq!(rt2.table_pages, rt1.table_pages + 2);

    // Write-protect of the whole block: no split, no memory.
    let wp = |gfn: u64, n: u32| Hypercall::WrProtect {
        vm,
        gfn: super::tests::gfn(gfn),
        nr: count(n),
    };
    assert_eq!(ok(&h, wp(g, 512)), Reply::WrProtected { pages: 512 });
    assert_eq!(runtime_counters(&h, vm).memcache_pages, rt2.memcache_pages);
    // Relax of one page: the block is split (one memcache page), only
    // that page becomes writable.
    let relax = Hypercall::RelaxPerms {
        vm,
        gfn: gfn(g + 7),
        prot: Prot::W,
    };
    ok(&h, relax);
    let rt3 = runtime_counters(&h, vm);
    assert_eq!(rt3.memcache_pages, rt2.memcache_pages - 1);
    assert_eq!(rt3.table_pages, rt2.table_pages + 1);
    let prot = |k: u64| match guest_page(&h, vm, g + k) {
        GuestPage::Mapped { prot, .. } => prot,
        GuestPage::Unmapped => panic!("gfn {k} unmapped"),
    };
    assert_eq!((prot(6), prot(7), prot(8)), (Prot::R, Prot::RW, Prot::R));
    // Split pages unshare one by one; unsharing them all frees the table.
    ok(&h, unshare(vm, p, g, 512));
    assert_eq!(runtime_counters(&h, vm).table_pages, rt2.table_pages);

    // Whole-block unshare: one invalidation; the same 512 pages mapped as
    // pages: one per page and one for the emptied level-3 table.
    ok(&h, share(vm, p, g, 512));
    let before = stage2_counters(&h, vm);
    ok(&h, unshare(vm, p, g, 512));
    let block_tlbi = stage2_counters(&h, vm).tlbi - before.tlbi;
    assert_eq!(block_tlbi, 1);
    let before = stage2_counters(&h, vm);
    ok(&h, unshare(vm, p, 0x801, 512));
    let after = stage2_counters(&h, vm);
    assert_eq!(after.tlbi - before.tlbi, 512 + 2);
    assert_eq!(after.unshares - s0.unshares, 3 * 512);

    // Partial unshare splits; the rest stays mapped.
    ok(&h, share(vm, p, g, 512));
    ok(&h, unshare(vm, p + 3, g + 3, 2));
    assert_eq!(guest_page(&h, vm, g + 3), GuestPage::Unmapped);
    assert!(matches!(
        guest_page(&h, vm, g + 5),
        GuestPage::Mapped { .. }
    ));
    assert_eq!(host_page(&h, p + 3), HOST_OWNED);
    assert_eq!(host_page(&h, p + 5).share_count, 1);
    teardown(&h, vm);
    h.check_all_returned().unwrap();
}

fn unshare_range(vm: VmHandle, g: u64, n: u32) -> Hypercall {
    Hypercall::UnshareRange {
        vm,
        gfn: gfn(g),
        nr: count(n),
    }
}

/// `HYP_UNSHARE_RANGE` (ABI §3.21): every mapped gfn whatever its frame,
/// holes skipped; refusals change nothing; up to 32 leaves one
/// invalidation each, more one VMID-wide invalidation; blocks as §2.8.
#[test]
fn unshare_range_of_scattered_frames() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 8);
    // gfn 0x10 + i maps frame base + 39 - i (frames in reverse order, as
    // a host's pins come), with a hole at gfn 0x15; the frame at gfn 0x37
    // is also shared at gfn 0x60.
    let base = HOST0 + 0x80;
    let frame = |i: u64| base + 39 - i;
    for i in (0..40).filter(|&i| i != 5) {
        ok(&h, share(vm, frame(i), 0x10 + i, 1));
    }
    ok(&h, share(vm, base, 0x60, 1));
    ok(&h, donate(vm, HOST0 + 0x200, 0x70, 1));

    refused(&h, unshare_range(vm, 0x60, 0x20), HypError::Denied);
    refused(
        &h,
        unshare_range(vm, (1 << 28) - 1, 2),
        HypError::OutOfRange,
    );
    let stale = VmHandle::new(vm.index(), vm.generation() + 1).unwrap();
    refused(&h, unshare_range(stale, 0x10, 1), HypError::NoEntry);

    // Four pages: one invalidation each (the table keeps others).
    let s0 = stage2_counters(&h, vm);
    assert_eq!(
        ok(&h, unshare_range(vm, 0x10, 4)),
        Reply::Unshared { pages: 4 }
    );
    let s1 = stage2_counters(&h, vm);
    assert_eq!(s1.tlbi - s0.tlbi, 4);
    assert_eq!((s1.unshares - s0.unshares, s1.unmaps - s0.unmaps), (4, 4));
    for i in 0..4 {
        assert_eq!(host_page(&h, frame(i)), HOST_OWNED);
        assert_eq!(guest_page(&h, vm, 0x10 + i), GuestPage::Unmapped);
    }
    // 35 pages (0x14..0x38 without the hole): one VMID-wide invalidation.
    assert_eq!(
        ok(&h, unshare_range(vm, 0x14, 0x30)),
        Reply::Unshared { pages: 35 }
    );
    let s2 = stage2_counters(&h, vm);
    assert_eq!(s2.tlbi - s1.tlbi, 1);
    assert_eq!(s2.unshares - s1.unshares, 35);
    for i in 4..40 {
        assert_eq!(guest_page(&h, vm, 0x10 + i), GuestPage::Unmapped);
        if i != 5 && i != 39 {
            assert_eq!(host_page(&h, frame(i)), HOST_OWNED);
        }
    }
    // The frame shared twice keeps its mapping at 0x60.
    assert_eq!(host_page(&h, base).share_count, 1);
    // Nothing mapped: success, 0 pages, no invalidation.
    assert_eq!(
        ok(&h, unshare_range(vm, 0x10, 0x40)),
        Reply::Unshared { pages: 0 }
    );
    assert_eq!(stage2_counters(&h, vm).tlbi, s2.tlbi);
    teardown(&h, vm);
    h.check_all_returned().unwrap();
}

/// `HYP_UNSHARE_RANGE` over 2 MiB blocks: a whole block is one leaf and
/// needs no memory; part of one is a split (`HYP_ENOMEM` with an empty
/// memcache, nothing changed).
#[test]
fn unshare_range_of_blocks() {
    let h = hyp();
    let vm = create(&h, 32, HOST0);
    let g = 0x400;
    ok(&h, share(vm, HOST1, g, 512));
    refused(&h, unshare_range(vm, g - 1, 2), HypError::NoMemory);
    refused(&h, unshare_range(vm, g + 511, 2), HypError::NoMemory);
    let s0 = stage2_counters(&h, vm);
    assert_eq!(
        ok(&h, unshare_range(vm, g, 512)),
        Reply::Unshared { pages: 512 }
    );
    assert_eq!(stage2_counters(&h, vm).tlbi - s0.tlbi, 1);
    assert_eq!(host_page(&h, HOST1 + 300), HOST_OWNED);
    // With a memcache page, part of a block: split, the rest stays.
    ok(&h, share(vm, HOST1, g, 512));
    topup(&h, vm, HOST0 + 0x10, 1);
    assert_eq!(
        ok(&h, unshare_range(vm, g + 500, 12)),
        Reply::Unshared { pages: 12 }
    );
    assert_eq!(guest_page(&h, vm, g + 505), GuestPage::Unmapped);
    assert!(matches!(
        guest_page(&h, vm, g + 499),
        GuestPage::Mapped { .. }
    ));
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 0);
    // The other 500 pages: more than 32 leaves, one VMID-wide invalidation,
    // and the emptied table goes back to the memcache.
    let s1 = stage2_counters(&h, vm);
    assert_eq!(
        ok(&h, unshare_range(vm, g, 512)),
        Reply::Unshared { pages: 500 }
    );
    assert_eq!(stage2_counters(&h, vm).tlbi - s1.tlbi, 1);
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 1);
    teardown(&h, vm);
    h.check_all_returned().unwrap();
}

/// With an empty memcache a block can still be shared into a VM whose
/// root is at level 2 (no table needed), but no call may split it:
/// `HYP_ENOMEM`, nothing changed. Whole-block calls still work.
#[test]
fn block_split_without_memory() {
    let h = hyp();
    let vm = create(&h, 32, HOST0);
    let (p, g) = (HOST0 + 0x100, 0x200);
    ok(&h, share(vm, p, g, 512));
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 0);
    refused(&h, unshare(vm, p, g, 1), HypError::NoMemory);
    refused(&h, unshare(vm, p + 500, g + 500, 12), HypError::NoMemory);
    let wp = |gfn: u64, n: u32| Hypercall::WrProtect {
        vm,
        gfn: super::tests::gfn(gfn),
        nr: count(n),
    };
    refused(&h, wp(g + 511, 2), HypError::NoMemory);
    refused(
        &h,
        Hypercall::RelaxPerms {
            vm,
            gfn: gfn(g + 1),
            prot: Prot::X,
        },
        HypError::NoMemory,
    );
    // Relaxing to what is there changes nothing and needs nothing.
    ok(
        &h,
        Hypercall::RelaxPerms {
            vm,
            gfn: gfn(g + 1),
            prot: Prot::W,
        },
    );
    // Test-and-clear-young on part of the block clears the whole block's
    // flag without a split.
    let young = |gfn: u64| Hypercall::TestClearYoung {
        vm,
        gfn: super::tests::gfn(gfn),
        nr: count(1),
    };
    assert_eq!(ok(&h, young(g + 9)), Reply::Young { young: true });
    assert_eq!(ok(&h, young(g + 300)), Reply::Young { young: false });
    // Whole-block write-protect and unshare need no memory.
    assert_eq!(ok(&h, wp(g, 512)), Reply::WrProtected { pages: 512 });
    let before = stage2_counters(&h, vm);
    ok(&h, unshare(vm, p, g, 512));
    assert_eq!(stage2_counters(&h, vm).tlbi - before.tlbi, 1);
    assert_eq!(host_page(&h, p + 511), HOST_OWNED);
    // Donated as a block, reclaimed as one; a partial reclaim is ENOMEM.
    ok(&h, donate(vm, HOST1, g, 512));
    refused(&h, reclaim(vm, HOST1 + 1, g + 1, 1), HypError::NoMemory);
    ok(&h, reclaim(vm, HOST1, g, 512));
    assert_eq!(host_page(&h, HOST1 + 100), HOST_OWNED);
    // The VM holds one block and no memcache page: one batch of 512 says
    // nothing is left.
    ok(&h, share(vm, p, g, 512));
    let steps = teardown(&h, vm);
    assert_eq!(
        steps,
        [TeardownProgress {
            reclaimed: 512,
            more: false
        }]
    );
    h.check_all_returned().unwrap();
}

/// A teardown batch never exceeds `HYP_TEARDOWN_BATCH` page updates: a
/// block that does not fit in what is left waits for the next batch.
#[test]
fn teardown_batches_hold_whole_blocks() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 8);
    ok(&h, share(vm, HOST0 + 20, 0x10, 3));
    ok(&h, share(vm, HOST0 + 0x100, 0x200, 512));
    ok(&h, donate(vm, HOST1, 0x400, 512));
    let steps = teardown(&h, vm);
    let batches: Vec<u32> = steps.iter().map(|s| s.reclaimed).collect();
    // 3 pages, then a block that does not fit, then the other block, then
    // the 8 memcache pages (the tables are back among them).
    assert_eq!(batches, [3, 512, 512, 8]);
    h.check_all_returned().unwrap();
}

#[test]
fn share_needs_memcache() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    // No memcache: the level-1..3 tables cannot be allocated.
    refused(&h, share(vm, HOST0 + 10, 0, 1), HypError::NoMemory);
    refused(&h, donate(vm, HOST0 + 10, 0, 1), HypError::NoMemory);
    topup(&h, vm, HOST0 + 2, 1);
    refused(&h, share(vm, HOST0 + 10, 0, 1), HypError::NoMemory);
    topup(&h, vm, HOST0 + 3, 1);
    ok(&h, share(vm, HOST0 + 10, 0, 1));
}

#[test]
fn donate_reclaim() {
    let h = hyp();
    let vm = vm_with_memcache(&h);
    let p = HOST0 + 200;
    h.platform().write(HPfn(p), 0x5a5a);
    refused(&h, donate(vm, HYP0 + 1, 0, 1), HypError::Denied);
    ok(&h, share(vm, p + 5, 0x100, 1));
    refused(&h, donate(vm, p, 0, 8), HypError::Denied); // p+5 shared
    refused(&h, donate(vm, p, 0x100, 1), HypError::Exists);

    ok(&h, donate(vm, p, 0, 4));
    assert_eq!(host_page(&h, p).owner, Owner::Vm(vm));
    assert_eq!(
        guest_page(&h, vm, 1),
        GuestPage::Mapped {
            state: PageState::Owned,
            pfn: pfn(p + 1),
            prot: Prot::RWX
        }
    );
    // Contents are kept; the host cannot touch the pages any more.
    assert_eq!(h.platform().read(HPfn(p)), 0x5a5a);
    assert_eq!(
        h.host_abort(p << 12, AbortKind::Translation),
        AbortAction::InjectAbort
    );
    // Not shareable, not donatable again, not to the memcache.
    refused(&h, share(vm, p, 0x200, 1), HypError::Denied);
    refused(&h, donate(vm, p, 0x200, 1), HypError::Denied);

    // Reclaim refusals.
    refused(&h, reclaim(vm, p + 10, 0, 1), HypError::Denied); // host's page
    refused(&h, reclaim(vm, p, 1, 1), HypError::Denied); // other frame
    refused(&h, reclaim(vm, p, 0, 5), HypError::Denied); // p+4 not the VM's
    refused(&h, reclaim(vm, p + 5, 0x100, 1), HypError::Denied); // borrowed
    ok(&h, reclaim(vm, p, 0, 2));
    assert_eq!(host_page(&h, p), HOST_OWNED);
    assert_eq!(h.platform().read(HPfn(p)), 0, "reclaimed page not zeroed");
    assert_eq!(
        h.host_abort(p << 12, AbortKind::Translation),
        AbortAction::Retry
    );
    refused(&h, reclaim(vm, p + 2, 0, 1), HypError::NoEntry); // gfn 0 gone
    let c = stage2_counters(&h, vm);
    assert_eq!((c.donations, c.reclaims, c.maps, c.unmaps), (4, 2, 5, 2));
}

#[test]
fn wrprotect_relax_young() {
    let h = hyp();
    let vm = vm_with_memcache(&h);
    let wrp = |g: u64, n: u32| Hypercall::WrProtect {
        vm,
        gfn: gfn(g),
        nr: count(n),
    };
    let young = |g: u64, n: u32| Hypercall::TestClearYoung {
        vm,
        gfn: gfn(g),
        nr: count(n),
    };
    let relax = |g: u64, prot: Prot| Hypercall::RelaxPerms {
        vm,
        gfn: gfn(g),
        prot,
    };
    ok(&h, donate(vm, HOST0 + 300, 0x10, 3));
    ok(
        &h,
        Hypercall::Share {
            vm,
            pfn: pfn(HOST0 + 310),
            gfn: gfn(0x13),
            nr: count(1),
            prot: Prot::R,
        },
    );
    ok(&h, share(vm, HOST0 + 311, 0x18, 1));
    refused(&h, wrp((1 << 28) - 1, 2), HypError::OutOfRange);
    assert_eq!(ok(&h, wrp(0, 512)), Reply::WrProtected { pages: 4 });
    assert_eq!(ok(&h, wrp(0, 512)), Reply::WrProtected { pages: 0 });
    assert_eq!(
        guest_page(&h, vm, 0x10),
        GuestPage::Mapped {
            state: PageState::Owned,
            pfn: pfn(HOST0 + 300),
            prot: Prot::RX
        }
    );
    refused(&h, relax(0x14, Prot::W), HypError::NoEntry);
    refused(&h, relax(1 << 28, Prot::W), HypError::OutOfRange);
    ok(&h, relax(0x13, Prot::W));
    assert_eq!(
        guest_page(&h, vm, 0x13),
        GuestPage::Mapped {
            state: PageState::SharedBorrowed,
            pfn: pfn(HOST0 + 310),
            prot: Prot::RW
        }
    );
    // Relaxing to what is there changes nothing.
    refused_ok_unchanged(&h, relax(0x13, Prot::R));

    assert_eq!(ok(&h, young(0x10, 1)), Reply::Young { young: true });
    assert_eq!(ok(&h, young(0x10, 1)), Reply::Young { young: false });
    assert_eq!(ok(&h, young(0x11, 8)), Reply::Young { young: true });
    assert_eq!(ok(&h, young(0x100, 8)), Reply::Young { young: false });
    refused(&h, young(1 << 28, 1), HypError::OutOfRange);
}

/// `call` succeeds and changes nothing.
fn refused_ok_unchanged(h: &FakeHyp, call: Hypercall) {
    let before = h.snapshot();
    ok(h, call);
    assert!(h.snapshot() == before);
}

#[test]
fn freed_tables_fit_the_memcache_list() {
    // Tables taken from a first top-up, then a second top-up, then the
    // tables come back: the free list must have room for all of them
    // without growing (at EL2 a growing list could fail on the heap).
    let h = hyp();
    let vm = create(&h, 48, HOST0);
    topup(&h, vm, HOST0 + 1, 3);
    ok(&h, share(vm, HOST0 + 20, 0, 1));
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 0);
    topup(&h, vm, HOST0 + 4, 2);
    let slot = h.slots[0].lock();
    let mc = slot.vm.as_ref().unwrap().memcache();
    assert!(mc.free_list().len() + 3 <= mc.free_capacity());
    drop(slot);
    ok(&h, unshare(vm, HOST0 + 20, 0, 1));
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 5);
}

#[test]
fn vcpu_create() {
    let h = hyp();
    let vm = create(&h, 40, HOST0);
    let vcpu = |i: u16| Hypercall::VcpuCreate {
        vm,
        vcpu: VcpuIndex::new(i).unwrap(),
        start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
    };
    refused(&h, vcpu(2), HypError::OutOfRange);
    refused(&h, vcpu(0), HypError::NoMemory);
    topup(&h, vm, HOST0 + 2, 1);
    h.platform().write(HPfn(HOST0 + 2), 7);
    ok(&h, vcpu(1));
    assert_eq!(
        h.platform().read(HPfn(HOST0 + 2)),
        0,
        "vCPU state not zeroed"
    );
    refused(&h, vcpu(1), HypError::Exists);
    assert_eq!(runtime_counters(&h, vm).memcache_pages, 0);
}

#[test]
fn vcpu_load_and_put() {
    let h = hyp();
    let vm = vm_with_memcache(&h);
    let v0 = VcpuIndex::new(0).unwrap();
    let v1 = VcpuIndex::new(1).unwrap();
    assert_eq!(h.vcpu_load(vm, v0), Err(HypError::NoEntry));
    ok(
        &h,
        Hypercall::VcpuCreate {
            vm,
            vcpu: v0,
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
    );
    let loaded = h.vcpu_load(vm, v0).unwrap();
    assert_eq!(loaded.vttbr >> 48, u64::from(vm.index()) + 1);
    assert_eq!(loaded.vttbr & ((1 << 48) - 1), HOST0 << 12);
    assert_eq!(h.vcpu_load(vm, v0), Err(HypError::Busy));
    assert_eq!(h.vcpu_load(vm, v1), Err(HypError::NoEntry));
    // Memory calls go on; teardown waits for the vCPU.
    ok(&h, share(vm, HOST0 + 50, 0, 1));
    refused(&h, Hypercall::TeardownStart { vm }, HypError::Busy);
    h.vcpu_put(&loaded, 3);
    let c = runtime_counters(&h, vm);
    assert_eq!((c.vcpu_runs, c.faults), (1, 3));
    ok(&h, Hypercall::TeardownStart { vm });
    assert_eq!(h.vcpu_load(vm, v0), Err(HypError::Busy));
    teardown_rest(&h, vm);
    assert_eq!(h.vcpu_load(vm, v0), Err(HypError::NoEntry));
}

/// Reclaims and finalizes a dying VM.
fn teardown_rest(h: &FakeHyp, vm: VmHandle) {
    while let Reply::Teardown(t) = ok(h, Hypercall::TeardownReclaim { vm }) {
        if !t.more {
            break;
        }
    }
    ok(h, Hypercall::TeardownFinalize { vm });
}

#[test]
fn lifecycle() {
    let h = hyp();
    let vm = vm_with_memcache(&h);
    ok(
        &h,
        Hypercall::VcpuCreate {
            vm,
            vcpu: VcpuIndex::new(0).unwrap(),
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
    );
    ok(&h, donate(vm, HOST0 + 100, 0, 3));
    ok(&h, share(vm, HOST0 + 110, 0x1000, 2));
    ok(&h, share(vm, HOST0 + 110, 0x2000, 1));
    refused(&h, Hypercall::TeardownReclaim { vm }, HypError::Busy);
    refused(&h, Hypercall::TeardownFinalize { vm }, HypError::Busy);
    ok(&h, Hypercall::TeardownStart { vm });
    // Dying: everything but reclaim/finalize/memcache reclaim/counters/
    // guest page state is EBUSY.
    refused(&h, Hypercall::TeardownStart { vm }, HypError::Busy);
    refused(&h, share(vm, HOST0 + 120, 0x3000, 1), HypError::Busy);
    refused(&h, donate(vm, HOST0 + 120, 0x3000, 1), HypError::Busy);
    refused(&h, unshare(vm, HOST0 + 110, 0x1000, 1), HypError::Busy);
    refused(&h, reclaim(vm, HOST0 + 100, 0, 1), HypError::Busy);
    refused(
        &h,
        Hypercall::MemcacheTopup {
            vm,
            pfn: pfn(HOST0 + 120),
            nr: count(1),
        },
        HypError::Busy,
    );
    refused(
        &h,
        Hypercall::VcpuCreate {
            vm,
            vcpu: VcpuIndex::new(1).unwrap(),
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
        HypError::Busy,
    );
    refused(
        &h,
        Hypercall::WrProtect {
            vm,
            gfn: gfn(0),
            nr: count(1),
        },
        HypError::Busy,
    );
    refused(
        &h,
        Hypercall::RelaxPerms {
            vm,
            gfn: gfn(0),
            prot: Prot::W,
        },
        HypError::Busy,
    );
    refused(
        &h,
        Hypercall::TestClearYoung {
            vm,
            gfn: gfn(0),
            nr: count(1),
        },
        HypError::Busy,
    );
    refused(&h, Hypercall::TeardownFinalize { vm }, HypError::Busy);
    assert!(matches!(guest_page(&h, vm, 0), GuestPage::Mapped { .. }));
    let _ = stage2_counters(&h, vm);

    let before = stage2_counters(&h, vm);
    match ok(&h, Hypercall::TeardownReclaim { vm }) {
        // 3 reclaims + 3 unshares, then the vCPU page and every free
        // memcache page (the three freed tables among them).
        Reply::Teardown(t) => {
            assert!(!t.more);
            assert_eq!(t.reclaimed, 6 + 1 + 7);
        }
        r => panic!("{r:?}"),
    }
    let after = stage2_counters(&h, vm);
    assert_eq!(after.reclaims - before.reclaims, 3);
    assert_eq!(after.unshares - before.unshares, 3);
    assert_eq!(
        runtime_counters(&h, vm),
        RuntimeCounters {
            table_pages: 2,
            ..RuntimeCounters::default()
        }
    );
    assert_eq!(
        ok(&h, Hypercall::TeardownReclaim { vm }),
        Reply::Teardown(TeardownProgress {
            reclaimed: 0,
            more: false
        })
    );
    assert_eq!(
        ok(&h, Hypercall::MemcacheReclaim { vm }),
        Reply::MemcacheReclaimed(hypercalls::ReclaimedPages::EMPTY)
    );
    ok(&h, Hypercall::TeardownFinalize { vm });
    h.check_all_returned().unwrap();
    // Stale handle; the slot is reused with the next generation.
    refused(&h, Hypercall::TeardownFinalize { vm }, HypError::NoEntry);
    refused(&h, Hypercall::TeardownStart { vm }, HypError::NoEntry);
    let again = create(&h, 40, HOST0);
    assert_eq!((again.index(), again.generation()), (0, 2));
    refused(&h, share(vm, HOST0 + 120, 0, 1), HypError::NoEntry);
}

#[test]
fn teardown_is_bounded() {
    let h = fake_hyp(256, u32::MAX).unwrap();
    let vm = create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 16);
    // 700 guest pages: 512 donated from the second region, 188 shared.
    ok(&h, donate(vm, HOST1, 0, 512));
    ok(&h, share(vm, HOST0 + 300, 0x400, 188));
    let steps = teardown(&h, vm);
    let total: u32 = steps.iter().map(|s| s.reclaimed).sum();
    assert!(steps.len() >= 2);
    for s in &steps {
        assert!(s.reclaimed <= hypercalls::TEARDOWN_BATCH, "{s:?}");
    }
    // 700 leaves + every memcache page (16, tables freed into it).
    assert_eq!(total, 700 + 16);
    h.check_all_returned().unwrap();
}

#[test]
fn every_vm_torn_down_returns_everything() {
    let h = hyp();
    let mut vms = Vec::new();
    for i in 0..4u64 {
        let root = HOST0 + 64 * i;
        let vm = create(&h, 48, root);
        topup(&h, vm, root + 1, 5);
        ok(&h, donate(vm, root + 10, 0x40000, 8));
        ok(&h, share(vm, HOST1 + i, 7, 1));
        ok(&h, share(vm, HOST1, 9 + i, 1));
        vms.push(vm);
    }
    assert_eq!(host_page(&h, HOST1).share_count, 5);
    let start_tables = h.host_tables_available();
    for vm in vms {
        teardown(&h, vm);
    }
    h.check_all_returned().unwrap();
    // Host tables split by donations stay split (no coalescing) but none
    // leaks: the count does not shrink during teardown.
    assert!(h.host_tables_available() >= start_tables);
}

#[test]
fn host_aborts() {
    let h = hyp();
    let t = AbortKind::Translation;
    // Hypervisor memory.
    assert_eq!(h.host_abort(HYP0 << 12, t), AbortAction::InjectAbort);
    assert_eq!(
        h.host_abort_outcome(HYP0 << 12, t),
        AbortOutcome::NotHostRam
    );
    // MMIO far from RAM: a 2 MiB block.
    assert_eq!(h.host_abort(0x0900_0123, t), AbortAction::Retry);
    assert_eq!(h.host_abort(0x091f_f000, t), AbortAction::Retry);
    // MMIO in a block shared with RAM (the hole): a page.
    assert_eq!(h.host_abort(HOLE << 12, t), AbortAction::Retry);
    // Permission faults and faults beyond the IPA size are injected.
    assert_eq!(
        h.host_abort(HOST0 << 12, AbortKind::Permission),
        AbortAction::InjectAbort
    );
    assert_eq!(h.host_abort(1 << 41, t), AbortAction::InjectAbort);
    // Host RAM is mapped: retry.
    assert_eq!(h.host_abort(HOST0 << 12, t), AbortAction::Retry);
    h.check_invariants().unwrap();
}

#[test]
fn host_abort_maps_unmapped_host_ram_lazily() {
    let h = hyp();
    let page = (HOST0 + 5) << 12;
    // The host stage-2 may leave a host page unmapped (it maps lazily):
    // take one out behind the dispatcher's back.
    h.lock_host().s2.unmap(stage2::Ipa(page), 4096).unwrap();
    h.check_invariants().unwrap();
    assert_eq!(
        h.host_abort(page + 8, AbortKind::Translation),
        AbortAction::Retry
    );
    let leaf = h.lock_host().s2.query(stage2::Ipa(page)).unwrap();
    assert_eq!((leaf.hpa.raw(), leaf.size), (page, 4096));
    // A donated page is never mapped back by a fault.
    let vm = vm_with_memcache(&h);
    ok(&h, donate(vm, HOST0 + 40, 0, 1));
    assert_eq!(
        h.host_abort((HOST0 + 40) << 12, AbortKind::Translation),
        AbortAction::InjectAbort
    );
    h.check_invariants().unwrap();
}

#[test]
fn host_abort_mmio_next_to_ram_is_a_page() {
    use super::fake::{FakePlatform, FAKE_HYP};
    use super::{Hyp, HypConfig};
    use crate::dtb::Region;
    // RAM ends 1 MiB into a 2 MiB block.
    let ram = [Region {
        base: 0x4000_0000,
        size: 3 << 20,
    }];
    let config = HypConfig {
        ram: &ram,
        hyp: FAKE_HYP,
        host_ipa_bits: 40,
        share_limit: u32::MAX,
    };
    let h = Hyp::new(
        FakePlatform::new(),
        &config,
        stage2::mm::ArenaMemory::with_limit(64),
        stage2::tlb::CountingTlb::default(),
    )
    .unwrap();
    let mmio = 0x4030_1234;
    assert_eq!(
        h.host_abort(mmio, AbortKind::Translation),
        AbortAction::Retry
    );
    let leaf = h.lock_host().s2.query(stage2::Ipa(mmio)).unwrap();
    assert_eq!((leaf.hpa.raw(), leaf.size), (0x4030_1000, 4096));
    assert_eq!(leaf.attrs.mem, stage2::pgtable::MemType::Device);
    // In RAM's GiB but a 2 MiB block without RAM: that block, Device.
    assert_eq!(
        h.host_abort_outcome(0x4070_0008, AbortKind::Translation),
        AbortOutcome::MappedMmio { size: 2 << 20 }
    );
    let leaf = h.lock_host().s2.query(stage2::Ipa(0x4070_0008)).unwrap();
    assert_eq!((leaf.hpa.raw(), leaf.size), (0x4060_0000, 2 << 20));
    assert_eq!(leaf.attrs.mem, stage2::pgtable::MemType::Device);
    // A GiB without RAM: the whole GiB, Device, one descriptor at level 1.
    assert_eq!(
        h.host_abort_outcome(0x0910_0000, AbortKind::Translation),
        AbortOutcome::MappedMmio { size: 1 << 30 }
    );
    let leaf = h.lock_host().s2.query(stage2::Ipa(0x0910_0000)).unwrap();
    assert_eq!((leaf.hpa.raw(), leaf.size, leaf.level), (0, 1 << 30, 1));
    assert_eq!(leaf.attrs.mem, stage2::pgtable::MemType::Device);
    assert_eq!(
        h.host_abort_outcome(0x0a00_0000, AbortKind::Translation),
        AbortOutcome::AlreadyMapped
    );
    // The last GiB below the IPA size (40 bits) is mapped whole; beyond
    // it, nothing is mapped and the abort is injected.
    let top = (1u64 << 40) - 8;
    assert_eq!(
        h.host_abort_outcome(top, AbortKind::Translation),
        AbortOutcome::MappedMmio { size: 1 << 30 }
    );
    assert_eq!(
        h.host_abort_outcome(1 << 40, AbortKind::Translation),
        AbortOutcome::BeyondIpa
    );
    let shape = h.host_stage2_shape();
    assert_eq!(
        (shape.ipa_bits, shape.start_level, shape.root_tables),
        (40, 1, 2)
    );
    assert_eq!(shape.mmio, [2, 1, 1]);
    assert_eq!(shape.levels_per_lookup(1), 1);
    assert_eq!(shape.levels_per_lookup(3), 3);
    h.check_invariants().unwrap();
}

#[test]
fn arbitrary_registers_never_panic() {
    let h = hyp();
    let vm = vm_with_memcache(&h);
    let mut x: u64 = 0x1234_5678_9abc_def0;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000u64 {
        let mut regs = [0u64; 8];
        for r in &mut regs {
            *r = next();
        }
        regs[0] = (regs[0] & 0x7f) | 0xc600_0000;
        // Plausible values half of the time.
        if i % 2 == 0 {
            regs[1] = u64::from(vm.raw());
            regs[2] = HOST0 + (regs[2] % 1300);
            regs[3] %= 0x1000;
            regs[4] = 1 + regs[4] % 4;
            regs[5] &= 7;
            regs[6] = 0;
            regs[7] = 0;
        }
        let out = h.host_call(&regs);
        assert!(out[0] == 0 || (out[0] as i64) < 0);
    }
    h.check_invariants().unwrap();
}

/// Seeded random calls around two 2 MiB-aligned frame ranges and two
/// 2 MiB-aligned gfn ranges, so that blocks are made, split, write-
/// protected, aged and torn down in every order; each outcome is checked
/// against the ABI model (told the free memcache pages before each call,
/// so its `HYP_ENOMEM` predictions are exact), every state after it
/// against the dispatcher's invariants. el2's property test and the
/// fuzzer draw calls of their own; this one makes blocks common.
#[test]
fn blocks_against_the_model() {
    use super::fake::{abi_model, Observer};

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
    const FRAMES: [u64; 2] = [HOST0 + 0x100, HOST1];
    const GFNS: [u64; 2] = [0x200, 0x400];
    const POOL: (u64, u64) = (HOST0 + 8, HOST0 + 0x100);
    let mut blocks_seen = 0u64;
    let mut enomem_seen = 0u64;
    for seed in 1..=4u64 {
        let h = hyp();
        let mut m = abi_model(u32::MAX);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut vms = Vec::new();
        for (k, bits) in [(0u64, 32u8), (4, 40)] {
            let call = Hypercall::VmCreate {
                ipa_bits: IpaBits::new(bits).unwrap(),
                nr_vcpus: VcpuCount::new(1).unwrap(),
                root: pfn(HOST0 + k),
                memory: None,
            };
            let got = run(&h, call);
            m.step(&call, &got).unwrap();
            match got {
                Ok(Reply::VmCreated { vm }) => vms.push(vm),
                r => panic!("{r:?}"),
            }
        }
        for step in 0..300 {
            let vm = vms[rng.below(2) as usize];
            let f = FRAMES[rng.below(2) as usize];
            let g = GFNS[rng.below(2) as usize];
            // A whole block (a third of the time) or a few pages in it.
            let (off, n) = if rng.below(3) == 0 {
                (0, 512)
            } else {
                let off = rng.below(512);
                (off, (1 + rng.below(8)).min(512 - off))
            };
            let n32 = u32::try_from(n).unwrap();
            let prot = Prot::from_bits(1 | (rng.below(4) << 1)).unwrap();
            let call = match rng.below(10) {
                0 => Hypercall::MemcacheTopup {
                    vm,
                    pfn: pfn(POOL.0 + rng.below(POOL.1 - POOL.0 - 2)),
                    nr: count(1 + rng.below(2) as u32),
                },
                1 => Hypercall::MemcacheReclaim { vm },
                2 | 3 => Hypercall::Share {
                    vm,
                    pfn: pfn(f + off),
                    gfn: gfn(g + off),
                    nr: count(n32),
                    prot,
                },
                4 => Hypercall::Donate {
                    vm,
                    pfn: pfn(f + off),
                    gfn: gfn(g + off),
                    nr: count(n32),
                    prot,
                },
                5 => Hypercall::Unshare {
                    vm,
                    pfn: pfn(f + off),
                    gfn: gfn(g + off),
                    nr: count(n32),
                },
                6 => Hypercall::Reclaim {
                    vm,
                    pfn: pfn(f + off),
                    gfn: gfn(g + off),
                    nr: count(n32),
                },
                7 => Hypercall::WrProtect {
                    vm,
                    gfn: gfn(g + off),
                    nr: count(n32),
                },
                8 => Hypercall::RelaxPerms {
                    vm,
                    gfn: gfn(g + off),
                    prot,
                },
                _ => Hypercall::TestClearYoung {
                    vm,
                    gfn: gfn(g + off),
                    nr: count(n32),
                },
            };
            let free = runtime_counters(&h, vm).memcache_pages;
            m.note_free_memcache(vm, free);
            let before = h.snapshot();
            let got = run(&h, call);
            if let Err(e) = m.step(&call, &got) {
                panic!("seed {seed} step {step}: {e}");
            }
            if got.is_err() {
                assert!(
                    h.snapshot() == before,
                    "seed {seed} step {step}: {call:?} changed the state"
                );
            }
            enomem_seen += u64::from(got == Err(HypError::NoMemory));
            h.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            blocks_seen += m.vms().iter().map(|v| v.blocks.len() as u64).sum::<u64>();
        }
        for &vm in &vms {
            let call = Hypercall::TeardownStart { vm };
            m.step(&call, &run(&h, call)).unwrap();
            loop {
                let call = Hypercall::TeardownReclaim { vm };
                let got = run(&h, call);
                m.step_observed(&call, &got, &mut Observer(&h)).unwrap();
                h.check_invariants().unwrap();
                if let Ok(Reply::Teardown(t)) = got {
                    assert!(t.reclaimed <= hypercalls::TEARDOWN_BATCH);
                    if !t.more {
                        break;
                    }
                }
            }
            let call = Hypercall::TeardownFinalize { vm };
            m.step(&call, &run(&h, call)).unwrap();
        }
        h.check_all_returned().unwrap();
    }
    // The sequences did reach the cases they are for.
    assert!(blocks_seen > 300, "blocks seen in {blocks_seen} VM-steps");
    assert!(enomem_seen > 10, "{enomem_seen} ENOMEM answers");
}
