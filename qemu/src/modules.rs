//! Cross-building the host kernel modules (`host-driver/kmod/`) for Debian's
//! arm64 kernel, on this x86_64 machine.
//!
//! The kernel headers are never installed: `apt-get install
//! linux-headers-*:arm64` pulls `gcc-12:arm64` and removes the machine's own
//! compilers (docs/BUILD.md). Instead three packages are fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` into one folder under
//! `build/kernel-headers/`: the arm64 headers, the arch-independent common
//! headers, and the *amd64* kbuild tools (fixdep and modpost run here). The
//! arm64 headers' Makefile includes the common one by an absolute
//! `/usr/src/...` path; that line is rewritten to point into the folder.
//!
//! The sources and the generated `hyp_abi.h` are copied to `build/modules/`
//! (Linux 6.1 builds an external module inside its source folder, and the
//! tree must stay clean), then built with
//! `make -C <headers> M=build/modules/kmod ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules`.
//!
//! The kernel is the one the runner boots (`assets::debian` finds it); every
//! built module's `vermagic` is checked against its release.
//!
//! `s2pin.ko` links in its logic written in Rust (`host-driver/rust`, crate
//! `s2pin-core`): before `make`, [`build_rust_part`] builds that crate as a
//! `staticlib` for `aarch64-unknown-none-softfloat` (the kernel's
//! `-mgeneral-regs-only`: no FP/SIMD) with the workspace's `kmod` profile
//! (`panic = "abort"`, LTO) and `-C relocation-model=static -C
//! code-model=small -C force-unwind-tables=no`, in its own target dir
//! `build/kmod-rust/` so these flags touch no other build. It merges the
//! archive into one relocatable object with `ld -r --gc-sections -u <entry
//! symbols>`, strips it (debug info, `.llvmbc`, `.llvmcmd`, `.comment`,
//! `.eh_frame`; every symbol but the entry points made local), checks that
//! only relocation types the arm64 module loader takes remain, and stages it
//! as `kmod/s2pin_rust.o_shipped`, which Kbuild copies to `s2pin_rust.o`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::assets::{deb_file_name, download, multiarch, unpack};
use crate::install::apt_for;
use crate::util::{capture_ok, cargo_bin, progress, BARE_METAL_TARGET};

/// The prefix of every cross tool; the headers' Makefile appends `gcc-12`.
const CROSS_COMPILE: &str = "aarch64-linux-gnu-";

/// The kernel the modules are built for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kernel {
    /// `uname -r`, e.g. `6.1.0-56-arm64`.
    release: String,
    /// The Debian version of its packages, e.g. `6.1.192-2`.
    version: String,
}

impl Kernel {
    /// `6.1.0-56` from `6.1.0-56-arm64`: names the `-common` headers.
    fn abi(&self) -> Result<&str> {
        self.release
            .strip_suffix("-arm64")
            .ok_or_else(|| anyhow!("kernel release `{}` does not end in -arm64", self.release))
    }

    /// `6.1` from `6.1.0-56-arm64`: names the `linux-kbuild-<series>` package.
    fn series(&self) -> Result<String> {
        kbuild_series(&self.release)
            .ok_or_else(|| anyhow!("cannot read major.minor from `{}`", self.release))
    }
}

/// Builds every module of `host-driver/kmod/` for the kernel the caller
/// names: its release (`uname -r`, e.g. `6.1.0-56-arm64`) and the Debian
/// version of its packages (e.g. `6.1.192-2`), and returns the paths of the
/// `.ko` files under `build/modules/`. The runner passes the kernel it has
/// just fetched, so the modules cannot be built for another one.
pub fn build_modules_for(root: &Path, release: &str, version: &str) -> Result<Vec<PathBuf>> {
    multiarch()?;
    let kernel = Kernel {
        release: release.to_string(),
        version: version.to_string(),
    };
    apt_for(
        &format!("{CROSS_COMPILE}gcc-12"),
        &["gcc-aarch64-linux-gnu", "binutils-aarch64-linux-gnu"],
    )?;
    apt_for("make", &["make"])?;
    apt_for("dpkg-deb", &["dpkg"])?;
    let build = root.join("build");
    if build.to_string_lossy().contains(char::is_whitespace) {
        return Err(anyhow!(
            "{}: make cannot handle a path with spaces; move the checkout",
            build.display()
        ));
    }
    let headers = headers(&build.join("kernel-headers"), &kernel)?;
    let kmod = stage_sources(root, &build.join("modules"))?;
    build_rust_part(root, &build.join("kmod-rust"), &kmod)?;

    capture_ok(
        Command::new("make")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", kmod.display()))
            .arg("ARCH=arm64")
            .arg(format!("CROSS_COMPILE={CROSS_COMPILE}"))
            .arg("modules"),
    )
    .map_err(|e| anyhow!("building the kernel modules failed: {e}"))?;

    let order = kmod.join("modules.order");
    let listed = fs::read_to_string(&order).with_context(|| order.display().to_string())?;
    let mut kos = Vec::new();
    for line in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let ko = kmod.join(line.rsplit('/').next().unwrap_or(line));
        let data = fs::read(&ko).with_context(|| ko.display().to_string())?;
        match vermagic(&data) {
            Some(v) if vermagic_matches(v, &kernel.release) => kos.push(ko),
            Some(v) => {
                return Err(anyhow!(
                    "{}: vermagic `{v}` is not for {}",
                    ko.display(),
                    kernel.release
                ))
            }
            None => return Err(anyhow!("{}: no vermagic", ko.display())),
        }
    }
    if kos.is_empty() {
        return Err(anyhow!("{} lists no module", order.display()));
    }
    Ok(kos)
}

/// The crate holding `s2pin.ko`'s logic (`host-driver/rust`).
const RUST_PACKAGE: &str = "s2pin-core";
/// The cargo profile it is built with (workspace `Cargo.toml`).
const RUST_PROFILE: &str = "kmod";
/// Code generation for code linked into a kernel module: absolute
/// addressing resolved by the module loader, no unwind tables.
const RUST_FLAGS: &str = "-C relocation-model=static -C code-model=small -C force-unwind-tables=no";
/// The functions the C glue calls (`host-driver/kmod/s2pin_core.h`): the
/// roots of `--gc-sections`, and the only global symbols left defined.
const RUST_ENTRY_SYMBOLS: &[&str] = &[
    "s2pin_format_version",
    "s2pin_format_version_log",
    "s2pin_version_check",
    "s2pin_host_call_count",
    "s2pin_host_call_id",
    "s2pin_format_feature",
    "s2pin_format_supported_name",
    "s2pin_create_vm_check",
    "s2pin_memslot_check",
    "s2pin_memslot_find",
    "s2pin_slot_page_range",
    "s2pin_run_extend",
    "s2pin_run_start",
    "s2pin_inv_begin",
    "s2pin_inv_finish",
    "s2pin_inv_bump",
    "s2pin_inv_may_map",
    "s2pin_policy_at_start",
    "s2pin_policy_walk_at_end",
    "s2pin_policy_at_end",
    "s2pin_handle_exit",
    "s2pin_format_stats",
    "s2pin_format_host_page_state",
];
/// What Kbuild copies to `s2pin_rust.o` (`host-driver/kmod/Kbuild`).
const RUST_SHIPPED: &str = "s2pin_rust.o_shipped";
/// Sections the merged object must not carry: LLVM bitcode and its command
/// line (LTO leftovers; they also make GNU nm abort), the compiler banner,
/// and unwind tables the kernel never uses.
const RUST_STRIP_SECTIONS: &[&str] = &[
    ".llvmbc",
    ".llvmcmd",
    ".comment",
    ".eh_frame",
    ".rela.eh_frame",
];
/// The relocation types the merged object may hold: those the recipe above
/// leaves (docs/BUILD.md), plus the load/store page offsets that
/// `arch/arm64/kernel/module.c` also applies (code reading a static).
const RUST_RELOCATIONS: &[&str] = &[
    "R_AARCH64_ABS64",
    "R_AARCH64_ADR_PREL_PG_HI21",
    "R_AARCH64_ADD_ABS_LO12_NC",
    "R_AARCH64_CALL26",
    "R_AARCH64_JUMP26",
    "R_AARCH64_LDST8_ABS_LO12_NC",
    "R_AARCH64_LDST16_ABS_LO12_NC",
    "R_AARCH64_LDST32_ABS_LO12_NC",
    "R_AARCH64_LDST64_ABS_LO12_NC",
    "R_AARCH64_LDST128_ABS_LO12_NC",
];

/// Builds the Rust part of `s2pin.ko` under `out` and stages it as
/// `<kmod>/s2pin_rust.o_shipped` (rewritten only when it changed, so make
/// relinks only then). Cargo rebuilds the crate only when needed; the merge
/// runs only when the archive is newer than the merged object.
fn build_rust_part(root: &Path, out: &Path, kmod: &Path) -> Result<()> {
    let ld = format!("{CROSS_COMPILE}ld");
    let objcopy = format!("{CROSS_COMPILE}objcopy");
    let objdump = format!("{CROSS_COMPILE}objdump");
    for tool in [&ld, &objcopy, &objdump] {
        apt_for(tool, &["binutils-aarch64-linux-gnu"])?;
    }
    fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let target_dir = out.join("target");
    let mut cargo = Command::new(cargo_bin());
    cargo
        .current_dir(root)
        .args(["build", "-p", RUST_PACKAGE, "--target", BARE_METAL_TARGET])
        .args(["--profile", RUST_PROFILE])
        .env("CARGO_TARGET_DIR", &target_dir)
        // RUSTFLAGS applies to this build only; an inherited encoded form
        // would take precedence over it.
        .env("RUSTFLAGS", RUST_FLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    capture_ok(&mut cargo).with_context(|| {
        format!(
            "building the Rust part of s2pin.ko failed (is the {BARE_METAL_TARGET} target \
             installed? `rustup target add {BARE_METAL_TARGET}`)"
        )
    })?;
    let archive = target_dir
        .join(BARE_METAL_TARGET)
        .join(RUST_PROFILE)
        .join(format!("lib{}.a", RUST_PACKAGE.replace('-', "_")));
    let merged = out.join("s2pin_rust.o");
    // The entry list is part of the merge's input: a changed list (a new
    // function the C glue calls) re-merges even when the archive is older.
    let syms_stamp = out.join("s2pin_rust.syms");
    let syms = RUST_ENTRY_SYMBOLS.join("\n");
    let syms_changed = fs::read_to_string(&syms_stamp).ok().as_deref() != Some(syms.as_str());
    if syms_changed || newer(&archive, &merged)? {
        progress(&format!("linking {RUST_PACKAGE} into {RUST_SHIPPED}"));
        let linked = out.join("s2pin_rust.ld-r.o");
        let mut link = Command::new(&ld);
        link.args(["-r", "--gc-sections"]);
        for sym in RUST_ENTRY_SYMBOLS {
            link.args(["-u", sym]);
        }
        link.arg("-o").arg(&linked).arg(&archive);
        capture_ok(&mut link)?;
        let mut strip = Command::new(&objcopy);
        strip.arg("--strip-debug");
        for sec in RUST_STRIP_SECTIONS {
            strip.arg(format!("--remove-section={sec}"));
        }
        for sym in RUST_ENTRY_SYMBOLS {
            strip.arg(format!("--keep-global-symbol={sym}"));
        }
        // Into a temporary name first: a failed step leaves no object that
        // looks up to date.
        let tmp = out.join("s2pin_rust.o.tmp");
        strip.arg(&linked).arg(&tmp);
        capture_ok(&mut strip)?;
        let dump = capture_ok(Command::new(&objdump).arg("-r").arg(&tmp))?;
        let odd = unexpected_relocations(&String::from_utf8_lossy(&dump.stdout));
        if !odd.is_empty() {
            return Err(anyhow!(
                "{}: relocation types the kernel module loader may not take: {} \
                 (see docs/BUILD.md and RUST_RELOCATIONS in qemu/src/modules.rs)",
                tmp.display(),
                odd.join(" ")
            ));
        }
        fs::rename(&tmp, &merged).with_context(|| merged.display().to_string())?;
        fs::write(&syms_stamp, &syms).with_context(|| syms_stamp.display().to_string())?;
    }
    copy_if_changed(&merged, &kmod.join(RUST_SHIPPED))
}

/// Whether `src` was modified after `dst` (true when `dst` does not exist).
fn newer(src: &Path, dst: &Path) -> Result<bool> {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified());
    let s = mtime(src).with_context(|| src.display().to_string())?;
    Ok(match mtime(dst) {
        Ok(d) => s > d,
        Err(_) => true,
    })
}

/// The relocation types in `objdump -r` output that are not in
/// [`RUST_RELOCATIONS`], each once, in order of appearance.
fn unexpected_relocations(objdump: &str) -> Vec<String> {
    let mut odd: Vec<String> = Vec::new();
    for ty in objdump
        .split_whitespace()
        .filter(|w| w.starts_with("R_AARCH64_"))
    {
        if !RUST_RELOCATIONS.contains(&ty) && !odd.iter().any(|o| o == ty) {
            odd.push(ty.to_string());
        }
    }
    odd
}

/// Downloads and unpacks the three header packages for `kernel` under
/// `base` (once) and returns the folder to pass to `make -C`.
fn headers(base: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let dir = base.join(format!(
        "{}_{}",
        kernel.release,
        kernel.version.replace(':', "%3a")
    ));
    let src = dir
        .join("usr/src")
        .join(format!("linux-headers-{}", kernel.release));
    let stamp = dir.join(".unpacked");
    if stamp.is_file() {
        return Ok(src);
    }
    let abi = kernel.abi()?;
    let series = kernel.series()?;
    let v = &kernel.version;
    // (package as apt takes it, the .deb `apt-get download` writes)
    let packages = [
        (
            format!("linux-headers-{}:arm64={v}", kernel.release),
            deb_file_name(&format!("linux-headers-{}", kernel.release), v, "arm64"),
        ),
        (
            format!("linux-headers-{abi}-common={v}"),
            deb_file_name(&format!("linux-headers-{abi}-common"), v, "all"),
        ),
        (
            format!("linux-kbuild-{series}:amd64={v}"),
            deb_file_name(&format!("linux-kbuild-{series}"), v, "amd64"),
        ),
    ];
    let debs = base.join("debs");
    fs::create_dir_all(&debs).with_context(|| debs.display().to_string())?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
    }
    fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    for (spec, file) in &packages {
        let deb = debs.join(file);
        if !deb.is_file() {
            download(spec, &deb)?;
        }
        unpack(&deb, &dir)?;
    }
    let makefile = src.join("Makefile");
    let text = fs::read_to_string(&makefile).with_context(|| makefile.display().to_string())?;
    let fixed = relocate_includes(&text, &dir)
        .ok_or_else(|| anyhow!("{}: no `include /usr/src/...` line", makefile.display()))?;
    fs::write(&makefile, fixed).with_context(|| makefile.display().to_string())?;
    fs::write(&stamp, v).with_context(|| stamp.display().to_string())?;
    Ok(src)
}

/// Copies `host-driver/kmod/*` to `<out>/kmod/` and `hyp_abi.h`, `s2pin_uapi.h` to
/// `<out>/include/`, keeping the `../include` layout Kbuild expects. Files
/// whose content did not change are not rewritten, so make stays incremental.
/// Returns `<out>/kmod`.
fn stage_sources(root: &Path, out: &Path) -> Result<PathBuf> {
    for name in ["hyp_abi.h", "s2pin_uapi.h"] {
        let header = root.join("host-driver/include").join(name);
        if !header.is_file() {
            bail!(
                "{} is missing; run `cargo xtask gen-header`",
                header.display()
            );
        }
        copy_if_changed(&header, &out.join("include").join(name))?;
    }
    let src = root.join("host-driver/kmod");
    let kmod = out.join("kmod");
    let entries = fs::read_dir(&src).with_context(|| src.display().to_string())?;
    for entry in entries {
        let path = entry.with_context(|| src.display().to_string())?.path();
        if path.is_file() {
            if let Some(name) = path.file_name() {
                copy_if_changed(&path, &kmod.join(name))?;
            }
        }
    }
    Ok(kmod)
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let data = fs::read(from).with_context(|| from.display().to_string())?;
    if fs::read(to).ok().as_deref() == Some(data.as_slice()) {
        return Ok(());
    }
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    fs::write(to, data).with_context(|| to.display().to_string())
}

/// `6.1` from a release such as `6.1.0-56-arm64`.
fn kbuild_series(release: &str) -> Option<String> {
    let mut parts = release.split('.');
    let major = parts.next()?;
    let minor = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then(|| format!("{major}.{minor}"))
}

/// Rewrites every `include /usr/src/...` line of a Debian headers Makefile
/// to point into `prefix`; `None` if there is no such line.
fn relocate_includes(makefile: &str, prefix: &Path) -> Option<String> {
    let mut found = false;
    let mut out = String::with_capacity(makefile.len() + 64);
    for line in makefile.lines() {
        match line.strip_prefix("include /usr/src/") {
            Some(rest) => {
                found = true;
                out.push_str(&format!("include {}/usr/src/{rest}", prefix.display()));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    found.then_some(out)
}

/// The `vermagic=` string of a `.ko` (its `.modinfo` entries are
/// NUL-terminated `key=value` strings).
fn vermagic(ko: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"vermagic=";
    let start = ko.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = ko[start..].iter().position(|&b| b == 0)?;
    std::str::from_utf8(&ko[start..start + len]).ok()
}

/// Whether a vermagic (`6.1.0-56-arm64 SMP mod_unload modversions aarch64`)
/// is for `release`.
fn vermagic_matches(vermagic: &str, release: &str) -> bool {
    vermagic.split_whitespace().next() == Some(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_the_release() {
        let k = Kernel {
            release: "6.1.0-56-arm64".into(),
            version: "6.1.192-2".into(),
        };
        assert_eq!(k.abi().unwrap(), "6.1.0-56");
        assert_eq!(k.series().unwrap(), "6.1");
        assert_eq!(kbuild_series("10.12.0-1-arm64").as_deref(), Some("10.12"));
        assert_eq!(kbuild_series("6"), None);
        assert_eq!(kbuild_series("6.x.0"), None);
        let odd = Kernel {
            release: "6.1.0-56-amd64".into(),
            version: "1".into(),
        };
        assert!(odd.abi().is_err());
    }

    #[test]
    fn makefile_include_is_relocated() {
        let mk = "include /usr/src/linux-headers-6.1.0-56-common/Makefile\n";
        let fixed = relocate_includes(mk, Path::new("/w/build/kh")).unwrap();
        assert_eq!(
            fixed,
            "include /w/build/kh/usr/src/linux-headers-6.1.0-56-common/Makefile\n"
        );
        // Already relocated (or some other Makefile): nothing to do is an error.
        assert_eq!(relocate_includes(&fixed, Path::new("/x")), None);
    }

    #[test]
    fn only_loader_relocations_pass() {
        let dump = "RELOCATION RECORDS FOR [.text.s2pin_format_version]:\n\
                    OFFSET           TYPE              VALUE\n\
                    0000000000000010 R_AARCH64_CALL26  foo\n\
                    0000000000000014 R_AARCH64_ADR_PREL_PG_HI21  .rodata\n\
                    0000000000000018 R_AARCH64_ABS32   .debug_info\n\
                    000000000000001c R_AARCH64_PREL32  bar\n\
                    0000000000000020 R_AARCH64_ABS32   .debug_info\n";
        assert_eq!(
            unexpected_relocations(dump),
            vec![
                "R_AARCH64_ABS32".to_string(),
                "R_AARCH64_PREL32".to_string()
            ]
        );
        assert!(unexpected_relocations("R_AARCH64_JUMP26 R_AARCH64_ABS64").is_empty());
    }

    #[test]
    fn rust_entry_symbols_match_the_crate_and_the_header() {
        let lib = include_str!("../../host-driver/rust/src/lib.rs");
        let header = include_str!("../../host-driver/kmod/s2pin_core.h");
        // Every exported function of the crate is a gc root, and only those.
        let mut exported = Vec::new();
        let mut lines = lib.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "#[unsafe(no_mangle)]" {
                let def = lines.next().unwrap_or("");
                let name = def
                    .split("fn ")
                    .nth(1)
                    .and_then(|r| r.split('(').next())
                    .unwrap_or(def);
                exported.push(name.trim().to_string());
            }
        }
        let mut want: Vec<String> = RUST_ENTRY_SYMBOLS.iter().map(|s| s.to_string()).collect();
        exported.sort();
        want.sort();
        assert_eq!(exported, want);
        for sym in RUST_ENTRY_SYMBOLS {
            assert!(header.contains(&format!(" {sym}(")), "{sym} not declared");
        }
    }

    #[test]
    fn vermagic_is_read_and_checked() {
        let ko = b"\x7fELF junk\0license=GPL\0vermagic=6.1.0-56-arm64 SMP mod_unload modversions aarch64\0name=s2pin\0";
        let v = vermagic(ko).unwrap();
        assert_eq!(v, "6.1.0-56-arm64 SMP mod_unload modversions aarch64");
        assert!(vermagic_matches(v, "6.1.0-56-arm64"));
        assert!(!vermagic_matches(v, "6.1.0-55-arm64"));
        assert!(!vermagic_matches("6.1.0-56-arm64-rt SMP", "6.1.0-56-arm64"));
        assert_eq!(vermagic(b"no magic here"), None);
        assert_eq!(vermagic(b"vermagic=unterminated"), None);
    }
}
