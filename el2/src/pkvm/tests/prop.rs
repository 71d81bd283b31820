//! Property test: random call sequences against the reference model of the
//! ABI (crate `abi_model`, the one the test host and the fuzzer use too).
//! After every call: the reply is one the model allows (exactly, where the
//! fakes pin the ABI's open choices: every VM slot is the test's, share
//! limit 3, access flags only change through the ABI, the free memcache
//! pages are read before each call that needs some), a failed call changed
//! nothing, pages that came back read zero, the host and guest page states
//! read back through the ABI equal the model's, and the implementation's
//! invariants hold. A teardown batch is followed page by page through the
//! ABI. On top, the fakes' own choices: the handle a create returns (first
//! free slot, its generation) and the exit of a run (nothing is scripted:
//! an IRQ ends an entry; a vCPU created off stays off). Every case ends by
//! tearing down every VM and checking that all memory is back with the host.

use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use abi_model::{Model, Observe};
use hypercalls::{
    HypError, Hypercall, IpaBits, PageState, Prot, Reply, VcpuCount, VcpuExit, VcpuIndex, VmHandle,
};
use proptest::prelude::*;
use stage2::Pfn as HPfn;

use super::super::fake::{abi_model, fake_hyp, FakeHyp, Observer as Abi};
use super::super::MAX_VMS;
use super::{count, gfn, pfn, run, HOLE, HOST0, HOST1, HYP0};

const SHARE_LIMIT: u32 = 3;
/// Host frames the test uses (and checks after every step).
const WINDOW: u64 = 48;

/// Every frame whose state is compared after each step.
fn checked_pfns() -> impl Iterator<Item = u64> {
    (HOST0..HOST0 + WINDOW).chain([HYP0 + 255, HOLE - 1, HOST1, HOST1 + 511])
}

/// The model of the fake machine, and what the test remembers of the
/// fakes' own choices.
struct Driver {
    model: Model,
    /// Every handle a create returned, for the ops to name.
    handles: Vec<VmHandle>,
    /// The generation of each VM slot's next handle.
    generations: [u16; MAX_VMS],
    /// Calls made (and checked) so far.
    calls: u64,
}

impl Driver {
    fn new() -> Self {
        Self {
            model: abi_model(SHARE_LIMIT),
            handles: Vec::new(),
            generations: [1; MAX_VMS],
            calls: 0,
        }
    }
}

/// One generated call, with small domains so that calls collide.
#[derive(Clone, Debug)]
enum Op {
    Create {
        bits: u8,
        root: u64,
    },
    Topup {
        vm: u8,
        pfn: u64,
        n: u32,
    },
    McReclaim {
        vm: u8,
    },
    Vcpu {
        vm: u8,
        i: u16,
        off: bool,
    },
    Run {
        vm: u8,
        i: u16,
    },
    Share {
        vm: u8,
        pfn: u64,
        gfn: u64,
        n: u32,
        prot: u64,
    },
    Unshare {
        vm: u8,
        pfn: u64,
        gfn: u64,
        n: u32,
    },
    Donate {
        vm: u8,
        pfn: u64,
        gfn: u64,
        n: u32,
        prot: u64,
    },
    Reclaim {
        vm: u8,
        pfn: u64,
        gfn: u64,
        n: u32,
    },
    UnshareRange {
        vm: u8,
        gfn: u64,
        n: u32,
    },
    WrProtect {
        vm: u8,
        gfn: u64,
        n: u32,
    },
    Relax {
        vm: u8,
        gfn: u64,
        prot: u64,
    },
    Young {
        vm: u8,
        gfn: u64,
        n: u32,
    },
    /// Unshare or reclaim `n` pages of an existing mapping of the VM (the
    /// `pick`-th), so that successful undos are frequent.
    Undo {
        vm: u8,
        pick: u8,
        n: u32,
    },
    /// `HYP_TEST_CLEAR_YOUNG` of the `pick`-th mapping of the VM.
    YoungOf {
        vm: u8,
        pick: u8,
    },
    /// Share the frame of the `pick`-th mapping of the VM again at `gfn`,
    /// so that share counts reach the limit.
    ShareAgain {
        vm: u8,
        pick: u8,
        gfn: u64,
    },
    TdStart {
        vm: u8,
    },
    TdReclaim {
        vm: u8,
    },
    TdFinalize {
        vm: u8,
    },
    HostState {
        pfn: u64,
    },
    GuestState {
        vm: u8,
        gfn: u64,
    },
}

fn pfn_s() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => HOST0..HOST0 + WINDOW,
        1 => Just(HYP0 + 255),
        1 => Just(HOLE - 1),
        1 => Just(HOST1 + 511),
    ]
}

fn gfn_s() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..24, 1 => Just((1u64 << 20) - 1), 1 => Just((1u64 << 36) - 2)]
}

fn op_s() -> impl Strategy<Value = Op> {
    let vm = any::<u8>();
    prop_oneof![
        3 => (prop_oneof![Just(32u8), Just(40), Just(48)], 0u64..12)
            .prop_map(|(bits, k)| {
                let pages = IpaBits::new(bits).unwrap().root_table_pages() as u64;
                Op::Create { bits, root: HOST0 + k * pages }
            }),
        5 => (vm, pfn_s(), 1u32..4).prop_map(|(vm, pfn, n)| Op::Topup { vm, pfn, n }),
        1 => vm.prop_map(|vm| Op::McReclaim { vm }),
        1 => (vm, 0u16..3, any::<bool>()).prop_map(|(vm, i, off)| Op::Vcpu { vm, i, off }),
        2 => (vm, 0u16..3).prop_map(|(vm, i)| Op::Run { vm, i }),
        5 => (vm, pfn_s(), gfn_s(), 1u32..4, prop_oneof![Just(1u64), Just(3), Just(7)])
            .prop_map(|(vm, pfn, gfn, n, prot)| Op::Share { vm, pfn, gfn, n, prot }),
        4 => (vm, pfn_s(), gfn_s(), 1u32..4)
            .prop_map(|(vm, pfn, gfn, n)| Op::Unshare { vm, pfn, gfn, n }),
        4 => (vm, pfn_s(), gfn_s(), 1u32..4, prop_oneof![Just(1u64), Just(5), Just(7)])
            .prop_map(|(vm, pfn, gfn, n, prot)| Op::Donate { vm, pfn, gfn, n, prot }),
        3 => (vm, pfn_s(), gfn_s(), 1u32..4)
            .prop_map(|(vm, pfn, gfn, n)| Op::Reclaim { vm, pfn, gfn, n }),
        3 => (vm, gfn_s(), 1u32..12).prop_map(|(vm, gfn, n)| Op::UnshareRange { vm, gfn, n }),
        1 => (vm, gfn_s(), 1u32..8).prop_map(|(vm, gfn, n)| Op::WrProtect { vm, gfn, n }),
        1 => (vm, gfn_s(), 1u64..8).prop_map(|(vm, gfn, prot)| Op::Relax { vm, gfn, prot }),
        2 => (vm, gfn_s(), 1u32..8).prop_map(|(vm, gfn, n)| Op::Young { vm, gfn, n }),
        6 => (vm, any::<u8>(), 1u32..3).prop_map(|(vm, pick, n)| Op::Undo { vm, pick, n }),
        2 => (vm, any::<u8>()).prop_map(|(vm, pick)| Op::YoungOf { vm, pick }),
        2 => (vm, any::<u8>(), gfn_s()).prop_map(|(vm, pick, gfn)| Op::ShareAgain { vm, pick, gfn }),
        1 => vm.prop_map(|vm| Op::TdStart { vm }),
        2 => vm.prop_map(|vm| Op::TdReclaim { vm }),
        1 => vm.prop_map(|vm| Op::TdFinalize { vm }),
        1 => pfn_s().prop_map(|pfn| Op::HostState { pfn }),
        1 => (vm, gfn_s()).prop_map(|(vm, gfn)| Op::GuestState { vm, gfn }),
    ]
}

/// The handle an op's `vm` byte names: mostly a VM the model has (live or
/// dying), sometimes any handle a create returned (maybe stale), sometimes
/// a made-up one.
fn handle(d: &Driver, vm: u8) -> VmHandle {
    let vms = d.model.vms();
    if vm < 192 && !vms.is_empty() {
        vms[usize::from(vm) % vms.len()].handle
    } else if vm < 224 && !d.handles.is_empty() {
        // Recent handles more often.
        let n = d.handles.len();
        d.handles[n - 1 - usize::from(vm) % n.min(4)]
    } else {
        VmHandle::new(u16::from(vm % 20), 1 + u16::from(vm % 3)).unwrap()
    }
}

/// The gfn, frame and ownership of the `pick`-th mapping of `vm` (or a
/// made-up one if it has none).
fn picked(d: &Driver, vm: VmHandle, pick: u8) -> (u64, u64, bool) {
    d.model
        .vm(vm)
        .ok()
        .filter(|v| !v.map.is_empty())
        .and_then(|v| v.map.iter().nth(usize::from(pick) % v.map.len()))
        .map_or((0, HOST0, true), |(g, x)| {
            (*g, x.pfn, x.state == PageState::Owned)
        })
}

fn prot(bits: u64) -> Prot {
    Prot::from_bits(bits).unwrap()
}

fn to_call(d: &Driver, op: &Op) -> Hypercall {
    let h = |vm: &u8| handle(d, *vm);
    match op {
        Op::Create { bits, root } => Hypercall::VmCreate {
            ipa_bits: IpaBits::new(*bits).unwrap(),
            nr_vcpus: VcpuCount::new(2).unwrap(),
            root: pfn(*root),
            memory: None,
        },
        Op::Topup { vm, pfn: p, n } => Hypercall::MemcacheTopup {
            vm: h(vm),
            pfn: pfn(*p),
            nr: count(*n),
        },
        Op::McReclaim { vm } => Hypercall::MemcacheReclaim { vm: h(vm) },
        Op::Vcpu { vm, i, off } => Hypercall::VcpuCreate {
            vm: h(vm),
            vcpu: VcpuIndex::new(*i).unwrap(),
            start: if *off {
                hypercalls::VcpuStart::Off
            } else {
                hypercalls::VcpuStart::On {
                    entry: 0x4008_0000,
                    arg: 0,
                }
            },
        },
        Op::Run { vm, i } => Hypercall::VcpuRun {
            vm: h(vm),
            vcpu: VcpuIndex::new(*i).unwrap(),
            mmio_data: 0,
        },
        Op::Share {
            vm,
            pfn: p,
            gfn: g,
            n,
            prot: pr,
        } => Hypercall::Share {
            vm: h(vm),
            pfn: pfn(*p),
            gfn: gfn(*g),
            nr: count(*n),
            prot: prot(*pr),
        },
        Op::Unshare {
            vm,
            pfn: p,
            gfn: g,
            n,
        } => Hypercall::Unshare {
            vm: h(vm),
            pfn: pfn(*p),
            gfn: gfn(*g),
            nr: count(*n),
        },
        Op::Donate {
            vm,
            pfn: p,
            gfn: g,
            n,
            prot: pr,
        } => Hypercall::Donate {
            vm: h(vm),
            pfn: pfn(*p),
            gfn: gfn(*g),
            nr: count(*n),
            prot: prot(*pr),
        },
        Op::Reclaim {
            vm,
            pfn: p,
            gfn: g,
            n,
        } => Hypercall::Reclaim {
            vm: h(vm),
            pfn: pfn(*p),
            gfn: gfn(*g),
            nr: count(*n),
        },
        Op::UnshareRange { vm, gfn: g, n } => Hypercall::UnshareRange {
            vm: h(vm),
            gfn: gfn(*g),
            nr: count(*n),
        },
        Op::WrProtect { vm, gfn: g, n } => Hypercall::WrProtect {
            vm: h(vm),
            gfn: gfn(*g),
            nr: count(*n),
        },
        Op::Relax {
            vm,
            gfn: g,
            prot: pr,
        } => Hypercall::RelaxPerms {
            vm: h(vm),
            gfn: gfn(*g),
            prot: prot(*pr),
        },
        Op::Young { vm, gfn: g, n } => Hypercall::TestClearYoung {
            vm: h(vm),
            gfn: gfn(*g),
            nr: count(*n),
        },
        Op::Undo { vm, pick, n } => {
            let vm = h(vm);
            let (g, p, owned) = picked(d, vm, *pick);
            let (pfn, gfn, nr) = (pfn(p), gfn(g), count(*n));
            if owned {
                Hypercall::Reclaim { vm, pfn, gfn, nr }
            } else {
                Hypercall::Unshare { vm, pfn, gfn, nr }
            }
        }
        Op::YoungOf { vm, pick } => {
            let vm = h(vm);
            Hypercall::TestClearYoung {
                vm,
                gfn: gfn(picked(d, vm, *pick).0),
                nr: count(1),
            }
        }
        Op::ShareAgain { vm, pick, gfn: g } => {
            let vm = h(vm);
            Hypercall::Share {
                vm,
                pfn: pfn(picked(d, vm, *pick).1),
                gfn: gfn(*g),
                nr: count(1),
                prot: Prot::R,
            }
        }
        Op::TdStart { vm } => Hypercall::TeardownStart { vm: h(vm) },
        Op::TdReclaim { vm } => Hypercall::TeardownReclaim { vm: h(vm) },
        Op::TdFinalize { vm } => Hypercall::TeardownFinalize { vm: h(vm) },
        Op::HostState { pfn: p } => Hypercall::HostPageState { pfn: pfn(*p) },
        Op::GuestState { vm, gfn: g } => Hypercall::GuestPageState {
            vm: h(vm),
            gfn: gfn(*g),
        },
    }
}

fn free_memcache(h: &FakeHyp, vm: VmHandle) -> u64 {
    match run(
        h,
        Hypercall::VmCounters {
            vm,
            group: hypercalls::CounterGroup::Runtime,
        },
    ) {
        Ok(Reply::Counters(hypercalls::Counters::Runtime(c))) => c.memcache_pages,
        r => panic!("{r:?}"),
    }
}

/// Runs `op`; an error message on a mismatch.
fn step(h: &FakeHyp, d: &mut Driver, op: &Op) -> Result<(), String> {
    let call = to_call(d, op);
    exec(h, d, call).map(|_| ())
}

/// Runs `call` on the fake and checks it against the model.
fn exec(h: &FakeHyp, d: &mut Driver, call: Hypercall) -> Result<Result<Reply, HypError>, String> {
    if let Hypercall::VcpuCreate { vm, .. }
    | Hypercall::Share { vm, .. }
    | Hypercall::Donate { vm, .. } = call
    {
        if d.model.vm(vm).is_ok_and(|v| !v.dying) {
            d.model.note_free_memcache(vm, free_memcache(h, vm));
        }
    }
    host_writes(h, &d.model, &call);
    let before = h.snapshot();
    let zeroed = h.platform().zero_calls();
    let free_slot = (0..MAX_VMS).find(|&i| {
        !d.model
            .vms()
            .iter()
            .any(|v| usize::from(v.handle.index()) == i)
    });
    let got = run(h, call);
    d.calls += 1;
    d.model
        .step_observed(&call, &got, &mut Abi(h))
        .map_err(|e| e.0)?;
    match (&call, &got) {
        (_, Err(_)) if h.snapshot() != before || h.platform().zero_calls() != zeroed => {
            return Err(format!("failed {call:?} changed the state"));
        }
        (Hypercall::VmCreate { .. }, Ok(Reply::VmCreated { vm })) => {
            let i = usize::from(vm.index());
            if Some(i) != free_slot || vm.generation() != d.generations[i] {
                return Err(format!("{vm:?}: not the first free slot {free_slot:?}"));
            }
            d.handles.push(*vm);
        }
        (Hypercall::TeardownFinalize { vm }, Ok(_)) => {
            let g = &mut d.generations[usize::from(vm.index())];
            *g = if *g == u16::MAX { 1 } else { *g + 1 };
        }
        (Hypercall::VcpuRun { vm, vcpu, .. }, Ok(Reply::Exit(exit))) => {
            let off = d
                .model
                .vm(*vm)
                .is_ok_and(|v| v.vcpus_off & 1 << vcpu.get() != 0);
            let want = if off {
                VcpuExit::PoweredOff
            } else {
                VcpuExit::Interrupted
            };
            if *exit != want {
                return Err(format!("{call:?}: {exit:?}, want {want:?}"));
            }
        }
        _ => {}
    }
    for p in d.model.take_zeroed() {
        if h.platform().read(HPfn(p)) != 0 {
            return Err(format!("after {call:?}: {p:#x} came back unzeroed"));
        }
    }
    h.check_invariants()
        .map_err(|e| format!("after {call:?}: {e}"))?;
    compare(h, &d.model).map_err(|e| format!("after {call:?}: {e}"))?;
    Ok(got)
}

/// The host writes something into the pages it owns that `call` may give
/// away, so that reclaims and returns can be checked to zero them.
fn host_writes(h: &FakeHyp, m: &Model, call: &Hypercall) {
    let (p, n) = match *call {
        Hypercall::VmCreate { ipa_bits, root, .. } => {
            (root.raw(), u64::from(ipa_bits.root_table_pages()))
        }
        Hypercall::MemcacheTopup { pfn: p, nr, .. }
        | Hypercall::Donate { pfn: p, nr, .. }
        | Hypercall::Share { pfn: p, nr, .. } => (p.raw(), u64::from(nr.get())),
        _ => return,
    };
    for q in p..p + n {
        if m.host_page(q)
            .is_ok_and(|i| i.owner == hypercalls::Owner::Host)
        {
            h.platform().write(HPfn(q), 0xa000_0000 | q);
        }
    }
}

/// Every checked frame's host state and every VM's guest frames (those
/// the ops use) read back equal to the model.
fn compare(h: &FakeHyp, m: &Model) -> Result<(), String> {
    let mut abi = Abi(h);
    for p in checked_pfns() {
        let got = abi.host_page(p);
        let want = m.host_page(p);
        if got != want {
            return Err(format!("host page {p:#x}: {got:?}, model {want:?}"));
        }
    }
    for vm in m.vms() {
        for g in (0..24).chain(vm.map.keys().copied()) {
            let got = abi.guest_page(vm.handle, g);
            let want = m.guest_page(vm.handle, g);
            if got != want {
                return Err(format!(
                    "{:?} gfn {g:#x}: {got:?}, model {want:?}",
                    vm.handle
                ));
            }
        }
    }
    Ok(())
}

/// Tears every VM down (each call checked against the model) and checks
/// that all memory is back.
fn teardown_all(h: &FakeHyp, d: &mut Driver) -> Result<(), String> {
    let vms: Vec<(VmHandle, bool)> = d.model.vms().iter().map(|v| (v.handle, v.dying)).collect();
    for (vm, dying) in vms {
        if !dying {
            exec(h, d, Hypercall::TeardownStart { vm })?.map_err(|e| format!("{e:?}"))?;
        }
        for _ in 0..64 {
            if d.model.vm(vm).is_ok_and(|v| v.drained) {
                break;
            }
            exec(h, d, Hypercall::TeardownReclaim { vm })?
                .map_err(|e| format!("teardown reclaim: {e:?}"))?;
        }
        exec(h, d, Hypercall::TeardownFinalize { vm })?.map_err(|e| format!("finalize: {e:?}"))?;
    }
    if !d.model.vms().is_empty() {
        return Err("VMs left after teardown".to_string());
    }
    h.check_invariants()?;
    h.check_all_returned()
}

/// One case: the calls, then teardown of everything. The number of calls
/// made, or what went wrong.
fn case(ops: &[Op]) -> Result<u64, String> {
    let h = fake_hyp(256, SHARE_LIMIT).map_err(|e| format!("{e:?}"))?;
    let mut d = Driver::new();
    for (k, op) in ops.iter().enumerate() {
        step(&h, &mut d, op).map_err(|e| format!("step {k} {op:?}: {e}"))?;
    }
    teardown_all(&h, &mut d).map_err(|e| format!("teardown: {e}"))?;
    Ok(d.calls)
}

fn ops_s() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op_s(), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_calls_match_the_model(ops in ops_s()) {
        if let Err(e) = case(&ops) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The long form (`cargo xtask model`): cases of the test above until
/// `EL2_MODEL_CALLS` calls (default 10^6) have run, each checked against
/// the model; prints the count. `cargo test --release -p el2 --lib
/// random_calls_long -- --ignored --nocapture`.
#[test]
#[ignore = "long form (minutes): cargo xtask model"]
fn random_calls_long() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use std::time::Instant;

    let total: u64 = std::env::var("EL2_MODEL_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let start = Instant::now();
    let calls = core::cell::Cell::new(0u64);
    let mut cases = 0u64;
    while calls.get() < total {
        // About 60 calls a case: batches that end near the target.
        let left = (total - calls.get()).div_ceil(60).clamp(1, 4096);
        let mut runner = TestRunner::new(Config {
            cases: u32::try_from(left).unwrap_or(4096),
            failure_persistence: None,
            ..Config::default()
        });
        let r = runner.run(&ops_s(), |ops| {
            let n = case(&ops).map_err(TestCaseError::fail)?;
            calls.set(calls.get() + n);
            Ok(())
        });
        if let Err(e) = r {
            panic!("el2 model: {e}");
        }
        cases += left;
    }
    std::println!(
        "el2 model: {} calls in {cases} cases, 0 failures ({:.1} s)",
        calls.get(),
        start.elapsed().as_secs_f64()
    );
}
