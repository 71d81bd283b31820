//! Typed results: what x0..x7 hold when a call returns.
//!
//! x0 is 0 on success and the negative [`HypError`] code on failure; a failed
//! call returns zero in x1..x7. What x1..x7 hold on success depends on the
//! call, so decoding a reply needs the call ([`Hypercall::decode_reply`]).

use core::fmt;

use crate::call::{CounterGroup, Hypercall};
use crate::error::HypError;
use crate::guest::GuestCall;
use crate::regs::{build, Reader, Regs};
use crate::types::{Gfn, PageCount, Pfn, Prot, VmHandle};
use crate::{
    ABI_VERSION_MAJOR, ABI_VERSION_MINOR, CONSOLE_MAX_BYTES, MEMCACHE_RECLAIM_MAX, TEARDOWN_BATCH,
};

/// Why decoding a reply failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplyError {
    /// The call failed with this error (x0 < 0).
    Failed(HypError),
    /// The registers are not a reply this call can give (x0 > 0, a
    /// non-zero unused register, a value out of its domain). A hypervisor
    /// bug or an ABI mismatch.
    Malformed,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(e) => write!(f, "hypercall failed: {e}"),
            Self::Malformed => f.write_str("malformed hypercall reply"),
        }
    }
}

impl core::error::Error for ReplyError {}

/// An ABI version (`HYP_VERSION`, §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AbiVersion {
    /// Incremented on incompatible changes.
    pub major: u16,
    /// Incremented on compatible additions.
    pub minor: u16,
}

impl AbiVersion {
    /// The version this crate describes.
    pub const CURRENT: Self = Self {
        major: ABI_VERSION_MAJOR,
        minor: ABI_VERSION_MINOR,
    };
}

/// Up to [`MEMCACHE_RECLAIM_MAX`] frames returned by `HYP_MEMCACHE_RECLAIM` (§3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReclaimedPages {
    len: u8,
    pfns: [Pfn; MEMCACHE_RECLAIM_MAX],
}

impl ReclaimedPages {
    /// No pages (the memcache had no free page).
    pub const EMPTY: Self = Self {
        len: 0,
        pfns: [Pfn::ZERO; MEMCACHE_RECLAIM_MAX],
    };

    /// A list, or `None` if `pfns` is longer than [`MEMCACHE_RECLAIM_MAX`].
    #[must_use]
    pub fn new(pfns: &[Pfn]) -> Option<Self> {
        if pfns.len() > MEMCACHE_RECLAIM_MAX {
            return None;
        }
        let mut out = Self::EMPTY;
        for (slot, p) in out.pfns.iter_mut().zip(pfns) {
            *slot = *p;
        }
        out.len = u8::try_from(pfns.len()).ok()?;
        Some(out)
    }

    /// The frames.
    #[must_use]
    pub fn as_slice(&self) -> &[Pfn] {
        self.pfns.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

/// Bytes of console output (`HYP_GUEST_CONSOLE_WRITE`, §4.2): 1..=16 bytes
/// carried in two registers, little-endian, unused bytes zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConsoleBytes {
    len: u8,
    bytes: [u8; CONSOLE_MAX_BYTES],
}

impl ConsoleBytes {
    /// The bytes, or `None` if empty or longer than [`CONSOLE_MAX_BYTES`].
    #[must_use]
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > CONSOLE_MAX_BYTES {
            return None;
        }
        let mut out = Self {
            len: u8::try_from(bytes.len()).ok()?,
            bytes: [0; CONSOLE_MAX_BYTES],
        };
        for (slot, b) in out.bytes.iter_mut().zip(bytes) {
            *slot = *b;
        }
        Some(out)
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// `[len, low 8 bytes, high 8 bytes]` as register values.
    pub(crate) fn to_regs(self) -> [u64; 3] {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        for (slot, b) in lo.iter_mut().chain(hi.iter_mut()).zip(&self.bytes) {
            *slot = *b;
        }
        [
            u64::from(self.len),
            u64::from_le_bytes(lo),
            u64::from_le_bytes(hi),
        ]
    }

    /// Reads `len, lo, hi` from the next three registers.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, HypError> {
        let len = r.map(|v| {
            u8::try_from(v)
                .ok()
                .filter(|&l| l >= 1 && usize::from(l) <= CONSOLE_MAX_BYTES)
        })?;
        let lo = r.raw()?.to_le_bytes();
        let hi = r.raw()?.to_le_bytes();
        let mut bytes = [0u8; CONSOLE_MAX_BYTES];
        for (slot, b) in bytes.iter_mut().zip(lo.iter().chain(hi.iter())) {
            *slot = *b;
        }
        if bytes.iter().skip(usize::from(len)).any(|&b| b != 0) {
            return Err(HypError::InvalidArgument);
        }
        Ok(Self { len, bytes })
    }
}

/// The kind of access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Access {
    /// A data read.
    Read = 0,
    /// A data write.
    Write = 1,
    /// An instruction fetch.
    Exec = 2,
}

impl Access {
    /// The access for a raw value.
    #[must_use]
    pub const fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Read),
            1 => Some(Self::Write),
            2 => Some(Self::Exec),
            _ => None,
        }
    }
}

/// What kind of stage-2 fault a [`VcpuExit::MemFault`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultKind {
    /// Nothing is mapped at the frame: share or donate a page there.
    Unmapped = 0,
    /// The frame is mapped without the permission the access needs (for
    /// example after `HYP_WRPROTECT`): relax its permissions.
    Permission = 1,
}

impl FaultKind {
    /// The kind for a raw value.
    #[must_use]
    pub const fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Unmapped),
            1 => Some(Self::Permission),
            _ => None,
        }
    }
}

/// The size of an MMIO access in bytes (1, 2, 4 or 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmioSize(u8);

impl MmioSize {
    /// `bytes` if it is 1, 2, 4 or 8.
    #[must_use]
    pub const fn new(bytes: u8) -> Option<Self> {
        match bytes {
            1 | 2 | 4 | 8 => Some(Self(bytes)),
            _ => None,
        }
    }

    /// The size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u8 {
        self.0
    }

    /// The mask of the value bits an access of this size moves.
    #[must_use]
    pub const fn mask(self) -> u64 {
        match self.0 {
            8 => u64::MAX,
            n => (1u64 << (n as u32 * 8)) - 1,
        }
    }
}

/// IPAs in exits are below this (52-bit IPAs).
const IPA_LIMIT: u64 = 1 << 52;

/// The exit reason codes of `HYP_VCPU_RUN` (x1), see §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitReason {
    /// A host interrupt (or the time slice) ended the run; run again.
    Interrupted = 0,
    /// A stage-2 fault on a guest frame of the VM's memory.
    MemFault = 1,
    /// The guest wrote to the console.
    Console = 2,
    /// The guest asked for memory to be shared.
    ShareRequest = 3,
    /// The guest asked for memory to be unshared.
    UnshareRequest = 4,
    /// The guest asked to stop (`HYP_GUEST_SHUTDOWN`).
    Shutdown = 5,
    /// A trap the hypervisor does not handle.
    UnhandledTrap = 6,
    /// A data access outside the VM's memory, for the host to emulate.
    Mmio = 7,
    /// The guest executed WFI or WFE.
    Wfx = 8,
    /// The guest called PSCI `SYSTEM_OFF` or `SYSTEM_RESET`.
    SystemOff = 9,
    /// The vCPU is powered off (never started, or PSCI `CPU_OFF`).
    PoweredOff = 10,
}

impl ExitReason {
    /// Every reason, in code order.
    pub const ALL: &'static [Self] = &[
        Self::Interrupted,
        Self::MemFault,
        Self::Console,
        Self::ShareRequest,
        Self::UnshareRequest,
        Self::Shutdown,
        Self::UnhandledTrap,
        Self::Mmio,
        Self::Wfx,
        Self::SystemOff,
        Self::PoweredOff,
    ];

    /// The C macro name.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        match self {
            Self::Interrupted => "HYP_EXIT_INTERRUPTED",
            Self::MemFault => "HYP_EXIT_MEM_FAULT",
            Self::Console => "HYP_EXIT_CONSOLE",
            Self::ShareRequest => "HYP_EXIT_SHARE_REQUEST",
            Self::UnshareRequest => "HYP_EXIT_UNSHARE_REQUEST",
            Self::Shutdown => "HYP_EXIT_SHUTDOWN",
            Self::UnhandledTrap => "HYP_EXIT_UNHANDLED_TRAP",
            Self::Mmio => "HYP_EXIT_MMIO",
            Self::Wfx => "HYP_EXIT_WFX",
            Self::SystemOff => "HYP_EXIT_SYSTEM_OFF",
            Self::PoweredOff => "HYP_EXIT_POWERED_OFF",
        }
    }

    /// The register layout of the exit, for the C header.
    #[must_use]
    pub const fn layout(self) -> &'static str {
        match self {
            Self::Interrupted => "no info; run again",
            Self::MemFault => "x2=gfn x3=access (HYP_ACCESS_*) x4=kind (HYP_FAULT_*)",
            Self::Console => "x2=len (1..16) x3=bytes 0..7 x4=bytes 8..15 (little-endian)",
            Self::ShareRequest => "x2=gfn x3=nr_pages",
            Self::UnshareRequest => "x2=gfn x3=nr_pages",
            Self::Shutdown => "no info",
            Self::UnhandledTrap => "x2=ESR_EL2 x3=FAR_EL2",
            Self::Mmio => "x2=IPA x3=size (1,2,4,8) x4=write (0|1) x5=data written (0 for a read)",
            Self::Wfx => "x2=wfe (0 WFI, 1 WFE); run again",
            Self::SystemOff => "x2=reset (0 SYSTEM_OFF, 1 SYSTEM_RESET)",
            Self::PoweredOff => "no info; run again after a guest PSCI CPU_ON",
        }
    }
}

/// Why `HYP_VCPU_RUN` returned (§3.7, §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcpuExit {
    /// A host interrupt ended the run; run again.
    Interrupted,
    /// The guest touched `gfn` of its memory, which is not mapped (or not
    /// with the permission the access needs); map or relax and run again.
    MemFault {
        /// The faulting guest frame.
        gfn: Gfn,
        /// What the guest tried.
        access: Access,
        /// Unmapped or a permission fault.
        kind: FaultKind,
    },
    /// The guest wrote to the console (`HYP_GUEST_CONSOLE_WRITE`).
    Console(ConsoleBytes),
    /// The guest called `HYP_GUEST_SHARE_REQUEST`.
    ShareRequest {
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// The guest called `HYP_GUEST_UNSHARE_REQUEST`.
    UnshareRequest {
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// The guest called `HYP_GUEST_SHUTDOWN`.
    Shutdown,
    /// A trap the hypervisor does not handle; the vCPU cannot make progress.
    UnhandledTrap {
        /// `ESR_EL2` of the trap.
        esr: u64,
        /// `FAR_EL2` of the trap (0 where the architecture leaves it unknown).
        far: u64,
    },
    /// A data access outside the VM's memory (§3.5). A write is complete
    /// (the guest has moved on); a read completes on the next
    /// `HYP_VCPU_RUN`, whose x3 is the value read.
    Mmio {
        /// The IPA accessed (byte address).
        ipa: u64,
        /// Access size.
        size: MmioSize,
        /// A store (`data` holds the value) rather than a load (`data` is 0).
        write: bool,
        /// The value stored, within `size`.
        data: u64,
    },
    /// The guest executed WFI (or WFE); the instruction is complete.
    Wfx {
        /// WFE rather than WFI.
        wfe: bool,
    },
    /// The guest called PSCI `SYSTEM_OFF` (or `SYSTEM_RESET`).
    SystemOff {
        /// `SYSTEM_RESET` rather than `SYSTEM_OFF`.
        reset: bool,
    },
    /// The vCPU is powered off; it runs after another vCPU's PSCI `CPU_ON`.
    PoweredOff,
}

impl VcpuExit {
    /// The reason code.
    #[must_use]
    pub const fn reason(&self) -> ExitReason {
        match self {
            Self::Interrupted => ExitReason::Interrupted,
            Self::MemFault { .. } => ExitReason::MemFault,
            Self::Console(_) => ExitReason::Console,
            Self::ShareRequest { .. } => ExitReason::ShareRequest,
            Self::UnshareRequest { .. } => ExitReason::UnshareRequest,
            Self::Shutdown => ExitReason::Shutdown,
            Self::UnhandledTrap { .. } => ExitReason::UnhandledTrap,
            Self::Mmio { .. } => ExitReason::Mmio,
            Self::Wfx { .. } => ExitReason::Wfx,
            Self::SystemOff { .. } => ExitReason::SystemOff,
            Self::PoweredOff => ExitReason::PoweredOff,
        }
    }

    fn to_args(self) -> [u64; 5] {
        let reason = self.reason() as u64;
        match self {
            Self::Interrupted | Self::Shutdown | Self::PoweredOff => [reason, 0, 0, 0, 0],
            Self::MemFault { gfn, access, kind } => {
                [reason, gfn.raw(), access as u64, kind as u64, 0]
            }
            Self::Console(c) => {
                let [len, lo, hi] = c.to_regs();
                [reason, len, lo, hi, 0]
            }
            Self::ShareRequest { gfn, nr } | Self::UnshareRequest { gfn, nr } => {
                [reason, gfn.raw(), u64::from(nr.get()), 0, 0]
            }
            Self::UnhandledTrap { esr, far } => [reason, esr, far, 0, 0],
            Self::Mmio {
                ipa,
                size,
                write,
                data,
            } => [
                reason,
                ipa,
                u64::from(size.bytes()),
                u64::from(write),
                if write { data & size.mask() } else { 0 },
            ],
            Self::Wfx { wfe } => [reason, u64::from(wfe), 0, 0, 0],
            Self::SystemOff { reset } => [reason, u64::from(reset), 0, 0, 0],
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, HypError> {
        Ok(match r.raw()? {
            0 => Self::Interrupted,
            1 => Self::MemFault {
                gfn: r.gfn()?,
                access: r.map(Access::from_raw)?,
                kind: r.map(FaultKind::from_raw)?,
            },
            2 => Self::Console(ConsoleBytes::read(r)?),
            3 => Self::ShareRequest {
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            4 => Self::UnshareRequest {
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            5 => Self::Shutdown,
            6 => Self::UnhandledTrap {
                esr: r.raw()?,
                far: r.raw()?,
            },
            7 => {
                let ipa = r.map(|v| (v < IPA_LIMIT).then_some(v))?;
                let size = r.map(|v| MmioSize::new(u8::try_from(v).ok()?))?;
                let write = r.bool()?;
                let data = r.map(|v| (v & !size.mask() == 0 && (write || v == 0)).then_some(v))?;
                Self::Mmio {
                    ipa,
                    size,
                    write,
                    data,
                }
            }
            8 => Self::Wfx { wfe: r.bool()? },
            9 => Self::SystemOff { reset: r.bool()? },
            10 => Self::PoweredOff,
            _ => return Err(HypError::InvalidArgument),
        })
    }
}

/// Result of one `HYP_TEARDOWN_RECLAIM` (§3.16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TeardownProgress {
    /// Leaf updates done by this call (at most [`TEARDOWN_BATCH`]).
    pub reclaimed: u32,
    /// Whether more work remains (call again before `HYP_TEARDOWN_FINALIZE`).
    pub more: bool,
}

/// Counter group 0 (§3.18). Page counts are in 4 KiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Stage2Counters {
    /// Pages mapped in the VM's stage 2.
    pub maps: u64,
    /// Pages unmapped from the VM's stage 2.
    pub unmaps: u64,
    /// TLB invalidation operations issued for the VM's VMID.
    pub tlbi: u64,
    /// Pages shared with the VM (`HYP_SHARE`).
    pub shares: u64,
    /// Pages unshared (`HYP_UNSHARE`, and borrow mappings dropped by teardown).
    pub unshares: u64,
    /// Pages donated to the VM (`HYP_DONATE`).
    pub donations: u64,
    /// Pages reclaimed from the VM (`HYP_RECLAIM` and teardown).
    pub reclaims: u64,
}

/// Counter group 1 (§3.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuntimeCounters {
    /// Stage-2 faults taken from the VM's vCPUs.
    pub faults: u64,
    /// `HYP_VCPU_RUN` calls that entered the guest.
    pub vcpu_runs: u64,
    /// Gauge: free pages in the VM's memcache now.
    pub memcache_pages: u64,
    /// Gauge: pages used now by the VM's stage-2 tables (root included).
    pub table_pages: u64,
    /// `HYP_VCPU_RUN` calls that returned an exit to the host.
    pub host_exits: u64,
    /// Guest exits the hypervisor answered without the host (guest calls
    /// such as `HYP_GUEST_VERSION` and errors, PSCI, access-flag faults).
    pub hyp_exits: u64,
    /// Guest runs ended by a physical interrupt (`HYP_EXIT_INTERRUPTED`).
    pub irq_exits: u64,
}

/// The counters `HYP_VM_COUNTERS` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counters {
    /// Group 0.
    Stage2(Stage2Counters),
    /// Group 1.
    Runtime(RuntimeCounters),
}

impl Counters {
    /// The group these counters belong to.
    #[must_use]
    pub const fn group(&self) -> CounterGroup {
        match self {
            Self::Stage2(_) => CounterGroup::Stage2,
            Self::Runtime(_) => CounterGroup::Runtime,
        }
    }
}

/// Who owns a host frame (§2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The host kernel.
    Host,
    /// The hypervisor.
    Hyp,
    /// A VM.
    Vm(VmHandle),
}

/// Owner kind code: host.
pub const OWNER_HOST: u64 = 0;
/// Owner kind code: hypervisor.
pub const OWNER_HYP: u64 = 1;
/// Owner kind code: a VM.
pub const OWNER_VM: u64 = 2;

/// The owner's own view of a frame it owns (§2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OwnerState {
    /// Exclusive.
    Owned = 0,
    /// Owned and lent to at least one borrower.
    SharedOwned = 1,
}

/// `HYP_HOST_PAGE_STATE` result (§3.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPageInfo {
    /// The owner.
    pub owner: Owner,
    /// The owner's state.
    pub state: OwnerState,
    /// Number of guest borrow mappings of the frame.
    pub share_count: u32,
}

/// A party's view of a page (§2.5), as `HYP_GUEST_PAGE_STATE` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Exclusive (a donated page, from the guest's side).
    Owned = 1,
    /// Owned and lent to someone else.
    SharedOwned = 2,
    /// Someone else's page this party may access (a shared page, from the guest's side).
    SharedBorrowed = 3,
}

/// State code for an unmapped guest frame in `HYP_GUEST_PAGE_STATE`.
pub const PAGE_STATE_NONE: u64 = 0;

/// `HYP_GUEST_PAGE_STATE` result (§3.20).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestPage {
    /// Nothing is mapped at the frame (the guest's view is NONE).
    Unmapped,
    /// A 4 KiB page (or part of a block) is mapped.
    Mapped {
        /// The guest's view.
        state: PageState,
        /// The host frame backing the guest frame.
        pfn: Pfn,
        /// The guest's permissions.
        prot: Prot,
    },
}

/// A successful reply's payload (x1..x7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// Nothing beyond x0 = 0.
    Done,
    /// `HYP_VERSION`, `HYP_GUEST_VERSION`: x1 = major, x2 = minor.
    Version(AbiVersion),
    /// `HYP_FEATURES`: x1 = 1 if supported, else 0.
    Features {
        /// Whether the function id is supported.
        supported: bool,
    },
    /// `HYP_MEMCACHE_RECLAIM`: x1 = count, x2.. = frames.
    MemcacheReclaimed(ReclaimedPages),
    /// `HYP_VM_CREATE`: x1 = handle.
    VmCreated {
        /// The new VM.
        vm: VmHandle,
    },
    /// `HYP_VCPU_RUN`: x1 = exit reason, x2..x5 = exit info.
    Exit(VcpuExit),
    /// `HYP_WRPROTECT`: x1 = pages whose permissions changed.
    WrProtected {
        /// At most the call's page count.
        pages: u32,
    },
    /// `HYP_UNSHARE_RANGE`: x1 = pages unshared (the mapped pages of the range).
    Unshared {
        /// At most the call's page count.
        pages: u32,
    },
    /// `HYP_TEST_CLEAR_YOUNG`: x1 = 1 if any access flag was set.
    Young {
        /// Whether any page in the range had been accessed.
        young: bool,
    },
    /// `HYP_TEARDOWN_RECLAIM`: x1 = reclaimed, x2 = more.
    Teardown(TeardownProgress),
    /// `HYP_VM_COUNTERS`: x1..x7 = the group's counters in field order.
    Counters(Counters),
    /// `HYP_HOST_PAGE_STATE`: x1 = owner kind, x2 = owner VM, x3 = owner state, x4 = share count.
    HostPage(HostPageInfo),
    /// `HYP_GUEST_PAGE_STATE`: x1 = state, x2 = pfn, x3 = prot.
    GuestPage(GuestPage),
}

impl Reply {
    /// Encodes a successful reply: x0 = 0, payload in x1.., the rest zero.
    #[must_use]
    pub fn encode(&self) -> Regs {
        match *self {
            Self::Done => build(0, &[]),
            Self::Version(v) => build(0, &[u64::from(v.major), u64::from(v.minor)]),
            Self::Features { supported } => build(0, &[u64::from(supported)]),
            Self::MemcacheReclaimed(p) => {
                let mut regs = build(0, &[p.as_slice().len() as u64]);
                for (slot, pfn) in regs.iter_mut().skip(2).zip(p.as_slice()) {
                    *slot = pfn.raw();
                }
                regs
            }
            Self::VmCreated { vm } => build(0, &[u64::from(vm.raw())]),
            Self::Exit(e) => build(0, &e.to_args()),
            Self::WrProtected { pages } | Self::Unshared { pages } => build(0, &[u64::from(pages)]),
            Self::Young { young } => build(0, &[u64::from(young)]),
            Self::Teardown(t) => build(0, &[u64::from(t.reclaimed), u64::from(t.more)]),
            Self::Counters(Counters::Stage2(c)) => build(
                0,
                &[
                    c.maps,
                    c.unmaps,
                    c.tlbi,
                    c.shares,
                    c.unshares,
                    c.donations,
                    c.reclaims,
                ],
            ),
            Self::Counters(Counters::Runtime(c)) => build(
                0,
                &[
                    c.faults,
                    c.vcpu_runs,
                    c.memcache_pages,
                    c.table_pages,
                    c.host_exits,
                    c.hyp_exits,
                    c.irq_exits,
                ],
            ),
            Self::HostPage(info) => {
                let (kind, vm) = match info.owner {
                    Owner::Host => (OWNER_HOST, 0),
                    Owner::Hyp => (OWNER_HYP, 0),
                    Owner::Vm(h) => (OWNER_VM, u64::from(h.raw())),
                };
                build(
                    0,
                    &[kind, vm, info.state as u64, u64::from(info.share_count)],
                )
            }
            Self::GuestPage(GuestPage::Unmapped) => build(0, &[PAGE_STATE_NONE]),
            Self::GuestPage(GuestPage::Mapped { state, pfn, prot }) => {
                build(0, &[state as u64, pfn.raw(), prot.bits()])
            }
        }
    }
}

/// Encodes the outcome of a call into x0..x7.
#[must_use]
pub fn encode_result(result: &Result<Reply, HypError>) -> Regs {
    match result {
        Ok(reply) => reply.encode(),
        Err(e) => e.encode(),
    }
}

/// The shape of the payload a function returns on success.
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    Done,
    Version,
    Features,
    MemcacheReclaimed,
    VmCreated,
    Exit,
    WrProtected { max: u32 },
    Unshared { max: u32 },
    Young,
    Teardown,
    Counters(CounterGroup),
    HostPage,
    GuestPage,
}

/// Splits x0 into success or failure, then decodes the payload by `shape`.
pub(crate) fn decode_reply(shape: Shape, regs: &Regs) -> Result<Reply, ReplyError> {
    let malformed = |_| ReplyError::Malformed;
    let x0 = regs[0] as i64;
    if x0 < 0 {
        if regs.iter().skip(1).any(|&v| v != 0) {
            return Err(ReplyError::Malformed);
        }
        return Err(ReplyError::Failed(HypError::from_i64(x0)));
    }
    if x0 != 0 {
        return Err(ReplyError::Malformed);
    }
    let mut r = Reader::new(regs, HypError::InvalidArgument);
    let reply = read_payload(shape, &mut r).map_err(malformed)?;
    r.finish().map_err(malformed)?;
    Ok(reply)
}

fn read_payload(shape: Shape, r: &mut Reader<'_>) -> Result<Reply, HypError> {
    Ok(match shape {
        Shape::Done => Reply::Done,
        Shape::Version => Reply::Version(AbiVersion {
            major: r.u16()?,
            minor: r.u16()?,
        }),
        Shape::Features => Reply::Features {
            supported: r.bool()?,
        },
        Shape::MemcacheReclaimed => {
            let n = r.map(|v| {
                usize::try_from(v)
                    .ok()
                    .filter(|&n| n <= MEMCACHE_RECLAIM_MAX)
            })?;
            let mut pages = ReclaimedPages::EMPTY;
            for slot in pages.pfns.iter_mut().take(n) {
                *slot = r.pfn()?;
            }
            pages.len = u8::try_from(n).map_err(|_| HypError::InvalidArgument)?;
            Reply::MemcacheReclaimed(pages)
        }
        Shape::VmCreated => Reply::VmCreated { vm: r.vm()? },
        Shape::Exit => Reply::Exit(VcpuExit::read(r)?),
        Shape::WrProtected { max } => Reply::WrProtected {
            pages: r.map(|v| u32::try_from(v).ok().filter(|&p| p <= max))?,
        },
        Shape::Unshared { max } => Reply::Unshared {
            pages: r.map(|v| u32::try_from(v).ok().filter(|&p| p <= max))?,
        },
        Shape::Young => Reply::Young { young: r.bool()? },
        Shape::Teardown => Reply::Teardown(TeardownProgress {
            reclaimed: r.map(|v| u32::try_from(v).ok().filter(|&n| n <= TEARDOWN_BATCH))?,
            more: r.bool()?,
        }),
        Shape::Counters(CounterGroup::Stage2) => {
            Reply::Counters(Counters::Stage2(Stage2Counters {
                maps: r.raw()?,
                unmaps: r.raw()?,
                tlbi: r.raw()?,
                shares: r.raw()?,
                unshares: r.raw()?,
                donations: r.raw()?,
                reclaims: r.raw()?,
            }))
        }
        Shape::Counters(CounterGroup::Runtime) => {
            Reply::Counters(Counters::Runtime(RuntimeCounters {
                faults: r.raw()?,
                vcpu_runs: r.raw()?,
                memcache_pages: r.raw()?,
                table_pages: r.raw()?,
                host_exits: r.raw()?,
                hyp_exits: r.raw()?,
                irq_exits: r.raw()?,
            }))
        }
        Shape::HostPage => {
            let kind = r.raw()?;
            let vm = r.u32()?;
            let owner = match (kind, vm) {
                (OWNER_HOST, 0) => Owner::Host,
                (OWNER_HYP, 0) => Owner::Hyp,
                (OWNER_VM, raw) => {
                    Owner::Vm(VmHandle::from_raw(raw).ok_or(HypError::InvalidArgument)?)
                }
                _ => return Err(HypError::InvalidArgument),
            };
            let state = r.map(|v| match v {
                0 => Some(OwnerState::Owned),
                1 => Some(OwnerState::SharedOwned),
                _ => None,
            })?;
            Reply::HostPage(HostPageInfo {
                owner,
                state,
                share_count: r.u32()?,
            })
        }
        Shape::GuestPage => {
            let state = match r.raw()? {
                PAGE_STATE_NONE => None,
                1 => Some(PageState::Owned),
                2 => Some(PageState::SharedOwned),
                3 => Some(PageState::SharedBorrowed),
                _ => return Err(HypError::InvalidArgument),
            };
            match state {
                None => Reply::GuestPage(GuestPage::Unmapped),
                Some(state) => Reply::GuestPage(GuestPage::Mapped {
                    state,
                    pfn: r.pfn()?,
                    prot: r.prot()?,
                }),
            }
        }
    })
}

impl Hypercall {
    /// The payload shape this call returns on success.
    pub(crate) fn reply_shape(&self) -> Shape {
        match *self {
            Self::Version => Shape::Version,
            Self::Features { .. } => Shape::Features,
            Self::MemcacheReclaim { .. } => Shape::MemcacheReclaimed,
            Self::VmCreate { .. } => Shape::VmCreated,
            Self::VcpuRun { .. } => Shape::Exit,
            Self::WrProtect { nr, .. } => Shape::WrProtected { max: nr.get() },
            Self::UnshareRange { nr, .. } => Shape::Unshared { max: nr.get() },
            Self::TestClearYoung { .. } => Shape::Young,
            Self::TeardownReclaim { .. } => Shape::Teardown,
            Self::VmCounters { group, .. } => Shape::Counters(group),
            Self::HostPageState { .. } => Shape::HostPage,
            Self::GuestPageState { .. } => Shape::GuestPage,
            Self::MemcacheTopup { .. }
            | Self::VcpuCreate { .. }
            | Self::Share { .. }
            | Self::Unshare { .. }
            | Self::Donate { .. }
            | Self::Reclaim { .. }
            | Self::RelaxPerms { .. }
            | Self::TeardownStart { .. }
            | Self::TeardownFinalize { .. } => Shape::Done,
        }
    }

    /// Decodes the registers this call returned. Strict: anything `encode`
    /// could not have produced for this call is [`ReplyError::Malformed`].
    pub fn decode_reply(&self, regs: &Regs) -> Result<Reply, ReplyError> {
        decode_reply(self.reply_shape(), regs)
    }
}

impl GuestCall {
    /// Decodes the registers this guest call returned (see [`Hypercall::decode_reply`]).
    pub fn decode_reply(&self, regs: &Regs) -> Result<Reply, ReplyError> {
        let shape = match self {
            Self::Version => Shape::Version,
            Self::ConsoleWrite(_)
            | Self::ShareRequest { .. }
            | Self::UnshareRequest { .. }
            | Self::Shutdown => Shape::Done,
        };
        decode_reply(shape, regs)
    }
}
