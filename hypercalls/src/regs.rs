//! Register reading and writing shared by calls and replies.
//!
//! A [`Reader`] takes registers x1, x2, ... in order, checks each one against
//! its type, and finally checks that every register it did not take is zero.
//! The first failing register decides the error.

use crate::error::HypError;
use crate::types::{Gfn, PageCount, Pfn, Prot, VcpuIndex, VmHandle};
use crate::MAX_PAGES_PER_CALL;

/// The eight registers x0..x7 of a call or a reply.
pub type Regs = [u64; 8];

/// Builds x0..x7 from x0 and the values of x1, x2, ...; the rest are zero.
/// Values past x7 are dropped (callers pass at most seven).
pub(crate) fn build(x0: u64, args: &[u64]) -> Regs {
    let mut regs = [0; 8];
    regs[0] = x0;
    for (slot, v) in regs.iter_mut().skip(1).zip(args) {
        *slot = *v;
    }
    regs
}

/// Reads x1..x7 in order.
pub(crate) struct Reader<'a> {
    regs: &'a Regs,
    next: usize,
    /// The error for a malformed value.
    err: HypError,
}

impl<'a> Reader<'a> {
    /// A reader whose malformed values give `err`.
    pub(crate) fn new(regs: &'a Regs, err: HypError) -> Self {
        Self { regs, next: 1, err }
    }

    /// The next register, raw.
    pub(crate) fn raw(&mut self) -> Result<u64, HypError> {
        let v = self.regs.get(self.next).copied().ok_or(self.err)?;
        self.next += 1;
        Ok(v)
    }

    /// The next register as a value that must satisfy `f`.
    pub(crate) fn map<T>(&mut self, f: impl FnOnce(u64) -> Option<T>) -> Result<T, HypError> {
        let v = self.raw()?;
        f(v).ok_or(self.err)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, HypError> {
        self.map(|v| u32::try_from(v).ok())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, HypError> {
        self.map(|v| u16::try_from(v).ok())
    }

    pub(crate) fn bool(&mut self) -> Result<bool, HypError> {
        self.map(|v| match v {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        })
    }

    pub(crate) fn vm(&mut self) -> Result<VmHandle, HypError> {
        self.map(|v| VmHandle::from_raw(u32::try_from(v).ok()?))
    }

    pub(crate) fn vcpu(&mut self) -> Result<VcpuIndex, HypError> {
        self.map(|v| VcpuIndex::new(u16::try_from(v).ok()?))
    }

    pub(crate) fn pfn(&mut self) -> Result<Pfn, HypError> {
        self.map(Pfn::new)
    }

    pub(crate) fn gfn(&mut self) -> Result<Gfn, HypError> {
        self.map(Gfn::new)
    }

    pub(crate) fn prot(&mut self) -> Result<Prot, HypError> {
        self.map(Prot::from_bits)
    }

    /// A page count: 0 is `EINVAL`, above the maximum is `E2BIG`.
    pub(crate) fn count(&mut self) -> Result<PageCount, HypError> {
        let v = self.raw()?;
        if v > u64::from(MAX_PAGES_PER_CALL) {
            return Err(HypError::TooBig);
        }
        u32::try_from(v)
            .ok()
            .and_then(PageCount::new)
            .ok_or(self.err)
    }

    /// Checks that every register not read is zero.
    pub(crate) fn finish(self) -> Result<(), HypError> {
        let rest = self.regs.get(self.next..).unwrap_or(&[]);
        if rest.iter().all(|&v| v == 0) {
            Ok(())
        } else {
            Err(self.err)
        }
    }
}
