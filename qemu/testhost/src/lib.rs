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

/// The hypervisor's own frames, `[HYP_BASE, hyp_end)` of the boot contract
/// on a machine whose host RAM is `ram` (byte ranges `[base, end)` from the
/// host's device tree, which leaves them out): RAM the host is never told
/// about, owned by Hyp. `[0x4000_0000, 0x4200_0000)` up to 4 GiB of RAM.
#[must_use]
pub fn hyp_pfns(ram: &[(u64, u64)]) -> (u64, u64) {
    let end = ram.iter().map(|&(_, e)| e).max().unwrap_or(0);
    let span = end.saturating_sub(boot_contract::RAM_BASE);
    (
        boot_contract::HYP_BASE >> 12,
        boot_contract::hyp_end(span) >> 12,
    )
}

/// A fresh model of el2 under the test host, whose RAM is `ram` (byte
/// ranges `[base, end)` from the host's device tree). The test host owns
/// every VM slot; the share limit is production's; guests may touch their
/// memory, so the access flag is not predicted.
#[must_use]
pub fn model(ram: &[(u64, u64)]) -> Model {
    let config = abi_model::Config {
        max_vms: Some(hypercalls::MAX_VMS),
        ..abi_model::Config::new(hyp_pfns(ram))
    };
    let frames: alloc::vec::Vec<(u64, u64)> =
        ram.iter().map(|&(b, e)| (b >> 12, e >> 12)).collect();
    Model::new(config, &frames)
}

#[cfg(test)]
mod tests {
    use super::hyp_pfns;

    #[test]
    fn hypervisor_frames_follow_the_ram() {
        // Up to 4 GiB: the 32 MiB floor.
        assert_eq!(
            hyp_pfns(&[(0x4200_0000, 0xc000_0000)]),
            (0x4_0000, 0x4_2000)
        );
        // 16 GiB from 0x4000_0000: 80 MiB (boot_contract::hyp_size).
        assert_eq!(
            hyp_pfns(&[(0x4500_0000, 0x4_4000_0000)]),
            (0x4_0000, 0x4_5000)
        );
    }
}
