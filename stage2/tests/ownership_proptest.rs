//! Property test: random sequences of memory transitions applied both to
//! the real tracker + page tables and to the plain reference model, with
//! the state machine's invariants checked after every step.

mod ownership_common;

use ownership_common::*;
use proptest::prelude::*;
use stage2::owner::{Error, Owner};
use stage2::pgtable::Perms;
use stage2::transition::Teardown;
use stage2::Pfn;

/// Which pages an unshare/reclaim/return names.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Arbitrary frames, mostly refused.
    Raw { pfn: u64, gfn: u64 },
    /// The `n`-th current mapping of the VM (or hyp page), per the model.
    Existing(usize),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Share {
        vm: usize,
        pfn: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    },
    Unshare {
        vm: usize,
        target: Target,
        nr: u64,
    },
    Donate {
        vm: usize,
        pfn: u64,
        gfn: u64,
        nr: u64,
        perms: Perms,
    },
    Reclaim {
        vm: usize,
        target: Target,
        nr: u64,
    },
    DonateToHyp {
        pfn: u64,
        nr: u64,
    },
    ReturnFromHyp {
        target: Target,
        nr: u64,
    },
    /// Limits table `table` (0 host, 1.. guests) to `extra` more tables,
    /// or lifts the limit.
    Limit {
        table: usize,
        extra: Option<usize>,
    },
    /// One step of a fresh teardown of a (live) VM.
    TeardownStep {
        vm: usize,
        max_pages: u64,
    },
}

const VMS: usize = 3;

fn pfn_s() -> impl Strategy<Value = u64> {
    prop_oneof![
        20 => (RAM_BASE - 2)..(RAM_BASE + RAM_PAGES + 2),
        1 => Just(u64::MAX - 1),
    ]
}

fn gfn_s() -> impl Strategy<Value = u64> {
    // Mostly a window straddling a 2 MiB boundary, sometimes the end of the
    // IPA space or a far region.
    prop_oneof![
        12 => 0x1f8u64..0x208,
        1 => (GUEST_GFNS - 3)..(GUEST_GFNS + 1),
        1 => 0x2_0000u64..0x2_0004,
    ]
}

fn nr_s() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 12 => 1u64..=3, 2 => 4u64..=8]
}

fn perms_s() -> impl Strategy<Value = Perms> {
    prop::sample::select(vec![Perms::RW, Perms::R, Perms::RWX, Perms::RX])
}

fn target_s() -> impl Strategy<Value = Target> {
    prop_oneof![
        1 => (pfn_s(), gfn_s()).prop_map(|(pfn, gfn)| Target::Raw { pfn, gfn }),
        4 => (0usize..64).prop_map(Target::Existing),
    ]
}

fn op_s() -> impl Strategy<Value = Op> {
    let vm = 0..VMS;
    prop_oneof![
        6 => (vm.clone(), pfn_s(), gfn_s(), nr_s(), perms_s())
            .prop_map(|(vm, pfn, gfn, nr, perms)| Op::Share { vm, pfn, gfn, nr, perms }),
        4 => (vm.clone(), target_s(), nr_s()).prop_map(|(vm, target, nr)| Op::Unshare { vm, target, nr }),
        6 => (vm.clone(), pfn_s(), gfn_s(), nr_s(), perms_s())
            .prop_map(|(vm, pfn, gfn, nr, perms)| Op::Donate { vm, pfn, gfn, nr, perms }),
        4 => (vm.clone(), target_s(), nr_s()).prop_map(|(vm, target, nr)| Op::Reclaim { vm, target, nr }),
        3 => (pfn_s(), nr_s()).prop_map(|(pfn, nr)| Op::DonateToHyp { pfn, nr }),
        3 => (target_s(), nr_s()).prop_map(|(target, nr)| Op::ReturnFromHyp { target, nr }),
        2 => (0..=VMS, prop::option::of(0usize..3)).prop_map(|(table, extra)| Op::Limit { table, extra }),
        1 => (vm, 1u64..4).prop_map(|(vm, max_pages)| Op::TeardownStep { vm, max_pages }),
    ]
}

struct Harness {
    w: World,
    m: Model,
    limited: [bool; VMS + 1],
}

impl Harness {
    fn table(&mut self, t: usize) -> &mut S2 {
        if t == 0 {
            &mut self.w.host
        } else {
            &mut self.w.guests[t - 1]
        }
    }

    /// (pfn, gfn) of a guest mapping named by `target`.
    fn guest_target(&self, vm: usize, target: Target) -> (u64, u64) {
        match target {
            Target::Raw { pfn, gfn } => (pfn, gfn),
            Target::Existing(i) => {
                let g = &self.m.guests[vm];
                match g.iter().nth(i % g.len().max(1)) {
                    Some((&gfn, &(pfn, _, _))) => (pfn, gfn),
                    None => (RAM_BASE, 0x200),
                }
            }
        }
    }

    fn hyp_target(&self, target: Target) -> u64 {
        match target {
            Target::Raw { pfn, .. } => pfn,
            Target::Existing(i) => {
                let hyp: Vec<u64> = self
                    .m
                    .pages
                    .iter()
                    .filter(|(_, (o, _))| *o == Owner::Hyp)
                    .map(|(&p, _)| p)
                    .collect();
                hyp.get(i % hyp.len().max(1)).copied().unwrap_or(RAM_BASE)
            }
        }
    }

    /// Applies `op` to both sides and checks everything.
    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let before = self.w.snapshot();
        let z0 = self.w.zeroed.len();
        let any_limit = self.limited.iter().any(|&l| l);
        let mut model_after = self.m.clone();
        let (real, model, zero): (Result<(), Error>, Result<(), Error>, Vec<Pfn>) = match op {
            Op::Share {
                vm,
                pfn,
                gfn,
                nr,
                perms,
            } => (
                self.w.share(vm, pfn, gfn, nr, perms),
                model_after.share(vm, pfn, gfn, nr, perms),
                vec![],
            ),
            Op::Unshare { vm, target, nr } => {
                let (pfn, gfn) = self.guest_target(vm, target);
                (
                    self.w.unshare(vm, pfn, gfn, nr),
                    model_after.unshare(vm, pfn, gfn, nr),
                    vec![],
                )
            }
            Op::Donate {
                vm,
                pfn,
                gfn,
                nr,
                perms,
            } => (
                self.w.donate(vm, pfn, gfn, nr, perms),
                model_after.donate(vm, pfn, gfn, nr, perms),
                vec![],
            ),
            Op::Reclaim { vm, target, nr } => {
                let (pfn, gfn) = self.guest_target(vm, target);
                let model = model_after.reclaim(vm, pfn, gfn, nr);
                let zero = model.clone().unwrap_or_default();
                (self.w.reclaim(vm, pfn, gfn, nr), model.map(|_| ()), zero)
            }
            Op::DonateToHyp { pfn, nr } => (
                self.w.donate_to_hyp(pfn, nr),
                model_after.donate_to_hyp(pfn, nr),
                vec![],
            ),
            Op::ReturnFromHyp { target, nr } => {
                let pfn = self.hyp_target(target);
                let model = model_after.return_from_hyp(pfn, nr);
                let zero = model.clone().unwrap_or_default();
                (self.w.return_from_hyp(pfn, nr), model.map(|_| ()), zero)
            }
            Op::Limit { table, extra } => {
                let s2 = self.table(table);
                let limit = extra.map_or(usize::MAX, |e| s2.mm().live() + e);
                s2.mm_mut().set_limit(limit);
                self.limited[table] = extra.is_some();
                return Ok(());
            }
            Op::TeardownStep { vm, max_pages } => return self.teardown_step(vm, max_pages),
        };
        match (real, model) {
            (Ok(()), Ok(())) => {
                self.m = model_after;
                prop_assert_eq!(&self.w.zeroed[z0..], &zero[..], "zeroed pages");
            }
            (Err(Error::NoMemory), Ok(())) => {
                prop_assert!(any_limit, "NoMemory without any memory limit");
            }
            (r, m) => prop_assert_eq!(r, m, "real vs model"),
        }
        if real.is_err() {
            prop_assert_eq!(&self.w.snapshot(), &before, "failed call changed something");
        }
        self.m.assert_matches(&self.w);
        self.w.check_invariants();
        Ok(())
    }

    fn teardown_step(&mut self, vm: usize, max_pages: u64) -> Result<(), TestCaseError> {
        let count = self.m.guests[vm].len();
        let z0 = self.w.zeroed.len();
        let mut td = Teardown::new(vm_id(vm));
        let res = self.w.teardown_step(&mut td, vm, max_pages);
        let left = guest_pages(&self.w.guests[vm]).len();
        let handled = count - left;
        match res {
            Ok(step) => {
                prop_assert_eq!(step.leaves as usize, handled);
                prop_assert_eq!(handled, count.min(max_pages as usize));
                prop_assert!(!td.is_done() || left == 0);
            }
            Err(Error::NoMemory) => {
                prop_assert!(self.limited[0], "teardown NoMemory without a host limit");
                prop_assert!(handled < count.min(max_pages as usize));
            }
            Err(e) => prop_assert!(false, "teardown failed: {:?}", e),
        }
        let zero = self.m.teardown(vm, handled);
        prop_assert_eq!(&self.w.zeroed[z0..], &zero[..]);
        self.m.assert_matches(&self.w);
        self.w.check_invariants();
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn transitions_match_the_model(
        share_limit in prop_oneof![3 => Just(u32::MAX), 1 => 1u32..3],
        ops in prop::collection::vec(op_s(), 1..80),
        final_step in 1u64..5,
    ) {
        let w = World::new(VMS, share_limit);
        let start_live: Vec<usize> = std::iter::once(&w.host).chain(&w.guests).map(|s| s.mm().live()).collect();
        let mut h = Harness { w, m: Model::new(VMS, share_limit), limited: [false; VMS + 1] };
        h.m.assert_matches(&h.w);
        h.w.check_invariants();
        for op in ops {
            h.step(op)?;
        }

        // Reclaim and unshare everything, give back the hypervisor's pages.
        for t in 0..=VMS {
            h.table(t).mm_mut().set_limit(usize::MAX);
        }
        h.limited = [false; VMS + 1];
        for vm in 0..VMS {
            let mut td = Teardown::new(vm_id(vm));
            let mut steps = 0;
            while !td.is_done() {
                let step = h.w.teardown_step(&mut td, vm, final_step).unwrap();
                prop_assert!(step.pages <= final_step);
                steps += 1;
                prop_assert!(steps <= 64 / final_step + 2, "teardown does not progress");
            }
            h.m.teardown(vm, usize::MAX);
        }
        let hyp: Vec<u64> = h.m.pages.iter().filter(|(_, (o, _))| *o == Owner::Hyp).map(|(&p, _)| p).collect();
        for p in hyp {
            h.step(Op::ReturnFromHyp { target: Target::Raw { pfn: p, gfn: 0 }, nr: 1 })?;
        }
        h.m.assert_matches(&h.w);
        h.w.check_invariants();
        prop_assert_eq!(&h.m, &Model::new(VMS, share_limit));
        let end_live: Vec<usize> = std::iter::once(&h.w.host).chain(&h.w.guests).map(|s| s.mm().live()).collect();
        prop_assert_eq!(end_live, start_live, "table memory leaked");
        for g in h.w.guests.drain(..) {
            let (mm, _) = g.destroy();
            prop_assert_eq!(mm.live(), 0);
        }
    }
}
