//! `cargo xtask bench boot`: boot to user space with and without el2 and
//! write the ratio into docs/PERFORMANCE.md.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::qemu::{self, Machine};
use crate::run::{ingredients, Ingredients};
use crate::suites::boot::script_boot;
use crate::util::progress;

/// Options of `cargo xtask bench boot`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// Measure only the direct boot and write nothing (checks the harness
    /// before el2 boots).
    #[arg(long)]
    pub no_hyp: bool,
}

/// Runs per configuration in `bench boot`.
pub const BENCH_RUNS: usize = 3;

/// One measured boot.
#[derive(Debug, Clone, Copy)]
pub struct BootTime {
    /// Host wall clock from QEMU's start to the user-space marker.
    pub wall: Duration,
    /// Guest uptime at the marker (seconds).
    pub guest: Option<f64>,
}

/// Boots `runs` times to user space and measures each.
fn measure(root: &Path, ing: &Ingredients, runs: usize) -> Result<Vec<BootTime>> {
    let machine = Machine::default();
    let mut out = Vec::new();
    for i in 0..runs {
        let r = script_boot(root, ing, &machine, "true\n", &[])?;
        r.finish()?;
        let wall = r
            .userspace
            .ok_or_else(|| anyhow!("no user-space marker in run {}", i + 1))?;
        progress(&format!(
            "run {}/{runs}: user space after {:.2} s (guest uptime {})",
            i + 1,
            wall.as_secs_f64(),
            r.guest_uptime.map_or("?".into(), |g| format!("{g:.2} s"))
        ));
        out.push(BootTime {
            wall,
            guest: r.guest_uptime,
        });
    }
    Ok(out)
}

/// `cargo xtask bench boot [--no-hyp]`: boot to user space with and without
/// el2, [`BENCH_RUNS`] runs each, and write the ratio into
/// `docs/PERFORMANCE.md`. `--no-hyp` measures only the direct boot and writes
/// nothing (to check the harness before el2 boots).
pub fn bench(root: &Path, args: &BootArgs) -> Result<()> {
    let only_direct = args.no_hyp;
    let direct_ing = ingredients(root, true)?;
    let hyp_ing = if only_direct {
        None
    } else {
        Some(ingredients(root, false)?)
    };
    progress(&format!("direct boot (Linux at EL2), {BENCH_RUNS} runs"));
    let direct = measure(root, &direct_ing, BENCH_RUNS)?;
    let Some(hyp_ing) = hyp_ing else {
        println!("direct: mean {:.2} s", mean(&direct));
        println!("(--no-hyp: docs/PERFORMANCE.md not written; it needs both boots)");
        return Ok(());
    };
    progress(&format!("boot under el2 (Linux at EL1), {BENCH_RUNS} runs"));
    let hyp = measure(root, &hyp_ing, BENCH_RUNS)?;
    let body = render_bench(
        &direct,
        &hyp,
        &crate::versions::with_debian(&direct_ing.debian),
    );
    println!("{body}");
    super::write_section(root, "boot", &body)
}

fn mean(v: &[BootTime]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().map(|b| b.wall.as_secs_f64()).sum::<f64>() / v.len() as f64
}

/// The Markdown section for `docs/PERFORMANCE.md`.
pub fn render_bench(direct: &[BootTime], hyp: &[BootTime], what: &str) -> String {
    let row = |name: &str, v: &[BootTime]| {
        let walls: Vec<String> = v
            .iter()
            .map(|b| format!("{:.2}", b.wall.as_secs_f64()))
            .collect();
        let guests: Vec<String> = v
            .iter()
            .map(|b| b.guest.map_or("?".into(), |g| format!("{g:.2}")))
            .collect();
        format!(
            "| {name} | {} | {:.2} | {} |\n",
            walls.join(", "),
            mean(v),
            guests.join(", ")
        )
    };
    let ratio = mean(hyp) / mean(direct);
    format!(
        "## Boot to user space (`cargo xtask bench boot`)\n\n\
         QEMU TCG, `-M virt,virtualization=on,gic-version=3 -cpu {} -smp 4 -m 2G`, {what}.\n\
         Time from QEMU's start to the first line printed by `/init` (host wall clock, seconds);\n\
         guest uptime at that line in the last column.\n\n\
         | boot | runs (s) | mean (s) | guest uptime (s) |\n|---|---|---|---|\n{}{}\n\
         Ratio el2 / direct: **{ratio:.2}** (target <= 1.10).\n\n\
         The two boots do not do the same work: booted at EL2, Linux initialises KVM\n\
         (`kvm [1]: ...`), while under el2 it finds no HYP mode and skips that, which is why\n\
         the hypervisor's boot can come out faster. Wall-clock time under TCG on a shared\n\
         2-core machine is noisy (runs differ by ~30%); treat the ratio as \"no measurable\n\
         slowdown\", not as a hardware figure.\n",
        qemu::DEFAULT_CPU,
        row("direct at EL2 (`--no-hyp`)", direct),
        row("under el2 (host at EL1)", hyp),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Manual harness check of `bench boot` without el2 (boots QEMU 3 times):
    /// `cargo test -p xtask -- --ignored bench_boot_direct`.
    #[test]
    #[ignore = "boots QEMU"]
    fn bench_boot_direct() {
        bench(&crate::util::workspace_root(), &BootArgs { no_hyp: true }).unwrap();
    }

    #[test]
    fn bench_section_is_spliced() {
        let t = |s: f64| BootTime {
            wall: Duration::from_secs_f64(s),
            guest: Some(s - 1.0),
        };
        let body = render_bench(&[t(4.0), t(5.0), t(6.0)], &[t(6.0), t(7.5), t(9.0)], "k");
        assert!(body.contains("**1.50**"), "{body}");
        assert!(body.contains("| 4.00, 5.00, 6.00 | 5.00 |"));
    }
}
