//! The user-space ABI of `/dev/s2pin`, the host module's KVM-shaped device:
//! ioctl numbers, the `#[repr(C)]` structures they pass, the run structure a
//! vCPU fd maps, exit reasons, policies and flags.
//!
//! This crate is the one source of that ABI. The module's Rust core
//! (`host-driver/rust`) and the VMM (`host-driver/vmm`) use it directly; the
//! module's C glue includes `host-driver/include/s2pin_uapi.h`, which
//! [`write_c_header`] generates from the same constants (a test fails when the
//! checked-in copy is stale; `cargo xtask gen-header` rewrites it).
//!
//! # Devices and ioctls
//!
//! `/dev/s2pin` (a misc device):
//! * [`S2PIN_GET_API_VERSION`] returns [`S2PIN_API_VERSION`].
//! * [`S2PIN_CREATE_VM`] takes an [`S2pinCreateVm`] and returns a new VM fd
//!   (close-on-exec). The VM is torn down when its last fd (VM or vCPU) is
//!   closed, or when the process that created it exits.
//! * [`S2PIN_GET_VCPU_MMAP_SIZE`] returns the size to `mmap` on a vCPU fd.
//!
//! A VM fd:
//! * [`S2PIN_SET_USER_MEMORY_REGION`] takes an [`S2pinUserspaceMemoryRegion`]
//!   (KVM's shape): creates a slot, or deletes it when `memory_size` is 0.
//! * [`S2PIN_CREATE_VCPU`] takes an [`S2pinCreateVcpu`] and returns a vCPU fd.
//! * [`S2PIN_GET_STATS`] fills an [`S2pinVmStats`].
//!
//! A vCPU fd:
//! * `mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)` maps its
//!   [`S2pinRun`].
//! * [`S2PIN_RUN`] runs the vCPU until an exit user space must see
//!   ([`ExitReason`], in [`S2pinRun::exit_reason`]).
//!
//! # Errors (`errno` of a failed ioctl)
//!
//! | errno | meaning |
//! |---|---|
//! | `EINVAL` | a malformed argument: unknown flags or policy, unaligned or overflowing region, slot outside the guest RAM window, vCPU index out of range |
//! | `EEXIST` | a memory region overlaps another slot; a vCPU index already created |
//! | `EFAULT` | the argument pointer or `userspace_addr` is not accessible user memory |
//! | `ENOSPC` | no free slot (more than [`S2PIN_MAX_MEMSLOTS`]) or no free VM at EL2 |
//! | `ENOMEM` | out of memory, or a pin would exceed `RLIMIT_MEMLOCK` (nothing is pinned then) |
//! | `EINTR` | `RUN` was interrupted by a signal (or `immediate_exit` was set); `CREATE_VM` when a fatal signal is pending while it registers its MMU notifier (nothing is created) |
//! | `EBUSY` | another thread is running this vCPU |
//! | `EIO` | the caller's mm is not the VM creator's (`RUN`, memory regions, new vCPUs), or the hypervisor refused a call |
//! | `ENOTTY` | an unknown ioctl |
//! | `ESHUTDOWN` | the VM is being torn down (its process is exiting) |
//! | `EMFILE`, `ENFILE` | `CREATE_VM` or `CREATE_VCPU` when the process or the system has no free file descriptor: no VM is created; for `CREATE_VCPU` no fd is made but the index stays taken at EL2 (a retry with it is `EEXIST`) until the VM is torn down |
//!
//! `mmap` of a vCPU fd fails with `EINVAL` unless it is exactly one page
//! ([`S2PIN_GET_VCPU_MMAP_SIZE`]) at offset 0 with `MAP_SHARED`; `mmap` of
//! `/dev/s2pin` or of a VM fd fails with `ENODEV` (they have nothing to map),
//! and a writable shared mapping of an fd opened without write access with
//! `EACCES` (the kernel's own rule).

#![no_std]
#![forbid(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!("the s2pin ABI is little-endian (arm64 Linux)");

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(test)]
#[macro_use]
extern crate std;

mod header;
mod run;
mod stats;

#[cfg(feature = "alloc")]
pub use header::c_header;
pub use header::{
    c_header_defines, struct_of, write_c_header, CDefine, C_HEADER_GUARD, C_HEADER_PATH, C_LAYOUT,
};
pub use run::{
    Exit, MemFaultKind, RunConsole, RunMemFault, RunMmio, RunRange, RunSystemEvent, RunUnhandled,
    S2pinRun, SystemEventType, CONSOLE_MAX, RUN_UNION_WORDS,
};
pub use stats::{S2pinVmStats, CALLS_FIRST, EL2_FIRST, RANGE_START_FIRST, STATS_COUNT};

/// The version [`S2PIN_GET_API_VERSION`] returns. Bumped on any change of
/// this crate's ABI.
pub const S2PIN_API_VERSION: u32 = 1;

/// The ioctl type byte of every s2pin ioctl. `0xBE` is not in Linux's
/// `Documentation/userspace-api/ioctl/ioctl-number.rst` (KVM is `0xAE`;
/// `0xB2` and `0xB8`, which looked free, are taken by newer kernels).
pub const S2PIN_IOCTL_TYPE: u8 = 0xBE;

/// The misc device's name (`/dev/s2pin`).
pub const S2PIN_DEVICE_NAME: &str = "s2pin";

/// The most memory slots a VM may have (slot ids `0..S2PIN_MAX_MEMSLOTS`).
pub const S2PIN_MAX_MEMSLOTS: u32 = 32;

/// The most vCPUs a VM may have (the hypervisor's `HYP_MAX_VCPUS`).
pub const S2PIN_MAX_VCPUS: u32 = 64;

/// Guest pages are 4 KiB; regions and the RAM window are aligned to this.
pub const S2PIN_PAGE_SIZE: u64 = 4096;

/// Smallest and largest IPA size [`S2pinCreateVm::ipa_bits`] accepts
/// (0 there means [`S2PIN_DEFAULT_IPA_BITS`]).
pub const S2PIN_MIN_IPA_BITS: u32 = 32;
/// See [`S2PIN_MIN_IPA_BITS`].
pub const S2PIN_MAX_IPA_BITS: u32 = 48;
/// The IPA size used when [`S2pinCreateVm::ipa_bits`] is 0.
pub const S2PIN_DEFAULT_IPA_BITS: u32 = 40;

// ---------------------------------------------------------------------------
// ioctl number encoding (Linux asm-generic, used by arm64)

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_NONE`.
pub const IOC_NONE: u32 = 0;
/// `_IOC_WRITE` (user space writes, the kernel reads).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ` (the kernel writes, user space reads).
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`. A size that does not fit the 14-bit field
/// fails to compile (const evaluation).
#[must_use]
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl argument too large");
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let size = size as u32;
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
}

/// `_IO(S2PIN_IOCTL_TYPE, nr)`.
#[must_use]
pub const fn io(nr: u8) -> u32 {
    ioc(IOC_NONE, S2PIN_IOCTL_TYPE, nr, 0)
}

/// `_IOW(S2PIN_IOCTL_TYPE, nr, size)`.
#[must_use]
pub const fn iow(nr: u8, size: usize) -> u32 {
    ioc(IOC_WRITE, S2PIN_IOCTL_TYPE, nr, size)
}

/// `_IOR(S2PIN_IOCTL_TYPE, nr, size)`.
#[must_use]
pub const fn ior(nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, S2PIN_IOCTL_TYPE, nr, size)
}

/// `/dev/s2pin`: returns [`S2PIN_API_VERSION`].
pub const S2PIN_GET_API_VERSION: u32 = io(0x00);
/// `/dev/s2pin`: creates a VM, returns its fd.
pub const S2PIN_CREATE_VM: u32 = iow(0x01, core::mem::size_of::<S2pinCreateVm>());
/// `/dev/s2pin`: returns the size of a vCPU fd's mapping (one page).
pub const S2PIN_GET_VCPU_MMAP_SIZE: u32 = io(0x02);
/// VM fd: creates, or (size 0) deletes, a memory slot.
pub const S2PIN_SET_USER_MEMORY_REGION: u32 =
    iow(0x10, core::mem::size_of::<S2pinUserspaceMemoryRegion>());
/// VM fd: creates a vCPU, returns its fd.
pub const S2PIN_CREATE_VCPU: u32 = iow(0x11, core::mem::size_of::<S2pinCreateVcpu>());
/// VM fd: reads the VM's counters.
pub const S2PIN_GET_STATS: u32 = ior(0x12, core::mem::size_of::<S2pinVmStats>());
/// vCPU fd: runs the vCPU.
pub const S2PIN_RUN: u32 = io(0x20);

/// Every ioctl: (C name, number).
pub const IOCTLS: &[(&str, u32)] = &[
    ("S2PIN_GET_API_VERSION", S2PIN_GET_API_VERSION),
    ("S2PIN_CREATE_VM", S2PIN_CREATE_VM),
    ("S2PIN_GET_VCPU_MMAP_SIZE", S2PIN_GET_VCPU_MMAP_SIZE),
    ("S2PIN_SET_USER_MEMORY_REGION", S2PIN_SET_USER_MEMORY_REGION),
    ("S2PIN_CREATE_VCPU", S2PIN_CREATE_VCPU),
    ("S2PIN_GET_STATS", S2PIN_GET_STATS),
    ("S2PIN_RUN", S2PIN_RUN),
];

// ---------------------------------------------------------------------------
// Structures

/// The argument of [`S2PIN_CREATE_VM`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2pinCreateVm {
    /// IPA size in bits ([`S2PIN_MIN_IPA_BITS`]..=[`S2PIN_MAX_IPA_BITS`]), or
    /// 0 for [`S2PIN_DEFAULT_IPA_BITS`].
    pub ipa_bits: u32,
    /// The MMU-notifier policy ([`Policy`] as `u32`).
    pub policy: u32,
    /// Must be 0.
    pub flags: u64,
    /// The guest RAM window `[mem_base, mem_base + mem_size)`: stage-2
    /// faults inside are memory faults served from the slots, data accesses
    /// outside are MMIO exits. Page-aligned, non-empty, inside the IPA space.
    pub mem_base: u64,
    /// See `mem_base`.
    pub mem_size: u64,
}

/// The argument of [`S2PIN_SET_USER_MEMORY_REGION`] (KVM's
/// `struct kvm_userspace_memory_region`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2pinUserspaceMemoryRegion {
    /// Slot id, `0..S2PIN_MAX_MEMSLOTS`.
    pub slot: u32,
    /// [`S2PIN_MEM_READONLY`] or 0.
    pub flags: u32,
    /// First guest physical address; page-aligned.
    pub guest_phys_addr: u64,
    /// Size in bytes, a multiple of the page size; 0 deletes the slot.
    pub memory_size: u64,
    /// The host virtual address backing the slot; page-aligned user memory.
    pub userspace_addr: u64,
}

/// The argument of [`S2PIN_CREATE_VCPU`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2pinCreateVcpu {
    /// vCPU index, `0..S2PIN_MAX_VCPUS`; MPIDR as the hypervisor derives it.
    pub index: u32,
    /// [`S2PIN_VCPU_START_OFF`] or 0.
    pub flags: u32,
    /// Entry IPA (4-byte aligned); 0 with [`S2PIN_VCPU_START_OFF`].
    pub entry: u64,
    /// The guest's x0 at entry; 0 with [`S2PIN_VCPU_START_OFF`].
    pub x0: u64,
}

/// [`S2pinUserspaceMemoryRegion::flags`]: the guest may only read the slot
/// (pinned without `FOLL_WRITE`, mapped read-only; writes exit to user space
/// as [`MemFaultKind::ReadOnlySlot`]). The value of `KVM_MEM_READONLY`.
pub const S2PIN_MEM_READONLY: u32 = 1 << 1;

/// [`S2pinCreateVcpu::flags`]: the vCPU starts powered off, until another
/// vCPU starts it with PSCI `CPU_ON`.
pub const S2PIN_VCPU_START_OFF: u32 = 1;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<S2pinCreateVm>() == 32);
    assert!(offset_of!(S2pinCreateVm, policy) == 4);
    assert!(offset_of!(S2pinCreateVm, flags) == 8);
    assert!(offset_of!(S2pinCreateVm, mem_base) == 16);
    assert!(offset_of!(S2pinCreateVm, mem_size) == 24);
    assert!(size_of::<S2pinUserspaceMemoryRegion>() == 32);
    assert!(offset_of!(S2pinUserspaceMemoryRegion, flags) == 4);
    assert!(offset_of!(S2pinUserspaceMemoryRegion, guest_phys_addr) == 8);
    assert!(offset_of!(S2pinUserspaceMemoryRegion, memory_size) == 16);
    assert!(offset_of!(S2pinUserspaceMemoryRegion, userspace_addr) == 24);
    assert!(size_of::<S2pinCreateVcpu>() == 24);
    assert!(offset_of!(S2pinCreateVcpu, flags) == 4);
    assert!(offset_of!(S2pinCreateVcpu, entry) == 8);
    assert!(offset_of!(S2pinCreateVcpu, x0) == 16);
};

// ---------------------------------------------------------------------------
// Enums

/// What the VM does with MMU-notifier protection events
/// (`MMU_NOTIFY_PROTECTION_VMA`, `PROTECTION_PAGE`, `SOFT_DIRTY`). Events that
/// can change or free the frame behind an address are forwarded at
/// `invalidate_range_start` under every policy.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Wait for `invalidate_range_end`, then unshare and unpin only pages
    /// whose host PTE/PMD became `PROT_NONE`, write-protect pages that lost
    /// write permission, keep the rest (the default).
    #[default]
    Confirm = 0,
    /// Unshare and unpin every pinned page of the range at
    /// `invalidate_range_start`, as stock KVM does.
    Eager = 1,
    /// As `Confirm`, but a page whose frame did not change, in a VMA that is
    /// still accessible (a NUMA hint, not `mprotect(PROT_NONE)`), stays mapped.
    Keep = 2,
}

impl Policy {
    /// Every policy, in code order.
    pub const ALL: &'static [Self] = &[Self::Confirm, Self::Eager, Self::Keep];

    /// The policy with this code.
    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Confirm),
            1 => Some(Self::Eager),
            2 => Some(Self::Keep),
            _ => None,
        }
    }

    /// Its lower-case name (`confirm`, `eager`, `keep`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Confirm => "confirm",
            Self::Eager => "eager",
            Self::Keep => "keep",
        }
    }

    /// The policy named `s` (as [`Policy::name`]).
    #[must_use]
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.name() == s)
    }

    /// The C macro name.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        match self {
            Self::Confirm => "S2PIN_POLICY_CONFIRM",
            Self::Eager => "S2PIN_POLICY_EAGER",
            Self::Keep => "S2PIN_POLICY_KEEP",
        }
    }
}

/// [`S2pinRun::exit_reason`]: why `RUN` returned to user space.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Nothing set yet (a run page before the first `RUN`).
    None = 0,
    /// A data access outside the RAM window: emulate it
    /// ([`RunMmio`]); for a read, store the value in `data` before the next `RUN`.
    Mmio = 1,
    /// The guest wrote to its console ([`RunConsole`]).
    Console = 2,
    /// A guest memory access the module could not serve ([`RunMemFault`]):
    /// no slot, a write to a read-only slot, or the host mapping forbids it.
    MemFault = 3,
    /// The guest stopped ([`RunSystemEvent`]).
    SystemEvent = 4,
    /// A trap nobody handles ([`RunUnhandled`]); the vCPU cannot go on.
    UnhandledTrap = 5,
    /// The guest asked to share memory ([`RunRange`]).
    ShareRequest = 6,
    /// The guest asked to unshare memory ([`RunRange`]).
    UnshareRequest = 7,
    /// `RUN` failed with `EINTR` (a signal, or `immediate_exit`).
    Intr = 8,
    /// The thread has work pending on its way back to user mode (task work
    /// such as NUMA balancing's scan): the module returned so it runs. Just
    /// call `RUN` again.
    PendingWork = 9,
}

impl ExitReason {
    /// Every reason, in code order.
    pub const ALL: &'static [Self] = &[
        Self::None,
        Self::Mmio,
        Self::Console,
        Self::MemFault,
        Self::SystemEvent,
        Self::UnhandledTrap,
        Self::ShareRequest,
        Self::UnshareRequest,
        Self::Intr,
        Self::PendingWork,
    ];

    /// The reason with this code.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| *r as u32 == v)
    }

    /// The C macro name.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        match self {
            Self::None => "S2PIN_EXIT_NONE",
            Self::Mmio => "S2PIN_EXIT_MMIO",
            Self::Console => "S2PIN_EXIT_CONSOLE",
            Self::MemFault => "S2PIN_EXIT_MEM_FAULT",
            Self::SystemEvent => "S2PIN_EXIT_SYSTEM_EVENT",
            Self::UnhandledTrap => "S2PIN_EXIT_UNHANDLED_TRAP",
            Self::ShareRequest => "S2PIN_EXIT_SHARE_REQUEST",
            Self::UnshareRequest => "S2PIN_EXIT_UNSHARE_REQUEST",
            Self::Intr => "S2PIN_EXIT_INTR",
            Self::PendingWork => "S2PIN_EXIT_PENDING_WORK",
        }
    }

    /// One line for the header: which union member, what to do.
    #[must_use]
    pub const fn doc(self) -> &'static str {
        match self {
            Self::None => "no exit yet",
            Self::Mmio => "run->mmio: emulate; a read's value goes in mmio.data",
            Self::Console => "run->console: print",
            Self::MemFault => "run->mem_fault: no slot / read-only slot / host forbids",
            Self::SystemEvent => "run->system_event: the guest stopped",
            Self::UnhandledTrap => "run->unhandled: the vCPU cannot go on",
            Self::ShareRequest => "run->range: guest share request",
            Self::UnshareRequest => "run->range: guest unshare request",
            Self::Intr => "RUN failed with EINTR",
            Self::PendingWork => "task work ran on the way out; call RUN again",
        }
    }
}

/// Access kinds in [`RunMemFault::access`] (the hypervisor's).
pub const S2PIN_ACCESS_READ: u32 = 0;
/// See [`S2PIN_ACCESS_READ`].
pub const S2PIN_ACCESS_WRITE: u32 = 1;
/// See [`S2PIN_ACCESS_READ`].
pub const S2PIN_ACCESS_EXEC: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_use_the_linux_encoding() {
        // _IO(0xBE, 0) and _IOW(0xBE, 1, 32 bytes), by hand.
        assert_eq!(S2PIN_GET_API_VERSION, 0xBE00);
        assert_eq!(S2PIN_CREATE_VM, (1 << 30) | (32 << 16) | (0xBE << 8) | 1);
        assert_eq!(
            S2PIN_GET_STATS,
            (2 << 30) | ((STATS_COUNT as u32 * 8) << 16) | (0xBE << 8) | 0x12
        );
        let mut all: std::vec::Vec<u32> = IOCTLS.iter().map(|(_, n)| *n).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), IOCTLS.len());
    }

    #[test]
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_name(p.name()), Some(*p));
            assert_eq!(Policy::from_u32(*p as u32), Some(*p));
        }
        assert_eq!(Policy::from_u32(3), None);
        assert_eq!(Policy::from_name("Confirm"), None);
        assert_eq!(Policy::default(), Policy::Confirm);
    }

    #[test]
    fn exit_reasons_round_trip() {
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(ExitReason::from_u32(*r as u32), Some(*r));
        }
        assert_eq!(ExitReason::from_u32(99), None);
    }
}
