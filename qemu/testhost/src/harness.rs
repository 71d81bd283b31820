//! The case framework: a context per case with its own model, pages from a
//! pool far from the image and the DTB, every call checked against the model
//! (a teardown batch page by page) and followed by a read-back of the state
//! of every page the case used.
//!
//! Output protocol (parsed by `qemu/src/testhost.rs`): `CASE <name>` when
//! a case starts, then `PASS <name>` or `FAIL <name>: <why>` (one line).

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::{
    CounterGroup, GuestPage, HypError, Hypercall, IpaBits, PageCount, Pfn, Reply, VcpuCount,
    VmHandle,
};
use testhost::{show, Model};

use crate::{arch, hv, rt, say};

/// A case's result: `Err` says why it failed.
pub type R = Result<(), String>;

/// Test pages come from [POOL_FIRST, POOL_END): 0x8000_0000.., far above the
/// image at HOST_KERNEL_ADDR (0x7000_0000) and the DTB at HOST_DTB_ADDR
/// (0x4200_0000) of the boot contract.
const POOL_FIRST: u64 = 0x8_0000;
const POOL_END: u64 = 0x9_0000;
static POOL_NEXT: AtomicU64 = AtomicU64::new(POOL_FIRST);

/// `n` fresh frames, the first a multiple of `align`; never handed out twice.
pub fn alloc_pages(n: u64, align: u64) -> Result<u64, String> {
    let align = align.max(1);
    loop {
        let cur = POOL_NEXT.load(Ordering::SeqCst);
        let start = cur.next_multiple_of(align);
        if start + n > POOL_END {
            return Err("test page pool exhausted".into());
        }
        if POOL_NEXT
            .compare_exchange(cur, start + n, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Ok(start);
        }
    }
}

/// Checks that the pool is host RAM and clear of the image.
pub fn check_pool() -> R {
    let p = rt::platform();
    let (a, b) = (POOL_FIRST << 12, POOL_END << 12);
    if !p.ram.iter().any(|&(s, e)| s <= a && b <= e) {
        return Err(format!("test pool {a:#x}..{b:#x} is not inside host RAM"));
    }
    let (is, ie) = rt::image_range();
    if is < b && a < ie {
        return Err("test pool overlaps the image".into());
    }
    Ok(())
}

/// Most pages of one call's range the read-back follows.
const TRACK_MAX: u64 = 16;

/// One case's state.
#[derive(Debug)]
pub struct Ctx {
    /// The reference model (fresh per case).
    pub model: Model,
    pfns: BTreeSet<u64>,
    gfns: BTreeSet<(VmHandle, u64)>,
    /// Calls issued (read-backs not counted).
    pub calls: u64,
    /// Whether to read back every tracked page after each call.
    pub readback: bool,
}

impl Ctx {
    /// A context with a fresh model.
    pub fn new() -> Self {
        Self {
            model: testhost::model(&rt::platform().ram),
            pfns: BTreeSet::new(),
            gfns: BTreeSet::new(),
            calls: 0,
            readback: true,
        }
    }

    /// Adds frames / guest frames to the read-back set.
    pub fn track_pfns(&mut self, pfn: u64, nr: u64) {
        self.pfns.extend(pfn..pfn + nr.min(TRACK_MAX));
    }

    /// Adds guest frames of `vm` to the read-back set.
    pub fn track_gfns(&mut self, vm: VmHandle, gfn: u64, nr: u64) {
        self.gfns
            .extend((gfn..gfn + nr.min(TRACK_MAX)).map(|g| (vm, g)));
    }

    fn track(&mut self, c: &Hypercall) {
        match *c {
            Hypercall::MemcacheTopup { pfn, nr, .. } => {
                self.track_pfns(pfn.raw(), u64::from(nr.get()))
            }
            Hypercall::VmCreate { ipa_bits, root, .. } => {
                self.track_pfns(root.raw(), u64::from(ipa_bits.root_table_pages()))
            }
            Hypercall::Share {
                vm, pfn, gfn, nr, ..
            }
            | Hypercall::Donate {
                vm, pfn, gfn, nr, ..
            }
            | Hypercall::Unshare { vm, pfn, gfn, nr }
            | Hypercall::Reclaim { vm, pfn, gfn, nr } => {
                self.track_pfns(pfn.raw(), u64::from(nr.get()));
                self.track_gfns(vm, gfn.raw(), u64::from(nr.get()));
            }
            Hypercall::WrProtect { vm, gfn, nr }
            | Hypercall::TestClearYoung { vm, gfn, nr }
            | Hypercall::UnshareRange { vm, gfn, nr } => {
                self.track_gfns(vm, gfn.raw(), u64::from(nr.get()))
            }
            Hypercall::RelaxPerms { vm, gfn, .. } => self.track_gfns(vm, gfn.raw(), 1),
            _ => {}
        }
    }

    /// Fresh frames from the pool, tracked.
    pub fn pages(&mut self, n: u64, align: u64) -> Result<u64, String> {
        let p = alloc_pages(n, align)?;
        self.track_pfns(p, n);
        Ok(p)
    }

    /// Issues `c`, checks the answer against the model (committing it), the
    /// preserved registers, the page state of every tracked page and the
    /// contents of every page that came back zeroed.
    pub fn call(&mut self, c: Hypercall) -> Result<Result<Reply, HypError>, String> {
        self.track(&c);
        let a = hv::call(&c);
        self.calls += 1;
        if !a.preserved {
            return Err(format!("{c:?} changed x8..x17 (§2.1)"));
        }
        if a.result == Err(HypError::Unknown(hv::MALFORMED)) {
            return Err(format!("{c:?}: malformed reply {:#x?}", a.regs));
        }
        // A teardown batch is followed page by page through the ABI.
        self.model
            .step_observed(&c, &a.result, &mut hv::Observer)
            .map_err(|m| m.0)?;
        self.check_state()?;
        Ok(a.result)
    }

    /// Issues `c`, which the case expects to succeed.
    pub fn ok(&mut self, c: Hypercall) -> Result<Reply, String> {
        match self.call(c)? {
            Ok(r) => Ok(r),
            Err(e) => Err(format!("{c:?} failed with {}", show(&Err(e)))),
        }
    }

    /// Issues `c`, which the case expects to fail with `want`.
    pub fn fails(&mut self, c: Hypercall, want: HypError) -> R {
        let got = self.call(c)?;
        if got != Err(want) {
            return Err(format!(
                "{c:?}: expected {}, got {}",
                show(&Err(want)),
                show(&got)
            ));
        }
        Ok(())
    }

    /// Issues raw registers that must fail with `want` and change nothing.
    pub fn raw_fails(&mut self, regs: [u64; 8], want: HypError) -> R {
        let (x0, out, preserved) = hv::raw(regs);
        self.calls += 1;
        if !preserved {
            return Err(format!("raw {regs:#x?} changed x8..x17"));
        }
        if x0 != want.to_i64() || out[1..].iter().any(|&v| v != 0) {
            return Err(format!(
                "raw call {:#x} {:#x?}: expected {} with x1..x7 zero, got x0 = {x0} x1..x7 = {:#x?}",
                regs[0],
                &regs[1..],
                want.c_name().unwrap_or("?"),
                &out[1..]
            ));
        }
        self.check_state()
    }

    /// Reads back every tracked frame and guest frame and checks zeroed pages.
    pub fn check_state(&mut self) -> R {
        for p in self.model.take_zeroed() {
            match arch::page_is_zero(p) {
                Ok(true) => {}
                Ok(false) => return Err(format!("frame {p:#x} came back to the host not zeroed")),
                Err(f) => {
                    return Err(format!(
                        "frame {p:#x} came back to the host but reading it faults ({f:x?})"
                    ))
                }
            }
        }
        if !self.readback {
            return Ok(());
        }
        for &p in &self.pfns {
            let Some(pfn) = Pfn::new(p) else { continue };
            let c = Hypercall::HostPageState { pfn };
            let got = hv::call(&c).result;
            let want = self.model.host_page(p).map(Reply::HostPage);
            if got != want {
                return Err(format!(
                    "read-back of frame {p:#x}: expected {}, got {}",
                    show(&want),
                    show(&got)
                ));
            }
        }
        for &(vm, g) in &self.gfns {
            let Some(gfn) = hypercalls::Gfn::new(g) else {
                continue;
            };
            let c = Hypercall::GuestPageState { vm, gfn };
            let got = hv::call(&c).result;
            let want = self.model.guest_page(vm, g).map(Reply::GuestPage);
            if got != want {
                return Err(format!(
                    "read-back of {vm:?} gfn {g:#x}: expected {}, got {}",
                    show(&want),
                    show(&got)
                ));
            }
        }
        Ok(())
    }

    /// Creates a VM (root pages from the pool) and tops its memcache up
    /// with `memcache` pages.
    pub fn vm(&mut self, ipa_bits: u8, nr_vcpus: u16, memcache: u32) -> Result<VmHandle, String> {
        let bits = IpaBits::new(ipa_bits).ok_or("bad ipa_bits")?;
        let n = u64::from(bits.root_table_pages());
        let root = self.pages(n, n)?;
        let vm = match self.ok(Hypercall::VmCreate {
            ipa_bits: bits,
            nr_vcpus: VcpuCount::new(nr_vcpus).ok_or("bad nr_vcpus")?,
            root: pfn(root),
            memory: None,
        })? {
            Reply::VmCreated { vm } => vm,
            r => return Err(format!("VM_CREATE replied {r:?}")),
        };
        if memcache > 0 {
            let mc = self.pages(u64::from(memcache), 1)?;
            self.ok(Hypercall::MemcacheTopup {
                vm,
                pfn: pfn(mc),
                nr: count(memcache),
            })?;
        }
        Ok(vm)
    }

    /// Tears `vm` down: start (unless dying), reclaim until done, finalize.
    pub fn destroy(&mut self, vm: VmHandle) -> R {
        if !self.model.vm(vm).map_err(|e| format!("{e:?}"))?.dying {
            self.ok(Hypercall::TeardownStart { vm })?;
        }
        for _ in 0..10_000 {
            if let Reply::Teardown(t) = self.ok(Hypercall::TeardownReclaim { vm })? {
                if !t.more {
                    self.ok(Hypercall::TeardownFinalize { vm })?;
                    return Ok(());
                }
            }
        }
        Err(format!("{vm:?}: HYP_TEARDOWN_RECLAIM never said done"))
    }

    /// Tears down every VM the model still has.
    pub fn cleanup(&mut self) -> R {
        let vms: Vec<VmHandle> = self.model.vms().iter().map(|v| v.handle).collect();
        for vm in vms {
            self.destroy(vm)?;
        }
        Ok(())
    }

    /// After a failure: best-effort raw teardown of the model's VMs, so
    /// later cases still find free VM slots.
    pub fn abandon(&mut self) {
        for v in self.model.vms() {
            let vm = v.handle;
            let _ = hv::call(&Hypercall::TeardownStart { vm });
            for _ in 0..10_000 {
                match hv::call(&Hypercall::TeardownReclaim { vm }).result {
                    Ok(Reply::Teardown(t)) if t.more => {}
                    _ => break,
                }
            }
            let _ = hv::call(&Hypercall::TeardownFinalize { vm });
        }
    }

    /// Reads counter group `g` of `vm` (checked by the model).
    pub fn counters(&mut self, vm: VmHandle, group: CounterGroup) -> Result<Reply, String> {
        self.ok(Hypercall::VmCounters { vm, group })
    }

    /// The guest page state now (checked by the model).
    pub fn guest(&mut self, vm: VmHandle, g: u64) -> Result<GuestPage, String> {
        match self.ok(Hypercall::GuestPageState { vm, gfn: gfn(g) })? {
            Reply::GuestPage(p) => Ok(p),
            r => Err(format!("GUEST_PAGE_STATE replied {r:?}")),
        }
    }
}

/// A pfn argument (test values are always < 2^40).
pub fn pfn(p: u64) -> Pfn {
    Pfn::new(p).unwrap_or(Pfn::MAX)
}

/// A gfn argument.
pub fn gfn(g: u64) -> hypercalls::Gfn {
    hypercalls::Gfn::new(g).unwrap_or(hypercalls::Gfn::MAX)
}

/// A page count (1..=512).
pub fn count(n: u32) -> PageCount {
    PageCount::new(n).unwrap_or(PageCount::ONE)
}

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> R {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// A named case.
#[derive(Debug)]
pub struct Case {
    /// The name, citing the ABI section it checks.
    pub name: &'static str,
    /// The body.
    pub run: fn(&mut Ctx) -> R,
}

/// Runs `cases` in order; returns (passed, failed).
pub fn run(cases: &[Case], passed: &mut u32, failed: &mut u32) {
    for c in cases {
        say!("CASE {}", c.name);
        let mut ctx = Ctx::new();
        let r = (c.run)(&mut ctx).and_then(|()| ctx.cleanup());
        match r {
            Ok(()) => {
                *passed += 1;
                say!("PASS {}", c.name);
            }
            Err(why) => {
                ctx.abandon();
                *failed += 1;
                let why: String = why.chars().filter(|&ch| ch != '\n' && ch != '\r').collect();
                say!("FAIL {}: {why}", c.name);
            }
        }
    }
}
