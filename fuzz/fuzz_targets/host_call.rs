//! Fuzz target: the EL2 dispatcher (`el2::pkvm::Hyp::host_call`) on host
//! fakes, driven by a sequence of register sets decoded from the input.
//!
//! Each input starts a fresh fake machine (6 MiB of RAM in two regions
//! with a hole, the hypervisor's first MiB, share limit 3). The input is
//! read 16 bytes at a time; each chunk becomes one call: a function from
//! the ABI (or, rarely, a raw id), arguments biased towards the values
//! that matter (handles the hypervisor returned, frames around the RAM
//! edges, small gfns and counts, 2 MiB-aligned frames and gfns so that
//! 512-page calls map blocks and later calls split them), sometimes raw
//! register values. Some
//! chunks are host stage-2 aborts instead.
//!
//! After every call it checks: x0 is 0 or a negative error; a failure has
//! x1..x7 zero and changed nothing (whole-state snapshot); registers that
//! do not decode fail with their decode error; a decoded call's outcome is
//! one the reference model of the ABI (crate `abi_model`) allows, and the
//! model follows it (teardown batches page by page through the ABI); the
//! host page state of every watched frame equals the model's; frames that
//! came back read zero; the implementation's invariants hold
//! (docs/DESIGN.md §4). At the end every VM is torn down and all memory
//! must be back with the host.

#![no_main]

use abi_model::{Model, Observe};
use el2::pkvm::fake::{
    abi_model, fake_hyp, run, FakeHyp, Observer as Abi, HOLE, HOST0, HOST1, HYP0,
};
use el2::pkvm::{AbortAction, AbortKind};
use hypercalls::{HostFunction, HostPageInfo, HypError, Hypercall, Reply, ReplyError, VmHandle};
use libfuzzer_sys::fuzz_target;

const SHARE_LIMIT: u32 = 3;

struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.u8());
        }
        v
    }
}

fn pfn(b: &mut Bytes<'_>) -> u64 {
    let x = b.u8();
    match x % 16 {
        0 => HYP0 + u64::from(b.u8()),
        1 => HOLE - 4 + u64::from(b.u8() % 8),
        2 => HOST1 + u64::from(b.u8() % 64),
        3 => b.u64() & ((1 << 40) - 1),
        // 2 MiB-aligned frames: with an aligned gfn and 512 pages, a block.
        4 => [HOST1, HOST0 + 0x100][usize::from(b.u8() % 2)],
        _ => HOST0 + u64::from(b.u8() % 96),
    }
}

fn gfn(b: &mut Bytes<'_>) -> u64 {
    match b.u8() % 8 {
        0 => (1 << 20) - 1 - u64::from(b.u8() % 4),
        1 => (1 << 28) - 1 - u64::from(b.u8() % 4),
        2 => (1 << 36) - 1 - u64::from(b.u8() % 4),
        3 => b.u64() & ((1 << 40) - 1),
        4 => 512 * u64::from(b.u8() % 4),
        _ => u64::from(b.u8() % 64),
    }
}

fn count(b: &mut Bytes<'_>) -> u64 {
    match b.u8() % 16 {
        0 => 512,
        1 => 0,
        2 => 513,
        _ => 1 + u64::from(b.u8() % 8),
    }
}

fn handle(b: &mut Bytes<'_>, handles: &[VmHandle]) -> u64 {
    let x = b.u8();
    if x < 224 && !handles.is_empty() {
        let n = handles.len();
        u64::from(handles[n - 1 - usize::from(x) % n.min(6)].raw())
    } else {
        u64::from(x % 20) | u64::from(b.u8() % 4) << 16
    }
}

/// One call's registers from the input.
fn registers(b: &mut Bytes<'_>, handles: &[VmHandle]) -> [u64; 8] {
    let sel = b.u8();
    let all = HostFunction::ALL;
    let mut regs = [0u64; 8];
    if sel == 0xff {
        for r in &mut regs {
            *r = b.u64();
        }
        return regs;
    }
    let f = all[usize::from(sel) % all.len()];
    regs[0] = u64::from(f.id());
    let vm = handle(b, handles);
    match f {
        HostFunction::Version => {}
        HostFunction::Features => regs[1] = u64::from(0xc600_0000u32 | u32::from(b.u8())),
        HostFunction::MemcacheTopup => {
            regs[1] = vm;
            regs[2] = pfn(b);
            regs[3] = count(b);
        }
        HostFunction::VmCreate => {
            let bits = [32u64, 36, 40, 44, 48][usize::from(b.u8() % 5)];
            regs[1] = bits;
            regs[2] = 1 + u64::from(b.u8() % 4);
            let align = match bits {
                32 => 4,
                40 => 2,
                _ => 1,
            };
            regs[3] = pfn(b) & !(align - 1);
        }
        HostFunction::VcpuCreate | HostFunction::VcpuRun => {
            regs[1] = vm;
            regs[2] = u64::from(b.u8() % 6);
        }
        HostFunction::Share | HostFunction::Donate => {
            regs[1] = vm;
            let p = pfn(b);
            regs[2] = p;
            // Often gfn = pfn % 64, which unshare/reclaim also guess.
            regs[3] = if b.u8().is_multiple_of(2) {
                p % 64
            } else {
                gfn(b)
            };
            regs[4] = count(b);
            regs[5] = u64::from(b.u8() % 8);
        }
        HostFunction::Unshare | HostFunction::Reclaim => {
            regs[1] = vm;
            let p = pfn(b);
            regs[2] = p;
            // Often the gfn the pfn was likely given at.
            regs[3] = if b.u8().is_multiple_of(2) {
                p % 64
            } else {
                gfn(b)
            };
            regs[4] = count(b);
        }
        HostFunction::WrProtect | HostFunction::TestClearYoung | HostFunction::UnshareRange => {
            regs[1] = vm;
            regs[2] = gfn(b);
            regs[3] = count(b);
        }
        HostFunction::RelaxPerms => {
            regs[1] = vm;
            regs[2] = gfn(b);
            regs[3] = u64::from(b.u8() % 8);
        }
        HostFunction::VmCounters => {
            regs[1] = vm;
            regs[2] = u64::from(b.u8() % 3);
        }
        HostFunction::HostPageState => regs[1] = pfn(b),
        HostFunction::GuestPageState => {
            regs[1] = vm;
            regs[2] = gfn(b);
        }
        // MemcacheReclaim and the teardown calls take the handle only.
        _ => regs[1] = vm,
    }
    // Now and then a reserved register or bit.
    if b.u8() == 0x5a {
        let r = 1 + usize::from(b.u8() % 7);
        regs[r] |= 1 << (b.u8() % 64);
    }
    regs
}

/// Host frames whose contents and states are tracked: the ones `pfn`
/// produces most.
fn watched() -> impl Iterator<Item = u64> {
    (HOST0..HOST0 + 96).chain(HOST1..HOST1 + 64)
}

/// The host state of each watched frame (through the ABI).
fn host_states(h: &FakeHyp) -> Vec<Result<HostPageInfo, HypError>> {
    watched().map(|p| Abi(h).host_page(p)).collect()
}

fn host_owned(info: &Result<HostPageInfo, HypError>) -> bool {
    info.is_ok_and(|i| i.owner == hypercalls::Owner::Host)
}

/// The host writes into every page it owns, so a page coming back from
/// the hypervisor or a guest can be checked to read zero.
fn host_scribbles(h: &FakeHyp, states: &[Result<HostPageInfo, HypError>]) {
    for (p, state) in watched().zip(states) {
        if host_owned(state) {
            h.platform().write(stage2::Pfn(p), 0xa000_0000 | p);
        }
    }
}

/// Tells the model the free memcache pages of the VM a call that needs
/// some names (read through the ABI before the call).
fn note_memcache(h: &FakeHyp, m: &mut Model, call: &Hypercall) {
    if let Hypercall::VcpuCreate { vm, .. }
    | Hypercall::Share { vm, .. }
    | Hypercall::Donate { vm, .. } = *call
    {
        let group = hypercalls::CounterGroup::Runtime;
        if let Ok(Reply::Counters(hypercalls::Counters::Runtime(c))) =
            run(h, Hypercall::VmCounters { vm, group })
        {
            m.note_free_memcache(vm, c.memcache_pages);
        }
    }
}

fn check_call(h: &FakeHyp, m: &mut Model, regs: &[u64; 8], handles: &mut Vec<VmHandle>) {
    let decoded = Hypercall::decode(regs);
    if let Ok(call) = &decoded {
        note_memcache(h, m, call);
    }
    let states_before = host_states(h);
    host_scribbles(h, &states_before);
    let before = h.snapshot();
    let zeroed = h.platform().zero_calls();
    let out = h.host_call(regs);
    let x0 = out[0] as i64;
    assert!(x0 <= 0, "x0 = {x0} for {regs:x?}");
    if x0 < 0 {
        assert!(
            out[1..].iter().all(|&r| r == 0),
            "failure with results {out:x?}"
        );
        assert!(
            h.snapshot() == before,
            "failed call {regs:x?} changed the state"
        );
        assert_eq!(
            h.platform().zero_calls(),
            zeroed,
            "failed call zeroed pages"
        );
    }
    match decoded {
        Err(e) => assert_eq!(x0, e.to_i64(), "registers {regs:x?} do not decode: {e:?}"),
        Ok(call) => {
            // A reply has the call's shape, and the model allows it.
            let got = match call.decode_reply(&out) {
                Ok(r) => Ok(r),
                Err(ReplyError::Failed(e)) => Err(e),
                Err(ReplyError::Malformed) => panic!("malformed reply {out:x?} to {call:?}"),
            };
            if let Ok(Reply::VmCreated { vm }) = got {
                handles.push(vm);
            }
            if let Err(e) = m.step_observed(&call, &got, &mut Abi(h)) {
                panic!("{e}");
            }
        }
    }
    if let Err(e) = h.check_invariants() {
        panic!("after {regs:x?}: {e}");
    }
    // Every watched frame is in the model's state; pages that came back
    // to the host read zero.
    for ((p, was), now) in watched().zip(states_before).zip(host_states(h)) {
        assert_eq!(now, m.host_page(p), "host page {p:#x} after {regs:x?}");
        if host_owned(&now) && !host_owned(&was) {
            assert_eq!(
                h.platform().read(stage2::Pfn(p)),
                0,
                "{p:#x} came back unzeroed"
            );
        }
    }
    for p in m.take_zeroed() {
        assert_eq!(
            h.platform().read(stage2::Pfn(p)),
            0,
            "{p:#x} came back unzeroed"
        );
    }
}

/// Tears every VM of the model down, each call checked against it.
fn teardown_all(h: &FakeHyp, m: &mut Model, handles: &mut Vec<VmHandle>) {
    let vms: Vec<VmHandle> = m.vms().iter().map(|v| v.handle).collect();
    for vm in vms {
        check_call(h, m, &Hypercall::TeardownStart { vm }.encode(), handles);
        for _ in 0..1000 {
            if m.vm(vm).is_ok_and(|v| v.drained) {
                break;
            }
            check_call(h, m, &Hypercall::TeardownReclaim { vm }.encode(), handles);
        }
        check_call(h, m, &Hypercall::TeardownFinalize { vm }.encode(), handles);
        assert!(m.vm(vm).is_err(), "{vm:?} not finalized");
    }
    h.check_invariants().unwrap();
    h.check_all_returned().unwrap();
}

fuzz_target!(|data: &[u8]| {
    let h = fake_hyp(256, SHARE_LIMIT).expect("fake machine");
    let mut m = abi_model(SHARE_LIMIT);
    let mut handles = Vec::new();
    let mut b = Bytes { data };
    while !b.data.is_empty() {
        if b.u8().is_multiple_of(16) {
            let ipa = pfn(&mut b) << 12 | u64::from(b.u8()) << 4;
            let kind = match b.u8() % 3 {
                0 => AbortKind::Translation,
                1 => AbortKind::Permission,
                _ => AbortKind::Other,
            };
            let before = h.snapshot();
            if h.host_abort(ipa, kind) == AbortAction::InjectAbort {
                assert!(h.snapshot() == before, "injected abort changed the state");
            }
            h.check_invariants().unwrap();
            continue;
        }
        let regs = registers(&mut b, &handles);
        check_call(&h, &mut m, &regs, &mut handles);
    }
    teardown_all(&h, &mut m, &mut handles);
});
