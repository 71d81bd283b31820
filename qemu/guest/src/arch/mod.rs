//! Boot assembly, the page table, the stack and the HVC conduit.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use hypercalls::{GuestCall, Regs};

global_asm!(include_str!("entry.S"));

/// Entries of the level-1 table (39-bit VA, 1 GiB blocks).
const ENTRIES: usize = 512;
const BLOCK_1G: u64 = 1 << 30;
/// Valid block, AF, inner shareable.
const DESC_BLOCK: u64 = 0b01 | (1 << 10);
const DESC_NORMAL: u64 = DESC_BLOCK | (1 << 2) | (0b11 << 8);
const DESC_DEVICE: u64 = DESC_BLOCK | (1 << 54) | (1 << 53);

/// The identity map (symbol `PT`): GiB 0 device, GiB 1..256 normal memory.
#[repr(C, align(4096))]
pub struct Table([u64; ENTRIES]);

const fn table() -> Table {
    let mut t = [0u64; ENTRIES];
    t[0] = DESC_DEVICE;
    let mut i = 1;
    while i < 256 {
        t[i] = DESC_NORMAL | (i as u64 * BLOCK_1G);
        i += 1;
    }
    Table(t)
}

#[unsafe(no_mangle)]
static PT: Table = table();

/// The boot stack (symbol `STACK`, entry.S `STACK_SIZE`).
#[repr(C, align(16))]
pub struct Stack(UnsafeCell<[u8; 0x4000]>);

// SAFETY: only the boot CPU's sp points into it.
unsafe impl Sync for Stack {}

#[unsafe(no_mangle)]
static STACK: Stack = Stack(UnsafeCell::new([0; 0x4000]));

/// `HVC #0` with x0..x7; returns x0..x7 (SMCCC 1.2 style, ABI §2.1).
pub fn hvc(regs: &Regs) -> Regs {
    let mut r = *regs;
    // SAFETY: the hypervisor's calling convention preserves everything but
    // x0..x7, which are declared as in/out.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            inout("x4") r[4], inout("x5") r[5], inout("x6") r[6], inout("x7") r[7],
            options(nostack)
        );
    }
    r
}

/// Makes a guest call.
pub fn call(c: GuestCall) -> Regs {
    hvc(&c.encode())
}
