//! The boot contract: the physical addresses and sizes that the runner
//! (`cargo xtask`), the hypervisor (el2), the conformance test host and the
//! guest payload must agree on, in one place. Each program takes them from
//! here; nothing else spells them out. docs/DESIGN.md §2 draws the map.
//!
//! The machine is QEMU `virt` (`virtualization=on`), RAM from
//! [`RAM_BASE`]:
//!
//! ```text
//! 0x0900_0000  EARLY_UART            PL011 until the device tree names one
//! 0x4000_0000  HYP_BASE = RAM_BASE   el2's memory, hyp_size(RAM) bytes:
//! 0x4008_0000    HYP_IMAGE_ADDR        its image (QEMU's -kernel), stacks, heap
//! hyp_end(RAM) host_dtb_addr(RAM)    the host's device tree (first host page;
//!                                    0x4200_0000 up to 4 GiB of RAM)
//! 0x4800_0000  QEMU_INITRD_ADDR      where QEMU puts the initrd (-initrd)
//! 0x5fff_f000  GUEST_COMMAND_ADDR    test host: what to do with the payload
//! 0x6000_0000  GUEST_PAYLOAD_ADDR    test host: the guest payload (loader)
//! 0x7000_0000  HOST_KERNEL_ADDR      the host kernel Image or the test host
//! ```
//!
//! and inside a guest (IPAs, the payload's and every VMM's view):
//!
//! ```text
//! 0x0900_0000  GUEST_UART_IPA        emulated PL011 data register
//! 0x0a00_0000  GUEST_MMIO_TEST_IPA   emulated test device
//! 0x4000_0000  GUEST_RAM_IPA         guest RAM
//! 0x4008_0000  GUEST_IMAGE_IPA       the payload image
//! 0x4020_0000  GUEST_TEST_IPA        the memory the payload tests
//! ```
//!
//! The linker scripts (el2, test host, guest) cannot read Rust constants;
//! each program's unit tests check that its script's load address is the
//! one here.
//!
//! The crate has no dependencies and no `unsafe`, so the runner can use it
//! without building any of the bare-metal programs.

#![no_std]
#![forbid(unsafe_code)]

/// First byte of RAM on QEMU `virt`.
pub const RAM_BASE: u64 = 0x4000_0000;

/// First byte of the hypervisor's own memory: the start of RAM.
pub const HYP_BASE: u64 = RAM_BASE;
/// Where QEMU puts el2's image (`-kernel`: RAM base plus the Image header's
/// `text_offset`, 0x8_0000); el2's linker script links it there.
pub const HYP_IMAGE_ADDR: u64 = HYP_BASE + 0x8_0000;
/// The least memory the hypervisor takes, [`hyp_size`]'s floor: all it
/// needs up to 4 GiB of RAM (and what it took whatever the RAM before its
/// memory was sized from the RAM).
pub const HYP_SIZE: u64 = 32 << 20;
/// The end of the hypervisor's memory on machines up to 4 GiB of RAM
/// ([`HYP_BASE`] + [`HYP_SIZE`]); in general [`hyp_end`].
pub const HYP_END: u64 = HYP_BASE + HYP_SIZE;

/// Bytes from [`HYP_BASE`] that el2's image (text offset, code, data, .bss
/// with the per-CPU stacks) may take; el2 checks it at boot.
pub const HYP_IMAGE_RESERVE: u64 = 2 << 20;
/// el2's general heap (device trees, per-VM state, allocations below
/// [`HYP_LARGE_ALLOC`]); a buddy allocator, so blocks are powers of two.
pub const HYP_SMALL_HEAP: u64 = 12 << 20;
/// Allocations of at least this many bytes (the page tracker and the host
/// stage-2 pool on machines of more than 2 GiB) are carved, page-aligned,
/// from the memory after the small heap rather than from it, so they cost
/// their size and not the next power of two.
pub const HYP_LARGE_ALLOC: u64 = 4 << 20;

/// Bytes of the page tracker for a RAM span of `ram` bytes: 8 per 4 KiB page.
#[must_use]
pub const fn tracker_bytes(ram: u64) -> u64 {
    ram.div_ceil(4096) * 8
}

/// Table pages el2 reserves for the host stage-2 over `ram` bytes of RAM:
/// enough to map all of it with 4 KiB pages (one level-3 table per 2 MiB),
/// plus 64 for the upper levels and MMIO.
#[must_use]
pub const fn host_s2_pool_pages(ram: u64) -> u64 {
    ram.div_ceil(2 << 20) + 64
}

/// Bytes of memory the hypervisor reserves on a machine whose RAM spans
/// `ram` bytes (from the first RAM byte to the last): its image, the small
/// heap, the page tracker and the host stage-2 pool, rounded up to 2 MiB,
/// and at least [`HYP_SIZE`]. Per GiB of RAM that is 2 MiB of tracker and
/// 2 MiB of tables (0.39%); the constant part is 14 MiB.
#[must_use]
pub const fn hyp_size(ram: u64) -> u64 {
    let need = HYP_IMAGE_RESERVE
        + HYP_SMALL_HEAP
        + tracker_bytes(ram).next_multiple_of(4096)
        + host_s2_pool_pages(ram) * 4096;
    let need = need.next_multiple_of(2 << 20);
    if need > HYP_SIZE {
        need
    } else {
        HYP_SIZE
    }
}

/// First byte after the hypervisor's memory on a machine whose RAM spans
/// `ram` bytes: the host's RAM starts here.
#[must_use]
pub const fn hyp_end(ram: u64) -> u64 {
    HYP_BASE + hyp_size(ram)
}

/// Where el2 writes the host's device tree on a machine whose RAM spans
/// `ram` bytes: the first page of the host's RAM, [`hyp_end`].
#[must_use]
pub const fn host_dtb_addr(ram: u64) -> u64 {
    hyp_end(ram)
}

/// Where QEMU loads an `-initrd` on `virt` with at least 256 MiB of RAM
/// (RAM base + 128 MiB): the hypervisor's memory and the host's device tree
/// must end below it.
pub const QEMU_INITRD_ADDR: u64 = RAM_BASE + (128 << 20);

/// Least RAM (`-m`) the hypervisor boot takes: RAM must reach past
/// [`HOST_KERNEL_ADDR`] with room for a kernel (256 MiB).
pub const MIN_RAM: u64 = 1 << 30;
/// Most RAM (`-m`) the hypervisor boot takes under QEMU: the largest whole
/// GiB for which the hypervisor's memory ([`hyp_size`]) and the host's
/// device tree still end below [`QEMU_INITRD_ADDR`]. (On a machine whose
/// loader puts the initrd elsewhere the limit is that placement's.)
pub const MAX_RAM: u64 = 27 << 30;

/// Where the runner loads the host kernel Image, or the conformance test
/// host in its place (`-device loader,addr=`, raw). 2 MiB aligned, inside
/// RAM for every size from [`MIN_RAM`].
pub const HOST_KERNEL_ADDR: u64 = 0x7000_0000;
/// Where el2 writes the device tree it hands to the host on machines up to
/// 4 GiB ([`host_dtb_addr`] in general): the first page of the host's RAM,
/// which Linux reserves itself (`early_init_fdt_reserve_self`).
pub const HOST_DTB_ADDR: u64 = HYP_END;
/// Largest device tree el2 hands on (the arm64 boot protocol's limit).
pub const HOST_DTB_MAX: usize = 2 << 20;

/// QEMU `virt`'s PL011, which el2 and the test host print to until the
/// device tree names the UART.
pub const EARLY_UART: u64 = 0x0900_0000;

/// Host RAM where the runner's loader puts the guest payload for the test
/// host (guest and conformance suites, `bench hvc`): above el2 and the DTB,
/// below the test host's image at [`HOST_KERNEL_ADDR`].
pub const GUEST_PAYLOAD_ADDR: u64 = 0x6000_0000;
/// Largest payload image the test host accepts (`__image_size`, bss included).
pub const GUEST_PAYLOAD_MAX: u64 = 1 << 20;
/// Host RAM word, the page below the payload, that tells the test host what
/// to do with the payload: [`GUEST_COMMAND_BENCH`], or anything else for the
/// guest suite. The runner sets it with a second loader.
pub const GUEST_COMMAND_ADDR: u64 = 0x5fff_f000;
/// The command word that asks for the `bench hvc` benchmark ("benchhvc",
/// little-endian).
pub const GUEST_COMMAND_BENCH: u64 = u64::from_le_bytes(*b"benchhvc");

/// IPA where guest RAM starts, for the payload and every VMM that runs it.
pub const GUEST_RAM_IPA: u64 = 0x4000_0000;
/// IPA of the payload image (RAM plus the usual `text_offset`); the guest's
/// linker script links it there.
pub const GUEST_IMAGE_IPA: u64 = GUEST_RAM_IPA + 0x8_0000;
/// Alignment of the memory the payload tests: it starts at the first
/// multiple of this after the image.
pub const GUEST_TEST_ALIGN: u64 = 2 << 20;
/// IPA where the tested memory starts for every image up to
/// [`GUEST_PAYLOAD_MAX`]: the first [`GUEST_TEST_ALIGN`] boundary after
/// [`GUEST_IMAGE_IPA`] + [`GUEST_PAYLOAD_MAX`].
pub const GUEST_TEST_IPA: u64 =
    (GUEST_IMAGE_IPA + GUEST_PAYLOAD_MAX).next_multiple_of(GUEST_TEST_ALIGN);
/// IPA of the guest's console UART (a PL011 data register, as on QEMU
/// `virt`), which a VMM emulates with MMIO exits.
pub const GUEST_UART_IPA: u64 = 0x0900_0000;
/// IPA of the test device a VMM emulates for the payload's exits mode.
pub const GUEST_MMIO_TEST_IPA: u64 = 0x0a00_0000;

const _: () = {
    assert!(HYP_IMAGE_ADDR < HYP_BASE + HYP_IMAGE_RESERVE);
    assert!(hyp_size(4 << 30) == HYP_SIZE);
    assert!(hyp_end(MAX_RAM) + HOST_DTB_MAX as u64 <= QEMU_INITRD_ADDR);
    assert!(hyp_end(MAX_RAM + (1 << 30)) + HOST_DTB_MAX as u64 > QEMU_INITRD_ADDR);
    assert!(QEMU_INITRD_ADDR <= GUEST_COMMAND_ADDR);
    assert!(GUEST_COMMAND_ADDR + 4096 <= GUEST_PAYLOAD_ADDR);
    assert!(GUEST_PAYLOAD_ADDR + GUEST_PAYLOAD_MAX <= HOST_KERNEL_ADDR);
    assert!(HOST_KERNEL_ADDR.is_multiple_of(2 << 20));
    assert!(HOST_KERNEL_ADDR + (256 << 20) <= RAM_BASE + MIN_RAM);
    assert!(GUEST_TEST_IPA == 0x4020_0000);
    assert!(GUEST_UART_IPA < GUEST_RAM_IPA && GUEST_MMIO_TEST_IPA < GUEST_RAM_IPA);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_memory_grows_with_ram() {
        const GIB: u64 = 1 << 30;
        const MIB: u64 = 1 << 20;
        // Up to 4 GiB the floor: the 32 MiB el2 always had.
        for gib in 1..=4 {
            assert_eq!(hyp_size(gib * GIB), 32 * MIB, "{gib} GiB");
        }
        // 16 GiB: 14 MiB + 32 MiB tracker + (8192 + 64) table pages, to 2 MiB.
        assert_eq!(hyp_size(16 * GIB), 80 * MIB);
        // The overhead per GiB above the floor: 4 MiB (tracker 2, tables 2).
        assert_eq!(hyp_size(24 * GIB) - hyp_size(16 * GIB), 32 * MIB);
        assert_eq!(host_dtb_addr(16 * GIB), HYP_BASE + 80 * MIB);
    }
}
