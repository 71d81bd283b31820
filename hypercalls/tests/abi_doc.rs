//! `docs/ABI.md` must describe every call, error and exit reason the crate
//! defines, under the stable headings tests cite (`## <section> <NAME>`).

use hypercalls::{ExitReason, GuestFunction, HostFunction, HypError};

fn abi_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ABI.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text of the section whose heading is exactly `heading`, up to the next `## `.
fn section(doc: &str, heading: &str) -> Option<String> {
    let start = doc.lines().position(|l| l == heading)?;
    let body: Vec<&str> = doc
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    Some(body.join("\n"))
}

fn check_call(doc: &str, name: &str, section_no: &str, id: u32) {
    let heading = format!("## {section_no} {name}");
    let body =
        section(doc, &heading).unwrap_or_else(|| panic!("docs/ABI.md has no heading `{heading}`"));
    let id_line = format!("**Id**: `0x{id:08X}`");
    assert!(body.contains(&id_line), "{heading}: missing `{id_line}`");
    for part in ["**In**", "**Out**", "**Errors**", "**Transitions**"] {
        assert!(body.contains(part), "{heading}: missing {part}");
    }
    let row = format!("| {section_no} | `{name}` | `0x{id:08X}` |");
    assert!(doc.contains(&row), "overview table: missing `{row}`");
}

#[test]
fn every_host_call_has_a_section() {
    let doc = abi_md();
    for f in HostFunction::ALL {
        check_call(&doc, f.name(), f.doc_section(), f.id());
        assert!(f.doc_section().starts_with("3."));
        assert!(
            section(&doc, &format!("## {} {}", f.doc_section(), f.name()))
                .unwrap()
                .contains("**Preconditions**")
        );
    }
}

#[test]
fn every_guest_call_has_a_section() {
    let doc = abi_md();
    for f in GuestFunction::ALL {
        check_call(&doc, f.name(), f.doc_section(), f.id());
        assert!(f.doc_section().starts_with("4."));
    }
}

#[test]
fn every_error_is_in_the_table() {
    let doc = abi_md();
    for e in HypError::ALL {
        let row = format!("| {} | `{}` |", e.to_i64(), e.c_name().unwrap());
        assert!(doc.contains(&row), "error table: missing `{row}`");
    }
}

#[test]
fn every_exit_reason_is_in_the_table() {
    let doc = abi_md();
    let table = section(&doc, "## 5. Exit reasons").expect("section 5");
    for r in ExitReason::ALL {
        let row = format!("| {} | `{}` |", *r as u8, r.c_name());
        assert!(table.contains(&row), "exit table: missing `{row}`");
    }
}

#[test]
fn headings_are_unique() {
    let doc = abi_md();
    let mut h: Vec<&str> = doc.lines().filter(|l| l.starts_with("## ")).collect();
    let n = h.len();
    h.sort_unstable();
    h.dedup();
    assert_eq!(h.len(), n, "duplicate headings in docs/ABI.md");
}
