//! Encode/decode round trips for every call and reply, and the strictness
//! property on arbitrary registers: `decode(x)` either fails or re-encodes
//! to exactly `x` (with the ignored SMCCC SVE hint bit cleared).

use hypercalls::ids::SMCCC_SVE_HINT;
use hypercalls::{
    encode_result, AbiVersion, Access, ConsoleBytes, CounterGroup, Counters, FaultKind, GuestCall,
    GuestFunction, GuestMemory, GuestPage, HostFunction, HostPageInfo, HypError, Hypercall,
    IpaBits, MmioSize, Owner, OwnerState, PageCount, PageState, Pfn, Prot, ReclaimedPages, Reply,
    ReplyError, RuntimeCounters, Stage2Counters, TeardownProgress, VcpuCount, VcpuExit, VcpuIndex,
    VcpuStart, VmHandle, CONSOLE_MAX_BYTES, MAX_IPA_BITS, MAX_PAGES_PER_CALL, MAX_VCPUS,
    MEMCACHE_RECLAIM_MAX, MIN_IPA_BITS, PFN_BITS, TEARDOWN_BATCH, VCPU_ENTRY_LIMIT,
};
use hypercalls::{Gfn, Regs};
use proptest::prelude::*;

fn vm() -> impl Strategy<Value = VmHandle> {
    (any::<u16>(), 1..=u16::MAX).prop_map(|(i, g)| VmHandle::new(i, g).unwrap())
}
fn pfn() -> impl Strategy<Value = Pfn> {
    prop_oneof![
        Just(0u64),
        0..(1u64 << PFN_BITS),
        Just((1u64 << PFN_BITS) - 1)
    ]
    .prop_map(|v| Pfn::new(v).unwrap())
}
fn gfn() -> impl Strategy<Value = Gfn> {
    prop_oneof![
        Just(0u64),
        0..(1u64 << PFN_BITS),
        Just((1u64 << PFN_BITS) - 1)
    ]
    .prop_map(|v| Gfn::new(v).unwrap())
}
fn count() -> impl Strategy<Value = PageCount> {
    prop_oneof![Just(1u32), Just(MAX_PAGES_PER_CALL), 1..=MAX_PAGES_PER_CALL]
        .prop_map(|n| PageCount::new(n).unwrap())
}
fn prot_with_r() -> impl Strategy<Value = Prot> {
    (0u64..8).prop_map(|b| Prot::from_bits(b).unwrap() | Prot::R)
}
fn prot_nonempty() -> impl Strategy<Value = Prot> {
    (1u64..8).prop_map(|b| Prot::from_bits(b).unwrap())
}
fn prot_any() -> impl Strategy<Value = Prot> {
    (0u64..8).prop_map(|b| Prot::from_bits(b).unwrap())
}
fn vcpu() -> impl Strategy<Value = VcpuIndex> {
    (0..MAX_VCPUS).prop_map(|i| VcpuIndex::new(i).unwrap())
}
fn group() -> impl Strategy<Value = CounterGroup> {
    prop_oneof![Just(CounterGroup::Stage2), Just(CounterGroup::Runtime)]
}
fn vm_create() -> impl Strategy<Value = Hypercall> {
    (
        MIN_IPA_BITS..=MAX_IPA_BITS,
        1..=MAX_VCPUS,
        0..(1u64 << PFN_BITS),
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(bits, n, root, has_mem, a, b)| {
            let ipa_bits = IpaBits::new(bits).unwrap();
            let align = u64::from(ipa_bits.root_table_pages());
            let frames = 1u64 << (bits - 12);
            let start = a % frames;
            let pages = 1 + b % (frames - start);
            let memory = has_mem
                .then(|| GuestMemory::new(ipa_bits, Gfn::new(start).unwrap(), pages).unwrap());
            Hypercall::VmCreate {
                ipa_bits,
                nr_vcpus: VcpuCount::new(n).unwrap(),
                root: Pfn::new(root / align * align).unwrap(),
                memory,
            }
        })
}

fn vcpu_start() -> impl Strategy<Value = VcpuStart> {
    prop_oneof![
        Just(VcpuStart::Off),
        (0..VCPU_ENTRY_LIMIT / 4, any::<u64>())
            .prop_map(|(e, arg)| VcpuStart::On { entry: e * 4, arg }),
    ]
}

fn hypercall() -> impl Strategy<Value = Hypercall> {
    use Hypercall as H;
    prop_oneof![
        Just(H::Version),
        any::<u32>().prop_map(|func| H::Features { func }),
        (vm(), pfn(), count()).prop_map(|(vm, pfn, nr)| H::MemcacheTopup { vm, pfn, nr }),
        vm().prop_map(|vm| H::MemcacheReclaim { vm }),
        vm_create(),
        (vm(), vcpu(), vcpu_start()).prop_map(|(vm, vcpu, start)| H::VcpuCreate {
            vm,
            vcpu,
            start
        }),
        (vm(), vcpu(), any::<u64>()).prop_map(|(vm, vcpu, mmio_data)| H::VcpuRun {
            vm,
            vcpu,
            mmio_data
        }),
        (vm(), pfn(), gfn(), count(), prot_with_r()).prop_map(|(vm, pfn, gfn, nr, prot)| {
            H::Share {
                vm,
                pfn,
                gfn,
                nr,
                prot,
            }
        }),
        (vm(), pfn(), gfn(), count()).prop_map(|(vm, pfn, gfn, nr)| H::Unshare {
            vm,
            pfn,
            gfn,
            nr
        }),
        (vm(), pfn(), gfn(), count(), prot_with_r()).prop_map(|(vm, pfn, gfn, nr, prot)| {
            H::Donate {
                vm,
                pfn,
                gfn,
                nr,
                prot,
            }
        }),
        (vm(), pfn(), gfn(), count()).prop_map(|(vm, pfn, gfn, nr)| H::Reclaim {
            vm,
            pfn,
            gfn,
            nr
        }),
        (vm(), gfn(), count()).prop_map(|(vm, gfn, nr)| H::UnshareRange { vm, gfn, nr }),
        (vm(), gfn(), count()).prop_map(|(vm, gfn, nr)| H::WrProtect { vm, gfn, nr }),
        (vm(), gfn(), prot_nonempty()).prop_map(|(vm, gfn, prot)| H::RelaxPerms { vm, gfn, prot }),
        (vm(), gfn(), count()).prop_map(|(vm, gfn, nr)| H::TestClearYoung { vm, gfn, nr }),
        vm().prop_map(|vm| H::TeardownStart { vm }),
        vm().prop_map(|vm| H::TeardownReclaim { vm }),
        vm().prop_map(|vm| H::TeardownFinalize { vm }),
        (vm(), group()).prop_map(|(vm, group)| H::VmCounters { vm, group }),
        pfn().prop_map(|pfn| H::HostPageState { pfn }),
        (vm(), gfn()).prop_map(|(vm, gfn)| H::GuestPageState { vm, gfn }),
    ]
}

fn console() -> impl Strategy<Value = ConsoleBytes> {
    proptest::collection::vec(any::<u8>(), 1..=CONSOLE_MAX_BYTES)
        .prop_map(|b| ConsoleBytes::new(&b).unwrap())
}

fn guest_call() -> impl Strategy<Value = GuestCall> {
    prop_oneof![
        Just(GuestCall::Version),
        console().prop_map(GuestCall::ConsoleWrite),
        (gfn(), count()).prop_map(|(gfn, nr)| GuestCall::ShareRequest { gfn, nr }),
        (gfn(), count()).prop_map(|(gfn, nr)| GuestCall::UnshareRequest { gfn, nr }),
        Just(GuestCall::Shutdown),
    ]
}

fn exit() -> impl Strategy<Value = VcpuExit> {
    let access = prop_oneof![Just(Access::Read), Just(Access::Write), Just(Access::Exec)];
    prop_oneof![
        Just(VcpuExit::Interrupted),
        (gfn(), access.clone(), any::<bool>()).prop_map(|(gfn, access, perm)| {
            VcpuExit::MemFault {
                gfn,
                access,
                kind: if perm {
                    FaultKind::Permission
                } else {
                    FaultKind::Unmapped
                },
            }
        }),
        console().prop_map(VcpuExit::Console),
        (gfn(), count()).prop_map(|(gfn, nr)| VcpuExit::ShareRequest { gfn, nr }),
        (gfn(), count()).prop_map(|(gfn, nr)| VcpuExit::UnshareRequest { gfn, nr }),
        Just(VcpuExit::Shutdown),
        (any::<u64>(), any::<u64>()).prop_map(|(esr, far)| VcpuExit::UnhandledTrap { esr, far }),
        (0..(1u64 << 52), 0..4u32, any::<bool>(), any::<u64>()).prop_map(
            |(ipa, log, write, data)| {
                let size = MmioSize::new(1 << log).unwrap();
                VcpuExit::Mmio {
                    ipa,
                    size,
                    write,
                    data: if write { data & size.mask() } else { 0 },
                }
            }
        ),
        any::<bool>().prop_map(|wfe| VcpuExit::Wfx { wfe }),
        any::<bool>().prop_map(|reset| VcpuExit::SystemOff { reset }),
        Just(VcpuExit::PoweredOff),
    ]
}

/// A successful reply of the shape `call` returns.
fn reply_for(call: Hypercall) -> BoxedStrategy<Reply> {
    match call {
        Hypercall::Version => (any::<u16>(), any::<u16>())
            .prop_map(|(major, minor)| Reply::Version(AbiVersion { major, minor }))
            .boxed(),
        Hypercall::Features { .. } => any::<bool>()
            .prop_map(|supported| Reply::Features { supported })
            .boxed(),
        Hypercall::MemcacheReclaim { .. } => {
            proptest::collection::vec(pfn(), 0..=MEMCACHE_RECLAIM_MAX)
                .prop_map(|p| Reply::MemcacheReclaimed(ReclaimedPages::new(&p).unwrap()))
                .boxed()
        }
        Hypercall::VmCreate { .. } => vm().prop_map(|vm| Reply::VmCreated { vm }).boxed(),
        Hypercall::VcpuRun { .. } => exit().prop_map(Reply::Exit).boxed(),
        Hypercall::WrProtect { nr, .. } => (0..=nr.get())
            .prop_map(|pages| Reply::WrProtected { pages })
            .boxed(),
        Hypercall::UnshareRange { nr, .. } => (0..=nr.get())
            .prop_map(|pages| Reply::Unshared { pages })
            .boxed(),
        Hypercall::TestClearYoung { .. } => any::<bool>()
            .prop_map(|young| Reply::Young { young })
            .boxed(),
        Hypercall::TeardownReclaim { .. } => (0..=TEARDOWN_BATCH, any::<bool>())
            .prop_map(|(reclaimed, more)| Reply::Teardown(TeardownProgress { reclaimed, more }))
            .boxed(),
        Hypercall::VmCounters {
            group: CounterGroup::Stage2,
            ..
        } => any::<[u64; 7]>()
            .prop_map(|c| {
                Reply::Counters(Counters::Stage2(Stage2Counters {
                    maps: c[0],
                    unmaps: c[1],
                    tlbi: c[2],
                    shares: c[3],
                    unshares: c[4],
                    donations: c[5],
                    reclaims: c[6],
                }))
            })
            .boxed(),
        Hypercall::VmCounters {
            group: CounterGroup::Runtime,
            ..
        } => any::<[u64; 7]>()
            .prop_map(|c| {
                Reply::Counters(Counters::Runtime(RuntimeCounters {
                    faults: c[0],
                    vcpu_runs: c[1],
                    memcache_pages: c[2],
                    table_pages: c[3],
                    host_exits: c[4],
                    hyp_exits: c[5],
                    irq_exits: c[6],
                }))
            })
            .boxed(),
        Hypercall::HostPageState { .. } => {
            let owner = prop_oneof![
                Just(Owner::Host),
                Just(Owner::Hyp),
                vm().prop_map(Owner::Vm)
            ];
            let state = prop_oneof![Just(OwnerState::Owned), Just(OwnerState::SharedOwned)];
            (owner, state, any::<u32>())
                .prop_map(|(owner, state, share_count)| {
                    Reply::HostPage(HostPageInfo {
                        owner,
                        state,
                        share_count,
                    })
                })
                .boxed()
        }
        Hypercall::GuestPageState { .. } => {
            let state = prop_oneof![
                Just(PageState::Owned),
                Just(PageState::SharedOwned),
                Just(PageState::SharedBorrowed)
            ];
            prop_oneof![
                Just(Reply::GuestPage(GuestPage::Unmapped)),
                (state, pfn(), prot_any()).prop_map(|(state, pfn, prot)| Reply::GuestPage(
                    GuestPage::Mapped { state, pfn, prot }
                )),
            ]
            .boxed()
        }
        _ => Just(Reply::Done).boxed(),
    }
}

/// Registers that are often valid: x0 is usually one of the ABI's ids, the
/// arguments are biased towards values the ABI accepts, and the registers
/// after a random `k` are zero (so that calls with few arguments decode).
fn plausible_regs(ids: Vec<u32>) -> impl Strategy<Value = Regs> {
    let x0 = prop_oneof![
        6 => proptest::sample::select(ids).prop_map(u64::from),
        1 => proptest::sample::select(vec![0xC600_0000u64, 0xC601_0030, 0x1_C600_0030, 0x8600_0030]),
        1 => any::<u64>(),
    ];
    let arg = || {
        prop_oneof![
            2 => Just(0u64),
            2 => 1u64..8,
            2 => 0u64..1024,
            1 => 0u64..(1 << PFN_BITS),
            2 => (any::<u16>(), 1..=u16::MAX).prop_map(|(i, g)| u64::from(g) << 16 | u64::from(i)),
            1 => any::<u64>(),
        ]
    };
    (
        x0,
        0usize..=7,
        [arg(), arg(), arg(), arg(), arg(), arg(), arg()],
    )
        .prop_map(|(x0, k, a)| {
            let mut regs = [0u64; 8];
            regs[0] = x0;
            regs[1..=k].copy_from_slice(&a[..k]);
            regs
        })
}

fn without_hint(mut regs: Regs) -> Regs {
    regs[0] &= !u64::from(SMCCC_SVE_HINT);
    regs
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_host_call_round_trips(call in hypercall()) {
        let regs = call.encode();
        prop_assert_eq!(Hypercall::decode(&regs), Ok(call));
        prop_assert_eq!(HostFunction::from_id(regs[0] as u32), Some(call.function()));
        // The SVE hint is ignored.
        let mut hinted = regs;
        hinted[0] |= u64::from(SMCCC_SVE_HINT);
        prop_assert_eq!(Hypercall::decode(&hinted), Ok(call));
        // A host call is not a guest call.
        prop_assert_eq!(GuestCall::decode(&regs), Err(HypError::NotSupported));
    }

    #[test]
    fn every_guest_call_round_trips(call in guest_call()) {
        let regs = call.encode();
        prop_assert_eq!(GuestCall::decode(&regs), Ok(call));
        prop_assert_eq!(Hypercall::decode(&regs), Err(HypError::NotSupported));
    }

    #[test]
    fn every_reply_round_trips((call, reply) in hypercall().prop_flat_map(|c| (Just(c), reply_for(c)))) {
        let regs = reply.encode();
        prop_assert_eq!(regs[0], 0);
        prop_assert_eq!(call.decode_reply(&regs), Ok(reply));
        prop_assert_eq!(encode_result(&Ok(reply)), regs);
    }

    #[test]
    fn every_error_round_trips(call in hypercall(), code in prop_oneof![
        proptest::sample::select(HypError::ALL.to_vec()).prop_map(HypError::to_i64),
        i64::MIN..0,
    ]) {
        let e = HypError::from_i64(code);
        prop_assert_eq!(e.to_i64(), code);
        let regs = encode_result(&Err(e));
        prop_assert_eq!(regs, [code as u64, 0, 0, 0, 0, 0, 0, 0]);
        prop_assert_eq!(call.decode_reply(&regs), Err(ReplyError::Failed(e)));
    }

    #[test]
    fn host_decode_is_strict(regs in plausible_regs(HostFunction::ALL.iter().map(|f| f.id()).collect())) {
        if let Ok(call) = Hypercall::decode(&regs) {
            prop_assert_eq!(call.encode(), without_hint(regs));
        }
    }

    #[test]
    fn guest_decode_is_strict(regs in plausible_regs(GuestFunction::ALL.iter().map(|f| f.id()).collect())) {
        if let Ok(call) = GuestCall::decode(&regs) {
            prop_assert_eq!(call.encode(), without_hint(regs));
        }
    }

    #[test]
    fn decode_never_panics(regs in any::<[u64; 8]>()) {
        let _ = Hypercall::decode(&regs);
        let _ = GuestCall::decode(&regs);
    }

    #[test]
    fn reply_decode_is_strict(call in hypercall(), regs in plausible_regs(vec![0])) {
        // x0 = 0 most of the time, so the payload is what gets tested.
        if let Ok(reply) = call.decode_reply(&regs) {
            prop_assert_eq!(reply.encode(), regs);
        }
    }

    /// Setting any register a call does not use makes it `EINVAL`.
    #[test]
    fn unused_registers_must_be_zero(call in hypercall(), junk in 1..=u64::MAX, pick in 0usize..7) {
        let used = used_args(call.function());
        let unused: Vec<usize> = (used + 1..8).collect();
        prop_assume!(!unused.is_empty());
        let mut regs = call.encode();
        regs[unused[pick % unused.len()]] = junk;
        prop_assert_eq!(Hypercall::decode(&regs), Err(HypError::InvalidArgument));
    }
}

/// How many argument registers each call uses: written out from `docs/ABI.md`
/// §3, independently of the crate's encoder.
fn used_args(f: HostFunction) -> usize {
    use HostFunction as F;
    match f {
        F::Version => 0,
        F::Features
        | F::MemcacheReclaim
        | F::TeardownStart
        | F::TeardownReclaim
        | F::TeardownFinalize
        | F::HostPageState => 1,
        F::VmCounters | F::GuestPageState => 2,
        F::MemcacheTopup
        | F::VcpuRun
        | F::UnshareRange
        | F::WrProtect
        | F::RelaxPerms
        | F::TestClearYoung => 3,
        F::Unshare | F::Reclaim => 4,
        F::Share | F::Donate | F::VmCreate | F::VcpuCreate => 5,
    }
}

#[test]
fn used_args_matches_the_signatures() {
    for f in HostFunction::ALL {
        let inputs = f.signature().split("->").next().unwrap();
        assert_eq!(
            inputs.split_whitespace().count(),
            used_args(*f),
            "{}",
            f.name()
        );
    }
}

/// The strictness properties above only say something if a fair share of
/// their inputs decode: check that they do.
#[test]
fn plausible_registers_often_decode() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let host = plausible_regs(HostFunction::ALL.iter().map(|f| f.id()).collect());
    let guest = plausible_regs(GuestFunction::ALL.iter().map(|f| f.id()).collect());
    let (mut host_ok, mut guest_ok) = (0, 0);
    for _ in 0..4000 {
        host_ok +=
            usize::from(Hypercall::decode(&host.new_tree(&mut runner).unwrap().current()).is_ok());
        guest_ok +=
            usize::from(GuestCall::decode(&guest.new_tree(&mut runner).unwrap().current()).is_ok());
    }
    eprintln!("decoded: {host_ok} host, {guest_ok} guest of 4000 each");
    assert!(host_ok > 100, "only {host_ok} of 4000 host samples decoded");
    assert!(
        guest_ok > 100,
        "only {guest_ok} of 4000 guest samples decoded"
    );
}
