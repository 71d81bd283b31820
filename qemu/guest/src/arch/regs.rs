//! Reading and writing the registers of `guest::Reg` at EL1, and whether
//! they exist. Shared by the guest payload and the test host (which
//! includes this file with `#[path]`): both run at EL1 and check the same
//! registers from the two sides of the world switch.

use core::arch::asm;

/// Whether this CPU has what `needs` names (ID registers: the guest sees
/// the CPU's, not trapped).
pub fn has(needs: guest::Needs) -> bool {
    let (pfr0, pfr1, mmfr1): (u64, u64, u64);
    // SAFETY: ID register reads.
    unsafe {
        asm!(
            "mrs {a}, id_aa64pfr0_el1",
            "mrs {b}, id_aa64pfr1_el1",
            "mrs {c}, id_aa64mmfr1_el1",
            a = out(reg) pfr0, b = out(reg) pfr1, c = out(reg) mmfr1,
            options(nostack, nomem)
        )
    };
    match needs {
        guest::Needs::Nothing => true,
        guest::Needs::Sme => (pfr1 >> 24) & 0xf != 0,
        guest::Needs::Gic => (pfr0 >> 24) & 0xf != 0,
        guest::Needs::Ras => (pfr0 >> 28) & 0xf != 0,
        guest::Needs::Sve => (pfr0 >> 32) & 0xf != 0,
        guest::Needs::Lor => (mmfr1 >> 16) & 0xf != 0,
    }
}

macro_rules! reg_access {
    ($($reg:ident: $name:literal),* $(,)?) => {
        /// Reads `r` (which must exist: [`has`]).
        pub fn reg_read(r: guest::Reg) -> u64 {
            let v: u64;
            match r {
                // SAFETY: a read of a register of this vCPU's own state.
                $( guest::Reg::$reg => unsafe {
                    asm!(concat!("mrs {}, ", $name), out(reg) v, options(nostack, nomem))
                }, )*
            }
            v
        }

        /// Writes `v` to `r` (which must exist: [`has`]).
        pub fn reg_write(r: guest::Reg, v: u64) {
            match r {
                // SAFETY: thread-id, GIC virtual CPU interface or DISR
                // state that nothing else in this program relies on
                // (interrupts stay masked).
                $( guest::Reg::$reg => unsafe {
                    asm!(concat!("msr ", $name, ", {}"), in(reg) v, options(nostack, nomem))
                }, )*
            }
            // SAFETY: a barrier, so a read back sees the write.
            unsafe { asm!("isb", options(nostack, nomem)) };
        }
    };
}

reg_access! {
    TpidrEl0: "tpidr_el0",
    TpidrroEl0: "tpidrro_el0",
    Contextidr: "contextidr_el1",
    Tpidr2: "S3_3_C13_C0_5",
    IccPmr: "S3_0_C4_C6_0",
    IccBpr0: "S3_0_C12_C8_3",
    IccBpr1: "S3_0_C12_C12_3",
    IccIgrpen0: "S3_0_C12_C12_6",
    IccIgrpen1: "S3_0_C12_C12_7",
    IccCtlr: "S3_0_C12_C12_4",
    IccAp0r0: "S3_0_C12_C8_4",
    IccAp1r0: "S3_0_C12_C9_0",
    Disr: "S3_0_C12_C1_1",
}
