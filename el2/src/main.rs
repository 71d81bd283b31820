//! The EL2 hypervisor binary.
//!
//! It boots first on QEMU `virt,virtualization=on`, walls its own memory off
//! from the host with a host stage-2, and runs the unmodified Debian arm64
//! kernel at EL1 on every CPU. Boot code and register access live in `arch`;
//! the decisions are in the `el2` library (lib.rs), which builds and runs its
//! unit tests on the build machine.

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod hyp;
#[cfg(target_os = "none")]
mod machine;

/// On the build machine the binary does nothing; `cargo test -p el2` tests the library.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("el2 is a bare-metal image: build it with --target aarch64-unknown-none-softfloat");
}
