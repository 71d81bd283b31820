//! The physical memory layout: the boot contract (from the `boot-contract`
//! crate, which the runner, the test host and the guest use too) and the
//! hypervisor's own sizes.

pub use boot_contract::{
    EARLY_UART, HOST_DTB_ADDR, HOST_DTB_MAX, HOST_KERNEL_ADDR, HYP_BASE, HYP_END, HYP_IMAGE_ADDR,
    HYP_SIZE, RAM_BASE,
};

/// Most CPUs the hypervisor supports.
pub const MAX_CPUS: usize = 8;
/// Size of each CPU's EL2 stack.
pub const STACK_SIZE: usize = 64 << 10;
/// Table pages to reserve for the host stage-2 over `ram` bytes of host RAM:
/// enough to map all of it with 4 KiB pages (one level-3 table per 2 MiB),
/// plus 64 for the upper levels and MMIO. The hypervisor's heap (the rest of
/// its memory after its image) holds this pool and the page tracker.
#[must_use]
pub const fn host_s2_pool_pages(ram: u64) -> usize {
    (ram.div_ceil(2 << 20) + 64) as usize
}
