//! The host stage-2 abort policy (docs/DESIGN.md §5).

use stage2::mm::TableMemory;
use stage2::owner::Owner;
use stage2::pgtable::{Attrs, Granule, MemType, PageState, Perms};
use stage2::tlb::TlbMaintenance;
use stage2::transition::HOST_RAM_ATTRS;
use stage2::{Hpa, Ipa, Pfn, PAGE_SHIFT, PAGE_SIZE};

use super::platform::Platform;
use super::Hyp;

/// What kind of stage-2 fault the host took (from `ESR_EL2.ISS.DFSC/IFSC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortKind {
    /// Translation fault: nothing mapped at the IPA.
    Translation,
    /// Permission fault.
    Permission,
    /// Anything else (access flag, external abort, alignment, ...).
    Other,
}

/// What the trap handler does after [`Hyp::host_abort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortAction {
    /// The IPA is mapped now (or was mapped by another CPU meanwhile):
    /// return to the faulting instruction.
    Retry,
    /// The host may not access the IPA: inject a synchronous external
    /// abort at EL1.
    InjectAbort,
}

/// Host MMIO: read/write Device memory.
const HOST_MMIO_ATTRS: Attrs = Attrs {
    perms: Perms::RW,
    mem: MemType::Device,
    state: PageState::Owned,
};

const BLOCK: u64 = 2 << 20;

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// Decides what to do with a host stage-2 abort at `ipa` (the host's
    /// IPA is its PA):
    ///
    /// * already mapped (another CPU fixed it): retry;
    /// * translation fault on RAM the host owns (OWNED or SHARED_OWNED) but
    ///   whose page is not mapped: map the 4 KiB page, retry;
    /// * translation fault outside RAM (MMIO): map the 2 MiB block around
    ///   it as Device if the block holds no RAM and nothing of it is mapped,
    ///   else the 4 KiB page; retry;
    /// * everything else (RAM the host does not own: the hypervisor's
    ///   memory, pages donated to the hypervisor or to a guest; permission
    ///   and other faults; addresses beyond the host IPA size; no table
    ///   memory left): inject an abort.
    pub fn host_abort(&self, ipa: u64, kind: AbortKind) -> AbortAction {
        if kind != AbortKind::Translation {
            return AbortAction::InjectAbort;
        }
        let pfn = Pfn(ipa >> PAGE_SHIFT);
        let page = pfn.0 << PAGE_SHIFT;
        let mut host = self.lock_host();
        if page >= host.s2.config().ipa_size() {
            return AbortAction::InjectAbort;
        }
        if host.s2.query(Ipa(page)).is_some() {
            return AbortAction::Retry;
        }
        let mapped = if self.is_ram(pfn, 1) {
            if host.tracker.owner(pfn) != Ok(Owner::Host) {
                return AbortAction::InjectAbort;
            }
            host.s2.map(
                Ipa(page),
                Hpa(page),
                PAGE_SIZE,
                HOST_RAM_ATTRS,
                Granule::Page,
            )
        } else {
            let block = ipa & !(BLOCK - 1);
            let holds_ram = self.ram.iter().any(|&(s, e)| {
                (s.0 << PAGE_SHIFT) < block.saturating_add(BLOCK) && block < (e.0 << PAGE_SHIFT)
            });
            let mut empty = true;
            if !holds_ram && host.s2.walk(Ipa(block), BLOCK, |_| empty = false).is_err() {
                empty = false;
            }
            let (base, size) = if !holds_ram && empty {
                (block, BLOCK)
            } else {
                (page, PAGE_SIZE)
            };
            host.s2.map(
                Ipa(base),
                Hpa(base),
                size,
                HOST_MMIO_ATTRS,
                Granule::Block2M,
            )
        };
        match mapped {
            Ok(()) => AbortAction::Retry,
            Err(_) => AbortAction::InjectAbort,
        }
    }
}
