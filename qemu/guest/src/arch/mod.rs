//! Boot assembly, the page table, the stack and the HVC conduit.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use hypercalls::{GuestCall, Regs};

global_asm!(
    include_str!("../../../../baremetal/src/image_header.S"),
    include_str!("../../../../baremetal/src/boot.S"),
    include_str!("entry.S"),
    stack_size = const STACK_SIZE,
    max_vcpus = const guest::MAX_VCPUS,
    text_offset = const boot_contract::GUEST_IMAGE_IPA - boot_contract::GUEST_RAM_IPA,
);

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

/// Bytes of stack per vCPU (entry.S `STACK_SIZE`).
const STACK_SIZE: usize = 0x4000;

/// The stacks, one per vCPU (symbol `STACK`).
#[repr(C, align(16))]
pub struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; guest::MAX_VCPUS]>);

// SAFETY: only entry.S touches the stacks, each vCPU its own.
unsafe impl Sync for Stacks {}

#[unsafe(no_mangle)]
static STACK: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; guest::MAX_VCPUS]));

extern "C" {
    /// Where PSCI CPU_ON starts the other vCPUs (entry.S), x0 = index.
    fn secondary_entry();
}

/// The IPA of `secondary_entry` (the MMU maps IPA = VA).
pub fn secondary_entry_ipa() -> u64 {
    secondary_entry as *const () as u64
}

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

/// `HVC #1` (a non-zero immediate, which the ABI refuses) with x0..x7.
pub fn hvc1(regs: &Regs) -> Regs {
    let mut r = *regs;
    // SAFETY: as `hvc`.
    unsafe {
        asm!(
            "hvc #1",
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

/// `SMC #0` with x0..x7; returns x0..x7.
pub fn smc(regs: &Regs) -> Regs {
    let mut r = *regs;
    // SAFETY: as `hvc`: only x0..x7 change (the hypervisor traps the SMC).
    unsafe {
        asm!(
            "smc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            inout("x4") r[4], inout("x5") r[5], inout("x6") r[6], inout("x7") r[7],
            options(nostack)
        );
    }
    r
}

/// A 32-bit device read, one `ldr w` instruction (so the abort syndrome
/// describes it for the VMM).
pub fn mmio_read32(addr: u64) -> u32 {
    let v: u32;
    // SAFETY: `addr` is in the device GiB of the identity map; the VMM
    // emulates it (an unemulated access ends the VM, it cannot corrupt us).
    unsafe { asm!("ldr {v:w}, [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) };
    v
}

/// A 64-bit device read (`ldr x`).
pub fn mmio_read64(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: as mmio_read32.
    unsafe { asm!("ldr {v}, [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) };
    v
}

/// A 64-bit device write (`str x`).
pub fn mmio_write64(addr: u64, v: u64) {
    // SAFETY: as mmio_read32.
    unsafe { asm!("str {v}, [{a}]", a = in(reg) addr, v = in(reg) v, options(nostack)) };
}

/// An 8-bit device write (`strb w`).
pub fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: as mmio_read32.
    unsafe {
        asm!("strb {v:w}, [{a}]", a = in(reg) addr, v = in(reg) u32::from(v), options(nostack))
    };
}

/// One WFI (trapped by the hypervisor: it returns at once here).
pub fn wfi() {
    // SAFETY: a hint; with interrupts masked a trapped WFI just exits.
    unsafe { asm!("wfi", options(nostack)) };
}

/// Sets V0, V31 (`[lo, hi]` each) and FPCR. The payload is built
/// soft-float, so no compiled code uses these registers.
pub fn fp_set(v0: [u64; 2], v31: [u64; 2], fpcr: u64) {
    // SAFETY: FP registers no compiled code of this program uses; FP
    // access is enabled (CPACR_EL1.FPEN, entry.S).
    unsafe {
        asm!(
            ".arch_extension fp",
            ".arch_extension simd",
            "mov v0.d[0], {a}",
            "mov v0.d[1], {b}",
            "mov v31.d[0], {c}",
            "mov v31.d[1], {d}",
            "msr fpcr, {e}",
            a = in(reg) v0[0], b = in(reg) v0[1], c = in(reg) v31[0], d = in(reg) v31[1],
            e = in(reg) fpcr,
            options(nostack)
        )
    };
}

/// Reads V0, V31 and FPCR.
pub fn fp_get() -> ([u64; 2], [u64; 2], u64) {
    let (a, b, c, d, e): (u64, u64, u64, u64, u64);
    // SAFETY: reads FP registers only.
    unsafe {
        asm!(
            ".arch_extension fp",
            ".arch_extension simd",
            "mov {a}, v0.d[0]",
            "mov {b}, v0.d[1]",
            "mov {c}, v31.d[0]",
            "mov {d}, v31.d[1]",
            "mrs {e}, fpcr",
            a = out(reg) a, b = out(reg) b, c = out(reg) c, d = out(reg) d, e = out(reg) e,
            options(nostack, nomem)
        )
    };
    ([a, b], [c, d], e)
}

/// TPIDR_EL1, TPIDR_EL0, CONTEXTIDR_EL1.
pub fn ids_set(v: [u64; 3]) {
    // SAFETY: software thread-id registers nothing else here uses.
    unsafe {
        asm!(
            "msr tpidr_el1, {a}",
            "msr tpidr_el0, {b}",
            "msr contextidr_el1, {c}",
            a = in(reg) v[0], b = in(reg) v[1], c = in(reg) v[2],
            options(nostack, nomem)
        )
    };
}

/// Reads what [`ids_set`] wrote.
pub fn ids_get() -> [u64; 3] {
    let (a, b, c): (u64, u64, u64);
    // SAFETY: reads only.
    unsafe {
        asm!(
            "mrs {a}, tpidr_el1",
            "mrs {b}, tpidr_el0",
            "mrs {c}, contextidr_el1",
            a = out(reg) a, b = out(reg) b, c = out(reg) c,
            options(nostack, nomem)
        )
    };
    [a, b, c]
}

/// CNTVCT_EL0, CNTPCT_EL0, CNTFRQ_EL0.
pub fn counters() -> (u64, u64, u64) {
    let (v, p, f): (u64, u64, u64);
    // SAFETY: counter reads (CNTHCTL_EL2.EL1PCTEN lets EL1 read CNTPCT).
    unsafe {
        asm!(
            "isb",
            "mrs {v}, cntvct_el0",
            "mrs {p}, cntpct_el0",
            "mrs {f}, cntfrq_el0",
            v = out(reg) v, p = out(reg) p, f = out(reg) f,
            options(nostack, nomem)
        )
    };
    (v, p, f)
}

/// MPIDR_EL1 as the guest sees it (VMPIDR_EL2).
pub fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: a read.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nostack, nomem)) };
    v
}

/// Touches what `probe` names (see `guest::Probe`); returns the value read
/// if the hypervisor let it through.
pub fn probe(probe: guest::Probe) -> u64 {
    let v: u64;
    // SAFETY: reads of ID-free system registers or an SVE length query,
    // no memory access; the hypervisor is expected to stop the VM here.
    unsafe {
        match probe {
            guest::Probe::Pmu => asm!("mrs {}, pmcr_el0", out(reg) v, options(nostack, nomem)),
            guest::Probe::Debug => asm!("mrs {}, mdscr_el1", out(reg) v, options(nostack, nomem)),
            // CPACR_EL1.ZEN on first, so that only EL2 (CPTR_EL2.TZ) can trap it.
            guest::Probe::Sve => asm!(
                ".arch_extension sve",
                "mrs {t}, cpacr_el1",
                "orr {t}, {t}, #(3 << 16)",
                "msr cpacr_el1, {t}",
                "isb",
                "rdvl {v}, #1",
                t = out(reg) _, v = out(reg) v, options(nostack, nomem)
            ),
            guest::Probe::PhysTimer => {
                asm!("mrs {}, cntp_ctl_el0", out(reg) v, options(nostack, nomem))
            }
            guest::Probe::Actlr => asm!("mrs {}, actlr_el1", out(reg) v, options(nostack, nomem)),
            guest::Probe::Lor => asm!("mrs {}, S3_0_C10_C4_3", out(reg) v, options(nostack, nomem)),
            guest::Probe::Ras => asm!("mrs {}, S3_0_C5_C3_0", out(reg) v, options(nostack, nomem)),
        }
    }
    v
}

/// Reads the word at `addr` (a volatile load: each call is one access).
pub fn read_word(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: `addr` is in the normal-memory part of the identity map;
    // what the VMM put there (or did not: a fault ends in an exit) is only
    // read.
    unsafe {
        asm!("ldr {v}, [{a}]", a = in(reg) addr & !7, v = out(reg) v, options(nostack, readonly))
    };
    v
}

/// Writes `v` to the word at `addr` (one store).
pub fn write_word(addr: u64, v: u64) {
    // SAFETY: `addr` is a page the VMM gave for poking (test modes), never
    // this program's own image or stacks.
    unsafe { asm!("str {v}, [{a}]", a = in(reg) addr & !7, v = in(reg) v, options(nostack)) };
}

// The registers of `guest::Reg`, also used by the test host (`#[path]`).
mod regs;
pub use regs::{has, reg_read, reg_write};
