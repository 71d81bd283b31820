//! The machine services the dispatcher (`el2::pkvm`) needs, at EL2: table
//! pages reached through the identity map, guest TLB maintenance, zeroing.
//! This and `arch` are the only places that turn physical addresses into
//! pointers.

use core::arch::asm;

use aarch64_cpu::registers::{Readable, Writeable, VTTBR_EL2};
use el2::pkvm::platform::{PageAccess, Platform};
use stage2::mm::Table;
use stage2::tlb::TlbMaintenance;
use stage2::{Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};

/// The EL2 platform: stateless, everything goes through the identity map.
#[derive(Debug, Default, Clone, Copy)]
pub struct El2Platform;

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

impl GuestTlb {
    fn with_guest_vttbr(&self, f: impl FnOnce()) {
        let saved = VTTBR_EL2.get();
        VTTBR_EL2.set(self.vttbr);
        // SAFETY: a barrier; makes the VMID switch visible to the TLBI.
        unsafe { asm!("isb", options(nostack)) };
        f();
        VTTBR_EL2.set(saved);
        // SAFETY: a barrier.
        unsafe { asm!("isb", options(nostack)) };
    }
}

impl TlbMaintenance for GuestTlb {
    fn sync_writes(&mut self) {
        // SAFETY: a barrier.
        unsafe { asm!("dsb ishst", options(nostack)) };
    }

    fn invalidate_ipa(&mut self, _vmid: Vmid, ipa: Ipa, _level: u8) {
        self.with_guest_vttbr(|| {
            // SAFETY: TLB maintenance for the guest's VMID only (loaded
            // above); the vmalle1is is what QEMU (and KVM on hardware) need
            // to drop combined stage-1+2 entries.
            unsafe {
                asm!(
                    "tlbi ipas2e1is, {}",
                    "dsb ish",
                    "tlbi vmalle1is",
                    "dsb ish",
                    in(reg) ipa.raw() >> 12,
                    options(nostack)
                )
            }
        });
    }

    fn invalidate_vmid(&mut self, _vmid: Vmid) {
        self.with_guest_vttbr(|| {
            // SAFETY: TLB maintenance for the guest's VMID only.
            unsafe { asm!("tlbi vmalls12e1is", "dsb ish", options(nostack)) }
        });
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
}
