//! The conformance cases. Each name cites the `docs/ABI.md` section it
//! checks; every call inside is also checked against the model and followed
//! by a read-back of every page the case used (see `harness`).

use alloc::format;

use hypercalls::{
    AbiVersion, Access, CounterGroup, FaultKind, HostFunction, HypError, Hypercall, Prot, Reply,
    VcpuExit, VcpuIndex, VmHandle,
};

use crate::arch;
use crate::harness::{self, count, ensure, gfn, pfn, Case, Ctx, R};
use crate::random;

use HypError::*;

const IPA: u8 = 40;
const MC: u32 = 16;

fn share(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Share {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
        prot: Prot::RW,
    }
}
fn unshare(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Unshare {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
    }
}
fn donate(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Donate {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
        prot: Prot::RW,
    }
}
fn reclaim(vm: VmHandle, p: u64, g: u64, n: u32) -> Hypercall {
    Hypercall::Reclaim {
        vm,
        pfn: pfn(p),
        gfn: gfn(g),
        nr: count(n),
    }
}
fn topup(vm: VmHandle, p: u64, n: u32) -> Hypercall {
    Hypercall::MemcacheTopup {
        vm,
        pfn: pfn(p),
        nr: count(n),
    }
}
fn id(f: HostFunction) -> u64 {
    u64::from(f.id())
}
/// A well-formed handle no test VM has (slot 0x7fff).
fn ghost() -> VmHandle {
    VmHandle::new(0x7fff, 0x7fff).unwrap_or(VmHandle::new(1, 1).expect("valid"))
}
/// A handle of a VM that was live and is finalized now.
fn stale(c: &mut Ctx) -> Result<VmHandle, alloc::string::String> {
    let vm = c.vm(IPA, 1, 0)?;
    c.destroy(vm)?;
    Ok(vm)
}

// ---- §3.1, §3.2, §2.1, §2.4: the calls served since issue 3 ----

fn version(c: &mut Ctx) -> R {
    let r = c.ok(Hypercall::Version)?;
    ensure(r == Reply::Version(AbiVersion::CURRENT), || {
        format!("{r:?}")
    })
}
fn version_reserved(c: &mut Ctx) -> R {
    for reg in 1..8 {
        let mut regs = Hypercall::Version.encode();
        regs[reg] = 1 << (reg * 7);
        c.raw_fails(regs, InvalidArgument)?;
    }
    Ok(())
}
fn features_all(c: &mut Ctx) -> R {
    for f in HostFunction::ALL {
        let r = c.ok(Hypercall::Features { func: f.id() })?;
        ensure(r == Reply::Features { supported: true }, || {
            format!(
                "HYP_FEATURES says {} ({}) is not implemented",
                f.name(),
                f.doc_section()
            )
        })?;
    }
    Ok(())
}
fn features_unknown(c: &mut Ctx) -> R {
    for func in [0xc600_00ff, 0xc600_0100, 0xc600_0104, 0x8400_0000, 0] {
        let r = c.ok(Hypercall::Features { func })?;
        ensure(r == Reply::Features { supported: false }, || {
            format!("{func:#x}: {r:?}")
        })?;
    }
    Ok(())
}
fn unknown_ids(c: &mut Ctx) -> R {
    for x0 in [
        0xc600_00ff,
        0xc600_0100,
        0xc600_0101,
        0xc600_ffff,
        0x1_c600_0000,
    ] {
        c.raw_fails([x0, 0, 0, 0, 0, 0, 0, 0], NotSupported)?;
    }
    Ok(())
}

// ---- §3.8 share / §3.9 unshare ----

fn share_owned(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(vm, p, 0x100, 2))?;
    // The host keeps its access (§3.8).
    arch::probe_write(p << 12, 0x1234)
        .map_err(|f| format!("host write to a shared page faulted: {f:x?}"))?;
    let v = arch::probe_read(p << 12)
        .map_err(|f| format!("host read of a shared page faulted: {f:x?}"))?;
    ensure(v == 0x1234, || format!("shared page reads {v:#x}"))
}
fn share_twice_other_gfn(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(share(vm, p, 0x200, 1))?;
    c.ok(unshare(vm, p, 0x100, 1))?;
    c.ok(unshare(vm, p, 0x200, 1))?;
    Ok(())
}
fn share_two_vms(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let b = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(share(a, p, 0x100, 1))?;
    c.ok(share(b, p, 0x100, 1))?;
    c.ok(unshare(a, p, 0x100, 1))?;
    Ok(())
}
fn share_same_gfn(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.fails(share(vm, p, 0x100, 1), Exists)?;
    c.fails(share(vm, p + 1, 0x100, 1), Exists)
}
fn share_donated(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let b = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(a, p, 0x100, 1))?;
    c.fails(share(b, p, 0x100, 1), Denied)?;
    c.fails(share(a, p, 0x101, 1), Denied)
}
fn share_memcache(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(topup(vm, p, 1))?;
    c.fails(share(vm, p, 0x100, 1), Denied)
}
fn share_hyp_memory(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    c.track_pfns(0x40000, 1);
    c.track_pfns(0x41fff, 1);
    c.fails(share(vm, 0x40000, 0x100, 1), Denied)?;
    c.fails(share(vm, 0x41fff, 0x100, 2), Denied)?;
    c.fails(donate(vm, 0x40080, 0x100, 1), Denied)?;
    c.fails(topup(vm, 0x40100, 1), Denied)
}
fn unshare_last(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(4, 1)?;
    c.ok(share(vm, p, 0x100, 4))?;
    c.ok(unshare(vm, p, 0x100, 4))?;
    Ok(())
}
fn unshare_twice(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(unshare(vm, p, 0x100, 1))?;
    c.call(unshare(vm, p, 0x100, 1))?
        .err()
        .ok_or("second unshare succeeded")?;
    Ok(())
}
fn unshare_other_pfn(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(share(vm, p + 1, 0x101, 1))?;
    c.fails(unshare(vm, p + 1, 0x100, 1), Denied)
}
fn unshare_donated(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(vm, p, 0x100, 1))?;
    c.fails(unshare(vm, p, 0x100, 1), Denied)
}
fn unshare_unmapped(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    // The gfn maps nothing; the frame is shared elsewhere: only ENOENT fits.
    c.fails(unshare(vm, p, 0x300, 1), NoEntry)
}

// ---- §3.10 donate / §3.11 reclaim ----

fn donate_owned(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(3, 1)?;
    c.ok(donate(vm, p, 0x100, 3))?;
    Ok(())
}
fn donate_shared(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.fails(donate(vm, p, 0x200, 1), Denied)
}
fn donate_twice(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let b = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(a, p, 0x100, 1))?;
    c.fails(donate(b, p, 0x100, 1), Denied)?;
    c.fails(donate(a, p, 0x200, 1), Denied)
}
fn donate_mapped_gfn(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.fails(donate(vm, p + 1, 0x100, 1), Exists)
}
fn donate_memcache(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let b = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(topup(a, p, 1))?;
    c.fails(donate(b, p, 0x100, 1), Denied)?;
    c.fails(topup(b, p, 1), Denied)
}
fn reclaim_donated(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(donate(vm, p, 0x100, 2))?;
    c.ok(reclaim(vm, p, 0x100, 2))?;
    Ok(())
}
fn reclaim_twice(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(vm, p, 0x100, 1))?;
    c.ok(reclaim(vm, p, 0x100, 1))?;
    c.call(reclaim(vm, p, 0x100, 1))?
        .err()
        .ok_or("second reclaim succeeded")?;
    Ok(())
}
fn reclaim_shared(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.fails(reclaim(vm, p, 0x100, 1), Denied)
}
fn reclaim_wrong_pfn(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(donate(vm, p, 0x100, 1))?;
    c.ok(donate(vm, p + 1, 0x101, 1))?;
    c.fails(reclaim(vm, p + 1, 0x100, 1), Denied)
}
fn reclaim_other_vm(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let b = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(a, p, 0x100, 1))?;
    c.call(reclaim(b, p, 0x100, 1))?
        .err()
        .ok_or("VM b reclaimed VM a's page")?;
    Ok(())
}

// ---- §3.3 - §3.5, §2.7: memcache and VM creation ----

fn topup_and_reclaim(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, 0)?;
    let p = c.pages(8, 1)?;
    for i in 0..8 {
        arch::fill_page(p + i, 0xa5a5_0000 + i).map_err(|f| format!("{f:x?}"))?;
    }
    c.ok(topup(vm, p, 8))?;
    // Every page is free: min(6, 8) come back zeroed (the harness checks the
    // contents of every frame the model says was returned), then 2, then 0.
    c.ok(Hypercall::MemcacheReclaim { vm })?;
    c.ok(Hypercall::MemcacheReclaim { vm })?;
    let r = c.ok(Hypercall::MemcacheReclaim { vm })?;
    ensure(
        matches!(r, Reply::MemcacheReclaimed(p) if p.as_slice().is_empty()),
        || format!("{r:?}"),
    )
}
fn topup_bad_pages(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    c.ok(share(a, p, 0x100, 1))?;
    c.fails(topup(a, p, 1), Denied)?;
    c.ok(donate(a, p + 1, 0x101, 1))?;
    c.fails(topup(a, p + 1, 1), Denied)
}
fn create_root(c: &mut Ctx) -> R {
    let a = c.vm(IPA, 1, MC)?;
    let root = c.pages(2, 2)?;
    c.ok(share(a, root, 0x100, 1))?;
    let call = |r| Hypercall::VmCreate {
        ipa_bits: hypercalls::IpaBits::new(IPA).expect("valid"),
        nr_vcpus: hypercalls::VcpuCount::new(1).expect("valid"),
        root: pfn(r),
        memory: None,
    };
    c.fails(call(root), Denied)?;
    c.ok(unshare(a, root, 0x100, 1))?;
    let b = match c.ok(call(root))? {
        Reply::VmCreated { vm } => vm,
        r => return Err(format!("{r:?}")),
    };
    ensure(b != a, || "two live VMs share a handle".into())?;
    c.fails(call(root), Denied)
}
fn create_misaligned(c: &mut Ctx) -> R {
    // 32-bit IPA: 4 concatenated root pages, so the root must be 4-aligned.
    let root = c.pages(5, 4)? + 1;
    c.raw_fails(
        [id(HostFunction::VmCreate), 32, 1, root, 0, 0, 0, 0],
        InvalidArgument,
    )
}
fn no_memcache(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 2, 0)?;
    let p = c.pages(2, 1)?;
    c.fails(share(vm, p, 0x100, 1), NoMemory)?;
    c.fails(donate(vm, p + 1, 0x101, 1), NoMemory)?;
    c.fails(
        Hypercall::VcpuCreate {
            vm,
            vcpu: VcpuIndex::new(0).expect("valid"),
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
        NoMemory,
    )?;
    let mc = c.pages(u64::from(MC), 1)?;
    c.ok(topup(vm, mc, MC))?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(donate(vm, p + 1, 0x101, 1))?;
    // With the memcache emptied again, a share or a donate next to those
    // pages (same last-level table) needs no table and succeeds; one in
    // another 2 MiB needs a table: ENOMEM (ABI §2.4, §2.7).
    for _ in 0..MC {
        match c.ok(Hypercall::MemcacheReclaim { vm })? {
            Reply::MemcacheReclaimed(r) if r.as_slice().is_empty() => break,
            _ => {}
        }
    }
    let q = c.pages(4, 1)?;
    c.ok(share(vm, q, 0x102, 1))?;
    c.ok(donate(vm, q + 1, 0x103, 1))?;
    c.fails(share(vm, q + 2, 0x300, 1), NoMemory)?;
    c.fails(donate(vm, q + 3, 0x301, 1), NoMemory)?;
    Ok(())
}
fn atomic_share(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(4, 1)?;
    c.ok(donate(vm, p + 3, 0x200, 1))?;
    c.fails(share(vm, p, 0x100, 4), Denied)?;
    c.ok(share(vm, p + 1, 0x102, 1))?;
    c.fails(share(vm, p, 0x101, 2), Exists)
}
fn atomic_donate(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(4, 1)?;
    c.ok(share(vm, p + 3, 0x200, 1))?;
    c.fails(donate(vm, p, 0x100, 4), Denied)?;
    c.ok(donate(vm, p, 0x103, 1))?;
    c.fails(donate(vm, p + 1, 0x102, 2), Exists)
}

// ---- §2.2 argument validation ----

fn pfn_not_ram(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let end = crate::rt::platform()
        .ram
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or(0)
        >> 12;
    c.track_pfns(end, 1);
    c.track_pfns(0x9000, 1);
    c.fails(share(vm, end, 0x100, 1), OutOfRange)?;
    c.fails(share(vm, end - 1, 0x100, 2), OutOfRange)?;
    c.fails(donate(vm, 0x9000, 0x100, 1), OutOfRange)?;
    c.fails(share(vm, 0x9000, 0x100, 1), OutOfRange)?;
    c.fails(topup(vm, 0x9000, 1), OutOfRange)?;
    c.fails(Hypercall::HostPageState { pfn: pfn(0x9000) }, OutOfRange)
}
fn gfn_beyond_ipa(c: &mut Ctx) -> R {
    let vm = c.vm(32, 1, MC)?;
    let p = c.pages(2, 1)?;
    let limit = 1u64 << 20;
    c.fails(share(vm, p, limit, 1), OutOfRange)?;
    c.fails(share(vm, p, limit - 1, 2), OutOfRange)?;
    c.fails(donate(vm, p, limit, 1), OutOfRange)?;
    c.fails(
        Hypercall::GuestPageState {
            vm,
            gfn: gfn(limit),
        },
        OutOfRange,
    )?;
    c.ok(share(vm, p, limit - 1, 1))?;
    Ok(())
}
fn range_past_2_40(c: &mut Ctx) -> R {
    let vm = c.vm(48, 1, MC)?;
    let p = c.pages(2, 1)?;
    let top = (1u64 << 40) - 1;
    c.fails(share(vm, top, 0x100, 2), OutOfRange)?;
    c.fails(share(vm, p, top, 2), OutOfRange)
}
fn nr_pages_bounds(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    let v = u64::from(vm.raw());
    let s = id(HostFunction::Share);
    c.raw_fails([s, v, p, 0x100, 0, 1, 0, 0], InvalidArgument)?;
    c.raw_fails([s, v, p, 0x100, 513, 1, 0, 0], TooBig)?;
    c.raw_fails([s, v, p, 0x100, u64::MAX, 1, 0, 0], TooBig)?;
    c.raw_fails(
        [id(HostFunction::MemcacheTopup), v, p, 0, 0, 0, 0, 0],
        InvalidArgument,
    )
}
fn handles(c: &mut Ctx) -> R {
    let p = c.pages(1, 1)?;
    let s = id(HostFunction::Share);
    c.raw_fails([s, 0, p, 0x100, 1, 1, 0, 0], InvalidArgument)?;
    c.raw_fails([s, 0x1_0001_0000, p, 0x100, 1, 1, 0, 0], InvalidArgument)?;
    c.raw_fails([s, 0xffff, p, 0x100, 1, 1, 0, 0], InvalidArgument)?;
    c.fails(share(ghost(), p, 0x100, 1), NoEntry)?;
    c.fails(Hypercall::TeardownStart { vm: ghost() }, NoEntry)?;
    c.fails(
        Hypercall::GuestPageState {
            vm: ghost(),
            gfn: gfn(0),
        },
        NoEntry,
    )
}
fn stale_handle(c: &mut Ctx) -> R {
    let vm = stale(c)?;
    let p = c.pages(1, 1)?;
    let v0 = VcpuIndex::new(0).expect("valid");
    for call in [
        share(vm, p, 0x100, 1),
        donate(vm, p, 0x100, 1),
        topup(vm, p, 1),
        Hypercall::MemcacheReclaim { vm },
        Hypercall::VcpuCreate {
            vm,
            vcpu: v0,
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
        Hypercall::VcpuRun {
            vm,
            vcpu: v0,
            mmio_data: 0,
        },
        Hypercall::TeardownStart { vm },
        Hypercall::TeardownReclaim { vm },
        Hypercall::TeardownFinalize { vm },
        Hypercall::VmCounters {
            vm,
            group: CounterGroup::Stage2,
        },
        Hypercall::GuestPageState { vm, gfn: gfn(0) },
    ] {
        c.fails(call, NoEntry)?;
    }
    Ok(())
}
fn prot_bits(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    let v = u64::from(vm.raw());
    for (f, prot) in [
        (HostFunction::Share, 0),
        (HostFunction::Share, 2),
        (HostFunction::Share, 8),
        (HostFunction::Donate, 4),
        (HostFunction::Donate, 1 << 40),
    ] {
        c.raw_fails([id(f), v, p, 0x100, 1, prot, 0, 0], InvalidArgument)?;
    }
    c.raw_fails(
        [id(HostFunction::RelaxPerms), v, 0x100, 0, 0, 0, 0, 0],
        InvalidArgument,
    )
}
fn reserved_regs(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    let v = u64::from(vm.raw());
    c.raw_fails(
        [id(HostFunction::Share), v, p, 0x100, 1, 1, 1, 0],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::Share), v, p, 0x100, 1, 1, 0, 1 << 63],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::Unshare), v, p, 0x100, 1, 1, 0, 0],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::HostPageState), p, 1, 0, 0, 0, 0, 0],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::TeardownStart), v, 0, 0, 0, 0, 0, 5],
        InvalidArgument,
    )
}
fn high_bits(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    let v = u64::from(vm.raw());
    c.raw_fails(
        [id(HostFunction::Share), v, p | 1 << 40, 0x100, 1, 1, 0, 0],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::Share), v, p, 1 << 40, 1, 1, 0, 0],
        InvalidArgument,
    )?;
    c.raw_fails(
        [id(HostFunction::HostPageState), 1 << 63, 0, 0, 0, 0, 0, 0],
        InvalidArgument,
    )
}
fn create_args(c: &mut Ctx) -> R {
    let root = c.pages(16, 16)?;
    let f = id(HostFunction::VmCreate);
    for (bits, vcpus) in [(31, 1), (49, 1), (0, 1), (40, 0), (40, 65)] {
        c.raw_fails([f, bits, vcpus, root, 0, 0, 0, 0], InvalidArgument)?;
    }
    Ok(())
}
fn vcpus(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 2, MC)?;
    let v = |i| Hypercall::VcpuCreate {
        vm,
        vcpu: VcpuIndex::new(i).expect("valid"),
        start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
    };
    c.fails(v(2), OutOfRange)?;
    c.ok(v(1))?;
    c.fails(v(1), Exists)?;
    let run = |i| Hypercall::VcpuRun {
        vm,
        vcpu: VcpuIndex::new(i).expect("valid"),
        mmio_data: 0,
    };
    c.fails(run(0), NoEntry)?;
    // An index at or above nr_vcpus names no vCPU either (§2.4, §3.7).
    c.fails(run(2), NoEntry)?;
    c.fails(run(63), NoEntry)?;
    // vCPU 1 starts at IPA 0, where nothing is mapped: its first
    // instruction fetch is a memory fault (no memory range: all of the IPA
    // space is memory), reported again on every run until the host maps it.
    let fetch = VcpuExit::MemFault {
        gfn: gfn(0),
        access: Access::Exec,
        kind: FaultKind::Unmapped,
    };
    for _ in 0..2 {
        let r = c.ok(run(1))?;
        ensure(r == Reply::Exit(fetch), || format!("{r:?}"))?;
    }
    // vCPU 0 created powered off is never entered.
    c.ok(Hypercall::VcpuCreate {
        vm,
        vcpu: VcpuIndex::new(0).expect("valid"),
        start: hypercalls::VcpuStart::Off,
    })?;
    let r = c.ok(run(0))?;
    ensure(r == Reply::Exit(VcpuExit::PoweredOff), || format!("{r:?}"))?;
    let f = id(HostFunction::VcpuCreate);
    let v = u64::from(vm.raw());
    // Index 64; a misaligned entry; an unknown flag; off with an entry.
    for regs in [
        [f, v, 64, 0, 0, 0, 0, 0],
        [f, v, 1, 2, 0, 0, 0, 0],
        [f, v, 1, 0, 0, 2, 0, 0],
        [f, v, 1, 4, 0, 1, 0, 0],
    ] {
        c.raw_fails(regs, InvalidArgument)?;
    }
    Ok(())
}
fn error_order(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    c.track_pfns(0x9000, 1);
    // No VM beats a bad frame; a dying VM beats a bad frame and a bad gfn.
    c.fails(share(ghost(), 0x9000, 1 << 30, 1), NoEntry)?;
    c.fails(share(vm, 0x9000, 1 << 30, 1), OutOfRange)?;
    c.ok(Hypercall::TeardownStart { vm })?;
    c.fails(share(vm, 0x9000, 1 << 30, 1), Busy)
}
fn counters(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    c.counters(vm, CounterGroup::Runtime)?;
    let p = c.pages(4, 1)?;
    c.ok(share(vm, p, 0x100, 2))?;
    c.ok(donate(vm, p + 2, 0x102, 2))?;
    c.ok(unshare(vm, p, 0x100, 1))?;
    c.ok(reclaim(vm, p + 2, 0x102, 1))?;
    c.counters(vm, CounterGroup::Stage2)?;
    c.counters(vm, CounterGroup::Runtime)?;
    c.raw_fails(
        [
            id(HostFunction::VmCounters),
            u64::from(vm.raw()),
            2,
            0,
            0,
            0,
            0,
            0,
        ],
        InvalidArgument,
    )
}
fn wrprotect_relax_young(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(3, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(Hypercall::Share {
        vm,
        pfn: pfn(p + 1),
        gfn: gfn(0x102),
        nr: count(1),
        prot: Prot::R,
    })?;
    c.ok(donate(vm, p + 2, 0x104, 1))?;
    // 0x100..0x105: two writable pages, one read-only, holes between.
    let r = c.ok(Hypercall::WrProtect {
        vm,
        gfn: gfn(0x100),
        nr: count(5),
    })?;
    ensure(r == Reply::WrProtected { pages: 2 }, || format!("{r:?}"))?;
    c.ok(Hypercall::WrProtect {
        vm,
        gfn: gfn(0x100),
        nr: count(5),
    })?;
    c.ok(Hypercall::RelaxPerms {
        vm,
        gfn: gfn(0x102),
        prot: Prot::W,
    })?;
    c.ok(Hypercall::RelaxPerms {
        vm,
        gfn: gfn(0x104),
        prot: Prot::X,
    })?;
    c.fails(
        Hypercall::RelaxPerms {
            vm,
            gfn: gfn(0x101),
            prot: Prot::W,
        },
        NoEntry,
    )?;
    c.ok(Hypercall::TestClearYoung {
        vm,
        gfn: gfn(0x100),
        nr: count(8),
    })?;
    let r = c.ok(Hypercall::TestClearYoung {
        vm,
        gfn: gfn(0x200),
        nr: count(8),
    })?;
    ensure(r == Reply::Young { young: false }, || {
        format!("an unmapped range is young: {r:?}")
    })
}

// ---- isolation ----

fn donated_faults(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(1, 1)?;
    c.ok(donate(vm, p, 0x100, 1))?;
    match arch::probe_read((p << 12) + 0x40) {
        Ok(v) => Err(format!("host read of a donated page succeeded ({v:#x})")),
        Err(f) => ensure(f.far == (p << 12) + 0x40, || {
            format!("abort FAR {:#x}", f.far)
        }),
    }?;
    arch::probe_write(p << 12, 1)
        .err()
        .ok_or("host write to a donated page succeeded")?;
    Ok(())
}
fn reclaimed_zero(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(2, 1)?;
    for i in 0..2 {
        arch::fill_page(p + i, 0x5eed_0000_0000 + i).map_err(|f| format!("{f:x?}"))?;
    }
    c.ok(donate(vm, p, 0x100, 2))?;
    // The harness checks every reclaimed frame reads all zero.
    c.ok(reclaim(vm, p, 0x100, 2))?;
    Ok(())
}
fn hyp_memory_faults(_c: &mut Ctx) -> R {
    for addr in [0x4000_0000, 0x4008_0000, 0x41ff_fff8] {
        if let Ok(v) = arch::probe_read(addr) {
            return Err(format!(
                "host read of hypervisor memory {addr:#x} succeeded ({v:#x})"
            ));
        }
    }
    Ok(())
}
fn memcache_faults(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, 0)?;
    let p = c.pages(1, 1)?;
    c.ok(topup(vm, p, 1))?;
    arch::probe_read(p << 12)
        .err()
        .ok_or("host read of a memcache page succeeded")?;
    Ok(())
}

// ---- §2.6, §3.15 - §3.17 lifecycle ----

fn teardown_twice(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    c.fails(Hypercall::TeardownReclaim { vm }, Busy)?;
    c.fails(Hypercall::TeardownFinalize { vm }, Busy)?;
    c.ok(Hypercall::TeardownStart { vm })?;
    c.fails(Hypercall::TeardownStart { vm }, Busy)?;
    c.fails(Hypercall::TeardownFinalize { vm }, Busy)?;
    c.destroy(vm)?;
    c.fails(Hypercall::TeardownStart { vm }, NoEntry)?;
    c.fails(Hypercall::TeardownFinalize { vm }, NoEntry)
}
fn dying_calls(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 2, MC)?;
    let p = c.pages(4, 1)?;
    c.ok(share(vm, p, 0x100, 1))?;
    c.ok(donate(vm, p + 1, 0x101, 1))?;
    c.ok(Hypercall::TeardownStart { vm })?;
    let v0 = VcpuIndex::new(0).expect("valid");
    for call in [
        share(vm, p + 2, 0x200, 1),
        donate(vm, p + 2, 0x200, 1),
        unshare(vm, p, 0x100, 1),
        reclaim(vm, p + 1, 0x101, 1),
        topup(vm, p + 3, 1),
        Hypercall::VcpuCreate {
            vm,
            vcpu: v0,
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        },
        Hypercall::WrProtect {
            vm,
            gfn: gfn(0x100),
            nr: count(1),
        },
        Hypercall::RelaxPerms {
            vm,
            gfn: gfn(0x100),
            prot: Prot::X,
        },
        Hypercall::TestClearYoung {
            vm,
            gfn: gfn(0x100),
            nr: count(1),
        },
        unshare_range(vm, 0x100, 1),
    ] {
        c.fails(call, Busy)?;
    }
    c.counters(vm, CounterGroup::Stage2)?;
    c.guest(vm, 0x100)?;
    c.ok(Hypercall::MemcacheReclaim { vm })?;
    Ok(())
}
/// §3.7 on a dying VM: EBUSY until teardown has returned the vCPU's state
/// page, ENOENT after that (the vCPU no longer exists) and once the handle
/// is stale.
fn run_while_dying(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let v0 = VcpuIndex::new(0).expect("valid");
    c.ok(Hypercall::VcpuCreate {
        vm,
        vcpu: v0,
        start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
    })?;
    let run = Hypercall::VcpuRun {
        vm,
        vcpu: v0,
        mmio_data: 0,
    };
    c.ok(Hypercall::TeardownStart { vm })?;
    c.fails(run, Busy)?;
    let mut done = false;
    for _ in 0..100 {
        if let Reply::Teardown(t) = c.ok(Hypercall::TeardownReclaim { vm })? {
            if !t.more {
                done = true;
                break;
            }
        }
    }
    ensure(done, || "teardown never finished".into())?;
    // Every page is back, the vCPU's state page included: no such vCPU.
    c.fails(run, NoEntry)?;
    c.ok(Hypercall::TeardownFinalize { vm })?;
    c.fails(run, NoEntry)
}

fn teardown_everything_back(c: &mut Ctx) -> R {
    let vm = c.vm(48, 4, 24)?;
    let p = c.pages(12, 1)?;
    for i in 0..4 {
        arch::fill_page(p + 4 + i, 0x7777 + i).map_err(|f| format!("{f:x?}"))?;
    }
    c.ok(share(vm, p, 0x100, 4))?;
    c.ok(donate(vm, p + 4, 0x1000, 4))?;
    // Far apart gfns need more table pages.
    c.ok(share(vm, p + 8, 0x4_0000, 2))?;
    c.ok(donate(vm, p + 10, 0x800_0000, 2))?;
    for i in 0..4 {
        c.ok(Hypercall::VcpuCreate {
            vm,
            vcpu: VcpuIndex::new(i).expect("valid"),
            start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
        })?;
    }
    // destroy: every guest page, table page, vCPU page, memcache page and
    // root page comes back host OWNED (read-back), donated ones zeroed.
    c.destroy(vm)
}

// ---- §2.8 2 MiB blocks ----

/// Runtime counters (group 1) of `vm`.
fn runtime(
    c: &mut Ctx,
    vm: VmHandle,
) -> Result<hypercalls::RuntimeCounters, alloc::string::String> {
    match c.counters(vm, CounterGroup::Runtime)? {
        Reply::Counters(hypercalls::Counters::Runtime(r)) => Ok(r),
        r => Err(format!("runtime counters replied {r:?}")),
    }
}
/// TLB invalidations issued for `vm` so far (group 0, x3).
fn tlbi(c: &mut Ctx, vm: VmHandle) -> Result<u64, alloc::string::String> {
    match c.counters(vm, CounterGroup::Stage2)? {
        Reply::Counters(hypercalls::Counters::Stage2(s)) => Ok(s.tlbi),
        r => Err(format!("stage-2 counters replied {r:?}")),
    }
}
/// `gfn` of `vm` maps frame `p` with `prot` as SHARED_BORROWED.
fn borrowed(c: &mut Ctx, vm: VmHandle, g: u64, p: u64, prot: Prot) -> R {
    let got = c.guest(vm, g)?;
    let want = hypercalls::GuestPage::Mapped {
        state: hypercalls::PageState::SharedBorrowed,
        pfn: pfn(p),
        prot,
    };
    ensure(got == want, || {
        format!("gfn {g:#x}: {got:?}, expected {want:?}")
    })
}
fn wrprotect(vm: VmHandle, g: u64, n: u32) -> Hypercall {
    Hypercall::WrProtect {
        vm,
        gfn: gfn(g),
        nr: count(n),
    }
}
fn relax(vm: VmHandle, g: u64, prot: Prot) -> Hypercall {
    Hypercall::RelaxPerms {
        vm,
        gfn: gfn(g),
        prot,
    }
}

fn block_share(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    // A page in the first GiB brings its level-2 table.
    let q = c.pages(1, 1)?;
    c.ok(share(vm, q, 0x10, 1))?;
    let before = runtime(c, vm)?;
    let p = c.pages(1024, 512)?;
    c.ok(share(vm, p, 0x400, 512))?;
    let after = runtime(c, vm)?;
    ensure(
        after.table_pages == before.table_pages && after.memcache_pages == before.memcache_pages,
        || format!("a block took table pages: {before:?} -> {after:?}"),
    )?;
    for k in [0, 1, 255, 510, 511] {
        borrowed(c, vm, 0x400 + k, p + k, Prot::RW)?;
    }
    // The other 512 frames at a gfn that is not 2 MiB-aligned: pages, in
    // two last-level tables (the range crosses a 2 MiB boundary).
    c.ok(share(vm, p + 512, 0x801, 512))?;
    let pages = runtime(c, vm)?;
    ensure(pages.table_pages == after.table_pages + 2, || {
        format!("512 unaligned pages: {after:?} -> {pages:?}, expected 2 more tables")
    })?;
    // A 32-bit VM (root at level 2) takes a block with no memcache at all.
    let small = c.vm(32, 1, 0)?;
    c.ok(share(small, p, 0x200, 512))?;
    borrowed(c, small, 0x3ff, p + 511, Prot::RW)?;
    let host = c.ok(Hypercall::HostPageState { pfn: pfn(p + 7) })?;
    ensure(
        matches!(host, Reply::HostPage(h) if h.share_count == 2),
        || format!("frame shared in two blocks: {host:?}"),
    )
}
fn block_partial_unshare(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let q = c.pages(1, 1)?;
    c.ok(share(vm, q, 0x10, 1))?;
    let p = c.pages(1024, 512)?;
    c.ok(share(vm, p, 0x400, 512))?;
    let before = runtime(c, vm)?;
    let t0 = tlbi(c, vm)?;
    c.ok(unshare(vm, p + 3, 0x403, 2))?;
    let after = runtime(c, vm)?;
    ensure(
        after.memcache_pages + 1 == before.memcache_pages
            && after.table_pages == before.table_pages + 1,
        || format!("a split takes one memcache page: {before:?} -> {after:?}"),
    )?;
    // The two pages are left out of the new table before it is linked:
    // one break of the block is the only invalidation.
    let t1 = tlbi(c, vm)?;
    ensure(t1 - t0 == 1, || {
        format!("split: {} invalidations, expected 1", t1 - t0)
    })?;
    ensure(
        c.guest(vm, 0x403)? == hypercalls::GuestPage::Unmapped,
        || "the unshared page is still mapped".into(),
    )?;
    for k in [0, 2, 5, 511] {
        borrowed(c, vm, 0x400 + k, p + k, Prot::RW)?;
    }
    // Whole-block unshare: one invalidation. The same 512 frames mapped as
    // pages: one per page and one for the emptied last-level table.
    c.ok(share(vm, p + 512, 0x600, 512))?;
    let t2 = tlbi(c, vm)?;
    c.ok(unshare(vm, p + 512, 0x600, 512))?;
    let t3 = tlbi(c, vm)?;
    ensure(t3 - t2 == 1, || {
        format!("whole-block unshare: {} invalidations, expected 1", t3 - t2)
    })?;
    c.ok(share(vm, p + 512, 0x801, 512))?;
    let t4 = tlbi(c, vm)?;
    c.ok(unshare(vm, p + 512, 0x801, 512))?;
    let t5 = tlbi(c, vm)?;
    ensure(t5 - t4 == 512 + 2, || {
        format!(
            "unshare of 512 pages: {} invalidations, expected 514",
            t5 - t4
        )
    })
}
fn block_split_no_memory(c: &mut Ctx) -> R {
    let vm = c.vm(32, 1, 0)?;
    let p = c.pages(512, 512)?;
    c.ok(share(vm, p, 0x200, 512))?;
    // Every call that would split the block: ENOMEM, nothing changed (the
    // harness reads every tracked page back).
    c.fails(unshare(vm, p + 1, 0x201, 1), NoMemory)?;
    c.fails(unshare(vm, p + 500, 0x3f4, 12), NoMemory)?;
    c.fails(wrprotect(vm, 0x3ff, 2), NoMemory)?;
    c.fails(relax(vm, 0x201, Prot::X), NoMemory)?;
    // A page-state error still comes first.
    c.fails(unshare(vm, p + 2, 0x201, 1), Denied)?;
    // Relaxing to what is there and test-clear-young need nothing; the
    // block ages as a whole.
    c.ok(relax(vm, 0x201, Prot::W))?;
    let y1 = c.ok(Hypercall::TestClearYoung {
        vm,
        gfn: gfn(0x209),
        nr: count(1),
    })?;
    let y2 = c.ok(Hypercall::TestClearYoung {
        vm,
        gfn: gfn(0x300),
        nr: count(1),
    })?;
    ensure(
        y1 == Reply::Young { young: true } && y2 == Reply::Young { young: false },
        || format!("one access flag per block: {y1:?} then {y2:?}"),
    )?;
    // Whole-block calls need no memory.
    let r = c.ok(wrprotect(vm, 0x200, 512))?;
    ensure(r == Reply::WrProtected { pages: 512 }, || format!("{r:?}"))?;
    c.ok(unshare(vm, p, 0x200, 512))?;
    // Donated as a block: a partial reclaim is ENOMEM, the whole one works.
    c.ok(donate(vm, p, 0x400, 512))?;
    c.fails(reclaim(vm, p + 1, 0x401, 1), NoMemory)?;
    c.ok(reclaim(vm, p, 0x400, 512))?;
    // With a page in the memcache the split goes through.
    let mc = c.pages(1, 1)?;
    c.ok(topup(vm, mc, 1))?;
    c.ok(share(vm, p, 0x200, 512))?;
    c.ok(unshare(vm, p + 1, 0x201, 1))?;
    borrowed(c, vm, 0x202, p + 2, Prot::RW)
}
fn block_wrprotect_one_page(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let q = c.pages(1, 1)?;
    c.ok(share(vm, q, 0x10, 1))?;
    let p = c.pages(512, 512)?;
    c.ok(share(vm, p, 0x400, 512))?;
    let before = runtime(c, vm)?;
    let r = c.ok(wrprotect(vm, 0x407, 1))?;
    ensure(r == Reply::WrProtected { pages: 1 }, || format!("{r:?}"))?;
    let after = runtime(c, vm)?;
    ensure(after.memcache_pages + 1 == before.memcache_pages, || {
        format!("write-protect of one page in a block: {before:?} -> {after:?}")
    })?;
    borrowed(c, vm, 0x406, p + 6, Prot::RW)?;
    borrowed(c, vm, 0x407, p + 7, Prot::R)?;
    borrowed(c, vm, 0x408, p + 8, Prot::RW)?;
    // A second block: write-protected whole (no memory), then relaxing one
    // page splits it and makes only that page writable.
    let p2 = c.pages(512, 512)?;
    c.ok(share(vm, p2, 0x600, 512))?;
    let r = c.ok(wrprotect(vm, 0x600, 512))?;
    ensure(r == Reply::WrProtected { pages: 512 }, || format!("{r:?}"))?;
    let mid = runtime(c, vm)?;
    ensure(mid.memcache_pages == after.memcache_pages, || {
        format!("whole-block write-protect took memory: {after:?} -> {mid:?}")
    })?;
    c.ok(relax(vm, 0x6ff, Prot::W))?;
    let end = runtime(c, vm)?;
    ensure(end.memcache_pages + 1 == mid.memcache_pages, || {
        format!("relax of one page in a block: {mid:?} -> {end:?}")
    })?;
    borrowed(c, vm, 0x6fe, p2 + 0xfe, Prot::R)?;
    borrowed(c, vm, 0x6ff, p2 + 0xff, Prot::RW)?;
    borrowed(c, vm, 0x700, p2 + 0x100, Prot::R)
}
fn block_teardown(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 2, MC)?;
    let q = c.pages(3, 1)?;
    c.ok(share(vm, q, 0x10, 3))?;
    let p = c.pages(1024, 512)?;
    for i in 0..512 {
        if i % 64 == 0 {
            arch::fill_page(p + 512 + i, 0xb10c_0000 + i).map_err(|f| format!("{f:x?}"))?;
        }
    }
    c.ok(share(vm, p, 0x200, 512))?;
    c.ok(donate(vm, p + 512, 0x400, 512))?;
    c.ok(Hypercall::VcpuCreate {
        vm,
        vcpu: VcpuIndex::new(0).expect("valid"),
        start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
    })?;
    c.track_pfns(p + 512 + 64, 16);
    c.ok(Hypercall::TeardownStart { vm })?;
    let mut batches = alloc::vec::Vec::new();
    for _ in 0..100 {
        match c.ok(Hypercall::TeardownReclaim { vm })? {
            Reply::Teardown(t) => {
                batches.push(t.reclaimed);
                if !t.more {
                    break;
                }
            }
            r => return Err(format!("{r:?}")),
        }
    }
    // 3 pages, then a block that does not fit in the rest of the batch,
    // then the other block, then the memcache's pages: the vCPU page, the
    // tables and the free ones.
    let want = [3, 512, 512, MC];
    ensure(batches == want, || {
        format!("teardown batches {batches:?}, expected {want:?}")
    })?;
    // Every page back host OWNED (read-back), the donated block zeroed.
    c.ok(Hypercall::TeardownFinalize { vm })?;
    for i in [0u64, 64, 448] {
        let v = arch::probe_read((p + 512 + i) << 12).map_err(|f| format!("{f:x?}"))?;
        ensure(v == 0, || format!("reclaimed block page {i} reads {v:#x}"))?;
    }
    Ok(())
}

// ---- §3.21 HYP_UNSHARE_RANGE ----

fn unshare_range(vm: VmHandle, g: u64, n: u32) -> Hypercall {
    Hypercall::UnshareRange {
        vm,
        gfn: gfn(g),
        nr: count(n),
    }
}
/// Host page state of `p`: (share count, owned by the host).
fn host_count(c: &mut Ctx, p: u64) -> Result<(u32, bool), alloc::string::String> {
    match c.ok(Hypercall::HostPageState { pfn: pfn(p) })? {
        Reply::HostPage(h) => Ok((h.share_count, h.owner == hypercalls::Owner::Host)),
        r => Err(format!("host page state replied {r:?}")),
    }
}

/// Scattered frames (in reverse order, a hole at 0x205) at gfns
/// 0x200..0x228 plus a second borrow of one frame at 0x300: a run of four,
/// then the other 35 in one call.
fn unshare_range_scattered(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let base = c.pages(40, 1)?;
    let frame = |i: u64| base + 39 - i;
    for i in (0..40).filter(|&i| i != 5) {
        c.ok(share(vm, frame(i), 0x200 + i, 1))?;
    }
    c.ok(share(vm, base, 0x300, 1))?;
    let t0 = tlbi(c, vm)?;
    let r = c.ok(unshare_range(vm, 0x200, 4))?;
    ensure(r == Reply::Unshared { pages: 4 }, || format!("{r:?}"))?;
    let t1 = tlbi(c, vm)?;
    ensure(t1 - t0 == 4, || {
        format!("4 pages: {} invalidations, expected 4", t1 - t0)
    })?;
    let r = c.ok(unshare_range(vm, 0x204, 0x40))?;
    ensure(r == Reply::Unshared { pages: 35 }, || format!("{r:?}"))?;
    let t2 = tlbi(c, vm)?;
    ensure(t2 - t1 == 1, || {
        format!(
            "35 pages: {} invalidations, expected 1 (whole VMID)",
            t2 - t1
        )
    })?;
    for i in [0u64, 3, 4, 20, 38] {
        let (n, host) = host_count(c, frame(i))?;
        ensure(n == 0 && host, || {
            format!("frame of gfn {:#x}: count {n}", 0x200 + i)
        })?;
    }
    // The frame at 0x227 is still borrowed at 0x300.
    let (n, _) = host_count(c, base)?;
    ensure(n == 1, || {
        format!("twice-shared frame: count {n}, expected 1")
    })?;
    borrowed(c, vm, 0x300, base, Prot::RW)?;
    // Nothing mapped any more: 0 pages, no invalidation.
    let r = c.ok(unshare_range(vm, 0x200, 0x40))?;
    ensure(r == Reply::Unshared { pages: 0 }, || format!("{r:?}"))?;
    let t3 = tlbi(c, vm)?;
    ensure(t3 == t2, || "an empty range invalidated".into())
}
fn unshare_range_refused(c: &mut Ctx) -> R {
    let vm = c.vm(IPA, 1, MC)?;
    let p = c.pages(4, 1)?;
    c.ok(share(vm, p, 0x100, 2))?;
    c.ok(donate(vm, p + 2, 0x102, 1))?;
    c.ok(share(vm, p + 3, 0x104, 1))?;
    // A donated gfn inside: EACCES, the shared pages around it stay.
    c.fails(unshare_range(vm, 0x100, 8), Denied)?;
    c.fails(unshare_range(vm, (1 << 28) - 1, 2), OutOfRange)?;
    c.fails(unshare_range(ghost(), 0x100, 1), NoEntry)?;
    borrowed(c, vm, 0x101, p + 1, Prot::RW)?;
    let r = c.ok(unshare_range(vm, 0x103, 2))?;
    ensure(r == Reply::Unshared { pages: 1 }, || format!("{r:?}"))?;
    let r = c.ok(unshare_range(vm, 0x100, 2))?;
    ensure(r == Reply::Unshared { pages: 2 }, || format!("{r:?}"))
}
fn unshare_range_blocks(c: &mut Ctx) -> R {
    let vm = c.vm(32, 1, 0)?;
    let p = c.pages(512, 512)?;
    c.ok(share(vm, p, 0x200, 512))?;
    c.fails(unshare_range(vm, 0x1ff, 2), NoMemory)?;
    c.fails(unshare_range(vm, 0x3f4, 12), NoMemory)?;
    let t0 = tlbi(c, vm)?;
    let r = c.ok(unshare_range(vm, 0x200, 512))?;
    ensure(r == Reply::Unshared { pages: 512 }, || format!("{r:?}"))?;
    let t1 = tlbi(c, vm)?;
    ensure(t1 - t0 == 1, || {
        format!("whole block: {} invalidations, expected 1", t1 - t0)
    })?;
    // With one memcache page, part of the block: a split.
    c.ok(share(vm, p, 0x200, 512))?;
    let mc = c.pages(1, 1)?;
    c.ok(topup(vm, mc, 1))?;
    let r = c.ok(unshare_range(vm, 0x3f4, 12))?;
    ensure(r == Reply::Unshared { pages: 12 }, || format!("{r:?}"))?;
    borrowed(c, vm, 0x3f3, p + 0x1f3, Prot::RW)?;
    // The other 500 pages: one whole-VMID invalidation, the table back.
    let t2 = tlbi(c, vm)?;
    let r = c.ok(unshare_range(vm, 0x200, 512))?;
    ensure(r == Reply::Unshared { pages: 500 }, || format!("{r:?}"))?;
    let t3 = tlbi(c, vm)?;
    ensure(t3 - t2 == 1, || {
        format!("500 pages: {} invalidations, expected 1", t3 - t2)
    })?;
    let rt = runtime(c, vm)?;
    ensure(rt.memcache_pages == 1, || {
        format!("the emptied table is not back in the memcache: {rt:?}")
    })
}

// ---- concurrency and random tests live in `random` ----

/// Every case, in order.
pub const CASES: &[Case] = &[
    Case { name: "§3.1 version: HYP_VERSION returns the crate's 0.1 and preserves x8..x17", run: version },
    Case { name: "§3.1 version: any non-zero argument register is EINVAL", run: version_reserved },
    Case { name: "§2.4 unknown ids, guest ids from the host and x0 bits 63:32 are NOT_SUPPORTED", run: unknown_ids },
    Case { name: "§3.2 features: every host call of the ABI is implemented", run: features_all },
    Case { name: "§3.2 features: unknown and guest-call ids report 0", run: features_unknown },
    Case { name: "§3.8 share: host OWNED pages become SHARED_OWNED, guest SHARED_BORROWED, host keeps access", run: share_owned },
    Case { name: "§3.8 share: a SHARED_OWNED page shared at a second gfn counts 2", run: share_twice_other_gfn },
    Case { name: "§3.8 share: one page shared with two VMs counts each borrow", run: share_two_vms },
    Case { name: "§3.8 share: double share of the same gfn is EEXIST", run: share_same_gfn },
    Case { name: "§3.8 share: a donated (VM-owned) page is EACCES", run: share_donated },
    Case { name: "§3.8 share: a memcache (Hyp-owned) page is EACCES", run: share_memcache },
    Case { name: "§2.5 hypervisor memory [0x4000_0000, 0x4200_0000) cannot be shared, donated or topped up (EACCES)", run: share_hyp_memory },
    Case { name: "§3.9 unshare: the last unshare returns pages to host OWNED", run: unshare_last },
    Case { name: "§3.9 unshare: double unshare fails and changes nothing", run: unshare_twice },
    Case { name: "§3.9 unshare: a gfn mapping another frame is EACCES", run: unshare_other_pfn },
    Case { name: "§3.9 unshare: a donated gfn is EACCES", run: unshare_donated },
    Case { name: "§3.9 unshare: an unmapped gfn is ENOENT", run: unshare_unmapped },
    Case { name: "§3.10 donate: host OWNED pages become VM OWNED, host NONE", run: donate_owned },
    Case { name: "§3.10 donate: a shared page is EACCES", run: donate_shared },
    Case { name: "§3.10 donate: an already donated page is EACCES", run: donate_twice },
    Case { name: "§3.10 donate: a mapped gfn is EEXIST", run: donate_mapped_gfn },
    Case { name: "§3.10 donate: a memcache page is EACCES (and cannot be topped up twice)", run: donate_memcache },
    Case { name: "§3.11 reclaim: a donated page returns host OWNED", run: reclaim_donated },
    Case { name: "§3.11 reclaim: double reclaim fails and changes nothing", run: reclaim_twice },
    Case { name: "§3.11 reclaim: a shared gfn is EACCES", run: reclaim_shared },
    Case { name: "§3.11 reclaim: a pfn the gfn does not map is EACCES", run: reclaim_wrong_pfn },
    Case { name: "§3.11 reclaim: another VM's page is refused", run: reclaim_other_vm },
    Case { name: "§3.3/§3.4 memcache: topup makes pages Hyp-owned; reclaim returns min(6, free) zeroed", run: topup_and_reclaim },
    Case { name: "§3.3 memcache topup: shared or donated pages are EACCES", run: topup_bad_pages },
    Case { name: "§3.5 vm create: root pages become Hyp-owned; a shared or used root is EACCES", run: create_root },
    Case { name: "§3.5 vm create: a misaligned root is EINVAL", run: create_misaligned },
    Case { name: "§2.2 vm create: ipa_bits outside 32..48 and nr_vcpus outside 1..64 are EINVAL", run: create_args },
    Case { name: "§2.7 memcache: share, donate and vCPU create with an empty memcache are ENOMEM and change nothing; next to a mapped page they need no table", run: no_memcache },
    Case { name: "§2.1 atomicity: a range share failing on one page changes nothing", run: atomic_share },
    Case { name: "§2.1 atomicity: a range donate failing on one page changes nothing", run: atomic_donate },
    Case { name: "§2.2 pfn: frames beyond RAM or in MMIO (0x0900_0000) are ERANGE", run: pfn_not_ram },
    Case { name: "§2.2 gfn: an IPA beyond the VM's IPA size is ERANGE", run: gfn_beyond_ipa },
    Case { name: "§2.2 a range whose end passes 2^40 is ERANGE", run: range_past_2_40 },
    Case { name: "§2.2 nr_pages: 0 is EINVAL, above 512 is E2BIG", run: nr_pages_bounds },
    Case { name: "§2.2 vm: handle 0 or bits 63:32 set is EINVAL, a handle of no VM is ENOENT", run: handles },
    Case { name: "§2.6 vm: a stale handle (after finalize) is ENOENT for every call", run: stale_handle },
    Case { name: "§2.2 prot: reserved bits, no R, empty relax are EINVAL", run: prot_bits },
    Case { name: "§2.1 reserved: a non-zero unused register is EINVAL", run: reserved_regs },
    Case { name: "§2.2 pfn/gfn bits above 39 are EINVAL", run: high_bits },
    Case { name: "§3.6 vcpu create: index >= nr_vcpus ERANGE, twice EEXIST, 64 EINVAL; §3.7 run of none or of an index >= nr_vcpus ENOENT", run: vcpus },
    Case { name: "§2.4 error order: ENOENT before ERANGE, EBUSY before ERANGE", run: error_order },
    Case { name: "§3.18 counters: page counters match the calls; group 2 is EINVAL", run: counters },
    Case { name: "§3.12-§3.14 wrprotect counts changed pages, relax adds, young on holes is 0", run: wrprotect_relax_young },
    Case { name: "§3.10 isolation: host access to a donated page takes an external abort", run: donated_faults },
    Case { name: "§3.11 isolation: a reclaimed donated page reads zero after a pattern was written", run: reclaimed_zero },
    Case { name: "§2.5 isolation: host access to hypervisor memory takes an external abort", run: hyp_memory_faults },
    Case { name: "§3.3 isolation: host access to a memcache page takes an external abort", run: memcache_faults },
    Case { name: "§3.15 teardown: start twice is EBUSY, reclaim/finalize of a live VM EBUSY, stale after", run: teardown_twice },
    Case { name: "§2.6 dying: mapping, vCPU and permission calls are EBUSY; counters, state, memcache reclaim work", run: dying_calls },
    Case { name: "§3.7 run of a dying VM is EBUSY until teardown returned the vCPU's state page, then ENOENT, and ENOENT once finalized", run: run_while_dying },
    Case { name: "§3.16/§3.17 teardown: every page (guest, table, vCPU, memcache, root) back with the host", run: teardown_everything_back },
    Case { name: "§2.8 blocks: a 2 MiB-aligned share of 512 pages takes no last-level table (none at all under a level-2 root); every page reads back on its own", run: block_share },
    Case { name: "§2.8 blocks: a partial unshare splits with one memcache page and leaves the rest mapped; a whole block goes with 1 TLB invalidation (512 pages: 514)", run: block_partial_unshare },
    Case { name: "§2.8 blocks: with an empty memcache every split (unshare, wrprotect, relax, reclaim) is ENOMEM and changes nothing; whole-block calls and test-clear-young work", run: block_split_no_memory },
    Case { name: "§2.8 blocks: write-protect of one page in a block splits it: only that page read-only; relax of one page in a read-only block: only that page writable", run: block_wrprotect_one_page },
    Case { name: "§3.21 unshare range: scattered frames at a gfn run, a hole skipped, all unshared; x1 counts them; 4 pages 4 invalidations, 35 pages one (whole VMID); a frame shared twice keeps one borrow", run: unshare_range_scattered },
    Case { name: "§3.21 unshare range: a donated gfn in the range is EACCES and changes nothing; beyond the IPA ERANGE; no VM ENOENT", run: unshare_range_refused },
    Case { name: "§3.21/§2.8 unshare range: a whole block needs no memory and 1 invalidation; part of one is ENOMEM without memory, a split with it", run: unshare_range_blocks },
    Case { name: "§2.8/§3.16 blocks: teardown takes a block whole (512 updates in one batch), returns every page, the donated block zeroed", run: block_teardown },
];

/// Runs every case, then the concurrency cases and the random tester.
pub fn run_all() -> (u32, u32) {
    let (mut passed, mut failed) = (0, 0);
    if let Err(e) = harness::check_pool() {
        crate::say!("FAIL test pool: {e}");
        return (0, 1);
    }
    harness::run(CASES, &mut passed, &mut failed);
    random::run(&mut passed, &mut failed);
    (passed, failed)
}
