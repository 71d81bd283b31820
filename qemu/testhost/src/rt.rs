//! Boot in Rust: heap, device tree, secondary CPUs, the run, power-off; and
//! the small SMP toolkit the concurrency cases use.

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use buddy_system_allocator::LockedHeap;
use spin::{Mutex, Once};

use crate::arch::{self, MAX_CPUS};
use crate::say;

const HEAP_SIZE: usize = 2 << 20;

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: handed to the heap exactly once, in primary_main.
unsafe impl Sync for Arena {}

static HEAP_MEM: Arena = Arena(UnsafeCell::new([0; HEAP_SIZE]));

/// What the device tree says.
#[derive(Debug)]
pub struct Platform {
    /// Host RAM, byte ranges `[base, end)`.
    pub ram: Vec<(u64, u64)>,
    /// MPIDR of every CPU, boot CPU first.
    pub cpus: Vec<u64>,
    /// The GICv3, if the device tree has one.
    pub gic: Option<GicRegions>,
}

/// Where a GICv3's registers are: `(base, size)` of each region.
#[derive(Clone, Copy, Debug)]
pub struct GicRegions {
    /// The distributor.
    pub gicd: (u64, u64),
    /// The redistributors (RD and SGI frames, 128 KiB per CPU).
    pub gicr: (u64, u64),
}

static PLATFORM: Once<Platform> = Once::new();

/// The platform (parsed before any case runs).
pub fn platform() -> &'static Platform {
    PLATFORM.get().expect("platform parsed at boot")
}

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// `[start, end)` of this image in memory (code, data, stacks, heap).
pub fn image_range() -> (u64, u64) {
    // Linker symbols: only their addresses are taken.
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

fn parse_dtb(dtb: u64) -> Option<Platform> {
    // SAFETY: el2 put the host's device tree at `dtb` (boot contract), in RAM
    // identity-mapped by BOOT_PT; `from_ptr` checks the header and size.
    let fdt = unsafe { fdt::Fdt::from_ptr(dtb as *const u8) }.ok()?;
    if let Some(uart) = fdt
        .find_compatible(&["arm,pl011"])
        .and_then(|n| n.reg()?.next())
    {
        crate::console::set_base(uart.starting_address as u64);
    }
    let ram = fdt
        .memory()
        .regions()
        .filter_map(|r| {
            Some((
                r.starting_address as u64,
                r.starting_address as u64 + r.size? as u64,
            ))
        })
        .collect();
    let me = arch::mpidr();
    let mut cpus: Vec<u64> = fdt.cpus().map(|c| c.ids().first() as u64).collect();
    if let Some(i) = cpus.iter().position(|&m| m == me) {
        cpus.swap(0, i);
    }
    let gic = fdt.find_compatible(&["arm,gic-v3"]).and_then(|n| {
        let mut reg = n.reg()?;
        let mut next = || {
            let r = reg.next()?;
            Some((r.starting_address as u64, r.size? as u64))
        };
        Some(GicRegions {
            gicd: next()?,
            gicr: next()?,
        })
    });
    Some(Platform { ram, cpus, gic })
}

static TASK: Mutex<Option<fn(usize)>> = Mutex::new(None);
static GO: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static DONE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Number of CPUs ready for [`run_on`] (indices 0..n).
pub fn online() -> usize {
    ONLINE
        .iter()
        .take_while(|o| o.load(Ordering::SeqCst))
        .count()
}

/// Runs `f(cpu)` on CPUs 0..n at once (this CPU is 0) and waits for all.
pub fn run_on(n: usize, f: fn(usize)) {
    let n = n.clamp(1, online().max(1));
    *TASK.lock() = Some(f);
    let gens: Vec<u32> = (1..n)
        .map(|i| GO[i].fetch_add(1, Ordering::SeqCst) + 1)
        .collect();
    arch::sev();
    f(0);
    for (i, g) in (1..n).zip(gens) {
        while DONE[i].load(Ordering::SeqCst) != g {
            arch::wfe();
        }
    }
}

/// A reusable barrier for `n` CPUs.
#[derive(Debug)]
pub struct Barrier {
    n: AtomicUsize,
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    /// A barrier (set its size with [`Barrier::reset`]).
    pub const fn new() -> Self {
        Self {
            n: AtomicUsize::new(1),
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    /// Sets the number of CPUs; call while nobody waits.
    pub fn reset(&self, n: usize) {
        self.n.store(n.max(1), Ordering::SeqCst);
        self.count.store(0, Ordering::SeqCst);
    }

    /// Waits until all CPUs arrived.
    pub fn wait(&self) {
        let g = self.generation.load(Ordering::SeqCst);
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.n.load(Ordering::SeqCst) {
            self.count.store(0, Ordering::SeqCst);
            self.generation.fetch_add(1, Ordering::SeqCst);
            arch::sev();
        } else {
            while self.generation.load(Ordering::SeqCst) == g {
                arch::wfe();
            }
        }
    }
}

/// Rust entry of the boot CPU (MMU on, CPU 0's stack).
#[unsafe(no_mangle)]
extern "C" fn primary_main(dtb: u64) -> ! {
    // SAFETY: HEAP_MEM is used for nothing else, and this runs once.
    unsafe { HEAP.lock().init(HEAP_MEM.0.get() as usize, HEAP_SIZE) };
    say!("testhost: conformance test host at EL1, DTB at {dtb:#x}");
    let Some(plat) = parse_dtb(dtb) else {
        say!("FAIL boot: no valid device tree at {dtb:#x}");
        say!("0 passed, 1 failed");
        arch::system_off()
    };
    say!(
        "testhost: RAM {:x?}, {} CPUs, image {:x?}",
        plat.ram,
        plat.cpus.len(),
        image_range()
    );
    let cpus = plat.cpus.clone();
    PLATFORM.call_once(|| plat);
    ONLINE[0].store(true, Ordering::SeqCst);
    for (i, &m) in cpus.iter().enumerate().take(MAX_CPUS).skip(1) {
        let r = arch::cpu_on(m, i);
        if r != 0 {
            say!("testhost: CPU_ON {m:#x} returned {r}");
            break;
        }
        let (start, f) = arch::timer();
        while !ONLINE[i].load(Ordering::SeqCst) {
            if arch::timer().0 - start > 5 * f {
                say!("testhost: CPU {i} did not come up");
                break;
            }
            core::hint::spin_loop();
        }
    }
    say!("testhost: {} CPUs online", online());
    let (t0, f) = arch::timer();
    // With the guest payload loaded (`cargo xtask test guest`), the guest
    // cases run instead of the conformance cases.
    let (passed, failed) = if crate::guests::present() {
        crate::guests::run_all()
    } else {
        crate::cases::run_all()
    };
    let ms = (arch::timer().0 - t0) * 1000 / f;
    say!("testhost: cases took {ms} ms");
    say!("{passed} passed, {failed} failed");
    arch::system_off()
}

/// Rust entry of a secondary CPU.
#[unsafe(no_mangle)]
extern "C" fn secondary_main(index: u64) -> ! {
    let i = index as usize;
    ONLINE[i].store(true, Ordering::SeqCst);
    let mut seen = 0;
    loop {
        let g = GO[i].load(Ordering::SeqCst);
        if g == seen {
            arch::wfe();
            continue;
        }
        seen = g;
        let f = *TASK.lock();
        if let Some(f) = f {
            f(i);
        }
        DONE[i].store(g, Ordering::SeqCst);
        arch::sev();
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::console::print_unlocked(format_args!("FATAL panic on CPU {}: {info}", arch::cpu()));
    arch::system_off()
}
