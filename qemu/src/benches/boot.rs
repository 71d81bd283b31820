//! `cargo xtask bench boot`: boot to user space with and without el2, the
//! wall-clock ratio over several runs, el2's trap counts by cause and the
//! host stage-2's shape, written into docs/PERFORMANCE.md.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

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
    /// Boots per configuration (direct and under el2, alternating).
    #[arg(long, default_value_t = DEFAULT_RUNS, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
}

/// Default boots per configuration in `bench boot`.
pub const DEFAULT_RUNS: u32 = 5;

/// One measured boot.
#[derive(Debug, Clone)]
pub struct BootTime {
    /// Host wall clock from QEMU's start to the user-space marker.
    pub wall: Duration,
    /// Guest uptime at the marker (seconds).
    pub guest: Option<f64>,
    /// el2's `traps ...` and `host stage-2: ...` lines at the power-off
    /// that ends the run (empty for the direct boot).
    pub el2: Vec<String>,
}

/// Boots once to user space (the script is `true`, then the init powers
/// off) and measures it.
fn measure_one(root: &Path, ing: &Ingredients, what: &str) -> Result<BootTime> {
    let r = script_boot(root, ing, &Machine::default(), "true\n", &[])?;
    r.finish()?;
    let wall = r
        .userspace
        .ok_or_else(|| anyhow!("{what}: no user-space marker"))?;
    progress(&format!(
        "{what}: user space after {:.2} s (guest uptime {})",
        wall.as_secs_f64(),
        r.guest_uptime.map_or("?".into(), |g| format!("{g:.2} s"))
    ));
    let el2 = r
        .captured
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("el2: "))
        .filter(|l| l.starts_with("traps ") || l.starts_with("host stage-2: ipa_bits="))
        .map(str::to_string)
        .collect();
    Ok(BootTime {
        wall,
        guest: r.guest_uptime,
        el2,
    })
}

/// `cargo xtask bench boot [--runs N] [--no-hyp]`: `N` boots to user space
/// directly at EL2 and `N` under el2, alternating (direct first in odd
/// rounds, el2 first in even ones, so drift of the machine's load hits both
/// alike); writes the wall-clock figures, the per-round ratio's spread, el2's
/// trap counts and the host stage-2's shape into `docs/PERFORMANCE.md`.
/// `--no-hyp` measures only the direct boot and writes nothing.
pub fn bench(root: &Path, args: &BootArgs) -> Result<()> {
    let runs = args.runs as usize;
    let direct_ing = ingredients(root, true)?;
    if args.no_hyp {
        let mut direct = Vec::new();
        for i in 0..runs {
            direct.push(measure_one(
                root,
                &direct_ing,
                &format!("direct {}/{runs}", i + 1),
            )?);
        }
        println!("direct: median {:.2} s", median(&walls(&direct)));
        println!("(--no-hyp: docs/PERFORMANCE.md not written; it needs both boots)");
        return Ok(());
    }
    let hyp_ing = ingredients(root, false)?;
    let (mut direct, mut hyp) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (d, h) = (
            format!("direct {}/{runs}", i + 1),
            format!("el2 {}/{runs}", i + 1),
        );
        if i % 2 == 0 {
            direct.push(measure_one(root, &direct_ing, &d)?);
            hyp.push(measure_one(root, &hyp_ing, &h)?);
        } else {
            hyp.push(measure_one(root, &hyp_ing, &h)?);
            direct.push(measure_one(root, &direct_ing, &d)?);
        }
    }
    if let Some((i, _)) = hyp.iter().enumerate().find(|(_, b)| b.el2.is_empty()) {
        bail!(
            "el2 run {}: no `el2: traps` lines at power-off (is el2 older than the trap counts?)",
            i + 1
        );
    }
    let body = render_bench(
        &direct,
        &hyp,
        &crate::versions::with_debian(&direct_ing.debian),
    );
    println!("{body}");
    super::write_section(root, "boot", &body)
}

fn walls(v: &[BootTime]) -> Vec<f64> {
    v.iter().map(|b| b.wall.as_secs_f64()).collect()
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Minimum, median and maximum.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, median(v), max)
}

/// One counter of el2's power-off lines: `(group, name, value)`. The
/// `traps GROUP: name=n ...` lines give one per pair; `host stage-2:`
/// gives its `key=value` pairs under `stage2 shape` (leaf sizes prefix the
/// names that follow them: `1g: ram=...` is `1g ram`).
fn el2_counters(lines: &[String]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for l in lines {
        let (group, rest) = if let Some(r) = l.strip_prefix("traps ") {
            match r.split_once(':') {
                Some((g, rest)) => (g.to_string(), rest),
                None => continue,
            }
        } else if let Some(r) = l.strip_prefix("host stage-2:") {
            ("host stage-2".to_string(), r)
        } else {
            continue;
        };
        let mut prefix = String::new();
        for word in rest.split_whitespace() {
            if let Some(p) = word.strip_suffix(':') {
                prefix = format!("{p} ");
            } else if let Some((k, v)) = word.split_once('=') {
                out.push((group.clone(), format!("{prefix}{k}"), v.to_string()));
            }
        }
    }
    out
}

/// The trap and shape table: one row per counter, the value of every run
/// (one value when all runs agree).
fn render_counters(hyp: &[BootTime]) -> String {
    let per_run: Vec<Vec<(String, String, String)>> =
        hyp.iter().map(|b| el2_counters(&b.el2)).collect();
    let mut keys: Vec<(String, String)> = Vec::new();
    for run in &per_run {
        for (g, n, _) in run {
            if !keys.iter().any(|(kg, kn)| kg == g && kn == n) {
                keys.push((g.clone(), n.clone()));
            }
        }
    }
    let mut s = String::from("| group | counter | per boot |\n|---|---|---|\n");
    for (g, n) in keys {
        let vals: Vec<String> = per_run
            .iter()
            .map(|run| {
                run.iter()
                    .find(|(rg, rn, _)| *rg == g && *rn == n)
                    .map_or("0".to_string(), |(_, _, v)| v.clone())
            })
            .collect();
        let shown = if vals.iter().all(|v| *v == vals[0]) {
            vals[0].clone()
        } else {
            vals.join(", ")
        };
        s.push_str(&format!("| {g} | {n} | {shown} |\n"));
    }
    s
}

/// The Markdown section for `docs/PERFORMANCE.md`.
pub fn render_bench(direct: &[BootTime], hyp: &[BootTime], what: &str) -> String {
    let row = |name: &str, v: &[BootTime]| {
        let w: Vec<String> = walls(v).iter().map(|x| format!("{x:.2}")).collect();
        let guests: Vec<String> = v
            .iter()
            .map(|b| b.guest.map_or("?".into(), |g| format!("{g:.2}")))
            .collect();
        let (lo, mid, hi) = spread(&walls(v));
        format!(
            "| {name} | {} | {lo:.2} / {mid:.2} / {hi:.2} | {} |\n",
            w.join(", "),
            guests.join(", ")
        )
    };
    let ratios: Vec<f64> = direct
        .iter()
        .zip(hyp)
        .map(|(d, h)| h.wall.as_secs_f64() / d.wall.as_secs_f64())
        .collect();
    let (lo, mid, hi) = spread(&ratios);
    let of_medians = median(&walls(hyp)) / median(&walls(direct));
    let r: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    format!(
        "## Boot to user space (`cargo xtask bench boot`)\n\n\
         QEMU TCG, `-M virt,virtualization=on,gic-version=3 -cpu {} -smp 4 -m 2G`, {what}.\n\
         {n} rounds, each one boot directly at EL2 and one under el2 (direct first in odd\n\
         rounds, el2 first in even ones). Time from QEMU's start to the first line printed by\n\
         `/init` (host wall clock, seconds); guest uptime at that line in the last column.\n\n\
         | boot | runs (s) | min / median / max (s) | guest uptime (s) |\n|---|---|---|---|\n{}{}\n\
         Ratio el2 / direct per round: {} (min / median / max **{lo:.2} / {mid:.2} / {hi:.2}**;\n\
         ratio of the medians {of_medians:.2}; target <= 1.10).\n\n\
         The two boots do not do the same work: booted at EL2, Linux initialises KVM\n\
         (`kvm [1]: ...`), while under el2 it finds no HYP mode and skips that. Wall-clock\n\
         time under TCG on a shared 2-core machine is noisy; the deterministic figures are\n\
         the counts below.\n\n\
         Exceptions el2 took from the host in one boot to user space and power-off (el2\n\
         prints them at PSCI SYSTEM_OFF; zero counters left out; one value when every run\n\
         agrees), and the host stage-2's shape at that moment: its geometry, its leaves\n\
         mapping RAM and MMIO per size, and the descriptors one lookup through such a leaf\n\
         reads (`levels`):\n\n{}",
        qemu::DEFAULT_CPU,
        row("direct at EL2 (`--no-hyp`)", direct),
        row("under el2 (host at EL1)", hyp),
        r.join(", "),
        render_counters(hyp),
        n = direct.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Manual harness check of `bench boot` without el2 (boots QEMU twice):
    /// `cargo test -p xtask -- --ignored bench_boot_direct`.
    #[test]
    #[ignore = "boots QEMU"]
    fn bench_boot_direct() {
        bench(
            &crate::util::workspace_root(),
            &BootArgs {
                no_hyp: true,
                runs: 2,
            },
        )
        .unwrap();
    }

    fn t(s: f64, el2: &[&str]) -> BootTime {
        BootTime {
            wall: Duration::from_secs_f64(s),
            guest: Some(s - 1.0),
            el2: el2.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn bench_section_is_spliced() {
        let a = [
            "traps total: exceptions=12",
            "traps stage2: mmio_map_1g=1",
            "host stage-2: ipa_bits=40 start_level=1 root_tables=2 1g: ram=1 mmio=1 levels=1",
        ];
        let b = [
            "traps total: exceptions=13",
            "traps stage2: mmio_map_1g=1 already_mapped=1",
            "host stage-2: ipa_bits=40 start_level=1 root_tables=2 1g: ram=1 mmio=1 levels=1",
        ];
        let body = render_bench(
            &[t(4.0, &[]), t(5.0, &[]), t(6.0, &[])],
            &[t(6.0, &a), t(7.5, &b), t(9.0, &a)],
            "k",
        );
        assert!(body.contains("1.50, 1.50, 1.50"), "{body}");
        assert!(body.contains("**1.50 / 1.50 / 1.50**"), "{body}");
        assert!(body.contains("| 4.00, 5.00, 6.00 | 4.00 / 5.00 / 6.00 |"));
        assert!(
            body.contains("| total | exceptions | 12, 13, 12 |"),
            "{body}"
        );
        assert!(body.contains("| stage2 | mmio_map_1g | 1 |"), "{body}");
        assert!(
            body.contains("| stage2 | already_mapped | 0, 1, 0 |"),
            "{body}"
        );
        assert!(body.contains("| host stage-2 | ipa_bits | 40 |"), "{body}");
        assert!(body.contains("| host stage-2 | 1g levels | 1 |"), "{body}");
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(spread(&[1.2, 0.9, 1.1]), (0.9, 1.1, 1.2));
    }
}
