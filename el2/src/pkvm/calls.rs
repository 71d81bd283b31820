//! One method per host call (ABI §3). Each checks, in the ABI's order
//! (§2.4: VM `ENOENT`, lifecycle `EBUSY`, ranges `ERANGE`, page states,
//! memory `ENOMEM`), before it changes anything.

use alloc::vec::Vec;

use hypercalls::{
    CounterGroup, Counters, GuestMemory, GuestPage, HostPageInfo, HypError, IpaBits, OwnerState,
    PageCount, PageState as AbiPageState, Prot, ReclaimedPages, Reply, TeardownProgress, VcpuCount,
    VcpuIndex, VcpuStart, VmHandle, MEMCACHE_RECLAIM_MAX, TEARDOWN_BATCH,
};
use stage2::mm::TableMemory;
use stage2::owner::{self, Owner, PageView, VmId};
use stage2::pgtable::{Perms, Stage2};
use stage2::tlb::TlbMaintenance;
use stage2::transition::{self, map_tables_bound, PageRange, Teardown};
use stage2::{Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};

use super::memcache::Memcache;
use super::platform::Platform;
use super::vm::{Counts, InvalidationCounter, Life, Power, VcpuRun, Vm};
use super::{vm_of, Host, Hyp, MAX_VMS};
use crate::vcpu::LastRan;

fn perms(prot: Prot) -> Perms {
    Perms {
        read: prot.read(),
        write: prot.write(),
        exec: prot.exec(),
    }
}

fn prot_of(p: Perms) -> Prot {
    let mut bits = 0;
    if p.read {
        bits |= Prot::R.bits();
    }
    if p.write {
        bits |= Prot::W.bits();
    }
    if p.exec {
        bits |= Prot::X.bits();
    }
    Prot::from_bits(bits).unwrap_or(Prot::NONE)
}

fn nr(n: PageCount) -> u64 {
    u64::from(n.get())
}

/// Fails with `HYP_EBUSY` if the VM is dying.
fn live<P: Platform>(vm: &Vm<P>) -> Result<(), HypError> {
    if vm.is_dying() {
        Err(HypError::Busy)
    } else {
        Ok(())
    }
}

/// The guest IPA range `[gfn, gfn + nr)` if inside the VM's IPA space,
/// else `HYP_ERANGE`.
fn guest_range<P: Platform>(
    vm: &Vm<P>,
    gfn: hypercalls::Gfn,
    n: u64,
) -> Result<(Ipa, u64), HypError> {
    let limit = 1u64 << (vm.s2.config().ipa_bits - PAGE_SHIFT as u8);
    match gfn.raw().checked_add(n) {
        Some(end) if end <= limit => Ok((Ipa(gfn.raw() << PAGE_SHIFT), n << PAGE_SHIFT)),
        _ => Err(HypError::OutOfRange),
    }
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    fn zero(&self) -> impl FnMut(Pfn) + '_ {
        |pfn| self.platform.zero_page(pfn)
    }

    /// §3.3 `HYP_MEMCACHE_TOPUP`.
    pub(super) fn memcache_topup(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let n = nr(n);
        let pfn = self.ram_range(pfn, n)?;
        host.tracker
            .check_transfer(pfn, n, Owner::Host)
            .map_err(|e| self.err(e))?;
        // Room on the heap first, so the commit cannot fail half-way.
        let room = usize::try_from(n).map_err(|_| HypError::NoMemory)?;
        vm.s2
            .mm_mut()
            .reserve(room)
            .map_err(|_| HypError::NoMemory)?;
        let host = &mut *host;
        transition::donate_to_hyp(&mut host.tracker, &mut host.s2, pfn, n)
            .map_err(|e| self.err(e))?;
        for i in 0..n {
            vm.s2.mm_mut().add(Pfn(pfn.0 + i));
        }
        Ok(Reply::Done)
    }

    /// §3.4 `HYP_MEMCACHE_RECLAIM`.
    pub(super) fn memcache_reclaim(&self, h: VmHandle) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        let host = &mut *host;
        let mut out = [hypercalls::Pfn::ZERO; MEMCACHE_RECLAIM_MAX];
        let mut count = 0;
        for entry in &mut out {
            let Some(pfn) = vm.memcache().peek() else {
                break;
            };
            let abi_pfn = pfn.to_abi().ok_or_else(|| self.bug())?;
            match transition::return_from_hyp(&mut host.tracker, &mut host.s2, pfn, 1, self.zero())
            {
                Ok(()) => {
                    let mc = vm.s2.mm_mut();
                    mc.take();
                    mc.release(pfn);
                    *entry = abi_pfn;
                    count += 1;
                }
                // Report the pages already returned; the error comes back
                // on the next call.
                Err(_) if count > 0 => break,
                Err(e) => return Err(self.err(e)),
            }
        }
        let pages =
            ReclaimedPages::new(out.get(..count).unwrap_or(&[])).ok_or_else(|| self.bug())?;
        Ok(Reply::MemcacheReclaimed(pages))
    }

    /// §3.5 `HYP_VM_CREATE`.
    pub(super) fn vm_create(
        &self,
        ipa_bits: IpaBits,
        nr_vcpus: VcpuCount,
        root: hypercalls::Pfn,
        memory: Option<GuestMemory>,
    ) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        // A free slot (one slot lock at a time; holding `host` keeps every
        // other create and finalize out).
        let mut found = None;
        for (index, slot) in self.slots.iter().enumerate() {
            let guard = slot.lock();
            if guard.vm.is_none() {
                found = Some((index, guard));
                break;
            }
        }
        let (index, mut slot) = found.ok_or(HypError::NoSpace)?;
        let pages = u64::from(ipa_bits.root_table_pages());
        let root = self.ram_range(root, pages)?;
        host.tracker
            .check_transfer(root, pages, Owner::Host)
            .map_err(|e| self.err(e))?;

        // Everything that allocates on the heap, before any change.
        let index16 = u16::try_from(index).map_err(|_| HypError::NoSpace)?;
        let handle = VmHandle::new(index16, slot.generation).ok_or_else(|| self.bug())?;
        let vmid = Vmid(index16 + 1);
        let mut vcpus = Vec::new();
        vcpus
            .try_reserve_exact(usize::from(nr_vcpus.get()))
            .map_err(|_| HypError::NoMemory)?;
        vcpus.resize(usize::from(nr_vcpus.get()), None);
        let mut runs = Vec::new();
        runs.try_reserve_exact(usize::from(nr_vcpus.get()))
            .map_err(|_| HypError::NoMemory)?;
        runs.resize(usize::from(nr_vcpus.get()), VcpuRun::IDLE);
        let root_pa = root.0 << PAGE_SHIFT;
        let vttbr = root_pa | (u64::from(vmid.0) << 48);
        let tlb = InvalidationCounter::new(self.platform.guest_tlb(vmid, vttbr));
        let root_pages = usize::from(ipa_bits.root_table_pages() as u16);
        let mc = Memcache::new(self.platform.page_access(), root, root_pages);

        let host = &mut *host;
        transition::donate_to_hyp(&mut host.tracker, &mut host.s2, root, pages)
            .map_err(|e| self.err(e))?;
        // Cannot fail: the IPA size was decoded, the root is reserved.
        let s2 = match Stage2::new(ipa_bits.get(), vmid, mc, tlb) {
            Ok(s2) if s2.vttbr() == vttbr => s2,
            _ => {
                let _ = transition::return_from_hyp(
                    &mut host.tracker,
                    &mut host.s2,
                    root,
                    pages,
                    self.zero(),
                );
                return Err(self.bug());
            }
        };
        slot.vm = Some(Vm {
            handle,
            id: VmId(index16),
            life: Life::Live,
            nr_vcpus: nr_vcpus.get(),
            vcpus,
            runs,
            memory,
            cntvoff: self.platform.counter(),
            last_ran: LastRan::new(),
            running: 0,
            s2,
            counts: Counts::default(),
        });
        Ok(Reply::VmCreated { vm: handle })
    }

    /// §3.6 `HYP_VCPU_CREATE`.
    pub(super) fn vcpu_create(
        &self,
        h: VmHandle,
        vcpu: VcpuIndex,
        start: VcpuStart,
    ) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let Some(state) = vm.vcpus.get_mut(usize::from(vcpu.get())) else {
            return Err(HypError::OutOfRange);
        };
        if state.is_some() {
            return Err(HypError::Exists);
        }
        let page = vm.s2.mm_mut().take().ok_or(HypError::NoMemory)?;
        self.platform.zero_page(page);
        *state = Some(page);
        if let Some(run) = vm.runs.get_mut(usize::from(vcpu.get())) {
            *run = VcpuRun {
                power: match start {
                    VcpuStart::On { entry, arg } => Power::Start { entry, arg },
                    VcpuStart::Off => Power::Off,
                },
                mmio: None,
                stopped: None,
            };
        }
        Ok(Reply::Done)
    }

    /// The common part of §3.8–§3.11: with the host and then the VM
    /// locked, checks that the VM is live and the `n` frames from `pfn` are
    /// RAM, applies `change` to the host, the VM and the range, and once it
    /// succeeded `count`s the `n` pages in the VM's counters.
    fn host_vm_pages(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        n: PageCount,
        change: impl FnOnce(&mut Host<HM, HT>, &mut Vm<P>, PageRange) -> Result<(), owner::Error>,
        count: fn(&mut Counts, u64),
    ) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let n = nr(n);
        let pfn = self.ram_range(pfn, n)?;
        let r = PageRange::new(pfn, gfn.into(), n);
        change(&mut host, vm, r).map_err(|e| self.err(e))?;
        count(&mut vm.counts, n);
        Ok(Reply::Done)
    }

    /// §3.8 `HYP_SHARE`.
    pub(super) fn share(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        n: PageCount,
        prot: Prot,
    ) -> Result<Reply, HypError> {
        self.host_vm_pages(
            h,
            pfn,
            gfn,
            n,
            |host, vm, r| transition::share(&mut host.tracker, &mut vm.s2, r, perms(prot)),
            Counts::shared,
        )
    }

    /// §3.9 `HYP_UNSHARE`.
    pub(super) fn unshare(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        self.host_vm_pages(
            h,
            pfn,
            gfn,
            n,
            |host, vm, r| transition::unshare(&mut host.tracker, &mut vm.s2, r),
            Counts::unshared,
        )
    }

    /// §3.10 `HYP_DONATE`.
    pub(super) fn donate(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        n: PageCount,
        prot: Prot,
    ) -> Result<Reply, HypError> {
        self.host_vm_pages(
            h,
            pfn,
            gfn,
            n,
            |host, vm, r| {
                transition::donate(
                    &mut host.tracker,
                    &mut host.s2,
                    vm.id,
                    &mut vm.s2,
                    r,
                    perms(prot),
                )
            },
            Counts::donated,
        )
    }

    /// §3.11 `HYP_RECLAIM`.
    pub(super) fn reclaim(
        &self,
        h: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        self.host_vm_pages(
            h,
            pfn,
            gfn,
            n,
            |host, vm, r| {
                transition::reclaim(
                    &mut host.tracker,
                    &mut host.s2,
                    vm.id,
                    &mut vm.s2,
                    r,
                    self.zero(),
                )
            },
            Counts::reclaimed,
        )
    }

    /// §3.21 `HYP_UNSHARE_RANGE`: every mapped gfn of the range, whatever
    /// frame it maps; the transition checks the whole range before the first
    /// change and chooses the TLB invalidation
    /// (`transition::UNSHARE_RANGE_PER_IPA_MAX`).
    pub(super) fn unshare_range(
        &self,
        h: VmHandle,
        gfn: hypercalls::Gfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        guest_range(vm, gfn, nr(n))?;
        let pages = transition::unshare_range(&mut host.tracker, &mut vm.s2, gfn.into(), nr(n))
            .map_err(|e| self.err(e))?;
        vm.counts.unshared(pages);
        let pages = u32::try_from(pages).map_err(|_| self.bug())?;
        Ok(Reply::Unshared { pages })
    }

    /// §3.12 `HYP_WRPROTECT`.
    pub(super) fn wrprotect(
        &self,
        h: VmHandle,
        gfn: hypercalls::Gfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let (ipa, size) = guest_range(vm, gfn, nr(n))?;
        let end = ipa.0 + size;
        // Runs of writable leaves with equal permissions, clipped to the
        // range: (start, end, perms).
        let mut runs: Vec<(u64, u64, Perms)> = Vec::new();
        runs.try_reserve(n.get() as usize)
            .map_err(|_| HypError::NoMemory)?;
        let mut splits: usize = 0;
        vm.s2
            .walk(ipa, size, |leaf| {
                let p = leaf.attrs.perms;
                if !p.write {
                    return;
                }
                let (a, b) = (leaf.ipa.0.max(ipa.0), (leaf.ipa.0 + leaf.size).min(end));
                if a != leaf.ipa.0 || b != leaf.ipa.0 + leaf.size {
                    splits += if leaf.level == 2 { 1 } else { 3 };
                }
                match runs.last_mut() {
                    Some(last) if last.1 == a && last.2 == p => last.1 = b,
                    // At most `nr` runs: reserved above, no allocation here.
                    _ => runs.push((a, b, p)),
                }
            })
            .map_err(|_| HypError::OutOfRange)?;
        // A writable block the range covers only in part is split: one
        // table page for a 2 MiB block (guests have no larger leaves), three
        // at most for a 1 GiB one. Checked for the whole range before the
        // first change, so a failed call changed nothing.
        if splits > vm.s2.mm().available() {
            return Err(HypError::NoMemory);
        }
        let mut changed: u64 = 0;
        for (a, b, p) in runs {
            let ro = Perms { write: false, ..p };
            match vm.s2.protect(Ipa(a), b - a, ro) {
                Ok(c) => changed += c,
                Err(_) => return Err(self.bug()),
            }
        }
        let pages = u32::try_from(changed).map_err(|_| self.bug())?;
        Ok(Reply::WrProtected { pages })
    }

    /// §3.13 `HYP_RELAX_PERMS`.
    pub(super) fn relax_perms(
        &self,
        h: VmHandle,
        gfn: hypercalls::Gfn,
        prot: Prot,
    ) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let (ipa, _) = guest_range(vm, gfn, 1)?;
        let leaf = vm.s2.query(ipa).ok_or(HypError::NoEntry)?;
        let old = leaf.attrs.perms;
        let add = perms(prot);
        let new = Perms {
            read: old.read | add.read,
            write: old.write | add.write,
            exec: old.exec | add.exec,
        };
        if new != old {
            // Only this page: a block is split first (one table page from
            // the memcache; HYP_ENOMEM with nothing changed if it has none).
            match vm.s2.protect(ipa, PAGE_SIZE, new) {
                Ok(_) => {}
                Err(stage2::pgtable::Error::NoMemory) => return Err(HypError::NoMemory),
                Err(_) => return Err(self.bug()),
            }
        }
        Ok(Reply::Done)
    }

    /// §3.14 `HYP_TEST_CLEAR_YOUNG`.
    pub(super) fn test_clear_young(
        &self,
        h: VmHandle,
        gfn: hypercalls::Gfn,
        n: PageCount,
    ) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        let (ipa, size) = guest_range(vm, gfn, nr(n))?;
        let young = vm
            .s2
            .test_and_clear_young(ipa, size)
            .map_err(|_| HypError::OutOfRange)?;
        Ok(Reply::Young { young })
    }

    /// §3.15 `HYP_TEARDOWN_START`.
    pub(super) fn teardown_start(&self, h: VmHandle) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        live(vm)?;
        if vm.running != 0 {
            return Err(HypError::Busy);
        }
        vm.life = Life::Dying(Teardown::new(vm.id));
        Ok(Reply::Done)
    }

    /// §3.16 `HYP_TEARDOWN_RECLAIM`: at most [`TEARDOWN_BATCH`] page
    /// updates: guest leaves first (a 4 KiB page is one update, a 2 MiB
    /// block 512: a block that does not fit in what is left of the batch
    /// waits for the next call), then vCPU state pages and free memcache
    /// pages (freed tables are in the memcache by then).
    pub(super) fn teardown_reclaim(&self, h: VmHandle) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        let Life::Dying(mut td) = vm.life else {
            return Err(HypError::Busy);
        };
        let host = &mut *host;
        let budget = u64::from(TEARDOWN_BATCH);
        let mut done: u64 = 0;
        let mut error = None;
        // One leaf per step, so the counters know what each leaf was even
        // when a later one fails; a leaf is as many page updates as it
        // covers pages, and only a leaf that fits in the batch is taken.
        // With the batch full the step only looks whether a leaf is left,
        // so that x2 says 0 as soon as nothing is.
        while !td.is_done() {
            let mut zeroed: u64 = 0;
            let zero = |pfn| {
                zeroed += 1;
                self.platform.zero_page(pfn);
            };
            let left = budget - done;
            match td.step_leaf(&mut host.tracker, &mut host.s2, &mut vm.s2, left, zero) {
                Ok(step) if step.leaves == 0 && !td.is_done() => break,
                Ok(step) => {
                    if zeroed > 0 {
                        vm.counts.reclaimed(step.pages);
                    } else {
                        vm.counts.unshared(step.pages);
                    }
                    done += step.pages;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        vm.life = Life::Dying(td);
        if td.is_done() && error.is_none() {
            while done < budget {
                let vcpu = vm.vcpus.iter().position(Option::is_some);
                let pfn = match vcpu.and_then(|i| vm.vcpus.get(i).copied().flatten()) {
                    Some(pfn) => pfn,
                    None => match vm.memcache().peek() {
                        Some(pfn) => pfn,
                        None => break,
                    },
                };
                match transition::return_from_hyp(
                    &mut host.tracker,
                    &mut host.s2,
                    pfn,
                    1,
                    self.zero(),
                ) {
                    Ok(()) => {
                        match vcpu.and_then(|i| vm.vcpus.get_mut(i)) {
                            Some(state) => {
                                *state = None;
                                if let Some(run) = vcpu.and_then(|i| vm.runs.get_mut(i)) {
                                    *run = VcpuRun::IDLE;
                                }
                            }
                            None => {
                                vm.s2.mm_mut().take();
                            }
                        }
                        vm.s2.mm_mut().release(pfn);
                        done += 1;
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = error {
            if done == 0 {
                return Err(self.err(e));
            }
        }
        let reclaimed = u32::try_from(done).map_err(|_| self.bug())?;
        Ok(Reply::Teardown(TeardownProgress {
            reclaimed,
            more: !vm.fully_reclaimed(),
        }))
    }

    /// §3.17 `HYP_TEARDOWN_FINALIZE`.
    pub(super) fn teardown_finalize(&self, h: VmHandle) -> Result<Reply, HypError> {
        let mut host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        if !vm.fully_reclaimed() {
            return Err(HypError::Busy);
        }
        let (root, pages) = vm.memcache().root();
        let n = pages as u64;
        // Checks of return_from_hyp, before the stage-2 is destroyed.
        host.tracker
            .check_transfer(root, n, Owner::Hyp)
            .map_err(|_| self.bug())?;
        let bound = map_tables_bound(host.s2.config(), Ipa(root.0 << PAGE_SHIFT), n * PAGE_SIZE);
        if host.s2.mm().available() < bound {
            return Err(HypError::NoMemory);
        }
        let Some(vm) = slot.vm.take() else {
            return Err(self.bug());
        };
        // Flushes the VMID, releases the root (the memcache keeps it
        // reserved): the VMID can be reused once the slot is.
        let (mut mc, _tlb) = vm.s2.destroy();
        slot.free();
        let host = &mut *host;
        transition::return_from_hyp(&mut host.tracker, &mut host.s2, root, n, self.zero())
            .map_err(|_| self.bug())?;
        for i in 0..n {
            mc.release(Pfn(root.0 + i));
        }
        Ok(Reply::Done)
    }

    /// §3.18 `HYP_VM_COUNTERS`.
    pub(super) fn vm_counters(&self, h: VmHandle, group: CounterGroup) -> Result<Reply, HypError> {
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        Ok(Reply::Counters(match group {
            CounterGroup::Stage2 => Counters::Stage2(vm.stage2_counters()),
            CounterGroup::Runtime => Counters::Runtime(vm.runtime_counters()),
        }))
    }

    /// §3.19 `HYP_HOST_PAGE_STATE`.
    pub(super) fn host_page_state(&self, pfn: hypercalls::Pfn) -> Result<Reply, HypError> {
        let host = self.lock_host();
        let pfn = self.ram_range(pfn, 1)?;
        let info = host.tracker.page(pfn).map_err(|e| self.err(e))?;
        let owner = match info.owner {
            Owner::Host => hypercalls::Owner::Host,
            Owner::Hyp => hypercalls::Owner::Hyp,
            Owner::Vm(id) => {
                // Lock order: host, then this one slot.
                let slot = self
                    .slots
                    .get(usize::from(id.0))
                    .ok_or_else(|| self.bug())?
                    .lock();
                let vm = slot.vm.as_ref().ok_or_else(|| self.bug())?;
                hypercalls::Owner::Vm(vm.handle)
            }
        };
        let state = if info.shares == 0 {
            OwnerState::Owned
        } else {
            OwnerState::SharedOwned
        };
        Ok(Reply::HostPage(HostPageInfo {
            owner,
            state,
            share_count: info.shares,
        }))
    }

    /// §3.20 `HYP_GUEST_PAGE_STATE`.
    pub(super) fn guest_page_state(
        &self,
        h: VmHandle,
        gfn: hypercalls::Gfn,
    ) -> Result<Reply, HypError> {
        let host = self.lock_host();
        let mut slot = self.lock_vm(h)?;
        let vm = vm_of(&mut slot)?;
        let (ipa, _) = guest_range(vm, gfn, 1)?;
        let view = transition::guest_view(&host.tracker, vm.id, &vm.s2, gfn.into())
            .map_err(|e| self.err(e))?;
        let Some((pfn, view)) = view else {
            return Ok(Reply::GuestPage(GuestPage::Unmapped));
        };
        let state = match view {
            PageView::Owned => AbiPageState::Owned,
            PageView::SharedOwned => AbiPageState::SharedOwned,
            PageView::SharedBorrowed => AbiPageState::SharedBorrowed,
            PageView::None => return Err(self.bug()),
        };
        let leaf = vm.s2.query(ipa).ok_or_else(|| self.bug())?;
        Ok(Reply::GuestPage(GuestPage::Mapped {
            state,
            pfn: pfn.to_abi().ok_or_else(|| self.bug())?,
            prot: prot_of(leaf.attrs.perms),
        }))
    }
}

/// What a CPU needs to enter a vCPU, from [`Hyp::vcpu_load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedVcpu {
    /// The VM.
    pub vm: VmHandle,
    /// The vCPU index.
    pub vcpu: u16,
    /// The VM's VMID.
    pub vmid: Vmid,
    /// `VTTBR_EL2` of the VM's stage-2 (root | VMID << 48).
    pub vttbr: u64,
    /// The VM's stage-2 geometry (for `VTCR_EL2`).
    pub ipa: stage2::pgtable::IpaConfig,
    /// The vCPU's state page (hypervisor-owned, zeroed at creation).
    pub state: Pfn,
}

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// Marks vCPU `vcpu` of `vm` as running on the calling CPU, for the
    /// `HYP_VCPU_RUN` of issue 5 (ABI §3.7): `HYP_ENOENT` (no such VM, or
    /// the vCPU was not created), `HYP_EBUSY` (VM dying, or the vCPU is
    /// loaded on another CPU). While any vCPU is loaded the VM cannot start
    /// its teardown (`HYP_EBUSY`), so its stage-2 and the state page stay
    /// valid without a lock held; memory calls on the VM go on meanwhile.
    /// Every successful load must be followed by [`vcpu_put`](Self::vcpu_put).
    pub fn vcpu_load(&self, vm: VmHandle, vcpu: VcpuIndex) -> Result<LoadedVcpu, HypError> {
        let mut slot = self.lock_vm(vm)?;
        load(vm_of(&mut slot)?, vm, vcpu)
    }

    /// The vCPU `loaded` stopped running on this CPU; `faults` stage-2
    /// faults were taken from it meanwhile (`HYP_VM_COUNTERS`).
    pub fn vcpu_put(&self, loaded: &LoadedVcpu, faults: u64) {
        if let Ok(mut slot) = self.lock_vm(loaded.vm) {
            if let Ok(v) = vm_of(&mut slot) {
                v.running &= !(1u64 << loaded.vcpu);
                v.counts.faults = v.counts.faults.wrapping_add(faults);
            }
        }
    }
}

/// Loads vCPU `vcpu` of the locked VM `v` (handle `vm`): see [`Hyp::vcpu_load`].
pub(super) fn load<P: Platform>(
    v: &mut Vm<P>,
    vm: VmHandle,
    vcpu: VcpuIndex,
) -> Result<LoadedVcpu, HypError> {
    let i = vcpu.get();
    let state = v
        .vcpus
        .get(usize::from(i))
        .copied()
        .flatten()
        .ok_or(HypError::NoEntry)?;
    live(v)?;
    let bit = 1u64 << i;
    if v.running & bit != 0 {
        return Err(HypError::Busy);
    }
    v.running |= bit;
    v.counts.vcpu_runs = v.counts.vcpu_runs.wrapping_add(1);
    Ok(LoadedVcpu {
        vm,
        vcpu: i,
        vmid: v.s2.vmid(),
        vttbr: v.s2.vttbr(),
        ipa: v.s2.config(),
        state,
    })
}

const _: () = assert!(MAX_VMS <= u16::MAX as usize);
const _: () = assert!(hypercalls::MAX_VCPUS <= 64);
