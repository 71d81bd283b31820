//! The `host` suite: everything that runs on the build machine (unit and
//! property tests of every crate, rustfmt, clippy for each target, rustdoc,
//! a bounded fuzz run of the EL2 dispatcher).

use std::path::Path;
use std::process::Command;

use crate::check::{Check, Tally};
use crate::util::{capture, cargo_bin, progress, tail};

/// The host suite: everything that runs on the build machine.
pub fn run(root: &Path, tally: &mut Tally) {
    progress(&format!("host: versions: {}", crate::versions::rustc()));
    progress("host: cargo test --workspace");
    cargo_tests(root, tally, &["test", "--workspace", "--no-fail-fast"]);

    for c in CARGO_CHECKS {
        progress(&format!("host: {}", c.what));
        let mut args = vec![c.command];
        for p in c.packages {
            args.extend(["-p", p]);
        }
        args.extend(c.args);
        run_check(root, tally, c.name, &args, c.env);
    }

    progress("host: fuzz the EL2 dispatcher (bounded cargo-fuzz run, fuzz/README.md)");
    match crate::fuzz::run_bounded(root) {
        Ok(summary) => {
            println!("{summary}");
            tally.record(Check::pass("fuzz host_call (bounded)"));
        }
        Err(e) => tally.record(Check::error("fuzz host_call (bounded)", &e)),
    }
}

/// A cargo command that counts as one check.
struct CargoCheck {
    /// The progress line.
    what: &'static str,
    /// The check's name.
    name: &'static str,
    /// `fmt`, `clippy`, `build`, `doc`.
    command: &'static str,
    /// `-p` each of these.
    packages: &'static [&'static str],
    /// The rest of the command line.
    args: &'static [&'static str],
    /// Environment variables.
    env: &'static [(&'static str, &'static str)],
}

/// The host suite's cargo checks, in order.
const CARGO_CHECKS: &[CargoCheck] = &[
    CargoCheck {
        what: "cargo fmt --check",
        name: "rustfmt",
        command: "fmt",
        packages: &[],
        args: &["--all", "--", "--check"],
        env: &[],
    },
    CargoCheck {
        what: "clippy (host)",
        name: "clippy host",
        command: "clippy",
        packages: &[],
        args: &["--workspace", "--all-targets", "--", "-D", "warnings"],
        env: &[],
    },
    CargoCheck {
        what: "clippy (aarch64-unknown-none)",
        name: "clippy aarch64-unknown-none",
        command: "clippy",
        packages: &["hypercalls", "stage2", "abi-model", "s2pin-uapi", "boot-contract"],
        args: &["--target", "aarch64-unknown-none", "--", "-D", "warnings"],
        env: &[],
    },
    CargoCheck {
        what: "clippy of the bare-metal programs and the module's Rust (aarch64-unknown-none-softfloat)",
        name: "clippy el2, testhost, guest, s2pin-core, baremetal, boot-contract aarch64-unknown-none-softfloat",
        command: "clippy",
        packages: &["el2", "testhost", "guest", "s2pin-core", "baremetal", "boot-contract"],
        args: &["--target", "aarch64-unknown-none-softfloat", "--", "-D", "warnings"],
        env: &[],
    },
    CargoCheck {
        what: "clippy of s2vmm for the host it runs on (aarch64-unknown-linux-musl)",
        name: "clippy s2vmm aarch64-unknown-linux-musl",
        command: "clippy",
        packages: &["s2vmm"],
        args: &["--target", "aarch64-unknown-linux-musl", "--", "-D", "warnings"],
        env: &[],
    },
    CargoCheck {
        what: "build for aarch64-unknown-none-softfloat (the kernel module's Rust)",
        name: "build hypercalls aarch64-unknown-none-softfloat",
        command: "build",
        packages: &["hypercalls"],
        args: &["--target", "aarch64-unknown-none-softfloat"],
        env: &[],
    },
    CargoCheck {
        what: "cargo doc",
        name: "rustdoc",
        command: "doc",
        packages: &["hypercalls", "stage2", "abi-model", "el2", "s2pin-uapi", "s2vmm"],
        args: &["--no-deps"],
        env: &[("RUSTDOCFLAGS", "-D warnings")],
    },
];

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
            tally.record(Check::new(name, out.status.success(), detail));
        }
        Err(e) => tally.record(Check::error(name, &e)),
    }
}

/// Runs `cargo test` and adds every test binary's counts to the tally.
fn cargo_tests(root: &Path, tally: &mut Tally, args: &[&str]) {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args).current_dir(root);
    let out = match capture(&mut cmd) {
        Ok(out) => out,
        Err(e) => return tally.record(Check::error("cargo test", &e)),
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
        tally.record(Check::new("cargo test (build)", false, tail(&stderr, 60)));
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
