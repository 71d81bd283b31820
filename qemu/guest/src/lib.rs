//! The guest payload's logic, testable on the build machine: its argument,
//! the memory pattern and checksum, and console output as guest calls.
//!
//! The payload (main.rs) runs at EL1 of a VM with x0 = [`Arg`]:
//! - [`Mode::Fill`]: fill N MiB with [`pattern`], read it back, report the
//!   checksum and `PASS`/`FAIL` over `HYP_GUEST_CONSOLE_WRITE` (ABI §4.2),
//!   then `HYP_GUEST_SHUTDOWN` (§4.5).
//! - [`Mode::Touch`]: write one word per cache line of N MiB over and over,
//!   counting passes, and report the count every 2^k passes (for the NUMA
//!   benchmark); after a given number of reports (0: never) shut down.
//! - [`Mode::Exits`]: make every kind of exit once and check what comes back
//!   (guest calls, PSCI over HVC and SMC, MMIO reads and writes the VMM
//!   emulates at [`MMIO_TEST_BASE`], WFI, FP/SIMD and EL1 registers kept
//!   across exits), report `PASS`/`FAIL` per check, then PSCI SYSTEM_OFF.
//! - [`Mode::Smp`]: vCPU 0 starts vCPU 1 with PSCI CPU_ON; each fills and
//!   checks its half of N MiB, vCPU 1 then signals through memory and
//!   calls PSCI CPU_OFF, and vCPU 0 checks both halves (what the other
//!   vCPU wrote, possibly from another physical CPU) and powers off.
//! - [`Mode::Poke`]: one [`Op`] on one guest page (read, write a pattern,
//!   read then write, spin until the page goes away), each step reported
//!   over the console, so that the VMM can change the page between steps
//!   (the conformance cases of the test host's `guests.rs`).
//! - [`Mode::Hostile`]: malformed guest calls, each of which must fail
//!   with the right error (or exit and come back), never hurt the host.
//! - [`Mode::Bench`]: counts generic-timer ticks around 2^k null guest
//!   calls and 2^k first touches of fresh pages (`cargo xtask bench hvc`).
//! - [`Mode::Regs`]: reports the registers of [`Reg`] (what a fresh vCPU
//!   sees), writes [`Reg::sentinel`] to each, says `guest: regs written`
//!   (an exit: the host checks its own registers), then reads them back
//!   and reports whether each kept its value (docs/DESIGN.md §8).

#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

use hypercalls::{ConsoleBytes, GuestCall, CONSOLE_MAX_BYTES};

/// IPA where guest RAM starts (boot contract `GUEST_RAM_IPA`; the image
/// is linked at `+ 0x8_0000`).
pub const GUEST_RAM_BASE: u64 = boot_contract::GUEST_RAM_IPA;
/// IPA of the image (boot contract `GUEST_IMAGE_IPA`).
pub const GUEST_IMAGE_BASE: u64 = boot_contract::GUEST_IMAGE_IPA;
/// The tested memory starts at the first multiple of this after the image
/// (boot contract `GUEST_TEST_ALIGN`).
pub const TEST_ALIGN: u64 = boot_contract::GUEST_TEST_ALIGN;
/// Most vCPUs the payload runs on (stacks).
pub const MAX_VCPUS: usize = 4;
/// Largest N the argument can ask for.
pub const MAX_MIB: u16 = 1024;
/// IPA of the test device the VMM emulates for [`Mode::Exits`]: a read
/// of `base + off` returns [`mmio_test_value`]`(off)` until written; a
/// write stores the value for later reads of the same offset.
///
/// The boot contract's `GUEST_MMIO_TEST_IPA`.
pub const MMIO_TEST_BASE: u64 = boot_contract::GUEST_MMIO_TEST_IPA;

/// IPA of the console UART (the data register of a PL011, as on QEMU's
/// `virt` board) the payload writes its console bytes to, one byte per
/// store, when [`Arg::uart`] is set: a VMM emulates it (MMIO exits), on
/// any hypervisor. Otherwise the console is `HYP_GUEST_CONSOLE_WRITE`.
/// The boot contract's `GUEST_UART_IPA`.
pub const UART_BASE: u64 = boot_contract::GUEST_UART_IPA;

/// What the test device reads as at `off` before anything was written.
#[must_use]
pub const fn mmio_test_value(off: u64) -> u64 {
    0x1122_3344_5566_7788 ^ off
}

/// Bytes between two touched words in [`Mode::Touch`].
pub const TOUCH_STRIDE: usize = 64;

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Fill, verify, report, shut down.
    Fill,
    /// Touch memory in a loop and report pass counts.
    Touch,
    /// Make each kind of exit and check the results.
    Exits,
    /// Two vCPUs fill and check halves of the memory.
    Smp,
    /// Touch something the hypervisor must not let a guest touch (N
    /// selects it, [`Probe`]); the VM is expected to end there.
    Probe,
    /// One [`Op`] on the page at [`Arg::gfn`].
    Poke,
    /// Malformed guest calls.
    Hostile,
    /// Tick counts of null calls and first touches (from [`Arg::gfn`]).
    Bench,
    /// Report, write and check the registers of [`Reg`].
    Regs,
}

/// The registers [`Mode::Regs`] reports and writes: state a guest reaches
/// without a trap, which must never carry another party's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// TPIDR_EL0.
    TpidrEl0,
    /// TPIDRRO_EL0.
    TpidrroEl0,
    /// CONTEXTIDR_EL1.
    Contextidr,
    /// TPIDR2_EL0 (SME).
    Tpidr2,
    /// ICC_PMR_EL1 (the virtual interface's priority mask).
    IccPmr,
    /// ICC_BPR0_EL1.
    IccBpr0,
    /// ICC_BPR1_EL1.
    IccBpr1,
    /// ICC_IGRPEN0_EL1.
    IccIgrpen0,
    /// ICC_IGRPEN1_EL1.
    IccIgrpen1,
    /// ICC_CTLR_EL1 (CBPR and EOImode: the writable bits).
    IccCtlr,
    /// ICC_AP0R0_EL1.
    IccAp0r0,
    /// ICC_AP1R0_EL1.
    IccAp1r0,
    /// DISR_EL1 (RAS; VDISR_EL2 while the guest runs).
    Disr,
}

/// The CPU feature a [`Reg`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Every AArch64 CPU.
    Nothing,
    /// FEAT_SME (ID_AA64PFR1_EL1.SME).
    Sme,
    /// The GICv3 system-register interface (ID_AA64PFR0_EL1.GIC).
    Gic,
    /// FEAT_RAS (ID_AA64PFR0_EL1.RAS).
    Ras,
    /// FEAT_SVE (ID_AA64PFR0_EL1.SVE).
    Sve,
    /// FEAT_LOR (ID_AA64MMFR1_EL1.LO).
    Lor,
}

impl Reg {
    /// Every register, in report order.
    pub const ALL: [Self; 13] = [
        Self::TpidrEl0,
        Self::TpidrroEl0,
        Self::Contextidr,
        Self::Tpidr2,
        Self::IccPmr,
        Self::IccBpr0,
        Self::IccBpr1,
        Self::IccIgrpen0,
        Self::IccIgrpen1,
        Self::IccCtlr,
        Self::IccAp0r0,
        Self::IccAp1r0,
        Self::Disr,
    ];

    /// Its name in reports (`guest: reg <name> <value>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::TpidrEl0 => "tpidr_el0",
            Self::TpidrroEl0 => "tpidrro_el0",
            Self::Contextidr => "contextidr_el1",
            Self::Tpidr2 => "tpidr2_el0",
            Self::IccPmr => "icc_pmr_el1",
            Self::IccBpr0 => "icc_bpr0_el1",
            Self::IccBpr1 => "icc_bpr1_el1",
            Self::IccIgrpen0 => "icc_igrpen0_el1",
            Self::IccIgrpen1 => "icc_igrpen1_el1",
            Self::IccCtlr => "icc_ctlr_el1",
            Self::IccAp0r0 => "icc_ap0r0_el1",
            Self::IccAp1r0 => "icc_ap1r0_el1",
            Self::Disr => "disr_el1",
        }
    }

    /// What it needs to exist.
    #[must_use]
    pub const fn needs(self) -> Needs {
        match self {
            Self::TpidrEl0 | Self::TpidrroEl0 | Self::Contextidr => Needs::Nothing,
            Self::Tpidr2 => Needs::Sme,
            Self::Disr => Needs::Ras,
            _ => Needs::Gic,
        }
    }

    /// The value [`Mode::Regs`] writes (within [`Reg::mask`]).
    #[must_use]
    pub const fn sentinel(self) -> u64 {
        match self {
            Self::TpidrEl0 => 0x7e57_0000_0000_0e10,
            Self::TpidrroEl0 => 0x7e57_0000_0000_0e11,
            Self::Contextidr => 0x7e57_c1d0,
            Self::Tpidr2 => 0x7e57_0000_0000_7902,
            Self::IccPmr => 0xa8,
            Self::IccBpr0 => 3,
            Self::IccBpr1 => 4,
            Self::IccIgrpen0 | Self::IccIgrpen1 => 1,
            Self::IccCtlr => 0b10,
            Self::IccAp0r0 => 1,
            Self::IccAp1r0 => 2,
            Self::Disr => 0x11,
        }
    }

    /// The bits that are guest state (the rest are read-only or RES0).
    #[must_use]
    pub const fn mask(self) -> u64 {
        match self {
            Self::Contextidr | Self::IccAp0r0 | Self::IccAp1r0 => 0xffff_ffff,
            Self::IccPmr => 0xff,
            Self::IccBpr0 | Self::IccBpr1 => 0x7,
            Self::IccIgrpen0 | Self::IccIgrpen1 => 1,
            Self::IccCtlr => 0b11,
            Self::Disr => 0x81ff_ffff,
            _ => u64::MAX,
        }
    }

    /// The value a fresh vCPU must read (within [`Reg::mask`]), or `None`
    /// where it depends on the CPU: the binary points read as at least the
    /// implementation's minimum, whatever was written.
    #[must_use]
    pub const fn fresh(self) -> Option<u64> {
        match self {
            Self::IccBpr0 | Self::IccBpr1 => None,
            _ => Some(0),
        }
    }

    /// Parses a report line `guest: reg <name> <hex value>`.
    #[must_use]
    pub fn parse_report(line: &str) -> Option<(Self, u64)> {
        let rest = line.strip_prefix("guest: reg ")?;
        let (name, value) = rest.split_once(' ')?;
        let reg = Self::ALL.into_iter().find(|r| r.name() == name)?;
        let v = u64::from_str_radix(value.strip_prefix("0x")?, 16).ok()?;
        Some((reg, v))
    }
}

/// What [`Mode::Poke`] does with its page (IPA `gfn << 12`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `count` times: read word 0, report `guest: read <value>`.
    Read = 0,
    /// Write [`pattern`] to every word of the page, report `guest: wrote`.
    Write = 1,
    /// Read word 0 and report it, then write [`pattern`] to word 0 and
    /// report `guest: wrote`.
    ReadWrite = 2,
    /// Read word 0 of the page in a loop, storing the loop count in word 0
    /// of the next page (`gfn + 1`), for at most 2^`count` loops; if the
    /// loop ends without a fault, report `guest: spin ended after <n>`.
    Spin = 3,
}

impl Op {
    /// Every op, in number order.
    pub const ALL: [Self; 4] = [Self::Read, Self::Write, Self::ReadWrite, Self::Spin];
}

/// What [`Mode::Probe`] touches (the argument's N).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Read PMCR_EL0 (PMU, trapped by MDCR_EL2.TPM/TPMCR).
    Pmu = 1,
    /// Read MDSCR_EL1 (debug, trapped by MDCR_EL2.TDA).
    Debug = 2,
    /// Enable SVE at EL1 (CPACR_EL1.ZEN) and execute an SVE instruction
    /// (trapped by CPTR_EL2.TZ).
    Sve = 3,
    /// Read CNTP_CTL_EL0 (the physical timer, trapped by CNTHCTL_EL2).
    PhysTimer = 4,
    /// Read ACTLR_EL1 (trapped by HCR_EL2.TACR).
    Actlr = 5,
    /// Read LORC_EL1 (FEAT_LOR; trapped by HCR_EL2.TLOR).
    Lor = 6,
    /// Read ERRIDR_EL1 (FEAT_RAS; trapped by HCR_EL2.TERR).
    Ras = 7,
}

impl Probe {
    /// Every probe, in number order.
    pub const ALL: [Self; 7] = [
        Self::Pmu,
        Self::Debug,
        Self::Sve,
        Self::PhysTimer,
        Self::Actlr,
        Self::Lor,
        Self::Ras,
    ];

    /// What the probed register or instruction needs to exist.
    #[must_use]
    pub const fn needs(self) -> Needs {
        match self {
            Self::Sve => Needs::Sve,
            Self::Lor => Needs::Lor,
            Self::Ras => Needs::Ras,
            Self::Pmu | Self::Debug | Self::PhysTimer | Self::Actlr => Needs::Nothing,
        }
    }

    /// The exception class of the trap it must end in (ESR_EL2 bits
    /// 31:26): a system-register trap, or an SVE trap.
    #[must_use]
    pub const fn trap_class(self) -> u64 {
        match self {
            Self::Sve => 0x19,
            _ => 0x18,
        }
    }

    /// The probe for N.
    #[must_use]
    pub fn from_n(n: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p as u16 == n)
    }
}

/// The guest's argument (x0 at entry).
///
/// | bits | field |
/// |---|---|
/// | 3:0 | mode: 1 = fill, 2 = touch, 3 = exits, 4 = smp, 5 = probe |
/// | 4 | [`Arg::uart`]: console on the UART, power-off by PSCI |
/// | 31:16 | N, MiB of memory to use (1..=1024); in probe mode the [`Probe`] |
/// | 47:32 | touch: reports before shutdown (0 = run forever) |
/// | 55:48 | touch: log2 of passes per report |
///
/// Modes 6 (poke), 7 (hostile), 8 (bench) and 9 (regs, no other bits) use
/// the bits differently:
///
/// | bits | field |
/// |---|---|
/// | 7:4 | poke: the [`Op`] |
/// | 15:8 | poke: [`Arg::count`] (reads, or log2 of spin loops); bench: log2 of iterations (at most 24) |
/// | 55:16 | poke, bench: [`Arg::gfn`] |
///
/// Other bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    /// The mode.
    pub mode: Mode,
    /// MiB of memory.
    pub mib: u16,
    /// Touch: reports before shutdown (0 = forever).
    pub reports: u16,
    /// Touch: log2 of passes per report (at most 31).
    pub passes_log2: u8,
    /// Poke: the operation.
    pub op: Op,
    /// Poke: reads, or log2 of spin loops; bench: log2 of iterations.
    pub count: u8,
    /// Poke, bench: the guest frame (IPA >> 12).
    pub gfn: u64,
    /// Modes 1-5: console over the UART at [`UART_BASE`] and power-off by
    /// PSCI `SYSTEM_OFF` instead of the hypervisor's guest calls, so that
    /// the payload runs under another hypervisor too (KVM).
    pub uart: bool,
}

/// Why an argument was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// Unknown mode.
    Mode(u64),
    /// N is 0 or above [`MAX_MIB`].
    Size(u64),
    /// `passes_log2` above 31.
    Passes(u64),
    /// Reserved bits set.
    Reserved(u64),
    /// Unknown poke operation.
    Op(u64),
    /// Bench: log2 of iterations above 24.
    Iterations(u64),
}

impl Arg {
    const RESERVED: u64 = 0xff00_0000_0000_ffe0;
    const UART: u64 = 1 << 4;

    /// Decodes x0.
    pub fn decode(x0: u64) -> Result<Self, ArgError> {
        match x0 & 0xf {
            6 => return Self::decode_poke(x0, Mode::Poke),
            7 => return Self::decode_poke(x0, Mode::Hostile),
            8 => return Self::decode_poke(x0, Mode::Bench),
            9 if x0 == 9 => return Ok(Self::new(Mode::Regs)),
            9 => return Err(ArgError::Reserved(x0 & !0xf)),
            _ => {}
        }
        if x0 & Self::RESERVED != 0 {
            return Err(ArgError::Reserved(x0 & Self::RESERVED));
        }
        let mode = match x0 & 0xf {
            1 => Mode::Fill,
            2 => Mode::Touch,
            3 => Mode::Exits,
            4 => Mode::Smp,
            5 => Mode::Probe,
            m => return Err(ArgError::Mode(m)),
        };
        let mib = ((x0 >> 16) & 0xffff) as u16;
        if mib == 0 || mib > MAX_MIB {
            return Err(ArgError::Size(u64::from(mib)));
        }
        let passes_log2 = ((x0 >> 48) & 0xff) as u8;
        if passes_log2 > 31 {
            return Err(ArgError::Passes(u64::from(passes_log2)));
        }
        Ok(Self {
            mode,
            mib,
            reports: ((x0 >> 32) & 0xffff) as u16,
            passes_log2,
            uart: x0 & Self::UART != 0,
            ..Self::new(mode)
        })
    }

    /// An argument of `mode` with every field zero (MiB 1).
    #[must_use]
    pub const fn new(mode: Mode) -> Self {
        Self {
            mode,
            mib: 1,
            reports: 0,
            passes_log2: 0,
            op: Op::Read,
            count: 0,
            gfn: 0,
            uart: false,
        }
    }

    /// Poke `op` on `gfn` (`count`: reads, or log2 of spin loops).
    #[must_use]
    pub const fn poke(op: Op, gfn: u64, count: u8) -> Self {
        let mut a = Self::new(Mode::Poke);
        a.op = op;
        a.gfn = gfn;
        a.count = count;
        a
    }

    /// Bench: 2^`log2` iterations, fresh pages from `gfn`.
    #[must_use]
    pub const fn bench(gfn: u64, log2: u8) -> Self {
        let mut a = Self::new(Mode::Bench);
        a.gfn = gfn;
        a.count = log2;
        a
    }

    fn decode_poke(x0: u64, mode: Mode) -> Result<Self, ArgError> {
        const GFN_MASK: u64 = (1 << 40) - 1;
        let reserved = match mode {
            Mode::Poke => 0xff00_0000_0000_0000,
            Mode::Bench => 0xff00_0000_0000_00f0,
            _ => !0xf,
        };
        if x0 & reserved != 0 {
            return Err(ArgError::Reserved(x0 & reserved));
        }
        let mut a = Self::new(mode);
        a.gfn = (x0 >> 16) & GFN_MASK;
        a.count = ((x0 >> 8) & 0xff) as u8;
        if mode == Mode::Poke {
            let op = (x0 >> 4) & 0xf;
            a.op = *Op::ALL.get(op as usize).ok_or(ArgError::Op(op))?;
        }
        if mode == Mode::Bench && a.count > 24 {
            return Err(ArgError::Iterations(u64::from(a.count)));
        }
        Ok(a)
    }

    /// Encodes into x0.
    #[must_use]
    pub fn encode(&self) -> u64 {
        let mode = match self.mode {
            Mode::Fill => 1,
            Mode::Touch => 2,
            Mode::Exits => 3,
            Mode::Smp => 4,
            Mode::Probe => 5,
            Mode::Poke => 6,
            Mode::Hostile => 7,
            Mode::Bench => 8,
            Mode::Regs => 9,
        };
        match self.mode {
            Mode::Poke => {
                return mode
                    | (self.op as u64) << 4
                    | u64::from(self.count) << 8
                    | (self.gfn & ((1 << 40) - 1)) << 16
            }
            Mode::Bench => {
                return mode | u64::from(self.count) << 8 | (self.gfn & ((1 << 40) - 1)) << 16
            }
            Mode::Hostile | Mode::Regs => return mode,
            _ => {}
        }
        mode | u64::from(self.uart) << 4
            | u64::from(self.mib) << 16
            | u64::from(self.reports) << 32
            | u64::from(self.passes_log2) << 48
    }

    /// Bytes of memory to use.
    #[must_use]
    pub fn bytes(&self) -> usize {
        usize::from(self.mib) << 20
    }
}

/// The word the fill mode stores at (guest) address `addr`: a mix of the
/// address, so that a page mapped twice, at the wrong place or not at all
/// shows up.
#[must_use]
pub fn pattern(addr: u64) -> u64 {
    let mut x = addr ^ 0x5a5a_1234_dead_beef;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Fills `words`, which start at guest address `base`, with [`pattern`].
pub fn fill(words: &mut [u64], base: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(base + 8 * i as u64);
    }
}

/// A word that did not read back as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Its guest address.
    pub addr: u64,
    /// What was read.
    pub got: u64,
    /// What was written.
    pub expected: u64,
}

/// Checks `words` (at guest address `base`) against [`pattern`]; returns
/// the checksum of what was read and the first mismatch, if any.
#[must_use]
pub fn verify(words: &[u64], base: u64) -> (u64, Option<Mismatch>) {
    let mut sum = 0u64;
    let mut first = None;
    for (i, &w) in words.iter().enumerate() {
        sum = checksum_step(sum, w);
        let addr = base + 8 * i as u64;
        let expected = pattern(addr);
        if w != expected && first.is_none() {
            first = Some(Mismatch {
                addr,
                got: w,
                expected,
            });
        }
    }
    (sum, first)
}

/// One step of the checksum (FNV-1a over words): order-sensitive, so
/// swapped pages change it.
#[must_use]
pub fn checksum_step(sum: u64, word: u64) -> u64 {
    (sum ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// The checksum [`verify`] gives for a correct fill of `len` words at `base`.
#[must_use]
pub fn expected_checksum(base: u64, len: usize) -> u64 {
    (0..len as u64).fold(0, |s, i| checksum_step(s, pattern(base + 8 * i)))
}

/// One pass of the touch mode: adds 1 to one word per [`TOUCH_STRIDE`] bytes.
pub fn touch(words: &mut [u64]) {
    for w in words.iter_mut().step_by(TOUCH_STRIDE / 8) {
        *w = w.wrapping_add(1);
    }
}

/// Text output as `HYP_GUEST_CONSOLE_WRITE` calls of up to 16 bytes,
/// flushed at each newline and when full.
#[derive(Debug)]
pub struct Console<F: FnMut(GuestCall)> {
    buf: [u8; CONSOLE_MAX_BYTES],
    len: usize,
    call: F,
}

impl<F: FnMut(GuestCall)> Console<F> {
    /// Output through `call`.
    pub fn new(call: F) -> Self {
        Self {
            buf: [0; CONSOLE_MAX_BYTES],
            len: 0,
            call,
        }
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        if let Some(bytes) = self.buf.get(..self.len).and_then(ConsoleBytes::new) {
            (self.call)(GuestCall::ConsoleWrite(bytes));
        }
        self.len = 0;
    }

    fn push(&mut self, b: u8) {
        if self.len == CONSOLE_MAX_BYTES {
            self.flush();
        }
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
        if b == b'\n' {
            self.flush();
        }
    }
}

impl<F: FnMut(GuestCall)> core::fmt::Write for Console<F> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        s.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;
    use std::vec::Vec;

    #[test]
    fn arg_round_trip_and_errors() {
        let a = Arg {
            mib: 64,
            reports: 3,
            passes_log2: 4,
            ..Arg::new(Mode::Touch)
        };
        assert_eq!(Arg::decode(a.encode()), Ok(a));
        assert_eq!(a.encode(), 2 | 64 << 16 | 3 << 32 | 4 << 48);
        assert_eq!(a.bytes(), 64 << 20);
        let f = Arg::decode(1 | 4 << 16).unwrap();
        assert_eq!((f.mode, f.mib), (Mode::Fill, 4));
        assert_eq!(Arg::decode(3 | 4 << 16).map(|a| a.mode), Ok(Mode::Exits));
        assert_eq!(Arg::decode(4 | 4 << 16).map(|a| a.mode), Ok(Mode::Smp));
        assert_eq!(Arg::decode(5 | 4 << 16).map(|a| a.mode), Ok(Mode::Probe));
        assert_eq!(Arg::decode(10 | 4 << 16), Err(ArgError::Mode(10)));
        assert_eq!(Arg::decode(9 | 4 << 16), Err(ArgError::Reserved(4 << 16)));
        let r = Arg::new(Mode::Regs);
        assert_eq!((r.encode(), Arg::decode(9)), (9, Ok(r)));
        assert_eq!(Arg::decode(0), Err(ArgError::Mode(0)));
        assert_eq!(Probe::from_n(3), Some(Probe::Sve));
        assert_eq!(Probe::from_n(0), None);
        assert_eq!(Probe::from_n(7), Some(Probe::Ras));
        assert_eq!(Probe::from_n(8), None);
        assert_eq!(Arg::decode(1), Err(ArgError::Size(0)));
        assert_eq!(Arg::decode(1 | 1025 << 16), Err(ArgError::Size(1025)));
        assert_eq!(
            Arg::decode(2 | 1 << 16 | 32 << 48),
            Err(ArgError::Passes(32))
        );
        assert_eq!(
            Arg::decode(1 | 1 << 16 | 1 << 5),
            Err(ArgError::Reserved(0x20))
        );
        let u = Arg {
            uart: true,
            ..Arg::decode(1 | 8 << 16).unwrap()
        };
        assert_eq!(u.encode(), 1 | 1 << 4 | 8 << 16);
        assert_eq!(Arg::decode(u.encode()), Ok(u));
        assert!(matches!(
            Arg::decode(1 | 1 << 16 | 1 << 60),
            Err(ArgError::Reserved(_))
        ));
    }

    #[test]
    fn reg_reports_parse_and_sentinels_fit() {
        for r in Reg::ALL {
            let line = std::format!("guest: reg {} {:#x}", r.name(), r.sentinel());
            assert_eq!(Reg::parse_report(&line), Some((r, r.sentinel())));
            assert_eq!(r.sentinel() & r.mask(), r.sentinel(), "{r:?}");
            assert_ne!(r.fresh(), Some(r.sentinel()), "{r:?}: a leak must show");
        }
        assert_eq!(Reg::parse_report("guest: reg nope 0x1"), None);
        assert_eq!(Reg::parse_report("guest: reg tpidr_el0 12"), None);
    }

    #[test]
    fn poke_hostile_bench_round_trip() {
        for op in Op::ALL {
            let a = Arg::poke(op, (1 << 40) - 1, 0xff);
            assert_eq!(Arg::decode(a.encode()), Ok(a));
        }
        let a = Arg::poke(Op::Spin, 0x40300, 20);
        assert_eq!(a.encode(), 6 | 3 << 4 | 20 << 8 | 0x40300 << 16);
        assert_eq!(Arg::decode(6 | 4 << 4), Err(ArgError::Op(4)));
        assert_eq!(Arg::decode(6 | 1 << 60), Err(ArgError::Reserved(1 << 60)));
        let h = Arg::new(Mode::Hostile);
        assert_eq!(h.encode(), 7);
        assert_eq!(Arg::decode(7), Ok(h));
        assert_eq!(Arg::decode(7 | 1 << 16), Err(ArgError::Reserved(1 << 16)));
        let b = Arg::bench(0x48000, 10);
        assert_eq!(Arg::decode(b.encode()), Ok(b));
        assert_eq!(Arg::decode(8 | 25 << 8), Err(ArgError::Iterations(25)));
        assert_eq!(Arg::decode(8 | 1 << 4), Err(ArgError::Reserved(1 << 4)));
        // The older modes keep their encoding.
        assert_eq!(
            Arg::decode(1 | 64 << 16).map(|a| a.encode()),
            Ok(1 | 64 << 16)
        );
    }

    #[test]
    fn fill_then_verify() {
        let base = 0x4020_0000;
        let mut m = std::vec![0u64; 4096];
        fill(&mut m, base);
        let (sum, bad) = verify(&m, base);
        assert_eq!(bad, None);
        assert_eq!(sum, expected_checksum(base, m.len()));
        // The same data seen at another address fails.
        let (_, bad) = verify(&m, base + 4096);
        assert_eq!(bad.map(|b| b.addr), Some(base + 4096));
    }

    #[test]
    fn corruption_and_swaps_are_caught() {
        let base = 0x4020_0000;
        let mut m = std::vec![0u64; 1024];
        fill(&mut m, base);
        m[700] ^= 1 << 13;
        let (sum, bad) = verify(&m, base);
        assert_eq!(bad.unwrap().addr, base + 700 * 8);
        assert_ne!(sum, expected_checksum(base, m.len()));
        // Swapping two halves changes the checksum even with equal words.
        let mut a = std::vec![0u64; 512];
        fill(&mut a, base);
        let mut b = a.clone();
        b.rotate_left(256);
        assert_ne!(verify(&a, base).0, verify(&b, base).0);
        // Patterns differ between neighbouring words and pages.
        assert_ne!(pattern(base), pattern(base + 8));
        assert_ne!(pattern(base), pattern(base + 4096));
    }

    #[test]
    fn touch_adds_one_per_line() {
        let mut m = std::vec![0u64; 64];
        touch(&mut m);
        touch(&mut m);
        let touched: Vec<usize> = (0..64).filter(|&i| m[i] != 0).collect();
        assert_eq!(touched, std::vec![0, 8, 16, 24, 32, 40, 48, 56]);
        assert!(touched.iter().all(|&i| m[i] == 2));
    }

    #[test]
    fn console_chunks_lines() {
        let mut calls = Vec::new();
        {
            let mut c = Console::new(|call| calls.push(call));
            write!(c, "fill 4 MiB: checksum {:#018x} PASS\nx", 0x1234u64).unwrap();
            c.flush();
            c.flush(); // nothing buffered: no call
        }
        let text: Vec<u8> = calls
            .iter()
            .flat_map(|c| match c {
                GuestCall::ConsoleWrite(b) => b.as_bytes().to_vec(),
                _ => panic!("not a console write"),
            })
            .collect();
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "fill 4 MiB: checksum 0x0000000000001234 PASS\nx"
        );
        assert!(calls.iter().all(|c| matches!(
            c, GuestCall::ConsoleWrite(b) if b.as_bytes().len() <= 16
        )));
        // The newline ends a call.
        let first_nl = calls
            .iter()
            .position(|c| matches!(c, GuestCall::ConsoleWrite(b) if b.as_bytes().ends_with(b"\n")))
            .unwrap();
        assert_eq!(first_nl, calls.len() - 2);
    }
}
