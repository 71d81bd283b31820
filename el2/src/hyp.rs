//! Boot, per-CPU bring-up and trap handling: the parts that tie the pure
//! modules to the machine.
//!
//! Lock order (docs/DESIGN.md §6): the dispatcher's locks (`el2::pkvm`),
//! then the heap and the console as leaves.

use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use buddy_system_allocator::LockedHeap;
use log::{error, info, warn};
use spin::Once;
use stage2::mm::{Table, TableMemory, ENTRIES};
use stage2::{Hpa, PAGE_SIZE};

use crate::arch::{self, HostRegs, Tlb};
use el2::dtb::{self, Board, Region};
use el2::exception::{fault_ipa, Esr, ExceptionClass, TrapFrame, Vector};
use el2::layout::*;
use el2::pkvm::{AbortAction, AbortKind, Hyp, HypConfig};
use el2::traps::TrapCounts;
use el2::{inject, psci};

use crate::machine::El2Platform;

/// el2's allocator over its memory (docs/DESIGN.md §5): a buddy heap of
/// `HYP_SMALL_HEAP` bytes after the image for everything below
/// `HYP_LARGE_ALLOC`, and the rest of the hypervisor's memory, sized from
/// the RAM at boot, for the large allocations (the page tracker and the host
/// stage-2 pool), handed out page-aligned one after the other and never
/// freed (both live as long as the machine).
struct El2Heap {
    small: LockedHeap<32>,
    large: spin::Mutex<Bump>,
}

/// The large-allocation region: `[next, end)` is free.
struct Bump {
    next: usize,
    end: usize,
}

impl Bump {
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let align = layout.align().max(PAGE_SIZE as usize);
        let start = self.next.next_multiple_of(align);
        match start.checked_add(layout.size()) {
            Some(end) if end <= self.end => {
                self.next = end;
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }
}

fn is_large(layout: Layout) -> bool {
    layout.size() as u64 >= HYP_LARGE_ALLOC
}

// SAFETY: small allocations are the buddy heap's (whose GlobalAlloc is
// sound); large ones are disjoint page-aligned ranges of the bump region,
// which only grows `next` under its lock and never hands a byte out twice.
unsafe impl GlobalAlloc for El2Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            self.large.lock().alloc(layout)
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.small.alloc(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Large blocks are never freed: the tracker and the pool stay.
        if !is_large(layout) {
            // SAFETY: the caller's contract; `ptr` came from `small` (the
            // same layout is small at allocation and at deallocation).
            unsafe { self.small.dealloc(ptr, layout) }
        }
    }
}

#[global_allocator]
static HEAP: El2Heap = El2Heap {
    small: LockedHeap::empty(),
    large: spin::Mutex::new(Bump { next: 0, end: 0 }),
};

unsafe extern "C" {
    /// End of the image's .bss (linker.ld); the small heap runs from here.
    static __image_end: u8;
}

/// Gives `[__image_end, HYP_BASE + HYP_IMAGE_RESERVE + HYP_SMALL_HEAP)` to
/// the small heap; its size, or `None` if the image overruns its reserve.
fn init_small_heap() -> Option<usize> {
    let start = core::ptr::addr_of!(__image_end) as usize;
    let image_end = (HYP_BASE + HYP_IMAGE_RESERVE) as usize;
    if start > image_end {
        return None;
    }
    let end = image_end + HYP_SMALL_HEAP as usize;
    // SAFETY: [__image_end, end) is hypervisor memory (inside the least
    // hyp_size, HYP_SIZE) that nothing else uses (linker.ld puts nothing
    // after .bss; the host never sees it), and this runs once, on the boot
    // CPU, before anything allocates.
    unsafe { HEAP.small.lock().init(start, end - start) };
    Some(end - start)
}

/// Gives the rest of the hypervisor's memory, up to `hyp_end`, to the
/// large allocations.
fn init_large_heap(hyp_end: u64) -> usize {
    let start = (HYP_BASE + HYP_IMAGE_RESERVE + HYP_SMALL_HEAP) as usize;
    let end = hyp_end as usize;
    *HEAP.large.lock() = Bump { next: start, end };
    end.saturating_sub(start)
}

/// Bytes of RAM from the first RAM byte to the last (what `hyp_size` is
/// computed from), or 0 without RAM.
fn ram_span(memory: &[Region]) -> u64 {
    let first = memory.iter().map(|r| r.base).min().unwrap_or(0);
    let last = memory.iter().map(Region::end).max().unwrap_or(0);
    last.saturating_sub(first)
}

/// Table pages for the host stage-2: a block of the heap, reserved at boot.
struct HypPool {
    base: u64,
    pages: usize,
    next: usize,
    free: Vec<u64>,
}

impl HypPool {
    fn owns(&self, pa: Hpa) -> bool {
        let pa = pa.raw();
        pa >= self.base
            && pa < self.base + (self.pages as u64) * PAGE_SIZE
            && pa.is_multiple_of(PAGE_SIZE)
    }

    fn check(&self, pa: Hpa) {
        if !self.owns(pa) {
            // The stage2 crate only passes addresses this pool handed out.
            panic!("table address {pa} outside the pool");
        }
    }

    /// A pool of `pages` zeroed, 4 KiB-aligned pages from the heap.
    fn new(pages: usize) -> Option<Self> {
        let layout =
            core::alloc::Layout::from_size_align(pages * PAGE_SIZE as usize, PAGE_SIZE as usize)
                .ok()?;
        // SAFETY: the layout has a non-zero size; the block is never freed.
        let base = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return None;
        }
        Some(Self {
            base: base as u64,
            pages,
            next: 0,
            free: Vec::new(),
        })
    }
}

impl TableMemory for HypPool {
    fn available(&self) -> usize {
        self.free.len() + (self.pages - self.next)
    }

    fn alloc_table(&mut self) -> Option<Hpa> {
        if let Some(pa) = self.free.pop() {
            return Some(Hpa::new(pa));
        }
        self.alloc_contiguous(1)
    }

    fn free_table(&mut self, table: Hpa) {
        self.check(table);
        self.free.push(table.raw());
    }

    fn alloc_contiguous(&mut self, count: usize) -> Option<Hpa> {
        let start = self.next.next_multiple_of(count);
        if count == 0 || start + count > self.pages {
            return None;
        }
        for skipped in self.next..start {
            self.free.push(self.base + skipped as u64 * PAGE_SIZE);
        }
        self.next = start + count;
        Some(Hpa::new(self.base + start as u64 * PAGE_SIZE))
    }

    fn free_contiguous(&mut self, base: Hpa, count: usize) {
        for i in 0..count as u64 {
            self.free_table(Hpa::new(base.raw() + i * PAGE_SIZE));
        }
    }

    fn table(&self, table: Hpa) -> &Table {
        self.check(table);
        // SAFETY: `table` is a page of the pool's block (checked), identity-mapped,
        // 4 KiB aligned, and owned by this pool, which only the one Stage2
        // that owns the pool accesses (through &self / &mut self).
        unsafe { &*(table.raw() as *const Table) }
    }

    fn table_mut(&mut self, table: Hpa) -> &mut Table {
        self.check(table);
        // SAFETY: as in `table`; `&mut self` makes the borrow exclusive.
        unsafe { &mut *(table.raw() as *mut Table) }
    }
}

const _: () = assert!(ENTRIES * 8 == PAGE_SIZE as usize);

/// The hypervisor's state: the dispatcher over the EL2 machine.
type El2Hyp = Hyp<El2Platform, HypPool, Tlb>;

static BOARD: Once<Board> = Once::new();
static HYP: Once<El2Hyp> = Once::new();
static HOST_REGS: Once<HostRegs> = Once::new();

const CPU_OFF: u8 = 0;
const CPU_ON_PENDING: u8 = 1;
const CPU_ON: u8 = 2;

/// Every exception taken from the host, by cause (el2::traps).
static TRAPS: TrapCounts = TrapCounts::new();

static CPU_STATE: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(CPU_OFF) }; MAX_CPUS];
static CPU_ENTRY: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CPU_CONTEXT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn board() -> &'static Board {
    // Set before any CPU other than the boot CPU runs, and before the host.
    BOARD.get().expect("board parsed at boot")
}

fn cpu_index(mpidr: u64) -> Option<usize> {
    board()
        .cpus
        .iter()
        .take(MAX_CPUS)
        .position(|&m| m == (mpidr & 0xff_00ff_ffff))
}

/// The index of the calling CPU in the device tree's CPU list (`None`
/// before the platform is parsed, or for a CPU beyond [`MAX_CPUS`]).
pub fn this_cpu() -> Option<usize> {
    BOARD.get()?;
    cpu_index(arch::mpidr())
}

/// Finds the calling CPU's GIC redistributor once, for guest runs on it.
/// Says what the CPU lets a guest reach (docs/DESIGN.md §8): the features
/// whose registers are switched, and any EL1 state neither switched nor
/// trapped (none on the CPUs the project runs on; the boot suite checks).
fn log_guest_isolation() {
    let f = arch::vcpu::features();
    info!(
        "guest registers: sme={} ras={} lor={} mte={} pauth={} gic lrs={} aprs={}",
        u8::from(f.sme),
        u8::from(f.ras),
        u8::from(f.lor),
        u8::from(f.mte),
        u8::from(f.pauth),
        f.nr_lrs,
        f.nr_aprs
    );
    if f.uncovered == 0 {
        info!("guest registers: every EL1 register is switched or trapped");
    } else {
        for name in f.uncovered_names() {
            warn!("guest registers: {name} state is neither switched nor trapped");
        }
    }
}

fn find_own_redistributor(cpu: usize) {
    let sgi = board()
        .gic
        .get(1)
        .and_then(|r| arch::vcpu::find_redistributor(r.base, r.size));
    if sgi.is_none() {
        warn!("CPU {cpu}: no GICv3 redistributor found; the host's timer cannot end guest runs");
    }
    crate::machine::set_redistributor(cpu, sgi);
}

/// A boot the hypervisor cannot complete: say why, then power the machine
/// off (PSCI SYSTEM_OFF) rather than hang; park if even that fails.
fn fatal(msg: core::fmt::Arguments<'_>) -> ! {
    error!("{msg}");
    error!("cannot boot the host: powering off");
    let _ = arch::smc([u64::from(psci::PSCI_SYSTEM_OFF), 0, 0, 0]);
    arch::park()
}

/// Rust entry of the boot CPU (from entry.S, MMU on, on CPU 0's stack).
#[unsafe(no_mangle)]
extern "C" fn primary_main(dtb_addr: u64) -> ! {
    crate::console::init(log::LevelFilter::Info);
    let Some(small_heap) = init_small_heap() else {
        fatal(format_args!(
            "el2's image is larger than its {HYP_IMAGE_RESERVE:#x}-byte reserve"
        ))
    };
    info!(
        "pinned-s2 hypervisor {} starting, DTB at {dtb_addr:#x}",
        env!("CARGO_PKG_VERSION")
    );

    let blob = match read_dtb(dtb_addr) {
        Some(b) => b,
        None => fatal(format_args!("no valid device tree at {dtb_addr:#x}")),
    };
    let board = match dtb::parse(&blob) {
        Ok(p) => p,
        Err(e) => fatal(format_args!("cannot parse the device tree: {e:?}")),
    };
    if let Some(uart) = board.uart {
        crate::console::set_base(uart);
    }
    if !board.psci_smc {
        fatal(format_args!(
            "PSCI must use the SMC conduit (virtualization=on)"
        ));
    }
    // The hypervisor's memory, sized from the RAM (boot_contract::hyp_size).
    let span = ram_span(&board.memory);
    let hyp = Region {
        base: HYP_BASE,
        size: hyp_size(span),
    };
    let hyp_end = hyp.end();
    if !board
        .memory
        .iter()
        .any(|r| r.base <= hyp.base && r.end() >= hyp_end)
    {
        fatal(format_args!(
            "RAM does not contain the hypervisor's range {HYP_BASE:#x}..{hyp_end:#x}"
        ));
    }
    if let Some(i) = board
        .initrd
        .filter(|i| i.base < hyp_end && hyp.base < i.end())
    {
        fatal(format_args!(
            "the initrd ({:#x}..{:#x}) overlaps the hypervisor's memory {HYP_BASE:#x}..{hyp_end:#x} ({} MiB of RAM)",
            i.base,
            i.end(),
            span >> 20
        ));
    }
    let large_heap = init_large_heap(hyp_end);
    for r in &board.memory {
        let mut gib = r.base & !((1 << 30) - 1);
        while gib < r.end() {
            arch::map_ram_gib(gib);
            gib += 1 << 30;
        }
    }
    let host_ram = dtb::subtract(&board.memory, hyp);
    // The host kernel must be where the runner put it.
    if !host_ram.iter().any(|r| r.contains(HOST_KERNEL_ADDR)) || !has_image_header(HOST_KERNEL_ADDR)
    {
        fatal(format_args!(
            "no arm64 Image at {HOST_KERNEL_ADDR:#x} (load it with -device loader)"
        ));
    }
    let host_dtb = match dtb::without_range(&blob, hyp) {
        Ok(d) => d,
        Err(e) => fatal(format_args!("cannot write the host device tree: {e:?}")),
    };
    let host_dtb_addr = host_dtb_addr(span);
    let dtb_region = Region {
        base: host_dtb_addr,
        size: host_dtb.len() as u64,
    };
    if host_dtb.len() > HOST_DTB_MAX
        || board
            .initrd
            .is_some_and(|i| i.base < dtb_region.end() && dtb_region.base < i.end())
    {
        fatal(format_args!(
            "no room for the host device tree at {host_dtb_addr:#x}"
        ));
    }
    // SAFETY: [host_dtb_addr, +len) is host RAM (the first host page
    // onwards, hyp_end), identity-mapped, overlapping neither the initrd
    // (checked), the kernel (at HOST_KERNEL_ADDR, far above) nor anything of
    // ours.
    unsafe {
        core::ptr::copy_nonoverlapping(host_dtb.as_ptr(), host_dtb_addr as *mut u8, host_dtb.len());
    }

    let ram_bytes: u64 = host_ram.iter().map(|r| r.size).sum();
    let Some(pool) = HypPool::new(host_s2_pool_pages(ram_bytes) as usize) else {
        fatal(format_args!(
            "no heap for the host stage-2 pool ({ram_bytes:#x} bytes of RAM)"
        ));
    };
    let pool_pages = pool.pages;
    let (ipa_bits, pa_range) = host_ipa_bits(&board);
    let config = HypConfig {
        ram: &board.memory,
        hyp,
        host_ipa_bits: ipa_bits,
        share_limit: u32::MAX,
    };
    let state = match Hyp::new(El2Platform, &config, pool, Tlb) {
        Ok(h) => h,
        Err(e) => fatal(format_args!("cannot build the hypervisor state: {e:?}")),
    };
    let vtcr = stage2::vtcr::vtcr_el2(state.host_ipa_config(), pa_range)
        .unwrap_or_else(|e| fatal(format_args!("VTCR: {e:?}")));
    let regs = HostRegs {
        vttbr: state.host_vttbr(),
        vtcr,
    };
    info!(
        "host stage-2: {} RAM regions, {ipa_bits}-bit IPA (the device tree's addresses end at {:#x}), {} of {pool_pages} table pages used; hypervisor memory {HYP_BASE:#x}..{hyp_end:#x} hidden",
        host_ram.len(),
        board.address_end,
        pool_pages - state.host_tables_available(),
    );
    info!(
        "hypervisor memory: {} MiB for {} MiB of RAM (heap {} KiB after the image; tracker and pool {} of {} KiB)",
        hyp.size >> 20,
        span >> 20,
        small_heap >> 10,
        (HEAP.large.lock().next - (HYP_BASE + HYP_IMAGE_RESERVE + HYP_SMALL_HEAP) as usize) >> 10,
        large_heap >> 10,
    );
    HYP.call_once(|| state);
    HOST_REGS.call_once(|| regs);
    let boot_cpu = board
        .cpus
        .iter()
        .position(|&m| m == arch::mpidr())
        .unwrap_or(0);
    BOARD.call_once(|| board);
    CPU_STATE[boot_cpu.min(MAX_CPUS - 1)].store(CPU_ON, Ordering::SeqCst);
    find_own_redistributor(boot_cpu);

    arch::init_host_regs(regs);
    // After ICC_SRE_EL2 is set: ICH_VTR_EL2 is read here first.
    log_guest_isolation();
    info!("entering the host kernel at {HOST_KERNEL_ADDR:#x} (EL1)");
    log::set_max_level(log::LevelFilter::Warn);
    arch::run_host(host_dtb_addr, HOST_KERNEL_ADDR)
}

/// Rust entry of a secondary CPU, started by our PSCI CPU_ON (or resumed
/// from a power-down CPU_SUSPEND) with its index.
#[unsafe(no_mangle)]
extern "C" fn secondary_main(index: u64) -> ! {
    let i = index as usize;
    let Some(regs) = HOST_REGS.get() else {
        // Before the host exists, nothing starts CPUs.
        arch::park()
    };
    if i >= MAX_CPUS {
        arch::park();
    }
    arch::init_host_regs(*regs);
    find_own_redistributor(i);
    CPU_STATE[i].store(CPU_ON, Ordering::SeqCst);
    arch::run_host(
        CPU_CONTEXT[i].load(Ordering::SeqCst),
        CPU_ENTRY[i].load(Ordering::SeqCst),
    )
}

fn read_dtb(addr: u64) -> Option<Vec<u8>> {
    if addr == 0 || !addr.is_multiple_of(8) {
        return None;
    }
    // SAFETY: QEMU put a DTB at `addr` in RAM (identity-mapped); we read
    // its 8-byte header first and then at most HOST_DTB_MAX bytes.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    if header[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
        return None;
    }
    let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if !(8..=HOST_DTB_MAX).contains(&size) {
        return None;
    }
    // SAFETY: as above, `size` bounded.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, size) }.to_vec())
}

fn has_image_header(addr: u64) -> bool {
    // SAFETY: `addr` is in host RAM (checked by the caller), identity-mapped.
    let magic = unsafe { ((addr + 0x38) as *const u32).read_volatile() };
    magic == 0x644d_5241
}

/// The host stage-2's IPA size (what the device tree's RAM and devices
/// need, at most the CPU's PA size: `Board::host_ipa_bits`) and the CPU's
/// `PARange` (VTCR_EL2.PS).
fn host_ipa_bits(board: &Board) -> (u8, u8) {
    let pa_range = (aarch64_cpu::registers::ID_AA64MMFR0_EL1.get() & 0xf) as u8;
    let cpu_bits = stage2::vtcr::pa_range_bits(pa_range.min(5));
    (board.host_ipa_bits(cpu_bits.clamp(32, 48)), pa_range)
}

use aarch64_cpu::registers::Readable;

/// Called by entry.S for every exception taken to EL2.
#[unsafe(no_mangle)]
extern "C" fn handle_trap(frame: &mut TrapFrame, vector: u64) {
    match Vector::from_index(vector) {
        Vector::LowerSync => lower_sync(frame),
        // Not routed to EL2 (IMO/FMO clear), so never seen; counted if so.
        Vector::LowerIrq => TRAPS.record_vector(0),
        Vector::LowerFiq => TRAPS.record_vector(1),
        Vector::LowerSError => {
            TRAPS.record_vector(2);
            warn!("SError from the host (ESR {:#x}), ignored", frame.esr);
        }
        Vector::LowerAArch32 => {
            TRAPS.record_vector(3);
            warn!("exception from AArch32 (ESR {:#x}), ignored", frame.esr);
        }
        Vector::CurrentSync | Vector::CurrentAsync | Vector::Invalid(_) => {
            crate::console::print_line_unlocked(format_args!(
                "FATAL exception at EL2: vector {vector} ESR {:#x} FAR {:#x} ELR {:#x}",
                frame.esr, frame.far, frame.elr
            ));
            arch::park();
        }
    }
}

fn lower_sync(frame: &mut TrapFrame) {
    let esr = Esr(frame.esr);
    TRAPS.record_sync(esr);
    match esr.class() {
        ExceptionClass::Hvc64 => {
            TRAPS.record_hvc(esr.imm16(), frame.x[0]);
            let mut regs = [0u64; 8];
            regs.copy_from_slice(&frame.x[..8]);
            let out = if esr.imm16() == 0 {
                match HYP.get() {
                    Some(h) => h.host_call(&regs),
                    None => not_supported(),
                }
            } else {
                not_supported()
            };
            frame.x[..8].copy_from_slice(&out);
        }
        ExceptionClass::Smc64 => {
            // A trapped SMC returns to the SMC itself: step over it.
            frame.elr = frame.elr.wrapping_add(4);
            host_smc(frame);
        }
        ExceptionClass::DataAbortLower | ExceptionClass::InstructionAbortLower => {
            host_abort(frame, esr)
        }
        other => {
            warn!(
                "unexpected trap from the host: {other:?} ESR {:#x} at {:#x}; injecting UNDEF",
                frame.esr, frame.elr
            );
            inject(frame, esr, inject::undefined);
        }
    }
}

fn not_supported() -> [u64; 8] {
    let mut out = [0u64; 8];
    out[0] = u64::MAX;
    out
}

fn inject(
    frame: &mut TrapFrame,
    esr: Esr,
    how: fn(&inject::Faulting) -> Option<inject::Injection>,
) {
    let f = inject::Faulting {
        elr: frame.elr,
        spsr: frame.spsr,
        far: frame.far,
        il: esr.il(),
        instruction: esr.class() == ExceptionClass::InstructionAbortLower,
        vbar_el1: arch::el1::vbar(),
        sctlr_el1: arch::el1::sctlr(),
    };
    match how(&f) {
        Some(i) => {
            arch::el1::set_exception(i.esr_el1, i.far_el1, i.elr_el1, i.spsr_el1);
            frame.elr = i.elr_el2;
            frame.spsr = i.spsr_el2;
        }
        None => warn!("cannot inject into mode {:#x}", frame.spsr),
    }
}

fn host_abort(frame: &mut TrapFrame, esr: Esr) {
    let ipa = fault_ipa(frame.hpfar, frame.far);
    let kind = if esr.is_translation_fault() {
        AbortKind::Translation
    } else if esr.is_permission_fault() {
        AbortKind::Permission
    } else {
        AbortKind::Other
    };
    if let Some(h) = HYP.get() {
        let outcome = h.host_abort_outcome(ipa, kind);
        TRAPS.record_abort(outcome);
        if outcome.action() == AbortAction::Retry {
            return;
        }
    }
    warn!(
        "host access to {ipa:#x} ({kind:?} fault) at pc {:#x} denied: injecting an external abort",
        frame.elr
    );
    inject(frame, esr, inject::external_abort);
}

/// Prints the trap counts and the host stage-2's shape (`el2: traps ...`
/// lines), before the machine goes off or resets.
fn log_traps() {
    for line in TRAPS.lines() {
        crate::console::print_line(format_args!("traps {line}"));
    }
    if let Some(h) = HYP.get() {
        crate::console::print_line(format_args!(
            "host stage-2: {}",
            h.host_stage2_shape().line()
        ));
    }
}

fn host_smc(frame: &mut TrapFrame) {
    let x = [frame.x[0], frame.x[1], frame.x[2], frame.x[3]];
    let fid = x[0] as u32;
    TRAPS.record_smc(fid);
    if fid == psci::PSCI_SYSTEM_OFF || fid == psci::PSCI_SYSTEM_RESET {
        log_traps();
    }
    let ret: i64 = match psci::route(&x) {
        psci::Action::Forward => {
            let r = arch::smc(x);
            frame.x[..4].copy_from_slice(&r);
            return;
        }
        psci::Action::NotSupported => i64::from(psci::NOT_SUPPORTED),
        psci::Action::CpuOn {
            target,
            entry,
            context,
        } => cpu_on(target, entry, context),
        psci::Action::CpuSuspend {
            power_state,
            entry,
            context,
        } => match cpu_index(arch::mpidr()) {
            Some(me) => {
                CPU_ENTRY[me].store(entry, Ordering::SeqCst);
                CPU_CONTEXT[me].store(context, Ordering::SeqCst);
                let r = arch::smc([
                    u64::from(psci::PSCI_CPU_SUSPEND_64),
                    power_state,
                    arch::secondary_entry_pa(),
                    me as u64,
                ]);
                r[0] as i64
            }
            None => i64::from(psci::INVALID_PARAMETERS),
        },
        psci::Action::CpuOff => {
            let me = cpu_index(arch::mpidr());
            if let Some(me) = me {
                CPU_STATE[me].store(CPU_OFF, Ordering::SeqCst);
            }
            let r = arch::smc([u64::from(psci::PSCI_CPU_OFF), 0, 0, 0]);
            // Only returns on failure.
            if let Some(me) = me {
                CPU_STATE[me].store(CPU_ON, Ordering::SeqCst);
            }
            r[0] as i64
        }
    };
    frame.x[0] = ret as u64;
}

fn cpu_on(target: u64, entry: u64, context: u64) -> i64 {
    let Some(i) = cpu_index(target) else {
        return i64::from(psci::INVALID_PARAMETERS);
    };
    if let Err(state) =
        CPU_STATE[i].compare_exchange(CPU_OFF, CPU_ON_PENDING, Ordering::SeqCst, Ordering::SeqCst)
    {
        return i64::from(if state == CPU_ON {
            psci::ALREADY_ON
        } else {
            psci::ON_PENDING
        });
    }
    CPU_ENTRY[i].store(entry, Ordering::SeqCst);
    CPU_CONTEXT[i].store(context, Ordering::SeqCst);
    let r = arch::smc([
        u64::from(psci::PSCI_CPU_ON_64),
        target,
        arch::secondary_entry_pa(),
        i as u64,
    ]);
    let ret = r[0] as i64;
    if ret != 0 {
        CPU_STATE[i].store(CPU_OFF, Ordering::SeqCst);
    }
    ret
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::console::print_line_unlocked(format_args!("PANIC: {info}"));
    arch::park()
}
