//! `s2vmm`: the user-space VMM for the `s2pin` host module (`/dev/s2pin`).
//!
//! It loads the bare-metal guest payload (`qemu/guest`) into guest memory it
//! maps itself (`--backing anon|thp|memfd`, optionally bound to a NUMA node),
//! creates a VM with one memory slot and its vCPUs, runs one thread per
//! vCPU, emulates the payload's console and MMIO test device, and at the end
//! prints the module's counters for the VM (`--stats`, `--stats-json`).
//! Test hooks change guest memory while the guest runs (`--madvise-dontneed`,
//! `--munmap`, `--mprotect`), and `s2vmm hostile` exercises the device with
//! bad arguments and races. See `host-driver/vmm/README.md`.
//!
//! The logic (arguments, guest layout, exit handling, the MMIO device,
//! console, stats formatting, the run loop against a fake vCPU) is tested
//! on the build machine with `cargo test -p s2vmm`; the device calls sit
//! behind the [`backend`] traits.

pub mod args;
pub mod backend;
pub mod console;
pub mod fuzz;
pub mod hostile_guests;
pub mod killloop;
pub mod layout;
pub mod leakcheck;
pub mod mmio;
pub mod runner;
pub mod scale;
pub mod soak;
pub mod stats;

#[cfg(target_os = "linux")]
pub mod guest_run;
#[cfg(target_os = "linux")]
pub mod hostile;
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub mod kvm;
#[cfg(target_os = "linux")]
pub mod memory;
#[cfg(target_os = "linux")]
pub mod s2pin;
