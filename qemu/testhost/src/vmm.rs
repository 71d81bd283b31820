//! A small VMM on raw hypercalls: VMs whose memory arrives page by page on
//! memory-fault exits, the guest payload copied in from where QEMU's loader
//! put it, console lines collected per vCPU, and a run loop that serves
//! exits (`docs/ABI.md` §3.7, §5) and hands the rest to the caller.
//!
//! Host frames come from [`Frames`], a pool of its own above the
//! conformance pool, reused case after case once every VM is gone.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hypercalls::{
    Access, CounterGroup, Counters, FaultKind, GuestMemory, GuestPage, HypError, Hypercall,
    IpaBits, PageCount, Prot, Reply, RuntimeCounters, VcpuCount, VcpuExit, VcpuIndex, VcpuStart,
    VmHandle,
};
use spin::Mutex;

use crate::harness::{gfn, pfn};
use crate::{arch, hv, rt, say};

/// Where the runner's loader puts the guest payload (boot contract).
pub const PAYLOAD_ADDR: u64 = boot_contract::GUEST_PAYLOAD_ADDR;
/// Largest payload image (`__image_size`, bss included).
pub const PAYLOAD_MAX: u64 = boot_contract::GUEST_PAYLOAD_MAX;
/// The command word the runner sets (boot contract).
pub const COMMAND_ADDR: u64 = boot_contract::GUEST_COMMAND_ADDR;
/// The command word that asks for the benchmark.
pub const COMMAND_BENCH: u64 = boot_contract::GUEST_COMMAND_BENCH;

/// The first frame of guest RAM (boot contract `GUEST_RAM_IPA`).
pub const RAM_GFN: u64 = boot_contract::GUEST_RAM_IPA >> 12;
/// The payload's load IPA.
pub const IMAGE_IPA: u64 = boot_contract::GUEST_IMAGE_IPA;
/// The payload's tested memory starts at this IPA (the first 2 MiB
/// boundary after the largest image, which `payload()` checks).
pub const TEST_IPA: u64 = boot_contract::GUEST_TEST_IPA;

/// Frames for guests: [FRAMES_FIRST, FRAMES_END), 512 MiB from 0x9000_0000,
/// above the conformance pool (0x8000_0000..0x9000_0000).
const FRAMES_FIRST: u64 = 0x9_0000;
const FRAMES_END: u64 = 0xb_0000;
static NEXT: AtomicU64 = AtomicU64::new(FRAMES_FIRST);
/// Frames below this were handed out before and may hold old data.
static USED: AtomicU64 = AtomicU64::new(FRAMES_FIRST);

/// The guest-frame pool.
#[derive(Debug)]
pub struct Frames;

impl Frames {
    /// Checks the pool is host RAM clear of the image.
    pub fn check() -> Result<(), String> {
        let p = rt::platform();
        let (a, b) = (FRAMES_FIRST << 12, FRAMES_END << 12);
        if !p.ram.iter().any(|&(s, e)| s <= a && b <= e) {
            return Err(format!("guest frame pool {a:#x}..{b:#x} is not host RAM"));
        }
        let (is, ie) = rt::image_range();
        if is < b && a < ie {
            return Err("guest frame pool overlaps the image".into());
        }
        Ok(())
    }

    /// `n` zeroed frames, the first a multiple of `align`.
    pub fn alloc(n: u64, align: u64) -> Result<u64, String> {
        let align = align.max(1);
        loop {
            let cur = NEXT.load(Ordering::SeqCst);
            let start = cur.next_multiple_of(align);
            if start + n > FRAMES_END {
                return Err("guest frame pool exhausted".into());
            }
            if NEXT
                .compare_exchange(cur, start + n, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let used = USED.fetch_max(start + n, Ordering::SeqCst);
                for p in start..(start + n).min(used) {
                    zero_frame(p);
                }
                return Ok(start);
            }
        }
    }

    /// Starts handing out frames from the beginning again; only when no
    /// VM holds any (every VM of the last case torn down).
    pub fn reset() {
        NEXT.store(FRAMES_FIRST, Ordering::SeqCst);
    }
}

fn zero_frame(p: u64) {
    // SAFETY: `p` is a frame of the guest pool that was just handed out
    // (host OWNED: nothing shares or owns it yet), identity-mapped as normal
    // memory by BOOT_PT.
    unsafe { core::ptr::write_bytes((p << 12) as *mut u8, 0, 4096) };
}

/// Writes `v` at byte offset `off` (8-aligned) of host frame `p`.
pub fn poke_frame(p: u64, off: u64, v: u64) {
    // SAFETY: the callers pass frames of the guest pool that the host owns
    // or shares (its stage 2 maps them); the offset is inside the page.
    unsafe { (((p << 12) + (off & 0xff8)) as *mut u64).write_volatile(v) };
}

/// Reads the word at offset `off` of host frame `p`; an injected abort
/// (the frame is not the host's) comes back as `Err`.
pub fn peek_frame(p: u64, off: u64) -> Result<u64, arch::Fault> {
    arch::probe_read((p << 12) + (off & 0xff8))
}

/// The payload image, if QEMU's loader put one at [`PAYLOAD_ADDR`].
pub fn payload() -> Option<&'static [u8]> {
    let magic = arch::probe_read(PAYLOAD_ADDR + 56).ok()?;
    if magic & 0xffff_ffff != u64::from(u32::from_le_bytes(*b"ARM\x64")) {
        return None;
    }
    let size = arch::probe_read(PAYLOAD_ADDR + 16).ok()?;
    if size == 0 || size > PAYLOAD_MAX || IMAGE_IPA + size > TEST_IPA {
        return None;
    }
    // SAFETY: [PAYLOAD_ADDR, +size) is host RAM the loader filled (the rest
    // up to size is untouched RAM) that nothing else in the test host uses;
    // it is only read.
    Some(unsafe { core::slice::from_raw_parts(PAYLOAD_ADDR as *const u8, size as usize) })
}

/// The payload's secondary-vCPU entry as a guest IPA (the offset in its
/// Image header's `res4`, at byte 0x30; 0 or out of the image: none).
pub fn secondary_entry(image: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = image.get(0x30..0x38)?.try_into().ok()?;
    let off = u64::from_le_bytes(bytes);
    (off != 0 && off < image.len() as u64 && off.is_multiple_of(4)).then_some(IMAGE_IPA + off)
}

/// What the test host was asked to do with the payload.
pub fn bench_requested() -> bool {
    arch::probe_read(COMMAND_ADDR).ok() == Some(COMMAND_BENCH)
}

/// A host call that must succeed.
pub fn ok(c: Hypercall) -> Result<Reply, String> {
    hv::call(&c)
        .result
        .map_err(|e| format!("{c:?} failed: {e:?}"))
}

/// What a run loop hook sees.
#[derive(Debug)]
pub enum Event<'a> {
    /// A complete console line of the vCPU (without the newline).
    Line(&'a str),
    /// Any other exit.
    Exit(&'a VcpuExit),
}

/// What the hook wants done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Serve the exit as usual.
    Default,
    /// The hook served it: run again.
    Continue,
    /// Stop and return this exit.
    Stop,
    /// The hook emulated an MMIO read: run again with this value (x3).
    Read(u64),
}

/// How a run loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// `HYP_GUEST_SHUTDOWN` or PSCI SYSTEM_OFF.
    Done,
    /// The vCPU is powered off.
    PoweredOff,
    /// The hook stopped on this exit, or an exit the loop does not serve.
    Exit(VcpuExit),
    /// The hook stopped on a console line.
    Line(String),
}

/// Bound on exits of one run loop.
const MAX_EXITS: u64 = 1 << 22;

/// One VM.
#[derive(Debug)]
pub struct Vm {
    /// Its handle.
    pub handle: VmHandle,
    /// Its memory: frames `[RAM_GFN, mem_end)`.
    pub mem_end: u64,
    image: &'static [u8],
    /// Memory faults served with a fresh page, per vCPU (up to 4).
    pub faults: [AtomicU64; 4],
    /// Console lines, per vCPU.
    lines: Mutex<Vec<(usize, String)>>,
    partial: Mutex<[Vec<u8>; 4]>,
    /// Whether to share fresh pages on memory faults inside the memory.
    pub demand: bool,
    /// Prefix of printed console lines.
    tag: usize,
    destroyed: AtomicUsize,
}

static TAGS: AtomicUsize = AtomicUsize::new(0);

impl Vm {
    /// Creates a VM of `ipa_bits` with `nr_vcpus` and `mib` MiB of memory
    /// above the image (`[RAM_GFN, TEST_IPA + mib MiB)`), tops its
    /// memcache up and creates its vCPUs: vCPU 0 enters the payload with
    /// `arg`, the others start powered off.
    pub fn new(
        ipa_bits: u8,
        nr_vcpus: u16,
        mib: u64,
        arg: u64,
        image: &'static [u8],
    ) -> Result<Self, String> {
        let start = |i: u16| {
            if i == 0 {
                VcpuStart::On {
                    entry: IMAGE_IPA,
                    arg,
                }
            } else {
                VcpuStart::Off
            }
        };
        Self::with_starts(ipa_bits, nr_vcpus, mib, &start, image)
    }

    /// As [`new`](Self::new), with vCPU `i` created as `start(i)` says.
    pub fn with_starts(
        ipa_bits: u8,
        nr_vcpus: u16,
        mib: u64,
        start: &dyn Fn(u16) -> VcpuStart,
        image: &'static [u8],
    ) -> Result<Self, String> {
        let bits = IpaBits::new(ipa_bits).ok_or("bad ipa_bits")?;
        let n = u64::from(bits.root_table_pages());
        let root = Frames::alloc(n, n)?;
        let mem_end = (TEST_IPA >> 12) + (mib << 8);
        let memory = GuestMemory::new(bits, gfn(RAM_GFN), mem_end - RAM_GFN)
            .ok_or("guest memory beyond the IPA size")?;
        let handle = match ok(Hypercall::VmCreate {
            ipa_bits: bits,
            nr_vcpus: VcpuCount::new(nr_vcpus).ok_or("bad nr_vcpus")?,
            root: pfn(root),
            memory: Some(memory),
        })? {
            Reply::VmCreated { vm } => vm,
            r => return Err(format!("VM_CREATE replied {r:?}")),
        };
        let vm = Self {
            handle,
            mem_end,
            image,
            faults: [const { AtomicU64::new(0) }; 4],
            lines: Mutex::new(Vec::new()),
            partial: Mutex::new([const { Vec::new() }; 4]),
            demand: true,
            tag: TAGS.fetch_add(1, Ordering::SeqCst),
            destroyed: AtomicUsize::new(0),
        };
        vm.topup(8)?;
        for i in 0..nr_vcpus {
            let vcpu = VcpuIndex::new(i).ok_or("bad vcpu")?;
            vm.with_memcache(Hypercall::VcpuCreate {
                vm: handle,
                vcpu,
                start: start(i),
            })?;
        }
        Ok(vm)
    }

    /// Donates `n` fresh frames to the memcache.
    pub fn topup(&self, n: u32) -> Result<(), String> {
        let p = Frames::alloc(u64::from(n), 1)?;
        ok(Hypercall::MemcacheTopup {
            vm: self.handle,
            pfn: pfn(p),
            nr: PageCount::new(n).ok_or("bad count")?,
        })
        .map(|_| ())
    }

    /// Issues `c`, topping the memcache up and retrying on ENOMEM.
    pub fn with_memcache(&self, c: Hypercall) -> Result<Reply, String> {
        for _ in 0..16 {
            match hv::call(&c).result {
                Err(HypError::NoMemory) => self.topup(8)?,
                Ok(r) => return Ok(r),
                Err(e) => return Err(format!("{c:?} failed: {e:?}")),
            }
        }
        Err(format!("{c:?}: ENOMEM after 16 top-ups"))
    }

    /// Like [`Vm::with_memcache`], returning the error code instead.
    pub fn try_call(&self, c: Hypercall) -> Result<Reply, HypError> {
        for _ in 0..16 {
            match hv::call(&c).result {
                Err(HypError::NoMemory) => {
                    if self.topup(8).is_err() {
                        return Err(HypError::NoMemory);
                    }
                }
                r => return r,
            }
        }
        Err(HypError::NoMemory)
    }

    /// Shares host frame `p` at guest frame `g`.
    pub fn share(&self, p: u64, g: u64, prot: Prot) -> Result<(), String> {
        self.with_memcache(Hypercall::Share {
            vm: self.handle,
            pfn: pfn(p),
            gfn: gfn(g),
            nr: PageCount::ONE,
            prot,
        })
        .map(|_| ())
    }

    /// Donates host frame `p` at guest frame `g`.
    pub fn donate(&self, p: u64, g: u64) -> Result<(), String> {
        self.with_memcache(Hypercall::Donate {
            vm: self.handle,
            pfn: pfn(p),
            gfn: gfn(g),
            nr: PageCount::ONE,
            prot: Prot::RWX,
        })
        .map(|_| ())
    }

    /// Unshares host frame `p` from guest frame `g`.
    pub fn unshare(&self, p: u64, g: u64) -> Result<(), String> {
        ok(Hypercall::Unshare {
            vm: self.handle,
            pfn: pfn(p),
            gfn: gfn(g),
            nr: PageCount::ONE,
        })
        .map(|_| ())
    }

    /// The frame mapped at `g`, if any.
    pub fn mapped(&self, g: u64) -> Result<Option<u64>, String> {
        match ok(Hypercall::GuestPageState {
            vm: self.handle,
            gfn: gfn(g),
        })? {
            Reply::GuestPage(GuestPage::Mapped { pfn, .. }) => Ok(Some(pfn.raw())),
            Reply::GuestPage(GuestPage::Unmapped) => Ok(None),
            r => Err(format!("GUEST_PAGE_STATE replied {r:?}")),
        }
    }

    /// The runtime counters (`HYP_COUNTERS_RUNTIME`).
    pub fn runtime(&self) -> Result<RuntimeCounters, String> {
        match ok(Hypercall::VmCounters {
            vm: self.handle,
            group: CounterGroup::Runtime,
        })? {
            Reply::Counters(Counters::Runtime(c)) => Ok(c),
            r => Err(format!("VM_COUNTERS replied {r:?}")),
        }
    }

    /// Maps what the guest faulted on at `g`: the payload's page inside
    /// the image, a fresh zeroed page elsewhere in the memory. Returns
    /// false if `g` is outside the memory (or demand paging is off there).
    fn fault_in(&self, g: u64, vcpu: usize) -> Result<bool, String> {
        if !(RAM_GFN..self.mem_end).contains(&g) {
            return Ok(false);
        }
        let img_first = IMAGE_IPA >> 12;
        let img_end = img_first + (self.image.len() as u64).div_ceil(4096);
        if (img_first..img_end).contains(&g) {
            let p = Frames::alloc(1, 1)?;
            let off = ((g - img_first) << 12) as usize;
            let src = &self.image[off..(off + 4096).min(self.image.len())];
            // SAFETY: `p` is a fresh host-owned frame of the pool, mapped
            // by BOOT_PT; `src` is at most a page.
            unsafe {
                core::ptr::copy_nonoverlapping(src.as_ptr(), (p << 12) as *mut u8, src.len())
            };
            self.share_racy(p, g)?;
            return Ok(true);
        }
        if !self.demand {
            return Ok(false);
        }
        let p = Frames::alloc(1, 1)?;
        if self.share_racy(p, g)? {
            if let Some(f) = self.faults.get(vcpu) {
                f.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(true)
    }

    /// Shares `p` at `g`; another vCPU's CPU may have mapped `g` first
    /// (EEXIST: then `p` stays unused). Returns whether `p` was mapped.
    fn share_racy(&self, p: u64, g: u64) -> Result<bool, String> {
        match self.try_call(Hypercall::Share {
            vm: self.handle,
            pfn: pfn(p),
            gfn: gfn(g),
            nr: PageCount::ONE,
            prot: Prot::RWX,
        }) {
            Ok(_) => Ok(true),
            Err(HypError::Exists) => Ok(false),
            Err(e) => Err(format!("HYP_SHARE of frame {p:#x} at gfn {g:#x}: {e:?}")),
        }
    }

    /// Console lines of `vcpu` so far.
    pub fn lines(&self, vcpu: usize) -> Vec<String> {
        self.lines
            .lock()
            .iter()
            .filter(|(v, _)| *v == vcpu)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// One `HYP_VCPU_RUN`.
    pub fn run_once(&self, vcpu: usize, mmio_data: u64) -> Result<VcpuExit, HypError> {
        let c = Hypercall::VcpuRun {
            vm: self.handle,
            vcpu: VcpuIndex::new(vcpu as u16).ok_or(HypError::InvalidArgument)?,
            mmio_data,
        };
        match hv::call(&c).result? {
            Reply::Exit(e) => Ok(e),
            _ => Err(HypError::Unknown(hv::MALFORMED)),
        }
    }

    /// Runs `vcpu` until the guest is done, the vCPU is powered off, or
    /// `hook` stops; serves memory faults (payload and demand pages),
    /// console output (printed, collected, lines given to `hook`), WFx,
    /// interrupts and share/unshare requests. MMIO and unhandled traps end
    /// the loop unless `hook` serves them.
    pub fn serve(
        &self,
        vcpu: usize,
        hook: &mut dyn FnMut(&Self, Event<'_>) -> Flow,
    ) -> Result<End, String> {
        let mut exits = 0u64;
        let mut mmio = 0;
        while exits < MAX_EXITS {
            exits += 1;
            let e = self
                .run_once(vcpu, mmio)
                .map_err(|e| format!("VCPU_RUN of vCPU {vcpu} failed: {e:?}"))?;
            mmio = 0;
            if let VcpuExit::Console(bytes) = e {
                if let Some(line) = self.console(vcpu, bytes.as_bytes()) {
                    if hook(self, Event::Line(&line)) == Flow::Stop {
                        return Ok(End::Line(line));
                    }
                }
                continue;
            }
            match hook(self, Event::Exit(&e)) {
                Flow::Stop => return Ok(End::Exit(e)),
                Flow::Continue => continue,
                Flow::Read(v) => {
                    mmio = v;
                    continue;
                }
                Flow::Default => {}
            }
            match e {
                VcpuExit::Interrupted | VcpuExit::Wfx { .. } | VcpuExit::Console(_) => {}
                VcpuExit::MemFault {
                    gfn,
                    kind: FaultKind::Unmapped,
                    ..
                } => {
                    if !self.fault_in(gfn.raw(), vcpu)? {
                        return Ok(End::Exit(e));
                    }
                }
                VcpuExit::ShareRequest { gfn, nr } => {
                    // Honoured only inside the memory; refusals are the
                    // host's business, the guest just runs on.
                    let (g, n) = (gfn.raw(), u64::from(nr.get()));
                    if g >= RAM_GFN && g.saturating_add(n) <= self.mem_end {
                        for g in g..g + n {
                            if self.mapped(g)?.is_none() {
                                self.fault_in(g, vcpu)?;
                            }
                        }
                    } else {
                        say!("  vm{}.{vcpu}: refused share request {g:#x}+{n}", self.tag);
                    }
                }
                VcpuExit::UnshareRequest { gfn, nr } => {
                    let g = gfn.raw();
                    let n = u64::from(nr.get()).min(16);
                    for g in g..g.saturating_add(n) {
                        if let Ok(Some(p)) = self.mapped(g) {
                            let _ = self.unshare(p, g);
                        }
                    }
                }
                VcpuExit::Shutdown | VcpuExit::SystemOff { .. } => return Ok(End::Done),
                VcpuExit::PoweredOff => return Ok(End::PoweredOff),
                VcpuExit::MemFault { .. }
                | VcpuExit::UnhandledTrap { .. }
                | VcpuExit::Mmio { .. } => return Ok(End::Exit(e)),
            }
        }
        Err(format!("vCPU {vcpu}: no end after {MAX_EXITS} exits"))
    }

    /// Runs vCPU 0 to the end with demand paging; fails on any other end.
    pub fn run_to_end(&self) -> Result<(), String> {
        match self.serve(0, &mut |_, _| Flow::Default)? {
            End::Done => Ok(()),
            other => Err(format!(
                "the guest ended with {other:?}; console: {:?}",
                self.lines(0)
            )),
        }
    }

    fn console(&self, vcpu: usize, bytes: &[u8]) -> Option<String> {
        let mut partial = self.partial.lock();
        let buf = partial.get_mut(vcpu)?;
        buf.extend_from_slice(bytes);
        // A guest that never ends its line gets it cut at 200 bytes.
        let (end, skip) = match buf.iter().position(|&b| b == b'\n') {
            Some(nl) => (nl, 1),
            None if buf.len() >= 200 => (buf.len(), 0),
            None => return None,
        };
        let line: String = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + skip);
        drop(partial);
        say!("  vm{}.{vcpu}| {line}", self.tag);
        self.lines.lock().push((vcpu, line.clone()));
        Some(line)
    }

    /// Tears the VM down (start, reclaim until done, finalize).
    pub fn destroy(&self) -> Result<(), String> {
        if self.destroyed.swap(1, Ordering::SeqCst) != 0 {
            return Ok(());
        }
        let vm = self.handle;
        ok(Hypercall::TeardownStart { vm })?;
        for _ in 0..100_000 {
            if let Reply::Teardown(t) = ok(Hypercall::TeardownReclaim { vm })? {
                if !t.more {
                    ok(Hypercall::TeardownFinalize { vm })?;
                    return Ok(());
                }
            }
        }
        Err(format!("{vm:?}: HYP_TEARDOWN_RECLAIM never said done"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.destroyed.load(Ordering::SeqCst) == 0 {
            if let Err(e) = self.destroy() {
                say!("  vm{}: teardown failed: {e}", self.tag);
            }
        }
    }
}

/// A memory fault exit at `g`, any access and kind.
pub fn is_fault_at(e: &VcpuExit, g: u64) -> bool {
    matches!(e, VcpuExit::MemFault { gfn, .. } if gfn.raw() == g)
}

/// A memory fault exit at `g` of this access and kind.
pub fn is_fault(e: &VcpuExit, g: u64, access: Access, kind: FaultKind) -> bool {
    matches!(e, VcpuExit::MemFault { gfn, access: a, kind: k } if gfn.raw() == g && *a == access && *k == kind)
}
