//! A reference model of what the ABI promises (`docs/ABI.md`): per host
//! frame the owner, the owner's state and the share count (§2.5, §3.19); per
//! VM its lifecycle (§2.6), vCPUs, memcache pages (§2.7) and guest mappings
//! (§3.20); and the outcome every host call must have (§3, error order §2.4).
//!
//! [`Model::step`] predicts a call's outcome, compares it with what the
//! hypervisor answered and, on success, commits the transition. Where the ABI
//! leaves a choice to the implementation (which of two page-state errors on
//! different pages comes first, how many table pages a mapping needs once the
//! memcache is small, the access flag), the model accepts every allowed
//! answer and says so in a comment.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use hypercalls::{
    AbiVersion, CounterGroup, Counters, GuestPage, HostPageInfo, HypError, Hypercall, Owner,
    OwnerState, PageState, Prot, Reply, VmHandle, PFN_BITS,
};

/// First frame of the hypervisor's own memory, `[0x4000_0000, 0x4200_0000)`.
pub const HYP_FIRST_PFN: u64 = 0x4_0000;
/// First frame after the hypervisor's memory.
pub const HYP_END_PFN: u64 = 0x4_2000;

/// A memcache of at least this many pages is assumed to hold every table a
/// test mapping needs (tests map small windows: a few table pages at most).
pub const PLENTY: usize = 16;

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
    /// The call must succeed or fail with `HYP_ENOMEM` (memcache small but
    /// not empty: how many table pages a mapping needs is the hypervisor's).
    SucceedOrNoMem,
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
    /// Predictable counters.
    pub counts: PageCounts,
}

impl VmModel {
    fn gfn_limit(&self) -> u64 {
        1u64 << (self.ipa_bits - 12)
    }
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

/// Per-page errors of a range call: `host` from the frame's ownership,
/// `guest` from the guest frame. The ABI says the first page in range order
/// decides (§2.4) but not which side of one page is checked first; the
/// stage2 crate checks every host frame before any guest frame. The model
/// accepts the errors of the first failing page, plus the first host-side
/// error of the range.
fn page_errors(per_page: impl Iterator<Item = (Option<HypError>, Option<HypError>)>) -> ErrSet {
    let mut set = ErrSet::EMPTY;
    let mut first_page_done = false;
    let mut host_seen = false;
    for (host, guest) in per_page {
        if !first_page_done && (host.is_some() || guest.is_some()) {
            for e in [host, guest].into_iter().flatten() {
                set = set.with(e);
            }
            first_page_done = true;
        }
        if let (Some(h), false) = (host, host_seen) {
            set = set.with(h);
            host_seen = true;
        }
    }
    set
}

impl Model {
    /// A model of a fresh hypervisor whose host RAM is `ram` (byte ranges
    /// `[base, end)` from the host's device tree). The hypervisor's own
    /// range is RAM owned by Hyp (§2.5: every frame of RAM has an owner).
    #[must_use]
    pub fn new(ram: &[(u64, u64)]) -> Self {
        Self {
            ram: ram.iter().map(|&(b, e)| (b >> 12, e >> 12)).collect(),
            pages: BTreeMap::new(),
            vms: Vec::new(),
            stale: Vec::new(),
            zeroed: BTreeSet::new(),
        }
    }

    /// Whether `pfn` is RAM (host RAM or the hypervisor's).
    #[must_use]
    pub fn is_ram(&self, pfn: u64) -> bool {
        (HYP_FIRST_PFN..HYP_END_PFN).contains(&pfn)
            || self.ram.iter().any(|&(s, e)| (s..e).contains(&pfn))
    }

    /// The state `HYP_HOST_PAGE_STATE` must report for `pfn`.
    pub fn host_page(&self, pfn: u64) -> Result<HostPageInfo, HypError> {
        if !self.is_ram(pfn) {
            return Err(HypError::OutOfRange);
        }
        Ok(self.pages.get(&pfn).copied().unwrap_or(
            if (HYP_FIRST_PFN..HYP_END_PFN).contains(&pfn) {
                HYP_OWNED
            } else {
                HOST_OWNED
            },
        ))
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
        if info == HOST_OWNED && !(HYP_FIRST_PFN..HYP_END_PFN).contains(&pfn) {
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
        match self.predict_inner(call) {
            Ok(p) => p,
            Err(e) => Prediction::Fail(ErrSet::one(e)),
        }
    }

    fn memory(v: &VmModel) -> Prediction {
        if v.hyp_pages.is_empty() {
            Prediction::Fail(ErrSet::one(HypError::NoMemory))
        } else if v.hyp_pages.len() < PLENTY {
            Prediction::SucceedOrNoMem
        } else {
            Prediction::Succeed
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
                Self::memory(v)
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
            } => {
                let v = self.live_vm(vm)?;
                let (pfn, gfn, nr) = (pfn.raw(), gfn.raw(), u64::from(nr.get()));
                if !self.pfn_range_ok(pfn, nr) || gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                let errs = page_errors((0..nr).map(|i| {
                    let h = self.host_page(pfn + i).ok();
                    let host_ok = h.is_some_and(|h| h.owner == Owner::Host);
                    (
                        (!host_ok).then_some(HypError::Denied),
                        v.map.contains_key(&(gfn + i)).then_some(HypError::Exists),
                    )
                }));
                if !errs.is_empty() {
                    return Ok(Fail(errs));
                }
                Self::memory(v)
            }
            Hypercall::Unshare { vm, pfn, gfn, nr } => {
                let v = self.live_vm(vm)?;
                let (pfn, gfn, nr) = (pfn.raw(), gfn.raw(), u64::from(nr.get()));
                if !self.pfn_range_ok(pfn, nr) || gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                let errs = page_errors((0..nr).map(|i| {
                    let h = self.host_page(pfn + i).ok();
                    let host_ok = h.is_some_and(|h| {
                        h.owner == Owner::Host && h.state == OwnerState::SharedOwned
                    });
                    let guest = match v.map.get(&(gfn + i)) {
                        None => Some(HypError::NoEntry),
                        Some(m) if m.pfn != pfn + i || m.state != PageState::SharedBorrowed => {
                            Some(HypError::Denied)
                        }
                        Some(_) => None,
                    };
                    ((!host_ok).then_some(HypError::Denied), guest)
                }));
                if !errs.is_empty() {
                    return Ok(Fail(errs));
                }
                // Unmapping pages needs no tables (no blocks: tests map pages).
                Succeed
            }
            Hypercall::Donate {
                vm, pfn, gfn, nr, ..
            } => {
                let v = self.live_vm(vm)?;
                let (pfn, gfn, nr) = (pfn.raw(), gfn.raw(), u64::from(nr.get()));
                if !self.pfn_range_ok(pfn, nr) || gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                let errs = page_errors((0..nr).map(|i| {
                    (
                        (!self.host_owned_exclusive(pfn + i)).then_some(HypError::Denied),
                        v.map.contains_key(&(gfn + i)).then_some(HypError::Exists),
                    )
                }));
                if !errs.is_empty() {
                    return Ok(Fail(errs));
                }
                Self::memory(v)
            }
            Hypercall::Reclaim { vm, pfn, gfn, nr } => {
                let v = self.live_vm(vm)?;
                let (pfn, gfn, nr) = (pfn.raw(), gfn.raw(), u64::from(nr.get()));
                if !self.pfn_range_ok(pfn, nr) || gfn + nr > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                let errs = page_errors((0..nr).map(|i| {
                    let h = self.host_page(pfn + i).ok();
                    let host_ok = h.is_some_and(|h| h.owner == Owner::Vm(vm));
                    let guest = match v.map.get(&(gfn + i)) {
                        None => Some(HypError::NoEntry),
                        Some(m) if m.pfn != pfn + i || m.state != PageState::Owned => {
                            Some(HypError::Denied)
                        }
                        Some(_) => None,
                    };
                    ((!host_ok).then_some(HypError::Denied), guest)
                }));
                if !errs.is_empty() {
                    return Ok(Fail(errs));
                }
                Succeed
            }
            Hypercall::WrProtect { vm, gfn, nr } | Hypercall::TestClearYoung { vm, gfn, nr } => {
                let v = self.live_vm(vm)?;
                if gfn.raw() + u64::from(nr.get()) > v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                Succeed
            }
            Hypercall::RelaxPerms { vm, gfn, .. } => {
                let v = self.live_vm(vm)?;
                if gfn.raw() >= v.gfn_limit() {
                    return Err(HypError::OutOfRange);
                }
                if !v.map.contains_key(&gfn.raw()) {
                    return Err(HypError::NoEntry);
                }
                Succeed
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

    /// Checks the hypervisor's answer `got` to `call` against the model and,
    /// if it succeeded, commits the transition. On a mismatch the model is
    /// left as it was.
    pub fn step(
        &mut self,
        call: &Hypercall,
        got: &Result<Reply, HypError>,
    ) -> Result<(), Mismatch> {
        let pred = self.predict(call);
        match (pred, got) {
            (Prediction::Fail(errs), Err(e)) if errs.contains(*e) => Ok(()),
            (Prediction::SucceedOrNoMem, Err(HypError::NoMemory)) => Ok(()),
            (Prediction::Succeed | Prediction::SucceedOrNoMem, Ok(reply)) => {
                let mut next = self.clone();
                next.commit(call, reply)?;
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
    fn commit(&mut self, call: &Hypercall, reply: &Reply) -> Result<(), Mismatch> {
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
                    dying: false,
                    drained: false,
                    teardown_updates: 0,
                    root: (root.raw(), n),
                    hyp_pages: BTreeSet::new(),
                    used_memcache: false,
                    map: BTreeMap::new(),
                    counts: PageCounts::default(),
                });
            }
            (Hypercall::VcpuCreate { vm, vcpu, .. }, Reply::Done) => {
                if let Some(v) = self.vm_mut(vm) {
                    v.vcpus |= 1 << vcpu.get();
                    v.used_memcache = true;
                }
            }
            (Hypercall::VcpuRun { .. }, Reply::Exit(_)) => {}
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
                for i in 0..u64::from(nr.get()) {
                    let mut h = self.host_page(pfn.raw() + i).unwrap_or(HOST_OWNED);
                    h.state = OwnerState::SharedOwned;
                    h.share_count += 1;
                    self.set_page(pfn.raw() + i, h);
                }
                if let Some(v) = self.vm_mut(vm) {
                    for i in 0..u64::from(nr.get()) {
                        v.map.insert(
                            gfn.raw() + i,
                            Mapping {
                                state: PageState::SharedBorrowed,
                                pfn: pfn.raw() + i,
                                prot,
                            },
                        );
                    }
                    v.used_memcache = true;
                    v.counts.shares += u64::from(nr.get());
                }
            }
            (Hypercall::Unshare { vm, pfn, gfn, nr }, Reply::Done) => {
                for i in 0..u64::from(nr.get()) {
                    self.unshare_one(pfn.raw() + i);
                }
                if let Some(v) = self.vm_mut(vm) {
                    for i in 0..u64::from(nr.get()) {
                        v.map.remove(&(gfn.raw() + i));
                    }
                    v.counts.unshares += u64::from(nr.get());
                }
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
                for i in 0..u64::from(nr.get()) {
                    self.set_page(
                        pfn.raw() + i,
                        HostPageInfo {
                            owner: Owner::Vm(vm),
                            state: OwnerState::Owned,
                            share_count: 0,
                        },
                    );
                }
                if let Some(v) = self.vm_mut(vm) {
                    for i in 0..u64::from(nr.get()) {
                        v.map.insert(
                            gfn.raw() + i,
                            Mapping {
                                state: PageState::Owned,
                                pfn: pfn.raw() + i,
                                prot,
                            },
                        );
                    }
                    v.used_memcache = true;
                    v.counts.donations += u64::from(nr.get());
                }
            }
            (Hypercall::Reclaim { vm, pfn, gfn, nr }, Reply::Done) => {
                for i in 0..u64::from(nr.get()) {
                    self.set_page(pfn.raw() + i, HOST_OWNED);
                    self.zeroed.insert(pfn.raw() + i);
                }
                if let Some(v) = self.vm_mut(vm) {
                    for i in 0..u64::from(nr.get()) {
                        v.map.remove(&(gfn.raw() + i));
                    }
                    v.counts.reclaims += u64::from(nr.get());
                }
            }
            (Hypercall::WrProtect { vm, gfn, nr }, Reply::WrProtected { pages }) => {
                let Some(v) = self.vm_mut(vm) else {
                    return bad("no such VM");
                };
                let mut changed = 0;
                for (_, m) in v.map.range_mut(gfn.raw()..gfn.raw() + u64::from(nr.get())) {
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
                if let Some(m) = self.vm_mut(vm).and_then(|v| v.map.get_mut(&gfn.raw())) {
                    m.prot = m.prot | prot;
                }
            }
            (Hypercall::TestClearYoung { .. }, Reply::Young { .. }) => {
                // The access flag is the hypervisor's (as in KVM, mappings
                // may be created young); either answer is allowed.
            }
            (Hypercall::TeardownStart { vm }, Reply::Done) => {
                if let Some(v) = self.vm_mut(vm) {
                    v.dying = true;
                }
            }
            (Hypercall::TeardownReclaim { vm }, Reply::Teardown(t)) => {
                self.teardown_reclaim(vm, u64::from(t.reclaimed), t.more)?;
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
                        if r.faults != 0 || r.vcpu_runs != 0 {
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

    fn unshare_one(&mut self, pfn: u64) {
        let mut h = self.host_page(pfn).unwrap_or(HOST_OWNED);
        h.share_count = h.share_count.saturating_sub(1);
        if h.share_count == 0 {
            h.state = OwnerState::Owned;
        }
        self.set_page(pfn, h);
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
        w.hyp_pages.clear();
        w.counts = counts;
        w.drained = true;
        Ok(())
    }
}

fn describe(p: Prediction) -> String {
    match p {
        Prediction::Fail(e) => format!("{e}"),
        Prediction::Succeed => "success".into(),
        Prediction::SucceedOrNoMem => "success or HYP_ENOMEM".into(),
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
    use hypercalls::{Gfn, IpaBits, PageCount, Pfn, TeardownProgress, VcpuCount};

    const RAM: (u64, u64) = (0x4200_0000, 0xc000_0000);

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
        let m = Model::new(&[RAM]);
        assert_eq!(m.host_page(0x40000).unwrap().owner, Owner::Hyp);
        assert_eq!(m.host_page(0x42000), Ok(HOST_OWNED));
        assert_eq!(m.host_page(0x9000), Err(HypError::OutOfRange));
        assert_eq!(m.host_page(0xc0000), Err(HypError::OutOfRange));
    }

    #[test]
    fn share_needs_memory_then_counts_and_unshares() {
        let mut m = Model::new(&[RAM]);
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
            Prediction::Fail(ErrSet::one(HypError::NoEntry).with(HypError::Denied))
        );
    }

    #[test]
    fn error_order_vm_then_lifecycle_then_range() {
        let mut m = Model::new(&[RAM]);
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
        let mut m = Model::new(&[RAM]);
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
    fn page_errors_accept_first_page_and_host_first() {
        let e = page_errors(
            [
                (None, Some(HypError::Exists)),
                (Some(HypError::Denied), None),
            ]
            .into_iter(),
        );
        assert!(e.contains(HypError::Exists) && e.contains(HypError::Denied));
        let e = page_errors([(None, None), (None, Some(HypError::NoEntry))].into_iter());
        assert_eq!(e, ErrSet::one(HypError::NoEntry));
    }

    #[test]
    fn mismatch_leaves_the_model_unchanged() {
        let mut m = Model::new(&[RAM]);
        let vm = vm_create(&mut m, 0x80000);
        let before = m.host_page(0x80200);
        assert!(m
            .step(&topup(vm, 0x80200, 1), &Err(HypError::Denied))
            .is_err());
        assert_eq!(m.host_page(0x80200), before);
        assert_eq!(m.vm(vm).unwrap().hyp_pages.len(), 0);
    }
}
