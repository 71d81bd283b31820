//! Installing what the project needs on a fresh machine.

use std::process::Command;

use crate::util::{capture, on_path, progress};

/// Targets from rust-toolchain.toml; rustup normally installs them on first
/// use, this makes sure of it.
const TARGETS: &[&str] = &[
    "aarch64-unknown-none",
    "aarch64-unknown-none-softfloat",
    "aarch64-unknown-linux-musl",
];

/// Ensures the rustup targets and components exist for the pinned toolchain.
pub fn rust_targets() -> Result<(), String> {
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
        let st = Command::new("rustup")
            .args(["target", "add"])
            .args(&missing)
            .status()
            .map_err(|e| format!("cannot run rustup: {e}"))?;
        if !st.success() {
            return Err(format!("rustup target add failed ({st})"));
        }
    }
    let out = capture(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let installed = String::from_utf8_lossy(&out.stdout);
    for comp in ["clippy", "rustfmt", "llvm-tools"] {
        if !installed.lines().any(|l| l.starts_with(comp)) {
            progress(&format!("rustup component add {comp}"));
            let st = Command::new("rustup")
                .args(["component", "add", comp])
                .status()
                .map_err(|e| format!("cannot run rustup: {e}"))?;
            if !st.success() {
                return Err(format!("rustup component add {comp} failed ({st})"));
            }
        }
    }
    Ok(())
}

/// Installs Debian packages that provide `prog` if it is not on PATH.
pub fn apt_for(prog: &str, packages: &[&str]) -> Result<(), String> {
    if on_path(prog) {
        return Ok(());
    }
    progress(&format!("apt-get install {}", packages.join(" ")));
    let sudo = !is_root();
    let mut update = Command::new(if sudo { "sudo" } else { "apt-get" });
    if sudo {
        update.arg("apt-get");
    }
    update.args(["update", "-qq"]);
    let _ = update.status();
    let mut cmd = Command::new(if sudo { "sudo" } else { "apt-get" });
    if sudo {
        cmd.arg("apt-get");
    }
    cmd.args(["install", "-y", "-qq"]).args(packages);
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !st.success() || !on_path(prog) {
        return Err(format!(
            "could not install {} (needed for `{prog}`)",
            packages.join(" ")
        ));
    }
    Ok(())
}

fn is_root() -> bool {
    capture(Command::new("id").arg("-u"))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
