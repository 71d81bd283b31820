//! The pure part of the conformance test host: the machine the reference
//! model of the ABI (crate `abi_model`) is set up for, a serializability
//! checker for concurrent rounds, and a fixed-seed random generator. No
//! hardware, no unsafe: it builds and is unit-tested on the build machine,
//! and the bare-metal binary (`main.rs`) drives it with real HVCs.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod rng;
pub mod serial;

pub use abi_model::{show, ErrSet, Mismatch, Model};

/// The hypervisor's own frames, `[HYP_BASE, HYP_END)` of the boot contract
/// (`[0x4000_0000, 0x4200_0000)`): RAM the host is never told about, owned
/// by Hyp.
pub const HYP_PFNS: (u64, u64) = (boot_contract::HYP_BASE >> 12, boot_contract::HYP_END >> 12);

/// A fresh model of el2 under the test host, whose RAM is `ram` (byte
/// ranges `[base, end)` from the host's device tree). The test host owns
/// every VM slot; the share limit is production's; guests may touch their
/// memory, so the access flag is not predicted.
#[must_use]
pub fn model(ram: &[(u64, u64)]) -> Model {
    let config = abi_model::Config {
        max_vms: Some(hypercalls::MAX_VMS),
        ..abi_model::Config::new(HYP_PFNS)
    };
    let frames: alloc::vec::Vec<(u64, u64)> =
        ram.iter().map(|&(b, e)| (b >> 12, e >> 12)).collect();
    Model::new(config, &frames)
}
