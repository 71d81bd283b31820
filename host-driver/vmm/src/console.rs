//! The guest console: bytes from console exits, cut into lines per vCPU,
//! and the verdict the payload's lines add up to.

/// A line longer than this is cut (a guest that never ends its line).
pub const MAX_LINE: usize = 200;

/// One vCPU's partial line.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Adds `bytes`; returns the complete lines (without the newline).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(self.take());
            } else {
                self.buf.push(b);
                if self.buf.len() >= MAX_LINE {
                    lines.push(self.take());
                }
            }
        }
        lines
    }

    /// What is buffered, as a line (at the end of the run).
    pub fn flush(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf)
            .trim_end_matches('\r')
            .to_string();
        self.buf.clear();
        s
    }
}

/// What the payload's console said about its run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Lines that say PASS.
    pub passes: u32,
    /// Lines that report a failure (FAIL, a bad argument, an exception, a panic).
    pub failures: Vec<String>,
    /// Touch-mode progress reports of vCPU 0 (`guest: passes N`).
    pub reports: u32,
    /// Checksum lines (`... checksum 0x...`), in order.
    pub checksums: Vec<String>,
}

impl Verdict {
    /// Takes one console line into account; returns whether it was a
    /// progress report of vCPU 0.
    pub fn line(&mut self, line: &str) -> bool {
        let l = line.trim();
        // "<n> passed, <m> failed" summaries count by their numbers.
        let summary_failed = l
            .split_once(" passed, ")
            .and_then(|(_, rest)| rest.strip_suffix(" failed"))
            .and_then(|m| m.trim().parse::<u64>().ok());
        let failed = match summary_failed {
            Some(m) => m > 0,
            None => {
                l.contains("FAIL")
                    || l.starts_with("guest: bad argument")
                    || l.starts_with("guest: exception")
                    || l.starts_with("guest: panic")
                    || l.contains(" was allowed")
            }
        };
        if failed {
            self.failures.push(l.to_string());
        } else if l.contains("PASS") || summary_failed == Some(0) {
            self.passes += 1;
        }
        if let Some(pos) = l.find("checksum ") {
            if let Some(sum) = l[pos + 9..].split_whitespace().next() {
                self.checksums.push(sum.to_string());
            }
        }
        let report = l.starts_with("guest: passes ");
        if report {
            self.reports += 1;
        }
        report
    }

    /// Whether the guest passed: no failure line.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_per_newline_and_length() {
        let mut b = LineBuffer::default();
        assert!(b.push(b"guest: fi").is_empty());
        assert_eq!(b.push(b"ll 4 MiB\nguest: ch"), vec!["guest: fill 4 MiB"]);
        assert_eq!(b.push(b"ecksum\r\n"), vec!["guest: checksum"]);
        assert_eq!(b.flush(), None);
        let long = vec![b'x'; MAX_LINE + 5];
        let lines = b.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(b.flush().unwrap().len(), 5);
        // Bytes that are not UTF-8 do not hurt.
        assert_eq!(b.push(&[0xff, b'\n']).len(), 1);
    }

    #[test]
    fn the_verdict_follows_the_payload_lines() {
        let mut v = Verdict::default();
        v.line("guest: fill 64 MiB at 0x40200000");
        v.line("guest: checksum 0x0123456789abcdef PASS");
        assert!(v.ok());
        assert_eq!(v.passes, 1);
        assert_eq!(v.checksums, ["0x0123456789abcdef"]);
        v.line("guest: exits: 12 passed, 0 failed");
        assert!(v.ok());
        assert!(v.line("guest: passes 4"));
        assert!(!v.line("guest: vcpu1 passes 4"));
        assert_eq!(v.reports, 1);
        v.line("guest: FAIL at 0x40200000: 0x0 != 0x1, checksum 0x5");
        assert!(!v.ok());
        for bad in [
            "guest: bad argument 0x9: Mode(9)",
            "guest: exception slot 4 ESR 0x96000045 ELR 0x0 FAR 0x0",
            "guest: panic",
            "guest: hostile: 3 passed, 1 failed",
        ] {
            let mut v = Verdict::default();
            v.line(bad);
            assert!(!v.ok(), "{bad}");
        }
    }
}
