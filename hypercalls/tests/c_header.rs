//! The checked-in C header must be exactly what the crate generates, and it
//! must compile as C with every value equal to the Rust one.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use hypercalls::{
    c_defines, write_c_header, CDefine, CValue, IpaBits, VmHandle, C_HEADER_PATH, C_MACROS,
};

fn generated() -> String {
    let mut s = String::new();
    write_c_header(&mut s).expect("writing to a String cannot fail");
    s
}

fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(C_HEADER_PATH)
}

fn defines() -> Vec<CDefine> {
    let mut v = Vec::new();
    c_defines(|d| {
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
    let want = generated();
    if on_disk != want {
        let first_diff = on_disk
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| on_disk.lines().count().min(want.lines().count()));
        panic!(
            "{} is stale or missing (first difference at line {}).\n\
             It is generated from the hypercalls crate; regenerate it with:\n\
             \n    cargo xtask gen-header\n\n\
             (or: cargo run -p hypercalls --features alloc --example gen-header -- {})",
            path.display(),
            first_diff + 1,
            C_HEADER_PATH,
        );
    }
}

#[test]
fn header_has_guard_banner_and_unique_names() {
    let h = generated();
    assert!(h.contains("GENERATED FILE - DO NOT EDIT"));
    assert!(h.contains("#ifndef HYP_ABI_H\n#define HYP_ABI_H\n"));
    assert!(h.trim_end().ends_with("#endif /* HYP_ABI_H */"));
    let mut names: Vec<&str> = defines().iter().map(|d| d.name).collect();
    names.extend(
        C_MACROS
            .iter()
            .map(|(n, _, _)| n.split('(').next().unwrap()),
    );
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate macro names");
    for name in names {
        assert!(name.starts_with("HYP_"), "{name} is not namespaced");
        assert_eq!(
            h.matches(&format!("#define {name} ")).count()
                + h.matches(&format!("#define {name}(")).count(),
            1,
            "{name}"
        );
    }
}

/// A C file that includes the header and checks every value with
/// `_Static_assert`, against the Rust values.
fn c_checks() -> String {
    let mut c = String::new();
    c.push_str("#include \"hyp_abi.h\"\n#include \"hyp_abi.h\" /* include guard */\n");
    for d in defines() {
        let want = match d.value {
            CValue::Hex32(v) => format!("{v}ULL"),
            CValue::Hex64(v) | CValue::Dec(v) => format!("{v}ULL"),
            CValue::Neg(v) => format!("({v}LL)"),
        };
        let lhs = match d.value {
            CValue::Neg(_) => format!("(long long)({})", d.name),
            _ => format!("(unsigned long long)({})", d.name),
        };
        writeln!(c, "_Static_assert({lhs} == {want}, \"{}\");", d.name).unwrap();
        if let CValue::Neg(_) = d.value {
            // Negative codes must stay negative when compared as `long`.
            writeln!(
                c,
                "_Static_assert((long)({}) < 0, \"{} sign\");",
                d.name, d.name
            )
            .unwrap();
        }
    }
    for bits in hypercalls::MIN_IPA_BITS..=hypercalls::MAX_IPA_BITS {
        let ipa = IpaBits::new(bits).unwrap();
        writeln!(
            c,
            "_Static_assert(HYP_ROOT_TABLE_PAGES({bits}) == {}, \"root pages {bits}\");",
            ipa.root_table_pages()
        )
        .unwrap();
        writeln!(
            c,
            "_Static_assert(HYP_STAGE2_LEVELS({bits}) == {}, \"levels {bits}\");",
            ipa.levels()
        )
        .unwrap();
    }
    let h = VmHandle::new(0xBEEF, 0x1234).unwrap();
    writeln!(
        c,
        "_Static_assert(HYP_VM_HANDLE(0xBEEF, 0x1234) == {}U, \"handle\");",
        h.raw()
    )
    .unwrap();
    c
}

#[test]
fn header_compiles_as_c_and_matches_the_rust_values() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("skipping the C compile check: no C compiler ({cc})");
        return;
    }
    let dir = std::env::temp_dir().join(format!("hyp-abi-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hyp_abi.h"), generated()).unwrap();
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
