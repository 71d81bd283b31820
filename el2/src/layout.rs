//! The physical memory layout: the boot contract (from the `boot-contract`
//! crate, which the runner, the test host and the guest use too) and the
//! hypervisor's own sizes.

pub use boot_contract::{
    host_dtb_addr, host_s2_pool_pages, hyp_end, hyp_size, tracker_bytes, EARLY_UART, HOST_DTB_MAX,
    HOST_KERNEL_ADDR, HYP_BASE, HYP_IMAGE_ADDR, HYP_IMAGE_RESERVE, HYP_LARGE_ALLOC, HYP_SMALL_HEAP,
    RAM_BASE,
};

/// Most CPUs the hypervisor supports.
pub const MAX_CPUS: usize = 8;
/// Size of each CPU's EL2 stack.
pub const STACK_SIZE: usize = 64 << 10;
