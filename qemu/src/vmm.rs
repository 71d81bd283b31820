//! Building `s2vmm` (`host-driver/vmm`) for the host and putting it, with
//! the guest payload it runs, into the host's initramfs.
//!
//! s2vmm is a static `aarch64-unknown-linux-musl` binary, linked by
//! `rust-lld` (`.cargo/config.toml`), built with the workspace's `vmm`
//! profile (release without debug info, stripped). `cargo xtask run` and the
//! `shim` suite put it at [`VMM_DEST`] (on PATH) and the guest payload
//! (`qemu/guest`, the same `build/guest.bin` the guest suite uses) at
//! [`GUEST_DEST`].

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

use crate::initramfs::Extra;
use crate::util::{cargo, progress};

/// The target s2vmm is built for.
pub const VMM_TARGET: &str = "aarch64-unknown-linux-musl";
/// The cargo profile (workspace `Cargo.toml`).
const PROFILE: &str = "vmm";
/// Where s2vmm goes in the host.
pub const VMM_DEST: &str = "/usr/bin/s2vmm";
/// Where the guest payload goes in the host (s2vmm's default `--image`).
pub const GUEST_DEST: &str = "/root/guest.bin";

/// Builds s2vmm and returns the binary.
pub fn build(root: &Path) -> Result<PathBuf> {
    progress(&format!(
        "building s2vmm (cargo build --profile {PROFILE} -p s2vmm --target {VMM_TARGET})"
    ));
    cargo(
        root,
        &[
            "build",
            "--profile",
            PROFILE,
            "-p",
            "s2vmm",
            "--target",
            VMM_TARGET,
        ],
    )?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"));
    let bin = target_dir.join(VMM_TARGET).join(PROFILE).join("s2vmm");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(anyhow!("s2vmm built, but {} is missing", bin.display()))
    }
}

/// The initramfs entries: s2vmm at [`VMM_DEST`], the payload at [`GUEST_DEST`].
pub fn extras(root: &Path) -> Result<Vec<Extra>> {
    let vmm = build(root)?;
    let guest = crate::testhost::build_guest(root)?;
    Ok(vec![
        Extra {
            source: vmm,
            dest: VMM_DEST.into(),
        },
        Extra {
            source: guest,
            dest: GUEST_DEST.into(),
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_where_the_docs_say() {
        // s2vmm's default --image and the README's command line.
        assert_eq!(GUEST_DEST, "/root/guest.bin");
        assert!(VMM_DEST.starts_with("/usr/bin/"));
        let cli = include_str!("../../host-driver/vmm/src/args.rs");
        assert!(cli.contains(&format!("default_value = \"{GUEST_DEST}\"")));
    }
}
