//! Shared test world and reference model for the ownership tests.
//!
//! The model is deliberately plain: `BTreeMap`s of who owns what and what
//! each guest maps, with the transitions written out directly from the state
//! machine in the design notes, checks in the documented order.

#![allow(dead_code)]

use std::collections::BTreeMap;

use stage2::mm::ArenaMemory;
use stage2::owner::{Error, Owner, PageTracker, VmId};
use stage2::pgtable::{Granule, Leaf, PageState, Perms, Stage2};
use stage2::tlb::RecordingTlb;
use stage2::transition::{self, PageRange, Teardown, TeardownStep, HOST_RAM_ATTRS};
use stage2::{Gfn, Ipa, Pfn, Vmid, PAGE_SHIFT};

/// First page frame of RAM (1 GiB).
pub const RAM_BASE: u64 = 0x40000;
/// Pages of RAM: 256 KiB, so the host's identity map is one level-3 table.
pub const RAM_PAGES: u64 = 64;
/// Host IPA size.
pub const HOST_IPA_BITS: u8 = 40;
/// Guest IPA size.
pub const GUEST_IPA_BITS: u8 = 32;
/// Number of guest frames in a guest IPA space.
pub const GUEST_GFNS: u64 = 1 << (GUEST_IPA_BITS as u32 - PAGE_SHIFT);
/// What a VM writes into pages it owns (a secret the host must never see).
pub const VM_SECRET: u8 = 0x5a;
/// What the hypervisor writes into its pages.
pub const HYP_SECRET: u8 = 0xb7;

pub type S2 = Stage2<ArenaMemory, RecordingTlb>;

pub fn pfn(i: u64) -> Pfn {
    Pfn(RAM_BASE + i)
}

pub fn vm_id(vm: usize) -> VmId {
    VmId(vm as u16 + 1)
}

/// Every leaf of a table.
pub fn leaves(s2: &S2) -> Vec<Leaf> {
    let size = 1u64 << s2.config().ipa_bits;
    let mut v = Vec::new();
    s2.walk(Ipa(0), size, |l| v.push(*l)).unwrap();
    v
}

/// Page-granular view of a guest table: gfn -> (pfn, state, perms).
pub fn guest_pages(s2: &S2) -> BTreeMap<u64, (u64, PageState, Perms)> {
    let mut m = BTreeMap::new();
    for l in leaves(s2) {
        for i in 0..l.size >> PAGE_SHIFT {
            m.insert(
                l.ipa.gfn().raw() + i,
                (l.hpa.pfn().raw() + i, l.attrs.state, l.attrs.perms),
            );
        }
    }
    m
}

/// Page-granular view of the host table: pfn -> attrs, checking identity.
pub fn host_pages(s2: &S2) -> BTreeMap<u64, stage2::pgtable::Attrs> {
    let mut m = BTreeMap::new();
    for l in leaves(s2) {
        assert_eq!(l.ipa.raw(), l.hpa.raw(), "host map is not identity: {l:?}");
        for i in 0..l.size >> PAGE_SHIFT {
            m.insert(l.ipa.gfn().raw() + i, l.attrs);
        }
    }
    m
}

/// The real thing: tracker, host stage-2, guests, simulated page contents.
#[derive(Debug)]
pub struct World {
    pub tracker: PageTracker,
    pub host: S2,
    pub guests: Vec<S2>,
    /// One byte standing for each RAM page's contents.
    pub data: Vec<u8>,
    /// Every page passed to a zeroing hook, in order.
    pub zeroed: Vec<Pfn>,
}

/// Everything observable about a world, to compare before/after a call.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub tracker: PageTracker,
    pub host: Vec<Leaf>,
    pub guests: Vec<Vec<Leaf>>,
    pub data: Vec<u8>,
    pub zeroed: usize,
    pub live: Vec<usize>,
}

impl World {
    pub fn new(nr_vms: usize, share_limit: u32) -> Self {
        let tracker = PageTracker::with_share_limit(Pfn(RAM_BASE), RAM_PAGES, share_limit).unwrap();
        let mut host = Stage2::new(
            HOST_IPA_BITS,
            Vmid(0),
            ArenaMemory::new(),
            RecordingTlb::new(),
        )
        .unwrap();
        let ram = Ipa(RAM_BASE << PAGE_SHIFT);
        host.map(
            ram,
            Pfn(RAM_BASE).hpa().unwrap(),
            RAM_PAGES << PAGE_SHIFT,
            HOST_RAM_ATTRS,
            Granule::Largest,
        )
        .unwrap();
        let guests = (0..nr_vms)
            .map(|i| {
                Stage2::new(
                    GUEST_IPA_BITS,
                    Vmid(i as u16 + 1),
                    ArenaMemory::new(),
                    RecordingTlb::new(),
                )
                .unwrap()
            })
            .collect();
        Self {
            tracker,
            host,
            guests,
            data: vec![0; RAM_PAGES as usize],
            zeroed: Vec::new(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            tracker: self.tracker.clone(),
            host: leaves(&self.host),
            guests: self.guests.iter().map(leaves).collect(),
            data: self.data.clone(),
            zeroed: self.zeroed.len(),
            live: std::iter::once(&self.host)
                .chain(&self.guests)
                .map(|s| s.mm().live())
                .collect(),
        }
    }

    fn fill(&mut self, p: u64, nr: u64, byte: u8) {
        for i in 0..nr {
            self.data[(p + i - RAM_BASE) as usize] = byte;
        }
    }

    pub fn share(
        &mut self,
        vm: usize,
        p: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    ) -> Result<(), Error> {
        let r = PageRange::new(Pfn(p), Gfn(gfn), nr);
        transition::share(&mut self.tracker, &mut self.guests[vm], r, perms)
    }

    pub fn unshare(&mut self, vm: usize, p: u64, gfn: u64, nr: u64) -> Result<(), Error> {
        let r = PageRange::new(Pfn(p), Gfn(gfn), nr);
        transition::unshare(&mut self.tracker, &mut self.guests[vm], r)
    }

    pub fn donate(
        &mut self,
        vm: usize,
        p: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    ) -> Result<(), Error> {
        let r = PageRange::new(Pfn(p), Gfn(gfn), nr);
        let res = transition::donate(
            &mut self.tracker,
            &mut self.host,
            vm_id(vm),
            &mut self.guests[vm],
            r,
            perms,
        );
        if res.is_ok() {
            // The VM writes its secrets into its new pages.
            self.fill(p, nr, VM_SECRET);
        }
        res
    }

    pub fn reclaim(&mut self, vm: usize, p: u64, gfn: u64, nr: u64) -> Result<(), Error> {
        let r = PageRange::new(Pfn(p), Gfn(gfn), nr);
        let (data, zeroed) = (&mut self.data, &mut self.zeroed);
        transition::reclaim(
            &mut self.tracker,
            &mut self.host,
            vm_id(vm),
            &mut self.guests[vm],
            r,
            |q| {
                data[(q.raw() - RAM_BASE) as usize] = 0;
                zeroed.push(q);
            },
        )
    }

    pub fn donate_to_hyp(&mut self, p: u64, nr: u64) -> Result<(), Error> {
        let res = transition::donate_to_hyp(&mut self.tracker, &mut self.host, Pfn(p), nr);
        if res.is_ok() {
            self.fill(p, nr, HYP_SECRET);
        }
        res
    }

    pub fn return_from_hyp(&mut self, p: u64, nr: u64) -> Result<(), Error> {
        let (data, zeroed) = (&mut self.data, &mut self.zeroed);
        transition::return_from_hyp(&mut self.tracker, &mut self.host, Pfn(p), nr, |q| {
            data[(q.raw() - RAM_BASE) as usize] = 0;
            zeroed.push(q);
        })
    }

    pub fn teardown_step(
        &mut self,
        td: &mut Teardown,
        vm: usize,
        max_pages: u64,
    ) -> Result<TeardownStep, Error> {
        let (data, zeroed) = (&mut self.data, &mut self.zeroed);
        td.step(
            &mut self.tracker,
            &mut self.host,
            &mut self.guests[vm],
            max_pages,
            |q| {
                data[(q.raw() - RAM_BASE) as usize] = 0;
                zeroed.push(q);
            },
        )
    }

    /// Checks the state-machine invariants on the real structures alone.
    pub fn check_invariants(&self) {
        let host = host_pages(&self.host);
        let guests: Vec<_> = self.guests.iter().map(guest_pages).collect();
        for (p, info) in self.tracker.iter() {
            let p = p.raw();
            let mut owned_by = Vec::new();
            let mut borrows = 0u32;
            for (vm, g) in guests.iter().enumerate() {
                for &(q, state, _) in g.values() {
                    if q != p {
                        continue;
                    }
                    match state {
                        PageState::Owned => owned_by.push(vm),
                        PageState::SharedBorrowed => borrows += 1,
                        PageState::SharedOwned => panic!("guest maps {p:#x} SharedOwned"),
                    }
                }
            }
            let host_maps = host.contains_key(&p);
            // No page is mapped by two exclusive owners, and an exclusively
            // owned page is mapped by nobody else.
            assert!(
                owned_by.len() <= 1,
                "pfn {p:#x} owned in several guests: {owned_by:?}"
            );
            if let Some(&vm) = owned_by.first() {
                assert_eq!(info.owner, Owner::Vm(vm_id(vm)), "pfn {p:#x}");
                assert!(!host_maps, "host maps VM page {p:#x}");
                assert_eq!(borrows, 0, "VM page {p:#x} borrowed");
            }
            // The host maps exactly the pages it owns (its map is eager).
            assert_eq!(
                host_maps,
                info.owner == Owner::Host,
                "pfn {p:#x} owner {:?}",
                info.owner
            );
            if let Some(a) = host.get(&p) {
                assert_eq!(*a, HOST_RAM_ATTRS);
            }
            // Share counts are exact; only host pages are shared.
            assert_eq!(info.shares, borrows, "share count of {p:#x}");
            if info.owner != Owner::Host {
                assert_eq!(info.shares, 0);
            }
            // VM-owned pages are mapped in their VM (donations always map).
            if let Owner::Vm(id) = info.owner {
                assert_eq!(owned_by.len(), 1, "VM page {p:#x} not mapped");
                assert_eq!(vm_id(owned_by[0]), id);
            }
            // The host never holds a VM's or the hypervisor's data.
            if info.owner == Owner::Host {
                let d = self.data[(p - RAM_BASE) as usize];
                assert!(
                    d != VM_SECRET && d != HYP_SECRET,
                    "host page {p:#x} holds {d:#x}"
                );
            }
        }
    }
}

/// The reference model.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// pfn -> (owner, share count), for RAM pages.
    pub pages: BTreeMap<u64, (Owner, u32)>,
    /// Per VM: gfn -> (pfn, state, perms).
    pub guests: Vec<BTreeMap<u64, (u64, PageState, Perms)>>,
    pub share_limit: u32,
}

impl Model {
    pub fn new(nr_vms: usize, share_limit: u32) -> Self {
        Self {
            pages: (RAM_BASE..RAM_BASE + RAM_PAGES)
                .map(|p| (p, (Owner::Host, 0)))
                .collect(),
            guests: vec![BTreeMap::new(); nr_vms],
            share_limit,
        }
    }

    fn range(&self, p: u64, nr: u64) -> Result<(), Error> {
        if nr == 0 {
            return Err(Error::InvalidArgument);
        }
        match p.checked_add(nr) {
            Some(end) if p >= RAM_BASE && end <= RAM_BASE + RAM_PAGES => Ok(()),
            _ => Err(Error::NotRam),
        }
    }

    fn gfns(&self, gfn: u64, nr: u64) -> Result<(), Error> {
        match gfn.checked_add(nr) {
            Some(end) if end <= GUEST_GFNS => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }

    fn guest_mapped(
        &self,
        vm: usize,
        p: u64,
        gfn: u64,
        nr: u64,
        state: PageState,
    ) -> Result<(), Error> {
        for i in 0..nr {
            match self.guests[vm].get(&(gfn + i)) {
                None => return Err(Error::NotMapped),
                Some(&(q, s, _)) if q != p + i || s != state => return Err(Error::BadState),
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn guest_unmapped(&self, vm: usize, gfn: u64, nr: u64) -> Result<(), Error> {
        if (0..nr).any(|i| self.guests[vm].contains_key(&(gfn + i))) {
            return Err(Error::AlreadyMapped);
        }
        Ok(())
    }

    fn exclusive(&self, p: u64, nr: u64, who: Owner) -> Result<(), Error> {
        if (0..nr).any(|i| self.pages[&(p + i)] != (who, 0)) {
            return Err(Error::BadState);
        }
        Ok(())
    }

    pub fn share(
        &mut self,
        vm: usize,
        p: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    ) -> Result<(), Error> {
        self.range(p, nr)?;
        self.gfns(gfn, nr)?;
        for i in 0..nr {
            let (o, c) = self.pages[&(p + i)];
            if o != Owner::Host {
                return Err(Error::BadState);
            }
            if c >= self.share_limit {
                return Err(Error::Overflow);
            }
        }
        self.guest_unmapped(vm, gfn, nr)?;
        for i in 0..nr {
            self.pages.get_mut(&(p + i)).unwrap().1 += 1;
            self.guests[vm].insert(gfn + i, (p + i, PageState::SharedBorrowed, perms));
        }
        Ok(())
    }

    pub fn unshare(&mut self, vm: usize, p: u64, gfn: u64, nr: u64) -> Result<(), Error> {
        self.range(p, nr)?;
        self.gfns(gfn, nr)?;
        if (0..nr).any(|i| {
            let (o, c) = self.pages[&(p + i)];
            o != Owner::Host || c == 0
        }) {
            return Err(Error::BadState);
        }
        self.guest_mapped(vm, p, gfn, nr, PageState::SharedBorrowed)?;
        for i in 0..nr {
            self.pages.get_mut(&(p + i)).unwrap().1 -= 1;
            self.guests[vm].remove(&(gfn + i));
        }
        Ok(())
    }

    pub fn donate(
        &mut self,
        vm: usize,
        p: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    ) -> Result<(), Error> {
        self.range(p, nr)?;
        self.gfns(gfn, nr)?;
        self.exclusive(p, nr, Owner::Host)?;
        self.guest_unmapped(vm, gfn, nr)?;
        for i in 0..nr {
            self.pages.insert(p + i, (Owner::Vm(vm_id(vm)), 0));
            self.guests[vm].insert(gfn + i, (p + i, PageState::Owned, perms));
        }
        Ok(())
    }

    /// Returns the pages that must have been zeroed.
    pub fn reclaim(&mut self, vm: usize, p: u64, gfn: u64, nr: u64) -> Result<Vec<Pfn>, Error> {
        self.range(p, nr)?;
        self.gfns(gfn, nr)?;
        self.exclusive(p, nr, Owner::Vm(vm_id(vm)))?;
        self.guest_mapped(vm, p, gfn, nr, PageState::Owned)?;
        for i in 0..nr {
            self.pages.insert(p + i, (Owner::Host, 0));
            self.guests[vm].remove(&(gfn + i));
        }
        Ok((p..p + nr).map(Pfn).collect())
    }

    pub fn donate_to_hyp(&mut self, p: u64, nr: u64) -> Result<(), Error> {
        self.range(p, nr)?;
        self.exclusive(p, nr, Owner::Host)?;
        for i in 0..nr {
            self.pages.insert(p + i, (Owner::Hyp, 0));
        }
        Ok(())
    }

    pub fn return_from_hyp(&mut self, p: u64, nr: u64) -> Result<Vec<Pfn>, Error> {
        self.range(p, nr)?;
        self.exclusive(p, nr, Owner::Hyp)?;
        for i in 0..nr {
            self.pages.insert(p + i, (Owner::Host, 0));
        }
        Ok((p..p + nr).map(Pfn).collect())
    }

    /// Tears down the first `n` guest pages (4 KiB leaves) in gfn order;
    /// returns the pages that must have been zeroed.
    pub fn teardown(&mut self, vm: usize, n: usize) -> Vec<Pfn> {
        let first: Vec<_> = self.guests[vm]
            .iter()
            .take(n)
            .map(|(&g, &v)| (g, v))
            .collect();
        let mut zeroed = Vec::new();
        for (g, (p, state, _)) in first {
            self.guests[vm].remove(&g);
            let e = self.pages.get_mut(&p).unwrap();
            match state {
                PageState::SharedBorrowed => e.1 -= 1,
                _ => {
                    *e = (Owner::Host, 0);
                    zeroed.push(Pfn(p));
                }
            }
        }
        zeroed
    }

    /// Asserts that the world is in exactly the model's state.
    pub fn assert_matches(&self, w: &World) {
        for (p, info) in w.tracker.iter() {
            assert_eq!(
                (info.owner, info.shares),
                self.pages[&p.raw()],
                "tracker entry of {p:?}"
            );
        }
        for (vm, g) in w.guests.iter().enumerate() {
            assert_eq!(&guest_pages(g), &self.guests[vm], "guest {vm} mappings");
        }
        let host: Vec<u64> = host_pages(&w.host).into_keys().collect();
        let want: Vec<u64> = self
            .pages
            .iter()
            .filter(|(_, (o, _))| *o == Owner::Host)
            .map(|(&p, _)| p)
            .collect();
        assert_eq!(host, want, "host mappings");
    }
}
