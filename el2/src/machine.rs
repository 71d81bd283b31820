//! The machine services the dispatcher (`el2::pkvm`) needs, at EL2: table
//! pages reached through the identity map, guest TLB maintenance, zeroing,
//! vCPU contexts in their state pages and guest entry.
//! Physical addresses become pointers only in the binary: here, in `arch`,
//! in `hyp.rs` (the host stage-2 pool, the device trees, the host kernel's
//! header).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::registers::{Readable, CNTPCT_EL0, ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1};
use el2::layout::MAX_CPUS;
use el2::pkvm::platform::{GuestEntry, PageAccess, Platform};
use el2::vcpu::{RawExit, VcpuContext};

use crate::arch;
use crate::arch::vcpu::{run_vcpu, VcpuRun};
use stage2::mm::Table;
use stage2::tlb::TlbMaintenance;
use stage2::{Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};

/// The EL2 platform: stateless, everything goes through the identity map
/// (the per-CPU redistributor addresses are in [`GICR_SGI`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct El2Platform;

/// The SGI/PPI frame of each CPU's GIC redistributor (0: not found), set
/// once per CPU when it comes up ([`set_redistributor`]).
static GICR_SGI: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Records CPU `cpu`'s redistributor SGI frame (from
/// `arch::vcpu::find_redistributor`), which guest runs on it use to let
/// the host's timer end them.
pub fn set_redistributor(cpu: usize, sgi: Option<u64>) {
    if let Some(slot) = GICR_SGI.get(cpu) {
        slot.store(sgi.unwrap_or(0), Ordering::Relaxed);
    }
}

/// VTCR_EL2.HA: hardware sets the stage-2 access flag (no access-flag
/// faults after `HYP_TEST_CLEAR_YOUNG`).
const VTCR_HA: u64 = 1 << 21;

/// VTCR_EL2 for a guest stage-2 with this geometry on this CPU, or `None`
/// if the CPU's physical addresses are too small for it.
fn guest_vtcr(ipa: stage2::pgtable::IpaConfig) -> Option<u64> {
    let pa_range = (ID_AA64MMFR0_EL1.get() & 0xf) as u8;
    let vtcr = stage2::vtcr::vtcr_el2(ipa, pa_range.min(5)).ok()?;
    let hafdbs = ID_AA64MMFR1_EL1.get() & 0xf;
    Some(if hafdbs != 0 { vtcr | VTCR_HA } else { vtcr })
}

/// A VM's memcache pages, reached through the EL2 identity map.
#[derive(Debug, Default)]
pub struct IdentityPages;

fn page_ptr(pfn: Pfn) -> *mut u8 {
    (pfn.raw() << PAGE_SHIFT) as *mut u8
}

impl PageAccess for IdentityPages {
    fn table(&self, pfn: Pfn) -> &Table {
        // SAFETY: the dispatcher only passes frames of this VM's memcache,
        // which the tracker says the hypervisor owns: the host's stage-2 no
        // longer maps them, no other memcache holds them, and they are RAM,
        // identity-mapped as normal memory at EL2 (arch::map_ram_gib), 4 KiB
        // aligned. `&self` borrows this memcache, so no `&mut` alias exists.
        unsafe { &*(page_ptr(pfn) as *const Table) }
    }

    fn table_mut(&mut self, pfn: Pfn) -> &mut Table {
        // SAFETY: as in `table`; `&mut self` makes the access exclusive.
        unsafe { &mut *(page_ptr(pfn) as *mut Table) }
    }
}

/// Stage-2 TLB maintenance for one guest: loads the guest's VTTBR_EL2 around
/// each invalidation (the instructions act on the current VMID) and puts
/// the host's back.
#[derive(Debug)]
pub struct GuestTlb {
    vttbr: u64,
}

impl TlbMaintenance for GuestTlb {
    fn sync_writes(&mut self) {
        arch::tlbi::sync_writes();
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: Ipa, _level: u8) {
        arch::with_vmid(self.vttbr, vmid, || arch::tlbi::ipa(ipa));
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        arch::with_vmid(self.vttbr, vmid, arch::tlbi::vmid);
    }
}

impl Platform for El2Platform {
    type Pages = IdentityPages;
    type GuestTlb = GuestTlb;

    fn page_access(&self) -> IdentityPages {
        IdentityPages
    }

    fn guest_tlb(&self, _vmid: Vmid, vttbr: u64) -> GuestTlb {
        GuestTlb { vttbr }
    }

    fn zero_page(&self, pfn: Pfn) {
        // SAFETY: the dispatcher passes a RAM frame owned by the hypervisor
        // or a VM and mapped by nobody else that could write it now;
        // identity-mapped normal memory at EL2; one whole 4 KiB page.
        unsafe {
            core::ptr::write_bytes(page_ptr(pfn), 0, PAGE_SIZE as usize);
            asm!("dsb ish", options(nostack));
        }
    }

    fn cpu_index(&self) -> usize {
        crate::hyp::this_cpu().unwrap_or(usize::MAX)
    }

    fn counter(&self) -> u64 {
        CNTPCT_EL0.get()
    }

    fn with_vcpu<R>(&self, state: Pfn, f: impl FnOnce(&mut VcpuContext) -> R) -> R {
        const _: () = assert!(core::mem::size_of::<VcpuContext>() <= PAGE_SIZE as usize);
        const _: () = assert!(core::mem::align_of::<VcpuContext>() <= PAGE_SIZE as usize);
        // SAFETY: `state` is the state page of a vCPU the dispatcher has
        // loaded on this CPU (its running bit is set, so no other CPU
        // passes it here, and teardown cannot return it to the host
        // meanwhile); it is hypervisor-owned RAM, identity-mapped as normal
        // memory, page aligned (enough for VcpuContext's 16), and a whole
        // page holds a VcpuContext. Every bit pattern is a valid
        // VcpuContext (integers only); the page was zeroed at creation.
        let ctx = unsafe { &mut *(page_ptr(state) as *mut VcpuContext) };
        f(ctx)
    }

    fn enter_guest(&self, ctx: &mut VcpuContext, entry: &GuestEntry) -> RawExit {
        let Some(vtcr) = guest_vtcr(entry.ipa) else {
            // The VM's IPA size exceeds this CPU's PA size: an unhandled exit.
            return RawExit {
                vector: u64::MAX,
                ..RawExit::default()
            };
        };
        let gicr_sgi = GICR_SGI
            .get(self.cpu_index())
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != 0);
        run_vcpu(
            ctx,
            &VcpuRun {
                vttbr: entry.vttbr,
                vtcr,
                flush_local_tlb: entry.flush_local_tlb,
                gicr_sgi,
                fast_budget: entry.fast_budget,
            },
        )
    }
}
