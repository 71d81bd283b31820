//! Host fakes of the platform traits, for unit tests, property tests and
//! the fuzzer (`cfg(test)` or feature `fake`).
//!
//! * [`FakePlatform`]: page zeroing against a fake RAM that remembers one
//!   tag per page (0 = all zeros), so tests can check that reclaimed pages
//!   read zero; guest TLBs that check every invalidation carries their VMID.
//! * [`FakePages`]: a VM's table pages as boxed tables; a page never
//!   written reads as poison (every bit set), so a table used before being
//!   zeroed shows up as garbage mappings.
//! * The host stage-2 uses the stage2 crate's `ArenaMemory` and
//!   `CountingTlb`.
//! * Guests: vCPU contexts are kept per state page (a page zeroed by
//!   [`Platform::zero_page`] starts from the default context again);
//!   [`FakePlatform::script_exit`] queues what the next guest entries
//!   return (each entry pops one: its registers go into x0..x7, as if the
//!   guest had set them before trapping); with nothing queued an entry
//!   ends by a physical IRQ. Every entry is logged
//!   ([`FakePlatform::entries`]).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use spin::Mutex;
use stage2::mm::{ArenaMemory, Table, ENTRIES};
use stage2::tlb::{CountingTlb, TlbMaintenance};
use stage2::{Ipa, Pfn, Vmid};

use hypercalls::{GuestPage, HostPageInfo, HypError, Hypercall, Reply, ReplyError, VmHandle};

use super::platform::{GuestEntry, PageAccess, Platform};
use super::{Hyp, HypConfig, InitError};
use crate::dtb::Region;
use crate::vcpu::{RawExit, VcpuContext};

/// What a never-written fake table page reads as.
pub const POISON: u64 = u64::MAX;
static POISON_TABLE: Table = [POISON; ENTRIES];

/// A fake machine: RAM contents as one tag per page.
#[derive(Debug, Default)]
pub struct FakePlatform {
    ram: Mutex<BTreeMap<Pfn, u64>>,
    zeroed: Mutex<u64>,
    contexts: Mutex<BTreeMap<Pfn, Box<VcpuContext>>>,
    script: Mutex<VecDeque<(RawExit, [u64; 8])>>,
    entries: Mutex<Vec<(GuestEntry, u64)>>,
    cpu: AtomicUsize,
}

/// The EL2 vector slot of an IRQ from a lower EL
/// ([`crate::exception::Vector::from_index`]).
pub const VECTOR_LOWER_IRQ: u64 = 9;
/// The slot of a synchronous exception from a lower EL.
pub const VECTOR_LOWER_SYNC: u64 = 8;

/// The fake physical counter's value.
pub const FAKE_COUNTER: u64 = 0x1234_5678;

impl FakePlatform {
    /// A machine whose RAM reads zero.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The host (or anyone) writes `tag` into page `pfn`.
    pub fn write(&self, pfn: Pfn, tag: u64) {
        let mut ram = self.ram.lock();
        if tag == 0 {
            ram.remove(&pfn);
        } else {
            ram.insert(pfn, tag);
        }
    }

    /// The tag of page `pfn` (0 if all zeros).
    #[must_use]
    pub fn read(&self, pfn: Pfn) -> u64 {
        self.ram.lock().get(&pfn).copied().unwrap_or(0)
    }

    /// Queues the exit the next guest entry returns, with the guest's
    /// x0..x7 at that exit.
    pub fn script_exit(&self, raw: RawExit, regs: [u64; 8]) {
        self.script.lock().push_back((raw, regs));
    }

    /// Number of queued exits not consumed yet.
    #[must_use]
    pub fn scripted(&self) -> usize {
        self.script.lock().len()
    }

    /// Every guest entry so far: its [`GuestEntry`] and the guest PC.
    #[must_use]
    pub fn entries(&self) -> Vec<(GuestEntry, u64)> {
        self.entries.lock().clone()
    }

    /// Makes the calling "CPU" CPU `cpu` from now on.
    pub fn set_cpu(&self, cpu: usize) {
        self.cpu.store(cpu, Ordering::Relaxed);
    }

    /// A copy of the vCPU context kept for state page `state`.
    #[must_use]
    pub fn context(&self, state: Pfn) -> VcpuContext {
        self.contexts
            .lock()
            .get(&state)
            .map_or_else(VcpuContext::default, |c| c.as_ref().clone())
    }

    /// Number of [`Platform::zero_page`] calls so far.
    #[must_use]
    pub fn zero_calls(&self) -> u64 {
        *self.zeroed.lock()
    }
}

/// A VM's table pages.
#[derive(Debug, Default)]
pub struct FakePages {
    tables: BTreeMap<Pfn, Box<Table>>,
}

impl PageAccess for FakePages {
    fn table(&self, pfn: Pfn) -> &Table {
        self.tables.get(&pfn).map_or(&POISON_TABLE, |t| t)
    }

    fn table_mut(&mut self, pfn: Pfn) -> &mut Table {
        self.tables
            .entry(pfn)
            .or_insert_with(|| Box::new(POISON_TABLE))
    }

    fn release(&mut self, pfn: Pfn) {
        self.tables.remove(&pfn);
    }
}

/// A guest's TLB: counts, and panics (a test failure) if an invalidation
/// names another VMID than the one it was made for.
#[derive(Debug)]
pub struct FakeGuestTlb {
    /// The VMID it was made for.
    pub vmid: Vmid,
    /// The `VTTBR_EL2` value it was given.
    pub vttbr: u64,
    /// The operations.
    pub counts: CountingTlb,
}

impl TlbMaintenance for FakeGuestTlb {
    fn sync_writes(&mut self) {
        self.counts.sync_writes();
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, level: u8) {
        assert_eq!(vmid, self.vmid, "invalidation for another VMID");
        self.counts.invalidate_ipa(vmid, ipa, level);
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        assert_eq!(vmid, self.vmid, "invalidation for another VMID");
        self.counts.invalidate_vmid(vmid);
    }
}

impl Platform for FakePlatform {
    type Pages = FakePages;
    type GuestTlb = FakeGuestTlb;

    fn page_access(&self) -> FakePages {
        FakePages::default()
    }

    fn guest_tlb(&self, vmid: Vmid, vttbr: u64) -> FakeGuestTlb {
        assert_eq!(vttbr >> 48, u64::from(vmid.0), "VTTBR without the VMID");
        FakeGuestTlb {
            vmid,
            vttbr,
            counts: CountingTlb::default(),
        }
    }

    fn zero_page(&self, pfn: Pfn) {
        self.ram.lock().remove(&pfn);
        self.contexts.lock().remove(&pfn);
        *self.zeroed.lock() += 1;
    }

    fn cpu_index(&self) -> usize {
        self.cpu.load(Ordering::Relaxed)
    }

    fn counter(&self) -> u64 {
        FAKE_COUNTER
    }

    fn with_vcpu<R>(&self, state: Pfn, f: impl FnOnce(&mut VcpuContext) -> R) -> R {
        // Taken out while `f` runs, so no lock is held across it.
        let mut ctx = self.contexts.lock().remove(&state).unwrap_or_default();
        let r = f(&mut ctx);
        self.contexts.lock().insert(state, ctx);
        r
    }

    fn enter_guest(&self, ctx: &mut VcpuContext, entry: &GuestEntry) -> RawExit {
        self.entries.lock().push((*entry, ctx.pc));
        match self.script.lock().pop_front() {
            Some((raw, regs)) => {
                ctx.set_results(&regs);
                raw
            }
            None => RawExit {
                vector: VECTOR_LOWER_IRQ,
                ..RawExit::default()
            },
        }
    }
}

/// The hypervisor on fakes.
pub type FakeHyp = Hyp<FakePlatform, ArenaMemory, CountingTlb>;

/// The standard fake machine's frames: the hypervisor's first frame (RAM
/// and the hypervisor start at 1 GiB).
pub const HYP0: u64 = 0x4_0000;
/// The first host frame, after the hypervisor's 1 MiB.
pub const HOST0: u64 = 0x4_0100;
/// The first frame of the 4 MiB hole after the first region.
pub const HOLE: u64 = 0x4_0400;
/// The second region: 512 frames.
pub const HOST1: u64 = 0x4_0800;

/// First RAM region of the standard fake machine: 4 MiB at 1 GiB, whose
/// first 1 MiB is the hypervisor's.
pub const FAKE_RAM0: Region = Region {
    base: HYP0 << 12,
    size: (HOLE - HYP0) << 12,
};
/// Second RAM region, after a 4 MiB hole: 2 MiB.
pub const FAKE_RAM1: Region = Region {
    base: HOST1 << 12,
    size: 2 << 20,
};
/// The hypervisor's range.
pub const FAKE_HYP: Region = Region {
    base: HYP0 << 12,
    size: (HOST0 - HYP0) << 12,
};

/// The standard fake machine (RAM [`FAKE_RAM0`] and [`FAKE_RAM1`], the
/// hypervisor at [`FAKE_HYP`], 40-bit host IPA) with `host_tables` pages
/// for the host stage-2 and the given per-page share limit.
pub fn fake_hyp(host_tables: usize, share_limit: u32) -> Result<FakeHyp, InitError> {
    let config = HypConfig {
        ram: &[FAKE_RAM0, FAKE_RAM1],
        hyp: FAKE_HYP,
        host_ipa_bits: 40,
        share_limit,
    };
    Hyp::new(
        FakePlatform::new(),
        &config,
        ArenaMemory::with_limit(host_tables),
        CountingTlb::default(),
    )
}

/// Runs `call` on `h` through the register interface and decodes the
/// reply (a reply that does not decode as the call's is a bug: panics).
pub fn run(h: &FakeHyp, call: Hypercall) -> Result<Reply, HypError> {
    let out = h.host_call(&call.encode());
    match call.decode_reply(&out) {
        Ok(r) => Ok(r),
        Err(ReplyError::Failed(e)) => Err(e),
        Err(ReplyError::Malformed) => panic!("malformed reply {out:x?} to {call:?}"),
    }
}

/// The reference model of the ABI (crate `abi_model`) for the standard
/// fake machine with `share_limit` ([`fake_hyp`]'s): every VM slot is the
/// caller's, and no guest touches memory, so access flags are exact.
#[must_use]
pub fn abi_model(share_limit: u32) -> abi_model::Model {
    let config = abi_model::Config {
        max_vms: Some(super::MAX_VMS),
        share_limit,
        exact_young: true,
        ..abi_model::Config::new((HYP0, HOST0))
    };
    abi_model::Model::new(config, &[(HOST0, HOLE), (HOST1, HOST1 + 512)])
}

/// The fake's page states read through the ABI, for the model to follow a
/// teardown batch (`abi_model::Model::step_observed`).
#[derive(Debug)]
pub struct Observer<'a>(pub &'a FakeHyp);

impl abi_model::Observe for Observer<'_> {
    fn host_page(&mut self, pfn: u64) -> Result<HostPageInfo, HypError> {
        let pfn = hypercalls::Pfn::new(pfn).ok_or(HypError::InvalidArgument)?;
        match run(self.0, Hypercall::HostPageState { pfn })? {
            Reply::HostPage(i) => Ok(i),
            r => panic!("{r:?}"),
        }
    }

    fn guest_page(&mut self, vm: VmHandle, gfn: u64) -> Result<GuestPage, HypError> {
        let gfn = hypercalls::Gfn::new(gfn).ok_or(HypError::InvalidArgument)?;
        match run(self.0, Hypercall::GuestPageState { vm, gfn })? {
            Reply::GuestPage(p) => Ok(p),
            r => panic!("{r:?}"),
        }
    }
}
