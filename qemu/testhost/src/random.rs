//! Concurrency cases and the fixed-seed random tester.
//!
//! * Racing rounds: every CPU issues one call at the same moment on a few
//!   shared frames and gfns of two VMs; the results and the read-back state
//!   must match some serial order (`testhost::serial`).
//! * Random tester: each CPU drives its own VM and frames with random calls
//!   (>= 10^4 in all), each checked against its own model and followed by a
//!   full read-back; then a racing phase on shared frames.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercalls::{CounterGroup, HypError, Hypercall, Prot, Reply, VcpuIndex, VmHandle};
use spin::Mutex;
use testhost::rng::Rng;
use testhost::serial::{serial_outcomes, Op};
use testhost::Model;

use crate::harness::{self, count, gfn, pfn, Ctx, R};
use crate::{hv, rt, say};

const SEED: u64 = 0x5eed_2026_0004;
/// Calls per CPU in the random tester (4 CPUs: 12,000 calls).
const CALLS_PER_CPU: u64 = 3000;
const RACE_ROUNDS: usize = 150;

static BARRIER: rt::Barrier = rt::Barrier::new();
static PLAN: Mutex<Vec<Option<Hypercall>>> = Mutex::new(Vec::new());
static GOT: Mutex<Vec<Option<Op>>> = Mutex::new(Vec::new());
static WORKERS: AtomicU64 = AtomicU64::new(0);

fn race_task(cpu: usize) {
    let call = PLAN.lock().get(cpu).copied().flatten();
    BARRIER.wait();
    if let Some(c) = call {
        let a = hv::call(&c);
        if let Some(slot) = GOT.lock().get_mut(cpu) {
            *slot = Some((c, a.result));
        }
    }
    BARRIER.wait();
}

struct Race {
    vms: [VmHandle; 2],
    pfns: [u64; 4],
    gfns: [u64; 4],
}

fn read_back_matches(m: &Model, r: &Race) -> bool {
    r.pfns.iter().all(|&p| {
        hv::call(&Hypercall::HostPageState { pfn: pfn(p) }).result
            == m.host_page(p).map(Reply::HostPage)
    }) && r.vms.iter().all(|&vm| {
        r.gfns.iter().all(|&g| {
            hv::call(&Hypercall::GuestPageState { vm, gfn: gfn(g) }).result
                == m.guest_page(vm, g).map(Reply::GuestPage)
        })
    })
}

fn random_race_call(rng: &mut Rng, r: &Race) -> Hypercall {
    let vm = r.vms[rng.below(2) as usize];
    let p = pfn(r.pfns[rng.below(4) as usize]);
    let g = gfn(r.gfns[rng.below(4) as usize]);
    let nr = count(1);
    match rng.below(6) {
        0 | 1 => Hypercall::Share {
            vm,
            pfn: p,
            gfn: g,
            nr,
            prot: Prot::RW,
        },
        2 | 3 => Hypercall::Unshare {
            vm,
            pfn: p,
            gfn: g,
            nr,
        },
        4 => Hypercall::Donate {
            vm,
            pfn: p,
            gfn: g,
            nr,
            prot: Prot::R,
        },
        _ => Hypercall::Reclaim {
            vm,
            pfn: p,
            gfn: g,
            nr,
        },
    }
}

/// `rounds` racing rounds on all online CPUs; `same` makes every CPU issue
/// the very same call (the sharpest race), else each draws its own.
fn races(c: &mut Ctx, rounds: usize, same: bool, seed: u64) -> R {
    let n = rt::online();
    if n < 2 {
        return Err("needs at least 2 CPUs online".into());
    }
    let vms = [c.vm(40, 1, 32)?, c.vm(40, 1, 32)?];
    let base = c.pages(4, 1)?;
    let race = Race {
        vms,
        pfns: [base, base + 1, base + 2, base + 3],
        gfns: [0x100, 0x101, 0x180, 0x181],
    };
    for vm in vms {
        c.track_gfns(vm, 0x100, 2);
        c.track_gfns(vm, 0x180, 2);
    }
    let mut rng = Rng::new(seed);
    BARRIER.reset(n);
    for round in 0..rounds {
        let first = random_race_call(&mut rng, &race);
        let plan: Vec<Option<Hypercall>> = (0..n)
            .map(|_| {
                Some(if same {
                    first
                } else {
                    random_race_call(&mut rng, &race)
                })
            })
            .collect();
        *PLAN.lock() = plan;
        *GOT.lock() = alloc::vec![None; n];
        rt::run_on(n, race_task);
        let ops: Vec<Op> = GOT.lock().iter().flatten().copied().collect();
        c.calls += ops.len() as u64;
        if ops.len() != n {
            return Err(format!(
                "round {round}: only {} of {n} CPUs answered",
                ops.len()
            ));
        }
        let outcomes = serial_outcomes(&c.model, &ops);
        let Some((_, m)) = outcomes
            .into_iter()
            .find(|(_, m)| read_back_matches(m, &race))
        else {
            return Err(format!(
                "round {round}: no serial order explains the results and the read-back state: {ops:?}"
            ));
        };
        c.model = m;
        c.check_state()?;
    }
    Ok(())
}

fn race_same(c: &mut Ctx) -> R {
    races(c, RACE_ROUNDS, true, SEED ^ 1)
}

fn race_mixed(c: &mut Ctx) -> R {
    races(c, RACE_ROUNDS, false, SEED ^ 2)
}

/// Per-CPU results of the random tester: (calls, error).
static RANDOM: Mutex<Vec<(u64, Option<String>)>> = Mutex::new(Vec::new());

fn random_calls(cpu: usize) -> Result<u64, (u64, String)> {
    let mut c = Ctx::new();
    let fail = |c: &Ctx, e: String| (c.calls, e);
    let vm = c.vm(40, 2, 32).map_err(|e| fail(&c, e))?;
    // 16 start frames, and 2 more so that a range of up to 3 pages from the
    // last one stays inside this CPU's own frames (another CPU's model does
    // not expect this CPU's calls on its frames).
    let base = c.pages(16 + 2, 1).map_err(|e| fail(&c, e))?;
    c.track_gfns(vm, 0x200, 16);
    let mut rng = Rng::new(SEED.wrapping_add(cpu as u64 * 0x1_0000_0001));
    let mut topups = 0;
    for _ in 0..CALLS_PER_CPU {
        let p = pfn(base + rng.below(16));
        let g = gfn(0x200 + rng.below(16));
        let nr = count(1 + rng.below(3) as u32);
        let prot = [Prot::R, Prot::RW, Prot::RX, Prot::RWX][rng.below(4) as usize];
        let call = match rng.below(20) {
            0..=4 => Hypercall::Share {
                vm,
                pfn: p,
                gfn: g,
                nr,
                prot,
            },
            5..=8 => Hypercall::Unshare {
                vm,
                pfn: p,
                gfn: g,
                nr,
            },
            9..=11 => Hypercall::Donate {
                vm,
                pfn: p,
                gfn: g,
                nr,
                prot,
            },
            12..=14 => Hypercall::Reclaim {
                vm,
                pfn: p,
                gfn: g,
                nr,
            },
            15 if rng.chance(50) => Hypercall::UnshareRange { vm, gfn: g, nr },
            15 => Hypercall::WrProtect { vm, gfn: g, nr },
            16 => Hypercall::RelaxPerms { vm, gfn: g, prot },
            17 => Hypercall::TestClearYoung { vm, gfn: g, nr },
            18 => Hypercall::VmCounters {
                vm,
                group: if rng.chance(50) {
                    CounterGroup::Stage2
                } else {
                    CounterGroup::Runtime
                },
            },
            _ => {
                if topups < 4 && rng.chance(50) {
                    topups += 1;
                    let mc = harness::alloc_pages(2, 1).map_err(|e| fail(&c, e))?;
                    Hypercall::MemcacheTopup {
                        vm,
                        pfn: pfn(mc),
                        nr: count(2),
                    }
                } else if rng.chance(50) {
                    Hypercall::VcpuCreate {
                        vm,
                        vcpu: VcpuIndex::new(rng.below(3) as u16)
                            .unwrap_or(VcpuIndex::new(0).expect("valid")),
                        start: hypercalls::VcpuStart::On { entry: 0, arg: 0 },
                    }
                } else {
                    Hypercall::MemcacheTopup { vm, pfn: p, nr }
                }
            }
        };
        let _answer = c.call(call).map_err(|e| fail(&c, e))?;
    }
    c.cleanup().map_err(|e| fail(&c, e))?;
    Ok(c.calls)
}

fn random_task(cpu: usize) {
    let r = random_calls(cpu);
    let entry = match r {
        Ok(n) => (n, None),
        Err((n, e)) => (n, Some(format!("CPU {cpu} after {n} calls: {e}"))),
    };
    if let Some(slot) = RANDOM.lock().get_mut(cpu) {
        *slot = entry;
    }
    WORKERS.fetch_add(1, Ordering::SeqCst);
}

fn random_tester(_c: &mut Ctx) -> R {
    let n = rt::online();
    if n < 2 {
        return Err("needs at least 2 CPUs online".into());
    }
    *RANDOM.lock() = alloc::vec![(0, None); n];
    let (t0, f) = crate::arch::timer();
    rt::run_on(n, random_task);
    let ms = (crate::arch::timer().0 - t0) * 1000 / f;
    let results = RANDOM.lock().clone();
    let total: u64 = results.iter().map(|r| r.0).sum();
    say!("testhost: random tester: {n} CPUs, seed {SEED:#x}, {total} checked calls in {ms} ms");
    if let Some(e) = results.iter().find_map(|r| r.1.clone()) {
        return Err(e);
    }
    if total < 10_000 {
        return Err(format!("only {total} calls (need 10^4)"));
    }
    Ok(())
}

/// The concurrency cases and the random tester.
pub const CASES: &[harness::Case] = &[
    harness::Case {
        name: "§2.6 concurrency: all CPUs issue the same share/unshare/donate/reclaim at once; results match a serial order",
        run: race_same,
    },
    harness::Case {
        name: "§2.6 concurrency: CPUs race on 4 shared frames and gfns of 2 VMs; results and state match a serial order",
        run: race_mixed,
    },
    harness::Case {
        name: "§2.5 random: fixed-seed random calls from every CPU (>= 10^4), each checked against the model and read back",
        run: random_tester,
    },
];

/// Runs the concurrency cases.
pub fn run(passed: &mut u32, failed: &mut u32) {
    let _ = HypError::NoEntry;
    harness::run(CASES, passed, failed);
}
