//! The exact versions a run used (issue 11, item 6): rustc and QEMU for
//! every run, plus Debian's kernel and busybox for a Linux boot. Every suite
//! prints them before it boots and every benchmark writes them into its
//! result.

use std::process::Command;

use crate::assets::Debian;
use crate::qemu::QEMU;

/// The first line `prog args` prints, or `unknown (<why>)`.
fn first_line(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Ok(o) => format!("unknown (`{prog}` exited with {})", o.status),
        Err(e) => format!("unknown (`{prog}`: {e})"),
    }
}

/// `rustc --version` of the toolchain cargo runs (rust-toolchain.toml).
pub fn rustc() -> String {
    first_line("rustc", &["--version"])
}

/// `QEMU emulator version ...`, shortened to `QEMU <version>`.
pub fn qemu() -> String {
    let line = first_line(QEMU, &["--version"]);
    match line.strip_prefix("QEMU emulator version ") {
        Some(v) => format!("QEMU {v}"),
        None => line,
    }
}

/// One line naming the toolchain and QEMU: `rustc 1.95.0 (...); QEMU 7.2.x`.
pub fn toolchain() -> String {
    format!("{}; {}", rustc(), qemu())
}

/// [`toolchain`] plus the Debian kernel and busybox of a Linux boot.
pub fn with_debian(debian: &Debian) -> String {
    format!("{}; {}", toolchain(), debian.describe())
}
