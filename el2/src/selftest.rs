//! Boot-time guest self-test (cargo feature `selftest-guest`, off by default).
//!
//! Before the host boots, the boot CPU runs the guest payload (`qemu/guest`)
//! as a VM of its own: a 40-bit IPA stage-2 built from the hyp heap, guest
//! RAM at IPA [`GUEST_RAM_BASE`] mapped page by page on the guest's stage-2
//! faults, the image copied in from where QEMU's loader put it
//! ([`GUEST_LOAD_ADDR`]). Every exit goes through `el2::vcpu::decode_exit`
//! and `GuestExit::complete`, exactly as `HYP_VCPU_RUN` will, and is
//! serviced here the way the host would: faults map a zeroed page (or the
//! image's), console writes are printed, shutdown ends the run. It runs the
//! fill mode, then the touch mode for a few reports, prints a summary line
//! per run and frees everything before the host boots.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::arch::asm;

use aarch64_cpu::registers::{
    Readable, Writeable, CNTPCT_EL0, ID_AA64MMFR0_EL1, TPIDR_EL1, VTTBR_EL2,
};
use hypercalls::VcpuExit;
use log::{info, warn};
use spin::Mutex;
use stage2::mm::{Table, TableMemory};
use stage2::pgtable::{Attrs, Granule, MemType, PageState, Perms, Stage2};
use stage2::tlb::TlbMaintenance;
use stage2::{Hpa, Ipa, Vmid, PAGE_SIZE};

use crate::arch;
use crate::arch::vcpu::VcpuRun;
use el2::dtb::Platform;
use el2::vcpu::{decode_exit, FpState, GuestExit, GuestPsci, LastRan, Resume, VcpuContext};

/// Where the runner's `-device loader` puts the guest image (host RAM,
/// unused until the host boots).
pub const GUEST_LOAD_ADDR: u64 = 0x6000_0000;
/// Guest RAM in the guest's IPA space (qemu/guest's `GUEST_RAM_BASE`).
pub const GUEST_RAM_BASE: u64 = 0x4000_0000;
/// Guest RAM size: faults above it are not memory.
pub const GUEST_RAM_SIZE: u64 = 64 << 20;
/// Where the image runs (qemu/guest's linker.ld).
const GUEST_IMAGE_IPA: u64 = GUEST_RAM_BASE + 0x8_0000;
/// VMID of the self-test VM (VM slots use 1..=16).
const SELFTEST_VMID: u16 = 255;
/// IPA size of the self-test VM.
const IPA_BITS: u8 = 40;
/// The guest's test device (qemu/guest `MMIO_TEST_BASE`, 4 KiB).
const MMIO_TEST_BASE: u64 = 0x0a00_0000;
/// Bound on exits per run.
const MAX_EXITS: u64 = 1 << 20;
/// PSCI 1.0, as reported to guests.
const PSCI_VERSION: u64 = 0x1_0000;

/// Zeroed pages from the heap, all given back on drop.
#[derive(Default)]
struct HeapPages {
    /// (address, pages) of every block handed out and not freed.
    blocks: Vec<(u64, usize)>,
}

impl HeapPages {
    fn alloc(&mut self, count: usize) -> Option<Hpa> {
        let layout =
            Layout::from_size_align(count * PAGE_SIZE as usize, count * PAGE_SIZE as usize).ok()?;
        self.blocks.try_reserve(1).ok()?;
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        self.blocks.push((p as u64, count));
        Some(Hpa::new(p as u64))
    }

    fn free(&mut self, base: Hpa) {
        if let Some(i) = self.blocks.iter().position(|&(a, _)| a == base.raw()) {
            let (a, count) = self.blocks.swap_remove(i);
            free_block(a, count);
        }
    }

    fn check(&self, pa: Hpa) {
        let pa = pa.raw();
        let ok = pa.is_multiple_of(PAGE_SIZE)
            && self
                .blocks
                .iter()
                .any(|&(a, n)| pa >= a && pa < a + n as u64 * PAGE_SIZE);
        if !ok {
            // The stage2 crate only passes addresses this pool handed out.
            panic!("table address {pa:#x} not from the self-test pool");
        }
    }
}

fn free_block(addr: u64, count: usize) {
    if let Ok(layout) =
        Layout::from_size_align(count * PAGE_SIZE as usize, count * PAGE_SIZE as usize)
    {
        // SAFETY: (addr, count) came from alloc_zeroed with this layout and
        // is removed from the list, so it is freed once.
        unsafe { dealloc(addr as *mut u8, layout) };
    }
}

impl Drop for HeapPages {
    fn drop(&mut self) {
        for &(a, n) in &self.blocks {
            free_block(a, n);
        }
    }
}

impl TableMemory for HeapPages {
    fn available(&self) -> usize {
        usize::MAX / 2
    }

    fn alloc_table(&mut self) -> Option<Hpa> {
        self.alloc(1)
    }

    fn free_table(&mut self, table: Hpa) {
        self.free(table);
    }

    fn alloc_contiguous(&mut self, count: usize) -> Option<Hpa> {
        if count == 0 {
            return None;
        }
        self.alloc(count)
    }

    fn free_contiguous(&mut self, base: Hpa, _count: usize) {
        self.free(base);
    }

    fn table(&self, table: Hpa) -> &Table {
        self.check(table);
        // SAFETY: a zeroed, page-aligned heap page this pool owns (checked),
        // identity-mapped at EL2; only the one Stage2 owning the pool
        // reaches it, through &self.
        unsafe { &*(table.raw() as *const Table) }
    }

    fn table_mut(&mut self, table: Hpa) -> &mut Table {
        self.check(table);
        // SAFETY: as in `table`; `&mut self` makes it exclusive.
        unsafe { &mut *(table.raw() as *mut Table) }
    }
}

/// Stage-2 TLB maintenance for the self-test VM: loads its VTTBR around
/// each invalidation (the instructions act on the current VMID).
struct SelftestTlb {
    vttbr: u64,
}

impl SelftestTlb {
    fn flush_vmid(&self) {
        let saved = VTTBR_EL2.get();
        // SAFETY: switches VTTBR_EL2 to the self-test VM only for the TLBI
        // (nothing runs at EL1 meanwhile) and puts it back.
        unsafe {
            asm!(
                "msr vttbr_el2, {vm}",
                "isb",
                "tlbi vmalls12e1is",
                "dsb ish",
                "msr vttbr_el2, {saved}",
                "isb",
                vm = in(reg) self.vttbr,
                saved = in(reg) saved,
                options(nostack)
            )
        };
    }
}

impl TlbMaintenance for SelftestTlb {
    fn sync_writes(&mut self) {
        crate::arch::tlbi::sync_writes();
    }

    fn invalidate_ipa(&mut self, _vmid: Vmid, _ipa: Ipa, _level: u8) {
        self.flush_vmid();
    }

    fn invalidate_vmid(&mut self, _vmid: Vmid) {
        self.flush_vmid();
    }
}

/// The self-test VM: its stage-2, guest pages and image.
struct Vm {
    s2: Stage2<HeapPages, SelftestTlb>,
    vtcr: u64,
    pages: HeapPages,
    image: Vec<u8>,
}

const RAM_ATTRS: Attrs = Attrs {
    perms: Perms::RWX,
    mem: MemType::Normal,
    state: PageState::Owned,
};

fn in_memory(ipa: u64) -> bool {
    (GUEST_RAM_BASE..GUEST_RAM_BASE + GUEST_RAM_SIZE).contains(&ipa)
}

impl Vm {
    fn new(image: Vec<u8>) -> Option<Self> {
        let pa_range = (ID_AA64MMFR0_EL1.get() & 0xf) as u8;
        let mut s2 = Stage2::new(
            IPA_BITS,
            Vmid(SELFTEST_VMID),
            HeapPages::default(),
            SelftestTlb { vttbr: 0 },
        )
        .ok()?;
        let vttbr = s2.vttbr();
        s2.tlb_mut().vttbr = vttbr;
        let vtcr = stage2::vtcr::vtcr_el2(s2.config(), pa_range.min(5)).ok()?;
        Some(Self {
            s2,
            vtcr,
            pages: HeapPages::default(),
            image,
        })
    }

    fn run_regs(&self, flush_local_tlb: bool, gicr_sgi: Option<u64>) -> VcpuRun {
        VcpuRun {
            vttbr: self.s2.vttbr(),
            vtcr: self.vtcr,
            flush_local_tlb,
            gicr_sgi,
        }
    }

    /// Maps a page at the faulting IPA: a copy of the image's bytes there,
    /// or zeroes. What the host does with `HYP_DONATE`.
    fn fault_in(&mut self, ipa: u64) -> bool {
        let ipa = ipa & !(PAGE_SIZE - 1);
        if self.s2.query(Ipa::new(ipa)).is_some() {
            return true; // A permission fault would loop: not expected here.
        }
        let Some(page) = self.pages.alloc(1) else {
            return false;
        };
        if let Some(off) = ipa.checked_sub(GUEST_IMAGE_IPA) {
            let off = off as usize;
            if off < self.image.len() {
                let n = (self.image.len() - off).min(PAGE_SIZE as usize);
                // SAFETY: `page` is a fresh, zeroed, page-sized heap block;
                // the source range is inside `image`.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        self.image.as_ptr().add(off),
                        page.raw() as *mut u8,
                        n,
                    )
                };
            }
        }
        self.s2
            .map(Ipa::new(ipa), page, PAGE_SIZE, RAM_ATTRS, Granule::Page)
            .is_ok()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // No stale entry of the VMID may outlive its pages.
        self.s2.tlb().flush_vmid();
    }
}

/// Statistics of one run.
#[derive(Debug, Default)]
struct Stats {
    exits: u64,
    faults: u64,
    console: u64,
    interrupts: u64,
    hyp_handled: u64,
    tlb_flushes: u64,
    mmio: u64,
    /// Runs after which the host's EL1/FP state was not as before.
    host_clobbered: u64,
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Shutdown,
    Trap(VcpuExit),
    NoMemory(u64),
    TooManyExits,
    BadMmio(u64),
    CpuOff,
    /// The host stopped running the vCPU after enough timer interrupts.
    Preempted,
    /// The host stopped running the vCPU after enough console lines.
    Stopped,
}

/// What the "host" does besides serving exits.
#[derive(Default)]
struct RunOpts {
    /// Keep a host timer armed (preemption test).
    preempt: Option<Preempt>,
    /// Stop running the vCPU after this many complete console lines.
    max_lines: Option<usize>,
}

/// A fake host timer for the preemption test: the "host" arms its
/// virtual timer `period` ticks ahead before each run, as Linux would have
/// a tick pending, and stops the vCPU after `stop_after` interrupts.
struct Preempt {
    period: u64,
    stop_after: u64,
    gicr_sgi: u64,
}

impl Preempt {
    fn arm_host_timer(&self) {
        let now = aarch64_cpu::registers::CNTVCT_EL0.get();
        // SAFETY: the host's virtual timer; no host runs yet, and IRQs are
        // masked at EL2 (its interrupt is not enabled at the GIC either).
        unsafe {
            asm!(
                "msr cntv_cval_el0, {cval}",
                "msr cntv_ctl_el0, {one}",
                "isb",
                cval = in(reg) now + self.period,
                one = in(reg) 1u64,
                options(nostack)
            )
        };
    }
}

fn write_sysreg_cntv_ctl(v: u64) {
    // SAFETY: disables the fake host timer of the preemption test.
    unsafe { asm!("msr cntv_ctl_el0, {}", "isb", in(reg) v, options(nostack)) };
}

/// The test device: a read of an offset gives the last value written
/// there, or qemu/guest's `mmio_test_value(off)`.
#[derive(Default)]
struct TestDevice {
    written: Vec<(u64, u64)>,
}

impl TestDevice {
    fn read(&self, off: u64) -> u64 {
        self.written
            .iter()
            .rev()
            .find(|&&(o, _)| o == off)
            .map_or(0x1122_3344_5566_7788 ^ off, |&(_, v)| v)
    }
}

/// Sets a recognisable host EL1/FP state (what a host would have).
fn host_probe_set(seed: u64) -> FpState {
    let mut fp = FpState::default();
    for (i, v) in fp.v.iter_mut().enumerate() {
        *v = u128::from(seed ^ i as u64) << 64 | u128::from(!seed);
    }
    fp.fpcr = 0x0040_0000; // RMode = round towards plus infinity
    arch::vcpu::fp_load(&fp);
    TPIDR_EL1.set(seed);
    fp
}

/// Whether the host state is still what [`host_probe_set`] set.
fn host_probe_ok(seed: u64, fp: &FpState) -> bool {
    let mut now = FpState::default();
    arch::vcpu::fp_save(&mut now);
    now.v == fp.v && now.fpcr == fp.fpcr && TPIDR_EL1.get() == seed
}

/// Starts another vCPU for a guest's PSCI CPU_ON: (target MPIDR, entry,
/// context) to a PSCI return code.
type CpuOn<'a> = &'a mut dyn FnMut(u64, u64, u64) -> i64;

/// Runs one vCPU of `vm` on physical CPU `cpu` until it shuts down (or,
/// for a secondary vCPU, calls CPU_OFF), serving its exits like the host
/// would. Returns how it ended, the stats and the guest's lines.
fn run(
    vm: &Mutex<Vm>,
    last: &Mutex<LastRan>,
    ctx: &mut VcpuContext,
    vcpu: u16,
    cpu: usize,
    cpu_on: CpuOn<'_>,
    opts: &RunOpts,
) -> (End, Stats, Vec<String>) {
    let preempt = opts.preempt.as_ref();
    let mut stats = Stats::default();
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut dev = TestDevice::default();
    let end = loop {
        if stats.exits >= MAX_EXITS {
            break End::TooManyExits;
        }
        // The VM lock is not held while the vCPU runs (DESIGN.md §6).
        let flush = last.lock().load(cpu, vcpu);
        let regs = vm.lock().run_regs(flush, preempt.map(|p| p.gicr_sgi));
        stats.tlb_flushes += u64::from(flush);
        if let Some(p) = preempt {
            if stats.interrupts >= p.stop_after {
                break End::Preempted;
            }
            if stats.console > 1000 {
                break End::TooManyExits; // the timer does not end runs
            }
            p.arm_host_timer();
        }
        if opts.max_lines.is_some_and(|m| lines.len() >= m) {
            break End::Stopped;
        }
        let seed = 0x4057_0000_0000 | stats.exits;
        let host_fp = host_probe_set(seed);
        let raw = arch::vcpu::run_vcpu(ctx, &regs);
        stats.host_clobbered += u64::from(!host_probe_ok(seed, &host_fp));
        if preempt.is_some() {
            write_sysreg_cntv_ctl(0);
        }
        stats.exits += 1;
        let exit = decode_exit(&raw, &ctx.args(), in_memory);
        match exit {
            GuestExit::Mmio(m) => {
                // What a VMM does with an MMIO exit.
                stats.mmio += 1;
                let Some(off) = m.ipa.checked_sub(MMIO_TEST_BASE).filter(|&o| o < PAGE_SIZE) else {
                    break End::BadMmio(m.ipa);
                };
                if m.write {
                    dev.written.push((off, m.write_data(ctx)));
                    ctx.skip_instruction();
                } else {
                    m.complete_read(ctx, dev.read(off));
                }
                continue;
            }
            GuestExit::Psci {
                call:
                    GuestPsci::CpuOn {
                        target,
                        entry,
                        context,
                    },
                smc,
            } => {
                // What the host's VMM does for an SMP guest.
                if smc {
                    ctx.skip_instruction();
                }
                ctx.x[0] = cpu_on(target, entry, context) as u64;
                stats.hyp_handled += 1;
                continue;
            }
            GuestExit::Psci {
                call: GuestPsci::CpuOff,
                ..
            } => break End::CpuOff,
            _ => {}
        }
        match exit.complete(ctx, PSCI_VERSION) {
            Resume::Guest => stats.hyp_handled += 1,
            // WFx: nothing to wait for here (no virtual interrupts); run again.
            Resume::Host(VcpuExit::Interrupted | VcpuExit::Wfx { .. }) => stats.interrupts += 1,
            Resume::Host(VcpuExit::MemFault { gfn, .. }) => {
                stats.faults += 1;
                if !vm.lock().fault_in(gfn.raw() << 12) {
                    break End::NoMemory(gfn.raw() << 12);
                }
            }
            Resume::Host(VcpuExit::Console(bytes)) => {
                stats.console += 1;
                for &b in bytes.as_bytes() {
                    if b == b'\n' {
                        lines.push(core::mem::take(&mut line));
                    } else {
                        line.push(char::from(b));
                    }
                }
            }
            Resume::Host(VcpuExit::Shutdown | VcpuExit::SystemOff { .. }) => break End::Shutdown,
            Resume::Host(other) => {
                if let GuestExit::Unhandled { esr, far } = exit {
                    info!(
                        "selftest: unhandled guest trap ESR {esr:#x} FAR {far:#x} at pc {:#x}",
                        ctx.pc
                    );
                }
                break End::Trap(other);
            }
        }
    };
    if !line.is_empty() {
        lines.push(line);
    }
    (end, stats, lines)
}

/// Reads the guest image QEMU loaded at [`GUEST_LOAD_ADDR`], if any.
fn load_image() -> Option<Vec<u8>> {
    // SAFETY: GUEST_LOAD_ADDR is host RAM (the runner gives >= 1 GiB),
    // identity-mapped at EL2; nothing uses it before the host boots. We
    // read the 64-byte header, then at most 1 MiB.
    let header = unsafe { core::slice::from_raw_parts(GUEST_LOAD_ADDR as *const u8, 64) };
    if header.get(0x38..0x3c) != Some(b"ARM\x64".as_slice()) {
        return None;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[16..24]);
    let size = u64::from_le_bytes(size) as usize;
    if !(64..=(1 << 20)).contains(&size) {
        return None;
    }
    // SAFETY: as above, `size` bounded.
    Some(unsafe { core::slice::from_raw_parts(GUEST_LOAD_ADDR as *const u8, size) }.to_vec())
}

/// Fill mode, N MiB.
const fn fill_arg(mib: u64) -> u64 {
    1 | mib << 16
}

/// SMP mode, N MiB split between two vCPUs.
const fn smp_arg(mib: u64) -> u64 {
    4 | mib << 16
}

/// Touch mode, N MiB, `reports` reports of 2^`log2` passes each.
const fn touch_arg(mib: u64, reports: u64, log2: u64) -> u64 {
    2 | mib << 16 | reports << 32 | log2 << 48
}

fn report(name: &str, vcpu: u16, passed: bool, end: &End, stats: &Stats, lines: &[String]) {
    for l in lines {
        info!("selftest vcpu{vcpu}: {l}");
    }
    info!(
        "selftest: {name}: {} ({end:?}; {} exits: {} stage-2 faults, {} console, {} MMIO, {} interrupts/WFI, {} answered at EL2, {} local TLB flushes, {} host-state mismatches)",
        if passed { "PASS" } else { "FAIL" },
        stats.exits,
        stats.faults,
        stats.console,
        stats.mmio,
        stats.interrupts,
        stats.hyp_handled,
        stats.tlb_flushes,
        stats.host_clobbered,
    );
}

/// A vCPU handed to another physical CPU, and what came back.
struct Job {
    vm: Arc<Mutex<Vm>>,
    last: Arc<Mutex<LastRan>>,
    ctx: VcpuContext,
    vcpu: u16,
    opts: RunOpts,
    result: Option<(End, Stats, Vec<String>)>,
}

/// What came back from the secondary CPU: the run's outcome and the
/// vCPU's context (to run it elsewhere next).
type Outcome = ((End, Stats, Vec<String>), VcpuContext);

/// The job of the secondary physical CPU (at most one at a time).
static JOB: Mutex<Option<Job>> = Mutex::new(None);

/// Entry of a secondary physical CPU that the self-test started (from
/// `secondary_main` while no host exists yet): runs the job's vCPU, leaves
/// the result and powers the CPU off again, so the host can start it.
pub fn secondary(cpu: usize) -> ! {
    let job = JOB.lock().take();
    if let Some(mut job) = job {
        let mut no_more = |_: u64, _: u64, _: u64| i64::from(el2::psci::NOT_SUPPORTED);
        let r = run(
            &job.vm,
            &job.last,
            &mut job.ctx,
            job.vcpu,
            cpu,
            &mut no_more,
            &job.opts,
        );
        job.result = Some(r);
        *JOB.lock() = Some(job);
    }
    arch::smc([u64::from(smccc::psci::PSCI_CPU_OFF), 0, 0, 0]);
    arch::park()
}

/// Starts physical CPU `cpu` (MPIDR `mpidr`) on vCPU `vcpu` of the VM.
fn start_secondary(
    vm: &Arc<Mutex<Vm>>,
    last: &Arc<Mutex<LastRan>>,
    ctx: VcpuContext,
    vcpu: u16,
    opts: RunOpts,
    (cpu, mpidr): (usize, u64),
) -> i64 {
    {
        let mut job = JOB.lock();
        if job.is_some() {
            return i64::from(el2::psci::ALREADY_ON);
        }
        *job = Some(Job {
            vm: vm.clone(),
            last: last.clone(),
            ctx,
            vcpu,
            opts,
            result: None,
        });
    }
    let r = arch::smc([
        u64::from(smccc::psci::PSCI_CPU_ON_64),
        mpidr,
        arch::secondary_entry_pa(),
        cpu as u64,
    ])[0] as i64;
    if r != 0 {
        *JOB.lock() = None;
    }
    r
}

/// Waits (bounded) for the secondary's result and for it to be off.
fn collect_secondary(mpidr: u64) -> Option<Outcome> {
    let freq = aarch64_cpu::registers::CNTFRQ_EL0.get();
    let deadline = CNTPCT_EL0.get() + 30 * freq;
    let result = loop {
        {
            let mut job = JOB.lock();
            if job.as_ref().is_some_and(|j| j.result.is_some()) {
                break job.take().and_then(|j| Some((j.result?, j.ctx)));
            }
        }
        if CNTPCT_EL0.get() > deadline {
            return None;
        }
        core::hint::spin_loop();
    };
    // AFFINITY_INFO: 1 = OFF.
    while arch::smc([u64::from(smccc::psci::PSCI_AFFINITY_INFO_64), mpidr, 0, 0])[0] != 1 {
        if CNTPCT_EL0.get() > deadline {
            return None;
        }
        core::hint::spin_loop();
    }
    result
}

/// Two vCPUs of one VM on two physical CPUs at once: vCPU 0 here, vCPU 1
/// (started by the guest's PSCI CPU_ON) on the next CPU.
fn run_smp(image: Vec<u8>, cpus: &[u64], cpu: usize) -> bool {
    let Some(other) = (0..cpus.len().min(el2::layout::MAX_CPUS)).find(|&c| c != cpu) else {
        info!("selftest: smp: skipped (one CPU)");
        return true;
    };
    let Some(vm) = Vm::new(image) else {
        return false;
    };
    let cntvoff = CNTPCT_EL0.get();
    let vm = Arc::new(Mutex::new(vm));
    let last = Arc::new(Mutex::new(LastRan::new()));
    let mut ctx = VcpuContext::new(GUEST_IMAGE_IPA, smp_arg(4), 0, cntvoff);
    let mut started = false;
    let mut cpu_on = |target: u64, entry: u64, context: u64| -> i64 {
        if target != 1 || started {
            return i64::from(el2::psci::INVALID_PARAMETERS);
        }
        started = true;
        let ctx1 = VcpuContext::new(entry, context, 1, cntvoff);
        start_secondary(
            &vm,
            &last,
            ctx1,
            1,
            RunOpts::default(),
            (other, cpus[other]),
        )
    };
    let (end, stats, lines) = run(
        &vm,
        &last,
        &mut ctx,
        0,
        cpu,
        &mut cpu_on,
        &RunOpts::default(),
    );
    let second = collect_secondary(cpus[other]);
    let passed0 = end == End::Shutdown
        && stats.host_clobbered == 0
        && lines
            .iter()
            .any(|l| l.contains("both halves") && l.ends_with("PASS"));
    report("smp vcpu0", 0, passed0, &end, &stats, &lines);
    let passed1 = match &second {
        Some(((end, stats, lines), _)) => {
            let p = *end == End::CpuOff
                && stats.host_clobbered == 0
                && lines
                    .iter()
                    .any(|l| l.contains("vcpu1") && l.ends_with("PASS"));
            report(
                &alloc::format!("smp vcpu1 on physical CPU {other}"),
                1,
                p,
                end,
                stats,
                lines,
            );
            p
        }
        None => {
            warn!("selftest: smp: vCPU 1 did not finish");
            false
        }
    };
    passed0 && passed1
}

/// Preemption: the guest loops forever (touch mode); the "host" timer,
/// carried by CNTHP while the guest runs, must end runs with physical IRQ
/// exits. Needs the GIC, which nobody has set up yet: this turns on the
/// distributor, this CPU's redistributor, PPI 26 and the CPU interface,
/// and turns the interface and PPI 26 off again (the host's GIC driver
/// initialises everything else itself).
fn run_preempt(image: Vec<u8>, plat: &Platform, cpu: usize) -> bool {
    let (Some(gicd), Some(gicr)) = (plat.gic.first(), plat.gic.get(1)) else {
        info!("selftest: preempt: skipped (no GICv3 in the device tree)");
        return true;
    };
    let Some(sgi) = arch::vcpu::find_redistributor(gicr.base, gicr.size) else {
        warn!("selftest: preempt: no redistributor for this CPU");
        return false;
    };
    gic_on(gicd.base, sgi);
    let Some(vm) = Vm::new(image) else {
        return false;
    };
    let vm = Mutex::new(vm);
    let last = Mutex::new(LastRan::new());
    let freq = aarch64_cpu::registers::CNTFRQ_EL0.get();
    let stop_after = 20;
    let opts = RunOpts {
        preempt: Some(Preempt {
            period: freq / 1000,
            stop_after,
            gicr_sgi: sgi,
        }),
        max_lines: None,
    };
    let mut ctx = VcpuContext::new(GUEST_IMAGE_IPA, touch_arg(1, 0, 6), 0, CNTPCT_EL0.get());
    let mut no_smp = |_: u64, _: u64, _: u64| i64::from(el2::psci::NOT_SUPPORTED);
    let (end, stats, lines) = run(&vm, &last, &mut ctx, 0, cpu, &mut no_smp, &opts);
    gic_off(sgi);
    let passed = end == End::Preempted
        && stats.interrupts >= stop_after
        && stats.host_clobbered == 0
        && lines.iter().any(|l| l.contains("passes"));
    report(
        "preempt (host timer ends runs)",
        0,
        passed,
        &end,
        &stats,
        &lines,
    );
    passed
}

const GICD_CTLR: u64 = 0x0;
const GICD_CTLR_RWP: u32 = 1 << 31;
/// ARE | EnableGrp1 (NS) | EnableGrp1A/Grp0, as Linux writes it.
const GICD_CTLR_ON: u32 = (1 << 4) | (1 << 1) | (1 << 0);
const GICR_WAKER: u64 = 0x14;
const SGI_IGROUPR0: u64 = 0x80;
const SGI_ISENABLER0: u64 = 0x100;
const SGI_ICENABLER0: u64 = 0x180;
const SGI_IPRIORITYR: u64 = 0x400;

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: a GIC register (device memory below 1 GiB, mapped at EL2).
    unsafe { (addr as *const u32).read_volatile() }
}

fn mmio_write(addr: u64, v: u32) {
    // SAFETY: as mmio_read; nothing but this self-test uses the GIC yet.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

fn spin_until(f: impl Fn() -> bool) {
    for _ in 0..1_000_000 {
        if f() {
            return;
        }
        core::hint::spin_loop();
    }
}

fn gic_on(gicd: u64, sgi: u64) {
    let rd = sgi - 0x1_0000;
    mmio_write(gicd + GICD_CTLR, mmio_read(gicd + GICD_CTLR) | GICD_CTLR_ON);
    spin_until(|| mmio_read(gicd + GICD_CTLR) & GICD_CTLR_RWP == 0);
    // Wake the redistributor (ProcessorSleep off, wait for ChildrenAsleep).
    mmio_write(rd + GICR_WAKER, mmio_read(rd + GICR_WAKER) & !(1 << 1));
    spin_until(|| mmio_read(rd + GICR_WAKER) & (1 << 2) == 0);
    let ppi = arch::vcpu::HYP_TIMER_PPI;
    mmio_write(
        sgi + SGI_IGROUPR0,
        mmio_read(sgi + SGI_IGROUPR0) | (1 << ppi),
    );
    let prio = sgi + SGI_IPRIORITYR + u64::from(ppi & !3);
    let shift = (ppi & 3) * 8;
    mmio_write(prio, (mmio_read(prio) & !(0xff << shift)) | (0xa0 << shift));
    mmio_write(sgi + SGI_ISENABLER0, 1 << ppi);
    // SAFETY: the physical CPU interface: system register access on
    // (ICC_SRE_EL2.SRE|Enable), all priorities, group 1 on. IRQs stay
    // masked at EL2 (PSTATE.I), so they only end guest runs.
    unsafe {
        asm!(
            "msr S3_4_C12_C9_5, {sre}", // ICC_SRE_EL2
            "isb",
            "msr S3_0_C4_C6_0, {pmr}",  // ICC_PMR_EL1
            "msr S3_0_C12_C12_7, {one}", // ICC_IGRPEN1_EL1
            "isb",
            sre = in(reg) 0x9u64,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nostack)
        )
    };
}

fn gic_off(sgi: u64) {
    mmio_write(sgi + SGI_ICENABLER0, 1 << arch::vcpu::HYP_TIMER_PPI);
    // SAFETY: group 1 interrupts off at the CPU interface again.
    unsafe { asm!("msr S3_0_C12_C12_7, xzr", "isb", options(nostack)) };
}

/// Guest probes of things it must not reach: PMU, debug registers, SVE,
/// the physical timer, ACTLR_EL1. Each must end the VM with an
/// unhandled-trap exit of the expected class (or, for SVE on a CPU
/// without it, an undefined-instruction exception inside the guest).
fn run_probes(image: &[u8], cpu: usize) -> bool {
    let has_sve = (aarch64_cpu::registers::ID_AA64PFR0_EL1.get() >> 32) & 0xf != 0;
    let mut ok = true;
    for (n, name, ec) in [
        (1u64, "PMU (PMCR_EL0)", 0x18u64),
        (2, "debug (MDSCR_EL1)", 0x18),
        (3, "SVE (rdvl)", 0x19),
        (4, "physical timer (CNTP_CTL_EL0)", 0x18),
        (5, "ACTLR_EL1", 0x18),
    ] {
        let Some(vm) = Vm::new(image.to_vec()) else {
            return false;
        };
        let vm = Mutex::new(vm);
        let last = Mutex::new(LastRan::new());
        let mut ctx = VcpuContext::new(GUEST_IMAGE_IPA, 5 | n << 16, 0, CNTPCT_EL0.get());
        let mut no_smp = |_: u64, _: u64, _: u64| i64::from(el2::psci::NOT_SUPPORTED);
        let (end, stats, lines) = run(
            &vm,
            &last,
            &mut ctx,
            0,
            cpu,
            &mut no_smp,
            &RunOpts::default(),
        );
        let passed = match &end {
            End::Trap(VcpuExit::UnhandledTrap { esr, .. }) => esr >> 26 == ec,
            End::Shutdown if n == 3 && !has_sve => lines.iter().any(|l| l.contains("exception")),
            _ => false,
        } && !lines.iter().any(|l| l.contains("allowed"));
        ok &= passed;
        report(
            &alloc::format!("probe {name}"),
            0,
            passed,
            &end,
            &stats,
            &lines,
        );
    }
    ok
}

/// The last "passes N" count in a vCPU's lines.
fn last_passes(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.rsplit_once("passes ").and_then(|(_, n)| n.parse().ok()))
}

/// The guest's secondary-vCPU entry (offset at 0x30 of its header).
fn secondary_entry_ipa(image: &[u8]) -> Option<u64> {
    let mut off = [0u8; 8];
    off.copy_from_slice(image.get(0x30..0x38)?);
    let off = u64::from_le_bytes(off);
    (off != 0 && off < image.len() as u64).then_some(GUEST_IMAGE_IPA + off)
}

/// vCPU migration and the local TLB flush: vCPU 0 of a touch-mode VM
/// runs here, then on the other physical CPU, then vCPU 1 of the same VM
/// runs here (this CPU's entries of the VMID must be flushed first), then
/// vCPU 0 comes back here (flushed again). vCPU 0's pass count must keep
/// growing across the moves: its whole state went with it.
fn run_migrate(image: Vec<u8>, cpus: &[u64], cpu: usize) -> bool {
    let Some(other) = (0..cpus.len().min(el2::layout::MAX_CPUS)).find(|&c| c != cpu) else {
        info!("selftest: migrate: skipped (one CPU)");
        return true;
    };
    let Some(entry1) = secondary_entry_ipa(&image) else {
        warn!("selftest: migrate: the guest image has no secondary entry");
        return false;
    };
    let Some(vm) = Vm::new(image) else {
        return false;
    };
    let vm = Arc::new(Mutex::new(vm));
    let last = Arc::new(Mutex::new(LastRan::new()));
    let cntvoff = CNTPCT_EL0.get();
    let arg = touch_arg(1, 0, 4);
    let lines = |n| RunOpts {
        preempt: None,
        max_lines: Some(n),
    };
    let mut no_smp = |_: u64, _: u64, _: u64| i64::from(el2::psci::NOT_SUPPORTED);
    let mut ok = true;
    let mut counts = Vec::new();

    // 1. vCPU 0 here: its banner and two counts.
    let mut ctx0 = VcpuContext::new(GUEST_IMAGE_IPA, arg, 0, cntvoff);
    let (end, st, l) = run(&vm, &last, &mut ctx0, 0, cpu, &mut no_smp, &lines(3));
    ok &= end == End::Stopped && st.tlb_flushes == 0;
    counts.push(last_passes(&l));
    report("migrate: vcpu0 on CPU 0", 0, ok, &end, &st, &l);

    // 2. vCPU 0 on the other CPU.
    let r = start_secondary(&vm, &last, ctx0.clone(), 0, lines(2), (other, cpus[other]));
    match (r, collect_secondary(cpus[other])) {
        (0, Some(((end, st, l), ctx))) => {
            let p = end == End::Stopped && st.tlb_flushes == 0;
            ok &= p;
            counts.push(last_passes(&l));
            report(
                &alloc::format!("migrate: vcpu0 on CPU {other}"),
                0,
                p,
                &end,
                &st,
                &l,
            );
            ctx0 = ctx;
        }
        _ => {
            warn!("selftest: migrate: CPU {other} did not run vCPU 0 (CPU_ON {r})");
            return false;
        }
    }

    // 3. vCPU 1 here, where vCPU 0 ran last: a local flush.
    let mut ctx1 = VcpuContext::new(entry1, 1, 1, cntvoff);
    let (end, st, l) = run(&vm, &last, &mut ctx1, 1, cpu, &mut no_smp, &lines(2));
    let p = end == End::Stopped && st.tlb_flushes == 1 && last_passes(&l).is_some();
    ok &= p;
    report("migrate: vcpu1 on CPU 0", 1, p, &end, &st, &l);

    // 4. vCPU 0 back here: flushed again.
    let (end, st, l) = run(&vm, &last, &mut ctx0, 0, cpu, &mut no_smp, &lines(1));
    let p = end == End::Stopped && st.tlb_flushes == 1;
    ok &= p;
    counts.push(last_passes(&l));
    report("migrate: vcpu0 back on CPU 0", 0, p, &end, &st, &l);

    let growing = counts.iter().all(Option::is_some) && counts.windows(2).all(|w| w[0] < w[1]);
    info!(
        "selftest: migrate: vcpu0 pass counts {counts:?} {}",
        if growing {
            "grow across moves"
        } else {
            "do NOT grow"
        }
    );
    ok && growing
}

/// Runs the self-test on this (the boot) CPU, and on a second CPU if
/// there is one; `plat` is the parsed device tree. Returns whether
/// every run passed.
pub fn run_all(plat: &Platform) -> bool {
    let cpus = &plat.cpus;
    let cpu = cpus.iter().position(|&m| m == arch::mpidr()).unwrap_or(0);
    let Some(image) = load_image() else {
        warn!("selftest: no guest image at {GUEST_LOAD_ADDR:#x} (load qemu/guest with -device loader)");
        return false;
    };
    let mut ok = true;
    for (name, arg) in [
        ("fill 4 MiB", fill_arg(4)),
        ("touch 1 MiB", touch_arg(1, 3, 2)),
        ("exits", 3 | 1 << 16),
    ] {
        let Some(vm) = Vm::new(image.clone()) else {
            warn!("selftest: cannot build the guest stage-2");
            return false;
        };
        let vm = Mutex::new(vm);
        let last = Mutex::new(LastRan::new());
        let mut ctx = VcpuContext::new(GUEST_IMAGE_IPA, arg, 0, CNTPCT_EL0.get());
        let mut no_smp = |_: u64, _: u64, _: u64| i64::from(el2::psci::NOT_SUPPORTED);
        let (end, stats, lines) = run(
            &vm,
            &last,
            &mut ctx,
            0,
            cpu,
            &mut no_smp,
            &RunOpts::default(),
        );
        let passed = end == End::Shutdown
            && stats.host_clobbered == 0
            && match arg & 0xf {
                1 => lines.iter().any(|l| l.ends_with("PASS")),
                2 => lines.iter().filter(|l| l.contains("passes")).count() == 3,
                _ => lines
                    .iter()
                    .any(|l| l.contains("exits:") && l.ends_with(" 0 failed")),
            };
        ok &= passed;
        report(name, 0, passed, &end, &stats, &lines);
    }
    ok &= run_probes(&image, cpu);
    ok &= run_preempt(image.clone(), plat, cpu);
    ok &= run_smp(image.clone(), cpus, cpu);
    ok &= run_migrate(image, cpus, cpu);
    info!("selftest: {}", if ok { "all passed" } else { "FAILED" });
    ok
}
