//! One named result of a test suite, and the tally `cargo xtask test`
//! keeps of them.

/// One named result: what was checked, whether it held, and the evidence
/// when it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, as printed after `PASS` / `FAIL`.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// Evidence (console tail, command output) printed when it did not.
    pub detail: String,
}

impl Check {
    /// A result.
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }

    /// A check that held.
    pub fn pass(name: impl Into<String>) -> Self {
        Self::new(name, true, String::new())
    }

    /// A step that could not run (a build, a boot): a failure whose detail
    /// is the whole error chain.
    pub fn error(name: impl Into<String>, e: &anyhow::Error) -> Self {
        Self::new(name, false, format!("{e:#}"))
    }
}

/// Passed and failed counts over every suite run; prints each check.
#[derive(Debug, Default)]
pub struct Tally {
    /// Checks (or libtest tests) that passed.
    pub passed: u64,
    /// Checks (or libtest tests) that failed.
    pub failed: u64,
    /// The names of the failures, for the summary line.
    pub failures: Vec<String>,
}

impl Tally {
    /// Counts and prints one check: `PASS <name>`, or `FAIL <name>` and its
    /// detail.
    pub fn record(&mut self, c: Check) {
        if c.ok {
            self.passed += 1;
            println!("PASS {}", c.name);
        } else {
            self.failed += 1;
            println!("FAIL {}", c.name);
            if !c.detail.is_empty() {
                println!("{}", c.detail);
            }
            self.failures.push(c.name);
        }
    }

    /// Counts and prints every check.
    pub fn record_all(&mut self, checks: impl IntoIterator<Item = Check>) {
        for c in checks {
            self.record(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_and_names_failures() {
        let mut t = Tally::default();
        t.record_all([
            Check::pass("a"),
            Check::new("b", false, "why"),
            Check::error("c", &anyhow::anyhow!("inner").context("outer")),
        ]);
        assert_eq!((t.passed, t.failed), (1, 2));
        assert_eq!(t.failures, ["b", "c"]);
        let e = Check::error("c", &anyhow::anyhow!("inner").context("outer"));
        assert_eq!(e.detail, "outer: inner");
    }
}
