//! The `numa` suite: the short form of `cargo xtask bench numa` (see
//! `benches/numa.rs`), one boot under el2.

use std::path::Path;

use crate::benches::numa::{measure_plan, Hyp, Plan, Row};
use crate::check::{Check, Tally};
use crate::util::progress;

/// The numa suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress("numa: the short NUMA benchmark under el2 (one boot, with a timeout)");
    tally.record_all(suite(root));
}

/// The short form inside `cargo xtask test` (suite `numa`): one el2 boot,
/// eager and confirm on anonymous 4K memory, 30 s each: confirm's spurious
/// unmaps stay 0, eager's are above 0.
pub fn suite(root: &Path) -> Vec<Check> {
    let row = |p| Row {
        hyp: Hyp::S2pin(p),
        backing: "anon",
        balancing: true,
        run: 1,
    };
    let plan = Plan {
        rows: vec![row("eager"), row("confirm")],
        seconds: 30,
        mem_mib: 16,
        teardown: false,
        from_logs: false,
    };
    let (rows, _, all, _) = match measure_plan(root, &plan) {
        Ok(x) => x,
        Err(e) => {
            return vec![Check::error(
                "numa: boot under el2 with s2pin.ko and s2vmm",
                &e,
            )]
        }
    };
    let text = |id: &str| {
        all.get(&format!("el2:{id}"))
            .map(|s| s.lines.join("\n"))
            .unwrap_or_else(|| "(no output for this row)".into())
    };
    let mut out = Vec::new();
    let setup = all.get("el2:setup").cloned().unwrap_or_default();
    out.push(Check::new(
        "numa: s2pin.ko loads, NUMA balancing's knobs set",
        setup.checks.get("insmod").map(String::as_str) == Some("0")
            && setup.checks.get("knobs").map(String::as_str) == Some("0"),
        setup.lines.join("\n"),
    ));
    let dm = all.get("el2:dmesg").cloned().unwrap_or_default();
    out.push(Check::new(
        "numa: no Oops, BUG or WARNING in dmesg",
        dm.checks.get("bad").map(String::as_str) == Some("0"),
        dm.lines.join("\n"),
    ));
    for (r, m) in &rows {
        let id = r.id();
        let scanned = m.range_start.get(2).copied().unwrap_or(0) > 0;
        let (name, ok) = match r.hyp {
            Hyp::S2pin("confirm") => (
                "numa short bench, confirm on 4K anon under NUMA balancing: 0 spurious unmaps, 0 pages unmapped for protection events, passes made",
                m.ok && scanned && m.spurious == 0 && m.passes > 0,
            ),
            _ => (
                "numa short bench, eager on 4K anon under NUMA balancing: spurious unmaps above 0 (it unmaps pinned pages whose PTE 6.1 leaves alone: confirm's row unmaps none of them)",
                m.ok && scanned && m.spurious > 0 && m.passes > 0,
            ),
        };
        out.push(Check::new(name, ok, format!("{m:?}\n{}", text(&id))));
    }
    out
}
