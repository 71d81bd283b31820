//! The `guest` suite: el2 with the bare-metal test host (`qemu/testhost`)
//! playing VMM for the guest payload (`qemu/guest`); see `testhost.rs`.
//!
//! The test host finds the payload in RAM at
//! [`testhost::GUEST_PAYLOAD_ADDR`] (arm64 Image magic) and runs its guest
//! cases (`qemu/testhost/src/guests.rs`) instead of the conformance cases;
//! each is one check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::check::{Check, Tally};
use crate::run::build_el2;
use crate::testhost::{self, build_guest, build_testhost};
use crate::util::progress;

/// Hard limit on the guest suite boot.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The guest suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress("guest: el2 + the EL1 test host running guests in QEMU (one boot, with a timeout)");
    tally.record_all(suite(root));
}

/// One check per case, plus checks for a failed build or an incomplete run.
pub fn suite(root: &Path) -> Vec<Check> {
    let (el2, host, guest) = match build_all(root) {
        Ok(b) => b,
        Err(e) => {
            return vec![Check::error(
                "guest: build el2, the test host and the payload",
                &e,
            )]
        }
    };
    let launch = testhost::launch(&el2, &host, Some(&guest));
    match testhost::boot(&launch, TIMEOUT, "guest") {
        Ok(run) => testhost::results("guest", &run, TIMEOUT),
        Err(e) => vec![Check::error("guest: run QEMU", &e)],
    }
}

/// el2, the test host and the guest payload: `build/{el2,testhost,guest}.bin`.
pub fn build_all(root: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let el2 = build_el2(root).context("build el2")?;
    let host = build_testhost(root).context("build the test host")?;
    let guest = build_guest(root).context("build the guest payload")?;
    Ok((el2, host, guest))
}
