//! The C header for the host kernel module, generated from this crate.
//!
//! [`c_defines`] lists every `#define` (name, value, comment, section);
//! [`write_c_header`] renders them, with an include guard and a
//! "generated, do not edit" banner. The checked-in copy is
//! `host-driver/include/hyp_abi.h`; a test fails when it differs from what
//! this module generates (`cargo xtask gen-header` rewrites it).

use core::fmt::{self, Write};

use crate::call::{CounterGroup, VCPU_START_OFF};
use crate::error::HypError;
use crate::ids::{GuestFunction, HostFunction, HYP_FN_BASE, SMCCC_FUNC_MASK, SMCCC_SVE_HINT};
use crate::reply::{
    Access, ExitReason, FaultKind, OwnerState, PageState, OWNER_HOST, OWNER_HYP, OWNER_VM,
    PAGE_STATE_NONE,
};
use crate::types::{Pfn, Prot, VM_HANDLE_GEN_SHIFT, VM_HANDLE_INDEX_MASK};
use crate::{
    ABI_VERSION_MAJOR, ABI_VERSION_MINOR, CONSOLE_MAX_BYTES, MAX_IPA_BITS, MAX_PAGES_PER_CALL,
    MAX_ROOT_TABLE_PAGES, MAX_VCPUS, MEMCACHE_RECLAIM_MAX, MIN_IPA_BITS, PAGE_SHIFT, PFN_BITS,
    TEARDOWN_BATCH,
};

/// The include guard of the generated header.
pub const C_HEADER_GUARD: &str = "HYP_ABI_H";
/// Where the generated header is checked in, relative to the workspace root.
pub const C_HEADER_PATH: &str = "host-driver/include/hyp_abi.h";

/// How a value is written in C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CValue {
    /// A 32-bit unsigned value in hex with a `U` suffix (function ids, masks).
    Hex32(u32),
    /// A 64-bit unsigned value in hex with a `ULL` suffix.
    Hex64(u64),
    /// A small non-negative value in decimal, no suffix (limits, codes).
    Dec(u64),
    /// A negative value in decimal, parenthesised (error codes).
    Neg(i64),
}

impl fmt::Display for CValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Hex32(v) => write!(f, "0x{v:08X}U"),
            Self::Hex64(v) => write!(f, "0x{v:X}ULL"),
            Self::Dec(v) => write!(f, "{v}"),
            Self::Neg(v) => write!(f, "({v})"),
        }
    }
}

/// One `#define NAME VALUE` of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CDefine {
    /// Section title (defines of one section are contiguous).
    pub section: &'static str,
    /// Macro name.
    pub name: &'static str,
    /// Value.
    pub value: CValue,
    /// One-line comment.
    pub doc: &'static str,
}

/// Calls `f` with every define of the header, in order; stops at the first error.
pub fn c_defines<E>(mut f: impl FnMut(CDefine) -> Result<(), E>) -> Result<(), E> {
    let mut def = |section, name, value, doc| {
        f(CDefine {
            section,
            name,
            value,
            doc,
        })
    };
    let dec = |v: u64| CValue::Dec(v);

    let s = "ABI version (HYP_VERSION returns it)";
    def(
        s,
        "HYP_ABI_VERSION_MAJOR",
        dec(u64::from(ABI_VERSION_MAJOR)),
        "incompatible changes",
    )?;
    def(
        s,
        "HYP_ABI_VERSION_MINOR",
        dec(u64::from(ABI_VERSION_MINOR)),
        "compatible additions",
    )?;

    let s = "SMCCC function id layout (ABI.md 2.1)";
    def(
        s,
        "HYP_SMCCC_FN_BASE",
        CValue::Hex32(HYP_FN_BASE),
        "fast call, SMC64, owner 6 (vendor hyp)",
    )?;
    def(
        s,
        "HYP_SMCCC_FN_MASK",
        CValue::Hex32(SMCCC_FUNC_MASK),
        "function number, bits 15:0",
    )?;
    def(
        s,
        "HYP_SMCCC_SVE_HINT",
        CValue::Hex32(SMCCC_SVE_HINT),
        "SMCCC 1.3 SVE hint: ignored",
    )?;

    let s = "Host calls: HVC #0, id in x0 (ABI.md 3)";
    for func in HostFunction::ALL {
        def(s, func.name(), CValue::Hex32(func.id()), func.signature())?;
    }

    let s = "Guest calls: HVC #0 from a guest, provisional (ABI.md 4)";
    for func in GuestFunction::ALL {
        def(s, func.name(), CValue::Hex32(func.id()), func.signature())?;
    }

    let s = "Return codes in x0 (ABI.md 2.4)";
    def(s, "HYP_SUCCESS", dec(0), "success")?;
    for e in HypError::ALL {
        if let Some(name) = e.c_name() {
            def(s, name, CValue::Neg(e.to_i64()), e.description())?;
        }
    }

    let s = "Limits (ABI.md 2.3)";
    def(
        s,
        "HYP_PAGE_SHIFT",
        dec(u64::from(PAGE_SHIFT)),
        "4 KiB pages",
    )?;
    def(
        s,
        "HYP_PFN_BITS",
        dec(u64::from(PFN_BITS)),
        "pfn and gfn registers: higher bits reserved",
    )?;
    def(
        s,
        "HYP_PFN_MASK",
        CValue::Hex64(Pfn::MAX.raw()),
        "largest pfn or gfn",
    )?;
    def(
        s,
        "HYP_MAX_PAGES_PER_CALL",
        dec(u64::from(MAX_PAGES_PER_CALL)),
        "nr_pages maximum (else HYP_E2BIG)",
    )?;
    def(
        s,
        "HYP_TEARDOWN_BATCH",
        dec(u64::from(TEARDOWN_BATCH)),
        "page updates per HYP_TEARDOWN_RECLAIM (a 2 MiB block: 512)",
    )?;
    def(
        s,
        "HYP_MEMCACHE_RECLAIM_MAX",
        dec(MEMCACHE_RECLAIM_MAX as u64),
        "pfns per HYP_MEMCACHE_RECLAIM",
    )?;
    def(
        s,
        "HYP_MAX_VCPUS",
        dec(u64::from(MAX_VCPUS)),
        "vCPUs per VM",
    )?;
    def(
        s,
        "HYP_MIN_IPA_BITS",
        dec(u64::from(MIN_IPA_BITS)),
        "smallest IPA size",
    )?;
    def(
        s,
        "HYP_MAX_IPA_BITS",
        dec(u64::from(MAX_IPA_BITS)),
        "largest IPA size",
    )?;
    def(
        s,
        "HYP_MAX_ROOT_TABLE_PAGES",
        dec(u64::from(MAX_ROOT_TABLE_PAGES)),
        "see HYP_ROOT_TABLE_PAGES()",
    )?;
    def(
        s,
        "HYP_CONSOLE_MAX_BYTES",
        dec(CONSOLE_MAX_BYTES as u64),
        "bytes per console write",
    )?;

    let s = "VM handles: slot index in 15:0, generation (never 0) in 31:16 (ABI.md 2.2)";
    def(
        s,
        "HYP_VM_HANDLE_INDEX_MASK",
        CValue::Hex32(VM_HANDLE_INDEX_MASK),
        "slot index",
    )?;
    def(
        s,
        "HYP_VM_HANDLE_GEN_SHIFT",
        dec(u64::from(VM_HANDLE_GEN_SHIFT)),
        "generation",
    )?;

    let s = "Stage-2 permissions (prot arguments)";
    def(s, "HYP_PROT_R", dec(Prot::R.bits()), "read")?;
    def(s, "HYP_PROT_W", dec(Prot::W.bits()), "write")?;
    def(s, "HYP_PROT_X", dec(Prot::X.bits()), "execute")?;

    let s = "HYP_VCPU_RUN exit reasons in x1 (ABI.md 5)";
    for r in ExitReason::ALL {
        def(s, r.c_name(), dec(*r as u64), r.layout())?;
    }
    def(
        s,
        "HYP_ACCESS_READ",
        dec(Access::Read as u64),
        "HYP_EXIT_MEM_FAULT x3: data read",
    )?;
    def(
        s,
        "HYP_ACCESS_WRITE",
        dec(Access::Write as u64),
        "HYP_EXIT_MEM_FAULT x3: data write",
    )?;
    def(
        s,
        "HYP_ACCESS_EXEC",
        dec(Access::Exec as u64),
        "HYP_EXIT_MEM_FAULT x3: instruction fetch",
    )?;
    def(
        s,
        "HYP_FAULT_UNMAPPED",
        dec(FaultKind::Unmapped as u64),
        "HYP_EXIT_MEM_FAULT x4: nothing mapped at gfn",
    )?;
    def(
        s,
        "HYP_FAULT_PERMISSION",
        dec(FaultKind::Permission as u64),
        "HYP_EXIT_MEM_FAULT x4: mapped without the needed permission",
    )?;

    let s = "HYP_VCPU_CREATE start flags (x5, ABI.md 3.6)";
    def(
        s,
        "HYP_VCPU_START_OFF",
        dec(VCPU_START_OFF),
        "powered off until a guest PSCI CPU_ON; x3, x4 zero",
    )?;

    let s = "HYP_VM_COUNTERS groups (x2) and the register of each counter (ABI.md 3.18)";
    def(
        s,
        "HYP_COUNTERS_STAGE2",
        dec(CounterGroup::Stage2 as u64),
        "group 0",
    )?;
    def(s, "HYP_CTR_S2_MAPS", dec(1), "group 0 x1: pages mapped")?;
    def(s, "HYP_CTR_S2_UNMAPS", dec(2), "group 0 x2: pages unmapped")?;
    def(s, "HYP_CTR_S2_TLBI", dec(3), "group 0 x3: TLBI operations")?;
    def(s, "HYP_CTR_S2_SHARES", dec(4), "group 0 x4: pages shared")?;
    def(
        s,
        "HYP_CTR_S2_UNSHARES",
        dec(5),
        "group 0 x5: pages unshared",
    )?;
    def(
        s,
        "HYP_CTR_S2_DONATIONS",
        dec(6),
        "group 0 x6: pages donated",
    )?;
    def(
        s,
        "HYP_CTR_S2_RECLAIMS",
        dec(7),
        "group 0 x7: pages reclaimed",
    )?;
    def(
        s,
        "HYP_COUNTERS_RUNTIME",
        dec(CounterGroup::Runtime as u64),
        "group 1",
    )?;
    def(s, "HYP_CTR_RT_FAULTS", dec(1), "group 1 x1: stage-2 faults")?;
    def(
        s,
        "HYP_CTR_RT_VCPU_RUNS",
        dec(2),
        "group 1 x2: guest entries",
    )?;
    def(
        s,
        "HYP_CTR_RT_MEMCACHE_PAGES",
        dec(3),
        "group 1 x3: free memcache pages (gauge)",
    )?;
    def(
        s,
        "HYP_CTR_RT_TABLE_PAGES",
        dec(4),
        "group 1 x4: stage-2 table pages (gauge)",
    )?;
    def(
        s,
        "HYP_CTR_RT_HOST_EXITS",
        dec(5),
        "group 1 x5: exits returned to the host",
    )?;
    def(
        s,
        "HYP_CTR_RT_HYP_EXITS",
        dec(6),
        "group 1 x6: exits answered by the hypervisor",
    )?;
    def(
        s,
        "HYP_CTR_RT_IRQ_EXITS",
        dec(7),
        "group 1 x7: runs ended by a physical interrupt",
    )?;

    let s = "Page-state queries (ABI.md 2.5, 3.19, 3.20)";
    def(
        s,
        "HYP_OWNER_HOST",
        dec(OWNER_HOST),
        "HYP_HOST_PAGE_STATE x1",
    )?;
    def(s, "HYP_OWNER_HYP", dec(OWNER_HYP), "HYP_HOST_PAGE_STATE x1")?;
    def(
        s,
        "HYP_OWNER_VM",
        dec(OWNER_VM),
        "HYP_HOST_PAGE_STATE x1 (x2 = VM handle)",
    )?;
    def(
        s,
        "HYP_OWNER_STATE_OWNED",
        dec(OwnerState::Owned as u64),
        "HYP_HOST_PAGE_STATE x3",
    )?;
    def(
        s,
        "HYP_OWNER_STATE_SHARED_OWNED",
        dec(OwnerState::SharedOwned as u64),
        "HYP_HOST_PAGE_STATE x3",
    )?;
    def(
        s,
        "HYP_PAGE_NONE",
        dec(PAGE_STATE_NONE),
        "HYP_GUEST_PAGE_STATE x1: unmapped",
    )?;
    def(
        s,
        "HYP_PAGE_OWNED",
        dec(PageState::Owned as u64),
        "HYP_GUEST_PAGE_STATE x1",
    )?;
    def(
        s,
        "HYP_PAGE_SHARED_OWNED",
        dec(PageState::SharedOwned as u64),
        "HYP_GUEST_PAGE_STATE x1",
    )?;
    def(
        s,
        "HYP_PAGE_SHARED_BORROWED",
        dec(PageState::SharedBorrowed as u64),
        "HYP_GUEST_PAGE_STATE x1",
    )?;
    Ok(())
}

/// The function-like macros of the header (name with parameters, body,
/// comment). Their results are checked against the Rust functions by the
/// C-compile test.
pub const C_MACROS: &[(&str, &str, &str)] = &[
    (
        "HYP_VM_HANDLE(index, gen)",
        "((((unsigned int)(gen)) << HYP_VM_HANDLE_GEN_SHIFT) | ((unsigned int)(index) & HYP_VM_HANDLE_INDEX_MASK))",
        "build a VM handle",
    ),
    ("HYP_STAGE2_LEVELS(ipa_bits)", "(((ipa_bits) - 8) / 9)", "stage-2 levels for an IPA size (4 KiB granule)"),
    (
        "HYP_ROOT_TABLE_PAGES(ipa_bits)",
        "(((ipa_bits) - 12 - 9 * (HYP_STAGE2_LEVELS(ipa_bits) - 1)) > 9 ? \
         (1U << ((ipa_bits) - 21 - 9 * (HYP_STAGE2_LEVELS(ipa_bits) - 1))) : 1U)",
        "root pages HYP_VM_CREATE takes (and the alignment of x3)",
    ),
];

/// Writes the whole header to `w`.
pub fn write_c_header(w: &mut impl Write) -> fmt::Result {
    writeln!(w, "/* SPDX-License-Identifier: MIT OR Apache-2.0 */")?;
    writeln!(w, "/*")?;
    writeln!(w, " * GENERATED FILE - DO NOT EDIT.")?;
    writeln!(w, " *")?;
    writeln!(
        w,
        " * Generated from the Rust crate `hypercalls` (hypercalls/src), the single"
    )?;
    writeln!(
        w,
        " * source of the hypervisor's hypercall ABI. Regenerate with:"
    )?;
    writeln!(w, " *     cargo xtask gen-header")?;
    writeln!(w, " * The contract is described in docs/ABI.md.")?;
    writeln!(w, " *")?;
    writeln!(
        w,
        " * Calling convention: HVC #0, SMCCC 64-bit fast calls. x0 = function id,"
    )?;
    writeln!(
        w,
        " * arguments in x1..x7; on return x0 = HYP_SUCCESS or a negative HYP_E* code,"
    )?;
    writeln!(
        w,
        " * results in x1..x7 (zero when unused). Unused argument registers and"
    )?;
    writeln!(w, " * reserved bits must be zero (else HYP_EINVAL).")?;
    writeln!(w, " */")?;
    writeln!(w)?;
    writeln!(w, "#ifndef {C_HEADER_GUARD}")?;
    writeln!(w, "#define {C_HEADER_GUARD}")?;

    let mut section = "";
    c_defines(|d| {
        if d.section != section {
            section = d.section;
            writeln!(w)?;
            writeln!(w, "/* {section} */")?;
        }
        let pad = 40usize.saturating_sub(d.name.len()).max(1);
        writeln!(
            w,
            "#define {}{:pad$}{} /* {} */",
            d.name, "", d.value, d.doc
        )
    })?;

    writeln!(w)?;
    writeln!(w, "/* Helpers */")?;
    for (name, body, doc) in C_MACROS {
        writeln!(w, "/* {doc} */")?;
        writeln!(w, "#define {name} {body}")?;
    }
    writeln!(w)?;
    writeln!(w, "#endif /* {C_HEADER_GUARD} */")
}

/// The generated header as a string.
#[cfg(feature = "alloc")]
#[must_use]
pub fn c_header() -> alloc::string::String {
    let mut s = alloc::string::String::new();
    // Writing to a String cannot fail.
    let _ = write_c_header(&mut s);
    s
}
