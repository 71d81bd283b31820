//! Host calls: decoding x0..x7 into a typed [`Hypercall`] and encoding back.

use crate::error::HypError;
use crate::ids::{canonical_id, HostFunction};
use crate::regs::{build, Reader, Regs};
use crate::types::{Gfn, IpaBits, PageCount, Pfn, Prot, VcpuCount, VcpuIndex, VmHandle};

/// `HYP_VCPU_CREATE` x5 bit 0: the vCPU starts powered off and waits for a
/// guest PSCI `CPU_ON` (`docs/ABI.md` §3.6).
pub const VCPU_START_OFF: u64 = 1;

/// Entry addresses of a vCPU are below this (52-bit IPAs).
pub const VCPU_ENTRY_LIMIT: u64 = 1 << 52;

/// How a vCPU starts (`HYP_VCPU_CREATE` x3..x5, `docs/ABI.md` §3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcpuStart {
    /// Powered on: its first `HYP_VCPU_RUN` enters the guest at `entry` (an
    /// IPA, MMU off, EL1h, DAIF masked) with x0 = `arg`.
    On {
        /// Entry IPA: 4-byte aligned, below [`VCPU_ENTRY_LIMIT`].
        entry: u64,
        /// The guest's x0 at entry.
        arg: u64,
    },
    /// Powered off until another vCPU of the VM starts it with PSCI `CPU_ON`.
    Off,
}

/// The guest's memory in its IPA space (`HYP_VM_CREATE` x4, x5): a
/// stage-2 fault inside `[gfn, gfn + pages)` is a memory fault, outside it
/// an MMIO access (`docs/ABI.md` §3.5, §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestMemory {
    gfn: Gfn,
    pages: u64,
}

impl GuestMemory {
    /// `[gfn, gfn + pages)`, or `None` if empty or beyond an IPA space of `ipa_bits`.
    #[must_use]
    pub fn new(ipa_bits: IpaBits, gfn: Gfn, pages: u64) -> Option<Self> {
        let limit = 1u64 << (ipa_bits.get() - 12);
        let end = gfn.raw().checked_add(pages)?;
        (pages != 0 && end <= limit).then_some(Self { gfn, pages })
    }

    /// First guest frame.
    #[must_use]
    pub const fn gfn(&self) -> Gfn {
        self.gfn
    }

    /// Number of pages.
    #[must_use]
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether the guest frame `gfn` is inside.
    #[must_use]
    pub const fn contains(&self, gfn: u64) -> bool {
        gfn >= self.gfn.raw() && gfn - self.gfn.raw() < self.pages
    }
}

/// A group of per-VM counters read by `HYP_VM_COUNTERS` (`docs/ABI.md` §3.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CounterGroup {
    /// Stage-2 and ownership counters: see [`Stage2Counters`](crate::Stage2Counters).
    Stage2 = 0,
    /// Runtime counters and gauges: see [`RuntimeCounters`](crate::RuntimeCounters).
    Runtime = 1,
}

impl CounterGroup {
    /// Every group.
    pub const ALL: &'static [Self] = &[Self::Stage2, Self::Runtime];

    /// The group for a selector value.
    #[must_use]
    pub const fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Stage2),
            1 => Some(Self::Runtime),
            _ => None,
        }
    }
}

/// A host call with typed arguments. Field order is register order (x1, x2, ...).
///
/// `decode` accepts exactly what `encode` produces (apart from the SMCCC SVE
/// hint bit in x0, which is ignored): every register the call does not use,
/// and every reserved bit of a used one, must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hypercall {
    /// §3.1: the ABI version.
    Version,
    /// §3.2: whether `func` is a supported function id.
    Features {
        /// Any 32-bit function id.
        func: u32,
    },
    /// §3.3: donate `[pfn, pfn + nr)` to the hypervisor as `vm`'s page-table memcache.
    MemcacheTopup {
        /// The VM.
        vm: VmHandle,
        /// First host frame.
        pfn: Pfn,
        /// Number of frames.
        nr: PageCount,
    },
    /// §3.4: return up to [`MEMCACHE_RECLAIM_MAX`](crate::MEMCACHE_RECLAIM_MAX) free memcache pages.
    MemcacheReclaim {
        /// The VM.
        vm: VmHandle,
    },
    /// §3.5: create a VM whose root table is the donated pages at `root`.
    VmCreate {
        /// IPA size.
        ipa_bits: IpaBits,
        /// Number of vCPUs.
        nr_vcpus: VcpuCount,
        /// First of `ipa_bits.root_table_pages()` host frames; a multiple of that count.
        root: Pfn,
        /// The guest's memory (RAM) in its IPA space: a stage-2 fault inside
        /// it is a memory fault, outside it MMIO. `None`: all of it is RAM.
        memory: Option<GuestMemory>,
    },
    /// §3.6: create vCPU `vcpu` of `vm`.
    VcpuCreate {
        /// The VM.
        vm: VmHandle,
        /// The vCPU.
        vcpu: VcpuIndex,
        /// How it starts.
        start: VcpuStart,
    },
    /// §3.7: run vCPU `vcpu` of `vm` until it exits.
    VcpuRun {
        /// The VM.
        vm: VmHandle,
        /// The vCPU.
        vcpu: VcpuIndex,
        /// The value an MMIO read returns, if the previous run ended with
        /// [`VcpuExit::Mmio`](crate::VcpuExit::Mmio) of a read; ignored otherwise.
        mmio_data: u64,
    },
    /// §3.8: share host `[pfn, pfn + nr)` at guest `[gfn, gfn + nr)`.
    Share {
        /// The VM.
        vm: VmHandle,
        /// First host frame.
        pfn: Pfn,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
        /// The guest's permissions (must include R).
        prot: Prot,
    },
    /// §3.9: undo a share of host `[pfn, pfn + nr)` at guest `[gfn, gfn + nr)`.
    Unshare {
        /// The VM.
        vm: VmHandle,
        /// First host frame.
        pfn: Pfn,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §3.10: donate host `[pfn, pfn + nr)` to the guest at `[gfn, gfn + nr)`.
    Donate {
        /// The VM.
        vm: VmHandle,
        /// First host frame.
        pfn: Pfn,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
        /// The guest's permissions (must include R).
        prot: Prot,
    },
    /// §3.11: take donated `[pfn, pfn + nr)` back from guest `[gfn, gfn + nr)`, zeroed.
    Reclaim {
        /// The VM.
        vm: VmHandle,
        /// First host frame.
        pfn: Pfn,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §3.21: undo the share of every mapped guest frame in `[gfn, gfn + nr)`,
    /// whatever host frame each maps (holes are skipped).
    UnshareRange {
        /// The VM.
        vm: VmHandle,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §3.12: remove W from the guest mappings in `[gfn, gfn + nr)`.
    WrProtect {
        /// The VM.
        vm: VmHandle,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §3.13: add `prot` to the guest mapping of `gfn`.
    RelaxPerms {
        /// The VM.
        vm: VmHandle,
        /// The guest frame.
        gfn: Gfn,
        /// Permissions to add (not empty).
        prot: Prot,
    },
    /// §3.14: clear the access flag in `[gfn, gfn + nr)`; report whether any was set.
    TestClearYoung {
        /// The VM.
        vm: VmHandle,
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §3.15: start tearing `vm` down.
    TeardownStart {
        /// The VM.
        vm: VmHandle,
    },
    /// §3.16: reclaim a batch of at most [`TEARDOWN_BATCH`](crate::TEARDOWN_BATCH) of `vm`'s pages.
    TeardownReclaim {
        /// The VM.
        vm: VmHandle,
    },
    /// §3.17: finish tearing `vm` down and free its handle.
    TeardownFinalize {
        /// The VM.
        vm: VmHandle,
    },
    /// §3.18: read one group of `vm`'s counters.
    VmCounters {
        /// The VM.
        vm: VmHandle,
        /// Which counters.
        group: CounterGroup,
    },
    /// §3.19: who owns host frame `pfn` (tests).
    HostPageState {
        /// The host frame.
        pfn: Pfn,
    },
    /// §3.20: what `vm` has at `gfn` (tests).
    GuestPageState {
        /// The VM.
        vm: VmHandle,
        /// The guest frame.
        gfn: Gfn,
    },
}

impl Hypercall {
    /// Decodes a host call from x0..x7.
    ///
    /// Errors: [`HypError::NotSupported`] for an id that is not a host call of
    /// this ABI; [`HypError::TooBig`] for a page count above the per-call
    /// maximum; [`HypError::InvalidArgument`] for anything else malformed.
    /// Registers are checked in order x1..x7 and the first bad one decides.
    /// Never panics.
    pub fn decode(regs: &Regs) -> Result<Self, HypError> {
        let func = canonical_id(regs[0])
            .and_then(HostFunction::from_id)
            .ok_or(HypError::NotSupported)?;
        let mut r = Reader::new(regs, HypError::InvalidArgument);
        let call = match func {
            HostFunction::Version => Self::Version,
            HostFunction::Features => Self::Features { func: r.u32()? },
            HostFunction::MemcacheTopup => Self::MemcacheTopup {
                vm: r.vm()?,
                pfn: r.pfn()?,
                nr: r.count()?,
            },
            HostFunction::MemcacheReclaim => Self::MemcacheReclaim { vm: r.vm()? },
            HostFunction::VmCreate => {
                let ipa_bits = r.map(|v| IpaBits::new(u8::try_from(v).ok()?))?;
                let nr_vcpus = r.map(|v| VcpuCount::new(u16::try_from(v).ok()?))?;
                let align = u64::from(ipa_bits.root_table_pages());
                let root = r.map(|v| Pfn::new(v).filter(|p| p.raw() % align == 0))?;
                let gfn = r.gfn()?;
                let pages = r.raw()?;
                let memory = if pages == 0 && gfn.raw() == 0 {
                    None
                } else {
                    Some(GuestMemory::new(ipa_bits, gfn, pages).ok_or(HypError::InvalidArgument)?)
                };
                Self::VmCreate {
                    ipa_bits,
                    nr_vcpus,
                    root,
                    memory,
                }
            }
            HostFunction::VcpuCreate => {
                let vm = r.vm()?;
                let vcpu = r.vcpu()?;
                let entry = r.raw()?;
                let arg = r.raw()?;
                let start = match r.raw()? {
                    0 if entry & 3 == 0 && entry < VCPU_ENTRY_LIMIT => VcpuStart::On { entry, arg },
                    VCPU_START_OFF if entry == 0 && arg == 0 => VcpuStart::Off,
                    _ => return Err(HypError::InvalidArgument),
                };
                Self::VcpuCreate { vm, vcpu, start }
            }
            HostFunction::VcpuRun => Self::VcpuRun {
                vm: r.vm()?,
                vcpu: r.vcpu()?,
                mmio_data: r.raw()?,
            },
            HostFunction::Share => Self::Share {
                vm: r.vm()?,
                pfn: r.pfn()?,
                gfn: r.gfn()?,
                nr: r.count()?,
                prot: r.map(|v| Prot::from_bits(v).filter(|p| p.read()))?,
            },
            HostFunction::Unshare => Self::Unshare {
                vm: r.vm()?,
                pfn: r.pfn()?,
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            HostFunction::Donate => Self::Donate {
                vm: r.vm()?,
                pfn: r.pfn()?,
                gfn: r.gfn()?,
                nr: r.count()?,
                prot: r.map(|v| Prot::from_bits(v).filter(|p| p.read()))?,
            },
            HostFunction::Reclaim => Self::Reclaim {
                vm: r.vm()?,
                pfn: r.pfn()?,
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            HostFunction::UnshareRange => Self::UnshareRange {
                vm: r.vm()?,
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            HostFunction::WrProtect => Self::WrProtect {
                vm: r.vm()?,
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            HostFunction::RelaxPerms => Self::RelaxPerms {
                vm: r.vm()?,
                gfn: r.gfn()?,
                prot: r.map(|v| Prot::from_bits(v).filter(|p| !p.is_empty()))?,
            },
            HostFunction::TestClearYoung => Self::TestClearYoung {
                vm: r.vm()?,
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            HostFunction::TeardownStart => Self::TeardownStart { vm: r.vm()? },
            HostFunction::TeardownReclaim => Self::TeardownReclaim { vm: r.vm()? },
            HostFunction::TeardownFinalize => Self::TeardownFinalize { vm: r.vm()? },
            HostFunction::VmCounters => Self::VmCounters {
                vm: r.vm()?,
                group: r.map(CounterGroup::from_raw)?,
            },
            HostFunction::HostPageState => Self::HostPageState { pfn: r.pfn()? },
            HostFunction::GuestPageState => Self::GuestPageState {
                vm: r.vm()?,
                gfn: r.gfn()?,
            },
        };
        r.finish()?;
        Ok(call)
    }

    /// The function this call invokes.
    #[must_use]
    pub const fn function(&self) -> HostFunction {
        match self {
            Self::Version => HostFunction::Version,
            Self::Features { .. } => HostFunction::Features,
            Self::MemcacheTopup { .. } => HostFunction::MemcacheTopup,
            Self::MemcacheReclaim { .. } => HostFunction::MemcacheReclaim,
            Self::VmCreate { .. } => HostFunction::VmCreate,
            Self::VcpuCreate { .. } => HostFunction::VcpuCreate,
            Self::VcpuRun { .. } => HostFunction::VcpuRun,
            Self::Share { .. } => HostFunction::Share,
            Self::Unshare { .. } => HostFunction::Unshare,
            Self::Donate { .. } => HostFunction::Donate,
            Self::Reclaim { .. } => HostFunction::Reclaim,
            Self::UnshareRange { .. } => HostFunction::UnshareRange,
            Self::WrProtect { .. } => HostFunction::WrProtect,
            Self::RelaxPerms { .. } => HostFunction::RelaxPerms,
            Self::TestClearYoung { .. } => HostFunction::TestClearYoung,
            Self::TeardownStart { .. } => HostFunction::TeardownStart,
            Self::TeardownReclaim { .. } => HostFunction::TeardownReclaim,
            Self::TeardownFinalize { .. } => HostFunction::TeardownFinalize,
            Self::VmCounters { .. } => HostFunction::VmCounters,
            Self::HostPageState { .. } => HostFunction::HostPageState,
            Self::GuestPageState { .. } => HostFunction::GuestPageState,
        }
    }

    /// The VM the call names, if any.
    #[must_use]
    pub const fn vm(&self) -> Option<VmHandle> {
        match *self {
            Self::Version
            | Self::Features { .. }
            | Self::VmCreate { .. }
            | Self::HostPageState { .. } => None,
            Self::MemcacheTopup { vm, .. }
            | Self::MemcacheReclaim { vm }
            | Self::VcpuCreate { vm, .. }
            | Self::VcpuRun { vm, .. }
            | Self::Share { vm, .. }
            | Self::Unshare { vm, .. }
            | Self::Donate { vm, .. }
            | Self::Reclaim { vm, .. }
            | Self::UnshareRange { vm, .. }
            | Self::WrProtect { vm, .. }
            | Self::RelaxPerms { vm, .. }
            | Self::TestClearYoung { vm, .. }
            | Self::TeardownStart { vm }
            | Self::TeardownReclaim { vm }
            | Self::TeardownFinalize { vm }
            | Self::VmCounters { vm, .. }
            | Self::GuestPageState { vm, .. } => Some(vm),
        }
    }

    /// Encodes the call into x0..x7 (unused registers zero).
    #[must_use]
    pub fn encode(&self) -> Regs {
        let id = u64::from(self.function().id());
        let vm = |h: VmHandle| u64::from(h.raw());
        let n = |c: PageCount| u64::from(c.get());
        match *self {
            Self::Version => build(id, &[]),
            Self::Features { func } => build(id, &[u64::from(func)]),
            Self::MemcacheTopup { vm: h, pfn, nr } => build(id, &[vm(h), pfn.raw(), n(nr)]),
            Self::MemcacheReclaim { vm: h }
            | Self::TeardownStart { vm: h }
            | Self::TeardownReclaim { vm: h }
            | Self::TeardownFinalize { vm: h } => build(id, &[vm(h)]),
            Self::VmCreate {
                ipa_bits,
                nr_vcpus,
                root,
                memory,
            } => {
                let (gfn, pages) = memory.map_or((0, 0), |m| (m.gfn().raw(), m.pages()));
                build(
                    id,
                    &[
                        u64::from(ipa_bits.get()),
                        u64::from(nr_vcpus.get()),
                        root.raw(),
                        gfn,
                        pages,
                    ],
                )
            }
            Self::VcpuCreate { vm: h, vcpu, start } => {
                let [entry, arg, flags] = match start {
                    VcpuStart::On { entry, arg } => [entry, arg, 0],
                    VcpuStart::Off => [0, 0, VCPU_START_OFF],
                };
                build(id, &[vm(h), u64::from(vcpu.get()), entry, arg, flags])
            }
            Self::VcpuRun {
                vm: h,
                vcpu,
                mmio_data,
            } => build(id, &[vm(h), u64::from(vcpu.get()), mmio_data]),
            Self::Share {
                vm: h,
                pfn,
                gfn,
                nr,
                prot,
            }
            | Self::Donate {
                vm: h,
                pfn,
                gfn,
                nr,
                prot,
            } => build(id, &[vm(h), pfn.raw(), gfn.raw(), n(nr), prot.bits()]),
            Self::Unshare {
                vm: h,
                pfn,
                gfn,
                nr,
            }
            | Self::Reclaim {
                vm: h,
                pfn,
                gfn,
                nr,
            } => build(id, &[vm(h), pfn.raw(), gfn.raw(), n(nr)]),
            Self::UnshareRange { vm: h, gfn, nr }
            | Self::WrProtect { vm: h, gfn, nr }
            | Self::TestClearYoung { vm: h, gfn, nr } => build(id, &[vm(h), gfn.raw(), n(nr)]),
            Self::RelaxPerms { vm: h, gfn, prot } => build(id, &[vm(h), gfn.raw(), prot.bits()]),
            Self::VmCounters { vm: h, group } => build(id, &[vm(h), group as u64]),
            Self::HostPageState { pfn } => build(id, &[pfn.raw()]),
            Self::GuestPageState { vm: h, gfn } => build(id, &[vm(h), gfn.raw()]),
        }
    }
}
