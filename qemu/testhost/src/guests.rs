//! The guest cases (`cargo xtask test guest`): the test host plays VMM
//! (`vmm.rs`) for the guest payload (`qemu/guest`) and checks what guests
//! and the host see of each other (`docs/ABI.md` §2.5, §3.7-§3.12, §4, §5).
//! Same output protocol as the conformance cases (`harness.rs`).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use guest::{Arg, Mode, Op, Reg};
use hypercalls::{
    Access, FaultKind, HypError, Hypercall, PageCount, Prot, Reply, VcpuExit, VcpuStart,
};
use spin::Mutex;

use crate::gic::Gic;
use crate::harness::{self, ensure, gfn, pfn, Case, Ctx, R};
use crate::vmm::{self, is_fault, is_fault_at, End, Event, Flow, Frames, Vm, TEST_IPA};
use crate::{arch, hv, rt, say};

/// IPA size of the test VMs.
const IPA: u8 = 40;
/// The first frame of the payload's test memory.
const TEST_GFN: u64 = TEST_IPA >> 12;
/// The payload, found at boot.
static IMAGE: Mutex<Option<&'static [u8]>> = Mutex::new(None);

fn image() -> Result<&'static [u8], String> {
    IMAGE.lock().ok_or_else(|| "no payload".into())
}

fn arg_fill(mib: u16) -> u64 {
    let mut a = Arg::new(Mode::Fill);
    a.mib = mib;
    a.encode()
}

/// The hypervisor still answers (HYP_VERSION).
fn alive() -> R {
    match hv::call(&Hypercall::Version).result {
        Ok(Reply::Version(_)) => Ok(()),
        r => Err(format!("HYP_VERSION after the guest: {r:?}")),
    }
}

/// Parses `guest: read 0x...`.
fn read_value(line: &str) -> Option<u64> {
    let v = line.strip_prefix("guest: read 0x")?;
    u64::from_str_radix(v.trim(), 16).ok()
}

// ---- one vCPU ----

fn fill_one(_: &mut Ctx) -> R {
    let vm = Vm::new(IPA, 1, 4, arg_fill(4), image()?)?;
    vm.run_to_end()?;
    let lines = vm.lines(0);
    let want = guest::expected_checksum(TEST_IPA, (4 << 20) / 8);
    let line = format!("guest: checksum {want:#018x} PASS");
    ensure(lines.contains(&line), || {
        format!("expected `{line}`, console: {lines:?}")
    })?;
    let faults = vm.faults[0].load(Ordering::SeqCst);
    ensure(faults == 1024, || {
        format!("{faults} demand faults for 4 MiB, expected 1024")
    })?;
    let c = vm.runtime()?;
    ensure(c.faults >= 1024 && c.vcpu_runs >= 1024, || {
        format!("runtime counters {c:?}")
    })
}

// ---- the "done when": 2 vCPUs, 64 MiB, two physical CPUs ----

const SMP_MIB: u16 = 64;

struct SmpJob {
    vm: Arc<Vm>,
    /// vCPU 0 is done (SYSTEM_OFF or shutdown).
    done0: AtomicBool,
    /// Per CPU: (first entry, last exit) in counter ticks, and the result.
    span: [[AtomicU64; 2]; 2],
    result: Mutex<[Option<Result<End, String>>; 2]>,
}

static SMP: Mutex<Option<Arc<SmpJob>>> = Mutex::new(None);

fn smp_cpu(cpu: usize) {
    let Some(job) = SMP.lock().clone() else {
        return;
    };
    let r = smp_serve(&job, cpu);
    if cpu == 0 {
        job.done0.store(true, Ordering::SeqCst);
    }
    let mut results = job.result.lock();
    if let Some(slot) = results.get_mut(cpu) {
        *slot = Some(r);
    }
}

fn smp_serve(job: &SmpJob, cpu: usize) -> Result<End, String> {
    let (t0, f) = arch::timer();
    let mut ran = false;
    loop {
        let r = job.vm.serve(cpu, &mut |_, ev| {
            if !ran && !matches!(ev, Event::Exit(VcpuExit::PoweredOff)) {
                ran = true;
                job.span[cpu][0].store(arch::timer().0, Ordering::SeqCst);
            }
            Flow::Default
        });
        job.span[cpu][1].store(arch::timer().0, Ordering::SeqCst);
        match r? {
            End::PoweredOff if !ran => {
                // vCPU 1 waits for vCPU 0's CPU_ON.
                if job.done0.load(Ordering::SeqCst) {
                    return Err("vCPU 0 finished and vCPU 1 never ran".into());
                }
                if arch::timer().0 - t0 > 60 * f {
                    return Err("vCPU 1 not started within 60 s".into());
                }
                for _ in 0..1000 {
                    core::hint::spin_loop();
                }
            }
            end => return Ok(end),
        }
    }
}

fn smp_64(_: &mut Ctx) -> R {
    ensure(rt::online() >= 2, || "needs 2 CPUs".into())?;
    let mut a = Arg::new(Mode::Smp);
    a.mib = SMP_MIB;
    let vm = Arc::new(Vm::new(IPA, 2, u64::from(SMP_MIB), a.encode(), image()?)?);
    let job = Arc::new(SmpJob {
        vm: vm.clone(),
        done0: AtomicBool::new(false),
        span: [const { [AtomicU64::new(0), AtomicU64::new(0)] }; 2],
        result: Mutex::new([None, None]),
    });
    *SMP.lock() = Some(job.clone());
    let (t0, f) = arch::timer();
    rt::run_on(2, smp_cpu);
    let ms = (arch::timer().0 - t0) * 1000 / f;
    *SMP.lock() = None;
    let results = job.result.lock().clone();
    let [r0, r1] = results;
    let r0 = r0.ok_or("CPU 0 did not report")??;
    let r1 = r1.ok_or("CPU 1 did not report")??;
    ensure(r0 == End::Done, || format!("vCPU 0 ended with {r0:?}"))?;
    ensure(r1 == End::PoweredOff, || {
        format!("vCPU 1 ended with {r1:?}, expected powered off (PSCI CPU_OFF)")
    })?;
    let want = guest::expected_checksum(TEST_IPA, (usize::from(SMP_MIB) << 20) / 8);
    let line = format!("guest: vcpu0: vcpu1 said 1, both halves checksum {want:#018x} PASS");
    let l0 = vm.lines(0);
    ensure(l0.contains(&line), || {
        format!("expected `{line}`, vCPU 0 console: {l0:?}")
    })?;
    let l1 = vm.lines(1);
    ensure(l1.iter().any(|l| l.ends_with(" PASS")), || {
        format!("vCPU 1 console: {l1:?}")
    })?;
    // Every page of the 64 MiB arrived through a memory-fault exit, served
    // by the CPU running the vCPU that touched it.
    let (f0, f1) = (
        vm.faults[0].load(Ordering::SeqCst),
        vm.faults[1].load(Ordering::SeqCst),
    );
    let pages = u64::from(SMP_MIB) << 8;
    ensure(f0 + f1 == pages && f0 > 0 && f1 > 0, || {
        format!("demand faults: vCPU 0 {f0}, vCPU 1 {f1}; expected {pages} in all, both > 0")
    })?;
    // Both vCPUs ran at the same time, on CPU 0 and CPU 1.
    let s = |c: usize, i: usize| job.span[c][i].load(Ordering::SeqCst);
    let overlap = s(0, 1).min(s(1, 1)).saturating_sub(s(0, 0).max(s(1, 0)));
    ensure(overlap > 0, || {
        format!(
            "the vCPUs' run intervals do not overlap: CPU 0 {}..{}, CPU 1 {}..{}",
            s(0, 0),
            s(0, 1),
            s(1, 0),
            s(1, 1)
        )
    })?;
    let c = vm.runtime()?;
    say!(
        "  smp: {SMP_MIB} MiB, faults vCPU0/CPU0 {f0}, vCPU1/CPU1 {f1}, overlap {} ms, total {ms} ms, runtime {c:?}",
        overlap * 1000 / f
    );
    ensure(c.faults >= pages, || format!("runtime counters {c:?}"))?;
    vm.destroy()
}

// ---- every kind of exit ----

/// The exits case, with the host's FP/SIMD registers set to a pattern
/// first: the guest's own FP use must never reach them (the world switch
/// saves and restores them around every run).
fn exits(_: &mut Ctx) -> R {
    let access = arch::fp_access_on();
    let mut host = arch::FpRegs::default();
    for (i, v) in host.v.iter_mut().enumerate() {
        *v = u128::from(0x4857_0000_0000_0000 ^ i as u64) << 64 | u128::from(!(i as u64));
    }
    host.fpcr = 0x0040_0000; // RMode: towards plus infinity.
    arch::fp_write(&host);
    let r = exits_run();
    let now = arch::fp_read();
    arch::fp_access_restore(access);
    r?;
    ensure(now == host, || {
        let v = (0..32).find(|&i| now.v[i] != host.v[i]);
        let v = v.map_or_else(|| "no V register".into(), |i| format!("V{i} first"));
        format!(
            "guest to host: the host's FP/SIMD registers changed ({v}; FPCR {:#x}, FPSR {:#x})",
            now.fpcr, now.fpsr
        )
    })
}

fn exits_run() -> R {
    let mut a = Arg::new(Mode::Exits);
    a.mib = 1;
    let vm = Vm::new(IPA, 1, 1, a.encode(), image()?)?;
    let mut device = [None::<u64>; 512];
    let (mut mmio, mut wfx) = (0, 0);
    let end = vm.serve(0, &mut |_, ev| match ev {
        Event::Exit(VcpuExit::Mmio {
            ipa,
            size,
            write,
            data,
        }) if (guest::MMIO_TEST_BASE..guest::MMIO_TEST_BASE + 4096).contains(ipa) => {
            mmio += 1;
            let off = ipa - guest::MMIO_TEST_BASE;
            let slot = &mut device[(off / 8) as usize];
            if *write {
                *slot = Some(*data);
                Flow::Continue
            } else {
                Flow::Read(slot.unwrap_or(guest::mmio_test_value(off)) & size.mask())
            }
        }
        Event::Exit(VcpuExit::Wfx { .. }) => {
            wfx += 1;
            Flow::Default
        }
        _ => Flow::Default,
    })?;
    let lines = vm.lines(0);
    ensure(end == End::Done, || {
        format!("ended {end:?}; console {lines:?}")
    })?;
    let fails: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("guest: FAIL"))
        .collect();
    ensure(fails.is_empty(), || format!("{fails:?}"))?;
    ensure(
        lines
            .iter()
            .any(|l| l.starts_with("guest: exits: ") && l.ends_with(" passed, 0 failed")),
        || format!("no tally: {lines:?}"),
    )?;
    ensure(mmio == 3 && wfx >= 1, || {
        format!("{mmio} MMIO exits (expected 3), {wfx} WFx exits")
    })?;
    vm.destroy()
}

// ---- 2 MiB blocks (ABI §2.8) ----

/// The block's first gfn: the payload's test memory, 2 MiB-aligned.
const BLOCK_GFN: u64 = TEST_GFN;
const _: () = assert!(BLOCK_GFN.is_multiple_of(512));

/// Shares 512 fresh 2 MiB-aligned frames at [`BLOCK_GFN`] in one call
/// (one stage-2 block); returns the first frame. The VM's memory must
/// cover the block.
fn share_block(vm: &Vm) -> Result<u64, String> {
    let p = Frames::alloc(512, 512)?;
    match vm.with_memcache(Hypercall::Share {
        vm: vm.handle,
        pfn: pfn(p),
        gfn: gfn(BLOCK_GFN),
        nr: harness::count(512),
        prot: Prot::RWX,
    })? {
        Reply::Done => Ok(p),
        r => Err(format!("HYP_SHARE of 512 pages replied {r:?}")),
    }
}

/// Every page of the block reports its own frame, `p + i`, except `hole`.
fn block_pages_mapped(vm: &Vm, p: u64, hole: Option<u64>) -> R {
    for i in 0..512 {
        let g = BLOCK_GFN + i;
        let want = (Some(g) != hole).then_some(p + i);
        let got = vm.mapped(g)?;
        ensure(got == want, || {
            format!("HYP_GUEST_PAGE_STATE of gfn {g:#x}: frame {got:x?}, expected {want:x?}")
        })?;
    }
    Ok(())
}

fn block_share(_: &mut Ctx) -> R {
    let img = image()?;
    // 1. One call shares the 2 MiB; the guest fills and checks all of it
    //    without a single memory fault, and the host sees every write.
    let mut vm = Vm::new(IPA, 1, 2, arg_fill(2), img)?;
    vm.demand = false;
    let t0 = vm.runtime()?.table_pages;
    let p = share_block(&vm)?;
    let t1 = vm.runtime()?.table_pages;
    // The root is at level 1 (40-bit IPA): a block takes at most the one
    // level-2 table; 512 pages would take a level-3 table as well.
    ensure(t1 - t0 <= 1, || {
        format!(
            "the block share took {} table pages (block: at most 1)",
            t1 - t0
        )
    })?;
    block_pages_mapped(&vm, p, None)?;
    vm.run_to_end()?;
    let lines = vm.lines(0);
    let want = guest::expected_checksum(TEST_IPA, (2 << 20) / 8);
    let line = format!("guest: checksum {want:#018x} PASS");
    ensure(lines.contains(&line), || {
        format!("expected `{line}`, console: {lines:?}")
    })?;
    let faults = vm.runtime()?.faults;
    let image_pages = (img.len() as u64).div_ceil(4096);
    ensure(faults <= image_pages, || {
        format!("{faults} stage-2 faults, at most the image's {image_pages} expected (none in the block)")
    })?;
    for i in [0, 1, 255, 256, 257, 510, 511] {
        for off in [0, 4088] {
            let v = vmm::peek_frame(p + i, off).map_err(|f| format!("{f:x?}"))?;
            let w = guest::pattern(((BLOCK_GFN + i) << 12) + off);
            ensure(v == w, || {
                format!(
                    "frame {:#x} word {off:#x}: {v:#x}, the guest wrote {w:#x}",
                    p + i
                )
            })?;
        }
    }
    vm.destroy()?;
    alive()?;

    // 2. HYP_UNSHARE of the middle page splits the block with one memcache
    //    page; the guest then faults on that page only and still reads
    //    the pages on either side.
    let g = BLOCK_GFN + 256;
    for (target, value) in [(g - 1, 0x5555_aaaa_u64), (g, 0), (g + 1, 0x7777_cccc)] {
        let mut vm = Vm::new(IPA, 1, 2, Arg::poke(Op::Read, target, 1).encode(), img)?;
        vm.demand = false;
        let p = share_block(&vm)?;
        vmm::poke_frame(p + 255, 0, 0x5555_aaaa);
        vmm::poke_frame(p + 257, 0, 0x7777_cccc);
        let m0 = vm.runtime()?.memcache_pages;
        ensure(m0 >= 1, || "no memcache page left for the split".into())?;
        match vmm::ok(Hypercall::Unshare {
            vm: vm.handle,
            pfn: pfn(p + 256),
            gfn: gfn(g),
            nr: PageCount::ONE,
        })? {
            Reply::Done => {}
            r => return Err(format!("HYP_UNSHARE of the middle page replied {r:?}")),
        }
        let m1 = vm.runtime()?.memcache_pages;
        ensure(m0 - m1 == 1, || {
            format!("the split took {} memcache pages (expected 1)", m0 - m1)
        })?;
        block_pages_mapped(&vm, p, Some(g))?;
        let end = vm.serve(0, &mut |_, ev| match ev {
            Event::Exit(e) if is_fault_at(e, target) => Flow::Stop,
            _ => Flow::Default,
        })?;
        if target == g {
            ensure(
                matches!(&end, End::Exit(e) if is_fault(e, g, Access::Read, FaultKind::Unmapped)),
                || format!("read of the unshared page {g:#x}: {end:?}"),
            )?;
        } else {
            let reads: Vec<u64> = vm.lines(0).iter().filter_map(|l| read_value(l)).collect();
            ensure(end == End::Done && reads == [value], || {
                format!("read of gfn {target:#x} next to the unshared page: {end:?}, read {reads:x?}, expected [{value:#x}]")
            })?;
        }
        vm.destroy()?;
    }
    alive()
}

// ---- isolation ----

fn beyond_shared(_: &mut Ctx) -> R {
    let img = image()?;
    // 1. Inside the VM's memory, past what the host gave: a memory fault
    //    at that frame, which the host declines.
    let g = TEST_GFN + 5;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::Read, g, 1).encode(), img)?;
    let end = vm.serve(0, &mut |_, ev| match ev {
        Event::Exit(e) if is_fault_at(e, g) => Flow::Stop,
        _ => Flow::Default,
    })?;
    ensure(
        matches!(&end, End::Exit(e) if is_fault(e, g, Access::Read, FaultKind::Unmapped)),
        || format!("read past the shared pages: {end:?}"),
    )?;
    vm.destroy()?;
    alive()?;
    // 2. Outside its memory, inside the IPA space: an MMIO exit.
    let ipa = 0x8000_0000;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::Read, ipa >> 12, 1).encode(), img)?;
    let end = vm.serve(0, &mut |_, _| Flow::Default)?;
    ensure(
        matches!(&end, End::Exit(VcpuExit::Mmio { ipa: i, write: false, .. }) if *i == ipa),
        || format!("read outside the memory: {end:?}"),
    )?;
    vm.destroy()?;
    alive()?;
    // 3. Beyond the IPA size (37 bits; the guest's stage 1 outputs 40).
    let far = 1u64 << 37;
    let vm = Vm::new(37, 1, 1, Arg::poke(Op::Read, far >> 12, 1).encode(), img)?;
    let end = vm.serve(0, &mut |_, _| Flow::Default)?;
    ensure(
        matches!(
            &end,
            End::Exit(VcpuExit::UnhandledTrap { .. }) | End::Exit(VcpuExit::Mmio { .. })
        ),
        || format!("read beyond the IPA size: {end:?}"),
    )?;
    say!("  beyond the IPA size: {end:?}");
    vm.destroy()?;
    alive()
}

fn unshare_faults_again(_: &mut Ctx) -> R {
    let g = TEST_GFN + 3;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::Read, g, 2).encode(), image()?)?;
    let pages = [Frames::alloc(1, 1)?, Frames::alloc(1, 1)?];
    vmm::poke_frame(pages[0], 0, 0x1111_aaaa);
    vmm::poke_frame(pages[1], 0, 0x2222_bbbb);
    let mut faults = 0usize;
    let mut err = None;
    let end = vm.serve(0, &mut |vm, ev| match ev {
        Event::Exit(e) if is_fault_at(e, g) => {
            if !is_fault(e, g, Access::Read, FaultKind::Unmapped) || faults >= 2 {
                return Flow::Stop;
            }
            if let Err(e) = vm.share(pages[faults], g, Prot::RW) {
                err = Some(e);
                return Flow::Stop;
            }
            faults += 1;
            Flow::Continue
        }
        Event::Line(l) if read_value(l) == Some(0x1111_aaaa) => {
            // The guest read the first page: take it away.
            if let Err(e) = vm.unshare(pages[0], g) {
                err = Some(e);
                return Flow::Stop;
            }
            Flow::Continue
        }
        _ => Flow::Default,
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    ensure(end == End::Done && faults == 2, || {
        format!("ended {end:?} after {faults} faults at gfn {g:#x}")
    })?;
    let reads: Vec<u64> = vm.lines(0).iter().filter_map(|l| read_value(l)).collect();
    ensure(reads == [0x1111_aaaa, 0x2222_bbbb], || {
        format!("guest reads {reads:x?}, expected the first page then (after unshare and a fault) the second")
    })?;
    vm.destroy()
}

fn wrprotect_write_faults(_: &mut Ctx) -> R {
    let g = TEST_GFN + 7;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::ReadWrite, g, 1).encode(), image()?)?;
    let p = Frames::alloc(1, 1)?;
    vmm::poke_frame(p, 0, 0x3333_cccc);
    vm.share(p, g, Prot::RW)?;
    match vmm::ok(Hypercall::WrProtect {
        vm: vm.handle,
        gfn: gfn(g),
        nr: harness::count(1),
    })? {
        Reply::WrProtected { pages: 1 } => {}
        r => return Err(format!("WRPROTECT replied {r:?}")),
    }
    let mut read_before_fault = None;
    let mut perm_faults = 0;
    let mut err = None;
    let end = vm.serve(0, &mut |vm, ev| match ev {
        Event::Line(l) if read_value(l).is_some() => {
            read_before_fault = Some((read_value(l), perm_faults));
            Flow::Continue
        }
        Event::Exit(e) if is_fault_at(e, g) => {
            if !is_fault(e, g, Access::Write, FaultKind::Permission) || perm_faults > 0 {
                return Flow::Stop;
            }
            perm_faults += 1;
            if let Err(e) = vm.with_memcache(Hypercall::RelaxPerms {
                vm: vm.handle,
                gfn: gfn(g),
                prot: Prot::W,
            }) {
                err = Some(e);
                return Flow::Stop;
            }
            Flow::Continue
        }
        _ => Flow::Default,
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    ensure(end == End::Done, || format!("ended {end:?}"))?;
    ensure(read_before_fault == Some((Some(0x3333_cccc), 0)), || {
        format!("read of the write-protected page: {read_before_fault:?} (value, permission faults before it)")
    })?;
    ensure(perm_faults == 1, || {
        format!("{perm_faults} write permission faults")
    })?;
    let v = vmm::peek_frame(p, 0).map_err(|f| format!("{f:x?}"))?;
    ensure(v == guest::pattern(g << 12), || {
        format!("after relax the write landed as {v:#x}")
    })?;
    vm.destroy()
}

fn writes_land(_: &mut Ctx) -> R {
    let g = TEST_GFN + 9;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::Write, g, 1).encode(), image()?)?;
    let p = Frames::alloc(1, 1)?;
    vm.share(p, g, Prot::RW)?;
    vm.run_to_end()?;
    for i in 0..512u64 {
        let v = vmm::peek_frame(p, i * 8).map_err(|f| format!("{f:x?}"))?;
        let want = guest::pattern((g << 12) + i * 8);
        ensure(v == want, || {
            format!("word {i} of the shared frame {p:#x}: {v:#x}, guest wrote {want:#x}")
        })?;
    }
    vm.destroy()
}

fn donated_invisible(_: &mut Ctx) -> R {
    let g = TEST_GFN + 11;
    let vm = Vm::new(IPA, 1, 1, Arg::poke(Op::Write, g, 1).encode(), image()?)?;
    let p = Frames::alloc(1, 1)?;
    vm.donate(p, g)?;
    vm.run_to_end()?;
    ensure(vm.lines(0).iter().any(|l| l == "guest: wrote"), || {
        format!("console {:?}", vm.lines(0))
    })?;
    for off in [0u64, 8, 0x800, 0xff8] {
        match vmm::peek_frame(p, off) {
            Ok(v) => {
                return Err(format!(
                    "host read of the donated frame {p:#x} + {off:#x} succeeded ({v:#x})"
                ))
            }
            Err(f) => ensure(f.far == (p << 12) + off, || {
                format!("abort FAR {:#x}", f.far)
            })?,
        }
    }
    vm.destroy()?;
    // Reclaimed by teardown: the host may read it again, and it is zero.
    match arch::page_is_zero(p) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the reclaimed frame still holds the guest's data".into()),
        Err(f) => Err(format!("the reclaimed frame still faults: {f:x?}")),
    }
}

// ---- the spinning guest on the other CPU ----

/// Largest number of loops the guest may make after HYP_UNSHARE returned.
const SPIN_BOUND: u64 = 2;

struct SpinJob {
    vm: Arc<Vm>,
    /// The page the guest spins on, its frame, and the counter frame.
    g: u64,
    p: u64,
    c: u64,
    /// CPU 1 is back from the vCPU.
    back: AtomicBool,
    end: Mutex<Option<Result<End, String>>>,
    /// Host side: (counter before the unshare, counter when it returned).
    host: Mutex<Option<Result<(u64, u64), String>>>,
}

static SPIN: Mutex<Option<Arc<SpinJob>>> = Mutex::new(None);

fn spin_cpu(cpu: usize) {
    let Some(job) = SPIN.lock().clone() else {
        return;
    };
    let g = job.g;
    match cpu {
        1 => {
            let r = job.vm.serve(0, &mut |_, ev| match ev {
                Event::Exit(e) if is_fault_at(e, g) => Flow::Stop,
                _ => Flow::Default,
            });
            *job.end.lock() = Some(r);
            job.back.store(true, Ordering::SeqCst);
        }
        0 => {
            let r = spin_host(&job);
            *job.host.lock() = Some(r);
        }
        _ => {}
    }
}

/// CPU 0: waits for the guest to spin, unshares the page under it.
fn spin_host(job: &SpinJob) -> Result<(u64, u64), String> {
    let counter = || vmm::peek_frame(job.c, 0).unwrap_or(0);
    let (t0, f) = arch::timer();
    while counter() < 1000 {
        if job.back.load(Ordering::SeqCst) {
            return Err("the vCPU came back before spinning".into());
        }
        if arch::timer().0 - t0 > 30 * f {
            return Err("the guest did not start spinning within 30 s".into());
        }
        core::hint::spin_loop();
    }
    // While it runs on CPU 1, the vCPU is busy for everyone else (§3.7)
    // and its VM cannot start teardown (§3.15).
    let run = job.vm.run_once(0, 0);
    let td = hv::call(&Hypercall::TeardownStart { vm: job.vm.handle }).result;
    if run != Err(HypError::Busy) || td != Err(HypError::Busy) {
        // Take the page away anyway so that CPU 1 comes back.
        let _ = job.vm.unshare(job.p, job.g);
        return Err(format!(
            "while the vCPU runs on CPU 1: VCPU_RUN from CPU 0 gave {run:?}, TEARDOWN_START {td:?}; expected EBUSY twice"
        ));
    }
    let before = counter();
    job.vm.unshare(job.p, job.g)?;
    Ok((before, counter()))
}

fn spin_sees_unshare(_: &mut Ctx) -> R {
    ensure(rt::online() >= 2, || "needs 2 CPUs".into())?;
    let g = TEST_GFN + 16;
    let vm = Arc::new(Vm::new(
        IPA,
        1,
        1,
        Arg::poke(Op::Spin, g, 27).encode(),
        image()?,
    )?);
    let (p, c) = (Frames::alloc(1, 1)?, Frames::alloc(1, 1)?);
    vm.share(p, g, Prot::RW)?;
    vm.share(c, g + 1, Prot::RW)?;
    let job = Arc::new(SpinJob {
        vm: vm.clone(),
        g,
        p,
        c,
        back: AtomicBool::new(false),
        end: Mutex::new(None),
        host: Mutex::new(None),
    });
    *SPIN.lock() = Some(job.clone());
    // CPU 1 runs the vCPU, this CPU unshares the page under it.
    rt::run_on(2, spin_cpu);
    *SPIN.lock() = None;
    let end = job.end.lock().take().ok_or("CPU 1 did not report")??;
    let (before, after_unshare) = job.host.lock().take().ok_or("CPU 0 did not report")??;
    ensure(
        matches!(&end, End::Exit(e) if is_fault(e, g, Access::Read, FaultKind::Unmapped)),
        || format!("the spinning guest ended with {end:?}"),
    )?;
    let last = vmm::peek_frame(c, 0).map_err(|f| format!("{f:x?}"))?;
    let loops = last.saturating_sub(after_unshare);
    say!(
        "  spin: counter {before} before the unshare, {after_unshare} when it returned, {last} at the fault ({loops} after)"
    );
    ensure(loops <= SPIN_BOUND, || {
        format!("the guest made {loops} loops after HYP_UNSHARE returned (bound {SPIN_BOUND})")
    })?;
    vm.destroy()
}

// ---- a vCPU moving between physical CPUs ----

const MIG_DONE: usize = 2;
const MIG_EXITS: u64 = 128;

struct MigJob {
    vm: Arc<Vm>,
    /// Whose turn it is: CPU 0, CPU 1, or MIG_DONE.
    turn: AtomicUsize,
    moves: AtomicU64,
    exits: [AtomicU64; 2],
    end: Mutex<Option<Result<End, String>>>,
}

static MIG: Mutex<Option<Arc<MigJob>>> = Mutex::new(None);

fn mig_cpu(cpu: usize) {
    if cpu > 1 {
        return;
    }
    let Some(job) = MIG.lock().clone() else {
        return;
    };
    let (t0, f) = arch::timer();
    loop {
        match job.turn.load(Ordering::SeqCst) {
            MIG_DONE => return,
            t if t != cpu => {
                if arch::timer().0 - t0 > 120 * f {
                    *job.end.lock() = Some(Err("no end within 120 s".into()));
                    job.turn.store(MIG_DONE, Ordering::SeqCst);
                    return;
                }
                core::hint::spin_loop();
                continue;
            }
            _ => {}
        }
        let mut n = 0u64;
        let r = job.vm.serve(0, &mut |_, ev| match ev {
            Event::Exit(_) => {
                n += 1;
                if n >= MIG_EXITS {
                    Flow::Stop
                } else {
                    Flow::Default
                }
            }
            Event::Line(_) => Flow::Default,
        });
        job.exits[cpu].fetch_add(n, Ordering::SeqCst);
        match r {
            // Our stop: the exit is left unserved; the other CPU runs the
            // vCPU next, which repeats the faulting access there.
            Ok(End::Exit(_)) if n >= MIG_EXITS => {
                job.moves.fetch_add(1, Ordering::SeqCst);
                job.turn.store(1 - cpu, Ordering::SeqCst);
            }
            other => {
                *job.end.lock() = Some(other);
                job.turn.store(MIG_DONE, Ordering::SeqCst);
                return;
            }
        }
    }
}

fn migrate(_: &mut Ctx) -> R {
    ensure(rt::online() >= 2, || "needs 2 CPUs".into())?;
    let vm = Arc::new(Vm::new(IPA, 1, 8, arg_fill(8), image()?)?);
    let job = Arc::new(MigJob {
        vm: vm.clone(),
        turn: AtomicUsize::new(0),
        moves: AtomicU64::new(0),
        exits: [AtomicU64::new(0), AtomicU64::new(0)],
        end: Mutex::new(None),
    });
    *MIG.lock() = Some(job.clone());
    rt::run_on(2, mig_cpu);
    *MIG.lock() = None;
    let end = job.end.lock().take().ok_or("no result")??;
    let lines = vm.lines(0);
    ensure(end == End::Done, || {
        format!("ended {end:?}; console {lines:?}")
    })?;
    let want = guest::expected_checksum(TEST_IPA, (8 << 20) / 8);
    let line = format!("guest: checksum {want:#018x} PASS");
    ensure(lines.contains(&line), || {
        format!("expected `{line}`, console: {lines:?}")
    })?;
    let moves = job.moves.load(Ordering::SeqCst);
    let (e0, e1) = (
        job.exits[0].load(Ordering::SeqCst),
        job.exits[1].load(Ordering::SeqCst),
    );
    say!("  migrate: {moves} moves, exits on CPU 0 {e0}, on CPU 1 {e1}");
    ensure(moves >= 8 && e0 > 0 && e1 > 0, || {
        format!("{moves} moves, exits {e0} / {e1}")
    })?;
    vm.destroy()
}

// ---- two vCPUs taking turns ----

/// Who runs what in [`take_turns`]: (physical CPU, vCPU, console lines).
/// vCPU 0 starts here, moves to CPU 1 and back; vCPU 1 runs here where
/// vCPU 0 ran last (the hypervisor flushes this CPU's EL1 TLB entries of
/// the VMID first), then moves to CPU 1 where vCPU 0 ran last.
const TURNS: [(usize, usize, usize); 5] = [(0, 0, 2), (1, 0, 1), (0, 1, 2), (0, 0, 1), (1, 1, 1)];

struct TurnJob {
    vm: Arc<Vm>,
    /// The next entry of [`TURNS`] (`TURNS.len()`: done).
    step: AtomicUsize,
    error: Mutex<Option<String>>,
}

static TURN: Mutex<Option<Arc<TurnJob>>> = Mutex::new(None);

fn turn_cpu(cpu: usize) {
    let Some(job) = TURN.lock().clone() else {
        return;
    };
    let (t0, f) = arch::timer();
    loop {
        let step = job.step.load(Ordering::SeqCst);
        let Some(&(on, vcpu, lines)) = TURNS.get(step) else {
            return;
        };
        if on != cpu {
            if arch::timer().0 - t0 > 120 * f {
                *job.error.lock() = Some(format!("step {step} not done within 120 s"));
                job.step.store(TURNS.len(), Ordering::SeqCst);
                return;
            }
            core::hint::spin_loop();
            continue;
        }
        let mut seen = 0;
        let r = job.vm.serve(vcpu, &mut |_, ev| match ev {
            Event::Line(l) if l.contains("passes") => {
                seen += 1;
                if seen >= lines {
                    Flow::Stop
                } else {
                    Flow::Default
                }
            }
            _ => Flow::Default,
        });
        if !matches!(r, Ok(End::Line(_))) {
            *job.error.lock() = Some(format!("step {step}: vCPU {vcpu} on CPU {cpu} ended {r:?}"));
            job.step.store(TURNS.len(), Ordering::SeqCst);
            return;
        }
        job.step.store(step + 1, Ordering::SeqCst);
    }
}

/// The pass counts a vCPU reported, in order.
fn pass_counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.rsplit_once("passes ").and_then(|(_, n)| n.parse().ok()))
        .collect()
}

fn take_turns(_: &mut Ctx) -> R {
    ensure(rt::online() >= 2, || "needs 2 CPUs".into())?;
    let img = image()?;
    let entry1 = vmm::secondary_entry(img).ok_or("the payload has no secondary entry")?;
    let mut a = Arg::new(Mode::Touch);
    a.mib = 1;
    a.passes_log2 = 2;
    let arg = a.encode();
    // vCPU 1 touches its own MiB after vCPU 0's.
    let start = |i: u16| match i {
        0 => VcpuStart::On {
            entry: vmm::IMAGE_IPA,
            arg,
        },
        _ => VcpuStart::On {
            entry: entry1,
            arg: u64::from(i),
        },
    };
    let vm = Arc::new(Vm::with_starts(IPA, 2, 2, &start, img)?);
    let job = Arc::new(TurnJob {
        vm: vm.clone(),
        step: AtomicUsize::new(0),
        error: Mutex::new(None),
    });
    *TURN.lock() = Some(job.clone());
    rt::run_on(2, turn_cpu);
    *TURN.lock() = None;
    if let Some(e) = job.error.lock().take() {
        return Err(format!(
            "{e}; console {:?} / {:?}",
            vm.lines(0),
            vm.lines(1)
        ));
    }
    for v in 0..2 {
        let counts = pass_counts(&vm.lines(v));
        let want: usize = TURNS.iter().filter(|t| t.1 == v).map(|t| t.2).sum();
        say!("  take turns: vCPU {v} pass counts {counts:?}");
        ensure(
            counts.len() == want && counts.windows(2).all(|w| w[0] < w[1]),
            || format!("vCPU {v}: pass counts {counts:?} do not grow over {want} reports"),
        )?;
    }
    vm.destroy()
}

// ---- two VMs ----

fn two_vms(_: &mut Ctx) -> R {
    let img = image()?;
    let g = TEST_GFN + 20;
    // VM A owns a donated page at g and fills it.
    let a = Vm::new(IPA, 1, 1, Arg::poke(Op::Write, g, 1).encode(), img)?;
    let pa = Frames::alloc(1, 1)?;
    a.donate(pa, g)?;
    a.run_to_end()?;
    // VM B reads the same IPA: it faults (nothing of A's is mapped in B),
    // A's frame cannot be shared or donated to B, a fresh page reads zero.
    let b = Vm::new(IPA, 1, 1, Arg::poke(Op::Read, g, 1).encode(), img)?;
    let mut refused = Vec::new();
    let mut err = None;
    let end = b.serve(0, &mut |b, ev| match ev {
        Event::Exit(e) if is_fault_at(e, g) => {
            for c in [
                Hypercall::Share {
                    vm: b.handle,
                    pfn: pfn(pa),
                    gfn: gfn(g),
                    nr: harness::count(1),
                    prot: Prot::RW,
                },
                Hypercall::Donate {
                    vm: b.handle,
                    pfn: pfn(pa),
                    gfn: gfn(g),
                    nr: harness::count(1),
                    prot: Prot::RW,
                },
            ] {
                refused.push(b.try_call(c));
            }
            match Frames::alloc(1, 1).and_then(|p| b.share(p, g, Prot::RW)) {
                Ok(()) => Flow::Continue,
                Err(e) => {
                    err = Some(e);
                    Flow::Stop
                }
            }
        }
        _ => Flow::Default,
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    ensure(end == End::Done, || format!("VM B ended {end:?}"))?;
    ensure(
        refused == [Err(HypError::Denied), Err(HypError::Denied)],
        || format!("sharing / donating VM A's frame to VM B: {refused:?}, expected EACCES twice"),
    )?;
    let reads: Vec<u64> = b.lines(0).iter().filter_map(|l| read_value(l)).collect();
    ensure(reads == [0], || {
        format!(
            "VM B read {reads:x?} at the IPA where VM A wrote {:#x}",
            guest::pattern(g << 12)
        )
    })?;
    // And B's mapping is B's: A's gfn still maps A's frame.
    ensure(a.mapped(g)? == Some(pa), || "VM A's page moved".into())?;
    b.destroy()?;
    a.destroy()
}

// ---- registers a guest reaches without a trap (docs/DESIGN.md §8) ----

/// The registers of [`Reg`] this CPU has.
fn present_regs() -> Vec<Reg> {
    Reg::ALL
        .into_iter()
        .filter(|r| arch::has(r.needs()))
        .collect()
}

/// The host sets a value of its own in these (software thread ids); the
/// rest (its GIC CPU interface, DISR_EL1) it only watches.
fn host_sets(r: Reg) -> bool {
    matches!(
        r,
        Reg::TpidrEl0 | Reg::TpidrroEl0 | Reg::Contextidr | Reg::Tpidr2
    )
}

/// Register values, in [`Reg::ALL`] order.
type Values = Vec<(Reg, u64)>;

/// The host's values of `regs` now.
fn host_values(regs: &[Reg]) -> Values {
    regs.iter()
        .map(|&r| (r, arch::reg_read(r) & r.mask()))
        .collect()
}

/// Runs a fresh one-vCPU VM in [`Mode::Regs`] on this CPU to its end:
/// what the guest reported before writing its sentinels, and the host's
/// values while the guest's sentinels were in its vCPU.
fn regs_vm(regs: &[Reg]) -> Result<(Values, Values), String> {
    let vm = Vm::new(IPA, 1, 1, Arg::new(Mode::Regs).encode(), image()?)?;
    let mut seen = None;
    let end = vm.serve(0, &mut |_, ev| {
        if let Event::Line("guest: regs written") = ev {
            seen = Some(host_values(regs));
        }
        Flow::Default
    })?;
    let lines = vm.lines(0);
    ensure(end == End::Done, || format!("ended {end:?}: {lines:?}"))?;
    ensure(
        lines.iter().any(|l| l == "guest: regs kept, 0 changed"),
        || format!("guest to guest: its own values did not survive its exits: {lines:?}"),
    )?;
    let fresh = lines.iter().filter_map(|l| Reg::parse_report(l)).collect();
    vm.destroy()?;
    Ok((fresh, seen.ok_or("no `regs written` line")?))
}

/// Checks what a fresh vCPU reported: every present register, each at its
/// fresh value (ABI §3.6), the binary points as `reference` saw them.
fn check_fresh(
    who: &str,
    regs: &[Reg],
    fresh: &[(Reg, u64)],
    reference: Option<&[(Reg, u64)]>,
) -> R {
    let names: Vec<Reg> = fresh.iter().map(|&(r, _)| r).collect();
    ensure(names == regs, || {
        format!("{who}: reported {names:?}, expected {regs:?}")
    })?;
    for &(r, v) in fresh {
        let v = v & r.mask();
        let ok = match r.fresh() {
            Some(want) => v == want,
            None => {
                v != r.sentinel()
                    && reference
                        .is_none_or(|refs| refs.iter().any(|&(q, w)| q == r && w & r.mask() == v))
            }
        };
        ensure(ok, || {
            format!(
                "{who}: a fresh vCPU reads {} = {v:#x} (expected {:#x?}; the sentinel is {:#x})",
                r.name(),
                r.fresh(),
                r.sentinel()
            )
        })?;
    }
    Ok(())
}

/// Registers a guest must not reach trap: each probe of [`guest::Probe`]
/// the CPU has ends its VM with an unhandled-trap exit of the probe's
/// class, and the guest never reports the value.
fn trapped_registers(_: &mut Ctx) -> R {
    let mut tried = Vec::new();
    for p in guest::Probe::ALL {
        if !arch::has(p.needs()) {
            continue;
        }
        let mut a = Arg::new(Mode::Probe);
        a.mib = p as u16;
        let vm = Vm::new(IPA, 1, 1, a.encode(), image()?)?;
        let end = vm.serve(0, &mut |_, _| Flow::Default)?;
        let lines = vm.lines(0);
        vm.destroy()?;
        let trapped = matches!(
            end,
            End::Exit(VcpuExit::UnhandledTrap { esr, .. }) if esr >> 26 == p.trap_class()
        );
        ensure(
            trapped && !lines.iter().any(|l| l.contains("allowed")),
            || format!("probe {p:?}: ended {end:?}, console {lines:?}"),
        )?;
        tried.push(p);
    }
    say!("  trapped: {tried:?}");
    Ok(())
}

fn registers(_: &mut Ctx) -> R {
    let regs = present_regs();
    let saved: Vec<(Reg, u64)> = regs.iter().map(|&r| (r, arch::reg_read(r))).collect();
    for &r in regs.iter().filter(|&&r| host_sets(r)) {
        // The host's own value: not zero, not the guest's sentinel.
        arch::reg_write(r, (r.sentinel() ^ 0x4857_0000_0000_4857) & r.mask());
    }
    let host = host_values(&regs);
    let result = (|| {
        // Host to guest: a fresh vCPU sees none of the host's values.
        let (fresh_a, seen_a) = regs_vm(&regs)?;
        check_fresh("host to guest (VM A)", &regs, &fresh_a, None)?;
        // Guest to host: while VM A's sentinels are live, and after.
        ensure(seen_a == host, || {
            format!("guest to host: the host's registers were {seen_a:x?} while VM A ran, expected {host:x?}")
        })?;
        let after = host_values(&regs);
        ensure(after == host, || {
            format!("guest to host: after VM A, the host's registers are {after:x?}, expected {host:x?}")
        })?;
        // VM to VM on the same physical CPU: VM B's fresh vCPU sees what
        // VM A's did, not VM A's sentinels.
        let (fresh_b, seen_b) = regs_vm(&regs)?;
        check_fresh(
            "VM to VM (VM B after VM A)",
            &regs,
            &fresh_b,
            Some(&fresh_a),
        )?;
        ensure(seen_b == host, || {
            format!("guest to host (VM B): {seen_b:x?}")
        })?;
        Ok(())
    })();
    for &(r, v) in saved.iter().filter(|&&(r, _)| host_sets(r)) {
        arch::reg_write(r, v);
    }
    let names: Vec<&str> = regs.iter().map(|r| r.name()).collect();
    say!("  registers checked: {}", names.join(" "));
    result
}

// ---- hostile guest calls ----

fn hostile(_: &mut Ctx) -> R {
    let vm = Vm::new(IPA, 1, 1, Arg::new(Mode::Hostile).encode(), image()?)?;
    let mut requests = 0;
    let end = vm.serve(0, &mut |_, ev| {
        if let Event::Exit(VcpuExit::ShareRequest { .. } | VcpuExit::UnshareRequest { .. }) = ev {
            requests += 1;
        }
        Flow::Default
    })?;
    ensure(end == End::Done, || format!("ended {end:?}"))?;
    alive()?;
    let lines = vm.lines(0);
    let fails: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("guest: FAIL"))
        .collect();
    ensure(fails.is_empty(), || format!("{fails:?}"))?;
    ensure(
        lines
            .iter()
            .any(|l| l.starts_with("guest: hostile: ") && l.ends_with(" passed, 0 failed")),
        || format!("no tally: {lines:?}"),
    )?;
    say!("  hostile: {requests} share/unshare requests reached the host");
    vm.destroy()?;
    // A fresh guest still runs.
    let vm = Vm::new(IPA, 1, 1, arg_fill(1), image()?)?;
    vm.run_to_end()?;
    vm.destroy()
}

// ---- the host's timer ends a guest run ----

/// The EL2 physical timer's PPI, which carries the host's deadline while a
/// guest runs (el2 `arch::vcpu::HYP_TIMER_PPI`).
const HYP_TIMER_PPI: u32 = 26;
/// The host's deadline, set again at every exit before the interrupt, so
/// that it can only expire during a long run: the guest's spin.
const TIMER_MS: u64 = 20;
/// Bound on the INTERRUPTED exit's lateness after the deadline.
const IRQ_LATE_MS: u64 = 2000;
/// Bound on the exits before it (the payload's pages fault in first).
const IRQ_EXITS: u64 = 64;
/// log2 of the guest's spin loops: it outlasts [`TIMER_MS`] many times.
const IRQ_SPIN_LOG2: u8 = 25;

/// What the INTERRUPTED exit came with.
struct Hit {
    /// Exits before it.
    exits: u64,
    /// Virtual count at the exit minus the deadline (ticks, signed).
    late: i64,
    /// The guest's loop counter then.
    counter: u64,
    /// PPI 26 enabled at this CPU's redistributor then (el2's doing).
    ppi_enabled: bool,
}

fn host_timer_interrupts(_: &mut Ctx) -> R {
    let gic = Gic::init(HYP_TIMER_PPI)?;
    let r = timer_case(&gic);
    arch::vtimer_off();
    gic.off(HYP_TIMER_PPI);
    r
}

fn timer_case(gic: &Gic) -> R {
    let g = TEST_GFN + 24;
    let limit = 1u64 << IRQ_SPIN_LOG2;
    let vm = Vm::new(
        IPA,
        1,
        1,
        Arg::poke(Op::Spin, g, IRQ_SPIN_LOG2).encode(),
        image()?,
    )?;
    let (p, c) = (Frames::alloc(1, 1)?, Frames::alloc(1, 1)?);
    vm.share(p, g, Prot::RW)?;
    vm.share(c, g + 1, Prot::RW)?;
    // Nobody enabled PPI 26: el2 must, for the run.
    ensure(!gic.enabled(HYP_TIMER_PPI), || {
        "PPI 26 enabled before the case".into()
    })?;
    let before = vm.runtime()?;
    let f = arch::timer().1;
    let ticks = TIMER_MS * f / 1000;
    let mut cval = arch::vcount() + ticks;
    arch::vtimer_arm(cval);
    let mut exits = 0u64;
    let mut hit: Option<Hit> = None;
    // INTERRUPTED exits after the timer was disarmed.
    let mut after = 0u64;
    let end = vm.serve(0, &mut |_, ev| {
        if hit.is_some() {
            if let Event::Exit(VcpuExit::Interrupted) = ev {
                after += 1;
            }
            return Flow::Default;
        }
        exits += 1;
        if let Event::Exit(VcpuExit::Interrupted) = ev {
            let now = arch::vcount();
            arch::vtimer_off();
            hit = Some(Hit {
                exits,
                late: now.wrapping_sub(cval) as i64,
                counter: vmm::peek_frame(c, 0).unwrap_or(u64::MAX),
                ppi_enabled: gic.enabled(HYP_TIMER_PPI),
            });
            // Resume the guest, with the host's timer off.
            return Flow::Continue;
        }
        cval = arch::vcount() + ticks;
        arch::vtimer_arm(cval);
        Flow::Default
    });
    arch::vtimer_off();
    let end = end?;
    let counter = vmm::peek_frame(c, 0).map_err(|f| format!("{f:x?}"))?;
    let hit = hit.ok_or_else(|| {
        format!(
            "no INTERRUPTED exit: the guest spun {counter} of {limit} loops to its end ({end:?}) with the host's timer armed {TIMER_MS} ms ahead"
        )
    })?;
    let after_c = vm.runtime()?;
    say!(
        "  timer: INTERRUPTED after {} exits, {} us past the deadline, guest counter {} then (PPI 26 enabled: {}); {after} INTERRUPTED exits after disarming, counter {counter} at the end; runtime {after_c:?}",
        hit.exits,
        hit.late.max(0) as u64 * 1_000_000 / f,
        hit.counter,
        hit.ppi_enabled
    );
    ensure(hit.exits <= IRQ_EXITS, || {
        format!("INTERRUPTED only after {} exits", hit.exits)
    })?;
    ensure(
        hit.late >= 0 && (hit.late as u64) <= IRQ_LATE_MS * f / 1000,
        || {
            format!(
                "INTERRUPTED {} ticks from the deadline (bound 0..{IRQ_LATE_MS} ms)",
                hit.late
            )
        },
    )?;
    // Before the spin finished. The counter may still be 0: on a loaded
    // machine the deadline can pass between the last page-fault exit and
    // the guest's first store of its counter; the run was still ended by
    // the interrupt (the exit reason and the IRQ-exit counter say so).
    ensure(hit.counter < limit, || {
        format!(
            "the guest's counter was {:#x} at the INTERRUPTED exit: the spin had already ended",
            hit.counter
        )
    })?;
    // Resumed where it was, and finished cleanly.
    let line = format!("guest: spin ended after {limit}");
    let lines = vm.lines(0);
    ensure(
        end == End::Done && lines.contains(&line) && counter == limit,
        || format!("after the interrupt: ended {end:?}, counter {counter}, console {lines:?}"),
    )?;
    ensure(after == 0, || {
        format!("{after} INTERRUPTED exits with the host's timer off")
    })?;
    let irqs = after_c.irq_exits - before.irq_exits;
    ensure(irqs == 1, || {
        format!("runtime counters: {irqs} runs ended by an interrupt, expected 1")
    })?;
    alive()?;
    vm.destroy()
}

/// Every guest case.
pub const CASES: &[Case] = &[
    Case { name: "§3.7 guest: one vCPU fills 4 MiB, each page by a memory-fault exit; checksum right", run: fill_one },
    Case { name: "§3.7 guest: 2 vCPUs on 2 physical CPUs at once, 64 MiB demand-faulted, checksums right", run: smp_64 },
    Case { name: "§5 guest: every kind of exit (guest calls, PSCI, MMIO emulated by the host, WFI), FP/SIMD and EL1 state kept; the host's FP/SIMD registers untouched", run: exits },
    Case { name: "§5 guest: access past the shared pages (memory fault), outside memory (MMIO), beyond the IPA size (trap) exit; the hypervisor still answers", run: beyond_shared },
    Case { name: "§3.9 guest: after unshare, a guest access faults again", run: unshare_faults_again },
    Case { name: "§3.12 guest: after write-protect a read works, a write takes a permission fault; relax lets it through", run: wrprotect_write_faults },
    Case { name: "§3.8 guest: guest writes land in the host's shared page", run: writes_land },
    Case { name: "§2.8 guest: a 2 MiB block shared in one call: the guest writes and checks all of it without a fault, the host sees the writes, every page reports its frame; unsharing the middle page splits the block with one memcache page, the guest faults on that page only and still reads its neighbours", run: block_share },
    Case { name: "§3.10 guest: a donated page the guest wrote is invisible to the host (abort), zero after teardown", run: donated_invisible },
    Case { name: "§3.9 guest: a guest spinning on another CPU sees the unshare within 2 loops; meanwhile its vCPU and VM are EBUSY (§3.7, §3.15)", run: spin_sees_unshare },
    Case { name: "§3.7 guest: a vCPU moved between two physical CPUs every 128 exits fills 8 MiB, checksum right", run: migrate },
    Case { name: "§3.7 guest: two vCPUs of one VM in touch mode take turns on one physical CPU and move between two: each one's pass count keeps growing", run: take_turns },
    Case { name: "§2.5 guest: two VMs cannot reach each other's memory", run: two_vms },
    Case { name: "§3.6 guest: registers a guest reaches without a trap (thread ids, TPIDR2, GIC CPU interface, DISR) never carry another party's value: host to guest, guest to host, VM to VM; a vCPU keeps its own", run: registers },
    Case { name: "§3.6 guest: registers a guest must not reach trap (PMU, debug, SVE, physical timer, ACTLR, LORegions, RAS error records: each present one ends the run as an unhandled trap)", run: trapped_registers },
    Case { name: "§4 guest: hostile guest call arguments fail as the ABI says and never hurt the hypervisor", run: hostile },
    Case { name: "§5 guest: the host's timer interrupt ends a guest run (INTERRUPTED), the guest resumes and finishes", run: host_timer_interrupts },
];

/// Whether a payload is loaded (the test host then runs the guest cases).
pub fn present() -> bool {
    vmm::payload().is_some()
}

/// Runs the guest cases (or the benchmark); returns (passed, failed).
pub fn run_all() -> (u32, u32) {
    let Some(img) = vmm::payload() else {
        say!("FAIL guest payload: none at {:#x}", vmm::PAYLOAD_ADDR);
        return (0, 1);
    };
    *IMAGE.lock() = Some(img);
    say!(
        "testhost: guest payload of {} bytes at {:#x}",
        img.len(),
        vmm::PAYLOAD_ADDR
    );
    if let Err(e) = Frames::check() {
        say!("FAIL guest frame pool: {e}");
        return (0, 1);
    }
    let (mut passed, mut failed) = (0, 0);
    if vmm::bench_requested() {
        crate::bench::run(&mut passed, &mut failed);
        return (passed, failed);
    }
    for case in CASES {
        let before = failed;
        harness::run(core::slice::from_ref(case), &mut passed, &mut failed);
        if failed == before {
            // Every VM of the case is gone: its frames are the host's again.
            Frames::reset();
        }
    }
    (passed, failed)
}
