//! `HYP_VCPU_RUN` (ABI §3.7): load a vCPU on the calling CPU, enter the
//! guest until an exit the host must see, put the vCPU back.
//!
//! The VM's slot lock is taken to load and to put the vCPU, and briefly for
//! the guest's PSCI calls that touch other vCPUs (`CPU_ON`,
//! `AFFINITY_INFO`, `CPU_OFF`), never while the guest runs. The loaded bit
//! ([`Vm::running`](super::vm::Vm)) keeps a second run of the vCPU and
//! the VM's teardown out meanwhile, so the state page and the stage-2 stay
//! valid without the lock.

use hypercalls::{GuestMemory, HypError, Reply, VcpuExit, VcpuIndex, VmHandle};
use stage2::mm::TableMemory;
use stage2::tlb::TlbMaintenance;

use super::calls::{load, LoadedVcpu};
use super::platform::{GuestEntry, Platform};
use super::vm::{Power, Vm};
use super::{vm_of, Hyp};
use crate::psci::{
    self, GuestPsci, AFFINITY_OFF, AFFINITY_ON, AFFINITY_ON_PENDING, ALREADY_ON,
    INVALID_PARAMETERS, ON_PENDING,
};
use crate::vcpu::{decode_exit, vcpu_index, GuestExit, MmioAccess, Resume, VcpuContext};

/// Most guest entries per `HYP_VCPU_RUN`: exits the hypervisor answers
/// itself resume the guest at most this often before the call returns
/// `HYP_EXIT_INTERRUPTED` (a guest looping on `HYP_GUEST_VERSION` cannot
/// keep the host's CPU).
pub const MAX_GUEST_ENTRIES: u32 = 64;

/// What one run did, applied to the VM at put.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Outcome {
    /// Stage-2 faults taken.
    faults: u64,
    /// Exits answered without the host.
    hyp_exits: u64,
    /// The run ended by a physical interrupt.
    irq: bool,
    /// An MMIO read for the host to answer.
    mmio: Option<MmioAccess>,
    /// SYSTEM_OFF/RESET: repeat this exit from now on.
    stopped: Option<VcpuExit>,
}

fn in_memory(memory: Option<GuestMemory>, ipa: u64) -> bool {
    memory.is_none_or(|m| m.contains(ipa >> 12))
}

/// The created vCPU of `vm` a PSCI call names, or `INVALID_PARAMETERS`.
fn target<P: Platform>(vm: &Vm<P>, mpidr: u64) -> Result<usize, u64> {
    let invalid = psci::ret(INVALID_PARAMETERS);
    match vcpu_index(mpidr) {
        Some(i) if vm.vcpus.get(i).copied().flatten().is_some() => Ok(i),
        _ => Err(invalid),
    }
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// §3.7 `HYP_VCPU_RUN`.
    pub(super) fn vcpu_run(
        &self,
        h: VmHandle,
        vcpu: VcpuIndex,
        mmio_data: u64,
    ) -> Result<Reply, HypError> {
        let cpu = self.platform.cpu_index();
        let i = usize::from(vcpu.get());
        let (loaded, start, pending, memory, cntvoff, flush) = {
            let mut slot = self.lock_vm(h)?;
            let v = vm_of(&mut slot)?;
            if v.runs.get(i).is_none() {
                return Err(HypError::NoEntry);
            }
            let loaded = load(v, h, vcpu)?;
            let Some(run) = v.runs.get_mut(i) else {
                // Checked above; never leave the vCPU loaded.
                v.running &= !(1u64 << i);
                return Err(HypError::NoEntry);
            };
            let early = match (run.stopped, run.power) {
                (Some(e), _) => Some(e),
                (None, Power::Off) => Some(VcpuExit::PoweredOff),
                _ => None,
            };
            if let Some(e) = early {
                v.running &= !(1u64 << i);
                v.counts.host_exits = v.counts.host_exits.wrapping_add(1);
                return Ok(Reply::Exit(e));
            }
            let start = match run.power {
                Power::Start { entry, arg } => Some((entry, arg)),
                _ => None,
            };
            run.power = Power::On;
            let pending = run.mmio.take();
            let flush = v.last_ran.load(cpu, vcpu.get());
            (loaded, start, pending, v.memory, v.cntvoff, flush)
        };
        let entry = GuestEntry {
            vttbr: loaded.vttbr,
            ipa: loaded.ipa,
            flush_local_tlb: flush,
            fast_budget: 0,
        };
        let mut out = Outcome::default();
        let exit = self.platform.with_vcpu(loaded.state, |ctx| {
            if let Some((pc, arg)) = start {
                *ctx = VcpuContext::new(pc, arg, vcpu.get(), cntvoff);
            } else if let Some(m) = pending {
                m.complete_read(ctx, mmio_data);
            }
            self.run_loop(&loaded, memory, entry, ctx, &mut out)
        });
        self.put(&loaded, &out);
        Ok(Reply::Exit(exit))
    }

    /// Enters the guest until an exit for the host, at most
    /// [`MAX_GUEST_ENTRIES`] times.
    fn run_loop(
        &self,
        loaded: &LoadedVcpu,
        memory: Option<GuestMemory>,
        mut entry: GuestEntry,
        ctx: &mut VcpuContext,
        out: &mut Outcome,
    ) -> VcpuExit {
        let mut entries = 0u32;
        while entries < MAX_GUEST_ENTRIES {
            entry.fast_budget = MAX_GUEST_ENTRIES - entries - 1;
            let raw = self.platform.enter_guest(ctx, &entry);
            let fast = raw.fast_exits.min(entry.fast_budget);
            entries += 1 + fast;
            out.hyp_exits = out.hyp_exits.wrapping_add(u64::from(fast));
            entry.flush_local_tlb = false;
            let exit = decode_exit(&raw, &ctx.args(), |ipa| in_memory(memory, ipa));
            if let GuestExit::Psci { call, smc } = exit {
                if let Some(answer) = self.psci_local(loaded, call) {
                    if smc {
                        ctx.skip_instruction();
                    }
                    match answer {
                        Ok(x0) => {
                            ctx.x[0] = x0;
                            out.hyp_exits = out.hyp_exits.wrapping_add(1);
                            continue;
                        }
                        Err(()) => return VcpuExit::PoweredOff,
                    }
                }
            }
            match exit {
                GuestExit::MemFault { .. } => out.faults = out.faults.wrapping_add(1),
                GuestExit::Mmio(m) if !m.write => out.mmio = Some(m),
                GuestExit::Interrupted => out.irq = true,
                _ => {}
            }
            match exit.complete(ctx, psci::GUEST_VERSION) {
                Resume::Guest => out.hyp_exits = out.hyp_exits.wrapping_add(1),
                Resume::Host(e) => {
                    if matches!(e, VcpuExit::SystemOff { .. }) {
                        out.stopped = Some(e);
                    }
                    return e;
                }
            }
        }
        VcpuExit::Interrupted
    }

    /// The PSCI calls that need the VM's vCPU bookkeeping: `Some(Ok(x0))`
    /// to resume the guest with, `Some(Err(()))` for `CPU_OFF` (the vCPU
    /// is now off), `None` for calls [`GuestExit::complete`] answers.
    /// Takes the slot lock briefly (the guest is not running).
    fn psci_local(&self, loaded: &LoadedVcpu, call: GuestPsci) -> Option<Result<u64, ()>> {
        if !matches!(
            call,
            GuestPsci::CpuOn { .. } | GuestPsci::CpuOff | GuestPsci::AffinityInfo(_)
        ) {
            return None;
        }
        let invalid = psci::ret(INVALID_PARAMETERS);
        let Ok(mut slot) = self.lock_vm(loaded.vm) else {
            return Some(Ok(invalid));
        };
        let Ok(v) = vm_of(&mut slot) else {
            return Some(Ok(invalid));
        };
        Some(match call {
            GuestPsci::CpuOn {
                target: t,
                entry,
                context,
            } => Ok(match target(v, t) {
                Err(e) => e,
                Ok(i) => match v.runs.get_mut(i) {
                    Some(run) => match run.power {
                        Power::Off => {
                            run.power = Power::Start {
                                entry,
                                arg: context,
                            };
                            run.mmio = None;
                            0
                        }
                        Power::Start { .. } => psci::ret(ON_PENDING),
                        Power::On => psci::ret(ALREADY_ON),
                    },
                    None => invalid,
                },
            }),
            GuestPsci::AffinityInfo(t) => Ok(match target(v, t) {
                Err(e) => e,
                Ok(i) => match v.runs.get(i).map(|r| r.power) {
                    Some(Power::On) => AFFINITY_ON,
                    Some(Power::Start { .. }) => AFFINITY_ON_PENDING,
                    Some(Power::Off) | None => AFFINITY_OFF,
                },
            }),
            _ => {
                if let Some(run) = v.runs.get_mut(usize::from(loaded.vcpu)) {
                    run.power = Power::Off;
                    run.mmio = None;
                }
                Err(())
            }
        })
    }

    /// Puts the vCPU back after a run and records what it did.
    fn put(&self, loaded: &LoadedVcpu, out: &Outcome) {
        let Ok(mut slot) = self.lock_vm(loaded.vm) else {
            return;
        };
        let Ok(v) = vm_of(&mut slot) else {
            return;
        };
        let i = usize::from(loaded.vcpu);
        v.running &= !(1u64 << i);
        let c = &mut v.counts;
        c.faults = c.faults.wrapping_add(out.faults);
        c.hyp_exits = c.hyp_exits.wrapping_add(out.hyp_exits);
        c.host_exits = c.host_exits.wrapping_add(1);
        c.irq_exits = c.irq_exits.wrapping_add(u64::from(out.irq));
        if let Some(run) = v.runs.get_mut(i) {
            if run.power == Power::On {
                run.mmio = out.mmio;
            }
            if out.stopped.is_some() {
                run.stopped = out.stopped;
            }
        }
    }
}
