//! The fuzz step: a bounded `cargo fuzz` run of `fuzz/`'s `host_call`
//! target (the EL2 dispatcher on host fakes, see `fuzz/README.md`).
//!
//! Works with the pinned stable toolchain: `-s none` (no sanitizer) needs
//! no `-Z` flag, and the target checks its own invariants. `cargo-fuzz` is
//! installed at the pinned [`CARGO_FUZZ_VERSION`] (`cargo install cargo-fuzz
//! --version =<pin> --locked`) unless that version is there. The build
//! and the corpus live under `target/fuzz/`; the committed seeds in
//! `fuzz/seeds/host_call` are read, never written.

use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context, Result};

use crate::util::{capture, cargo_bin, progress, tail};

/// The fuzz target.
pub const TARGET: &str = "host_call";
/// Wall-clock bound of [`run_bounded`].
pub const BOUNDED_SECONDS: u32 = 30;
/// Largest input (about 30 calls): longer inputs slow every run down
/// without reaching deeper states.
const MAX_LEN: u32 = 512;

/// Builds the target and fuzzes it for [`BOUNDED_SECONDS`]; returns a
/// one-line summary, or the failure (build error, or the crash with its
/// reproducer path).
pub fn run_bounded(root: &Path) -> Result<String> {
    run_for(root, BOUNDED_SECONDS)
}

/// As [`run_bounded`], for `seconds` (use a long time, or run `cargo fuzz`
/// directly as `fuzz/README.md` says, for real fuzzing).
pub fn run_for(root: &Path, seconds: u32) -> Result<String> {
    let fuzz_dir = root.join("fuzz");
    let target_dir = root.join("target").join("fuzz");
    let corpus = target_dir.join("corpus").join(TARGET);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    ensure_cargo_fuzz()?;

    progress("fuzz: building the host_call target (cargo fuzz build -s none)");
    let mut build = cargo_fuzz(&fuzz_dir, &target_dir);
    build.args(["build", "-s", "none", TARGET]);
    let out = capture(&mut build)?;
    if !out.status.success() {
        return Err(anyhow!(
            "cargo fuzz build failed:\n{}",
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        ));
    }

    progress(&format!("fuzz: running host_call for {seconds}s"));
    let mut run = cargo_fuzz(&fuzz_dir, &target_dir);
    run.args(["run", "-s", "none", TARGET])
        .arg(&corpus)
        .arg(fuzz_dir.join("seeds").join(TARGET))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-print_final_stats=1");
    let out = capture(&mut run)?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(anyhow!(
            "fuzz target {TARGET} failed ({}); reproduce with `cd fuzz && cargo fuzz run -s none {TARGET} <artifact>`:\n{}",
            out.status,
            tail(&log, 40)
        ));
    }
    summary(&log).ok_or_else(|| anyhow!("no libFuzzer summary in:\n{}", tail(&log, 20)))
}

/// `cargo fuzz` in `fuzz/` with its build under `target_dir`.
fn cargo_fuzz(fuzz_dir: &Path, target_dir: &Path) -> Command {
    let mut cmd = Command::new(cargo_bin());
    cmd.arg("fuzz")
        .current_dir(fuzz_dir)
        .env("CARGO_TARGET_DIR", target_dir);
    cmd
}

/// The cargo-fuzz release the runner installs and expects (docs/BUILD.md):
/// pinned, so a new release cannot change the fuzz run under us.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz [`CARGO_FUZZ_VERSION`] unless `cargo fuzz --version`
/// already says that version.
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = capture(Command::new(cargo_bin()).args(["fuzz", "--version"]))
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if installed.as_deref() == Some(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        return Ok(());
    }
    progress(&format!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (found: {}; cargo install cargo-fuzz \
         --version ={CARGO_FUZZ_VERSION} --locked)",
        installed.as_deref().unwrap_or("none")
    ));
    let version = format!("={CARGO_FUZZ_VERSION}");
    let out = capture(Command::new(cargo_bin()).args([
        "install",
        "cargo-fuzz",
        "--version",
        &version,
        "--locked",
        "--force",
    ]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "cannot install cargo-fuzz:\n{}",
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        ))
    }
}

/// "fuzz host_call: N runs in S s (R/s), cov C, corpus K" from libFuzzer's
/// log (`Done N runs in S second(s)` and the last status line).
fn summary(log: &str) -> Option<String> {
    let done = log.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut words = done.split_whitespace();
    let runs: u64 = words.nth(1)?.parse().ok()?;
    let secs: u64 = words.nth(2)?.parse().ok()?;
    let field = |name: &str| {
        log.lines()
            .rev()
            .filter(|l| l.starts_with('#'))
            .find_map(|l| {
                let mut it = l.split_whitespace();
                it.position(|w| w == name)?;
                it.next().map(str::to_string)
            })
            .unwrap_or_else(|| "?".to_string())
    };
    Some(format!(
        "fuzz {TARGET}: {runs} runs in {secs} s ({}/s), cov {}, corpus {}, no failure",
        runs / secs.max(1),
        field("cov:"),
        field("corp:")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_libfuzzer_output() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 1200 ft: 3000 corp: 80/9Kb lim: 43 exec/s: 2048 rss: 40Mb\n\
                   #6000\tDONE   cov: 1234 ft: 3100 corp: 85/10Kb lim: 43 exec/s: 200 rss: 41Mb\n\
                   Done 6000 runs in 30 second(s)\n";
        assert_eq!(
            summary(log).as_deref(),
            Some("fuzz host_call: 6000 runs in 30 s (200/s), cov 1234, corpus 85/10Kb, no failure")
        );
        assert_eq!(summary("nothing"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
