//! `s2vmm scale`: what guest memory costs in hypercalls and stage-2 tables
//! at scale (issue 13), counted with the module's own counters.
//!
//! One measured VM (`--mem`, `--backing`, `--policy`) and any number of
//! other VMs (`--other MEM:BACKING:POLICY`) are created, all held at once.
//! Each is faulted in fully, one after another: the payload's touch mode on
//! as many vCPUs as it needs (at most 1 GiB each) writes one word per 64
//! bytes of its memory; once every vCPU has reported its first pass the
//! vCPUs are stopped (the VMs stay, with every page pinned and mapped).
//! Then, on the measured VM only, with `S2PIN_GET_STATS` before and after
//! each step:
//!
//! * `numa`: NUMA balancing's scanner over the whole memory in one pass
//!   (`scan_size_mb` above the memory, so each 1 GiB PUD of it is one
//!   `MMU_NOTIFY_PROTECTION_VMA` range; the tested memory is placed
//!   1 GiB-aligned in the host for that), driven by a thread of this process
//!   that spins in user mode (the scan runs as task work of the process's
//!   threads), until the module's `kept`/`unmapped_*` counters show that
//!   every pinned page was covered;
//! * `wrprotect`: `mprotect(PROT_READ)` of the tested memory, then back to
//!   read-write;
//! * `munmap`: `munmap` of the tested memory.
//!
//! Then every VM is closed, the measured one last, and the module's debugfs
//! `last_teardown` line after each close gives that teardown's hypercalls.
//! The figures go to stdout as a table and, with `--json`, to a file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::args::{Backing, Policy};
use crate::layout::parse_size;

/// Most tested memory one vCPU of the payload's touch mode covers.
pub const PER_VCPU_MAX: u64 = 1 << 30;
/// Most vCPUs (the payload's).
pub const VCPUS_MAX: u64 = guest::MAX_VCPUS as u64;

/// A step on the measured VM after its fault-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Step {
    /// NUMA balancing's scan over all of it (protection events, nothing unmapped under confirm/keep for pinned 4 KiB pages).
    Numa,
    /// `mprotect(PROT_READ)` of the tested memory, then read-write again.
    Wrprotect,
    /// `munmap` of the tested memory.
    Munmap,
}

impl Step {
    /// Its name in the output.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Numa => "numa",
            Self::Wrprotect => "wrprotect",
            Self::Munmap => "munmap",
        }
    }
}

/// One VM: its tested memory, backing and policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmShape {
    /// Tested bytes (whole MiB, split evenly over its vCPUs).
    pub mem: u64,
    /// Host pages: 4 KiB (`anon`) or THP.
    pub backing: Backing,
    /// The MMU-notifier policy.
    pub policy: Policy,
}

impl VmShape {
    /// vCPUs the touch mode needs: each covers at most 1 GiB, evenly.
    #[must_use]
    pub fn vcpus(&self) -> u32 {
        let n = self.mem.div_ceil(PER_VCPU_MAX).max(1);
        // Each vCPU gets whole MiB.
        let n = (n..=VCPUS_MAX)
            .find(|n| self.mem.is_multiple_of(n << 20))
            .unwrap_or(n);
        u32::try_from(n).unwrap_or(1)
    }

    /// Checks the shape: whole MiB, at most 4 GiB, split evenly in whole
    /// MiB over at most 4 vCPUs, private anonymous memory.
    pub fn check(&self) -> Result<(), String> {
        if self.mem == 0 || !self.mem.is_multiple_of(1 << 20) {
            return Err(format!("{} bytes: expected whole MiB", self.mem));
        }
        if self.mem > VCPUS_MAX * PER_VCPU_MAX {
            return Err(format!(
                "{} MiB: at most {} MiB (the payload's {VCPUS_MAX} vCPUs x 1 GiB)",
                self.mem >> 20,
                (VCPUS_MAX * PER_VCPU_MAX) >> 20
            ));
        }
        let n = u64::from(self.vcpus());
        if !self.mem.is_multiple_of(n << 20) || self.mem / n > PER_VCPU_MAX {
            return Err(format!(
                "{} MiB does not split into at most {VCPUS_MAX} vCPUs of whole MiB up to 1 GiB each",
                self.mem >> 20
            ));
        }
        if self.backing == Backing::Memfd {
            return Err("backing memfd: scale measures private memory (anon or thp)".into());
        }
        Ok(())
    }

    /// `1024M anon confirm`.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "{} MiB {} {}",
            self.mem >> 20,
            backing_name(self.backing),
            policy_name(self.policy)
        )
    }
}

/// `anon`, `thp`, `memfd`.
#[must_use]
pub fn backing_name(b: Backing) -> &'static str {
    match b {
        Backing::Anon => "anon",
        Backing::Thp => "thp",
        Backing::Memfd => "memfd",
    }
}

/// `confirm`, `eager`, `keep`.
#[must_use]
pub fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Confirm => "confirm",
        Policy::Eager => "eager",
        Policy::Keep => "keep",
    }
}

/// `512M:thp:keep` -> a shape (backing and policy optional: anon, confirm).
pub fn parse_shape(s: &str) -> Result<VmShape, String> {
    let mut parts = s.split(':');
    let mem = parts
        .next()
        .and_then(parse_size)
        .ok_or_else(|| format!("`{s}`: expected MEM[:BACKING[:POLICY]], e.g. 512M:thp:keep"))?;
    let backing = match parts.next() {
        None => Backing::Anon,
        Some(b) => Backing::from_str(b, true).map_err(|e| format!("`{s}`: {e}"))?,
    };
    let policy = match parts.next() {
        None => Policy::Confirm,
        Some(p) => Policy::from_str(p, true).map_err(|e| format!("`{s}`: {e}"))?,
    };
    if parts.next().is_some() {
        return Err(format!("`{s}`: expected MEM[:BACKING[:POLICY]]"));
    }
    let shape = VmShape {
        mem,
        backing,
        policy,
    };
    shape.check().map_err(|e| format!("`{s}`: {e}"))?;
    Ok(shape)
}

/// `s2vmm scale` options.
#[derive(Clone, Debug, Args)]
pub struct ScaleArgs {
    /// The guest payload image.
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// The measured VM: tested memory, backing and policy (`MEM[:BACKING[:POLICY]]`, at most 4G, split over up to 4 vCPUs of at most 1 GiB).
    #[arg(long, default_value = "1G:anon:confirm", value_parser = parse_shape)]
    pub vm: VmShape,
    /// Steps on the measured VM after its fault-in, in this order (comma-separated); none: fault-in and teardown only.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub steps: Vec<Step>,
    /// Another VM held at the same time, faulted in fully before the measured one (repeatable): `MEM[:BACKING[:POLICY]]`.
    #[arg(long = "other", value_name = "SHAPE", value_parser = parse_shape)]
    pub others: Vec<VmShape>,
    /// How long the NUMA step waits for the scanner to cover the memory.
    #[arg(long, default_value_t = 300)]
    pub numa_seconds: u64,
    /// How long one VM's fault-in may take.
    #[arg(long, default_value_t = 3600)]
    pub fault_seconds: u64,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// The limit of a range operation's calls: one per 512 pages (or per
/// 2 MiB block) plus `slack`.
#[must_use]
pub fn range_limit(pages: u64, slack: u64) -> u64 {
    pages.div_ceil(512) + slack
}

/// Parses the module's debugfs `last_teardown` line: (hypercalls, reclaim
/// calls, pages unpinned), or `None` for `none` or another format.
#[must_use]
pub fn parse_teardown(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.split("teardown: ").nth(1)?;
    let num_before = |key: &str| -> Option<u64> {
        let i = rest.find(key)?;
        rest[..i]
            .split_whitespace()
            .last()?
            .trim_start_matches('(')
            .parse()
            .ok()
    };
    Some((
        num_before(" hypercalls")?,
        num_before(" HYP_TEARDOWN_RECLAIM")?,
        num_before(" pages unpinned")?,
    ))
}

#[cfg(target_os = "linux")]
pub use sys::run;

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};
    use s2pin_uapi::S2pinVmStats;
    use serde_json::{json, Value};

    use super::{backing_name, parse_teardown, policy_name, range_limit, ScaleArgs, Step, VmShape};
    use crate::args::{Backing, GuestMode};
    use crate::backend::{Backend, Region, VcpuStart, Vm, VmSpec};
    use crate::layout::{Image, Plan, Start, IMAGE_OFFSET, IPA_BITS, PAGE, RAM_BASE, TEST_OFFSET};
    use crate::runner::{self, End, NoHooks, Shared};
    use crate::s2pin::{S2pin, S2pinVm};

    const GIB: usize = 1 << 30;
    const STOP_LIMIT: Duration = Duration::from_secs(30);
    const DEBUGFS: &str = "/sys/kernel/debug/s2pin";
    const NUMA_KNOBS: &str = "/sys/kernel/debug/sched/numa_balancing";
    const NUMA_SYSCTL: &str = "/proc/sys/kernel/numa_balancing";

    fn os(call: &str) -> io::Error {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{call}: {e}"))
    }

    /// A VM's memory: one private anonymous mapping whose tested part
    /// (from `TEST_OFFSET`) starts on a 1 GiB boundary in the host, so
    /// that each GiB of it is one PUD (one protection event of the NUMA
    /// scanner).
    struct Mapping {
        addr: usize,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize, backing: Backing) -> io::Result<Self> {
            let t = usize::try_from(TEST_OFFSET).map_err(io::Error::other)?;
            let reserve = len + GIB;
            // SAFETY: a fresh PROT_NONE reservation the kernel places; checked.
            let r = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    reserve,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(os("mmap (reservation)"));
            }
            let r = r as usize;
            let start = (r + t).next_multiple_of(GIB) - t;
            // SAFETY: head and tail lie inside the reservation just made,
            // which nothing else uses.
            unsafe {
                if start > r {
                    libc::munmap(r as *mut libc::c_void, start - r);
                }
                let end = start + len;
                if r + reserve > end {
                    libc::munmap(end as *mut libc::c_void, r + reserve - end);
                }
            }
            let m = Self { addr: start, len };
            // SAFETY: [start, start + len) is our reservation, replaced in place.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(os("mmap"));
            }
            let advice = if backing == Backing::Thp {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // SAFETY: advice on our own mapping.
            if unsafe { libc::madvise(p, len, advice) } != 0 {
                return Err(os("madvise"));
            }
            Ok(m)
        }

        fn region(&self) -> Region {
            Region {
                slot: 0,
                guest_phys_addr: RAM_BASE,
                memory_size: self.len as u64,
                userspace_addr: self.addr as u64,
                readonly: false,
            }
        }

        fn write(&self, off: usize, data: &[u8]) -> io::Result<()> {
            if off.checked_add(data.len()).is_none_or(|e| e > self.len) {
                return Err(io::Error::other("write beyond guest memory"));
            }
            // SAFETY: inside the mapping (checked); no guest runs yet.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (self.addr + off) as *mut u8,
                    data.len(),
                );
            }
            Ok(())
        }

        fn check(&self, off: usize, len: usize) -> io::Result<*mut libc::c_void> {
            if off.checked_add(len).is_none_or(|e| e > self.len)
                || !off.is_multiple_of(PAGE as usize)
                || !len.is_multiple_of(PAGE as usize)
            {
                return Err(io::Error::other("range outside guest memory"));
            }
            Ok((self.addr + off) as *mut libc::c_void)
        }

        fn protect(&self, off: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
            let a = self.check(off, len)?;
            // SAFETY: a page-aligned range of our own mapping.
            if unsafe { libc::mprotect(a, len, prot) } != 0 {
                return Err(os("mprotect"));
            }
            Ok(())
        }

        fn unmap(&self, off: usize, len: usize) -> io::Result<()> {
            let a = self.check(off, len)?;
            // SAFETY: a page-aligned range of our own mapping; nothing but
            // the stopped guest (through its pins) uses it.
            if unsafe { libc::munmap(a, len) } != 0 {
                return Err(os("munmap"));
            }
            Ok(())
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: our own mapping (holes munmapped already are fine).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    /// Counter changes by name.
    type Delta = Vec<(&'static str, i128)>;

    /// A counter by name; `None` if this module has no such counter.
    fn field(s: &S2pinVmStats, name: &str) -> Option<u64> {
        let i = S2pinVmStats::FIELDS.iter().position(|(n, _)| *n == name)?;
        s.to_array().get(i).copied()
    }

    /// The change of every counter (gauges as their new value's change).
    fn delta(before: &S2pinVmStats, after: &S2pinVmStats) -> Delta {
        crate::stats::delta(before, after)
    }

    fn get(d: &[(&'static str, i128)], name: &str) -> Option<i128> {
        d.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// Hypercalls of a delta: the four `calls_*` counters, if the module has them.
    fn calls(d: &[(&'static str, i128)]) -> Option<i128> {
        [
            "calls_share",
            "calls_unshare",
            "calls_wrprotect",
            "calls_other",
        ]
        .iter()
        .map(|k| get(d, k))
        .sum()
    }

    fn delta_json(d: &[(&'static str, i128)]) -> Value {
        Value::Object(
            d.iter()
                .filter(|(_, v)| *v != 0)
                .map(|(k, v)| ((*k).to_string(), json!(v)))
                .collect(),
        )
    }

    fn fmt_opt(v: Option<i128>) -> String {
        v.map_or_else(|| "n/a".to_string(), |v| v.to_string())
    }

    /// A VM held for the run.
    struct Guest {
        name: String,
        shape: VmShape,
        plan: Plan,
        // Field order: the VM closes before its memory goes.
        vm: Option<S2pinVm>,
        mem: Mapping,
        /// Figures of its fault-in.
        fault: Value,
    }

    fn create(dev: &S2pin, name: &str, shape: VmShape, image: &[u8]) -> anyhow::Result<Guest> {
        let plan = Plan {
            mode: GuestMode::Touch,
            vcpus: shape.vcpus(),
            mem: shape.mem / u64::from(shape.vcpus()),
            reports: 0,
            passes_log2: 0,
        };
        let ram = plan.ram_bytes();
        let mem = Mapping::new(usize::try_from(ram)?, shape.backing)
            .with_context(|| format!("guest memory of {name}"))?;
        mem.write(usize::try_from(IMAGE_OFFSET)?, image)?;
        let vm = dev.create_vm(&VmSpec {
            ipa_bits: IPA_BITS,
            policy: shape.policy,
            mem_base: RAM_BASE,
            mem_size: ram,
        })?;
        vm.set_user_memory_region(&mem.region())?;
        Ok(Guest {
            name: name.to_string(),
            shape,
            plan,
            vm: Some(vm),
            mem,
            fault: Value::Null,
        })
    }

    fn vm(g: &Guest) -> anyhow::Result<&S2pinVm> {
        g.vm.as_ref().context("the VM is closed")
    }

    /// Runs the guest until every vCPU reported its first pass over its
    /// memory, then stops the vCPUs; records the fault-in's figures.
    fn fault_in(g: &mut Guest, img: &Image, limit: Duration) -> anyhow::Result<()> {
        let vm = vm(g)?;
        let before = vm.stats()?;
        let n = g.plan.vcpus;
        let mut vcpus = Vec::new();
        for v in 0..n {
            let (start, later) = match g.plan.start(v, img) {
                Start::On { entry, x0 } => (VcpuStart::On { entry, x0 }, false),
                Start::AfterFirstLine { entry, x0 } => (VcpuStart::On { entry, x0 }, true),
                Start::Off => (VcpuStart::Off, false),
            };
            vcpus.push((vm.create_vcpu(v, start)?, later));
        }
        let hooks = NoHooks;
        let shared = Shared::new(vcpus.len(), &hooks, false);
        runner::expect_threads(&shared, n);
        let want: Vec<String> = (0..n)
            .map(|v| {
                if v == 0 {
                    "guest: passes 1".to_string()
                } else {
                    format!("guest: vcpu{v} passes 1")
                }
            })
            .collect();
        let t0 = Instant::now();
        let mut outcome: Result<(), String> = Ok(());
        std::thread::scope(|s| {
            let shared = &shared;
            for (v, (vcpu, later)) in vcpus.into_iter().enumerate() {
                s.spawn(move || runner::vcpu_thread(v, vcpu, shared, later));
            }
            loop {
                if let Some(end) = shared.wait_end(Some(Duration::from_millis(500))) {
                    outcome = Err(format!("the guest ended before its first pass: {end:?}"));
                    break;
                }
                let done = {
                    let c = shared
                        .console
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    want.iter().all(|w| c.lines.iter().any(|l| l.trim() == w))
                };
                if done {
                    break;
                }
                if t0.elapsed() > limit {
                    outcome = Err(format!("no first pass within {} s", limit.as_secs()));
                    break;
                }
            }
            shared.finish(End::Stopped);
            if !shared.stop_all(STOP_LIMIT) {
                eprintln!(
                    "s2vmm scale: error: vCPU threads of {} did not stop",
                    g.name
                );
                std::process::exit(1);
            }
        });
        shared.flush_console();
        let secs = t0.elapsed().as_secs_f64();
        outcome.map_err(anyhow::Error::msg)?;
        let after = vm.stats()?;
        let d = delta(&before, &after);
        let gib = g.shape.mem as f64 / GIB as f64;
        let tables = field(&after, "el2_rt_table_pages").unwrap_or(0);
        let ram_gib = g.plan.ram_bytes() as f64 / GIB as f64;
        let pages = g.shape.mem / PAGE;
        println!(
            "s2vmm scale: {} ({}) faulted in: {} vCPU(s), {secs:.1} s; faults {}, pages shared {}, blocks {}, HYP_SHARE calls {}, hypercalls {}; stage-2 table pages {tables} ({:.1} per GiB of guest RAM), pinned {}",
            g.name,
            g.shape.describe(),
            n,
            fmt_opt(get(&d, "faults")),
            fmt_opt(get(&d, "shares")),
            fmt_opt(get(&d, "blocks_shared")),
            fmt_opt(get(&d, "calls_share")),
            fmt_opt(calls(&d)),
            tables as f64 / ram_gib,
            field(&after, "pinned_now").unwrap_or(0),
        );
        g.fault = json!({
            "seconds": secs,
            "vcpus": n,
            "tested_pages": pages,
            "tested_gib": gib,
            "ram_bytes": g.plan.ram_bytes(),
            "pinned": field(&after, "pinned_now"),
            "table_pages": tables,
            "table_pages_per_gib": tables as f64 / ram_gib,
            "memcache_pages": field(&after, "el2_rt_memcache_pages"),
            "calls": calls(&d),
            "delta": delta_json(&d),
        });
        Ok(())
    }

    fn read(path: &str) -> io::Result<String> {
        std::fs::read_to_string(path).map(|s| s.trim().to_string())
    }

    fn write(path: &str, value: &str) -> anyhow::Result<()> {
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
    }

    /// NUMA balancing's knobs, to put back afterwards.
    struct Knobs(Vec<(String, String)>);

    impl Knobs {
        /// Turns the scan on: no delay, every 100 ms, `size_mb` per pass.
        fn tight(size_mb: u64) -> anyhow::Result<Self> {
            let mut saved = Vec::new();
            let mut set = |path: String, v: &str| -> anyhow::Result<()> {
                saved.push((path.clone(), read(&path).with_context(|| path.clone())?));
                write(&path, v)
            };
            for (k, v) in [
                ("scan_delay_ms", "0".to_string()),
                ("scan_period_min_ms", "100".to_string()),
                ("scan_period_max_ms", "100".to_string()),
                ("scan_size_mb", size_mb.to_string()),
            ] {
                set(format!("{NUMA_KNOBS}/{k}"), &v)?;
            }
            set(NUMA_SYSCTL.to_string(), "1")?;
            Ok(Self(saved))
        }

        fn restore(self) {
            // The sysctl (saved last) first: the scan stops before the knobs change.
            for (p, v) in self.0.iter().rev() {
                if let Err(e) = write(p, v) {
                    eprintln!("s2vmm scale: {e:#}");
                }
            }
        }
    }

    /// The NUMA step: one thread spins in user mode (so that the scanner's
    /// task work runs in this process) until the module's counters show a
    /// protection event covered every pinned page, or `limit`.
    fn numa(g: &Guest, limit: Duration) -> anyhow::Result<(Delta, f64, bool)> {
        let vm = vm(g)?;
        let before = vm.stats()?;
        let pinned = i128::from(before.pinned_now);
        let size_mb = (g.plan.ram_bytes() >> 20) * 2 + 256;
        if std::fs::metadata(NUMA_SYSCTL).is_err() || std::fs::metadata(NUMA_KNOBS).is_err() {
            bail!("{NUMA_SYSCTL} or {NUMA_KNOBS} is missing (CONFIG_NUMA_BALANCING, debugfs)");
        }
        let knobs = Knobs::tight(size_mb)?;
        let stop = AtomicBool::new(false);
        let t0 = Instant::now();
        let mut covered = false;
        let mut last = before;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
            while t0.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(now) = vm.stats() else { break };
                last = now;
                let d = delta(&before, &now);
                let seen = [
                    "kept",
                    "unmapped_eager",
                    "unmapped_protnone",
                    "unmapped_invalidate",
                ]
                .iter()
                .filter_map(|k| get(&d, k))
                .sum::<i128>();
                if seen >= pinned {
                    covered = true;
                    // Let the pass's range_end calls finish.
                    std::thread::sleep(Duration::from_millis(500));
                    if let Ok(n) = vm.stats() {
                        last = n;
                    }
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        knobs.restore();
        Ok((delta(&before, &last), t0.elapsed().as_secs_f64(), covered))
    }

    fn teardown_line() -> String {
        read(&format!("{DEBUGFS}/last_teardown")).unwrap_or_default()
    }

    /// Closes the VM and waits for the module's `last_teardown` to change.
    fn close(g: &mut Guest) -> Value {
        let old = teardown_line();
        let t0 = Instant::now();
        drop(g.vm.take());
        let mut line = teardown_line();
        while line == old && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(100));
            line = teardown_line();
        }
        let parsed = if line == old {
            None
        } else {
            parse_teardown(&line)
        };
        println!(
            "s2vmm scale: {} ({}) closed: {}",
            g.name,
            g.shape.describe(),
            if line == old {
                "no new last_teardown line within 120 s".to_string()
            } else {
                line.clone()
            }
        );
        json!({
            "line": line,
            "calls": parsed.map(|p| p.0),
            "reclaim_calls": parsed.map(|p| p.1),
            "unpinned": parsed.map(|p| p.2),
            "seconds": t0.elapsed().as_secs_f64(),
        })
    }

    /// A step's JSON and its line.
    fn step_record(step: Step, d: &[(&'static str, i128)], pages: u64, extra: Value) -> Value {
        let c = calls(d);
        println!(
            "s2vmm scale: step {} over {pages} pages: hypercalls {} (HYP_SHARE {}, HYP_UNSHARE(_RANGE) {}, HYP_WRPROTECT {}, other {}); pages/512 = {}; {}",
            step.name(),
            fmt_opt(c),
            fmt_opt(get(d, "calls_share")),
            fmt_opt(get(d, "calls_unshare")),
            fmt_opt(get(d, "calls_wrprotect")),
            fmt_opt(get(d, "calls_other")),
            range_limit(pages, 0),
            d.iter()
                .filter(|(k, v)| *v != 0 && !k.starts_with("calls_"))
                .map(|(k, v)| format!("{k} {v:+}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut j = json!({
            "step": step.name(),
            "pages": pages,
            "calls": c,
            "calls_share": get(d, "calls_share"),
            "calls_unshare": get(d, "calls_unshare"),
            "calls_wrprotect": get(d, "calls_wrprotect"),
            "calls_other": get(d, "calls_other"),
            "delta": delta_json(d),
        });
        if let (Some(o), Value::Object(e)) = (j.as_object_mut(), extra) {
            o.extend(e);
        }
        j
    }

    /// `s2vmm scale`: returns the exit status (0: every step ran).
    pub fn run(a: &ScaleArgs) -> anyhow::Result<i32> {
        let image = std::fs::read(&a.image).with_context(|| format!("{}", a.image.display()))?;
        let img = Image::parse(&image).with_context(|| format!("{}", a.image.display()))?;
        runner::install_kick_handler().map_err(anyhow::Error::msg)?;
        let dev = S2pin::open()?;
        let limit = Duration::from_secs(a.fault_seconds);
        let t0 = Instant::now();
        let mut guests: Vec<Guest> = Vec::new();
        for (i, shape) in a.others.iter().enumerate() {
            let mut g = create(&dev, &format!("VM {}", i + 1), *shape, &image)?;
            fault_in(&mut g, &img, limit)?;
            guests.push(g);
        }
        let mut main = create(&dev, "measured VM", a.vm, &image)?;
        fault_in(&mut main, &img, limit)?;
        println!(
            "s2vmm scale: {} VMs held at once, {} MiB of guest memory faulted in, pinned in all: {} pages",
            guests.len() + 1,
            (guests.iter().map(|g| g.plan.ram_bytes()).sum::<u64>() + main.plan.ram_bytes()) >> 20,
            std::fs::read_to_string(format!("{DEBUGFS}/pinned")).unwrap_or_default().trim()
        );
        let pages = a.vm.mem / PAGE;
        let (off, len) = (usize::try_from(TEST_OFFSET)?, usize::try_from(a.vm.mem)?);
        let mut steps = Vec::new();
        let mut ok = true;
        for step in &a.steps {
            let vmh = vm(&main)?;
            let rec = match step {
                Step::Numa => {
                    let (d, secs, covered) = numa(&main, Duration::from_secs(a.numa_seconds))?;
                    if !covered {
                        println!(
                            "s2vmm scale: step numa: the scanner did not cover every pinned page within {} s",
                            a.numa_seconds
                        );
                        ok = false;
                    }
                    step_record(
                        *step,
                        &d,
                        pages,
                        json!({ "seconds": secs, "covered": covered,
                                "pud_ranges": a.vm.mem.div_ceil(GIB as u64) }),
                    )
                }
                Step::Wrprotect => {
                    let before = vmh.stats()?;
                    main.mem.protect(off, len, libc::PROT_READ)?;
                    let mid = vmh.stats()?;
                    main.mem
                        .protect(off, len, libc::PROT_READ | libc::PROT_WRITE)?;
                    let after = vmh.stats()?;
                    let back = delta(&mid, &after);
                    println!(
                        "s2vmm scale: step wrprotect: back to read-write: hypercalls {}",
                        fmt_opt(calls(&back))
                    );
                    step_record(
                        *step,
                        &delta(&before, &mid),
                        pages,
                        json!({ "restore_calls": calls(&back), "restore_delta": delta_json(&back) }),
                    )
                }
                Step::Munmap => {
                    let before = vmh.stats()?;
                    main.mem.unmap(off, len)?;
                    let after = vmh.stats()?;
                    step_record(*step, &delta(&before, &after), pages, json!({}))
                }
            };
            steps.push(rec);
        }
        // Teardown: the others first, the measured VM last.
        let mut closed = Vec::new();
        for g in guests.iter_mut().chain(std::iter::once(&mut main)) {
            closed.push(close(g));
        }
        let pinned_after = read(&format!("{DEBUGFS}/pinned")).unwrap_or_default();
        let vms_after = read(&format!("{DEBUGFS}/vms")).unwrap_or_default();
        println!(
            "s2vmm scale: all closed after {:.0} s: module pinned {pinned_after}, VMs {vms_after}",
            t0.elapsed().as_secs_f64()
        );
        let vm_json = |g: &Guest, c: &Value| {
            json!({
                "name": g.name,
                "mem_mib": g.shape.mem >> 20,
                "backing": backing_name(g.shape.backing),
                "policy": policy_name(g.shape.policy),
                "fault_in": g.fault,
                "teardown": c,
            })
        };
        let vms: Vec<Value> = guests
            .iter()
            .chain(std::iter::once(&main))
            .zip(&closed)
            .map(|(g, c)| vm_json(g, c))
            .collect();
        let j = json!({
            "vms": vms,
            "measured": vms.last(),
            "steps": steps,
            "pinned_after": pinned_after,
            "vms_after": vms_after,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        if let Some(path) = &a.json {
            std::fs::write(path, format!("{j:#}\n"))
                .with_context(|| format!("{}", path.display()))?;
        }
        println!("s2vmm scale: {}", if ok { "DONE" } else { "INCOMPLETE" });
        Ok(i32::from(!ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_split_over_vcpus() {
        let s = parse_shape("4G:thp:keep").unwrap();
        assert_eq!(
            (s.mem, s.backing, s.policy, s.vcpus()),
            (4 << 30, Backing::Thp, Policy::Keep, 4)
        );
        let s = parse_shape("1G").unwrap();
        assert_eq!(
            (s.backing, s.policy, s.vcpus()),
            (Backing::Anon, Policy::Confirm, 1)
        );
        assert_eq!(parse_shape("1536M").unwrap().vcpus(), 2);
        assert_eq!(parse_shape("3G:anon:eager").unwrap().vcpus(), 3);
        assert_eq!(parse_shape("64M:thp").unwrap().vcpus(), 1);
        assert!(parse_shape("5G").is_err());
        assert!(parse_shape("1G:memfd").is_err());
        assert!(parse_shape("1G:anon:lazy").is_err());
        assert!(parse_shape("1G:anon:keep:x").is_err());
        assert!(parse_shape("100K").is_err());
        assert!(parse_shape("").is_err());
        // 1025 MiB needs 2 vCPUs of 512.5 MiB: refused.
        assert!(parse_shape("1025M").is_err());
    }

    #[test]
    fn limits_and_teardown_lines() {
        assert_eq!(range_limit(262_144, 0), 512);
        assert_eq!(range_limit(262_145, 3), 516);
        assert_eq!(range_limit(0, 2), 2);
        let line = "VM 0x3 teardown: 516 hypercalls (514 HYP_TEARDOWN_RECLAIM), at most 512 page updates in one, 262171 pages unpinned";
        assert_eq!(parse_teardown(line), Some((516, 514, 262_171)));
        let with_calls = format!("{line}; calls=516");
        assert_eq!(parse_teardown(&with_calls), Some((516, 514, 262_171)));
        assert_eq!(parse_teardown("none"), None);
        assert_eq!(parse_teardown("VM 0x3 teardown: x hypercalls"), None);
    }
}
