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
/// Table pages to reserve for the host stage-2 over `ram` bytes of host RAM:
/// enough to map all of it with 4 KiB pages (one level-3 table per 2 MiB),
/// plus 64 for the upper levels and MMIO. The hypervisor's heap (the rest of
/// its memory after its image) holds this pool and the page tracker.
#[must_use]
pub const fn host_s2_pool_pages(ram: u64) -> usize {
    (ram.div_ceil(2 << 20) + 64) as usize
}
/// QEMU virt's PL011, used only until the device tree names the UART.
pub const EARLY_UART: u64 = 0x0900_0000;
