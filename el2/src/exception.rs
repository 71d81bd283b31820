//! Traps as values.
//!
//! The vector code (arch/entry.S) saves every general-purpose register and
//! the syndrome registers into a [`TrapFrame`] on the EL2 stack and calls the
//! handler with the frame and the vector slot. Everything here decodes those
//! values; nothing reads a system register.

/// Registers saved by the vector code, in the order entry.S stores them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TrapFrame {
    /// x0..x30 of the interrupted context.
    pub x: [u64; 31],
    /// ELR_EL2: where the interrupted context resumes.
    pub elr: u64,
    /// SPSR_EL2: the interrupted PSTATE.
    pub spsr: u64,
    /// ESR_EL2.
    pub esr: u64,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
}

const _: () = assert!(
    core::mem::size_of::<TrapFrame>() == 288,
    "entry.S FRAME_SIZE"
);

/// Which vector slot fired (its index in the 16-slot table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    /// A synchronous exception from EL2 itself: a hypervisor bug.
    CurrentSync,
    /// An IRQ, FIQ or SError taken at EL2 itself.
    CurrentAsync,
    /// A synchronous exception from the host or a guest (AArch64).
    LowerSync,
    /// An IRQ from a lower EL.
    LowerIrq,
    /// An FIQ from a lower EL.
    LowerFiq,
    /// An SError from a lower EL.
    LowerSError,
    /// Anything from a lower EL in AArch32, which we never run.
    LowerAArch32,
    /// Not a slot number the vector code produces.
    Invalid(u64),
}

impl Vector {
    /// Decodes the slot index passed by the vector code.
    #[must_use]
    pub fn from_index(index: u64) -> Self {
        match index {
            0 | 4 => Self::CurrentSync,
            1..=3 | 5..=7 => Self::CurrentAsync,
            8 => Self::LowerSync,
            9 => Self::LowerIrq,
            10 => Self::LowerFiq,
            11 => Self::LowerSError,
            12..=15 => Self::LowerAArch32,
            other => Self::Invalid(other),
        }
    }
}

/// ESR_ELx exception classes the hypervisor handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// EC 0x01: WFI or WFE.
    WfxTrap,
    /// EC 0x07: FP/SIMD/SVE access trap.
    FpAccess,
    /// EC 0x16: HVC from AArch64.
    Hvc64,
    /// EC 0x17: SMC from AArch64 (trapped by HCR_EL2.TSC).
    Smc64,
    /// EC 0x18: MSR/MRS/system instruction trap.
    SysReg,
    /// EC 0x20: instruction abort from a lower EL.
    InstructionAbortLower,
    /// EC 0x21: instruction abort at EL2.
    InstructionAbortSame,
    /// EC 0x24: data abort from a lower EL.
    DataAbortLower,
    /// EC 0x25: data abort at EL2.
    DataAbortSame,
    /// Any other class, with its raw value.
    Other(u8),
}

/// A decoded ESR value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Esr(pub u64);

impl core::fmt::Debug for Esr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Esr({:#x}, {:?})", self.0, self.class())
    }
}

impl Esr {
    /// The exception class field (bits 31:26).
    #[must_use]
    pub fn ec(self) -> u8 {
        ((self.0 >> 26) & 0x3f) as u8
    }

    /// The decoded class.
    #[must_use]
    pub fn class(self) -> ExceptionClass {
        match self.ec() {
            0x01 => ExceptionClass::WfxTrap,
            0x07 => ExceptionClass::FpAccess,
            0x16 => ExceptionClass::Hvc64,
            0x17 => ExceptionClass::Smc64,
            0x18 => ExceptionClass::SysReg,
            0x20 => ExceptionClass::InstructionAbortLower,
            0x21 => ExceptionClass::InstructionAbortSame,
            0x24 => ExceptionClass::DataAbortLower,
            0x25 => ExceptionClass::DataAbortSame,
            other => ExceptionClass::Other(other),
        }
    }

    /// IL: the trapped instruction was 32 bits long.
    #[must_use]
    pub fn il(self) -> bool {
        self.0 & (1 << 25) != 0
    }

    /// The instruction-specific syndrome (bits 24:0).
    #[must_use]
    pub fn iss(self) -> u32 {
        (self.0 & 0x1ff_ffff) as u32
    }

    /// For aborts: the fault status code (DFSC/IFSC, bits 5:0).
    #[must_use]
    pub fn fsc(self) -> u8 {
        (self.0 & 0x3f) as u8
    }

    /// For data aborts: the access was a write (WnR).
    #[must_use]
    pub fn is_write(self) -> bool {
        self.0 & (1 << 6) != 0
    }

    /// For aborts: the fault happened on a stage-1 table walk (S1PTW).
    #[must_use]
    pub fn s1ptw(self) -> bool {
        self.0 & (1 << 7) != 0
    }

    /// For aborts: a translation fault at any level.
    #[must_use]
    pub fn is_translation_fault(self) -> bool {
        (self.fsc() & 0x3c) == 0x04
    }

    /// For aborts: a permission fault at any level.
    #[must_use]
    pub fn is_permission_fault(self) -> bool {
        (self.fsc() & 0x3c) == 0x0c
    }

    /// For aborts: an access-flag fault at any level.
    #[must_use]
    pub fn is_access_flag_fault(self) -> bool {
        (self.fsc() & 0x3c) == 0x08
    }

    /// For HVC and SMC: the 16-bit immediate.
    #[must_use]
    pub fn imm16(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

/// The faulting IPA of a stage-2 abort: HPFAR_EL2.FIPA gives bits 51:12 and
/// FAR_EL2 the offset within the page.
#[must_use]
pub fn fault_ipa(hpfar: u64, far: u64) -> u64 {
    ((hpfar >> 4) & ((1 << 40) - 1)) << 12 | (far & 0xfff)
}

/// Exception level a saved SPSR returns to.
#[must_use]
pub fn spsr_el(spsr: u64) -> u8 {
    ((spsr >> 2) & 3) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_decode() {
        assert_eq!(Vector::from_index(8), Vector::LowerSync);
        assert_eq!(Vector::from_index(4), Vector::CurrentSync);
        assert_eq!(Vector::from_index(11), Vector::LowerSError);
        assert_eq!(Vector::from_index(13), Vector::LowerAArch32);
        assert_eq!(Vector::from_index(99), Vector::Invalid(99));
    }

    #[test]
    fn esr_classes() {
        // hvc #0 from AArch64: EC 0x16, IL.
        let hvc = Esr(0x5a00_0000);
        assert_eq!(hvc.class(), ExceptionClass::Hvc64);
        assert!(hvc.il());
        assert_eq!(hvc.imm16(), 0);
        // smc #0: EC 0x17.
        assert_eq!(Esr(0x5e00_0000).class(), ExceptionClass::Smc64);
        // Data abort from EL1, level-3 translation fault, write.
        let dabt = Esr(0x9200_0047);
        assert_eq!(dabt.class(), ExceptionClass::DataAbortLower);
        assert!(dabt.is_translation_fault());
        assert!(dabt.is_write());
        assert!(!dabt.is_permission_fault());
        assert_eq!(Esr(0x9200_000f).class(), ExceptionClass::DataAbortLower);
        assert!(Esr(0x9200_000f).is_permission_fault());
        assert_eq!(Esr(0xfc00_0000).class(), ExceptionClass::Other(0x3f));
    }

    #[test]
    fn ipa_from_hpfar() {
        // IPA 0x4000_1234: HPFAR holds 0x40001 << 4.
        assert_eq!(fault_ipa(0x40001 << 4, 0xffff_0000_0000_0234), 0x4000_1234);
        // Bits of HPFAR outside FIPA are ignored.
        assert_eq!(
            fault_ipa(0x8000_0000_0000_0000 | (0x40001 << 4) | 0xf, 0x234),
            0x4000_1234
        );
        assert_eq!(spsr_el(0x3c5), 1);
        assert_eq!(spsr_el(0x3c0), 0);
    }
}
