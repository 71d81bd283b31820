//! The decisions of the shim (the `/dev/s2pin` device): memory-slot
//! validation and lookup, the fault/invalidate sequence count, the
//! MMU-notifier policies, and turning a `HYP_VCPU_RUN` reply into the next
//! step. Plain safe Rust with no allocation and no panics on any input, so
//! it is unit- and property-tested on the build machine; the C glue does the
//! kernel calls and keeps the state in the layouts declared here.

use core::fmt::Write as _;

use hypercalls::{
    Access, FaultKind, Hypercall, Regs, Reply, ReplyError, VcpuExit, VcpuIndex, VmHandle,
};
use s2pin_uapi::{
    Exit, Policy, RunConsole, RunMmio, RunRange, RunSystemEvent, RunUnhandled, S2pinRun,
    S2pinUserspaceMemoryRegion, S2pinVmStats, SystemEventType, S2PIN_MAX_MEMSLOTS,
    S2PIN_MEM_READONLY, S2PIN_PAGE_SIZE, STATS_COUNT,
};

use crate::format::{format_into, Error};

/// Linux errno values the decisions return (positive).
pub mod errno {
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Exists (overlap, slot in use).
    pub const EEXIST: i32 = 17;
}

/// Guest page shift.
pub const PAGE_SHIFT: u32 = 12;

/// One memory slot as the C glue stores it (`struct s2pin_memslot` in
/// `s2pin_core.h`). `used == 0`: free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memslot {
    /// First guest frame.
    pub base_gfn: u64,
    /// Pages.
    pub npages: u64,
    /// Host virtual address of the first page.
    pub uaddr: u64,
    /// `S2PIN_MEM_READONLY` or 0.
    pub flags: u32,
    /// Non-zero when the slot exists.
    pub used: u32,
}

// The C glue declares these layouts in s2pin_core.h and asserts the same sizes.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Memslot>() == 32);
    assert!(size_of::<InvState>() == 32);
    assert!(size_of::<PteState>() == 8);
    assert!(size_of::<ExitInfo>() == 32);
    assert!(size_of::<UnshareRun>() == 24);
};

impl Memslot {
    /// Whether `gfn` is inside this (used) slot.
    #[must_use]
    pub fn contains(&self, gfn: u64) -> bool {
        self.used != 0 && gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }

    /// Whether the guest may only read the slot.
    #[must_use]
    pub fn readonly(&self) -> bool {
        self.flags & S2PIN_MEM_READONLY != 0
    }
}

/// What `SET_USER_MEMORY_REGION` asks for, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionOp {
    /// Fill the (free) slot with this.
    Create(Memslot),
    /// Delete the (used) slot.
    Delete,
}

/// The guest RAM window in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First frame.
    pub base_gfn: u64,
    /// Number of frames (non-zero).
    pub pages: u64,
}

/// Validates `r` against the slots (indexed by slot id) and the RAM window,
/// as KVM's `__kvm_set_memory_region`: bounded slot ids, known flags,
/// page-aligned address/size/host address, no overflow, inside the window,
/// no overlap with another slot. A used slot can only be deleted (size 0);
/// changing it is `EEXIST`. Deleting a free slot is `EINVAL`. The host
/// address is checked against the user address space by the caller.
///
/// # Errors
/// A positive errno.
pub fn check_region(
    slots: &[Memslot],
    r: &S2pinUserspaceMemoryRegion,
    window: Window,
) -> Result<RegionOp, i32> {
    use errno::{EEXIST, EINVAL};
    let id = usize::try_from(r.slot).map_err(|_| EINVAL)?;
    if r.slot >= S2PIN_MAX_MEMSLOTS {
        return Err(EINVAL);
    }
    let cur = slots.get(id).ok_or(EINVAL)?;
    if r.flags & !S2PIN_MEM_READONLY != 0 {
        return Err(EINVAL);
    }
    if r.memory_size == 0 {
        return if cur.used != 0 {
            Ok(RegionOp::Delete)
        } else {
            Err(EINVAL)
        };
    }
    let mask = S2PIN_PAGE_SIZE - 1;
    if r.guest_phys_addr & mask != 0 || r.memory_size & mask != 0 || r.userspace_addr & mask != 0 {
        return Err(EINVAL);
    }
    r.guest_phys_addr.checked_add(r.memory_size).ok_or(EINVAL)?;
    r.userspace_addr.checked_add(r.memory_size).ok_or(EINVAL)?;
    let base_gfn = r.guest_phys_addr >> PAGE_SHIFT;
    let npages = r.memory_size >> PAGE_SHIFT;
    let win_end = window.base_gfn.checked_add(window.pages).ok_or(EINVAL)?;
    let end = base_gfn.checked_add(npages).ok_or(EINVAL)?;
    if base_gfn < window.base_gfn || end > win_end {
        return Err(EINVAL);
    }
    if cur.used != 0 {
        return Err(EEXIST);
    }
    for s in slots.iter().filter(|s| s.used != 0) {
        let s_end = s.base_gfn.saturating_add(s.npages);
        if base_gfn < s_end && s.base_gfn < end {
            return Err(EEXIST);
        }
    }
    Ok(RegionOp::Create(Memslot {
        base_gfn,
        npages,
        uaddr: r.userspace_addr,
        flags: r.flags,
        used: 1,
    }))
}

/// Validates `S2PIN_CREATE_VM`'s argument: flags 0, a known policy, an IPA
/// size in range (0 means the default), a page-aligned, non-empty RAM
/// window inside the IPA space. Returns the IPA size and the policy.
///
/// # Errors
/// `EINVAL`.
pub fn check_create_vm(a: &s2pin_uapi::S2pinCreateVm) -> Result<(u32, Policy), i32> {
    use errno::EINVAL;
    let policy = Policy::from_u32(a.policy).ok_or(EINVAL)?;
    if a.flags != 0 {
        return Err(EINVAL);
    }
    let bits = if a.ipa_bits == 0 {
        s2pin_uapi::S2PIN_DEFAULT_IPA_BITS
    } else {
        a.ipa_bits
    };
    if !(s2pin_uapi::S2PIN_MIN_IPA_BITS..=s2pin_uapi::S2PIN_MAX_IPA_BITS).contains(&bits) {
        return Err(EINVAL);
    }
    let mask = S2PIN_PAGE_SIZE - 1;
    if a.mem_size == 0 || a.mem_base & mask != 0 || a.mem_size & mask != 0 {
        return Err(EINVAL);
    }
    let end = a.mem_base.checked_add(a.mem_size).ok_or(EINVAL)?;
    if end > 1u64 << bits {
        return Err(EINVAL);
    }
    Ok((bits, policy))
}

/// The slot holding `gfn`, if any.
#[must_use]
pub fn find_slot(slots: &[Memslot], gfn: u64) -> Option<usize> {
    slots.iter().position(|s| s.contains(gfn))
}

/// The slot's page indices whose host pages intersect `[start, end)`:
/// `(first, last)` with `last` exclusive, or `None` when none does (or the
/// slot is free).
#[must_use]
pub fn slot_page_range(slot: &Memslot, start: u64, end: u64) -> Option<(u64, u64)> {
    if slot.used == 0 || start >= end {
        return None;
    }
    if slot.npages > (u64::MAX >> PAGE_SHIFT) {
        return None;
    }
    let bytes = slot.npages << PAGE_SHIFT;
    let s_end = slot.uaddr.checked_add(bytes)?;
    if end <= slot.uaddr || start >= s_end {
        return None;
    }
    let first = start.saturating_sub(slot.uaddr) >> PAGE_SHIFT;
    let last = if end < s_end {
        // Round up: a partly covered page counts.
        (end - slot.uaddr).div_ceil(S2PIN_PAGE_SIZE)
    } else {
        slot.npages
    };
    (first < last).then_some((first, last))
}

/// A run of pages contiguous in both gfn and pfn, unshared with one
/// `HYP_UNSHARE` (`struct s2pin_unshare_run`). `len` 0: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnshareRun {
    /// First guest frame.
    pub gfn: u64,
    /// First host frame.
    pub pfn: u64,
    /// Pages (at most `HYP_MAX_PAGES_PER_CALL`).
    pub len: u64,
}

impl UnshareRun {
    /// Appends page `gfn -> pfn` if it continues the run (or the run is
    /// empty) and the run has room; otherwise returns false and the caller
    /// flushes the run and starts a new one with [`UnshareRun::start`].
    pub fn extend(&mut self, gfn: u64, pfn: u64) -> bool {
        if self.len == 0 {
            self.start(gfn, pfn);
            return true;
        }
        let max = u64::from(hypercalls::MAX_PAGES_PER_CALL);
        if self.len < max
            && self.gfn.checked_add(self.len) == Some(gfn)
            && self.pfn.checked_add(self.len) == Some(pfn)
        {
            self.len += 1;
            true
        } else {
            false
        }
    }

    /// Makes the run the single page `gfn -> pfn`.
    pub fn start(&mut self, gfn: u64, pfn: u64) {
        *self = Self { gfn, pfn, len: 1 };
    }
}

/// The fault/invalidate sequence count, in the spirit of KVM's
/// `mmu_invalidate_seq` / `mmu_invalidate_in_progress`
/// (`struct s2pin_inv` in `s2pin_core.h`; every access under the VM's lock).
///
/// A fault reads `seq` before it pins a page (which may sleep), and maps the
/// page only if, under the lock, no invalidation of its host address is in
/// progress and `seq` has not moved: otherwise an invalidation may have
/// changed the frame behind the address after the pin looked it up (or
/// looked at the page tables before the pin), and the fault retries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvState {
    /// Bumped at the end of every invalidation (and when a slot is deleted).
    pub seq: u64,
    /// Invalidations between their start and end.
    pub in_progress: u64,
    /// Union of the host ranges in progress: `[start, end)`.
    pub start: u64,
    /// See `start`.
    pub end: u64,
}

impl InvState {
    /// `invalidate_range_start` of `[start, end)`.
    pub fn begin(&mut self, start: u64, end: u64) {
        if self.in_progress == 0 {
            self.start = start;
            self.end = end;
        } else {
            self.start = self.start.min(start);
            self.end = self.end.max(end);
        }
        self.in_progress = self.in_progress.saturating_add(1);
    }

    /// `invalidate_range_end` (of any range begun before).
    pub fn finish(&mut self) {
        self.seq = self.seq.wrapping_add(1);
        self.in_progress = self.in_progress.saturating_sub(1);
    }

    /// Something else changed what a fault may have looked up (a slot
    /// deleted): faults that started before must retry.
    pub fn bump(&mut self) {
        self.seq = self.seq.wrapping_add(1);
    }

    /// Whether a fault that read `snapshot` before pinning the page at host
    /// address `hva` may map it now.
    #[must_use]
    pub fn may_map(&self, snapshot: u64, hva: u64) -> bool {
        if self.in_progress > 0 && hva >= self.start && hva < self.end {
            return false;
        }
        self.seq == snapshot
    }
}

/// Linux `enum mmu_notifier_event` (6.1).
pub mod event {
    /// `MMU_NOTIFY_UNMAP`.
    pub const UNMAP: u32 = 0;
    /// `MMU_NOTIFY_CLEAR`.
    pub const CLEAR: u32 = 1;
    /// `MMU_NOTIFY_PROTECTION_VMA`.
    pub const PROTECTION_VMA: u32 = 2;
    /// `MMU_NOTIFY_PROTECTION_PAGE`.
    pub const PROTECTION_PAGE: u32 = 3;
    /// `MMU_NOTIFY_SOFT_DIRTY`.
    pub const SOFT_DIRTY: u32 = 4;
    /// `MMU_NOTIFY_RELEASE`.
    pub const RELEASE: u32 = 5;
    /// `MMU_NOTIFY_MIGRATE`.
    pub const MIGRATE: u32 = 6;
    /// `MMU_NOTIFY_EXCLUSIVE`.
    pub const EXCLUSIVE: u32 = 7;
}

/// Whether `ev` only changes protections (the frame behind an address
/// stays): the events the policies treat differently.
#[must_use]
pub const fn is_protection(ev: u32) -> bool {
    matches!(
        ev,
        event::PROTECTION_VMA | event::PROTECTION_PAGE | event::SOFT_DIRTY
    )
}

/// What `invalidate_range_start` does with the pinned pages of its range.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAction {
    /// Nothing now (a protection event under `confirm` or `keep`).
    Nothing = 0,
    /// Unshare and unpin: the event can change or free the frame (any
    /// policy). Counted as `unmapped_invalidate`.
    UnmapInvalidate = 1,
    /// Unshare and unpin: a protection event under `eager`. Counted as
    /// `unmapped_eager`.
    UnmapEager = 2,
}

/// The policy's decision at `invalidate_range_start`. Unknown events are
/// treated as ones that can change the frame.
#[must_use]
pub fn at_start(policy: Policy, ev: u32) -> StartAction {
    if !is_protection(ev) {
        StartAction::UnmapInvalidate
    } else if policy == Policy::Eager {
        StartAction::UnmapEager
    } else {
        StartAction::Nothing
    }
}

/// Whether `invalidate_range_end` walks the host page tables of the range's
/// pinned pages (protection events under `confirm` and `keep`).
#[must_use]
pub fn walk_at_end(policy: Policy, ev: u32) -> bool {
    is_protection(ev) && policy != Policy::Eager
}

/// What the host page tables say about one pinned page at
/// `invalidate_range_end` (`struct s2pin_pte_state` in `s2pin_core.h`;
/// each field 0 or 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PteState {
    /// A PTE or huge PMD is present (protnone counts as present).
    pub present: u8,
    /// It maps the pinned frame.
    pub same_frame: u8,
    /// It is `PROT_NONE` (NUMA hint or `mprotect`).
    pub protnone: u8,
    /// It allows writes.
    pub writable: u8,
    /// The VMA still allows some access (so a protnone entry is a NUMA
    /// hint, not `mprotect(PROT_NONE)`).
    pub vma_accessible: u8,
    /// The page is mapped writable at stage 2 now.
    pub mapped_writable: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// What `invalidate_range_end` does with one pinned page.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageAction {
    /// Leave it mapped (counted as `kept`).
    Keep = 0,
    /// Unshare and unpin: it became `PROT_NONE` (`unmapped_protnone`).
    UnmapProtNone = 1,
    /// Unshare and unpin: its frame changed or vanished (`unmapped_changed`).
    UnmapChanged = 2,
    /// `HYP_WRPROTECT` it: it lost write permission (`wrprotected_lost_write`).
    WrProtect = 3,
}

/// The policy's decision for one pinned page at `invalidate_range_end`.
/// Protnone is tested before write: on 6.1 a NUMA-protnone entry keeps its
/// saved write bit.
#[must_use]
pub fn at_end(policy: Policy, s: &PteState) -> PageAction {
    if s.present == 0 || s.same_frame == 0 {
        return PageAction::UnmapChanged;
    }
    if s.protnone != 0 {
        return if policy == Policy::Keep && s.vma_accessible != 0 {
            PageAction::Keep
        } else {
            PageAction::UnmapProtNone
        };
    }
    if s.writable == 0 && s.mapped_writable != 0 {
        return PageAction::WrProtect;
    }
    PageAction::Keep
}

/// The next step after `HYP_VCPU_RUN` returned.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run again (a host interrupt ended the run).
    Reenter = 0,
    /// A stage-2 memory fault for the module to serve (`ExitInfo` says which).
    MemFault = 1,
    /// Return to user space: the run page holds the exit.
    User = 2,
    /// The vCPU is powered off: wait a little, run again.
    PoweredOff = 3,
    /// The guest waits (WFI/WFE): yield, run again.
    Wfx = 4,
    /// The call failed (`ExitInfo::hyp_error`).
    Failed = -1,
    /// The reply is malformed (a hypervisor bug or ABI mismatch).
    Malformed = -2,
}

/// Details of an exit for the C glue (`struct s2pin_exit_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// [`ExitAction::MemFault`]: the frame.
    pub gfn: u64,
    /// [`ExitAction::MemFault`]: `S2PIN_ACCESS_*`.
    pub access: u32,
    /// [`ExitAction::MemFault`]: 1 for a permission fault, 0 for unmapped.
    pub permission: u32,
    /// [`ExitAction::Failed`]: the hypervisor's (negative) error code.
    pub hyp_error: i64,
    /// 1 when the exit is an MMIO read: the next run passes the value user
    /// space stored.
    pub mmio_read: u32,
    /// Zero.
    pub pad: u32,
}

/// Decodes the registers `HYP_VCPU_RUN` returned, fills `run` for exits
/// user space handles, and says what to do next.
pub fn handle_exit(regs: &Regs, run: &mut S2pinRun, info: &mut ExitInfo) -> ExitAction {
    *info = ExitInfo::default();
    let (Some(vm), Some(vcpu)) = (VmHandle::new(1, 1), VcpuIndex::new(0)) else {
        return ExitAction::Malformed;
    };
    let call = Hypercall::VcpuRun {
        vm,
        vcpu,
        mmio_data: 0,
    };
    let exit = match call.decode_reply(regs) {
        Ok(Reply::Exit(e)) => e,
        Ok(_) | Err(ReplyError::Malformed) => return ExitAction::Malformed,
        Err(ReplyError::Failed(e)) => {
            info.hyp_error = e.to_i64();
            return ExitAction::Failed;
        }
    };
    let user = match exit {
        VcpuExit::Interrupted => return ExitAction::Reenter,
        VcpuExit::PoweredOff => return ExitAction::PoweredOff,
        VcpuExit::Wfx { .. } => return ExitAction::Wfx,
        VcpuExit::MemFault { gfn, access, kind } => {
            info.gfn = gfn.raw();
            info.access = match access {
                Access::Read => s2pin_uapi::S2PIN_ACCESS_READ,
                Access::Write => s2pin_uapi::S2PIN_ACCESS_WRITE,
                Access::Exec => s2pin_uapi::S2PIN_ACCESS_EXEC,
            };
            info.permission = u32::from(kind == FaultKind::Permission);
            return ExitAction::MemFault;
        }
        VcpuExit::Console(c) => {
            let text = c.as_bytes();
            let mut bytes = [0u8; 16];
            for (d, s) in bytes.iter_mut().zip(text) {
                *d = *s;
            }
            Exit::Console(RunConsole {
                len: u32::try_from(text.len().min(16)).unwrap_or(16),
                pad: 0,
                bytes,
            })
        }
        VcpuExit::ShareRequest { gfn, nr } => Exit::ShareRequest(RunRange {
            gfn: gfn.raw(),
            nr: u64::from(nr.get()),
        }),
        VcpuExit::UnshareRequest { gfn, nr } => Exit::UnshareRequest(RunRange {
            gfn: gfn.raw(),
            nr: u64::from(nr.get()),
        }),
        VcpuExit::Shutdown => Exit::SystemEvent(RunSystemEvent {
            ty: SystemEventType::Shutdown as u32,
            pad: 0,
        }),
        VcpuExit::SystemOff { reset } => Exit::SystemEvent(RunSystemEvent {
            ty: if reset {
                SystemEventType::SystemReset as u32
            } else {
                SystemEventType::SystemOff as u32
            },
            pad: 0,
        }),
        VcpuExit::UnhandledTrap { esr, far } => Exit::UnhandledTrap(RunUnhandled { esr, far }),
        VcpuExit::Mmio {
            ipa,
            size,
            write,
            data,
        } => {
            info.mmio_read = u32::from(!write);
            Exit::Mmio(RunMmio {
                phys_addr: ipa,
                data,
                len: u32::from(size.bytes()),
                is_write: u8::from(write),
                pad: [0; 3],
            })
        }
    };
    run.encode(&user);
    ExitAction::User
}

/// Writes one `"<name> <value>\n"` line per counter of [`S2pinVmStats`].
///
/// # Errors
/// [`Error::NoRoom`] when `buf` is too small.
pub fn stats_text(vals: &[u64; STATS_COUNT], buf: &mut [u8]) -> Result<usize, Error> {
    format_into(buf, |out| {
        for ((name, _), v) in S2pinVmStats::FIELDS.iter().zip(vals) {
            writeln!(out, "{name} {v}")?;
        }
        Ok(())
    })
}

/// The `host_page_state` debugfs line for `pfn` and the registers
/// `HYP_HOST_PAGE_STATE` returned:
/// `"<pfn> owner=host|hyp|vm:<handle> state=owned|shared_owned count=<n>\n"`,
/// or `"<pfn> error <x0>\n"`.
///
/// # Errors
/// [`Error::NoRoom`] when `buf` is too small.
pub fn host_page_state_line(pfn: u64, regs: &Regs, buf: &mut [u8]) -> Result<usize, Error> {
    let [x0, x1, x2, x3, x4, ..] = *regs;
    format_into(buf, |out| {
        if x0 != 0 {
            #[allow(clippy::cast_possible_wrap)] // an error code, bit for bit
            let e = x0 as i64;
            return writeln!(out, "{pfn} error {e}");
        }
        write!(out, "{pfn} owner=")?;
        match x1 {
            0 => out.write_str("host")?,
            1 => out.write_str("hyp")?,
            2 => write!(out, "vm:{x2:#x}")?,
            other => write!(out, "unknown({other})")?,
        }
        let state = match x3 {
            0 => "owned",
            1 => "shared_owned",
            _ => "unknown",
        };
        writeln!(out, " state={state} count={x4}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WIN: Window = Window {
        base_gfn: 0x40000,
        pages: 0x10000,
    };

    fn region(slot: u32, gpa: u64, size: u64, uaddr: u64) -> S2pinUserspaceMemoryRegion {
        S2pinUserspaceMemoryRegion {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uaddr,
        }
    }

    fn apply(slots: &mut [Memslot], r: &S2pinUserspaceMemoryRegion) -> Result<(), i32> {
        match check_region(slots, r, WIN)? {
            RegionOp::Create(s) => slots[r.slot as usize] = s,
            RegionOp::Delete => slots[r.slot as usize] = Memslot::default(),
        }
        Ok(())
    }

    #[test]
    fn regions_follow_kvms_rules() {
        let mut slots = [Memslot::default(); 32];
        let base = 0x4000_0000;
        assert_eq!(
            apply(&mut slots, &region(0, base, 0x10_0000, 0x7f00_0000_0000)),
            Ok(())
        );
        assert_eq!(find_slot(&slots, 0x40000), Some(0));
        assert_eq!(find_slot(&slots, 0x40100), None);
        // Overlap, reuse of a used slot, unaligned, overflow, outside the window.
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x8_0000, 0x10_0000, 0x1000)),
            Err(17)
        );
        assert_eq!(
            apply(&mut slots, &region(0, base + 0x10_0000, 0x1000, 0x1000)),
            Err(17)
        );
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x10_0800, 0x1000, 0x1000)),
            Err(22)
        );
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x10_0000, 0x1001, 0x1000)),
            Err(22)
        );
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x10_0000, 0x1000, 0x1001)),
            Err(22)
        );
        assert_eq!(
            apply(&mut slots, &region(1, base, !0xfff_u64, 0x1000)),
            Err(22)
        );
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x10_0000, 0x1000, !0xfff_u64)),
            Err(22)
        );
        assert_eq!(apply(&mut slots, &region(1, 0, 0x1000, 0x1000)), Err(22));
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x1000_0000, 0x1000, 0x1000)),
            Err(22)
        );
        assert_eq!(
            apply(&mut slots, &region(32, base + 0x10_0000, 0x1000, 0x1000)),
            Err(22)
        );
        assert_eq!(apply(&mut slots, &region(u32::MAX, base, 0, 0)), Err(22));
        let mut bad_flags = region(1, base + 0x10_0000, 0x1000, 0x1000);
        bad_flags.flags = 1;
        assert_eq!(apply(&mut slots, &bad_flags), Err(22));
        // Adjacent is fine; delete; deleting twice fails.
        assert_eq!(
            apply(&mut slots, &region(1, base + 0x10_0000, 0x1000, 0x1000)),
            Ok(())
        );
        assert_eq!(apply(&mut slots, &region(0, 0, 0, 0)), Ok(()));
        assert_eq!(apply(&mut slots, &region(0, 0, 0, 0)), Err(22));
        assert_eq!(find_slot(&slots, 0x40000), None);
        assert_eq!(find_slot(&slots, 0x40100), Some(1));
    }

    proptest! {
        /// Whatever is accepted keeps the slots disjoint, aligned and inside
        /// the window; nothing panics.
        #[test]
        fn accepted_slots_stay_disjoint(ops in proptest::collection::vec(
            (0u32..40, 0u64..0x6000_0000, 0u64..0x2000_0000, any::<u64>(), any::<bool>()), 1..40)) {
            let mut slots = [Memslot::default(); 32];
            for (slot, gpa, size, uaddr, del) in ops {
                let size = if del { 0 } else { size };
                let _ = apply(&mut slots, &region(slot, gpa & !0xfff, size & !0xfff, uaddr & !0xfff));
                let used: std::vec::Vec<_> = slots.iter().filter(|s| s.used != 0).collect();
                for a in &used {
                    prop_assert!(a.npages > 0);
                    prop_assert!(a.base_gfn >= WIN.base_gfn);
                    prop_assert!(a.base_gfn + a.npages <= WIN.base_gfn + WIN.pages);
                    for b in &used {
                        if !core::ptr::eq(*a, *b) {
                            prop_assert!(a.base_gfn + a.npages <= b.base_gfn || b.base_gfn + b.npages <= a.base_gfn);
                        }
                    }
                }
            }
        }

        #[test]
        fn check_region_never_panics(slot in any::<u32>(), flags in any::<u32>(), gpa in any::<u64>(),
                                     size in any::<u64>(), uaddr in any::<u64>(), base in any::<u64>(), pages in any::<u64>()) {
            let slots = [Memslot { used: 1, npages: u64::MAX, base_gfn: u64::MAX, ..Memslot::default() }; 32];
            let r = S2pinUserspaceMemoryRegion { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr };
            let _ = check_region(&slots, &r, Window { base_gfn: base, pages });
            let _ = find_slot(&slots, gpa);
        }

        /// A fault that pinned while an invalidation covering its address
        /// ran (began before or during the pin) never maps.
        #[test]
        fn racing_faults_retry(before in 0u32..3, during in 0u32..3, hva in 0u64..0x10000,
                               s in 0u64..0x10000, len in 1u64..0x1000, end_during in any::<bool>()) {
            let mut st = InvState::default();
            for _ in 0..before { st.begin(s, s + len); }
            let snapshot = st.seq;
            for _ in 0..during { st.begin(s, s + len); }
            if end_during { for _ in 0..(before + during) { st.finish(); } }
            let covered = hva >= s && hva < s + len;
            let ok = st.may_map(snapshot, hva);
            if during > 0 && covered { prop_assert!(!ok); }
            if end_during && before + during > 0 { prop_assert!(!ok); }
            if before + during == 0 { prop_assert!(ok); }
        }

        #[test]
        fn exit_decoding_never_panics(regs in any::<[u64; 8]>()) {
            let mut run = S2pinRun::default();
            let mut info = ExitInfo::default();
            let _ = handle_exit(&regs, &mut run, &mut info);
        }

        #[test]
        fn page_decisions(p in 0u32..3, ev in 0u32..10, present: bool, same: bool, none: bool, w: bool, acc: bool, mw: bool) {
            let policy = Policy::from_u32(p).unwrap();
            let s = PteState { present: present.into(), same_frame: same.into(), protnone: none.into(),
                               writable: w.into(), vma_accessible: acc.into(), mapped_writable: mw.into(), pad: [0; 2] };
            let a = at_end(policy, &s);
            // A changed frame is never kept; protnone is unmapped unless
            // keep sees an accessible VMA; eager never walks.
            if !(present && same) { prop_assert_eq!(a, PageAction::UnmapChanged); }
            else if none { prop_assert_eq!(a == PageAction::Keep, policy == Policy::Keep && acc); }
            else if !w && mw { prop_assert_eq!(a, PageAction::WrProtect); }
            else { prop_assert_eq!(a, PageAction::Keep); }
            prop_assert_eq!(walk_at_end(policy, ev), is_protection(ev) && policy != Policy::Eager);
            let st = at_start(policy, ev);
            if !is_protection(ev) { prop_assert_eq!(st, StartAction::UnmapInvalidate); }
            else if policy == Policy::Eager { prop_assert_eq!(st, StartAction::UnmapEager); }
            else { prop_assert_eq!(st, StartAction::Nothing); }
        }
    }

    proptest! {
        /// Exactly the pages whose bytes intersect the range are listed.
        #[test]
        fn slot_page_range_is_exact(uaddr in 0u64..0x10000, npages in 0u64..64, start in 0u64..0x60000, len in 0u64..0x60000) {
            let slot = Memslot { base_gfn: 0, npages, uaddr: uaddr << 12, flags: 0, used: 1 };
            let end = start + len;
            let got = slot_page_range(&slot, start, end);
            for i in 0..npages {
                let p0 = slot.uaddr + (i << 12);
                let hit = start < p0 + 4096 && p0 < end;
                let listed = got.is_some_and(|(f, l)| i >= f && i < l);
                prop_assert_eq!(hit, listed, "page {} of {:?} for [{:#x}, {:#x})", i, got, start, end);
            }
        }

        #[test]
        fn slot_page_range_never_panics(uaddr: u64, npages: u64, start: u64, end: u64) {
            let slot = Memslot { base_gfn: 0, npages, uaddr, flags: 0, used: 1 };
            if let Some((f, l)) = slot_page_range(&slot, start, end) {
                prop_assert!(f < l && l <= npages);
            }
        }

        /// Runs built page by page cover every page once, each contiguous
        /// in gfn and pfn and at most 512 long.
        #[test]
        fn runs_are_contiguous_and_bounded(pages in proptest::collection::vec((0u64..4, 0u64..3), 1..1200)) {
            let (mut gfn, mut pfn) = (100u64, 5000u64);
            let mut runs = std::vec::Vec::new();
            let mut run = UnshareRun::default();
            let mut all = std::vec::Vec::new();
            for (dg, dp) in pages {
                gfn += dg.max(1);
                pfn += dp;
                all.push((gfn, pfn));
                if !run.extend(gfn, pfn) {
                    runs.push(run);
                    run.start(gfn, pfn);
                }
            }
            runs.push(run);
            let mut covered = std::vec::Vec::new();
            for r in &runs {
                prop_assert!(r.len >= 1 && r.len <= 512);
                for i in 0..r.len {
                    covered.push((r.gfn + i, r.pfn + i));
                }
            }
            prop_assert_eq!(covered, all);
        }
    }

    #[test]
    fn create_vm_checks() {
        let ok = s2pin_uapi::S2pinCreateVm {
            ipa_bits: 0,
            policy: 0,
            flags: 0,
            mem_base: 0x4000_0000,
            mem_size: 0x400_0000,
        };
        assert_eq!(check_create_vm(&ok), Ok((40, Policy::Confirm)));
        for bad in [
            s2pin_uapi::S2pinCreateVm { policy: 3, ..ok },
            s2pin_uapi::S2pinCreateVm { flags: 1, ..ok },
            s2pin_uapi::S2pinCreateVm { ipa_bits: 31, ..ok },
            s2pin_uapi::S2pinCreateVm { ipa_bits: 49, ..ok },
            s2pin_uapi::S2pinCreateVm { mem_size: 0, ..ok },
            s2pin_uapi::S2pinCreateVm {
                mem_base: 0x123,
                ..ok
            },
            s2pin_uapi::S2pinCreateVm {
                mem_base: !0xfff_u64,
                ..ok
            },
            s2pin_uapi::S2pinCreateVm {
                ipa_bits: 32,
                mem_base: 0xC000_0000,
                mem_size: 0x8000_0000,
                ..ok
            },
        ] {
            assert_eq!(check_create_vm(&bad), Err(22), "{bad:?}");
        }
    }

    #[test]
    fn seq_basics() {
        let mut st = InvState::default();
        let snap = st.seq;
        st.begin(0x1000, 0x2000);
        assert!(!st.may_map(snap, 0x1000));
        assert!(st.may_map(snap, 0x2000));
        st.finish();
        assert!(!st.may_map(snap, 0x3000));
        assert!(st.may_map(st.seq, 0x1000));
        st.bump();
        assert!(!st.may_map(snap.wrapping_add(1), 0x1000));
    }

    fn exit_regs(reason: u64, a: u64, b: u64, c: u64, d: u64) -> Regs {
        [0, reason, a, b, c, d, 0, 0]
    }

    #[test]
    fn exits_map_to_actions_and_run_pages() {
        let mut run = S2pinRun::default();
        let mut info = ExitInfo::default();
        assert_eq!(
            handle_exit(&exit_regs(0, 0, 0, 0, 0), &mut run, &mut info),
            ExitAction::Reenter
        );
        assert_eq!(
            handle_exit(&exit_regs(1, 0x40123, 1, 1, 0), &mut run, &mut info),
            ExitAction::MemFault
        );
        assert_eq!((info.gfn, info.access, info.permission), (0x40123, 1, 1));
        assert_eq!(
            handle_exit(&exit_regs(7, 0x900_0004, 4, 0, 0), &mut run, &mut info),
            ExitAction::User
        );
        assert_eq!(info.mmio_read, 1);
        match run.decode() {
            Exit::Mmio(m) => assert_eq!((m.phys_addr, m.len, m.is_write), (0x900_0004, 4, 0)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            handle_exit(
                &exit_regs(2, 2, u64::from_le_bytes(*b"hi\0\0\0\0\0\0"), 0, 0),
                &mut run,
                &mut info
            ),
            ExitAction::User
        );
        match run.decode() {
            Exit::Console(c) => assert_eq!(c.text(), b"hi"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            handle_exit(&exit_regs(9, 0, 0, 0, 0), &mut run, &mut info),
            ExitAction::User
        );
        assert_eq!(
            run.decode(),
            Exit::SystemEvent(RunSystemEvent { ty: 2, pad: 0 })
        );
        assert_eq!(
            handle_exit(&exit_regs(10, 0, 0, 0, 0), &mut run, &mut info),
            ExitAction::PoweredOff
        );
        assert_eq!(
            handle_exit(&exit_regs(8, 1, 0, 0, 0), &mut run, &mut info),
            ExitAction::Wfx
        );
        let failed = [(-16i64) as u64, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            handle_exit(&failed, &mut run, &mut info),
            ExitAction::Failed
        );
        assert_eq!(info.hyp_error, -16);
        assert_eq!(
            handle_exit(&exit_regs(99, 0, 0, 0, 0), &mut run, &mut info),
            ExitAction::Malformed
        );
    }

    #[test]
    fn text_outputs() {
        let mut vals = [0u64; STATS_COUNT];
        vals[0] = 7;
        let mut buf = [0u8; 4096];
        let n = stats_text(&vals, &mut buf).unwrap();
        let s = core::str::from_utf8(&buf[..n]).unwrap();
        assert!(s.starts_with("pinned_now 7\npins 0\n"));
        assert_eq!(s.lines().count(), STATS_COUNT);
        assert_eq!(stats_text(&vals, &mut buf[..10]), Err(Error::NoRoom));
        let n = host_page_state_line(5, &[0, 2, 0x10001, 1, 1, 0, 0, 0], &mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"5 owner=vm:0x10001 state=shared_owned count=1\n"
        );
        let n = host_page_state_line(5, &[(-34i64) as u64, 0, 0, 0, 0, 0, 0, 0], &mut buf).unwrap();
        assert_eq!(&buf[..n], b"5 error -34\n");
    }
}
