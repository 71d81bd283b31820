//! `cargo xtask bench scale` (issue 13, items 3 and 6): what pinned guest
//! memory costs in hypercalls and stage-2 table pages at scale, counted by
//! the module itself.
//!
//! One boot of Debian's kernel under el2 runs `s2vmm scale` once per run
//! (host-driver/vmm/src/scale.rs): VMs faulted in fully by the payload's
//! touch mode, then on the measured VM a NUMA-balancing scan over all of its
//! memory (each GiB one PUD-wide protection event), `mprotect(PROT_READ)`
//! and `munmap` of it, then every teardown; the module's counters
//! (`S2PIN_GET_STATS`: `calls_share`, `calls_unshare`, `calls_wrprotect`,
//! `calls_other`, `el2_rt_table_pages`, ...) before and after each step, and
//! debugfs `last_teardown` after each close. `s2vmm leakcheck` after each
//! run. The default (item 3) runs 1 GiB guests in a 4 GiB host; `--large`
//! (item 6) a 16 GiB host holding 8 VMs at once, one of them a 4 GiB THP
//! guest. Each writes its own section of docs/PERFORMANCE.md (`scale`,
//! `scale-large`) and prints PASS/FAIL against the limits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::initramfs::Mode;
use crate::qemu::{Console, Machine};
use crate::run;
use crate::suites::shim::sections;
use crate::util::progress;

/// Calls a range operation may take beyond one per 512 pages ("a few").
pub const FEW: u64 = 4;

/// Options of `cargo xtask bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Issue 13 item 6: a 16 GiB host holding 8 VMs at once (one 4 GiB THP guest, one 1 GiB on
    /// 4 KiB pages, six of 512 MiB), all faulted in fully, then torn down; writes the
    /// `scale-large` section (about 30 min under TCG).
    #[arg(long)]
    pub large: bool,
    /// No QEMU: the figures and the section again from build/bench-scale[-large].log.
    #[arg(long)]
    pub from_log: bool,
}

/// One `s2vmm scale` invocation of the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Its name (a case of the script).
    pub id: &'static str,
    /// `s2vmm scale` arguments.
    pub args: String,
}

/// The runs of a boot.
#[must_use]
pub fn runs(large: bool) -> Vec<Run> {
    if large {
        let mut args = String::from("--vm 4G:thp:confirm --other 1G:anon:confirm");
        for p in ["confirm", "keep", "eager", "confirm", "keep", "eager"] {
            let _ = write!(args, " --other 512M:thp:{p}");
        }
        return vec![Run {
            id: "large",
            args: args + " --fault-seconds 5400",
        }];
    }
    [
        (
            "anon-confirm",
            "--vm 1G:anon:confirm --steps numa,wrprotect,munmap",
        ),
        ("anon-keep", "--vm 1G:anon:keep --steps numa"),
        (
            "thp-confirm",
            "--vm 1G:thp:confirm --steps wrprotect,munmap",
        ),
        ("thp-keep", "--vm 1G:thp:keep --steps numa"),
        ("thp-eager", "--vm 1G:thp:eager --steps numa"),
    ]
    .into_iter()
    .map(|(id, args)| Run {
        id,
        args: args.to_string(),
    })
    .collect()
}

/// The machine: 4 CPUs, 4 GiB (16 GiB with `large`).
#[must_use]
pub fn machine(large: bool) -> Machine {
    Machine {
        mem_mib: if large { 16 << 10 } else { 4 << 10 },
        ..Machine::default()
    }
}

/// The boot's script: a leak check after each run.
#[must_use]
pub fn script(runs: &[Run]) -> String {
    script_with(runs, true)
}

/// The boot's script; `leak_each`: a leak check after each run, else one
/// at the end (case `leakcheck`).
#[must_use]
pub fn script_with(runs: &[Run], leak_each: bool) -> String {
    let mut s = String::from(
        "echo '== CASE setup'\ninsmod /root/s2pin.ko; echo \"CHECK setup.insmod=$?\"\n\
         echo 0 > /proc/sys/kernel/numa_balancing\n\
         echo \"CHECK setup.memtotal_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)\"\n\
         s2vmm leakcheck --save /tmp/leak.base; echo \"CHECK setup.base=$?\"\n",
    );
    for r in runs {
        let id = r.id;
        let _ = write!(
            s,
            "echo '== CASE {id}'\n\
             s2vmm scale {} --json /tmp/{id}.json; echo \"CHECK {id}.status=$?\"\n\
             echo '== JSON'; cat /tmp/{id}.json; echo '== JSON END'\n",
            r.args
        );
        if leak_each {
            let _ = writeln!(
                s,
                "s2vmm leakcheck --base /tmp/leak.base --save /tmp/leak.base; echo \"CHECK {id}.leak=$?\""
            );
        }
    }
    if !leak_each {
        s.push_str(
            "echo '== CASE leakcheck'\n\
             s2vmm leakcheck --base /tmp/leak.base; echo \"CHECK leakcheck.leak=$?\"\n",
        );
    }
    s.push_str(
        "echo '== CASE dmesg'\n\
         echo \"CHECK dmesg.bad=$(dmesg | grep -cE 'Oops|BUG:|WARNING:|Unable to handle|Call trace|soft lockup|hung_task')\"\n",
    );
    s
}

/// What one run printed: its JSON, status and leak check.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// `s2vmm scale --json`.
    pub json: Value,
    /// s2vmm's exit status.
    pub status: Option<i64>,
    /// The leak check's exit status and line.
    pub leak: Option<i64>,
    /// `leakcheck: ...`.
    pub leak_line: String,
    /// s2vmm's own lines.
    pub lines: Vec<String>,
    /// The `dmesg` case: kernel-log lines that mean trouble.
    pub bad: Option<i64>,
}

/// Splits the boot's output into runs.
#[must_use]
pub fn results(output: &[String]) -> BTreeMap<String, RunResult> {
    let mut out = BTreeMap::new();
    for (id, sec) in sections(output) {
        let mut json = String::new();
        let mut inside = false;
        let mut lines = Vec::new();
        for l in &sec.lines {
            match l.trim() {
                "== JSON" => inside = true,
                "== JSON END" => inside = false,
                t if inside => {
                    json.push_str(t);
                    json.push('\n');
                }
                t if t.starts_with("s2vmm scale: ") => lines.push(t.to_string()),
                _ => {}
            }
        }
        let num = |k: &str| sec.checks.get(k).and_then(|v| v.trim().parse().ok());
        out.insert(
            id,
            RunResult {
                json: serde_json::from_str(&json).unwrap_or(Value::Null),
                status: num("status"),
                leak: num("leak"),
                leak_line: sec
                    .lines
                    .iter()
                    .find(|l| l.trim().starts_with("leakcheck:"))
                    .cloned()
                    .unwrap_or_default(),
                lines,
                bad: num("bad"),
            },
        );
    }
    out
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_u64().and_then(|u| i64::try_from(u).ok()))
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "n/a".into(),
        Value::Number(n) => n.as_f64().map_or_else(
            || n.to_string(),
            |f| {
                if f.fract() == 0.0 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.1}")
                }
            },
        ),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The limit of a range step: one call per 512 pages plus [`FEW`].
#[must_use]
pub fn limit(pages: i64) -> i64 {
    pages.div_euclid(512) + i64::from(pages % 512 != 0) + FEW as i64
}

/// PASS/FAIL lines (and information lines, `None`) of every run.
#[must_use]
pub fn verdicts(res: &BTreeMap<String, RunResult>, large: bool) -> Vec<(Option<bool>, String)> {
    let mut v = Vec::new();
    for (id, r) in res {
        if id == "dmesg" {
            v.push((
                Some(r.bad == Some(0)),
                format!(
                    "the kernel log has {} Oops/BUG/WARNING/soft-lockup lines at the end",
                    r.bad.map_or("?".into(), |b| b.to_string())
                ),
            ));
            continue;
        }
        if id == "setup" {
            continue;
        }
        if id == "leakcheck" {
            v.push((
                Some(r.leak == Some(0)),
                format!("at the end: {}", r.leak_line.trim()),
            ));
            continue;
        }
        let m = &r.json["measured"];
        let who = format!(
            "{id} ({} MiB {} {})",
            show(&m["mem_mib"]),
            show(&m["backing"]),
            show(&m["policy"])
        );
        if r.json.is_null() {
            v.push((
                Some(false),
                format!("{id}: no figures (s2vmm scale status {:?})", r.status),
            ));
            continue;
        }
        let policy = m["policy"].as_str().unwrap_or("");
        let backing = m["backing"].as_str().unwrap_or("");
        for st in r.json["steps"].as_array().into_iter().flatten() {
            let pages = int(&st["pages"]).unwrap_or(0);
            let lim = limit(pages);
            let step = st["step"].as_str().unwrap_or("?");
            let missing = "the module has no calls_* counters";
            match step {
                "munmap" | "wrprotect" => {
                    let key = if step == "munmap" {
                        "calls_unshare"
                    } else {
                        "calls_wrprotect"
                    };
                    let what = if step == "munmap" {
                        "HYP_UNSHARE(_RANGE)"
                    } else {
                        "HYP_WRPROTECT"
                    };
                    let line = match int(&st[key]) {
                        Some(c) => (
                            Some(c <= lim && c >= 1),
                            format!(
                                "{who}: {step} of {pages} mapped pages: {c} {what} calls (all hypercalls {}), limit pages/512 + {FEW} = {lim}",
                                show(&st["calls"])
                            ),
                        ),
                        None => (Some(false), format!("{who}: {step}: {missing}")),
                    };
                    v.push(line);
                }
                "numa" => {
                    let covered = st["covered"].as_bool().unwrap_or(false);
                    let events = show(&st["delta"]["range_start_protection_vma"]);
                    let kept = show(&st["delta"]["kept"]);
                    let puds = show(&st["pud_ranges"]);
                    let zero_expected =
                        policy == "keep" || (policy == "confirm" && backing == "anon");
                    let c = int(&st["calls"]);
                    let text = format!(
                        "{who}: NUMA scan over {pages} pinned pages ({puds} PUD-wide range(s), {events} protection events, kept {kept}, covered {covered}): {} hypercalls{}",
                        c.map_or_else(|| missing.to_string(), |c| c.to_string()),
                        if zero_expected { ", expected 0".to_string() } else { format!(" (no limit: {policy} unmaps on {backing}; pages/512 = {})", pages / 512) }
                    );
                    let ok = zero_expected.then(|| covered && c == Some(0));
                    v.push((ok, text));
                }
                _ => {}
            }
        }
        // Without a leak check of its own the run's status alone (the
        // `leakcheck` case checks at the end).
        let leak_ok = r.leak == Some(0) || (r.leak.is_none() && r.leak_line.is_empty());
        v.push((
            Some(leak_ok && r.status == Some(0)),
            format!(
                "{id}: s2vmm scale exit status {}{}",
                r.status.map_or("?".into(), |s| s.to_string()),
                if r.leak.is_none() && r.leak_line.is_empty() {
                    String::new()
                } else {
                    format!(", then {}", r.leak_line.trim())
                }
            ),
        ));
        if large {
            let vms = r.json["vms"].as_array().map_or(0, Vec::len);
            let torn = r.json["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| !g["teardown"]["calls"].is_null())
                .count();
            v.push((
                Some(vms == 8 && torn == 8 && show(&r.json["pinned_after"]) == "0"),
                format!(
                    "{id}: {vms} VMs held at once, {torn} teardowns reported, pages pinned after all closed: {}",
                    show(&r.json["pinned_after"])
                ),
            ));
        }
    }
    v
}

/// `hypervisor memory: N MiB for M MiB of RAM (...)`, from el2's console.
#[must_use]
pub fn hyp_memory(console: &[String]) -> Option<String> {
    console.iter().find_map(|l| {
        l.find("hypervisor memory: ")
            .map(|i| l[i..].trim().to_string())
    })
}

fn fault_table(res: &BTreeMap<String, RunResult>) -> String {
    let mut t = String::from(
        "| run | VM | backing | policy | tested MiB | vCPUs | faults | pages shared | 2 MiB blocks | HYP_SHARE calls | all hypercalls | stage-2 table pages | per GiB of guest RAM | seconds |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (id, r) in res {
        for g in r.json["vms"].as_array().into_iter().flatten() {
            let f = &g["fault_in"];
            let d = &f["delta"];
            let _ = writeln!(
                t,
                "| {id} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                show(&g["name"]),
                show(&g["backing"]),
                show(&g["policy"]),
                show(&g["mem_mib"]),
                show(&f["vcpus"]),
                show(&d["faults"]),
                show(&d["shares"]),
                if d["blocks_shared"].is_null() {
                    "0".into()
                } else {
                    show(&d["blocks_shared"])
                },
                show(&d["calls_share"]),
                show(&f["calls"]),
                show(&f["table_pages"]),
                show(&f["table_pages_per_gib"]),
                show(&f["seconds"]),
            );
        }
    }
    t
}

fn step_table(res: &BTreeMap<String, RunResult>) -> String {
    let mut t = String::from(
        "| run | step | pages | hypercalls | HYP_SHARE | HYP_UNSHARE(_RANGE) | HYP_WRPROTECT | other | pages/512 | what else changed |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for (id, r) in res {
        for st in r.json["steps"].as_array().into_iter().flatten() {
            let pages = int(&st["pages"]).unwrap_or(0);
            let other: Vec<String> = st["delta"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    !k.starts_with("calls_") && !k.starts_with("el2_rt_") && *k != "range_end"
                })
                .map(|(k, v)| format!("{k} {}", show(v)))
                .collect();
            let mut note = other.join(", ");
            if st["step"] == "wrprotect" {
                let _ = write!(
                    note,
                    "; back to read-write: {} hypercalls",
                    show(&st["restore_calls"])
                );
            }
            let _ = writeln!(
                t,
                "| {id} | {} | {pages} | {} | {} | {} | {} | {} | {} | {note} |",
                show(&st["step"]),
                show(&st["calls"]),
                show(&st["calls_share"]),
                show(&st["calls_unshare"]),
                show(&st["calls_wrprotect"]),
                show(&st["calls_other"]),
                pages / 512,
            );
        }
    }
    t
}

fn teardown_table(res: &BTreeMap<String, RunResult>) -> String {
    let mut t = String::from(
        "| run | VM | backing | tested MiB | pages unpinned | hypercalls | of which HYP_TEARDOWN_RECLAIM |\n|---|---|---|---:|---:|---:|---:|\n",
    );
    for (id, r) in res {
        for g in r.json["vms"].as_array().into_iter().flatten() {
            let td = &g["teardown"];
            let _ = writeln!(
                t,
                "| {id} | {} | {} | {} | {} | {} | {} |",
                show(&g["name"]),
                show(&g["backing"]),
                show(&g["mem_mib"]),
                show(&td["unpinned"]),
                show(&td["calls"]),
                show(&td["reclaim_calls"]),
            );
        }
    }
    t
}

/// Stage-2 table pages per GiB of guest RAM, 4 KiB vs 2 MiB, over every
/// VM of at least 512 MiB.
fn tables_per_gib(res: &BTreeMap<String, RunResult>) -> String {
    let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in res.values() {
        for g in r.json["vms"].as_array().into_iter().flatten() {
            if int(&g["mem_mib"]).unwrap_or(0) < 512 {
                continue;
            }
            let k = if g["backing"] == "thp" {
                "2 MiB blocks (thp)"
            } else {
                "4 KiB pages (anon)"
            };
            by.entry(k).or_default().push(format!(
                "{} ({} MiB)",
                show(&g["fault_in"]["table_pages_per_gib"]),
                show(&g["mem_mib"])
            ));
        }
    }
    by.iter()
        .map(|(k, v)| format!("{k}: {}", v.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Pages the host gave el2 for the VMs' stage 2 while all were held
/// (each run's sum over its VMs after their fault-ins: table pages in use
/// plus free memcache pages), as text per run.
fn donated(res: &BTreeMap<String, RunResult>) -> String {
    res.iter()
        .filter_map(|(id, r)| {
            let vms = r.json["vms"].as_array()?;
            let (t, m) = vms.iter().fold((0, 0), |(t, m), g| {
                (
                    t + int(&g["fault_in"]["table_pages"]).unwrap_or(0),
                    m + int(&g["fault_in"]["memcache_pages"]).unwrap_or(0),
                )
            });
            let mib: i64 = vms.iter().filter_map(|g| int(&g["mem_mib"])).sum();
            Some(format!(
                "{id}: {} KiB for {} VM(s) with {mib} MiB of tested memory ({t} table pages, {m} free memcache pages)",
                (t + m) * 4,
                vms.len()
            ))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Method notes, the same for both sections.
const METHOD: &str = "\
### Method

- QEMU `virt`, 4 CPUs, TCG; Debian's 6.1 kernel at EL1 under el2 with `s2pin.ko`; one boot.
  Each run is one `s2vmm scale` process (host-driver/vmm/src/scale.rs); after it `s2vmm
  leakcheck` against the baseline saved at boot or by the previous run's check (every host RAM
  frame host-owned and unshared at EL2, no pin, no VM, VmLck and MemFree back, no new bad
  kernel-log line), and at the end the kernel log's Oops/BUG/WARNING/soft-lockup lines.
- Fault-in: the payload's touch mode writes one word per 64 bytes of its tested memory, on as
  many vCPUs as needed (at most 1 GiB each); once every vCPU has reported its first pass the
  vCPUs are stopped and the VM is kept. Guest memory is private anonymous, `MADV_NOHUGEPAGE`
  (anon: 4 KiB pages) or `MADV_HUGEPAGE` (thp), placed so that the tested memory starts on a
  1 GiB boundary in the host. Figures are the change of `S2PIN_GET_STATS` over the fault-in;
  stage-2 table pages is EL2's gauge (`HYP_VM_COUNTERS`) afterwards, per GiB of the whole guest
  RAM (tested memory + 2 MiB for the image).
- Hypercalls are the module's own counts per VM: `calls_share` (HYP_SHARE), `calls_unshare`
  (HYP_UNSHARE and HYP_UNSHARE_RANGE), `calls_wrprotect` (HYP_WRPROTECT), `calls_other`
  (everything else but HYP_VCPU_RUN and HYP_VM_COUNTERS); `n/a` where the module has no such
  counter. Teardown's calls come from debugfs `s2pin/last_teardown` after each VM's close.
- numa: NUMA balancing on (`numa_balancing` 1, `scan_delay_ms` 0, `scan_period_min_ms` =
  `scan_period_max_ms` = 100, `scan_size_mb` above the guest's memory so that one scan pass
  covers all of it), the VM's vCPUs stopped, and a thread of s2vmm spinning in user mode, in
  whose task work the scanner runs, until a protection event covered every pinned page (`kept`
  plus the `unmapped_*` counters reach the pinned count) or 300 s. Linux 6.1 sends one
  `MMU_NOTIFY_PROTECTION_VMA` per PUD (1 GiB) chunk of the scanned range (`change_pmd_range`), so
  the tested memory, 1 GiB-aligned, is one PUD-wide range per GiB. 6.1's scanner skips pinned
  4 KiB pages of private memory but makes a pinned huge PMD PROT_NONE, so confirm on thp unmaps
  (correctly) and only confirm on anon and keep are expected to make 0 calls.
- wrprotect: `mprotect(PROT_READ)` of the tested memory (counted), then back to read-write
  (its calls shown separately). munmap: `munmap` of the tested memory (`MMU_NOTIFY_UNMAP`).
- Limits: a range operation over a contiguous mapped run at most pages/512 + 4 calls; the NUMA
  range 0 calls under confirm (4 KiB pages) and keep.
";

fn section(
    res: &BTreeMap<String, RunResult>,
    large: bool,
    versions: &str,
    hyp: Option<&str>,
    memtotal: Option<&str>,
    wall: Duration,
) -> String {
    let mut s = String::new();
    let cmd = if large {
        "cargo xtask bench scale --large"
    } else {
        "cargo xtask bench scale"
    };
    let _ = writeln!(
        s,
        "## Scale{}: hypercalls and stage-2 tables (`{cmd}`)\n",
        if large { ", the largest run" } else { "" }
    );
    let m = machine(large);
    let _ = writeln!(
        s,
        "Written by `{cmd}` on {} ({} min wall clock): QEMU `virt`, {} CPUs, {} MiB of RAM (MemTotal {} KiB in the host), TCG; {versions}.\n",
        super::today(),
        wall.as_secs().div_ceil(60),
        m.smp,
        m.mem_mib,
        memtotal.unwrap_or("?")
    );
    if let Some(h) = hyp {
        let _ = writeln!(s, "el2 at boot: `{h}`.\n");
    }
    let _ = writeln!(
        s,
        "What must come out (issue 13 item {}):\n",
        if large { 6 } else { 3 }
    );
    for (ok, line) in verdicts(res, large) {
        let tag = match ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "info",
        };
        let _ = writeln!(s, "- {tag} {line}");
    }
    let _ = writeln!(
        s,
        "\nStage-2 table pages per GiB of guest RAM: {}.\n",
        tables_per_gib(res)
    );
    let _ = writeln!(
        s,
        "Memory the host gave el2 for the VMs' stage 2 (beyond el2's own, above), all VMs of a run held at once: {}.\n",
        donated(res)
    );
    let _ = writeln!(s, "Fault-in:\n\n{}", fault_table(res));
    if res
        .values()
        .any(|r| r.json["steps"].as_array().is_some_and(|a| !a.is_empty()))
    {
        let _ = writeln!(s, "Steps on the measured VM:\n\n{}", step_table(res));
    }
    let _ = writeln!(
        s,
        "Teardown (each VM closed in turn):\n\n{}",
        teardown_table(res)
    );
    s.push_str(METHOD);
    s
}

/// The source's commit, `abc1234` or `abc1234 + uncommitted changes`.
fn source_commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(d) if !d.is_empty() => format!("{c} + uncommitted changes"),
            _ => c,
        },
        None => "unknown (not a git checkout)".into(),
    }
}

/// `cargo xtask bench scale [--large] [--from-log]`.
pub fn bench(root: &Path, args: &ScaleArgs) -> Result<()> {
    let large = args.large;
    let tag = if large { "scale-large" } else { "scale" };
    let log = root.join(format!("build/bench-{tag}.log"));
    let meta = root.join(format!("build/bench-{tag}.meta"));
    let t0 = Instant::now();
    let (console, output, versions, wall, commit) = if args.from_log {
        let text = std::fs::read_to_string(&log)
            .with_context(|| format!("{} (run the benchmark first)", log.display()))?;
        let m = std::fs::read_to_string(&meta).unwrap_or_default();
        let mut ml = m.lines();
        let versions = ml.next().unwrap_or("unknown").to_string();
        let wall = ml.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let commit = ml.next().unwrap_or("unknown").to_string();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (
            lines.clone(),
            lines,
            versions,
            Duration::from_secs(wall),
            commit,
        )
    } else {
        let commit = source_commit(root);
        let ing = run::ingredients(root, false)?;
        let versions = crate::versions::with_debian(&ing.debian);
        let extras = run::shim_extras(root, &ing.debian)?;
        let rs = runs(large);
        let timeout = Duration::from_secs(if large { 7200 } else { 3600 });
        progress(&format!(
            "scale bench: booting {} MiB under el2, {} run(s) of s2vmm scale, timeout {} s",
            machine(large).mem_mib,
            rs.len(),
            timeout.as_secs()
        ));
        let p = run::prepare(
            root,
            &ing,
            &machine(large),
            Mode::Exec {
                script: script(&rs),
                quiet: true,
            },
            &extras,
            Console::Captured,
            &run::kernel_cmdline(false, &[]),
        )?;
        // The script's lines as they come (the runs take minutes).
        let r = run::exec_with(&p, timeout, false, true)?;
        let _ = std::fs::write(&log, r.captured.lines.join("\n") + "\n");
        let wall = t0.elapsed();
        let _ = std::fs::write(&meta, format!("{versions}\n{}\n{commit}\n", wall.as_secs()));
        if r.status.is_none() {
            r.finish()?;
        }
        (
            r.captured.lines.clone(),
            r.output.clone(),
            versions,
            wall,
            commit,
        )
    };
    let res = results(&output);
    for r in res.values() {
        for l in &r.lines {
            println!("{l}");
        }
    }
    let body: BTreeMap<String, RunResult> = res
        .iter()
        .filter(|(k, _)| *k != "setup")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if body.values().all(|r| r.json.is_null()) {
        // (the dmesg case has no JSON either)
        bail!(
            "no run of s2vmm scale gave figures; the console is in {}",
            log.display()
        );
    }
    let memtotal = output.iter().find_map(|l| {
        l.trim()
            .strip_prefix("CHECK setup.memtotal_kib=")
            .map(str::to_string)
    });
    let hyp = hyp_memory(&console);
    let vs = verdicts(&body, large);
    for (ok, line) in &vs {
        let tag = match ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "info",
        };
        println!("{tag} {line}");
    }
    if let Some(h) = &hyp {
        println!("el2: {h}");
    }
    println!("stage-2 table pages per GiB: {}", tables_per_gib(&body));
    super::write_section(
        root,
        tag,
        &section(
            &body,
            large,
            &format!("{versions}; source at {commit}"),
            hyp.as_deref(),
            memtotal.as_deref(),
            wall,
        ),
    )?;
    let failed = vs.iter().filter(|(ok, _)| *ok == Some(false)).count();
    if failed > 0 {
        bail!("{failed} limit(s) not met (the section records them)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_and_results() {
        let rs = runs(false);
        assert!(rs
            .iter()
            .any(|r| r.args.contains("1G:anon:confirm") && r.args.contains("munmap")));
        let s = script(&rs);
        assert!(s.contains("== CASE anon-confirm") && s.contains("s2vmm leakcheck --base"));
        let big = runs(true);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].args.matches("--other").count(), 7);
        assert_eq!(machine(true).mem_mib, 16384);
        assert_eq!(limit(262_144), 516);
        assert_eq!(limit(1), 5);
        let out: Vec<String> = [
            "== CASE anon-keep",
            "s2vmm scale: step numa over 262144 pages: hypercalls 0",
            "CHECK anon-keep.status=0",
            "== JSON",
            r#"{"measured": {"mem_mib": 1024, "backing": "anon", "policy": "keep"},"#,
            r#" "steps": [{"step": "numa", "pages": 262144, "calls": 0, "covered": true,"#,
            r#"   "pud_ranges": 1, "delta": {"kept": 262144, "range_start_protection_vma": 3}},"#,
            r#"  {"step": "munmap", "pages": 262144, "calls": 600, "calls_unshare": 600, "delta": {}}],"#,
            r#" "vms": []}"#,
            "== JSON END",
            "leakcheck: OK nothing left",
            "CHECK anon-keep.leak=0",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        let res = results(&out);
        let r = &res["anon-keep"];
        assert_eq!((r.status, r.leak), (Some(0), Some(0)));
        assert_eq!(r.lines.len(), 1);
        let v = verdicts(&res, false);
        assert!(
            v.iter()
                .any(|(ok, l)| *ok == Some(true) && l.contains("NUMA scan")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|(ok, l)| *ok == Some(false) && l.contains("munmap")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|(ok, l)| *ok == Some(true) && l.contains("leakcheck: OK")),
            "{v:?}"
        );
        assert_eq!(
            hyp_memory(&["x hypervisor memory: 80 MiB for 16384 MiB of RAM (heap)".into()]),
            Some("hypervisor memory: 80 MiB for 16384 MiB of RAM (heap)".into())
        );
    }
}
