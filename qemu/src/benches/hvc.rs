//! `cargo xtask bench hvc`: instructions per hypercall round trip, el2
//! with the test host playing VMM for the guest payload (`testhost.rs`).
//!
//! A command word at [`COMMAND_ADDR`] (a loader device, `data=`) makes the
//! test host run the benchmark instead of its guest cases. The benchmark
//! boots with `-icount shift=0` on one CPU: QEMU then runs single-threaded
//! TCG and its virtual clock advances exactly 2^0 = 1 ns per guest
//! instruction, so the generic counter (CNTFRQ_EL0 Hz, 62.5 MHz on QEMU 7.2
//! `virt`) advances one tick per `1e9 / CNTFRQ` = 16 instructions. The test
//! host calibrates that relation in the same run with a loop of known
//! length and reports instructions per round trip.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::qemu::Launch;
use crate::suites::guest::build_all;
use crate::testhost::{self, COMMAND_ADDR, COMMAND_BENCH};

/// The guest suite's launch with the command word that selects the
/// benchmark, on one CPU (every counted instruction belongs to the round
/// trip) with `-icount shift=0` (which needs single-threaded TCG).
pub fn launch(el2: &Path, host: &Path, guest: &Path) -> Launch {
    testhost::launch(el2, host, Some(guest))
        .load_word(COMMAND_BENCH, COMMAND_ADDR)
        .smp(1)
        .icount()
}

/// Hard limit on the benchmark boot.
pub const BENCH_TIMEOUT: Duration = Duration::from_secs(150);

/// `cargo xtask bench hvc`: boots the benchmark, prints its table and
/// writes it into docs/PERFORMANCE.md between the `bench:hvc` markers.
pub fn bench(root: &Path) -> Result<()> {
    let (el2, host, guest) = build_all(root)?;
    let run = testhost::boot(&launch(&el2, &host, &guest), BENCH_TIMEOUT, "bench hvc")?;
    if run.timed_out {
        bail!(
            "the benchmark did not finish in {}s\n{}",
            BENCH_TIMEOUT.as_secs(),
            run.tail(30)
        );
    }
    let b = parse_bench(&run.lines).with_context(|| run.tail(30))?;
    let section = bench_section(&b, &crate::versions::toolchain());
    println!("{section}");
    super::write_section(root, "hvc", &section)
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
pub fn parse_bench(lines: &[String]) -> Result<Bench> {
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
            b.freq = f.trim().parse().map_err(|_| anyhow!("bad line `{l}`"))?;
        } else if let Some(c) = rest.strip_prefix("calib ") {
            let v: Vec<u64> = c
                .split_whitespace()
                .map(|x| x.parse().map_err(|_| anyhow!("bad line `{l}`")))
                .collect::<Result<_, _>>()?;
            match v.as_slice() {
                [insns, ticks] if *ticks > 0 => {
                    b.calib_insns_per_tick = *insns as f64 / *ticks as f64
                }
                _ => bail!("bad line `{l}`"),
            }
        } else if let Some(r) = rest.strip_prefix("row ") {
            let parts: Vec<&str> = r.split('|').collect();
            match parts.as_slice() {
                [name, n, t] => {
                    let n: u64 = n.trim().parse().map_err(|_| anyhow!("bad line `{l}`"))?;
                    let t: u64 = t.trim().parse().map_err(|_| anyhow!("bad line `{l}`"))?;
                    if n == 0 {
                        bail!("no iterations in `{l}`");
                    }
                    b.rows.push((name.trim().to_string(), n, t));
                }
                _ => bail!("bad line `{l}`"),
            }
        }
    }
    if !fails.is_empty() {
        bail!("the benchmark failed:\n{}", fails.join("\n"));
    }
    if b.freq == 0 || b.calib_insns_per_tick == 0.0 || b.rows.is_empty() {
        bail!("the benchmark printed no frequency, calibration or rows");
    }
    Ok(b)
}

/// Instructions per tick: `1e9 / CNTFRQ` with `-icount shift=0`.
fn insns_per_tick(freq: u64) -> f64 {
    1e9 / freq as f64
}

/// The markdown section (without its markers); `versions` names what ran.
pub fn bench_section(b: &Bench, versions: &str) -> String {
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
        "## Hypercall round trips (`cargo xtask bench hvc`)\n\n\
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
         TLB maintenance cost one instruction each here.\n\n\
         Versions: {versions}.\n",
        b.freq, ipt, b.calib_insns_per_tick, ipt, ipt
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::test_lines as lines;

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
        let s = bench_section(&b, "rustc 1.0; QEMU 7.2");
        assert!(s.starts_with("## Hypercall round trips"));
        assert!(
            s.trim_end().ends_with("Versions: rustc 1.0; QEMU 7.2."),
            "{s}"
        );
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
    fn the_bench_machine_has_one_cpu_icount_and_the_command_word() {
        let p = Path::new;
        let a = launch(p("/b/el2.bin"), p("/b/testhost.bin"), p("/b/guest.bin"))
            .args()
            .unwrap()
            .join(" ");
        assert!(a.contains("-smp 1") && a.contains("-accel tcg -icount shift=0"));
        assert!(a.contains("loader,file=/b/guest.bin,addr=0x60000000,force-raw=on"));
        assert!(a.contains(&format!(
            "data={COMMAND_BENCH:#x},data-len=8,addr=0x5ffff000"
        )));
    }
}
