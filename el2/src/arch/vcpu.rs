//! Running a vCPU: the EL1 world switch between the host and a guest.
//!
//! [`run_vcpu`] saves the host's EL1 state, loads the guest's (system
//! registers, FP/SIMD, virtual timer, pointer-auth keys), configures EL2 for
//! the guest (HCR_EL2, VTCR/VTTBR_EL2, CPTR_EL2, CNTHCTL_EL2, CNTVOFF_EL2,
//! VMPIDR_EL2), and enters it with `vcpu.S`. While the guest runs, VBAR_EL2
//! points at `GUEST_VECTORS`, so every exception from EL1/EL0 comes back
//! here (not to the host's trap handler) as a [`RawExit`]. Then everything
//! is switched back.
//!
//! **The fast path.** An exit that `el2::vcpu::fast_answer` can answer from
//! the guest's general-purpose registers alone (`HYP_GUEST_VERSION`, a bad
//! guest call, PSCI `VERSION`/`FEATURES`, an SMC that is not PSCI) is
//! answered right after `__guest_enter` returns and the guest is entered
//! again, with its EL1, timer, FP/SIMD, GIC and key state still in the CPU
//! and EL2 still configured for it, as KVM's `fixup_guest_exit` does: only
//! what `vcpu.S` switches at every entry and exit (x0..x30, PC, PSTATE,
//! VBAR_EL2) moves. [`VcpuRun::fast_budget`] bounds how often, and
//! [`RawExit::fast_exits`] says how often it happened before the exit
//! returned.
//!
//! # What the caller must know
//!
//! - **FP/SIMD, SVE and SME.** The guest sees FP/SIMD only: `CPTR_EL2.TZ/TSM`
//!   trap SVE and SME (and `ZCR_EL1`, `SMCR_EL1`, `SVCR`). The host's
//!   V0..V31/FPSR/FPCR and `TPIDR2_EL0` are saved and restored. The
//!   host's Z registers beyond their low 128 bits are not (the guest's FP
//!   writes zero them), and if the host calls in streaming mode or with ZA
//!   on, both are turned off (SMSTOP) first: the host must treat
//!   `HYP_VCPU_RUN` as clobbering that state, as after
//!   `kernel_neon_begin()` (ABI §3.7). P0..P15, FFR and the ZA contents
//!   of a host that left ZA off are untouched (the guest cannot reach them).
//! - **The GIC virtual CPU interface** (`ICH_VMCR_EL2`, `ICH_AP{0,1}R<n>_EL2`,
//!   `ICH_LR<n>_EL2`, `ICH_HCR_EL2`), which the guest's `ICC_*_EL1`
//!   accesses reach, and `VDISR_EL2` (its `DISR_EL1`) are per vCPU: loaded
//!   before entry, saved after exit, and the interface is turned off
//!   (`ICH_HCR_EL2 = 0`) while the host runs. `ICC_SRE_EL2.Enable` is
//!   cleared while the guest runs so `ICC_SRE_EL1` traps where it is not
//!   constant. docs/DESIGN.md §8 is the inventory of every register.
//! - **The host's timer.** The host (Linux at EL1) uses the virtual
//!   timer, whose registers belong to the guest while it runs. The host's
//!   deadline is therefore copied to the EL2 physical timer (CNTHP, PPI 26)
//!   for the duration of the run, so that it expires as an IRQ that ends
//!   the run ([`GuestExit::Interrupted`](el2::vcpu::GuestExit)); once the
//!   host's CNTV registers are back its own timer fires. `run_vcpu`
//!   enables PPI 26 in this CPU's redistributor ([`VcpuRun::gicr_sgi`])
//!   each time, since the host's GIC driver disables the PPIs it does not
//!   use; the host's GIC setup (group 1, priority) is relied on.
//! - **No virtual interrupts.** There is no vGIC yet: the guest's timer
//!   state is kept, but its interrupt is never delivered to it.
//! - **PMU and debug registers** are not switched; `MDCR_EL2` traps the
//!   guest's accesses to them (an unhandled-trap exit). `MDSCR_EL1` is in
//!   the context but trapped too: a Linux guest (which writes it at boot)
//!   needs these accesses emulated first.
//! - **SErrors** a guest causes are routed to EL2 (`AMO`) but one still
//!   pending at exit is not synchronised (no `esb`): it would be taken by
//!   the host. QEMU TCG raises none for ordinary guests.
//! - **Interrupts at EL2 stay masked** (we run from a trap handler or at
//!   boot); physical IRQs reach EL2 only as guest exits.

use core::arch::asm;

use aarch64_cpu::registers::*;
use el2::features::{CpuFeatures, IdRegs};
use el2::gic;
use el2::sysreg::{cnt_ctl, cnthctl, icc_sre_el2};
use el2::vcpu::{El1Sysregs, FpState, GicCpuIf, RawExit, VcpuContext};

extern "C" {
    /// Enters the guest whose context `ctx` points to; returns the EL2
    /// vector slot of its exit, with its GPRs, PC and PSTATE saved in `ctx`.
    fn __guest_enter(ctx: *mut VcpuContext) -> u64;
    /// Stores V0..V31, FPSR, FPCR to `fp`.
    fn __fpsimd_save(fp: *mut FpState);
    /// Loads V0..V31, FPSR, FPCR from `fp`.
    fn __fpsimd_load(fp: *const FpState);
}

/// How to run a vCPU: its stage-2, and this CPU's housekeeping.
#[derive(Clone, Copy, Debug)]
pub struct VcpuRun {
    /// VTTBR_EL2: root table and the VM's VMID (bits 55:48).
    pub vttbr: u64,
    /// VTCR_EL2 for the VM's IPA size.
    pub vtcr: u64,
    /// Another vCPU of this VM ran on this CPU last
    /// (`el2::vcpu::LastRan::load`): invalidate this CPU's EL1 TLB
    /// entries and I-cache of the VMID before entry.
    pub flush_local_tlb: bool,
    /// The SGI/PPI frame of this CPU's GIC redistributor
    /// ([`find_redistributor`]), where PPI 26 (the EL2 physical timer,
    /// which carries the host's deadline while the guest runs) is
    /// enabled before entry. `None`: the host's timer cannot end a run.
    pub gicr_sgi: Option<u64>,
    /// How many exits [`run_vcpu`] may answer itself with
    /// `el2::vcpu::fast_answer` and resume the guest, without the full
    /// switch, before it returns one ([`RawExit::fast_exits`] counts them).
    pub fast_budget: u32,
}

/// Finds this CPU's redistributor in the GICR region `[base, base + size)`
/// (below 1 GiB, the device part of the EL2 map) and returns its SGI frame.
pub fn find_redistributor(base: u64, size: u64) -> Option<u64> {
    if base.checked_add(size)? > 1 << 30 {
        return None;
    }
    let read_typer = |rd: u64| {
        // SAFETY: GICR_TYPER of a redistributor frame inside the GIC's
        // region (device memory in the EL2 map); reading it has no effect.
        unsafe { ((rd + gic::GICR_TYPER) as *const u64).read_volatile() }
    };
    gic::find_redistributor(base, size, MPIDR_EL1.get(), read_typer)
        .map(|rd| rd + gic::GICR_SGI_FRAME)
}

macro_rules! read_sysreg {
    ($reg:literal) => {{
        let v: u64;
        // SAFETY: reading an EL1/EL0 system register at EL2 has no side effects.
        unsafe { asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack)) };
        v
    }};
}

macro_rules! write_sysreg {
    ($reg:literal, $v:expr) => {{
        let v: u64 = $v;
        // SAFETY: EL1/EL0 state that EL2 does not run under; which context
        // it belongs to is run_vcpu's bookkeeping.
        unsafe { asm!(concat!("msr ", $reg, ", {}"), in(reg) v, options(nomem, nostack)) };
    }};
}

macro_rules! el1_switch {
    ($($field:ident: $reg:literal),* $(,)?) => {
        fn save_el1(r: &mut El1Sysregs) {
            $( r.$field = read_sysreg!($reg); )*
        }
        fn load_el1(r: &El1Sysregs) {
            $( write_sysreg!($reg, r.$field); )*
        }
    };
}

el1_switch! {
    sctlr: "sctlr_el1",
    ttbr0: "ttbr0_el1",
    ttbr1: "ttbr1_el1",
    tcr: "tcr_el1",
    mair: "mair_el1",
    amair: "amair_el1",
    vbar: "vbar_el1",
    contextidr: "contextidr_el1",
    tpidr_el0: "tpidr_el0",
    tpidrro_el0: "tpidrro_el0",
    tpidr_el1: "tpidr_el1",
    sp_el0: "sp_el0",
    sp_el1: "sp_el1",
    elr: "elr_el1",
    spsr: "spsr_el1",
    esr: "esr_el1",
    far: "far_el1",
    afsr0: "afsr0_el1",
    afsr1: "afsr1_el1",
    par: "par_el1",
    cpacr: "cpacr_el1",
    cntkctl: "cntkctl_el1",
    csselr: "csselr_el1",
    mdscr: "mdscr_el1",
}

fn save_timer(r: &mut El1Sysregs) {
    r.cntv_ctl = read_sysreg!("cntv_ctl_el0");
    r.cntv_cval = read_sysreg!("cntv_cval_el0");
}

fn load_timer(r: &El1Sysregs) {
    write_sysreg!("cntv_cval_el0", r.cntv_cval);
    write_sysreg!("cntv_ctl_el0", r.cntv_ctl);
}

static FEATURES: spin::Once<CpuFeatures> = spin::Once::new();

/// What this CPU has (all CPUs of the machine are assumed alike: read once,
/// on the first call).
pub fn features() -> &'static CpuFeatures {
    FEATURES.call_once(|| {
        let pfr0 = ID_AA64PFR0_EL1.get();
        let gic_sysregs = (pfr0 >> 24) & 0xf != 0;
        CpuFeatures::decode(&IdRegs {
            pfr0,
            pfr1: ID_AA64PFR1_EL1.get(),
            dfr0: ID_AA64DFR0_EL1.get(),
            mmfr1: ID_AA64MMFR1_EL1.get(),
            mmfr2: ID_AA64MMFR2_EL1.get(),
            mmfr3: read_sysreg!("S3_0_C0_C7_3"), // ID_AA64MMFR3_EL1, RAZ before v8.9
            isar1: ID_AA64ISAR1_EL1.get(),
            isar2: read_sysreg!("S3_0_C0_C6_2"), // ID_AA64ISAR2_EL1, RAZ before v8.7
            ich_vtr: if gic_sysregs {
                read_sysreg!("S3_4_C12_C11_1") // ICH_VTR_EL2
            } else {
                0
            },
        })
    })
}

/// TPIDR2_EL0 (FEAT_SME).
fn tpidr2() -> u64 {
    read_sysreg!("S3_3_C13_C0_5")
}

fn set_tpidr2(v: u64) {
    write_sysreg!("S3_3_C13_C0_5", v);
}

/// Leaves streaming mode and turns ZA off if the host left either on
/// (FEAT_SME; ABI §3.7: the host saves that state first, as
/// `kernel_neon_begin()` does). A guest must not start in the host's
/// streaming mode, and the FP/SIMD switch below is not valid in it.
fn sme_stop_if_on() {
    let svcr = read_sysreg!("S3_3_C4_C2_2"); // SVCR
    if svcr & 0b11 != 0 {
        // SAFETY: SMSTOP (MSR SVCRSMZA, #0): ends streaming mode and
        // disables ZA, zeroing their state, which the host already saved.
        unsafe { asm!(".inst 0xd503467f", options(nomem, nostack)) };
    }
}

/// Loads `g` into the GIC virtual CPU interface (`f.nr_lrs` list registers,
/// `f.nr_aprs` active-priority registers per group).
fn gic_load(g: &GicCpuIf, f: &CpuFeatures) {
    write_sysreg!("S3_4_C12_C11_7", g.vmcr); // ICH_VMCR_EL2
    for_each_apr(f.nr_aprs, |n, ap0, ap1| {
        ap0.write(g.ap0r[n]);
        ap1.write(g.ap1r[n]);
    });
    for_each_lr(f.nr_lrs, |n, lr| lr.write(g.lr[n]));
    write_sysreg!("S3_4_C12_C11_0", g.hcr); // ICH_HCR_EL2
}

/// Saves the GIC virtual CPU interface into `g` and turns it off
/// (ICH_HCR_EL2 = 0: no maintenance interrupt for the host).
fn gic_save(g: &mut GicCpuIf, f: &CpuFeatures) {
    g.hcr = read_sysreg!("S3_4_C12_C11_0");
    write_sysreg!("S3_4_C12_C11_0", 0);
    g.vmcr = read_sysreg!("S3_4_C12_C11_7");
    for_each_apr(f.nr_aprs, |n, ap0, ap1| {
        g.ap0r[n] = ap0.read();
        g.ap1r[n] = ap1.read();
    });
    for_each_lr(f.nr_lrs, |n, lr| g.lr[n] = lr.read());
}

/// One EL2 system register named at compile time, read or written at run
/// time (the GIC's numbered registers need an `mrs`/`msr` each).
struct SysReg {
    read: fn() -> u64,
    write: fn(u64),
}

impl SysReg {
    fn read(&self) -> u64 {
        (self.read)()
    }
    fn write(&self, v: u64) {
        (self.write)(v);
    }
}

macro_rules! sysregs {
    ($($name:literal),* $(,)?) => {
        [$(SysReg { read: || read_sysreg!($name), write: |v| write_sysreg!($name, v) }),*]
    };
}

/// ICH_AP0R<n>_EL2 and ICH_AP1R<n>_EL2 for n < `count` (at most 4).
fn for_each_apr(count: usize, mut f: impl FnMut(usize, &SysReg, &SysReg)) {
    let ap0 = sysregs![
        "S3_4_C12_C8_0",
        "S3_4_C12_C8_1",
        "S3_4_C12_C8_2",
        "S3_4_C12_C8_3"
    ];
    let ap1 = sysregs![
        "S3_4_C12_C9_0",
        "S3_4_C12_C9_1",
        "S3_4_C12_C9_2",
        "S3_4_C12_C9_3"
    ];
    for (n, (a0, a1)) in ap0.iter().zip(&ap1).take(count).enumerate() {
        f(n, a0, a1);
    }
}

/// ICH_LR<n>_EL2 for n < `count` (at most 16).
fn for_each_lr(count: usize, mut f: impl FnMut(usize, &SysReg)) {
    let lrs = sysregs![
        "S3_4_C12_C12_0",
        "S3_4_C12_C12_1",
        "S3_4_C12_C12_2",
        "S3_4_C12_C12_3",
        "S3_4_C12_C12_4",
        "S3_4_C12_C12_5",
        "S3_4_C12_C12_6",
        "S3_4_C12_C12_7",
        "S3_4_C12_C13_0",
        "S3_4_C12_C13_1",
        "S3_4_C12_C13_2",
        "S3_4_C12_C13_3",
        "S3_4_C12_C13_4",
        "S3_4_C12_C13_5",
        "S3_4_C12_C13_6",
        "S3_4_C12_C13_7",
    ];
    for (n, lr) in lrs.iter().take(count).enumerate() {
        f(n, lr);
    }
}

macro_rules! pauth_switch {
    ($($i:literal: $lo:literal, $hi:literal);* $(;)?) => {
        fn save_keys(r: &mut El1Sysregs) {
            $( r.pauth[$i] = [read_sysreg!($lo), read_sysreg!($hi)]; )*
        }
        fn load_keys(r: &El1Sysregs) {
            $( write_sysreg!($lo, r.pauth[$i][0]); write_sysreg!($hi, r.pauth[$i][1]); )*
        }
    };
}

pauth_switch! {
    0: "S3_0_C2_C1_0", "S3_0_C2_C1_1"; // APIAKey
    1: "S3_0_C2_C1_2", "S3_0_C2_C1_3"; // APIBKey
    2: "S3_0_C2_C2_0", "S3_0_C2_C2_1"; // APDAKey
    3: "S3_0_C2_C2_2", "S3_0_C2_C2_3"; // APDBKey
    4: "S3_0_C2_C3_0", "S3_0_C2_C3_1"; // APGAKey
}

/// The host's EL2 configuration that a run changes.
struct HostEl2 {
    hcr: u64,
    vttbr: u64,
    vtcr: u64,
    cptr: u64,
    cnthctl: u64,
    cntvoff: u64,
    vmpidr: u64,
    mdcr: u64,
    icc_sre: u64,
}

/// Stores this CPU's V0..V31, FPSR, FPCR to `fp`.
pub fn fp_save(fp: &mut FpState) {
    // SAFETY: `fp` is a valid, 16-byte aligned FpState; the routine only
    // stores to it. EL2 code is built soft-float, so the registers it reads
    // hold the interrupted context's values.
    unsafe { __fpsimd_save(fp) };
}

/// Loads this CPU's V0..V31, FPSR, FPCR from `fp`.
pub fn fp_load(fp: &FpState) {
    // SAFETY: as fp_save; the routine only loads from `fp`.
    unsafe { __fpsimd_load(fp) };
}

/// Runs `ctx` under `s2` on this CPU until it exits to EL2, and returns the
/// raw exit (decode it with `el2::vcpu::decode_exit`). The guest's state is
/// saved back into `ctx`; the host's EL1 and EL2 state is as before.
///
/// The caller must hold whatever makes `ctx` and `s2` this vCPU's alone
/// (the VM's vCPU "running" state) and must not hold locks another CPU
/// could need while the guest runs.
pub fn run_vcpu(ctx: &mut VcpuContext, run: &VcpuRun) -> RawExit {
    let f = features();
    let pauth = f.pauth;

    // Host state.
    let mut host = El1Sysregs::default();
    let mut host_fp = FpState::default();
    if f.sme {
        sme_stop_if_on();
        host.tpidr2_el0 = tpidr2();
    }
    save_el1(&mut host);
    save_timer(&mut host);
    if pauth {
        save_keys(&mut host);
    }
    fp_save(&mut host_fp);
    let host_el2 = HostEl2 {
        hcr: HCR_EL2.get(),
        vttbr: VTTBR_EL2.get(),
        vtcr: VTCR_EL2.get(),
        cptr: CPTR_EL2.get(),
        cnthctl: CNTHCTL_EL2.get(),
        cntvoff: CNTVOFF_EL2.get(),
        vmpidr: VMPIDR_EL2.get(),
        mdcr: MDCR_EL2.get(),
        icc_sre: ICC_SRE_EL2.get(),
    };
    ctx.sanitize_pstate();

    // The host's deadline keeps running on the EL2 physical timer.
    let host_timer_armed = host.cntv_ctl & (cnt_ctl::ENABLE | cnt_ctl::IMASK) == cnt_ctl::ENABLE;
    if host_timer_armed {
        write_sysreg!(
            "cnthp_cval_el2",
            host.cntv_cval.wrapping_add(host_el2.cntvoff)
        );
        write_sysreg!("cnthp_ctl_el2", cnt_ctl::ENABLE);
        if let Some(sgi) = run.gicr_sgi {
            // SAFETY: a write-1-to-set enable bit of this CPU's own
            // redistributor (device memory); the host's driver disables
            // PPIs it does not use, so it is enabled again each time.
            unsafe {
                ((sgi + gic::GICR_ISENABLER0) as *mut u32).write_volatile(1 << gic::HYP_TIMER_PPI);
            }
        }
    }
    // Park the host's virtual timer before CNTVOFF changes under it.
    write_sysreg!("cntv_ctl_el0", 0);

    // EL2 for the guest.
    HCR_EL2.set(f.guest_hcr());
    VTCR_EL2.set(run.vtcr);
    VTTBR_EL2.set(run.vttbr);
    CPTR_EL2.set(host_el2.cptr | f.guest_cptr());
    CNTHCTL_EL2.set(cnthctl::GUEST);
    CNTVOFF_EL2.set(ctx.cntvoff);
    VMPIDR_EL2.set(ctx.vmpidr);
    MDCR_EL2.set(host_el2.mdcr | f.guest_mdcr());
    if f.ras {
        write_sysreg!("S3_4_C12_C1_1", ctx.vdisr); // VDISR_EL2
    }
    if f.gic_sysregs {
        // EL1 may not access ICC_SRE_EL1 while a guest runs, so the guest cannot
        // change the SRE/DFB/DIB bits the host relies on (the bit may be
        // RAO/WI, as on QEMU, where ICC_SRE_EL1 is constant).
        ICC_SRE_EL2.set(host_el2.icc_sre & !icc_sre_el2::ENABLE);
        gic_load(&ctx.gic, f);
    }
    // SAFETY: barriers; the TLB/I-cache maintenance only affects this CPU's
    // entries of the VMID now in VTTBR_EL2 (the guest's).
    unsafe {
        asm!("isb", options(nostack));
        if run.flush_local_tlb {
            asm!(
                "tlbi vmalle1",
                "ic iallu",
                "dsb nsh",
                "isb",
                options(nostack)
            );
        }
    }

    // Guest EL1 state.
    load_el1(&ctx.el1);
    if pauth {
        load_keys(&ctx.el1);
    }
    if f.sme {
        set_tpidr2(ctx.el1.tpidr2_el0);
    }
    fp_load(&ctx.fp);
    load_timer(&ctx.el1);

    // The fast path (KVM's fixup_guest_exit): an exit that `fast_answer`
    // answers from the guest's GPRs alone resumes the guest at once, with
    // its EL1, timer, FP/SIMD, GIC and key state still in the CPU and EL2
    // still configured for it. Nothing below runs in between: the answer
    // uses general-purpose registers (saved in `ctx`) and this stack only.
    let mut fast_exits = 0;
    let exit = loop {
        // SAFETY: EL2 is configured for the guest (stage-2 on with its
        // VTTBR, interrupts routed to EL2), its EL1 state is loaded, and
        // `ctx` is a valid exclusive context that __guest_enter reads and
        // writes back. The guest can only come back through GUEST_VECTORS.
        let vector = unsafe { __guest_enter(ctx) };
        let esr = ESR_EL2.get();
        if fast_exits < run.fast_budget && el2::vcpu::fast_answer(vector, esr, ctx) {
            fast_exits += 1;
            continue;
        }
        break RawExit {
            vector,
            esr,
            far: FAR_EL2.get(),
            hpfar: HPFAR_EL2.get(),
            fast_exits,
        };
    };

    // Guest state back into the context.
    save_el1(&mut ctx.el1);
    save_timer(&mut ctx.el1);
    if pauth {
        save_keys(&mut ctx.el1);
    }
    if f.sme {
        ctx.el1.tpidr2_el0 = tpidr2();
    }
    fp_save(&mut ctx.fp);
    write_sysreg!("cntv_ctl_el0", 0);
    if f.ras {
        ctx.vdisr = read_sysreg!("S3_4_C12_C1_1");
        write_sysreg!("S3_4_C12_C1_1", 0);
    }
    if f.gic_sysregs {
        gic_save(&mut ctx.gic, f);
        ICC_SRE_EL2.set(host_el2.icc_sre);
    }

    // Host state back.
    HCR_EL2.set(host_el2.hcr);
    VTCR_EL2.set(host_el2.vtcr);
    VTTBR_EL2.set(host_el2.vttbr);
    CPTR_EL2.set(host_el2.cptr);
    CNTHCTL_EL2.set(host_el2.cnthctl);
    CNTVOFF_EL2.set(host_el2.cntvoff);
    VMPIDR_EL2.set(host_el2.vmpidr);
    MDCR_EL2.set(host_el2.mdcr);
    if host_timer_armed {
        write_sysreg!("cnthp_ctl_el2", 0);
    }
    load_el1(&host);
    if pauth {
        load_keys(&host);
    }
    if f.sme {
        set_tpidr2(host.tpidr2_el0);
    }
    fp_load(&host_fp);
    load_timer(&host);
    // SAFETY: a barrier, so the host state is in effect before the eret.
    unsafe { asm!("isb", options(nostack)) };
    exit
}
