//! `cargo xtask run` (boot the host kernel under el2, or directly with
//! `--no-hyp`), the `boot` test suite's checks, and `bench boot`.
//!
//! Every step that needs something installs or builds it first: host tools
//! with apt, Debian's arm64 kernel and busybox-static with `apt-get download`
//! (cached in `build/debian/`), the rustup targets, el2 (`build/el2.bin`, see
//! the boot contract in `docs/DESIGN.md`) and a fresh initramfs per run.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::assets::{self, Debian};
use crate::initramfs::{self, Extra, Markers, Mode};
use crate::install;
use crate::qemu::{self, Boot, Console, Launch, Machine};
use crate::util::progress;

/// Default `--timeout` for `--exec` runs.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of `cargo xtask run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// `--exec CMD`: run CMD in the host and exit with its status.
    pub exec: Option<String>,
    /// `--smp N`, `--mem SIZE`, `--numa N`, `--cpu MODEL`.
    pub machine: Machine,
    /// `--add FILE[:/DEST]` (default destination `/root/<name>`).
    pub add: Vec<Extra>,
    /// `--no-hyp`: the kernel directly at EL2.
    pub no_hyp: bool,
    /// `--timeout SECS`.
    pub timeout: Option<Duration>,
    /// `--verbose`: the whole console, no `quiet`.
    pub verbose: bool,
    /// `--append ARGS`: more kernel command-line arguments.
    pub append: Vec<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            exec: None,
            machine: Machine {
                smp: 4,
                mem_mib: 2048,
                numa_nodes: 1,
                cpu: qemu::DEFAULT_CPU.to_string(),
            },
            add: Vec::new(),
            no_hyp: false,
            timeout: None,
            verbose: false,
            append: Vec::new(),
        }
    }
}

/// A bad `run` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptError {
    /// An option this command does not know.
    Unknown(String),
    /// An option that needs a value came last.
    MissingValue(&'static str),
    /// A value that does not parse.
    BadValue {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is expected.
        expected: &'static str,
    },
}

impl fmt::Display for OptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(o) => write!(f, "unknown option `{o}`\n\n{RUN_USAGE}"),
            Self::MissingValue(o) => write!(f, "{o} needs a value\n\n{RUN_USAGE}"),
            Self::BadValue {
                option,
                value,
                expected,
            } => write!(f, "{option} `{value}`: expected {expected}"),
        }
    }
}

/// The exit status of `cargo xtask run` for a bad command line.
pub const USAGE_EXIT: i32 = 2;

/// Help for `cargo xtask run`.
pub const RUN_USAGE: &str = "\
usage: cargo xtask run [options]
  boots Debian's arm64 kernel at EL1 under the el2 hypervisor in QEMU and leaves
  you at a root shell in the host (`poweroff` ends QEMU, Ctrl-A x kills it).
  The host modules from host-driver/kmod are built for that kernel and put at
  /root/s2pin.ko and /root/hyp_isolation_test.ko (if the build fails, the boot
  goes on without them):
    insmod /root/s2pin.ko; cat /sys/kernel/s2pin/version
  and the VMM at /usr/bin/s2vmm with the guest payload at /root/guest.bin (s2vmm
  loads /root/s2pin.ko itself when /dev/s2pin is missing):
    s2vmm --image /root/guest.bin --mem 64M --vcpus 2 --policy confirm --stats
options (`--opt VALUE` or `--opt=VALUE`):
  --exec 'CMD'        run CMD in the host (sh), print its output, exit with its status
  --smp N             CPUs, 1 to 64 (default 4)
  --mem SIZE          memory, e.g. 2G or 1536M; a bare number is MiB
                      (default 2G; 1G to 4G under el2)
  --numa N            1 or 2 NUMA nodes (CPUs and memory split in halves; 2 needs --smp 2+)
  --cpu MODEL         QEMU -cpu (default max,pauth-impdef=on)
  --add FILE[:/DEST]  put FILE into the host's initramfs (default /root/<name>); repeatable
  --no-hyp            boot the same kernel directly at EL2, without el2
  --timeout SECS      kill QEMU after SECS (default 300 with --exec, none otherwise)
  --append ARGS       more kernel command-line arguments; repeatable
  -v, --verbose       show the whole console (no `quiet`)
  -h, --help          this text
exit status: with --exec, the command's; 2 for a bad command line; 1 for other errors";

/// Parses `run`'s arguments; `--opt VALUE` and `--opt=VALUE` both work.
pub fn parse_run(args: &[String]) -> Result<RunOptions, OptError> {
    let mut o = RunOptions::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |opt: &'static str| -> Result<String, OptError> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().cloned().ok_or(OptError::MissingValue(opt)),
            }
        };
        match name {
            "--exec" => o.exec = Some(value("--exec")?),
            "--smp" => {
                let v = value("--smp")?;
                o.machine.smp = v.parse().ok().filter(|n| (1..=64).contains(n)).ok_or(bad(
                    "--smp",
                    &v,
                    "a CPU count from 1 to 64",
                ))?;
            }
            "--mem" => {
                let v = value("--mem")?;
                o.machine.mem_mib =
                    parse_mem_mib(&v).ok_or(bad("--mem", &v, "a size like 2G or 1536M"))?;
            }
            "--numa" => {
                let v = value("--numa")?;
                o.machine.numa_nodes = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=2).contains(n))
                    .ok_or(bad("--numa", &v, "1 or 2"))?;
            }
            "--cpu" => {
                let v = value("--cpu")?;
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(bad(
                        "--cpu",
                        &v,
                        "a QEMU CPU model such as max or cortex-a57",
                    ));
                }
                o.machine.cpu = v;
            }
            "--add" => {
                let v = value("--add")?;
                o.add
                    .push(parse_add(&v).ok_or(bad("--add", &v, "FILE or FILE:/DEST"))?);
            }
            "--timeout" => {
                let v = value("--timeout")?;
                let secs: u64 = v.parse().ok().filter(|s| *s > 0).ok_or(bad(
                    "--timeout",
                    &v,
                    "a number of seconds above 0",
                ))?;
                o.timeout = Some(Duration::from_secs(secs));
            }
            "--append" => o.append.push(value("--append")?),
            "--no-hyp" if inline.is_none() => o.no_hyp = true,
            "--verbose" | "-v" if inline.is_none() => o.verbose = true,
            _ => return Err(OptError::Unknown(arg.clone())),
        }
    }
    Ok(o)
}

fn bad(option: &'static str, value: &str, expected: &'static str) -> OptError {
    OptError::BadValue {
        option,
        value: value.to_string(),
        expected,
    }
}

/// `2G`, `1536M`, `1536` (MiB, as QEMU reads it) -> MiB.
pub fn parse_mem_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let mult = match s[digits..].to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult).filter(|m| *m > 0)
}

/// `FILE` -> `/root/<name>`, `FILE:/DEST` -> `/DEST`.
pub fn parse_add(s: &str) -> Option<Extra> {
    let (source, dest) = match s.rsplit_once(':') {
        Some((src, dest)) if dest.starts_with('/') && !src.is_empty() => {
            (PathBuf::from(src), dest.to_string())
        }
        _ => {
            let p = PathBuf::from(s);
            let name = p.file_name()?.to_str()?.to_string();
            (p, format!("/root/{name}"))
        }
    };
    let ok = dest.len() > 1
        && !dest.ends_with('/')
        && dest
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    ok.then_some(Extra { source, dest })
}

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
pub fn ingredients(root: &Path, no_hyp: bool) -> Result<Ingredients, String> {
    install::rust_targets()?;
    assets::host_tools()?;
    let debian = assets::debian(root)?;
    progress(&format!("using {}", debian.describe()));
    let el2 = if no_hyp { None } else { Some(build_el2(root)?) };
    Ok(Ingredients { debian, el2 })
}

/// Builds el2 and writes `build/el2.bin` (boot contract).
pub fn build_el2(root: &Path) -> Result<PathBuf, String> {
    let no_el2 = "the el2 hypervisor";
    let hint = "`cargo xtask run --no-hyp` boots the same kernel directly at EL2";
    if !root.join("el2").join("Cargo.toml").is_file() {
        return Err(format!(
            "{no_el2} does not exist yet (no el2/Cargo.toml), so there is nothing to boot the \
             host under; {hint}"
        ));
    }
    crate::util::build_bare_metal(root, "el2", "el2")
        .map_err(|e| format!("building {no_el2} failed: {e}; {hint}"))?;
    let elf = crate::util::bare_metal_elf(root, "el2");
    if !elf.is_file() {
        return Err(format!(
            "{no_el2} built, but {} is missing; {hint}",
            elf.display()
        ));
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
    cmdline: String,
) -> Result<Prepared, String> {
    let markers = Markers::fresh();
    let image = initramfs::build(&initramfs::Spec {
        busybox: &ing.debian.busybox_bin,
        mode,
        markers: &markers,
        extras,
    })?;
    let dir = root.join("build").join("initramfs");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let initrd = dir.join(format!("{}.cpio", crate::util::unique_name()));
    std::fs::write(&initrd, image).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let boot = match &ing.el2 {
        Some(el2) => Boot::Hyp {
            el2: el2.clone(),
            host_kernel: ing.debian.image.clone(),
        },
        None => Boot::Direct {
            kernel: ing.debian.image.clone(),
        },
    };
    let launch = Launch {
        machine: machine.clone(),
        boot,
        initrd: initrd.clone(),
        append: cmdline,
        console,
    };
    // Refuse a bad machine before anything runs.
    launch.args().map_err(|e| e.to_string())?;
    Ok(Prepared {
        launch,
        markers,
        initrd,
    })
}

/// `cargo xtask run [options]`.
pub fn run(root: &Path, args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{RUN_USAGE}");
        return Ok(());
    }
    // A bad command line is refused before anything is built, with exit
    // status 2 like other command-line tools.
    let usage_error = |e: String| -> ! {
        eprintln!("xtask: error: {e}");
        std::process::exit(USAGE_EXIT)
    };
    let o = parse_run(args).unwrap_or_else(|e| usage_error(e.to_string()));
    if let Err(e) = o.machine.check(!o.no_hyp) {
        usage_error(e.to_string());
    }
    let ing = ingredients(root, o.no_hyp)?;
    // The host modules first: a user's --add to the same place comes later
    // in the archive and wins.
    let mut extras = Vec::new();
    if has_host_modules(root) {
        match host_modules(root, &ing.debian) {
            Ok(e) => extras = e,
            Err(e) => progress(&format!(
                "warning: booting without the host modules, their build failed: {e}"
            )),
        }
    }
    // s2vmm and the guest payload it runs, next to the modules.
    match crate::vmm::extras(root) {
        Ok(e) => extras.extend(e),
        Err(e) => progress(&format!(
            "warning: booting without s2vmm and /root/guest.bin, their build failed: {e}"
        )),
    }
    extras.extend(o.add.iter().cloned());
    let cmdline = kernel_cmdline(o.verbose, &o.append);
    let what = if o.no_hyp {
        "the kernel directly at EL2 (--no-hyp)"
    } else {
        "the kernel at EL1 under el2"
    };
    match &o.exec {
        None => {
            let p = prepare(
                root,
                &ing,
                &o.machine,
                Mode::Interactive,
                &extras,
                Console::Terminal,
                cmdline,
            )?;
            let args = p.launch.args().map_err(|e| e.to_string())?;
            progress(&format!(
                "booting {what}: {}",
                p.launch.command_line().map_err(|e| e.to_string())?
            ));
            progress("you get a shell in the host; `poweroff` ends QEMU, Ctrl-A x kills it");
            let st = qemu::run_terminal(&args, o.timeout)?;
            match st {
                Some(st) if st.success() => Ok(()),
                Some(st) => Err(format!("QEMU exited with {st}")),
                None => Err(format!(
                    "QEMU killed after the --timeout of {} s",
                    o.timeout.map_or(0, |t| t.as_secs())
                )),
            }
        }
        Some(cmd) => {
            let p = prepare(
                root,
                &ing,
                &o.machine,
                Mode::Exec {
                    script: format!("{cmd}\n"),
                    quiet: !o.verbose,
                },
                &extras,
                Console::Captured,
                cmdline,
            )?;
            let timeout = o.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
            progress(&format!(
                "booting {what} to run the command (timeout {} s): {}",
                timeout.as_secs(),
                p.launch.command_line().map_err(|e| e.to_string())?
            ));
            let r = exec(&p, timeout, o.verbose)?;
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
    pub fn finish(&self) -> Result<i32, String> {
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
            None if c.timed_out => Err(format!(
                "timed out after {} s{}; last console lines:\n{}",
                self.timeout.as_secs(),
                if self.userspace.is_none() {
                    " before user space started"
                } else {
                    " while the command ran"
                },
                c.tail(40)
            )),
            None => Err(format!(
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
pub fn exec_with(
    p: &Prepared,
    timeout: Duration,
    verbose: bool,
    echo: bool,
) -> Result<ExecRun, String> {
    let args = p.launch.args().map_err(|e| e.to_string())?;
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
    let captured = qemu::run_captured(&args, timeout, &mut watch)?;
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

fn exec(p: &Prepared, timeout: Duration, verbose: bool) -> Result<ExecRun, String> {
    exec_with(p, timeout, verbose, true)
}

/// One named result of the boot suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// Evidence when it did not.
    pub detail: String,
}

/// Which kernel the boot suite checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuiteMode {
    /// The real suite: the host at EL1 under el2.
    Hyp,
    /// Harness validation: the same checks against Linux booted at EL2
    /// (`XTASK_BOOT_MODE=no-hyp`): it must then report EL2, and the
    /// hypervisor-only checks are skipped.
    NoHyp,
}

impl SuiteMode {
    /// From `XTASK_BOOT_MODE` (`no-hyp`, or unset / `hyp`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("XTASK_BOOT_MODE").as_deref() {
            Err(_) | Ok("") | Ok("hyp") => Ok(Self::Hyp),
            Ok("no-hyp") => Ok(Self::NoHyp),
            Ok(other) => Err(format!(
                "XTASK_BOOT_MODE=`{other}`: expected `hyp` or `no-hyp`"
            )),
        }
    }
}

/// The host module whose `/sys/kernel/s2pin/version` issues HYP_VERSION on
/// every read (`host-driver/kmod/s2pin_glue.c` with its logic in
/// `host-driver/rust`), built by `modules.rs`.
pub const HOST_MODULE: &str = "s2pin.ko";

/// The ABI version el2 must report, from the one source of the ABI.
fn abi_version() -> String {
    format!(
        "{}.{}",
        hypercalls::ABI_VERSION_MAJOR,
        hypercalls::ABI_VERSION_MINOR
    )
}

/// Per-boot timeout in the suite: a hang fails, never stalls.
pub const SUITE_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The script the main boot check runs inside the host.
fn suite_script(module: bool) -> String {
    let mut s = String::from(
        "echo \"CHECK el=$(dmesg | grep -o 'CPU: All CPU(s) started at EL[0-9]')\"\n\
         echo \"CHECK online=$(cat /sys/devices/system/cpu/online)\"\n\
         echo 0 > /sys/devices/system/cpu/cpu3/online; r=$?\n\
         echo \"CHECK off=$r $(cat /sys/devices/system/cpu/online)\"\n\
         echo 1 > /sys/devices/system/cpu/cpu3/online; r=$?\n\
         echo \"CHECK on=$r $(cat /sys/devices/system/cpu/online)\"\n",
    );
    if module {
        s.push_str(&format!(
            "insmod /root/{HOST_MODULE}; echo \"CHECK insmod=$?\"\n\
             echo \"CHECK hypver=$(cat /sys/kernel/s2pin/version)\"\n"
        ));
    }
    s.push_str(
        "echo \"CHECK bad=$(dmesg | grep -cE 'Oops|BUG:|WARNING:|Kernel panic|Unable to handle|Call trace')\"\n",
    );
    if module {
        // Last, because it oopses on purpose: the host reads the hypervisor's
        // image from kernel context, which must take the abort el2 injects
        // (a synchronous external abort: Linux's own fault handling reports
        // it and kills insmod), and el2 must still answer afterwards.
        s.push_str(&format!(
            "insmod /root/{ISOLATION_MODULE} phys={ISOLATION_PHYS:#x}; echo \"CHECK iso_rc=$?\"\n\
             echo \"CHECK iso_sea=$(dmesg | grep -c 'Internal error: synchronous external abort')\"\n\
             echo \"CHECK iso_readable=$(dmesg | grep -c 'READABLE')\"\n\
             echo \"CHECK hypver2=$(cat /sys/kernel/s2pin/version)\"\n"
        ));
    }
    s
}

/// The test module that reads a physical address from kernel context.
pub const ISOLATION_MODULE: &str = "hyp_isolation_test.ko";
/// What it reads: the hypervisor's own image (el2's text, at RAM base + 0x8_0000).
const ISOLATION_PHYS: u64 = el2::layout::HYP_BASE + 0x8_0000;

/// Whether the tree has host modules to build (`host-driver/kmod/`).
fn has_host_modules(root: &Path) -> bool {
    root.join("host-driver/kmod/Kbuild").is_file()
}

/// Builds `host-driver/kmod/` for the kernel in `debian` and returns the
/// initramfs entries `/root/`[`HOST_MODULE`] and, if it was built,
/// `/root/`[`ISOLATION_MODULE`].
pub fn host_modules(root: &Path, debian: &Debian) -> Result<Vec<Extra>, String> {
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
    let host = entry(HOST_MODULE).ok_or_else(|| format!("no {HOST_MODULE} among {kos:?}"))?;
    Ok(std::iter::once(host)
        .chain(entry(ISOLATION_MODULE))
        .collect())
}

/// The value printed after `CHECK <key>=` in the command output.
fn check_value<'a>(output: &'a [String], key: &str) -> Option<&'a str> {
    let prefix = format!("CHECK {key}=");
    output
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
}

/// Runs the boot suite's boots and returns every assertion.
pub fn suite(root: &Path, mode: SuiteMode) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: format!("boot: {name}"),
            ok,
            detail,
        });
    };
    let ing = match ingredients(root, mode == SuiteMode::NoHyp) {
        Ok(i) => i,
        Err(e) => {
            check("build and fetch what a boot needs", false, e);
            return checks;
        }
    };
    let el = match mode {
        SuiteMode::Hyp => "EL1",
        SuiteMode::NoHyp => {
            progress("boot suite in harness-validation mode: Linux directly at EL2, no el2");
            "EL2"
        }
    };
    let machine = RunOptions::default().machine;

    // Boot 1: the main checks from a script, with the host module if the
    // tree has one.
    let mut extras = Vec::new();
    let kmod = has_host_modules(root);
    if kmod {
        match host_modules(root, &ing.debian) {
            Ok(e) => extras = e,
            Err(e) => check("build the host module", false, e),
        }
    }
    let module = !extras.is_empty();
    let mut reached = false;
    progress(&format!(
        "boot 1/4: checks script, {} CPUs, {} MiB",
        machine.smp, machine.mem_mib
    ));
    match script_boot(root, &ing, &machine, &suite_script(module), &extras) {
        Err(e) => check("boot with a checks script", false, e),
        Ok(r) => {
            reached = r.userspace.is_some();
            let tail = r.captured.tail(30);
            let out = &r.output;
            let detail = |what: &str| {
                format!(
                    "{what}\ncommand output:\n{}\nconsole tail:\n{tail}",
                    out.join("\n")
                )
            };
            check(
                "reaches user space",
                r.userspace.is_some(),
                format!(
                    "no user-space marker within {} s\n{tail}",
                    r.timeout.as_secs()
                ),
            );
            if let Some(t) = r.userspace {
                progress(&format!(
                    "user space after {:.2} s (guest uptime {:?} s)",
                    t.as_secs_f64(),
                    r.guest_uptime
                ));
            }
            if mode == SuiteMode::Hyp {
                let banner = r.captured.lines.iter().any(|l| l.starts_with("el2: "));
                check(
                    "el2 prints its `el2: ` lines on the console",
                    banner,
                    tail.clone(),
                );
                // docs/DESIGN.md §8: on the CPUs we boot, nothing a guest
                // reaches is left neither switched nor trapped.
                let covered = r.captured.lines.iter().any(|l| {
                    l.contains("guest registers: every EL1 register is switched or trapped")
                });
                check(
                    "el2 switches or traps every EL1 register a guest can reach on this CPU",
                    covered,
                    tail.clone(),
                );
            }
            let want = format!("CPU: All CPU(s) started at {el}");
            check(
                &format!("kernel says \"{want}\""),
                check_value(out, "el") == Some(want.as_str()),
                detail("dmesg does not say it"),
            );
            check(
                "all CPUs online (0-3)",
                check_value(out, "online") == Some("0-3"),
                detail("/sys/devices/system/cpu/online"),
            );
            check(
                "cpu3 goes offline through sysfs",
                check_value(out, "off") == Some("0 0-2"),
                detail("echo 0 > cpu3/online"),
            );
            check(
                "cpu3 comes back online through sysfs",
                check_value(out, "on") == Some("0 0-3"),
                detail("echo 1 > cpu3/online"),
            );
            // The hypervisor's version through HVC, read by the host module.
            let version_check = "host module gets el2's ABI version through HVC";
            if module {
                check(
                    &format!("host module {HOST_MODULE} loads"),
                    check_value(out, "insmod") == Some("0"),
                    detail("insmod"),
                );
                let want = match mode {
                    SuiteMode::Hyp => abi_version(),
                    // At EL2 the module must see that nobody is there to ask.
                    SuiteMode::NoHyp => "no hypervisor".to_string(),
                };
                check(
                    &format!("{version_check} (/sys/kernel/s2pin/version = {want})"),
                    check_value(out, "hypver") == Some(want.as_str()),
                    detail("/sys/kernel/s2pin/version"),
                );
            } else if !kmod && mode == SuiteMode::Hyp {
                check(
                    version_check,
                    false,
                    "host-driver/kmod does not exist, so nothing asks el2 for its version".into(),
                );
            }
            check(
                "no oops, BUG, WARNING or panic in dmesg",
                check_value(out, "bad") == Some("0"),
                detail("dmesg has kernel errors"),
            );
            if module && mode == SuiteMode::Hyp {
                check(
                    "a host read of hypervisor memory takes an injected external abort",
                    check_value(out, "iso_sea") == Some("1")
                        && check_value(out, "iso_readable") == Some("0")
                        && check_value(out, "iso_rc") != Some("0"),
                    detail("hyp_isolation_test"),
                );
                check(
                    "el2 still answers HVCs after the abort",
                    check_value(out, "hypver2") == Some(abi_version().as_str()),
                    detail("/sys/kernel/s2pin/version after the abort"),
                );
            }
            check(
                "script exits 0 and QEMU powers off with status 0",
                r.status == Some(0)
                    && !r.captured.timed_out
                    && r.captured.status.is_some_and(|s| s.success()),
                format!(
                    "script status {:?}, QEMU status {:?}, timed out {}\n{tail}",
                    r.status, r.captured.status, r.captured.timed_out
                ),
            );
        }
    }

    // Without user space in boot 1 the other boots cannot say more: fail
    // them at once instead of waiting for two more timeouts.
    if !reached {
        check(
            "interactive and NUMA boots",
            false,
            "not run: the first boot did not reach user space".into(),
        );
        return checks;
    }

    // Boot 2: the interactive shell, ended by typing `poweroff`.
    progress("boot 2/4: interactive shell, then `poweroff` typed on the console");
    match prepare(
        root,
        &ing,
        &machine,
        Mode::Interactive,
        &[],
        Console::Captured,
        kernel_cmdline(false, &[]),
    )
    .and_then(|p| interactive_poweroff(&p))
    {
        Err(e) => check("interactive boot", false, e),
        Ok((ready, c)) => {
            let tail = c.tail(30);
            check(
                "interactive shell starts on the console",
                ready,
                tail.clone(),
            );
            check(
                "`poweroff` in the shell ends QEMU with status 0",
                ready && !c.timed_out && c.status.is_some_and(|s| s.success()),
                format!(
                    "QEMU status {:?}, timed out {}\n{tail}",
                    c.status, c.timed_out
                ),
            );
            check(
                "the kernel powers down (\"reboot: Power down\")",
                c.lines.iter().any(|l| l.contains("reboot: Power down")),
                tail,
            );
        }
    }

    // Boot 3: two NUMA nodes.
    progress("boot 3/4: --smp 2 --numa 2");
    let numa = Machine {
        smp: 2,
        numa_nodes: 2,
        ..machine.clone()
    };
    match script_boot(
        root,
        &ing,
        &numa,
        "echo \"CHECK nodes=$(cat /sys/devices/system/node/online)\"\n\
         echo \"CHECK balancing=$(cat /proc/sys/kernel/numa_balancing)\"\n",
        &[],
    ) {
        Err(e) => check("NUMA boot", false, e),
        Ok(r) => {
            let detail = format!(
                "output:\n{}\nconsole tail:\n{}",
                r.output.join("\n"),
                r.captured.tail(30)
            );
            check(
                "two NUMA nodes online (0-1)",
                check_value(&r.output, "nodes") == Some("0-1"),
                detail.clone(),
            );
            check(
                "automatic NUMA balancing is on",
                check_value(&r.output, "balancing") == Some("1"),
                detail,
            );
        }
    }

    // Boot 4: plain `-cpu max` (QARMA5 pointer authentication, about 3x
    // slower under TCG): the host's pointer-auth keys must work at EL1 too.
    progress("boot 4/4: --cpu max");
    let plain_max = Machine {
        cpu: "max".into(),
        ..machine.clone()
    };
    match script_boot(
        root,
        &ing,
        &plain_max,
        "echo \"CHECK el=$(dmesg | grep -o 'CPU: All CPU(s) started at EL[0-9]')\"\n\
         echo \"CHECK online=$(cat /sys/devices/system/cpu/online)\"\n",
        &[],
    ) {
        Err(e) => check("plain -cpu max boot", false, e),
        Ok(r) => {
            let want = format!("CPU: All CPU(s) started at {el}");
            check(
                &format!("with plain -cpu max: \"{want}\", CPUs 0-3 online"),
                check_value(&r.output, "el") == Some(want.as_str())
                    && check_value(&r.output, "online") == Some("0-3"),
                format!(
                    "output:\n{}\nconsole tail:\n{}",
                    r.output.join("\n"),
                    r.captured.tail(30)
                ),
            );
        }
    }
    checks
}

/// Boots with a quiet `--exec`-style `script`, its output captured (not
/// printed), under [`SUITE_BOOT_TIMEOUT`].
fn script_boot(
    root: &Path,
    ing: &Ingredients,
    machine: &Machine,
    script: &str,
    extras: &[Extra],
) -> Result<ExecRun, String> {
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
        kernel_cmdline(false, &[]),
    )?;
    exec_with(&p, SUITE_BOOT_TIMEOUT, false, false)
}

/// Boots to the interactive shell, waits for its ready line, types
/// `poweroff`, and returns whether the shell came up plus the console.
fn interactive_poweroff(p: &Prepared) -> Result<(bool, qemu::Captured), String> {
    let args = p.launch.args().map_err(|e| e.to_string())?;
    let ready_mark = p.markers.shell_ready();
    let mut ready = false;
    let mut watch = |line: &str, _: Duration, input: &mut dyn Write| {
        if !ready && line.trim() == ready_mark {
            ready = true;
            // The tty is open and buffers input until the shell reads it.
            let _ = input.write_all(b"echo typed-$((6*7))\npoweroff\n");
        }
    };
    let c = qemu::run_captured(&args, SUITE_BOOT_TIMEOUT, &mut watch)?;
    let echoed = c.lines.iter().any(|l| l.trim() == "typed-42");
    Ok((ready && echoed, c))
}

/// Start marker of the boot section in `docs/PERFORMANCE.md`.
pub const BENCH_BEGIN: &str = "<!-- bench:boot:begin -->";
/// End marker of the boot section.
pub const BENCH_END: &str = "<!-- bench:boot:end -->";

/// Runs per configuration in `bench boot`.
pub const BENCH_RUNS: usize = 3;

/// One measured boot.
#[derive(Debug, Clone, Copy)]
pub struct BootTime {
    /// Host wall clock from QEMU's start to the user-space marker.
    pub wall: Duration,
    /// Guest uptime at the marker (seconds).
    pub guest: Option<f64>,
}

/// Boots `runs` times to user space and measures each.
fn measure(root: &Path, ing: &Ingredients, runs: usize) -> Result<Vec<BootTime>, String> {
    let machine = RunOptions::default().machine;
    let mut out = Vec::new();
    for i in 0..runs {
        let r = script_boot(root, ing, &machine, "true\n", &[])?;
        r.finish()?;
        let wall = r
            .userspace
            .ok_or_else(|| format!("no user-space marker in run {}", i + 1))?;
        progress(&format!(
            "run {}/{runs}: user space after {:.2} s (guest uptime {})",
            i + 1,
            wall.as_secs_f64(),
            r.guest_uptime.map_or("?".into(), |g| format!("{g:.2} s"))
        ));
        out.push(BootTime {
            wall,
            guest: r.guest_uptime,
        });
    }
    Ok(out)
}

// Called from main.rs's `bench` dispatch (`bench boot`).
/// `cargo xtask bench boot [--no-hyp]`: boot to user space with and without
/// el2, [`BENCH_RUNS`] runs each, and write the ratio into
/// `docs/PERFORMANCE.md`. `--no-hyp` measures only the direct boot and writes
/// nothing (to check the harness before el2 boots).
pub fn bench(root: &Path, args: &[String]) -> Result<(), String> {
    let only_direct = match args {
        [] => false,
        [a] if a == "--no-hyp" => true,
        _ => {
            return Err(format!(
                "usage: cargo xtask bench boot [--no-hyp] (got {args:?})"
            ))
        }
    };
    let direct_ing = ingredients(root, true)?;
    let hyp_ing = if only_direct {
        None
    } else {
        Some(ingredients(root, false)?)
    };
    progress(&format!("direct boot (Linux at EL2), {BENCH_RUNS} runs"));
    let direct = measure(root, &direct_ing, BENCH_RUNS)?;
    let Some(hyp_ing) = hyp_ing else {
        println!("direct: mean {:.2} s", mean(&direct));
        println!("(--no-hyp: docs/PERFORMANCE.md not written; it needs both boots)");
        return Ok(());
    };
    progress(&format!("boot under el2 (Linux at EL1), {BENCH_RUNS} runs"));
    let hyp = measure(root, &hyp_ing, BENCH_RUNS)?;
    let body = render_bench(&direct, &hyp, &direct_ing.debian.describe());
    println!("{body}");
    let doc = root.join("docs").join("PERFORMANCE.md");
    let existing = std::fs::read_to_string(&doc).ok();
    let new = splice(existing.as_deref(), &body)?;
    std::fs::write(&doc, new).map_err(|e| format!("{}: {e}", doc.display()))?;
    progress(&format!("wrote {}", doc.display()));
    Ok(())
}

fn mean(v: &[BootTime]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().map(|b| b.wall.as_secs_f64()).sum::<f64>() / v.len() as f64
}

/// The Markdown section for `docs/PERFORMANCE.md`.
pub fn render_bench(direct: &[BootTime], hyp: &[BootTime], what: &str) -> String {
    let row = |name: &str, v: &[BootTime]| {
        let walls: Vec<String> = v
            .iter()
            .map(|b| format!("{:.2}", b.wall.as_secs_f64()))
            .collect();
        let guests: Vec<String> = v
            .iter()
            .map(|b| b.guest.map_or("?".into(), |g| format!("{g:.2}")))
            .collect();
        format!(
            "| {name} | {} | {:.2} | {} |\n",
            walls.join(", "),
            mean(v),
            guests.join(", ")
        )
    };
    let ratio = mean(hyp) / mean(direct);
    format!(
        "## Boot to user space (`cargo xtask bench boot`)\n\n\
         QEMU TCG, `-M virt,virtualization=on,gic-version=3 -cpu {} -smp 4 -m 2G`, {what}.\n\
         Time from QEMU's start to the first line printed by `/init` (host wall clock, seconds);\n\
         guest uptime at that line in the last column.\n\n\
         | boot | runs (s) | mean (s) | guest uptime (s) |\n|---|---|---|---|\n{}{}\n\
         Ratio el2 / direct: **{ratio:.2}** (target <= 1.10).\n\n\
         The two boots do not do the same work: booted at EL2, Linux initialises KVM\n\
         (`kvm [1]: ...`), while under el2 it finds no HYP mode and skips that, which is why\n\
         the hypervisor's boot can come out faster. Wall-clock time under TCG on a shared\n\
         2-core machine is noisy (runs differ by ~30%); treat the ratio as \"no measurable\n\
         slowdown\", not as a hardware figure.\n",
        qemu::DEFAULT_CPU,
        row("direct at EL2 (`--no-hyp`)", direct),
        row("under el2 (host at EL1)", hyp),
    )
}

/// The document with the boot section replaced (or appended).
pub fn splice(existing: Option<&str>, body: &str) -> Result<String, String> {
    let section = format!("{BENCH_BEGIN}\n{}\n{BENCH_END}", body.trim_end());
    let Some(doc) = existing else {
        return Ok(format!("# Performance\n\n{section}\n"));
    };
    match (doc.find(BENCH_BEGIN), doc.find(BENCH_END)) {
        (Some(b), Some(e)) if b < e => Ok(format!(
            "{}{section}{}",
            &doc[..b],
            &doc[e + BENCH_END.len()..]
        )),
        (None, None) => {
            let sep = if doc.ends_with('\n') { "\n" } else { "\n\n" };
            Ok(format!("{doc}{sep}{section}\n"))
        }
        _ => Err(format!(
            "docs/PERFORMANCE.md has a broken boot section: `{BENCH_BEGIN}` and `{BENCH_END}` \
             must both appear, in that order"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn defaults_match_the_issue() {
        let o = parse_run(&[]).unwrap();
        assert_eq!(o.machine.smp, 4);
        assert_eq!(o.machine.mem_mib, 2048);
        assert_eq!(o.machine.numa_nodes, 1);
        assert_eq!(o.machine.cpu, "max,pauth-impdef=on");
        assert!(!o.no_hyp && o.exec.is_none() && o.timeout.is_none());
    }

    #[test]
    fn options_parse() {
        let o = parse_run(&args(&[
            "--exec",
            "uname -a; exit 3",
            "--smp=2",
            "--mem",
            "1536M",
            "--numa",
            "2",
            "--cpu",
            "cortex-a57",
            "--add",
            "/tmp/x.ko",
            "--add=/tmp/y:/opt/y",
            "--no-hyp",
            "--timeout",
            "30",
            "--verbose",
            "--append",
            "nokaslr",
        ]))
        .unwrap();
        assert_eq!(o.exec.as_deref(), Some("uname -a; exit 3"));
        assert_eq!(
            o.machine,
            Machine {
                smp: 2,
                mem_mib: 1536,
                numa_nodes: 2,
                cpu: "cortex-a57".into()
            }
        );
        assert_eq!(o.add[0].dest, "/root/x.ko");
        assert_eq!(o.add[1].source, PathBuf::from("/tmp/y"));
        assert_eq!(o.add[1].dest, "/opt/y");
        assert!(o.no_hyp && o.verbose);
        assert_eq!(o.timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.append, ["nokaslr"]);
    }

    #[test]
    fn bad_options_are_typed_errors() {
        assert_eq!(
            parse_run(&args(&["--bogus"])),
            Err(OptError::Unknown("--bogus".into()))
        );
        assert_eq!(
            parse_run(&args(&["--exec"])),
            Err(OptError::MissingValue("--exec"))
        );
        for bad_args in [
            &["--smp", "0"][..],
            &["--smp", "x"],
            &["--mem", "2X"],
            &["--mem", "0"],
            &["--numa", "3"],
            &["--timeout", "0"],
            &["--cpu", ""],
            &["--add", ""],
            &["--add", "f:/a/../b"],
            &["--no-hyp=1"],
            &["--smp", "65"],
            &["--smp=-1"],
            &["--mem", "99999999999999999999T"],
        ] {
            assert!(parse_run(&args(bad_args)).is_err(), "{bad_args:?}");
        }
        // The messages name the option, the value and what is expected.
        let msg = |a: &[&str]| parse_run(&args(a)).unwrap_err().to_string();
        assert_eq!(
            msg(&["--smp", "abc"]),
            "--smp `abc`: expected a CPU count from 1 to 64"
        );
        assert_eq!(
            msg(&["--mem=1X"]),
            "--mem `1X`: expected a size like 2G or 1536M"
        );
        assert!(msg(&["--bogus"]).starts_with("unknown option `--bogus`\n\nusage:"));
    }

    #[test]
    fn help_lists_every_option() {
        for opt in [
            "--exec",
            "--smp",
            "--mem",
            "--numa",
            "--cpu",
            "--add",
            "--no-hyp",
            "--timeout",
            "--append",
            "--verbose",
            "-v,",
            "--help",
        ] {
            assert!(RUN_USAGE.contains(opt), "{opt}");
        }
        assert!(RUN_USAGE.contains(&format!("/root/{HOST_MODULE}")));
        assert!(RUN_USAGE.contains(&format!("/root/{ISOLATION_MODULE}")));
        assert!(RUN_USAGE.contains(&format!("default {}", qemu::DEFAULT_CPU)));
        assert!(RUN_USAGE.contains(&format!(
            "default {} with --exec",
            DEFAULT_EXEC_TIMEOUT.as_secs()
        )));
        assert!(RUN_USAGE.contains(&format!("{USAGE_EXIT} for a bad command line")));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem_mib("2G"), Some(2048));
        assert_eq!(parse_mem_mib("2g"), Some(2048));
        assert_eq!(parse_mem_mib("1536"), Some(1536));
        assert_eq!(parse_mem_mib("512MiB"), Some(512));
        assert_eq!(parse_mem_mib("G"), None);
        assert_eq!(parse_mem_mib("-1G"), None);
        assert_eq!(parse_mem_mib("99999999999999999999G"), None);
    }

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
        let e = build_el2(&dir).unwrap_err();
        assert!(e.contains("el2") && e.contains("--no-hyp"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_values_are_found() {
        let out = args(&["noise", "CHECK online=0-3", " CHECK off=0 0-2 "]);
        assert_eq!(check_value(&out, "online"), Some("0-3"));
        assert_eq!(check_value(&out, "off"), Some("0 0-2"));
        assert_eq!(check_value(&out, "on"), None);
        assert!(suite_script(true).contains("insmod /root/s2pin.ko"));
        assert!(!suite_script(false).contains("insmod"));
    }

    /// Manual harness check of `bench boot` without el2 (boots QEMU 3 times):
    /// `cargo test -p xtask -- --ignored bench_boot_direct`.
    #[test]
    #[ignore = "boots QEMU"]
    fn bench_boot_direct() {
        bench(&crate::util::workspace_root(), &["--no-hyp".into()]).unwrap();
    }

    #[test]
    fn bench_section_is_spliced() {
        let t = |s: f64| BootTime {
            wall: Duration::from_secs_f64(s),
            guest: Some(s - 1.0),
        };
        let body = render_bench(&[t(4.0), t(5.0), t(6.0)], &[t(6.0), t(7.5), t(9.0)], "k");
        assert!(body.contains("**1.50**"), "{body}");
        assert!(body.contains("| 4.00, 5.00, 6.00 | 5.00 |"));
        let doc = splice(None, &body).unwrap();
        assert!(doc.contains(BENCH_BEGIN) && doc.contains(BENCH_END));
        let other = "# P\n\n<!-- bench:stage2:begin -->\nx\n<!-- bench:stage2:end -->\n";
        let added = splice(Some(other), "new").unwrap();
        assert!(added.starts_with(other) && added.contains("new"));
        let replaced = splice(Some(&added), "newer").unwrap();
        assert!(replaced.contains("newer") && !replaced.contains("\nnew\n"));
        assert!(replaced.starts_with(other));
        assert!(splice(Some(BENCH_END), "x").is_err());
    }
}
