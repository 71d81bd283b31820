//! One guest run: the VM set up from the plan, one thread per vCPU serving
//! exits, a hook thread for the test hooks, and the end (guest shutdown, an
//! error, or `--seconds`).
//!
//! Stopping and pausing vCPU threads works as in KVM VMMs: a flag, then a
//! real-time signal to each thread (its handler does nothing; the signal
//! makes `RUN` return `EINTR`), repeated until every thread has noticed.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use s2pin_uapi::{Exit, MemFaultKind, S2pinVmStats};

use crate::backend::Vcpu;
use crate::console::{LineBuffer, Verdict};
use crate::mmio::TestDevice;

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest shut down, powered off or reset (the system event).
    Guest(u32),
    /// The VMM stopped it (`--seconds`).
    Stopped,
    /// Something went wrong; the message says what.
    Error(String),
}

/// What the VMM does at interesting moments, beyond serving exits.
pub trait Hooks: Sync {
    /// vCPU 0 printed its `n`th progress report.
    fn report(&self, _n: u32) {}
    /// A memory fault the module handed to user space; true if the VMM
    /// fixed the host mapping and the vCPU should run again.
    fn fix_fault(&self, _gpa: u64, _write: bool) -> bool {
        false
    }
}

/// No hooks.
#[derive(Debug)]
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Console state: per-vCPU partial lines and the verdict.
#[derive(Debug, Default)]
pub struct ConsoleState {
    buffers: Vec<LineBuffer>,
    /// The verdict so far.
    pub verdict: Verdict,
    /// Every complete line, in order.
    pub lines: Vec<String>,
}

/// State the vCPU threads, the hook thread and the main thread share.
pub struct Shared<'h> {
    device: Mutex<TestDevice>,
    /// The console.
    pub console: Mutex<ConsoleState>,
    stop: AtomicBool,
    end: Mutex<Option<End>>,
    end_cv: Condvar,
    first_line: Mutex<bool>,
    first_line_cv: Condvar,
    pause: Mutex<(bool, u32)>,
    pause_cv: Condvar,
    threads: Vec<AtomicU64>,
    running: AtomicU32,
    waiting: AtomicU32,
    hooks: &'h dyn Hooks,
    echo: bool,
}

impl std::fmt::Debug for Shared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stop", &self.stop)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The signal that kicks a vCPU thread out of `RUN`.
#[must_use]
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of [`kick_signal`], without `SA_RESTART`.
pub fn install_kick_handler() -> Result<(), String> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| format!("installing the vCPU kick signal handler: {e}"))
}

impl<'h> Shared<'h> {
    /// State for `vcpus` threads.
    #[must_use]
    pub fn new(vcpus: usize, hooks: &'h dyn Hooks, echo: bool) -> Self {
        Self {
            device: Mutex::new(TestDevice::default()),
            console: Mutex::new(ConsoleState {
                buffers: (0..vcpus).map(|_| LineBuffer::default()).collect(),
                ..ConsoleState::default()
            }),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            end_cv: Condvar::new(),
            first_line: Mutex::new(false),
            first_line_cv: Condvar::new(),
            pause: Mutex::new((false, 0)),
            pause_cv: Condvar::new(),
            threads: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            hooks,
            echo,
        }
    }

    /// Records the end (the first one wins) and asks every thread to stop.
    pub fn finish(&self, end: End) {
        let mut e = lock(&self.end);
        if e.is_none() {
            *e = Some(end);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.end_cv.notify_all();
        self.first_line_cv.notify_all();
    }

    /// Whether the run is over.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until the run ends, at most `timeout`; returns the end.
    pub fn wait_end(&self, timeout: Option<Duration>) -> Option<End> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut e = lock(&self.end);
        loop {
            if e.is_some() {
                return e.clone();
            }
            let wait = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            e = self
                .end_cv
                .wait_timeout(e, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The end, if any.
    pub fn end(&self) -> Option<End> {
        lock(&self.end).clone()
    }

    /// Signals every vCPU thread that is still running.
    pub fn kick_all(&self) {
        for t in &self.threads {
            let id = t.load(Ordering::SeqCst);
            if id != 0 {
                // SAFETY: `id` is the pthread_t of a live vCPU thread of this
                // process (cleared before the thread returns; threads are
                // joined only after every kick); the signal's handler is
                // installed and does nothing.
                unsafe { libc::pthread_kill(id as libc::pthread_t, kick_signal()) };
            }
        }
    }

    /// vCPU threads still running.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }

    /// Stops every vCPU thread: kicks until all returned, at most `limit`.
    pub fn stop_all(&self, limit: Duration) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        self.first_line_cv.notify_all();
        let t0 = Instant::now();
        while self.running() > 0 {
            if t0.elapsed() > limit {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Parks every running vCPU thread between two `RUN`s; returns whether
    /// they all parked within `limit`.
    pub fn pause_all(&self, limit: Duration) -> bool {
        lock(&self.pause).0 = true;
        let t0 = Instant::now();
        loop {
            let parked = lock(&self.pause).1 + self.waiting.load(Ordering::SeqCst);
            if parked >= self.running() {
                return true;
            }
            if t0.elapsed() > limit {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Lets the paused threads go on.
    pub fn resume_all(&self) {
        lock(&self.pause).0 = false;
        self.pause_cv.notify_all();
    }

    fn checkpoint(&self) {
        let mut p = lock(&self.pause);
        if !p.0 {
            return;
        }
        p.1 += 1;
        while p.0 && !self.stopped() {
            p = self
                .pause_cv
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        p.1 -= 1;
    }

    fn wait_first_line(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.wait_first_line_inner();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn wait_first_line_inner(&self) {
        let mut seen = lock(&self.first_line);
        while !*seen && !self.stopped() {
            seen = self
                .first_line_cv
                .wait_timeout(seen, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn console(&self, vcpu: usize, bytes: &[u8]) {
        let mut reports = Vec::new();
        let mut first = false;
        {
            let mut c = lock(&self.console);
            let lines = match c.buffers.get_mut(vcpu) {
                Some(b) => b.push(bytes),
                None => return,
            };
            for l in lines {
                if self.echo {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{l}");
                    let _ = out.flush();
                }
                if c.verdict.line(&l) && vcpu == 0 {
                    reports.push(c.verdict.reports);
                }
                if vcpu == 0 {
                    first = true;
                }
                c.lines.push(l);
            }
        }
        if first {
            *lock(&self.first_line) = true;
            self.first_line_cv.notify_all();
        }
        for n in reports {
            self.hooks.report(n);
        }
    }

    /// Flushes the partial lines at the end.
    pub fn flush_console(&self) {
        let mut c = lock(&self.console);
        let rest: Vec<String> = c.buffers.iter_mut().filter_map(LineBuffer::flush).collect();
        for l in rest {
            if self.echo {
                println!("{l}");
            }
            c.verdict.line(&l);
            c.lines.push(l);
        }
    }
}

/// Most memory faults in a row the hooks may fix before the run fails (a
/// module that keeps refusing must not make the VMM spin).
const MAX_FIXED_FAULTS: u32 = 10_000;

fn access_name(a: u32) -> &'static str {
    match a {
        s2pin_uapi::S2PIN_ACCESS_READ => "read",
        s2pin_uapi::S2PIN_ACCESS_WRITE => "write",
        s2pin_uapi::S2PIN_ACCESS_EXEC => "exec",
        _ => "unknown access",
    }
}

fn fault_kind_name(k: u32) -> &'static str {
    match MemFaultKind::from_u32(k) {
        Some(MemFaultKind::NoSlot) => "no memory slot",
        Some(MemFaultKind::ReadOnlySlot) => "read-only slot",
        Some(MemFaultKind::HostDenied) => "the host mapping denies it",
        None => "unknown kind",
    }
}

/// How one exit is served.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Again,
    Done(End),
}

/// Serves one exit of vCPU `index`.
fn serve<V: Vcpu>(
    index: usize,
    vcpu: &mut V,
    exit: Exit,
    shared: &Shared<'_>,
    fixed: &mut u32,
) -> Step {
    match exit {
        Exit::None | Exit::Intr | Exit::PendingWork => Step::Again,
        Exit::Console(c) => {
            shared.console(index, c.text());
            Step::Again
        }
        Exit::Mmio(m) => {
            let mut dev = lock(&shared.device);
            let r = if m.is_write != 0 {
                dev.write(m.phys_addr, m.len, m.data).map(|()| None)
            } else {
                dev.read(m.phys_addr, m.len).map(Some)
            };
            drop(dev);
            match r {
                Ok(Some(v)) => {
                    vcpu.complete_mmio_read(v);
                    Step::Again
                }
                Ok(None) => Step::Again,
                Err(e) => Step::Done(End::Error(format!("vCPU {index}: {e}"))),
            }
        }
        Exit::MemFault(f) => {
            let write = f.access == s2pin_uapi::S2PIN_ACCESS_WRITE;
            if *fixed < MAX_FIXED_FAULTS && shared.hooks.fix_fault(f.gpa, write) {
                *fixed += 1;
                return Step::Again;
            }
            Step::Done(End::Error(format!(
                "vCPU {index}: guest memory fault at gpa {:#x} ({}, {}, error {})",
                f.gpa,
                access_name(f.access),
                fault_kind_name(f.kind),
                f.error
            )))
        }
        Exit::SystemEvent(s) => Step::Done(End::Guest(s.ty)),
        Exit::UnhandledTrap(u) => Step::Done(End::Error(format!(
            "vCPU {index}: unhandled trap, ESR {:#x} FAR {:#x}",
            u.esr, u.far
        ))),
        // Guest memory is all shared already; requests need no answer.
        Exit::ShareRequest(_) | Exit::UnshareRequest(_) => Step::Again,
        Exit::Unknown(code) => Step::Done(End::Error(format!(
            "vCPU {index}: unknown exit reason {code}"
        ))),
    }
}

/// Runs vCPU `index` until the run ends; `after_first_line`: wait for vCPU
/// 0's first console line before the first `RUN`.
pub fn vcpu_thread<V: Vcpu>(
    index: usize,
    mut vcpu: V,
    shared: &Shared<'_>,
    after_first_line: bool,
) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as u64;
    if let Some(t) = shared.threads.get(index) {
        t.store(me, Ordering::SeqCst);
    }
    if after_first_line {
        shared.wait_first_line();
    }
    let mut fixed = 0;
    while !shared.stopped() {
        shared.checkpoint();
        if shared.stopped() {
            break;
        }
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                let hint = if e.errno() == Some(libc::ENOMEM) {
                    " (pinning guest memory would pass RLIMIT_MEMLOCK: raise `ulimit -l`)"
                } else {
                    ""
                };
                shared.finish(End::Error(format!("vCPU {index}: {e}{hint}")));
                break;
            }
        };
        if let Step::Done(end) = serve(index, &mut vcpu, exit, shared, &mut fixed) {
            shared.finish(end);
            break;
        }
    }
    if let Some(t) = shared.threads.get(index) {
        t.store(0, Ordering::SeqCst);
    }
    shared.running.fetch_sub(1, Ordering::SeqCst);
}

/// Marks `n` threads as about to run (before spawning them).
pub fn expect_threads(shared: &Shared<'_>, n: u32) {
    shared.running.fetch_add(n, Ordering::SeqCst);
}

/// The stats before and after a hook, as the printed delta.
#[must_use]
pub fn nonzero_delta(before: &S2pinVmStats, after: &S2pinVmStats) -> Vec<(&'static str, i128)> {
    crate::stats::delta(before, after)
        .into_iter()
        .filter(|(_, d)| *d != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceError;
    use s2pin_uapi::{
        RunConsole, RunMemFault, RunMmio, RunSystemEvent, RunUnhandled, SystemEventType,
    };
    use std::collections::VecDeque;

    /// A vCPU that plays back exits and records MMIO read completions.
    struct Fake {
        exits: VecDeque<Result<Exit, i32>>,
        reads: std::sync::Arc<Mutex<Vec<u64>>>,
    }

    impl Vcpu for Fake {
        fn run(&mut self) -> crate::backend::DeviceResult<Exit> {
            match self.exits.pop_front() {
                Some(Ok(e)) => Ok(e),
                Some(Err(errno)) => Err(DeviceError {
                    call: "S2PIN_RUN",
                    err: std::io::Error::from_raw_os_error(errno),
                }),
                None => Ok(Exit::SystemEvent(RunSystemEvent { ty: 99, pad: 0 })),
            }
        }
        fn complete_mmio_read(&mut self, data: u64) {
            self.reads.lock().unwrap().push(data);
        }
    }

    fn console(s: &str) -> Exit {
        let mut bytes = [0u8; 16];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Exit::Console(RunConsole {
            len: s.len() as u32,
            pad: 0,
            bytes,
        })
    }

    fn mmio(addr: u64, len: u32, write: Option<u64>) -> Exit {
        Exit::Mmio(RunMmio {
            phys_addr: addr,
            data: write.unwrap_or(0),
            len,
            is_write: u8::from(write.is_some()),
            pad: [0; 3],
        })
    }

    struct Counting {
        reports: Mutex<Vec<u32>>,
        fix: bool,
    }
    impl Hooks for Counting {
        fn report(&self, n: u32) {
            self.reports.lock().unwrap().push(n);
        }
        fn fix_fault(&self, _: u64, _: bool) -> bool {
            self.fix
        }
    }

    fn run(
        exits: Vec<Result<Exit, i32>>,
        hooks: &Counting,
    ) -> (Option<End>, Vec<u64>, Vec<String>) {
        let shared = Shared::new(1, hooks, false);
        let reads = std::sync::Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            exits: exits.into(),
            reads: reads.clone(),
        };
        expect_threads(&shared, 1);
        vcpu_thread(0, fake, &shared, false);
        assert_eq!(shared.running(), 0);
        shared.flush_console();
        let lines = lock(&shared.console).lines.clone();
        let r = reads.lock().unwrap().clone();
        (shared.end(), r, lines)
    }

    fn hooks(fix: bool) -> Counting {
        Counting {
            reports: Mutex::new(Vec::new()),
            fix,
        }
    }

    #[test]
    fn a_guest_run_is_served_to_its_end() {
        let base = crate::layout::MMIO_BASE;
        let h = hooks(false);
        let (end, reads, lines) = run(
            vec![
                Ok(console("guest: passes 2\n")),
                Ok(Exit::Intr),
                Ok(Exit::PendingWork),
                Ok(mmio(base + 8, 8, None)),
                Ok(mmio(base + 8, 4, Some(0x1_2345_6789))),
                Ok(mmio(base + 8, 8, None)),
                Ok(console("guest: checksum")),
                Ok(console(" 0x12 PASS\nguest")),
                Ok(console(": passes 4\n")),
                Ok(Exit::SystemEvent(RunSystemEvent {
                    ty: SystemEventType::Shutdown as u32,
                    pad: 0,
                })),
                Ok(console("never served\n")),
            ],
            &h,
        );
        assert_eq!(end, Some(End::Guest(SystemEventType::Shutdown as u32)));
        assert_eq!(reads, vec![guest::mmio_test_value(8), 0x2345_6789]);
        assert_eq!(
            lines,
            [
                "guest: passes 2",
                "guest: checksum 0x12 PASS",
                "guest: passes 4"
            ]
        );
        assert_eq!(*h.reports.lock().unwrap(), vec![1, 2]);
    }

    #[test]
    fn errors_end_the_run_with_a_message() {
        let fault = Exit::MemFault(RunMemFault {
            gpa: 0x4030_0000,
            access: 1,
            kind: MemFaultKind::HostDenied as u32,
            error: -14,
            pad: 0,
        });
        let (end, ..) = run(vec![Ok(fault)], &hooks(false));
        assert_eq!(
            end,
            Some(End::Error(
                "vCPU 0: guest memory fault at gpa 0x40300000 (write, the host mapping denies it, error -14)"
                    .into()
            ))
        );
        // A hook that fixes it lets the guest go on (bounded).
        let (end, ..) = run(vec![Ok(fault), Ok(fault)], &hooks(true));
        assert_eq!(end, Some(End::Guest(99)));
        let (end, ..) = run(vec![Err(libc::EBUSY)], &hooks(false));
        assert!(matches!(end, Some(End::Error(m)) if m.starts_with("vCPU 0: S2PIN_RUN: ")));
        let (end, ..) = run(vec![Err(libc::ENOMEM)], &hooks(false));
        assert!(matches!(end, Some(End::Error(m)) if m.ends_with("raise `ulimit -l`)")));
        let (end, ..) = run(vec![Ok(mmio(0x1000, 8, None))], &hooks(false));
        assert_eq!(
            end,
            Some(End::Error(
                "vCPU 0: MMIO access at 0x1000 is outside every emulated device".into()
            ))
        );
        let (end, ..) = run(
            vec![Ok(Exit::UnhandledTrap(RunUnhandled { esr: 0x62, far: 0 }))],
            &hooks(false),
        );
        assert!(matches!(end, Some(End::Error(m)) if m.contains("ESR 0x62")));
        let (end, ..) = run(vec![Ok(Exit::Unknown(77))], &hooks(false));
        assert!(matches!(end, Some(End::Error(m)) if m.contains("77")));
    }

    #[test]
    fn stop_and_pause_reach_blocked_threads() {
        install_kick_handler().unwrap();
        /// A vCPU whose RUN sleeps until a signal, like the real one.
        struct Sleeper;
        impl Vcpu for Sleeper {
            fn run(&mut self) -> crate::backend::DeviceResult<Exit> {
                // SAFETY: pause() has no preconditions; it returns on a signal.
                unsafe { libc::pause() };
                Ok(Exit::Intr)
            }
            fn complete_mmio_read(&mut self, _: u64) {}
        }
        let h = hooks(false);
        let shared = Shared::new(2, &h, false);
        expect_threads(&shared, 2);
        std::thread::scope(|s| {
            s.spawn(|| vcpu_thread(0, Sleeper, &shared, false));
            s.spawn(|| vcpu_thread(1, Sleeper, &shared, true));
            std::thread::sleep(Duration::from_millis(50));
            assert!(shared.pause_all(Duration::from_secs(5)));
            shared.resume_all();
            assert_eq!(shared.wait_end(Some(Duration::from_millis(10))), None);
            shared.finish(End::Stopped);
            assert!(shared.stop_all(Duration::from_secs(5)));
        });
        assert_eq!(shared.end(), Some(End::Stopped));
    }
}
