//! `cargo xtask model [--ops N]`: the long forms of the two model tests
//! (issue 12, item 4), in release builds: the host side of `s2pin.ko`
//! (`host-driver/rust/tests/model.rs`: random faults, notifier events, PTE
//! changes, slot changes and teardowns under each policy against a
//! reference model) and the EL2 dispatcher (`el2/src/pkvm/tests/prop.rs`:
//! random hypercalls against the ABI model). `cargo xtask test host` runs
//! their short forms. Each test prints its count; this prints those lines.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::util::{capture, cargo_bin, command_line, progress, tail};

/// `cargo xtask model`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Operations for each model test: host-side operations for s2pin-core,
    /// hypercalls for el2 (the el2 test ends the case that reaches N).
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ops: u64,
}

/// One long form: its cargo arguments, the environment variable with the
/// count, and the prefix of the line it prints.
struct LongForm {
    package: &'static str,
    args: &'static [&'static str],
    env: &'static str,
    prefix: &'static str,
}

const LONG_FORMS: [LongForm; 2] = [
    LongForm {
        package: "s2pin-core",
        args: &["--test", "model", "host_side_matches_the_model_long"],
        env: "S2PIN_MODEL_OPS",
        prefix: "s2pin-core model:",
    },
    LongForm {
        package: "el2",
        args: &["--lib", "pkvm::tests::prop::random_calls_long"],
        env: "EL2_MODEL_CALLS",
        prefix: "el2 model:",
    },
];

/// Runs both long forms; fails if either fails or prints no count.
pub fn model(root: &Path, args: &ModelArgs) -> Result<()> {
    let mut failed = Vec::new();
    for f in &LONG_FORMS {
        progress(&format!("model: {} ({} {})", f.package, args.ops, f.env));
        let mut cmd = Command::new(cargo_bin());
        cmd.args(["test", "--release", "-p", f.package])
            .args(f.args)
            .args(["--", "--ignored", "--exact", "--nocapture"])
            .env(f.env, args.ops.to_string())
            .current_dir(root);
        let start = Instant::now();
        let out = capture(&mut cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with(f.prefix));
        match line {
            Some(l) if out.status.success() => {
                println!(
                    "{l} [{:.0} s with the build]",
                    start.elapsed().as_secs_f64()
                );
                // The s2pin-core line is followed by what the run did.
                for d in stdout
                    .lines()
                    .skip_while(|x| !x.starts_with(f.prefix))
                    .skip(1)
                    .take_while(|x| x.starts_with("  "))
                {
                    println!("{d}");
                }
            }
            _ => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                eprintln!(
                    "{} failed ({}):\n{}\n{}",
                    f.package,
                    command_line(&cmd),
                    tail(&stdout, 30),
                    tail(&stderr, 30)
                );
                failed.push(f.package);
            }
        }
    }
    if !failed.is_empty() {
        bail!("model test failed: {}", failed.join(", "));
    }
    Ok(())
}
