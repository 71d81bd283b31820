//! Everything that touches the CPU: boot assembly, the EL2 stage-1 identity
//! map, system registers, SMC, TLB maintenance, and the drop to EL1.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::registers::*;
use stage2::tlb::TlbMaintenance;
use stage2::{Ipa, Vmid};

use el2::layout::{MAX_CPUS, STACK_SIZE};
use el2::sysreg::{cnthctl, cptr, icc_sre_el2, mdcr, sctlr_el1, HCR_HOST};

// The shared macros first, then el2's entry and vectors, the guest
// entry/exit (vcpu.S) and memcpy/memset (mem.S), in one block so that the
// macros are defined once.
global_asm!(
    include_str!("../../../baremetal/src/image_header.S"),
    include_str!("../../../baremetal/src/boot.S"),
    include_str!("entry.S"),
    include_str!("vcpu.S"),
    include_str!("mem.S"),
    stack_size = const STACK_SIZE,
    max_cpus = const MAX_CPUS,
    text_offset = const boot_contract::HYP_IMAGE_ADDR - boot_contract::RAM_BASE,
);

pub mod vcpu;

extern "C" {
    /// Secondary CPUs start here (entry.S) with x0 = CPU index.
    fn secondary_entry();
    /// Drops to EL1h at `entry` with x0 = `arg`. Never returns.
    fn enter_host(arg: u64, entry: u64) -> !;
}

/// The EL2 stacks, one per CPU, used by entry.S (symbol `STACKS`).
#[repr(C, align(16))]
pub struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; MAX_CPUS]>);

// SAFETY: only entry.S touches the stacks, each CPU its own.
unsafe impl Sync for Stacks {}

#[unsafe(no_mangle)]
static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; MAX_CPUS]));

/// Number of 1 GiB entries in the EL2 stage-1 table (39-bit VA, level 1 root).
const BOOT_PT_ENTRIES: usize = 512;
const BLOCK_1G: u64 = 1 << 30;
/// Block descriptor bits: valid block, AF, inner shareable.
const DESC_BLOCK: u64 = 0b01 | (1 << 10);
const DESC_NORMAL: u64 = DESC_BLOCK | (1 << 2) | (0b11 << 8);
const DESC_DEVICE: u64 = DESC_BLOCK | (1 << 54);

/// The EL2 stage-1 identity map: 1 GiB blocks, level 1 root (symbol `BOOT_PT`).
/// Statically: the first GiB (MMIO) as device memory and 1..4 GiB (the
/// start of RAM on QEMU virt) as normal memory; [`map_ram_gib`] adds RAM above.
#[repr(C, align(4096))]
pub struct BootTable([AtomicU64; BOOT_PT_ENTRIES]);

const fn boot_table() -> BootTable {
    let mut t = [const { AtomicU64::new(0) }; BOOT_PT_ENTRIES];
    t[0] = AtomicU64::new(DESC_DEVICE);
    let mut i = 1;
    while i < 4 {
        t[i] = AtomicU64::new(DESC_NORMAL | (i as u64 * BLOCK_1G));
        i += 1;
    }
    BootTable(t)
}

#[unsafe(no_mangle)]
static BOOT_PT: BootTable = boot_table();

/// Identity-maps the GiB containing `addr` as normal memory at EL2.
/// Addresses beyond the 39-bit VA space are ignored.
pub fn map_ram_gib(addr: u64) {
    let index = (addr / BLOCK_1G) as usize;
    if index == 0 || index >= BOOT_PT_ENTRIES {
        return;
    }
    let desc = DESC_NORMAL | (index as u64 * BLOCK_1G);
    if BOOT_PT.0[index].swap(desc, Ordering::SeqCst) != desc {
        // SAFETY: barriers only; the new entry was invalid before (we never
        // change a valid entry to another), so no TLB entry can be stale.
        unsafe { asm!("dsb ishst", "isb", options(nostack)) };
    }
}

/// Physical address of the secondary entry point, for PSCI CPU_ON.
pub fn secondary_entry_pa() -> u64 {
    secondary_entry as *const () as u64
}

/// This CPU's MPIDR affinity (Aff3..Aff0).
pub fn mpidr() -> u64 {
    MPIDR_EL1.get() & 0xff_00ff_ffff
}

/// Makes an SMC to the firmware (QEMU's PSCI) with x0..x3, returning x0..x3.
pub fn smc(x: [u64; 4]) -> [u64; 4] {
    let r = smccc::smc64(x[0] as u32, {
        let mut a = [0u64; 17];
        a[0] = x[1];
        a[1] = x[2];
        a[2] = x[3];
        a
    });
    [r[0], r[1], r[2], r[3]]
}

/// Values the host's EL2 configuration depends on.
#[derive(Clone, Copy, Debug)]
pub struct HostRegs {
    /// VTTBR_EL2 of the host stage-2.
    pub vttbr: u64,
    /// VTCR_EL2 of the host stage-2.
    pub vtcr: u64,
}

/// Configures this CPU's EL2 to run the host at EL1 under its stage-2.
pub fn init_host_regs(regs: HostRegs) {
    let pfr0 = ID_AA64PFR0_EL1.get();
    let pfr1 = ID_AA64PFR1_EL1.get();
    CPTR_EL2.set(cptr::RES1);
    // SAFETY: ZCR_EL2 and SMCR_EL2 exist when the ID registers say SVE and
    // SME are implemented, and CPTR_EL2 no longer traps them; LEN = max lets
    // EL1 choose any vector length.
    unsafe {
        asm!("isb", options(nostack));
        if (pfr0 >> 32) & 0xf != 0 {
            asm!("msr S3_4_C1_C2_0, {}", in(reg) 0xfu64, options(nostack)); // ZCR_EL2
        }
        if (pfr1 >> 24) & 0xf != 0 {
            asm!("msr S3_4_C1_C2_6, {}", in(reg) 0xfu64, options(nostack)); // SMCR_EL2
        }
    }
    CNTHCTL_EL2.set(cnthctl::HOST);
    CNTVOFF_EL2.set(0);
    // Give EL1 all the PMU counters (HPMN = PMCR_EL0.N) and trap nothing.
    let pmcr: u64;
    // SAFETY: reading PMCR_EL0 has no side effects.
    unsafe { asm!("mrs {}, pmcr_el0", out(reg) pmcr, options(nomem, nostack)) };
    MDCR_EL2.set((pmcr >> 11) & mdcr::HPMN);
    let midr = MIDR_EL1.get();
    // SAFETY: VPIDR_EL2 only changes what EL1 reads as MIDR_EL1.
    unsafe { asm!("msr vpidr_el2, {}", in(reg) midr, options(nostack)) };
    VMPIDR_EL2.set(MPIDR_EL1.get());
    SCTLR_EL1.set(sctlr_el1::RESET);
    ICC_SRE_EL2.set(icc_sre_el2::SRE | icc_sre_el2::ENABLE);
    ICH_HCR_EL2.set(0);
    VTCR_EL2.set(regs.vtcr);
    VTTBR_EL2.set(regs.vttbr);
    HCR_EL2.set(HCR_HOST);
    // SAFETY: flushes this CPU's stale stage-1+2 entries for the new VTTBR.
    unsafe { asm!("isb", "tlbi vmalls12e1", "dsb nsh", "isb", options(nostack)) };
}

/// Enters the host at `entry` (EL1h, interrupts masked) with x0 = `arg`.
pub fn run_host(arg: u64, entry: u64) -> ! {
    // SAFETY: EL2 is configured for the host (init_host_regs); entry and arg
    // come from the boot protocol or the host's own PSCI call.
    unsafe { enter_host(arg, entry) }
}

/// The EL1 state an exception injection reads and writes.
pub mod el1 {
    use super::*;

    /// VBAR_EL1.
    pub fn vbar() -> u64 {
        VBAR_EL1.get()
    }

    /// SCTLR_EL1.
    pub fn sctlr() -> u64 {
        SCTLR_EL1.get()
    }

    /// Writes the EL1 syndrome registers of an injected exception.
    pub fn set_exception(esr: u64, far: u64, elr: u64, spsr: u64) {
        ESR_EL1.set(esr);
        FAR_EL1.set(far);
        ELR_EL1.set(elr);
        SPSR_EL1.set(spsr);
    }
}

/// Stage-2 TLB maintenance for the host's stage-2: each invalidation acts
/// on the VMID it names ([`with_vmid`]); the host's VMID is the one in
/// VTTBR_EL2 whenever EL2 runs a host call, so no switch happens then.
#[derive(Debug, Default)]
pub struct Tlb;

impl TlbMaintenance for Tlb {
    fn sync_writes(&mut self) {
        tlbi::sync_writes();
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, _level: u8) {
        with_vmid(VTTBR_EL2.get(), vmid, || tlbi::ipa(ipa));
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        with_vmid(VTTBR_EL2.get(), vmid, tlbi::vmid);
    }
}

/// Runs the TLB maintenance `f` with `VTTBR_EL2` naming `vmid` (the TLBIs
/// take their VMID from it), as KVM's `__tlb_switch_to_guest`: `root` (a
/// VTTBR value: the table of that VMID) with `vmid` put in is loaded if it
/// differs from what `VTTBR_EL2` holds, and the old value restored after.
/// Ends with an ISB.
pub fn with_vmid(root: u64, vmid: Vmid, f: impl FnOnce()) {
    let want = el2::pkvm::platform::vttbr_with_vmid(root, vmid);
    let saved = VTTBR_EL2.get();
    if want == saved {
        f();
    } else {
        VTTBR_EL2.set(want);
        // Makes the VMID switch visible to the TLBI.
        isb();
        f();
        VTTBR_EL2.set(saved);
    }
    isb();
}

/// An instruction synchronisation barrier.
pub fn isb() {
    // SAFETY: a barrier.
    unsafe { asm!("isb", options(nostack)) };
}

/// The stage-2 TLB maintenance sequences, shared by the host's [`Tlb`] and
/// `machine::GuestTlb`. The TLBIs act on the VMID currently in VTTBR_EL2
/// (a guest's is loaded around them by its caller); none ends with an ISB,
/// which the caller adds once it is done.
pub mod tlbi {
    use core::arch::asm;
    use stage2::Ipa;

    /// Makes the table writes so far visible to the table walkers.
    pub fn sync_writes() {
        // SAFETY: a barrier.
        unsafe { asm!("dsb ishst", options(nostack)) };
    }

    /// Drops the current VMID's entries for the page at `ipa`.
    pub fn ipa(ipa: Ipa) {
        // `tlbi ipas2e1is` alone does not drop combined stage-1+2 entries
        // (QEMU, and KVM on hardware, follow it with vmalle1is).
        // SAFETY: TLB maintenance for the current VMID only.
        unsafe {
            asm!(
                "tlbi ipas2e1is, {}",
                "dsb ish",
                "tlbi vmalle1is",
                "dsb ish",
                in(reg) ipa.raw() >> 12,
                options(nostack)
            )
        };
    }

    /// Drops all of the current VMID's entries.
    pub fn vmid() {
        // SAFETY: TLB maintenance for the current VMID only.
        unsafe { asm!("tlbi vmalls12e1is", "dsb ish", options(nostack)) };
    }
}

/// Parks this CPU forever.
pub fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfe();
    }
}
