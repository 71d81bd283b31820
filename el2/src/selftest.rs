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
use alloc::vec::Vec;
use core::arch::asm;

use aarch64_cpu::registers::{
    Readable, Writeable, CNTPCT_EL0, ID_AA64MMFR0_EL1, TPIDR_EL1, VTTBR_EL2,
};
use hypercalls::VcpuExit;
use log::{info, warn};
use stage2::mm::{Table, TableMemory};
use stage2::pgtable::{Attrs, Granule, MemType, PageState, Perms, Stage2};
use stage2::tlb::TlbMaintenance;
use stage2::{Hpa, Ipa, Vmid, PAGE_SIZE};

use crate::arch;
use crate::arch::vcpu::GuestStage2;
use el2::vcpu::{decode_exit, FpState, GuestExit, LastRan, Resume, VcpuContext};

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
        // SAFETY: a barrier.
        unsafe { asm!("dsb ishst", options(nostack)) };
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

    fn regs(&self) -> GuestStage2 {
        GuestStage2 {
            vttbr: self.s2.vttbr(),
            vtcr: self.vtcr,
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

/// Runs one vCPU of `vm` until it shuts down, serving its exits like the
/// host would. Returns how it ended, the stats and the guest's lines.
fn run(
    vm: &mut Vm,
    ctx: &mut VcpuContext,
    vcpu: u16,
    last: &mut LastRan,
    cpu: usize,
) -> (End, Stats, Vec<String>) {
    let mut stats = Stats::default();
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut dev = TestDevice::default();
    let end = loop {
        if stats.exits >= MAX_EXITS {
            break End::TooManyExits;
        }
        let flush = last.load(cpu, vcpu);
        stats.tlb_flushes += u64::from(flush);
        let seed = 0x4057_0000_0000 | stats.exits;
        let host_fp = host_probe_set(seed);
        let raw = arch::vcpu::run_vcpu(ctx, vm.regs(), flush);
        stats.host_clobbered += u64::from(!host_probe_ok(seed, &host_fp));
        stats.exits += 1;
        let exit = decode_exit(&raw, &ctx.args(), in_memory);
        if let GuestExit::Mmio(m) = exit {
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
        match exit.complete(ctx, PSCI_VERSION) {
            Resume::Guest => stats.hyp_handled += 1,
            Resume::Host(VcpuExit::Interrupted) => stats.interrupts += 1,
            Resume::Host(VcpuExit::MemFault { gfn, .. }) => {
                stats.faults += 1;
                if !vm.fault_in(gfn.raw() << 12) {
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
            Resume::Host(VcpuExit::Shutdown) => break End::Shutdown,
            Resume::Host(other) => {
                if let GuestExit::Unhandled { esr, far } = exit {
                    warn!(
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

/// Touch mode, N MiB, `reports` reports of 2^`log2` passes each.
const fn touch_arg(mib: u64, reports: u64, log2: u64) -> u64 {
    2 | mib << 16 | reports << 32 | log2 << 48
}

/// Runs the self-test on this (the boot) CPU; `cpus` are the MPIDRs of the
/// device tree. Returns whether every run passed.
pub fn run_all(cpus: &[u64]) -> bool {
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
        let Some(mut vm) = Vm::new(image.clone()) else {
            warn!("selftest: cannot build the guest stage-2");
            return false;
        };
        let mut ctx = VcpuContext::new(GUEST_IMAGE_IPA, arg, 0, CNTPCT_EL0.get());
        let mut last = LastRan::new();
        let (end, stats, lines) = run(&mut vm, &mut ctx, 0, &mut last, cpu);
        for l in &lines {
            info!("selftest vcpu0: {l}");
        }
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
        info!(
            "selftest: {name}: {} ({end:?}; {} exits: {} stage-2 faults, {} console, {} MMIO, {} interrupts/WFI, {} answered at EL2, {} local TLB flushes, {} host-state mismatches; {} guest pages)",
            if passed { "PASS" } else { "FAIL" },
            stats.exits,
            stats.faults,
            stats.console,
            stats.mmio,
            stats.interrupts,
            stats.hyp_handled,
            stats.tlb_flushes,
            stats.host_clobbered,
            vm.pages.blocks.len()
        );
    }
    ok
}
