//! Everything that touches the CPU: boot assembly, the EL1 stage-1 identity
//! map, the exception handler that records injected external aborts, HVC,
//! SMC (PSCI) and memory probes.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

global_asm!(
    include_str!("../../../../baremetal/src/image_header.S"),
    include_str!("../../../../baremetal/src/boot.S"),
    include_str!("entry.S"),
    stack_size = const STACK_SIZE,
    max_cpus = const MAX_CPUS,
);

/// Most CPUs the test host drives.
pub const MAX_CPUS: usize = 8;
/// Size of each CPU's stack.
pub const STACK_SIZE: usize = 0x8000;

extern "C" {
    /// PSCI CPU_ON entry (entry.S), x0 = CPU index.
    fn secondary_entry();
}

/// The stacks, one per CPU (symbol `STACKS`, used by entry.S only).
#[repr(C, align(16))]
pub struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; MAX_CPUS]>);

// SAFETY: only entry.S touches the stacks, each CPU its own.
unsafe impl Sync for Stacks {}

#[unsafe(no_mangle)]
static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; MAX_CPUS]));

const BLOCK_1G: u64 = 1 << 30;
/// Level-1 block: valid, AF, inner shareable, EL1 read/write.
const DESC_BLOCK: u64 = 0b01 | (1 << 10) | (0b11 << 8);
const DESC_NORMAL: u64 = DESC_BLOCK | (1 << 2);
/// Device-nGnRE (attr0), never executable.
const DESC_DEVICE: u64 = 0b01 | (1 << 10) | (1 << 53) | (1 << 54);
/// GiBs mapped as normal memory: 1..16 GiB covers RAM for every `-m` we use.
const RAM_GIBS: usize = 16;

/// The EL1 stage-1 identity map (symbol `BOOT_PT`): 39-bit VA, level-1
/// root of 1 GiB blocks: the first GiB (MMIO) device, then RAM normal.
#[repr(C, align(4096))]
pub struct BootTable([u64; 512]);

const fn boot_table() -> BootTable {
    let mut t = [0u64; 512];
    t[0] = DESC_DEVICE;
    let mut i = 1;
    while i < RAM_GIBS {
        t[i] = DESC_NORMAL | (i as u64 * BLOCK_1G);
        i += 1;
    }
    BootTable(t)
}

#[unsafe(no_mangle)]
static BOOT_PT: BootTable = boot_table();

/// The registers entry.S saves on an exception.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    /// x0..x30.
    pub x: [u64; 31],
    /// ELR_EL1.
    pub elr: u64,
    /// SPSR_EL1.
    pub spsr: u64,
    _pad: u64,
}

const _: () = assert!(core::mem::size_of::<Frame>() == 272);

/// The last recorded synchronous external abort per CPU: ESR_EL1, FAR_EL1.
static FAULTS: [[AtomicU64; 2]; MAX_CPUS] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAX_CPUS];

/// ESR_EL1.EC of a data abort taken without a change in exception level.
const EC_DABT_CUR: u64 = 0x25;
/// ESR_EL1 fault status code: synchronous external abort.
const FSC_SEA: u64 = 0x10;

/// This CPU's index (TPIDR_EL1, set by entry.S).
pub fn cpu() -> usize {
    let v: u64;
    // SAFETY: reading TPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, tpidr_el1", out(reg) v, options(nomem, nostack)) };
    (v as usize).min(MAX_CPUS - 1)
}

/// This CPU's MPIDR affinity.
pub fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v & 0xff_00ff_ffff
}

#[unsafe(no_mangle)]
extern "C" fn handle_exception(frame: &mut Frame, vector: u64) {
    let (esr, far): (u64, u64);
    // SAFETY: reading the syndrome registers has no side effects.
    unsafe {
        asm!("mrs {}, esr_el1", out(reg) esr, options(nomem, nostack));
        asm!("mrs {}, far_el1", out(reg) far, options(nomem, nostack));
    }
    if vector == 4 && esr >> 26 == EC_DABT_CUR && esr & 0x3f == FSC_SEA {
        let c = cpu();
        FAULTS[c][0].store(esr, Ordering::SeqCst);
        FAULTS[c][1].store(far, Ordering::SeqCst);
        frame.elr += 4;
        return;
    }
    crate::console::print_unlocked(format_args!(
        "FATAL unexpected exception: vector {vector} ESR {esr:#x} FAR {far:#x} ELR {:#x}",
        frame.elr
    ));
    system_off()
}

/// A recorded synchronous external abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// ESR_EL1.
    pub esr: u64,
    /// FAR_EL1.
    pub far: u64,
}

fn take_fault() -> Option<Fault> {
    let c = cpu();
    let esr = FAULTS[c][0].swap(0, Ordering::SeqCst);
    let far = FAULTS[c][1].swap(0, Ordering::SeqCst);
    (esr != 0).then_some(Fault { esr, far })
}

/// Reads the 64-bit word at physical (= virtual) address `addr`; an
/// external abort injected by the hypervisor comes back as `Err`.
pub fn probe_read(addr: u64) -> Result<u64, Fault> {
    let _ = take_fault();
    let mut v: u64 = 0xdead_beef_dead_beef;
    // SAFETY: `addr` is 8-byte aligned and identity-mapped by BOOT_PT (RAM
    // or the hypervisor's range); if the host stage-2 denies it, the
    // injected abort is recorded and the load skipped by handle_exception.
    unsafe {
        asm!("ldr {v}, [{a}]", a = in(reg) addr & !7, v = inout(reg) v, options(nostack, readonly))
    };
    match take_fault() {
        Some(f) => Err(f),
        None => Ok(v),
    }
}

/// Writes `value` to the 64-bit word at `addr`, like [`probe_read`].
pub fn probe_write(addr: u64, value: u64) -> Result<(), Fault> {
    let _ = take_fault();
    // SAFETY: as in probe_read; the callers only write test pages they own.
    unsafe { asm!("str {v}, [{a}]", a = in(reg) addr & !7, v = in(reg) value, options(nostack)) };
    match take_fault() {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Fills the page at `pfn` with `pattern` (word i = pattern ^ i).
pub fn fill_page(pfn: u64, pattern: u64) -> Result<(), Fault> {
    for i in 0..512 {
        probe_write((pfn << 12) + i * 8, pattern ^ i)?;
    }
    Ok(())
}

/// Whether every word of the page at `pfn` is zero.
pub fn page_is_zero(pfn: u64) -> Result<bool, Fault> {
    for i in 0..512 {
        if probe_read((pfn << 12) + i * 8)? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `HVC #0` with x0..x7 = `regs`. Returns x0..x7, and whether x8..x17
/// (which §2.1 says are preserved) came back unchanged.
pub fn hvc(regs: [u64; 8]) -> ([u64; 8], bool) {
    let mut r = regs;
    let s: [u64; 10] = core::array::from_fn(|i| 0x5a5a_0000_0000_0000 | (i as u64 + 8));
    let mut t = s;
    // SAFETY: HVC #0 is the host-call conduit; el2 only writes x0..x7 (and
    // we pass x8..x17 as inout so any change is seen, not assumed).
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            inout("x4") r[4], inout("x5") r[5], inout("x6") r[6], inout("x7") r[7],
            inout("x8") t[0], inout("x9") t[1], inout("x10") t[2], inout("x11") t[3],
            inout("x12") t[4], inout("x13") t[5], inout("x14") t[6], inout("x15") t[7],
            inout("x16") t[8], inout("x17") t[9],
            options(nostack)
        )
    };
    (r, s == t)
}

/// `SMC #0` to PSCI (el2 relays it) with x0..x3; returns x0.
pub fn smc(x: [u64; 4]) -> i64 {
    let mut r = x;
    // SAFETY: PSCI calls through el2's relay; SMCCC may clobber x0..x17.
    unsafe {
        asm!(
            "smc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack)
        )
    };
    r[0] as i64
}

const PSCI_CPU_ON_64: u64 = 0xc400_0003;
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;

/// Starts the CPU with affinity `mpidr` at `secondary_entry` with index `index`.
pub fn cpu_on(mpidr: u64, index: usize) -> i64 {
    smc([
        PSCI_CPU_ON_64,
        mpidr,
        secondary_entry as *const () as u64,
        index as u64,
    ])
}

/// Powers the machine off (PSCI SYSTEM_OFF); parks if that returns.
pub fn system_off() -> ! {
    smc([PSCI_SYSTEM_OFF, 0, 0, 0]);
    loop {
        // SAFETY: waiting for an event has no effect on memory.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// Wakes CPUs waiting in `wfe`.
pub fn sev() {
    // SAFETY: a hint.
    unsafe { asm!("sev", options(nomem, nostack)) };
}

/// Waits for an event (or a spurious wake-up).
pub fn wfe() {
    // SAFETY: a hint.
    unsafe { asm!("wfe", options(nomem, nostack)) };
}

/// The generic timer: (count, frequency).
pub fn timer() -> (u64, u64) {
    let (c, f): (u64, u64);
    // SAFETY: reading the counter has no side effects (el2 lets EL1 read it).
    unsafe {
        asm!("isb", "mrs {}, cntpct_el0", out(reg) c, options(nomem, nostack));
        asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack));
    }
    (c, f.max(1))
}

/// CNTV_CTL_EL0.ENABLE (IMASK clear: the timer's interrupt is signalled).
const CNTV_CTL_ENABLE: u64 = 1 << 0;

/// Arms this CPU's EL1 virtual timer for virtual count `cval`, its
/// interrupt unmasked at the timer (PSTATE.I stays set: the test host
/// takes no interrupt; el2 moves the deadline to CNTHP while a guest runs).
pub fn vtimer_arm(cval: u64) {
    // SAFETY: the test host's own timer; it has no interrupt handler and
    // keeps IRQs masked, so an expiry changes only the timer's status.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {cval}",
            "msr cntv_ctl_el0, {ctl}",
            "isb",
            cval = in(reg) cval,
            ctl = in(reg) CNTV_CTL_ENABLE,
            options(nomem, nostack)
        )
    };
}

/// Disarms this CPU's EL1 virtual timer.
pub fn vtimer_off() {
    // SAFETY: as vtimer_arm.
    unsafe { asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack)) };
}

/// The virtual count (CNTVCT_EL0).
pub fn vcount() -> u64 {
    let c: u64;
    // SAFETY: reading the counter has no side effects.
    unsafe { asm!("isb", "mrs {}, cntvct_el0", out(reg) c, options(nomem, nostack)) };
    c
}

/// The registers of `guest::Reg`, read and written from the host's side
/// (the same code as the guest payload's).
#[path = "../../../guest/src/arch/regs.rs"]
mod regs;
pub use regs::{has, reg_read, reg_write};

// The host's FP/SIMD registers, for the check that a guest's FP use never
// reaches them. The test host is built soft-float, so compiled code never
// touches these registers between the two calls.
global_asm!(
    ".arch_extension fp",
    ".arch_extension simd",
    ".global testhost_fp_write",
    "testhost_fp_write:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    ldr q\\n, [x0, #(\\n * 16)]",
    ".endr",
    "    ldr x1, [x0, #512]",
    "    msr fpsr, x1",
    "    ldr x1, [x0, #520]",
    "    msr fpcr, x1",
    "    ret",
    ".global testhost_fp_read",
    "testhost_fp_read:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    str q\\n, [x0, #(\\n * 16)]",
    ".endr",
    "    mrs x1, fpsr",
    "    str x1, [x0, #512]",
    "    mrs x1, fpcr",
    "    str x1, [x0, #520]",
    "    ret",
);

extern "C" {
    fn testhost_fp_write(regs: *const FpRegs);
    fn testhost_fp_read(regs: *mut FpRegs);
}

/// V0..V31, FPSR, FPCR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct FpRegs {
    /// V0..V31.
    pub v: [u128; 32],
    /// FPSR (offset 512).
    pub fpsr: u64,
    /// FPCR (offset 520).
    pub fpcr: u64,
}

const _: () = assert!(core::mem::offset_of!(FpRegs, fpsr) == 512);
const _: () = assert!(core::mem::offset_of!(FpRegs, fpcr) == 520);

/// Lets EL1 use FP/SIMD on this CPU (CPACR_EL1.FPEN); returns the old
/// CPACR_EL1 for [`fp_access_restore`].
pub fn fp_access_on() -> u64 {
    let old: u64;
    // SAFETY: CPACR_EL1.FPEN only stops FP/SIMD instructions from trapping.
    unsafe {
        asm!(
            "mrs {old}, cpacr_el1",
            "orr {t}, {old}, #(3 << 20)",
            "msr cpacr_el1, {t}",
            "isb",
            old = out(reg) old,
            t = out(reg) _,
            options(nostack)
        )
    };
    old
}

/// Puts CPACR_EL1 back.
pub fn fp_access_restore(old: u64) {
    // SAFETY: restores the value `fp_access_on` read.
    unsafe { asm!("msr cpacr_el1, {}", "isb", in(reg) old, options(nostack)) };
}

/// Loads V0..V31, FPSR and FPCR from `regs` (FP access on).
pub fn fp_write(regs: &FpRegs) {
    // SAFETY: reads 528 bytes of `regs` into the FP/SIMD registers, which
    // compiled code (soft-float) never uses.
    unsafe { testhost_fp_write(regs) }
}

/// Reads V0..V31, FPSR and FPCR (FP access on).
pub fn fp_read() -> FpRegs {
    let mut regs = FpRegs::default();
    // SAFETY: writes 528 bytes into `regs`.
    unsafe { testhost_fp_read(&mut regs) };
    regs
}
