//! What a QEMU boot needs from Debian: the host tools (installed with apt),
//! and the arm64 kernel image and busybox (fetched with `apt-get download`,
//! unpacked with `dpkg-deb -x` into `build/debian/`, and re-used).
//!
//! Nothing here is installed for arm64: the arm64 packages are only
//! downloaded and unpacked, so the machine's own compilers stay untouched
//! (installing `linux-headers-*:arm64` would remove them; docs/BUILD.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

use crate::initramfs::Extra;
use crate::install::{apt_get, privileged};
use crate::util::{capture, capture_ok, on_path, progress, unique_name};

/// Host packages a boot needs, each with a program that proves it is installed.
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-arm", "qemu-system-aarch64"),
    ("gcc-aarch64-linux-gnu", "aarch64-linux-gnu-gcc"),
];

/// The meta-package whose dependency names the current kernel ABI.
const KERNEL_META: &str = "linux-image-arm64:arm64";

/// A Debian package unpacked under `build/debian/`.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// Package name without architecture, e.g. `linux-image-6.1.0-56-arm64`.
    pub package: String,
    /// Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// Where `dpkg-deb -x` put its files.
    pub dir: PathBuf,
}

/// The Debian pieces of a boot.
#[derive(Debug, Clone)]
pub struct Debian {
    /// The kernel package.
    pub kernel: Unpacked,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-arm64`.
    pub release: String,
    /// The uncompressed arm64 `Image` (Debian's `vmlinuz` is one).
    pub image: PathBuf,
    /// The busybox-static package.
    pub busybox: Unpacked,
    /// The static arm64 busybox binary.
    pub busybox_bin: PathBuf,
}

impl Debian {
    /// One line saying which kernel and busybox are used.
    pub fn describe(&self) -> String {
        format!(
            "kernel {} ({} {}), busybox-static {}",
            self.release, self.kernel.package, self.kernel.version, self.busybox.version
        )
    }
}

/// Installs the host packages that are missing, in one `apt-get install`.
pub fn host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, prog)| !on_path(prog))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!("apt-get install {}", missing.join(" ")));
    apt_get(&["update", "-qq"])?;
    apt_get(
        &[
            &["install", "-y", "-qq", "--no-install-recommends"],
            &missing[..],
        ]
        .concat(),
    )?;
    for (pkg, prog) in HOST_PACKAGES {
        if !on_path(prog) {
            return Err(anyhow!("installed {pkg} but `{prog}` is still not on PATH"));
        }
    }
    Ok(())
}

/// Makes sure the kernel image and busybox are unpacked under
/// `<root>/build/debian/`, downloading only what is not there yet.
pub fn debian(root: &Path) -> Result<Debian> {
    multiarch()?;
    let base = root.join("build").join("debian");
    refresh_lists(&base);
    let kernel_pkg = kernel_package()?;
    let kernel = fetch(&base, &kernel_pkg)?;
    note_other_versions(&base, "linux-image-", &kernel);
    let release = kernel_pkg
        .strip_prefix("linux-image-")
        .unwrap_or(&kernel_pkg)
        .to_string();
    let image = kernel.dir.join("boot").join(format!("vmlinuz-{release}"));
    check_image(&image)?;
    let busybox = fetch(&base, "busybox-static")?;
    note_other_versions(&base, "busybox-static_", &busybox);
    let busybox_bin = busybox.dir.join("bin").join("busybox");
    if !busybox_bin.is_file() {
        return Err(anyhow!(
            "{} has no bin/busybox; delete {} and retry",
            busybox.package,
            busybox.dir.display()
        ));
    }
    Ok(Debian {
        kernel,
        release,
        image,
        busybox,
        busybox_bin,
    })
}

/// Fetches Debian's current arm64 package `pkg` (cached under
/// `build/debian/` like the kernel and busybox) and returns it unpacked.
/// Use [`Unpacked::extras`] to put files of it into the host's initramfs.
/// A dynamically linked program also needs its libraries: fetch `libc6`
/// and each library package it depends on the same way and add their
/// [`Unpacked::libraries`].
pub fn debian_package(root: &Path, pkg: &str) -> Result<Unpacked> {
    multiarch()?;
    let base = root.join("build").join("debian");
    refresh_lists(&base);
    let p = fetch(&base, pkg).with_context(|| format!("fetching Debian's arm64 {pkg}"))?;
    note_other_versions(&base, &format!("{pkg}_"), &p);
    progress(&format!("using {} {}", p.package, p.version));
    Ok(p)
}

impl Unpacked {
    /// Initramfs entries for `files` of the package (paths inside it, e.g.
    /// `usr/bin/stress-ng`), each at the same path in the initramfs.
    pub fn extras(&self, files: &[&str]) -> Result<Vec<Extra>> {
        files
            .iter()
            .map(|f| {
                let rel = f.trim_start_matches('/');
                let source = self.dir.join(rel);
                if !source.is_file() {
                    bail!("{} {} has no {rel}", self.package, self.version);
                }
                Ok(Extra {
                    source,
                    dest: format!("/{rel}"),
                })
            })
            .collect()
    }

    /// Initramfs entries for every shared library of the package (files
    /// under `lib/` and `usr/lib/` whose name contains `.so`), at the same
    /// paths; symbolic links become copies.
    pub fn libraries(&self) -> Vec<Extra> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.join("lib"), self.dir.join("usr/lib")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.is_file() && e.file_name().to_string_lossy().contains(".so") {
                    if let Ok(rel) = path.strip_prefix(&self.dir) {
                        out.push(Extra {
                            dest: format!("/{}", rel.display()),
                            source: path,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.dest.cmp(&b.dest));
        out
    }
}

/// apt's package lists older than this are refreshed before the kernel and
/// busybox versions are chosen, so a run uses what Debian's archive serves
/// now and not what a stale list remembers.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Where apt keeps its package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// Whether apt has an arm64 package list at all.
fn have_arm64_lists() -> bool {
    fs::read_dir(APT_LISTS).is_ok_and(|d| {
        d.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("binary-arm64_Packages")
        })
    })
}

/// Runs `apt-get update` when there is no arm64 list or the last update
/// this runner made (the stamp `build/debian/.apt-updated`) is older than
/// [`LISTS_MAX_AGE`]; if that fails (no network), says clearly that the
/// versions used may be older than the archive's and goes on with the
/// lists (and the cache) it has.
fn refresh_lists(base: &Path) {
    let stamp = base.join(".apt-updated");
    let age = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    let have = have_arm64_lists();
    if have && age.is_some_and(|a| a < LISTS_MAX_AGE) {
        return;
    }
    let how_old = match age {
        _ if !have => "missing".to_string(),
        Some(a) => format!("{} h old", a.as_secs() / 3600),
        None => "of unknown age".to_string(),
    };
    progress(&format!(
        "apt's arm64 package lists are {how_old}: apt-get update, so the kernel and busybox are \
         the versions Debian's archive serves now"
    ));
    match apt_get(&["update", "-qq"]) {
        Ok(()) => {
            let _ = fs::create_dir_all(base);
            let _ = fs::write(&stamp, "");
        }
        Err(e) => progress(&format!(
            "WARNING: apt-get update failed ({e:#}); the kernel and busybox below are the newest \
             that lists {how_old} know, and Debian's archive may serve newer ones"
        )),
    }
}

/// Says so when `base` holds versions of a package other than `chosen` (an
/// older kernel or busybox from an earlier run): they are not used, so one
/// run never mixes versions.
fn note_other_versions(base: &Path, prefix: &str, chosen: &Unpacked) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let Some(used) = chosen.dir.file_name() else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        if name != used && name.to_string_lossy().starts_with(prefix) && e.path().is_dir() {
            progress(&format!(
                "note: build/debian/{} is not the version Debian's archive serves now \
                 ({} {}); it is not used",
                name.to_string_lossy(),
                chosen.package,
                chosen.version
            ));
        }
    }
}

/// Enables arm64 as a foreign dpkg architecture (once) so apt knows the
/// arm64 packages.
pub fn multiarch() -> Result<()> {
    let out = capture(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "arm64")
    {
        return Ok(());
    }
    progress("dpkg --add-architecture arm64 && apt-get update");
    privileged("dpkg", &["--add-architecture", "arm64"])?;
    apt_get(&["update", "-qq"])
}

/// The current kernel package, e.g. `linux-image-6.1.0-56-arm64`, from the
/// dependency of `linux-image-arm64:arm64`.
fn kernel_package() -> Result<String> {
    let query = || -> Result<Option<String>> {
        let out = capture(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
        Ok(parse_kernel_depends(&String::from_utf8_lossy(&out.stdout)))
    };
    if let Some(p) = query()? {
        return Ok(p);
    }
    // A fresh machine may not have the arm64 lists yet.
    progress("apt-get update (to find the current arm64 kernel)");
    apt_get(&["update", "-qq"])?;
    query()?.ok_or_else(|| {
        anyhow!("`apt-cache depends {KERNEL_META}` names no linux-image-*-arm64 package")
    })
}

/// Finds `Depends: linux-image-<abi>-arm64[:arm64]` in `apt-cache depends` output.
pub fn parse_kernel_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let name = dep.split(':').next()?.trim();
        let ok = name.starts_with("linux-image-")
            && name.ends_with("-arm64")
            && name != "linux-image-arm64"
            && !name.contains(char::is_whitespace);
        ok.then(|| name.to_string())
    })
}

/// Downloads (unless cached) and unpacks (unless done) `pkg:arm64`.
fn fetch(base: &Path, pkg: &str) -> Result<Unpacked> {
    let version = candidate_version(pkg)?;
    let debs = base.join("debs");
    fs::create_dir_all(&debs).with_context(|| debs.display().to_string())?;
    let deb = debs.join(deb_file_name(pkg, &version, "arm64"));
    // Other runs may fill the cache at the same time: work in a folder of
    // our own and rename into place (atomic on one file system).
    let tmp = base.join(format!(".tmp-{}-{pkg}", unique_name()));
    let result = download_and_unpack(pkg, &version, &deb, &tmp, base);
    let _ = fs::remove_dir_all(&tmp);
    let dir = result?;
    Ok(Unpacked {
        package: pkg.to_string(),
        version,
        dir,
    })
}

/// Downloads `deb` unless it is there and unpacks it unless that is done;
/// returns the unpacked folder. `tmp` is scratch space of this process.
fn download_and_unpack(
    pkg: &str,
    version: &str,
    deb: &Path,
    tmp: &Path,
    base: &Path,
) -> Result<PathBuf> {
    let io = |p: &Path, e: std::io::Error| anyhow!("{}: {e}", p.display());
    fs::create_dir_all(tmp).map_err(|e| io(tmp, e))?;
    if !deb.is_file() {
        let got = tmp.join(deb.file_name().unwrap_or_default());
        download(&format!("{pkg}:arm64={version}"), &got)?;
        fs::rename(&got, deb).map_err(|e| io(deb, e))?;
    }
    let dir = base.join(format!("{pkg}_{}", version.replace(':', "%3a")));
    if dir.join(".unpacked").is_file() {
        return Ok(dir);
    }
    progress(&format!("dpkg-deb -x {}", deb.display()));
    let staging = tmp.join("root");
    unpack(deb, &staging)?;
    let stamp = staging.join(".unpacked");
    fs::write(&stamp, version).map_err(|e| io(&stamp, e))?;
    if dir.exists() && !dir.join(".unpacked").is_file() {
        // A half-made folder from an interrupted older version of this code.
        fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    match fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another run got there first.
        Err(_) if dir.join(".unpacked").is_file() => Ok(dir),
        Err(e) => Err(io(&dir, e)),
    }
}

/// Runs `apt-get download SPEC` (`pkg[:arch][=version]`) in `deb`'s folder,
/// which must then hold `deb` (the name apt gives it, see [`deb_file_name`]).
pub fn download(spec: &str, deb: &Path) -> Result<()> {
    progress(&format!("apt-get download {spec}"));
    let dir = deb.parent().unwrap_or(Path::new("."));
    capture_ok(
        Command::new("apt-get")
            .args(["download", "-q", spec])
            .current_dir(dir),
    )?;
    if deb.is_file() {
        Ok(())
    } else {
        Err(anyhow!(
            "`apt-get download {spec}` did not write {}",
            deb.display()
        ))
    }
}

/// Unpacks the files of `deb` under `dir` (`dpkg-deb -x`).
pub fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    capture_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir)).map(drop)
}

/// The version apt would pick for `pkg:arm64`.
fn candidate_version(pkg: &str) -> Result<String> {
    let out = capture(Command::new("apt-cache").args(["policy", &format!("{pkg}:arm64")]))?;
    parse_candidate(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| anyhow!("apt knows no candidate version of {pkg}:arm64"))
}

/// The `Candidate:` line of `apt-cache policy` output.
pub fn parse_candidate(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("Candidate:")?.trim();
        (!v.is_empty() && v != "(none)").then(|| v.to_string())
    })
}

/// The file name `apt-get download` gives `pkg` at `version` for `arch`
/// (an epoch's `:` is written `%3a`).
pub fn deb_file_name(pkg: &str, version: &str, arch: &str) -> String {
    format!("{pkg}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// Whether `data` starts with an arm64 Linux `Image` header (magic
/// `ARM\x64` at offset 56).
pub fn is_arm64_image(data: &[u8]) -> bool {
    data.get(56..60) == Some(b"ARM\x64".as_slice())
}

/// Checks that `path` is an arm64 Linux `Image`.
fn check_image(path: &Path) -> Result<()> {
    let data = fs::read(path).with_context(|| path.display().to_string())?;
    if is_arm64_image(&data) {
        Ok(())
    } else {
        Err(anyhow!(
            "{} is not an uncompressed arm64 Image (no ARM\\x64 magic)",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_files_and_libraries_become_initramfs_entries() {
        let dir = std::env::temp_dir().join(format!("xtask-unpacked-{}", unique_name()));
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        fs::create_dir_all(dir.join("usr/lib/aarch64-linux-gnu")).unwrap();
        fs::write(dir.join("usr/bin/tool"), "x").unwrap();
        fs::write(dir.join("usr/lib/aarch64-linux-gnu/libx.so.1"), "y").unwrap();
        fs::write(dir.join("usr/lib/aarch64-linux-gnu/README"), "z").unwrap();
        let p = Unpacked {
            package: "tool".into(),
            version: "1".into(),
            dir: dir.clone(),
        };
        let e = p.extras(&["usr/bin/tool"]).unwrap();
        assert_eq!(e[0].dest, "/usr/bin/tool");
        assert!(p.extras(&["usr/bin/none"]).is_err());
        let libs = p.libraries();
        assert_eq!(libs.len(), 1);
        assert_eq!(libs[0].dest, "/usr/lib/aarch64-linux-gnu/libx.so.1");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_abi_comes_from_the_meta_package() {
        let out = "linux-image-arm64:arm64\n  Depends: linux-image-6.1.0-56-arm64:arm64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-arm64")
        );
        let unsigned = "x\n  Depends: linux-image-6.1.0-56-arm64-unsigned\n  Depends: linux-image-6.1.0-56-arm64:arm64\n";
        assert_eq!(
            parse_kernel_depends(unsigned).as_deref(),
            Some("linux-image-6.1.0-56-arm64")
        );
        assert_eq!(parse_kernel_depends("N: Unable to locate package\n"), None);
        assert_eq!(
            parse_kernel_depends("  Depends: linux-image-arm64:arm64\n"),
            None
        );
    }

    /// Manual check of the cache from nothing, twice in parallel (downloads
    /// about 70 MB): `cargo test -p xtask -- --ignored fresh_cache`.
    #[test]
    #[ignore = "downloads Debian packages"]
    fn fresh_cache_fills_once_and_is_reused() {
        let root = std::env::temp_dir().join(format!("xtask-assets-{}", std::process::id()));
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let r = root.clone();
                std::thread::spawn(move || debian(&r))
            })
            .collect();
        for r in runs {
            let d = r.join().unwrap().unwrap();
            assert!(d.image.is_file() && d.busybox_bin.is_file());
        }
        let again = debian(&root).unwrap();
        assert!(again.image.starts_with(&root));
        let leftovers: Vec<_> = fs::read_dir(root.join("build/debian"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn arm64_image_magic() {
        let mut image = vec![0u8; 64];
        assert!(!is_arm64_image(&image));
        image[56..60].copy_from_slice(b"ARM\x64");
        assert!(is_arm64_image(&image));
        assert!(!is_arm64_image(&image[..59]));
    }

    #[test]
    fn candidate_version_is_read() {
        let out = "busybox-static:arm64:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+b1\n";
        assert_eq!(parse_candidate(out).as_deref(), Some("1:1.35.0-4+b1"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n").as_deref(),
            Some("6.1.192-2")
        );
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4+b1", "arm64"),
            "busybox-static_1%3a1.35.0-4+b1_arm64.deb"
        );
        assert_eq!(
            deb_file_name("linux-kbuild-6.1", "6.1.192-2", "amd64"),
            "linux-kbuild-6.1_6.1.192-2_amd64.deb"
        );
        assert_eq!(deb_file_name("x", "1:2-3", "all"), "x_1%3a2-3_all.deb");
    }
}
