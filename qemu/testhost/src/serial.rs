//! Serializability of a concurrent round: calls issued at the same time from
//! several CPUs must have the results of *some* serial order (§2.6: calls on
//! one VM are serialised; each call is atomic, §2.1).

use alloc::vec::Vec;

use hypercalls::{HypError, Hypercall, Reply};

use crate::Model;

/// One call of a round and what the hypervisor answered.
pub type Op = (Hypercall, Result<Reply, HypError>);

/// Every model state reachable by running `ops` in some order in which each
/// call gets exactly the answer it got. Empty means no serial order explains
/// the round. Rounds are small (one call per CPU), so this tries all orders.
#[must_use]
pub fn serial_outcomes(model: &Model, ops: &[Op]) -> Vec<(Vec<usize>, Model)> {
    let mut out = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    let mut used = alloc::vec![false; ops.len()];
    search(model, ops, &mut order, &mut used, &mut out);
    out
}

fn search(
    model: &Model,
    ops: &[Op],
    order: &mut Vec<usize>,
    used: &mut [bool],
    out: &mut Vec<(Vec<usize>, Model)>,
) {
    if order.len() == ops.len() {
        out.push((order.clone(), model.clone()));
        return;
    }
    for i in 0..ops.len() {
        if used[i] {
            continue;
        }
        let mut next = model.clone();
        if next.step(&ops[i].0, &ops[i].1).is_err() {
            continue;
        }
        used[i] = true;
        order.push(i);
        search(&next, ops, order, used, out);
        order.pop();
        used[i] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercalls::{Gfn, IpaBits, PageCount, Pfn, Prot, VcpuCount, VmHandle};

    fn setup() -> (Model, VmHandle) {
        let mut m = crate::model(&[(0x4200_0000, 0xc000_0000)]);
        let vm = VmHandle::new(0, 1).unwrap();
        m.step(
            &Hypercall::VmCreate {
                ipa_bits: IpaBits::new(40).unwrap(),
                nr_vcpus: VcpuCount::new(1).unwrap(),
                root: Pfn::new(0x80000).unwrap(),
                memory: None,
            },
            &Ok(Reply::VmCreated { vm }),
        )
        .unwrap();
        m.step(
            &Hypercall::MemcacheTopup {
                vm,
                pfn: Pfn::new(0x80010).unwrap(),
                nr: PageCount::new(16).unwrap(),
            },
            &Ok(Reply::Done),
        )
        .unwrap();
        (m, vm)
    }

    #[test]
    fn racing_shares_of_one_gfn_need_exactly_one_winner() {
        let (m, vm) = setup();
        let share = Hypercall::Share {
            vm,
            pfn: Pfn::new(0x80100).unwrap(),
            gfn: Gfn::new(5).unwrap(),
            nr: PageCount::ONE,
            prot: Prot::R,
        };
        let one_wins = [(share, Ok(Reply::Done)), (share, Err(HypError::Exists))];
        assert_eq!(serial_outcomes(&m, &one_wins).len(), 1);
        let both_win = [(share, Ok(Reply::Done)), (share, Ok(Reply::Done))];
        assert!(serial_outcomes(&m, &both_win).is_empty());
        let both_lose = [
            (share, Err(HypError::Exists)),
            (share, Err(HypError::Exists)),
        ];
        assert!(serial_outcomes(&m, &both_lose).is_empty());
    }

    #[test]
    fn donate_against_share_of_one_frame() {
        let (m, vm) = setup();
        let pfn = Pfn::new(0x80100).unwrap();
        let share = Hypercall::Share {
            vm,
            pfn,
            gfn: Gfn::new(5).unwrap(),
            nr: PageCount::ONE,
            prot: Prot::R,
        };
        let donate = Hypercall::Donate {
            vm,
            pfn,
            gfn: Gfn::new(6).unwrap(),
            nr: PageCount::ONE,
            prot: Prot::R,
        };
        let share_first = [(share, Ok(Reply::Done)), (donate, Err(HypError::Denied))];
        let r = serial_outcomes(&m, &share_first);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, alloc::vec![0, 1]);
        let both = [(share, Ok(Reply::Done)), (donate, Ok(Reply::Done))];
        assert!(serial_outcomes(&m, &both).is_empty());
    }
}
