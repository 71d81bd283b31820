//! The `conformance` suite: el2 with the bare-metal test host
//! (`qemu/testhost`, see `testhost.rs`) in place of Linux; every hypercall
//! case it runs against docs/ABI.md is one check.

use std::path::Path;
use std::time::Duration;

use crate::check::{Check, Tally};
use crate::run::build_el2;
use crate::testhost::{self, build_testhost};
use crate::util::progress;

/// Hard limit on the whole conformance boot.
pub const TIMEOUT: Duration = Duration::from_secs(110);

/// The conformance suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress("conformance: el2 + the EL1 test host in QEMU (one boot, with a timeout)");
    tally.record_all(suite(root));
}

/// One check per case, plus checks for a failed build or an incomplete run.
pub fn suite(root: &Path) -> Vec<Check> {
    let el2 = match build_el2(root) {
        Ok(p) => p,
        Err(e) => return vec![Check::error("conformance: build el2", &e)],
    };
    let host = match build_testhost(root) {
        Ok(p) => p,
        Err(e) => return vec![Check::error("conformance: build the test host", &e)],
    };
    let launch = testhost::launch(&el2, &host, None);
    match testhost::boot(&launch, TIMEOUT, "conformance") {
        Ok(run) => testhost::results("conformance", &run, TIMEOUT),
        Err(e) => vec![Check::error("conformance: run QEMU", &e)],
    }
}
