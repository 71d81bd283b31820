//! The counters of one VM ([`crate::S2PIN_GET_STATS`], and the module's
//! debugfs files of the same names).

macro_rules! stats {
    ($( $(#[doc = $doc:literal])+ $name:ident, )*) => {
        /// The argument of [`crate::S2PIN_GET_STATS`]: every counter of one
        /// VM, all `u64`. Counters count from VM creation and never reset;
        /// `pinned_now` and the `el2_*_pages` values are gauges.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct S2pinVmStats {
            $( $(#[doc = $doc])+ pub $name: u64, )*
        }

        impl S2pinVmStats {
            /// (name, one-line description) of every field, in order.
            pub const FIELDS: &'static [(&'static str, &'static str)] =
                &[ $( (stringify!($name), concat!($($doc),+)) ),* ];

            /// The fields in order.
            #[must_use]
            pub const fn to_array(&self) -> [u64; STATS_COUNT] {
                [ $( self.$name ),* ]
            }

            /// The structure with these field values.
            #[must_use]
            pub const fn from_array(a: [u64; STATS_COUNT]) -> Self {
                let [ $( $name ),* ] = a;
                Self { $( $name ),* }
            }
        }
    };
}

stats! {
    /// pages pinned now (gauge; also accounted in the creator's locked_vm)
    pinned_now,
    /// pages pinned (pin_user_pages) since creation
    pins,
    /// pages unpinned since creation
    unpins,
    /// stage-2 memory faults served by pinning and sharing a page
    faults,
    /// faults retried because an invalidation raced with them
    fault_retries,
    /// write faults on write-protected pages served again
    permission_faults,
    /// memory faults handed to user space (no slot, read-only, host denied)
    user_faults,
    /// pages shared with the guest (HYP_SHARE)
    shares,
    /// pages unshared from the guest (HYP_UNSHARE)
    unshares,
    /// pages write-protected at EL2 (HYP_WRPROTECT)
    wrprotects,
    /// invalidate_range_start calls, event MMU_NOTIFY_UNMAP
    range_start_unmap,
    /// invalidate_range_start calls, event MMU_NOTIFY_CLEAR
    range_start_clear,
    /// invalidate_range_start calls, event MMU_NOTIFY_PROTECTION_VMA
    range_start_protection_vma,
    /// invalidate_range_start calls, event MMU_NOTIFY_PROTECTION_PAGE
    range_start_protection_page,
    /// invalidate_range_start calls, event MMU_NOTIFY_SOFT_DIRTY
    range_start_soft_dirty,
    /// invalidate_range_start calls, event MMU_NOTIFY_RELEASE
    range_start_release,
    /// invalidate_range_start calls, event MMU_NOTIFY_MIGRATE
    range_start_migrate,
    /// invalidate_range_start calls, event MMU_NOTIFY_EXCLUSIVE
    range_start_exclusive,
    /// invalidate_range_end calls (all events)
    range_end,
    /// pages unmapped at range_start because the event can change the frame
    unmapped_invalidate,
    /// pages unmapped at range_start for a protection event (eager policy)
    unmapped_eager,
    /// pages unmapped at range_end because their PTE/PMD became PROT_NONE
    unmapped_protnone,
    /// pages unmapped at range_end because their frame changed or vanished
    unmapped_changed,
    /// pages unmapped because their slot was deleted
    unmapped_memslot,
    /// pages unmapped by teardown
    unmapped_teardown,
    /// pages write-protected at range_end because they lost write permission
    wrprotected_lost_write,
    /// pinned pages a protection event covered that stayed mapped (avoided unmaps)
    kept,
    /// MMIO exits to user space
    mmio_exits,
    /// console exits to user space
    console_exits,
    /// 2 MiB blocks shared (one HYP_SHARE of 512 pages; pages counted in shares too)
    blocks_shared,
    /// whole 2 MiB blocks unshared in one call (notifier, slot deletion, write upgrade)
    block_unshares,
    /// blocks split by a call that changed part of them (one memcache page each)
    block_splits,
    /// blocks unshared whole because a split had no memcache page or the host entries differed
    block_fallbacks,
    /// EL2 group 0: pages mapped in the VM's stage 2
    el2_s2_maps,
    /// EL2 group 0: pages unmapped
    el2_s2_unmaps,
    /// EL2 group 0: TLB invalidations for the VM's VMID
    el2_s2_tlbi,
    /// EL2 group 0: pages shared
    el2_s2_shares,
    /// EL2 group 0: pages unshared
    el2_s2_unshares,
    /// EL2 group 0: pages donated
    el2_s2_donations,
    /// EL2 group 0: pages reclaimed
    el2_s2_reclaims,
    /// EL2 group 1: stage-2 faults taken
    el2_rt_faults,
    /// EL2 group 1: successful HYP_VCPU_RUN calls
    el2_rt_vcpu_runs,
    /// EL2 group 1: free memcache pages now (gauge)
    el2_rt_memcache_pages,
    /// EL2 group 1: stage-2 table pages in use now (gauge)
    el2_rt_table_pages,
    /// EL2 group 1: exits returned to the host
    el2_rt_host_exits,
    /// EL2 group 1: exits the hypervisor answered itself
    el2_rt_hyp_exits,
    /// EL2 group 1: runs ended by a physical interrupt
    el2_rt_irq_exits,
    /// HYP_SHARE calls made for this VM
    calls_share,
    /// HYP_UNSHARE and HYP_UNSHARE_RANGE calls made for this VM
    calls_unshare,
    /// HYP_WRPROTECT calls made for this VM
    calls_wrprotect,
    /// every other hypercall made for this VM (teardown's too), except HYP_VCPU_RUN and HYP_VM_COUNTERS
    calls_other,
}

/// Number of counters in [`S2pinVmStats`].
pub const STATS_COUNT: usize = 51;

const _: () = {
    assert!(S2pinVmStats::FIELDS.len() == STATS_COUNT);
    assert!(core::mem::size_of::<S2pinVmStats>() == STATS_COUNT * 8);
};

/// Index of the first `range_start_*` counter; the next seven follow in
/// Linux's `enum mmu_notifier_event` order (UNMAP = 0 .. EXCLUSIVE = 7).
pub const RANGE_START_FIRST: usize = 10;
/// Index of the first `el2_*` counter: group 0's seven registers x1..x7,
/// then group 1's.
pub const EL2_FIRST: usize = 33;
/// Index of the first `calls_*` counter (the module's hypercalls by kind),
/// right after the fourteen `el2_*` counters.
pub const CALLS_FIRST: usize = EL2_FIRST + 14;

const _: () = {
    let f = S2pinVmStats::FIELDS;
    assert!(const_eq(f[RANGE_START_FIRST].0, "range_start_unmap"));
    assert!(const_eq(
        f[RANGE_START_FIRST + 7].0,
        "range_start_exclusive"
    ));
    assert!(const_eq(f[EL2_FIRST].0, "el2_s2_maps"));
    assert!(const_eq(f[EL2_FIRST + 13].0, "el2_rt_irq_exits"));
    assert!(const_eq(f[CALLS_FIRST].0, "calls_share"));
    assert!(const_eq(f[STATS_COUNT - 1].0, "calls_other"));
};

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_round_trips_in_field_order() {
        let mut a = [0u64; STATS_COUNT];
        for (i, v) in a.iter_mut().enumerate() {
            *v = i as u64 * 3 + 1;
        }
        let s = S2pinVmStats::from_array(a);
        assert_eq!(s.pinned_now, 1);
        assert_eq!(s.calls_other, (STATS_COUNT as u64 - 1) * 3 + 1);
        assert_eq!(s.to_array(), a);
    }

    #[test]
    fn names_are_unique_c_identifiers() {
        let mut names: std::vec::Vec<&str> = S2pinVmStats::FIELDS.iter().map(|f| f.0).collect();
        for n in &names {
            assert!(n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), STATS_COUNT);
    }
}
