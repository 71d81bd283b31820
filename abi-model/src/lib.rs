//! The reference model of the hypercall ABI (`docs/ABI.md`): per host frame
//! the owner, the owner's state and the share count (§2.5, §3.19); per VM
//! its lifecycle (§2.6), vCPUs, memcache pages (§2.7) and guest mappings
//! (§3.20); and the outcome every host call must have (§3, error order
//! §2.4).
//!
//! It is the one model of the ABI: the bare-metal test host checks the real
//! hypervisor against it with raw HVCs (`qemu/testhost`), el2's property
//! test checks the dispatcher on host fakes against it (`el2/src/pkvm/tests`),
//! and the fuzz target checks every decoded call against it (`fuzz/`). An
//! ABI change is modelled here once.
//!
//! [`Model::step`] predicts a call's outcome, compares it with what the
//! hypervisor answered and, on success, commits the transition. Where the ABI
//! leaves a choice to the implementation, the model accepts every allowed
//! answer unless the caller pins the choice in [`Config`] (VM slots, the
//! share limit, the access flag) or tells the model what it read through
//! the ABI: the free memcache pages before a call
//! ([`Model::note_free_memcache`]) and, after a teardown batch, which pages
//! went back ([`Model::step_observed`] with an [`Observe`]r).

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use hypercalls::{
    AbiVersion, CounterGroup, Counters, GuestPage, HostPageInfo, HypError, Hypercall, Owner,
    OwnerState, PageState, Prot, Reply, TeardownProgress, VcpuExit, VcpuStart, VmHandle, PFN_BITS,
    TEARDOWN_BATCH,
};

/// A memcache of at least this many pages is assumed to hold every table a
/// test mapping needs (tests map small windows: a few table pages at most),
/// when the caller did not say how many pages are free.
pub const PLENTY: usize = 16;

/// The machine and the implementation's choices the model predicts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The hypervisor's own frames `[start, end)`: RAM owned by Hyp (§2.5:
    /// every frame of RAM has an owner).
    pub hyp: (u64, u64),
    /// Number of VM slots, if the caller owns them all (`HYP_ENOSPC` is
    /// then exact); `None` when others may hold slots too (then any
    /// `HYP_VM_CREATE` may also answer `HYP_ENOSPC`).
    pub max_vms: Option<usize>,
    /// Most borrow mappings of one frame (a share beyond fails with
    /// `HYP_ERANGE`, §2.4); `u32::MAX` in the production build.
    pub share_limit: u32,
    /// Whether the access flag is predicted exactly: a mapping is created
    /// young and only `HYP_TEST_CLEAR_YOUNG` makes it old. True only when no
    /// guest touches the mapped memory (host fakes); otherwise either answer
    /// of `HYP_TEST_CLEAR_YOUNG` is accepted.
    pub exact_young: bool,
}

impl Config {
    /// A machine whose hypervisor owns the frames `hyp`, with the
    /// production share limit, unknown slot use and any access flag.
    #[must_use]
    pub fn new(hyp: (u64, u64)) -> Self {
        Self {
            hyp,
            max_vms: None,
            share_limit: u32::MAX,
            exact_young: false,
        }
    }
}

/// What the model reads through the ABI after a call, where the ABI leaves
/// the order of work to the implementation (which pages a partial
/// `HYP_TEARDOWN_RECLAIM` batch returned). Answers are the replies of
/// `HYP_HOST_PAGE_STATE` and `HYP_GUEST_PAGE_STATE`.
pub trait Observe {
    /// `HYP_HOST_PAGE_STATE` of `pfn` now.
    fn host_page(&mut self, pfn: u64) -> Result<HostPageInfo, HypError>;
    /// `HYP_GUEST_PAGE_STATE` of `gfn` of `vm` now.
    fn guest_page(&mut self, vm: VmHandle, gfn: u64) -> Result<GuestPage, HypError>;
}

/// A set of error codes a call may fail with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrSet(u16);
const ALL_ERRS: [HypError; 10] = [
    HypError::NotSupported,
    HypError::NoEntry,
    HypError::TooBig,
    HypError::NoMemory,
    HypError::Denied,
    HypError::Busy,
    HypError::Exists,
    HypError::InvalidArgument,
    HypError::NoSpace,
    HypError::OutOfRange,
];

fn bit(e: HypError) -> u16 {
    ALL_ERRS.iter().position(|&x| x == e).map_or(0, |i| 1 << i)
}

impl ErrSet {
    /// The empty set.
    pub const EMPTY: Self = Self(0);

    /// The set holding only `e`.
    #[must_use]
    pub fn one(e: HypError) -> Self {
        Self(bit(e))
    }

    /// `self` plus `e`.
    #[must_use]
    pub fn with(self, e: HypError) -> Self {
        Self(self.0 | bit(e))
    }

    /// Whether `e` is in the set (an `Unknown` code never is).
    #[must_use]
    pub fn contains(self, e: HypError) -> bool {
        bit(e) != 0 && self.0 & bit(e) != 0
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for ErrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for e in ALL_ERRS {
            if self.contains(e) {
                if !first {
                    f.write_str(" or ")?;
                }
                write!(f, "{}", e.c_name().unwrap_or("?"))?;
                first = false;
            }
        }
        Ok(())
    }
}

/// What the model expects of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The call must fail with one of these errors.
    Fail(ErrSet),
    /// The call must succeed.
    Succeed,
    /// The call must succeed or fail with one of these errors: `HYP_ENOMEM`
    /// when the memcache is small but not empty (how many table pages a
    /// mapping needs is the hypervisor's), `HYP_ENOSPC` when others may
    /// hold VM slots.
    SucceedOr(ErrSet),
}

/// A guest mapping as §3.20 reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The guest's view.
    pub state: PageState,
    /// The host frame.
    pub pfn: u64,
    /// The guest's permissions.
    pub prot: Prot,
    /// The access flag, if [`Config::exact_young`] (else always true).
    pub young: bool,
}

/// The page counts of counter group 0 the model can predict exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages shared.
    pub shares: u64,
    /// Pages unshared (also by teardown).
    pub unshares: u64,
    /// Pages donated.
    pub donations: u64,
    /// Pages reclaimed (also by teardown).
    pub reclaims: u64,
}

/// One VM as the model sees it.
#[derive(Clone, Debug)]
pub struct VmModel {
    /// Its handle.
    pub handle: VmHandle,
    /// IPA size.
    pub ipa_bits: u8,
    /// Number of vCPUs it was created with.
    pub nr_vcpus: u16,
    /// Created vCPUs (bit i = vCPU i).
    pub vcpus: u64,
    /// vCPUs created with `HYP_VCPU_START_OFF` (bit i = vCPU i).
    pub vcpus_off: u64,
    /// Whether a vCPU created on was ever run: until then no guest can have
    /// started a vCPU created off (PSCI `CPU_ON`), so running one must give
    /// `HYP_EXIT_POWERED_OFF` (§3.7).
    pub guest_ran: bool,
    /// Whether any `HYP_VCPU_RUN` succeeded (runtime counters may count).
    pub ran: bool,
    /// DYING (§2.6).
    pub dying: bool,
    /// `HYP_TEARDOWN_RECLAIM` answered more = 0.
    pub drained: bool,
    /// Page updates reported by `HYP_TEARDOWN_RECLAIM` so far.
    pub teardown_updates: u64,
    /// First root frame and number of root frames.
    pub root: (u64, u64),
    /// Hyp-owned frames of this VM other than the root: memcache pages,
    /// whether free or in use as tables or vCPU state.
    pub hyp_pages: BTreeSet<u64>,
    /// Whether anything was ever mapped or a vCPU created (after that, free
    /// memcache pages can no longer be predicted exactly).
    pub used_memcache: bool,
    /// Guest mappings by gfn.
    pub map: BTreeMap<u64, Mapping>,
    /// First gfns of the 2 MiB blocks the hypervisor maps (§2.8): made by
    /// a share or donation of 512 pages whose pfn and gfn are both
    /// multiples of 512; gone when any call changes part of one (a split)
    /// or unmaps it.
    pub blocks: BTreeSet<u64>,
    /// Predictable counters.
    pub counts: PageCounts,
}

/// Pages of a 2 MiB block.
pub const BLOCK_PAGES: u64 = 512;

impl VmModel {
    fn gfn_limit(&self) -> u64 {
        1u64 << (self.ipa_bits - 12)
    }

    /// The first gfns of the blocks that `[gfn, gfn + nr)` covers only in
    /// part, for which `keep` holds (each costs one table page to split).
    fn partial_blocks(&self, gfn: u64, nr: u64, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let (a, b) = (gfn, gfn + nr);
        let first = a - a % BLOCK_PAGES;
        self.blocks
            .range(first..b)
            .copied()
            .filter(|&base| !(a <= base && base + BLOCK_PAGES <= b) && keep(base))
            .collect()
    }

    /// The first gfn of the block holding `gfn`, if any.
    fn block_of(&self, gfn: u64) -> Option<u64> {
        let base = gfn - gfn % BLOCK_PAGES;
        self.blocks.contains(&base).then_some(base)
    }

    /// Whether the block at `base` is writable (its pages agree).
    fn block_writable(&self, base: u64) -> bool {
        self.map.get(&base).is_some_and(|m| m.prot.write())
    }
}

/// Whether a share or donation of `nr` pages maps one 2 MiB block (§2.8).
fn is_block(pfn: u64, gfn: u64, nr: u64) -> bool {
    nr == BLOCK_PAGES && pfn.is_multiple_of(BLOCK_PAGES) && gfn.is_multiple_of(BLOCK_PAGES)
}

/// A disagreement between the hypervisor and the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The reference model.
#[derive(Clone, Debug)]
pub struct Model {
    /// The machine and the implementation's choices.
    config: Config,
    /// Host RAM as frame ranges `[start, end)` (the DTB the host got).
    ram: Vec<(u64, u64)>,
    /// Frames whose state differs from "host OWNED, count 0" (or, in the
    /// hypervisor's range, from "Hyp OWNED").
    pages: BTreeMap<u64, HostPageInfo>,
    /// Live and dying VMs.
    vms: Vec<VmModel>,
    /// Handles of finalized VMs.
    stale: Vec<VmHandle>,
    /// Frames reclaimed or returned since the last [`Model::take_zeroed`]:
    /// they must read as zero.
    zeroed: BTreeSet<u64>,
    /// A VM's free memcache pages before the next call, if the caller read
    /// them ([`Model::note_free_memcache`]); every step forgets it.
    free_hint: Option<(VmHandle, u64)>,
}

const HOST_OWNED: HostPageInfo = HostPageInfo {
    owner: Owner::Host,
    state: OwnerState::Owned,
    share_count: 0,
};
const HYP_OWNED: HostPageInfo = HostPageInfo {
    owner: Owner::Hyp,
    state: OwnerState::Owned,
    share_count: 0,
};

/// The error of a range call from its pages (§2.4): `host` from each
/// frame's ownership, `guest` from each guest frame. The host side is
/// checked first, every frame in order, then the guest side: the first
/// failing page of the first failing side decides.
fn page_errors(per_page: impl Iterator<Item = (Option<HypError>, Option<HypError>)>) -> ErrSet {
    let mut guest_first = None;
    for (host, guest) in per_page {
        if let Some(h) = host {
            return ErrSet::one(h);
        }
        guest_first = guest_first.or(guest);
    }
    guest_first.map_or(ErrSet::EMPTY, ErrSet::one)
}

/// The most stage-2 table pages a mapping of `nr` pages at `gfn` can add
/// in a VM with `ipa_bits`: for each level below the root, the tables that
/// cover the range; a 2 MiB block (`block`) needs no last-level table. An
/// upper bound: tables that exist already are not needed again. Exact 0
/// when the range needs no table at all (a block under a level-2 root).
fn tables_needed(ipa_bits: u8, gfn: u64, nr: u64, block: bool) -> u64 {
    let last = gfn + nr.max(1) - 1;
    // Levels of the geometry (§2.3): the root is at level 4 - levels.
    let levels = u32::from(ipa_bits.saturating_sub(8)) / 9;
    let start = 4u32.saturating_sub(levels);
    let lowest = if block { 2 } else { 3 };
    (start + 1..=lowest)
        .map(|level| {
            // A table at `level` covers 512^(4 - level) pages.
            let shift = 9 * (4 - level);
            (last >> shift) - (gfn >> shift) + 1
        })
        .sum()
}

impl Model {
    /// A model of a fresh hypervisor on `config` whose host RAM is `ram`
    /// (frame ranges `[start, end)`, e.g. from the host's device tree).
    #[must_use]
    pub fn new(config: Config, ram: &[(u64, u64)]) -> Self {
        Self {
            config,
            ram: ram.to_vec(),
            pages: BTreeMap::new(),
            vms: Vec::new(),
            stale: Vec::new(),
            zeroed: BTreeSet::new(),
            free_hint: None,
        }
    }

    fn is_hyp(&self, pfn: u64) -> bool {
        (self.config.hyp.0..self.config.hyp.1).contains(&pfn)
    }

    /// Whether `pfn` is RAM (host RAM or the hypervisor's).
    #[must_use]
    pub fn is_ram(&self, pfn: u64) -> bool {
        self.is_hyp(pfn) || self.ram.iter().any(|&(s, e)| (s..e).contains(&pfn))
    }

    /// The state `HYP_HOST_PAGE_STATE` must report for `pfn`.
    pub fn host_page(&self, pfn: u64) -> Result<HostPageInfo, HypError> {
        if !self.is_ram(pfn) {
            return Err(HypError::OutOfRange);
        }
        Ok(self
            .pages
            .get(&pfn)
            .copied()
            .unwrap_or(if self.is_hyp(pfn) {
                HYP_OWNED
            } else {
                HOST_OWNED
            }))
    }

    /// What `HYP_GUEST_PAGE_STATE` must report for `gfn` of `vm`.
    pub fn guest_page(&self, vm: VmHandle, gfn: u64) -> Result<GuestPage, HypError> {
        let v = self.vm(vm)?;
        if gfn >= v.gfn_limit() {
            return Err(HypError::OutOfRange);
        }
        Ok(match v.map.get(&gfn) {
            None => GuestPage::Unmapped,
            Some(m) => GuestPage::Mapped {
                state: m.state,
                pfn: hypercalls::Pfn::new(m.pfn).unwrap_or(hypercalls::Pfn::ZERO),
                prot: m.prot,
            },
        })
    }

    /// The VM `vm`, or `HYP_ENOENT`.
    pub fn vm(&self, vm: VmHandle) -> Result<&VmModel, HypError> {
        self.vms
            .iter()
            .find(|v| v.handle == vm)
            .ok_or(HypError::NoEntry)
    }

    fn vm_mut(&mut self, vm: VmHandle) -> Option<&mut VmModel> {
        self.vms.iter_mut().find(|v| v.handle == vm)
    }

    /// Live and dying VMs.
    #[must_use]
    pub fn vms(&self) -> &[VmModel] {
        &self.vms
    }

    /// Whether `vm` was finalized.
    #[must_use]
    pub fn is_stale(&self, vm: VmHandle) -> bool {
        self.stale.contains(&vm)
    }

    /// Frames that became host-owned through a zeroing transition since the
    /// last call; the caller checks their contents and forgets them.
    pub fn take_zeroed(&mut self) -> BTreeSet<u64> {
        core::mem::take(&mut self.zeroed)
    }

    fn set_page(&mut self, pfn: u64, info: HostPageInfo) {
        if info == HOST_OWNED && !self.is_hyp(pfn) {
            self.pages.remove(&pfn);
        } else {
            self.pages.insert(pfn, info);
        }
    }

    fn host_owned_exclusive(&self, pfn: u64) -> bool {
        self.host_page(pfn) == Ok(HOST_OWNED)
    }

    /// Common checks of a call naming a VM: `HYP_ENOENT`, then `HYP_EBUSY`
    /// unless the call is allowed on a dying VM.
    fn live_vm(&self, vm: VmHandle) -> Result<&VmModel, HypError> {
        let v = self.vm(vm)?;
        if v.dying {
            return Err(HypError::Busy);
        }
        Ok(v)
    }

    /// `HYP_ERANGE` checks of a host frame range.
    fn pfn_range_ok(&self, pfn: u64, nr: u64) -> bool {
        pfn + nr <= 1 << PFN_BITS && (pfn..pfn + nr).all(|p| self.is_ram(p))
    }

    /// What the ABI says `call` must do in the current state.
    #[must_use]
    pub fn predict(&self, call: &Hypercall) -> Prediction {
        let p = match self.predict_inner(call) {
            Ok(p) => p,
            Err(e) => Prediction::Fail(ErrSet::one(e)),
        };
        // Slots others hold: any create may find none left (§2.4: ENOSPC
        // comes before everything but decode errors).
        let nospace = ErrSet::one(HypError::NoSpace);
        match (call, self.config.max_vms, p) {
            (Hypercall::VmCreate { .. }, None, Prediction::Succeed) => {
                Prediction::SucceedOr(nospace)
            }
            (Hypercall::VmCreate { .. }, None, Prediction::Fail(e))
                if !e.contains(HypError::InvalidArgument) =>
            {
                Prediction::Fail(e.with(HypError::NoSpace))
            }
            _ => p,
        }
    }

    /// The configuration the model predicts with.
    #[must_use]
    pub fn config(&self) -> Config {
        self.config
    }

    /// Tells the model that `vm` has `free` free memcache pages now (as
    /// `HYP_VM_COUNTERS` group 1 reads them), for the next step only: a
    /// call that needs at most that many pages must then succeed.
    pub fn note_free_memcache(&mut self, vm: VmHandle, free: u64) {
        self.free_hint = Some((vm, free));
    }

    /// The outcome of a call of `v` that takes at most `need` memcache
    /// pages (and at least one unless it can use existing tables).
    fn memory(&self, v: &VmModel, need: u64) -> Prediction {
        let small = Prediction::SucceedOr(ErrSet::one(HypError::NoMemory));
        if need == 0 {
            return Prediction::Succeed;
        }
        if v.hyp_pages.is_empty() {
            return Prediction::Fail(ErrSet::one(HypError::NoMemory));
        }
        match self.free_hint {
            Some((vm, free)) if vm == v.handle => {
                if free >= need {
                    Prediction::Succeed
                } else {
                    small
                }
            }
            _ if v.hyp_pages.len() < PLENTY => small,
            _ => Prediction::Succeed,
        }
    }

    fn predict_inner(&self, call: &Hypercall) -> Result<Prediction, HypError> {
        use Prediction::*;
        Ok(match *call {
            Hypercall::Version | Hypercall::Features { .. } => Succeed,
            Hypercall::MemcacheTopup { vm, pfn, nr } => {
                self.live_vm(vm)?;
                let (pfn, nr) = (pfn.raw(), u64::from(nr.get()));
                if !self.pfn_range_ok(pfn, nr) {
                    return Err(HypError::OutOfRange);
                }
                if !(pfn..pfn + nr).all(|p| self.host_owned_exclusive(p)) {
                    return Err(HypError::Denied);
                }
                Succeed
            }
            Hypercall::MemcacheReclaim { vm } => {
                self.vm(vm)?;
                Succeed
            }
            Hypercall::VmCreate { ipa_bits, root, .. } => {
                let n = u64::from(ipa_bits.root_table_pages());
                if root.raw() % n != 0 {
                    return Err(HypError::InvalidArgument);
                }
                if self.config.max_vms.is_some_and(|max| self.vms.len() >= max) {
                    return Err(HypError::NoSpace);
                }
                if !self.pfn_range_ok(root.raw(), n) {
                    return Err(HypError::OutOfRange);
                }
                if !(root.raw()..root.raw() + n).all(|p| self.host_owned_exclusive(p)) {
                    return Err(HypError::Denied);
                }
                Succeed
            }
            Hypercall::VcpuCreate { vm, vcpu, .. } => {
                let v = self.live_vm(vm)?;
                if vcpu.get() >= v.nr_vcpus {
                    return Err(HypError::OutOfRange);
                }
                if v.vcpus & (1 << vcpu.get()) != 0 {
                    return Err(HypError::Exists);
                }
                // The vCPU's state takes one page.
                self.memory(v, 1)
            }
            Hypercall::VcpuRun { vm, vcpu, .. } => {
                let v = self.vm(vm)?;
                if vcpu.get() >= v.nr_vcpus || v.vcpus & (1 << vcpu.get()) == 0 {
                    return Err(HypError::NoEntry);
                }
                if v.dying {
                    // Teardown returns the vCPU state pages after the guest
                    // pages: once it has, the vCPU no longer exists (§3.7).
                    return Ok(if v.drained {
                        Fail(ErrSet::one(HypError::NoEntry))
                    } else if v.teardown_updates > 0 {
                        Fail(ErrSet::one(HypError::Busy).with(HypError::NoEntry))
                    } else {
                        Fail(ErrSet::one(HypError::Busy))
                    });
                }
                // Running a guest is outside this model (no guest image).
                Succeed
            }
            Hypercall::Share {
                vm, pfn, gfn, nr, ..
            } => self.map_call(vm, pfn, gfn, nr, PageState::SharedBorrowed)?,
            Hypercall::Donate {
                vm, pfn, gfn, nr, ..
            } => self.map_call(vm, pfn, gfn, nr, PageState::Owned)?,
            Hypercall::Unshare { vm, pfn, gfn, nr } => {
                self.unmap_call(vm, pfn, gfn, nr, PageState::SharedBorrowed)?
            }
            Hypercall::Reclaim { vm, pfn, gfn, nr } => {
                self.unmap_call(vm, pfn, gfn, nr, PageState::Owned)?
            }
            Hypercall::UnshareRange { vm, gfn, nr } => {
                let v = self.live_vm(vm)?;
                let (gfn, nr) = (gfn.raw(), u64::from(nr.get()));
                if gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                // Every mapped gfn must be a borrow (§3.21); holes are skipped.
                if v.map
                    .range(gfn..gfn + nr)
                    .any(|(_, m)| m.state != PageState::SharedBorrowed)
                {
                    return Ok(Fail(ErrSet::one(HypError::Denied)));
                }
                // A block the range covers in part is split (every block is
                // mapped, so each such block has a mapped page in the range).
                let splits = v.partial_blocks(gfn, nr, |_| true);
                self.memory(v, splits.len() as u64)
            }
            Hypercall::WrProtect { vm, gfn, nr } => {
                let v = self.live_vm(vm)?;
                let (gfn, nr) = (gfn.raw(), u64::from(nr.get()));
                if gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                // A writable block the range covers in part is split.
                let splits = v.partial_blocks(gfn, nr, |b| v.block_writable(b));
                self.memory(v, splits.len() as u64)
            }
            Hypercall::TestClearYoung { vm, gfn, nr } => {
                let v = self.live_vm(vm)?;
                if gfn.raw() + u64::from(nr.get()) > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                Succeed
            }
            Hypercall::RelaxPerms { vm, gfn, prot } => {
                let v = self.live_vm(vm)?;
                if gfn.raw() >= v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                let Some(m) = v.map.get(&gfn.raw()) else {
                    return Err(HypError::NoEntry);
                };
                // Changing one page of a block splits it.
                let changes = (m.prot | prot) != m.prot;
                let split = changes && v.block_of(gfn.raw()).is_some();
                self.memory(v, u64::from(split))
            }
            Hypercall::TeardownStart { vm } => {
                self.live_vm(vm)?;
                Succeed
            }
            Hypercall::TeardownReclaim { vm } => {
                if !self.vm(vm)?.dying {
                    return Err(HypError::Busy);
                }
                Succeed
            }
            Hypercall::TeardownFinalize { vm } => {
                let v = self.vm(vm)?;
                if !v.dying || !v.drained {
                    return Err(HypError::Busy);
                }
                Succeed
            }
            Hypercall::VmCounters { vm, .. } => {
                self.vm(vm)?;
                Succeed
            }
            Hypercall::HostPageState { pfn } => {
                self.host_page(pfn.raw())?;
                Succeed
            }
            Hypercall::GuestPageState { vm, gfn } => {
                self.guest_page(vm, gfn.raw())?;
                Succeed
            }
        })
    }

    /// The VM and raw range of a range call, after the checks every one
    /// makes first: a live VM, then frames that are RAM and gfns inside its
    /// IPA size (§2.4).
    fn range_call(
        &self,
        vm: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        nr: hypercalls::PageCount,
    ) -> Result<(&VmModel, u64, u64, u64), HypError> {
        let v = self.live_vm(vm)?;
        let (pfn, gfn, nr) = (pfn.raw(), gfn.raw(), u64::from(nr.get()));
        if !self.pfn_range_ok(pfn, nr) || gfn + nr > v.gfn_limit() {
            return Err(HypError::OutOfRange);
        }
        Ok((v, pfn, gfn, nr))
    }

    /// `HYP_SHARE` (`state` SHARED_BORROWED) or `HYP_DONATE` (OWNED): each
    /// frame the host's (for a donation exclusively; for a share below the
    /// share limit), each gfn unmapped, then memory for the tables.
    fn map_call(
        &self,
        vm: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        nr: hypercalls::PageCount,
        state: PageState,
    ) -> Result<Prediction, HypError> {
        let (v, pfn, gfn, nr) = self.range_call(vm, pfn, gfn, nr)?;
        let errs = page_errors((0..nr).map(|i| {
            let host = match self.host_page(pfn + i) {
                Ok(h) if state == PageState::Owned && h != HOST_OWNED => Some(HypError::Denied),
                Ok(h) if h.owner != Owner::Host => Some(HypError::Denied),
                Ok(h) if h.share_count >= self.config.share_limit => Some(HypError::OutOfRange),
                Ok(_) => None,
                Err(_) => Some(HypError::Denied),
            };
            let guest = v.map.contains_key(&(gfn + i)).then_some(HypError::Exists);
            (host, guest)
        }));
        if !errs.is_empty() {
            return Ok(Prediction::Fail(errs));
        }
        let block = is_block(pfn, gfn, nr);
        Ok(self.memory(v, tables_needed(v.ipa_bits, gfn, nr, block)))
    }

    /// `HYP_UNSHARE` (`state` SHARED_BORROWED) or `HYP_RECLAIM` (OWNED):
    /// each frame shared by the host (unshare) or owned by the VM
    /// (reclaim), each gfn mapped to its frame in `state`, then memory: one
    /// table page per 2 MiB block the range covers in part (a split).
    fn unmap_call(
        &self,
        vm: VmHandle,
        pfn: hypercalls::Pfn,
        gfn: hypercalls::Gfn,
        nr: hypercalls::PageCount,
        state: PageState,
    ) -> Result<Prediction, HypError> {
        let (v, pfn, gfn, nr) = self.range_call(vm, pfn, gfn, nr)?;
        let errs = page_errors((0..nr).map(|i| {
            let host_ok = self.host_page(pfn + i).is_ok_and(|h| match state {
                PageState::SharedBorrowed => {
                    h.owner == Owner::Host && h.state == OwnerState::SharedOwned
                }
                _ => h.owner == Owner::Vm(vm),
            });
            let guest = match v.map.get(&(gfn + i)) {
                None => Some(HypError::NoEntry),
                Some(m) if m.pfn != pfn + i || m.state != state => Some(HypError::Denied),
                Some(_) => None,
            };
            ((!host_ok).then_some(HypError::Denied), guest)
        }));
        if !errs.is_empty() {
            return Ok(Prediction::Fail(errs));
        }
        let splits = v.partial_blocks(gfn, nr, |_| true);
        Ok(self.memory(v, splits.len() as u64))
    }

    /// Checks the hypervisor's answer `got` to `call` against the model and,
    /// if it succeeded, commits the transition. On a mismatch the model is
    /// left as it was.
    pub fn step(
        &mut self,
        call: &Hypercall,
        got: &Result<Reply, HypError>,
    ) -> Result<(), Mismatch> {
        self.step_inner(call, got, None)
    }

    /// As [`step`](Self::step), and after a `HYP_TEARDOWN_RECLAIM` batch
    /// asks `obs` which of the VM's pages went back, so that the model
    /// stays exact during a teardown: it checks the batch's count, that
    /// guest pages go back before hypervisor pages (§3.16) and `more`.
    /// Without an observer the model only sums the batches and checks the
    /// whole VM once `more = 0`.
    pub fn step_observed(
        &mut self,
        call: &Hypercall,
        got: &Result<Reply, HypError>,
        obs: &mut dyn Observe,
    ) -> Result<(), Mismatch> {
        self.step_inner(call, got, Some(obs))
    }

    fn step_inner(
        &mut self,
        call: &Hypercall,
        got: &Result<Reply, HypError>,
        obs: Option<&mut dyn Observe>,
    ) -> Result<(), Mismatch> {
        let pred = self.predict(call);
        self.free_hint = None;
        match (pred, got) {
            (Prediction::Fail(errs), Err(e)) if errs.contains(*e) => Ok(()),
            (Prediction::SucceedOr(errs), Err(e)) if errs.contains(*e) => Ok(()),
            (Prediction::Succeed | Prediction::SucceedOr(_), Ok(reply)) => {
                let mut next = self.clone();
                next.commit(call, reply, obs)?;
                *self = next;
                Ok(())
            }
            (pred, got) => Err(Mismatch(format!(
                "{call:?}: expected {}, got {}",
                describe(pred),
                show(got)
            ))),
        }
    }

    /// Applies a successful call; checks the reply's payload.
    fn commit(
        &mut self,
        call: &Hypercall,
        reply: &Reply,
        obs: Option<&mut dyn Observe>,
    ) -> Result<(), Mismatch> {
        let bad = |what: &str| Err(Mismatch(format!("{call:?}: {what}, got {reply:?}")));
        match (*call, *reply) {
            (Hypercall::Version, Reply::Version(v)) => {
                if v != AbiVersion::CURRENT {
                    return bad("version is not the crate's");
                }
            }
            (Hypercall::Features { .. }, Reply::Features { .. }) => {}
            (Hypercall::MemcacheTopup { vm, pfn, nr }, Reply::Done) => {
                for p in pfn.raw()..pfn.raw() + u64::from(nr.get()) {
                    self.set_page(p, HYP_OWNED);
                }
                if let Some(v) = self.vm_mut(vm) {
                    v.hyp_pages
                        .extend(pfn.raw()..pfn.raw() + u64::from(nr.get()));
                }
            }
            (Hypercall::MemcacheReclaim { vm }, Reply::MemcacheReclaimed(p)) => {
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                let got: BTreeSet<u64> = p.as_slice().iter().map(|p| p.raw()).collect();
                if got.len() != p.as_slice().len() {
                    return bad("a frame is returned twice");
                }
                if !got.is_subset(&v.hyp_pages) {
                    return bad("a returned frame is not one of the VM's memcache pages");
                }
                if !v.used_memcache
                    && got.len() != v.hyp_pages.len().min(hypercalls::MEMCACHE_RECLAIM_MAX)
                {
                    return bad("every memcache page is free, so min(6, free) must come back");
                }
                for p in &got {
                    v.hyp_pages.remove(p);
                }
                for p in got {
                    self.set_page(p, HOST_OWNED);
                    self.zeroed.insert(p);
                }
            }
            (
                Hypercall::VmCreate {
                    ipa_bits,
                    nr_vcpus,
                    root,
                    ..
                },
                Reply::VmCreated { vm },
            ) => {
                if self.vm(vm).is_ok() || self.stale.contains(&vm) {
                    return bad("the new handle is live or stale");
                }
                let n = u64::from(ipa_bits.root_table_pages());
                for p in root.raw()..root.raw() + n {
                    self.set_page(p, HYP_OWNED);
                }
                self.vms.push(VmModel {
                    handle: vm,
                    ipa_bits: ipa_bits.get(),
                    nr_vcpus: nr_vcpus.get(),
                    vcpus: 0,
                    vcpus_off: 0,
                    guest_ran: false,
                    ran: false,
                    dying: false,
                    drained: false,
                    teardown_updates: 0,
                    root: (root.raw(), n),
                    hyp_pages: BTreeSet::new(),
                    used_memcache: false,
                    map: BTreeMap::new(),
                    blocks: BTreeSet::new(),
                    counts: PageCounts::default(),
                });
            }
            (Hypercall::VcpuCreate { vm, vcpu, start }, Reply::Done) => {
                if let Some(v) = self.vm_mut(vm) {
                    v.vcpus |= 1 << vcpu.get();
                    if start == VcpuStart::Off {
                        v.vcpus_off |= 1 << vcpu.get();
                    }
                    v.used_memcache = true;
                }
            }
            (Hypercall::VcpuRun { vm, vcpu, .. }, Reply::Exit(exit)) => {
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                let off = v.vcpus_off & (1 << vcpu.get()) != 0;
                if off && !v.guest_ran && exit != VcpuExit::PoweredOff {
                    return bad("a vCPU created off that no guest started");
                }
                v.ran = true;
                v.guest_ran |= !off;
            }
            (
                Hypercall::Share {
                    vm,
                    pfn,
                    gfn,
                    nr,
                    prot,
                },
                Reply::Done,
            ) => {
                for p in frames(pfn.raw(), nr.get()) {
                    let mut h = self.host_page(p).unwrap_or(HOST_OWNED);
                    h.state = OwnerState::SharedOwned;
                    h.share_count += 1;
                    self.set_page(p, h);
                }
                self.map(
                    vm,
                    pfn.raw(),
                    gfn.raw(),
                    nr.get(),
                    prot,
                    PageState::SharedBorrowed,
                );
            }
            (
                Hypercall::Donate {
                    vm,
                    pfn,
                    gfn,
                    nr,
                    prot,
                },
                Reply::Done,
            ) => {
                let donated = HostPageInfo {
                    owner: Owner::Vm(vm),
                    state: OwnerState::Owned,
                    share_count: 0,
                };
                for p in frames(pfn.raw(), nr.get()) {
                    self.set_page(p, donated);
                }
                self.map(vm, pfn.raw(), gfn.raw(), nr.get(), prot, PageState::Owned);
            }
            (Hypercall::Unshare { vm, pfn, gfn, nr }, Reply::Done) => {
                for p in frames(pfn.raw(), nr.get()) {
                    self.unshare_one(p);
                }
                self.unmap(vm, gfn.raw(), nr.get(), PageState::SharedBorrowed);
            }
            (Hypercall::Reclaim { vm, pfn, gfn, nr }, Reply::Done) => {
                for p in frames(pfn.raw(), nr.get()) {
                    self.set_page(p, HOST_OWNED);
                    self.zeroed.insert(p);
                }
                self.unmap(vm, gfn.raw(), nr.get(), PageState::Owned);
            }
            (Hypercall::UnshareRange { vm, gfn, nr }, Reply::Unshared { pages }) => {
                let Some(v) = self.vm(vm).ok() else {
                    return bad("no such VM");
                };
                let (g, n) = (gfn.raw(), u64::from(nr.get()));
                let mapped: Vec<(u64, u64)> =
                    v.map.range(g..g + n).map(|(&g, m)| (g, m.pfn)).collect();
                if u64::from(pages) != mapped.len() as u64 {
                    return bad(&format!("{} mapped pages in the range", mapped.len()));
                }
                for &(_, pfn) in &mapped {
                    self.unshare_one(pfn);
                }
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                // Unmapped whole or split: no block in the range is left.
                let first = g - g % BLOCK_PAGES;
                let gone: Vec<u64> = v.blocks.range(first..g + n).copied().collect();
                for b in gone {
                    v.blocks.remove(&b);
                }
                for &(g, _) in &mapped {
                    v.map.remove(&g);
                }
                v.counts.unshares += mapped.len() as u64;
            }
            (Hypercall::WrProtect { vm, gfn, nr }, Reply::WrProtected { pages }) => {
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                let (g, n) = (gfn.raw(), u64::from(nr.get()));
                for b in v.partial_blocks(g, n, |b| v.block_writable(b)) {
                    v.blocks.remove(&b);
                }
                let mut changed = 0;
                for (_, m) in v.map.range_mut(g..g + n) {
                    if m.prot.write() {
                        m.prot = Prot::from_bits(m.prot.bits() & !Prot::W.bits()).unwrap_or(m.prot);
                        changed += 1;
                    }
                }
                if pages != changed {
                    return bad(&format!("{changed} writable mapped pages in the range"));
                }
            }
            (Hypercall::RelaxPerms { vm, gfn, prot }, Reply::Done) => {
                if let Some(v) = self.vm_mut(vm) {
                    let block = v.block_of(gfn.raw());
                    if let Some(m) = v.map.get_mut(&gfn.raw()) {
                        if (m.prot | prot) != m.prot {
                            m.prot = m.prot | prot;
                            // Only this page changed: its block was split.
                            if let Some(b) = block {
                                v.blocks.remove(&b);
                            }
                        }
                    }
                }
            }
            (Hypercall::TestClearYoung { vm, gfn, nr }, Reply::Young { young }) => {
                // The access flag is the hypervisor's (as in KVM, mappings
                // may be created young): exact only if the caller says so.
                let exact = self.config.exact_young;
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                // A block has one access flag: a range that touches part
                // of it reads and clears the whole block's (§3.14).
                let (g, n) = (gfn.raw(), u64::from(nr.get()));
                let mut start = g;
                let mut end = g + n;
                if let Some(b) = v.block_of(g) {
                    start = b;
                }
                if let Some(b) = v.block_of(end - 1) {
                    end = b + BLOCK_PAGES;
                }
                let range = start..end;
                let want = v.map.range(range.clone()).any(|(_, m)| m.young);
                if exact && young != want {
                    return bad(&format!("young = {want}"));
                }
                for (_, m) in v.map.range_mut(range) {
                    m.young = false;
                }
            }
            (Hypercall::TeardownStart { vm }, Reply::Done) => {
                if let Some(v) = self.vm_mut(vm) {
                    v.dying = true;
                }
            }
            (Hypercall::TeardownReclaim { vm }, Reply::Teardown(t)) => {
                if t.reclaimed > TEARDOWN_BATCH {
                    return bad("a batch beyond HYP_TEARDOWN_BATCH");
                }
                match obs {
                    Some(obs) => self.teardown_observed(vm, t, obs)?,
                    None => self.teardown_reclaim(vm, u64::from(t.reclaimed), t.more)?,
                }
            }
            (Hypercall::TeardownFinalize { vm }, Reply::Done) => {
                let Some(i) = self.vms.iter().position(|v| v.handle == vm) else {
                    return bad("no such VM");
                };
                let v = self.vms.remove(i);
                for p in v.root.0..v.root.0 + v.root.1 {
                    self.set_page(p, HOST_OWNED);
                    self.zeroed.insert(p);
                }
                self.stale.push(vm);
            }
            (Hypercall::VmCounters { vm, group }, Reply::Counters(c)) => {
                let v = self.vm(vm).map_err(|e| Mismatch(format!("{e:?}")))?;
                match (group, c) {
                    (CounterGroup::Stage2, Counters::Stage2(s)) => {
                        let want = v.counts;
                        let got = PageCounts {
                            shares: s.shares,
                            unshares: s.unshares,
                            donations: s.donations,
                            reclaims: s.reclaims,
                        };
                        if got != want {
                            return bad(&format!("page counters {want:?}"));
                        }
                        if s.maps != want.shares + want.donations
                            || s.unmaps != want.unshares + want.reclaims
                        {
                            return bad("maps = shares + donations, unmaps = unshares + reclaims");
                        }
                    }
                    (CounterGroup::Runtime, Counters::Runtime(r)) => {
                        let root = v.root.1;
                        let hyp = v.hyp_pages.len() as u64;
                        if !v.ran && (r.faults != 0 || r.vcpu_runs != 0) {
                            return bad("no vCPU ever ran, so no faults or entries");
                        }
                        if r.table_pages < root
                            || r.memcache_pages + (r.table_pages - root) > hyp
                            || (!v.used_memcache
                                && (r.memcache_pages != hyp || r.table_pages != root))
                        {
                            return bad(&format!(
                                "gauges within {hyp} memcache pages and {root} root pages"
                            ));
                        }
                    }
                    _ => return bad("counters of another group"),
                }
            }
            (Hypercall::HostPageState { pfn }, Reply::HostPage(h)) => {
                let want = self.host_page(pfn.raw());
                if want != Ok(h) {
                    return bad(&format!("{want:?}"));
                }
            }
            (Hypercall::GuestPageState { vm, gfn }, Reply::GuestPage(g)) => {
                let want = self.guest_page(vm, gfn.raw());
                if want != Ok(g) {
                    return bad(&format!("{want:?}"));
                }
            }
            _ => return bad("a reply of another shape"),
        }
        Ok(())
    }

    /// Maps `nr` guest frames from `gfn` to host frames from `pfn` in `vm`
    /// (a share when `state` is SHARED_BORROWED, a donation when OWNED).
    fn map(&mut self, vm: VmHandle, pfn: u64, gfn: u64, nr: u32, prot: Prot, state: PageState) {
        let Some(v) = self.vm_mut(vm) else {
            return;
        };
        if is_block(pfn, gfn, u64::from(nr)) {
            v.blocks.insert(gfn);
        }
        for i in 0..u64::from(nr) {
            let m = Mapping {
                state,
                pfn: pfn + i,
                prot,
                young: true,
            };
            v.map.insert(gfn + i, m);
        }
        v.used_memcache = true;
        match state {
            PageState::SharedBorrowed => v.counts.shares += u64::from(nr),
            _ => v.counts.donations += u64::from(nr),
        }
    }

    /// Unmaps `nr` guest frames from `gfn` of `vm` (an unshare when `state`
    /// was SHARED_BORROWED, a reclaim when OWNED).
    fn unmap(&mut self, vm: VmHandle, gfn: u64, nr: u32, state: PageState) {
        let Some(v) = self.vm_mut(vm) else {
            return;
        };
        // Unmapped whole or split: no block in the range is left.
        let first = gfn - gfn % BLOCK_PAGES;
        let gone: Vec<u64> = v
            .blocks
            .range(first..gfn + u64::from(nr))
            .copied()
            .collect();
        for b in gone {
            v.blocks.remove(&b);
        }
        for g in frames(gfn, nr) {
            v.map.remove(&g);
        }
        match state {
            PageState::SharedBorrowed => v.counts.unshares += u64::from(nr),
            _ => v.counts.reclaims += u64::from(nr),
        }
    }

    fn unshare_one(&mut self, pfn: u64) {
        let mut h = self.host_page(pfn).unwrap_or(HOST_OWNED);
        h.share_count = h.share_count.saturating_sub(1);
        if h.share_count == 0 {
            h.state = OwnerState::Owned;
        }
        self.set_page(pfn, h);
    }

    /// `HYP_TEARDOWN_RECLAIM` answered `t`: asks `obs` which of the VM's
    /// mappings and hypervisor pages went back and checks the count, the
    /// order (every guest page before any hypervisor page) and `more`.
    fn teardown_observed(
        &mut self,
        vm: VmHandle,
        t: TeardownProgress,
        obs: &mut dyn Observe,
    ) -> Result<(), Mismatch> {
        let Some(i) = self.vms.iter().position(|v| v.handle == vm) else {
            return Err(Mismatch("teardown of an unknown VM".into()));
        };
        let v = self.vms[i].clone();
        let mut done = 0u64;
        let mut counts = v.counts;
        let mut map = v.map.clone();
        for (&g, m) in &v.map {
            if obs.guest_page(vm, g) != Ok(GuestPage::Unmapped) {
                continue;
            }
            done += 1;
            map.remove(&g);
            if m.state == PageState::SharedBorrowed {
                self.unshare_one(m.pfn);
                counts.unshares += 1;
            } else {
                self.set_page(m.pfn, HOST_OWNED);
                self.zeroed.insert(m.pfn);
                counts.reclaims += 1;
            }
        }
        let mut hyp_pages = v.hyp_pages.clone();
        for &p in &v.hyp_pages {
            if obs.host_page(p).map(|h| h.owner) != Ok(Owner::Host) {
                continue;
            }
            if !map.is_empty() {
                return Err(Mismatch(format!(
                    "teardown returned {p:#x} before the guest pages"
                )));
            }
            done += 1;
            hyp_pages.remove(&p);
            self.set_page(p, HOST_OWNED);
            self.zeroed.insert(p);
        }
        if done != u64::from(t.reclaimed) {
            return Err(Mismatch(format!(
                "teardown reports {} page updates but {done} pages went back",
                t.reclaimed
            )));
        }
        let more = !map.is_empty() || !hyp_pages.is_empty();
        if t.more != more {
            return Err(Mismatch(format!(
                "teardown says more = {} but the VM still holds {} guest and {} memcache pages",
                t.more,
                map.len(),
                hyp_pages.len()
            )));
        }
        let w = &mut self.vms[i];
        w.blocks.retain(|b| map.contains_key(b));
        w.map = map;
        w.hyp_pages = hyp_pages;
        w.counts = counts;
        w.teardown_updates += done;
        w.drained = !more;
        Ok(())
    }

    /// `HYP_TEARDOWN_RECLAIM`: the model cannot say which pages a partial
    /// batch took, so it only sums the updates; when the hypervisor reports
    /// `more = 0`, every page must be back (§3.16) and the sum must equal the
    /// pages the VM held: guest pages, borrow mappings and memcache pages.
    fn teardown_reclaim(&mut self, vm: VmHandle, updates: u64, more: bool) -> Result<(), Mismatch> {
        let Some(i) = self.vms.iter().position(|v| v.handle == vm) else {
            return Err(Mismatch("teardown of an unknown VM".into()));
        };
        if self.vms[i].drained {
            if updates != 0 || more {
                return Err(Mismatch(format!(
                    "HYP_TEARDOWN_RECLAIM after more = 0 did {updates} updates (more = {more})"
                )));
            }
            return Ok(());
        }
        self.vms[i].teardown_updates += updates;
        if more {
            if updates == 0 {
                return Err(Mismatch(
                    "HYP_TEARDOWN_RECLAIM made no progress but says more".into(),
                ));
            }
            return Ok(());
        }
        let v = self.vms[i].clone();
        let expected = (v.map.len() + v.hyp_pages.len()) as u64;
        if v.teardown_updates != expected {
            return Err(Mismatch(format!(
                "teardown did {} page updates, the VM held {} guest pages and {} memcache pages",
                v.teardown_updates,
                v.map.len(),
                v.hyp_pages.len()
            )));
        }
        let mut counts = v.counts;
        for m in v.map.values() {
            match m.state {
                PageState::SharedBorrowed => {
                    self.unshare_one(m.pfn);
                    counts.unshares += 1;
                }
                _ => {
                    self.set_page(m.pfn, HOST_OWNED);
                    self.zeroed.insert(m.pfn);
                    counts.reclaims += 1;
                }
            }
        }
        for &p in &v.hyp_pages {
            self.set_page(p, HOST_OWNED);
            self.zeroed.insert(p);
        }
        let w = &mut self.vms[i];
        w.map.clear();
        w.blocks.clear();
        w.hyp_pages.clear();
        w.counts = counts;
        w.drained = true;
        Ok(())
    }
}

/// The `nr` frames from `first`.
fn frames(first: u64, nr: u32) -> core::ops::Range<u64> {
    first..first + u64::from(nr)
}

fn describe(p: Prediction) -> String {
    match p {
        Prediction::Fail(e) => format!("{e}"),
        Prediction::Succeed => "success".into(),
        Prediction::SucceedOr(e) => format!("success or {e}"),
    }
}

/// A call's outcome for messages.
#[must_use]
pub fn show(got: &Result<Reply, HypError>) -> String {
    match got {
        Ok(r) => format!("{r:?}"),
        Err(e) => match e.c_name() {
            Some(n) => n.into(),
            None => format!("{e:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercalls::{Gfn, IpaBits, PageCount, Pfn, VcpuCount, VcpuIndex};

    /// Host RAM frames of the test host's machine; the hypervisor owns
    /// the 32 MiB below.
    const RAM: (u64, u64) = (0x4_2000, 0xc_0000);

    fn model() -> Model {
        Model::new(Config::new((0x4_0000, 0x4_2000)), &[RAM])
    }

    fn vm_create(m: &mut Model, root: u64) -> VmHandle {
        let h = VmHandle::new(1, 1 + m.stale.len() as u16).unwrap();
        let call = Hypercall::VmCreate {
            ipa_bits: IpaBits::new(40).unwrap(),
            nr_vcpus: VcpuCount::new(2).unwrap(),
            root: Pfn::new(root).unwrap(),
            memory: None,
        };
        m.step(&call, &Ok(Reply::VmCreated { vm: h })).unwrap();
        h
    }

    fn share(vm: VmHandle, pfn: u64, gfn: u64, nr: u32) -> Hypercall {
        Hypercall::Share {
            vm,
            pfn: Pfn::new(pfn).unwrap(),
            gfn: Gfn::new(gfn).unwrap(),
            nr: PageCount::new(nr).unwrap(),
            prot: Prot::RW,
        }
    }

    fn topup(vm: VmHandle, pfn: u64, nr: u32) -> Hypercall {
        Hypercall::MemcacheTopup {
            vm,
            pfn: Pfn::new(pfn).unwrap(),
            nr: PageCount::new(nr).unwrap(),
        }
    }

    #[test]
    fn hyp_memory_is_hyp_owned_and_mmio_is_not_ram() {
        let m = model();
        assert_eq!(m.host_page(0x40000).unwrap().owner, Owner::Hyp);
        assert_eq!(m.host_page(0x42000), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x9000), Err(HypError::OutOfRange));
        assert_eq!(m.host_page(0xc0000), Err(HypError::OutOfRange));
    }

    #[test]
    fn share_needs_memory_then_counts_and_unshares() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        assert_eq!(m.host_page(0x80000).unwrap().owner, Owner::Hyp);
        // Empty memcache: only ENOMEM is right, and nothing changes.
        assert_eq!(
            m.predict(&share(vm, 0x80100, 0x10, 1)),
            Prediction::Fail(ErrSet::one(HypError::NoMemory))
        );
        assert!(m
            .step(&share(vm, 0x80100, 0x10, 1), &Ok(Reply::Done))
            .is_err());
        m.step(&topup(vm, 0x80200, 16), &Ok(Reply::Done)).unwrap();
        m.step(&share(vm, 0x80100, 0x10, 1), &Ok(Reply::Done))
            .unwrap();
        m.step(&share(vm, 0x80100, 0x11, 1), &Ok(Reply::Done))
            .unwrap();
        let h = m.host_page(0x80100).unwrap();
        assert_eq!((h.state, h.share_count), (OwnerState::SharedOwned, 2));
        // Double share of the same gfn: EEXIST; unshare of a wrong pfn: EACCES.
        m.step(&share(vm, 0x80101, 0x10, 1), &Err(HypError::Exists))
            .unwrap();
        let unshare = |pfn, gfn| Hypercall::Unshare {
            vm,
            pfn: Pfn::new(pfn).unwrap(),
            gfn: Gfn::new(gfn).unwrap(),
            nr: PageCount::ONE,
        };
        assert_eq!(
            m.predict(&unshare(0x80101, 0x10)),
            Prediction::Fail(ErrSet::one(HypError::Denied))
        );
        m.step(&unshare(0x80100, 0x10), &Ok(Reply::Done)).unwrap();
        m.step(&unshare(0x80100, 0x11), &Ok(Reply::Done)).unwrap();
        assert_eq!(m.host_page(0x80100), Ok(HOST_OWNED));
        assert_eq!(
            m.predict(&unshare(0x80100, 0x11)),
            Prediction::Fail(ErrSet::one(HypError::Denied)),
            "the host side is checked first (§2.4)"
        );
    }

    #[test]
    fn error_order_vm_then_lifecycle_then_range() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        let ghost = VmHandle::new(9, 9).unwrap();
        assert_eq!(
            m.predict(&share(ghost, 0x9000, 0x10, 1)),
            Prediction::Fail(ErrSet::one(HypError::NoEntry))
        );
        assert_eq!(
            m.predict(&share(vm, 0x9000, 0x10, 1)),
            Prediction::Fail(ErrSet::one(HypError::OutOfRange))
        );
        m.step(&Hypercall::TeardownStart { vm }, &Ok(Reply::Done))
            .unwrap();
        assert_eq!(
            m.predict(&share(vm, 0x9000, 0x10, 1)),
            Prediction::Fail(ErrSet::one(HypError::Busy))
        );
    }

    #[test]
    fn teardown_returns_everything_and_counts_updates() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        m.step(&topup(vm, 0x80200, 16), &Ok(Reply::Done)).unwrap();
        m.step(&share(vm, 0x80100, 0x10, 2), &Ok(Reply::Done))
            .unwrap();
        let donate = Hypercall::Donate {
            vm,
            pfn: Pfn::new(0x80300).unwrap(),
            gfn: Gfn::new(0x20).unwrap(),
            nr: PageCount::ONE,
            prot: Prot::R,
        };
        m.step(&donate, &Ok(Reply::Done)).unwrap();
        assert_eq!(m.host_page(0x80300).unwrap().owner, Owner::Vm(vm));
        let fin = Hypercall::TeardownFinalize { vm };
        m.step(&Hypercall::TeardownStart { vm }, &Ok(Reply::Done))
            .unwrap();
        m.step(&fin, &Err(HypError::Busy)).unwrap();
        let rec = Hypercall::TeardownReclaim { vm };
        let batch = |reclaimed, more| Ok(Reply::Teardown(TeardownProgress { reclaimed, more }));
        m.step(&rec, &batch(10, true)).unwrap();
        // 3 guest pages + 16 memcache pages = 19 updates in all.
        assert!(m.clone().step(&rec, &batch(8, false)).is_err());
        m.step(&rec, &batch(9, false)).unwrap();
        assert_eq!(m.host_page(0x80100), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x80300), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x80200), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x80000).unwrap().owner, Owner::Hyp);
        let z = m.take_zeroed();
        assert!(z.contains(&0x80300) && z.contains(&0x80200) && !z.contains(&0x80100));
        m.step(&fin, &Ok(Reply::Done)).unwrap();
        assert_eq!(m.host_page(0x80000), Ok(HOST_OWNED));
        assert!(m.is_stale(vm));
        assert_eq!(
            m.guest_page(vm, 0x10),
            Err(HypError::NoEntry),
            "stale handle"
        );
    }

    #[test]
    fn page_errors_host_side_first_then_guest_side() {
        let e = page_errors(
            [
                (None, Some(HypError::Exists)),
                (Some(HypError::Denied), None),
            ]
            .into_iter(),
        );
        assert_eq!(e, ErrSet::one(HypError::Denied));
        let e = page_errors([(None, None), (None, Some(HypError::NoEntry))].into_iter());
        assert_eq!(e, ErrSet::one(HypError::NoEntry));
    }

    #[test]
    fn mismatch_leaves_the_model_unchanged() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        let before = m.host_page(0x80200);
        assert!(m
            .step(&topup(vm, 0x80200, 1), &Err(HypError::Denied))
            .is_err());
        assert_eq!(m.host_page(0x80200), before);
        assert_eq!(m.vm(vm).unwrap().hyp_pages.len(), 0);
    }

    #[test]
    fn pinned_choices_make_the_prediction_exact() {
        let config = Config {
            max_vms: Some(1),
            share_limit: 1,
            exact_young: true,
            ..Config::new((0x4_0000, 0x4_2000))
        };
        let mut m = Model::new(config, &[RAM]);
        let vm = vm_create(&mut m, 0x80000);
        let second = Hypercall::VmCreate {
            ipa_bits: IpaBits::new(40).unwrap(),
            nr_vcpus: VcpuCount::new(2).unwrap(),
            root: Pfn::new(0x80010).unwrap(),
            memory: None,
        };
        assert_eq!(
            m.predict(&second),
            Prediction::Fail(ErrSet::one(HypError::NoSpace))
        );
        m.step(&topup(vm, 0x80200, 16), &Ok(Reply::Done)).unwrap();
        m.step(&share(vm, 0x80100, 0x10, 1), &Ok(Reply::Done))
            .unwrap();
        assert_eq!(
            m.predict(&share(vm, 0x80100, 0x11, 1)),
            Prediction::Fail(ErrSet::one(HypError::OutOfRange)),
            "share limit 1"
        );
        let young = Hypercall::TestClearYoung {
            vm,
            gfn: Gfn::new(0x10).unwrap(),
            nr: PageCount::ONE,
        };
        assert!(m
            .clone()
            .step(&young, &Ok(Reply::Young { young: false }))
            .is_err());
        m.step(&young, &Ok(Reply::Young { young: true })).unwrap();
        m.step(&young, &Ok(Reply::Young { young: false })).unwrap();
        // Unknown slot use: any create may find no slot.
        let mut open = model();
        assert_eq!(
            open.predict(&second),
            Prediction::SucceedOr(ErrSet::one(HypError::NoSpace))
        );
        open.step(&second, &Err(HypError::NoSpace)).unwrap();
    }

    #[test]
    fn free_memcache_hint_decides_enomem() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        m.step(&topup(vm, 0x80200, 2), &Ok(Reply::Done)).unwrap();
        let call = share(vm, 0x80100, 0x10, 1);
        assert_eq!(
            m.predict(&call),
            Prediction::SucceedOr(ErrSet::one(HypError::NoMemory))
        );
        // 40 bits: a level-1 root, so a page needs at most a level-2 and a
        // level-3 table.
        m.note_free_memcache(vm, 2);
        assert_eq!(m.predict(&call), Prediction::Succeed);
        m.note_free_memcache(vm, 1);
        assert_eq!(
            m.predict(&call),
            Prediction::SucceedOr(ErrSet::one(HypError::NoMemory))
        );
        // A step forgets the hint.
        m.note_free_memcache(vm, 3);
        m.step(
            &Hypercall::Version,
            &Ok(Reply::Version(AbiVersion::CURRENT)),
        )
        .unwrap();
        assert_ne!(m.predict(&call), Prediction::Succeed);
        assert_eq!(tables_needed(48, 0x1ff, 2, false), 2 + 1 + 1);
        assert_eq!(tables_needed(48, (1 << 18) - 1, 2, false), 2 + 2 + 1);
        // A root at level 1 (40 bits) or 2 (32 bits) needs fewer levels; a
        // block no last-level table.
        assert_eq!(tables_needed(40, 0x1ff, 2, false), 2 + 1);
        assert_eq!(tables_needed(40, 0x200, 512, true), 1);
        assert_eq!(tables_needed(32, 0x200, 512, true), 0);
        assert_eq!(tables_needed(32, 0x200, 1, false), 1);
    }

    fn unshare(vm: VmHandle, pfn: u64, gfn: u64, nr: u32) -> Hypercall {
        Hypercall::Unshare {
            vm,
            pfn: Pfn::new(pfn).unwrap(),
            gfn: Gfn::new(gfn).unwrap(),
            nr: PageCount::new(nr).unwrap(),
        }
    }

    #[test]
    fn blocks_split_with_memory_only() {
        let mut m = model();
        // 32-bit IPA: a level-2 root, so a block share needs no table.
        let h = VmHandle::new(1, 1).unwrap();
        let create = Hypercall::VmCreate {
            ipa_bits: IpaBits::new(32).unwrap(),
            nr_vcpus: VcpuCount::new(1).unwrap(),
            root: Pfn::new(0x80000).unwrap(),
            memory: None,
        };
        m.step(&create, &Ok(Reply::VmCreated { vm: h })).unwrap();
        let block = share(h, 0x80200, 0x400, 512);
        assert_eq!(m.predict(&block), Prediction::Succeed);
        // Not aligned: pages, which need a table the empty memcache lacks.
        assert_eq!(
            m.predict(&share(h, 0x80201, 0x400, 511)),
            Prediction::Fail(ErrSet::one(HypError::NoMemory))
        );
        m.step(&block, &Ok(Reply::Done)).unwrap();
        assert!(m.vm(h).unwrap().blocks.contains(&0x400));
        // Part of the block: a split, and the memcache is empty.
        let part = unshare(h, 0x80200, 0x400, 1);
        let nomem = Prediction::Fail(ErrSet::one(HypError::NoMemory));
        assert_eq!(m.predict(&part), nomem);
        let wp = Hypercall::WrProtect {
            vm: h,
            gfn: Gfn::new(0x5ff).unwrap(),
            nr: PageCount::new(2).unwrap(),
        };
        assert_eq!(m.predict(&wp), nomem);
        let relax = Hypercall::RelaxPerms {
            vm: h,
            gfn: Gfn::new(0x410).unwrap(),
            prot: Prot::X,
        };
        assert_eq!(m.predict(&relax), nomem);
        // Adding what is there changes nothing: no split.
        let same = Hypercall::RelaxPerms {
            vm: h,
            gfn: Gfn::new(0x410).unwrap(),
            prot: Prot::W,
        };
        assert_eq!(m.predict(&same), Prediction::Succeed);
        // The whole block: no memory.
        let whole = Hypercall::WrProtect {
            vm: h,
            gfn: Gfn::new(0x400).unwrap(),
            nr: PageCount::new(512).unwrap(),
        };
        assert_eq!(m.predict(&whole), Prediction::Succeed);
        m.step(&whole, &Ok(Reply::WrProtected { pages: 512 }))
            .unwrap();
        // Read-only now: a partial write-protect changes nothing, no split.
        assert_eq!(m.predict(&wp), Prediction::Succeed);
        assert_eq!(
            m.predict(&unshare(h, 0x80200, 0x400, 512)),
            Prediction::Succeed
        );
        // With memory the split happens and the block is gone.
        m.step(&topup(h, 0x80400, 2), &Ok(Reply::Done)).unwrap();
        m.note_free_memcache(h, 2);
        assert_eq!(m.predict(&part), Prediction::Succeed);
        m.step(&part, &Ok(Reply::Done)).unwrap();
        assert!(m.vm(h).unwrap().blocks.is_empty());
        assert_eq!(m.vm(h).unwrap().map.len(), 511);
    }

    #[test]
    fn unshare_range_takes_every_mapped_gfn_whatever_its_frame() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        m.step(&topup(vm, 0x80200, 4), &Ok(Reply::Done)).unwrap();
        // Three scattered frames at gfns 0x10, 0x11, 0x13 (0x12 a hole); one
        // frame shared twice.
        m.step(&share(vm, 0x80107, 0x10, 1), &Ok(Reply::Done))
            .unwrap();
        m.step(&share(vm, 0x80101, 0x11, 1), &Ok(Reply::Done))
            .unwrap();
        m.step(&share(vm, 0x80107, 0x13, 1), &Ok(Reply::Done))
            .unwrap();
        let range = |gfn, nr| Hypercall::UnshareRange {
            vm,
            gfn: Gfn::new(gfn).unwrap(),
            nr: PageCount::new(nr).unwrap(),
        };
        assert_eq!(m.predict(&range(0x10, 4)), Prediction::Succeed);
        assert!(m
            .clone()
            .step(&range(0x10, 4), &Ok(Reply::Unshared { pages: 4 }))
            .is_err());
        // A donated page in the range: EACCES, nothing changes.
        let donate = Hypercall::Donate {
            vm,
            pfn: Pfn::new(0x80120).unwrap(),
            gfn: Gfn::new(0x14).unwrap(),
            nr: PageCount::new(1).unwrap(),
            prot: Prot::RW,
        };
        m.step(&donate, &Ok(Reply::Done)).unwrap();
        assert_eq!(
            m.predict(&range(0x10, 8)),
            Prediction::Fail(ErrSet::one(HypError::Denied))
        );
        assert_eq!(
            m.predict(&range((1 << 28) - 100, 512)),
            Prediction::Fail(ErrSet::one(HypError::OutOfRange))
        );
        m.step(&range(0x10, 4), &Ok(Reply::Unshared { pages: 3 }))
            .unwrap();
        assert_eq!(m.host_page(0x80107), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x80101), Ok(HOST_OWNED));
        assert_eq!(m.guest_page(vm, 0x13), Ok(GuestPage::Unmapped));
        assert_eq!(m.vm(vm).unwrap().counts.unshares, 3);
        // Nothing mapped: success with 0.
        m.step(&range(0x10, 4), &Ok(Reply::Unshared { pages: 0 }))
            .unwrap();
    }

    #[test]
    fn vcpu_created_off_stays_off_until_a_guest_ran() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        m.step(&topup(vm, 0x80200, 4), &Ok(Reply::Done)).unwrap();
        let create = |i, start| Hypercall::VcpuCreate {
            vm,
            vcpu: VcpuIndex::new(i).unwrap(),
            start,
        };
        let on = VcpuStart::On { entry: 0, arg: 0 };
        m.step(&create(0, on), &Ok(Reply::Done)).unwrap();
        m.step(&create(1, VcpuStart::Off), &Ok(Reply::Done))
            .unwrap();
        let run = |i| Hypercall::VcpuRun {
            vm,
            vcpu: VcpuIndex::new(i).unwrap(),
            mmio_data: 0,
        };
        let exit = |e| Ok(Reply::Exit(e));
        assert!(m
            .clone()
            .step(&run(1), &exit(VcpuExit::Interrupted))
            .is_err());
        m.step(&run(1), &exit(VcpuExit::PoweredOff)).unwrap();
        m.step(&run(0), &exit(VcpuExit::Interrupted)).unwrap();
        // vCPU 0's guest may have started vCPU 1 (PSCI CPU_ON).
        m.step(&run(1), &exit(VcpuExit::Interrupted)).unwrap();
    }

    /// Page states as a hypervisor would report them mid-teardown.
    struct Seen {
        unmapped: BTreeSet<u64>,
        returned: BTreeSet<u64>,
    }

    impl Observe for Seen {
        fn host_page(&mut self, pfn: u64) -> Result<HostPageInfo, HypError> {
            Ok(if self.returned.contains(&pfn) {
                HOST_OWNED
            } else {
                HYP_OWNED
            })
        }

        fn guest_page(&mut self, _: VmHandle, gfn: u64) -> Result<GuestPage, HypError> {
            if self.unmapped.contains(&gfn) {
                Ok(GuestPage::Unmapped)
            } else {
                Err(HypError::NoEntry)
            }
        }
    }

    #[test]
    fn observed_teardown_follows_each_batch() {
        let mut m = model();
        let vm = vm_create(&mut m, 0x80000);
        m.step(&topup(vm, 0x80200, 2), &Ok(Reply::Done)).unwrap();
        m.step(&share(vm, 0x80100, 0x10, 2), &Ok(Reply::Done))
            .unwrap();
        m.step(&Hypercall::TeardownStart { vm }, &Ok(Reply::Done))
            .unwrap();
        let rec = Hypercall::TeardownReclaim { vm };
        let batch = |reclaimed, more| Ok(Reply::Teardown(TeardownProgress { reclaimed, more }));
        let mut seen = Seen {
            unmapped: [0x10].into(),
            returned: BTreeSet::new(),
        };
        // One guest page back: the count must say 1 and more must be set.
        assert!(m
            .clone()
            .step_observed(&rec, &batch(2, true), &mut seen)
            .is_err());
        m.step_observed(&rec, &batch(1, true), &mut seen).unwrap();
        assert_eq!(m.guest_page(vm, 0x10), Ok(GuestPage::Unmapped));
        // A memcache page back while a guest page is still mapped: wrong.
        let mut early = Seen {
            unmapped: BTreeSet::new(),
            returned: [0x80200].into(),
        };
        assert!(m
            .clone()
            .step_observed(&rec, &batch(1, true), &mut early)
            .is_err());
        let mut rest = Seen {
            unmapped: [0x10, 0x11].into(),
            returned: [0x80200, 0x80201].into(),
        };
        m.step_observed(&rec, &batch(3, false), &mut rest).unwrap();
        assert!(m.vm(vm).unwrap().drained);
        assert_eq!(m.host_page(0x80201), Ok(HOST_OWNED));
    }
}
