//! The conformance test host: a bare-metal EL1 program that el2 boots instead
//! of Linux. It issues raw HVCs, checks every answer and the page state after
//! every call against the model in the library (`lib.rs`), prints
//! `PASS <case>` / `FAIL <case>: <why>` and `N passed, N failed`, and powers
//! the machine off. `cargo xtask test conformance` builds and runs it.

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod cases;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod gic;
#[cfg(target_os = "none")]
mod guests;
#[cfg(target_os = "none")]
mod harness;
#[cfg(target_os = "none")]
mod hv;
#[cfg(target_os = "none")]
mod random;
#[cfg(target_os = "none")]
mod rt;
#[cfg(target_os = "none")]
mod vmm;

/// On the build machine the binary does nothing; `cargo test -p testhost`
/// tests the library.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "testhost is a bare-metal image: build it with --target aarch64-unknown-none-softfloat"
    );
}
