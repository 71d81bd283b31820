//! Issue 12 items 1 and 5 on the real path: the kill loop (`s2vmm killloop`)
//! and the hostile guests (`s2vmm hostile-guests`), each ending with the
//! nothing-leaked check (`s2vmm leakcheck`; host-driver/README.md,
//! docs/DESIGN.md §11).
//!
//! * the `reliability` suite of `cargo xtask test`: one boot with two NUMA
//!   nodes: every hostile-guest case, then 10 kills and the OOM kill;
//! * `cargo xtask killloop [--kills 100] [--seed N]`: the long form, its
//!   output printed as it comes; exit status 0 when nothing leaked.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::check::{Check, Tally};
use crate::initramfs::Mode;
use crate::qemu::{Console, Machine};
use crate::run::{exec_script, exec_with, ingredients, kernel_cmdline, prepare, shim_extras};
use crate::util::progress;

/// Kills of the suite's short form.
const SUITE_KILLS: u32 = 10;
/// The suite's seed (fixed: the same plan every run).
const SUITE_SEED: u64 = 1;
/// The suite's boot limit.
const SUITE_TIMEOUT: Duration = Duration::from_secs(900);

/// Two NUMA nodes, so that NUMA balancing runs over the killed guests.
fn machine() -> Machine {
    Machine {
        numa_nodes: 2,
        ..Machine::default()
    }
}

/// `cargo xtask killloop`.
#[derive(Debug, Clone, Args)]
pub struct KillLoopArgs {
    /// SIGKILLs of s2vmm to make (each followed by the leak check).
    #[arg(long, default_value_t = 100)]
    pub kills: u32,
    /// The seed of the plan (scenarios, guests, kill moments).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Leave out the run in which the OOM killer chooses the VMM.
    #[arg(long)]
    pub no_oom: bool,
    /// Kill QEMU after this many seconds (default: 60 per kill plus 10 minutes).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

/// `cargo xtask killloop`: boots with two NUMA nodes and runs `s2vmm killloop`.
pub fn killloop(root: &Path, a: &KillLoopArgs) -> Result<()> {
    let ing = ingredients(root, false)?;
    let extras = shim_extras(root, &ing.debian)?;
    let cmd = format!(
        "s2vmm killloop --kills {} --seed {}{}",
        a.kills,
        a.seed,
        if a.no_oom { "" } else { " --oom" }
    );
    let timeout = Duration::from_secs(a.timeout.unwrap_or(60 * u64::from(a.kills) + 600));
    progress(&format!(
        "killloop: {cmd} under el2, two NUMA nodes (timeout {} s)",
        timeout.as_secs()
    ));
    let p = prepare(
        root,
        &ing,
        &machine(),
        Mode::Exec {
            script: cmd,
            quiet: true,
        },
        &extras,
        Console::Captured,
        &kernel_cmdline(false, &[]),
    )?;
    let r = exec_with(&p, timeout, false, true)?;
    let status = r.finish()?;
    if status != 0 {
        bail!("s2vmm killloop exited with {status}: a leak, or a guest that did not die by the kill (lines above)");
    }
    Ok(())
}

/// The numbers of `killloop: N kills, N not killed, N leak checks, N leaks; ...`.
fn killloop_summary(lines: &[String]) -> Option<(u64, u64, u64, u64)> {
    let l = lines.iter().find_map(|l| {
        l.strip_prefix("killloop: ")
            .filter(|r| r.contains(" leak checks, "))
    })?;
    let head = l.split(';').next()?;
    let nums: Vec<u64> = head
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    match nums[..] {
        [kills, not_killed, checks, leaks] => Some((kills, not_killed, checks, leaks)),
        _ => None,
    }
}

/// The checks of the suite's output.
fn checks(status: Option<i32>, timed_out: bool, lines: &[String], tail: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let text = |pat: &str| -> String {
        lines
            .iter()
            .filter(|l| l.contains(pat))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    };
    out.push(Check::new(
        "reliability: the boot ends before the timeout",
        status.is_some() && !timed_out,
        format!("status {status:?}, timed out {timed_out}\n{tail}"),
    ));
    // Hostile guests: one check per case line, and the leak check after them.
    let cases: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.starts_with("hostile-guests: PASS ") || l.starts_with("hostile-guests: FAIL ")
        })
        .collect();
    for l in &cases {
        let rest = &l["hostile-guests: ".len()..];
        let (verdict, what) = rest.split_once(' ').unwrap_or((rest, ""));
        let name = what.split(':').next().unwrap_or(what);
        out.push(Check::new(
            format!("reliability: hostile guest {name} ends as it must, the VMM and host go on"),
            verdict == "PASS",
            (*l).clone(),
        ));
    }
    out.push(Check::new(
        "reliability: hostile guests: all 17 cases ran (bad calls and PSCI, 5 accesses outside memory, MMIO burst and storm, 7 trapped registers, a bad argument, a fill after)",
        cases.len() == 17,
        text("hostile-guests:"),
    ));
    out.push(Check::new(
        "reliability: hostile guests: nothing leaked afterwards (leakcheck OK)",
        lines
            .iter()
            .any(|l| l.starts_with("hostile-guests: leakcheck: OK")),
        text("hostile-guests: leakcheck"),
    ));
    // The kill loop.
    let summary = killloop_summary(lines);
    let rounds = lines
        .iter()
        .filter(|l| l.starts_with("killloop: round ") && !l.contains(": leakcheck: "))
        .count() as u64;
    let kl = text("killloop:");
    out.push(Check::new(
        format!(
            "reliability: kill loop: {SUITE_KILLS} SIGKILLs of s2vmm plus one OOM kill, every one ended the VMM"
        ),
        summary.is_some_and(|(k, nk, _, _)| k == u64::from(SUITE_KILLS) + 1 && nk == 0),
        kl.clone(),
    ));
    out.push(Check::new(
        "reliability: kill loop: the leak check after every kill and at the end found nothing (frames, pins, VMs, locked_vm, MemFree, kernel log)",
        // One check per round (a teardown round kills twice), one after
        // the OOM kill, one at the end.
        summary.is_some_and(|(_, _, c, l)| c == rounds + 2 && l == 0)
            && lines
                .iter()
                .any(|l| l.starts_with("killloop: at the end: leakcheck: OK")),
        kl.clone(),
    ));
    out.push(Check::new(
        "reliability: kill loop: the memory cgroup's OOM killer chose the VMM (SIGKILL, oom_kill counted)",
        lines.iter().any(|l| {
            l.starts_with("killloop: oom ")
                && l.contains("killed_by_sigkill=true")
                && !l.contains("memcg_oom_kills=0")
                && !l.contains("NOT-OOM-KILLED")
        }),
        text("killloop: oom"),
    ));
    out
}

/// The `reliability` suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress(&format!(
        "reliability: hostile guests and {SUITE_KILLS} kills + an OOM kill of s2vmm under el2, two NUMA nodes (one boot, timeout {} s)",
        SUITE_TIMEOUT.as_secs()
    ));
    let r = (|| -> Result<_> {
        let ing = ingredients(root, false)?;
        let extras = shim_extras(root, &ing.debian)?;
        let script = format!(
            "s2vmm hostile-guests\ns2vmm killloop --kills {SUITE_KILLS} --seed {SUITE_SEED} --oom\n"
        );
        exec_script(root, &ing, &machine(), &script, &extras, SUITE_TIMEOUT)
    })();
    match r {
        Ok(r) => tally.record_all(checks(
            r.status,
            r.captured.timed_out,
            &r.output,
            &r.captured.tail(40),
        )),
        Err(e) => tally.record(Check::error(
            "reliability: boot under el2 with s2pin.ko and s2vmm",
            &e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_summary_parses() {
        let l = lines(&[
            "killloop: round 0 fault ...",
            "killloop: 11 kills, 0 not killed, 12 leak checks, 0 leaks; phases running=3; kills after notifier events 2; 90 s",
        ]);
        assert_eq!(killloop_summary(&l), Some((11, 0, 12, 0)));
        assert_eq!(killloop_summary(&lines(&["killloop: garbage"])), None);
    }

    #[test]
    fn a_clean_run_passes_and_a_leak_fails() {
        let mut v: Vec<String> = (0..17)
            .map(|i| format!("hostile-guests: PASS case{i}: ended"))
            .collect();
        v.push("hostile-guests: leakcheck: OK pfns=...".into());
        v.push("killloop: oom vcpus=2 mem=64mx2 backing=anon policy=confirm memory.max=48M pid=1 killed_by_sigkill=true memcg_oom_kills=1 leaks=0".into());
        for i in 0..7 {
            v.push(format!("killloop: round {i} fault ... leaks=0 ms=1"));
        }
        v.push("killloop: at the end: leakcheck: OK pfns=...".into());
        v.push("killloop: 11 kills, 0 not killed, 9 leak checks, 0 leaks; x".into());
        let c = checks(Some(0), false, &v, "");
        assert!(c.iter().all(|c| c.ok), "{c:?}");
        let mut bad = v.clone();
        bad.pop();
        bad.push("killloop: 11 kills, 0 not killed, 9 leak checks, 1 leaks; x".into());
        assert!(checks(Some(1), false, &bad, "").iter().any(|c| !c.ok));
        let mut fail = v.clone();
        fail[3] = "hostile-guests: FAIL case3: ended Timeout".into();
        assert!(checks(Some(1), false, &fail, "").iter().any(|c| !c.ok));
    }
}
