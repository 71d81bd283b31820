//! `s2vmm leakcheck`: the nothing-leaked check of the reliability tests
//! (issue 12). Run it when no VM should exist any more (after a kill, a
//! soak, a fuzz run). It checks, and prints on one line:
//!
//! * every frame of the host's RAM is host-owned and unshared at EL2: the
//!   module's debugfs `page_states` walks every pfn of every online node's
//!   span with `HYP_HOST_PAGE_STATE` and counts the states; `vm`,
//!   `host_shared`, `hyp_host_pages` (a frame the host allocated that EL2
//!   still owns, e.g. a memcache page) and `malformed` must be 0;
//! * the module's pin count (`pinned`) and VM count (`vms`) are 0;
//! * `locked_vm` is back: the sum of `VmLck` over all processes is what it
//!   was at the baseline (0 without one);
//! * MemFree (after `drop_caches`) is at most the tolerance below the
//!   baseline's;
//! * the kernel log has no oops, BUG, WARNING, lockdep report, call trace
//!   or hung task, and no warning or error line of `s2pin` (beyond the
//!   baseline's count). The call trace of an OOM-killer report is not a
//!   fault: lines between `invoked oom-killer` and its `Killed process` /
//!   `oom-kill:` line are skipped.
//!
//! `--save FILE` writes the figures a later `--base FILE` compares with
//! (MemFree, `VmLck`, the bad log lines); both also check everything else.
//! The verdict is the first word, `OK` or `LEAK`, and the exit status (0 or
//! 1).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `s2vmm leakcheck`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct LeakcheckArgs {
    /// Save MemFree, VmLck and the kernel log's count of bad lines to FILE, as the baseline of a
    /// later --base.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// Compare with a baseline saved by --save (without one, MemFree is only reported).
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// How far MemFree may be below the baseline's.
    #[arg(long, default_value = "16M", value_parser = crate::args::parse_size)]
    pub memfree_tolerance: u64,
    /// Seconds to wait for the module's VM and pin counts to reach 0 first.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}

/// The module's debugfs folder.
pub const DEBUGFS: &str = "/sys/kernel/debug/s2pin";

/// Kernel log text that means something went wrong in the kernel.
pub const KMSG_BAD: &[&str] = &[
    "Oops",
    "BUG:",
    "WARNING:",
    "Kernel panic",
    "Unable to handle",
    "Call trace",
    "lockdep",
    "circular locking",
    "soft lockup",
    "hung_task",
    "blocked for more than",
    "refcount_t:",
    "list_add corruption",
    "list_del corruption",
    "Bad page",
];

/// The counts of the module's `page_states` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Lowest pfn walked.
    pub pfn_lo: u64,
    /// Highest pfn walked + 1.
    pub pfn_hi: u64,
    /// Pfns walked.
    pub walked: u64,
    /// Host-owned, unshared.
    pub host_owned: u64,
    /// Host-owned but shared (or with a share count).
    pub host_shared: u64,
    /// Owned by EL2.
    pub hyp: u64,
    /// ... of which frames the host allocated (a usable struct page).
    pub hyp_host_pages: u64,
    /// Owned by a VM.
    pub vm: u64,
    /// Holes (`HYP_ERANGE`).
    pub not_ram: u64,
    /// Replies the ABI does not allow.
    pub malformed: u64,
}

impl PageCounts {
    /// Parses the `name value` lines of `page_states` (values decimal or `0x` hex).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut m = BTreeMap::new();
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut w = l.split_whitespace();
            let (Some(k), Some(v), None) = (w.next(), w.next(), w.next()) else {
                return Err(format!("page_states: bad line `{l}`"));
            };
            let n = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            }
            .map_err(|_| format!("page_states: bad number in `{l}`"))?;
            m.insert(k.to_string(), n);
        }
        let get = |k: &str| {
            m.get(k)
                .copied()
                .ok_or_else(|| format!("page_states: no `{k}` line"))
        };
        let c = Self {
            pfn_lo: get("pfn_lo")?,
            pfn_hi: get("pfn_hi")?,
            walked: get("walked")?,
            host_owned: get("host_owned")?,
            host_shared: get("host_shared")?,
            hyp: get("hyp")?,
            hyp_host_pages: get("hyp_host_pages")?,
            vm: get("vm")?,
            not_ram: get("not_ram")?,
            malformed: get("malformed")?,
        };
        let sum = [
            c.host_owned,
            c.host_shared,
            c.hyp,
            c.vm,
            c.not_ram,
            c.malformed,
        ]
        .iter()
        .try_fold(0u64, |a, &b| a.checked_add(b));
        if sum != Some(c.walked) {
            return Err(format!(
                "page_states: the counts do not add up to walked {}",
                c.walked
            ));
        }
        Ok(c)
    }
}

/// The kernel log lines that count as faults (see the module docs), at most
/// `keep` of them kept in full; returns (count, kept).
#[must_use]
pub fn bad_kmsg_lines<'a>(
    records: impl IntoIterator<Item = (u8, &'a str)>,
    keep: usize,
) -> (usize, Vec<String>) {
    let mut in_oom = false;
    let mut n = 0;
    let mut kept = Vec::new();
    for (level, msg) in records {
        if msg.contains("invoked oom-killer") {
            in_oom = true;
            continue;
        }
        if in_oom {
            if msg.contains("Killed process") || msg.contains("oom-kill:") {
                in_oom = false;
            }
            continue;
        }
        // The module's dmesg lines are errors only, but loading it taints
        // the kernel (out of tree), which the kernel logs as a warning.
        let bad = KMSG_BAD.iter().any(|p| msg.contains(p))
            || (level <= 4 && msg.starts_with("s2pin:") && !msg.contains("taints kernel"));
        if bad {
            n += 1;
            if kept.len() < keep {
                kept.push(msg.to_string());
            }
        }
    }
    (n, kept)
}

/// One `/dev/kmsg` record (`prio,seq,usec,flags;message\n...`): its level
/// (0 emergency .. 7 debug) and the message's first line.
#[must_use]
pub fn parse_kmsg_record(rec: &str) -> Option<(u8, &str)> {
    let (head, msg) = rec.split_once(';')?;
    let prio: u32 = head.split(',').next()?.parse().ok()?;
    let level = u8::try_from(prio & 7).ok()?;
    Some((level, msg.lines().next().unwrap_or("")))
}

/// `MemFree` of `/proc/meminfo`, in KiB.
#[must_use]
pub fn memfree_kib(meminfo: &str) -> Option<u64> {
    meminfo_field(meminfo, "MemFree:")
}

/// Pages on the per-CPU free lists (`/proc/zoneinfo`, the `count:` lines of
/// each zone's `pagesets`): free pages that MemFree does not count. Freed
/// guest memory lands there first, tens of MiB on a 4-CPU two-node machine.
#[must_use]
pub fn pcp_pages(zoneinfo: &str) -> u64 {
    zoneinfo
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// A `Name:  N kB` field of a `/proc` file.
#[must_use]
pub fn meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// What a `--save` stores and a `--base` compares with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    /// MemFree after drop_caches, KiB.
    pub memfree_kib: u64,
    /// Sum of VmLck over all processes, KiB.
    pub vmlck_kib: u64,
    /// Bad kernel log lines then.
    pub kmsg_bad: usize,
}

impl Baseline {
    /// The baseline part of a measurement.
    #[must_use]
    pub fn of(f: &Figures) -> Self {
        Self {
            memfree_kib: f.memfree_kib,
            vmlck_kib: f.vmlck_kib,
            kmsg_bad: f.kmsg_bad,
        }
    }

    /// The file's text.
    #[must_use]
    pub fn to_text(&self) -> String {
        format!(
            "memfree_kib {}\nvmlck_kib {}\nkmsg_bad {}\n",
            self.memfree_kib, self.vmlck_kib, self.kmsg_bad
        )
    }

    /// Parses [`Self::to_text`]'s output.
    pub fn parse(text: &str) -> Result<Self, String> {
        let get = |k: &str| -> Result<u64, String> {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("baseline: no `{k}` line"))
        };
        Ok(Self {
            memfree_kib: get("memfree_kib")?,
            vmlck_kib: get("vmlck_kib")?,
            kmsg_bad: usize::try_from(get("kmsg_bad")?).map_err(|e| e.to_string())?,
        })
    }
}

/// Everything one check measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// The page walk.
    pub pages: PageCounts,
    /// Milliseconds the walk took.
    pub walk_ms: u64,
    /// debugfs `pinned`.
    pub pinned: i64,
    /// debugfs `vms`.
    pub vms: i64,
    /// Sum of VmLck, KiB.
    pub vmlck_kib: u64,
    /// MemFree after drop_caches plus the per-CPU free lists, KiB.
    pub memfree_kib: u64,
    /// ... of which on the per-CPU free lists, KiB.
    pub pcp_kib: u64,
    /// Bad kernel log lines (count, the first few).
    pub kmsg_bad: usize,
    /// The first bad lines.
    pub kmsg_first: Vec<String>,
}

/// The leaks and faults in `f` (empty: nothing leaked).
#[must_use]
pub fn problems(f: &Figures, base: Option<&Baseline>, memfree_tolerance_kib: u64) -> Vec<String> {
    let mut p = Vec::new();
    let pg = &f.pages;
    for (name, v) in [
        ("vm", pg.vm),
        ("host_shared", pg.host_shared),
        ("hyp_host_pages", pg.hyp_host_pages),
        ("malformed", pg.malformed),
    ] {
        if v != 0 {
            p.push(format!("{name}={v}"));
        }
    }
    if pg.walked == 0 || pg.host_owned == 0 {
        p.push("no RAM walked".into());
    }
    if f.pinned != 0 {
        p.push(format!("pinned={}", f.pinned));
    }
    if f.vms != 0 {
        p.push(format!("vms={}", f.vms));
    }
    let b = base.copied().unwrap_or_default();
    if f.vmlck_kib != b.vmlck_kib {
        p.push(format!("vmlck_kib={} (base {})", f.vmlck_kib, b.vmlck_kib));
    }
    if base.is_some() && f.memfree_kib + memfree_tolerance_kib < b.memfree_kib {
        p.push(format!(
            "memfree_drop_kib={} (tolerance {memfree_tolerance_kib})",
            b.memfree_kib - f.memfree_kib
        ));
    }
    if f.kmsg_bad > b.kmsg_bad {
        p.push(format!("kmsg_bad={} (base {})", f.kmsg_bad, b.kmsg_bad));
    }
    p
}

/// The one-line verdict.
#[must_use]
pub fn verdict_line(f: &Figures, base: Option<&Baseline>, problems: &[String]) -> String {
    let pg = &f.pages;
    let mut s = String::from("leakcheck: ");
    s.push_str(if problems.is_empty() { "OK" } else { "LEAK" });
    let _ = write!(
        s,
        " pfns={:#x}-{:#x} walked={} host_owned={} host_shared={} hyp={} hyp_host_pages={} vm={} not_ram={} malformed={} walk_ms={} pinned={} vms={} vmlck_kib={} memfree_kib={} pcp_kib={}",
        pg.pfn_lo,
        pg.pfn_hi,
        pg.walked,
        pg.host_owned,
        pg.host_shared,
        pg.hyp,
        pg.hyp_host_pages,
        pg.vm,
        pg.not_ram,
        pg.malformed,
        f.walk_ms,
        f.pinned,
        f.vms,
        f.vmlck_kib,
        f.memfree_kib,
        f.pcp_kib
    );
    if let Some(b) = base {
        let _ = write!(
            s,
            " memfree_drop_kib={}",
            i128::from(b.memfree_kib) - i128::from(f.memfree_kib)
        );
    }
    let _ = write!(s, " kmsg_bad={}", f.kmsg_bad);
    if !problems.is_empty() {
        let _ = write!(s, " problems: {}", problems.join(", "));
    }
    s
}

#[cfg(target_os = "linux")]
pub use linux::{measure, run};

#[cfg(target_os = "linux")]
mod linux {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};

    use anyhow::Context;

    use super::LeakcheckArgs;
    use super::{bad_kmsg_lines, parse_kmsg_record, problems, verdict_line, Baseline, Figures};
    use super::{memfree_kib, meminfo_field, pcp_pages, PageCounts, DEBUGFS};

    fn debugfs_num(name: &str) -> anyhow::Result<i64> {
        let p = format!("{DEBUGFS}/{name}");
        let t = std::fs::read_to_string(&p)
            .with_context(|| format!("{p} (is s2pin.ko loaded and debugfs mounted?)"))?;
        t.trim()
            .parse()
            .with_context(|| format!("{p}: `{}` is not a number", t.trim()))
    }

    /// Sum of `VmLck` over every process.
    fn vmlck_sum() -> u64 {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        dir.flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
            .filter_map(|s| meminfo_field(&s, "VmLck:"))
            .sum()
    }

    /// MemFree plus the per-CPU free lists after writing back and dropping
    /// the page cache, and the per-CPU part alone (KiB).
    fn memfree() -> anyhow::Result<(u64, u64)> {
        nix::unistd::sync();
        // Best effort: without it MemFree only varies more.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
        std::thread::sleep(Duration::from_millis(500));
        let m = std::fs::read_to_string("/proc/meminfo").context("/proc/meminfo")?;
        let free = memfree_kib(&m).context("/proc/meminfo has no MemFree")?;
        let z = std::fs::read_to_string("/proc/zoneinfo").unwrap_or_default();
        let pcp = pcp_pages(&z) * 4;
        Ok((free + pcp, pcp))
    }

    /// The kernel log: every record of `/dev/kmsg`, read without blocking.
    fn kmsg() -> anyhow::Result<Vec<(u8, String)>> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .context("/dev/kmsg")?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((level, msg)) = parse_kmsg_record(&rec) {
                        out.push((level, msg.to_string()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) => return Err(e).context("reading /dev/kmsg"),
            }
        }
        Ok(out)
    }

    /// Measures everything, after waiting up to `wait` seconds for the
    /// module's VM and pin counts to reach 0.
    pub fn measure(wait: u64) -> anyhow::Result<Figures> {
        // A VM whose fd another process still holds is torn down when that
        // process closes it; give such teardowns time.
        let deadline = Instant::now() + Duration::from_secs(wait);
        while (debugfs_num("vms")? != 0 || debugfs_num("pinned")? != 0) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let t0 = Instant::now();
        let p = format!("{DEBUGFS}/page_states");
        let text = std::fs::read_to_string(&p).with_context(|| p.clone())?;
        let walk_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let pages = PageCounts::parse(&text).map_err(anyhow::Error::msg)?;
        let log = kmsg()?;
        let (kmsg_bad, kmsg_first) = bad_kmsg_lines(log.iter().map(|(l, m)| (*l, m.as_str())), 3);
        let (memfree_kib, pcp_kib) = memfree()?;
        Ok(Figures {
            pages,
            walk_ms,
            pinned: debugfs_num("pinned")?,
            vms: debugfs_num("vms")?,
            vmlck_kib: vmlck_sum(),
            memfree_kib,
            pcp_kib,
            kmsg_bad,
            kmsg_first,
        })
    }

    /// Runs the check; returns the exit status (0 nothing leaked, 1 a leak).
    pub fn run(o: &LeakcheckArgs) -> anyhow::Result<i32> {
        // Loads the module if needed, so that a baseline can be taken before any VM ran.
        drop(crate::s2pin::S2pin::open()?);
        let base = match &o.base {
            Some(p) => Some(
                Baseline::parse(
                    &std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let f = measure(o.wait)?;
        let bad = problems(&f, base.as_ref(), o.memfree_tolerance >> 10);
        println!("{}", verdict_line(&f, base.as_ref(), &bad));
        for l in &f.kmsg_first {
            println!("leakcheck: kernel log: {l}");
        }
        if let Some(p) = &o.save {
            std::fs::write(p, Baseline::of(&f).to_text())
                .with_context(|| format!("{}", p.display()))?;
        }
        Ok(i32::from(!bad.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "pfn_lo 0x42000\npfn_hi 0xc0000\nwalked 516096\nhost_owned 516096\n\
        host_shared 0\nhyp 0\nhyp_host_pages 0\nvm 0\nnot_ram 0\nmalformed 0\n";

    fn clean() -> Figures {
        Figures {
            pages: PageCounts::parse(CLEAN).unwrap(),
            memfree_kib: 1_000_000,
            ..Figures::default()
        }
    }

    #[test]
    fn page_states_parse_and_must_add_up() {
        let c = PageCounts::parse(CLEAN).unwrap();
        assert_eq!((c.pfn_lo, c.pfn_hi, c.walked), (0x42000, 0xc0000, 516_096));
        let off = CLEAN.replace("host_owned 516096", "host_owned 516095");
        assert!(PageCounts::parse(&off).is_err());
        assert!(PageCounts::parse(&CLEAN.replace("vm 0\n", "")).is_err());
        assert!(PageCounts::parse("walked x\n").is_err());
        assert!(PageCounts::parse("walked 1 2\n").is_err());
    }

    #[test]
    fn a_clean_machine_passes_and_each_leak_is_named() {
        let f = clean();
        assert!(problems(&f, None, 16 << 10).is_empty());
        let line = verdict_line(&f, None, &[]);
        assert!(
            line.starts_with("leakcheck: OK pfns=0x42000-0xc0000"),
            "{line}"
        );
        type Spoil = fn(&mut Figures);
        let cases: [(&str, Spoil); 8] = [
            ("vm=", |f| {
                f.pages.vm = 1;
                f.pages.host_owned -= 1;
            }),
            ("host_shared=", |f| f.pages.host_shared = 2),
            ("hyp_host_pages=", |f| f.pages.hyp_host_pages = 1),
            ("malformed=", |f| f.pages.malformed = 1),
            ("pinned=", |f| f.pinned = 3),
            ("vms=", |f| f.vms = 1),
            ("vmlck_kib=", |f| f.vmlck_kib = 4),
            ("kmsg_bad=", |f| f.kmsg_bad = 1),
        ];
        for (name, spoil) in cases {
            let mut f = clean();
            spoil(&mut f);
            let p = problems(&f, None, 16 << 10);
            assert!(p.iter().any(|x| x.starts_with(name)), "{name}: {p:?}");
            assert!(verdict_line(&f, None, &p).starts_with("leakcheck: LEAK"));
        }
        let mut f = clean();
        f.pages = PageCounts::default();
        assert!(!problems(&f, None, 0).is_empty());
    }

    #[test]
    fn memfree_is_checked_against_the_base_within_the_tolerance() {
        let base = Baseline {
            memfree_kib: 1_000_000 + 16 * 1024,
            vmlck_kib: 0,
            kmsg_bad: 0,
        };
        let f = clean();
        assert!(problems(&f, Some(&base), 16 << 10).is_empty());
        let p = problems(&f, Some(&base), (16 << 10) - 1);
        assert!(p[0].starts_with("memfree_drop_kib=16384"), "{p:?}");
        // Without a base MemFree is only reported.
        assert!(problems(&f, None, 0).is_empty());
        // A base with log lines already in it.
        let mut f = clean();
        f.kmsg_bad = 2;
        let b2 = Baseline {
            kmsg_bad: 2,
            ..base
        };
        assert!(problems(&f, Some(&b2), 16 << 10).is_empty());
        assert_eq!(Baseline::parse(&b2.to_text()), Ok(b2));
        assert!(Baseline::parse("memfree_kib 1\n").is_err());
    }

    #[test]
    fn kernel_log_faults_are_found_and_oom_reports_are_not() {
        let log = [
            (6, "s2pin: kernel at EL1; hypervisor ABI version 0.2"),
            (4, "s2pin: loading out-of-tree module taints kernel."),
            (4, "s2vmm invoked oom-killer: gfp_mask=0x140cca"),
            (4, "Call trace:"),
            (4, " dump_backtrace+0xe4/0x140"),
            (6, "oom-kill:constraint=CONSTRAINT_MEMCG,task=s2vmm,pid=99"),
            (3, "Memory cgroup out of memory: Killed process 99 (s2vmm)"),
            (4, "WARNING: CPU: 1 PID: 12 at mm/gup.c:100"),
            (
                3,
                "s2pin: HYP_TEARDOWN_START of VM 0x3 failed: -22; leaking its pages",
            ),
            (6, "s2pin: an info line"),
            (
                0,
                "Unable to handle kernel paging request at virtual address 0",
            ),
        ];
        let (n, first) = bad_kmsg_lines(log.iter().copied(), 2);
        assert_eq!(n, 3);
        assert_eq!(first.len(), 2);
        assert!(first[0].starts_with("WARNING:"));
        assert_eq!(
            parse_kmsg_record("4,123,456,-;WARNING: x\n SUBSYSTEM=y\n"),
            Some((4, "WARNING: x"))
        );
        assert_eq!(parse_kmsg_record("14,1,2,-;hi\n"), Some((6, "hi")));
        assert_eq!(parse_kmsg_record("garbage"), None);
    }

    #[test]
    fn per_cpu_lists_are_summed() {
        let z = "Node 0, zone   Normal\n  pages free     100\n  pagesets\n    cpu: 0\n              count: 42\n              high:  378\n    cpu: 1\n              count: 8\n";
        assert_eq!(pcp_pages(z), 50);
        assert_eq!(pcp_pages(""), 0);
    }

    #[test]
    fn meminfo_fields() {
        let m = "MemTotal:        2000000 kB\nMemFree:         1234567 kB\n";
        assert_eq!(memfree_kib(m), Some(1_234_567));
        assert_eq!(meminfo_field("VmLck:\t      8 kB\n", "VmLck:"), Some(8));
        assert_eq!(memfree_kib("nothing"), None);
    }
}
