//! `s2vmm soak`: several VMs at once, each filling and verifying its
//! memory round after round, while a VMM thread per VM changes the host
//! mappings of that memory at random.
//!
//! A round is one VM from creation to teardown: the guest payload's fill
//! mode (on two vCPUs each fills half, vCPU 0 checks both with the
//! checksum), then the VMM checks every word of the tested memory itself
//! against the payload's pattern, so that a guest write that landed in a
//! frame the VMM no longer maps (a stale stage-2 entry) is caught even if
//! the guest's own check passed. The tested memory is dropped before each
//! round, so the words must come from this round's guest.
//!
//! Meanwhile the VM's chaos thread picks, every few tens of milliseconds, a
//! random page range of the tested memory and
//! * `mprotect`s it read-only or `PROT_NONE` (the guest's next access
//!   exits as a host-denied memory fault; the VMM restores read-write and
//!   runs the vCPU again), or flips it read-only and back at once, racing
//!   the guest's faults;
//! * or, with the vCPUs paused, saves its contents, `MADV_DONTNEED`s it (or
//!   replaces it by a fresh mapping) and writes the contents back: the module
//!   must unshare the old frames and the guest's next touches map the new
//!   ones, with the data it wrote.
//!
//! VM `i` uses policy confirm/eager/keep (`i % 3`) and backing
//! thp/anon/memfd/thp (`i % 4`). The end: rounds, operations of each kind,
//! checksum failures (guest and VMM; must be 0), round errors (must be 0),
//! and the VMs' counters summed over all rounds (the EL2 ones included).

use std::path::PathBuf;

use clap::Args;

use crate::layout::parse_size;

/// `s2vmm soak` options.
#[derive(Clone, Debug, Args)]
pub struct SoakArgs {
    /// The guest payload image.
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// VMs running at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub vms: u32,
    /// vCPUs per VM (the fill mode runs on 1 or 2).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub vcpus: u32,
    /// Tested memory per VM (whole MiB).
    #[arg(long, default_value = "4M", value_parser = |s: &str| parse_size(s).filter(|m| *m >= 1 << 20 && m.is_multiple_of(1 << 20)).ok_or("expected whole MiB, e.g. 16M"))]
    pub mem: u64,
    /// How long to soak; rounds running at the end finish first.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the chaos threads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mean milliseconds between two changes of one VM's memory.
    #[arg(long, default_value_t = 50)]
    pub chaos_ms: u64,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[cfg(target_os = "linux")]
pub use sys::run;

#[cfg(target_os = "linux")]
mod sys {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use s2pin_uapi::{S2pinVmStats, STATS_COUNT};
    use serde_json::json;

    use super::SoakArgs;
    use crate::args::{Backing, GuestMode, Policy, Prot};
    use crate::backend::{Backend, VcpuStart, Vm, VmSpec};
    use crate::fuzz::Rng;
    use crate::layout::{
        Image, Plan, Range, Start, IMAGE_OFFSET, IPA_BITS, PAGE, RAM_BASE, TEST_OFFSET,
    };
    use crate::memory::GuestMemory;
    use crate::runner::{self, End, Hooks, Shared};
    use crate::s2pin::S2pin;

    /// A round that takes longer than this failed (under TCG on a busy
    /// 2-core machine, a 16 MiB round took 85 to 120 s).
    const ROUND_LIMIT: Duration = Duration::from_secs(600);
    const STOP_LIMIT: Duration = Duration::from_secs(30);
    /// How long the chaos thread waits for the vCPUs to pause. A vCPU
    /// leaves RUN at the kick signal, but a fault in progress finishes
    /// first, and with THP defrag `always` under memory pressure that is a
    /// direct compaction, which took over 30 s under TCG once.
    const PAUSE_LIMIT: Duration = Duration::from_secs(120);
    /// The guest shuts down right after printing its verdict: a round whose
    /// end does not follow within this failed.
    const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kinds of change, for the counts.
    const OPS: [&str; 6] = [
        "mprotect_ro",
        "mprotect_none",
        "mprotect_flip",
        "dontneed",
        "remap",
        "faults_fixed",
    ];

    /// Figures over every VM and round.
    #[derive(Debug, Default)]
    struct Totals {
        rounds: u64,
        rounds_failed: u64,
        guest_checksum_failures: u64,
        vmm_word_mismatches: u64,
        vmm_rounds_mismatched: u64,
        /// The longest wait for a VM's vCPUs to pause.
        longest_pause: Duration,
        ops: [u64; OPS.len()],
        counters: Vec<u64>,
        errors: Vec<String>,
    }

    /// Replaces `r` of `mem` by a fresh mapping in one `mmap(MAP_FIXED)`,
    /// which unmaps the old pages as `munmap` does (the module sees the same
    /// `MMU_NOTIFY_UNMAP`). Not `munmap` then `mmap`: with other VMs' threads
    /// mapping memory meanwhile, the hole could be taken by one of their
    /// mappings, which the fixed mapping would then clobber. A memfd range
    /// becomes shared anonymous memory (shmem as well).
    fn remap(mem: &GuestMemory, backing: Backing, r: Range) -> std::io::Result<()> {
        let end = r.offset.checked_add(r.len);
        if !r.is_page_aligned() || end.is_none_or(|e| e > mem.len() as u64) {
            return Err(std::io::Error::other("remap outside guest memory"));
        }
        let addr = (mem.addr() + r.offset) as *mut libc::c_void;
        let len = usize::try_from(r.len).map_err(std::io::Error::other)?;
        let share = match backing {
            Backing::Memfd => libc::MAP_SHARED,
            Backing::Anon | Backing::Thp => libc::MAP_PRIVATE,
        };
        // SAFETY: [addr, addr + len) lies inside the guest memory mapping
        // (checked above), which MAP_FIXED replaces in place; the vCPUs are
        // paused and nothing else holds references into it.
        let m = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                share | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let advice = match backing {
            Backing::Anon => libc::MADV_NOHUGEPAGE,
            Backing::Thp => libc::MADV_HUGEPAGE,
            Backing::Memfd => return Ok(()),
        };
        // SAFETY: advice on the mapping just made. A kernel without THP
        // refuses it; that changes nothing here.
        unsafe { libc::madvise(addr, len, advice) };
        Ok(())
    }

    /// The VM's hooks: ranges protected this round, restored at the guest's fault.
    struct Chaos<'a> {
        mem: &'a GuestMemory,
        backing: Backing,
        /// The range protected now, if any.
        current: Mutex<Option<Range>>,
        /// Every range protected this round (a fault may arrive after the
        /// chaos thread restored its range: the vCPU just runs again).
        seen: Mutex<Vec<Range>>,
        fixed: AtomicU64,
    }

    impl Hooks for Chaos<'_> {
        fn fix_fault(&self, gpa: u64, _write: bool) -> bool {
            let Some(off) = gpa.checked_sub(RAM_BASE) else {
                return false;
            };
            let inside = |r: &Range| (r.offset..r.offset + r.len).contains(&off);
            if !lock(&self.seen).iter().any(inside) {
                return false;
            }
            let mut cur = lock(&self.current);
            if let Some(r) = *cur {
                if inside(&r) {
                    if self.mem.protect(r, None).is_err() {
                        return false;
                    }
                    *cur = None;
                }
            }
            self.fixed.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    impl Chaos<'_> {
        fn restore(&self) -> std::io::Result<()> {
            let mut cur = lock(&self.current);
            if let Some(r) = cur.take() {
                self.mem.protect(r, None)?;
            }
            Ok(())
        }

        fn protect(&self, r: Range, p: Prot) -> std::io::Result<()> {
            self.restore()?;
            lock(&self.seen).push(r);
            let mut cur = lock(&self.current);
            self.mem.protect(r, Some(p))?;
            *cur = Some(r);
            Ok(())
        }

        /// A random range of the tested memory: 1 to 512 pages, or an
        /// aligned 2 MiB.
        fn range(&self, rng: &mut Rng) -> Range {
            let pages = (self.mem.len() as u64 - TEST_OFFSET) / PAGE;
            if pages >= 512 && rng.chance(1, 4) {
                let huge = rng.below(pages / 512);
                return Range {
                    offset: TEST_OFFSET + huge * (2 << 20),
                    len: 2 << 20,
                };
            }
            let first = rng.below(pages);
            let n = 1 + rng.below((pages - first).min(512));
            Range {
                offset: TEST_OFFSET + first * PAGE,
                len: n * PAGE,
            }
        }

        /// Saves `r`, drops or replaces it, writes the contents back (vCPUs paused).
        fn drop_keep(&self, r: Range, replace: bool) -> std::io::Result<()> {
            let words = usize::try_from(r.len / 8).unwrap_or(0);
            let mut saved = Vec::with_capacity(r.len as usize);
            for i in 0..words {
                let w = self
                    .mem
                    .read_u64(r.offset + 8 * i as u64)
                    .ok_or_else(|| std::io::Error::other("reading guest memory"))?;
                saved.extend_from_slice(&w.to_le_bytes());
            }
            if replace {
                remap(self.mem, self.backing, r)?;
            } else {
                self.mem.dontneed(r)?;
            }
            self.mem.write(r.offset, &saved)
        }

        /// Changes the memory at random until the round stops; counts into
        /// `ops`; returns the longest wait for the vCPUs to pause.
        fn thread(
            &self,
            shared: &Shared<'_>,
            rng: &mut Rng,
            mean_ms: u64,
            ops: &mut [u64; OPS.len()],
        ) -> Duration {
            let mut longest = Duration::ZERO;
            while !shared.stopped() {
                let nap = rng.below(2 * mean_ms.max(1)) + 1;
                std::thread::sleep(Duration::from_millis(nap));
                if shared.stopped() {
                    break;
                }
                let r = self.range(rng);
                let op = usize::try_from(rng.below(5)).unwrap_or(0);
                let res = match op {
                    0 => self.protect(r, Prot::ReadOnly),
                    1 => self.protect(r, Prot::None),
                    2 => self.restore().and_then(|()| {
                        lock(&self.seen).push(r);
                        self.mem.protect(r, Some(Prot::ReadOnly))?;
                        self.mem.protect(r, None)
                    }),
                    _ => {
                        let t = Instant::now();
                        if !shared.pause_all(PAUSE_LIMIT) {
                            shared.finish(End::Error(format!(
                                "the vCPUs did not pause within {} s",
                                PAUSE_LIMIT.as_secs()
                            )));
                            break;
                        }
                        longest = longest.max(t.elapsed());
                        let res = self.restore().and_then(|()| self.drop_keep(r, op == 4));
                        shared.resume_all();
                        res
                    }
                };
                if let Err(e) = res {
                    shared.finish(End::Error(format!("chaos {} {r}: {e}", OPS[op])));
                    break;
                }
                ops[op] += 1;
            }
            longest
        }
    }

    /// What one VM slot uses.
    fn setup(i: u32) -> (Policy, Backing) {
        let p = [Policy::Confirm, Policy::Eager, Policy::Keep][(i % 3) as usize];
        let b = [Backing::Thp, Backing::Anon, Backing::Memfd, Backing::Thp][(i % 4) as usize];
        (p, b)
    }

    /// What every round of every VM shares.
    struct Common<'a> {
        dev: &'a S2pin,
        a: &'a SoakArgs,
        image: &'a [u8],
        img: &'a Image,
        totals: &'a Mutex<Totals>,
    }

    /// Round `n` of VM `i` on `mem`; adds to the totals.
    fn round(
        c: &Common<'_>,
        i: u32,
        n: u64,
        mem: &GuestMemory,
        rng: &mut Rng,
    ) -> anyhow::Result<()> {
        let Common {
            dev,
            a,
            image,
            img,
            totals: t,
        } = *c;
        let (policy, backing) = setup(i);
        let plan = Plan {
            mode: GuestMode::Fill,
            vcpus: a.vcpus,
            mem: a.mem,
            reports: 0,
            passes_log2: 0,
        };
        let ram = plan.ram_bytes();
        let tested = Range {
            offset: TEST_OFFSET,
            len: ram - TEST_OFFSET,
        };
        // This round's words must come from this round's guest.
        mem.protect(
            Range {
                offset: 0,
                len: ram,
            },
            None,
        )?;
        mem.dontneed(tested)?;
        mem.write(IMAGE_OFFSET, image)?;
        let spec = VmSpec {
            ipa_bits: IPA_BITS,
            policy,
            mem_base: RAM_BASE,
            mem_size: ram,
        };
        // ENOSPC: no free VM at EL2 now (the fuzzer's VMs of the long form
        // come and go); wait for one, as a VMM would.
        let t_create = Instant::now();
        let vm = loop {
            match dev.create_vm(&spec) {
                Err(e)
                    if e.errno() == Some(libc::ENOSPC)
                        && t_create.elapsed() < Duration::from_secs(60) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => break r?,
            }
        };
        vm.set_user_memory_region(&mem.ram_slot())?;
        let mut vcpus = Vec::new();
        for v in 0..a.vcpus {
            let start = match plan.start(v, img) {
                Start::On { entry, x0 } | Start::AfterFirstLine { entry, x0 } => {
                    VcpuStart::On { entry, x0 }
                }
                Start::Off => VcpuStart::Off,
            };
            vcpus.push(vm.create_vcpu(v, start)?);
        }
        let chaos = Chaos {
            mem,
            backing,
            current: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            fixed: AtomicU64::new(0),
        };
        let shared = Shared::new(vcpus.len(), &chaos, false);
        runner::expect_threads(&shared, a.vcpus);
        let mut ops = [0u64; OPS.len()];
        let t0 = Instant::now();
        let mut verdict_at = None;
        let mut longest = Duration::ZERO;
        std::thread::scope(|s| {
            let shared = &shared;
            for (v, vcpu) in vcpus.into_iter().enumerate() {
                s.spawn(move || runner::vcpu_thread(v, vcpu, shared, false));
            }
            let (chaos, ops) = (&chaos, &mut ops);
            let mut crng = Rng::new(rng.next_u64(), u64::from(i));
            let ch = s.spawn(move || chaos.thread(shared, &mut crng, a.chaos_ms, ops));
            // Wait for the end; note when the guest printed its verdict.
            loop {
                if shared.wait_end(Some(Duration::from_secs(1))).is_some() {
                    break;
                }
                // vCPU 0's last line (vCPU 1 reports its half before).
                let said = lock(&shared.console)
                    .lines
                    .iter()
                    .any(|l| l.contains("both halves") || l.starts_with("guest: checksum"));
                if said && verdict_at.is_none() {
                    verdict_at = Some(t0.elapsed());
                }
                let waited = t0.elapsed();
                if waited > ROUND_LIMIT || verdict_at.is_some_and(|v| waited > v + SHUTDOWN_LIMIT) {
                    shared.finish(End::Error(format!(
                        "no end within {} s (the guest's verdict came {})",
                        waited.as_secs(),
                        verdict_at.map_or("never".to_string(), |v| format!(
                            "after {:.1} s",
                            v.as_secs_f64()
                        ))
                    )));
                    break;
                }
            }
            if !shared.stop_all(STOP_LIMIT) {
                eprintln!("s2vmm soak: error: vCPU threads of VM {i} did not stop");
                std::process::exit(1);
            }
            if let Ok(p) = ch.join() {
                longest = p;
            }
        });
        chaos.restore()?;
        shared.flush_console();
        let secs = t0.elapsed().as_secs_f64();
        let end = shared.end().unwrap_or(End::Stopped);
        let verdict = lock(&shared.console).verdict.clone();
        let stats = vm.stats().unwrap_or_default();
        drop(vm);
        // The VMM's own check of every word (of a guest that finished).
        let ended = matches!(end, End::Guest(_));
        let base = RAM_BASE + TEST_OFFSET;
        let mut mismatches = 0u64;
        let mut first = None;
        for w in 0..if ended { tested.len / 8 } else { 0 } {
            let got = mem.read_u64(TEST_OFFSET + 8 * w);
            let want = guest::pattern(base + 8 * w);
            if got != Some(want) {
                mismatches += 1;
                first.get_or_insert((base + 8 * w, got, want));
            }
        }
        ops[5] = chaos.fixed.load(Ordering::SeqCst);
        let guest_ok = verdict.ok() && verdict.passes > 0;
        let mut tt = lock(t);
        tt.rounds += 1;
        tt.longest_pause = tt.longest_pause.max(longest);
        for (k, v) in ops.iter().enumerate() {
            tt.ops[k] += v;
        }
        for (k, v) in stats.to_array().iter().enumerate() {
            tt.counters[k] += v;
        }
        if ended && !guest_ok {
            tt.guest_checksum_failures += 1;
        }
        if mismatches > 0 {
            tt.vmm_word_mismatches += mismatches;
            tt.vmm_rounds_mismatched += 1;
        }
        let ok = ended && guest_ok && mismatches == 0;
        if !ok {
            tt.rounds_failed += 1;
            let what = format!(
                "VM {i} round {n}: {end:?}, guest {}, VMM check: {mismatches} words differ{}",
                if guest_ok {
                    "PASS".to_string()
                } else {
                    format!("{:?}", verdict.failures)
                },
                first.map_or(String::new(), |(g, got, want)| format!(
                    " (first at gpa {g:#x}: {got:?} != {want:#x})"
                ))
            );
            println!("s2vmm soak: FAIL {what}");
            tt.errors.push(what);
        } else {
            println!(
                "s2vmm soak: VM {i} round {n} PASS in {secs:.1} s: checksum {}, changes {}, faults fixed {}",
                verdict.checksums.last().map_or("?", String::as_str),
                ops[..5].iter().sum::<u64>(),
                ops[5]
            );
        }
        Ok(())
    }

    /// `s2vmm soak`: returns the exit status (0: no failure).
    pub fn run(a: &SoakArgs) -> anyhow::Result<i32> {
        let image = std::fs::read(&a.image).with_context(|| format!("{}", a.image.display()))?;
        let img = Image::parse(&image).with_context(|| format!("{}", a.image.display()))?;
        runner::install_kick_handler().map_err(anyhow::Error::msg)?;
        let dev = S2pin::open()?;
        let totals = Mutex::new(Totals {
            counters: vec![0; STATS_COUNT],
            ..Totals::default()
        });
        let plan = Plan {
            mode: GuestMode::Fill,
            vcpus: a.vcpus,
            mem: a.mem,
            reports: 0,
            passes_log2: 0,
        };
        let mut mems = Vec::new();
        for i in 0..a.vms {
            let (policy, backing) = setup(i);
            let m = GuestMemory::new(usize::try_from(plan.ram_bytes())?, backing, None)
                .with_context(|| format!("guest memory of VM {i}"))?;
            println!(
                "s2vmm soak: VM {i}: {} vCPU(s), {} MiB, policy {policy:?}, backing {backing:?}",
                a.vcpus,
                a.mem >> 20
            );
            mems.push(m);
        }
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(a.seconds);
        let common = Common {
            dev: &dev,
            a,
            image: &image,
            img: &img,
            totals: &totals,
        };
        std::thread::scope(|s| {
            for (i, mem) in mems.iter().enumerate() {
                let c = &common;
                let i = u32::try_from(i).unwrap_or(0);
                s.spawn(move || {
                    let mut rng = Rng::new(a.seed, 100 + u64::from(i));
                    let mut n = 0;
                    while Instant::now() < deadline {
                        n += 1;
                        if let Err(e) = round(c, i, n, mem, &mut rng) {
                            let what = format!("VM {i} round {n}: {e:#}");
                            println!("s2vmm soak: FAIL {what}");
                            let mut t = lock(c.totals);
                            t.rounds += 1;
                            t.rounds_failed += 1;
                            t.errors.push(what);
                            break;
                        }
                    }
                });
            }
        });
        let secs = t0.elapsed().as_secs_f64();
        drop(mems);
        let t = lock(&totals);
        let ok =
            t.rounds_failed == 0 && t.guest_checksum_failures == 0 && t.vmm_word_mismatches == 0;
        let ops: Vec<String> = OPS
            .iter()
            .zip(t.ops)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "s2vmm soak: {} VMs x {} vCPUs x {} MiB for {secs:.0} s: {} rounds ({} failed), guest checksum failures {}, VMM word mismatches {}",
            a.vms,
            a.vcpus,
            a.mem >> 20,
            t.rounds,
            t.rounds_failed,
            t.guest_checksum_failures,
            t.vmm_word_mismatches
        );
        println!(
            "s2vmm soak: memory changes: {}; longest wait for a VM's vCPUs to pause {:.1} s",
            ops.join(", "),
            t.longest_pause.as_secs_f64()
        );
        let counters: Vec<(&str, u64)> = S2pinVmStats::FIELDS
            .iter()
            .zip(t.counters.iter().copied())
            .filter(|((k, _), v)| *v != 0 && !k.ends_with("_pages") && *k != "pinned_now")
            .map(|((k, _), v)| (*k, v))
            .collect();
        let line: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "s2vmm soak: counters summed over all rounds: {}",
            line.join(", ")
        );
        if let Some(path) = &a.json {
            let j = json!({
                "vms": a.vms, "vcpus": a.vcpus, "mem_mib": a.mem >> 20, "seconds": secs,
                "rounds": t.rounds, "rounds_failed": t.rounds_failed,
                "guest_checksum_failures": t.guest_checksum_failures,
                "vmm_word_mismatches": t.vmm_word_mismatches,
                "longest_pause_s": t.longest_pause.as_secs_f64(),
                "ops": OPS.iter().zip(t.ops).map(|(k, v)| ((*k).to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "counters": counters.iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "errors": t.errors,
            });
            std::fs::write(path, format!("{j:#}\n"))
                .with_context(|| format!("{}", path.display()))?;
        }
        println!("s2vmm soak: {}", if ok { "PASS" } else { "FAIL" });
        Ok(i32::from(!ok))
    }
}
