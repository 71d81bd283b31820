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

/// What [`Hyp::host_abort_outcome`] did, for the trap counts
/// (`el2::traps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// Outside RAM: mapped `size` bytes of Device memory around the IPA.
    MappedMmio {
        /// 4 KiB, 2 MiB or 1 GiB.
        size: u64,
    },
    /// A page of host-owned RAM that was not mapped: mapped.
    MappedRam,
    /// Already mapped (another CPU mapped it meanwhile).
    AlreadyMapped,
    /// RAM the host does not own (the hypervisor's memory, a page donated
    /// to the hypervisor or a guest): abort injected.
    NotHostRam,
    /// At or beyond the host IPA size: abort injected.
    BeyondIpa,
    /// A permission or other non-translation fault: abort injected.
    NotTranslation,
    /// The mapping failed (no table memory left): abort injected.
    MapFailed,
}

impl AbortOutcome {
    /// What the trap handler does.
    #[must_use]
    pub fn action(self) -> AbortAction {
        match self {
            Self::MappedMmio { .. } | Self::MappedRam | Self::AlreadyMapped => AbortAction::Retry,
            Self::NotHostRam | Self::BeyondIpa | Self::NotTranslation | Self::MapFailed => {
                AbortAction::InjectAbort
            }
        }
    }
}

/// Host MMIO: read/write Device memory.
const HOST_MMIO_ATTRS: Attrs = Attrs {
    perms: Perms::RW,
    mem: MemType::Device,
    state: PageState::Owned,
};

/// The host stage-2's shape: its geometry and its leaves by level, for
/// RAM (Normal) and MMIO (Device) separately
/// ([`Hyp::host_stage2_shape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStage2Shape {
    /// IPA size in bits.
    pub ipa_bits: u8,
    /// Level of the root table.
    pub start_level: u8,
    /// Concatenated root tables.
    pub root_tables: usize,
    /// Leaves mapping RAM at levels 1, 2 and 3 (1 GiB, 2 MiB, 4 KiB).
    pub ram: [u64; 3],
    /// Leaves mapping MMIO at levels 1, 2 and 3.
    pub mmio: [u64; 3],
}

impl HostStage2Shape {
    /// Descriptors read by one lookup that ends in a leaf at `level`
    /// (1..=3): one per level from the start level.
    #[must_use]
    pub fn levels_per_lookup(&self, level: u8) -> u8 {
        level + 1 - self.start_level
    }

    /// One line: the geometry, and per leaf size how many leaves map RAM
    /// and MMIO and how many descriptors a lookup through one reads.
    #[must_use]
    pub fn line(&self) -> alloc::string::String {
        let mut s = alloc::format!(
            "ipa_bits={} start_level={} root_tables={}",
            self.ipa_bits,
            self.start_level,
            self.root_tables
        );
        for (i, name) in ["1g", "2m", "4k"].iter().enumerate() {
            let level = i as u8 + 1;
            s.push_str(&alloc::format!(
                " {name}: ram={} mmio={} levels={}",
                self.ram[i],
                self.mmio[i],
                self.levels_per_lookup(level)
            ));
        }
        s
    }
}

/// The MMIO leaf sizes tried on a fault, largest first.
const MMIO_BLOCKS: [u64; 2] = [1 << 30, 2 << 20];

impl<P: Platform, HM: TableMemory, HT: TlbMaintenance> Hyp<P, HM, HT> {
    /// Decides what to do with a host stage-2 abort at `ipa` (the host's
    /// IPA is its PA): [`Self::host_abort_outcome`]'s action.
    pub fn host_abort(&self, ipa: u64, kind: AbortKind) -> AbortAction {
        self.host_abort_outcome(ipa, kind).action()
    }

    /// The host stage-2's geometry and its leaves (a walk of the whole IPA
    /// space under the `host` lock).
    pub fn host_stage2_shape(&self) -> HostStage2Shape {
        let host = self.lock_host();
        let c = host.s2.config();
        let mut shape = HostStage2Shape {
            ipa_bits: c.ipa_bits,
            start_level: c.start_level,
            root_tables: c.root_tables,
            ..HostStage2Shape::default()
        };
        let _ = host.s2.walk(Ipa(0), c.ipa_size(), |leaf| {
            let i = usize::from(leaf.level.clamp(1, 3) - 1);
            match leaf.attrs.mem {
                MemType::Normal => shape.ram[i] += 1,
                MemType::Device => shape.mmio[i] += 1,
            }
        });
        shape
    }

    /// Handles a host stage-2 abort at `ipa` and says what it did:
    ///
    /// * already mapped (another CPU fixed it): retry;
    /// * translation fault on RAM the host owns (OWNED or SHARED_OWNED) but
    ///   whose page is not mapped: map the 4 KiB page, retry;
    /// * translation fault outside RAM (MMIO): map the largest aligned
    ///   block around it, 1 GiB or 2 MiB, that holds no RAM and nothing
    ///   mapped, as Device, else the 4 KiB page; retry;
    /// * everything else (RAM the host does not own: the hypervisor's
    ///   memory, pages donated to the hypervisor or to a guest; permission
    ///   and other faults; addresses beyond the host IPA size; no table
    ///   memory left): inject an abort.
    pub fn host_abort_outcome(&self, ipa: u64, kind: AbortKind) -> AbortOutcome {
        if kind != AbortKind::Translation {
            return AbortOutcome::NotTranslation;
        }
        let pfn = Pfn(ipa >> PAGE_SHIFT);
        let page = pfn.0 << PAGE_SHIFT;
        let mut host = self.lock_host();
        if page >= host.s2.config().ipa_size() {
            return AbortOutcome::BeyondIpa;
        }
        if host.s2.query(Ipa(page)).is_some() {
            return AbortOutcome::AlreadyMapped;
        }
        let (mapped, outcome) = if self.is_ram(pfn, 1) {
            if host.tracker.owner(pfn) != Ok(Owner::Host) {
                return AbortOutcome::NotHostRam;
            }
            let m = host.s2.map(
                Ipa(page),
                Hpa(page),
                PAGE_SIZE,
                HOST_RAM_ATTRS,
                Granule::Page,
            );
            (m, AbortOutcome::MappedRam)
        } else {
            let ipa_size = host.s2.config().ipa_size();
            let usable = |base: u64, size: u64| {
                let holds_ram = self.ram.iter().any(|&(s, e)| {
                    (s.0 << PAGE_SHIFT) < base.saturating_add(size) && base < (e.0 << PAGE_SHIFT)
                });
                let mut empty = true;
                if holds_ram
                    || base.saturating_add(size) > ipa_size
                    || host.s2.walk(Ipa(base), size, |_| empty = false).is_err()
                {
                    return false;
                }
                empty
            };
            let (base, size) = MMIO_BLOCKS
                .iter()
                .map(|&size| (ipa & !(size - 1), size))
                .find(|&(base, size)| usable(base, size))
                .unwrap_or((page, PAGE_SIZE));
            let m = host.s2.map(
                Ipa(base),
                Hpa(base),
                size,
                HOST_MMIO_ATTRS,
                Granule::Largest,
            );
            (m, AbortOutcome::MappedMmio { size })
        };
        match mapped {
            Ok(()) => outcome,
            Err(_) => AbortOutcome::MapFailed,
        }
    }
}
