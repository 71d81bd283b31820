//! The bare-metal test programs under el2: the test host
//! (`qemu/testhost`, an EL1 program in the host's place) and the guest
//! payload (`qemu/guest`) it runs as a VM. Their builds, their QEMU launch
//! and their console protocol, shared by the `conformance` and `guest`
//! suites and `bench hvc`.
//!
//! Both are built for `aarch64-unknown-none-softfloat` (release) and made
//! raw images (`build/testhost.bin`, `build/guest.bin`, arm64 Image
//! header). QEMU's loader device puts the test host at the boot contract's
//! host address, and el2 is `-kernel build/el2.bin` as in every hypervisor
//! boot. The console protocol (`qemu/testhost/src/harness.rs`): `CASE
//! <name>`, then `PASS <name>` or `FAIL <name>: <why>`, and finally `N
//! passed, N failed`. A run without that last line (a crash, a hang, the
//! timeout) is a failing check with the console tail, and so is a case that
//! started but never finished.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::check::Check;
use crate::qemu::{self, Boot, Launch, Machine};
use crate::util::{self, last_lines, progress};

pub use boot_contract::{
    GUEST_COMMAND_ADDR as COMMAND_ADDR, GUEST_COMMAND_BENCH as COMMAND_BENCH, GUEST_PAYLOAD_ADDR,
    GUEST_PAYLOAD_MAX as PAYLOAD_MAX,
};

/// el2 with the test host in the host's place, on the suites' machine
/// ([`Machine::default`]); with `payload`, the guest payload too.
pub fn launch(el2: &Path, host: &Path, payload: Option<&Path>) -> Launch {
    let l = Launch::new(
        Machine::default(),
        Boot::Hyp {
            el2: el2.to_path_buf(),
            host_kernel: host.to_path_buf(),
        },
    );
    match payload {
        Some(p) => l.load_file(p, GUEST_PAYLOAD_ADDR),
        None => l,
    }
}

/// Boots `launch` with its console captured, killed after `timeout`;
/// `what` names the run in the progress lines.
pub fn boot(launch: &Launch, timeout: Duration, what: &str) -> Result<qemu::Captured> {
    progress(&format!(
        "{what}: versions: {}",
        crate::versions::toolchain()
    ));
    progress(&format!(
        "{what}: {} (timeout {}s)",
        launch.command_line()?,
        timeout.as_secs()
    ));
    let run = launch.run_captured(timeout, &mut qemu::quiet())?;
    progress(&format!(
        "{what}: QEMU ran {:.1}s{}",
        run.elapsed.as_secs_f64(),
        if run.timed_out {
            " (killed at the timeout)"
        } else {
            ""
        }
    ));
    Ok(run)
}

/// The checks of a finished (or killed) run, each named `<suite>: ...`
/// where the harness speaks for itself, plus one for a timeout; QEMU's
/// stderr goes with the last failure.
pub fn results(suite: &str, run: &qemu::Captured, timeout: Duration) -> Vec<Check> {
    let mut out = parse(&run.lines);
    for c in &mut out {
        if c.name == "the test host prints its tally" || c.name == "the tally matches the cases" {
            c.name = format!("{suite}: {}", c.name);
        }
    }
    if run.timed_out {
        out.push(Check::new(
            format!("{suite}: QEMU exits before the timeout"),
            false,
            format!("killed after {}s\n{}", timeout.as_secs(), run.tail(30)),
        ));
    }
    if !run.stderr.trim().is_empty() {
        if let Some(last) = out.iter_mut().rev().find(|c| !c.ok) {
            last.detail
                .push_str(&format!("\nQEMU stderr: {}", run.stderr.trim()));
        }
    }
    out
}

/// Builds the test host and writes `build/testhost.bin`.
pub fn build_testhost(root: &Path) -> Result<PathBuf> {
    util::build_bare_metal(root, "testhost", "the test host")?;
    let (bin, _) = util::raw_image(root, "testhost", "el2")?;
    Ok(bin)
}

/// Builds the payload and writes `build/guest.bin`.
pub fn build_guest(root: &Path) -> Result<PathBuf> {
    util::build_bare_metal(root, "guest", "the guest payload")?;
    let (bin, img) = util::raw_image(root, "guest", "the test host")?;
    if img.len() as u64 > PAYLOAD_MAX {
        bail!(
            "{} is {} bytes; the test host takes at most {PAYLOAD_MAX}",
            bin.display(),
            img.len()
        );
    }
    Ok(bin)
}

/// `N passed, N failed`.
fn tally(line: &str) -> Option<(u64, u64)> {
    let (p, rest) = line.trim().split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

/// Turns the console into checks, named as the test host names its cases
/// (the harness's own entries without a suite prefix). Pure, so it is
/// unit-tested.
pub fn parse(lines: &[String]) -> Vec<Check> {
    let mut out: Vec<Check> = Vec::new();
    let mut current: Option<String> = None;
    let mut total = None;
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("CASE ") {
            if let Some(open) = current.take() {
                out.push(Check::new(
                    open,
                    false,
                    format!("no result\n{}", last_lines(&lines[..i], 20)),
                ));
            }
            current = Some(name.to_string());
        } else if let Some(name) = line.strip_prefix("PASS ") {
            out.push(Check::pass(name));
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
            out.push(Check::new(name, false, why));
        } else if let Some(t) = tally(line) {
            total = Some(t);
        }
    }
    if let Some(open) = current {
        out.push(Check::new(
            open,
            false,
            format!("started but never finished\n{}", last_lines(lines, 30)),
        ));
    }
    let passed = out.iter().filter(|e| e.ok).count() as u64;
    let failed = out.len() as u64 - passed;
    match total {
        None => out.push(Check::new(
            "the test host prints its tally",
            false,
            format!(
                "no `N passed, N failed` line (crash, hang or timeout); console tail:\n{}",
                last_lines(lines, 30)
            ),
        )),
        Some((p, f)) if (p, f) != (passed, failed) => out.push(Check::new(
            "the tally matches the cases",
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

    use crate::util::test_lines as lines;

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
                Check::pass("§3.8 share: a"),
                Check::new("§3.9 unshare: b", false, "expected X { a: 1 }, got Y"),
            ]
        );
    }

    #[test]
    fn a_crash_fails_the_open_case_and_the_tally() {
        let out = parse(&lines(
            "CASE one\nPASS one\nCASE two\nFATAL unexpected exception: vector 4",
        ));
        assert_eq!(out.len(), 3);
        assert!(out[0].ok);
        assert_eq!(out[1].name, "two");
        assert!(!out[1].ok && out[1].detail.contains("FATAL"));
        assert!(!out[2].ok && out[2].name.contains("tally"));
    }

    #[test]
    fn an_empty_console_fails() {
        let out = parse(&[]);
        assert_eq!(out.len(), 1);
        assert!(!out[0].ok);
    }

    #[test]
    fn a_tally_that_disagrees_fails() {
        let out = parse(&lines("CASE a\nPASS a\n2 passed, 0 failed"));
        assert_eq!(out.len(), 2);
        assert!(!out[1].ok);
        assert_eq!(tally("12 passed, 3 failed"), Some((12, 3)));
        assert_eq!(tally("cargo test: 1 passed"), None);
    }

    #[test]
    fn the_machine_matches_the_issue() {
        let (e, h, g) = (
            Path::new("/b/el2.bin"),
            Path::new("/b/testhost.bin"),
            Path::new("/b/guest.bin"),
        );
        let a = launch(e, h, None).args().unwrap().join(" ");
        assert!(a.contains("-cpu max,pauth-impdef=on -smp 4 -m 2048M -accel tcg,thread=multi"));
        assert!(a.contains("-kernel /b/el2.bin"));
        assert!(a.contains("loader,file=/b/testhost.bin,addr=0x70000000,force-raw=on"));
        assert!(!a.contains("-initrd") && !a.contains("guest.bin"));
        let a = launch(e, h, Some(g)).args().unwrap().join(" ");
        assert!(a.contains("loader,file=/b/guest.bin,addr=0x60000000,force-raw=on"));
    }

    #[test]
    fn results_name_the_suite_and_the_timeout() {
        let run = qemu::Captured {
            lines: lines("CASE a\nPASS a\n1 passed, 0 failed"),
            stderr: String::new(),
            status: None,
            timed_out: false,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(
            results("guest", &run, Duration::from_secs(1)),
            vec![Check::pass("a")]
        );
        let run = qemu::Captured {
            lines: lines("CASE a\n"),
            stderr: "qemu: boom".into(),
            timed_out: true,
            ..run
        };
        let r = results("guest", &run, Duration::from_secs(1));
        assert!(r
            .iter()
            .any(|c| c.name == "guest: the test host prints its tally" && !c.ok));
        assert!(r
            .iter()
            .any(|c| c.name == "guest: QEMU exits before the timeout"));
        assert!(r.last().unwrap().detail.contains("qemu: boom"));
    }
}
