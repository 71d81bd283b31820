//! The checked-in C header must be exactly what the crate generates, and it
//! must compile as C with every value, ioctl number, size and offset equal
//! to the Rust one.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use s2pin_uapi::{
    c_header_defines, struct_of, write_c_header, CDefine, C_HEADER_GUARD, C_HEADER_PATH, C_LAYOUT,
    IOCTLS,
};

fn c_header() -> String {
    let mut s = String::new();
    write_c_header(&mut s).expect("writing to a String cannot fail");
    s
}

fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(C_HEADER_PATH)
}

fn defines() -> Vec<CDefine> {
    let mut v = Vec::new();
    c_header_defines(|d| {
        v.push(d);
        Ok::<(), ()>(())
    })
    .unwrap();
    v
}

#[test]
fn checked_in_header_is_up_to_date() {
    let path = checked_in_path();
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    let want = c_header();
    if on_disk != want {
        let first_diff = on_disk
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| on_disk.lines().count().min(want.lines().count()));
        panic!(
            "{} is stale or missing (first difference at line {}).\n\
             It is generated from the s2pin-uapi crate; regenerate it with:\n\
             \n    cargo xtask gen-header\n\n\
             (or: cargo run -p s2pin-uapi --features alloc --example gen-uapi-header -- {})",
            path.display(),
            first_diff + 1,
            C_HEADER_PATH,
        );
    }
}

#[test]
fn header_has_guard_banner_and_unique_names() {
    let h = c_header();
    assert!(h.contains("GENERATED FILE - DO NOT EDIT"));
    assert!(h.contains(&format!(
        "#ifndef {C_HEADER_GUARD}\n#define {C_HEADER_GUARD}\n"
    )));
    assert!(h
        .trim_end()
        .ends_with(&format!("#endif /* {C_HEADER_GUARD} */")));
    let mut names: Vec<&str> = defines().iter().map(|d| d.name).collect();
    names.extend(IOCTLS.iter().map(|(n, _)| *n));
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate macro names");
    for name in names {
        assert!(name.starts_with("S2PIN_"), "{name} is not namespaced");
        assert_eq!(h.matches(&format!("#define {name} ")).count(), 1, "{name}");
    }
}

/// A C file that includes the header and checks every value with
/// `_Static_assert`, against the Rust values.
fn c_checks() -> String {
    let mut c = String::new();
    c.push_str(
        "#include <stddef.h>\n#include \"s2pin_uapi.h\"\n#include \"s2pin_uapi.h\" /* guard */\n",
    );
    for d in defines() {
        writeln!(
            c,
            "_Static_assert((unsigned long long)({}) == {}ULL, \"{}\");",
            d.name, d.value, d.name
        )
        .unwrap();
    }
    for (name, nr) in IOCTLS {
        writeln!(c, "_Static_assert({name} == {nr}U, \"{name}\");").unwrap();
        // The number must equal the <linux/ioctl.h> macro for its argument
        // (the asm-generic encoding, the same on x86-64 and arm64).
        let dir = nr >> 30;
        let ty = (nr >> 8) & 0xFF;
        let n = nr & 0xFF;
        let expr = match (dir, struct_of(name)) {
            (0, None) => format!("_IO({ty}, {n})"),
            (1, Some(s)) => format!("_IOW({ty}, {n}, struct {s})"),
            (2, Some(s)) => format!("_IOR({ty}, {n}, struct {s})"),
            other => panic!("{name}: unexpected direction/argument {other:?}"),
        };
        writeln!(c, "_Static_assert({name} == {expr}, \"{name} encoding\");").unwrap();
    }
    for (expr, v) in C_LAYOUT {
        writeln!(c, "_Static_assert({expr} == {v}, \"{expr}\");").unwrap();
    }
    c
}

#[test]
fn header_compiles_as_c_and_matches_the_rust_values() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("skipping the C compile check: no C compiler ({cc})");
        return;
    }
    let dir = std::env::temp_dir().join(format!("s2pin-uapi-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("s2pin_uapi.h"), c_header()).unwrap();
    let src = dir.join("check.c");
    std::fs::write(&src, c_checks()).unwrap();
    let out = Command::new(&cc)
        .args([
            "-fsyntax-only",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-x",
            "c",
        ])
        .arg(&src)
        .output()
        .expect("running the C compiler");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the generated header does not compile or disagrees with the Rust values:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
