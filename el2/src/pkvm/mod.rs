//! The EL2 dispatcher for the memory and VM-lifecycle hypercalls
//! (`docs/ABI.md` §3) and the host stage-2 abort policy, as host-testable
//! logic on top of the `stage2` crate.
//!
//! [`Hyp`] owns the ownership tracker over all RAM, the host stage-2 and a
//! fixed array of [`MAX_VMS`] VM slots. The binary builds one at boot and
//! calls [`Hyp::host_call`] for every host `HVC #0` and
//! [`Hyp::host_abort`] for every host stage-2 abort. Hardware is reached
//! through [`platform::Platform`] (table pages of VMs, guest TLB
//! maintenance, page zeroing), the host stage-2's `TableMemory` and
//! `TlbMaintenance` type parameters; `fake` (tests and the `fake` feature) has host implementations.
//!
//! # Locks and their order
//!
//! 1. `host`: the ownership tracker and the host stage-2 (they always
//!    change together).
//! 2. `slots[n]`: one VM slot: the VM's stage-2, memcache, vCPUs,
//!    lifecycle and counters.
//!
//! A call takes `host` before any slot, and never holds two slot locks at
//! once: `HYP_VM_CREATE` holds `host` and looks at the slots one at a
//! time, `HYP_HOST_PAGE_STATE` holds `host` and then the owner's slot.
//! Calls that touch no page ownership (vCPU create, write-protect,
//! relax, test-and-clear-young, teardown start, counters) take only their
//! slot. Freeing a slot (finalize) and taking one (create) both happen
//! under `host`, so a frame's owner VM (tracker) and its slot agree
//! whenever `host` is held. Both locks are `spin::Mutex`; nothing here
//! blocks or allocates unboundedly with a lock held.
//!
//! # Hostile input
//!
//! Registers go through [`hypercalls::Hypercall::decode`] first; every
//! value after that is checked before use (handle, vCPU index, RAM range,
//! IPA range, page states), so no register value can panic. A failed call
//! changes nothing. Internal inconsistencies (the stage-2 tables disagree
//! with the tracker: a hypervisor bug) are never reported as success; they
//! fail the call with `HYP_EACCES` and are counted in [`Hyp::bugs`].

mod abort;
mod calls;
#[cfg(any(test, feature = "fake"))]
pub mod check;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod memcache;
pub mod platform;
mod run;
pub mod vm;

#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::{encode_result, HostFunction, HypError, Hypercall, Reply, VmHandle};
use spin::{Mutex, MutexGuard};
use stage2::mm::TableMemory;
use stage2::owner::{self, Owner, PageTracker};
use stage2::pgtable::{self, Granule, Stage2};
use stage2::tlb::TlbMaintenance;
use stage2::transition::HOST_RAM_ATTRS;
use stage2::{Hpa, Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};

use crate::dtb::Region;
pub use abort::{AbortAction, AbortKind, AbortOutcome, HostStage2Shape};
pub use calls::LoadedVcpu;
use platform::Platform;
use vm::{Slot, Vm};

/// Number of VM slots (the ABI's). VM slot `i` has hardware VMID `i + 1`
/// (the host is VMID 0) and handles `i | generation << 16`.
pub const MAX_VMS: usize = hypercalls::MAX_VMS;

/// The host calls this build implements; `HYP_FEATURES` answers from this
/// list: every call of ABI §3.
pub const SERVED: &[HostFunction] = &[
    HostFunction::Version,
    HostFunction::Features,
    HostFunction::MemcacheTopup,
    HostFunction::MemcacheReclaim,
    HostFunction::VmCreate,
    HostFunction::VcpuCreate,
    HostFunction::VcpuRun,
    HostFunction::Share,
    HostFunction::Unshare,
    HostFunction::Donate,
    HostFunction::Reclaim,
    HostFunction::UnshareRange,
    HostFunction::WrProtect,
    HostFunction::RelaxPerms,
    HostFunction::TestClearYoung,
    HostFunction::TeardownStart,
    HostFunction::TeardownReclaim,
    HostFunction::TeardownFinalize,
    HostFunction::VmCounters,
    HostFunction::HostPageState,
    HostFunction::GuestPageState,
];

/// Largest physical address (exclusive) a RAM frame may have: frames are
/// passed as 40-bit pfns (ABI §2.2).
const PA_LIMIT: u64 = 1 << (hypercalls::PFN_BITS + PAGE_SHIFT);

/// What the hypervisor is built from at boot.
#[derive(Clone, Copy, Debug)]
pub struct HypConfig<'a> {
    /// Every RAM region of the machine, the hypervisor's own included (in
    /// any order; partial pages at the edges are ignored).
    pub ram: &'a [Region],
    /// The hypervisor's own memory: RAM, owned by the hypervisor for good
    /// and never mapped for the host.
    pub hyp: Region,
    /// IPA size of the host stage-2, 32..=48 bits (at boot: what the
    /// device tree's addresses need, at most the CPU's PA size;
    /// `dtb::Board::host_ipa_bits`).
    pub host_ipa_bits: u8,
    /// Most guest mappings of one host page (`u32::MAX` in production;
    /// tests lower it to reach the share-count overflow).
    pub share_limit: u32,
}

/// Why [`Hyp::new`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// No whole page of RAM, or RAM beyond the 52-bit physical range.
    BadRam,
    /// The hypervisor's range is not page aligned or not inside RAM.
    BadHypRange,
    /// The ownership tracker could not be created (heap too small for
    /// 8 bytes per page of the RAM span).
    Tracker(owner::Error),
    /// The host stage-2 could not be built (IPA size, table memory).
    HostStage2(pgtable::Error),
}

/// The host side: the ownership tracker and the host stage-2. Only
/// reachable through the `host` lock.
#[derive(Debug)]
pub struct Host<HM: TableMemory, HT: TlbMaintenance> {
    /// Owner and share count of every frame of the RAM span.
    pub tracker: PageTracker,
    /// The host's stage-2 (identity map, VMID 0).
    pub s2: Stage2<HM, HT>,
}

/// The hypervisor's state: shared by every CPU.
pub struct Hyp<P: Platform, HM: TableMemory, HT: TlbMaintenance> {
    platform: P,
    /// RAM as sorted, disjoint, non-adjacent `[start, end)` frame ranges.
    ram: Vec<(Pfn, Pfn)>,
    /// The hypervisor's own frames `[start, end)`.
    hyp: (Pfn, Pfn),
    host: Mutex<Host<HM, HT>>,
    slots: [Mutex<Slot<P>>; MAX_VMS],
    bugs: AtomicU64,
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> core::fmt::Debug for Hyp<P, HM, HT> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Hyp")
            .field("ram", &self.ram)
            .field("hyp", &self.hyp)
            .field("bugs", &self.bugs())
            .finish_non_exhaustive()
    }
}

/// Sorted, merged whole-page frame ranges of `regions`.
fn page_ranges(regions: &[Region]) -> Option<Vec<(Pfn, Pfn)>> {
    let mut out: Vec<(Pfn, Pfn)> = Vec::new();
    for r in regions {
        let start = r.base.checked_add(PAGE_SIZE - 1)? >> PAGE_SHIFT;
        let end = r.base.checked_add(r.size)? >> PAGE_SHIFT;
        if r.base.checked_add(r.size)? > PA_LIMIT {
            return None;
        }
        if start < end {
            out.push((Pfn(start), Pfn(end)));
        }
    }
    out.sort();
    let mut merged: Vec<(Pfn, Pfn)> = Vec::new();
    for (s, e) in out {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Some(merged)
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// Builds the hypervisor state at boot: a tracker over the whole RAM
    /// span (8 bytes per 4 KiB page, on the heap) with the hypervisor's
    /// range and the holes between RAM regions owned by the hypervisor, and
    /// the host stage-2 in `host_mem` mapping the host's RAM (RAM minus the
    /// hypervisor's range) RWX with the largest blocks.
    pub fn new(
        platform: P,
        config: &HypConfig<'_>,
        host_mem: HM,
        host_tlb: HT,
    ) -> Result<Self, InitError> {
        let ram = page_ranges(config.ram).ok_or(InitError::BadRam)?;
        let (Some(first), Some(last)) = (ram.first(), ram.last()) else {
            return Err(InitError::BadRam);
        };
        let (span_start, span_end) = (first.0, last.1);
        let h = config.hyp;
        if !h.base.is_multiple_of(PAGE_SIZE) || !h.size.is_multiple_of(PAGE_SIZE) || h.size == 0 {
            return Err(InitError::BadHypRange);
        }
        let hyp = (Pfn(h.base >> PAGE_SHIFT), Pfn(h.end() >> PAGE_SHIFT));
        if !ram.iter().any(|&(s, e)| s <= hyp.0 && hyp.1 <= e) {
            return Err(InitError::BadHypRange);
        }
        let mut tracker = PageTracker::with_share_limit(
            span_start,
            span_end.0 - span_start.0,
            config.share_limit,
        )
        .map_err(InitError::Tracker)?;
        let mut reserve = |s: Pfn, e: Pfn| {
            if s < e {
                tracker
                    .transfer(s, e.0 - s.0, Owner::Host, Owner::Hyp)
                    .map_err(InitError::Tracker)
            } else {
                Ok(())
            }
        };
        for pair in ram.windows(2) {
            reserve(pair[0].1, pair[1].0)?;
        }
        reserve(hyp.0, hyp.1)?;

        let mut s2 = Stage2::new(config.host_ipa_bits, Vmid(0), host_mem, host_tlb)
            .map_err(InitError::HostStage2)?;
        let host_ram = crate::dtb::subtract(
            &ram.iter()
                .map(|&(s, e)| Region {
                    base: s.0 << PAGE_SHIFT,
                    size: (e.0 - s.0) << PAGE_SHIFT,
                })
                .collect::<Vec<_>>(),
            h,
        );
        for r in host_ram {
            s2.map(
                Ipa(r.base),
                Hpa(r.base),
                r.size,
                HOST_RAM_ATTRS,
                Granule::Largest,
            )
            .map_err(InitError::HostStage2)?;
        }
        Ok(Self {
            platform,
            ram,
            hyp,
            host: Mutex::new(Host { tracker, s2 }),
            slots: core::array::from_fn(|_| Mutex::new(Slot::new())),
            bugs: AtomicU64::new(0),
        })
    }

    /// Handles one host `HVC #0`: x0..x7 in, x0..x7 out (ABI §2.1). Never
    /// panics, whatever the registers.
    #[must_use]
    pub fn host_call(&self, regs: &[u64; 8]) -> [u64; 8] {
        encode_result(&self.dispatch(regs))
    }

    /// The decoded call's result.
    pub fn dispatch(&self, regs: &[u64; 8]) -> Result<Reply, HypError> {
        let call = Hypercall::decode(regs)?;
        self.call(&call)
    }

    /// Runs one decoded host call.
    pub fn call(&self, call: &Hypercall) -> Result<Reply, HypError> {
        match *call {
            Hypercall::Version => Ok(Reply::Version(hypercalls::AbiVersion::CURRENT)),
            Hypercall::Features { func } => Ok(Reply::Features {
                supported: HostFunction::from_id(func).is_some_and(|f| SERVED.contains(&f)),
            }),
            Hypercall::MemcacheTopup { vm, pfn, nr } => self.memcache_topup(vm, pfn, nr),
            Hypercall::MemcacheReclaim { vm } => self.memcache_reclaim(vm),
            Hypercall::VmCreate {
                ipa_bits,
                nr_vcpus,
                root,
                memory,
            } => self.vm_create(ipa_bits, nr_vcpus, root, memory),
            Hypercall::VcpuCreate { vm, vcpu, start } => self.vcpu_create(vm, vcpu, start),
            Hypercall::VcpuRun {
                vm,
                vcpu,
                mmio_data,
            } => self.vcpu_run(vm, vcpu, mmio_data),
            Hypercall::Share {
                vm,
                pfn,
                gfn,
                nr,
                prot,
            } => self.share(vm, pfn, gfn, nr, prot),
            Hypercall::Unshare { vm, pfn, gfn, nr } => self.unshare(vm, pfn, gfn, nr),
            Hypercall::Donate {
                vm,
                pfn,
                gfn,
                nr,
                prot,
            } => self.donate(vm, pfn, gfn, nr, prot),
            Hypercall::Reclaim { vm, pfn, gfn, nr } => self.reclaim(vm, pfn, gfn, nr),
            Hypercall::UnshareRange { vm, gfn, nr } => self.unshare_range(vm, gfn, nr),
            Hypercall::WrProtect { vm, gfn, nr } => self.wrprotect(vm, gfn, nr),
            Hypercall::RelaxPerms { vm, gfn, prot } => self.relax_perms(vm, gfn, prot),
            Hypercall::TestClearYoung { vm, gfn, nr } => self.test_clear_young(vm, gfn, nr),
            Hypercall::TeardownStart { vm } => self.teardown_start(vm),
            Hypercall::TeardownReclaim { vm } => self.teardown_reclaim(vm),
            Hypercall::TeardownFinalize { vm } => self.teardown_finalize(vm),
            Hypercall::VmCounters { vm, group } => self.vm_counters(vm, group),
            Hypercall::HostPageState { pfn } => self.host_page_state(pfn),
            Hypercall::GuestPageState { vm, gfn } => self.guest_page_state(vm, gfn),
        }
    }

    /// Number of internal inconsistencies seen (stage-2 tables disagreeing
    /// with the tracker). Always 0 unless the hypervisor has a bug; the
    /// binary may log it, tests and the fuzzer assert it.
    pub fn bugs(&self) -> u64 {
        self.bugs.load(Ordering::Relaxed)
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// `VTTBR_EL2` of the host stage-2 (fixed after boot).
    pub fn host_vttbr(&self) -> u64 {
        self.host.lock().s2.vttbr()
    }

    /// Geometry of the host stage-2, for `VTCR_EL2`.
    pub fn host_ipa_config(&self) -> pgtable::IpaConfig {
        self.host.lock().s2.config()
    }

    /// Table pages the host stage-2 can still allocate.
    pub fn host_tables_available(&self) -> usize {
        self.host.lock().s2.mm().available()
    }

    /// Whether every frame of `[pfn, pfn + nr)` is RAM.
    fn is_ram(&self, pfn: Pfn, nr: u64) -> bool {
        let Some(end) = pfn.0.checked_add(nr) else {
            return false;
        };
        self.ram.iter().any(|&(s, e)| s.0 <= pfn.0 && end <= e.0)
    }

    /// The frame range `[pfn, pfn + nr)` if it is RAM, else `HYP_ERANGE`.
    fn ram_range(&self, pfn: hypercalls::Pfn, nr: u64) -> Result<Pfn, HypError> {
        let pfn = Pfn::from(pfn);
        if self.is_ram(pfn, nr) {
            Ok(pfn)
        } else {
            Err(HypError::OutOfRange)
        }
    }

    /// Maps a stage2-crate error to the ABI's, counting bugs.
    fn err(&self, e: owner::Error) -> HypError {
        match e {
            owner::Error::NotRam | owner::Error::OutOfRange | owner::Error::Overflow => {
                HypError::OutOfRange
            }
            owner::Error::InvalidArgument => HypError::InvalidArgument,
            owner::Error::BadState => HypError::Denied,
            owner::Error::NoMemory => HypError::NoMemory,
            owner::Error::AlreadyMapped => HypError::Exists,
            owner::Error::NotMapped => HypError::NoEntry,
            owner::Error::Inconsistent => self.bug(),
        }
    }

    /// Records an internal inconsistency; the call fails with `HYP_EACCES`.
    fn bug(&self) -> HypError {
        self.bugs.fetch_add(1, Ordering::Relaxed);
        HypError::Denied
    }

    /// Locks the host side.
    fn lock_host(&self) -> MutexGuard<'_, Host<HM, HT>> {
        self.host.lock()
    }

    /// Locks the slot `handle` names, if the handle is current
    /// (`HYP_ENOENT` otherwise). Lock order: after `host`, if taken.
    fn lock_vm(&self, handle: VmHandle) -> Result<MutexGuard<'_, Slot<P>>, HypError> {
        let slot = self
            .slots
            .get(usize::from(handle.index()))
            .ok_or(HypError::NoEntry)?;
        let guard = slot.lock();
        match &guard.vm {
            Some(vm) if vm.handle == handle => Ok(guard),
            _ => Err(HypError::NoEntry),
        }
    }
}

/// The VM in a slot locked by [`Hyp::lock_vm`].
fn vm_of<P: Platform>(slot: &mut Slot<P>) -> Result<&mut Vm<P>, HypError> {
    slot.vm.as_mut().ok_or(HypError::NoEntry)
}
