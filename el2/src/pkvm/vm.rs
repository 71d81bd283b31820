//! One guest: its stage-2, memcache, vCPUs, lifecycle and counters.

use alloc::vec::Vec;

use hypercalls::{GuestMemory, RuntimeCounters, Stage2Counters, VcpuExit, VmHandle};
use stage2::owner::VmId;
use stage2::pgtable::Stage2;
use stage2::tlb::TlbMaintenance;
use stage2::transition::Teardown;
use stage2::{Ipa, Pfn, Vmid};

use super::memcache::Memcache;
use super::platform::Platform;
use crate::vcpu::{LastRan, MmioAccess};

/// Counts the invalidations issued for a VM (`HYP_VM_COUNTERS` x3) and
/// passes every operation on.
#[derive(Debug)]
pub struct InvalidationCounter<T> {
    inner: T,
    /// Invalidations by IPA plus whole-VMID invalidations.
    pub invalidations: u64,
}

impl<T> InvalidationCounter<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            invalidations: 0,
        }
    }

    /// The wrapped object.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: TlbMaintenance> TlbMaintenance for InvalidationCounter<T> {
    fn sync_writes(&mut self) {
        self.inner.sync_writes();
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, level: u8) {
        self.invalidations = self.invalidations.wrapping_add(1);
        self.inner.invalidate_ipa(vmid, ipa, level);
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        self.invalidations = self.invalidations.wrapping_add(1);
        self.inner.invalidate_vmid(vmid);
    }
}

/// A guest's stage-2 as the dispatcher builds it.
pub type GuestStage2<P> =
    Stage2<Memcache<<P as Platform>::Pages>, InvalidationCounter<<P as Platform>::GuestTlb>>;

/// Where a VM is in its lifecycle (ABI §2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// Every call allowed.
    Live,
    /// `HYP_TEARDOWN_START` was called; the teardown cursor.
    Dying(Teardown),
}

/// Per-VM counters except the TLB count, which lives in the TLB wrapper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pages mapped in the stage-2.
    pub maps: u64,
    /// Pages unmapped.
    pub unmaps: u64,
    /// Pages shared.
    pub shares: u64,
    /// Pages unshared.
    pub unshares: u64,
    /// Pages donated.
    pub donations: u64,
    /// Pages reclaimed.
    pub reclaims: u64,
    /// Stage-2 faults taken from the VM.
    pub faults: u64,
    /// Successful `HYP_VCPU_RUN` calls.
    pub vcpu_runs: u64,
    /// Exits returned to the host.
    pub host_exits: u64,
    /// Guest exits the hypervisor answered itself.
    pub hyp_exits: u64,
    /// Runs ended by a physical interrupt.
    pub irq_exits: u64,
}

fn add(c: &mut u64, n: u64) {
    *c = c.wrapping_add(n);
}

impl Counts {
    /// `n` pages shared.
    pub fn shared(&mut self, n: u64) {
        add(&mut self.maps, n);
        add(&mut self.shares, n);
    }
    /// `n` pages unshared.
    pub fn unshared(&mut self, n: u64) {
        add(&mut self.unmaps, n);
        add(&mut self.unshares, n);
    }
    /// `n` pages donated.
    pub fn donated(&mut self, n: u64) {
        add(&mut self.maps, n);
        add(&mut self.donations, n);
    }
    /// `n` pages reclaimed.
    pub fn reclaimed(&mut self, n: u64) {
        add(&mut self.unmaps, n);
        add(&mut self.reclaims, n);
    }
}

/// Whether a vCPU runs (PSCI power state, ABI §3.6, §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// Off: `HYP_VCPU_RUN` returns `HYP_EXIT_POWERED_OFF`.
    Off,
    /// Started (created on, or by a guest `CPU_ON`): its next run resets
    /// the context to enter at `entry` with x0 = `arg`.
    Start {
        /// Entry IPA.
        entry: u64,
        /// x0 at entry.
        arg: u64,
    },
    /// Running its context.
    On,
}

/// The run state of one created vCPU, beside its context page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuRun {
    /// Power state.
    pub power: Power,
    /// An MMIO read the host has still to answer (x3 of the next run).
    pub mmio: Option<MmioAccess>,
    /// The vCPU called PSCI `SYSTEM_OFF`/`SYSTEM_RESET`: every run repeats
    /// this exit.
    pub stopped: Option<VcpuExit>,
}

impl VcpuRun {
    /// A vCPU that is not created (or whose state page went back to the host).
    pub const IDLE: Self = Self {
        power: Power::Off,
        mmio: None,
        stopped: None,
    };
}

/// A VM.
#[derive(Debug)]
pub struct Vm<P: Platform> {
    /// Its handle (slot index and generation).
    pub handle: VmHandle,
    /// Its identity in the ownership tracker.
    pub id: VmId,
    /// LIVE or DYING.
    pub life: Life,
    /// Number of vCPUs it was created with.
    pub nr_vcpus: u16,
    /// The state page of each created vCPU (index < `nr_vcpus`).
    pub vcpus: Vec<Option<Pfn>>,
    /// The run state of each vCPU (index < `nr_vcpus`; meaningful once created).
    pub runs: Vec<VcpuRun>,
    /// The guest's memory range (`HYP_VM_CREATE` x4, x5); `None`: all of the IPA space.
    pub memory: Option<GuestMemory>,
    /// The virtual counter offset of its vCPUs.
    pub cntvoff: u64,
    /// Which vCPU ran last on each physical CPU.
    pub last_ran: LastRan,
    /// Bit `i` set while vCPU `i` is loaded on a CPU ([`super::Hyp::vcpu_load`]).
    pub running: u64,
    /// Its stage-2; table memory is its memcache.
    pub s2: GuestStage2<P>,
    /// Counters.
    pub counts: Counts,
}

impl<P: Platform> Vm<P> {
    /// Whether the VM is dying.
    pub fn is_dying(&self) -> bool {
        matches!(self.life, Life::Dying(_))
    }

    /// The memcache.
    pub fn memcache(&self) -> &Memcache<P::Pages> {
        self.s2.mm()
    }

    /// Number of vCPU state pages.
    pub fn vcpu_pages(&self) -> usize {
        self.vcpus.iter().flatten().count()
    }

    /// Whether teardown has returned everything but the root tables.
    pub fn fully_reclaimed(&self) -> bool {
        match self.life {
            Life::Dying(t) => {
                t.is_done() && self.memcache().free_pages() == 0 && self.vcpu_pages() == 0
            }
            Life::Live => false,
        }
    }

    /// `HYP_VM_COUNTERS` group 0.
    pub fn stage2_counters(&self) -> Stage2Counters {
        Stage2Counters {
            maps: self.counts.maps,
            unmaps: self.counts.unmaps,
            tlbi: self.s2.tlb().invalidations,
            shares: self.counts.shares,
            unshares: self.counts.unshares,
            donations: self.counts.donations,
            reclaims: self.counts.reclaims,
        }
    }

    /// `HYP_VM_COUNTERS` group 1.
    pub fn runtime_counters(&self) -> RuntimeCounters {
        RuntimeCounters {
            faults: self.counts.faults,
            vcpu_runs: self.counts.vcpu_runs,
            memcache_pages: self.memcache().free_pages() as u64,
            table_pages: self.memcache().table_pages() as u64,
            host_exits: self.counts.host_exits,
            hyp_exits: self.counts.hyp_exits,
            irq_exits: self.counts.irq_exits,
        }
    }
}

impl<P: Platform> Default for Slot<P> {
    fn default() -> Self {
        Self::new()
    }
}

/// A VM slot: the generation of its next (or current) handle and the VM.
#[derive(Debug)]
pub struct Slot<P: Platform> {
    /// Generation of the current VM's handle, or of the next one if free.
    pub generation: u16,
    /// The VM, if the slot is in use.
    pub vm: Option<Vm<P>>,
}

impl<P: Platform> Slot<P> {
    /// A free slot whose first handle has generation 1.
    pub const fn new() -> Self {
        Self {
            generation: 1,
            vm: None,
        }
    }

    /// The VM `handle` names, if it is this slot's current one.
    pub fn get(&mut self, handle: VmHandle) -> Option<&mut Vm<P>> {
        self.vm.as_mut().filter(|vm| vm.handle == handle)
    }

    /// Frees the slot and moves to the next generation (skipping 0).
    pub fn free(&mut self) {
        self.vm = None;
        self.generation = match self.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
    }
}
