//! `s2vmm fuzz`: a bounded random sequence of valid and invalid calls on
//! `/dev/s2pin`, VM and vCPU fds, in the style of syzkaller but small and
//! ours.
//!
//! Every thread draws its calls from its own generator seeded from
//! `--seed` and its index, so `--threads 1` replays the same sequence;
//! with more threads the calls are the same but their interleaving is the
//! scheduler's. The calls: every ioctl of `s2pin-uapi` with valid and wild
//! arguments (flags, sizes, huge values, unaligned and overflowing
//! ranges), bad argument pointers (NULL, kernel, unmapped, straddling into
//! an unmapped page, read-only for `GET_STATS`), ioctl numbers with the
//! wrong size or direction, unknown numbers, numbers of another fd kind;
//! slot creation and deletion over live, dropped and re-protected guest
//! memory; runs of the guest payload (a watchdog signals runs that take
//! long); `mmap` of the run page with right and wrong sizes, offsets and
//! flags; closes of device, VM and vCPU fds in random order. A child
//! process forked before the threads start fuzzes the fds it inherited
//! (another mm: `RUN`, slots and new vCPUs must fail with `EIO`) and VMs
//! of its own.
//!
//! The oracle: every failure must carry an errno the uapi documents for
//! that call (the table in `s2pin-uapi`'s crate docs), and calls built to
//! be invalid must fail with the errno that says why (`ENOTTY` for an
//! unknown number, `EFAULT` for a bad pointer, `EINVAL` for a bad flag,
//! `EIO` from another process). Errnos the docs do not mention for a call
//! are findings; those already reported are listed in [`KNOWN_GAPS`] and
//! printed each run without failing it. At the end nothing of this
//! process or its child may be left: no VM in the module's debugfs under
//! their pids, and (unless `--shared`) the module's global pin and VM
//! counts back to zero.

use std::path::PathBuf;

use clap::Args;

/// `s2vmm fuzz` options.
#[derive(Clone, Debug, Args)]
pub struct FuzzArgs {
    /// The guest payload image.
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// Seed of the call sequence.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Calls in total (over all threads; the child makes a quarter as many more).
    #[arg(long, default_value_t = 2000)]
    pub iters: u64,
    /// Threads making calls at the same time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub threads: u32,
    /// No forked child.
    #[arg(long)]
    pub no_fork: bool,
    /// Other VMs run meanwhile (the soak): check only that this process's
    /// VMs are gone at the end, not the module's global counts.
    #[arg(long)]
    pub shared: bool,
    /// Print every call and its result.
    #[arg(long)]
    pub verbose: bool,
}

/// splitmix64: small, fast, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of seed `seed`.
    #[must_use]
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// An index into a slice of `len` elements (0 when empty).
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    /// A value from the edges where bugs live: 0, 1, page and 2 MiB
    /// boundaries, sign bits, the ends of 32, 40, 47, 48 and 64 bits, or
    /// random bits (page aligned or not).
    pub fn wild(&mut self) -> u64 {
        const EDGES: [u64; 20] = [
            0,
            1,
            3,
            0xfff,
            0x1000,
            0x1001,
            0x20_0000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            1 << 32,
            1 << 40,
            (1 << 40) - 0x1000,
            1 << 47,
            1 << 48,
            (1 << 48) - 0x1000,
            i64::MAX as u64,
            1 << 63,
            u64::MAX - 0xfff,
            u64::MAX,
        ];
        match self.below(4) {
            0 => self.next_u64(),
            1 => self.next_u64() & !0xfff,
            _ => EDGES[self.index(EDGES.len())],
        }
    }
}

/// The calls the fuzzer makes, for the oracle and the tallies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Call {
    /// `open("/dev/s2pin")`.
    Open,
    /// `S2PIN_GET_API_VERSION`.
    ApiVersion,
    /// `S2PIN_GET_VCPU_MMAP_SIZE`.
    MmapSize,
    /// `S2PIN_CREATE_VM`.
    CreateVm,
    /// `S2PIN_SET_USER_MEMORY_REGION`.
    SetRegion,
    /// `S2PIN_CREATE_VCPU`.
    CreateVcpu,
    /// `S2PIN_GET_STATS`.
    GetStats,
    /// `S2PIN_RUN`.
    Run,
    /// `mmap` of a device, VM or vCPU fd.
    Mmap,
    /// An ioctl number no fd of this kind knows.
    BadIoctl,
}

impl Call {
    /// Every call, for the summary.
    pub const ALL: [Self; 10] = [
        Self::Open,
        Self::ApiVersion,
        Self::MmapSize,
        Self::CreateVm,
        Self::SetRegion,
        Self::CreateVcpu,
        Self::GetStats,
        Self::Run,
        Self::Mmap,
        Self::BadIoctl,
    ];

    /// Its name in the output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::ApiVersion => "GET_API_VERSION",
            Self::MmapSize => "GET_VCPU_MMAP_SIZE",
            Self::CreateVm => "CREATE_VM",
            Self::SetRegion => "SET_USER_MEMORY_REGION",
            Self::CreateVcpu => "CREATE_VCPU",
            Self::GetStats => "GET_STATS",
            Self::Run => "RUN",
            Self::Mmap => "mmap",
            Self::BadIoctl => "unknown ioctl",
        }
    }

    /// The errnos the uapi documents for this call (the table in
    /// `s2pin-uapi`'s crate docs, each row read for the calls it names).
    #[must_use]
    pub fn documented(self) -> &'static [i32] {
        use libc::{
            EACCES, EBUSY, EEXIST, EFAULT, EINTR, EINVAL, EIO, EMFILE, ENFILE, ENODEV, ENOMEM,
            ENOSPC, ENOTTY, ESHUTDOWN,
        };
        match self {
            Self::Open => &[],
            // "EINVAL: a malformed argument" (the argument must be 0).
            Self::ApiVersion | Self::MmapSize => &[EINVAL],
            Self::CreateVm => &[EINVAL, EFAULT, ENOSPC, ENOMEM, EINTR, EMFILE, ENFILE],
            Self::SetRegion => &[EINVAL, EEXIST, EFAULT, ENOSPC, ENOMEM, EIO, ESHUTDOWN],
            Self::CreateVcpu => &[
                EINVAL, EEXIST, EFAULT, ENOMEM, EIO, ESHUTDOWN, EMFILE, ENFILE,
            ],
            Self::GetStats => &[EFAULT],
            Self::Run => &[EINVAL, ENOMEM, EINTR, EBUSY, EIO, ESHUTDOWN],
            Self::Mmap => &[EINVAL, ENODEV, EACCES],
            Self::BadIoctl => &[ENOTTY],
        }
    }
}

/// Errnos the docs do not mention for a call, already reported (so a run
/// lists them but does not fail on them): the call, the errno, and why it
/// happens. Empty: the four the fuzzer found first (`CREATE_VM` `EINTR`,
/// `mmap` `EINVAL`/`ENODEV`/`EACCES`) are in the uapi's errno table now.
pub const KNOWN_GAPS: &[(Call, i32, &str)] = &[];

/// What the oracle says of one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// As documented.
    Fine,
    /// An errno the docs do not give for this call, already reported.
    KnownGap,
    /// An errno the docs do not give for this call.
    Undocumented,
    /// A call built to fail with one of `expect` did something else.
    Wrong,
}

/// Judges `result` (`Ok` or the errno) of `call`; `expect` is the errnos a
/// call built to be invalid must fail with (empty: any documented result).
#[must_use]
pub fn judge(call: Call, result: Result<(), i32>, expect: &[i32]) -> Verdict {
    match result {
        Ok(()) if expect.is_empty() => Verdict::Fine,
        Ok(()) => Verdict::Wrong,
        Err(e) if !expect.is_empty() && !expect.contains(&e) => Verdict::Wrong,
        Err(e) if call.documented().contains(&e) => Verdict::Fine,
        Err(e) if KNOWN_GAPS.iter().any(|(c, g, _)| *c == call && *g == e) => Verdict::KnownGap,
        Err(_) => Verdict::Undocumented,
    }
}

#[cfg(target_os = "linux")]
pub use sys::run;

#[cfg(target_os = "linux")]
mod sys {
    use std::collections::BTreeMap;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use s2pin_uapi::{
        ior, iow, S2pinCreateVcpu, S2pinCreateVm, S2pinUserspaceMemoryRegion, S2pinVmStats,
        S2PIN_CREATE_VCPU, S2PIN_CREATE_VM, S2PIN_GET_API_VERSION, S2PIN_GET_STATS,
        S2PIN_GET_VCPU_MMAP_SIZE, S2PIN_MAX_MEMSLOTS, S2PIN_MEM_READONLY, S2PIN_RUN,
        S2PIN_SET_USER_MEMORY_REGION, S2PIN_VCPU_START_OFF,
    };

    use super::{judge, Call, FuzzArgs, Rng, Verdict, KNOWN_GAPS};
    use crate::args::{Backing, GuestMode};
    use crate::layout::{Image, Plan, IMAGE_OFFSET, IPA_BITS, PAGE, RAM_BASE, TEST_OFFSET};
    use crate::memory::GuestMemory;
    use crate::runner;

    /// Live objects a thread may pick; bounded so that memory stays small.
    const MAX_DEVS: usize = 3;
    const MAX_VMS: usize = 6;
    /// With `--shared`: the hypervisor has room for 16 VMs in all, and the
    /// soak's need theirs.
    const MAX_VMS_SHARED: usize = 3;
    const MAX_VCPUS: usize = 10;
    const MAX_MEMS: usize = 4;
    const MAX_MAPS: usize = 8;
    /// A RUN longer than this is signalled (the guest may loop for ever).
    const RUN_LIMIT: Duration = Duration::from_millis(150);
    /// Tested memory of the fuzzer's guests.
    const GUEST_MEM: u64 = 1 << 20;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        Dev,
        Vm,
        Vcpu,
    }

    /// An fd in the pool; `owner`: the process that made it (the child
    /// inherits the parent's).
    #[derive(Debug)]
    struct Obj {
        kind: Kind,
        fd: OwnedFd,
        owner: u32,
        /// For a VM: its RAM window (base, size).
        window: (u64, u64),
        /// For a vCPU: its run page, if mapped (unmapped with the object).
        run: Option<usize>,
    }

    impl Drop for Obj {
        fn drop(&mut self) {
            if let Some(addr) = self.run {
                // SAFETY: the one-page mapping of this vCPU fd made when it
                // was created; no other copy of the address exists.
                unsafe { libc::munmap(addr as *mut libc::c_void, PAGE as usize) };
            }
        }
    }

    #[derive(Debug, Default)]
    struct Pool {
        objs: Vec<Arc<Obj>>,
        mems: Vec<Arc<GuestMemory>>,
        /// Mappings of fds (address, length).
        maps: Vec<(usize, usize)>,
        /// Most VMs alive at once.
        max_vms: usize,
    }

    impl Pool {
        fn new(max_vms: usize) -> Self {
            Self {
                max_vms,
                ..Self::default()
            }
        }
        fn vms_full(&self) -> bool {
            self.count(Kind::Vm) >= self.max_vms
        }
        fn count(&self, k: Kind) -> usize {
            self.objs.iter().filter(|o| o.kind == k).count()
        }
        fn pick(&self, rng: &mut Rng, k: Kind) -> Option<Arc<Obj>> {
            let of: Vec<&Arc<Obj>> = self.objs.iter().filter(|o| o.kind == k).collect();
            of.get(rng.index(of.len())).map(|o| Arc::clone(o))
        }
        fn any(&self, rng: &mut Rng) -> Option<Arc<Obj>> {
            self.objs.get(rng.index(self.objs.len())).cloned()
        }
    }

    /// Pages for bad pointers: `rw` is a read-write page followed by the
    /// unmapped (PROT_NONE) `hole`; `ro` is read-only.
    #[derive(Debug)]
    struct Pages {
        rw: usize,
        hole: usize,
        ro: usize,
    }

    impl Pages {
        fn new() -> std::io::Result<Self> {
            let len = 3 * PAGE as usize;
            // SAFETY: a fresh private anonymous mapping, ours until exit.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let base = p as usize;
            let page = PAGE as usize;
            // SAFETY: pages of the mapping just made; never unmapped (the
            // process keeps them until it exits).
            let ok = unsafe {
                libc::mprotect((base + page) as *mut libc::c_void, page, libc::PROT_NONE) == 0
                    && libc::mprotect(
                        (base + 2 * page) as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                    ) == 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self {
                rw: base,
                hole: base + page,
                ro: base + 2 * page,
            })
        }
    }

    /// Where an ioctl's argument points.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Ptr {
        Good,
        Null,
        Kernel,
        Hole,
        /// The struct's last bytes in the hole.
        Straddle,
        /// A read-only page (bad for a struct the kernel writes).
        ReadOnly,
    }

    impl Ptr {
        fn pick(rng: &mut Rng) -> Self {
            match rng.below(16) {
                0 => Self::Null,
                1 => Self::Kernel,
                2 => Self::Hole,
                3 => Self::Straddle,
                4 => Self::ReadOnly,
                _ => Self::Good,
            }
        }
    }

    /// An argument a call reads: where it points, and for [`Ptr::ReadOnly`]
    /// a read-only page of its own holding a copy of the struct (the kernel
    /// may read it; a struct the kernel writes gets the shared read-only page).
    struct ArgBuf {
        addr: usize,
        page: Option<usize>,
    }

    impl ArgBuf {
        fn of<T: Copy>(ctx: &Ctx<'_>, p: Ptr, v: &T) -> Self {
            let len = core::mem::size_of::<T>();
            if p != Ptr::ReadOnly {
                return Self {
                    addr: ctx.ptr(p, core::ptr::from_ref(v) as usize, len),
                    page: None,
                };
            }
            // SAFETY: a fresh private anonymous page of our own.
            let m = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    PAGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                return Self {
                    addr: core::ptr::from_ref(v) as usize,
                    page: None,
                };
            }
            // SAFETY: `len` (< a page) bytes into the page just mapped
            // read-write, then made read-only.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    core::ptr::from_ref(v).cast::<u8>(),
                    m.cast::<u8>(),
                    len,
                );
                libc::mprotect(m, PAGE as usize, libc::PROT_READ);
            }
            Self {
                addr: m as usize,
                page: Some(m as usize),
            }
        }
    }

    impl Drop for ArgBuf {
        fn drop(&mut self) {
            if let Some(m) = self.page {
                // SAFETY: the page `of` mapped, unmapped once.
                unsafe { libc::munmap(m as *mut libc::c_void, PAGE as usize) };
            }
        }
    }

    /// Counts and findings, shared by the threads.
    #[derive(Debug, Default)]
    struct Tally {
        calls: u64,
        /// (call, errno or 0 for success) -> count.
        results: BTreeMap<(Call, i32), u64>,
        /// Unexpected results: call, what, count.
        bad: BTreeMap<(Call, String), u64>,
        gaps: BTreeMap<(Call, i32), u64>,
        runs_kicked: u64,
        exits: BTreeMap<String, u64>,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    struct Ctx<'a> {
        pool: &'a Mutex<Pool>,
        tally: &'a Mutex<Tally>,
        pages: &'a Pages,
        image: &'a [u8],
        img: Image,
        /// This thread's watchdog slot: (pthread id, RUN start in ms since `t0`, 0 when not in RUN).
        slot: &'a (AtomicU64, AtomicU64),
        t0: Instant,
        verbose: bool,
        who: &'a str,
    }

    impl Ctx<'_> {
        /// Records `result` of `call`: `expect` as for [`judge`].
        fn note(&self, call: Call, what: &str, result: Result<(), i32>, expect: &[i32]) {
            let v = judge(call, result, expect);
            if self.verbose {
                println!("{} {}: {what} -> {result:?} {v:?}", self.who, call.name());
            }
            let mut t = lock(self.tally);
            t.calls += 1;
            *t.results
                .entry((call, result.err().unwrap_or(0)))
                .or_default() += 1;
            match v {
                Verdict::Fine => {}
                Verdict::KnownGap => {
                    *t.gaps.entry((call, result.err().unwrap_or(0))).or_default() += 1;
                }
                Verdict::Undocumented | Verdict::Wrong => {
                    let desc = format!(
                        "{what}: {} (expected {})",
                        match result {
                            Ok(()) => "success".to_string(),
                            Err(e) =>
                                format!("errno {e} ({})", std::io::Error::from_raw_os_error(e)),
                        },
                        if expect.is_empty() {
                            format!("success or {:?}", call.documented())
                        } else {
                            format!("{expect:?}")
                        }
                    );
                    *t.bad.entry((call, desc)).or_default() += 1;
                }
            }
        }

        /// A pointer of kind `p` to `len` bytes whose good form is `good`.
        fn ptr(&self, p: Ptr, good: usize, len: usize) -> usize {
            match p {
                Ptr::Good => good,
                Ptr::Null => 0,
                Ptr::Kernel => 0xffff_0000_dead_0000,
                Ptr::Hole => self.pages.hole,
                Ptr::Straddle => self.pages.hole - len / 2,
                Ptr::ReadOnly => self.pages.ro,
            }
        }

        /// A raw ioctl: Ok(return value) or the errno.
        fn ioctl(fd: RawFd, cmd: u32, arg: usize) -> Result<i32, i32> {
            // SAFETY: an ioctl on an fd of this process's pool. The argument
            // is either a pointer to a live local of the size the number
            // encodes, or a deliberately bad address the kernel must refuse
            // with EFAULT (kernel, unmapped, read-only or straddling pages
            // of this process's own; never memory Rust uses).
            let rc = unsafe { libc::ioctl(fd, cmd as _, arg) };
            if rc < 0 {
                Err(errno())
            } else {
                Ok(rc)
            }
        }

        /// Takes an fd an ioctl returned.
        fn adopt(fd: i32) -> OwnedFd {
            // SAFETY: the kernel just returned this new fd to us.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }

        fn push(&self, o: Obj) {
            lock(self.pool).objs.push(Arc::new(o));
        }

        fn open(&self) {
            if lock(self.pool).count(Kind::Dev) >= MAX_DEVS {
                return;
            }
            let r = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(crate::s2pin::DEVICE);
            match r {
                Ok(f) => {
                    self.note(Call::Open, "/dev/s2pin", Ok(()), &[]);
                    self.push(Obj {
                        kind: Kind::Dev,
                        fd: f.into(),
                        owner: std::process::id(),
                        window: (0, 0),
                        run: None,
                    });
                }
                Err(e) => self.note(
                    Call::Open,
                    "/dev/s2pin",
                    Err(e.raw_os_error().unwrap_or(0)),
                    &[],
                ),
            }
        }

        fn small_ioctls(&self, rng: &mut Rng) {
            let Some(d) = lock(self.pool).pick(rng, Kind::Dev) else {
                return self.open();
            };
            let arg = if rng.chance(1, 4) {
                rng.wild() as usize
            } else {
                0
            };
            let (call, cmd) = if rng.chance(1, 2) {
                (Call::ApiVersion, S2PIN_GET_API_VERSION)
            } else {
                (Call::MmapSize, S2PIN_GET_VCPU_MMAP_SIZE)
            };
            let r = Self::ioctl(d.fd.as_raw_fd(), cmd, arg).map(|_| ());
            let expect: &[i32] = if arg != 0 { &[libc::EINVAL] } else { &[] };
            self.note(call, &format!("arg {arg:#x}"), r, expect);
        }

        /// CREATE_VM with valid, wild or badly pointed arguments.
        fn create_vm(&self, rng: &mut Rng) {
            let Some(d) = lock(self.pool).pick(rng, Kind::Dev) else {
                return self.open();
            };
            if lock(self.pool).vms_full() {
                return self.close(rng);
            }
            let mut a = S2pinCreateVm {
                ipa_bits: IPA_BITS,
                policy: u32::try_from(rng.below(3)).unwrap_or(0),
                flags: 0,
                mem_base: RAM_BASE,
                mem_size: TEST_OFFSET + GUEST_MEM,
            };
            let mut invalid = false;
            match rng.below(10) {
                0 => {
                    a.flags = rng.wild() | 1;
                    invalid = true;
                }
                1 => {
                    a.policy = 3 + u32::try_from(rng.below(1 << 20)).unwrap_or(0);
                    invalid = true;
                }
                2 => {
                    a.ipa_bits = u32::try_from(rng.wild() & 0xffff_ffff).unwrap_or(0);
                    invalid = a.ipa_bits != 0 && !(32..=48).contains(&a.ipa_bits);
                }
                3 => a.mem_base = rng.wild(),
                4 => a.mem_size = rng.wild(),
                5 => a.ipa_bits = 0,
                _ => {}
            }
            let p = Ptr::pick(rng);
            let bad_ptr = !matches!(p, Ptr::Good | Ptr::ReadOnly);
            let buf = ArgBuf::of(self, p, &a);
            let arg = buf.addr;
            let r = Self::ioctl(d.fd.as_raw_fd(), S2PIN_CREATE_VM, arg);
            let expect: &[i32] = if bad_ptr {
                &[libc::EFAULT]
            } else if invalid {
                &[libc::EINVAL]
            } else {
                &[]
            };
            let what = format!("{a:?} ptr {p:?}");
            match r {
                Ok(fd) => {
                    self.note(Call::CreateVm, &what, Ok(()), expect);
                    self.push(Obj {
                        kind: Kind::Vm,
                        fd: Self::adopt(fd),
                        owner: std::process::id(),
                        window: (a.mem_base, a.mem_size),
                        run: None,
                    });
                }
                Err(e) => self.note(Call::CreateVm, &what, Err(e), expect),
            }
        }

        /// A VM that can run the payload: memory with the image, slot 0,
        /// vCPU 0 (fill mode, 1 MiB), its run page mapped.
        fn guest(&self, rng: &mut Rng) {
            {
                let p = lock(self.pool);
                if p.vms_full() || p.count(Kind::Vcpu) >= MAX_VCPUS {
                    drop(p);
                    return self.close(rng);
                }
            }
            let Some(d) = lock(self.pool).pick(rng, Kind::Dev) else {
                return self.open();
            };
            let Some(mem) = self.memory(rng) else {
                return;
            };
            let ram = mem.len() as u64;
            let a = S2pinCreateVm {
                ipa_bits: IPA_BITS,
                policy: u32::try_from(rng.below(3)).unwrap_or(0),
                flags: 0,
                mem_base: RAM_BASE,
                mem_size: ram,
            };
            let vm = match Self::ioctl(d.fd.as_raw_fd(), S2PIN_CREATE_VM, (&raw const a) as usize) {
                Ok(fd) => {
                    self.note(Call::CreateVm, "guest VM", Ok(()), &[]);
                    Self::adopt(fd)
                }
                Err(e) => return self.note(Call::CreateVm, "guest VM", Err(e), &[]),
            };
            let r = S2pinUserspaceMemoryRegion {
                slot: 0,
                flags: 0,
                guest_phys_addr: RAM_BASE,
                memory_size: ram,
                userspace_addr: mem.addr(),
            };
            let rr = Self::ioctl(
                vm.as_raw_fd(),
                S2PIN_SET_USER_MEMORY_REGION,
                (&raw const r) as usize,
            );
            self.note(Call::SetRegion, "guest slot 0", rr.map(|_| ()), &[]);
            let plan = Plan {
                mode: GuestMode::Fill,
                vcpus: 1,
                mem: GUEST_MEM,
                reports: 0,
                passes_log2: 0,
            };
            let c = S2pinCreateVcpu {
                index: 0,
                flags: 0,
                entry: self.img.entry(),
                x0: plan.arg(),
            };
            let rc = Self::ioctl(vm.as_raw_fd(), S2PIN_CREATE_VCPU, (&raw const c) as usize);
            self.push(Obj {
                kind: Kind::Vm,
                fd: vm,
                owner: std::process::id(),
                window: (RAM_BASE, ram),
                run: None,
            });
            match rc {
                Ok(fd) => {
                    self.note(Call::CreateVcpu, "guest vCPU 0", Ok(()), &[]);
                    let fd = Self::adopt(fd);
                    let run = self.map(fd.as_raw_fd(), PAGE as usize, 0, libc::MAP_SHARED, &[]);
                    self.push(Obj {
                        kind: Kind::Vcpu,
                        fd,
                        owner: std::process::id(),
                        window: (0, 0),
                        run,
                    });
                }
                Err(e) => self.note(Call::CreateVcpu, "guest vCPU 0", Err(e), &[]),
            }
        }

        /// A guest memory with the image in it, new or from the pool.
        fn memory(&self, rng: &mut Rng) -> Option<Arc<GuestMemory>> {
            let p = lock(self.pool);
            if p.mems.len() >= MAX_MEMS || (!p.mems.is_empty() && rng.chance(1, 2)) {
                return p.mems.get(rng.index(p.mems.len())).cloned();
            }
            drop(p);
            let len = usize::try_from(TEST_OFFSET + GUEST_MEM).ok()?;
            let m = GuestMemory::new(len, Backing::Anon, None).ok()?;
            m.write(IMAGE_OFFSET, self.image).ok()?;
            let m = Arc::new(m);
            lock(self.pool).mems.push(Arc::clone(&m));
            Some(m)
        }

        /// Slot changes: valid slots over pool memory, deletions, and
        /// wild slot ids, flags, addresses and sizes.
        fn set_region(&self, rng: &mut Rng) {
            let Some(vm) = lock(self.pool).pick(rng, Kind::Vm) else {
                return self.guest(rng);
            };
            let mem = self.memory(rng);
            let (base, size) = vm.window;
            let mut r = S2pinUserspaceMemoryRegion {
                slot: u32::try_from(rng.below(4)).unwrap_or(0),
                flags: if rng.chance(1, 6) {
                    S2PIN_MEM_READONLY
                } else {
                    0
                },
                guest_phys_addr: base,
                memory_size: mem.as_ref().map_or(PAGE, |m| m.len() as u64).min(size),
                userspace_addr: mem.as_ref().map_or(0, |m| m.addr()),
            };
            // An aligned piece of the window.
            if rng.chance(1, 2) && r.memory_size > PAGE {
                let pages = r.memory_size / PAGE;
                let first = rng.below(pages);
                let n = 1 + rng.below(pages - first);
                r.guest_phys_addr += first * PAGE;
                r.userspace_addr += first * PAGE;
                r.memory_size = n * PAGE;
            }
            let mut invalid = false;
            match rng.below(12) {
                0 => r.memory_size = 0,
                1 => {
                    r.slot = S2PIN_MAX_MEMSLOTS + u32::try_from(rng.below(1 << 16)).unwrap_or(0);
                    invalid = true;
                }
                2 => {
                    r.flags = (u32::try_from(rng.next_u64() & 0xffff_ffff).unwrap_or(0))
                        & !S2PIN_MEM_READONLY
                        | 1;
                    invalid = r.memory_size != 0;
                }
                3 => r.guest_phys_addr = rng.wild(),
                4 => r.memory_size = rng.wild(),
                5 => r.userspace_addr = rng.wild(),
                6 => {
                    r.guest_phys_addr |= 1 + rng.below(PAGE - 1);
                    invalid = r.memory_size != 0;
                }
                7 => {
                    r.slot = u32::try_from(rng.below(u64::from(S2PIN_MAX_MEMSLOTS))).unwrap_or(0);
                }
                _ => {}
            }
            let p = Ptr::pick(rng);
            let bad_ptr = !matches!(p, Ptr::Good | Ptr::ReadOnly);
            let buf = ArgBuf::of(self, p, &r);
            let arg = buf.addr;
            let res = Self::ioctl(vm.fd.as_raw_fd(), S2PIN_SET_USER_MEMORY_REGION, arg);
            let expect: &[i32] = match (bad_ptr, self.foreign(&vm), invalid) {
                (true, _, _) => &[libc::EFAULT],
                (false, true, _) => &[libc::EIO],
                (false, false, true) => &[libc::EINVAL, libc::ESHUTDOWN],
                (false, false, false) => &[],
            };
            self.note(
                Call::SetRegion,
                &format!("{r:?} ptr {p:?}"),
                res.map(|_| ()),
                expect,
            );
        }

        /// Whether `o` belongs to another process's mm (the child's inherited fds).
        fn foreign(&self, o: &Obj) -> bool {
            o.owner != std::process::id()
        }

        fn create_vcpu(&self, rng: &mut Rng) {
            let Some(vm) = lock(self.pool).pick(rng, Kind::Vm) else {
                return self.guest(rng);
            };
            if lock(self.pool).count(Kind::Vcpu) >= MAX_VCPUS {
                return self.close(rng);
            }
            let mut c = S2pinCreateVcpu {
                index: u32::try_from(rng.below(4)).unwrap_or(0),
                flags: 0,
                entry: self.img.entry(),
                x0: GuestMode::Fill as u64,
            };
            let mut invalid = false;
            match rng.below(10) {
                0 => {
                    c.index = 64 + u32::try_from(rng.next_u64() >> 40).unwrap_or(0);
                    invalid = true;
                }
                1 => {
                    c.flags = u32::try_from(rng.next_u64() & 0xffff_ffff).unwrap_or(0) | 2;
                    invalid = true;
                }
                2 => {
                    c.entry |= 1 + rng.below(3);
                    invalid = true;
                }
                3 => {
                    c.flags = S2PIN_VCPU_START_OFF;
                    c.entry = 0;
                    c.x0 = 0;
                }
                4 => {
                    c.flags = S2PIN_VCPU_START_OFF;
                    invalid = true;
                }
                5 => c.entry = rng.wild() & !3,
                6 => c.x0 = rng.wild(),
                7 => c.entry = RAM_BASE + (rng.below(TEST_OFFSET + GUEST_MEM) & !3),
                _ => {}
            }
            let p = Ptr::pick(rng);
            let bad_ptr = !matches!(p, Ptr::Good | Ptr::ReadOnly);
            let buf = ArgBuf::of(self, p, &c);
            let arg = buf.addr;
            let res = Self::ioctl(vm.fd.as_raw_fd(), S2PIN_CREATE_VCPU, arg);
            // Another mm is refused before the argument is read.
            let expect: &[i32] = match (self.foreign(&vm), bad_ptr, invalid) {
                (true, _, _) => &[libc::EIO],
                (false, true, _) => &[libc::EFAULT],
                (false, false, true) => &[libc::EINVAL, libc::ESHUTDOWN],
                (false, false, false) => &[],
            };
            let what = format!("{c:?} ptr {p:?}");
            match res {
                Ok(fd) => {
                    self.note(Call::CreateVcpu, &what, Ok(()), expect);
                    let fd = Self::adopt(fd);
                    let run = if rng.chance(3, 4) {
                        self.map(fd.as_raw_fd(), PAGE as usize, 0, libc::MAP_SHARED, &[])
                    } else {
                        None
                    };
                    self.push(Obj {
                        kind: Kind::Vcpu,
                        fd,
                        owner: std::process::id(),
                        window: (0, 0),
                        run,
                    });
                }
                Err(e) => self.note(Call::CreateVcpu, &what, Err(e), expect),
            }
        }

        fn stats(&self, rng: &mut Rng) {
            let Some(vm) = lock(self.pool).pick(rng, Kind::Vm) else {
                return;
            };
            let mut s = S2pinVmStats::default();
            let p = Ptr::pick(rng);
            let arg = self.ptr(p, (&raw mut s) as usize, core::mem::size_of_val(&s));
            let res = Self::ioctl(vm.fd.as_raw_fd(), S2PIN_GET_STATS, arg);
            let expect: &[i32] = if p == Ptr::Good { &[] } else { &[libc::EFAULT] };
            self.note(
                Call::GetStats,
                &format!("ptr {p:?}"),
                res.map(|_| ()),
                expect,
            );
        }

        /// RUN a vCPU once (the watchdog signals a run that takes long).
        fn run(&self, rng: &mut Rng) {
            let Some(v) = lock(self.pool).pick(rng, Kind::Vcpu) else {
                return self.guest(rng);
            };
            let arg = if rng.chance(1, 10) {
                rng.wild() as usize | 1
            } else {
                0
            };
            let start = u64::try_from(self.t0.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            self.slot.1.store(start, Ordering::SeqCst);
            let res = Self::ioctl(v.fd.as_raw_fd(), S2PIN_RUN, arg);
            self.slot.1.store(0, Ordering::SeqCst);
            let expect: &[i32] = match (arg != 0, self.foreign(&v)) {
                (true, _) => &[libc::EINVAL],
                (false, true) => &[libc::EIO],
                (false, false) => &[],
            };
            self.note(Call::Run, &format!("arg {arg:#x}"), res.map(|_| ()), expect);
            if res == Err(libc::EINTR) {
                lock(self.tally).runs_kicked += 1;
            }
            if let (Ok(_), Some(addr)) = (res, v.run) {
                self.peek(addr);
            }
        }

        /// Records the exit reason a run page shows.
        fn peek(&self, addr: usize) {
            let off = core::mem::offset_of!(s2pin_uapi::S2pinRun, exit_reason);
            // SAFETY: `addr` is a live shared mapping of a vCPU's run page
            // (one page, the kernel keeps it until munmap); exit_reason is
            // an aligned u32 inside it.
            let reason = unsafe { ((addr + off) as *const u32).read_volatile() };
            let name = s2pin_uapi::ExitReason::from_u32(reason)
                .map_or_else(|| format!("unknown {reason}"), |r| r.c_name().to_string());
            *lock(self.tally).exits.entry(name).or_default() += 1;
        }

        /// `mmap` of `fd`: the address, if it succeeded.
        fn map(
            &self,
            fd: RawFd,
            len: usize,
            off: i64,
            flags: i32,
            expect: &[i32],
        ) -> Option<usize> {
            // SAFETY: a new mapping of an fd of ours at an address the
            // kernel chooses; nothing else is touched.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    off,
                )
            };
            let what = format!("len {len:#x} off {off:#x} flags {flags:#x}");
            if p == libc::MAP_FAILED {
                self.note(Call::Mmap, &what, Err(errno()), expect);
                return None;
            }
            self.note(Call::Mmap, &what, Ok(()), expect);
            Some(p as usize)
        }

        fn mmap(&self, rng: &mut Rng) {
            let Some(o) = lock(self.pool).any(rng) else {
                return self.open();
            };
            let page = PAGE as usize;
            let (len, off, flags) = match rng.below(6) {
                0 => (2 * page, 0, libc::MAP_SHARED),
                1 => (
                    page,
                    PAGE as i64 * (1 + rng.below(4) as i64),
                    libc::MAP_SHARED,
                ),
                2 => (page, 0, libc::MAP_PRIVATE),
                3 => ((rng.below(64) as usize + 1) * page, 0, libc::MAP_SHARED),
                _ => (page, 0, libc::MAP_SHARED),
            };
            let good = o.kind == Kind::Vcpu && len == page && off == 0 && flags == libc::MAP_SHARED;
            // The uapi documents these mmap failures: `expect`
            // only says that a bad mapping must fail.
            let expect: &[i32] = if good {
                &[]
            } else {
                &[libc::EINVAL, libc::ENODEV, libc::EACCES]
            };
            if lock(self.pool).maps.len() >= MAX_MAPS {
                self.unmap_one(0);
            }
            if let Some(addr) = self.map(o.fd.as_raw_fd(), len, off, flags, expect) {
                lock(self.pool).maps.push((addr, len));
            }
        }

        fn unmap_one(&self, i: usize) {
            let m = {
                let mut p = lock(self.pool);
                if p.maps.is_empty() {
                    return;
                }
                let i = i.min(p.maps.len() - 1);
                p.maps.swap_remove(i)
            };
            // SAFETY: a mapping this fuzzer made and removed from the pool
            // just now; nobody else uses it.
            unsafe { libc::munmap(m.0 as *mut libc::c_void, m.1) };
        }

        fn munmap(&self, rng: &mut Rng) {
            let n = lock(self.pool).maps.len();
            self.unmap_one(rng.index(n));
        }

        /// Drops a pool fd: closed now, or when the last thread using it is done.
        fn close(&self, rng: &mut Rng) {
            let mut p = lock(self.pool);
            if !p.objs.is_empty() {
                let i = rng.index(p.objs.len());
                let o = p.objs.swap_remove(i);
                drop(p);
                if self.verbose {
                    println!("{} close {:?} fd {}", self.who, o.kind, o.fd.as_raw_fd());
                }
                drop(o);
            }
        }

        /// Drops, protects or zeroes guest memory a slot may use.
        fn memory_change(&self, rng: &mut Rng) {
            let m = {
                let mut p = lock(self.pool);
                if p.mems.is_empty() {
                    return;
                }
                let i = rng.index(p.mems.len());
                if rng.chance(1, 3) {
                    // munmap when the last user lets go.
                    drop(p.mems.swap_remove(i));
                    return;
                }
                Arc::clone(&p.mems[i])
            };
            let pages = (m.len() as u64 - TEST_OFFSET) / PAGE;
            let first = rng.below(pages);
            let r = crate::layout::Range {
                offset: TEST_OFFSET + first * PAGE,
                len: (1 + rng.below(pages - first)) * PAGE,
            };
            let _ = match rng.below(4) {
                0 => m.dontneed(r),
                1 => m.protect(r, Some(crate::args::Prot::None)),
                2 => m.protect(r, Some(crate::args::Prot::ReadOnly)),
                _ => m.protect(r, None),
            };
        }

        /// Ioctl numbers nobody knows, or known ones on the wrong fd kind or
        /// with the wrong size or direction: all `ENOTTY`.
        fn bad_ioctl(&self, rng: &mut Rng) {
            let Some(o) = lock(self.pool).any(rng) else {
                return self.open();
            };
            let known = [
                S2PIN_GET_API_VERSION,
                S2PIN_CREATE_VM,
                S2PIN_GET_VCPU_MMAP_SIZE,
                S2PIN_SET_USER_MEMORY_REGION,
                S2PIN_CREATE_VCPU,
                S2PIN_GET_STATS,
                S2PIN_RUN,
            ];
            let mine: &[u32] = match o.kind {
                Kind::Dev => &known[0..3],
                Kind::Vm => &known[3..6],
                Kind::Vcpu => &known[6..],
            };
            let cmd = match rng.below(5) {
                // A number of another kind of fd.
                0 => known[rng.index(known.len())],
                // The right number, another size.
                1 => {
                    let nr = u8::try_from(mine[rng.index(mine.len())] & 0xff).unwrap_or(0);
                    let size = 1 + rng.index(200);
                    if rng.chance(1, 2) {
                        iow(nr, size)
                    } else {
                        ior(nr, size)
                    }
                }
                // The right number and size, the other direction.
                2 => mine[rng.index(mine.len())] ^ (3 << 30),
                // Any number of our type.
                3 => {
                    (rng.next_u64() as u32 & 0xc03f_00ff)
                        | (u32::from(s2pin_uapi::S2PIN_IOCTL_TYPE) << 8)
                }
                // KVM's type byte.
                _ => (rng.next_u64() as u32 & 0xc03f_00ff) | (0xAE << 8),
            };
            if mine.contains(&cmd) {
                return;
            }
            let arg = self.ptr(Ptr::pick(rng), self.pages.rw, 8);
            let res = Self::ioctl(o.fd.as_raw_fd(), cmd, arg);
            self.note(
                Call::BadIoctl,
                &format!("{:?} fd, cmd {cmd:#x}", o.kind),
                res.map(|_| ()),
                &[libc::ENOTTY],
            );
        }

        /// One random step.
        fn step(&self, rng: &mut Rng) {
            match rng.below(100) {
                0..=2 => self.open(),
                3..=6 => self.small_ioctls(rng),
                7..=14 => self.create_vm(rng),
                15..=22 => self.guest(rng),
                23..=36 => self.set_region(rng),
                37..=46 => self.create_vcpu(rng),
                47..=51 => self.stats(rng),
                52..=66 => self.run(rng),
                67..=72 => self.mmap(rng),
                73..=76 => self.munmap(rng),
                77..=84 => self.close(rng),
                85..=88 => self.memory_change(rng),
                _ => self.bad_ioctl(rng),
            }
        }
    }

    /// Signals threads that have been in RUN longer than [`RUN_LIMIT`].
    fn watchdog(slots: &[(AtomicU64, AtomicU64)], t0: Instant, done: &AtomicBool) {
        let limit = u64::try_from(RUN_LIMIT.as_millis()).unwrap_or(u64::MAX);
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            let now = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
            for (tid, since) in slots {
                let s = since.load(Ordering::SeqCst);
                let id = tid.load(Ordering::SeqCst);
                if s != 0 && id != 0 && now.saturating_sub(s) > limit {
                    // SAFETY: the pthread_t of a fuzz thread of this scope
                    // (joined only after the watchdog stops); the kick
                    // signal's handler is installed and does nothing.
                    unsafe { libc::pthread_kill(id as libc::pthread_t, runner::kick_signal()) };
                }
            }
        }
    }

    /// Runs `iters` steps on each of `threads` threads over `pool`.
    #[allow(clippy::too_many_arguments)]
    fn fuzz_threads(
        pool: &Mutex<Pool>,
        tally: &Mutex<Tally>,
        pages: &Pages,
        image: &[u8],
        img: Image,
        seed: u64,
        first_stream: u64,
        threads: u32,
        iters: u64,
        verbose: bool,
        child: bool,
    ) {
        let t0 = Instant::now();
        let slots: Vec<(AtomicU64, AtomicU64)> = (0..threads)
            .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
            .collect();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let dog = s.spawn(|| watchdog(&slots, t0, &done));
            let hs: Vec<_> = (0..threads)
                .map(|i| {
                    let slot = &slots[i as usize];
                    let who = if child {
                        format!("child.{i}")
                    } else {
                        format!("t{i}")
                    };
                    s.spawn(move || {
                        // SAFETY: no preconditions.
                        slot.0
                            .store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
                        let ctx = Ctx {
                            pool,
                            tally,
                            pages,
                            image,
                            img,
                            slot,
                            t0,
                            verbose,
                            who: &who,
                        };
                        let mut rng = Rng::new(seed, first_stream + u64::from(i));
                        let n = iters / u64::from(threads)
                            + u64::from(u64::from(i) < iters % u64::from(threads));
                        for _ in 0..n {
                            ctx.step(&mut rng);
                        }
                        slot.0.store(0, Ordering::SeqCst);
                    })
                })
                .collect();
            for h in hs {
                let _ = h.join();
            }
            done.store(true, Ordering::SeqCst);
            let _ = dog.join();
        });
    }

    fn debugfs_u64(name: &str) -> Option<u64> {
        std::fs::read_to_string(format!("/sys/kernel/debug/s2pin/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// VMs still in the module's debugfs under one of `pids`.
    fn vms_of(pids: &[u32]) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir("/sys/kernel/debug/s2pin") else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.split_once('-')
                    .and_then(|(p, _)| p.parse::<u32>().ok())
                    .is_some_and(|p| pids.contains(&p))
            })
            .collect()
    }

    fn print_tally(who: &str, t: &Tally) -> u64 {
        let mut line = format!("{who}: {} calls;", t.calls);
        for c in Call::ALL {
            let of: Vec<String> = t
                .results
                .iter()
                .filter(|((k, _), _)| *k == c)
                .map(|((_, e), n)| {
                    if *e == 0 {
                        format!("ok {n}")
                    } else {
                        format!("{} {n}", errno_name(*e))
                    }
                })
                .collect();
            if !of.is_empty() {
                line.push_str(&format!(" {} [{}]", c.name(), of.join(" ")));
            }
        }
        println!("{line}");
        let exits: Vec<String> = t.exits.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "{who}: runs signalled by the watchdog {}; exit reasons seen on run pages: {}",
            t.runs_kicked,
            if exits.is_empty() {
                "none".into()
            } else {
                exits.join(", ")
            }
        );
        for ((c, e), n) in &t.gaps {
            let why = KNOWN_GAPS
                .iter()
                .find(|(k, g, _)| k == c && g == e)
                .map_or("", |(_, _, w)| *w);
            println!(
                "{who}: FINDING (known, docs silent) {} {} x{n}: {why}",
                c.name(),
                errno_name(*e)
            );
        }
        for ((c, d), n) in &t.bad {
            println!("{who}: FAIL {} x{n}: {d}", c.name());
        }
        t.bad.values().sum()
    }

    /// The errno's symbolic name.
    fn errno_name(e: i32) -> String {
        let names = [
            (libc::EPERM, "EPERM"),
            (libc::ENOENT, "ENOENT"),
            (libc::EINTR, "EINTR"),
            (libc::EIO, "EIO"),
            (libc::EBADF, "EBADF"),
            (libc::EAGAIN, "EAGAIN"),
            (libc::ENOMEM, "ENOMEM"),
            (libc::EACCES, "EACCES"),
            (libc::EFAULT, "EFAULT"),
            (libc::EBUSY, "EBUSY"),
            (libc::EEXIST, "EEXIST"),
            (libc::ENODEV, "ENODEV"),
            (libc::EINVAL, "EINVAL"),
            (libc::ENFILE, "ENFILE"),
            (libc::EMFILE, "EMFILE"),
            (libc::ENOTTY, "ENOTTY"),
            (libc::ENOSPC, "ENOSPC"),
            (libc::ERANGE, "ERANGE"),
            (libc::ESHUTDOWN, "ESHUTDOWN"),
        ];
        names
            .iter()
            .find(|(n, _)| *n == e)
            .map_or_else(|| format!("errno{e}"), |(_, s)| (*s).to_string())
    }

    /// The child: fuzzes the inherited pool (another mm) and VMs of its own,
    /// then exits with 0 if every result was as documented.
    fn child_main(pool: &Mutex<Pool>, image: &[u8], img: Image, a: &FuzzArgs) -> i32 {
        let Ok(pages) = Pages::new() else {
            return 2;
        };
        let tally = Mutex::new(Tally::default());
        fuzz_threads(
            pool,
            &tally,
            &pages,
            image,
            img,
            a.seed,
            1000,
            1,
            (a.iters / 4).max(1),
            a.verbose,
            true,
        );
        *lock(pool) = Pool::default();
        let bad = print_tally("s2vmm fuzz: child", &lock(&tally));
        i32::from(bad > 0)
    }

    /// `s2vmm fuzz`: returns the exit status (0: every result documented and
    /// nothing left behind).
    pub fn run(a: &FuzzArgs) -> anyhow::Result<i32> {
        let image = std::fs::read(&a.image).with_context(|| format!("{}", a.image.display()))?;
        let img = Image::parse(&image).with_context(|| format!("{}", a.image.display()))?;
        runner::install_kick_handler().map_err(anyhow::Error::msg)?;
        // Loads the module if needed, and checks the API version.
        drop(crate::s2pin::S2pin::open()?);
        let pages = Pages::new().context("mapping the bad-pointer pages")?;
        let pool = Mutex::new(Pool::new(if a.shared { MAX_VMS_SHARED } else { MAX_VMS }));
        let tally = Mutex::new(Tally::default());
        println!(
            "s2vmm fuzz: seed {} iterations {} threads {}{}",
            a.seed,
            a.iters,
            a.threads,
            if a.no_fork { "" } else { " and a forked child" }
        );
        let t0 = Instant::now();
        // Some objects for the child to inherit, made on this thread alone.
        let mut rng = Rng::new(a.seed, 999);
        {
            let dummy = (AtomicU64::new(0), AtomicU64::new(0));
            let ctx = Ctx {
                pool: &pool,
                tally: &tally,
                pages: &pages,
                image: &image,
                img,
                slot: &dummy,
                t0,
                verbose: a.verbose,
                who: "setup",
            };
            ctx.open();
            ctx.guest(&mut rng);
            ctx.guest(&mut rng);
        }
        let mut child = None;
        if !a.no_fork {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            // SAFETY: only this thread exists now (the fuzz threads start
            // below); the child runs its own threads and leaves with _exit.
            match unsafe { nix::unistd::fork() }? {
                nix::unistd::ForkResult::Child => {
                    let code = child_main(&pool, &image, img, a);
                    let _ = std::io::stdout().flush();
                    // SAFETY: ends the child without the parent's destructors.
                    unsafe { libc::_exit(code) };
                }
                nix::unistd::ForkResult::Parent { child: c } => child = Some(c),
            }
        }
        fuzz_threads(
            &pool, &tally, &pages, &image, img, a.seed, 0, a.threads, a.iters, a.verbose, false,
        );
        // Close in a random order.
        loop {
            let mut p = lock(&pool);
            if p.objs.is_empty() && p.maps.is_empty() && p.mems.is_empty() {
                break;
            }
            let pick = rng.below(3);
            if pick == 0 && !p.objs.is_empty() {
                let i = rng.index(p.objs.len());
                drop(p.objs.swap_remove(i));
            } else if pick == 1 && !p.maps.is_empty() {
                let i = rng.index(p.maps.len());
                let (addr, len) = p.maps.swap_remove(i);
                // SAFETY: a mapping of the pool, removed from it just now.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            } else if !p.mems.is_empty() {
                let i = rng.index(p.mems.len());
                drop(p.mems.swap_remove(i));
            }
        }
        let mut child_ok = true;
        let mut pids = vec![std::process::id()];
        if let Some(c) = child {
            pids.push(u32::try_from(c.as_raw()).unwrap_or(0));
            let st = nix::sys::wait::waitpid(c, None)?;
            child_ok = matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0));
            if !child_ok {
                println!("s2vmm fuzz: FAIL the child ended {st:?}");
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let bad = print_tally("s2vmm fuzz", &lock(&tally));
        // Nothing left: teardown is synchronous on the last close, but give
        // a dying process's VMs a moment.
        let mut left = vms_of(&pids);
        for _ in 0..50 {
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            left = vms_of(&pids);
        }
        let mut ok = bad == 0 && child_ok && left.is_empty();
        if !left.is_empty() {
            println!("s2vmm fuzz: FAIL VMs left in debugfs: {}", left.join(" "));
        }
        let global = (debugfs_u64("pinned"), debugfs_u64("vms"));
        if !a.shared {
            match global {
                (Some(0), Some(0)) => {}
                (p, v) => {
                    ok = false;
                    println!(
                        "s2vmm fuzz: FAIL module counts after the run: pinned {p:?}, vms {v:?}"
                    );
                }
            }
        }
        println!(
            "s2vmm fuzz: {} in {secs:.1} s: {} calls, {bad} unexpected results, VMs left {}, module pinned {} vms {}",
            if ok { "PASS" } else { "FAIL" },
            lock(&tally).calls,
            left.len(),
            global.0.map_or("?".into(), |v| v.to_string()),
            global.1.map_or("?".into(), |v| v.to_string()),
        );
        Ok(i32::from(!ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_the_same_for_a_seed_and_differs_per_stream() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7, 0);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7, 0);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(7, 1);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(1, 2);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
        let w: std::collections::BTreeSet<u64> = (0..2000).map(|_| r.wild()).collect();
        assert!(w.contains(&u64::MAX) && w.contains(&0) && w.contains(&(1 << 48)));
    }

    #[test]
    fn the_oracle_follows_the_documented_table() {
        // Documented errors of a call pass; others are findings.
        assert_eq!(
            judge(Call::SetRegion, Err(libc::EEXIST), &[]),
            Verdict::Fine
        );
        assert_eq!(
            judge(Call::GetStats, Err(libc::EINVAL), &[]),
            Verdict::Undocumented
        );
        assert_eq!(
            judge(Call::Run, Err(libc::ENOENT), &[]),
            Verdict::Undocumented
        );
        assert_eq!(judge(Call::Run, Ok(()), &[]), Verdict::Fine);
        // A call built to fail must fail, and for the right reason.
        assert_eq!(
            judge(Call::CreateVm, Ok(()), &[libc::EINVAL]),
            Verdict::Wrong
        );
        assert_eq!(
            judge(Call::CreateVm, Err(libc::ENOMEM), &[libc::EINVAL]),
            Verdict::Wrong
        );
        assert_eq!(
            judge(Call::BadIoctl, Err(libc::ENOTTY), &[libc::ENOTTY]),
            Verdict::Fine
        );
        assert_eq!(
            judge(Call::BadIoctl, Err(libc::EINVAL), &[libc::ENOTTY]),
            Verdict::Wrong
        );
        // The mmap and CREATE_VM errnos the fuzzer found are documented now.
        assert_eq!(
            judge(Call::Mmap, Err(libc::EINVAL), &[libc::EINVAL, libc::ENODEV]),
            Verdict::Fine
        );
        assert_eq!(judge(Call::Mmap, Ok(()), &[libc::EINVAL]), Verdict::Wrong);
        assert_eq!(judge(Call::Mmap, Err(libc::ENODEV), &[]), Verdict::Fine);
        assert_eq!(judge(Call::CreateVm, Err(libc::EINTR), &[]), Verdict::Fine);
        assert!(KNOWN_GAPS.is_empty());
        assert_eq!(
            judge(Call::Mmap, Err(libc::EPERM), &[]),
            Verdict::Undocumented
        );
    }
}
