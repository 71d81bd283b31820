//! The QEMU command line, and running QEMU as a child process: either on the
//! user's terminal, or with its console captured line by line under a hard
//! timeout (the child is killed when it expires, so a hang fails and never
//! stalls).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wait_timeout::ChildExt;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-aarch64";

/// Where QEMU's loader device puts the host kernel in the hypervisor boot.
pub use boot_contract::HOST_KERNEL_ADDR;

/// The smallest memory size of the hypervisor boot (boot contract).
pub const MIN_HYP_MEM_MIB: u64 = boot_contract::MIN_RAM >> 20;

/// The largest memory size el2 boots with (boot contract): el2's memory,
/// sized from RAM, and the host's device tree must end below QEMU's initrd.
pub const MAX_HYP_MEM_MIB: u64 = boot_contract::MAX_RAM >> 20;

/// The CPU model unless `--cpu` says otherwise (3x faster than plain `max`).
pub const DEFAULT_CPU: &str = "max,pauth-impdef=on";

/// What the machine looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Number of CPUs.
    pub smp: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// 1, or 2 for two NUMA nodes (CPUs and memory split in halves).
    pub numa_nodes: u32,
    /// `-cpu` argument.
    pub cpu: String,
}

impl Default for Machine {
    /// `-smp 4 -m 2G`, one node, [`DEFAULT_CPU`]: `cargo xtask run`'s
    /// defaults and the suites' machine.
    fn default() -> Self {
        Self {
            smp: 4,
            mem_mib: 2048,
            numa_nodes: 1,
            cpu: DEFAULT_CPU.to_string(),
        }
    }
}

/// What QEMU loads and enters at EL2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// el2's raw image as `-kernel`, the host kernel through the loader
    /// device at [`HOST_KERNEL_ADDR`].
    Hyp {
        /// `build/el2.bin`.
        el2: PathBuf,
        /// The host kernel `Image`.
        host_kernel: PathBuf,
    },
    /// The kernel entered directly at EL2 (`--no-hyp`).
    Direct {
        /// The kernel `Image`.
        kernel: PathBuf,
    },
}

/// How the console is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// `-nographic`: serial and monitor multiplexed on the terminal
    /// (Ctrl-A x quits).
    Terminal,
    /// `-serial stdio` with no monitor, for capture.
    Captured,
}

/// Something QEMU's generic loader device puts into guest RAM before the
/// CPUs start (`-device loader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// A file's raw bytes at `addr`.
    File {
        /// The file.
        path: PathBuf,
        /// Guest physical address.
        addr: u64,
    },
    /// One little-endian 64-bit word at `addr`.
    Word {
        /// The value.
        value: u64,
        /// Guest physical address.
        addr: u64,
    },
}

/// A complete QEMU invocation, built step by step: every boot of every
/// command, suite and benchmark is one of these (docs/BUILD.md, "QEMU").
///
/// ```ignore
/// let run = Launch::new(Machine::default(), Boot::Hyp { el2, host_kernel })
///     .initrd(&initrd)
///     .append("console=ttyAMA0 panic=-1 quiet")
///     .run_captured(Duration::from_secs(120), &mut quiet())?;
/// ```
#[derive(Debug, Clone)]
pub struct Launch {
    machine: Machine,
    boot: Boot,
    initrd: Option<PathBuf>,
    append: Option<String>,
    console: Console,
    loads: Vec<Load>,
    icount: bool,
}

/// A machine or boot QEMU cannot run the way the boot contract needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// The hypervisor boot needs at least [`MIN_HYP_MEM_MIB`].
    MemTooSmall(u64),
    /// The hypervisor boot takes at most [`MAX_HYP_MEM_MIB`].
    MemTooLarge(u64),
    /// Two NUMA nodes need at least two CPUs.
    NumaNeedsTwoCpus,
    /// Only 1 or 2 NUMA nodes are supported.
    NumaNodes(u32),
    /// No CPUs.
    NoCpus,
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MemTooSmall(m) => write!(
                f,
                "--mem {m}M is too small for the hypervisor boot: the host kernel is loaded at \
                 {HOST_KERNEL_ADDR:#x}, so at least {MIN_HYP_MEM_MIB}M is needed"
            ),
            Self::MemTooLarge(m) => write!(
                f,
                "--mem {m}M is too large for the hypervisor boot: el2's memory for that much RAM \
                 ({} MiB: page tracker and host stage-2 tables) and the host's device tree must \
                 end below QEMU's initrd at RAM base + {} MiB, which holds up to \
                 {MAX_HYP_MEM_MIB}M (use --no-hyp for more)",
                boot_contract::hyp_size(m.saturating_mul(1 << 20)) >> 20,
                (boot_contract::QEMU_INITRD_ADDR - boot_contract::RAM_BASE) >> 20
            ),
            Self::NumaNeedsTwoCpus => write!(f, "--numa 2 needs --smp 2 or more"),
            Self::NumaNodes(n) => write!(f, "--numa {n}: only 1 or 2 nodes are supported"),
            Self::NoCpus => write!(f, "--smp 0: at least one CPU is needed"),
        }
    }
}

impl Machine {
    /// Whether QEMU can run this machine for the hypervisor boot (`hyp`) or
    /// the direct one.
    pub fn check(&self, hyp: bool) -> Result<(), LaunchError> {
        if self.smp == 0 {
            return Err(LaunchError::NoCpus);
        }
        if hyp && self.mem_mib < MIN_HYP_MEM_MIB {
            return Err(LaunchError::MemTooSmall(self.mem_mib));
        }
        if hyp && self.mem_mib > MAX_HYP_MEM_MIB {
            return Err(LaunchError::MemTooLarge(self.mem_mib));
        }
        match self.numa_nodes {
            1 => Ok(()),
            2 if self.smp < 2 => Err(LaunchError::NumaNeedsTwoCpus),
            2 => Ok(()),
            n => Err(LaunchError::NumaNodes(n)),
        }
    }
}

/// `0-1`, or `3` for a single CPU.
fn cpu_range(first: u32, last: u32) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

impl Launch {
    /// `machine` booting `boot`, console captured, nothing else loaded.
    pub fn new(machine: Machine, boot: Boot) -> Self {
        Self {
            machine,
            boot,
            initrd: None,
            append: None,
            console: Console::Captured,
            loads: Vec::new(),
            icount: false,
        }
    }

    /// The initramfs (`-initrd`).
    #[must_use]
    pub fn initrd(mut self, path: &Path) -> Self {
        self.initrd = Some(path.to_path_buf());
        self
    }

    /// The kernel command line (`-append`).
    #[must_use]
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = Some(cmdline.to_string());
        self
    }

    /// How the console is connected (default [`Console::Captured`]).
    #[must_use]
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Another file put into RAM at `addr` by the loader device.
    #[must_use]
    pub fn load_file(mut self, path: &Path, addr: u64) -> Self {
        self.loads.push(Load::File {
            path: path.to_path_buf(),
            addr,
        });
        self
    }

    /// A 64-bit word put into RAM at `addr` by the loader device.
    #[must_use]
    pub fn load_word(mut self, value: u64, addr: u64) -> Self {
        self.loads.push(Load::Word { value, addr });
        self
    }

    /// `-icount shift=0`: the virtual clock advances 1 ns per instruction.
    /// It needs single-threaded TCG, so `-accel tcg` replaces
    /// `tcg,thread=multi`.
    #[must_use]
    pub fn icount(mut self) -> Self {
        self.icount = true;
        self
    }

    /// Only `n` CPUs (`-smp n`).
    #[must_use]
    pub fn smp(mut self, n: u32) -> Self {
        self.machine.smp = n;
        self
    }

    /// The arguments after the program name.
    pub fn args(&self) -> Result<Vec<String>, LaunchError> {
        let m = &self.machine;
        m.check(matches!(self.boot, Boot::Hyp { .. }))?;
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-M", "virt,virtualization=on,gic-version=3"]);
        push(&["-cpu", &m.cpu]);
        push(&["-smp", &m.smp.to_string()]);
        push(&["-m", &format!("{}M", m.mem_mib)]);
        if self.icount {
            push(&["-accel", "tcg", "-icount", "shift=0"]);
        } else {
            push(&["-accel", "tcg,thread=multi"]);
        }
        // Machine::check allowed only 1 or 2 nodes.
        if m.numa_nodes == 2 {
            let m0 = m.mem_mib / 2;
            let m1 = m.mem_mib - m0;
            let half = m.smp / 2;
            push(&["-object", &format!("memory-backend-ram,id=m0,size={m0}M")]);
            push(&["-object", &format!("memory-backend-ram,id=m1,size={m1}M")]);
            push(&[
                "-numa",
                &format!("node,nodeid=0,cpus={},memdev=m0", cpu_range(0, half - 1)),
            ]);
            push(&[
                "-numa",
                &format!(
                    "node,nodeid=1,cpus={},memdev=m1",
                    cpu_range(half, m.smp - 1)
                ),
            ]);
        }
        match self.console {
            Console::Terminal => push(&["-nographic"]),
            Console::Captured => {
                push(&["-display", "none", "-monitor", "none", "-serial", "stdio"])
            }
        }
        // A panic reboots at once (panic=-1) and -no-reboot turns that into an
        // exit. No network: the default NIC needs an option ROM from a
        // package apt only recommends.
        push(&["-no-reboot", "-nic", "none"]);
        match &self.boot {
            Boot::Hyp { el2, host_kernel } => {
                push(&["-kernel", &el2.display().to_string()]);
                push(&[
                    "-device",
                    &format!(
                        "loader,file={},addr={HOST_KERNEL_ADDR:#x},force-raw=on",
                        host_kernel.display()
                    ),
                ]);
            }
            Boot::Direct { kernel } => push(&["-kernel", &kernel.display().to_string()]),
        }
        for load in &self.loads {
            let dev = match load {
                Load::File { path, addr } => {
                    format!("loader,file={},addr={addr:#x},force-raw=on", path.display())
                }
                Load::Word { value, addr } => {
                    format!("loader,data={value:#x},data-len=8,addr={addr:#x}")
                }
            };
            push(&["-device", &dev]);
        }
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        if let Some(append) = &self.append {
            push(&["-append", append]);
        }
        Ok(a)
    }

    /// The whole command as one shell-like line, for logs.
    pub fn command_line(&self) -> Result<String, LaunchError> {
        let mut s = String::from(QEMU);
        for a in self.args()? {
            s.push(' ');
            if a.contains(' ') {
                s.push('\'');
                s.push_str(&a);
                s.push('\'');
            } else {
                s.push_str(&a);
            }
        }
        Ok(s)
    }

    /// Runs QEMU on the user's terminal until it exits, or kills it after
    /// `timeout`; `None` means it was killed.
    pub fn run_terminal(&self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        let args = self.args()?;
        let mut child = Command::new(QEMU)
            .args(&args)
            .spawn()
            .with_context(|| format!("cannot run {QEMU}"))?;
        match timeout {
            None => child
                .wait()
                .map(Some)
                .with_context(|| format!("waiting for {QEMU}")),
            Some(t) => Ok(wait_or_kill(&mut child, t)),
        }
    }

    /// Runs QEMU with the console captured, handing each line to `watch`,
    /// and kills it if it has not exited after `timeout`.
    pub fn run_captured(&self, timeout: Duration, watch: &mut dyn Watcher) -> Result<Captured> {
        run_captured(&self.args()?, timeout, watch)
    }
}

impl std::error::Error for LaunchError {}

/// A [`Watcher`] that ignores every line.
pub fn quiet() -> impl Watcher {
    |_: &str, _: Duration, _: &mut dyn Write| {}
}

/// What a captured run produced.
#[derive(Debug)]
pub struct Captured {
    /// Every console line, `\r` removed, in order.
    pub lines: Vec<String>,
    /// QEMU's own stderr.
    pub stderr: String,
    /// QEMU's exit status; `None` if it was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Whether the timeout expired.
    pub timed_out: bool,
    /// Time from spawn to exit (or kill).
    pub elapsed: Duration,
}

impl Captured {
    /// The last `n` console lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        crate::util::last_lines(&self.lines, n)
    }
}

/// A console line as it arrives, with the time since spawn.
pub trait Watcher {
    /// Called for every complete line; may write to QEMU's stdin (the guest
    /// console input).
    fn line(&mut self, line: &str, at: Duration, input: &mut dyn Write);
}

impl<F: FnMut(&str, Duration, &mut dyn Write)> Watcher for F {
    fn line(&mut self, line: &str, at: Duration, input: &mut dyn Write) {
        self(line, at, input)
    }
}

enum Event {
    Out(Vec<u8>),
    OutEnd,
    Err(Vec<u8>),
}

/// Runs QEMU with `args` and the console captured (see
/// [`Launch::run_captured`]).
fn run_captured(args: &[String], timeout: Duration, watch: &mut dyn Watcher) -> Result<Captured> {
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {QEMU}"))?;
    let (tx, rx) = mpsc::channel();
    let readers = spawn_readers(&mut child, tx);
    let mut stdin: Box<dyn Write> = match child.stdin.take() {
        Some(s) => Box::new(StdinOrNothing(Some(s))),
        None => Box::new(std::io::sink()),
    };
    let deadline = start + timeout;
    let mut lines = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut stderr = Vec::new();
    let mut timed_out = false;
    let mut out_open = true;
    while out_open {
        let now = Instant::now();
        let Some(left) = deadline.checked_duration_since(now) else {
            timed_out = true;
            break;
        };
        match rx.recv_timeout(left) {
            Ok(Event::Out(chunk)) => {
                partial.extend_from_slice(&chunk);
                while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
                    let raw: Vec<u8> = partial.drain(..=pos).collect();
                    let line = clean_line(&raw);
                    watch.line(&line, start.elapsed(), &mut *stdin);
                    lines.push(line);
                }
            }
            Ok(Event::Err(chunk)) => stderr.extend_from_slice(&chunk),
            Ok(Event::OutEnd) => out_open = false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => out_open = false,
        }
    }
    if !partial.is_empty() {
        let line = clean_line(&partial);
        watch.line(&line, start.elapsed(), &mut *stdin);
        lines.push(line);
    }
    drop(stdin);
    let status = if timed_out {
        kill(&mut child);
        None
    } else {
        // stdout closed: QEMU is exiting; still bound the wait.
        let left = deadline.saturating_duration_since(Instant::now());
        wait_or_kill(&mut child, left.max(Duration::from_secs(5)))
    };
    let timed_out = timed_out || status.is_none();
    let elapsed = start.elapsed();
    for r in readers {
        let _ = r.join();
    }
    while let Ok(ev) = rx.try_recv() {
        if let Event::Err(chunk) = ev {
            stderr.extend_from_slice(&chunk);
        }
    }
    Ok(Captured {
        lines,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        status,
        timed_out,
        elapsed,
    })
}

/// Writes to QEMU's stdin; once QEMU is gone, writes are dropped.
struct StdinOrNothing(Option<ChildStdin>);

impl Write for StdinOrNothing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(s) = &mut self.0 {
            if s.write_all(buf).and_then(|()| s.flush()).is_err() {
                self.0 = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn spawn_readers(child: &mut Child, tx: mpsc::Sender<Event>) -> Vec<thread::JoinHandle<()>> {
    let mut handles = Vec::new();
    if let Some(out) = child.stdout.take() {
        handles.push(pump(out, tx.clone(), Event::Out, Some(Event::OutEnd)));
    }
    if let Some(err) = child.stderr.take() {
        handles.push(pump(err, tx, Event::Err, None));
    }
    handles
}

/// A thread that sends what `from` yields as `chunk` events until it ends
/// (or the receiver is gone), then `end` if there is one.
fn pump(
    mut from: impl Read + Send + 'static,
    tx: mpsc::Sender<Event>,
    chunk: fn(Vec<u8>) -> Event,
    end: Option<Event>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(chunk(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
        if let Some(end) = end {
            let _ = tx.send(end);
        }
    })
}

/// Kills the child and reaps it.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for the child for at most `timeout`; kills it after that.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    match child.wait_timeout(timeout) {
        Ok(Some(st)) => Some(st),
        _ => {
            kill(child);
            None
        }
    }
}

/// A console line without the `\r` of the serial line discipline and the
/// trailing newline, invalid UTF-8 replaced.
fn clean_line(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    s.trim_end_matches(['\n', '\r']).replace('\r', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(boot: Boot, numa: u32, smp: u32, mem: u64) -> Launch {
        let machine = Machine {
            smp,
            mem_mib: mem,
            numa_nodes: numa,
            cpu: DEFAULT_CPU.into(),
        };
        Launch::new(machine, boot)
            .initrd(Path::new("/b/initrd"))
            .append("console=ttyAMA0 quiet")
    }

    fn hyp() -> Boot {
        Boot::Hyp {
            el2: "/b/el2.bin".into(),
            host_kernel: "/b/Image".into(),
        }
    }

    #[test]
    fn hyp_boot_loads_the_host_kernel_at_the_contract_address() {
        let a = launch(hyp(), 1, 4, 2048).args().unwrap();
        let j = a.join(" ");
        assert!(j.contains("-M virt,virtualization=on,gic-version=3"));
        assert!(j.contains("-cpu max,pauth-impdef=on -smp 4 -m 2048M"));
        assert!(j.contains("-kernel /b/el2.bin"));
        assert!(j.contains("-device loader,file=/b/Image,addr=0x70000000,force-raw=on"));
        assert!(j.contains("-initrd /b/initrd"));
        let pos = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[pos + 1], "console=ttyAMA0 quiet");
        assert!(!j.contains("-numa"));
        assert!(j.contains("-no-reboot -nic none"));
    }

    #[test]
    fn direct_boot_differs_only_in_what_is_loaded() {
        let d = launch(
            Boot::Direct {
                kernel: "/b/Image".into(),
            },
            1,
            4,
            2048,
        )
        .args()
        .unwrap();
        assert!(d.join(" ").contains("-kernel /b/Image"));
        assert!(!d.iter().any(|x| x.starts_with("loader")));
        let h = launch(hyp(), 1, 4, 2048).args().unwrap();
        assert_eq!(d.len() + 2, h.len());
    }

    #[test]
    fn numa_splits_cpus_and_memory() {
        let j = launch(hyp(), 2, 4, 2048).args().unwrap().join(" ");
        assert!(j.contains("memory-backend-ram,id=m0,size=1024M"));
        assert!(j.contains("memory-backend-ram,id=m1,size=1024M"));
        assert!(j.contains("node,nodeid=0,cpus=0-1,memdev=m0"));
        assert!(j.contains("node,nodeid=1,cpus=2-3,memdev=m1"));
        let j = launch(hyp(), 2, 3, 1025).args().unwrap().join(" ");
        assert!(j.contains("size=512M") && j.contains("size=513M"));
        assert!(j.contains("cpus=0,memdev=m0") && j.contains("cpus=1-2,memdev=m1"));
    }

    #[test]
    fn bad_machines_are_refused() {
        assert_eq!(
            launch(hyp(), 1, 4, 512).args(),
            Err(LaunchError::MemTooSmall(512))
        );
        let direct = Boot::Direct {
            kernel: "/k".into(),
        };
        assert!(launch(direct, 1, 1, 512).args().is_ok());
        assert_eq!(
            launch(hyp(), 2, 1, 2048).args(),
            Err(LaunchError::NumaNeedsTwoCpus)
        );
        assert_eq!(
            launch(hyp(), 3, 4, 2048).args(),
            Err(LaunchError::NumaNodes(3))
        );
        assert_eq!(launch(hyp(), 1, 0, 2048).args(), Err(LaunchError::NoCpus));
    }

    #[test]
    fn machines_are_checked_before_launch() {
        let m = |smp, mem_mib, numa_nodes| Machine {
            smp,
            mem_mib,
            numa_nodes,
            cpu: DEFAULT_CPU.into(),
        };
        assert_eq!(m(4, 2048, 1).check(true), Ok(()));
        assert_eq!(m(2, 1024, 2).check(true), Ok(()));
        assert_eq!(m(0, 2048, 1).check(false), Err(LaunchError::NoCpus));
        assert_eq!(m(1, 512, 1).check(true), Err(LaunchError::MemTooSmall(512)));
        assert_eq!(m(1, 512, 1).check(false), Ok(()));
        assert_eq!(m(4, 4096, 1).check(true), Ok(()));
        assert_eq!(m(4, MAX_HYP_MEM_MIB, 1).check(true), Ok(()));
        let over = MAX_HYP_MEM_MIB + 1024;
        assert_eq!(
            m(4, over, 1).check(true),
            Err(LaunchError::MemTooLarge(over))
        );
        assert_eq!(m(4, over, 1).check(false), Ok(()));
        let msg = LaunchError::MemTooLarge(over).to_string();
        assert!(
            msg.contains("below QEMU's initrd at RAM base + 128 MiB"),
            "{msg}"
        );
        assert_eq!(
            m(1, 2048, 2).check(false),
            Err(LaunchError::NumaNeedsTwoCpus)
        );
        assert_eq!(m(4, 2048, 0).check(true), Err(LaunchError::NumaNodes(0)));
    }

    #[test]
    fn console_modes() {
        let l = launch(hyp(), 1, 1, 1024);
        assert!(l.args().unwrap().join(" ").contains("-serial stdio"));
        let a = l.console(Console::Terminal).args().unwrap();
        assert!(a.contains(&"-nographic".to_string()));
        assert!(!a.contains(&"stdio".to_string()));
    }

    #[test]
    fn loads_and_icount() {
        let a = launch(hyp(), 1, 1, 2048)
            .load_file(Path::new("/b/guest.bin"), 0x6000_0000)
            .load_word(0x1122, 0x5fff_f000)
            .icount()
            .args()
            .unwrap()
            .join(" ");
        assert!(a.contains("-device loader,file=/b/guest.bin,addr=0x60000000,force-raw=on"));
        assert!(a.contains("-device loader,data=0x1122,data-len=8,addr=0x5ffff000"));
        assert!(a.contains("-accel tcg -icount shift=0") && !a.contains("thread=multi"));
        let plain = Launch::new(Machine::default(), hyp()).args().unwrap();
        assert!(!plain.iter().any(|x| x == "-initrd" || x == "-append"));
    }

    #[test]
    fn lines_are_cleaned() {
        assert_eq!(clean_line(b"abc\r\n"), "abc");
        assert_eq!(clean_line(b"a\rb\r\r\n"), "ab");
        assert_eq!(clean_line(b"\xffx\n"), "\u{fffd}x");
    }
}
