//! The `guest` suite and `cargo xtask bench hvc`: el2 with the bare-metal
//! test host (`qemu/testhost`) playing VMM for the guest payload
//! (`qemu/guest`).
//!
//! The payload is built for `aarch64-unknown-none-softfloat` (release), made
//! a raw image (`build/guest.bin`) and put into host RAM at
//! [`GUEST_PAYLOAD_ADDR`] by a second QEMU `-device loader`. The test host
//! finds it there (arm64 Image magic) and runs its guest cases
//! (`qemu/testhost/src/guests.rs`) instead of the conformance cases; a
//! command word at [`COMMAND_ADDR`] (another loader, `data=`) makes it run
//! the benchmark instead. The console protocol and its parsing are those of
//! the conformance suite (`conformance::parse`).
//!
//! The benchmark boots with `-icount shift=0` on one CPU: QEMU then runs
//! single-threaded TCG and its virtual clock advances exactly 2^0 = 1 ns
//! per guest instruction, so the generic counter (CNTFRQ_EL0 Hz, 62.5 MHz
//! on QEMU 7.2 `virt`) advances one tick per `1e9 / CNTFRQ` = 16
//! instructions. The test host calibrates that relation in the same run
//! with a loop of known length and reports instructions per round trip.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::conformance;
use crate::qemu;
use crate::util::{self, progress};

/// Hard limit on the guest suite boot.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Hard limit on the benchmark boot.
pub const BENCH_TIMEOUT: Duration = Duration::from_secs(150);
/// Host RAM where QEMU's loader puts the payload (testhost `guests.rs`
/// `PAYLOAD_ADDR`): above el2 and the DTB, below the test host's image
/// (0x7000_0000) and its page pools (0x8000_0000..0xb000_0000).
pub const GUEST_PAYLOAD_ADDR: u64 = 0x6000_0000;
/// Host RAM word that selects what the test host does with the payload
/// (testhost `guests.rs` `COMMAND_ADDR`).
pub const COMMAND_ADDR: u64 = 0x5fff_f000;
/// The command word that asks for the benchmark ("benchhvc", little-endian).
pub const COMMAND_BENCH: u64 = u64::from_le_bytes(*b"benchhvc");
/// Largest payload the test host accepts (testhost `guests.rs` `PAYLOAD_MAX`).
const PAYLOAD_MAX: u64 = 1 << 20;

/// Runs the suite: (name, passed, detail) per case, plus entries for a
/// failed build or an incomplete run.
pub fn suite(root: &Path) -> Vec<(String, bool, String)> {
    let (el2, host, guest) = match build_all(root) {
        Ok(b) => b,
        Err((step, e)) => return vec![(format!("guest: {step}"), false, e)],
    };
    let args = qemu_args(&el2, &host, &guest, false);
    match boot(&args, TIMEOUT, "guest") {
        Ok(run) => results(&run),
        Err(e) => vec![("guest: run QEMU".into(), false, e)],
    }
}

/// `cargo xtask bench hvc`: boots the benchmark, prints its table and
/// writes it into docs/PERFORMANCE.md between the `bench:hvc` markers.
pub fn bench_hvc(root: &Path) -> Result<(), String> {
    let (el2, host, guest) = build_all(root).map_err(|(step, e)| format!("{step}: {e}"))?;
    let args = qemu_args(&el2, &host, &guest, true);
    let run = boot(&args, BENCH_TIMEOUT, "bench hvc")?;
    if run.timed_out {
        return Err(format!(
            "the benchmark did not finish in {}s\n{}",
            BENCH_TIMEOUT.as_secs(),
            run.tail(30)
        ));
    }
    let b = parse_bench(&run.lines).map_err(|e| format!("{e}\n{}", run.tail(30)))?;
    let section = bench_section(&b);
    println!("{section}");
    let path = root.join("docs/PERFORMANCE.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = replace_section(&old, &section);
    std::fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("wrote the hvc section of {}", path.display());
    Ok(())
}

fn build_all(root: &Path) -> Result<(PathBuf, PathBuf, PathBuf), (&'static str, String)> {
    let el2 = crate::boot::build_el2(root).map_err(|e| ("build el2", e))?;
    let host = conformance::build_testhost(root).map_err(|e| ("build the test host", e))?;
    let guest = build_guest(root).map_err(|e| ("build the guest payload", e))?;
    Ok((el2, host, guest))
}

fn boot(args: &[String], timeout: Duration, what: &str) -> Result<qemu::Captured, String> {
    progress(&format!(
        "{what}: {} {} (timeout {}s)",
        qemu::QEMU,
        args.join(" "),
        timeout.as_secs()
    ));
    let run = qemu::run_captured(
        args,
        timeout,
        &mut |_: &str, _, _: &mut dyn std::io::Write| {},
    )?;
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

/// The suite's entries from a finished (or killed) run.
fn results(run: &qemu::Captured) -> Vec<(String, bool, String)> {
    let mut out: Vec<(String, bool, String)> = conformance::parse(&run.lines)
        .into_iter()
        .map(|(n, ok, d)| match n.strip_prefix("conformance: ") {
            Some(rest) => (format!("guest: {rest}"), ok, d),
            None => (n, ok, d),
        })
        .collect();
    if run.timed_out {
        out.push((
            "guest: QEMU exits before the timeout".into(),
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

/// The QEMU command line: the conformance machine plus the payload (and,
/// for the benchmark, the command word, one CPU and `-icount shift=0`).
pub fn qemu_args(el2: &Path, host: &Path, guest: &Path, bench: bool) -> Vec<String> {
    let mut args = conformance::qemu_args(el2, host);
    args.push("-device".into());
    args.push(format!(
        "loader,file={},addr={GUEST_PAYLOAD_ADDR:#x},force-raw=on",
        guest.display()
    ));
    if bench {
        args.push("-device".into());
        args.push(format!(
            "loader,data={COMMAND_BENCH:#x},data-len=8,addr={COMMAND_ADDR:#x}"
        ));
        // icount needs single-threaded TCG; one CPU so that every counted
        // instruction belongs to the round trip.
        for (flag, value) in [("-accel", "tcg"), ("-smp", "1")] {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = value.into();
            }
        }
        args.push("-icount".into());
        args.push("shift=0".into());
    }
    args
}

/// Builds the payload and writes `build/guest.bin`.
pub fn build_guest(root: &Path) -> Result<PathBuf, String> {
    util::build_bare_metal(root, "guest", "the guest payload")?;
    let (bin, img) = util::raw_image(root, "guest", "the test host")?;
    if img.len() as u64 > PAYLOAD_MAX {
        return Err(format!(
            "{} is {} bytes; the test host takes at most {PAYLOAD_MAX}",
            bin.display(),
            img.len()
        ));
    }
    Ok(bin)
}

/// What the benchmark run printed (`BENCH key value` lines).
#[derive(Debug, Default, PartialEq)]
pub struct Bench {
    /// CNTFRQ_EL0.
    pub freq: u64,
    /// Instructions per counter tick measured by the calibration loop.
    pub calib_insns_per_tick: f64,
    /// (name, iterations, counter ticks) per measurement.
    pub rows: Vec<(String, u64, u64)>,
    /// Remarks the run printed (`BENCH info <text>`).
    pub info: Vec<String>,
}

/// Parses `BENCH freq F`, `BENCH calib INSNS TICKS` and
/// `BENCH row <name>|<iterations>|<ticks>` lines.
pub fn parse_bench(lines: &[String]) -> Result<Bench, String> {
    let mut b = Bench::default();
    let mut fails = Vec::new();
    for l in lines {
        let Some(rest) = l.trim().strip_prefix("BENCH ") else {
            if l.starts_with("FAIL ") || l.starts_with("FATAL") {
                fails.push(l.clone());
            }
            continue;
        };
        if let Some(i) = rest.strip_prefix("info ") {
            b.info.push(i.trim().to_string());
        } else if let Some(f) = rest.strip_prefix("freq ") {
            b.freq = f.trim().parse().map_err(|_| format!("bad line `{l}`"))?;
        } else if let Some(c) = rest.strip_prefix("calib ") {
            let v: Vec<u64> = c
                .split_whitespace()
                .map(|x| x.parse().map_err(|_| format!("bad line `{l}`")))
                .collect::<Result<_, _>>()?;
            match v.as_slice() {
                [insns, ticks] if *ticks > 0 => {
                    b.calib_insns_per_tick = *insns as f64 / *ticks as f64
                }
                _ => return Err(format!("bad line `{l}`")),
            }
        } else if let Some(r) = rest.strip_prefix("row ") {
            let parts: Vec<&str> = r.split('|').collect();
            match parts.as_slice() {
                [name, n, t] => {
                    let n: u64 = n.trim().parse().map_err(|_| format!("bad line `{l}`"))?;
                    let t: u64 = t.trim().parse().map_err(|_| format!("bad line `{l}`"))?;
                    if n == 0 {
                        return Err(format!("no iterations in `{l}`"));
                    }
                    b.rows.push((name.trim().to_string(), n, t));
                }
                _ => return Err(format!("bad line `{l}`")),
            }
        }
    }
    if !fails.is_empty() {
        return Err(format!("the benchmark failed:\n{}", fails.join("\n")));
    }
    if b.freq == 0 || b.calib_insns_per_tick == 0.0 || b.rows.is_empty() {
        return Err("the benchmark printed no frequency, calibration or rows".into());
    }
    Ok(b)
}

/// Instructions per tick: `1e9 / CNTFRQ` with `-icount shift=0`.
fn insns_per_tick(freq: u64) -> f64 {
    1e9 / freq as f64
}

/// The markdown section (markers included).
pub fn bench_section(b: &Bench) -> String {
    let ipt = insns_per_tick(b.freq);
    let mut rows = String::new();
    let info: String = b.info.iter().map(|i| format!("- {i}.\n")).collect();
    for (name, n, ticks) in &b.rows {
        rows.push_str(&format!(
            "| {name} | {n} | {ticks} | {:.0} |\n",
            *ticks as f64 * ipt / *n as f64
        ));
    }
    format!(
        "{BEGIN}\n## Hypercall round trips (`cargo xtask bench hvc`)\n\n\
         Instructions per round trip, all exception levels together (guest EL1, el2,\n\
         the test host at EL1 playing VMM), on one CPU of QEMU `virt` with\n\
         `-icount shift=0 -accel tcg -smp 1`. With `shift=0` QEMU's virtual clock\n\
         advances 1 ns per executed instruction, and the generic counter runs at\n\
         CNTFRQ_EL0 = {} Hz of that clock, so one counter tick is 1e9 / CNTFRQ = {:.1}\n\
         instructions. A calibration loop of known length in the same run measured\n\
         {:.2} instructions per tick. Each row reads the counter (after an ISB) before\n\
         and after N iterations; instructions per round trip = ticks x {:.1} / N\n\
         (resolution {:.0} instructions per measurement, loop overhead included).\n\n\
         | round trip | N | ticks | instructions each |\n|---|---|---|---|\n{rows}\n\
         - *null hypercall*: the guest calls `HYP_GUEST_VERSION` (answered at EL2, no exit).\n\
         - *share + unshare*: the host calls `HYP_SHARE` then `HYP_UNSHARE` of one page.\n\
         - *stage-2 fault, share, resume*: the guest writes one word to a fresh page;\n  \
           the stage-2 fault exits `HYP_VCPU_RUN`, the host calls `HYP_SHARE` and runs\n  \
           the vCPU again, which retries the store.\n{info}\n\
         Counts under TCG are instruction counts, not time: exception entry/exit and\n\
         TLB maintenance cost one instruction each here.\n{END}\n",
        b.freq, ipt, b.calib_insns_per_tick, ipt, ipt
    )
}

const BEGIN: &str = "<!-- bench:hvc:begin -->";
const END: &str = "<!-- bench:hvc:end -->";

/// `old` with the text between the markers (inclusive) replaced by
/// `section`, or `section` appended when the markers are missing.
pub fn replace_section(old: &str, section: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => {
            let mut end = b + END.len();
            if old[end..].starts_with('\n') {
                end += 1;
            }
            format!("{}{section}{}", &old[..a], &old[end..])
        }
        _ => {
            let mut s = old.to_string();
            if !s.is_empty() && !s.ends_with("\n\n") {
                s.push_str(if s.ends_with('\n') { "\n" } else { "\n\n" });
            }
            s.push_str(section);
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn bench_lines_parse_and_render() {
        let b = parse_bench(&lines(
            "noise\nBENCH freq 62500000\nBENCH calib 2000000 125000\n\
             BENCH row null hypercall|1024|2048\nBENCH row share + unshare|256|4096\n\
             BENCH info the loop returned 16 times\n",
        ))
        .unwrap();
        assert_eq!(b.freq, 62_500_000);
        assert!((b.calib_insns_per_tick - 16.0).abs() < 1e-9);
        assert_eq!(b.rows[0], ("null hypercall".into(), 1024, 2048));
        let s = bench_section(&b);
        assert!(s.starts_with(BEGIN) && s.trim_end().ends_with(END));
        // 2048 ticks * 16 / 1024 = 32; 4096 * 16 / 256 = 256.
        assert!(s.contains("| null hypercall | 1024 | 2048 | 32 |"), "{s}");
        assert!(s.contains("| share + unshare | 256 | 4096 | 256 |"), "{s}");
        assert!(s.contains("\n- the loop returned 16 times.\n"), "{s}");
    }

    #[test]
    fn bench_failures_and_gaps_are_errors() {
        assert!(parse_bench(&lines("BENCH freq 62500000")).is_err());
        assert!(parse_bench(&lines(
            "BENCH freq 1\nBENCH calib 2 1\nBENCH row a|1|1\nFAIL bench: x"
        ))
        .is_err());
        assert!(parse_bench(&lines("BENCH freq 1\nBENCH calib 2 1\nBENCH row a|0|1")).is_err());
        assert!(parse_bench(&lines("BENCH freq x")).is_err());
    }

    #[test]
    fn only_the_hvc_section_is_replaced() {
        let doc = format!("# Perf\n\nintro\n{BEGIN}\nold\n{END}\n\n## other\nkept\n");
        let new = replace_section(&doc, &format!("{BEGIN}\nnew\n{END}\n"));
        assert_eq!(
            new,
            format!("# Perf\n\nintro\n{BEGIN}\nnew\n{END}\n\n## other\nkept\n")
        );
        let appended = replace_section("# Perf\n", &format!("{BEGIN}\nx\n{END}\n"));
        assert_eq!(appended, format!("# Perf\n\n{BEGIN}\nx\n{END}\n"));
    }

    #[test]
    fn the_machine_adds_the_payload_and_bench_switches() {
        let (e, h, g) = (
            Path::new("/b/el2.bin"),
            Path::new("/b/testhost.bin"),
            Path::new("/b/guest.bin"),
        );
        let a = qemu_args(e, h, g, false).join(" ");
        assert!(a.contains("loader,file=/b/guest.bin,addr=0x60000000,force-raw=on"));
        assert!(a.contains("-smp 4") && a.contains("tcg,thread=multi"));
        assert!(!a.contains("icount") && !a.contains("data="));
        let b = qemu_args(e, h, g, true).join(" ");
        assert!(b.contains("-smp 1") && b.contains("-accel tcg ") && b.contains("-icount shift=0"));
        assert!(b.contains(&format!(
            "data={COMMAND_BENCH:#x},data-len=8,addr=0x5ffff000"
        )));
    }

    #[test]
    fn results_rename_the_suite_entries() {
        let run = qemu::Captured {
            lines: lines("CASE a\nPASS a\n1 passed, 0 failed"),
            stderr: String::new(),
            status: None,
            timed_out: false,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(results(&run), vec![("a".to_string(), true, String::new())]);
        let run = qemu::Captured {
            lines: lines("CASE a\n"),
            ..run
        };
        let r = results(&run);
        assert!(r
            .iter()
            .any(|e| e.0 == "guest: the test host prints its tally" && !e.1));
    }
}
