//! Cross-building the host kernel modules (`host-driver/kmod/`) for Debian's
//! arm64 kernel, on this x86_64 machine.
//!
//! The kernel headers are never installed: `apt-get install
//! linux-headers-*:arm64` pulls `gcc-12:arm64` and removes the machine's own
//! compilers (PLATFORM.md). Instead three packages are fetched with
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

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::assets::{deb_file_name, download, multiarch, unpack};
use crate::install::apt_for;
use crate::util::capture_ok;

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
    fn abi(&self) -> Result<&str, String> {
        self.release
            .strip_suffix("-arm64")
            .ok_or_else(|| format!("kernel release `{}` does not end in -arm64", self.release))
    }

    /// `6.1` from `6.1.0-56-arm64`: names the `linux-kbuild-<series>` package.
    fn series(&self) -> Result<String, String> {
        kbuild_series(&self.release)
            .ok_or_else(|| format!("cannot read major.minor from `{}`", self.release))
    }
}

/// Builds every module of `host-driver/kmod/` for the kernel the caller
/// names: its release (`uname -r`, e.g. `6.1.0-56-arm64`) and the Debian
/// version of its packages (e.g. `6.1.192-2`), and returns the paths of the
/// `.ko` files under `build/modules/`. The runner passes the kernel it has
/// just fetched, so the modules cannot be built for another one.
pub fn build_modules_for(
    root: &Path,
    release: &str,
    version: &str,
) -> Result<Vec<PathBuf>, String> {
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
        return Err(format!(
            "{}: make cannot handle a path with spaces; move the checkout",
            build.display()
        ));
    }
    let headers = headers(&build.join("kernel-headers"), &kernel)?;
    let kmod = stage_sources(root, &build.join("modules"))?;

    capture_ok(
        Command::new("make")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", kmod.display()))
            .arg("ARCH=arm64")
            .arg(format!("CROSS_COMPILE={CROSS_COMPILE}"))
            .arg("modules"),
    )
    .map_err(|e| format!("building the kernel modules failed: {e}"))?;

    let order = kmod.join("modules.order");
    let listed = fs::read_to_string(&order).map_err(|e| format!("{}: {e}", order.display()))?;
    let mut kos = Vec::new();
    for line in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let ko = kmod.join(line.rsplit('/').next().unwrap_or(line));
        let data = fs::read(&ko).map_err(|e| format!("{}: {e}", ko.display()))?;
        match vermagic(&data) {
            Some(v) if vermagic_matches(v, &kernel.release) => kos.push(ko),
            Some(v) => {
                return Err(format!(
                    "{}: vermagic `{v}` is not for {}",
                    ko.display(),
                    kernel.release
                ))
            }
            None => return Err(format!("{}: no vermagic", ko.display())),
        }
    }
    if kos.is_empty() {
        return Err(format!("{} lists no module", order.display()));
    }
    Ok(kos)
}

/// Downloads and unpacks the three header packages for `kernel` under
/// `base` (once) and returns the folder to pass to `make -C`.
fn headers(base: &Path, kernel: &Kernel) -> Result<PathBuf, String> {
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
    fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (spec, file) in &packages {
        let deb = debs.join(file);
        if !deb.is_file() {
            download(spec, &deb)?;
        }
        unpack(&deb, &dir)?;
    }
    let makefile = src.join("Makefile");
    let text = fs::read_to_string(&makefile).map_err(|e| format!("{}: {e}", makefile.display()))?;
    let fixed = relocate_includes(&text, &dir)
        .ok_or_else(|| format!("{}: no `include /usr/src/...` line", makefile.display()))?;
    fs::write(&makefile, fixed).map_err(|e| format!("{}: {e}", makefile.display()))?;
    fs::write(&stamp, v).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(src)
}

/// Copies `host-driver/kmod/*` to `<out>/kmod/` and `hyp_abi.h` to
/// `<out>/include/`, keeping the `../include` layout Kbuild expects. Files
/// whose content did not change are not rewritten, so make stays incremental.
/// Returns `<out>/kmod`.
fn stage_sources(root: &Path, out: &Path) -> Result<PathBuf, String> {
    let header = root.join("host-driver/include/hyp_abi.h");
    if !header.is_file() {
        return Err(format!(
            "{} is missing; run `cargo xtask gen-header`",
            header.display()
        ));
    }
    copy_if_changed(&header, &out.join("include/hyp_abi.h"))?;
    let src = root.join("host-driver/kmod");
    let kmod = out.join("kmod");
    let entries = fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", src.display()))?.path();
        if path.is_file() {
            if let Some(name) = path.file_name() {
                copy_if_changed(&path, &kmod.join(name))?;
            }
        }
    }
    Ok(kmod)
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<(), String> {
    let data = fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if fs::read(to).ok().as_deref() == Some(data.as_slice()) {
        return Ok(());
    }
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::write(to, data).map_err(|e| format!("{}: {e}", to.display()))
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
        assert_eq!(k.abi(), Ok("6.1.0-56"));
        assert_eq!(k.series().as_deref(), Ok("6.1"));
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
