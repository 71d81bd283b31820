//! Property test: random call sequences against a reference model of the
//! ABI semantics (docs/ABI.md §2.4-§2.7, §3), written independently of the
//! implementation. After every call: the result matches the model (or is
//! an allowed `HYP_ENOMEM`), a failed call changed nothing, the host and
//! guest page states read back through the ABI equal the model's, and the
//! implementation's invariants hold. Every case ends by tearing down every
//! VM and checking that all memory is back with the host.

use std::collections::{BTreeMap, BTreeSet};
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use hypercalls::{
    GuestPage, HostPageInfo, HypError, Hypercall, IpaBits, Owner, OwnerState, PageState, Prot,
    Reply, TeardownProgress, VcpuCount, VcpuIndex, VmHandle, TEARDOWN_BATCH,
};
use proptest::prelude::*;
use stage2::Pfn as HPfn;

use super::super::fake::{fake_hyp, FakeHyp};
use super::super::MAX_VMS;
use super::{count, gfn, pfn, run, HOLE, HOST0, HOST1, HYP0};

const SHARE_LIMIT: u32 = 3;
/// Host frames the test uses (and checks after every step).
const WINDOW: u64 = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MOwner {
    Host,
    Hyp,
    Vm(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MPage {
    owner: MOwner,
    shares: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MMap {
    pfn: u64,
    owned: bool,
    prot: Prot,
    young: bool,
}

#[derive(Clone, Debug)]
struct MVm {
    handle: VmHandle,
    ipa_bits: u8,
    nr_vcpus: u16,
    vcpus: BTreeSet<u16>,
    /// Created with `HYP_VCPU_START_OFF` (never started: no guest PSCI here).
    off: BTreeSet<u16>,
    dying: bool,
    /// `HYP_TEARDOWN_RECLAIM` has returned `more = 0`.
    reclaimed: bool,
    map: BTreeMap<u64, MMap>,
    /// Pages donated to the hypervisor for this VM (root, memcache, tables,
    /// vCPU state) and not yet returned.
    hyp_pages: BTreeSet<u64>,
    root: BTreeSet<u64>,
}

#[derive(Debug)]
struct Model {
    pages: BTreeMap<u64, MPage>,
    slots: Vec<(u16, Option<MVm>)>,
    handles: Vec<VmHandle>,
}

fn is_ram(p: u64) -> bool {
    (HYP0..HOLE).contains(&p) || (HOST1..HOST1 + 512).contains(&p)
}

/// Every frame whose state is compared after each step.
fn checked_pfns() -> impl Iterator<Item = u64> {
    (HOST0..HOST0 + WINDOW).chain([HYP0 + 255, HOLE - 1, HOST1, HOST1 + 511])
}

impl Model {
    fn new() -> Self {
        Self {
            pages: BTreeMap::new(),
            slots: (0..MAX_VMS).map(|_| (1, None)).collect(),
            handles: Vec::new(),
        }
    }

    fn page(&self, p: u64) -> MPage {
        self.pages.get(&p).copied().unwrap_or(MPage {
            owner: if p < HOST0 { MOwner::Hyp } else { MOwner::Host },
            shares: 0,
        })
    }

    fn set(&mut self, p: u64, page: MPage) {
        self.pages.insert(p, page);
    }

    fn slot_of(&self, h: VmHandle) -> Result<usize, HypError> {
        let i = usize::from(h.index());
        match self.slots.get(i) {
            Some((_, Some(vm))) if vm.handle == h => Ok(i),
            _ => Err(HypError::NoEntry),
        }
    }

    fn vm(&self, i: usize) -> &MVm {
        self.slots[i].1.as_ref().unwrap()
    }

    fn vm_mut(&mut self, i: usize) -> &mut MVm {
        self.slots[i].1.as_mut().unwrap()
    }

    fn live(&self, h: VmHandle) -> Result<usize, HypError> {
        let i = self.slot_of(h)?;
        if self.vm(i).dying {
            Err(HypError::Busy)
        } else {
            Ok(i)
        }
    }

    fn ram(&self, p: u64, n: u64) -> Result<(), HypError> {
        if (p..p + n).all(is_ram) {
            Ok(())
        } else {
            Err(HypError::OutOfRange)
        }
    }

    fn gfns(&self, i: usize, g: u64, n: u64) -> Result<(), HypError> {
        if g + n <= 1 << (self.vm(i).ipa_bits - 12) {
            Ok(())
        } else {
            Err(HypError::OutOfRange)
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
        2 => (prop_oneof![Just(32u8), Just(40), Just(48)], 0u64..12)
            .prop_map(|(bits, k)| {
                let pages = IpaBits::new(bits).unwrap().root_table_pages() as u64;
                Op::Create { bits, root: HOST0 + k * pages }
            }),
        3 => (vm, pfn_s(), 1u32..4).prop_map(|(vm, pfn, n)| Op::Topup { vm, pfn, n }),
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
        1 => (vm, gfn_s(), 1u32..8).prop_map(|(vm, gfn, n)| Op::WrProtect { vm, gfn, n }),
        1 => (vm, gfn_s(), 1u64..8).prop_map(|(vm, gfn, prot)| Op::Relax { vm, gfn, prot }),
        1 => (vm, gfn_s(), 1u32..8).prop_map(|(vm, gfn, n)| Op::Young { vm, gfn, n }),
        6 => (vm, any::<u8>(), 1u32..3).prop_map(|(vm, pick, n)| Op::Undo { vm, pick, n }),
        1 => vm.prop_map(|vm| Op::TdStart { vm }),
        2 => vm.prop_map(|vm| Op::TdReclaim { vm }),
        1 => vm.prop_map(|vm| Op::TdFinalize { vm }),
        1 => pfn_s().prop_map(|pfn| Op::HostState { pfn }),
        1 => (vm, gfn_s()).prop_map(|(vm, gfn)| Op::GuestState { vm, gfn }),
    ]
}

/// The handle an op's `vm` byte names: mostly one the model handed out
/// (current or stale), sometimes a made-up one.
fn handle(m: &Model, vm: u8) -> VmHandle {
    if vm < 224 && !m.handles.is_empty() {
        // Recent handles more often.
        let n = m.handles.len();
        m.handles[n - 1 - usize::from(vm) % n.min(4)]
    } else {
        VmHandle::new(u16::from(vm % 20), 1 + u16::from(vm % 3)).unwrap()
    }
}

fn prot(bits: u64) -> Prot {
    Prot::from_bits(bits).unwrap()
}

fn to_call(m: &Model, op: &Op) -> Hypercall {
    let h = |vm: &u8| handle(m, *vm);
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
            let mapping = m
                .slot_of(vm)
                .ok()
                .map(|i| m.vm(i))
                .filter(|v| !v.map.is_empty())
                .and_then(|v| v.map.iter().nth(usize::from(*pick) % v.map.len()));
            let (g, x) = match mapping {
                Some((g, x)) => (*g, *x),
                None => (
                    0,
                    MMap {
                        pfn: HOST0,
                        owned: true,
                        prot: Prot::R,
                        young: false,
                    },
                ),
            };
            let (pfn, gfn, nr) = (pfn(x.pfn), gfn(g), count(*n));
            if x.owned {
                Hypercall::Reclaim { vm, pfn, gfn, nr }
            } else {
                Hypercall::Unshare { vm, pfn, gfn, nr }
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

/// What the model expects.
enum Expect {
    /// Exactly this result.
    Exactly(Result<Reply, HypError>),
    /// Success (checked and applied by the closure-free code in `step`),
    /// or `HYP_ENOMEM` if `may_nomem`.
    Success { may_nomem: bool },
    /// One of these errors (the model does not know which).
    OneOf(&'static [HypError]),
}

fn err(e: HypError) -> Expect {
    Expect::Exactly(Err(e))
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

/// Runs `op` on both and checks the result. Returns an error message on
/// a mismatch.
fn step(h: &FakeHyp, m: &mut Model, op: &Op) -> Result<(), String> {
    let call = to_call(m, op);
    let expect = expect(h, m, &call)?;
    host_writes(h, m, &call);
    let before = h.snapshot();
    let zeroed = h.platform().zero_calls();
    let got = run(h, call);
    match (&expect, &got) {
        (Expect::Exactly(want), got) if want != got => {
            return Err(format!("{call:?}: want {want:?}, got {got:?}"))
        }
        (Expect::Success { may_nomem: true }, Err(HypError::NoMemory)) => {}
        (Expect::Success { .. }, Err(e)) => {
            return Err(format!("{call:?}: want success, got {e:?}"))
        }
        (Expect::OneOf(errs), got) if !errs.iter().any(|e| *got == Err(*e)) => {
            return Err(format!("{call:?}: want one of {errs:?}, got {got:?}"))
        }
        _ => {}
    }
    match &got {
        Err(_) => {
            if h.snapshot() != before || h.platform().zero_calls() != zeroed {
                return Err(format!("failed {call:?} changed the state"));
            }
        }
        Ok(reply) => apply(h, m, &call, reply)?,
    }
    h.check_invariants()
        .map_err(|e| format!("after {call:?}: {e}"))?;
    compare(h, m).map_err(|e| format!("after {call:?}: {e}"))
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
        if is_ram(q) && m.page(q).owner == MOwner::Host {
            h.platform().write(HPfn(q), 0xa000_0000 | q);
        }
    }
}

/// The model's verdict on `call` before it runs.
fn expect(h: &FakeHyp, m: &Model, call: &Hypercall) -> Result<Expect, String> {
    Ok(match *call {
        Hypercall::VmCreate { ipa_bits, root, .. } => {
            let Some(free) = m.slots.iter().position(|s| s.1.is_none()) else {
                return Ok(err(HypError::NoSpace));
            };
            let n = u64::from(ipa_bits.root_table_pages());
            let r = root.raw();
            if let Err(e) = m.ram(r, n) {
                return Ok(err(e));
            }
            if (r..r + n).any(|p| {
                m.page(p)
                    != MPage {
                        owner: MOwner::Host,
                        shares: 0,
                    }
            }) {
                return Ok(err(HypError::Denied));
            }
            let gen = m.slots[free].0;
            let vm = VmHandle::new(free as u16, gen).unwrap();
            Expect::Exactly(Ok(Reply::VmCreated { vm }))
        }
        Hypercall::MemcacheTopup { vm, pfn: p, nr } => {
            let (p, n) = (p.raw(), u64::from(nr.get()));
            if let Err(e) = m.live(vm).and_then(|_| m.ram(p, n)) {
                return Ok(err(e));
            }
            if (p..p + n).any(|q| {
                m.page(q)
                    != MPage {
                        owner: MOwner::Host,
                        shares: 0,
                    }
            }) {
                return Ok(err(HypError::Denied));
            }
            Expect::Success { may_nomem: false }
        }
        Hypercall::MemcacheReclaim { vm } => match m.slot_of(vm) {
            Err(e) => err(e),
            Ok(_) => Expect::Success { may_nomem: false },
        },
        Hypercall::VcpuRun { vm, vcpu, .. } => {
            let i = match m.slot_of(vm) {
                Ok(i) => i,
                Err(e) => return Ok(err(e)),
            };
            let v = m.vm(i);
            if !v.vcpus.contains(&vcpu.get()) {
                err(HypError::NoEntry)
            } else if v.dying {
                // ENOENT once teardown has returned the vCPU's state page.
                Expect::OneOf(&[HypError::Busy, HypError::NoEntry])
            } else {
                // Nothing is scripted: an IRQ ends the first entry.
                Expect::Exactly(Ok(Reply::Exit(if v.off.contains(&vcpu.get()) {
                    hypercalls::VcpuExit::PoweredOff
                } else {
                    hypercalls::VcpuExit::Interrupted
                })))
            }
        }
        Hypercall::VcpuCreate { vm, vcpu, .. } => {
            let i = match m.live(vm) {
                Ok(i) => i,
                Err(e) => return Ok(err(e)),
            };
            let v = m.vm(i);
            if vcpu.get() >= v.nr_vcpus {
                err(HypError::OutOfRange)
            } else if v.vcpus.contains(&vcpu.get()) {
                err(HypError::Exists)
            } else {
                Expect::Success {
                    may_nomem: free_memcache(h, vm) == 0,
                }
            }
        }
        Hypercall::Share {
            vm,
            pfn: p,
            gfn: g,
            nr,
            ..
        }
        | Hypercall::Donate {
            vm,
            pfn: p,
            gfn: g,
            nr,
            ..
        } => {
            let donate = matches!(call, Hypercall::Donate { .. });
            let (p, g, n) = (p.raw(), g.raw(), u64::from(nr.get()));
            let i = match m
                .live(vm)
                .and_then(|i| m.ram(p, n).map(|()| i))
                .and_then(|i| m.gfns(i, g, n).map(|()| i))
            {
                Ok(i) => i,
                Err(e) => return Ok(err(e)),
            };
            for q in p..p + n {
                let pg = m.page(q);
                if pg.owner != MOwner::Host || (donate && pg.shares != 0) {
                    return Ok(err(HypError::Denied));
                }
                if !donate && pg.shares >= SHARE_LIMIT {
                    return Ok(err(HypError::OutOfRange));
                }
            }
            if (g..g + n).any(|x| m.vm(i).map.contains_key(&x)) {
                return Ok(err(HypError::Exists));
            }
            // At most two tables per level below the root for these small
            // ranges (the high gfns cross a 1 GiB boundary).
            Expect::Success {
                may_nomem: free_memcache(h, vm) < 6,
            }
        }
        Hypercall::Unshare {
            vm,
            pfn: p,
            gfn: g,
            nr,
        }
        | Hypercall::Reclaim {
            vm,
            pfn: p,
            gfn: g,
            nr,
        } => {
            let unshare = matches!(call, Hypercall::Unshare { .. });
            let (p, g, n) = (p.raw(), g.raw(), u64::from(nr.get()));
            let i = match m
                .live(vm)
                .and_then(|i| m.ram(p, n).map(|()| i))
                .and_then(|i| m.gfns(i, g, n).map(|()| i))
            {
                Ok(i) => i,
                Err(e) => return Ok(err(e)),
            };
            for q in p..p + n {
                let pg = m.page(q);
                let ok = if unshare {
                    pg.owner == MOwner::Host && pg.shares > 0
                } else {
                    pg.owner == MOwner::Vm(i)
                };
                if !ok {
                    return Ok(err(HypError::Denied));
                }
            }
            for k in 0..n {
                match m.vm(i).map.get(&(g + k)) {
                    None => return Ok(err(HypError::NoEntry)),
                    Some(mm) if mm.pfn != p + k || mm.owned == unshare => {
                        return Ok(err(HypError::Denied))
                    }
                    Some(_) => {}
                }
            }
            Expect::Exactly(Ok(Reply::Done))
        }
        Hypercall::WrProtect { vm, gfn: g, nr } => {
            let (g, n) = (g.raw(), u64::from(nr.get()));
            match m.live(vm).and_then(|i| m.gfns(i, g, n).map(|()| i)) {
                Err(e) => err(e),
                Ok(i) => {
                    let pages = m
                        .vm(i)
                        .map
                        .range(g..g + n)
                        .filter(|(_, x)| x.prot.write())
                        .count();
                    Expect::Exactly(Ok(Reply::WrProtected {
                        pages: pages as u32,
                    }))
                }
            }
        }
        Hypercall::RelaxPerms { vm, gfn: g, .. } => {
            match m.live(vm).and_then(|i| m.gfns(i, g.raw(), 1).map(|()| i)) {
                Err(e) => err(e),
                Ok(i) if !m.vm(i).map.contains_key(&g.raw()) => err(HypError::NoEntry),
                Ok(_) => Expect::Exactly(Ok(Reply::Done)),
            }
        }
        Hypercall::TestClearYoung { vm, gfn: g, nr } => {
            let (g, n) = (g.raw(), u64::from(nr.get()));
            match m.live(vm).and_then(|i| m.gfns(i, g, n).map(|()| i)) {
                Err(e) => err(e),
                Ok(i) => {
                    let young = m.vm(i).map.range(g..g + n).any(|(_, x)| x.young);
                    Expect::Exactly(Ok(Reply::Young { young }))
                }
            }
        }
        Hypercall::TeardownStart { vm } => match m.live(vm) {
            Err(e) => err(e),
            Ok(_) => Expect::Exactly(Ok(Reply::Done)),
        },
        Hypercall::TeardownReclaim { vm } => match m.slot_of(vm) {
            Err(e) => err(e),
            Ok(i) if !m.vm(i).dying => err(HypError::Busy),
            Ok(_) => Expect::Success { may_nomem: false },
        },
        Hypercall::TeardownFinalize { vm } => match m.slot_of(vm) {
            Err(e) => err(e),
            Ok(i) => {
                let v = m.vm(i);
                if !v.dying || !v.reclaimed {
                    err(HypError::Busy)
                } else {
                    Expect::Exactly(Ok(Reply::Done))
                }
            }
        },
        Hypercall::HostPageState { pfn: p } => {
            if !is_ram(p.raw()) {
                err(HypError::OutOfRange)
            } else {
                Expect::Exactly(Ok(Reply::HostPage(host_info(m, p.raw()))))
            }
        }
        Hypercall::GuestPageState { vm, gfn: g } => {
            match m
                .slot_of(vm)
                .and_then(|i| m.gfns(i, g.raw(), 1).map(|()| i))
            {
                Err(e) => err(e),
                Ok(i) => Expect::Exactly(Ok(Reply::GuestPage(guest_info(m, i, g.raw())))),
            }
        }
        _ => return Err(format!("unexpected call {call:?}")),
    })
}

fn host_info(m: &Model, p: u64) -> HostPageInfo {
    let pg = m.page(p);
    HostPageInfo {
        owner: match pg.owner {
            MOwner::Host => Owner::Host,
            MOwner::Hyp => Owner::Hyp,
            MOwner::Vm(i) => Owner::Vm(m.vm(i).handle),
        },
        state: if pg.shares == 0 {
            OwnerState::Owned
        } else {
            OwnerState::SharedOwned
        },
        share_count: pg.shares,
    }
}

fn guest_info(m: &Model, i: usize, g: u64) -> GuestPage {
    match m.vm(i).map.get(&g) {
        None => GuestPage::Unmapped,
        Some(x) => GuestPage::Mapped {
            state: if x.owned {
                PageState::Owned
            } else {
                PageState::SharedBorrowed
            },
            pfn: pfn(x.pfn),
            prot: x.prot,
        },
    }
}

fn host_state(h: &FakeHyp, p: u64) -> HostPageInfo {
    match run(h, Hypercall::HostPageState { pfn: pfn(p) }) {
        Ok(Reply::HostPage(i)) => i,
        r => panic!("{r:?}"),
    }
}

fn guest_state(h: &FakeHyp, vm: VmHandle, g: u64) -> GuestPage {
    match run(h, Hypercall::GuestPageState { vm, gfn: gfn(g) }) {
        Ok(Reply::GuestPage(p)) => p,
        r => panic!("{r:?}"),
    }
}

/// Applies a successful call to the model (checking what the model could
/// not predict).
fn apply(h: &FakeHyp, m: &mut Model, call: &Hypercall, reply: &Reply) -> Result<(), String> {
    match *call {
        Hypercall::VmCreate {
            ipa_bits,
            nr_vcpus,
            root,
            ..
        } => {
            let Reply::VmCreated { vm } = *reply else {
                unreachable!()
            };
            let n = u64::from(ipa_bits.root_table_pages());
            let i = usize::from(vm.index());
            let r = root.raw();
            for p in r..r + n {
                m.set(
                    p,
                    MPage {
                        owner: MOwner::Hyp,
                        shares: 0,
                    },
                );
            }
            let set: BTreeSet<u64> = (r..r + n).collect();
            m.slots[i].1 = Some(MVm {
                handle: vm,
                ipa_bits: ipa_bits.get(),
                nr_vcpus: nr_vcpus.get(),
                vcpus: BTreeSet::new(),
                off: BTreeSet::new(),
                dying: false,
                reclaimed: false,
                map: BTreeMap::new(),
                hyp_pages: set.clone(),
                root: set,
            });
            m.handles.push(vm);
        }
        Hypercall::MemcacheTopup { vm, pfn: p, nr } => {
            let i = m.slot_of(vm).unwrap();
            for q in p.raw()..p.raw() + u64::from(nr.get()) {
                m.set(
                    q,
                    MPage {
                        owner: MOwner::Hyp,
                        shares: 0,
                    },
                );
                m.vm_mut(i).hyp_pages.insert(q);
            }
        }
        Hypercall::MemcacheReclaim { vm } => {
            let Reply::MemcacheReclaimed(pages) = reply else {
                unreachable!()
            };
            let i = m.slot_of(vm).unwrap();
            for p in pages.as_slice() {
                let p = p.raw();
                let v = m.vm_mut(i);
                if v.root.contains(&p) || !v.hyp_pages.remove(&p) {
                    return Err(format!("memcache reclaim returned {p:#x}"));
                }
                m.set(
                    p,
                    MPage {
                        owner: MOwner::Host,
                        shares: 0,
                    },
                );
                if h.platform().read(HPfn(p)) != 0 {
                    return Err(format!("{p:#x} returned unzeroed"));
                }
            }
        }
        Hypercall::VcpuCreate { vm, vcpu, start } => {
            let i = m.slot_of(vm).unwrap();
            m.vm_mut(i).vcpus.insert(vcpu.get());
            if start == hypercalls::VcpuStart::Off {
                m.vm_mut(i).off.insert(vcpu.get());
            }
        }
        Hypercall::Share {
            vm,
            pfn: p,
            gfn: g,
            nr,
            prot,
        }
        | Hypercall::Donate {
            vm,
            pfn: p,
            gfn: g,
            nr,
            prot,
        } => {
            let donate = matches!(call, Hypercall::Donate { .. });
            let i = m.slot_of(vm).unwrap();
            for k in 0..u64::from(nr.get()) {
                let q = p.raw() + k;
                let mut pg = m.page(q);
                if donate {
                    pg.owner = MOwner::Vm(i);
                } else {
                    pg.shares += 1;
                }
                m.set(q, pg);
                let mm = MMap {
                    pfn: q,
                    owned: donate,
                    prot,
                    young: true,
                };
                m.vm_mut(i).map.insert(g.raw() + k, mm);
            }
        }
        Hypercall::Unshare {
            vm,
            pfn: p,
            gfn: g,
            nr,
        }
        | Hypercall::Reclaim {
            vm,
            pfn: p,
            gfn: g,
            nr,
        } => {
            let unshare = matches!(call, Hypercall::Unshare { .. });
            let i = m.slot_of(vm).unwrap();
            for k in 0..u64::from(nr.get()) {
                let q = p.raw() + k;
                let mut pg = m.page(q);
                if unshare {
                    pg.shares -= 1;
                } else {
                    pg.owner = MOwner::Host;
                    if h.platform().read(HPfn(q)) != 0 {
                        return Err(format!("{q:#x} reclaimed unzeroed"));
                    }
                }
                m.set(q, pg);
                m.vm_mut(i).map.remove(&(g.raw() + k));
            }
        }
        Hypercall::WrProtect { vm, gfn: g, nr } => {
            let i = m.slot_of(vm).unwrap();
            let g = g.raw();
            for (_, x) in m.vm_mut(i).map.range_mut(g..g + u64::from(nr.get())) {
                x.prot = Prot::from_bits(x.prot.bits() & !Prot::W.bits()).unwrap();
            }
        }
        Hypercall::RelaxPerms { vm, gfn: g, prot } => {
            let i = m.slot_of(vm).unwrap();
            if let Some(x) = m.vm_mut(i).map.get_mut(&g.raw()) {
                x.prot = Prot::from_bits(x.prot.bits() | prot.bits()).unwrap();
            }
        }
        Hypercall::TestClearYoung { vm, gfn: g, nr } => {
            let i = m.slot_of(vm).unwrap();
            let g = g.raw();
            for (_, x) in m.vm_mut(i).map.range_mut(g..g + u64::from(nr.get())) {
                x.young = false;
            }
        }
        Hypercall::TeardownStart { vm } => {
            let i = m.slot_of(vm).unwrap();
            m.vm_mut(i).dying = true;
        }
        Hypercall::TeardownReclaim { vm } => {
            let Reply::Teardown(t) = *reply else {
                unreachable!()
            };
            resync_teardown(h, m, vm, t)?;
        }
        Hypercall::TeardownFinalize { vm } => {
            let i = m.slot_of(vm).unwrap();
            let v = m.slots[i].1.take().unwrap();
            for p in v.root {
                m.set(
                    p,
                    MPage {
                        owner: MOwner::Host,
                        shares: 0,
                    },
                );
            }
            let g = &mut m.slots[i].0;
            *g = if *g == u16::MAX { 1 } else { *g + 1 };
        }
        _ => {}
    }
    Ok(())
}

/// After `HYP_TEARDOWN_RECLAIM` returned `t`: finds out through the ABI
/// which of the VM's mappings and hypervisor pages went back, checks the
/// count, the order (mappings before hypervisor pages) and `more`.
fn resync_teardown(
    h: &FakeHyp,
    m: &mut Model,
    vm: VmHandle,
    t: TeardownProgress,
) -> Result<(), String> {
    let i = m.slot_of(vm).unwrap();
    if t.reclaimed > TEARDOWN_BATCH {
        return Err(format!("teardown step of {}", t.reclaimed));
    }
    let mut done = 0u32;
    let gfns: Vec<(u64, MMap)> = m.vm(i).map.iter().map(|(g, x)| (*g, *x)).collect();
    for (g, x) in gfns {
        if guest_state(h, vm, g) == GuestPage::Unmapped {
            done += 1;
            m.vm_mut(i).map.remove(&g);
            let mut pg = m.page(x.pfn);
            if x.owned {
                pg.owner = MOwner::Host;
                if h.platform().read(HPfn(x.pfn)) != 0 {
                    return Err(format!("{:#x} reclaimed unzeroed", x.pfn));
                }
            } else {
                pg.shares -= 1;
            }
            m.set(x.pfn, pg);
        }
    }
    let pages: Vec<u64> = m
        .vm(i)
        .hyp_pages
        .difference(&m.vm(i).root)
        .copied()
        .collect();
    for p in pages {
        if host_state(h, p).owner == Owner::Host {
            if !m.vm(i).map.is_empty() {
                return Err(format!("{p:#x} returned before the guest mappings"));
            }
            done += 1;
            m.vm_mut(i).hyp_pages.remove(&p);
            m.set(
                p,
                MPage {
                    owner: MOwner::Host,
                    shares: 0,
                },
            );
        }
    }
    if done != t.reclaimed {
        return Err(format!(
            "teardown reports {} but {done} pages went back",
            t.reclaimed
        ));
    }
    let v = m.vm(i);
    let more = !v.map.is_empty() || v.hyp_pages != v.root;
    if t.more != more {
        return Err(format!("teardown more = {} but model says {more}", t.more));
    }
    m.vm_mut(i).reclaimed = !more;
    Ok(())
}

/// Every checked frame's host state and every live VM's guest frames
/// (those the ops use) read back equal to the model.
fn compare(h: &FakeHyp, m: &Model) -> Result<(), String> {
    for p in checked_pfns() {
        let got = host_state(h, p);
        let want = host_info(m, p);
        if got != want {
            return Err(format!("host page {p:#x}: {got:?}, model {want:?}"));
        }
    }
    for (i, (_, vm)) in m.slots.iter().enumerate() {
        let Some(vm) = vm else { continue };
        for g in (0..24).chain(vm.map.keys().copied()) {
            let got = guest_state(h, vm.handle, g);
            let want = guest_info(m, i, g);
            if got != want {
                return Err(format!("vm {i} gfn {g:#x}: {got:?}, model {want:?}"));
            }
        }
    }
    Ok(())
}

/// Tears every VM down and checks that all memory is back.
fn teardown_all(h: &FakeHyp, m: &mut Model) -> Result<(), String> {
    let vms: Vec<VmHandle> = m
        .slots
        .iter()
        .filter_map(|s| s.1.as_ref().map(|v| v.handle))
        .collect();
    for vm in vms {
        let i = m.slot_of(vm).unwrap();
        if !m.vm(i).dying {
            let c = Hypercall::TeardownStart { vm };
            run(h, c).map_err(|e| format!("{e:?}"))?;
            m.vm_mut(i).dying = true;
        }
        for _ in 0..64 {
            let c = Hypercall::TeardownReclaim { vm };
            let Ok(Reply::Teardown(t)) = run(h, c) else {
                return Err("teardown reclaim failed".to_string());
            };
            resync_teardown(h, m, vm, t)?;
            if !t.more {
                break;
            }
        }
        if m.slot_of(vm).is_ok() {
            let c = Hypercall::TeardownFinalize { vm };
            let r = run(h, c);
            if r != Ok(Reply::Done) {
                return Err(format!("finalize: {r:?}"));
            }
            apply(h, m, &c, &Reply::Done)?;
        }
    }
    h.check_invariants()?;
    h.check_all_returned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_calls_match_the_model(ops in proptest::collection::vec(op_s(), 1..120)) {
        let h = fake_hyp(256, SHARE_LIMIT).unwrap();
        let mut m = Model::new();
        for (k, op) in ops.iter().enumerate() {
            if let Err(e) = step(&h, &mut m, op) {
                prop_assert!(false, "step {k} {op:?}: {e}");
            }
        }
        if let Err(e) = teardown_all(&h, &mut m) {
            prop_assert!(false, "teardown: {e}");
        }
    }
}
