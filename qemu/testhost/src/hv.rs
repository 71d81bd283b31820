//! Host calls: typed (encode with the hypercalls crate, decode the reply
//! strictly) and raw (any x0..x7, for malformed-argument cases).

use hypercalls::{HypError, Hypercall, Reply, ReplyError};

use crate::arch;

/// The code a malformed reply is reported as (no real code uses it).
pub const MALFORMED: i64 = -4095;

/// What one call returned.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// The decoded result; a reply the crate cannot decode for this call is
    /// `Err(Unknown(MALFORMED))`.
    pub result: Result<Reply, HypError>,
    /// x0..x7 as returned.
    pub regs: [u64; 8],
    /// Whether x8..x17 were preserved (§2.1).
    pub preserved: bool,
}

/// Issues `call`.
pub fn call(call: &Hypercall) -> Answer {
    let (regs, preserved) = arch::hvc(call.encode());
    let result = match call.decode_reply(&regs) {
        Ok(r) => Ok(r),
        Err(ReplyError::Failed(e)) => Err(e),
        Err(ReplyError::Malformed) => Err(HypError::Unknown(MALFORMED)),
    };
    Answer {
        result,
        regs,
        preserved,
    }
}

/// Page states read through the ABI, for the model to follow a teardown
/// batch page by page (`abi_model::Model::step_observed`).
#[derive(Debug)]
pub struct Observer;

impl abi_model::Observe for Observer {
    fn host_page(&mut self, pfn: u64) -> Result<hypercalls::HostPageInfo, HypError> {
        let pfn = hypercalls::Pfn::new(pfn).ok_or(HypError::InvalidArgument)?;
        match call(&Hypercall::HostPageState { pfn }).result? {
            Reply::HostPage(i) => Ok(i),
            _ => Err(HypError::Unknown(MALFORMED)),
        }
    }

    fn guest_page(
        &mut self,
        vm: hypercalls::VmHandle,
        gfn: u64,
    ) -> Result<hypercalls::GuestPage, HypError> {
        let gfn = hypercalls::Gfn::new(gfn).ok_or(HypError::InvalidArgument)?;
        match call(&Hypercall::GuestPageState { vm, gfn }).result? {
            Reply::GuestPage(p) => Ok(p),
            _ => Err(HypError::Unknown(MALFORMED)),
        }
    }
}

/// Issues raw registers; returns x0 as an error code (0 = success) and all
/// eight registers.
pub fn raw(regs: [u64; 8]) -> (i64, [u64; 8], bool) {
    let (out, preserved) = arch::hvc(regs);
    (out[0] as i64, out, preserved)
}
