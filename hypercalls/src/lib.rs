//! The hypervisor's hypercall ABI: the single source of function ids,
//! register layouts, limits and error codes.
//!
//! The host kernel calls the hypervisor with `HVC #0` using SMCCC 64-bit fast
//! calls in the Vendor Specific Hypervisor Service range (`0xC600_0000 | n`).
//! x0 carries the function id and x1..x7 the arguments; on return x0 is 0 or a
//! negative [`HypError`] code and x1..x7 carry the results.
//!
//! * [`Hypercall::decode`] turns the eight registers into a typed call (the
//!   hypervisor's side), [`Hypercall::encode`] does the reverse (the host's
//!   side). Decoding never panics; anything `encode` cannot produce is an
//!   error, so `decode(x) == Ok(c)` implies `c.encode() == x` (up to the SMCCC
//!   SVE hint bit, which is ignored).
//! * [`Reply`] / [`encode_result`] / [`Hypercall::decode_reply`] do the same
//!   for results.
//! * [`GuestCall`] is the (provisional) guest-side ABI.
//! * [`write_c_header`] / `c_header()` (feature `alloc`) generate
//!   `host-driver/include/hyp_abi.h`.
//!
//! The contract of every call (preconditions, errors, page-state transitions)
//! is `docs/ABI.md`; section numbers in the docs here refer to it.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod call;
mod error;
mod guest;
mod header;
pub mod ids;
mod regs;
mod reply;
mod types;

pub use call::{CounterGroup, GuestMemory, Hypercall, VcpuStart, VCPU_ENTRY_LIMIT, VCPU_START_OFF};
pub use error::HypError;
pub use guest::GuestCall;
#[cfg(feature = "alloc")]
pub use header::c_header;
pub use header::{
    c_defines, write_c_header, CDefine, CValue, C_HEADER_GUARD, C_HEADER_PATH, C_MACROS,
};
pub use ids::{hyp_fn, GuestFunction, HostFunction};
pub use regs::Regs;
pub use reply::{
    encode_result, AbiVersion, Access, ConsoleBytes, Counters, ExitReason, FaultKind, GuestPage,
    HostPageInfo, MmioSize, Owner, OwnerState, PageState, ReclaimedPages, Reply, ReplyError,
    RuntimeCounters, Stage2Counters, TeardownProgress, VcpuExit,
};
pub use types::{
    Gfn, IpaBits, PageCount, Pfn, Prot, VcpuCount, VcpuIndex, VmHandle, VM_HANDLE_GEN_SHIFT,
    VM_HANDLE_INDEX_MASK,
};

/// ABI major version: incremented on incompatible changes.
pub const ABI_VERSION_MAJOR: u16 = 0;
/// ABI minor version: incremented on compatible additions.
pub const ABI_VERSION_MINOR: u16 = 3;

/// Log2 of the page size the ABI counts in (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// Width of a pfn or gfn argument: 52-bit physical and intermediate
/// physical addresses, 4 KiB pages. Higher bits are reserved.
pub const PFN_BITS: u32 = 40;
/// Largest `nr_pages` of one call; above it the call fails with `E2BIG`.
pub const MAX_PAGES_PER_CALL: u32 = 512;
/// Largest number of page updates one `HYP_TEARDOWN_RECLAIM` performs (a
/// 2 MiB block is 512, done in one call: ABI §2.8).
pub const TEARDOWN_BATCH: u32 = 512;
/// Largest number of pages one `HYP_MEMCACHE_RECLAIM` returns (x2..x7).
pub const MEMCACHE_RECLAIM_MAX: usize = 6;
/// Most vCPUs a VM can have.
pub const MAX_VCPUS: u16 = 64;
/// Number of VM slots of this build: with every slot in use,
/// `HYP_VM_CREATE` fails with `HYP_ENOSPC` (§2.4).
pub const MAX_VMS: usize = 16;
/// Smallest IPA size of a VM.
pub const MIN_IPA_BITS: u8 = 32;
/// Largest IPA size of a VM.
pub const MAX_IPA_BITS: u8 = 48;
/// Most concatenated root-table pages any IPA size needs.
pub const MAX_ROOT_TABLE_PAGES: u32 = 16;
/// Most bytes one console write carries.
pub const CONSOLE_MAX_BYTES: usize = 16;
