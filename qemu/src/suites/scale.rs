//! The `scale` suite: the short form of `cargo xtask bench scale` (see
//! `benches/scale.rs`), one boot under el2: two 64 MiB guests (4 KiB pages
//! under confirm, THP under keep), each faulted in, then a NUMA scan,
//! `mprotect(PROT_READ)` and `munmap` of its memory; the same limits as the
//! benchmark (pages/512 + 4 calls for the range operations, 0 for the NUMA
//! scan) and nothing leaked (one leak check at the end).

use std::path::Path;
use std::time::Duration;

use crate::benches::scale::{results, script_with, verdicts, Run};
use crate::check::{Check, Tally};
use crate::qemu::Machine;
use crate::run;
use crate::util::progress;

/// The boot's timeout (the boot takes about 70 s of guest time under TCG).
const TIMEOUT: Duration = Duration::from_secs(600);

/// The suite's runs of `s2vmm scale`.
#[must_use]
pub fn runs() -> Vec<Run> {
    vec![
        Run {
            id: "short-anon",
            args: "--vm 64M:anon:confirm --steps numa,wrprotect,munmap --numa-seconds 120".into(),
        },
        Run {
            id: "short-thp",
            args: "--vm 64M:thp:keep --steps numa,wrprotect,munmap --numa-seconds 120".into(),
        },
    ]
}

/// The scale suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress(&format!(
        "scale: s2vmm scale under el2, two 64 MiB guests (one boot, timeout {} s)",
        TIMEOUT.as_secs()
    ));
    tally.record_all(suite(root));
}

/// Runs the suite.
pub fn suite(root: &Path) -> Vec<Check> {
    let boot = (|| -> anyhow::Result<_> {
        let ing = run::ingredients(root, false)?;
        let extras = run::shim_extras(root, &ing.debian)?;
        run::exec_script(
            root,
            &ing,
            &Machine::default(),
            &script_with(&runs(), false),
            &extras,
            TIMEOUT,
        )
    })();
    let r = match boot {
        Ok(r) => r,
        Err(e) => {
            return vec![Check::error(
                "scale: boot under el2 with s2pin.ko and s2vmm",
                &e,
            )]
        }
    };
    let mut out = vec![Check::new(
        "scale: the boot ran the script to its end",
        r.status.is_some(),
        r.captured.tail(40),
    )];
    let res = results(&r.output);
    let dmesg_ok = r.output.iter().any(|l| l.trim() == "CHECK dmesg.bad=0");
    out.push(Check::new(
        "scale: no Oops, BUG or WARNING in dmesg",
        dmesg_ok,
        r.captured.tail(40),
    ));
    let body = res
        .into_iter()
        .filter(|(k, _)| k != "setup" && k != "dmesg")
        .collect();
    for (ok, line) in verdicts(&body, false) {
        if let Some(ok) = ok {
            out.push(Check::new(
                format!("scale: {line}"),
                ok,
                r.captured.tail(30),
            ));
        }
    }
    out
}
