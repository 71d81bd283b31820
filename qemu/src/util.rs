//! Small helpers: locating the workspace, running commands, progress lines.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Prints a progress line for a long step, on stderr: stdout belongs to
/// what the step produces (a guest command's output, a test tally).
pub fn progress(msg: &str) {
    eprintln!("==> {msg}");
}

/// The cargo that runs us, so nested builds use the pinned toolchain.
pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Runs cargo with `args` in `root`, streaming its output; fails on non-zero exit.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new(cargo_bin()).args(args).current_dir(root))
}

/// The command as a shell-like line for messages: the program's file name
/// (not its full path) and its arguments.
pub fn command_line(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program());
    let mut s = prog
        .file_name()
        .unwrap_or(prog.as_os_str())
        .to_string_lossy()
        .into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with the terminal's stdout and stderr; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .map_err(|e| anyhow!("cannot run {:?}: {e}", cmd.get_program()))?;
    if st.success() {
        Ok(())
    } else {
        Err(anyhow!("`{}` failed ({st})", command_line(cmd)))
    }
}

/// Runs a command and captures its output (stdout and stderr separately).
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run {:?}: {e}", cmd.get_program()))
}

/// Like [`capture`], and fails on non-zero exit with what the command printed.
pub fn capture_ok(cmd: &mut Command) -> Result<Output> {
    let out = capture(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(anyhow!(failure(&command_line(cmd), &out)))
    }
}

/// The message for a command that exited non-zero: its line, its status and
/// whatever it printed.
fn failure(line: &str, out: &Output) -> String {
    let printed = [&out.stdout, &out.stderr]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if printed.is_empty() {
        format!("`{line}` failed ({})", out.status)
    } else {
        format!("`{line}` failed ({}):\n{printed}", out.status)
    }
}

/// The target the bare-metal programs (el2, the test host, the guest
/// payload) are built for.
pub const BARE_METAL_TARGET: &str = "aarch64-unknown-none-softfloat";

/// Builds `package` in release for [`BARE_METAL_TARGET`], announced as
/// `building <what>`.
pub fn build_bare_metal(root: &Path, package: &str, what: &str) -> Result<()> {
    progress(&format!(
        "building {what} (cargo build --release -p {package} --target {BARE_METAL_TARGET})"
    ));
    cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            package,
            "--target",
            BARE_METAL_TARGET,
        ],
    )
}

/// Where [`build_bare_metal`] leaves `package`'s ELF: under
/// `$CARGO_TARGET_DIR` (taken relative to `root`) or `root/target`.
pub fn bare_metal_elf(root: &Path, package: &str) -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"));
    target_dir
        .join(BARE_METAL_TARGET)
        .join("release")
        .join(package)
}

/// Writes `package`'s ELF as a raw image, `build/<package>.bin`, and
/// returns its path and contents; fails unless it starts with an arm64
/// `Image` header, which `needed_by` requires.
pub fn raw_image(root: &Path, package: &str, needed_by: &str) -> Result<(PathBuf, Vec<u8>)> {
    let elf = bare_metal_elf(root, package);
    let bin = root.join("build").join(format!("{package}.bin"));
    std::fs::create_dir_all(root.join("build")).map_err(|e| anyhow!("build/: {e}"))?;
    capture_ok(
        Command::new(llvm_tool("llvm-objcopy")?)
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(&bin),
    )?;
    let image = std::fs::read(&bin).with_context(|| bin.display().to_string())?;
    if !crate::assets::is_arm64_image(&image) {
        return Err(anyhow!(
            "{} has no arm64 Image header (magic ARM\\x64 at offset 56), which {needed_by} \
             requires",
            bin.display()
        ));
    }
    Ok((bin, image))
}

/// A tool of the toolchain's `llvm-tools` component (rust-toolchain.toml),
/// e.g. `llvm-objcopy`: `<sysroot>/lib/rustlib/<host>/bin/<name>`.
pub fn llvm_tool(name: &str) -> Result<PathBuf> {
    let rustc = |arg: &str| -> Result<String> {
        let out = capture_ok(Command::new("rustc").arg(arg))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sysroot = rustc("--print=sysroot")?;
    let vv = rustc("-vV")?;
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .ok_or_else(|| anyhow!("`rustc -vV` names no host"))?;
    let tool = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin")
        .join(name);
    if !tool.is_file() {
        bail!(
            "{} is missing: the llvm-tools component is not installed (`rustup component add \
             llvm-tools`, or `cargo xtask install`)",
            tool.display()
        );
    }
    Ok(tool)
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// The last `n` of `lines`, joined, for failure messages.
pub fn last_lines(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `s` as console lines, for tests.
#[cfg(test)]
pub fn test_lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

/// Whether `prog` is found on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(prog).is_file()))
}

/// A name no other run (or earlier call in this one) uses, for scratch files
/// that concurrent runs create side by side: `<pid>-<n>`.
pub fn unique_name() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{seq}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_name_the_program_not_its_path() {
        let mut c = Command::new("/usr/bin/dpkg-deb");
        c.args(["-x", "a b.deb"]);
        assert_eq!(command_line(&c), "dpkg-deb -x a b.deb");
    }

    #[test]
    fn failures_say_what_ran_and_what_it_printed() {
        let e = capture_ok(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("`sh -c echo out; echo err >&2; exit 3` failed ("),
            "{e}"
        );
        assert!(e.contains("3"), "{e}");
        assert!(e.ends_with(":\nout\nerr"), "{e}");
        let e = capture_ok(Command::new("sh").args(["-c", "exit 1"]))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(')'), "{e}");
        assert!(capture_ok(&mut Command::new("true")).is_ok());
        assert!(run(&mut Command::new("false"))
            .unwrap_err()
            .to_string()
            .starts_with("`false` failed"));
        assert!(capture(&mut Command::new("/nonexistent/prog")).is_err());
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name(), unique_name());
    }
}
