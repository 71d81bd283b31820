//! `cargo xtask test`: the test suites, their registry and the tally.
//!
//! A suite is a function that runs its steps and records each result in the
//! [`Tally`]: a step that runs a test binary contributes that binary's own
//! pass/fail counts (the `host` suite), every other check counts as one. The
//! last line printed is always `N passed, N failed`.
//!
//! To add a suite: a file `suites/<name>.rs` with
//! `pub fn run(root: &Path, tally: &mut Tally)`, a `pub mod <name>;` below,
//! and one [`Suite`] line in [`SUITES`] (`default: true` puts it into the
//! plain `cargo xtask test`; `false` makes it run only when named).

pub mod boot;
pub mod conformance;
pub mod guest;
pub mod host;
pub mod numa;
pub mod scale;
pub mod shim;

use std::path::Path;

use anyhow::{bail, Result};
use clap::builder::{PossibleValue, PossibleValuesParser};

use crate::check::Tally;
use crate::install;

/// One test suite.
#[derive(Debug)]
pub struct Suite {
    /// The name `cargo xtask test <name>` takes.
    pub name: &'static str,
    /// One line for `cargo xtask test --help`.
    pub about: &'static str,
    /// Whether the plain `cargo xtask test` runs it.
    pub default: bool,
    /// Runs it.
    pub run: fn(&Path, &mut Tally),
}

/// Every suite, in the order `cargo xtask test` runs them.
pub const SUITES: &[Suite] = &[
    Suite {
        name: "host",
        about: "unit and property tests, clippy (host and aarch64), rustfmt, docs, bounded fuzz",
        default: true,
        run: host::run,
    },
    Suite {
        name: "boot",
        about: "boots Debian's kernel under el2 in QEMU and checks it (XTASK_BOOT_MODE=no-hyp: harness check at EL2)",
        default: true,
        run: boot::run,
    },
    Suite {
        name: "conformance",
        about: "boots el2 with a bare-metal EL1 test host that checks every hypercall against docs/ABI.md",
        default: true,
        run: conformance::run,
    },
    Suite {
        name: "guest",
        about: "the EL1 test host runs guests under el2 (demand faults, SMP, isolation, hostile guest calls)",
        default: true,
        run: guest::run,
    },
    Suite {
        name: "shim",
        about: "Debian under el2 with s2pin.ko and s2vmm: pinning, hooks, policies under NUMA balancing, kill -9, hostile user space, 2 MiB blocks and hypercall counts (3 boots)",
        default: true,
        run: shim::run,
    },
    Suite {
        name: "numa",
        about: "the short NUMA benchmark: eager and confirm on 4K anon under NUMA balancing, 30 s each; confirm's spurious unmaps 0, eager's above 0",
        default: true,
        run: numa::run,
    },
    Suite {
        name: "scale",
        about: "the short scale benchmark: two 64 MiB guests (4K confirm, THP keep) faulted in, NUMA scan, mprotect and munmap of their memory; calls within pages/512 + 4, 0 for the NUMA scan, nothing leaked (one boot)",
        default: true,
        run: scale::run,
    },
    Suite {
        name: "reliability",
        about: "hostile guests on /dev/s2pin and 10 SIGKILLs + an OOM kill of s2vmm at random moments, the leak check after each (one boot, two NUMA nodes)",
        default: true,
        run: crate::reliability::run,
    },
    Suite {
        name: "soak",
        about: "the 1-minute soak (4 VMs x 2 vCPUs under memory pressure, NUMA balancing, THP compaction, VMM mprotect/munmap/DONTNEED, the fuzzer) and the short ioctl fuzz; nothing leaked (one boot)",
        default: true,
        run: crate::soak::run,
    },
];

/// The suite names for clap, each with its line of help.
pub fn names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        SUITES
            .iter()
            .map(|s| PossibleValue::new(s.name).help(s.about)),
    )
}

/// Runs the named suites (every default suite when `names` is empty).
pub fn test(root: &Path, names: &[String]) -> Result<()> {
    let wanted: Vec<&Suite> = if names.is_empty() {
        SUITES.iter().filter(|s| s.default).collect()
    } else {
        names
            .iter()
            .filter_map(|n| SUITES.iter().find(|s| s.name == n))
            .collect()
    };
    install::rust_targets()?;
    let mut tally = Tally::default();
    for suite in wanted {
        (suite.run)(root, &mut tally);
    }
    if !tally.failures.is_empty() {
        println!("failed: {}", tally.failures.join(", "));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} test(s) failed", tally.failed);
    }
    Ok(())
}
