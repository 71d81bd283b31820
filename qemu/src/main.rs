//! `cargo xtask`: the project's runner (`cargo xtask --help`).
//!
//! Layout: `cli.rs` (the command line), `run.rs` (the Linux run path and
//! `cargo xtask run`), `qemu.rs` (the one QEMU launcher), `check.rs` (the
//! one check-result type), `suites/` (`cargo xtask test`), `benches/`
//! (`cargo xtask bench`), `testhost.rs` (the bare-metal test programs), and
//! what they build on: `assets.rs` (Debian packages), `modules.rs` (the
//! kernel module's cross build), `initramfs.rs`, `vmm.rs`, `fuzz.rs`,
//! `install.rs`, `versions.rs`, `util.rs`. docs/BUILD.md explains each step.
//!
//! To add a top-level command: a variant of [`cli::Command`] (its options a
//! `#[derive(clap::Args)]` struct in the command's own file) and its arm in
//! [`main`].

mod assets;
mod benches;
mod check;
mod cli;
mod fuzz;
mod initramfs;
mod install;
mod model;
mod modules;
mod qemu;
mod reliability;
mod run;
mod soak;
mod suites;
mod testhost;
mod util;
mod versions;
mod vmm;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{BenchCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = util::workspace_root();
    let result = match &cli.command {
        Command::Run(args) => run::run(&root, args),
        Command::Test(args) => suites::test(&root, &args.suites),
        Command::Bench(b) => match b {
            BenchCommand::Stage2 => benches::stage2::stage2(&root),
            BenchCommand::Boot(args) => benches::boot::bench(&root, args),
            BenchCommand::Hvc => benches::hvc::bench(&root),
            BenchCommand::Numa(args) => benches::numa::bench(&root, args),
            BenchCommand::Scale(args) => benches::scale::bench(&root, args),
        },
        Command::Soak(a) => soak::soak(&root, a),
        Command::GenHeader => gen_header(&root),
        Command::Install => install::rust_targets(),
        Command::Killloop(a) => reliability::killloop(&root, a),
        Command::Model(a) => model::model(&root, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask gen-header`.
fn gen_header(root: &Path) -> Result<()> {
    for (rel, text) in [
        (hypercalls::C_HEADER_PATH, hypercalls::c_header()),
        (s2pin_uapi::C_HEADER_PATH, s2pin_uapi::c_header()),
    ] {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        std::fs::write(&path, text).with_context(|| path.display().to_string())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
