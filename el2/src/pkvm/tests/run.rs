//! `HYP_VCPU_RUN` on the fake platform: argument checks, bookkeeping, the
//! exit loop (scripted guest exits), PSCI between vCPUs, LastRan.

use hypercalls::{
    Access, ConsoleBytes, FaultKind, GuestCall, GuestMemory, HypError, Hypercall, IpaBits,
    MmioSize, Reply, VcpuCount, VcpuExit, VcpuIndex, VcpuStart, VmHandle,
};
use stage2::Pfn as HPfn;
use std::vec::Vec;

use super::super::fake::{FakeHyp, VECTOR_LOWER_SYNC};
use super::super::run::MAX_GUEST_ENTRIES;
use super::{hyp, ok, pfn, refused, runtime_counters, topup, HOST0};
use crate::psci;
use crate::vcpu::RawExit;

const ENTRY: u64 = 0x4008_0000;
/// Guest RAM: 64 MiB at 1 GiB.
const MEM_GFN: u64 = 0x40000;
const MEM_PAGES: u64 = 0x4000;

fn vm(h: &FakeHyp) -> VmHandle {
    let vm = match ok(
        h,
        Hypercall::VmCreate {
            ipa_bits: IpaBits::new(40).unwrap(),
            nr_vcpus: VcpuCount::new(2).unwrap(),
            root: pfn(HOST0),
            memory: GuestMemory::new(
                IpaBits::new(40).unwrap(),
                hypercalls::Gfn::new(MEM_GFN).unwrap(),
                MEM_PAGES,
            ),
        },
    ) {
        Reply::VmCreated { vm } => vm,
        r => panic!("{r:?}"),
    };
    topup(h, vm, HOST0 + 2, 8);
    vm
}

fn vcpu(i: u16) -> VcpuIndex {
    VcpuIndex::new(i).unwrap()
}

fn create_vcpu(h: &FakeHyp, vm: VmHandle, i: u16, start: VcpuStart) {
    ok(
        h,
        Hypercall::VcpuCreate {
            vm,
            vcpu: vcpu(i),
            start,
        },
    );
}

fn run_vcpu(h: &FakeHyp, vm: VmHandle, i: u16, mmio_data: u64) -> Result<VcpuExit, HypError> {
    match h.dispatch(
        &Hypercall::VcpuRun {
            vm,
            vcpu: vcpu(i),
            mmio_data,
        }
        .encode(),
    )? {
        Reply::Exit(e) => Ok(e),
        r => panic!("{r:?}"),
    }
}

fn hvc(regs: [u64; 8]) -> (RawExit, [u64; 8]) {
    (
        RawExit {
            vector: VECTOR_LOWER_SYNC,
            esr: 0x5a00_0000,
            far: 0,
            hpfar: 0,
            fast_exits: 0,
        },
        regs,
    )
}

fn abort(esr: u64, ipa: u64) -> (RawExit, [u64; 8]) {
    (
        RawExit {
            vector: VECTOR_LOWER_SYNC,
            esr,
            far: ipa & 0xfff,
            hpfar: (ipa >> 12) << 4,
            fast_exits: 0,
        },
        [0; 8],
    )
}

fn psci(fid: u32, a: u64, b: u64, c: u64) -> [u64; 8] {
    [u64::from(fid), a, b, c, 0, 0, 0, 0]
}

fn script(h: &FakeHyp, e: (RawExit, [u64; 8])) {
    h.platform().script_exit(e.0, e.1);
}

/// The state page of vCPU `i` (load and put it back at once).
fn state(h: &FakeHyp, vm: VmHandle, i: u16) -> HPfn {
    let l = h.vcpu_load(vm, vcpu(i)).unwrap();
    h.vcpu_put(&l, 0);
    l.state
}

#[test]
fn argument_checks() {
    let h = hyp();
    let vm = vm(&h);
    let run = |i: u16| Hypercall::VcpuRun {
        vm,
        vcpu: vcpu(i),
        mmio_data: 0,
    };
    refused(&h, run(0), HypError::NoEntry);
    refused(&h, run(5), HypError::NoEntry);
    let stale = VmHandle::new(vm.index(), vm.generation() + 1).unwrap();
    refused(
        &h,
        Hypercall::VcpuRun {
            vm: stale,
            vcpu: vcpu(0),
            mmio_data: 0,
        },
        HypError::NoEntry,
    );
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    let loaded = h.vcpu_load(vm, vcpu(0)).unwrap();
    refused(&h, run(0), HypError::Busy);
    h.vcpu_put(&loaded, 0);
    ok(&h, Hypercall::TeardownStart { vm });
    refused(&h, run(0), HypError::Busy);
    assert_eq!(h.platform().entries().len(), 0, "never entered");
    assert_eq!(h.bugs(), 0);
}

#[test]
fn first_entry_console_and_interrupt() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 7,
        },
    );
    let hello = ConsoleBytes::new(b"hi").unwrap();
    script(&h, hvc(GuestCall::ConsoleWrite(hello).encode()));
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Console(hello)));
    let entries = h.platform().entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1, ENTRY);
    let s = state(&h, vm, 0);
    let ctx = h.platform().context(s);
    assert_eq!(ctx.x[..8], [0; 8], "the call returns 0 to the guest");
    assert_eq!(ctx.vmpidr & 0xff_ffff, 0);
    assert_eq!(ctx.cntvoff, super::super::fake::FAKE_COUNTER);
    // Nothing scripted: a physical IRQ ends the run.
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Interrupted));
    let c = runtime_counters(&h, vm);
    // Two runs and the load of `state`.
    assert_eq!((c.vcpu_runs, c.host_exits, c.irq_exits), (3, 2, 1));
    h.check_invariants().unwrap();
}

#[test]
fn the_first_run_passes_entry_and_x0() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0x55,
        },
    );
    // The guest traps at once without touching x0: WFI.
    h.platform().script_exit(
        RawExit {
            vector: VECTOR_LOWER_SYNC,
            esr: 0x0600_0000,
            far: 0,
            hpfar: 0,
            fast_exits: 0,
        },
        [0x55, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Wfx { wfe: false }));
    let ctx = h.platform().context(state(&h, vm, 0));
    assert_eq!(ctx.x[0], 0x55);
    assert_eq!(ctx.pc, ENTRY + 4, "WFI completed");
}

#[test]
fn memory_faults_and_mmio() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    // Translation fault, write, inside memory.
    script(&h, abort(0x9200_0047, 0x4010_0008));
    assert_eq!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::MemFault {
            gfn: hypercalls::Gfn::new(0x40100).unwrap(),
            access: Access::Write,
            kind: FaultKind::Unmapped,
        })
    );
    // Permission fault, write.
    script(&h, abort(0x9200_004f, 0x4010_0008));
    assert!(matches!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::MemFault {
            kind: FaultKind::Permission,
            ..
        })
    ));
    assert_eq!(runtime_counters(&h, vm).faults, 2);
    // ldr w3, [..] at 0x0900_0000 (outside memory): an MMIO read.
    let esr = 0x9200_0000 | (1 << 24) | (2 << 22) | (3 << 16) | 0x07;
    script(&h, abort(esr, 0x0900_0000));
    let pc = h.platform().context(state(&h, vm, 0)).pc;
    assert_eq!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::Mmio {
            ipa: 0x0900_0000,
            size: MmioSize::new(4).unwrap(),
            write: false,
            data: 0,
        })
    );
    // The next run completes the load with x3 of the call (truncated).
    assert_eq!(
        run_vcpu(&h, vm, 0, 0xffff_ffff_1234_5678),
        Ok(VcpuExit::Interrupted)
    );
    let ctx = h.platform().context(state(&h, vm, 0));
    assert_eq!(ctx.x[3], 0x1234_5678);
    assert_eq!(ctx.pc, pc + 4);
    // A later run's x3 is ignored.
    assert_eq!(run_vcpu(&h, vm, 0, 99), Ok(VcpuExit::Interrupted));
    assert_eq!(h.platform().context(state(&h, vm, 0)).x[3], 0x1234_5678);
    assert_eq!(h.bugs(), 0);
}

#[test]
fn whole_ipa_space_is_memory_without_a_range() {
    let h = hyp();
    let vm = super::create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 4);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    let esr = 0x9200_0000 | (1 << 24) | (2 << 22) | (3 << 16) | 0x07;
    script(&h, abort(esr, 0x0900_0000));
    assert!(matches!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::MemFault {
            kind: FaultKind::Unmapped,
            access: Access::Read,
            ..
        })
    ));
}

#[test]
fn psci_cpu_on_off_and_affinity() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    create_vcpu(&h, vm, 1, VcpuStart::Off);
    assert_eq!(run_vcpu(&h, vm, 1, 0), Ok(VcpuExit::PoweredOff));
    assert_eq!(
        h.platform().entries().len(),
        0,
        "an off vCPU is not entered"
    );
    // vCPU 0: AFFINITY_INFO(1) = off, CPU_ON(1), CPU_ON(1) again, a bad
    // target; all answered without the host, then the IRQ.
    script(&h, hvc(psci(psci::PSCI_AFFINITY_INFO_64, 1, 0, 0)));
    script(&h, hvc(psci(psci::PSCI_CPU_ON_64, 1, 0x4009_0000, 9)));
    script(&h, hvc(psci(psci::PSCI_CPU_ON_64, 1, 0x4009_0000, 9)));
    script(&h, hvc(psci(psci::PSCI_CPU_ON_64, 0x100, 0, 0)));
    script(&h, hvc(psci(psci::PSCI_AFFINITY_INFO_64, 1, 0, 0)));
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Interrupted));
    assert_eq!(runtime_counters(&h, vm).hyp_exits, 5);
    // The answers went into x0 one after the other: the fake logs only PCs,
    // so check the last one and the effect.
    let ctx0 = h.platform().context(state(&h, vm, 0));
    assert_eq!(ctx0.x[0], 2, "AFFINITY_INFO: on pending");
    assert_eq!(ctx0.x[1], 1, "PSCI leaves x1.. alone");
    // vCPU 1 starts where CPU_ON said.
    assert_eq!(run_vcpu(&h, vm, 1, 0), Ok(VcpuExit::Interrupted));
    let last = *h.platform().entries().last().unwrap();
    assert_eq!(last.1, 0x4009_0000);
    let ctx1 = h.platform().context(state(&h, vm, 1));
    assert_eq!(ctx1.x[0], 9);
    assert_eq!(ctx1.vmpidr & 0xff_ffff, 1);
    // CPU_ON of a running vCPU is ALREADY_ON.
    script(&h, hvc(psci(psci::PSCI_CPU_ON_64, 1, 0x4009_0000, 9)));
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Interrupted));
    assert_eq!(
        h.platform().context(state(&h, vm, 0)).x[0],
        psci::ret(psci::ALREADY_ON)
    );
    // vCPU 1 turns itself off; it stays off until the next CPU_ON.
    script(&h, hvc(psci(psci::PSCI_CPU_OFF, 0, 0, 0)));
    assert_eq!(run_vcpu(&h, vm, 1, 0), Ok(VcpuExit::PoweredOff));
    let n = h.platform().entries().len();
    assert_eq!(run_vcpu(&h, vm, 1, 0), Ok(VcpuExit::PoweredOff));
    assert_eq!(h.platform().entries().len(), n);
    h.check_invariants().unwrap();
}

#[test]
fn system_off_is_final() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    script(&h, hvc(psci(psci::PSCI_SYSTEM_OFF, 0, 0, 0)));
    assert_eq!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::SystemOff { reset: false })
    );
    let n = h.platform().entries().len();
    assert_eq!(
        run_vcpu(&h, vm, 0, 0),
        Ok(VcpuExit::SystemOff { reset: false })
    );
    assert_eq!(h.platform().entries().len(), n, "not entered again");
    // The guest's own shutdown call is an exit too (the host decides).
    create_vcpu(
        &h,
        vm,
        1,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    script(&h, hvc(GuestCall::Shutdown.encode()));
    assert_eq!(run_vcpu(&h, vm, 1, 0), Ok(VcpuExit::Shutdown));
}

#[test]
fn exits_answered_at_el2_are_bounded() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    for _ in 0..MAX_GUEST_ENTRIES + 5 {
        script(&h, hvc(GuestCall::Version.encode()));
    }
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Interrupted));
    assert_eq!(h.platform().scripted(), 5);
    let c = runtime_counters(&h, vm);
    assert_eq!(c.hyp_exits, u64::from(MAX_GUEST_ENTRIES));
    assert_eq!(c.irq_exits, 0, "the bound is not an interrupt");
    // A hostile call gets an error in x0 and no exit.
    script(&h, hvc([0xc600_01ff, 0, 0, 0, 0, 0, 0, 0]));
    script(&h, hvc([0xc600_0101, 17, 0, 0, 0, 0, 0, 0]));
    assert_eq!(run_vcpu(&h, vm, 0, 0), Ok(VcpuExit::Interrupted));
}

#[test]
fn last_ran_flushes_the_local_tlb() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    create_vcpu(
        &h,
        vm,
        1,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    let flush = |h: &FakeHyp| h.platform().entries().last().unwrap().0.flush_local_tlb;
    h.platform().set_cpu(0);
    run_vcpu(&h, vm, 0, 0).unwrap();
    assert!(!flush(&h), "first vCPU on this CPU");
    run_vcpu(&h, vm, 0, 0).unwrap();
    assert!(!flush(&h), "same vCPU again");
    run_vcpu(&h, vm, 1, 0).unwrap();
    assert!(flush(&h), "vCPU 0 ran here last");
    h.platform().set_cpu(1);
    run_vcpu(&h, vm, 0, 0).unwrap();
    assert!(!flush(&h), "nothing of the VM ran on CPU 1");
    h.platform().set_cpu(0);
    run_vcpu(&h, vm, 1, 0).unwrap();
    assert!(!flush(&h), "vCPU 1 ran here last");
    // Only the first entry of a run flushes.
    h.platform().set_cpu(1);
    for _ in 0..3 {
        script(&h, hvc(GuestCall::Version.encode()));
    }
    run_vcpu(&h, vm, 1, 0).unwrap();
    let e = h.platform().entries();
    let tail: Vec<bool> = e[e.len() - 4..]
        .iter()
        .map(|x| x.0.flush_local_tlb)
        .collect();
    assert_eq!(tail, [true, false, false, false]);
}

#[test]
fn a_cpu_index_out_of_range_always_flushes() {
    let h = hyp();
    let vm = vm(&h);
    create_vcpu(
        &h,
        vm,
        0,
        VcpuStart::On {
            entry: ENTRY,
            arg: 0,
        },
    );
    h.platform().set_cpu(usize::MAX);
    run_vcpu(&h, vm, 0, 0).unwrap();
    run_vcpu(&h, vm, 0, 0).unwrap();
    assert!(h.platform().entries().iter().all(|e| e.0.flush_local_tlb));
    let _ = pfn;
}
