//! Guest calls (provisional: `docs/ABI.md` §4).
//!
//! A guest makes these with `HVC #0`. They use function numbers
//! `0x0100..=0x01FF`, disjoint from the host calls, so a call trapped from
//! the wrong side is `NOT_SUPPORTED` whichever decoder sees it. The
//! hypervisor does not implement them yet; most are forwarded to the host
//! as a [`VcpuExit`](crate::VcpuExit).

use crate::error::HypError;
use crate::ids::{canonical_id, GuestFunction};
use crate::regs::{build, Reader, Regs};
use crate::reply::ConsoleBytes;
use crate::types::{Gfn, PageCount};

/// A guest call with typed arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestCall {
    /// §4.1: the ABI version.
    Version,
    /// §4.2: write 1..=16 bytes to the console.
    ConsoleWrite(ConsoleBytes),
    /// §4.3: ask the host to share memory at `[gfn, gfn + nr)`.
    ShareRequest {
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §4.4: ask the host to unshare memory at `[gfn, gfn + nr)`.
    UnshareRequest {
        /// First guest frame.
        gfn: Gfn,
        /// Number of pages.
        nr: PageCount,
    },
    /// §4.5: stop the VM.
    Shutdown,
}

impl GuestCall {
    /// Decodes a guest call from x0..x7, with the same rules and errors as
    /// [`Hypercall::decode`](crate::Hypercall::decode). Never panics.
    pub fn decode(regs: &Regs) -> Result<Self, HypError> {
        let func = canonical_id(regs[0])
            .and_then(GuestFunction::from_id)
            .ok_or(HypError::NotSupported)?;
        let mut r = Reader::new(regs, HypError::InvalidArgument);
        let call = match func {
            GuestFunction::Version => Self::Version,
            GuestFunction::ConsoleWrite => Self::ConsoleWrite(ConsoleBytes::read(&mut r)?),
            GuestFunction::ShareRequest => Self::ShareRequest {
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            GuestFunction::UnshareRequest => Self::UnshareRequest {
                gfn: r.gfn()?,
                nr: r.count()?,
            },
            GuestFunction::Shutdown => Self::Shutdown,
        };
        r.finish()?;
        Ok(call)
    }

    /// The function this call invokes.
    #[must_use]
    pub const fn function(&self) -> GuestFunction {
        match self {
            Self::Version => GuestFunction::Version,
            Self::ConsoleWrite(_) => GuestFunction::ConsoleWrite,
            Self::ShareRequest { .. } => GuestFunction::ShareRequest,
            Self::UnshareRequest { .. } => GuestFunction::UnshareRequest,
            Self::Shutdown => GuestFunction::Shutdown,
        }
    }

    /// Encodes the call into x0..x7 (unused registers zero).
    #[must_use]
    pub fn encode(&self) -> Regs {
        let id = u64::from(self.function().id());
        match *self {
            Self::Version | Self::Shutdown => build(id, &[]),
            Self::ConsoleWrite(bytes) => build(id, &bytes.to_regs()),
            Self::ShareRequest { gfn, nr } | Self::UnshareRequest { gfn, nr } => {
                build(id, &[gfn.raw(), u64::from(nr.get())])
            }
        }
    }
}
