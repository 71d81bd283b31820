//! The physical memory layout the hypervisor and the runner agree on.
//!
//! These numbers are also in `qemu/src` (the runner) and in
//! docs/DESIGN.md; change them together.

/// First byte of the hypervisor's own memory: the start of RAM on QEMU `virt`.
pub const HYP_BASE: u64 = 0x4000_0000;
/// Size of the hypervisor's memory. The host's view of RAM starts after it.
pub const HYP_SIZE: u64 = 32 << 20;
/// First byte after the hypervisor's memory.
pub const HYP_END: u64 = HYP_BASE + HYP_SIZE;
/// Where the runner loads the host kernel Image (`-device loader,addr=`).
pub const HOST_KERNEL_ADDR: u64 = 0x7000_0000;
/// Where the hypervisor writes the device tree it hands to the host: the
/// first page of the host's RAM, which Linux reserves itself
/// (`early_init_fdt_reserve_self`).
pub const HOST_DTB_ADDR: u64 = HYP_END;
/// Largest device tree the hypervisor hands on (the arm64 boot protocol's limit).
pub const HOST_DTB_MAX: usize = 2 << 20;
/// Most CPUs the hypervisor supports.
pub const MAX_CPUS: usize = 8;
/// Size of each CPU's EL2 stack.
pub const STACK_SIZE: usize = 64 << 10;
/// Size of the hypervisor heap.
pub const HEAP_SIZE: usize = 4 << 20;
/// Pages reserved for the host stage-2 tables.
pub const HOST_S2_POOL_PAGES: usize = 1024;
/// QEMU virt's PL011, used only until the device tree names the UART.
pub const EARLY_UART: u64 = 0x0900_0000;
