//! The C header for the module's glue, generated from this crate.
//!
//! [`write_c_header`] renders every constant, structure and ioctl number;
//! the checked-in copy is `host-driver/include/s2pin_uapi.h` (a test fails
//! when it differs; `cargo xtask gen-header` rewrites it). [`C_LAYOUT`]
//! lists each structure's size and field offsets as the Rust compiler laid
//! them out, for the C compile test to check against the C compiler's.

use core::fmt::{self, Write};
use core::mem::{offset_of, size_of};

use crate::run::{
    MemFaultKind, RunConsole, RunMemFault, RunMmio, RunRange, RunSystemEvent, RunUnhandled,
    S2pinRun, SystemEventType, CONSOLE_MAX, RUN_UNION_WORDS,
};
use crate::stats::S2pinVmStats;
use crate::{
    ExitReason, Policy, S2pinCreateVcpu, S2pinCreateVm, S2pinUserspaceMemoryRegion, IOCTLS,
    S2PIN_ACCESS_EXEC, S2PIN_ACCESS_READ, S2PIN_ACCESS_WRITE, S2PIN_API_VERSION,
    S2PIN_DEFAULT_IPA_BITS, S2PIN_IOCTL_TYPE, S2PIN_MAX_IPA_BITS, S2PIN_MAX_MEMSLOTS,
    S2PIN_MAX_VCPUS, S2PIN_MEM_READONLY, S2PIN_MIN_IPA_BITS, S2PIN_PAGE_SIZE, S2PIN_VCPU_START_OFF,
};

/// The include guard of the generated header.
pub const C_HEADER_GUARD: &str = "S2PIN_UAPI_H";
/// Where the generated header is checked in, relative to the workspace root.
pub const C_HEADER_PATH: &str = "host-driver/include/s2pin_uapi.h";

/// One `#define NAME VALUE` of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CDefine {
    /// Section title (defines of one section are contiguous).
    pub section: &'static str,
    /// Macro name.
    pub name: &'static str,
    /// Value (written in decimal, or hex with `U` for ioctl numbers).
    pub value: u64,
    /// Whether the value is written in hex.
    pub hex: bool,
    /// One-line comment.
    pub doc: &'static str,
}

/// Calls `f` with every define of the header, in order; stops at the first error.
pub fn c_header_defines<E>(mut f: impl FnMut(CDefine) -> Result<(), E>) -> Result<(), E> {
    let mut def = |section, name, value: u64, doc| {
        f(CDefine {
            section,
            name,
            value,
            hex: name == "S2PIN_IOCTL_TYPE",
            doc,
        })
    };
    let s = "Version and limits";
    def(
        s,
        "S2PIN_API_VERSION",
        u64::from(S2PIN_API_VERSION),
        "S2PIN_GET_API_VERSION returns it",
    )?;
    def(
        s,
        "S2PIN_IOCTL_TYPE",
        u64::from(S2PIN_IOCTL_TYPE),
        "ioctl type byte (0xBE)",
    )?;
    def(
        s,
        "S2PIN_MAX_MEMSLOTS",
        u64::from(S2PIN_MAX_MEMSLOTS),
        "slot ids 0..S2PIN_MAX_MEMSLOTS-1",
    )?;
    def(
        s,
        "S2PIN_MAX_VCPUS",
        u64::from(S2PIN_MAX_VCPUS),
        "vCPU indices 0..S2PIN_MAX_VCPUS-1",
    )?;
    def(
        s,
        "S2PIN_PAGE_SIZE",
        S2PIN_PAGE_SIZE,
        "alignment of regions and the RAM window",
    )?;
    def(
        s,
        "S2PIN_MIN_IPA_BITS",
        u64::from(S2PIN_MIN_IPA_BITS),
        "smallest ipa_bits",
    )?;
    def(
        s,
        "S2PIN_MAX_IPA_BITS",
        u64::from(S2PIN_MAX_IPA_BITS),
        "largest ipa_bits",
    )?;
    def(
        s,
        "S2PIN_DEFAULT_IPA_BITS",
        u64::from(S2PIN_DEFAULT_IPA_BITS),
        "ipa_bits 0 means this",
    )?;
    def(
        s,
        "S2PIN_CONSOLE_MAX",
        CONSOLE_MAX as u64,
        "bytes per console exit",
    )?;
    def(
        s,
        "S2PIN_STATS_COUNT",
        crate::STATS_COUNT as u64,
        "u64 counters in struct s2pin_vm_stats",
    )?;

    let s = "Flags";
    def(
        s,
        "S2PIN_MEM_READONLY",
        u64::from(S2PIN_MEM_READONLY),
        "s2pin_userspace_memory_region.flags",
    )?;
    def(
        s,
        "S2PIN_VCPU_START_OFF",
        u64::from(S2PIN_VCPU_START_OFF),
        "s2pin_create_vcpu.flags",
    )?;

    let s = "MMU-notifier policies (s2pin_create_vm.policy)";
    for p in Policy::ALL {
        def(s, p.c_name(), *p as u64, p.name())?;
    }

    let s = "Exit reasons (s2pin_run.exit_reason)";
    for r in ExitReason::ALL {
        def(s, r.c_name(), *r as u64, r.doc())?;
    }

    let s = "Memory faults (s2pin_run.mem_fault)";
    def(
        s,
        "S2PIN_ACCESS_READ",
        u64::from(S2PIN_ACCESS_READ),
        "access: data read",
    )?;
    def(
        s,
        "S2PIN_ACCESS_WRITE",
        u64::from(S2PIN_ACCESS_WRITE),
        "access: data write",
    )?;
    def(
        s,
        "S2PIN_ACCESS_EXEC",
        u64::from(S2PIN_ACCESS_EXEC),
        "access: instruction fetch",
    )?;
    for k in MemFaultKind::ALL {
        let doc = match k {
            MemFaultKind::NoSlot => "kind: no slot covers gpa",
            MemFaultKind::ReadOnlySlot => "kind: write to a read-only slot",
            MemFaultKind::HostDenied => "kind: the host mapping forbids it (error = -errno)",
        };
        def(s, k.c_name(), *k as u64, doc)?;
    }

    let s = "System events (s2pin_run.system_event.type)";
    for t in SystemEventType::ALL {
        let doc = match t {
            SystemEventType::Shutdown => "HYP_GUEST_SHUTDOWN",
            SystemEventType::SystemOff => "PSCI SYSTEM_OFF",
            SystemEventType::SystemReset => "PSCI SYSTEM_RESET",
        };
        def(s, t.c_name(), *t as u64, doc)?;
    }
    Ok(())
}

/// Every structure's size and field offsets as Rust lays them out:
/// (C expression, value). The C compile test asserts each.
pub const C_LAYOUT: &[(&str, usize)] = &[
    ("sizeof(struct s2pin_create_vm)", size_of::<S2pinCreateVm>()),
    (
        "offsetof(struct s2pin_create_vm, policy)",
        offset_of!(S2pinCreateVm, policy),
    ),
    (
        "offsetof(struct s2pin_create_vm, flags)",
        offset_of!(S2pinCreateVm, flags),
    ),
    (
        "offsetof(struct s2pin_create_vm, mem_base)",
        offset_of!(S2pinCreateVm, mem_base),
    ),
    (
        "offsetof(struct s2pin_create_vm, mem_size)",
        offset_of!(S2pinCreateVm, mem_size),
    ),
    (
        "sizeof(struct s2pin_userspace_memory_region)",
        size_of::<S2pinUserspaceMemoryRegion>(),
    ),
    (
        "offsetof(struct s2pin_userspace_memory_region, flags)",
        offset_of!(S2pinUserspaceMemoryRegion, flags),
    ),
    (
        "offsetof(struct s2pin_userspace_memory_region, guest_phys_addr)",
        offset_of!(S2pinUserspaceMemoryRegion, guest_phys_addr),
    ),
    (
        "offsetof(struct s2pin_userspace_memory_region, memory_size)",
        offset_of!(S2pinUserspaceMemoryRegion, memory_size),
    ),
    (
        "offsetof(struct s2pin_userspace_memory_region, userspace_addr)",
        offset_of!(S2pinUserspaceMemoryRegion, userspace_addr),
    ),
    (
        "sizeof(struct s2pin_create_vcpu)",
        size_of::<S2pinCreateVcpu>(),
    ),
    (
        "offsetof(struct s2pin_create_vcpu, flags)",
        offset_of!(S2pinCreateVcpu, flags),
    ),
    (
        "offsetof(struct s2pin_create_vcpu, entry)",
        offset_of!(S2pinCreateVcpu, entry),
    ),
    (
        "offsetof(struct s2pin_create_vcpu, x0)",
        offset_of!(S2pinCreateVcpu, x0),
    ),
    ("sizeof(struct s2pin_vm_stats)", size_of::<S2pinVmStats>()),
    (
        "offsetof(struct s2pin_vm_stats, kept)",
        offset_of!(S2pinVmStats, kept),
    ),
    (
        "offsetof(struct s2pin_vm_stats, el2_rt_irq_exits)",
        offset_of!(S2pinVmStats, el2_rt_irq_exits),
    ),
    (
        "offsetof(struct s2pin_vm_stats, calls_other)",
        offset_of!(S2pinVmStats, calls_other),
    ),
    ("sizeof(struct s2pin_run_mmio)", size_of::<RunMmio>()),
    (
        "offsetof(struct s2pin_run_mmio, data)",
        offset_of!(RunMmio, data),
    ),
    (
        "offsetof(struct s2pin_run_mmio, len)",
        offset_of!(RunMmio, len),
    ),
    (
        "offsetof(struct s2pin_run_mmio, is_write)",
        offset_of!(RunMmio, is_write),
    ),
    ("sizeof(struct s2pin_run_console)", size_of::<RunConsole>()),
    (
        "offsetof(struct s2pin_run_console, bytes)",
        offset_of!(RunConsole, bytes),
    ),
    (
        "sizeof(struct s2pin_run_mem_fault)",
        size_of::<RunMemFault>(),
    ),
    (
        "offsetof(struct s2pin_run_mem_fault, access)",
        offset_of!(RunMemFault, access),
    ),
    (
        "offsetof(struct s2pin_run_mem_fault, kind)",
        offset_of!(RunMemFault, kind),
    ),
    (
        "offsetof(struct s2pin_run_mem_fault, error)",
        offset_of!(RunMemFault, error),
    ),
    (
        "sizeof(struct s2pin_run_system_event)",
        size_of::<RunSystemEvent>(),
    ),
    (
        "sizeof(struct s2pin_run_unhandled)",
        size_of::<RunUnhandled>(),
    ),
    (
        "offsetof(struct s2pin_run_unhandled, far)",
        offset_of!(RunUnhandled, far),
    ),
    ("sizeof(struct s2pin_run_range)", size_of::<RunRange>()),
    (
        "offsetof(struct s2pin_run_range, nr)",
        offset_of!(RunRange, nr),
    ),
    ("sizeof(struct s2pin_run)", size_of::<S2pinRun>()),
    (
        "offsetof(struct s2pin_run, exit_reason)",
        offset_of!(S2pinRun, exit_reason),
    ),
    (
        "offsetof(struct s2pin_run, mmio)",
        offset_of!(S2pinRun, exit),
    ),
    (
        "offsetof(struct s2pin_run, mmio.data)",
        offset_of!(S2pinRun, exit) + 8,
    ),
    (
        "offsetof(struct s2pin_run, console.bytes)",
        offset_of!(S2pinRun, exit) + 8,
    ),
    (
        "offsetof(struct s2pin_run, mem_fault.kind)",
        offset_of!(S2pinRun, exit) + 12,
    ),
    (
        "offsetof(struct s2pin_run, range.nr)",
        offset_of!(S2pinRun, exit) + 8,
    ),
];

const BANNER: &str = "\
/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * GENERATED FILE - DO NOT EDIT.
 *
 * The user-space ABI of /dev/s2pin (ioctl numbers, structures, exit
 * reasons), generated from the s2pin-uapi crate (host-driver/uapi).
 * Regenerate with: cargo xtask gen-header
 */
";

/// The structures, in C (kept in step with the Rust types by [`C_LAYOUT`]).
const STRUCTS: &str = "\
/* S2PIN_CREATE_VM argument. */
struct s2pin_create_vm {
\t__u32 ipa_bits;   /* 32..48, 0 = S2PIN_DEFAULT_IPA_BITS */
\t__u32 policy;     /* S2PIN_POLICY_* */
\t__u64 flags;      /* 0 */
\t__u64 mem_base;   /* guest RAM window [mem_base, mem_base + mem_size) */
\t__u64 mem_size;
};

/* S2PIN_SET_USER_MEMORY_REGION argument (KVM's shape). */
struct s2pin_userspace_memory_region {
\t__u32 slot;            /* 0..S2PIN_MAX_MEMSLOTS-1 */
\t__u32 flags;           /* S2PIN_MEM_READONLY */
\t__u64 guest_phys_addr;
\t__u64 memory_size;     /* bytes; 0 deletes the slot */
\t__u64 userspace_addr;
};

/* S2PIN_CREATE_VCPU argument. */
struct s2pin_create_vcpu {
\t__u32 index;
\t__u32 flags;  /* S2PIN_VCPU_START_OFF */
\t__u64 entry;  /* entry IPA */
\t__u64 x0;     /* guest x0 at entry */
};

struct s2pin_run_mmio {
\t__u64 phys_addr;
\t__u64 data;      /* a write's data; user space stores a read's value */
\t__u32 len;       /* 1, 2, 4, 8 */
\t__u8 is_write;
\t__u8 pad[3];
};

struct s2pin_run_console {
\t__u32 len;
\t__u32 pad;
\t__u8 bytes[S2PIN_CONSOLE_MAX];
};

struct s2pin_run_mem_fault {
\t__u64 gpa;
\t__u32 access;  /* S2PIN_ACCESS_* */
\t__u32 kind;    /* S2PIN_FAULT_* */
\t__s32 error;   /* S2PIN_FAULT_HOST_DENIED: -errno of the pin */
\t__u32 pad;
};

struct s2pin_run_system_event {
\t__u32 type;    /* S2PIN_SYSTEM_EVENT_* */
\t__u32 pad;
};

struct s2pin_run_unhandled {
\t__u64 esr;
\t__u64 far;
};

struct s2pin_run_range {
\t__u64 gfn;
\t__u64 nr;
};

/* The page a vCPU fd maps (KVM's struct kvm_run in spirit). */
struct s2pin_run {
\t__u8 immediate_exit;
\t__u8 pad0[7];
\t__u32 exit_reason;  /* S2PIN_EXIT_* */
\t__u32 pad1;
\tunion {
\t\tstruct s2pin_run_mmio mmio;
\t\tstruct s2pin_run_console console;
\t\tstruct s2pin_run_mem_fault mem_fault;
\t\tstruct s2pin_run_system_event system_event;
\t\tstruct s2pin_run_unhandled unhandled;
\t\tstruct s2pin_run_range range;  /* SHARE_REQUEST, UNSHARE_REQUEST */
\t\t__u64 words[";

/// Writes the whole header to `w`.
///
/// # Errors
/// Only those of `w`.
pub fn write_c_header(w: &mut impl Write) -> fmt::Result {
    w.write_str(BANNER)?;
    writeln!(w, "#ifndef {C_HEADER_GUARD}\n#define {C_HEADER_GUARD}\n")?;
    w.write_str("#include <linux/types.h>\n#include <linux/ioctl.h>\n")?;
    let mut section = "";
    c_header_defines(|d| {
        if d.section != section {
            section = d.section;
            writeln!(w, "\n/* {section} */")?;
        }
        if d.hex {
            writeln!(w, "#define {} 0x{:X}U /* {} */", d.name, d.value, d.doc)
        } else {
            writeln!(w, "#define {} {} /* {} */", d.name, d.value, d.doc)
        }
    })?;
    w.write_str("\n")?;
    w.write_str(STRUCTS)?;
    writeln!(w, "{RUN_UNION_WORDS}];\n\t}};\n}};\n")?;
    w.write_str(
        "/* S2PIN_GET_STATS argument: every counter of one VM. */\nstruct s2pin_vm_stats {\n",
    )?;
    for (name, doc) in S2pinVmStats::FIELDS {
        writeln!(w, "\t__u64 {name}; /* {doc} */")?;
    }
    w.write_str(
        "};\n\n/* ioctls (arm64 Linux _IOC encoding; values checked against <linux/ioctl.h>) */\n",
    )?;
    for (name, nr) in IOCTLS {
        writeln!(w, "#define {name} 0x{nr:X}U /* {} */", ioctl_form(nr))?;
    }
    writeln!(w, "\n#endif /* {C_HEADER_GUARD} */")
}

/// The `_IO*(...)` expression an ioctl number is, as C.
struct IoctlForm(u32);

fn ioctl_form(nr: &u32) -> IoctlForm {
    IoctlForm(*nr)
}

impl fmt::Display for IoctlForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        let dir = v >> 30;
        let size = (v >> 16) & 0x3FFF;
        let ty = (v >> 8) & 0xFF;
        let nr = v & 0xFF;
        let arg = IOCTLS
            .iter()
            .find(|(_, n)| *n == v)
            .and_then(|(name, _)| struct_of(name));
        match (dir, arg) {
            (0, _) => write!(f, "_IO(0x{ty:X}, 0x{nr:02X})"),
            (1, Some(s)) => write!(f, "_IOW(0x{ty:X}, 0x{nr:02X}, struct {s})"),
            (2, Some(s)) => write!(f, "_IOR(0x{ty:X}, 0x{nr:02X}, struct {s})"),
            _ => write!(f, "_IOC({dir}, 0x{ty:X}, 0x{nr:02X}, {size})"),
        }
    }
}

/// The argument structure of the ioctl named `name`, if it has one.
#[must_use]
pub fn struct_of(name: &str) -> Option<&'static str> {
    match name {
        "S2PIN_CREATE_VM" => Some("s2pin_create_vm"),
        "S2PIN_SET_USER_MEMORY_REGION" => Some("s2pin_userspace_memory_region"),
        "S2PIN_CREATE_VCPU" => Some("s2pin_create_vcpu"),
        "S2PIN_GET_STATS" => Some("s2pin_vm_stats"),
        _ => None,
    }
}

/// The whole header as a string.
#[cfg(feature = "alloc")]
#[must_use]
pub fn c_header() -> alloc::string::String {
    let mut s = alloc::string::String::new();
    // Writing to a String cannot fail.
    let _ = write_c_header(&mut s);
    s
}
