//! `s2vmm`: see the library's documentation and `host-driver/vmm/README.md`.

use std::process::ExitCode;

use clap::Parser;
use s2vmm::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line: what is wrong (clap adds a usage hint below it).
            let msg = e.to_string();
            eprintln!("s2vmm: {}", msg.lines().next().unwrap_or("bad arguments"));
            return ExitCode::from(2);
        }
        // --help, --version.
        Err(e) => e.exit(),
    };
    let result = match &cli.command {
        Some(Command::Hostile { image }) => run_hostile(image),
        Some(Command::Fuzz(a)) => run_fuzz(a),
        Some(Command::Soak(a)) => run_soak(a),
        Some(Command::Scale(a)) => run_scale(a),
        Some(Command::HostileGuests(a)) => run_hostile_guests(a),
        Some(Command::Killloop(a)) => run_killloop(a),
        Some(Command::Leakcheck(a)) => run_leakcheck(a),
        None => match cli.config() {
            Ok(cfg) => run_guest(&cfg),
            Err(e) => {
                eprintln!("s2vmm: error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(1, 255)).unwrap_or(1)),
        Err(e) => {
            eprintln!("s2vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_os = "linux")]
fn run_guest(cfg: &s2vmm::args::Config) -> anyhow::Result<i32> {
    s2vmm::guest_run::run(cfg)
}

#[cfg(target_os = "linux")]
fn run_hostile(image: &std::path::Path) -> anyhow::Result<i32> {
    s2vmm::hostile::run(image)
}

#[cfg(not(target_os = "linux"))]
fn run_guest(_: &s2vmm::args::Config) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(not(target_os = "linux"))]
fn run_hostile(_: &std::path::Path) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_leakcheck(a: &s2vmm::leakcheck::LeakcheckArgs) -> anyhow::Result<i32> {
    s2vmm::leakcheck::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_leakcheck(_: &s2vmm::leakcheck::LeakcheckArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_hostile_guests(a: &s2vmm::hostile_guests::HostileGuestsArgs) -> anyhow::Result<i32> {
    s2vmm::hostile_guests::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_hostile_guests(_: &s2vmm::hostile_guests::HostileGuestsArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_killloop(a: &s2vmm::killloop::KillLoopArgs) -> anyhow::Result<i32> {
    s2vmm::killloop::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_killloop(_: &s2vmm::killloop::KillLoopArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_fuzz(a: &s2vmm::fuzz::FuzzArgs) -> anyhow::Result<i32> {
    s2vmm::fuzz::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_fuzz(_: &s2vmm::fuzz::FuzzArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_soak(a: &s2vmm::soak::SoakArgs) -> anyhow::Result<i32> {
    s2vmm::soak::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_soak(_: &s2vmm::soak::SoakArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}

#[cfg(target_os = "linux")]
fn run_scale(a: &s2vmm::scale::ScaleArgs) -> anyhow::Result<i32> {
    s2vmm::scale::run(a)
}

#[cfg(not(target_os = "linux"))]
fn run_scale(_: &s2vmm::scale::ScaleArgs) -> anyhow::Result<i32> {
    anyhow::bail!("s2vmm runs on Linux only")
}
