//! `cargo xtask bench <name>`: the benchmarks. Each writes its own section
//! of docs/PERFORMANCE.md between two HTML comment markers
//! (`<!-- bench:<name>:begin -->` / `:end -->`), leaving the rest alone.
//!
//! To add a benchmark: a file `benches/<name>.rs` with
//! `pub fn bench(root: &Path, args: &<Name>Args) -> anyhow::Result<()>`
//! (its options a `#[derive(clap::Args)]` struct there), a `pub mod <name>;`
//! below, a variant of [`crate::cli::BenchCommand`] and its arm in main.rs.

pub mod boot;
pub mod hvc;
pub mod numa;
pub mod scale;
pub mod stage2;

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The first line of a docs/PERFORMANCE.md that did not exist.
const NEW_DOC: &str =
    "# Performance\n\nBenchmark results, each section written by its `cargo xtask bench` command.\n";

/// The markers of benchmark `name`'s section.
pub fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- bench:{name}:begin -->"),
        format!("<!-- bench:{name}:end -->"),
    )
}

/// The document with benchmark `name`'s section replaced by `body`, or
/// added at the end if it has none; a new document if `existing` is `None`.
pub fn splice(existing: Option<&str>, name: &str, body: &str) -> Result<String> {
    let (begin, end) = markers(name);
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let Some(doc) = existing else {
        return Ok(format!("{NEW_DOC}\n{section}\n"));
    };
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{section}{}", &doc[..b], &doc[e + end.len()..]))
        }
        (None, None) => {
            let sep = if doc.ends_with('\n') { "\n" } else { "\n\n" };
            Ok(format!("{doc}{sep}{section}\n"))
        }
        _ => bail!(
            "docs/PERFORMANCE.md has a broken {name} section: `{begin}` and `{end}` must both \
             appear, in that order"
        ),
    }
}

/// Writes benchmark `name`'s section of `docs/PERFORMANCE.md` under `root`.
pub fn write_section(root: &Path, name: &str, body: &str) -> Result<()> {
    let doc = root.join("docs").join("PERFORMANCE.md");
    let old = std::fs::read_to_string(&doc).ok();
    let new = splice(old.as_deref(), name, body)?;
    std::fs::write(&doc, new).with_context(|| doc.display().to_string())?;
    crate::util::progress(&format!("wrote the {name} section of {}", doc.display()));
    Ok(())
}

/// Today (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_spliced() {
        let (b, e) = markers("x");
        let new = splice(None, "x", "one\n").unwrap();
        assert!(new.starts_with("# Performance\n"));
        assert!(new.contains(&format!("{b}\none\n{e}")));
        let doc = format!("# P\n\nbefore\n{b}\nold\n{e}\nafter\n");
        let replaced = splice(Some(&doc), "x", "two").unwrap();
        assert_eq!(replaced, format!("# P\n\nbefore\n{b}\ntwo\n{e}\nafter\n"));
        let other = "# P\n\n<!-- bench:y:begin -->\nz\n<!-- bench:y:end -->";
        let appended = splice(Some(other), "x", "three").unwrap();
        assert!(appended.starts_with(other));
        assert!(appended.ends_with(&format!("\n\n{b}\nthree\n{e}\n")));
        assert!(splice(Some(&format!("{e}\n{b}\n")), "x", "x").is_err());
        assert!(splice(Some(&format!("{b}\n")), "x", "x").is_err());
    }

    #[test]
    fn today_is_a_utc_day() {
        let t = today();
        assert_eq!(t.len(), 10, "{t}");
        assert!(t.starts_with("20") && t.as_bytes()[4] == b'-' && t.as_bytes()[7] == b'-');
    }
}
