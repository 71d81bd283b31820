//! `cargo xtask bench numa` (issue 10): stock KVM against the s2pin
//! module's policies under NUMA balancing, on the same machine, kernel,
//! guest payload and VMM, in one invocation.
//!
//! Two boots of QEMU `virt` with 2 NUMA nodes and 4 CPUs (node 0: CPUs 0-1,
//! node 1: CPUs 2-3), NUMA balancing's scan knobs made tight:
//!
//! 1. `--no-hyp`: Debian's kernel at EL2 runs KVM; `s2vmm --device kvm`
//!    (rust-vmm's `kvm-ioctls`); KVM's stage-2 work is counted with kprobes
//!    (`kprobe_profile` hit counts) and the `kvm_unmap_hva_range` tracepoint
//!    (in a trace instance of its own);
//! 2. under el2: `s2vmm --device s2pin` with each policy; the module's
//!    counters (`S2PIN_GET_STATS`, EL2's `HYP_VM_COUNTERS`).
//!
//! Every row is a fresh VM: the payload's touch loop (read and write every
//! 64 bytes of its memory, counting passes) on 2 vCPUs for a fixed time,
//! guest memory bound to node 1 (`--node 1`), the VMM's threads on node 0's
//! CPUs (`taskset -c 0,1`), so NUMA balancing wants to move the memory.
//! The script prints `== CASE <row>` and s2vmm's `--stats` lines;
//! [`crate::suites::shim::sections`] splits them.
//!
//! Output: a table on stdout, `build/bench-numa.csv`, the chart
//! `docs/numa-bench.svg` (plotters' SVG backend) and a section of
//! `docs/PERFORMANCE.md` (`bench:numa` markers).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::initramfs::{Extra, Mode};
use crate::qemu::{Console, Machine};
use crate::run::{self, Ingredients};
use crate::suites::shim::{sections, Section};
use crate::util::progress;

/// Where the chart goes (relative to the workspace root).
const CHART: &str = "docs/numa-bench.svg";
/// Where the CSV goes.
const CSV: &str = "build/bench-numa.csv";

/// The hypervisor of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hyp {
    /// Stock KVM (`--no-hyp` boot, `/dev/kvm`).
    Kvm,
    /// el2 and `s2pin.ko` with this policy.
    S2pin(&'static str),
}

/// One row: a fresh VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The hypervisor (and policy).
    pub hyp: Hyp,
    /// `anon`, `thp` or `memfd`.
    pub backing: &'static str,
    /// NUMA balancing on.
    pub balancing: bool,
    /// 1, or 2 for the second run of a balancing-off row.
    pub run: u8,
}

impl Row {
    /// A unique case name.
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}_{}_{}", self.kind(), self.backing, self.run)
    }

    /// `kvm`, `eager`, `confirm`, `keep`, `kvm-off`, `off`.
    #[must_use]
    pub fn kind(&self) -> String {
        match (self.hyp, self.balancing) {
            (Hyp::Kvm, true) => "kvm".into(),
            (Hyp::Kvm, false) => "kvm-off".into(),
            (Hyp::S2pin(p), true) => p.into(),
            (Hyp::S2pin(_), false) => "off".into(),
        }
    }

    /// The row's label in the table.
    #[must_use]
    pub fn label(&self) -> String {
        let what = match (self.hyp, self.balancing) {
            (Hyp::Kvm, true) => "stock KVM".to_string(),
            (Hyp::Kvm, false) => "stock KVM, balancing off".to_string(),
            (Hyp::S2pin(p), true) => p.to_string(),
            (Hyp::S2pin(_), false) => "balancing off (confirm)".to_string(),
        };
        if self.run > 1 {
            format!("{what}, run {}", self.run)
        } else {
            what
        }
    }
}

/// The rows of a full run (`quick`: anonymous 4K memory only).
#[must_use]
pub fn rows(quick: bool) -> Vec<Row> {
    let backings: &[&'static str] = if quick {
        &["anon"]
    } else {
        &["anon", "thp", "memfd"]
    };
    let mut v = Vec::new();
    for &backing in backings {
        let r = |hyp, balancing, run| Row {
            hyp,
            backing,
            balancing,
            run,
        };
        v.push(r(Hyp::Kvm, true, 1));
        v.push(r(Hyp::Kvm, false, 1));
        for p in ["eager", "confirm", "keep"] {
            v.push(r(Hyp::S2pin(p), true, 1));
        }
        v.push(r(Hyp::S2pin("confirm"), false, 1));
        v.push(r(Hyp::S2pin("confirm"), false, 2));
    }
    v
}

/// What one invocation measures.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The rows.
    pub rows: Vec<Row>,
    /// Guest seconds per row.
    pub seconds: u64,
    /// MiB of tested memory per row (split between the 2 vCPUs).
    pub mem_mib: u64,
    /// Whether to measure teardown of a 1 GiB guest.
    pub teardown: bool,
    /// Re-render from the console logs of the last run instead of booting.
    pub from_logs: bool,
}

const TRACE: &str = "/sys/kernel/tracing";

fn knobs() -> String {
    "cd /sys/kernel/debug/sched/numa_balancing && echo 0 > scan_delay_ms && echo 100 > scan_period_min_ms \
     && echo 100 > scan_period_max_ms && echo 256 > scan_size_mb; echo \"CHECK setup.knobs=$?\"; cd /root\n"
        .to_string()
}

fn s2vmm_cmd(row: &Row, plan: &Plan) -> String {
    let (device, policy) = match row.hyp {
        Hyp::Kvm => ("kvm", "confirm"),
        Hyp::S2pin(p) => ("s2pin", p),
    };
    format!(
        "taskset -c 0,1 s2vmm --device {device} --policy {policy} --backing {} --node 1 --place --mode touch --vcpus 2 \
         --mem {}M --reports 0 --seconds {} --passes-log2 0 --stats",
        row.backing,
        (plan.mem_mib / 2).max(1),
        plan.seconds,
    )
}

/// A row: its markers, the balancing switch, s2vmm (its output without
/// the per-pass lines but with the last one of each vCPU) and its status.
fn row_lines(row: &Row, plan: &Plan) -> String {
    format!(
        "echo '== CASE {id}'\necho '== ROW {id} {secs}'\necho {b} > /proc/sys/kernel/numa_balancing\n\
         {cmd} > /tmp/row.out 2>&1; rc=$?\n\
         grep -v '^guest: .*passes' /tmp/row.out\n\
         grep '^guest: passes' /tmp/row.out | tail -1; grep '^guest: vcpu1 passes' /tmp/row.out | tail -1\n\
         echo \"CHECK {id}.rc=$rc\"\n",
        id = row.id(),
        secs = plan.seconds,
        b = u8::from(row.balancing),
        cmd = s2vmm_cmd(row, plan),
    )
}

/// Tracing set-up of a boot: tracefs, a trace instance of our own (the
/// top-level buffer stays off, so the counting kprobes only count).
fn trace_setup() -> String {
    format!(
        "mount -t tracefs none {TRACE} 2>/dev/null; echo 0 > {TRACE}/tracing_on\n\
         mkdir -p {TRACE}/instances/s2b; echo 8192 > {TRACE}/instances/s2b/buffer_size_kb\n"
    )
}

/// Before a row: the probes. Every row: a kretprobe on `change_prot_numa`
/// (PTEs NUMA balancing made PROT_NONE, filtered to s2vmm's threads, whose
/// mm it scans), into the instance. KVM rows: counting kprobes on KVM's
/// unmap, TLB invalidation and stage-2 map functions, and the
/// `kvm_unmap_hva_range` tracepoint into the instance.
fn probes_on(kvm: bool) -> String {
    let mut p = String::from("'r:s2b_cpn change_prot_numa ret=$retval:s64'");
    if kvm {
        p.push_str(
            " 'p:s2b_unmap_gfn kvm_unmap_gfn_range' 'p:s2b_tlbi_ipa __kvm_tlb_flush_vmid_ipa' \
             'p:s2b_tlbi_vmid __kvm_tlb_flush_vmid' 'p:s2b_s2_map kvm_pgtable_stage2_map'",
        );
    }
    let mut s = format!(
        "echo 0 > {TRACE}/events/kprobes/enable 2>/dev/null; echo 0 > {TRACE}/instances/s2b/events/kprobes/enable 2>/dev/null\n\
         echo > {TRACE}/kprobe_events\n\
         for p in {p}; do echo \"$p\" >> {TRACE}/kprobe_events; done\n\
         echo 'comm == \"s2vmm\"' > {TRACE}/instances/s2b/events/kprobes/s2b_cpn/filter\n\
         echo > {TRACE}/instances/s2b/trace\n\
         echo 1 > {TRACE}/instances/s2b/events/kprobes/s2b_cpn/enable\n"
    );
    if kvm {
        let _ = write!(
            s,
            "for e in s2b_unmap_gfn s2b_tlbi_ipa s2b_tlbi_vmid s2b_s2_map; do echo 1 > {TRACE}/events/kprobes/$e/enable; done\n\
             echo 1 > {TRACE}/instances/s2b/events/kvm/kvm_unmap_hva_range/enable\n"
        );
    }
    s
}

/// After a row: the counts as `  <name> <value>` lines.
fn probes_off(kvm: bool) -> String {
    let mut s = format!(
        "echo 0 > {TRACE}/instances/s2b/events/kprobes/s2b_cpn/enable\n\
         echo \"  s2b_probe_cpn $(grep -c s2b_cpn {TRACE}/kprobe_events)\"\n\
         o=0; for v in $(grep -h overrun {TRACE}/instances/s2b/per_cpu/cpu*/stats | tr -dc '0-9 \\n'); do o=$((o+v)); done; echo \"  trace_overrun $o\"\n\
         p=0; for v in $(grep ' s2b_cpn:' {TRACE}/instances/s2b/trace | sed 's/.*ret=//'); do p=$((p+v)); done; echo \"  s2vmm_pte_updates $p\"\n"
    );
    if kvm {
        let _ = write!(
            s,
            "echo 0 > {TRACE}/instances/s2b/events/kvm/kvm_unmap_hva_range/enable; echo 0 > {TRACE}/events/kprobes/enable\n\
             while read -r name hits miss; do echo \"  kprobe_$name $hits\"; done < {TRACE}/kprobe_profile\n\
             hva=$(sed -n 's/^s2vmm: guest memory at host address //p' /tmp/row.out); lo=$((${{hva%+*}})); hi=$((lo + ${{hva#*+}}))\n\
             grep kvm_unmap_hva_range {TRACE}/instances/s2b/trace | sed 's/.*range: *//; s/ *-- */ /' | \
             {{ n=0; p=0; while read -r a b; do a=$((a)); b=$((b)); [ $a -lt $lo ] && a=$lo; [ $b -gt $hi ] && b=$hi; \
             if [ $b -gt $a ]; then n=$((n+1)); p=$((p + (b - a) / 4096)); fi; done; \
             echo \"  kvm_unmap_ranges $n\"; echo \"  kvm_unmap_range_pages $p\"; }}\n"
        );
    }
    s
}

/// The script of the `--no-hyp` boot (the KVM rows).
#[must_use]
pub fn kvm_script(plan: &Plan) -> String {
    let mut s = String::from("echo '== CASE setup'\n");
    s.push_str("echo \"CHECK setup.kvm=$(ls /dev/kvm)\"\n");
    s.push_str(&trace_setup());
    s.push_str(&knobs());
    for row in plan.rows.iter().filter(|r| r.hyp == Hyp::Kvm) {
        s.push_str(&probes_on(true));
        s.push_str(&row_lines(row, plan));
        s.push_str(&probes_off(true));
    }
    s.push_str(&dmesg_check());
    s
}

/// The script of the el2 boot (the s2pin rows, then the teardown).
#[must_use]
pub fn el2_script(plan: &Plan) -> String {
    let mut s = String::from(
        "echo '== CASE setup'\ninsmod /root/s2pin.ko; echo \"CHECK setup.insmod=$?\"\n",
    );
    s.push_str(&trace_setup());
    s.push_str(&knobs());
    for row in plan.rows.iter().filter(|r| r.hyp != Hyp::Kvm) {
        s.push_str(&probes_on(false));
        s.push_str(&row_lines(row, plan));
        s.push_str(&probes_off(false));
    }
    if plan.teardown {
        s.push_str(
            "echo '== CASE teardown'\necho '== ROW teardown 0'\n\
             echo 0 > /proc/sys/kernel/numa_balancing\n\
             s2vmm --mode touch --mem 1024M --reports 0 --seconds 1200 --passes-log2 0 > /tmp/td.out 2>&1 &\n\
             pid=$!\n\
             n=0; while ! grep -q '^guest: passes 1' /tmp/td.out && [ $n -lt 900 ]; do sleep 1; n=$((n+1)); done\n\
             echo \"CHECK teardown.waited=$n\"\n\
             echo \"CHECK teardown.pinned_live=$(cat /sys/kernel/debug/s2pin/pinned)\"\n\
             kill -9 $pid; wait $pid\n\
             n=0; while [ \"$(cat /sys/kernel/debug/s2pin/vms)\" != 0 ] && [ $n -lt 60 ]; do sleep 1; n=$((n+1)); done\n\
             echo \"CHECK teardown.line=$(sed 's/.*teardown: //' /sys/kernel/debug/s2pin/last_teardown)\"\n\
             echo \"CHECK teardown.pinned=$(cat /sys/kernel/debug/s2pin/pinned)\"\n",
        );
    }
    s.push_str(&dmesg_check());
    s
}

fn dmesg_check() -> String {
    "echo '== CASE dmesg'\n\
     echo \"CHECK dmesg.bad=$(dmesg | grep -cE 'Oops|BUG:|WARNING:|Unable to handle|Call trace|soft lockup|hung_task')\"\n"
        .to_string()
}

/// One row's figures (totals over the row's guest time).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Guest seconds (s2vmm's clock).
    pub seconds: f64,
    /// Touch passes of both vCPUs.
    pub passes: i64,
    /// `range_start` calls by event (UNMAP, CLEAR, PROTECTION_VMA,
    /// PROTECTION_PAGE, SOFT_DIRTY, RELEASE, MIGRATE, EXCLUSIVE); for KVM
    /// only the total (in slot 0 of `range_total`).
    pub range_start: [i64; 8],
    /// All `range_start` calls.
    pub range_total: i64,
    /// Pages unmapped at stage 2 (KVM: pages of the unmapped ranges).
    pub unmapped: i64,
    /// TLB invalidation operations.
    pub tlbi: i64,
    /// Stage-2 memory faults served (KVM: `kvm_pgtable_stage2_map` calls).
    pub faults: i64,
    /// Pins.
    pub pins: i64,
    /// Unpins.
    pub unpins: i64,
    /// Pinned pages covered by a protection event that stayed mapped.
    pub kept: i64,
    /// Pages unmapped at range_start for a protection event (eager).
    pub unmapped_eager: i64,
    /// Pages unmapped because their PTE was found PROT_NONE (confirm, keep).
    pub unmapped_protnone: i64,
    /// PTEs (pages) NUMA balancing made PROT_NONE in s2vmm's mm
    /// (`change_prot_numa`'s return values).
    pub s2vmm_pte_updates: i64,
    /// vmstat deltas.
    pub pte_updates: i64,
    /// vmstat.
    pub hint_faults: i64,
    /// vmstat.
    pub migrated: i64,
    /// Pages unmapped for a protection event beyond the pages the kernel
    /// made PROT_NONE (a lower bound on unmaps of pages whose PTE never
    /// became PROT_NONE).
    pub spurious: i64,
    /// The case ran to its end (status 0).
    pub ok: bool,
}

const EVENTS: [&str; 8] = [
    "unmap",
    "clear",
    "protection_vma",
    "protection_page",
    "soft_dirty",
    "release",
    "migrate",
    "exclusive",
];

fn last_number(lines: &[String], prefix: &str) -> i64 {
    lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

fn seconds(lines: &[String]) -> f64 {
    lines
        .iter()
        .filter(|l| l.starts_with("s2vmm: the guest "))
        .filter_map(|l| {
            let (_, rest) = l.split_once(" after ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .next_back()
        .unwrap_or(0.0)
}

/// The figures of one row from its section.
#[must_use]
pub fn measure(row: &Row, s: &Section) -> Measured {
    let st = |k: &str| s.stats.get(k).copied().unwrap_or(0);
    let mut m = Measured {
        seconds: seconds(&s.lines),
        passes: last_number(&s.lines, "guest: passes ")
            + last_number(&s.lines, "guest: vcpu1 passes "),
        pte_updates: st("vmstat_numa_pte_updates"),
        s2vmm_pte_updates: st("s2vmm_pte_updates"),
        hint_faults: st("vmstat_numa_hint_faults"),
        migrated: st("vmstat_numa_pages_migrated"),
        ok: s.checks.get("rc").map(String::as_str) == Some("0") && st("s2b_probe_cpn") == 1,
        ..Measured::default()
    };
    match row.hyp {
        Hyp::Kvm => {
            m.range_total = st("kvm_unmap_ranges");
            m.unmapped = st("kvm_unmap_range_pages");
            m.tlbi = st("kprobe_s2b_tlbi_ipa") + st("kprobe_s2b_tlbi_vmid");
            m.faults = st("kprobe_s2b_s2_map");
        }
        Hyp::S2pin(_) => {
            for (i, e) in EVENTS.iter().enumerate() {
                if let Some(slot) = m.range_start.get_mut(i) {
                    *slot = st(&format!("range_start_{e}"));
                }
            }
            m.range_total = m.range_start.iter().sum();
            m.unmapped = st("el2_s2_unmaps");
            m.tlbi = st("el2_s2_tlbi");
            m.faults = st("faults");
            m.pins = st("pins");
            m.unpins = st("unpins");
            m.kept = st("kept");
            m.unmapped_eager = st("unmapped_eager");
            m.unmapped_protnone = st("unmapped_protnone");
        }
    }
    let protection_unmaps = match row.hyp {
        Hyp::Kvm => m.unmapped,
        Hyp::S2pin(_) => m.unmapped_eager + m.unmapped_protnone,
    };
    m.spurious = (protection_unmaps - m.s2vmm_pte_updates.max(0)).max(0);
    m
}

fn per_min(v: i64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    let x = v as f64 * 60.0 / secs;
    if x == 0.0 {
        "0".into()
    } else if x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn rate(v: i64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        v as f64 * 60.0 / secs
    }
}

/// Eager's spurious unmaps, from the confirm row of the same backing.
///
/// Eager unpins a page at `range_start`, before the kernel's walk decides
/// whether to make its PTE PROT_NONE, and an unpinned page is one the walk
/// does change: so eager's own row cannot tell which of its unmaps were
/// needed. The confirm row of the same backing can: it keeps the pins and
/// unmaps exactly the pages whose PTE did become PROT_NONE. Eager's
/// spurious unmaps are then its protection unmaps beyond confirm's
/// PROT_NONE unmaps (per guest second, times eager's seconds).
pub fn eager_spurious(rows: &mut [(Row, Measured)]) {
    let confirm: Vec<(&'static str, f64)> = rows
        .iter()
        .filter(|(r, _)| r.hyp == Hyp::S2pin("confirm") && r.balancing)
        .map(|(r, m)| {
            let per_s = if m.seconds > 0.0 {
                m.unmapped_protnone as f64 / m.seconds
            } else {
                0.0
            };
            (r.backing, per_s)
        })
        .collect();
    for (r, m) in rows.iter_mut() {
        if r.hyp != Hyp::S2pin("eager") || !r.balancing {
            continue;
        }
        if let Some((_, per_s)) = confirm.iter().find(|(b, _)| *b == r.backing) {
            let needed = (per_s * m.seconds).round() as i64;
            m.spurious = (m.unmapped_eager - needed).max(0);
        }
    }
}

/// Throughput of `i` as a ratio to the balancing-off row (run 1) of the
/// same hypervisor and backing.
fn ratio(rows: &[(Row, Measured)], i: usize) -> Option<f64> {
    let (row, m) = rows.get(i)?;
    let base = rows.iter().find(|(r, _)| {
        r.backing == row.backing
            && !r.balancing
            && r.run == 1
            && matches!(
                (r.hyp, row.hyp),
                (Hyp::Kvm, Hyp::Kvm) | (Hyp::S2pin(_), Hyp::S2pin(_))
            )
    })?;
    let b = rate(base.1.passes, base.1.seconds);
    (b > 0.0).then(|| rate(m.passes, m.seconds) / b)
}

/// The table (Markdown), per minute of guest time.
#[must_use]
pub fn table(rows: &[(Row, Measured)]) -> String {
    let mut t = String::from(
        "| backing | row | range_start (unmap/clear/prot_vma/prot_page/migrate) | pages unmapped | TLB invalidations | stage-2 faults | pins / unpins | kept | PTEs made PROT_NONE in s2vmm | numa_pte_updates (vmstat) | numa_hint_faults | numa_pages_migrated | spurious unmaps (total) | passes/min | throughput vs off |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, (row, m)) in rows.iter().enumerate() {
        let s = m.seconds;
        let rs = match row.hyp {
            Hyp::Kvm => format!("{} (all events)", per_min(m.range_total, s)),
            Hyp::S2pin(_) => [0usize, 1, 2, 3, 6]
                .iter()
                .map(|&k| per_min(m.range_start.get(k).copied().unwrap_or(0), s))
                .collect::<Vec<_>>()
                .join("/"),
        };
        let pins = match row.hyp {
            Hyp::Kvm => "- (no pins)".to_string(),
            Hyp::S2pin(_) => format!("{} / {}", per_min(m.pins, s), per_min(m.unpins, s)),
        };
        let kept = match row.hyp {
            Hyp::Kvm => "-".to_string(),
            Hyp::S2pin(_) => per_min(m.kept, s),
        };
        let r = ratio(rows, i).map_or("-".into(), |r| format!("{r:.2}"));
        let _ = writeln!(
            t,
            "| {} | {}{} | {rs} | {} | {} | {} | {pins} | {kept} | {} | {} | {} | {} | {} | {} | {r} |",
            row.backing,
            row.label(),
            if m.ok { "" } else { " (FAILED)" },
            per_min(m.unmapped, s),
            per_min(m.tlbi, s),
            per_min(m.faults, s),
            per_min(m.s2vmm_pte_updates, s),
            per_min(m.pte_updates, s),
            per_min(m.hint_faults, s),
            per_min(m.migrated, s),
            if row.hyp == Hyp::Kvm {
                "-".to_string()
            } else {
                m.spurious.to_string()
            },
            per_min(m.passes, s),
        );
    }
    t
}

/// The raw totals as CSV.
#[must_use]
pub fn csv(rows: &[(Row, Measured)]) -> String {
    let mut c = String::from("backing,row,run,seconds,passes");
    for e in EVENTS {
        let _ = write!(c, ",range_start_{e}");
    }
    c.push_str(",range_start_total,pages_unmapped,tlb_invalidations,stage2_faults,pins,unpins,kept,s2vmm_pte_updates,numa_pte_updates,numa_hint_faults,numa_pages_migrated,spurious_unmaps,status_ok\n");
    for (row, m) in rows {
        let _ = write!(
            c,
            "{},{},{},{:.1},{}",
            row.backing,
            row.kind(),
            row.run,
            m.seconds,
            m.passes
        );
        for v in m.range_start {
            let _ = write!(c, ",{v}");
        }
        let _ = writeln!(
            c,
            ",{},{},{},{},{},{},{},{},{},{},{},{},{}",
            m.range_total,
            m.unmapped,
            m.tlbi,
            m.faults,
            m.pins,
            m.unpins,
            m.kept,
            m.s2vmm_pte_updates,
            m.pte_updates,
            m.hint_faults,
            m.migrated,
            m.spurious,
            m.ok
        );
    }
    c
}

/// The chart: pages unmapped and TLB invalidations per minute, one bar
/// pair per row with balancing on, on a log scale (`1 +` the rate, so a
/// row with none shows as an empty bar).
pub fn chart(rows: &[(Row, Measured)], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let on: Vec<&(Row, Measured)> = rows.iter().filter(|(r, _)| r.balancing).collect();
    let n = on.len().max(1);
    let max = on
        .iter()
        .flat_map(|(_, m)| [rate(m.unmapped, m.seconds), rate(m.tlbi, m.seconds)])
        .fold(10.0f64, f64::max);
    let e = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "NUMA balancing over guest memory: stage-2 unmaps and TLB invalidations per guest minute",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (1f64..max * 3.0).log_scale())
        .map_err(e)?;
    let labels: Vec<String> = on
        .iter()
        .map(|(r, _)| format!("{} {}", r.kind(), r.backing))
        .collect();
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 10).into_font())
        .y_desc("per guest minute (1 + count, log scale)")
        .draw()
        .map_err(e)?;
    let series = [
        ("pages unmapped at stage 2", RGBColor(200, 60, 40), -0.38),
        ("TLB invalidations", RGBColor(40, 90, 180), 0.02),
    ];
    for (k, (name, color, off)) in series.iter().enumerate() {
        let bars = on.iter().enumerate().map(|(i, (_, m))| {
            let v = if k == 0 { m.unmapped } else { m.tlbi };
            let x0 = i as f64 + off;
            Rectangle::new(
                [(x0, 1.0), (x0 + 0.36, 1.0 + rate(v, m.seconds))],
                color.filled(),
            )
        });
        let c = *color;
        ch.draw_series(bars)
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The teardown figures from the el2 boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    /// Pages pinned while the 1 GiB guest ran.
    pub pinned_live: i64,
    /// The module's teardown figures (debugfs `last_teardown`).
    pub line: String,
    /// Pinned pages after the kill.
    pub pinned_after: i64,
}

fn teardown(all: &BTreeMap<String, Section>) -> Option<Teardown> {
    let t = all.get("teardown")?;
    let num = |k: &str| {
        t.checks
            .get(k)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1)
    };
    Some(Teardown {
        pinned_live: num("pinned_live"),
        line: t.checks.get("line").cloned().unwrap_or_default(),
        pinned_after: num("pinned"),
    })
}

/// What the issue says must come out, checked on the measured rows.
#[must_use]
pub fn verdicts(rows: &[(Row, Measured)]) -> Vec<(String, bool)> {
    let mut v = Vec::new();
    for (row, m) in rows {
        let b = row.backing;
        if let (Hyp::S2pin(p @ ("confirm" | "keep")), true) = (row.hyp, row.balancing) {
            v.push((
                format!("{p}, {b}: 0 spurious unmaps (got {})", m.spurious),
                m.ok && m.spurious == 0,
            ));
        }
        if row.hyp == Hyp::S2pin("keep") && row.balancing {
            v.push((
                format!(
                    "keep, {b}: 0 pages unmapped under NUMA balancing (got {})",
                    m.unmapped
                ),
                m.ok && m.unmapped == 0,
            ));
        }
        if row.hyp == Hyp::S2pin("eager") && row.balancing {
            let kvm = rows
                .iter()
                .find(|(r, _)| r.hyp == Hyp::Kvm && r.balancing && r.backing == b);
            if let Some((_, k)) = kvm {
                let (eu, ku) = (rate(m.unmapped, m.seconds), rate(k.unmapped, k.seconds));
                let (et, kt) = (rate(m.tlbi, m.seconds), rate(k.tlbi, k.seconds));
                let same = |a: f64, b: f64| a > 0.0 && b > 0.0 && a / b < 10.0 && b / a < 10.0;
                v.push((
                    format!(
                        "eager, {b}: the same order of magnitude as stock KVM (unmaps/min {eu:.0} vs {ku:.0}, TLBIs/min {et:.0} vs {kt:.0})"
                    ),
                    m.ok && k.ok && same(eu, ku) && same(et, kt),
                ));
            }
        }
    }
    v
}

fn doc_section(
    plan: &Plan,
    rows: &[(Row, Measured)],
    td: Option<&Teardown>,
    wall: Duration,
    versions: &str,
) -> String {
    let mut d = String::new();
    let _ = writeln!(
        d,
        "## NUMA balancing: stock KVM, eager, confirm, keep (`cargo xtask bench numa`)\n\n\
         Written by `cargo xtask bench numa --minutes {} --mem {}M{}` ({} rows, {:.0} min wall clock). \
         Every figure is a count from this one invocation, divided by the row's guest minutes \
         (s2vmm's clock); raw totals: `{CSV}`. Versions: {versions}.\n",
        plan.seconds as f64 / 60.0,
        plan.mem_mib,
        if plan.teardown { "" } else { " (no teardown)" },
        rows.len(),
        wall.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        d,
        "![unmaps and TLB invalidations per minute](numa-bench.svg)\n"
    );
    d.push_str(&table(rows));
    d.push('\n');
    d.push_str("What must come out (issue 10):\n\n");
    for (what, ok) in verdicts(rows) {
        let _ = writeln!(d, "- {} {what}", if ok { "PASS" } else { "FAIL" });
    }
    // The noise of the wall-clock ratio: the two balancing-off runs.
    for b in ["anon", "thp", "memfd"] {
        let offs: Vec<&Measured> = rows
            .iter()
            .filter(|(r, _)| r.backing == b && !r.balancing && matches!(r.hyp, Hyp::S2pin(_)))
            .map(|(_, m)| m)
            .collect();
        if let [a, c] = offs.as_slice() {
            let (x, y) = (rate(a.passes, a.seconds), rate(c.passes, c.seconds));
            if x > 0.0 {
                let _ = writeln!(
                    d,
                    "- noise, {b}: the two balancing-off runs differ by {:.0}% in passes/min ({x:.1} vs {y:.1}); throughput ratios closer to 1 than that say nothing",
                    (y - x).abs() / x * 100.0
                );
            }
        }
    }
    if let Some(t) = td {
        let _ = writeln!(
            d,
            "\nTeardown of a 1 GiB guest, fully faulted in (one touch pass), then `kill -9`: {} pages pinned while it ran; \
             the module's report: {}; pages pinned afterwards: {}. A per-page reclaim would need 262,144 calls.\n",
            t.pinned_live,
            if t.line.is_empty() { "(missing)" } else { &t.line },
            t.pinned_after
        );
    }
    d.push_str(METHOD);
    d
}

const METHOD: &str = "
### Method

- QEMU `virt`, 4 CPUs, 2 NUMA nodes (CPUs 0-1 and 1 GiB on node 0, CPUs 2-3 and 1 GiB on node 1),
  TCG. Debian's 6.1 kernel: for the stock-KVM rows booted at EL2 (`--no-hyp`, KVM in VHE mode),
  for the others at EL1 under el2 with `s2pin.ko`. The same `s2vmm` runs the same guest payload
  on both (`--device kvm` uses rust-vmm's `kvm-ioctls`; the payload's argument bit 4 puts its
  console on the emulated UART and powers off by PSCI).
- NUMA balancing on (`/proc/sys/kernel/numa_balancing` = 1) with the same scan knobs for every
  row: `scan_delay_ms` 0, `scan_period_min_ms` = `scan_period_max_ms` = 100, `scan_size_mb` 256.
  Balancing-off rows write 0 there.
- Each row is a fresh VM: 2 vCPUs touching (read and write) every 64th byte of their half of the
  tested memory in a loop; guest memory allocated on node 1 before the guest runs (`s2vmm --node 1
  --place`: `mbind(MPOL_BIND)`, `MADV_POPULATE_WRITE`, then `MPOL_DEFAULT` again, because 6.1's
  scanner skips a VMA with a bind policy unless it has `MPOL_F_NUMA_BALANCING`; the memfd keeps
  `MPOL_BIND | MPOL_F_NUMA_BALANCING`, without which 6.1 does not scan shared memory at all, so
  its pages may not move to node 0), the VMM's threads on node 0's CPUs (`taskset -c 0,1`), so
  balancing wants to move the memory to node 0.
- s2pin rows: the module's counters for the VM (`S2PIN_GET_STATS`): `range_start` calls by event,
  pages unmapped = EL2's stage-2 unmap count, TLB invalidations = EL2's TLBI count for the VMID,
  stage-2 faults = faults the module served (pin + share), pins, unpins, `kept` (pinned pages a
  protection event covered that stayed mapped).
- Stock-KVM rows: kprobe hit counts (`kprobe_profile`) on `__kvm_tlb_flush_vmid_ipa` +
  `__kvm_tlb_flush_vmid` (TLB invalidations) and `kvm_pgtable_stage2_map` (stage-2 faults
  served); the `kvm_unmap_hva_range` tracepoint in a trace instance of its own gives every
  `invalidate_range_start` KVM sees (all events; the tracepoint has no event type) and the size
  of its range: pages unmapped = the pages of those ranges (an upper bound: KVM unmaps the
  mapped pages of each range; with the guest touching all of its memory nearly all are mapped).
- PTEs made PROT_NONE in s2vmm: the sum of `change_prot_numa()`'s return values (a kretprobe
  filtered to s2vmm's threads, in whose context NUMA balancing scans their mm): the pages the
  kernel really made PROT_NONE in the VMM's memory.
- vmstat: the change of `numa_pte_updates`, `numa_hint_faults`, `numa_pages_migrated` over the
  row (system-wide: every process is scanned, the shell and tools too, so `numa_pte_updates`
  runs well above the VMM's own count).
- Spurious unmaps (pages unmapped whose host PTE never became PROT_NONE), a lower bound:
  confirm and keep: their PROT_NONE unmaps (plus any protection-event unmap at `range_start`,
  which they never make) minus the PTEs the kernel made PROT_NONE in s2vmm's memory (the
  kretprobe), floored at 0. Eager: its own row cannot tell, because eager unpins at
  `range_start`, before the kernel's walk, and an unpinned private page is one 6.1's walk then
  does make PROT_NONE (a pinned one it skips); so eager's count is its protection unmaps
  beyond the confirm row's PROT_NONE unmaps of the same backing (per guest second). Stock
  KVM: not shown (`-`): its range pages include pages KVM had not mapped at the time, so
  range pages minus the kretprobe's PTEs (in the CSV) is no lower bound.
- Throughput: touch passes per guest minute, as a ratio to the balancing-off row of the same
  backing and hypervisor. TCG makes wall-clock time noisy; the balancing-off row under el2 runs
  twice and the difference is stated above.
";

/// The suites' machine with two NUMA nodes (CPUs 0-1 and 2-3).
fn machine() -> Machine {
    Machine {
        numa_nodes: 2,
        ..Machine::default()
    }
}

/// Progress over both boots.
#[derive(Debug)]
struct Progress {
    /// Estimated seconds of rows left.
    left: u64,
    /// Rows in all.
    total: usize,
    /// Rows started.
    done: usize,
}

/// One boot running `script`, printing a progress line per row.
fn boot_rows(
    root: &Path,
    ing: &Ingredients,
    extras: &[Extra],
    script: &str,
    timeout: Duration,
    pr: &mut Progress,
) -> Result<Vec<String>> {
    let p = run::prepare(
        root,
        ing,
        &machine(),
        Mode::Exec {
            script: script.to_string(),
            quiet: true,
        },
        extras,
        Console::Captured,
        &run::kernel_cmdline(false, &[]),
    )?;
    let mut watch = |line: &str, _at: Duration, _: &mut dyn std::io::Write| {
        if let Some(rest) = line.trim().strip_prefix("== ROW ") {
            let mut w = rest.split_whitespace();
            let id = w.next().unwrap_or("?");
            let secs: u64 = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            pr.done += 1;
            progress(&format!(
                "numa bench: row {}/{} {id} ({secs} s of guest time; about {} min of rows left)",
                pr.done,
                pr.total,
                pr.left.div_ceil(60)
            ));
            pr.left = pr.left.saturating_sub(secs + 15);
        }
    };
    let cap = p.launch.run_captured(timeout, &mut watch)?;
    if cap.timed_out {
        progress(&format!(
            "numa bench: warning: the boot timed out after {} s; the rows it finished are kept",
            timeout.as_secs()
        ));
    }
    Ok(cap.lines)
}

/// Keeps a boot's console in `build/bench-numa-<tag>.log`.
fn save_log(root: &Path, tag: &str, lines: &[String]) {
    let path = root.join(format!("build/bench-numa-{tag}.log"));
    if let Err(e) = std::fs::write(&path, lines.join("\n") + "\n") {
        progress(&format!("numa bench: {}: {e}", path.display()));
    }
}

/// The rows' figures, the teardown figures and every section, by boot.
pub type Results = (
    Vec<(Row, Measured)>,
    Option<Teardown>,
    BTreeMap<String, Section>,
    String,
);

/// Measures `plan`: the KVM boot (if it has KVM rows), then the el2 boot.
pub fn measure_plan(root: &Path, plan: &Plan) -> Result<Results> {
    let with_kvm = plan.rows.iter().any(|r| r.hyp == Hyp::Kvm);
    let with_el2 = plan.rows.iter().any(|r| r.hyp != Hyp::Kvm) || plan.teardown;
    let per_row = plan.seconds + 15;
    let mut pr = Progress {
        left: per_row * plan.rows.len() as u64 + if plan.teardown { 240 } else { 0 },
        total: plan.rows.len() + usize::from(plan.teardown),
        done: 0,
    };
    let mut all: BTreeMap<String, Section> = BTreeMap::new();
    let versions_file = root.join("build/bench-numa-versions.txt");
    let mut versions = String::new();
    if plan.from_logs {
        versions = std::fs::read_to_string(&versions_file)
            .unwrap_or_else(|_| "unknown (no build/bench-numa-versions.txt)".into())
            .trim()
            .to_string();
        for tag in ["kvm", "el2"] {
            let path = root.join(format!("build/bench-numa-{tag}.log"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{} (run the benchmark first)", path.display()))?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            for (k, v) in sections(&lines) {
                all.insert(format!("{tag}:{k}"), v);
            }
        }
    }
    // The KVM boot (the kernel at EL2), then the el2 boot.
    for kvm in [true, false] {
        if plan.from_logs || !(if kvm { with_kvm } else { with_el2 }) {
            continue;
        }
        let ing = run::ingredients(root, kvm)?;
        versions = crate::versions::with_debian(&ing.debian);
        let extras = run::shim_extras(root, &ing.debian)?;
        let n = plan
            .rows
            .iter()
            .filter(|r| (r.hyp == Hyp::Kvm) == kvm)
            .count() as u64;
        let teardown = plan.teardown && !kvm;
        let timeout =
            Duration::from_secs(240 + n * (plan.seconds + 60) + if teardown { 1500 } else { 0 });
        let (tag, what, script) = if kvm {
            ("kvm", "at EL2 (stock KVM)", kvm_script(plan))
        } else {
            ("el2", "under el2 (s2pin.ko)", el2_script(plan))
        };
        progress(&format!(
            "numa bench: booting the kernel {what}, {n} rows{}, timeout {} s",
            if teardown {
                " and the 1 GiB teardown"
            } else {
                ""
            },
            timeout.as_secs()
        ));
        let lines = boot_rows(root, &ing, &extras, &script, timeout, &mut pr)?;
        save_log(root, tag, &lines);
        for (k, v) in sections(&lines) {
            all.insert(format!("{tag}:{k}"), v);
        }
    }
    let empty = Section::default();
    let mut measured: Vec<(Row, Measured)> = plan
        .rows
        .iter()
        .map(|r| {
            let key = match r.hyp {
                Hyp::Kvm => format!("kvm:{}", r.id()),
                Hyp::S2pin(_) => format!("el2:{}", r.id()),
            };
            (r.clone(), measure(r, all.get(&key).unwrap_or(&empty)))
        })
        .collect();
    eager_spurious(&mut measured);
    let td = if plan.teardown {
        let el2: BTreeMap<String, Section> = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("el2:")?.to_string(), v.clone())))
            .collect();
        teardown(&el2)
    } else {
        None
    };
    if !plan.from_logs {
        let _ = std::fs::write(&versions_file, format!("{versions}\n"));
    }
    Ok((measured, td, all, versions))
}

/// `cargo xtask bench numa --help`, above the options.
pub const ABOUT: &str = "Stock KVM against the s2pin policies eager, confirm and keep under NUMA \
balancing: two boots (the kernel at EL2 running KVM, then under el2 with s2pin.ko), a fresh VM \
per row. Writes a table to stdout, build/bench-numa.csv, docs/numa-bench.svg and its section of \
docs/PERFORMANCE.md.";

/// Options of `cargo xtask bench numa`.
#[derive(Debug, Clone, clap::Args)]
pub struct NumaArgs {
    /// Guest minutes per row, 0.05 to 60 [default: 0.5; with --quick 0.25].
    #[arg(long, value_name = "M", value_parser = parse_minutes)]
    pub minutes: Option<f64>,
    /// Tested guest memory per row in MiB, split between 2 vCPUs: an even
    /// number from 2M to 512M.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_row_mem)]
    pub mem: u64,
    /// Anonymous 4K memory only, no teardown (CI-sized).
    #[arg(long)]
    pub quick: bool,
    /// No QEMU: the table, CSV, chart and section again from
    /// build/bench-numa-*.log (give the same options as the run that wrote
    /// them).
    #[arg(long)]
    pub from_logs: bool,
}

fn parse_minutes(v: &str) -> Result<f64, String> {
    let m: f64 = v.parse().map_err(|_| format!("`{v}`: not a number"))?;
    if !(0.05..=60.0).contains(&m) {
        return Err(format!("`{v}`: expected 0.05 to 60"));
    }
    Ok(m)
}

fn parse_row_mem(v: &str) -> Result<u64, String> {
    let t = v.trim_end_matches(['M', 'm']);
    let n: u64 = t
        .parse()
        .map_err(|_| format!("`{v}`: expected MiB like 16M"))?;
    if !(2..=512).contains(&n) || !n.is_multiple_of(2) {
        return Err(format!("`{v}`: expected an even number of MiB, 2M to 512M"));
    }
    Ok(n)
}

impl NumaArgs {
    /// The plan these options describe.
    pub fn plan(&self) -> Plan {
        let minutes = self.minutes.unwrap_or(if self.quick { 0.25 } else { 0.5 });
        Plan {
            rows: rows(self.quick),
            seconds: (minutes * 60.0).round() as u64,
            mem_mib: self.mem,
            teardown: !self.quick,
            from_logs: self.from_logs,
        }
    }
}

/// `cargo xtask bench numa ...`.
pub fn bench(root: &Path, args: &NumaArgs) -> Result<()> {
    let plan = args.plan();
    let t0 = Instant::now();
    let (rows, td, _, versions) = measure_plan(root, &plan)?;
    let wall_file = root.join("build/bench-numa-wall.txt");
    let wall = if plan.from_logs {
        std::fs::read_to_string(&wall_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .map_or(Duration::ZERO, Duration::from_secs)
    } else {
        let w = t0.elapsed();
        let _ = std::fs::write(&wall_file, format!("{}\n", w.as_secs()));
        w
    };
    println!("{}", table(&rows));
    for (what, ok) in verdicts(&rows) {
        println!("{} {what}", if ok { "PASS" } else { "FAIL" });
    }
    if let Some(t) = &td {
        println!(
            "teardown of a 1 GiB guest: pinned while running {}, module: {}, pinned after {}",
            t.pinned_live, t.line, t.pinned_after
        );
    }
    let csv_path = root.join(CSV);
    if let Some(d) = csv_path.parent() {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    std::fs::write(&csv_path, csv(&rows)).with_context(|| csv_path.display().to_string())?;
    let chart_path = root.join(CHART);
    chart(&rows, &chart_path)?;
    progress(&format!(
        "numa bench: wrote {} and {}",
        csv_path.display(),
        chart_path.display(),
    ));
    super::write_section(
        root,
        "numa",
        &doc_section(&plan, &rows, td.as_ref(), wall, &versions),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::util::test_lines as lines;

    #[test]
    fn rows_cover_the_issue() {
        let full = rows(false);
        assert_eq!(full.len(), 21);
        for b in ["anon", "thp", "memfd"] {
            for k in ["kvm", "kvm-off", "eager", "confirm", "keep", "off"] {
                assert!(
                    full.iter().any(|r| r.backing == b && r.kind() == k),
                    "{b} {k}"
                );
            }
            assert_eq!(
                full.iter()
                    .filter(|r| r.backing == b && r.kind() == "off")
                    .count(),
                2
            );
        }
        let ids: std::collections::BTreeSet<String> = full.iter().map(Row::id).collect();
        assert_eq!(ids.len(), full.len());
        assert!(rows(true).iter().all(|r| r.backing == "anon"));
    }

    #[test]
    fn scripts_have_their_rows() {
        let plan = Plan {
            rows: rows(false),
            seconds: 30,
            mem_mib: 16,
            teardown: true,
            from_logs: false,
        };
        let k = kvm_script(&plan);
        let e = el2_script(&plan);
        assert!(k.contains("--device kvm") && !k.contains("--device s2pin"));
        assert!(e.contains("--device s2pin") && !e.contains("--device kvm"));
        assert!(k.contains("kvm_unmap_hva_range") && k.contains("__kvm_tlb_flush_vmid_ipa"));
        assert!(e.contains("== CASE teardown") && e.contains("--mem 1024M"));
        assert!(e.contains("--node 1") && e.contains("taskset -c 0,1"));
        assert!(e.contains("--mem 8M") && e.contains("--seconds 30"));
        for r in &plan.rows {
            let s = if r.hyp == Hyp::Kvm { &k } else { &e };
            assert!(s.contains(&format!("== CASE {}'", r.id())), "{}", r.id());
        }
    }

    fn s2pin_section(unmapped_eager: i64, protnone: i64, pte_updates: i64) -> Section {
        let out = lines(&format!(
            "== CASE x\nguest: passes 10\nguest: vcpu1 passes 9\n\
             s2vmm: the guest was stopped by s2vmm after 30.0 s: PASS; pinned 1\n\
             \x20 range_start_protection_vma  40  d\n  el2_s2_unmaps  {u}  d\n  el2_s2_tlbi  7  d\n\
             \x20 unmapped_eager  {unmapped_eager}  d\n  unmapped_protnone  {protnone}  d\n\
             \x20 s2vmm_pte_updates  {pte_updates}\n  s2b_probe_cpn 1\n  pins  100  d\nCHECK x.rc=0\n",
            u = unmapped_eager + protnone
        ));
        sections(&out).remove("x").unwrap()
    }

    #[test]
    fn figures_and_spurious_unmaps() {
        let eager = Row {
            hyp: Hyp::S2pin("eager"),
            backing: "anon",
            balancing: true,
            run: 1,
        };
        let m = measure(&eager, &s2pin_section(5000, 0, 30));
        assert_eq!(m.passes, 19);
        assert!((m.seconds - 30.0).abs() < 1e-9);
        assert_eq!(m.unmapped, 5000);
        assert_eq!(m.tlbi, 7);
        assert_eq!(m.spurious, 4970);
        let confirm_row = Row {
            hyp: Hyp::S2pin("confirm"),
            ..eager.clone()
        };
        let mut both = vec![
            (eager.clone(), m.clone()),
            (
                confirm_row.clone(),
                measure(&confirm_row, &s2pin_section(0, 300, 4000)),
            ),
        ];
        eager_spurious(&mut both);
        assert_eq!(both[0].1.spurious, 4700);
        assert_eq!(m.range_start[2], 40);
        assert!(m.ok);
        let confirm = Row {
            hyp: Hyp::S2pin("confirm"),
            ..eager.clone()
        };
        assert_eq!(measure(&confirm, &s2pin_section(0, 300, 4000)).spurious, 0);
        // More unmapped on PROT_NONE than the kernel made PROT_NONE: spurious.
        assert_eq!(measure(&confirm, &s2pin_section(0, 300, 100)).spurious, 200);
        // Nothing measured: not ok, and the table and CSV still render.
        let none = measure(&confirm, &Section::default());
        assert!(!none.ok);
        let rows = vec![(eager, m), (confirm, none)];
        assert!(table(&rows).contains("(FAILED)"));
        assert_eq!(csv(&rows).lines().count(), 3);
    }

    #[test]
    fn kvm_figures_come_from_probes() {
        let out = lines(
            "== CASE k\nguest: passes 3\ns2vmm: the guest was stopped by s2vmm after 60.0 s: PASS\n\
             \x20 kprobe_s2b_tlbi_ipa 900\n  kprobe_s2b_tlbi_vmid 2\n  kprobe_s2b_s2_map 1000\n\
             \x20 kvm_unmap_ranges 12\n  kvm_unmap_range_pages 4096\n  s2vmm_pte_updates 4000\n  s2b_probe_cpn 1\nCHECK k.rc=0\n",
        );
        let s = sections(&out).remove("k").unwrap();
        let row = Row {
            hyp: Hyp::Kvm,
            backing: "anon",
            balancing: true,
            run: 1,
        };
        let m = measure(&row, &s);
        assert_eq!(
            (m.tlbi, m.faults, m.unmapped, m.range_total),
            (902, 1000, 4096, 12)
        );
        assert_eq!(m.spurious, 96);
        assert_eq!(per_min(m.tlbi, m.seconds), "902");
    }

    fn parse_args(args: &[&str]) -> Result<Plan, clap::Error> {
        use clap::Parser;
        let argv = ["cargo xtask", "bench", "numa"].iter().chain(args);
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Bench(crate::cli::BenchCommand::Numa(a)) => Ok(a.plan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn options_parse_and_refuse_nonsense() {
        let p = parse_args(&[]).unwrap();
        assert_eq!(
            (p.seconds, p.mem_mib, p.teardown, p.rows.len()),
            (30, 16, true, 21)
        );
        let q = parse_args(&["--quick", "--minutes", "1"]).unwrap();
        assert_eq!((q.seconds, q.teardown), (60, false));
        for bad in [
            &["--minutes", "x"][..],
            &["--mem", "3M"],
            &["--mem", "0"],
            &["--bogus"],
        ] {
            assert!(parse_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_chart_renders() {
        let dir = std::env::temp_dir().join(format!("numa-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.svg");
        let r = Row {
            hyp: Hyp::Kvm,
            backing: "anon",
            balancing: true,
            run: 1,
        };
        let m = Measured {
            seconds: 30.0,
            unmapped: 1000,
            tlbi: 0,
            ..Measured::default()
        };
        chart(&[(r, m)], &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("kvm anon"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
