//! The `conformance` suite: boots el2 with the bare-metal test host
//! (`qemu/testhost`) in place of Linux and turns its console into checks.
//!
//! The test host is built for `aarch64-unknown-none-softfloat` (release),
//! made a raw image (`build/testhost.bin`, arm64 Image header) and loaded by
//! QEMU's loader device at the boot contract's host address; el2 is
//! `-kernel build/el2.bin` as in every hypervisor boot. The console protocol
//! (`qemu/testhost/src/harness.rs`): `CASE <name>`, then `PASS <name>` or
//! `FAIL <name>: <why>`, and finally `N passed, N failed`. A run without
//! that last line (a crash, a hang, the timeout) is a failing entry with the
//! console tail, and so is a case that started but never finished.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::qemu::{self, HOST_KERNEL_ADDR};
use crate::util::{self, progress};

/// Hard limit on the whole conformance boot.
pub const TIMEOUT: Duration = Duration::from_secs(110);

/// CPUs, memory and CPU model of the conformance machine.
const SMP: u32 = 4;
const MEM_MIB: u64 = 2048;

/// Runs the suite: (name, passed, detail) per case, plus entries for a
/// failed build or an incomplete run.
pub fn suite(root: &Path) -> Vec<(String, bool, String)> {
    let el2 = match crate::boot::build_el2(root) {
        Ok(p) => p,
        Err(e) => return vec![("conformance: build el2".into(), false, e)],
    };
    let host = match build_testhost(root) {
        Ok(p) => p,
        Err(e) => return vec![("conformance: build the test host".into(), false, e)],
    };
    let args = qemu_args(&el2, &host);
    progress(&format!(
        "conformance: {} {} (timeout {}s)",
        qemu::QEMU,
        args.join(" "),
        TIMEOUT.as_secs()
    ));
    let run = match qemu::run_captured(
        &args,
        TIMEOUT,
        &mut |_: &str, _, _: &mut dyn std::io::Write| {},
    ) {
        Ok(r) => r,
        Err(e) => return vec![("conformance: run QEMU".into(), false, e)],
    };
    progress(&format!(
        "conformance: QEMU ran {:.1}s{}",
        run.elapsed.as_secs_f64(),
        if run.timed_out {
            " (killed at the timeout)"
        } else {
            ""
        }
    ));
    let mut out = parse(&run.lines);
    if run.timed_out {
        out.push((
            "conformance: QEMU exits before the timeout".into(),
            false,
            format!("killed after {}s\n{}", TIMEOUT.as_secs(), run.tail(30)),
        ));
    }
    if !run.stderr.trim().is_empty() && out.iter().any(|e| !e.1) {
        if let Some(last) = out.iter_mut().rev().find(|e| !e.1) {
            last.2
                .push_str(&format!("\nQEMU stderr: {}", run.stderr.trim()));
        }
    }
    out
}

/// The QEMU command line: the issue's machine, el2 as `-kernel`, the test
/// host through the loader device.
pub fn qemu_args(el2: &Path, host: &Path) -> Vec<String> {
    [
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        qemu::DEFAULT_CPU,
        "-smp",
        &SMP.to_string(),
        "-m",
        &format!("{MEM_MIB}M"),
        "-accel",
        "tcg,thread=multi",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        &el2.display().to_string(),
        "-device",
        &format!(
            "loader,file={},addr={HOST_KERNEL_ADDR:#x},force-raw=on",
            host.display()
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Builds the test host and writes `build/testhost.bin`.
pub fn build_testhost(root: &Path) -> Result<PathBuf, String> {
    util::build_bare_metal(root, "testhost", "the test host")?;
    let (bin, _) = util::raw_image(root, "testhost", "el2")?;
    Ok(bin)
}

/// `N passed, N failed`.
fn tally(line: &str) -> Option<(u64, u64)> {
    let (p, rest) = line.trim().split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Turns the console into entries. Pure, so it is unit-tested.
pub fn parse(lines: &[String]) -> Vec<(String, bool, String)> {
    let mut out: Vec<(String, bool, String)> = Vec::new();
    let mut current: Option<String> = None;
    let mut total = None;
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("CASE ") {
            if let Some(open) = current.take() {
                out.push((open, false, format!("no result\n{}", tail(&lines[..i], 20))));
            }
            current = Some(name.to_string());
        } else if let Some(name) = line.strip_prefix("PASS ") {
            out.push((name.to_string(), true, String::new()));
            if current.as_deref() == Some(name) {
                current = None;
            }
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (name, why) = match current.as_deref() {
                Some(n) if rest.starts_with(n) => (
                    n.to_string(),
                    rest[n.len()..].trim_start_matches(':').trim().to_string(),
                ),
                _ => match rest.split_once(": ") {
                    Some((n, w)) => (n.to_string(), w.to_string()),
                    None => (rest.to_string(), String::new()),
                },
            };
            if current.as_deref() == Some(name.as_str()) {
                current = None;
            }
            out.push((name, false, why));
        } else if let Some(t) = tally(line) {
            total = Some(t);
        }
    }
    if let Some(open) = current {
        out.push((
            open,
            false,
            format!("started but never finished\n{}", tail(lines, 30)),
        ));
    }
    let passed = out.iter().filter(|e| e.1).count() as u64;
    let failed = out.len() as u64 - passed;
    match total {
        None => out.push((
            "conformance: the test host prints its tally".into(),
            false,
            format!(
                "no `N passed, N failed` line (crash, hang or timeout); console tail:\n{}",
                tail(lines, 30)
            ),
        )),
        Some((p, f)) if (p, f) != (passed, failed) => out.push((
            "conformance: the tally matches the cases".into(),
            false,
            format!("the test host says {p} passed, {f} failed; the console shows {passed} and {failed}"),
        )),
        Some(_) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn cases_with_colons_in_names_and_reasons() {
        let out = parse(&lines(
            "el2: starting\nCASE §3.8 share: a\nPASS §3.8 share: a\n\
             CASE §3.9 unshare: b\nFAIL §3.9 unshare: b: expected X { a: 1 }, got Y\n\
             1 passed, 1 failed",
        ));
        assert_eq!(
            out,
            vec![
                ("§3.8 share: a".to_string(), true, String::new()),
                (
                    "§3.9 unshare: b".to_string(),
                    false,
                    "expected X { a: 1 }, got Y".to_string()
                ),
            ]
        );
    }

    #[test]
    fn a_crash_fails_the_open_case_and_the_tally() {
        let out = parse(&lines(
            "CASE one\nPASS one\nCASE two\nFATAL unexpected exception: vector 4",
        ));
        assert_eq!(out.len(), 3);
        assert!(out[0].1);
        assert_eq!(out[1].0, "two");
        assert!(!out[1].1 && out[1].2.contains("FATAL"));
        assert!(!out[2].1 && out[2].0.contains("tally"));
    }

    #[test]
    fn an_empty_console_fails() {
        let out = parse(&[]);
        assert_eq!(out.len(), 1);
        assert!(!out[0].1);
    }

    #[test]
    fn a_tally_that_disagrees_fails() {
        let out = parse(&lines("CASE a\nPASS a\n2 passed, 0 failed"));
        assert_eq!(out.len(), 2);
        assert!(!out[1].1);
        assert_eq!(tally("12 passed, 3 failed"), Some((12, 3)));
        assert_eq!(tally("cargo test: 1 passed"), None);
    }

    #[test]
    fn the_machine_matches_the_issue() {
        let a = qemu_args(Path::new("/b/el2.bin"), Path::new("/b/testhost.bin")).join(" ");
        assert!(a.contains("-cpu max,pauth-impdef=on -smp 4 -m 2048M -accel tcg,thread=multi"));
        assert!(a.contains("-kernel /b/el2.bin"));
        assert!(a.contains("loader,file=/b/testhost.bin,addr=0x70000000,force-raw=on"));
    }
}
