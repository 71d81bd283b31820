//! Whole-state checks for tests and the fuzzer (`cfg(test)` or feature
//! `fake`): the invariants of docs/DESIGN.md §4 and a snapshot to check
//! that a failed call changed nothing.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hypercalls::VmHandle;
use stage2::mm::TableMemory;
use stage2::owner::{Owner, PageTracker};
use stage2::pgtable::{Leaf, MemType, PageState, Stage2};
use stage2::tlb::TlbMaintenance;
use stage2::{Ipa, Pfn, PAGE_SHIFT, PAGE_SIZE};

/// Size of a guest block.
const BLOCK_2M: u64 = 512 * PAGE_SIZE;

use super::platform::Platform;
use super::vm::{Counts, Life, Power, VcpuRun};
use super::Hyp;

/// Everything a call may change, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    tracker: PageTracker,
    host_leaves: Vec<Leaf>,
    host_tables_available: usize,
    slots: Vec<(u16, Option<VmSnapshot>)>,
}

/// One VM's part of a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshot {
    handle: VmHandle,
    life: Life,
    vcpus: Vec<Option<Pfn>>,
    runs: Vec<VcpuRun>,
    running: u64,
    leaves: Vec<Leaf>,
    free: Vec<Pfn>,
    table_pages: usize,
    counts: Counts,
    tlbi: u64,
}

fn leaves<M: TableMemory, T: TlbMaintenance>(s2: &Stage2<M, T>) -> Vec<Leaf> {
    let mut out = Vec::new();
    // The whole IPA space is a valid range: cannot fail.
    let _ = s2.walk(Ipa(0), s2.config().ipa_size(), |l| out.push(*l));
    out
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// A snapshot of the whole state (takes every lock in order, one slot
    /// at a time).
    pub fn snapshot(&self) -> Snapshot {
        let host = self.host.lock();
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let slot = s.lock();
                let vm = slot.vm.as_ref().map(|vm| VmSnapshot {
                    handle: vm.handle,
                    life: vm.life,
                    vcpus: vm.vcpus.clone(),
                    runs: vm.runs.clone(),
                    running: vm.running,
                    leaves: leaves(&vm.s2),
                    free: vm.memcache().free_list().to_vec(),
                    table_pages: vm.memcache().table_pages(),
                    counts: vm.counts,
                    tlbi: vm.s2.tlb().invalidations,
                });
                (slot.generation, vm)
            })
            .collect();
        Snapshot {
            tracker: host.tracker.clone(),
            host_leaves: leaves(&host.s2),
            host_tables_available: host.s2.mm().available(),
            slots,
        }
    }

    /// Checks the invariants of docs/DESIGN.md §4 over the whole state:
    ///
    /// 1. every guest leaf is a 4 KiB page or a 2 MiB block of RAM; each
    ///    page of an OWNED leaf is a page the tracker gives to that VM
    ///    (count 0), each page of a SHARED_BORROWED leaf a host page; no
    ///    leaf says SHARED_OWNED;
    /// 2. every share count equals the number of borrow leaves of the page;
    /// 3. pages not owned by the host have count 0 and are not mapped in
    ///    the host stage-2; host pages mapped there are identity-mapped
    ///    Normal memory;
    /// 4. the hypervisor's range and the holes between RAM regions are
    ///    Hyp-owned; every other Hyp-owned page is exactly one VM's free
    ///    memcache page, vCPU page, root page or table in use;
    /// 5. a VM's pages are exactly its OWNED leaves;
    /// 6. no internal inconsistency was ever reported ([`Hyp::bugs`]).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.bugs() != 0 {
            return Err(format!("{} internal inconsistencies", self.bugs()));
        }
        let host = self.host.lock();
        let tracker = &host.tracker;
        let mut borrows: BTreeMap<Pfn, u32> = BTreeMap::new();
        let mut owned: BTreeMap<u16, u64> = BTreeMap::new();
        let mut hyp_pages: BTreeSet<Pfn> = BTreeSet::new();
        let mut tables: u64 = 0;
        for (i, s) in self.slots.iter().enumerate() {
            let slot = s.lock();
            let Some(vm) = slot.vm.as_ref() else {
                continue;
            };
            if usize::from(vm.handle.index()) != i
                || usize::from(vm.id.0) != i
                || vm.handle.generation() != slot.generation
            {
                return Err(format!("slot {i}: handle {:?} id {:?}", vm.handle, vm.id));
            }
            let n = usize::from(vm.nr_vcpus);
            if vm.vcpus.len() != n || vm.runs.len() != n || vm.running >> n.min(63) > 1 {
                return Err(format!("vm {i}: vCPU tables for {n} vCPUs"));
            }
            for (k, (page, run)) in vm.vcpus.iter().zip(&vm.runs).enumerate() {
                let idle = VcpuRun::IDLE;
                let loaded = vm.running & (1u64 << k) != 0;
                if page.is_none() && (loaded || *run != idle) {
                    return Err(format!("vm {i}: vCPU {k} not created but {run:?}"));
                }
                if run.mmio.is_some() && run.power != Power::On {
                    return Err(format!("vm {i}: vCPU {k}: MMIO read pending while {run:?}"));
                }
            }
            for leaf in leaves(&vm.s2) {
                let first = Pfn(leaf.hpa.raw() >> PAGE_SHIFT);
                let nr = leaf.size >> PAGE_SHIFT;
                if !(leaf.size == PAGE_SIZE || (leaf.size == BLOCK_2M && leaf.level == 2))
                    || !self.is_ram(first, nr)
                    || leaf.attrs.mem != MemType::Normal
                {
                    return Err(format!("vm {i}: leaf {leaf:?}"));
                }
                for k in 0..nr {
                    let pfn = Pfn(first.0 + k);
                    let info = tracker.page(pfn).map_err(|e| format!("{e}"))?;
                    match leaf.attrs.state {
                        PageState::Owned if info.owner == Owner::Vm(vm.id) && info.shares == 0 => {
                            *owned.entry(vm.id.0).or_default() += 1;
                        }
                        PageState::SharedBorrowed if info.owner == Owner::Host => {
                            *borrows.entry(pfn).or_default() += 1;
                        }
                        _ => return Err(format!("vm {i}: leaf {leaf:?} but page {info:?}")),
                    }
                }
            }
            let mc = vm.memcache();
            let (root, root_pages) = mc.root();
            let roots = (0..root_pages as u64).map(|k| Pfn(root.0 + k));
            for pfn in mc
                .free_list()
                .iter()
                .copied()
                .chain(vm.vcpus.iter().flatten().copied())
                .chain(roots)
            {
                if !hyp_pages.insert(pfn) {
                    return Err(format!("vm {i}: page {pfn:?} counted twice"));
                }
            }
            tables += (mc.table_pages() - root_pages) as u64;
        }
        let mut hyp_used: u64 = 0;
        let mut tracked_owned: BTreeMap<u16, u64> = BTreeMap::new();
        for (pfn, info) in tracker.iter() {
            let expected = borrows.get(&pfn).copied().unwrap_or(0);
            if info.shares != expected {
                return Err(format!("{pfn:?}: {info:?}, {expected} borrow leaves"));
            }
            let reserved = !self.is_ram(pfn, 1) || (self.hyp.0 <= pfn && pfn < self.hyp.1);
            if reserved && info.owner != Owner::Hyp {
                return Err(format!("{pfn:?}: reserved but {info:?}"));
            }
            if !self.is_ram(pfn, 1) {
                // A hole between RAM regions: the host may map MMIO there.
                continue;
            }
            let mapped = host.s2.query(Ipa(pfn.0 << PAGE_SHIFT));
            match info.owner {
                Owner::Host => {
                    if let Some(l) = mapped {
                        let pa = l.hpa.raw() + (pfn.0 << PAGE_SHIFT) - l.ipa.raw();
                        if pa != pfn.0 << PAGE_SHIFT || l.attrs.mem != MemType::Normal {
                            return Err(format!("{pfn:?}: host maps {l:?}"));
                        }
                    }
                }
                other => {
                    if info.shares != 0 || mapped.is_some() {
                        return Err(format!("{pfn:?}: {other} page shared or host-mapped"));
                    }
                    match other {
                        Owner::Vm(id) => *tracked_owned.entry(id.0).or_default() += 1,
                        _ if reserved => {}
                        _ => hyp_used += 1,
                    }
                }
            }
        }
        for pfn in &hyp_pages {
            if tracker.owner(*pfn) != Ok(Owner::Hyp) {
                return Err(format!("{pfn:?}: a VM's hypervisor page is not Hyp-owned"));
            }
        }
        if hyp_used != hyp_pages.len() as u64 + tables {
            return Err(format!(
                "{hyp_used} Hyp-owned pages, but VMs account for {} + {tables} tables",
                hyp_pages.len()
            ));
        }
        if owned != tracked_owned {
            return Err(format!(
                "owned leaves {owned:?} != tracker's VM pages {tracked_owned:?}"
            ));
        }
        Ok(())
    }

    /// Checks the state after every VM was torn down: no VM, every RAM page
    /// outside the hypervisor's range host-owned, unshared and mapped.
    pub fn check_all_returned(&self) -> Result<(), String> {
        for (i, s) in self.slots.iter().enumerate() {
            if s.lock().vm.is_some() {
                return Err(format!("slot {i} still holds a VM"));
            }
        }
        let host = self.host.lock();
        for (pfn, info) in host.tracker.iter() {
            let reserved = !self.is_ram(pfn, 1) || (self.hyp.0 <= pfn && pfn < self.hyp.1);
            if reserved {
                continue;
            }
            if info.owner != Owner::Host || info.shares != 0 {
                return Err(format!("{pfn:?}: {info:?}"));
            }
            if host.s2.query(Ipa(pfn.0 << PAGE_SHIFT)).is_none() {
                return Err(format!("{pfn:?}: host page not mapped"));
            }
        }
        Ok(())
    }

    /// Whether any slot holds a VM whose life is [`Life::Live`].
    pub fn live_vms(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.lock().vm.as_ref().map(|v| v.life), Some(Life::Live)))
            .count()
    }
}
