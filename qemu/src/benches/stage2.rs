//! `cargo xtask bench stage2`: instruction counts of our `stage2` crate
//! against google/aarch64-paging's `Stage2` regime, under callgrind.
//!
//! The workloads live in the `bench-stage2` binary (`qemu/bench-stage2`),
//! which does the measured work of one (implementation, workload) pair inside
//! a function whose name contains `s2bench_measured_`. Here we build it in
//! release mode, run every pair under `valgrind --tool=callgrind` with
//! collection toggled on that function only, read the `Ir` total from each
//! callgrind file, print a table and rewrite the stage2 section of
//! `docs/PERFORMANCE.md` (`bench:stage2` markers).
//!
//! A ratio above 1.0 or descriptor memory off its target is reported (and
//! flagged) but is not an error; a run that fails is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// Callgrind `--toggle-collect` pattern matching the measured functions.
const TOGGLE: &str = "*s2bench_measured_*";

/// The two implementations, as the bench binary names them.
const IMPLS: [&str; 2] = ["ours", "aarch64-paging"];

/// The workloads: bench-binary name and description.
const WORKLOADS: [(&str, &str); 4] = [
    ("map4k", "map 1 GiB as 4K pages"),
    ("map2m", "map 1 GiB as 2M blocks"),
    ("unmap", "unmap 1 GiB of 4K pages"),
    ("split", "split one 1G block to 4K"),
];

/// Tables (besides the root) that 1 GiB needs at 4 KiB: 512 level-3 tables
/// and one level-2 table, i.e. 2.004 MiB per GiB.
const TARGET_TABLES_4K: u64 = 513;
/// Tables (besides the root) that 1 GiB needs at 2 MiB: one level-2 table.
const TARGET_TABLES_2M: u64 = 1;

/// One measured run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Instructions executed inside the measured function.
    ir: u64,
    /// Live tables other than the root after the work.
    tables: u64,
    /// Bytes mapped after the work.
    mapped: u64,
}

/// All runs of one workload.
#[derive(Clone, Debug)]
struct Row {
    name: &'static str,
    what: &'static str,
    ours: Run,
    theirs: Run,
}

/// Runs the benchmark and writes `docs/PERFORMANCE.md`.
pub fn stage2(root: &Path) -> Result<()> {
    ensure_valgrind()?;
    println!("==> building bench-stage2 (release)");
    let exe = build_bench(root)?;
    let out_dir = exe
        .parent()
        .ok_or_else(|| anyhow!("bench binary {} has no parent directory", exe.display()))?
        .join("callgrind-stage2");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let mut rows = Vec::new();
    for (name, what) in WORKLOADS {
        let mut runs = [Run {
            ir: 0,
            tables: 0,
            mapped: 0,
        }; 2];
        for (slot, imp) in runs.iter_mut().zip(IMPLS) {
            println!("==> callgrind: {imp} {name}");
            *slot = run_one(&exe, &out_dir, imp, name)?;
        }
        rows.push(Row {
            name,
            what,
            ours: runs[0],
            theirs: runs[1],
        });
    }

    let meta = Meta::collect(root);
    let report = render(&rows, &meta)?;
    println!("\n{report}");
    for r in rows.iter().filter(|r| r.ours.ir > r.theirs.ir) {
        let file = out_dir.join(format!("callgrind.ours.{}.out", r.name));
        println!(
            "{} is ABOVE TARGET; where ours spends its instructions (self cost):",
            r.name
        );
        println!("{}", hotspots(&file, 12));
    }
    println!(
        "callgrind files: {}/callgrind.<impl>.<workload>.out \
         (inspect with `callgrind_annotate --inclusive=yes FILE`)",
        out_dir.display()
    );

    super::write_section(root, "stage2", &report)
}

// ---------------------------------------------------------------------------
// Tools.
// ---------------------------------------------------------------------------

/// Installs valgrind (which brings `callgrind_annotate`) with apt-get when
/// it is missing.
fn ensure_valgrind() -> Result<()> {
    crate::install::apt_for("valgrind", &["valgrind"])
}

/// Builds `bench-stage2` in release mode and returns the executable's path.
fn build_bench(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "bench-stage2",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("building bench-stage2 failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    executable_from_cargo_json(&stdout, "bench-stage2")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("cargo did not report the bench-stage2 executable"))
}

/// The `"executable"` path of the artifact whose file name is `bin`, from
/// cargo's JSON messages (one object per line).
fn executable_from_cargo_json(messages: &str, bin: &str) -> Option<String> {
    messages.lines().find_map(|line| {
        let msg: serde_json::Value = serde_json::from_str(line).ok()?;
        let path = msg.get("executable")?.as_str()?;
        let name = Path::new(path).file_name()?.to_str()?;
        (name == bin || name == format!("{bin}.exe")).then(|| path.to_string())
    })
}

/// Runs one (implementation, workload) pair under callgrind.
fn run_one(exe: &Path, out_dir: &Path, imp: &str, workload: &str) -> Result<Run> {
    let cg = out_dir.join(format!("callgrind.{imp}.{workload}.out"));
    let _ = std::fs::remove_file(&cg);
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--collect-atstart=no")
        .arg(format!("--toggle-collect={TOGGLE}"))
        .arg(format!("--callgrind-out-file={}", cg.display()))
        .arg(exe)
        .args([imp, workload])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run valgrind: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(anyhow!(
            "{imp} {workload} failed under callgrind ({}):\n{stdout}{}",
            out.status,
            tail.join("\n")
        ));
    }
    let (tables, mapped) = parse_result_line(&stdout)
        .ok_or_else(|| anyhow!("{imp} {workload}: no `result` line in output:\n{stdout}"))?;
    let text = std::fs::read_to_string(&cg)
        .with_context(|| format!("cannot read callgrind output {}", cg.display()))?;
    let ir = parse_ir(&text)
        .ok_or_else(|| anyhow!("no `totals:`/`summary:` line in {}", cg.display()))?;
    if ir == 0 {
        return Err(anyhow!(
            "{imp} {workload}: 0 instructions collected; the toggle `{TOGGLE}` matched nothing"
        ));
    }
    Ok(Run { ir, tables, mapped })
}

/// The `top` costliest functions (self cost) of a callgrind file, as
/// `callgrind_annotate` lists them, or why they could not be listed.
fn hotspots(file: &Path, top: usize) -> String {
    let out = Command::new("callgrind_annotate")
        .arg("--inclusive=no")
        .arg(file)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            function_lines(&text, top).join("\n")
        }
        Ok(o) => format!("  (callgrind_annotate failed: {})", o.status),
        Err(e) => format!("  (cannot run callgrind_annotate: {e})"),
    }
}

/// The first `top` lines of the function table in `callgrind_annotate`
/// output (the lines after the `file:function` header).
fn function_lines(annotate: &str, top: usize) -> Vec<String> {
    annotate
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .skip(2)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("---"))
        .take(top)
        .map(|l| format!("  {l}"))
        .collect()
}

/// `(tables, mapped)` from the bench binary's
/// `result impl=.. workload=.. tables=N mapped=M` line.
fn parse_result_line(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("result "))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("tables")?, field("mapped")?))
}

/// The `Ir` count from a callgrind output file: the first number of its
/// `totals:` line, or of `summary:` if there is no `totals:`.
fn parse_ir(callgrind_out: &str) -> Option<u64> {
    let first_number = |prefix: &str| {
        callgrind_out.lines().find_map(|l| {
            l.strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    };
    first_number("totals:").or_else(|| first_number("summary:"))
}

// ---------------------------------------------------------------------------
// Report.
// ---------------------------------------------------------------------------

/// Where and with what the numbers were taken.
#[derive(Debug)]
struct Meta {
    date: String,
    commit: String,
    rustc: String,
    valgrind: String,
}

impl Meta {
    fn collect(root: &Path) -> Self {
        let cmd = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .current_dir(root)
                .stdin(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let mut commit = cmd("git", &["rev-parse", "--short=12", "HEAD"]);
        // Only the measured code decides whether the numbers belong to the
        // commit: tracked files of the two crates that differ from it.
        let changed = cmd(
            "git",
            &[
                "diff",
                "--name-only",
                "HEAD",
                "--",
                "stage2/src",
                "qemu/bench-stage2",
            ],
        );
        if !changed.is_empty() && changed != "unknown" {
            let files: Vec<&str> = changed.lines().collect();
            let _ = write!(
                commit,
                " (plus uncommitted changes to {})",
                files.join(", ")
            );
        }
        Self {
            date: super::today(),
            commit,
            rustc: cmd("rustc", &["--version"]),
            valgrind: cmd("valgrind", &["--version"]),
        }
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Descriptor memory of a run, in `unit` bytes per GiB mapped.
fn per_gib(run: &Run, unit: f64) -> Result<f64> {
    if run.mapped == 0 {
        bail!("descriptor memory asked of a run that maps nothing");
    }
    Ok(run.tables as f64 * 4096.0 / unit / (run.mapped as f64 / f64::from(1u32 << 30)))
}

/// The Markdown section: what, with what, the table, memory, and method.
fn render(rows: &[Row], meta: &Meta) -> Result<String> {
    let find = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .ok_or_else(|| anyhow!("no `{name}` row"))
    };
    let map4k = find("map4k")?;
    let map2m = find("map2m")?;

    let mut s = String::new();
    // `write!` to a String cannot fail.
    let _ = writeln!(
        s,
        "## stage2 vs aarch64-paging 0.12 (`cargo xtask bench stage2`)\n"
    );
    let _ = writeln!(
        s,
        "Measured {} at commit {}, {}, {}.\n",
        meta.date, meta.commit, meta.rustc, meta.valgrind
    );
    let _ = writeln!(
        s,
        "| workload | ours Ir | aarch64-paging Ir | ratio | target (≤ 1.00) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|");
    for r in rows {
        let ratio = r.ours.ir as f64 / r.theirs.ir as f64;
        let flag = if ratio <= 1.0 {
            "met"
        } else {
            "**ABOVE TARGET**"
        };
        let _ = writeln!(
            s,
            "| {} (`{}`) | {} | {} | {:.3} | {} |",
            r.what,
            r.name,
            thousands(r.ours.ir),
            thousands(r.theirs.ir),
            ratio,
            flag
        );
    }
    let mem_flag = |tables: u64, target: u64| {
        if tables == target {
            "met"
        } else {
            "**OFF TARGET**"
        }
    };
    let _ = writeln!(s);
    let _ = writeln!(s, "| descriptor memory | ours | aarch64-paging | target |");
    let _ = writeln!(s, "|---|---:|---:|---|");
    let _ = writeln!(
        s,
        "| 4K pages | {:.3} MiB/GiB ({} tables) | {:.3} MiB/GiB ({} tables) | 2.004 MiB/GiB: {} |",
        per_gib(&map4k.ours, 1024.0 * 1024.0)?,
        map4k.ours.tables,
        per_gib(&map4k.theirs, 1024.0 * 1024.0)?,
        map4k.theirs.tables,
        mem_flag(map4k.ours.tables, TARGET_TABLES_4K)
    );
    let _ = writeln!(
        s,
        "| 2M blocks | {:.0} KiB/GiB ({} tables) | {:.0} KiB/GiB ({} tables) | 4 KiB/GiB: {} |",
        per_gib(&map2m.ours, 1024.0)?,
        map2m.ours.tables,
        per_gib(&map2m.theirs, 1024.0)?,
        map2m.theirs.tables,
        mem_flag(map2m.ours.tables, TARGET_TABLES_2M)
    );
    let _ = writeln!(s);
    s.push_str(METHOD);
    Ok(s)
}

/// How the numbers are taken; part of the written section.
const METHOD: &str = "\
Method:
- Each cell is one run of `qemu/bench-stage2` (release profile, `debug = 1`) under
  `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*s2bench_measured_*'`:
  only the `#[inline(never)]` function doing the work (and what it calls, including
  malloc/free and zeroing of new tables) is counted. Creating the table, the setup
  (mapping before `unmap`/`split`), the checks afterwards and teardown are not.
- Same addresses on both sides: IPA [1 GiB, 2 GiB) in a 39-bit IPA space (one level-1
  root table), output at 0x8_0020_0000 (2 MiB- but not 1 GiB-aligned) or, for the
  split, 0x8_0000_0000. Attributes: normal write-back, read/write, no execute.
- Ours: `stage2::pgtable::Stage2<ArenaMemory, CountingTlb>`; `map` with
  `Granule::Page` / `Granule::Block2M`; `unmap` of the whole GiB (frees emptied tables,
  counts unmapped pages, issues TLB maintenance to the counting fake); split = map with
  `Granule::Largest` (one 1 GiB block, setup) then `split(ipa, 1 GiB, Granule::Page)`.
- aarch64-paging 0.12: `Mapping<IdTranslation<Stage2Attributes>, Stage2>`, root level 1,
  tables from the global allocator (`alloc_zeroed`, 4 KiB). Never activated, so it does
  no break-before-make checks and no TLB maintenance. `map_range` with
  `Constraints::NO_BLOCK_MAPPINGS` (4K) or `empty()` (2M: the output address keeps it
  from using a 1 GiB block); unmap = `map_range` without `VALID` over the GiB, which
  frees the whole level-2 subtree; split = map a 1 GiB block (setup), then 512
  `modify_range` calls with a no-op updater on the first 4 KiB of each 2 MiB, which
  splits the 1 GiB block into 2 MiB blocks and each of those into pages, once each
  (it has no split-without-change operation).
- Each run checks afterwards, by walking the table, that exactly the expected leaves
  (size, output address, attributes) are present, and fails otherwise.
- Descriptor memory = live tables other than the root after mapping, x 4 KiB, per GiB
  mapped: our `ArenaMemory::live()` minus the root; for aarch64-paging, live 4 KiB
  4 KiB-aligned allocations (its `PageTable`s) counted by a global allocator wrapper
  that both sides run under.
- The ratio is ours / aarch64-paging; `ABOVE TARGET` marks a ratio above 1.00.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ir_comes_from_totals_then_summary() {
        let both = "version: 1\nevents: Ir\nsummary: 15\nfn=x\n1 2\ntotals: 42\n";
        assert_eq!(parse_ir(both), Some(42));
        assert_eq!(parse_ir("events: Ir\nsummary: 7 3\n"), Some(7));
        assert_eq!(parse_ir("events: Ir\n"), None);
        assert_eq!(parse_ir("totals: many\n"), None);
    }

    #[test]
    fn annotate_function_table_is_cut_out() {
        let text = "Ir\n---\n100 PROGRAM TOTALS\n\n---\nIr  file:function\n---\n\
                    60 (60%)  a.rs:f\n30 (30%)  b.rs:g\n10 (10%)  c.rs:h\n\n-- Auto-annotated\n";
        assert_eq!(
            function_lines(text, 2),
            vec![
                "  60 (60%)  a.rs:f".to_string(),
                "  30 (30%)  b.rs:g".to_string()
            ]
        );
        assert!(function_lines("no table", 5).is_empty());
    }

    #[test]
    fn result_line_is_parsed() {
        let out = "noise\nresult impl=ours workload=map4k tables=513 mapped=1073741824\n";
        assert_eq!(parse_result_line(out), Some((513, 1 << 30)));
        assert_eq!(parse_result_line("result impl=ours tables=1\n"), None);
        assert_eq!(parse_result_line("tables=1 mapped=2\n"), None);
    }

    #[test]
    fn executable_is_found_in_cargo_json() {
        let msgs = concat!(
            r#"{"reason":"compiler-artifact","executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","executable":"/t/release/other"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","executable":"/t\/release/bench-stage2","fresh":true}"#,
            "\n"
        );
        assert_eq!(
            executable_from_cargo_json(msgs, "bench-stage2").as_deref(),
            Some("/t/release/bench-stage2")
        );
        assert_eq!(executable_from_cargo_json("{}", "bench-stage2"), None);
    }

    #[test]
    fn numbers_format() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(14_109_613), "14,109,613");
    }

    #[test]
    fn report_flags_ratio_and_memory() {
        let run = |ir, tables| Run {
            ir,
            tables,
            mapped: 1 << 30,
        };
        let rows = vec![
            Row {
                name: "map4k",
                what: "a",
                ours: run(90, 513),
                theirs: run(100, 513),
            },
            Row {
                name: "map2m",
                what: "b",
                ours: run(110, 2),
                theirs: run(100, 1),
            },
        ];
        let meta = Meta {
            date: "d".into(),
            commit: "c".into(),
            rustc: "r".into(),
            valgrind: "v".into(),
        };
        let s = render(&rows, &meta).unwrap();
        assert!(
            s.contains("| a (`map4k`) | 90 | 100 | 0.900 | met |"),
            "{s}"
        );
        assert!(
            s.contains("| b (`map2m`) | 110 | 100 | 1.100 | **ABOVE TARGET** |"),
            "{s}"
        );
        assert!(s.contains("| 4K pages | 2.004 MiB/GiB (513 tables)"), "{s}");
        assert!(s.contains("| 2M blocks | 8 KiB/GiB (2 tables) | 4 KiB/GiB (1 tables) | 4 KiB/GiB: **OFF TARGET** |"), "{s}");
        assert!(render(&rows[..1], &meta).is_err());
    }
}
