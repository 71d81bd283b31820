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
//! 0x4000_0000  HYP_BASE = RAM_BASE   el2's memory, HYP_SIZE bytes:
//! 0x4008_0000    HYP_IMAGE_ADDR        its image (QEMU's -kernel), stacks, heap
//! 0x4200_0000  HOST_DTB_ADDR = HYP_END  the host's device tree (first host page)
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
/// Size of the hypervisor's memory: image, stacks and heap (which holds the
/// page tracker and the host stage-2 tables). The host never sees it.
pub const HYP_SIZE: u64 = 32 << 20;
/// First byte after the hypervisor's memory: the host's RAM starts here.
pub const HYP_END: u64 = HYP_BASE + HYP_SIZE;

/// Least RAM (`-m`) the hypervisor boot takes: RAM must reach past
/// [`HOST_KERNEL_ADDR`] with room for a kernel (256 MiB).
pub const MIN_RAM: u64 = 1 << 30;
/// Most RAM (`-m`) the hypervisor boot takes: el2's [`HYP_SIZE`] must hold
/// the page tracker (8 bytes per 4 KiB page) and the host stage-2 tables
/// (one per 2 MiB) in its power-of-two heap; at 6 GiB they no longer fit
/// and el2 powers off with an error.
pub const MAX_RAM: u64 = 4 << 30;

/// Where the runner loads the host kernel Image, or the conformance test
/// host in its place (`-device loader,addr=`, raw). 2 MiB aligned, inside
/// RAM for every size from [`MIN_RAM`].
pub const HOST_KERNEL_ADDR: u64 = 0x7000_0000;
/// Where el2 writes the device tree it hands to the host: the first page of
/// the host's RAM, which Linux reserves itself (`early_init_fdt_reserve_self`).
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
    assert!(HYP_IMAGE_ADDR < HYP_END);
    assert!(HOST_DTB_ADDR + HOST_DTB_MAX as u64 <= GUEST_COMMAND_ADDR);
    assert!(GUEST_COMMAND_ADDR + 4096 <= GUEST_PAYLOAD_ADDR);
    assert!(GUEST_PAYLOAD_ADDR + GUEST_PAYLOAD_MAX <= HOST_KERNEL_ADDR);
    assert!(HOST_KERNEL_ADDR.is_multiple_of(2 << 20));
    assert!(HOST_KERNEL_ADDR + (256 << 20) <= RAM_BASE + MIN_RAM);
    assert!(GUEST_TEST_IPA == 0x4020_0000);
    assert!(GUEST_UART_IPA < GUEST_RAM_IPA && GUEST_MMIO_TEST_IPA < GUEST_RAM_IPA);
};
