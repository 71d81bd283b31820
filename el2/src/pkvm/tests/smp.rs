//! Concurrency smoke test: several std threads hammer `host_call` on one
//! shared `Hyp`. Each thread works on its own guest frames (so every result
//! is predictable) but all of them share the same host pages with the same
//! VM, and each creates and tears down VMs of its own, so the host lock,
//! the shared VM's lock and the slot search are contended.

use std::sync::Arc;
use std::thread;
use std::vec::Vec;

use hypercalls::{HypError, Hypercall, Reply};

use super::{create, donate, hyp, reclaim, run, share, teardown, topup, unshare, HOST0, HOST1};

const THREADS: u64 = 4;
const SHARED: u64 = HOST0 + 100;

#[test]
fn threads_hammer_one_hyp() {
    let h = Arc::new(hyp());
    let vm = create(&h, 40, HOST0);
    topup(&h, vm, HOST0 + 2, 48);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let h = Arc::clone(&h);
            thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t + 1);
                let mut shared = [false; 8];
                let mut donated = [false; 8];
                let own = HOST0 + 200 + t * 16;
                for i in 0..1500u32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = (x >> 8) % 8;
                    let ki = k as usize;
                    let g = 0x1000 * (t + 1) + k;
                    match x % 8 {
                        0 | 1 => {
                            let c = share(vm, SHARED + k, g, 1);
                            let want = if shared[ki] {
                                Err(HypError::Exists)
                            } else {
                                Ok(Reply::Done)
                            };
                            assert_eq!(run(&h, c), want, "thread {t} step {i}");
                            shared[ki] = true;
                        }
                        2 | 3 => {
                            let c = unshare(vm, SHARED + k, g, 1);
                            let r = run(&h, c);
                            if shared[ki] {
                                assert_eq!(r, Ok(Reply::Done), "thread {t} step {i}");
                            } else {
                                // Another thread may or may not share the
                                // page right now: EACCES or ENOENT.
                                assert!(
                                    r == Err(HypError::Denied) || r == Err(HypError::NoEntry),
                                    "thread {t} step {i}: {r:?}"
                                );
                            }
                            shared[ki] = false;
                        }
                        4 => {
                            let c = donate(vm, own + k, 0x8000 * (t + 1) + k, 1);
                            let want = if donated[ki] {
                                Err(HypError::Denied)
                            } else {
                                Ok(Reply::Done)
                            };
                            assert_eq!(run(&h, c), want, "thread {t} step {i}");
                            donated[ki] = true;
                        }
                        5 => {
                            let c = reclaim(vm, own + k, 0x8000 * (t + 1) + k, 1);
                            let want = if donated[ki] {
                                Ok(Reply::Done)
                            } else {
                                Err(HypError::Denied)
                            };
                            assert_eq!(run(&h, c), want, "thread {t} step {i}");
                            donated[ki] = false;
                        }
                        6 => {
                            let r = run(
                                &h,
                                Hypercall::HostPageState {
                                    pfn: super::pfn(SHARED + k),
                                },
                            );
                            assert!(r.is_ok(), "{r:?}");
                        }
                        _ if i % 16 == 7 => {
                            // A VM of this thread's own, created and torn
                            // down completely.
                            let root = HOST1 + t * 64;
                            let mine = create(&h, 48, root);
                            topup(&h, mine, root + 1, 4);
                            assert_eq!(run(&h, donate(mine, root + 8, 0, 4)), Ok(Reply::Done));
                            teardown(&h, mine);
                        }
                        _ => {}
                    }
                }
                for k in 0..8u64 {
                    let ki = k as usize;
                    if shared[ki] {
                        let c = unshare(vm, SHARED + k, 0x1000 * (t + 1) + k, 1);
                        assert_eq!(run(&h, c), Ok(Reply::Done));
                    }
                    if donated[ki] {
                        let c = reclaim(vm, own + k, 0x8000 * (t + 1) + k, 1);
                        assert_eq!(run(&h, c), Ok(Reply::Done));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker panicked");
    }
    h.check_invariants().unwrap();
    teardown(&h, vm);
    h.check_all_returned().unwrap();
}
