//! `s2vmm --image ...`: one guest run on `/dev/s2pin`, start to end, with
//! the test hooks and the final counters.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use s2pin_uapi::SystemEventType;
use serde_json::{json, Value};

use crate::args::{Config, Device, GuestMode, HookAction};
use crate::backend::{Backend, VcpuStart, Vm, VmSpec};
use crate::layout::{
    Image, Plan, Range, Start, IMAGE_OFFSET, IPA_BITS, PAGE, RAM_BASE, TEST_OFFSET,
};
use crate::memory::GuestMemory;
use crate::runner::{self, End, Hooks, Shared};
use crate::s2pin::S2pin;
use crate::stats::{self, Report};

/// How long stopping the vCPU threads may take before s2vmm gives up.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// The test hooks of one run.
#[derive(Debug)]
struct HookRunner<'a> {
    cfg: &'a Config,
    mem: &'a GuestMemory,
    trigger: Mutex<Option<u32>>,
    trigger_cv: Condvar,
    /// The mprotect'ed range and whether it was restored.
    protected: Mutex<Option<(Range, bool)>>,
    fixed: AtomicU32,
    result: Mutex<Vec<(String, Value)>>,
}

impl Hooks for HookRunner<'_> {
    fn report(&self, n: u32) {
        if n == u32::from(self.cfg.hook_at) {
            *self
                .trigger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(n);
            self.trigger_cv.notify_all();
        }
    }

    fn fix_fault(&self, gpa: u64, write: bool) -> bool {
        let mut p = self
            .protected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((r, restored)) = p.as_mut() else {
            return false;
        };
        let first = RAM_BASE + TEST_OFFSET + r.offset;
        if !(first..first + r.len).contains(&gpa) {
            return false;
        }
        self.fixed.fetch_add(1, Ordering::SeqCst);
        if !*restored {
            let whole = Range {
                offset: TEST_OFFSET + r.offset,
                len: r.len,
            };
            if let Err(e) = self.mem.protect(whole, None) {
                eprintln!("s2vmm: restoring read-write after the guest's fault: {e}");
                return false;
            }
            *restored = true;
            println!(
                "s2vmm: hook: guest {} fault at gpa {gpa:#x} inside the protected range: restored read-write",
                if write { "write" } else { "read" }
            );
        }
        true
    }
}

impl<'a> HookRunner<'a> {
    fn new(cfg: &'a Config, mem: &'a GuestMemory) -> Self {
        Self {
            cfg,
            mem,
            trigger: Mutex::new(None),
            trigger_cv: Condvar::new(),
            protected: Mutex::new(None),
            fixed: AtomicU32::new(0),
            result: Mutex::new(Vec::new()),
        }
    }

    fn wake(&self) {
        self.trigger_cv.notify_all();
    }

    fn record(&self, key: &str, v: Value) {
        self.result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((key.to_string(), v));
    }

    /// Waits for the trigger, then does the hook while the guest runs.
    fn thread<V: Vm>(&self, vm: &V, shared: &Shared<'_>) {
        {
            let mut t = self
                .trigger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while t.is_none() && !shared.stopped() {
                t = self
                    .trigger_cv
                    .wait_timeout(t, Duration::from_millis(50))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            if t.is_none() {
                return;
            }
        }
        if let Some(path) = &self.cfg.dump_pfns {
            match self.dump_pfns(path) {
                Ok(n) => println!(
                    "s2vmm: wrote {n} host frame numbers of guest memory to {}",
                    path.display()
                ),
                Err(e) => {
                    shared.finish(End::Error(format!("--dump-pfns {}: {e:#}", path.display())));
                    return;
                }
            }
        }
        let Some(action) = self.cfg.hook else {
            return;
        };
        let r = action.range();
        let whole = Range {
            offset: TEST_OFFSET + r.offset,
            len: r.len,
        };
        // munmap pauses the vCPUs (the range is briefly unmapped); mprotect
        // too, so that the counters show the system call's effect alone, not
        // the guest's next fault. MADV_DONTNEED runs while the guest runs
        // (its faults race with the invalidation).
        let pause = !matches!(action, HookAction::DontNeed(_));
        if pause && !shared.pause_all(STOP_LIMIT) {
            shared.finish(End::Error(format!(
                "hook {}: the vCPUs did not pause",
                action.name()
            )));
            return;
        }
        let before = vm.stats();
        let done = match action {
            HookAction::DontNeed(_) => self.mem.dontneed(whole),
            HookAction::Munmap(_) => self.mem.munmap_remap(whole),
            HookAction::Mprotect(_, prot) => {
                *self
                    .protected
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((r, false));
                self.mem.protect(whole, Some(prot))
            }
        };
        let after = vm.stats();
        if pause {
            shared.resume_all();
        }
        if let Err(e) = done {
            shared.finish(End::Error(format!("hook {}: {e}", action.name())));
            return;
        }
        let (Ok(before), Ok(after)) = (before, after) else {
            shared.finish(End::Error(format!(
                "hook {}: S2PIN_GET_STATS failed",
                action.name()
            )));
            return;
        };
        let delta = runner::nonzero_delta(&before, &after);
        let mut line = format!(
            "s2vmm: hook {} {} ({} pages) after report {}:",
            action.name(),
            r,
            r.pages(),
            self.cfg.hook_at
        );
        for (k, d) in &delta {
            line.push_str(&format!(" d_{k}={d}"));
        }
        println!("{line}");
        let d: serde_json::Map<String, Value> = delta
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    json!(i64::try_from(*v).unwrap_or(i64::MAX)),
                )
            })
            .collect();
        self.record(
            "action",
            json!({"name": action.name(), "offset": r.offset, "len": r.len, "pages": r.pages(), "delta": d}),
        );
    }

    fn dump_pfns(&self, path: &Path) -> anyhow::Result<usize> {
        let tested = self.mem.len() as u64 - TEST_OFFSET;
        let pfns = self.mem.pfns(TEST_OFFSET, tested)?;
        let text: String = pfns
            .iter()
            .filter(|p| **p != 0)
            .map(|p| format!("{p:#x}\n"))
            .collect();
        std::fs::write(path, &text)?;
        Ok(text.lines().count())
    }

    /// After a guest that shut down by itself in touch mode: vCPU 0's words
    /// must all hold its pass count, except in a dropped or remapped range,
    /// whose words restarted from zero (fewer passes, but some).
    fn check_contents(&self, plan: &Plan) -> Option<(bool, String)> {
        let action = self.cfg.hook?;
        let r = action.range();
        if plan.mode != GuestMode::Touch || plan.reports == 0 || r.end()? > plan.mem {
            return None;
        }
        let total = u64::from(plan.reports) << plan.passes_log2;
        let zeroing = matches!(action, HookAction::DontNeed(_) | HookAction::Munmap(_));
        let stride = guest::TOUCH_STRIDE as u64;
        let (mut inside_min, mut inside_max, mut bad_outside) = (u64::MAX, 0, 0u64);
        let mut first_bad = None;
        for off in (0..plan.mem).step_by(stride as usize) {
            let v = self.mem.read_u64(TEST_OFFSET + off)?;
            let inside = (r.offset..r.offset + r.len).contains(&off);
            if inside && zeroing {
                inside_min = inside_min.min(v);
                inside_max = inside_max.max(v);
            } else if v != total {
                bad_outside += 1;
                first_bad.get_or_insert((off, v));
            }
        }
        let ok_inside = !zeroing || (inside_min > 0 && inside_max < total);
        let ok = ok_inside && bad_outside == 0;
        let msg = if zeroing {
            format!(
                "words of the {} range restarted from zero: {inside_min}..={inside_max} passes (< {total}); \
                 other words {total}: {} differ{}",
                action.name(),
                bad_outside,
                first_bad.map_or(String::new(), |(o, v)| format!(" (first at {o:#x}: {v})"))
            )
        } else {
            format!(
                "every word holds {total} passes after {}: {} differ{}",
                action.name(),
                bad_outside,
                first_bad.map_or(String::new(), |(o, v)| format!(" (first at {o:#x}: {v})"))
            )
        };
        Some((ok, msg))
    }
}

fn read_vmstat() -> std::collections::BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/vmstat")
        .map(|t| stats::parse_vmstat(&t))
        .unwrap_or_default()
}

/// The module's debugfs folder of this process's VM and its files.
fn debugfs() -> Option<(String, Vec<(String, String)>)> {
    let root = Path::new("/sys/kernel/debug/s2pin");
    let prefix = format!("{}-", std::process::id());
    let dir = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir.path())
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|f| {
            let content = std::fs::read_to_string(f.path()).ok()?;
            Some((f.file_name().to_string_lossy().into_owned(), content))
        })
        .collect();
    files.sort();
    Some((dir.file_name().to_string_lossy().into_owned(), files))
}

fn policy_name(cfg: &Config) -> &'static str {
    match cfg.policy {
        crate::args::Policy::Confirm => "confirm",
        crate::args::Policy::Eager => "eager",
        crate::args::Policy::Keep => "keep",
    }
}

fn backing_name(cfg: &Config) -> &'static str {
    match cfg.backing {
        crate::args::Backing::Anon => "anon",
        crate::args::Backing::Thp => "thp",
        crate::args::Backing::Memfd => "memfd",
    }
}

/// Runs the guest as `cfg` says, on the device it names; returns the exit
/// status.
pub fn run(cfg: &Config) -> anyhow::Result<i32> {
    match cfg.device {
        Device::S2pin => run_on(cfg, &S2pin::open()?),
        #[cfg(target_arch = "aarch64")]
        Device::Kvm => run_on(cfg, &crate::kvm::KvmDevice::open()?),
        #[cfg(not(target_arch = "aarch64"))]
        Device::Kvm => bail!("--device kvm needs arm64 KVM"),
    }
}

/// The payload's argument with the UART console (stock KVM has no s2pin
/// guest calls: console bytes go to the UART, power-off is PSCI).
fn with_uart(x0: u64) -> u64 {
    guest::Arg::decode(x0).map_or(x0, |mut a| {
        a.uart = true;
        a.encode()
    })
}

fn run_on<B: Backend>(cfg: &Config, dev: &B) -> anyhow::Result<i32> {
    let image = std::fs::read(&cfg.image).with_context(|| format!("{}", cfg.image.display()))?;
    let img = Image::parse(&image).with_context(|| format!("{}", cfg.image.display()))?;
    let plan = Plan {
        mode: cfg.mode,
        vcpus: cfg.vcpus,
        mem: cfg.mem,
        reports: cfg.reports,
        passes_log2: cfg.passes_log2,
    };
    let ram = plan.ram_bytes();
    let mem = GuestMemory::new(usize::try_from(ram)?, cfg.backing, cfg.node)
        .context("mapping guest memory")?;
    if cfg.place {
        mem.place().context("placing guest memory on its node")?;
    }
    mem.write(IMAGE_OFFSET, &image)?;
    runner::install_kick_handler().map_err(anyhow::Error::msg)?;

    let vm = dev.create_vm(&VmSpec {
        ipa_bits: IPA_BITS,
        policy: cfg.policy,
        mem_base: RAM_BASE,
        mem_size: ram,
    })?;
    vm.set_user_memory_region(&mem.ram_slot())?;
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let (start, after) = match plan.start(i, &img) {
            Start::On { entry, x0 } => (VcpuStart::On { entry, x0 }, false),
            Start::AfterFirstLine { entry, x0 } => (VcpuStart::On { entry, x0 }, true),
            Start::Off => (VcpuStart::Off, false),
        };
        let start = match start {
            VcpuStart::On { entry, x0 } if i == 0 && cfg.device == Device::Kvm => VcpuStart::On {
                entry,
                x0: with_uart(x0),
            },
            other => other,
        };
        vcpus.push((vm.create_vcpu(i, start)?, after));
    }
    println!(
        "s2vmm: guest memory at host address {:#x}+{:#x}",
        mem.addr(),
        mem.len()
    );
    println!(
        "s2vmm: VM of {} MiB at IPA {RAM_BASE:#x} (tested {} MiB from {:#x}), {} vCPU(s), policy {}, backing {}{}",
        ram >> 20,
        plan.tested_bytes() >> 20,
        RAM_BASE + TEST_OFFSET,
        cfg.vcpus,
        policy_name(cfg),
        backing_name(cfg),
        cfg.node.map_or(String::new(), |n| format!(
            ", {} node {n}",
            if cfg.place { "placed on" } else { "bound to" }
        ))
    );

    let vmstat0 = read_vmstat();
    let hooks = HookRunner::new(cfg, &mem);
    let shared = Shared::new(vcpus.len(), &hooks, true);
    runner::expect_threads(&shared, cfg.vcpus);
    let t0 = Instant::now();
    let mut stuck = false;
    std::thread::scope(|s| {
        let shared = &shared;
        for (i, (v, after)) in vcpus.into_iter().enumerate() {
            s.spawn(move || runner::vcpu_thread(i, v, shared, after));
        }
        let want_hook = cfg.hook.is_some() || cfg.dump_pfns.is_some();
        let (hooks, vm) = (&hooks, &vm);
        if want_hook {
            s.spawn(move || hooks.thread(vm, shared));
        }
        if shared
            .wait_end(cfg.seconds.map(Duration::from_secs))
            .is_none()
        {
            shared.finish(End::Stopped);
        }
        stuck = !shared.stop_all(STOP_LIMIT);
        hooks.wake();
        if stuck {
            eprintln!(
                "s2vmm: error: the vCPU threads did not stop within {} s",
                STOP_LIMIT.as_secs()
            );
            std::process::exit(1);
        }
    });
    let elapsed = t0.elapsed();
    shared.flush_console();
    let end = shared.end().unwrap_or(End::Stopped);

    let vm_stats = vm.stats();
    let vmstat1 = read_vmstat();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let verdict = shared
        .console
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .verdict
        .clone();
    let contents = match end {
        End::Guest(_) => hooks.check_contents(&plan),
        End::Stopped | End::Error(_) => None,
    };
    // Where the tested memory lives now (pages not present are left out).
    let tested = ram - TEST_OFFSET;
    let mut nodes = std::collections::BTreeMap::new();
    if let Ok(list) = mem.nodes(TEST_OFFSET, tested) {
        for n in list.into_iter().filter(|n| *n >= 0) {
            *nodes.entry(n).or_insert(0u64) += 1;
        }
    }
    let mut report = Report {
        config: vec![
            (
                "policy",
                if cfg.device == Device::Kvm {
                    "kvm".into()
                } else {
                    policy_name(cfg).into()
                },
            ),
            ("backing", backing_name(cfg).into()),
            ("vcpus", cfg.vcpus.to_string()),
            ("mem_mib", (cfg.mem >> 20).to_string()),
            ("ram_pages", (ram / PAGE).to_string()),
        ],
        vm: vm_stats.as_ref().copied().unwrap_or_default(),
        debugfs: debugfs(),
        locked_vm_kib: stats::status_kib(&status, "VmLck"),
        vmstat: stats::VMSTAT_KEYS
            .iter()
            .map(|k| {
                let a = vmstat1.get(*k).copied().unwrap_or(0);
                let b = vmstat0.get(*k).copied().unwrap_or(0);
                (*k, i128::from(a) - i128::from(b))
            })
            .collect(),
        nodes: nodes.into_iter().collect(),
        guest: Vec::new(),
        hook: hooks
            .result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    };
    if let Some(n) = cfg.node {
        report.config.push(("node", n.to_string()));
    }
    let end_text = match &end {
        End::Guest(t) => match SystemEventType::from_u32(*t) {
            Some(SystemEventType::Shutdown) => "shut down".to_string(),
            Some(SystemEventType::SystemOff) => "powered off".to_string(),
            Some(SystemEventType::SystemReset) => "reset".to_string(),
            None => format!("stopped (system event {t})"),
        },
        End::Stopped => "was stopped by s2vmm".to_string(),
        End::Error(e) => format!("failed: {e}"),
    };
    let mut ok = verdict.ok() && !matches!(end, End::Error(_));
    if let Some((c_ok, msg)) = &contents {
        println!(
            "s2vmm: memory check {}: {msg}",
            if *c_ok { "PASS" } else { "FAIL" }
        );
        ok &= *c_ok;
        report.hook.push(("contents_ok".into(), json!(c_ok)));
    }
    report.hook.push((
        "faults_fixed".into(),
        json!(hooks.fixed.load(Ordering::SeqCst)),
    ));
    report.guest = vec![
        ("end", json!(end_text)),
        ("seconds", json!(elapsed.as_secs_f64())),
        ("passes", json!(verdict.passes)),
        ("failures", json!(verdict.failures)),
        ("reports", json!(verdict.reports)),
        ("checksums", json!(verdict.checksums)),
        ("status", json!(i32::from(!ok))),
    ];
    let s = &report.vm;
    println!(
        "s2vmm: the guest {end_text} after {:.1} s: {}; pinned {} pages ({} pins, {} faults, {} unshares), locked_vm {} KiB",
        elapsed.as_secs_f64(),
        if ok { "PASS" } else { "FAIL" },
        s.pinned_now,
        s.pins,
        s.faults,
        s.unshares,
        report.locked_vm_kib.map_or("?".into(), |k| k.to_string())
    );
    if cfg.stats {
        print!("{}", report.text());
    }
    if let Some(path) = &cfg.stats_json {
        std::fs::write(path, format!("{:#}\n", report.json()))
            .with_context(|| format!("--stats-json {}", path.display()))?;
    }
    if let Err(e) = vm_stats {
        bail!("{e}");
    }
    if let End::Error(e) = &end {
        eprintln!("s2vmm: error: {e}");
    }
    Ok(i32::from(!ok))
}
