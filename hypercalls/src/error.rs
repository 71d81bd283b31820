//! Error codes returned in x0.
//!
//! x0 is 0 on success. An unknown function id gives SMCCC `NOT_SUPPORTED`
//! (-1); every other failure is a negative errno-style value, chosen so that
//! none of them is -1 (there is no `EPERM`). See `docs/ABI.md` §2.4.

use core::fmt;

use crate::ids::SMCCC_RET_NOT_SUPPORTED;

/// A failed call, as carried in x0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HypError {
    /// -1, SMCCC `NOT_SUPPORTED`: unknown function id (or one this build does
    /// not implement).
    NotSupported,
    /// -2, `ENOENT`: no such VM (or a stale handle), vCPU, or mapping.
    NoEntry,
    /// -7, `E2BIG`: a page count above [`MAX_PAGES_PER_CALL`](crate::MAX_PAGES_PER_CALL).
    TooBig,
    /// -12, `ENOMEM`: the VM's memcache has too few pages; top it up and retry.
    NoMemory,
    /// -13, `EACCES`: the page-ownership state forbids the transition.
    Denied,
    /// -16, `EBUSY`: the VM is in the wrong lifecycle state (dying, or not
    /// dying for a teardown step) or a vCPU is running.
    Busy,
    /// -17, `EEXIST`: the object or the mapping already exists.
    Exists,
    /// -22, `EINVAL`: a malformed argument (reserved bits set, a value out of
    /// its documented domain).
    InvalidArgument,
    /// -28, `ENOSPC`: no free VM slot.
    NoSpace,
    /// -34, `ERANGE`: a frame that is not RAM, a range beyond the IPA space,
    /// a vCPU index beyond the VM's vCPU count, or a counter overflow.
    OutOfRange,
    /// Any other negative value (from a newer hypervisor, or a bug).
    Unknown(i64),
}

/// `ENOENT`.
pub const ENOENT: i64 = -2;
/// `E2BIG`.
pub const E2BIG: i64 = -7;
/// `ENOMEM`.
pub const ENOMEM: i64 = -12;
/// `EACCES`.
pub const EACCES: i64 = -13;
/// `EBUSY`.
pub const EBUSY: i64 = -16;
/// `EEXIST`.
pub const EEXIST: i64 = -17;
/// `EINVAL`.
pub const EINVAL: i64 = -22;
/// `ENOSPC`.
pub const ENOSPC: i64 = -28;
/// `ERANGE`.
pub const ERANGE: i64 = -34;

impl HypError {
    /// Every named error, in code order.
    pub const ALL: &'static [Self] = &[
        Self::NotSupported,
        Self::NoEntry,
        Self::TooBig,
        Self::NoMemory,
        Self::Denied,
        Self::Busy,
        Self::Exists,
        Self::InvalidArgument,
        Self::NoSpace,
        Self::OutOfRange,
    ];

    /// The code in x0. `Unknown(v)` gives `v` back unchanged.
    #[must_use]
    pub const fn to_i64(self) -> i64 {
        match self {
            Self::NotSupported => SMCCC_RET_NOT_SUPPORTED,
            Self::NoEntry => ENOENT,
            Self::TooBig => E2BIG,
            Self::NoMemory => ENOMEM,
            Self::Denied => EACCES,
            Self::Busy => EBUSY,
            Self::Exists => EEXIST,
            Self::InvalidArgument => EINVAL,
            Self::NoSpace => ENOSPC,
            Self::OutOfRange => ERANGE,
            Self::Unknown(v) => v,
        }
    }

    /// The error for a code; codes without a name become `Unknown`.
    #[must_use]
    pub const fn from_i64(code: i64) -> Self {
        match code {
            SMCCC_RET_NOT_SUPPORTED => Self::NotSupported,
            ENOENT => Self::NoEntry,
            E2BIG => Self::TooBig,
            ENOMEM => Self::NoMemory,
            EACCES => Self::Denied,
            EBUSY => Self::Busy,
            EEXIST => Self::Exists,
            EINVAL => Self::InvalidArgument,
            ENOSPC => Self::NoSpace,
            ERANGE => Self::OutOfRange,
            v => Self::Unknown(v),
        }
    }

    /// The C macro name (`HYP_EINVAL`, ...), or `None` for `Unknown`.
    #[must_use]
    pub const fn c_name(self) -> Option<&'static str> {
        Some(match self {
            Self::NotSupported => "HYP_NOT_SUPPORTED",
            Self::NoEntry => "HYP_ENOENT",
            Self::TooBig => "HYP_E2BIG",
            Self::NoMemory => "HYP_ENOMEM",
            Self::Denied => "HYP_EACCES",
            Self::Busy => "HYP_EBUSY",
            Self::Exists => "HYP_EEXIST",
            Self::InvalidArgument => "HYP_EINVAL",
            Self::NoSpace => "HYP_ENOSPC",
            Self::OutOfRange => "HYP_ERANGE",
            Self::Unknown(_) => return None,
        })
    }

    /// x0..x7 for this error: x0 is the code, x1..x7 are zero.
    #[must_use]
    pub const fn encode(self) -> [u64; 8] {
        [self.to_i64() as u64, 0, 0, 0, 0, 0, 0, 0]
    }

    /// A one-line description.
    #[must_use]
    pub const fn description(self) -> &'static str {
        match self {
            Self::NotSupported => "unknown or unimplemented function id",
            Self::NoEntry => "no such VM, vCPU or mapping (or a stale VM handle)",
            Self::TooBig => "page count above the per-call maximum",
            Self::NoMemory => "memcache too small: top up and retry",
            Self::Denied => "page state forbids this transition",
            Self::Busy => "VM in the wrong lifecycle state, or a vCPU is running",
            Self::Exists => "already exists or already mapped",
            Self::InvalidArgument => "malformed argument or reserved bits set",
            Self::NoSpace => "no free VM slot",
            Self::OutOfRange => "not RAM, beyond the IPA space or vCPU count, or overflow",
            Self::Unknown(_) => "unknown error code",
        }
    }
}

impl fmt::Display for HypError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.description(), self.to_i64())
    }
}

impl core::error::Error for HypError {}

impl From<HypError> for i64 {
    fn from(e: HypError) -> i64 {
        e.to_i64()
    }
}

impl From<i64> for HypError {
    fn from(code: i64) -> Self {
        Self::from_i64(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_codes_round_trip_and_are_distinct() {
        for (i, e) in HypError::ALL.iter().enumerate() {
            let code = e.to_i64();
            assert!(code < 0, "{e:?}");
            assert_eq!(HypError::from_i64(code), *e);
            for other in &HypError::ALL[i + 1..] {
                assert_ne!(code, other.to_i64());
            }
            assert!(e.c_name().is_some());
        }
    }

    #[test]
    fn only_not_supported_is_minus_one() {
        assert_eq!(HypError::NotSupported.to_i64(), -1);
        for e in &HypError::ALL[1..] {
            assert_ne!(e.to_i64(), -1, "{e:?} collides with SMCCC NOT_SUPPORTED");
        }
    }

    #[test]
    fn unknown_codes_are_kept() {
        assert_eq!(HypError::from_i64(-5), HypError::Unknown(-5));
        assert_eq!(HypError::Unknown(-5).to_i64(), -5);
        assert_eq!(HypError::from_i64(i64::MIN).to_i64(), i64::MIN);
        assert_eq!(
            HypError::Denied.encode(),
            [(-13i64) as u64, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
