//! The run structure a vCPU fd maps (KVM's `struct kvm_run` in spirit).
//!
//! In C the exit data is a union of the `struct s2pin_run_*` below; in Rust
//! it is eight `u64` words ([`S2pinRun::exit`]) that [`S2pinRun::decode`]
//! and [`S2pinRun::encode`] convert to and from the typed [`Exit`], without
//! `unsafe`. The word layouts are the C structs' little-endian memory.

use crate::ExitReason;

/// Words in the exit union (64 bytes).
pub const RUN_UNION_WORDS: usize = 8;
/// Bytes of one console exit.
pub const CONSOLE_MAX: usize = 16;

/// The page a vCPU fd maps: `mmap(fd, 0, S2PIN_GET_VCPU_MMAP_SIZE)`.
///
/// User space sets `immediate_exit` (`RUN` then fails with `EINTR` at once,
/// as KVM's) and, after an MMIO read exit, `mmio.data`; the module writes
/// the rest on every exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2pinRun {
    /// Non-zero: the next `RUN` returns `EINTR` without entering the guest.
    pub immediate_exit: u8,
    /// Zero.
    pub pad0: [u8; 7],
    /// An [`ExitReason`] code.
    pub exit_reason: u32,
    /// Zero.
    pub pad1: u32,
    /// The exit's data (the C union): see [`S2pinRun::decode`].
    pub exit: [u64; RUN_UNION_WORDS],
}

/// `exit_reason` [`ExitReason::Mmio`]: `union.mmio`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunMmio {
    /// The guest physical (byte) address.
    pub phys_addr: u64,
    /// A write's data; for a read, user space stores the loaded value here
    /// before the next `RUN`.
    pub data: u64,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub len: u32,
    /// 1 for a write, 0 for a read.
    pub is_write: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `exit_reason` [`ExitReason::Console`]: `union.console`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunConsole {
    /// Bytes valid in `bytes` (1..=16).
    pub len: u32,
    /// Zero.
    pub pad: u32,
    /// The bytes the guest wrote.
    pub bytes: [u8; CONSOLE_MAX],
}

/// `exit_reason` [`ExitReason::MemFault`]: `union.mem_fault`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunMemFault {
    /// The faulting guest physical address (page-aligned).
    pub gpa: u64,
    /// `S2PIN_ACCESS_READ`, `WRITE` or `EXEC`.
    pub access: u32,
    /// A [`MemFaultKind`] code.
    pub kind: u32,
    /// For [`MemFaultKind::HostDenied`]: the negative errno pinning the page
    /// gave (e.g. `-EFAULT` for a `PROT_NONE` or unmapped address); else 0.
    pub error: i32,
    /// Zero.
    pub pad: u32,
}

/// `exit_reason` [`ExitReason::SystemEvent`]: `union.system_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunSystemEvent {
    /// A [`SystemEventType`] code.
    pub ty: u32,
    /// Zero.
    pub pad: u32,
}

/// `exit_reason` [`ExitReason::UnhandledTrap`]: `union.unhandled`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunUnhandled {
    /// `ESR_EL2` of the trap.
    pub esr: u64,
    /// `FAR_EL2` (0 if unknown).
    pub far: u64,
}

/// `exit_reason` [`ExitReason::ShareRequest`] / [`ExitReason::UnshareRequest`]:
/// `union.range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunRange {
    /// First guest frame.
    pub gfn: u64,
    /// Number of pages.
    pub nr: u64,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<S2pinRun>() == 80);
    assert!(offset_of!(S2pinRun, exit_reason) == 8);
    assert!(offset_of!(S2pinRun, exit) == 16);
    assert!(size_of::<RunMmio>() == 24);
    assert!(offset_of!(RunMmio, data) == 8);
    assert!(offset_of!(RunMmio, len) == 16);
    assert!(offset_of!(RunMmio, is_write) == 20);
    assert!(size_of::<RunConsole>() == 24);
    assert!(offset_of!(RunConsole, bytes) == 8);
    assert!(size_of::<RunMemFault>() == 24);
    assert!(offset_of!(RunMemFault, access) == 8);
    assert!(offset_of!(RunMemFault, kind) == 12);
    assert!(offset_of!(RunMemFault, error) == 16);
    assert!(size_of::<RunSystemEvent>() == 8);
    assert!(size_of::<RunUnhandled>() == 16);
    assert!(size_of::<RunRange>() == 16);
};

/// [`RunMemFault::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemFaultKind {
    /// No memory slot covers the address (inside the RAM window).
    NoSlot = 0,
    /// A write (or exec) to a read-only slot.
    ReadOnlySlot = 1,
    /// The host mapping behind the slot forbids the access: pinning failed
    /// (`PROT_NONE`, `PROT_READ` for a write, or unmapped); see `error`.
    HostDenied = 2,
}

impl MemFaultKind {
    /// Every kind, in code order.
    pub const ALL: &'static [Self] = &[Self::NoSlot, Self::ReadOnlySlot, Self::HostDenied];

    /// The kind with this code.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u32 == v)
    }

    /// The C macro name.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        match self {
            Self::NoSlot => "S2PIN_FAULT_NO_SLOT",
            Self::ReadOnlySlot => "S2PIN_FAULT_READONLY_SLOT",
            Self::HostDenied => "S2PIN_FAULT_HOST_DENIED",
        }
    }
}

/// [`RunSystemEvent::ty`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemEventType {
    /// The guest called `HYP_GUEST_SHUTDOWN`.
    Shutdown = 1,
    /// The guest called PSCI `SYSTEM_OFF`.
    SystemOff = 2,
    /// The guest called PSCI `SYSTEM_RESET`.
    SystemReset = 3,
}

impl SystemEventType {
    /// Every type, in code order.
    pub const ALL: &'static [Self] = &[Self::Shutdown, Self::SystemOff, Self::SystemReset];

    /// The type with this code.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u32 == v)
    }

    /// The C macro name.
    #[must_use]
    pub const fn c_name(self) -> &'static str {
        match self {
            Self::Shutdown => "S2PIN_SYSTEM_EVENT_SHUTDOWN",
            Self::SystemOff => "S2PIN_SYSTEM_EVENT_SYSTEM_OFF",
            Self::SystemReset => "S2PIN_SYSTEM_EVENT_SYSTEM_RESET",
        }
    }
}

/// A decoded exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// [`ExitReason::None`].
    None,
    /// [`ExitReason::Mmio`].
    Mmio(RunMmio),
    /// [`ExitReason::Console`].
    Console(RunConsole),
    /// [`ExitReason::MemFault`].
    MemFault(RunMemFault),
    /// [`ExitReason::SystemEvent`].
    SystemEvent(RunSystemEvent),
    /// [`ExitReason::UnhandledTrap`].
    UnhandledTrap(RunUnhandled),
    /// [`ExitReason::ShareRequest`].
    ShareRequest(RunRange),
    /// [`ExitReason::UnshareRequest`].
    UnshareRequest(RunRange),
    /// [`ExitReason::Intr`].
    Intr,
    /// [`ExitReason::PendingWork`].
    PendingWork,
    /// A reason code this crate does not know.
    Unknown(u32),
}

fn lo(w: u64) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // the low half, on purpose
    let v = w as u32;
    v
}

fn hi(w: u64) -> u32 {
    lo(w >> 32)
}

fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

impl RunConsole {
    /// The valid bytes (`len` clamped to 16).
    #[must_use]
    pub fn text(&self) -> &[u8] {
        let n = usize::try_from(self.len).map_or(CONSOLE_MAX, |n| n.min(CONSOLE_MAX));
        self.bytes.get(..n).unwrap_or(&self.bytes)
    }
}

impl S2pinRun {
    /// The exit as a typed value. Padding is ignored.
    #[must_use]
    pub fn decode(&self) -> Exit {
        let w = &self.exit;
        let Some(reason) = ExitReason::from_u32(self.exit_reason) else {
            return Exit::Unknown(self.exit_reason);
        };
        let range = RunRange {
            gfn: w[0],
            nr: w[1],
        };
        match reason {
            ExitReason::None => Exit::None,
            ExitReason::Mmio => Exit::Mmio(RunMmio {
                phys_addr: w[0],
                data: w[1],
                len: lo(w[2]),
                #[allow(clippy::cast_possible_truncation)] // byte 20
                is_write: hi(w[2]) as u8,
                pad: [0; 3],
            }),
            ExitReason::Console => {
                let mut bytes = [0u8; CONSOLE_MAX];
                let (a, b) = bytes.split_at_mut(8);
                a.copy_from_slice(&w[1].to_le_bytes());
                b.copy_from_slice(&w[2].to_le_bytes());
                Exit::Console(RunConsole {
                    len: lo(w[0]),
                    pad: 0,
                    bytes,
                })
            }
            ExitReason::MemFault => Exit::MemFault(RunMemFault {
                gpa: w[0],
                access: lo(w[1]),
                kind: hi(w[1]),
                #[allow(clippy::cast_possible_wrap)] // an i32 field, bit for bit
                error: lo(w[2]) as i32,
                pad: 0,
            }),
            ExitReason::SystemEvent => Exit::SystemEvent(RunSystemEvent {
                ty: lo(w[0]),
                pad: 0,
            }),
            ExitReason::UnhandledTrap => Exit::UnhandledTrap(RunUnhandled {
                esr: w[0],
                far: w[1],
            }),
            ExitReason::ShareRequest => Exit::ShareRequest(range),
            ExitReason::UnshareRequest => Exit::UnshareRequest(range),
            ExitReason::Intr => Exit::Intr,
            ExitReason::PendingWork => Exit::PendingWork,
        }
    }

    /// Stores `exit`: sets `exit_reason` and the union (unused words zero).
    /// `Exit::Unknown(code)` stores the code with an empty union.
    pub fn encode(&mut self, exit: &Exit) {
        let mut w = [0u64; RUN_UNION_WORDS];
        let reason = match exit {
            Exit::None => ExitReason::None as u32,
            Exit::Mmio(m) => {
                w[0] = m.phys_addr;
                w[1] = m.data;
                w[2] = join(m.len, u32::from(m.is_write));
                ExitReason::Mmio as u32
            }
            Exit::Console(c) => {
                w[0] = u64::from(c.len);
                let (a, b) = c.bytes.split_at(8);
                let mut x = [0u8; 8];
                x.copy_from_slice(a);
                w[1] = u64::from_le_bytes(x);
                x.copy_from_slice(b);
                w[2] = u64::from_le_bytes(x);
                ExitReason::Console as u32
            }
            Exit::MemFault(f) => {
                w[0] = f.gpa;
                w[1] = join(f.access, f.kind);
                #[allow(clippy::cast_sign_loss)] // an i32 field, bit for bit
                let e = f.error as u32;
                w[2] = u64::from(e);
                ExitReason::MemFault as u32
            }
            Exit::SystemEvent(s) => {
                w[0] = u64::from(s.ty);
                ExitReason::SystemEvent as u32
            }
            Exit::UnhandledTrap(u) => {
                w[0] = u.esr;
                w[1] = u.far;
                ExitReason::UnhandledTrap as u32
            }
            Exit::ShareRequest(r) | Exit::UnshareRequest(r) => {
                w[0] = r.gfn;
                w[1] = r.nr;
                if matches!(exit, Exit::ShareRequest(_)) {
                    ExitReason::ShareRequest as u32
                } else {
                    ExitReason::UnshareRequest as u32
                }
            }
            Exit::Intr => ExitReason::Intr as u32,
            Exit::PendingWork => ExitReason::PendingWork as u32,
            Exit::Unknown(code) => *code,
        };
        self.exit_reason = reason;
        self.exit = w;
    }

    /// After an MMIO read exit: the value the guest's load returns.
    pub fn set_mmio_read_data(&mut self, data: u64) {
        self.exit[1] = data;
    }

    /// The value user space stored for an MMIO read (word 1 of the union).
    #[must_use]
    pub fn mmio_read_data(&self) -> u64 {
        self.exit[1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_exit() -> impl Strategy<Value = Exit> {
        prop_oneof![
            Just(Exit::None),
            (any::<u64>(), any::<u64>(), any::<u32>(), any::<u8>()).prop_map(|(a, d, l, w)| {
                Exit::Mmio(RunMmio {
                    phys_addr: a,
                    data: d,
                    len: l,
                    is_write: w,
                    pad: [0; 3],
                })
            }),
            (any::<u32>(), any::<[u8; 16]>()).prop_map(|(len, bytes)| Exit::Console(RunConsole {
                len,
                pad: 0,
                bytes
            })),
            (any::<u64>(), any::<u32>(), any::<u32>(), any::<i32>()).prop_map(
                |(gpa, access, kind, error)| Exit::MemFault(RunMemFault {
                    gpa,
                    access,
                    kind,
                    error,
                    pad: 0
                })
            ),
            any::<u32>().prop_map(|ty| Exit::SystemEvent(RunSystemEvent { ty, pad: 0 })),
            (any::<u64>(), any::<u64>())
                .prop_map(|(esr, far)| Exit::UnhandledTrap(RunUnhandled { esr, far })),
            (any::<u64>(), any::<u64>())
                .prop_map(|(gfn, nr)| Exit::ShareRequest(RunRange { gfn, nr })),
            (any::<u64>(), any::<u64>())
                .prop_map(|(gfn, nr)| Exit::UnshareRequest(RunRange { gfn, nr })),
            Just(Exit::Intr),
            Just(Exit::PendingWork),
            (10u32..).prop_map(Exit::Unknown),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(e in arb_exit()) {
            let mut run = S2pinRun::default();
            run.encode(&e);
            prop_assert_eq!(run.decode(), e);
        }

        #[test]
        fn decode_never_panics(reason in any::<u32>(), w in any::<[u64; 8]>()) {
            let run = S2pinRun { exit_reason: reason, exit: w, ..S2pinRun::default() };
            let _ = run.decode();
        }
    }

    #[test]
    fn mmio_words_match_the_c_layout() {
        let mut run = S2pinRun::default();
        run.encode(&Exit::Mmio(RunMmio {
            phys_addr: 0x900_0000,
            data: 0,
            len: 4,
            is_write: 1,
            pad: [0; 3],
        }));
        // len at bytes 16..20, is_write at byte 20 (little-endian).
        assert_eq!(run.exit[2], 4 | (1 << 32));
        run.set_mmio_read_data(0xAB);
        assert_eq!(run.mmio_read_data(), 0xAB);
    }

    #[test]
    fn console_text_clamps() {
        let c = RunConsole {
            len: 99,
            pad: 0,
            bytes: *b"0123456789abcdef",
        };
        assert_eq!(c.text().len(), 16);
        let c = RunConsole { len: 3, ..c };
        assert_eq!(c.text(), b"012");
    }
}
