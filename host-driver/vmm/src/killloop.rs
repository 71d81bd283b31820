//! `s2vmm killloop`: `s2vmm` killed with `SIGKILL` at random moments, each
//! kill followed by the nothing-leaked check ([`crate::leakcheck`]), issue
//! 12 item 1.
//!
//! Each round starts `s2vmm` guest runs as child processes (this same
//! binary) and kills them; the moments come from a seeded generator, so a
//! seed replays the same plan (the machine's timing still varies). The
//! scenarios:
//!
//! * `fault`: a touch guest of 1 to 4 vCPUs, killed 0 to 4 s after it was
//!   started: before the VM exists, while its vCPUs fault their memory in
//!   (each fault pins, accounts `locked_vm` and shares a page), or while it
//!   runs;
//! * `numa`: a touch guest, killed 0 to 2 s after its first report, while
//!   NUMA balancing (its scan made tight when the machine has two nodes)
//!   sends MMU-notifier events that the module forwards;
//! * `munmap`: a touch guest whose VMM thread munmaps 2 MiB to half of the
//!   memory after the guest's first report, killed 0 to 60 ms after that
//!   report: before, during or after the munmap's forwarding;
//! * `teardown`: a 2-vCPU guest with 128 MiB pinned is killed, and a second
//!   `fault` guest is started at once and killed 0 to 1.5 s later, while the
//!   first one's teardown may still run (two kills).
//!
//! With `--oom`, one more run: a guest in a memory cgroup whose limit is
//! below its memory, so that the OOM killer chooses the VMM while it pins.
//!
//! Every line says where the kill landed, as far as the child's output and
//! the module's counters tell (`phase=`); the last line totals kills, leak
//! checks and leaks. Exit status 0 when every check found nothing.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::args::{Backing, Policy};

/// `s2vmm killloop`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct KillLoopArgs {
    /// Kills to make.
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// The seed of the plan (scenarios, guests, moments).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The guest payload image.
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// Also one run in a memory cgroup too small for the guest, so that the OOM killer chooses
    /// the VMM.
    #[arg(long)]
    pub oom: bool,
    /// How far MemFree may be below the first check's after each kill.
    #[arg(long, default_value = "16M", value_parser = crate::args::parse_size)]
    pub memfree_tolerance: u64,
}

/// A small seeded generator (SplitMix64): the plan of a seed is the same
/// on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        let i = usize::try_from(self.range(0, items.len() as u64 - 1)).unwrap_or(0);
        items[i]
    }
}

/// What a round does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Kill at a random time after the start.
    Fault,
    /// Kill while NUMA balancing runs over the guest's memory.
    Numa,
    /// Kill around a munmap of guest memory.
    Munmap,
    /// Kill a big VM, then a second one during the first one's teardown.
    Teardown,
}

impl Scenario {
    /// Its name in output lines.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Fault => "fault",
            Self::Numa => "numa",
            Self::Munmap => "munmap",
            Self::Teardown => "teardown",
        }
    }

    /// Kills it makes.
    #[must_use]
    pub fn kills(self) -> u32 {
        if self == Self::Teardown {
            2
        } else {
            1
        }
    }
}

/// One guest a round starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    /// vCPUs (1 to 4).
    pub vcpus: u32,
    /// MiB per vCPU.
    pub mib: u64,
    /// Backing.
    pub backing: Backing,
    /// Policy.
    pub policy: Policy,
    /// `--munmap` range in MiB (offset, length), for [`Scenario::Munmap`].
    pub munmap: Option<(u64, u64)>,
}

impl Guest {
    /// The s2vmm arguments of this guest (a touch guest that runs until killed).
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let backing = match self.backing {
            Backing::Anon => "anon",
            Backing::Thp => "thp",
            Backing::Memfd => "memfd",
        };
        let policy = match self.policy {
            Policy::Confirm => "confirm",
            Policy::Eager => "eager",
            Policy::Keep => "keep",
        };
        let mut a: Vec<String> = [
            "--mode",
            "touch",
            "--reports",
            "0",
            "--seconds",
            "600",
            "--passes-log2",
            "0",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        a.extend([
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--mem".into(),
            format!("{}M", self.mib),
            "--backing".into(),
            backing.into(),
            "--policy".into(),
            policy.into(),
        ]);
        if let Some((off, len)) = self.munmap {
            a.extend([
                "--hook-at".into(),
                "1".into(),
                "--munmap".into(),
                format!("{off}M+{len}M"),
            ]);
        }
        a
    }

    /// A short description for output lines.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut s = format!(
            "vcpus={} mem={}Mx{} backing={:?} policy={:?}",
            self.vcpus, self.mib, self.vcpus, self.backing, self.policy
        )
        .to_lowercase();
        if let Some((off, len)) = self.munmap {
            let _ = write!(s, " munmap={off}M+{len}M");
        }
        s
    }
}

/// One round of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// What it does.
    pub scenario: Scenario,
    /// The guest killed (for teardown: the second, small one).
    pub guest: Guest,
    /// Milliseconds from the round's reference point to the kill.
    pub delay_ms: u64,
}

/// A random guest of 1 to 4 vCPUs and at most 64 MiB in all.
fn random_guest(rng: &mut Rng) -> Guest {
    let vcpus = u32::try_from(rng.range(1, 4)).unwrap_or(1);
    let mib = rng.pick(&[4u64, 8, 16]).min(64 / u64::from(vcpus));
    Guest {
        vcpus,
        mib,
        backing: rng.pick(&[Backing::Anon, Backing::Thp, Backing::Memfd]),
        policy: rng.pick(&[Policy::Confirm, Policy::Eager, Policy::Keep]),
        munmap: None,
    }
}

/// The rounds that make at least `kills` kills, for `seed`.
#[must_use]
pub fn plan(seed: u64, kills: u32) -> Vec<Round> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut n = 0;
    while n < kills {
        let scenario = rng.pick(&[
            Scenario::Fault,
            Scenario::Fault,
            Scenario::Numa,
            Scenario::Munmap,
            Scenario::Teardown,
        ]);
        // A teardown round makes two kills; near the end, one kill is left.
        let scenario = if scenario == Scenario::Teardown && n + 2 > kills {
            Scenario::Fault
        } else {
            scenario
        };
        let mut guest = random_guest(&mut rng);
        let delay_ms = match scenario {
            Scenario::Fault => rng.range(0, 4000),
            Scenario::Numa => rng.range(0, 2000),
            Scenario::Munmap => {
                // 2 MiB-aligned offsets: a split VMA off a 2 MiB boundary
                // makes Linux clear the whole 2 MiB around it anyway.
                // s2vmm takes hook ranges inside the first vCPU's part.
                let total = guest.mib;
                let len = 2 * rng.range(1, (total / 4).max(1));
                let off = 2 * rng.range(0, (total - len) / 2);
                guest.munmap = Some((off, len));
                rng.range(0, 60)
            }
            Scenario::Teardown => rng.range(0, 1500),
        };
        n += scenario.kills();
        out.push(Round {
            scenario,
            guest,
            delay_ms,
        });
    }
    out
}

/// Where a kill landed, from the child's output and state at the kill.
#[must_use]
pub fn phase(lines: &[String], exited: bool) -> &'static str {
    let has = |p: &str| lines.iter().any(|l| l.contains(p));
    if exited {
        "exited-before-kill"
    } else if has("s2vmm: hook ") {
        "after-hook"
    } else if has("guest: passes") {
        "running"
    } else if has("guest: touch") {
        "faulting-in"
    } else if has("s2vmm: VM of") {
        "vm-created"
    } else {
        "starting"
    }
}

#[cfg(target_os = "linux")]
pub use linux::run;

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::Context;

    use super::{phase, plan, Guest, KillLoopArgs as Options, Round, Scenario};
    use crate::args::{Backing, Policy};
    use crate::leakcheck::{self, Baseline};

    /// A started s2vmm and the lines it printed so far.
    struct Run {
        child: Child,
        lines: Arc<Mutex<Vec<String>>>,
        t0: Instant,
    }

    impl Run {
        fn start(image: &Path, args: &[String], cgroup: Option<&Path>) -> anyhow::Result<Self> {
            let exe = std::env::current_exe().context("finding s2vmm itself")?;
            let mut child = Command::new(exe)
                .arg("--image")
                .arg(image)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting s2vmm")?;
            if let Some(cg) = cgroup {
                std::fs::write(cg.join("cgroup.procs"), child.id().to_string())
                    .context("moving s2vmm into the memory cgroup")?;
            }
            let lines = Arc::new(Mutex::new(Vec::new()));
            let outs: [Box<dyn std::io::Read + Send>; 2] = [
                Box::new(child.stdout.take().context("stdout")?),
                Box::new(child.stderr.take().context("stderr")?),
            ];
            for out in outs {
                let lines = Arc::clone(&lines);
                std::thread::spawn(move || {
                    for l in BufReader::new(out).lines() {
                        let Ok(l) = l else { break };
                        lines
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(l);
                    }
                });
            }
            Ok(Self {
                child,
                lines,
                t0: Instant::now(),
            })
        }

        fn lines(&self) -> Vec<String> {
            self.lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        /// Waits up to `limit` for a line containing `pat`; false if the
        /// child exited or the time ran out first.
        fn wait_line(&mut self, pat: &str, limit: Duration) -> bool {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if self.lines().iter().any(|l| l.contains(pat)) {
                    return true;
                }
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        }

        fn exited(&mut self) -> bool {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }

        /// The notifier events the module counted for this child's VM so far.
        fn notifier_events(&self) -> u64 {
            let pid = self.child.id();
            let Ok(dir) = std::fs::read_dir(leakcheck::DEBUGFS) else {
                return 0;
            };
            let mut n = 0;
            for e in dir.flatten() {
                if !e
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}-"))
                {
                    continue;
                }
                let stats = std::fs::read_to_string(e.path().join("stats")).unwrap_or_default();
                for l in stats.lines() {
                    let mut w = l.split_whitespace();
                    if let (Some(k), Some(v)) = (w.next(), w.next()) {
                        if k.starts_with("range_start") && !k.ends_with("exclusive") {
                            n += v.parse::<u64>().unwrap_or(0);
                        }
                    }
                }
            }
            n
        }

        /// SIGKILL; returns the phase it landed in.
        fn kill(&mut self) -> &'static str {
            let exited = self.exited();
            let lines = self.lines();
            if !exited {
                let _ = self.child.kill();
            }
            phase(&lines, exited)
        }

        /// Reaps it; true if SIGKILL ended it.
        fn reap(&mut self) -> bool {
            use std::os::unix::process::ExitStatusExt;
            self.child
                .wait()
                .is_ok_and(|s| s.signal() == Some(libc::SIGKILL))
        }
    }

    fn sleep_ms(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// Turns NUMA balancing on with a tight scan when there are two nodes.
    fn numa_on() -> bool {
        let nodes = std::fs::read_to_string("/sys/devices/system/node/online").unwrap_or_default();
        if !nodes.contains('-') && !nodes.contains(',') {
            return false;
        }
        let _ = std::fs::write("/proc/sys/kernel/numa_balancing", "1\n");
        let d = "/sys/kernel/debug/sched/numa_balancing";
        for (k, v) in [
            ("scan_delay_ms", "0"),
            ("scan_period_min_ms", "100"),
            ("scan_period_max_ms", "100"),
            ("scan_size_mb", "256"),
        ] {
            let _ = std::fs::write(format!("{d}/{k}"), v);
        }
        true
    }

    /// Tally of the run.
    #[derive(Default)]
    struct Tally {
        kills: u32,
        checks: u32,
        leaks: u32,
        not_killed: u32,
        phases: std::collections::BTreeMap<String, u32>,
        notifier_kills: u32,
        overlapped_teardowns: u32,
        walk_ms_max: u64,
        memfree_drop_max: i64,
        meminfo0: String,
    }

    /// The `/proc/meminfo` fields that moved by 2 MiB or more since `before`.
    fn meminfo_changes(before: &str) -> String {
        let now = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mut out = Vec::new();
        for l in now.lines() {
            let Some((name, _)) = l.split_once(':') else {
                continue;
            };
            let key = format!("{name}:");
            if let (Some(a), Some(b)) = (
                leakcheck::meminfo_field(before, &key),
                leakcheck::meminfo_field(&now, &key),
            ) {
                let d = i128::from(b) - i128::from(a);
                if d.abs() >= 2048 {
                    out.push(format!("{name} {d:+} kB"));
                }
            }
        }
        out.join(", ")
    }

    fn check(t: &mut Tally, base: &Baseline, tol_kib: u64, label: &str) -> anyhow::Result<()> {
        let f = leakcheck::measure(30)?;
        let bad = leakcheck::problems(&f, Some(base), tol_kib);
        t.checks += 1;
        t.walk_ms_max = t.walk_ms_max.max(f.walk_ms);
        let drop = i64::try_from(base.memfree_kib).unwrap_or(0)
            - i64::try_from(f.memfree_kib).unwrap_or(0);
        t.memfree_drop_max = t.memfree_drop_max.max(drop);
        if !bad.is_empty() {
            t.leaks += 1;
            println!(
                "killloop: {label}: {}",
                leakcheck::verdict_line(&f, Some(base), &bad)
            );
            println!(
                "killloop: meminfo changes: {}",
                meminfo_changes(&t.meminfo0)
            );
            for l in &f.kmsg_first {
                println!("killloop: kernel log: {l}");
            }
        }
        Ok(())
    }

    fn round(
        i: usize,
        r: &Round,
        o: &Options,
        t: &mut Tally,
        base: &Baseline,
    ) -> anyhow::Result<String> {
        let tol = o.memfree_tolerance >> 10;
        let mut line = format!(
            "killloop: round {i} {} {} delay_ms={}",
            r.scenario.name(),
            r.guest.describe(),
            r.delay_ms
        );
        let note_phase = |t: &mut Tally, p: &str| {
            *t.phases.entry(p.to_string()).or_insert(0) += 1;
        };
        match r.scenario {
            Scenario::Fault => {
                let mut c = Run::start(&o.image, &r.guest.args(), None)?;
                sleep_ms(r.delay_ms);
                let p = c.kill();
                note_phase(t, p);
                line.push_str(&format!(" phase={p}"));
                finish(&mut c, t, &mut line);
            }
            Scenario::Numa | Scenario::Munmap => {
                let mut c = Run::start(&o.image, &r.guest.args(), None)?;
                let up = c.wait_line("guest: passes", Duration::from_secs(60));
                if !up {
                    line.push_str(" (no first report within 60 s)");
                }
                sleep_ms(r.delay_ms);
                let ev = c.notifier_events();
                let p = c.kill();
                note_phase(t, p);
                if ev > 0 {
                    t.notifier_kills += 1;
                }
                line.push_str(&format!(" phase={p} notifier_events={ev}"));
                finish(&mut c, t, &mut line);
            }
            Scenario::Teardown => {
                let big = Guest {
                    vcpus: 2,
                    mib: 64,
                    backing: Backing::Anon,
                    policy: Policy::Confirm,
                    munmap: None,
                };
                let mut a = Run::start(&o.image, &big.args(), None)?;
                let up = a.wait_line("guest: passes", Duration::from_secs(180));
                let pa = a.kill();
                note_phase(t, pa);
                let mut b = Run::start(&o.image, &r.guest.args(), None)?;
                sleep_ms(r.delay_ms);
                let a_alive = !a.exited();
                let pb = b.kill();
                note_phase(t, pb);
                if a_alive {
                    t.overlapped_teardowns += 1;
                }
                line.push_str(&format!(
                    " big={}{} phase={pb} first_teardown_running_at_kill={a_alive}",
                    pa,
                    if up { "" } else { "(no report)" }
                ));
                finish(&mut a, t, &mut line);
                finish(&mut b, t, &mut line);
            }
        }
        check(t, base, tol, &format!("round {i}"))?;
        line.push_str(&format!(" leaks={}", t.leaks));
        Ok(line)
    }

    fn finish(c: &mut Run, t: &mut Tally, line: &mut String) {
        if c.reap() {
            t.kills += 1;
        } else {
            t.not_killed += 1;
            let l = c.lines();
            line.push_str(&format!(
                " NOT-KILLED (after {} ms; last: {})",
                c.t0.elapsed().as_millis(),
                l.last().map_or("", String::as_str)
            ));
        }
    }

    /// The OOM run: a guest whose memory cgroup is smaller than its memory.
    fn oom(o: &Options, t: &mut Tally, base: &Baseline) -> anyhow::Result<String> {
        let root = Path::new("/sys/fs/cgroup");
        if !root.join("cgroup.controllers").exists() {
            let st = Command::new("mount")
                .args(["-t", "cgroup2", "none", "/sys/fs/cgroup"])
                .status()
                .context("mount")?;
            anyhow::ensure!(st.success(), "mounting cgroup2 at /sys/fs/cgroup failed");
        }
        let ctl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        anyhow::ensure!(
            ctl.split_whitespace().any(|c| c == "memory"),
            "the kernel has no memory cgroup controller ({ctl:?})"
        );
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        let cg = root.join("s2vmm-oom");
        let _ = std::fs::create_dir(&cg);
        std::fs::write(cg.join("memory.max"), "48M").context("memory.max")?;
        let g = Guest {
            vcpus: 2,
            mib: 64,
            backing: Backing::Anon,
            policy: Policy::Confirm,
            munmap: None,
        };
        let mut c = Run::start(&o.image, &g.args(), Some(&cg))?;
        let pid = c.child.id();
        let end = Instant::now() + Duration::from_secs(180);
        while !c.exited() && Instant::now() < end {
            sleep_ms(20);
        }
        let timed_out = !c.exited();
        if timed_out {
            let _ = c.child.kill();
        }
        let killed = c.reap();
        let events = std::fs::read_to_string(cg.join("memory.events")).unwrap_or_default();
        let oom_kills: u64 = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let _ = std::fs::remove_dir(&cg);
        let mut line = format!(
            "killloop: oom {} memory.max=48M pid={pid} killed_by_sigkill={killed} memcg_oom_kills={oom_kills}",
            g.describe()
        );
        if timed_out {
            line.push_str(" TIMEOUT (still running after 180 s)");
        }
        let ok = killed && oom_kills >= 1 && !timed_out;
        if ok {
            t.kills += 1;
        } else {
            t.not_killed += 1;
            line.push_str(&format!(
                " NOT-OOM-KILLED (last: {})",
                c.lines().last().map_or("", String::as_str)
            ));
        }
        check(t, base, o.memfree_tolerance >> 10, "oom")?;
        line.push_str(&format!(" leaks={}", t.leaks));
        Ok(line)
    }

    /// Runs the loop; returns the exit status.
    pub fn run(o: &Options) -> anyhow::Result<i32> {
        drop(crate::s2pin::S2pin::open()?);
        let numa = numa_on();
        // Warm-up: one short guest per backing run to its end, so that what
        // the first VM allocates once for good (the huge zero page, slab
        // caches, per-CPU page lists, kernel threads) is in the baseline's
        // MemFree rather than counted as a leak of the first kill.
        for backing in [Backing::Anon, Backing::Thp, Backing::Memfd] {
            let g = Guest {
                vcpus: 2,
                mib: 16,
                backing,
                policy: Policy::Confirm,
                munmap: None,
            };
            let mut args = g.args();
            if let Some(i) = args.iter().position(|a| a == "--reports") {
                args[i + 1] = "2".into();
            }
            let mut c = Run::start(&o.image, &args, None)?;
            let st = c.child.wait().context("waiting for the warm-up guest")?;
            anyhow::ensure!(
                st.success(),
                "the warm-up guest ({}) failed: {st}; last: {}",
                g.describe(),
                c.lines().last().map_or("", String::as_str)
            );
        }
        let f = leakcheck::measure(30)?;
        let base = Baseline::of(&f);
        let bad = leakcheck::problems(&f, None, 0);
        println!(
            "killloop: seed {} kills {} numa_balancing {}; before: {}",
            o.seed,
            o.kills,
            if numa {
                "on (tight scan)"
            } else {
                "off (one node)"
            },
            leakcheck::verdict_line(&f, None, &bad)
        );
        anyhow::ensure!(
            bad.is_empty(),
            "the machine is not clean before the first kill"
        );
        let mut t = Tally {
            meminfo0: std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            ..Tally::default()
        };
        let t0 = Instant::now();
        for (i, r) in plan(o.seed, o.kills).iter().enumerate() {
            let t1 = Instant::now();
            let line = round(i, r, o, &mut t, &base)?;
            println!("{line} ms={}", t1.elapsed().as_millis());
        }
        if o.oom {
            println!("{}", oom(o, &mut t, &base)?);
        }
        let f = leakcheck::measure(30)?;
        let bad = leakcheck::problems(&f, Some(&base), o.memfree_tolerance >> 10);
        println!(
            "killloop: at the end: {}",
            leakcheck::verdict_line(&f, Some(&base), &bad)
        );
        t.checks += 1;
        if !bad.is_empty() {
            t.leaks += 1;
        }
        let phases: Vec<String> = t.phases.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "killloop: {} kills, {} not killed, {} leak checks, {} leaks; phases {}; kills after notifier events {}; kills during an earlier teardown {}; slowest walk {} ms; largest MemFree drop {} KiB; {} s",
            t.kills,
            t.not_killed,
            t.checks,
            t.leaks,
            phases.join(" "),
            t.notifier_kills,
            t.overlapped_teardowns,
            t.walk_ms_max,
            t.memfree_drop_max,
            t0.elapsed().as_secs()
        );
        Ok(i32::from(t.leaks != 0 || t.not_killed != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_plan_and_the_kills_asked_for() {
        let a = plan(7, 100);
        assert_eq!(a, plan(7, 100));
        assert_ne!(a, plan(8, 100));
        let kills: u32 = a.iter().map(|r| r.scenario.kills()).sum();
        assert_eq!(kills, 100);
        for s in [
            Scenario::Fault,
            Scenario::Numa,
            Scenario::Munmap,
            Scenario::Teardown,
        ] {
            assert!(a.iter().any(|r| r.scenario == s), "{s:?}");
        }
        for v in 1..=4 {
            assert!(a.iter().any(|r| r.guest.vcpus == v), "{v} vCPUs");
        }
        assert_eq!(plan(1, 1).len(), 1);
        assert_eq!(plan(1, 0).len(), 0);
    }

    #[test]
    fn guests_fit_and_hooks_are_inside_and_aligned() {
        for r in plan(3, 400) {
            let g = r.guest;
            assert!((1..=4).contains(&g.vcpus));
            assert!(g.mib * u64::from(g.vcpus) <= 64);
            if let Some((off, len)) = g.munmap {
                assert_eq!(r.scenario, Scenario::Munmap);
                assert!(len >= 2 && len % 2 == 0 && off % 2 == 0);
                assert!(off + len <= g.mib);
            }
            // The arguments parse and make sense to s2vmm itself.
            let cli = <crate::args::Cli as clap::Parser>::try_parse_from(
                std::iter::once("s2vmm".to_string()).chain(g.args()),
            )
            .unwrap();
            cli.config().unwrap();
        }
    }

    #[test]
    fn phases_from_output() {
        let l = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(phase(&[], false), "starting");
        assert_eq!(phase(&l(&["s2vmm: VM of 18 MiB"]), false), "vm-created");
        assert_eq!(
            phase(&l(&["guest: touch 8 MiB at 0x40200000"]), false),
            "faulting-in"
        );
        assert_eq!(phase(&l(&["guest: passes 1"]), false), "running");
        assert_eq!(
            phase(&l(&["guest: passes 1", "s2vmm: hook munmap"]), false),
            "after-hook"
        );
        assert_eq!(phase(&[], true), "exited-before-kill");
    }
}
