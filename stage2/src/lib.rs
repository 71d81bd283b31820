//! Stage-2 page tables and page ownership for the EL2 hypervisor.
//!
//! `no_std` + `alloc`, no `unsafe`: hardware (table memory, TLB maintenance)
//! is reached through traits so that everything here runs its tests on the
//! build machine against a reference model.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod addr;
pub mod desc;
pub mod mm;
pub mod owner;
pub mod pgtable;
pub mod tlb;
pub mod transition;
pub mod vtcr;

pub use addr::{Gfn, Hpa, Ipa, Pfn, Vmid, PAGE_SHIFT, PAGE_SIZE};
