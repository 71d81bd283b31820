//! Installing what the project needs on a fresh machine.

use std::process::Command;

use anyhow::{anyhow, Result};

use crate::util::{capture, on_path, progress, run};

/// Targets from rust-toolchain.toml; rustup normally installs them on first
/// use, this makes sure of it.
const TARGETS: &[&str] = &[
    "aarch64-unknown-none",
    "aarch64-unknown-none-softfloat",
    "aarch64-unknown-linux-musl",
];

/// Ensures the rustup targets and components exist for the pinned toolchain.
pub fn rust_targets() -> Result<()> {
    if !on_path("rustup") {
        // A toolchain without rustup (e.g. a distro rustc) cannot add targets;
        // the cross builds will say what is missing.
        return Ok(());
    }
    let out = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let installed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        progress(&format!("rustup target add {}", missing.join(" ")));
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing))?;
    }
    let out = capture(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let installed = String::from_utf8_lossy(&out.stdout);
    for comp in ["clippy", "rustfmt", "llvm-tools"] {
        if !installed.lines().any(|l| l.starts_with(comp)) {
            progress(&format!("rustup component add {comp}"));
            run(Command::new("rustup").args(["component", "add", comp]))?;
        }
    }
    Ok(())
}

/// Installs Debian packages that provide `prog` if it is not on PATH.
pub fn apt_for(prog: &str, packages: &[&str]) -> Result<()> {
    if on_path(prog) {
        return Ok(());
    }
    progress(&format!("apt-get install {}", packages.join(" ")));
    // Stale lists only matter if the install then fails, which is reported.
    let _ = apt_get(&["update", "-qq"]);
    let installed = apt_get(&[&["install", "-y", "-qq"], packages].concat());
    if installed.is_err() || !on_path(prog) {
        return Err(anyhow!(
            "could not install {} (needed for `{prog}`)",
            packages.join(" ")
        ));
    }
    Ok(())
}

/// Runs `apt-get` as root, non-interactively.
pub fn apt_get(args: &[&str]) -> Result<()> {
    privileged("apt-get", args)
}

/// Runs a command as root (through sudo when we are not root), with the
/// terminal's output.
pub fn privileged(prog: &str, args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new(prog)
    } else {
        let mut c = Command::new("sudo");
        c.arg(prog);
        c
    };
    run(cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn is_root() -> bool {
    capture(Command::new("id").arg("-u"))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
