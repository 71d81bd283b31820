//! Just enough GICv3 for the host-timer guest case: the distributor with
//! affinity routing and both groups on, this CPU's redistributor awake,
//! a PPI in group 1 at a middle priority, and the CPU interface's system
//! registers (SRE, all priorities, group 1 on). The test host never takes
//! an interrupt itself (DAIF stays masked); this only lets a PPI be
//! signalled, so that el2 sees it as a physical IRQ while a guest runs.
//!
//! Enabling the PPI is left to the caller (or to el2, which enables PPI 26
//! itself for each guest run, `el2/src/arch/vcpu.rs`).

use alloc::format;
use alloc::string::String;
use core::arch::asm;

use crate::{arch, rt};

const GICD_CTLR: u64 = 0x0;
const GICD_CTLR_RWP: u32 = 1 << 31;
/// ARE | EnableGrp1 | EnableGrp0 (QEMU's GIC has one security state).
const GICD_CTLR_ON: u32 = (1 << 4) | (1 << 1) | (1 << 0);
/// Redistributor frames: RD, then SGI/PPI.
const GICR_STRIDE: u64 = 0x2_0000;
const GICR_SGI_FRAME: u64 = 0x1_0000;
const GICR_TYPER: u64 = 0x8;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_WAKER: u64 = 0x14;
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
const SGI_IGROUPR0: u64 = 0x80;
const SGI_ISENABLER0: u64 = 0x100;
const SGI_ICENABLER0: u64 = 0x180;
const SGI_ICPENDR0: u64 = 0x280;
const SGI_IPRIORITYR: u64 = 0x400;
/// Priority given to the PPI (lower is more urgent; PMR 0xff lets it in).
const PPI_PRIORITY: u32 = 0xa0;

/// This CPU's redistributor, found and set up by [`Gic::init`].
#[derive(Clone, Copy, Debug)]
pub struct Gic {
    /// The SGI/PPI frame of this CPU's redistributor.
    sgi: u64,
}

fn read(addr: u64) -> u32 {
    // SAFETY: a GIC register inside the regions the device tree gives
    // (below 1 GiB: device memory in BOOT_PT, the host's in its stage 2);
    // reading has no side effect on the registers used here.
    unsafe { (addr as *const u32).read_volatile() }
}

fn write(addr: u64, v: u32) {
    // SAFETY: as `read`; only the test host drives the GIC.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

fn read64(addr: u64) -> u64 {
    // SAFETY: as `read` (GICR_TYPER is a 64-bit register).
    unsafe { (addr as *const u64).read_volatile() }
}

/// Waits up to 1 s for `f`.
fn wait(what: &str, f: impl Fn() -> bool) -> Result<(), String> {
    let (t0, freq) = arch::timer();
    while !f() {
        if arch::timer().0 - t0 > freq {
            return Err(format!("GIC: {what} within 1 s"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// GICR_TYPER.Affinity (Aff3.Aff2.Aff1.Aff0) of an MPIDR.
fn typer_affinity(mpidr: u64) -> u64 {
    (mpidr & 0xff_ffff) | ((mpidr >> 32) & 0xff) << 24
}

impl Gic {
    /// Sets the GIC up for `ppi` on this CPU (left disabled, pending
    /// cleared): distributor, redistributor, CPU interface.
    pub fn init(ppi: u32) -> Result<Self, String> {
        if !(16..32).contains(&ppi) {
            return Err(format!("GIC: {ppi} is not a PPI"));
        }
        let regions = rt::platform()
            .gic
            .ok_or("no GICv3 (arm,gic-v3) in the device tree")?;
        let (gicd, (rbase, rsize)) = (regions.gicd.0, regions.gicr);
        if gicd >= 1 << 30 || rbase.saturating_add(rsize) > 1 << 30 {
            return Err(format!("GIC {regions:x?} beyond the device GiB of BOOT_PT"));
        }
        write(gicd + GICD_CTLR, read(gicd + GICD_CTLR) | GICD_CTLR_ON);
        wait("GICD_CTLR.RWP clear", || {
            read(gicd + GICD_CTLR) & GICD_CTLR_RWP == 0
        })?;
        let ctlr = read(gicd + GICD_CTLR);
        if ctlr & GICD_CTLR_ON != GICD_CTLR_ON {
            return Err(format!("GICD_CTLR {ctlr:#x} after enabling"));
        }
        let rd = Self::find(rbase, rsize)?;
        write(
            rd + GICR_WAKER,
            read(rd + GICR_WAKER) & !WAKER_PROCESSOR_SLEEP,
        );
        wait("GICR_WAKER.ChildrenAsleep clear", || {
            read(rd + GICR_WAKER) & WAKER_CHILDREN_ASLEEP == 0
        })?;
        let gic = Self {
            sgi: rd + GICR_SGI_FRAME,
        };
        gic.disable(ppi);
        write(gic.sgi + SGI_ICPENDR0, 1 << ppi);
        write(
            gic.sgi + SGI_IGROUPR0,
            read(gic.sgi + SGI_IGROUPR0) | (1 << ppi),
        );
        let prio = gic.sgi + SGI_IPRIORITYR + u64::from(ppi & !3);
        let shift = (ppi & 3) * 8;
        write(
            prio,
            (read(prio) & !(0xff << shift)) | (PPI_PRIORITY << shift),
        );
        let sre = cpu_interface_on();
        if sre & 1 == 0 {
            return Err(format!(
                "ICC_SRE_EL1 {sre:#x}: system register interface off"
            ));
        }
        Ok(gic)
    }

    /// This CPU's redistributor (RD frame) in `[base, base + size)`.
    fn find(base: u64, size: u64) -> Result<u64, String> {
        let me = typer_affinity(arch::mpidr());
        let mut rd = base;
        while rd + GICR_STRIDE <= base + size {
            let typer = read64(rd + GICR_TYPER);
            if typer >> 32 == me {
                return Ok(rd);
            }
            if typer & GICR_TYPER_LAST != 0 {
                break;
            }
            rd += GICR_STRIDE;
        }
        Err(format!(
            "no redistributor for affinity {me:#x} in {base:#x}+{size:#x}"
        ))
    }

    /// Whether `ppi` is enabled at this CPU's redistributor.
    pub fn enabled(&self, ppi: u32) -> bool {
        read(self.sgi + SGI_ISENABLER0) & (1 << ppi) != 0
    }

    /// Disables `ppi` at this CPU's redistributor.
    pub fn disable(&self, ppi: u32) {
        write(self.sgi + SGI_ICENABLER0, 1 << ppi);
    }

    /// Disables `ppi` and turns group 1 off at the CPU interface again.
    pub fn off(&self, ppi: u32) {
        self.disable(ppi);
        // SAFETY: group 1 interrupts off at this CPU's interface; the test
        // host takes no interrupts anyway.
        unsafe { asm!("msr S3_0_C12_C12_7, xzr", "isb", options(nostack)) };
    }
}

/// The CPU interface on: system registers (ICC_SRE_EL1.SRE, allowed by
/// el2's ICC_SRE_EL2.Enable), priority mask open, group 1 on. Returns
/// ICC_SRE_EL1 as read back.
fn cpu_interface_on() -> u64 {
    let sre: u64;
    // SAFETY: the physical GIC CPU interface (el2 leaves HCR_EL2.IMO/FMO
    // clear for the host); PSTATE.I stays set, so nothing is taken at EL1.
    unsafe {
        asm!(
            "mrs {sre}, S3_0_C12_C12_5", // ICC_SRE_EL1
            "orr {sre}, {sre}, #1",
            "msr S3_0_C12_C12_5, {sre}",
            "isb",
            "mrs {sre}, S3_0_C12_C12_5",
            "msr S3_0_C4_C6_0, {pmr}",   // ICC_PMR_EL1
            "msr S3_0_C12_C12_7, {one}", // ICC_IGRPEN1_EL1
            "isb",
            sre = out(reg) sre,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nostack)
        )
    };
    sre
}
