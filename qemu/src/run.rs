//! `cargo xtask run`, and the run path every Linux boot takes: what a boot
//! needs ([`Ingredients`]: host tools, Debian's kernel and busybox, el2),
//! a fresh initramfs and its QEMU [`Launch`] ([`prepare`]), and a boot that
//! runs a script and returns its output under a timeout ([`exec_script`]).
//!
//! Every step that needs something installs or builds it first: host tools
//! with apt, Debian's arm64 kernel and busybox-static with `apt-get download`
//! (cached in `build/debian/`), the rustup targets, el2 (`build/el2.bin`, see
//! the boot contract in `docs/DESIGN.md`) and a fresh initramfs per run;
//! docs/BUILD.md describes each.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::assets::{self, Debian};
use crate::cli::RunArgs;
use crate::initramfs::{self, Extra, Markers, Mode};
use crate::install;
use crate::qemu::{self, Boot, Console, Launch, Machine};
use crate::util::progress;

/// Default `--timeout` for `--exec` runs.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// The exit status of `cargo xtask run` for a bad command line.
pub const USAGE_EXIT: i32 = 2;

/// The kernel command line.
pub fn kernel_cmdline(verbose: bool, extra: &[String]) -> String {
    let mut parts = vec!["console=ttyAMA0", "panic=-1"];
    if !verbose {
        parts.push("quiet");
    }
    let mut s = parts.join(" ");
    for e in extra {
        s.push(' ');
        s.push_str(e);
    }
    s
}

/// Everything one boot needs, ready to launch.
#[derive(Debug)]
pub struct Prepared {
    /// The QEMU invocation.
    pub launch: Launch,
    /// The initramfs' marker lines.
    pub markers: Markers,
    initrd: PathBuf,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.initrd);
    }
}

/// The tools, the Debian assets and (unless `no_hyp`) el2, built once per
/// command and shared by its boots.
#[derive(Debug)]
pub struct Ingredients {
    /// The Debian kernel and busybox.
    pub debian: Debian,
    /// `build/el2.bin`, or `None` for `--no-hyp`.
    pub el2: Option<PathBuf>,
}

/// Installs and builds what a boot needs.
pub fn ingredients(root: &Path, no_hyp: bool) -> Result<Ingredients> {
    install::rust_targets()?;
    assets::host_tools()?;
    let debian = assets::debian(root)?;
    progress(&format!(
        "versions: {}",
        crate::versions::with_debian(&debian)
    ));
    let el2 = if no_hyp { None } else { Some(build_el2(root)?) };
    Ok(Ingredients { debian, el2 })
}

/// Builds el2 and writes `build/el2.bin` (boot contract).
pub fn build_el2(root: &Path) -> Result<PathBuf> {
    let no_el2 = "the el2 hypervisor";
    let hint = "`cargo xtask run --no-hyp` boots the same kernel directly at EL2";
    if !root.join("el2").join("Cargo.toml").is_file() {
        bail!(
            "{no_el2} does not exist yet (no el2/Cargo.toml), so there is nothing to boot the \
             host under; {hint}"
        );
    }
    crate::util::build_bare_metal(root, "el2", "el2")
        .with_context(|| format!("building {no_el2} failed ({hint})"))?;
    let elf = crate::util::bare_metal_elf(root, "el2");
    if !elf.is_file() {
        bail!("{no_el2} built, but {} is missing; {hint}", elf.display());
    }
    let (bin, _) = crate::util::raw_image(root, "el2", "the boot contract")?;
    Ok(bin)
}

/// Makes a fresh initramfs and the QEMU invocation for one boot.
pub fn prepare(
    root: &Path,
    ing: &Ingredients,
    machine: &Machine,
    mode: Mode,
    extras: &[Extra],
    console: Console,
    cmdline: &str,
) -> Result<Prepared> {
    let markers = Markers::fresh();
    let image = initramfs::build(&initramfs::Spec {
        busybox: &ing.debian.busybox_bin,
        mode,
        markers: &markers,
        extras,
    })?;
    let dir = root.join("build").join("initramfs");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let initrd = dir.join(format!("{}.cpio", crate::util::unique_name()));
    std::fs::write(&initrd, image).with_context(|| initrd.display().to_string())?;
    let boot = match &ing.el2 {
        Some(el2) => Boot::Hyp {
            el2: el2.clone(),
            host_kernel: ing.debian.image.clone(),
        },
        None => Boot::Direct {
            kernel: ing.debian.image.clone(),
        },
    };
    let launch = Launch::new(machine.clone(), boot)
        .initrd(&initrd)
        .append(cmdline)
        .console(console);
    // Refuse a bad machine before anything runs.
    launch.args()?;
    Ok(Prepared {
        launch,
        markers,
        initrd,
    })
}

/// `cargo xtask run [options]`.
pub fn run(root: &Path, o: &RunArgs) -> Result<()> {
    let machine = o.machine();
    // A bad machine is refused before anything is built, with exit status
    // 2 like clap's own errors.
    if let Err(e) = machine.check(!o.no_hyp) {
        eprintln!("xtask: error: {e}");
        std::process::exit(USAGE_EXIT);
    }
    let ing = ingredients(root, o.no_hyp)?;
    // The host modules first: a user's --add to the same place comes later
    // in the archive and wins.
    let mut extras = Vec::new();
    if has_host_modules(root) {
        match host_modules(root, &ing.debian) {
            Ok(e) => extras = e,
            Err(e) => progress(&format!(
                "warning: booting without the host modules, their build failed: {e:#}"
            )),
        }
    }
    // s2vmm and the guest payload it runs, next to the modules.
    match crate::vmm::extras(root) {
        Ok(e) => extras.extend(e),
        Err(e) => progress(&format!(
            "warning: booting without s2vmm and /root/guest.bin, their build failed: {e:#}"
        )),
    }
    extras.extend(o.add.iter().cloned());
    let cmdline = kernel_cmdline(o.verbose, &o.append);
    let what = if o.no_hyp {
        "the kernel directly at EL2 (--no-hyp)"
    } else {
        "the kernel at EL1 under el2"
    };
    let timeout = o.timeout.map(Duration::from_secs);
    match &o.exec {
        None => {
            let p = prepare(
                root,
                &ing,
                &machine,
                Mode::Interactive,
                &extras,
                Console::Terminal,
                &cmdline,
            )?;
            progress(&format!("booting {what}: {}", p.launch.command_line()?));
            progress("you get a shell in the host; `poweroff` ends QEMU, Ctrl-A x kills it");
            match p.launch.run_terminal(timeout)? {
                Some(st) if st.success() => Ok(()),
                Some(st) => Err(anyhow!("QEMU exited with {st}")),
                None => Err(anyhow!(
                    "QEMU killed after the --timeout of {} s",
                    timeout.map_or(0, |t| t.as_secs())
                )),
            }
        }
        Some(cmd) => {
            let p = prepare(
                root,
                &ing,
                &machine,
                Mode::Exec {
                    script: format!("{cmd}\n"),
                    quiet: !o.verbose,
                },
                &extras,
                Console::Captured,
                &cmdline,
            )?;
            let timeout = timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
            progress(&format!(
                "booting {what} to run the command (timeout {} s): {}",
                timeout.as_secs(),
                p.launch.command_line()?
            ));
            let r = exec_with(&p, timeout, o.verbose, true)?;
            let secs =
                |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()));
            progress(&format!(
                "user space after {}, command done after {}, QEMU exited after {:.2} s",
                secs(r.userspace),
                secs(r.done),
                r.captured.elapsed.as_secs_f64()
            ));
            let status = r.finish()?;
            // process::exit skips destructors: remove the initramfs first.
            drop(p);
            if status != 0 {
                let _ = std::io::stdout().flush();
                std::process::exit(status.clamp(1, 255));
            }
            Ok(())
        }
    }
}

/// Boots `machine` with `script` as a quiet `--exec` command (`extras` in
/// the initramfs), its output captured and not printed, and kills QEMU
/// after `timeout`. The run path of every suite and benchmark that boots
/// Debian: `r.output` holds the lines the script printed, `r.status` its
/// exit status (`None`: it never finished), `r.captured` the whole console.
pub fn exec_script(
    root: &Path,
    ing: &Ingredients,
    machine: &Machine,
    script: &str,
    extras: &[Extra],
    timeout: Duration,
) -> Result<ExecRun> {
    let p = prepare(
        root,
        ing,
        machine,
        Mode::Exec {
            script: script.to_string(),
            quiet: true,
        },
        extras,
        Console::Captured,
        &kernel_cmdline(false, &[]),
    )?;
    exec_with(&p, timeout, false, false)
}

/// What every s2pin boot puts into the initramfs: `s2pin.ko` (and the
/// isolation test module) built for `debian`'s kernel, `s2vmm` and the
/// guest payload.
pub fn shim_extras(root: &Path, debian: &Debian) -> Result<Vec<Extra>> {
    let mut extras = host_modules(root, debian)?;
    extras.extend(crate::vmm::extras(root)?);
    Ok(extras)
}

/// The result of an `--exec` boot.
#[derive(Debug)]
pub struct ExecRun {
    /// The console.
    pub captured: qemu::Captured,
    /// The command's exit status, if the end marker came.
    pub status: Option<i32>,
    /// The lines the command printed.
    pub output: Vec<String>,
    /// When user space started (host clock since spawn).
    pub userspace: Option<Duration>,
    /// The guest's uptime (seconds) at that moment.
    pub guest_uptime: Option<f64>,
    /// When the end marker came.
    pub done: Option<Duration>,
    /// The timeout that applied.
    pub timeout: Duration,
}

impl ExecRun {
    /// The command's status, or an error saying why there is none.
    pub fn finish(&self) -> Result<i32> {
        let c = &self.captured;
        match self.status {
            Some(s) => {
                if c.timed_out {
                    progress("the command finished but QEMU did not power off; it was killed");
                } else if !c.status.is_some_and(|st| st.success()) {
                    progress(&format!(
                        "QEMU exited with {:?} after the command",
                        c.status
                    ));
                }
                Ok(s)
            }
            None if c.timed_out => Err(anyhow!(
                "timed out after {} s{}; last console lines:\n{}",
                self.timeout.as_secs(),
                if self.userspace.is_none() {
                    " before user space started"
                } else {
                    " while the command ran"
                },
                c.tail(40)
            )),
            None => Err(anyhow!(
                "QEMU exited ({}) before the command finished; last console lines:\n{}{}",
                c.status.map_or("killed".into(), |s| s.to_string()),
                c.tail(40),
                if c.stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!("\nQEMU stderr:\n{}", c.stderr.trim())
                }
            )),
        }
    }
}

/// Boots a prepared `--exec` launch. With `echo`, the command's output (or
/// with `verbose` the whole console) is printed as it arrives.
pub fn exec_with(p: &Prepared, timeout: Duration, verbose: bool, echo: bool) -> Result<ExecRun> {
    let m = &p.markers;
    let (userspace_mark, begin) = (m.userspace(), m.begin());
    let mut inside = false;
    let mut status = None;
    let mut output = Vec::new();
    let mut userspace = None;
    let mut guest_uptime = None;
    let mut done = None;
    let mut watch = |line: &str, at: Duration, _: &mut dyn Write| {
        if userspace.is_none() {
            if let Some(pos) = line.find(&userspace_mark) {
                userspace = Some(at);
                guest_uptime = line[pos + userspace_mark.len()..].trim().parse().ok();
            }
        }
        if !inside && status.is_none() {
            if echo && verbose {
                println!("{line}");
            }
            if line.contains(&begin) {
                inside = true;
            }
            return;
        }
        if !inside {
            if echo && verbose {
                println!("{line}");
            }
            return;
        }
        let (text, st) = match m.split_exit(line) {
            Some((text, st)) => (text, Some(st)),
            None => (line, None),
        };
        if st.is_some() {
            inside = false;
            status = st;
            done = Some(at);
            if !text.is_empty() {
                if echo {
                    println!("{text}");
                }
                output.push(text.to_string());
            }
            if echo && verbose {
                println!("{line}");
            }
        } else {
            if echo {
                println!("{line}");
            }
            output.push(line.to_string());
        }
    };
    let captured = p.launch.run_captured(timeout, &mut watch)?;
    Ok(ExecRun {
        captured,
        status,
        output,
        userspace,
        guest_uptime,
        done,
        timeout,
    })
}

/// The host module whose `/sys/kernel/s2pin/version` issues HYP_VERSION on
/// every read (`host-driver/kmod/s2pin_glue.c` with its logic in
/// `host-driver/rust`), built by `modules.rs`.
pub const HOST_MODULE: &str = "s2pin.ko";

/// The test module that reads a physical address from kernel context.
pub const ISOLATION_MODULE: &str = "hyp_isolation_test.ko";
/// What it reads: the hypervisor's own image (el2's text, at RAM base + 0x8_0000).
pub const ISOLATION_PHYS: u64 = boot_contract::HYP_IMAGE_ADDR;

/// Whether the tree has host modules to build (`host-driver/kmod/`).
pub fn has_host_modules(root: &Path) -> bool {
    root.join("host-driver/kmod/Kbuild").is_file()
}

/// Builds `host-driver/kmod/` for the kernel in `debian` and returns the
/// initramfs entries `/root/`[`HOST_MODULE`] and, if it was built,
/// `/root/`[`ISOLATION_MODULE`].
pub fn host_modules(root: &Path, debian: &Debian) -> Result<Vec<Extra>> {
    progress(&format!(
        "building host-driver/kmod for {} ({}): /root/{HOST_MODULE}, /root/{ISOLATION_MODULE}",
        debian.release, debian.kernel.version
    ));
    let kos = crate::modules::build_modules_for(root, &debian.release, &debian.kernel.version)?;
    let entry = |name: &str| {
        kos.iter().find(|k| k.ends_with(name)).map(|ko| Extra {
            source: ko.clone(),
            dest: format!("/root/{name}"),
        })
    };
    let host = entry(HOST_MODULE).ok_or_else(|| anyhow!("no {HOST_MODULE} among {kos:?}"))?;
    Ok(std::iter::once(host)
        .chain(entry(ISOLATION_MODULE))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_quiet_unless_verbose() {
        assert_eq!(kernel_cmdline(false, &[]), "console=ttyAMA0 panic=-1 quiet");
        assert_eq!(
            kernel_cmdline(true, &["nokaslr".into()]),
            "console=ttyAMA0 panic=-1 nokaslr"
        );
    }

    #[test]
    fn missing_el2_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("xtask-noel2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = build_el2(&dir).unwrap_err().to_string();
        assert!(e.contains("el2") && e.contains("--no-hyp"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
