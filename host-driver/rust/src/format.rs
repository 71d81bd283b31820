//! Decoding hypercall replies and formatting what the module shows: the
//! sysfs files and the load-time log. Safe, allocation-free and panic-free
//! on any register values, so it is tested on the host.

use core::fmt::{self, Write};

use hypercalls::{AbiVersion, HostFunction, Hypercall, Regs, Reply, ReplyError};

/// Why a line could not be formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The output buffer is too small for the line (what was written so far
    /// is not a complete line: do not use it).
    NoRoom,
    /// There is no host call with this index (see [`host_call`]).
    NoSuchCall,
    /// The `HYP_FEATURES` call itself failed (only from [`supported_name`]).
    CallFailed,
}

/// Writes into a byte buffer, failing (never truncating silently, never
/// panicking) when the buffer is full.
#[derive(Debug)]
pub(crate) struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }
}

impl Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        for (d, b) in dst.iter_mut().zip(s.as_bytes()) {
            *d = *b;
        }
        self.len = end;
        Ok(())
    }
}

/// Runs `f` on a writer over `buf` and returns the number of bytes written.
pub(crate) fn format_into(
    buf: &mut [u8],
    f: impl FnOnce(&mut Out<'_>) -> fmt::Result,
) -> Result<usize, Error> {
    let mut out = Out::new(buf);
    f(&mut out).map_err(|_| Error::NoRoom)?;
    Ok(out.len)
}

/// The host call with this index, in the order of [`HostFunction::ALL`]
/// (the order the `features` file lists them in).
#[must_use]
pub fn host_call(index: usize) -> Option<HostFunction> {
    HostFunction::ALL.get(index).copied()
}

/// The number of host calls the `features` file lists.
#[must_use]
pub fn host_call_count() -> usize {
    HostFunction::ALL.len()
}

/// Writes how a failed reply reads: `error <x0>` when the hypervisor
/// returned an error code, `malformed reply (x0 <x0>)` when the registers
/// are no reply this call can give (a bug, or another hypervisor that left
/// the arguments in place).
fn write_failure(out: &mut Out<'_>, err: ReplyError, x0: u64) -> fmt::Result {
    match err {
        ReplyError::Failed(e) => write!(out, "error {}", e.to_i64()),
        ReplyError::Malformed => write!(out, "malformed reply (x0 {})", x0 as i64),
    }
}

/// The outcome of `HYP_VERSION`, judged against the ABI this module was
/// built for ([`AbiVersion::CURRENT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionCheck {
    /// Same major version: the module can talk to this hypervisor.
    Compatible(AbiVersion),
    /// Another major version: incompatible.
    Incompatible(AbiVersion),
    /// The call failed or its reply is malformed.
    Failed(ReplyError),
}

/// Decodes the registers `HYP_VERSION` returned.
#[must_use]
pub fn check_version(regs: &Regs) -> VersionCheck {
    match Hypercall::Version.decode_reply(regs) {
        Ok(Reply::Version(v)) if v.major == AbiVersion::CURRENT.major => {
            VersionCheck::Compatible(v)
        }
        Ok(Reply::Version(v)) => VersionCheck::Incompatible(v),
        // decode_reply gives a Version reply for this call or an error.
        Ok(_) => VersionCheck::Failed(ReplyError::Malformed),
        Err(e) => VersionCheck::Failed(e),
    }
}

/// The content of `/sys/kernel/s2pin/version` for the registers
/// `HYP_VERSION` returned: `<major>.<minor>\n`, or the failure and `\n`.
pub fn version_line(regs: &Regs, buf: &mut [u8]) -> Result<usize, Error> {
    format_into(buf, |out| {
        match check_version(regs) {
            VersionCheck::Compatible(v) | VersionCheck::Incompatible(v) => {
                write!(out, "{}.{}", v.major, v.minor)?;
            }
            VersionCheck::Failed(e) => write_failure(out, e, regs[0])?,
        }
        out.write_char('\n')
    })
}

/// The line the module logs at load for the registers `HYP_VERSION`
/// returned (ending in `\n`, without the `s2pin: ` prefix).
pub fn version_log_line(regs: &Regs, buf: &mut [u8]) -> Result<usize, Error> {
    let ours = AbiVersion::CURRENT;
    format_into(buf, |out| {
        match check_version(regs) {
            VersionCheck::Compatible(v) => write!(
                out,
                "kernel at EL1; hypervisor ABI version {}.{} (module built for {}.{})",
                v.major, v.minor, ours.major, ours.minor
            )?,
            VersionCheck::Incompatible(v) => write!(
                out,
                "kernel at EL1; hypervisor ABI version {}.{} is incompatible with the module's {}.{}",
                v.major, v.minor, ours.major, ours.minor
            )?,
            VersionCheck::Failed(e) => {
                out.write_str("kernel at EL1; HYP_VERSION failed: ")?;
                write_failure(out, e, regs[0])?;
            }
        }
        out.write_char('\n')
    })
}

/// Decodes the registers `HYP_FEATURES(func)` returned.
fn feature(func: HostFunction, regs: &Regs) -> Result<bool, ReplyError> {
    match (Hypercall::Features { func: func.id() }).decode_reply(regs)? {
        Reply::Features { supported } => Ok(supported),
        // decode_reply gives a Features reply for this call or an error.
        _ => Err(ReplyError::Malformed),
    }
}

/// One line of `/sys/kernel/s2pin/features` for host call `index` and the
/// registers `HYP_FEATURES(<its id>)` returned:
/// `<NAME> 0x<id> <0|1>\n`, or `<NAME> 0x<id> <failure>\n`.
pub fn feature_line(index: usize, regs: &Regs, buf: &mut [u8]) -> Result<usize, Error> {
    let func = host_call(index).ok_or(Error::NoSuchCall)?;
    format_into(buf, |out| {
        write!(out, "{} {:#x} ", func.name(), func.id())?;
        match feature(func, regs) {
            Ok(supported) => write!(out, "{}", u8::from(supported))?,
            Err(e) => write_failure(out, e, regs[0])?,
        }
        out.write_char('\n')
    })
}

/// For the load-time list of supported calls: ` <NAME>` when host call
/// `index` is supported, nothing (0 bytes) when it is not, and
/// [`Error::CallFailed`] when `HYP_FEATURES` failed.
pub fn supported_name(index: usize, regs: &Regs, buf: &mut [u8]) -> Result<usize, Error> {
    let func = host_call(index).ok_or(Error::NoSuchCall)?;
    match feature(func, regs) {
        Ok(true) => format_into(buf, |out| write!(out, " {}", func.name())),
        Ok(false) => Ok(0),
        Err(_) => Err(Error::CallFailed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercalls::{encode_result, HypError};
    use std::{format, vec};

    fn text(buf: &[u8], n: usize) -> &str {
        core::str::from_utf8(&buf[..n]).unwrap()
    }

    fn version_reply(major: u16, minor: u16) -> Regs {
        encode_result(&Ok(Reply::Version(AbiVersion { major, minor })))
    }

    #[test]
    fn version_of_a_compatible_hypervisor() {
        let cur = AbiVersion::CURRENT;
        let regs = version_reply(cur.major, cur.minor + 3);
        let mut buf = [0u8; 64];
        let n = version_line(&regs, &mut buf).unwrap();
        assert_eq!(text(&buf, n), format!("{}.{}\n", cur.major, cur.minor + 3));
        assert_eq!(
            check_version(&regs),
            VersionCheck::Compatible(AbiVersion {
                major: cur.major,
                minor: cur.minor + 3
            })
        );
        let mut log = [0u8; 128];
        let n = version_log_line(&regs, &mut log).unwrap();
        assert_eq!(
            text(&log, n),
            format!(
                "kernel at EL1; hypervisor ABI version {}.{} (module built for {}.{})\n",
                cur.major,
                cur.minor + 3,
                cur.major,
                cur.minor
            )
        );
    }

    #[test]
    fn version_of_another_major_is_incompatible() {
        let cur = AbiVersion::CURRENT;
        let regs = version_reply(cur.major + 1, 0);
        assert!(matches!(
            check_version(&regs),
            VersionCheck::Incompatible(_)
        ));
        let mut buf = [0u8; 128];
        let n = version_line(&regs, &mut buf).unwrap();
        assert_eq!(text(&buf, n), format!("{}.0\n", cur.major + 1));
        let n = version_log_line(&regs, &mut buf).unwrap();
        assert!(text(&buf, n).contains("is incompatible"));
    }

    #[test]
    fn version_errors_and_malformed_replies() {
        let mut buf = [0u8; 128];
        // Another hypervisor (Linux pKVM) answers NOT_SUPPORTED.
        let regs = HypError::NotSupported.encode();
        let n = version_line(&regs, &mut buf).unwrap();
        assert_eq!(text(&buf, n), "error -1\n");
        let n = version_log_line(&regs, &mut buf).unwrap();
        assert_eq!(
            text(&buf, n),
            "kernel at EL1; HYP_VERSION failed: error -1\n"
        );
        // A code without a name is shown as it is.
        let n = version_line(&HypError::Unknown(-99).encode(), &mut buf).unwrap();
        assert_eq!(text(&buf, n), "error -99\n");
        // Error with a non-zero result register; positive x0; a major above u16.
        for regs in [
            [u64::MAX, 5, 0, 0, 0, 0, 0, 0],
            [1, 0, 2, 0, 0, 0, 0, 0],
            [0, 1 << 16, 0, 0, 0, 0, 0, 0],
            [0, 0, 2, 0, 0, 0, 0, 9],
        ] {
            assert_eq!(
                check_version(&regs),
                VersionCheck::Failed(ReplyError::Malformed)
            );
            let n = version_line(&regs, &mut buf).unwrap();
            assert_eq!(
                text(&buf, n),
                format!("malformed reply (x0 {})\n", regs[0] as i64)
            );
        }
    }

    #[test]
    fn features_lines_name_every_host_call() {
        let mut buf = [0u8; 128];
        assert_eq!(host_call_count(), HostFunction::ALL.len());
        for (i, f) in HostFunction::ALL.iter().enumerate() {
            let yes = encode_result(&Ok(Reply::Features { supported: true }));
            let no = encode_result(&Ok(Reply::Features { supported: false }));
            let n = feature_line(i, &yes, &mut buf).unwrap();
            assert_eq!(text(&buf, n), format!("{} {:#x} 1\n", f.name(), f.id()));
            let n = feature_line(i, &no, &mut buf).unwrap();
            assert_eq!(text(&buf, n), format!("{} {:#x} 0\n", f.name(), f.id()));
            let n = supported_name(i, &yes, &mut buf).unwrap();
            assert_eq!(text(&buf, n), format!(" {}", f.name()));
            assert_eq!(supported_name(i, &no, &mut buf), Ok(0));
        }
        assert_eq!(host_call(0).map(HostFunction::name), Some("HYP_VERSION"));
        let share = HostFunction::ALL
            .iter()
            .position(|f| f.name() == "HYP_SHARE")
            .unwrap();
        let n = feature_line(share, &[0, 1, 0, 0, 0, 0, 0, 0], &mut buf).unwrap();
        assert_eq!(text(&buf, n), "HYP_SHARE 0xc6000030 1\n");
    }

    #[test]
    fn features_failures() {
        let mut buf = [0u8; 128];
        let n = feature_line(0, &HypError::NotSupported.encode(), &mut buf).unwrap();
        assert_eq!(text(&buf, n), "HYP_VERSION 0xc6000000 error -1\n");
        // Linux pKVM leaves x1 (the function id) in place next to NOT_SUPPORTED.
        let pkvm = [u64::MAX, 0xc600_0000, 0, 0, 0, 0, 0, 0];
        let n = feature_line(0, &pkvm, &mut buf).unwrap();
        assert_eq!(
            text(&buf, n),
            "HYP_VERSION 0xc6000000 malformed reply (x0 -1)\n"
        );
        // supported is 0 or 1, nothing else.
        let n = feature_line(1, &[0, 2, 0, 0, 0, 0, 0, 0], &mut buf).unwrap();
        assert!(text(&buf, n).ends_with(" malformed reply (x0 0)\n"));
        assert_eq!(supported_name(0, &pkvm, &mut buf), Err(Error::CallFailed));
        assert_eq!(
            supported_name(0, &HypError::Busy.encode(), &mut buf),
            Err(Error::CallFailed)
        );
        let ok = encode_result(&Ok(Reply::Features { supported: true }));
        assert_eq!(
            feature_line(host_call_count(), &ok, &mut buf),
            Err(Error::NoSuchCall)
        );
        assert_eq!(
            supported_name(usize::MAX, &ok, &mut buf),
            Err(Error::NoSuchCall)
        );
    }

    #[test]
    fn a_short_buffer_is_an_error_never_a_panic() {
        let regs = version_reply(0, 2);
        let full = version_line(&regs, &mut [0u8; 64]).unwrap();
        for len in 0..full {
            let mut buf = vec![0u8; len];
            assert_eq!(version_line(&regs, &mut buf), Err(Error::NoRoom));
        }
        assert_eq!(version_line(&regs, &mut vec![0u8; full]), Ok(full));
        let ok = encode_result(&Ok(Reply::Features { supported: true }));
        let full = feature_line(3, &ok, &mut [0u8; 128]).unwrap();
        for len in 0..full {
            let mut buf = vec![0u8; len];
            assert_eq!(feature_line(3, &ok, &mut buf), Err(Error::NoRoom));
        }
        assert_eq!(supported_name(3, &ok, &mut []), Err(Error::NoRoom));
    }
}
