//! A vCPU as a value: its saved EL1 context, the EL2 configuration it runs
//! under, and what its exits mean.
//!
//! The binary's `arch::vcpu::run_vcpu` loads a [`VcpuContext`] into the CPU,
//! runs the guest until it traps to EL2, saves it back and returns a
//! [`RawExit`]: the vector slot and the syndrome registers. [`decode_exit`]
//! turns that into a typed [`GuestExit`], and [`GuestExit::host_exit`] into
//! the ABI's [`VcpuExit`] (docs/ABI.md §5) where the host has to act.
//! Nothing here touches the machine.
//!
//! # Guest calls and PSCI
//!
//! Guests call the hypervisor with `HVC #0` (ABI §2.1, decoded with
//! [`GuestCall`]). Guest PSCI uses the **HVC** conduit too, as under KVM
//! (the VMM's device tree for the guest says `method = "hvc"`); an `SMC`
//! (trapped by `HCR_EL2.TSC`) with a PSCI function id is accepted the same
//! way, so a guest given the host's `method = "smc"` still powers off. PSCI
//! ids (owner 4, Standard Secure Service) and ABI ids (owner 6, Vendor
//! Hypervisor) cannot collide.
//!
//! # TLBs across physical CPUs
//!
//! Each VM has its own VMID, so entries of different VMs never match each
//! other and switching VMs on a CPU needs no flush. Two cases do need one:
//! - a VMID is reused for a new VM: broadcast `tlbi vmalls12e1is` for it
//!   (the VM bookkeeping does that when it frees the VMID);
//! - a *different* vCPU of the same VM runs on a CPU than the one that ran
//!   there last: a guest may keep per-CPU TLB contexts (local TLBI, ASIDs
//!   per CPU), so entries another of its vCPUs left here would be wrong for
//!   this one. [`LastRan`] tracks this per VM (KVM's `last_vcpu_ran`), and
//!   `run_vcpu` flushes this CPU's EL1 entries of the VMID
//!   (`tlbi vmalle1; ic iallu`) when told to.
//!
//! A vCPU that moves to another CPU needs nothing more: `HCR_EL2.FB` makes
//! its EL1 TLB maintenance broadcast, so nothing it invalidated survives on
//! the CPU it left, and stage-2 changes are invalidated with broadcast
//! `tlbi ipas2e1is` by VMID.

use hypercalls::{Access, FaultKind, GuestCall, HypError, MmioSize, VcpuExit};

use crate::exception::{fault_ipa, Esr, ExceptionClass, Vector};
use crate::layout::MAX_CPUS;
use crate::psci::{self, GuestPsci};
use crate::sysreg::{pstate, sctlr_el1};

/// FP/SIMD state: V0..V31, FPSR, FPCR. Saved and loaded by assembly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct FpState {
    /// V0..V31.
    pub v: [u128; 32],
    /// FPSR.
    pub fpsr: u64,
    /// FPCR.
    pub fpcr: u64,
}

/// Byte offset of `fpsr` in [`FpState`] (vcpu.S `FP_FPSR`).
pub const FP_FPSR_OFFSET: usize = core::mem::offset_of!(FpState, fpsr);
const _: () = assert!(FP_FPSR_OFFSET == 512);
const _: () = assert!(core::mem::size_of::<FpState>() == 528);

/// The EL1 (and EL0) system registers of one context, switched by Rust
/// code in `arch::vcpu` with `mrs`/`msr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct El1Sysregs {
    /// SCTLR_EL1.
    pub sctlr: u64,
    /// TTBR0_EL1.
    pub ttbr0: u64,
    /// TTBR1_EL1.
    pub ttbr1: u64,
    /// TCR_EL1.
    pub tcr: u64,
    /// MAIR_EL1.
    pub mair: u64,
    /// AMAIR_EL1.
    pub amair: u64,
    /// VBAR_EL1.
    pub vbar: u64,
    /// CONTEXTIDR_EL1.
    pub contextidr: u64,
    /// TPIDR_EL0.
    pub tpidr_el0: u64,
    /// TPIDRRO_EL0.
    pub tpidrro_el0: u64,
    /// TPIDR_EL1.
    pub tpidr_el1: u64,
    /// SP_EL0.
    pub sp_el0: u64,
    /// SP_EL1.
    pub sp_el1: u64,
    /// ELR_EL1.
    pub elr: u64,
    /// SPSR_EL1.
    pub spsr: u64,
    /// ESR_EL1.
    pub esr: u64,
    /// FAR_EL1.
    pub far: u64,
    /// AFSR0_EL1.
    pub afsr0: u64,
    /// AFSR1_EL1.
    pub afsr1: u64,
    /// PAR_EL1.
    pub par: u64,
    /// CPACR_EL1.
    pub cpacr: u64,
    /// CNTKCTL_EL1.
    pub cntkctl: u64,
    /// CSSELR_EL1.
    pub csselr: u64,
    /// MDSCR_EL1.
    pub mdscr: u64,
    /// CNTV_CTL_EL0.
    pub cntv_ctl: u64,
    /// CNTV_CVAL_EL0.
    pub cntv_cval: u64,
    /// The pointer-authentication keys, `[lo, hi]` each: APIA, APIB, APDA,
    /// APDB, APGA. Switched only when the CPU has pointer authentication.
    pub pauth: [[u64; 2]; 5],
    /// TPIDR2_EL0 (SME's thread register). Switched only when the CPU has
    /// SME.
    pub tpidr2_el0: u64,
}

/// A vCPU's GIC virtual CPU interface: what its `ICC_*_EL1` accesses reach
/// while `HCR_EL2.IMO/FMO` are set (they become `ICV_*` accesses to these
/// EL2 registers). All zero for a fresh vCPU: priority mask 0, both groups
/// off, EOImode 0, no active priorities, no list register in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GicCpuIf {
    /// ICH_HCR_EL2 (the virtual interface's enable and maintenance
    /// interrupt controls; 0: off, as long as there is no virtual GIC).
    pub hcr: u64,
    /// ICH_VMCR_EL2: the guest's PMR, binary points, group enables,
    /// EOImode, CBPR.
    pub vmcr: u64,
    /// ICH_AP0R0..3_EL2 (only the implemented ones are switched).
    pub ap0r: [u64; crate::features::MAX_APRS],
    /// ICH_AP1R0..3_EL2.
    pub ap1r: [u64; crate::features::MAX_APRS],
    /// ICH_LR0..15_EL2 (only the implemented ones are switched).
    pub lr: [u64; crate::features::MAX_LRS],
}

/// A vCPU's whole saved state. It fits in the one page the VM bookkeeping
/// reserves per vCPU (ABI §3.6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct VcpuContext {
    /// x0..x30. Saved and loaded by vcpu.S.
    pub x: [u64; 31],
    /// Keeps `pc` and `pstate` a 16-byte aligned pair.
    pub _pad: u64,
    /// The guest PC (ELR_EL2 while it is trapped).
    pub pc: u64,
    /// The guest PSTATE (SPSR_EL2 while it is trapped).
    pub pstate: u64,
    /// The EL1 system registers.
    pub el1: El1Sysregs,
    /// CNTVOFF_EL2: the guest's virtual counter is the physical one minus this.
    pub cntvoff: u64,
    /// VMPIDR_EL2: what the guest reads as MPIDR_EL1.
    pub vmpidr: u64,
    /// VDISR_EL2: the guest's `DISR_EL1` (with `HCR_EL2.AMO` set, the
    /// guest's accesses reach this register). Switched only with FEAT_RAS.
    pub vdisr: u64,
    /// The GIC virtual CPU interface.
    pub gic: GicCpuIf,
    /// FP/SIMD registers (the guest sees FP/SIMD only, no SVE/SME).
    pub fp: FpState,
}

/// Offset of `x` in [`VcpuContext`] (vcpu.S `VCPU_X`).
pub const VCPU_X_OFFSET: usize = core::mem::offset_of!(VcpuContext, x);
/// Offset of `pc`, followed by `pstate` (vcpu.S `VCPU_PC`).
pub const VCPU_PC_OFFSET: usize = core::mem::offset_of!(VcpuContext, pc);
/// Offset of `fp`.
pub const VCPU_FP_OFFSET: usize = core::mem::offset_of!(VcpuContext, fp);

const _: () = assert!(VCPU_X_OFFSET == 0, "vcpu.S VCPU_X");
const _: () = assert!(VCPU_PC_OFFSET == 256, "vcpu.S VCPU_PC");
const _: () = assert!(core::mem::offset_of!(VcpuContext, pstate) == VCPU_PC_OFFSET + 8);
const _: () = assert!(VCPU_FP_OFFSET.is_multiple_of(16));
const _: () = assert!(
    core::mem::size_of::<VcpuContext>() <= 4096,
    "one state page"
);

/// MPIDR bit 31 is RES1.
const MPIDR_RES1: u64 = 1 << 31;

/// The MPIDR of vCPU `index`: Aff0 = index % 16, Aff1 = index / 16 (as
/// KVM: 16 CPUs per cluster, the GICv3 SGI target-list limit).
#[must_use]
pub const fn vcpu_mpidr(index: u16) -> u64 {
    MPIDR_RES1 | (index % 16) as u64 | (((index / 16) as u64) << 8)
}

/// The vCPU index an MPIDR names ([`vcpu_mpidr`]'s inverse; the RES1 and
/// MT/U bits are ignored), if it names one: Aff0 < 16, Aff2 = Aff3 = 0.
#[must_use]
pub fn vcpu_index(mpidr: u64) -> Option<usize> {
    let m = mpidr & 0xff_00ff_ffff;
    let aff0 = m & 0xff;
    let aff1 = (m >> 8) & 0xff;
    if m >> 16 != 0 || aff0 >= 16 {
        return None;
    }
    usize::try_from(aff1 * 16 + aff0).ok()
}

impl VcpuContext {
    /// A vCPU about to run its first instruction at `entry` (an IPA: the
    /// guest's MMU is off) with x0 = `arg`, at EL1h with DAIF masked, MMU off.
    /// `index` becomes its MPIDR ([`vcpu_mpidr`]), and `cntvoff` its virtual counter offset (the physical count
    /// at VM creation makes its virtual counter start near 0).
    #[must_use]
    pub fn new(entry: u64, arg: u64, index: u16, cntvoff: u64) -> Self {
        let mut ctx = Self::default();
        ctx.x[0] = arg;
        ctx.pc = entry;
        ctx.pstate = pstate::EL1H_MASKED;
        ctx.el1.sctlr = sctlr_el1::RESET;
        ctx.cntvoff = cntvoff;
        ctx.vmpidr = vcpu_mpidr(index);
        ctx
    }

    /// Makes `pstate` safe to return to: an AArch64 EL1h, EL1t or EL0t
    /// mode (anything else, which only a hypervisor bug could store,
    /// becomes EL1h with DAIF masked; the guest then faults in its own
    /// context rather than running at EL2). Returns whether it changed.
    pub fn sanitize_pstate(&mut self) -> bool {
        let ok = matches!(
            self.pstate & pstate::M,
            pstate::EL0T | pstate::EL1T | pstate::EL1H
        );
        if !ok {
            self.pstate = (self.pstate & !pstate::M) | pstate::EL1H_MASKED;
        }
        !ok
    }

    /// Steps over the trapped instruction (an SMC, a WFx, an emulated MMIO
    /// access: the traps whose return address is the instruction itself).
    pub fn skip_instruction(&mut self) {
        self.pc = self.pc.wrapping_add(4);
    }

    /// Puts a call's results into x0..x7.
    pub fn set_results(&mut self, regs: &[u64; 8]) {
        self.x[..8].copy_from_slice(regs);
    }

    /// x0..x7, a call's arguments.
    #[must_use]
    pub fn args(&self) -> [u64; 8] {
        let mut r = [0u64; 8];
        r.copy_from_slice(&self.x[..8]);
        r
    }
}

/// What the trap path saved at a guest exit, apart from the GPRs (which
/// are in the [`VcpuContext`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawExit {
    /// The EL2 vector slot that was taken (see [`Vector`]).
    pub vector: u64,
    /// ESR_EL2.
    pub esr: u64,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
    /// Exits the platform answered itself ([`fast_answer`]) and resumed
    /// the guest from before this one, within the same entry (each is one
    /// guest entry of `HYP_VCPU_RUN`'s bound, ABI §3.7).
    pub fast_exits: u32,
}

/// A decoded MMIO access (a data abort with a valid instruction syndrome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// The faulting IPA.
    pub ipa: u64,
    /// A store.
    pub write: bool,
    /// Access size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// The transfer register (31 = xzr/wzr).
    pub reg: u8,
    /// A load sign-extends.
    pub sign_extend: bool,
    /// The destination is 64-bit (SF).
    pub sixty_four: bool,
}

impl MmioAccess {
    fn mask(&self) -> u64 {
        match self.size {
            8 => u64::MAX,
            n => (1u64 << (u32::from(n) * 8)) - 1,
        }
    }

    /// For a store: the value written (the low `size` bytes of the
    /// transfer register; xzr/wzr is 0).
    #[must_use]
    pub fn write_data(&self, ctx: &VcpuContext) -> u64 {
        let v = ctx.x.get(usize::from(self.reg)).copied().unwrap_or(0);
        v & self.mask()
    }

    /// For a load: puts `value` into the transfer register as the
    /// instruction would (truncated to the size, sign- or zero-extended,
    /// upper half cleared for a W register) and steps over the instruction.
    pub fn complete_read(&self, ctx: &mut VcpuContext, value: u64) {
        let mut v = value & self.mask();
        if self.sign_extend && self.size < 8 {
            let shift = 64 - u32::from(self.size) * 8;
            v = (((v << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            v &= 0xffff_ffff;
        }
        if let Some(r) = ctx.x.get_mut(usize::from(self.reg)) {
            *r = v;
        }
        ctx.skip_instruction();
    }
}

/// Why the guest stopped, decoded. The exits marked "resume" are answered
/// by the hypervisor itself; the rest go to the host (see [`Self::host_exit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// A physical IRQ or FIQ arrived (for the host): return to it.
    Interrupted,
    /// A guest `HVC #0` that decoded as a guest call (ABI §4).
    Call(GuestCall),
    /// A guest `HVC #0` with an id that is not a guest call or PSCI, or bad
    /// arguments: resume with x0 = the error (ABI §2.1, §2.4).
    CallError(HypError),
    /// A PSCI call.
    Psci {
        /// The call.
        call: GuestPsci,
        /// Made with SMC (the return address is the SMC itself) rather than HVC.
        smc: bool,
    },
    /// An SMC that is not PSCI: resume with x0 = `NOT_SUPPORTED`.
    UnknownSmc,
    /// A stage-2 fault inside the VM's memory (the page is not mapped
    /// yet), or a permission fault on a mapped page anywhere.
    MemFault {
        /// The faulting IPA.
        ipa: u64,
        /// What was tried.
        access: Access,
        /// Unmapped or a permission fault.
        kind: FaultKind,
    },
    /// A data access outside the VM's memory that the VMM may emulate.
    Mmio(MmioAccess),
    /// A trapped WFI (or WFE): the vCPU has nothing to do.
    Wfx {
        /// WFE rather than WFI.
        wfe: bool,
    },
    /// Anything else: an SError, a trapped system register, an SVE access,
    /// an abort the hypervisor cannot resolve. The vCPU cannot go on.
    Unhandled {
        /// ESR_EL2.
        esr: u64,
        /// FAR_EL2 (0 when the architecture leaves it unknown).
        far: u64,
    },
}

/// Turns what the trap path saved into a [`GuestExit`].
///
/// `regs` are the guest's x0..x7 at the trap; `in_memory(ipa)` says whether
/// an IPA is in the VM's memory map (RAM the host may share or donate), which
/// tells a memory fault from an MMIO access. Never panics.
#[must_use]
pub fn decode_exit(raw: &RawExit, regs: &[u64; 8], in_memory: impl Fn(u64) -> bool) -> GuestExit {
    let esr = Esr(raw.esr);
    let unhandled = |far| GuestExit::Unhandled { esr: raw.esr, far };
    match Vector::from_index(raw.vector) {
        Vector::LowerIrq | Vector::LowerFiq => return GuestExit::Interrupted,
        Vector::LowerSync => {}
        _ => return unhandled(0),
    }
    match esr.class() {
        ExceptionClass::Hvc64 => {
            if esr.imm16() != 0 {
                return GuestExit::CallError(HypError::NotSupported);
            }
            if let Some(fid) = psci::guest_fid(regs[0]) {
                return GuestExit::Psci {
                    call: psci::decode_guest(fid, regs),
                    smc: false,
                };
            }
            match GuestCall::decode(regs) {
                Ok(call) => GuestExit::Call(call),
                Err(e) => GuestExit::CallError(e),
            }
        }
        ExceptionClass::Smc64 => match psci::guest_fid(regs[0]) {
            Some(fid) if esr.imm16() == 0 => GuestExit::Psci {
                call: psci::decode_guest(fid, regs),
                smc: true,
            },
            _ => GuestExit::UnknownSmc,
        },
        ExceptionClass::WfxTrap => GuestExit::Wfx {
            wfe: esr.iss() & 0b11 != 0,
        },
        ExceptionClass::DataAbortLower | ExceptionClass::InstructionAbortLower => {
            decode_abort(raw, esr, in_memory)
        }
        _ => unhandled(0),
    }
}

/// ISV: the data abort syndrome describes the access.
const ISS_ISV: u64 = 1 << 24;

fn decode_abort(raw: &RawExit, esr: Esr, in_memory: impl Fn(u64) -> bool) -> GuestExit {
    let ipa = fault_ipa(raw.hpfar, raw.far);
    let unhandled = GuestExit::Unhandled {
        esr: raw.esr,
        far: raw.far,
    };
    // Access-flag faults do not reach here when the platform enables
    // hardware AF updates (VTCR_EL2.HA); without them the stage-2 code has
    // no way to set the flag, so they stay unhandled, as address size
    // faults (beyond the IPA size), external aborts, ... do.
    let kind = if esr.is_translation_fault() {
        FaultKind::Unmapped
    } else if esr.is_permission_fault() {
        FaultKind::Permission
    } else {
        return unhandled;
    };
    let exec = esr.class() == ExceptionClass::InstructionAbortLower;
    // A permission fault means a page is mapped there: memory, wherever it is.
    if in_memory(ipa) || kind == FaultKind::Permission {
        let access = if exec {
            Access::Exec
        } else if esr.is_write() && !esr.s1ptw() {
            Access::Write
        } else {
            // A stage-1 walk reads its tables (hardware dirty-state
            // updates are not enabled for guests).
            Access::Read
        };
        return GuestExit::MemFault { ipa, access, kind };
    }
    // Outside memory: only a data access with a full syndrome can be emulated.
    if exec || esr.s1ptw() || raw.esr & ISS_ISV == 0 || !esr.is_translation_fault() {
        return unhandled;
    }
    let iss = raw.esr;
    GuestExit::Mmio(MmioAccess {
        ipa,
        write: esr.is_write(),
        size: 1 << ((iss >> 22) & 3),
        reg: ((iss >> 16) & 0x1f) as u8,
        sign_extend: iss & (1 << 21) != 0,
        sixty_four: iss & (1 << 15) != 0,
    })
}

/// The fast path: answers an exit that needs nothing but the trapped
/// instruction's registers, as the world switch's exit path would, and says
/// whether it did (`true`: resume the guest at once, without saving its EL1
/// state or loading the host's; `false`: `ctx` is untouched and the exit
/// takes the full switch back to the dispatcher).
///
/// `vector` and `esr` are what the guest exit saw; the guest's x0..x30, PC
/// and PSTATE are in `ctx` (the assembly saves them at every exit). Only
/// synchronous `HVC #0`/`SMC #0` exits are eligible, and of those only the
/// ones [`GuestExit::complete`] answers without the host and without the
/// VM's bookkeeping: `HYP_GUEST_VERSION`, a call with a bad id or bad
/// arguments (an error in x0), PSCI `VERSION`, `FEATURES` and unknown PSCI
/// functions, and an SMC that is not PSCI. Their answers touch x0..x7 and
/// the PC only, so EL2 can give them with the guest's EL1 system registers,
/// timer, FP/SIMD, GIC and pointer-authentication state still loaded: the
/// Rust that runs meanwhile uses general-purpose registers and the EL2
/// stack only (the binary is built soft-float) and touches no EL1 register.
/// Everything else (interrupts, aborts, WFx, trapped registers, guest calls
/// for the host, PSCI `CPU_ON`/`CPU_OFF`/`AFFINITY_INFO`/`SYSTEM_*`, which
/// need the VM's lock or the host) returns `false`. The answer is the same
/// as the slow path's: [`decode_exit`] then [`GuestExit::complete`] with
/// [`psci::GUEST_VERSION`].
pub fn fast_answer(vector: u64, esr: u64, ctx: &mut VcpuContext) -> bool {
    if Vector::from_index(vector) != Vector::LowerSync
        || !matches!(
            Esr(esr).class(),
            ExceptionClass::Hvc64 | ExceptionClass::Smc64
        )
    {
        return false;
    }
    let raw = RawExit {
        vector,
        esr,
        ..RawExit::default()
    };
    let Some(regs) = ctx.x.first_chunk::<8>() else {
        return false;
    };
    // HVC and SMC exits never look at memory.
    let exit = decode_exit(&raw, regs, |_| false);
    if exit.host_exit().is_some() {
        return false;
    }
    exit.complete(ctx, psci::GUEST_VERSION) == Resume::Guest
}

/// What the hypervisor does with the vCPU after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Run the guest again at once, without the host.
    Guest,
    /// Return to the host with this exit; the next `HYP_VCPU_RUN` continues.
    Host(VcpuExit),
}

impl GuestExit {
    /// The ABI exit the host gets, or `None` for exits the hypervisor
    /// answers itself (a guest call error, `Version`, an unknown SMC, PSCI
    /// queries).
    ///
    /// Mapping onto ABI §5: an MMIO write's data is not known here (it is
    /// in the context: [`Self::complete`] fills it in), PSCI CPU_OFF is
    /// `PoweredOff`, and PSCI CPU_ON and AFFINITY_INFO, which need the
    /// VM's bookkeeping, are answered by the dispatcher before this (here
    /// they are `UnhandledTrap`).
    #[must_use]
    pub fn host_exit(&self) -> Option<VcpuExit> {
        Some(match *self {
            Self::Interrupted => VcpuExit::Interrupted,
            Self::Wfx { wfe } => VcpuExit::Wfx { wfe },
            Self::Call(GuestCall::Version) | Self::CallError(_) | Self::UnknownSmc => return None,
            Self::Call(GuestCall::ConsoleWrite(bytes)) => VcpuExit::Console(bytes),
            Self::Call(GuestCall::ShareRequest { gfn, nr }) => VcpuExit::ShareRequest { gfn, nr },
            Self::Call(GuestCall::UnshareRequest { gfn, nr }) => {
                VcpuExit::UnshareRequest { gfn, nr }
            }
            Self::Call(GuestCall::Shutdown) => VcpuExit::Shutdown,
            Self::Psci {
                call: GuestPsci::SystemOff,
                ..
            } => VcpuExit::SystemOff { reset: false },
            Self::Psci {
                call: GuestPsci::SystemReset,
                ..
            } => VcpuExit::SystemOff { reset: true },
            Self::Psci {
                call: GuestPsci::CpuOff,
                ..
            } => VcpuExit::PoweredOff,
            Self::Psci {
                call: GuestPsci::Version | GuestPsci::Features(_) | GuestPsci::Other(_),
                ..
            } => return None,
            Self::Psci {
                call: GuestPsci::CpuOn { .. } | GuestPsci::AffinityInfo(_),
                ..
            } => VcpuExit::UnhandledTrap { esr: 0, far: 0 },
            Self::MemFault { ipa, access, kind } => match hypercalls::Gfn::new(ipa >> 12) {
                Some(gfn) => VcpuExit::MemFault { gfn, access, kind },
                None => VcpuExit::UnhandledTrap { esr: 0, far: ipa },
            },
            Self::Mmio(m) => match MmioSize::new(m.size) {
                Some(size) => VcpuExit::Mmio {
                    ipa: m.ipa,
                    size,
                    write: m.write,
                    data: 0,
                },
                None => VcpuExit::UnhandledTrap {
                    esr: 0x24 << 26,
                    far: m.ipa,
                },
            },
            Self::Unhandled { esr, far } => VcpuExit::UnhandledTrap { esr, far },
        })
    }

    /// Completes the exit in the guest's registers (x0 result, PC step) and
    /// says where to go next. Guest calls that go to the host get x0 = 0
    /// (ABI §4); a trapped SMC or WFx is stepped over (an HVC's return
    /// address is already the next instruction), and so is an MMIO write
    /// (its data goes into the exit); faults, MMIO reads and unhandled
    /// traps are left for the host to resolve, so the guest retries the
    /// instruction (an MMIO read is completed by
    /// [`MmioAccess::complete_read`] with the host's value).
    pub fn complete(&self, ctx: &mut VcpuContext, psci_version: u64) -> Resume {
        let result = |ctx: &mut VcpuContext, regs: [u64; 8]| ctx.set_results(&regs);
        match *self {
            Self::Call(GuestCall::Version) => {
                let ok = hypercalls::encode_result(&Ok(hypercalls::Reply::Version(
                    hypercalls::AbiVersion::CURRENT,
                )));
                result(ctx, ok);
                Resume::Guest
            }
            Self::CallError(e) => {
                result(ctx, e.encode());
                Resume::Guest
            }
            Self::UnknownSmc => {
                result(ctx, HypError::NotSupported.encode());
                ctx.skip_instruction();
                Resume::Guest
            }
            Self::Psci { call, smc } => {
                if smc {
                    ctx.skip_instruction();
                }
                let answer = match call {
                    GuestPsci::Version => Some(psci_version),
                    GuestPsci::Features(fid) => Some(if psci::guest_supports(fid) {
                        0
                    } else {
                        psci::ret(psci::NOT_SUPPORTED)
                    }),
                    GuestPsci::Other(_) => Some(psci::ret(psci::NOT_SUPPORTED)),
                    _ => None,
                };
                match (answer, self.host_exit()) {
                    (Some(v), _) => {
                        // PSCI returns in x0 only; x1.. are preserved.
                        ctx.x[0] = v;
                        Resume::Guest
                    }
                    (None, Some(e)) => Resume::Host(e),
                    (None, None) => Resume::Guest,
                }
            }
            Self::Wfx { wfe } => {
                ctx.skip_instruction();
                Resume::Host(VcpuExit::Wfx { wfe })
            }
            Self::Mmio(m) if m.write => {
                let data = m.write_data(ctx);
                ctx.skip_instruction();
                match self.host_exit() {
                    Some(VcpuExit::Mmio {
                        ipa, size, write, ..
                    }) => Resume::Host(VcpuExit::Mmio {
                        ipa,
                        size,
                        write,
                        data,
                    }),
                    Some(e) => Resume::Host(e),
                    None => Resume::Guest,
                }
            }
            Self::Call(_) => {
                result(ctx, [0; 8]);
                match self.host_exit() {
                    Some(e) => Resume::Host(e),
                    None => Resume::Guest,
                }
            }
            _ => match self.host_exit() {
                Some(e) => Resume::Host(e),
                None => Resume::Guest,
            },
        }
    }
}

/// Which vCPU of one VM ran last on each physical CPU (KVM's
/// `last_vcpu_ran`); lives with the VM, under its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastRan {
    cpus: [Option<u16>; MAX_CPUS],
}

impl Default for LastRan {
    fn default() -> Self {
        Self::new()
    }
}

impl LastRan {
    /// No vCPU of the VM has run anywhere.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            cpus: [None; MAX_CPUS],
        }
    }

    /// Records that `vcpu` is about to run on physical CPU `cpu`, and says
    /// whether this CPU's EL1 TLB entries of the VM's VMID must be flushed
    /// first (another vCPU of the VM ran here last). A CPU index beyond
    /// [`MAX_CPUS`] always flushes.
    pub fn load(&mut self, cpu: usize, vcpu: u16) -> bool {
        match self.cpus.get_mut(cpu) {
            Some(slot) => {
                let flush = slot.is_some_and(|last| last != vcpu);
                *slot = Some(vcpu);
                flush
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercalls::{ConsoleBytes, Gfn, PageCount};

    const HVC0: u64 = 0x5a00_0000; // EC 0x16, IL
    const SMC0: u64 = 0x5e00_0000; // EC 0x17, IL
    const RAM: core::ops::Range<u64> = 0x4000_0000..0x4800_0000;

    fn sync(esr: u64) -> RawExit {
        RawExit {
            vector: 8,
            esr,
            ..RawExit::default()
        }
    }

    fn in_ram(ipa: u64) -> bool {
        RAM.contains(&ipa)
    }

    fn decode(raw: &RawExit, regs: [u64; 8]) -> GuestExit {
        decode_exit(raw, &regs, in_ram)
    }

    #[test]
    fn fresh_vcpu() {
        let c = VcpuContext::new(0x4008_0000, 0x1234, 17, 99);
        assert_eq!(c.pc, 0x4008_0000);
        assert_eq!(c.x[0], 0x1234);
        assert!(c.x[1..].iter().all(|&x| x == 0));
        assert_eq!(c.pstate, 0x3c5);
        assert_eq!(c.el1.sctlr & 1, 0, "MMU off");
        assert_eq!(c.vmpidr, (1 << 31) | (1 << 8) | 1);
        assert_eq!(c.cntvoff, 99);
        assert_eq!(c.fp, FpState::default());
    }

    #[test]
    fn pstate_is_always_el1_or_el0() {
        let mut c = VcpuContext::new(0, 0, 0, 0);
        assert!(!c.sanitize_pstate());
        for ok in [0x0, 0x4, 0x3c5, 0x2000_0004] {
            c.pstate = ok;
            assert!(!c.sanitize_pstate());
            assert_eq!(c.pstate, ok);
        }
        // EL2h, EL2t, EL3h, AArch32 modes.
        for bad in [0x9, 0x8, 0xd, 0x10, 0x13, 0x2000_0009] {
            c.pstate = bad;
            assert!(c.sanitize_pstate());
            assert_eq!(c.pstate & 0x1f, 0x5, "{bad:#x}");
            assert_eq!(c.pstate & 0x3c0, 0x3c0, "DAIF masked");
        }
    }

    #[test]
    fn layout_matches_assembly() {
        // vcpu.S stores x0..x30 at 0, pc/pstate as a pair at 256; the FP
        // area is 16-byte aligned for q-register pairs.
        assert_eq!(core::mem::align_of::<VcpuContext>(), 16);
        assert_eq!(core::mem::offset_of!(VcpuContext, x), 0);
        assert_eq!(core::mem::offset_of!(VcpuContext, pc), 256);
        assert_eq!(core::mem::offset_of!(VcpuContext, pstate), 264);
        assert_eq!(VCPU_FP_OFFSET % 16, 0);
        assert_eq!(core::mem::offset_of!(FpState, fpcr), 520);
    }

    #[test]
    fn console_call() {
        let call = GuestCall::ConsoleWrite(ConsoleBytes::new(b"hi").unwrap());
        let exit = decode(&sync(HVC0), call.encode());
        assert_eq!(exit, GuestExit::Call(call));
        let mut ctx = VcpuContext::new(0x1000, 0, 0, 0);
        ctx.set_results(&call.encode());
        ctx.x[9] = 7;
        let r = exit.complete(&mut ctx, 0x1_0001);
        assert_eq!(
            r,
            Resume::Host(VcpuExit::Console(ConsoleBytes::new(b"hi").unwrap()))
        );
        assert_eq!(ctx.args(), [0; 8], "x0 = 0, x1..x7 = 0 (ABI §4)");
        assert_eq!(ctx.x[9], 7, "x8.. preserved");
        assert_eq!(ctx.pc, 0x1000, "HVC returns past itself");
    }

    #[test]
    fn share_unshare_shutdown_calls() {
        let gfn = Gfn::new(0x40010).unwrap();
        let nr = PageCount::new(3).unwrap();
        for (call, host) in [
            (
                GuestCall::ShareRequest { gfn, nr },
                VcpuExit::ShareRequest { gfn, nr },
            ),
            (
                GuestCall::UnshareRequest { gfn, nr },
                VcpuExit::UnshareRequest { gfn, nr },
            ),
            (GuestCall::Shutdown, VcpuExit::Shutdown),
        ] {
            let exit = decode(&sync(HVC0), call.encode());
            assert_eq!(exit, GuestExit::Call(call));
            assert_eq!(exit.host_exit(), Some(host));
        }
    }

    #[test]
    fn version_call_is_answered_by_the_hypervisor() {
        let exit = decode(&sync(HVC0), GuestCall::Version.encode());
        let mut ctx = VcpuContext::default();
        assert_eq!(exit.complete(&mut ctx, 0), Resume::Guest);
        assert_eq!(ctx.x[0], 0);
        assert_eq!(
            (ctx.x[1], ctx.x[2]),
            (
                u64::from(hypercalls::ABI_VERSION_MAJOR),
                u64::from(hypercalls::ABI_VERSION_MINOR)
            )
        );
    }

    #[test]
    fn bad_guest_calls_get_errors() {
        // A host call id from the guest side: NOT_SUPPORTED (ABI §2.1).
        let mut regs = [0u64; 8];
        regs[0] = 0xc600_0001;
        let exit = decode(&sync(HVC0), regs);
        assert_eq!(exit, GuestExit::CallError(HypError::NotSupported));
        let mut ctx = VcpuContext::default();
        ctx.x[..8].copy_from_slice(&regs);
        assert_eq!(exit.complete(&mut ctx, 0), Resume::Guest);
        assert_eq!(ctx.x[0] as i64, -1);
        // Console write with len 0: EINVAL.
        regs[0] = 0xc600_0101;
        assert_eq!(
            decode(&sync(HVC0), regs),
            GuestExit::CallError(HypError::InvalidArgument)
        );
        // HVC with a non-zero immediate.
        assert_eq!(
            decode(&sync(HVC0 | 1), GuestCall::Shutdown.encode()),
            GuestExit::CallError(HypError::NotSupported)
        );
    }

    #[test]
    fn psci_over_hvc_and_smc() {
        let mut regs = [0u64; 8];
        regs[0] = u64::from(psci::PSCI_SYSTEM_OFF);
        for (esr, smc) in [(HVC0, false), (SMC0, true)] {
            let exit = decode(&sync(esr), regs);
            assert_eq!(
                exit,
                GuestExit::Psci {
                    call: GuestPsci::SystemOff,
                    smc
                }
            );
            let mut ctx = VcpuContext::new(0x2000, 0, 0, 0);
            assert_eq!(
                exit.complete(&mut ctx, 0),
                Resume::Host(VcpuExit::SystemOff { reset: false })
            );
            assert_eq!(ctx.pc, if smc { 0x2004 } else { 0x2000 });
        }
        regs[0] = u64::from(psci::PSCI_CPU_ON_64);
        regs[1] = 1;
        regs[2] = 0x4008_0000;
        regs[3] = 5;
        assert_eq!(
            decode(&sync(HVC0), regs),
            GuestExit::Psci {
                call: GuestPsci::CpuOn {
                    target: 1,
                    entry: 0x4008_0000,
                    context: 5
                },
                smc: false
            }
        );
        // CPU_ON, 32-bit form: arguments truncated to 32 bits.
        regs[0] = u64::from(psci::PSCI_CPU_ON_32);
        regs[2] = 0xffff_ffff_4008_0000;
        assert!(matches!(
            decode(&sync(HVC0), regs),
            GuestExit::Psci {
                call: GuestPsci::CpuOn {
                    entry: 0x4008_0000,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn psci_queries_are_answered_in_x0_only() {
        let mut ctx = VcpuContext::new(0x2000, 0, 0, 0);
        ctx.x[0] = u64::from(psci::PSCI_VERSION);
        ctx.x[1] = 0xaa;
        let exit = decode(&sync(SMC0), ctx.args());
        assert_eq!(exit.complete(&mut ctx, 0x1_0001), Resume::Guest);
        assert_eq!((ctx.x[0], ctx.x[1], ctx.pc), (0x1_0001, 0xaa, 0x2004));
        ctx.x[0] = u64::from(psci::PSCI_FEATURES);
        ctx.x[1] = u64::from(psci::PSCI_SYSTEM_OFF);
        decode(&sync(HVC0), ctx.args()).complete(&mut ctx, 0);
        assert_eq!(ctx.x[0], 0);
        ctx.x[0] = u64::from(psci::PSCI_FEATURES);
        ctx.x[1] = u64::from(psci::PSCI_CPU_ON_64);
        decode(&sync(HVC0), ctx.args()).complete(&mut ctx, 0);
        assert_eq!(ctx.x[0], 0, "CPU_ON is served");
        ctx.x[0] = u64::from(psci::PSCI_FEATURES);
        ctx.x[1] = u64::from(psci::PSCI_SYSTEM_SUSPEND_64);
        decode(&sync(HVC0), ctx.args()).complete(&mut ctx, 0);
        assert_eq!(ctx.x[0] as i64, -1, "SYSTEM_SUSPEND is not");
        ctx.x[0] = 0x8400_0011; // a PSCI id we do not know
        let exit = decode(&sync(HVC0), ctx.args());
        assert_eq!(
            exit,
            GuestExit::Psci {
                call: GuestPsci::Other(0x8400_0011),
                smc: false
            }
        );
        exit.complete(&mut ctx, 0);
        assert_eq!(ctx.x[0] as i64, -1);
    }

    #[test]
    fn unknown_smc() {
        let mut ctx = VcpuContext::new(0x3000, 0, 0, 0);
        ctx.x[0] = 0x8200_0000; // SiP service
        let exit = decode(&sync(SMC0), ctx.args());
        assert_eq!(exit, GuestExit::UnknownSmc);
        assert_eq!(exit.complete(&mut ctx, 0), Resume::Guest);
        assert_eq!((ctx.x[0] as i64, ctx.pc), (-1, 0x3004));
    }

    #[test]
    fn interrupts_and_wfx() {
        for v in [9, 10] {
            let exit = decode(
                &RawExit {
                    vector: v,
                    ..RawExit::default()
                },
                [0; 8],
            );
            assert_eq!(exit, GuestExit::Interrupted);
            let mut ctx = VcpuContext::new(0x5000, 0, 0, 0);
            assert_eq!(
                exit.complete(&mut ctx, 0),
                Resume::Host(VcpuExit::Interrupted)
            );
            assert_eq!(ctx.pc, 0x5000, "an interrupted instruction is not skipped");
        }
        // WFI: EC 1, TI = 0; WFE: TI = 1.
        let wfi = decode(&sync(0x0600_0000), [0; 8]);
        assert_eq!(wfi, GuestExit::Wfx { wfe: false });
        assert_eq!(
            decode(&sync(0x0600_0001), [0; 8]),
            GuestExit::Wfx { wfe: true }
        );
        let mut ctx = VcpuContext::new(0x5000, 0, 0, 0);
        assert_eq!(
            wfi.complete(&mut ctx, 0),
            Resume::Host(VcpuExit::Wfx { wfe: false })
        );
        assert_eq!(ctx.pc, 0x5004);
    }

    fn abort(esr: u64, ipa: u64) -> RawExit {
        RawExit {
            vector: 8,
            esr,
            far: 0xffff_0000_0000_0000 | (ipa & 0xfff),
            hpfar: (ipa >> 12) << 4,
            ..RawExit::default()
        }
    }

    #[test]
    fn memory_faults() {
        // Data abort, level-3 translation fault, write.
        let exit = decode(&abort(0x9200_0047, 0x4010_0123), [0; 8]);
        assert_eq!(
            exit,
            GuestExit::MemFault {
                ipa: 0x4010_0123,
                access: Access::Write,
                kind: FaultKind::Unmapped,
            }
        );
        let mut ctx = VcpuContext::new(0x4000_0000, 0, 0, 0);
        assert_eq!(
            exit.complete(&mut ctx, 0),
            Resume::Host(VcpuExit::MemFault {
                gfn: Gfn::new(0x40100).unwrap(),
                access: Access::Write,
                kind: hypercalls::FaultKind::Unmapped,
            })
        );
        assert_eq!(ctx.pc, 0x4000_0000, "retried after the host maps it");
        // Permission fault on read.
        assert_eq!(
            decode(&abort(0x9200_000f, 0x4000_0000), [0; 8]),
            GuestExit::MemFault {
                ipa: 0x4000_0000,
                access: Access::Read,
                kind: FaultKind::Permission,
            }
        );
        // A permission fault outside the memory map is still a memory
        // fault: something is mapped there.
        assert_eq!(
            decode(&abort(0x9200_004f, 0x0900_0000), [0; 8]),
            GuestExit::MemFault {
                ipa: 0x0900_0000,
                access: Access::Write,
                kind: FaultKind::Permission,
            }
        );
        // An access-flag fault (no hardware AF update) cannot be resolved.
        assert!(matches!(
            decode(&abort(0x9200_000b, 0x4000_0000), [0; 8]),
            GuestExit::Unhandled { .. }
        ));
        // Instruction abort, translation fault level 3.
        assert_eq!(
            decode(&abort(0x8200_0007, 0x4000_2000), [0; 8]),
            GuestExit::MemFault {
                ipa: 0x4000_2000,
                access: Access::Exec,
                kind: FaultKind::Unmapped,
            }
        );
        // Stage-1 walk (S1PTW) with WnR: a read of the table.
        assert_eq!(
            decode(&abort(0x9200_00c7, 0x4000_3000), [0; 8]),
            GuestExit::MemFault {
                ipa: 0x4000_3000,
                access: Access::Read,
                kind: FaultKind::Unmapped,
            }
        );
    }

    #[test]
    fn mmio_faults() {
        // str w1, [x0] to 0x0900_0000: ISV, SAS = 2 (word), SRT = 1, WnR.
        let esr = 0x9200_0000 | (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6) | 0x07;
        let exit = decode(&abort(esr, 0x0900_0004), [0; 8]);
        assert_eq!(
            exit,
            GuestExit::Mmio(MmioAccess {
                ipa: 0x0900_0004,
                write: true,
                size: 4,
                reg: 1,
                sign_extend: false,
                sixty_four: false
            })
        );
        let mut ctx = VcpuContext::new(0x4000_0000, 0, 0, 0);
        ctx.x[1] = 0xdead_beef_1234_5678;
        assert_eq!(
            exit.complete(&mut ctx, 0),
            Resume::Host(VcpuExit::Mmio {
                ipa: 0x0900_0004,
                size: MmioSize::new(4).unwrap(),
                write: true,
                data: 0x1234_5678,
            }),
            "a write carries its data and is complete"
        );
        assert_eq!(ctx.pc, 0x4000_0004);
        // ldrsh x3, [..]: SSE, SF, SAS = 1.
        let esr = 0x9200_0000 | (1 << 24) | (1 << 22) | (1 << 21) | (3 << 16) | (1 << 15) | 0x06;
        assert_eq!(
            decode(&abort(esr, 0x0a00_0000), [0; 8]),
            GuestExit::Mmio(MmioAccess {
                ipa: 0x0a00_0000,
                write: false,
                size: 2,
                reg: 3,
                sign_extend: true,
                sixty_four: true
            })
        );
        // No ISV (e.g. ldp): cannot be emulated.
        let exit = decode(&abort(0x9200_0007, 0x0900_0000), [0; 8]);
        assert!(matches!(exit, GuestExit::Unhandled { .. }));
        // Executing from MMIO.
        assert!(matches!(
            decode(&abort(0x8200_0007, 0x0900_0000), [0; 8]),
            GuestExit::Unhandled { .. }
        ));
        // A stage-1 walk through MMIO.
        assert!(matches!(
            decode(&abort(esr | (1 << 7), 0x0900_0000), [0; 8]),
            GuestExit::Unhandled { .. }
        ));
    }

    #[test]
    fn mmio_emulation() {
        let mut ctx = VcpuContext::new(0x7000, 0, 0, 0);
        let mut m = MmioAccess {
            ipa: 0x0a00_0000,
            write: true,
            size: 4,
            reg: 3,
            sign_extend: false,
            sixty_four: false,
        };
        ctx.x[3] = 0x1111_2222_3333_4444;
        assert_eq!(m.write_data(&ctx), 0x3333_4444);
        m.reg = 31; // wzr
        assert_eq!(m.write_data(&ctx), 0);
        // ldrsh x5: sign-extended to 64 bits.
        m = MmioAccess {
            write: false,
            size: 2,
            reg: 5,
            sign_extend: true,
            sixty_four: true,
            ..m
        };
        m.complete_read(&mut ctx, 0xffff_8001);
        assert_eq!(ctx.x[5], 0xffff_ffff_ffff_8001);
        assert_eq!(ctx.pc, 0x7004);
        // ldrsb w5: sign-extended to 32 bits only.
        m.size = 1;
        m.sixty_four = false;
        m.complete_read(&mut ctx, 0x80);
        assert_eq!(ctx.x[5], 0xffff_ff80);
        // ldr x6: the whole value.
        m = MmioAccess {
            size: 8,
            reg: 6,
            sign_extend: false,
            sixty_four: true,
            ..m
        };
        m.complete_read(&mut ctx, 0x8000_0000_0000_0001);
        assert_eq!(ctx.x[6], 0x8000_0000_0000_0001);
        // A load into xzr changes nothing but the PC.
        m.reg = 31;
        let before = ctx.x;
        m.complete_read(&mut ctx, 5);
        assert_eq!(ctx.x, before);
        assert_eq!(ctx.pc, 0x7010);
    }

    #[test]
    fn unresolvable_aborts_and_traps() {
        // Address size fault (beyond the IPA size), in or out of memory.
        for ipa in [0x4000_0000, 0x1_0000_0000_0000] {
            assert_eq!(
                decode(&abort(0x9200_0000, ipa), [0; 8]),
                GuestExit::Unhandled {
                    esr: 0x9200_0000,
                    far: 0xffff_0000_0000_0000
                }
            );
        }
        // Synchronous external abort.
        assert!(matches!(
            decode(&abort(0x9200_0010, 0x4000_0000), [0; 8]),
            GuestExit::Unhandled { .. }
        ));
        // A trapped system register access, an SVE access, SError.
        for raw in [
            sync(0x6200_0000),
            sync(0x6600_0000),
            RawExit {
                vector: 11,
                esr: 0xbe00_0000,
                ..RawExit::default()
            },
            RawExit {
                vector: 12,
                ..RawExit::default()
            },
            RawExit {
                vector: 4,
                ..RawExit::default()
            },
            RawExit {
                vector: 77,
                ..RawExit::default()
            },
        ] {
            let exit = decode(&raw, [0; 8]);
            assert!(matches!(exit, GuestExit::Unhandled { .. }), "{raw:?}");
            let mut ctx = VcpuContext::new(0x6000, 0, 0, 0);
            assert!(matches!(
                exit.complete(&mut ctx, 0),
                Resume::Host(VcpuExit::UnhandledTrap { .. })
            ));
            assert_eq!(ctx.pc, 0x6000);
        }
    }

    #[test]
    fn vcpu_mpidr_round_trips() {
        for i in [0u16, 1, 15, 16, 17, 63] {
            assert_eq!(vcpu_index(vcpu_mpidr(i)), Some(usize::from(i)));
        }
        assert_eq!(vcpu_mpidr(17), 0x8000_0101);
        assert_eq!(vcpu_index(0x10), None, "Aff0 >= 16");
        assert_eq!(vcpu_index(1 << 16), None, "Aff2");
        assert_eq!(vcpu_index(1 << 32), None, "Aff3");
    }

    #[test]
    fn last_ran_flushes_when_another_vcpu_ran_here() {
        let mut l = LastRan::new();
        assert!(!l.load(0, 0), "nothing ran on CPU 0 yet");
        assert!(!l.load(0, 0), "same vCPU again");
        assert!(!l.load(1, 1), "vCPU 1 first on CPU 1");
        assert!(l.load(0, 1), "vCPU 1 where vCPU 0 ran");
        assert!(l.load(1, 0), "vCPU 0 where vCPU 1 ran");
        assert!(!l.load(1, 0));
        assert!(l.load(MAX_CPUS, 0), "unknown CPU: flush to be safe");
    }

    /// Exits `fast_answer` must take, and some it must leave: for each, the
    /// fast path agrees with the slow one (decode, then complete) or leaves
    /// the context alone.
    #[test]
    fn fast_path_answers_what_the_slow_path_answers_alone() {
        let with = |x0: u64, x1: u64| {
            let mut r = [0u64; 8];
            r[0] = x0;
            r[1] = x1;
            r
        };
        let gfn = Gfn::new(0x40010).unwrap();
        let nr = PageCount::new(1).unwrap();
        let fast = [
            (8, HVC0, GuestCall::Version.encode()),
            (8, HVC0, with(0xc600_0001, 0)), // a host call id
            (8, HVC0, with(0xc600_01ff, 0)), // no such call
            (8, HVC0, with(0xc600_0101, 0)), // console write, len 0
            (8, HVC0 | 1, GuestCall::Shutdown.encode()), // HVC #1
            (8, HVC0, with(u64::from(psci::PSCI_VERSION), 0)),
            (8, SMC0, with(u64::from(psci::PSCI_VERSION), 0)),
            (
                8,
                HVC0,
                with(
                    u64::from(psci::PSCI_FEATURES),
                    u64::from(psci::PSCI_CPU_ON_64),
                ),
            ),
            (8, HVC0, with(0x8400_0011, 0)), // unknown PSCI function
            (8, SMC0, with(0x8200_0000, 0)), // SiP SMC
            (8, SMC0 | 1, with(u64::from(psci::PSCI_VERSION), 0)), // SMC #1
        ];
        let slow = [
            (9, HVC0, GuestCall::Version.encode()),  // an IRQ
            (10, HVC0, GuestCall::Version.encode()), // an FIQ
            (11, HVC0, GuestCall::Version.encode()), // an SError
            (12, HVC0, GuestCall::Version.encode()), // AArch32
            (0, HVC0, GuestCall::Version.encode()),  // EL2 itself
            (8, HVC0, GuestCall::Shutdown.encode()),
            (8, HVC0, GuestCall::ShareRequest { gfn, nr }.encode()),
            (
                8,
                HVC0,
                GuestCall::ConsoleWrite(ConsoleBytes::new(b"x").unwrap()).encode(),
            ),
            (8, HVC0, with(u64::from(psci::PSCI_CPU_ON_64), 1)),
            (8, HVC0, with(u64::from(psci::PSCI_CPU_OFF), 0)),
            (8, SMC0, with(u64::from(psci::PSCI_SYSTEM_OFF), 0)),
            (8, HVC0, with(u64::from(psci::PSCI_AFFINITY_INFO_64), 0)),
            (8, 0x0600_0000, [0; 8]),          // WFI
            (8, 0x9200_0047, [0; 8]),          // data abort
            (8, 0x6200_0000 | 0x1234, [0; 8]), // trapped system register
            (8, 0x1c00_0000, [0; 8]),          // SVE access
        ];
        let start = || {
            let mut c = VcpuContext::new(0x5000, 0, 3, 0);
            for (i, x) in c.x.iter_mut().enumerate() {
                *x = 0x1000 + i as u64;
            }
            c
        };
        for (vector, esr, regs) in fast {
            let mut by_fast = start();
            by_fast.set_results(&regs);
            let mut by_slow = by_fast.clone();
            let raw = RawExit {
                vector,
                esr,
                ..RawExit::default()
            };
            let exit = decode_exit(&raw, &by_slow.args(), in_ram);
            assert_eq!(
                exit.complete(&mut by_slow, psci::GUEST_VERSION),
                Resume::Guest,
                "{esr:#x} {regs:x?}"
            );
            assert!(fast_answer(vector, esr, &mut by_fast), "{esr:#x} {regs:x?}");
            assert_eq!(by_fast, by_slow, "{esr:#x} {regs:x?}");
        }
        for (vector, esr, regs) in slow {
            let mut c = start();
            c.set_results(&regs);
            let before = c.clone();
            assert!(
                !fast_answer(vector, esr, &mut c),
                "{vector} {esr:#x} {regs:x?}"
            );
            assert_eq!(c, before, "untouched: {vector} {esr:#x}");
        }
    }
}
