//! The hypervisor's logic: everything that decides, as opposed to touching
//! the machine. It is `no_std`, has no `unsafe`, and runs its unit tests on
//! the build machine; the bare-metal binary (main.rs) ties it to the CPU.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod dtb;
pub mod exception;
pub mod features;
pub mod gic;
pub mod inject;
pub mod layout;
pub mod pkvm;
pub mod psci;
pub mod sysreg;
pub mod traps;
pub mod vcpu;
