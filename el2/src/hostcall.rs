//! The host's hypercalls: decode, dispatch, encode.
//!
//! Every register value the host can send goes through
//! [`hypercalls::Hypercall::decode`] first; unknown ids and calls this build
//! does not serve yet return SMCCC `NOT_SUPPORTED`. Nothing here can panic.

use hypercalls::{encode_result, AbiVersion, HostFunction, HypError, Hypercall, Reply};

/// Calls this build serves. FEATURES answers from this list.
pub const SERVED: &[HostFunction] = &[HostFunction::Version, HostFunction::Features];

/// Handles one host HVC: x0..x7 in, x0..x7 out.
#[must_use]
pub fn handle(regs: &[u64; 8]) -> [u64; 8] {
    encode_result(&dispatch(regs))
}

fn dispatch(regs: &[u64; 8]) -> Result<Reply, HypError> {
    match Hypercall::decode(regs)? {
        Hypercall::Version => Ok(Reply::Version(AbiVersion::CURRENT)),
        Hypercall::Features { func } => Ok(Reply::Features {
            supported: HostFunction::from_id(func).is_some_and(|f| SERVED.contains(&f)),
        }),
        _ => Err(HypError::NotSupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercalls::{ABI_VERSION_MAJOR, ABI_VERSION_MINOR};

    #[test]
    fn version() {
        let out = handle(&Hypercall::Version.encode());
        assert_eq!(out[0], 0);
        assert_eq!(
            Hypercall::Version.decode_reply(&out),
            Ok(Reply::Version(AbiVersion {
                major: ABI_VERSION_MAJOR,
                minor: ABI_VERSION_MINOR
            }))
        );
    }

    #[test]
    fn features_reports_only_served_calls() {
        for f in HostFunction::ALL {
            let call = Hypercall::Features { func: f.id() };
            let out = handle(&call.encode());
            assert_eq!(
                call.decode_reply(&out),
                Ok(Reply::Features {
                    supported: SERVED.contains(f)
                }),
                "{f:?}"
            );
        }
        let call = Hypercall::Features { func: 0xdead_beef };
        assert_eq!(
            call.decode_reply(&handle(&call.encode())),
            Ok(Reply::Features { supported: false })
        );
    }

    #[test]
    fn unknown_and_unserved_are_not_supported() {
        let not_supported = u64::MAX; // -1
        assert_eq!(
            handle(&[0xc600_ffff, 0, 0, 0, 0, 0, 0, 0])[0],
            not_supported
        );
        assert_eq!(handle(&[0, 0, 0, 0, 0, 0, 0, 0])[0], not_supported);
        // VERSION with a reserved register set is malformed, not a version.
        let mut regs = Hypercall::Version.encode();
        regs[3] = 1;
        assert_ne!(handle(&regs)[0], 0);
    }

    #[test]
    fn arbitrary_registers_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..20_000 {
            let mut regs = [0u64; 8];
            for r in &mut regs {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *r = x;
            }
            regs[0] = (regs[0] & 0x1f) | 0xc600_0000;
            let out = handle(&regs);
            assert!(out[0] == 0 || (out[0] as i64) < 0);
        }
    }
}
