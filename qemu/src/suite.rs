//! `cargo xtask test`: test suites and their tally.
//!
//! Each suite is a list of steps. A step that runs a test binary contributes
//! that binary's own pass/fail counts; a check (clippy, fmt, a cross build)
//! counts as one test. The last line printed is always `N passed, N failed`.

use std::path::Path;
use std::process::Command;

use crate::install;
use crate::util::{capture, cargo_bin, progress};

/// Suites in the order `cargo xtask test` runs them.
const SUITES: &[(&str, &str)] = &[
    (
        "host",
        "unit and property tests, clippy (host and aarch64), rustfmt, docs",
    ),
    (
        "boot",
        "boots Debian's kernel under el2 in QEMU and checks it (XTASK_BOOT_MODE=no-hyp: harness check at EL2)",
    ),
    (
        "conformance",
        "boots el2 with a bare-metal EL1 test host that checks every hypercall against docs/ABI.md",
    ),
    (
        "guest",
        "the EL1 test host runs guests under el2 (demand faults, SMP, isolation, hostile guest calls)",
    ),
    (
        "shim",
        "Debian under el2 with s2pin.ko and s2vmm: pinning, hooks, policies under NUMA balancing, kill -9, hostile user space (2 boots)",
    ),
    (
        "numa",
        "the short NUMA benchmark (issue 10): eager and confirm on 4K anon under NUMA balancing, 30 s each; confirm's spurious unmaps 0, eager's above 0",
    ),
];

/// Suites that exist but are not in the default run yet: `cargo xtask test
/// NAME` runs one; moving its line into [`SUITES`] enables it by default.
const OPT_IN: &[(&str, &str)] = &[];

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}");
            if !detail.is_empty() {
                println!("{detail}");
            }
            self.failures.push(name.to_string());
        }
    }
}

/// Runs the named suites (all available ones when `args` is empty).
pub fn test(root: &Path, args: &[String]) -> Result<(), String> {
    let mut wanted: Vec<&str> = Vec::new();
    for a in args {
        if let Some((name, _)) = SUITES.iter().chain(OPT_IN).find(|(n, _)| n == a) {
            wanted.push(name);
        } else {
            let names: Vec<&str> = SUITES.iter().chain(OPT_IN).map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown suite `{a}`; available: {}",
                names.join(", ")
            ));
        }
    }
    if wanted.is_empty() {
        wanted = SUITES.iter().map(|(n, _)| *n).collect();
    }
    install::rust_targets()?;
    let mut tally = Tally::default();
    for suite in wanted {
        match suite {
            "host" => host(root, &mut tally),
            "boot" => boot(root, &mut tally),
            "guest" => {
                progress("guest: el2 + the EL1 test host running guests in QEMU (one boot, with a timeout)");
                for (name, ok, detail) in crate::guest::suite(root) {
                    tally.check(&name, ok, &detail);
                }
            }
            "shim" => {
                progress("shim: Debian under el2 with s2pin.ko and s2vmm (two boots, each with a timeout)");
                for (name, ok, detail) in crate::shim::suite(root) {
                    tally.check(&name, ok, &detail);
                }
            }
            "numa" => {
                progress("numa: the short NUMA benchmark under el2 (one boot, with a timeout)");
                for (name, ok, detail) in crate::numa_bench::suite(root) {
                    tally.check(&name, ok, &detail);
                }
            }
            "conformance" => {
                progress("conformance: el2 + the EL1 test host in QEMU (one boot, with a timeout)");
                for (name, ok, detail) in crate::conformance::suite(root) {
                    tally.check(&name, ok, &detail);
                }
            }
            _ => unreachable!("suite names come from SUITES and OPT_IN"),
        }
    }
    if !tally.failures.is_empty() {
        println!("failed: {}", tally.failures.join(", "));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        Ok(())
    } else {
        Err(format!("{} test(s) failed", tally.failed))
    }
}

/// The host suite: everything that runs on the build machine.
fn host(root: &Path, tally: &mut Tally) {
    progress("host: cargo test --workspace");
    cargo_tests(root, tally, &["test", "--workspace", "--no-fail-fast"]);

    progress("host: cargo fmt --check");
    run_check(
        root,
        tally,
        "rustfmt",
        &["fmt", "--all", "--", "--check"],
        &[],
    );

    progress("host: clippy (host)");
    run_check(
        root,
        tally,
        "clippy host",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    );

    progress("host: clippy (aarch64-unknown-none)");
    run_check(
        root,
        tally,
        "clippy aarch64-unknown-none",
        &[
            "clippy",
            "-p",
            "hypercalls",
            "-p",
            "stage2",
            "-p",
            "abi-model",
            "-p",
            "s2pin-uapi",
            "--target",
            "aarch64-unknown-none",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    );

    progress("host: clippy of the bare-metal programs and the module's Rust (aarch64-unknown-none-softfloat)");
    run_check(
        root,
        tally,
        "clippy el2, testhost, guest, s2pin-core, baremetal aarch64-unknown-none-softfloat",
        &[
            "clippy",
            "-p",
            "el2",
            "-p",
            "testhost",
            "-p",
            "guest",
            "-p",
            "s2pin-core",
            "-p",
            "baremetal",
            "--target",
            "aarch64-unknown-none-softfloat",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    );

    progress("host: clippy of s2vmm for the host it runs on (aarch64-unknown-linux-musl)");
    run_check(
        root,
        tally,
        "clippy s2vmm aarch64-unknown-linux-musl",
        &[
            "clippy",
            "-p",
            "s2vmm",
            "--target",
            "aarch64-unknown-linux-musl",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    );

    progress("host: build for aarch64-unknown-none-softfloat (the kernel module's Rust)");
    run_check(
        root,
        tally,
        "build hypercalls aarch64-unknown-none-softfloat",
        &[
            "build",
            "-p",
            "hypercalls",
            "--target",
            "aarch64-unknown-none-softfloat",
        ],
        &[],
    );

    progress("host: cargo doc");
    run_check(
        root,
        tally,
        "rustdoc",
        &[
            "doc",
            "--no-deps",
            "-p",
            "hypercalls",
            "-p",
            "stage2",
            "-p",
            "abi-model",
            "-p",
            "el2",
            "-p",
            "s2pin-uapi",
            "-p",
            "s2vmm",
        ],
        &[("RUSTDOCFLAGS", "-D warnings")],
    );

    progress("host: fuzz the EL2 dispatcher (bounded cargo-fuzz run, fuzz/README.md)");
    match crate::fuzz::run_bounded(root) {
        Ok(summary) => {
            println!("{summary}");
            tally.check("fuzz host_call (bounded)", true, "");
        }
        Err(e) => tally.check("fuzz host_call (bounded)", false, &e),
    }
}

/// The boot suite: QEMU boots, each assertion one check (see `boot::suite`).
fn boot(root: &Path, tally: &mut Tally) {
    progress("boot: QEMU boots with a timeout each");
    match crate::boot::SuiteMode::from_env() {
        Ok(mode) => {
            for c in crate::boot::suite(root, mode) {
                tally.check(&c.name, c.ok, &c.detail);
            }
        }
        Err(e) => tally.check("boot: XTASK_BOOT_MODE", false, &e),
    }
}

/// Runs a cargo command as one check.
fn run_check(root: &Path, tally: &mut Tally, name: &str, args: &[&str], env: &[(&str, &str)]) {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args).current_dir(root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match capture(&mut cmd) {
        Ok(out) => {
            let detail = format!(
                "{}\n{}",
                tail(&String::from_utf8_lossy(&out.stdout), 30),
                tail(&String::from_utf8_lossy(&out.stderr), 60)
            );
            tally.check(name, out.status.success(), &detail);
        }
        Err(e) => tally.check(name, false, &e),
    }
}

/// Runs `cargo test` and adds every test binary's counts to the tally.
fn cargo_tests(root: &Path, tally: &mut Tally, args: &[&str]) {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args).current_dir(root);
    let out = match capture(&mut cmd) {
        Ok(out) => out,
        Err(e) => return tally.check("cargo test", false, &e),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (passed, failed) = libtest_counts(&stdout);
    // Name each failing test so the log says what broke.
    for line in stdout.lines() {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            println!("FAIL {name}");
            tally.failures.push(name.to_string());
        }
    }
    println!("cargo test: {passed} passed, {failed} failed");
    tally.passed += passed;
    tally.failed += failed;
    if failed > 0 {
        println!("{}", tail(&stdout, 80));
    }
    if !out.status.success() && failed == 0 {
        // Nothing failed by name, so a test binary did not build or crashed.
        tally.check("cargo test (build)", false, &tail(&stderr, 60));
    }
}

/// Sums the `test result:` lines of libtest output.
fn libtest_counts(output: &str) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => passed += n,
                "failed" => failed += n,
                _ => {}
            }
        }
    }
    (passed, failed)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_libtest_summaries() {
        let out = "\
running 3 tests
test a ... ok
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
";
        assert_eq!(libtest_counts(out), (8, 2));
    }

    #[test]
    fn ignores_other_lines() {
        assert_eq!(
            libtest_counts("passed 3 failed 4\nrunning 0 tests\n"),
            (0, 0)
        );
    }
}
