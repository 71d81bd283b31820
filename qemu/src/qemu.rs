//! The QEMU command line, and running QEMU as a child process: either on the
//! user's terminal, or with its console captured line by line under a hard
//! timeout (the child is killed when it expires, so a hang fails and never
//! stalls).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-aarch64";

/// Where QEMU's loader device puts the host kernel in the hypervisor boot
/// (boot contract): 2 MiB aligned and inside RAM for every `--mem` >= 1 GiB.
pub const HOST_KERNEL_ADDR: u64 = 0x7000_0000;

/// The smallest memory size that holds [`HOST_KERNEL_ADDR`] plus a kernel.
pub const MIN_HYP_MEM_MIB: u64 = 1024;

/// The largest memory size el2 boots with: its 32 MiB must hold the page
/// tracker (8 bytes per 4 KiB page) and the host stage-2 pool (a table per
/// 2 MiB); at 6 GiB they no longer fit and el2 powers off with an error.
pub const MAX_HYP_MEM_MIB: u64 = 4096;

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

/// A complete QEMU invocation.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The machine.
    pub machine: Machine,
    /// What is booted.
    pub boot: Boot,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// The console.
    pub console: Console,
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
                "--mem {m}M is too large for the hypervisor boot: el2's 32 MiB holds the page \
                 tracker and host stage-2 tables for at most {MAX_HYP_MEM_MIB}M (use --no-hyp \
                 for more)"
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
        push(&["-accel", "tcg,thread=multi"]);
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
        push(&["-initrd", &self.initrd.display().to_string()]);
        push(&["-append", &self.append]);
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
}

/// Runs QEMU on the user's terminal until it exits, or kills it after
/// `timeout`; `None` means it was killed.
pub fn run_terminal(
    args: &[String],
    timeout: Option<Duration>,
) -> Result<Option<ExitStatus>, String> {
    let mut child = Command::new(QEMU)
        .args(args)
        .spawn()
        .map_err(|e| format!("cannot run {QEMU}: {e}"))?;
    match timeout {
        None => child
            .wait()
            .map(Some)
            .map_err(|e| format!("waiting for {QEMU}: {e}")),
        Some(t) => Ok(wait_until(&mut child, Instant::now() + t)),
    }
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
        self.lines[self.lines.len().saturating_sub(n)..].join("\n")
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

/// Runs QEMU with the console captured, handing each line to `watch`, and
/// kills it if it has not exited after `timeout`.
pub fn run_captured(
    args: &[String],
    timeout: Duration,
    watch: &mut dyn Watcher,
) -> Result<Captured, String> {
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {QEMU}: {e}"))?;
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
        wait_until(
            &mut child,
            deadline.max(Instant::now() + Duration::from_secs(5)),
        )
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

/// Waits for the child until `deadline`; kills it after that.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                kill(child);
                return None;
            }
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
        Launch {
            machine: Machine {
                smp,
                mem_mib: mem,
                numa_nodes: numa,
                cpu: DEFAULT_CPU.into(),
            },
            boot,
            initrd: "/b/initrd".into(),
            append: "console=ttyAMA0 quiet".into(),
            console: Console::Captured,
        }
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
        assert_eq!(
            m(4, 6144, 1).check(true),
            Err(LaunchError::MemTooLarge(6144))
        );
        assert_eq!(m(4, 6144, 1).check(false), Ok(()));
        assert_eq!(
            m(1, 2048, 2).check(false),
            Err(LaunchError::NumaNeedsTwoCpus)
        );
        assert_eq!(m(4, 2048, 0).check(true), Err(LaunchError::NumaNodes(0)));
    }

    #[test]
    fn console_modes() {
        let mut l = launch(hyp(), 1, 1, 1024);
        assert!(l.args().unwrap().join(" ").contains("-serial stdio"));
        l.console = Console::Terminal;
        let a = l.args().unwrap();
        assert!(a.contains(&"-nographic".to_string()));
        assert!(!a.contains(&"stdio".to_string()));
    }

    #[test]
    fn lines_are_cleaned() {
        assert_eq!(clean_line(b"abc\r\n"), "abc");
        assert_eq!(clean_line(b"a\rb\r\r\n"), "ab");
        assert_eq!(clean_line(b"\xffx\n"), "\u{fffd}x");
    }
}
