//! The EL2 hypervisor.
//!
//! It boots first on QEMU `virt,virtualization=on`, walls its own memory off
//! from the host with a host stage-2, and runs the unmodified Debian arm64
//! kernel at EL1 on every CPU. Boot code and register access live in
//! [`arch`] (aarch64 only); everything else is plain logic that builds and
//! runs its unit tests on the build machine.

#![cfg_attr(target_os = "none", no_std, no_main)]

extern crate alloc;

pub mod dtb;
pub mod exception;
pub mod hostcall;
pub mod inject;
pub mod layout;
pub mod psci;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod hyp;

/// On the build machine the hypervisor is a library of logic plus tests.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("el2 is a bare-metal image: build it with --target aarch64-unknown-none-softfloat");
}
