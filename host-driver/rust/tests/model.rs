//! The host side, model-checked (issue 12, item 4).
//!
//! `s2pin.ko` keeps its state in C (`host-driver/kmod/s2pin_shim.c`) and asks
//! this crate for every decision: slot validation and lookup, the
//! fault/invalidate sequence count ([`InvState`]), which pinned pages a host
//! range covers, unshare runs, and each policy's decision at
//! `invalidate_range_start` and per page at `invalidate_range_end`. This test
//! puts those decisions into a world they can get wrong:
//!
//! - a fake host mm: per page a VMA protection and a PTE (absent, or a frame
//!   with its write and `PROT_NONE` bits), frames with the host's reference
//!   and the pins on them, GUP (demand fault, NUMA hint fault, write fault,
//!   `FOLL_FORCE` under keep), and the changes the kernel makes between
//!   `range_start` and `range_end` of each MMU-notifier event (zap, migrate,
//!   NUMA `PROT_NONE`, `mprotect`, write-protect);
//! - a fake EL2 that maps gfn -> (frame, writable) and refuses any share,
//!   unshare, write-protect or relax that does not fit what it maps;
//! - [`Shim`]: the C glue's sequence of steps (fault: look up, snapshot,
//!   pin, recheck, share; notifier start, end; slot changes; teardown),
//!   line for line, calling the crate's real functions for every decision;
//! - [`Model`]: a reference model written from docs/DESIGN.md §9, not from
//!   the code, that predicts after every operation exactly which gfns EL2
//!   maps, to which frame and whether writable.
//!
//! 2 MiB blocks (DESIGN.md §9 "2 MiB blocks") are modelled with `BLOCK`
//! (4) pages: THP-backed host pages get contiguous aligned frames, the fake
//! EL2 keeps blocks and a memcache count (a split takes one page, else
//! `HYP_ENOMEM`), and the model predicts splits and whole-block unmaps;
//! EL2's blocks, the model's and the pin table's block bits must agree.
//!
//! Random operations (faults in one step or split into start / pin /
//! finish so that invalidations and slot changes fall in between, every
//! notifier event type with a PTE change applied between its start and
//! end, overlapping invalidations, host accesses, slot creation and
//! deletion, `HYP_SHARE` failing with `ENOMEM`, teardown) run under each
//! policy. After every operation:
//!
//! 1. EL2's mappings are exactly the model's.
//! 2. The pin table and EL2 agree page for page (same frame, read-only bit
//!    = not writable), and `pinned_now` equals the mapped pages: every
//!    mapped gfn holds exactly one pin, on the frame it maps. Each frame's
//!    pins equal its stage-2 mappings plus the faults that hold a pin on it
//!    between pin and recheck (the only other pins).
//! 3. Every mapped gfn's host PTE maps the same frame (no gfn maps a frame
//!    the host replaced or freed); no freed frame is mapped.
//! 4. With no invalidation in progress: a gfn mapped writable has a
//!    writable PTE, and a mapped page is `PROT_NONE` only under keep in an
//!    accessible VMA.
//! 5. Per event: a frame-changing event leaves nothing of its range mapped
//!    when `range_start` returns; a protection event unmaps nothing at
//!    start under confirm and keep; at `range_end`, confirm never unmaps a
//!    page whose PTE kept its access (present, same frame, not
//!    `PROT_NONE`), and keep unmaps nothing whose frame stayed when the VMA
//!    is accessible.
//! 6. Every unpin happens after EL2 stopped mapping that pin's page: after
//!    it, the frame still has at least as many pins as stage-2 mappings.
//!
//! `cargo test` runs 20,000 operations; the long form 10^6 (or
//! `S2PIN_MODEL_OPS`): `cargo test --release -p s2pin-core --test model --
//! --ignored --nocapture`, or `cargo xtask model`. Both print their count.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use s2pin_core::shim::{
    at_end, at_start, check_region, event, find_slot, is_protection, slot_page_range, walk_at_end,
    InvState, Memslot, PageAction, PteState, RegionOp, StartAction, UnshareRun, Window,
};
use s2pin_uapi::{Policy, S2pinUserspaceMemoryRegion, S2PIN_MEM_READONLY};

/// Host pages the test's address space has.
const HVA_PAGES: usize = 24;
/// Host address of page 0.
const HVA_BASE: u64 = 0x7f00_0000_0000;
/// The VM's RAM window.
const WIN: Window = Window {
    base_gfn: 0x40000,
    pages: 24,
};
/// Slot ids the test uses (the module has 32; 3 collide more).
const NSLOTS: usize = 3;
/// Gfns one `HYP_UNSHARE_RANGE` or `HYP_WRPROTECT` run spans at most
/// (`HYP_MAX_PAGES_PER_CALL`, 512, in s2pin_shim.c): 5 here, so that runs
/// also end by their length in the 24-page world.
const RUN_PAGES: usize = 5;
/// Pins one lock hold drops at most (`struct unpin_buf`: 512 in
/// s2pin_shim.c, `BATCH` 32 when its allocation fails): 7 here, so that
/// holds end by it too.
const UNPIN_CAP: usize = 7;
/// At most this many invalidations in progress at once.
const MAX_INVS: usize = 2;
/// At most this many faults between start and finish at once.
const MAX_FAULTS: usize = 3;
/// Operations per generated case.
const CASE_OPS: usize = 200;
/// `EFAULT`.
const EFAULT: i32 = 14;
/// Pages of a stage-2 block here. s2pin_shim.c's is 512 (2 MiB); no step
/// depends on the size, and 4 lets the 24-page world hold several.
const BLOCK: usize = 4;
/// Host pages `[0, THP_PAGES)` are THP-backed: a first touch of a whole
/// absent, writable, `BLOCK`-aligned group maps one large folio of
/// contiguous, aligned frames (a PMD-mapped THP).
const THP_PAGES: usize = 12;
/// Memcache pages `vm_topup()` adds at `HYP_ENOMEM` (`TOPUP_PAGES`).
const TOPUP: u32 = 8;
/// Free memcache pages a block share leaves (`BLOCK_SPARE`).
const BLOCK_SPARE: u32 = 2;
/// Pin entry bits (s2pin_shim.c's `PIN_RO`, `PIN_BLOCK`).
const E_RO: u64 = 1;
const E_BLOCK: u64 = 2;

fn hva(page: usize) -> u64 {
    HVA_BASE + ((page as u64) << 12)
}

fn page_of(hva: u64) -> usize {
    usize::try_from((hva - HVA_BASE) >> 12).unwrap()
}

/// What the runs did, summed over every case (printed with the count, so
/// that a run that exercises nothing shows).
mod stats {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub static MAPPED: AtomicU64 = AtomicU64::new(0);
    pub static UPGRADED: AtomicU64 = AtomicU64::new(0);
    pub static RETRIED: AtomicU64 = AtomicU64::new(0);
    pub static UNMAPPED_START: AtomicU64 = AtomicU64::new(0);
    pub static UNMAPPED_END: AtomicU64 = AtomicU64::new(0);
    pub static WRPROTECTED: AtomicU64 = AtomicU64::new(0);
    pub static KEPT_PROTNONE: AtomicU64 = AtomicU64::new(0);
    pub static BLOCKS: AtomicU64 = AtomicU64::new(0);
    pub static BLOCK_WHOLE: AtomicU64 = AtomicU64::new(0);
    pub static BLOCK_SPLITS: AtomicU64 = AtomicU64::new(0);
    pub static BLOCK_FALLBACKS: AtomicU64 = AtomicU64::new(0);
    pub static BLOCK_WRPROTECTS: AtomicU64 = AtomicU64::new(0);
    pub static RANGE_UNSHARES: AtomicU64 = AtomicU64::new(0);
    pub static PFN_UNSHARES: AtomicU64 = AtomicU64::new(0);
    pub static WRPROTECT_RUNS: AtomicU64 = AtomicU64::new(0);
    pub static MULTI_PAGE_RUNS: AtomicU64 = AtomicU64::new(0);

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn line() -> std::string::String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        std::format!(
            "{} faults mapped, {} write upgrades, {} retries; notifiers unmapped {} pages at start, {} at end, write-protected {}, kept {} PROT_NONE; {} blocks shared, {} unshared whole, {} split, {} whole-block fallbacks, {} write-protected whole; {} HYP_UNSHARE_RANGE, {} HYP_UNSHARE without it, {} HYP_WRPROTECT runs, {} runs of more than one page",
            g(&MAPPED), g(&UPGRADED), g(&RETRIED), g(&UNMAPPED_START), g(&UNMAPPED_END), g(&WRPROTECTED), g(&KEPT_PROTNONE),
            g(&BLOCKS), g(&BLOCK_WHOLE), g(&BLOCK_SPLITS), g(&BLOCK_FALLBACKS), g(&BLOCK_WRPROTECTS),
            g(&RANGE_UNSHARES), g(&PFN_UNSHARES), g(&WRPROTECT_RUNS), g(&MULTI_PAGE_RUNS)
        )
    }
}

// ---- the fake host mm -------------------------------------------------

/// A VMA's protection (per page here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vma {
    Rw,
    Ro,
    None,
}

/// A host PTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pte {
    Absent,
    Present {
        frame: u64,
        /// The write bit (kept under a NUMA `PROT_NONE`, as on 6.1).
        write: bool,
        protnone: bool,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct Frame {
    /// A PTE maps it (the host's reference).
    host_ref: bool,
    /// Our pins.
    pins: u32,
    /// Back with the allocator (never reused: frame ids only grow).
    freed: bool,
    /// Part of a large folio of `BLOCK` frames (a THP).
    large: bool,
}

/// What the kernel does to the PTEs between `range_start` and `range_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Nothing (a THP split, a VMA split, a failed attempt).
    Nothing,
    /// The PTE goes and the host drops the frame (munmap, MADV_DONTNEED).
    Zap,
    /// Migration: a new frame, unless the old one has pins.
    Migrate,
    /// NUMA balancing's `PROT_NONE` (accessible VMAs only).
    NumaNone,
    /// `mprotect()` to this protection.
    Mprotect(Vma),
    /// Write-protect (soft dirty, `PROTECTION_PAGE`).
    WrProtect,
}

#[derive(Debug)]
struct Host {
    vma: [Vma; HVA_PAGES],
    pte: [Pte; HVA_PAGES],
    /// Index = frame number; frame 0 is never used (0 is "no pin").
    frames: Vec<Frame>,
}

impl Host {
    fn new() -> Self {
        Self {
            vma: [Vma::Rw; HVA_PAGES],
            pte: [Pte::Absent; HVA_PAGES],
            frames: vec![Frame::default()],
        }
    }

    fn alloc(&mut self) -> u64 {
        self.frames.push(Frame {
            host_ref: true,
            pins: 0,
            freed: false,
            large: false,
        });
        (self.frames.len() - 1) as u64
    }

    /// A THP: `BLOCK` contiguous frames from a `BLOCK`-aligned one (the
    /// frame ids skipped for the alignment are never used).
    fn alloc_block(&mut self) -> u64 {
        while !self.frames.len().is_multiple_of(BLOCK) {
            self.frames.push(Frame {
                freed: true,
                ..Frame::default()
            });
        }
        let f0 = self.frames.len() as u64;
        for _ in 0..BLOCK {
            self.frames.push(Frame {
                host_ref: true,
                pins: 0,
                freed: false,
                large: true,
            });
        }
        f0
    }

    fn frame(&mut self, f: u64) -> &mut Frame {
        &mut self.frames[usize::try_from(f).unwrap()]
    }

    /// Frees `f` if nothing holds it.
    fn maybe_free(&mut self, f: u64) {
        let fr = self.frame(f);
        if !fr.host_ref && fr.pins == 0 {
            fr.freed = true;
        }
    }

    /// A host access (the VMM, a NUMA hint fault): demand fault, hint fault
    /// (restores the protection, no notifier), write fault (sets write).
    /// The frame never changes here.
    fn touch(&mut self, p: usize, write: bool) -> Result<(), i32> {
        let vma = self.vma[p];
        if vma == Vma::None || (write && vma != Vma::Rw) {
            return Err(EFAULT);
        }
        let g0 = p - p % BLOCK;
        if p < THP_PAGES
            && (g0..g0 + BLOCK).all(|q| self.pte[q] == Pte::Absent && self.vma[q] == Vma::Rw)
        {
            let f0 = self.alloc_block();
            for k in 0..BLOCK {
                self.pte[g0 + k] = Pte::Present {
                    frame: f0 + k as u64,
                    write: true,
                    protnone: false,
                };
            }
        }
        match self.pte[p] {
            Pte::Absent => {
                let frame = self.alloc();
                self.pte[p] = Pte::Present {
                    frame,
                    write: vma == Vma::Rw,
                    protnone: false,
                };
            }
            Pte::Present {
                frame, write: w, ..
            } => {
                self.pte[p] = Pte::Present {
                    frame,
                    write: w || write,
                    protnone: false,
                };
            }
        }
        Ok(())
    }

    /// `pin_user_pages(FOLL_LONGTERM [| FOLL_WRITE] [| FOLL_FORCE])` of page
    /// `p`: the frame, pinned.
    fn gup(&mut self, p: usize, write: bool, force: bool) -> Result<u64, i32> {
        let vma = self.vma[p];
        if vma == Vma::None || (write && vma != Vma::Rw) {
            return Err(EFAULT);
        }
        let follow = match self.pte[p] {
            // FOLL_FORCE follows a protnone entry unless it must fault
            // for write anyway.
            Pte::Present {
                frame,
                write: w,
                protnone: true,
            } if force && (w || !write) => Some(frame),
            Pte::Present {
                frame,
                write: w,
                protnone: false,
            } if w || !write => Some(frame),
            _ => None,
        };
        let frame = if let Some(f) = follow {
            f
        } else {
            self.touch(p, write)?;
            match self.pte[p] {
                Pte::Present { frame, .. } => frame,
                Pte::Absent => unreachable!(),
            }
        };
        self.frame(frame).pins += 1;
        Ok(frame)
    }

    /// Applies `c` to the pages `[p0, p1)`.
    fn apply(&mut self, c: Change, p0: usize, p1: usize) {
        for p in p0..p1 {
            let pte = self.pte[p];
            match (c, pte) {
                (Change::Nothing, _) | (_, Pte::Absent) => {
                    if let Change::Mprotect(v) = c {
                        self.vma[p] = v;
                    }
                }
                (Change::Zap, Pte::Present { frame, .. }) => {
                    self.pte[p] = Pte::Absent;
                    self.frame(frame).host_ref = false;
                    self.maybe_free(frame);
                }
                (
                    Change::Migrate,
                    Pte::Present {
                        frame,
                        write,
                        protnone,
                    },
                ) => {
                    if self.frame(frame).pins == 0 {
                        let new = self.alloc();
                        self.pte[p] = Pte::Present {
                            frame: new,
                            write,
                            protnone,
                        };
                        self.frame(frame).host_ref = false;
                        self.maybe_free(frame);
                    }
                }
                (Change::NumaNone, Pte::Present { frame, write, .. }) => {
                    if self.vma[p] != Vma::None {
                        self.pte[p] = Pte::Present {
                            frame,
                            write,
                            protnone: true,
                        };
                    }
                }
                (Change::Mprotect(v), Pte::Present { frame, write, .. }) => {
                    self.vma[p] = v;
                    self.pte[p] = match v {
                        Vma::Rw => Pte::Present {
                            frame,
                            write,
                            protnone: false,
                        },
                        Vma::Ro => Pte::Present {
                            frame,
                            write: false,
                            protnone: false,
                        },
                        Vma::None => Pte::Present {
                            frame,
                            write: false,
                            protnone: true,
                        },
                    };
                }
                (
                    Change::WrProtect,
                    Pte::Present {
                        frame, protnone, ..
                    },
                ) => {
                    self.pte[p] = Pte::Present {
                        frame,
                        write: false,
                        protnone,
                    };
                }
            }
        }
    }
}

// ---- the fake EL2 -------------------------------------------------------

#[derive(Debug, Default)]
struct El2 {
    /// gfn -> (frame, writable).
    map: BTreeMap<u64, (u64, bool)>,
    /// First gfns of the blocks (ABI.md §2.8).
    blocks: BTreeSet<u64>,
    /// Free memcache pages (a split takes one).
    memcache: u32,
    /// `HYP_UNSHARE_RANGE` answers `HYP_NOT_SUPPORTED` (an older EL2).
    no_range: bool,
}

/// `HYP_UNSHARE_RANGE`'s answers the shim tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RangeReply {
    /// x1: the pages unshared.
    Done(u64),
    NoMem,
    NotSupported,
}

fn block_of(gfn: u64) -> u64 {
    gfn - gfn % BLOCK as u64
}

impl El2 {
    /// `HYP_SHARE` of `BLOCK` pages from `BLOCK`-aligned `gfn` and `frame`:
    /// one block.
    fn share_block(&mut self, gfn: u64, frame: u64, writable: bool) -> Result<(), String> {
        let b = BLOCK as u64;
        if !gfn.is_multiple_of(b)
            || !frame.is_multiple_of(b)
            || (gfn..gfn + b).any(|g| self.map.contains_key(&g))
        {
            return Err(format!("block HYP_SHARE gfn {gfn:#x} frame {frame:#x}"));
        }
        for k in 0..b {
            self.map.insert(gfn + k, (frame + k, writable));
        }
        self.blocks.insert(gfn);
        Ok(())
    }

    /// Splits the block holding `gfn` for a change of part of it: `false`
    /// (`HYP_ENOMEM`, nothing changed) with no memcache page.
    fn split(&mut self, gfn: u64) -> bool {
        let b = block_of(gfn);
        if !self.blocks.contains(&b) {
            return true;
        }
        if self.memcache == 0 {
            return false;
        }
        self.memcache -= 1;
        self.blocks.remove(&b);
        true
    }

    /// `HYP_WRPROTECT` of a whole block: no memory.
    fn wrprotect_block(&mut self, gfn: u64) -> Result<(), String> {
        if !self.blocks.contains(&gfn) {
            return Err(format!("block HYP_WRPROTECT of gfn {gfn:#x}: no block"));
        }
        for k in 0..BLOCK as u64 {
            self.map.get_mut(&(gfn + k)).unwrap().1 = false;
        }
        Ok(())
    }

    fn share(&mut self, gfn: u64, frame: u64, writable: bool) -> Result<(), String> {
        if self.map.contains_key(&gfn) {
            return Err(format!("HYP_SHARE of mapped gfn {gfn:#x}"));
        }
        self.map.insert(gfn, (frame, writable));
        Ok(())
    }

    /// `Ok(false)`: `HYP_ENOMEM` (part of a block, no memcache page for
    /// each such block), nothing changed.
    fn unshare(&mut self, r: UnshareRun) -> Result<bool, String> {
        if r.len == 0 || r.len > u64::from(hypercalls::MAX_PAGES_PER_CALL) {
            return Err(format!("HYP_UNSHARE of {} pages", r.len));
        }
        for i in 0..r.len {
            match self.map.get(&(r.gfn + i)) {
                Some(&(f, _)) if f == r.pfn + i => {}
                other => {
                    return Err(format!(
                        "HYP_UNSHARE gfn {:#x} pfn {:#x}: EL2 maps {other:?}",
                        r.gfn + i,
                        r.pfn + i
                    ))
                }
            }
        }
        let b = BLOCK as u64;
        let touched: Vec<u64> = self
            .blocks
            .iter()
            .copied()
            .filter(|&g| g < r.gfn + r.len && r.gfn < g + b)
            .collect();
        let parts = touched
            .iter()
            .filter(|&&g| !(r.gfn <= g && g + b <= r.gfn + r.len))
            .count() as u32;
        if parts > self.memcache {
            return Ok(false);
        }
        self.memcache -= parts;
        for g in touched {
            self.blocks.remove(&g);
        }
        for i in 0..r.len {
            self.map.remove(&(r.gfn + i));
        }
        Ok(true)
    }

    /// Counts the blocks `[gfn, gfn + n)` covers in part (one memcache page
    /// each to split) and removes every block it touches from the set when
    /// `apply`; `false`: not enough memcache pages (nothing changed).
    fn split_for(&mut self, gfn: u64, n: u64, writable_only: bool, apply: bool) -> bool {
        let b = BLOCK as u64;
        let touched: Vec<u64> = self
            .blocks
            .iter()
            .copied()
            .filter(|&g| g < gfn + n && gfn < g + b)
            .filter(|g| !writable_only || self.map[g].1)
            .collect();
        let parts = touched
            .iter()
            .filter(|&&g| !(gfn <= g && g + b <= gfn + n))
            .count() as u32;
        if parts > self.memcache {
            return false;
        }
        if apply {
            self.memcache -= parts;
            for g in touched {
                if !(gfn <= g && g + b <= gfn + n) {
                    self.blocks.remove(&g);
                }
            }
        }
        true
    }

    /// `HYP_UNSHARE_RANGE` (ABI.md §3.21): every mapped gfn of the range,
    /// whatever frame it maps; holes skipped.
    fn unshare_range(&mut self, gfn: u64, n: u64) -> Result<RangeReply, String> {
        if self.no_range {
            return Ok(RangeReply::NotSupported);
        }
        if n == 0 || n > u64::from(hypercalls::MAX_PAGES_PER_CALL) {
            return Err(format!("HYP_UNSHARE_RANGE of {n} pages"));
        }
        if !self.split_for(gfn, n, false, true) {
            return Ok(RangeReply::NoMem);
        }
        let b = BLOCK as u64;
        let whole: Vec<u64> = self
            .blocks
            .iter()
            .copied()
            .filter(|&g| gfn <= g && g + b <= gfn + n)
            .collect();
        for g in whole {
            self.blocks.remove(&g);
        }
        let mut done = 0;
        for g in gfn..gfn + n {
            if self.map.remove(&g).is_some() {
                done += 1;
            }
        }
        Ok(RangeReply::Done(done))
    }

    /// `HYP_WRPROTECT` of `[gfn, gfn + n)`: holes skipped; `Ok(None)`:
    /// `HYP_ENOMEM` (part of a writable block, no memcache page).
    fn wrprotect_range(&mut self, gfn: u64, n: u64) -> Result<Option<u64>, String> {
        if n == 0 || n > u64::from(hypercalls::MAX_PAGES_PER_CALL) {
            return Err(format!("HYP_WRPROTECT of {n} pages"));
        }
        if !self.split_for(gfn, n, true, true) {
            return Ok(None);
        }
        let mut changed = 0;
        for g in gfn..gfn + n {
            if let Some(m) = self.map.get_mut(&g) {
                changed += u64::from(m.1);
                m.1 = false;
            }
        }
        Ok(Some(changed))
    }

    /// `HYP_WRPROTECT` / `HYP_RELAX_PERMS` of one page; `Ok(false)`:
    /// `HYP_ENOMEM` (it changes a page of a block and the memcache is empty).
    fn set_writable(&mut self, gfn: u64, w: bool) -> Result<bool, String> {
        match self.map.get(&gfn) {
            Some(&(_, old)) if old == w => Ok(true),
            Some(_) => {
                if !self.split(gfn) {
                    return Ok(false);
                }
                self.map.get_mut(&gfn).unwrap().1 = w;
                Ok(true)
            }
            None => Err(format!("permission change of unmapped gfn {gfn:#x}")),
        }
    }

    fn mappings_of(&self, frame: u64) -> u32 {
        self.map.values().filter(|m| m.0 == frame).count() as u32
    }
}

// ---- the shim: s2pin_shim.c's steps, with the crate's decisions --------

/// A pin table entry: `frame << 2 | block | read-only` (0: nothing
/// pinned), as the C table's `struct page *` with bits 1 and 0.
fn entry(frame: u64, ro: bool) -> u64 {
    frame << 2 | u64::from(ro)
}

fn entry_frame(e: u64) -> u64 {
    e >> 2
}

/// The index of the first page of the block holding index `i` of `slot`.
fn block_start(slot: &Memslot, i: usize) -> usize {
    i - usize::try_from((slot.base_gfn + i as u64) % BLOCK as u64).unwrap()
}

/// `block_unshare()`: unshares the pages `[lo, hi)` of the block at index
/// `bs` of the pin table `pins` of a slot at `base_gfn`: the whole block in
/// one call, part of it by a split, or, without a memcache page for the
/// split, the whole block. Returns the first frame and count to unpin.
fn block_unshare(
    el2: &mut El2,
    pins: &mut [u64],
    base_gfn: u64,
    bs: usize,
    lo: usize,
    hi: usize,
) -> Result<(u64, usize), String> {
    let g = base_gfn + bs as u64;
    let f0 = entry_frame(pins[bs]);
    if lo != bs || hi != bs + BLOCK {
        let r = UnshareRun {
            gfn: g + (lo - bs) as u64,
            pfn: f0 + (lo - bs) as u64,
            len: (hi - lo) as u64,
        };
        if el2.unshare(r)? {
            for e in &mut pins[bs..bs + BLOCK] {
                *e &= !E_BLOCK;
            }
            pins[lo..hi].fill(0);
            stats::add(&stats::BLOCK_SPLITS, 1);
            return Ok((r.pfn, hi - lo));
        }
        stats::add(&stats::BLOCK_FALLBACKS, 1);
    }
    let whole = UnshareRun {
        gfn: g,
        pfn: f0,
        len: BLOCK as u64,
    };
    if !el2.unshare(whole)? {
        return Err(format!("whole-block HYP_UNSHARE at gfn {g:#x}: ENOMEM"));
    }
    pins[bs..bs + BLOCK].fill(0);
    stats::add(&stats::BLOCK_WHOLE, 1);
    Ok((f0, BLOCK))
}

#[derive(Debug)]
struct Shim {
    policy: Policy,
    slots: [Memslot; NSLOTS],
    pins: [Option<Vec<u64>>; NSLOTS],
    slot_gen: [u64; NSLOTS],
    inv: InvState,
    dead: bool,
    pinned_now: u64,
    /// EL2 answered `HYP_UNSHARE_RANGE` with `HYP_NOT_SUPPORTED`.
    no_unshare_range: bool,
}

/// A fault between its first look and its recheck.
#[derive(Clone, Copy, Debug)]
struct Pending {
    gfn: u64,
    write: bool,
    idx: usize,
    i: usize,
    hva: u64,
    gen: u64,
    seq: u64,
    /// `Some(e)`: a write-permission fault on a page mapped read-only
    /// (`vcpu_write_upgrade`), e the entry seen.
    upgrade: Option<u64>,
    ro_slot: bool,
    /// After the pin: the frame and whether it is to be mapped read-only.
    pinned: Option<(u64, bool)>,
    /// The model's view when the fault started.
    model_slot_epoch: u64,
    model_end_epoch: u64,
}

/// How a fault ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Mapped,
    /// Mapped with its whole block (one `HYP_SHARE` of `BLOCK` pages).
    MappedBlock,
    /// A write upgrade in a block whose frame changed: the page (or, with
    /// no memcache page for the split, its block) unmapped; the guest
    /// re-faults.
    Unmapped,
    Upgraded,
    Retry,
    Topup,
    /// Nothing to do (mapped meanwhile, VM dead).
    Nothing,
    /// `S2PIN_EXIT_MEM_FAULT` to user space.
    User,
}

/// An invalidation between `range_start` and `range_end`.
#[derive(Clone, Copy, Debug)]
struct Inv {
    ev: u32,
    p0: usize,
    p1: usize,
    change: Change,
    applied: bool,
}

/// `struct pin_run`: slot indices `[lo, hi)` whose pinned pages get one
/// call (the others in between are holes); `pages` 0: empty.
#[derive(Clone, Copy, Debug, Default)]
struct PinRun {
    lo: usize,
    hi: usize,
    pages: usize,
}

impl PinRun {
    /// `run_can_take()`.
    fn can_take(&self, i: usize, contiguous: bool) -> bool {
        self.pages == 0 || (contiguous && i + 1 - self.lo <= RUN_PAGES)
    }

    /// `run_take()`.
    fn take(&mut self, i: usize) {
        if self.pages == 0 {
            self.lo = i;
        }
        self.hi = i + 1;
        self.pages += 1;
    }
}

/// What the run functions change besides the pin table: EL2, the shim's
/// `no_unshare_range`, and the unpin buffer (frames, dropped after the
/// lock).
struct RunCtx<'a> {
    el2: &'a mut El2,
    no_range: &'a mut bool,
    unpin: &'a mut Vec<u64>,
}

/// `run_unshare()`: one `HYP_UNSHARE_RANGE` for the run, or without it one
/// `HYP_UNSHARE` per gfn-and-pfn-contiguous piece; the pins of exactly the
/// pages EL2 unshared go to the unpin buffer.
fn run_unshare(
    cx: &mut RunCtx<'_>,
    pins: &mut [u64],
    base_gfn: u64,
    r: &mut PinRun,
) -> Result<(), String> {
    if r.pages == 0 {
        return Ok(());
    }
    if r.pages > 1 {
        stats::add(&stats::MULTI_PAGE_RUNS, 1);
    }
    if !*cx.no_range {
        match cx
            .el2
            .unshare_range(base_gfn + r.lo as u64, (r.hi - r.lo) as u64)?
        {
            RangeReply::Done(n) => {
                stats::add(&stats::RANGE_UNSHARES, 1);
                if n != r.pages as u64 {
                    return Err(format!(
                        "HYP_UNSHARE_RANGE of {r:?} unshared {n} pages, the pin table has {}",
                        r.pages
                    ));
                }
                for e in &mut pins[r.lo..r.hi] {
                    if *e != 0 {
                        cx.unpin.push(entry_frame(*e));
                        *e = 0;
                    }
                }
                r.pages = 0;
                return Ok(());
            }
            RangeReply::NoMem => {
                return Err(format!(
                    "HYP_UNSHARE_RANGE of {r:?}: ENOMEM (a block in a run)"
                ))
            }
            RangeReply::NotSupported => *cx.no_range = true,
        }
    }
    // run_unshare_by_pfn()
    let mut pr = UnshareRun::default();
    let mut k = r.lo;
    loop {
        let end = k >= r.hi;
        if !end && pins[k] != 0 && pr.extend(base_gfn + k as u64, entry_frame(pins[k])) {
            k += 1;
            continue;
        }
        if pr.len != 0 {
            if !cx.el2.unshare(pr)? {
                return Err(format!("HYP_UNSHARE of run {pr:?}: ENOMEM"));
            }
            stats::add(&stats::PFN_UNSHARES, 1);
            let j0 = usize::try_from(pr.gfn - base_gfn).unwrap();
            for e in &mut pins[j0..j0 + usize::try_from(pr.len).unwrap()] {
                cx.unpin.push(entry_frame(*e));
                *e = 0;
            }
            pr.len = 0;
        }
        if end {
            break;
        }
        if pins[k] != 0 {
            pr.start(base_gfn + k as u64, entry_frame(pins[k]));
        }
        k += 1;
    }
    r.pages = 0;
    Ok(())
}

/// `run_wrprotect()`: one `HYP_WRPROTECT` for the run; refused, the pages
/// are unshared instead.
fn run_wrprotect(
    cx: &mut RunCtx<'_>,
    pins: &mut [u64],
    base_gfn: u64,
    r: &mut PinRun,
) -> Result<(), String> {
    if r.pages == 0 {
        return Ok(());
    }
    match cx
        .el2
        .wrprotect_range(base_gfn + r.lo as u64, (r.hi - r.lo) as u64)?
    {
        None => run_unshare(cx, pins, base_gfn, r),
        Some(_) => {
            stats::add(&stats::WRPROTECT_RUNS, 1);
            for e in &mut pins[r.lo..r.hi] {
                if *e != 0 {
                    *e |= E_RO;
                }
            }
            r.pages = 0;
            Ok(())
        }
    }
}

/// `unmap_pinned()`: one lock hold's worth of unmapping the pinned pages
/// of `[*cur, last)`; a block ends the hold (its frames returned).
fn unmap_pinned(
    cx: &mut RunCtx<'_>,
    pins: &mut [u64],
    slot: &Memslot,
    cur: &mut usize,
    last: usize,
) -> Result<(u64, usize), String> {
    let mut r = PinRun::default();
    let mut bu = (0, 0);
    let mut i = *cur;
    while i < last {
        if pins[i] == 0 {
            i += 1;
            continue;
        }
        if pins[i] & E_BLOCK != 0 {
            let bs = block_start(slot, i);
            let hi = (bs + BLOCK).min(last);
            run_unshare(cx, pins, slot.base_gfn, &mut r)?;
            bu = block_unshare(cx.el2, pins, slot.base_gfn, bs, i, hi)?;
            i = hi;
            break;
        }
        if cx.unpin.len() + r.pages >= UNPIN_CAP {
            break;
        }
        if !r.can_take(i, true) {
            run_unshare(cx, pins, slot.base_gfn, &mut r)?;
        }
        r.take(i);
        i += 1;
    }
    run_unshare(cx, pins, slot.base_gfn, &mut r)?;
    *cur = i;
    Ok(bu)
}

/// The whole world: host, EL2, the shim, and the operations in flight.
#[derive(Debug)]
struct World {
    host: Host,
    el2: El2,
    shim: Shim,
    faults: Vec<Pending>,
    invs: Vec<Inv>,
}

impl World {
    fn new(policy: Policy) -> Self {
        Self {
            host: Host::new(),
            el2: El2::default(),
            shim: Shim {
                policy,
                slots: [Memslot::default(); NSLOTS],
                pins: [None, None, None],
                slot_gen: [0; NSLOTS],
                inv: InvState::default(),
                dead: false,
                pinned_now: 0,
                no_unshare_range: false,
            },
            faults: Vec::new(),
            invs: Vec::new(),
        }
    }

    /// `unpin_pages()`: property 6 at every unpin.
    fn unpin(&mut self, frame: u64) -> Result<(), String> {
        let mapped = self.el2.mappings_of(frame);
        let fr = self.host.frame(frame);
        if fr.pins == 0 {
            return Err(format!("unpin of frame {frame:#x} without a pin"));
        }
        fr.pins -= 1;
        if fr.pins < mapped {
            return Err(format!(
                "frame {frame:#x} unpinned while EL2 maps it {mapped} times with {} pins",
                fr.pins
            ));
        }
        self.host.maybe_free(frame);
        Ok(())
    }

    /// `block_unpin_pages()`: `n` frames from `f0`, after the lock.
    fn unpin_block(&mut self, (f0, n): (u64, usize)) -> Result<(), String> {
        self.shim.pinned_now -= n as u64;
        for k in 0..n as u64 {
            self.unpin(f0 + k)?;
        }
        Ok(())
    }

    /// After the lock: the unpin buffer's pins go (`unpin_pages()`).
    fn unpin_all(&mut self, frames: &mut Vec<u64>) -> Result<(), String> {
        self.shim.pinned_now -= frames.len() as u64;
        for f in frames.drain(..) {
            self.unpin(f)?;
        }
        Ok(())
    }

    /// `vm_set_region()`. Returns what `check_region` said.
    fn set_region(
        &mut self,
        r: &S2pinUserspaceMemoryRegion,
    ) -> Result<Result<RegionOp, i32>, String> {
        if self.shim.dead {
            return Ok(Err(108));
        }
        let got = check_region(&self.shim.slots, r, WIN);
        let id = r.slot as usize;
        match got {
            Ok(RegionOp::Delete) => {
                let old = self.shim.slots[id];
                let pins = self.shim.pins[id].take();
                self.shim.slots[id] = Memslot::default();
                self.shim.slot_gen[id] += 1;
                self.shim.inv.bump();
                if let Some(mut pins) = pins {
                    // vm_drop_slot_pins()
                    let mut cur = 0;
                    let mut unpin = Vec::new();
                    while cur < pins.len() {
                        let mut cx = RunCtx {
                            el2: &mut self.el2,
                            no_range: &mut self.shim.no_unshare_range,
                            unpin: &mut unpin,
                        };
                        let last = pins.len();
                        let u = unmap_pinned(&mut cx, &mut pins, &old, &mut cur, last)?;
                        self.unpin_all(&mut unpin)?;
                        self.unpin_block(u)?;
                    }
                }
            }
            Ok(RegionOp::Create(s)) => {
                self.shim.slots[id] = s;
                self.shim.pins[id] = Some(vec![0; usize::try_from(s.npages).unwrap()]);
                self.shim.slot_gen[id] += 1;
            }
            Err(_) => {}
        }
        Ok(got)
    }

    /// `s2pin_mn_start()`.
    fn mn_start(&mut self, ev: u32, start: u64, end: u64) -> Result<StartAction, String> {
        self.shim.inv.begin(start, end);
        let act = at_start(self.shim.policy, ev);
        if act != StartAction::Nothing {
            self.unmap_hva_range(start, end)?;
        }
        Ok(act)
    }

    /// `vm_unmap_hva_range()`.
    fn unmap_hva_range(&mut self, start: u64, end: u64) -> Result<(), String> {
        for id in 0..NSLOTS {
            if self.shim.dead {
                continue;
            }
            let slot = self.shim.slots[id];
            let Some((first, last)) = slot_page_range(&slot, start, end) else {
                continue;
            };
            let (mut cur, last) = (
                usize::try_from(first).unwrap(),
                usize::try_from(last).unwrap(),
            );
            let mut unpin = Vec::new();
            while cur < last {
                let mut cx = RunCtx {
                    el2: &mut self.el2,
                    no_range: &mut self.shim.no_unshare_range,
                    unpin: &mut unpin,
                };
                let pins = self.shim.pins[id].as_mut().unwrap();
                let u = unmap_pinned(&mut cx, pins, &slot, &mut cur, last)?;
                self.unpin_all(&mut unpin)?;
                self.unpin_block(u)?;
            }
        }
        Ok(())
    }

    /// `host_walk()` plus the fields `vm_confirm_range()` fills in.
    fn pte_state(&self, p: usize, e: u64, accessible: bool) -> PteState {
        let mut st = PteState::default();
        if let Pte::Present {
            frame,
            write,
            protnone,
        } = self.host.pte[p]
        {
            st.present = 1;
            st.protnone = protnone.into();
            st.writable = write.into();
            st.same_frame = (frame == entry_frame(e)).into();
        }
        st.vma_accessible = accessible.into();
        st.mapped_writable = (e & 1 == 0).into();
        st
    }

    /// `s2pin_mn_end()`.
    fn mn_end(&mut self, ev: u32, start: u64, end: u64, accessible: bool) -> Result<(), String> {
        if walk_at_end(self.shim.policy, ev) {
            self.confirm_range(start, end, accessible)?;
        }
        self.shim.inv.finish();
        Ok(())
    }

    /// `vm_confirm_range()`: runs of pages with the same action, one call
    /// each (`struct confirm_runs`).
    fn confirm_range(&mut self, start: u64, end: u64, accessible: bool) -> Result<(), String> {
        for id in 0..NSLOTS {
            if self.shim.dead {
                continue;
            }
            let slot = self.shim.slots[id];
            let Some((first, last)) = slot_page_range(&slot, start, end) else {
                continue;
            };
            let (mut cur, last) = (
                usize::try_from(first).unwrap(),
                usize::try_from(last).unwrap(),
            );
            let mut unpin = Vec::new();
            while cur < last {
                // protnone, changed, wrprotect
                let mut runs = [PinRun::default(); 3];
                let mut prev = PageAction::Keep;
                let mut u = (0, 0);
                while cur < last {
                    let e = self.shim.pins[id].as_ref().unwrap()[cur];
                    if e == 0 {
                        cur += 1;
                        continue;
                    }
                    if e & E_BLOCK != 0 {
                        let bs = block_start(&slot, cur);
                        let hi = (bs + BLOCK).min(last);
                        self.confirm_flush(id, &mut runs, &mut unpin)?;
                        u = self.confirm_block(id, bs, cur, hi, accessible)?;
                        cur = hi;
                        break;
                    }
                    if unpin.len() + runs.iter().map(|r| r.pages).sum::<usize>() >= UNPIN_CAP {
                        break;
                    }
                    let p = page_of(slot.uaddr) + cur;
                    let act = at_end(self.shim.policy, &self.pte_state(p, e, accessible));
                    let k = match act {
                        PageAction::Keep => {
                            prev = act;
                            cur += 1;
                            continue;
                        }
                        PageAction::UnmapProtNone => 0,
                        PageAction::UnmapChanged => 1,
                        PageAction::WrProtect => 2,
                    };
                    if !runs[k].can_take(cur, prev == act) {
                        self.confirm_flush_one(id, &mut runs[k], k, &mut unpin)?;
                    }
                    runs[k].take(cur);
                    prev = act;
                    cur += 1;
                }
                self.confirm_flush(id, &mut runs, &mut unpin)?;
                self.unpin_all(&mut unpin)?;
                self.unpin_block(u)?;
            }
        }
        Ok(())
    }

    /// `confirm_flush()`.
    fn confirm_flush(
        &mut self,
        id: usize,
        runs: &mut [PinRun; 3],
        unpin: &mut Vec<u64>,
    ) -> Result<(), String> {
        for (k, r) in runs.iter_mut().enumerate() {
            self.confirm_flush_one(id, r, k, unpin)?;
        }
        Ok(())
    }

    /// Run `k` of `vm_confirm_range()` (0 PROT_NONE, 1 changed: unshare;
    /// 2: write-protect).
    fn confirm_flush_one(
        &mut self,
        id: usize,
        r: &mut PinRun,
        k: usize,
        unpin: &mut Vec<u64>,
    ) -> Result<(), String> {
        let base_gfn = self.shim.slots[id].base_gfn;
        let mut cx = RunCtx {
            el2: &mut self.el2,
            no_range: &mut self.shim.no_unshare_range,
            unpin,
        };
        let pins = self.shim.pins[id].as_mut().unwrap();
        if k == 2 {
            run_wrprotect(&mut cx, pins, base_gfn, r)
        } else {
            run_unshare(&mut cx, pins, base_gfn, r)
        }
    }

    /// `confirm_block()`: the pages `[lo, hi)` of the block at index `bs`
    /// of slot `id`. Returns the frames to unpin.
    fn confirm_block(
        &mut self,
        id: usize,
        bs: usize,
        lo: usize,
        hi: usize,
        accessible: bool,
    ) -> Result<(u64, usize), String> {
        let slot = self.shim.slots[id];
        let acts: Vec<PageAction> = (lo..hi)
            .map(|i| {
                let e = self.shim.pins[id].as_ref().unwrap()[i];
                at_end(
                    self.shim.policy,
                    &self.pte_state(page_of(slot.uaddr) + i, e, accessible),
                )
            })
            .collect();
        let same = acts.iter().all(|&a| a == acts[0]);
        let whole = lo == bs && hi == bs + BLOCK;
        if same && acts[0] == PageAction::Keep {
            return Ok((0, 0));
        }
        if same && whole && acts[0] == PageAction::WrProtect {
            self.el2.wrprotect_block(slot.base_gfn + bs as u64)?;
            for e in &mut self.shim.pins[id].as_mut().unwrap()[bs..bs + BLOCK] {
                *e |= E_RO;
            }
            stats::add(&stats::BLOCK_WRPROTECTS, 1);
            return Ok((0, 0));
        }
        if !(same && whole) {
            stats::add(&stats::BLOCK_FALLBACKS, 1);
        }
        let pins = self.shim.pins[id].as_mut().unwrap();
        block_unshare(&mut self.el2, pins, slot.base_gfn, bs, bs, bs + BLOCK)
    }

    /// `vcpu_fault()` up to the pin: a pending fault, or how it ended.
    fn fault_start(&mut self, gfn: u64, write: bool, permission: bool) -> Result<Pending, Outcome> {
        if self.shim.dead {
            return Err(Outcome::Nothing);
        }
        let idx = find_slot(&self.shim.slots, gfn).ok_or(Outcome::User)?;
        let slot = self.shim.slots[idx];
        let ro = slot.flags & S2PIN_MEM_READONLY != 0;
        if ro && write {
            return Err(Outcome::User);
        }
        let i = usize::try_from(gfn - slot.base_gfn).unwrap();
        let hva = slot.uaddr + ((i as u64) << 12);
        let e = self.shim.pins[idx].as_ref().unwrap()[i];
        let mut p = Pending {
            gfn,
            write,
            idx,
            i,
            hva,
            gen: self.shim.slot_gen[idx],
            seq: self.shim.inv.seq,
            upgrade: None,
            ro_slot: ro,
            pinned: None,
            model_slot_epoch: 0,
            model_end_epoch: 0,
        };
        if e != 0 {
            if permission && write && e & 1 != 0 {
                p.upgrade = Some(e);
                return Ok(p);
            }
            return Err(Outcome::Nothing);
        }
        Ok(p)
    }

    /// `vm_pin()`.
    fn vm_pin(&mut self, hva: u64, write: bool) -> Result<u64, i32> {
        let p = page_of(hva);
        let vma = self.host.vma[p];
        let force =
            self.shim.policy == Policy::Keep && vma != Vma::None && (!write || vma == Vma::Rw);
        self.host.gup(p, write, force)
    }

    /// The pin of a pending fault; `Err` when the fault went to user space.
    fn fault_pin(&mut self, f: &mut Pending) -> Result<(), Outcome> {
        if f.upgrade.is_some() {
            let page = self.vm_pin(f.hva, true).map_err(|_| Outcome::User)?;
            f.pinned = Some((page, false));
            return Ok(());
        }
        let (page, map_ro) = match self.vm_pin(f.hva, !f.ro_slot) {
            Ok(p) => (p, false),
            Err(_) if !f.ro_slot && !f.write => {
                (self.vm_pin(f.hva, false).map_err(|_| Outcome::User)?, true)
            }
            Err(_) => return Err(Outcome::User),
        };
        f.pinned = Some((page, map_ro));
        Ok(())
    }

    /// `vcpu_fault_block()`, right after the fault's own pin: `None` is
    /// its `-EAGAIN` (the 4 KiB path goes on with the page pinned).
    fn fault_block(
        &mut self,
        f: &Pending,
        page: u64,
        enomem: bool,
    ) -> Result<Option<Outcome>, String> {
        let b = BLOCK as u64;
        // The C works on the slot copy of the fault's first look; another
        // slot since fails the generation check, so the current one serves.
        if self.shim.dead || self.shim.slot_gen[f.idx] != f.gen || self.shim.pins[f.idx].is_none() {
            return Ok(None);
        }
        let slot = self.shim.slots[f.idx];
        let g = f.gfn - f.gfn % b;
        if g < slot.base_gfn
            || !(slot.uaddr >> 12)
                .wrapping_sub(slot.base_gfn)
                .is_multiple_of(b)
        {
            return Ok(None);
        }
        let bs = usize::try_from(g - slot.base_gfn).unwrap();
        if bs as u64 + b > slot.npages
            || !self.host.frames[usize::try_from(page).unwrap()].large
            || page % b != f.gfn % b
            || self.shim.pins[f.idx].as_ref().unwrap()[bs..bs + BLOCK]
                .iter()
                .any(|&e| e != 0)
        {
            return Ok(None);
        }
        // vm_pin_n() of the block's host pages.
        let h = slot.uaddr + ((bs as u64) << 12);
        let p0 = page_of(h);
        let write = !f.ro_slot;
        let vma = self.host.vma[p0];
        let force = self.shim.policy == Policy::Keep
            && vma != Vma::None
            && (!write || vma == Vma::Rw)
            && (p0..p0 + BLOCK).all(|q| self.host.vma[q] == vma);
        let mut got = Vec::new();
        for k in 0..BLOCK {
            match self.host.gup(p0 + k, write, force) {
                Ok(fr) => got.push(fr),
                Err(_) => break,
            }
        }
        let block = got.len() == BLOCK
            && got[0].is_multiple_of(b)
            && got.iter().zip(0..).all(|(&fr, k)| fr == got[0] + k)
            && got[usize::try_from(f.gfn % b).unwrap()] == page;
        if !block {
            for fr in got {
                self.unpin(fr)?;
            }
            return Ok(None);
        }
        self.unpin(page)?;
        let busy = self.shim.pins[f.idx].as_ref().unwrap()[bs..bs + BLOCK]
            .iter()
            .any(|&e| e != 0)
            || (0..b).any(|k| !self.shim.inv.may_map(f.seq, h + (k << 12)));
        if busy || enomem {
            for fr in got {
                self.unpin(fr)?;
            }
            if busy {
                return Ok(Some(Outcome::Retry));
            }
            self.el2.memcache += TOPUP;
            return Ok(Some(Outcome::Topup));
        }
        self.el2.share_block(g, got[0], !f.ro_slot)?;
        let pins = self.shim.pins[f.idx].as_mut().unwrap();
        for (e, &fr) in pins[bs..bs + BLOCK].iter_mut().zip(&got) {
            *e = entry(fr, f.ro_slot) | E_BLOCK;
        }
        self.shim.pinned_now += b;
        self.el2.memcache = self.el2.memcache.max(BLOCK_SPARE);
        stats::add(&stats::BLOCKS, 1);
        Ok(Some(Outcome::MappedBlock))
    }

    /// The recheck under the lock and the map.
    fn fault_finish(&mut self, f: &Pending, enomem: bool) -> Result<Outcome, String> {
        let (page, map_ro) = f.pinned.unwrap();
        if f.upgrade.is_none() && !map_ro {
            if let Some(out) = self.fault_block(f, page, enomem)? {
                return Ok(out);
            }
        }
        let want = f.upgrade.unwrap_or(0);
        // In the C order: the generation first, then the table.
        if self.shim.dead
            || self.shim.slot_gen[f.idx] != f.gen
            || self.shim.pins[f.idx].as_ref().map(|t| t[f.i]) != Some(want)
            || !self.shim.inv.may_map(f.seq, f.hva)
        {
            self.unpin(page)?;
            return Ok(Outcome::Retry);
        }
        if let Some(e) = f.upgrade {
            if e & E_BLOCK != 0 && page != entry_frame(e) {
                let slot = self.shim.slots[f.idx];
                let bs = block_start(&slot, f.i);
                let pins = self.shim.pins[f.idx].as_mut().unwrap();
                let u = block_unshare(&mut self.el2, pins, slot.base_gfn, bs, f.i, f.i + 1)?;
                self.unpin(page)?;
                self.unpin_block(u)?;
                return Ok(Outcome::Unmapped);
            }
            if page == entry_frame(e) {
                if !self.el2.set_writable(f.gfn, true)? {
                    // Splitting the block needs a memcache page.
                    self.unpin(page)?;
                    self.el2.memcache += TOPUP;
                    return Ok(Outcome::Topup);
                }
                let slot = self.shim.slots[f.idx];
                let pins = self.shim.pins[f.idx].as_mut().unwrap();
                if e & E_BLOCK != 0 {
                    let bs = block_start(&slot, f.i);
                    for x in &mut pins[bs..bs + BLOCK] {
                        *x &= !E_BLOCK;
                    }
                }
                pins[f.i] &= !E_RO;
                self.unpin(page)?;
            } else {
                let r = UnshareRun {
                    gfn: f.gfn,
                    pfn: entry_frame(e),
                    len: 1,
                };
                if !self.el2.unshare(r)? {
                    return Err(format!("HYP_UNSHARE of {r:?} outside blocks: ENOMEM"));
                }
                self.el2.share(f.gfn, page, true)?;
                self.shim.pins[f.idx].as_mut().unwrap()[f.i] = entry(page, false);
                self.unpin(entry_frame(e))?;
            }
            return Ok(Outcome::Upgraded);
        }
        if enomem {
            self.unpin(page)?;
            self.el2.memcache += TOPUP;
            return Ok(Outcome::Topup);
        }
        let ro = f.ro_slot || map_ro;
        self.el2.share(f.gfn, page, !ro)?;
        self.shim.pins[f.idx].as_mut().unwrap()[f.i] = entry(page, ro);
        self.shim.pinned_now += 1;
        Ok(Outcome::Mapped)
    }

    /// `vm_teardown()`: dead, EL2 reclaims every mapping, then every pin
    /// goes.
    fn teardown(&mut self) -> Result<(), String> {
        if self.shim.dead {
            return Ok(());
        }
        self.shim.dead = true;
        self.el2.map.clear();
        self.el2.blocks.clear();
        for id in 0..NSLOTS {
            let Some(t) = self.shim.pins[id].as_mut() else {
                continue;
            };
            let frames: Vec<u64> = t
                .iter()
                .filter(|&&e| e != 0)
                .map(|&e| entry_frame(e))
                .collect();
            t.fill(0);
            for f in frames {
                self.unpin(f)?;
                self.shim.pinned_now -= 1;
            }
        }
        Ok(())
    }
}

// ---- the reference model ------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct MSlot {
    gfn: u64,
    npages: u64,
    page: usize,
    ro: bool,
}

/// What DESIGN.md §9 says EL2 maps. Independent of the shim's tables.
#[derive(Debug)]
struct Model {
    policy: Policy,
    slots: [Option<MSlot>; NSLOTS],
    /// Bumped at every slot create/delete.
    slot_epoch: [u64; NSLOTS],
    /// Bumped at every invalidation end and slot deletion.
    end_epoch: u64,
    /// gfn -> (frame, writable).
    mapped: BTreeMap<u64, (u64, bool)>,
    /// First gfns of the 2 MiB blocks (`BLOCK` pages here) EL2 maps.
    blocks: BTreeSet<u64>,
    dead: bool,
}

impl Model {
    fn slot_of(&self, gfn: u64) -> Option<(usize, MSlot)> {
        (0..NSLOTS).find_map(|id| {
            self.slots[id]
                .filter(|s| gfn >= s.gfn && gfn < s.gfn + s.npages)
                .map(|s| (id, s))
        })
    }

    /// The host page of a mapped gfn.
    fn page(&self, gfn: u64) -> usize {
        let (_, s) = self.slot_of(gfn).unwrap();
        s.page + usize::try_from(gfn - s.gfn).unwrap()
    }

    /// The mapped gfns whose host page is in `[p0, p1)`.
    fn mapped_in(&self, p0: usize, p1: usize) -> Vec<u64> {
        self.mapped
            .keys()
            .copied()
            .filter(|&g| (p0..p1).contains(&self.page(g)))
            .collect()
    }

    /// A valid slot change: the id's slot is free (or deleted with size 0),
    /// inside the window, no overlap in guest frames.
    fn region_ok(&self, id: usize, s: Option<MSlot>) -> bool {
        match s {
            None => self.slots[id].is_some(),
            Some(s) => {
                self.slots[id].is_none()
                    && s.npages > 0
                    && s.gfn >= WIN.base_gfn
                    && s.gfn + s.npages <= WIN.base_gfn + WIN.pages
                    && self
                        .slots
                        .iter()
                        .flatten()
                        .all(|o| o.gfn + o.npages <= s.gfn || s.gfn + s.npages <= o.gfn)
            }
        }
    }

    fn set_region(&mut self, id: usize, s: Option<MSlot>) {
        if s.is_none() {
            let old = self.slots[id].unwrap();
            self.mapped
                .retain(|&g, _| !(g >= old.gfn && g < old.gfn + old.npages));
            self.blocks
                .retain(|&g| !(g >= old.gfn && g < old.gfn + old.npages));
            self.end_epoch += 1;
        }
        self.slots[id] = s;
        self.slot_epoch[id] += 1;
    }

    fn frame_changing(ev: u32) -> bool {
        !matches!(
            ev,
            event::PROTECTION_VMA | event::PROTECTION_PAGE | event::SOFT_DIRTY
        )
    }

    /// The blocks with a page in `gs`, slot by slot (the order the shim
    /// meets them in), with those pages.
    fn blocks_in(&self, gs: &BTreeSet<u64>) -> Vec<(u64, Vec<u64>)> {
        let mut out = Vec::new();
        for s in self.slots.iter().flatten() {
            for &b in self.blocks.range(s.gfn..s.gfn + s.npages) {
                let inr: Vec<u64> = (b..b + BLOCK as u64).filter(|g| gs.contains(g)).collect();
                if !inr.is_empty() {
                    out.push((b, inr));
                }
            }
        }
        out
    }

    /// Removes block `b` and its pages.
    fn drop_block(&mut self, b: u64) {
        self.blocks.remove(&b);
        for g in b..b + BLOCK as u64 {
            self.mapped.remove(&g);
        }
    }

    /// `range_start`: frame-changing events, and every event under eager,
    /// unmap the range. A block the range covers in part is split if the
    /// memcache (`mc` free pages) has a page for it, else unmapped whole.
    fn start(&mut self, ev: u32, p0: usize, p1: usize, mut mc: u32) {
        if Self::frame_changing(ev) || self.policy == Policy::Eager {
            let gs: BTreeSet<u64> = self.mapped_in(p0, p1).into_iter().collect();
            for (b, inr) in self.blocks_in(&gs) {
                if inr.len() < BLOCK && mc > 0 {
                    mc -= 1;
                    self.blocks.remove(&b);
                } else {
                    self.drop_block(b);
                }
            }
            for g in gs {
                self.mapped.remove(&g);
            }
        }
    }

    /// `range_end` under confirm/keep of a protection event: each mapped
    /// page of the range by its PTE now.
    fn end(&mut self, ev: u32, p0: usize, p1: usize, host: &Host, accessible: bool) {
        self.end_epoch += 1;
        if Self::frame_changing(ev) || self.policy == Policy::Eager {
            return;
        }
        // Per page: 0 keep, 1 write-protect, 2 unmap.
        let decide = |m: &Self, g: u64| {
            let (frame, w) = m.mapped[&g];
            match host.pte[m.page(g)] {
                Pte::Present {
                    frame: f,
                    write,
                    protnone,
                } if f == frame => {
                    if protnone {
                        if m.policy == Policy::Keep && accessible {
                            0
                        } else {
                            2
                        }
                    } else if w && !write {
                        1
                    } else {
                        0
                    }
                }
                _ => 2,
            }
        };
        let gs: BTreeSet<u64> = self.mapped_in(p0, p1).into_iter().collect();
        // A block: all kept, nothing; all of it to write-protect, the
        // block read-only; anything else unmaps the whole block.
        let mut in_blocks = BTreeSet::new();
        for (b, inr) in self.blocks_in(&gs) {
            let d: Vec<u8> = inr.iter().map(|&g| decide(self, g)).collect();
            in_blocks.extend(inr.iter().copied());
            if d.iter().all(|&x| x == 0) {
                continue;
            }
            if inr.len() == BLOCK && d.iter().all(|&x| x == 1) {
                for g in inr {
                    self.mapped.get_mut(&g).unwrap().1 = false;
                }
                continue;
            }
            self.drop_block(b);
        }
        for g in gs.difference(&in_blocks).copied() {
            match decide(self, g) {
                0 => {}
                1 => {
                    self.mapped.get_mut(&g).unwrap().1 = false;
                }
                _ => {
                    self.mapped.remove(&g);
                }
            }
        }
    }
}

// ---- operations -----------------------------------------------------------

/// One generated operation; small domains so that things collide.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create (`npages > 0`) or delete slot `id`.
    Slot {
        id: u8,
        gfn: u8,
        npages: u8,
        page: u8,
        ro: bool,
    },
    /// A whole fault: start, pin, finish.
    Fault {
        gfn: u8,
        write: bool,
        enomem: bool,
    },
    FaultStart {
        gfn: u8,
        write: bool,
    },
    FaultPin {
        k: u8,
    },
    FaultFinish {
        k: u8,
        enomem: bool,
    },
    /// `range_start` of event `ev` over `len` pages at `page`, with the
    /// change the kernel makes afterwards.
    Begin {
        ev: u8,
        page: u8,
        len: u8,
        change: u8,
    },
    /// The kernel changes the PTEs of invalidation `k` now.
    Apply {
        k: u8,
    },
    /// `range_end` of invalidation `k` (changing the PTEs first if not yet).
    End {
        k: u8,
    },
    /// A host access (the VMM, NUMA hint fault): no notifier.
    Touch {
        page: u8,
        write: bool,
    },
    Teardown,
}

fn op() -> impl Strategy<Value = Op> {
    let g = 0u8..(WIN.pages as u8 + 2);
    prop_oneof![
        2 => (0u8..NSLOTS as u8, 0u8..WIN.pages as u8, 0u8..10, 0u8..HVA_PAGES as u8, prop::bool::weighted(0.2))
            .prop_map(|(id, gfn, npages, page, ro)| Op::Slot { id, gfn, npages, page, ro }),
        12 => (g.clone(), any::<bool>(), prop::bool::weighted(0.05))
            .prop_map(|(gfn, write, enomem)| Op::Fault { gfn, write, enomem }),
        3 => (g, any::<bool>()).prop_map(|(gfn, write)| Op::FaultStart { gfn, write }),
        3 => any::<u8>().prop_map(|k| Op::FaultPin { k }),
        3 => (any::<u8>(), prop::bool::weighted(0.05)).prop_map(|(k, enomem)| Op::FaultFinish { k, enomem }),
        3 => (0u8..10, 0u8..HVA_PAGES as u8, 1u8..10, any::<u8>())
            .prop_map(|(ev, page, len, change)| Op::Begin { ev, page, len, change }),
        2 => any::<u8>().prop_map(|k| Op::Apply { k }),
        6 => any::<u8>().prop_map(|k| Op::End { k }),
        2 => (0u8..HVA_PAGES as u8, any::<bool>()).prop_map(|(page, write)| Op::Touch { page, write }),
        1 => Just(Op::Teardown),
    ]
}

fn change_for(ev: u32, c: u8) -> Change {
    if is_protection(ev) {
        [
            Change::Nothing,
            Change::NumaNone,
            Change::NumaNone,
            Change::Mprotect(Vma::Rw),
            Change::Mprotect(Vma::Ro),
            Change::Mprotect(Vma::None),
            Change::WrProtect,
            Change::WrProtect,
        ][usize::from(c) % 8]
    } else {
        [Change::Nothing, Change::Zap, Change::Migrate][usize::from(c) % 3]
    }
}

/// The test: world, model, and what has run.
struct Check {
    w: World,
    m: Model,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl Check {
    fn new(policy: Policy) -> Self {
        Self {
            w: World::new(policy),
            m: Model {
                policy,
                slots: [None; NSLOTS],
                slot_epoch: [0; NSLOTS],
                end_epoch: 0,
                mapped: BTreeMap::new(),
                blocks: BTreeSet::new(),
                dead: false,
            },
        }
    }

    /// The range's VMA is accessible (every page of it).
    fn accessible(&self, p0: usize, p1: usize) -> bool {
        (p0..p1).all(|p| self.w.host.vma[p] != Vma::None)
    }

    fn run(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Slot {
                id,
                gfn,
                npages,
                page,
                ro,
            } => {
                let id = usize::from(id);
                let page = usize::from(page);
                let npages = u64::from(npages).min((HVA_PAGES - page) as u64);
                let s = (npages > 0).then_some(MSlot {
                    gfn: WIN.base_gfn + u64::from(gfn),
                    npages,
                    page,
                    ro,
                });
                let r = S2pinUserspaceMemoryRegion {
                    slot: id as u32,
                    flags: if ro { S2PIN_MEM_READONLY } else { 0 },
                    guest_phys_addr: (WIN.base_gfn + u64::from(gfn)) << 12,
                    memory_size: npages << 12,
                    userspace_addr: hva(page),
                };
                let ok = self.m.region_ok(id, s);
                let got = self.w.set_region(&r)?;
                if self.m.dead {
                    return if got.is_ok() {
                        Err("slot change after teardown".into())
                    } else {
                        Ok(())
                    };
                }
                if got.is_ok() != ok {
                    return Err(format!("check_region {r:?}: {got:?}, model {ok}"));
                }
                if ok {
                    self.m.set_region(id, s);
                }
            }
            Op::Fault { gfn, write, enomem } => {
                if let Some(k) = self.fault_start(gfn, write) {
                    self.fault_pin(k)?;
                    if k < self.w.faults.len() {
                        self.fault_finish(k, enomem)?;
                    }
                }
            }
            Op::FaultStart { gfn, write } => {
                if self.w.faults.len() < MAX_FAULTS {
                    self.fault_start(gfn, write);
                }
            }
            Op::FaultPin { k } => {
                if let Some(k) = self.pick_fault(k, false) {
                    self.fault_pin(k)?;
                }
            }
            Op::FaultFinish { k, enomem } => {
                if let Some(k) = self.pick_fault(k, true) {
                    self.fault_finish(k, enomem)?;
                }
            }
            Op::Begin {
                ev,
                page,
                len,
                change,
            } => {
                if self.w.invs.len() >= MAX_INVS {
                    return Ok(());
                }
                let ev = u32::from(ev);
                let p0 = usize::from(page);
                let p1 = (p0 + usize::from(len)).min(HVA_PAGES);
                self.begin(ev, p0, p1, change_for(ev, change))?;
            }
            Op::Apply { k } => {
                if !self.w.invs.is_empty() {
                    let k = usize::from(k) % self.w.invs.len();
                    self.apply(k);
                }
            }
            Op::End { k } => {
                if !self.w.invs.is_empty() {
                    self.end(usize::from(k) % self.w.invs.len())?;
                }
            }
            Op::Touch { page, write } => {
                let _ = self.w.host.touch(usize::from(page), write);
            }
            Op::Teardown => {
                // RUN holds the VM: no fault is in flight at teardown.
                while !self.w.faults.is_empty() {
                    self.finish_any(0)?;
                }
                self.w.teardown()?;
                self.m.mapped.clear();
                self.m.blocks.clear();
                self.m.dead = true;
                self.check()?;
                // The dead VM sees the ends of the invalidations in flight.
                while !self.w.invs.is_empty() {
                    self.end(0)?;
                    self.check()?;
                }
                self.check_frames()?;
                // The VMM goes on with a new VM on the same mm.
                let policy = self.w.shim.policy;
                let fresh = Self::new(policy);
                self.w.shim = fresh.w.shim;
                self.w.el2 = fresh.w.el2;
                self.m = fresh.m;
                self.run(FIRST_SLOT)?;
            }
        }
        self.check()
    }

    fn pick_fault(&self, k: u8, pinned: bool) -> Option<usize> {
        let c: Vec<usize> = (0..self.w.faults.len())
            .filter(|&i| self.w.faults[i].pinned.is_some() == pinned)
            .collect();
        (!c.is_empty()).then(|| c[usize::from(k) % c.len()])
    }

    /// A guest access to `gfn`: a fault if the hardware would take one.
    fn fault_start(&mut self, gfn: u8, write: bool) -> Option<usize> {
        let gfn = WIN.base_gfn + u64::from(gfn);
        let permission = match self.w.el2.map.get(&gfn) {
            Some(&(_, w)) if w || !write => return None,
            Some(_) => true,
            None => false,
        };
        match self.w.fault_start(gfn, write, permission) {
            Ok(mut p) => {
                p.model_slot_epoch = self
                    .m
                    .slot_of(gfn)
                    .map_or(0, |(id, _)| self.m.slot_epoch[id]);
                p.model_end_epoch = self.m.end_epoch;
                self.w.faults.push(p);
                Some(self.w.faults.len() - 1)
            }
            Err(_) => None,
        }
    }

    /// Pins fault `k`; drops it if it went to user space.
    fn fault_pin(&mut self, k: usize) -> Result<(), String> {
        let mut f = self.w.faults[k];
        match self.w.fault_pin(&mut f) {
            Ok(()) => self.w.faults[k] = f,
            Err(_) => {
                self.w.faults.remove(k);
            }
        }
        Ok(())
    }

    fn finish_any(&mut self, k: usize) -> Result<(), String> {
        if self.w.faults[k].pinned.is_none() {
            self.fault_pin(k)?;
            if k >= self.w.faults.len() || self.w.faults[k].pinned.is_none() {
                return Ok(());
            }
        }
        self.fault_finish(k, false)
    }

    /// Finishes fault `k` and checks the outcome against the model.
    fn fault_finish(&mut self, k: usize, enomem: bool) -> Result<(), String> {
        let f = self.w.faults.remove(k);
        let mc = self.w.el2.memcache;
        let in_block = self.m.blocks.contains(&block_of(f.gfn));
        let out = self.w.fault_finish(&f, enomem)?;
        if out == Outcome::MappedBlock {
            return self.block_mapped(&f);
        }
        if out == Outcome::Unmapped {
            // A write upgrade in a block whose frame changed.
            let Some(e) = f.upgrade.filter(|_| in_block) else {
                return Err(format!("{f:?}: {out:?} outside a block"));
            };
            if f.pinned.unwrap().0 == entry_frame(e) {
                return Err(format!("{f:?}: {out:?}, the frame did not change"));
            }
            if mc > 0 {
                self.m.blocks.remove(&block_of(f.gfn));
                self.m.mapped.remove(&f.gfn);
            } else {
                self.m.drop_block(block_of(f.gfn));
            }
            return Ok(());
        }
        let m = &self.m;
        let slot = m.slot_of(f.gfn);
        let same_slot =
            slot.is_some_and(|(id, _)| m.slot_epoch[id] == f.model_slot_epoch && id == f.idx);
        let covered = self
            .w
            .invs
            .iter()
            .any(|v| (v.p0..v.p1).contains(&page_of(f.hva)));
        let quiet = f.model_end_epoch == m.end_epoch;
        let page = page_of(f.hva);
        let state_ok = match f.upgrade {
            None => !m.mapped.contains_key(&f.gfn),
            Some(e) => m.mapped.get(&f.gfn) == Some(&(entry_frame(e), false)),
        };
        let allowed = !m.dead && same_slot && quiet && !covered && state_ok;
        // A write upgrade in a block splits it: without a memcache page
        // it tops up first.
        let must = allowed
            && self.w.invs.is_empty()
            && !(enomem && f.upgrade.is_none())
            && !(f.upgrade.is_some() && in_block && mc == 0);
        let done = matches!(out, Outcome::Mapped | Outcome::Upgraded);
        match out {
            Outcome::Mapped => stats::add(&stats::MAPPED, 1),
            Outcome::Upgraded => stats::add(&stats::UPGRADED, 1),
            Outcome::Retry => stats::add(&stats::RETRIED, 1),
            _ => {}
        }
        if done && !allowed {
            return Err(format!(
                "{f:?} mapped: {out:?}, model: dead {} same slot {same_slot} no invalidation ended {quiet} none covering {}",
                m.dead, !covered
            ));
        }
        if must && !done {
            return Err(format!("{f:?}: {out:?}, the model maps it"));
        }
        if done {
            let Pte::Present { frame, .. } = self.w.host.pte[page] else {
                return Err(format!("{f:?} mapped a page the host does not map"));
            };
            let ro = slot.unwrap().1.ro;
            let writable = f.upgrade.is_some() || (!ro && self.w.host.vma[page] == Vma::Rw);
            self.m.mapped.insert(f.gfn, (frame, writable));
            if out == Outcome::Upgraded && in_block {
                self.m.blocks.remove(&block_of(f.gfn));
            }
        }
        Ok(())
    }

    /// A fault mapped its whole block: allowed only where every page of it
    /// could have been mapped (ABI.md §2.8: an aligned range of one slot
    /// whose host pages hold contiguous frames from an aligned one).
    fn block_mapped(&mut self, f: &Pending) -> Result<(), String> {
        stats::add(&stats::MAPPED, 1);
        let m = &self.m;
        let g = block_of(f.gfn);
        let b = BLOCK as u64;
        let Some((id, s)) = m.slot_of(g) else {
            return Err(format!("{f:?}: block at gfn {g:#x} outside every slot"));
        };
        let ok_slot = id == f.idx
            && m.slot_epoch[id] == f.model_slot_epoch
            && g + b <= s.gfn + s.npages
            && (s.page as u64 + (g - s.gfn)).is_multiple_of(b);
        let quiet = f.model_end_epoch == m.end_epoch && !m.dead;
        let p0 = m.page(g);
        let covered = self.w.invs.iter().any(|v| v.p0 < p0 + BLOCK && p0 < v.p1);
        let frames: Vec<Option<u64>> = (p0..p0 + BLOCK)
            .map(|p| match self.w.host.pte[p] {
                Pte::Present { frame, .. } => Some(frame),
                Pte::Absent => None,
            })
            .collect();
        let contiguous = frames[0].is_some_and(|f0| {
            f0.is_multiple_of(b) && frames.iter().zip(0..).all(|(f, k)| *f == Some(f0 + k))
        });
        let free = (g..g + b).all(|x| !m.mapped.contains_key(&x));
        if !(ok_slot && quiet && !covered && contiguous && free) {
            return Err(format!(
                "{f:?} mapped block {g:#x}: slot {ok_slot} quiet {quiet} none covering {} host frames {frames:?} unmapped before {free}",
                !covered
            ));
        }
        let writable = !s.ro;
        for (k, fr) in frames.into_iter().enumerate() {
            self.m.mapped.insert(g + k as u64, (fr.unwrap(), writable));
        }
        self.m.blocks.insert(g);
        Ok(())
    }

    fn begin(&mut self, ev: u32, p0: usize, p1: usize, change: Change) -> Result<(), String> {
        let before = self.w.el2.map.clone();
        let mc = self.w.el2.memcache;
        let act = self.w.mn_start(ev, hva(p0), hva(p1))?;
        self.m.start(ev, p0, p1, mc);
        self.w.invs.push(Inv {
            ev,
            p0,
            p1,
            change,
            applied: false,
        });
        stats::add(
            &stats::UNMAPPED_START,
            (before.len() - self.w.el2.map.len()) as u64,
        );
        // Property 5 at start.
        let left = self.mapped_in_range(p0, p1);
        if Model::frame_changing(ev) && left > 0 {
            return Err(format!(
                "event {ev} {act:?}: {left} pages of the range still mapped"
            ));
        }
        if !Model::frame_changing(ev)
            && self.w.shim.policy != Policy::Eager
            && self.w.el2.map != before
        {
            return Err(format!(
                "protection event {ev} unmapped at start under {:?}",
                self.w.shim.policy
            ));
        }
        Ok(())
    }

    /// Pages EL2 maps (by the shim's slots) whose host page is in range.
    fn mapped_in_range(&self, p0: usize, p1: usize) -> usize {
        let mut n = 0;
        for (id, s) in self.w.shim.slots.iter().enumerate() {
            let Some(t) = self.w.shim.pins[id].as_ref() else {
                continue;
            };
            for (i, &e) in t.iter().enumerate() {
                let p = page_of(s.uaddr) + i;
                if e != 0
                    && (p0..p1).contains(&p)
                    && self.w.el2.map.contains_key(&(s.base_gfn + i as u64))
                {
                    n += 1;
                }
            }
        }
        n
    }

    fn apply(&mut self, k: usize) {
        let v = &mut self.w.invs[k];
        if !v.applied {
            v.applied = true;
            let (c, p0, p1) = (v.change, v.p0, v.p1);
            self.w.host.apply(c, p0, p1);
        }
    }

    fn end(&mut self, k: usize) -> Result<(), String> {
        self.apply(k);
        let v = self.w.invs.remove(k);
        let accessible = self.accessible(v.p0, v.p1);
        let before = self.w.el2.map.clone();
        let blocks_before = self.w.el2.blocks.clone();
        self.w.mn_end(v.ev, hva(v.p0), hva(v.p1), accessible)?;
        self.m.end(v.ev, v.p0, v.p1, &self.w.host, accessible);
        // Property 5 at end: what left, by its PTE.
        let policy = self.w.shim.policy;
        for (g, (frame, was_w)) in &before {
            if let Some(&(_, w)) = self.w.el2.map.get(g) {
                if *was_w && !w {
                    stats::add(&stats::WRPROTECTED, 1);
                }
                let p = self.shim_page_of(*g);
                if matches!(self.w.host.pte[p], Pte::Present { protnone: true, .. }) {
                    stats::add(&stats::KEPT_PROTNONE, 1);
                }
                continue;
            }
            stats::add(&stats::UNMAPPED_END, 1);
            if blocks_before.contains(&block_of(*g)) {
                // A block goes whole when its pages need different things.
                continue;
            }
            let p = self.shim_page_of(*g);
            let same = matches!(self.w.host.pte[p], Pte::Present { frame: f, .. } if f == *frame);
            let kept_access = matches!(self.w.host.pte[p], Pte::Present { frame: f, protnone: false, .. } if f == *frame);
            if policy == Policy::Confirm && kept_access {
                return Err(format!(
                    "confirm unmapped gfn {g:#x} whose PTE kept its access: {:?}",
                    self.w.host.pte[p]
                ));
            }
            if policy == Policy::Keep && same && accessible {
                return Err(format!(
                    "keep unmapped gfn {g:#x} of an accessible VMA, frame unchanged: {:?}",
                    self.w.host.pte[p]
                ));
            }
        }
        Ok(())
    }

    /// The host page of `gfn` by the shim's slots.
    fn shim_page_of(&self, gfn: u64) -> usize {
        let id = find_slot(&self.w.shim.slots, gfn).unwrap();
        let s = self.w.shim.slots[id];
        page_of(s.uaddr) + usize::try_from(gfn - s.base_gfn).unwrap()
    }

    /// Properties 1 to 4 and the frames' pins.
    fn check(&self) -> Result<(), String> {
        let w = &self.w;
        if w.el2.map != self.m.mapped {
            return Err(format!(
                "EL2 maps {:?}, model {:?}",
                w.el2.map, self.m.mapped
            ));
        }
        if w.el2.blocks != self.m.blocks {
            return Err(format!(
                "EL2 blocks {:?}, model {:?}",
                w.el2.blocks, self.m.blocks
            ));
        }
        // 2: pin table == EL2, page for page; the block bit marks exactly
        // the pages of EL2's blocks.
        let mut n = 0u64;
        for (id, s) in w.shim.slots.iter().enumerate() {
            let Some(t) = w.shim.pins[id].as_ref() else {
                continue;
            };
            for (i, &e) in t.iter().enumerate() {
                let gfn = s.base_gfn + i as u64;
                let el2 = w.el2.map.get(&gfn).copied();
                let want = (e != 0).then(|| (entry_frame(e), e & 1 == 0));
                if el2 != want {
                    return Err(format!("gfn {gfn:#x}: pin entry {e:#x}, EL2 {el2:?}"));
                }
                if (e & E_BLOCK != 0) != w.el2.blocks.contains(&block_of(gfn)) {
                    return Err(format!(
                        "gfn {gfn:#x}: pin entry {e:#x}, EL2 blocks {:?}",
                        w.el2.blocks
                    ));
                }
                n += u64::from(e != 0);
            }
        }
        if n != w.el2.map.len() as u64 || w.shim.pinned_now != n {
            return Err(format!(
                "EL2 maps {} pages, pin table {n}, pinned_now {}",
                w.el2.map.len(),
                w.shim.pinned_now
            ));
        }
        for (f, fr) in w.host.frames.iter().enumerate().skip(1) {
            let f = f as u64;
            let want = w.el2.mappings_of(f)
                + w.faults
                    .iter()
                    .filter(|p| p.pinned.is_some_and(|(x, _)| x == f))
                    .count() as u32;
            if fr.pins != want {
                return Err(format!(
                    "frame {f:#x}: {} pins, {want} mappings and faults in flight",
                    fr.pins
                ));
            }
            if fr.freed && w.el2.mappings_of(f) > 0 {
                return Err(format!("freed frame {f:#x} mapped"));
            }
        }
        // 3 and 4.
        for (&gfn, &(frame, writable)) in &w.el2.map {
            let p = self.shim_page_of(gfn);
            let Pte::Present {
                frame: f,
                write,
                protnone,
            } = w.host.pte[p]
            else {
                return Err(format!(
                    "gfn {gfn:#x} maps {frame:#x}; the host PTE is absent"
                ));
            };
            if f != frame {
                return Err(format!(
                    "gfn {gfn:#x} maps {frame:#x}; the host PTE maps {f:#x}"
                ));
            }
            if w.invs.is_empty() {
                let kept = w.shim.policy == Policy::Keep && w.host.vma[p] != Vma::None;
                if protnone && !kept {
                    return Err(format!("gfn {gfn:#x} mapped; its PTE is PROT_NONE"));
                }
                if writable && !write && !(protnone && kept) {
                    return Err(format!(
                        "gfn {gfn:#x} mapped writable; its PTE is read-only"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ends the case: every invalidation ends, every fault finishes, then
    /// teardown; nothing pinned, nothing mapped, every frame the host
    /// dropped is free.
    fn drain(&mut self) -> Result<(), String> {
        while !self.w.invs.is_empty() {
            self.end(0)?;
            self.check()?;
        }
        while !self.w.faults.is_empty() {
            self.finish_any(0)?;
            self.check()?;
        }
        self.run(Op::Teardown)
    }

    /// After a teardown: nothing pinned, every frame the host dropped free.
    fn check_frames(&self) -> Result<(), String> {
        for (f, fr) in self.w.host.frames.iter().enumerate().skip(1) {
            if fr.pins != 0 || (!fr.host_ref && !fr.freed) {
                return Err(format!("after teardown frame {f:#x}: {fr:?}"));
            }
        }
        Ok(())
    }
}

/// Every VM starts with this slot, so that early faults have somewhere to go.
const FIRST_SLOT: Op = Op::Slot {
    id: 0,
    gfn: 0,
    npages: 12,
    page: 0,
    ro: false,
};

/// Runs one case.
fn case(policy: Policy, no_range: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut c = Check::new(policy);
    c.w.el2.no_range = no_range;
    c.run(FIRST_SLOT).map_err(fail)?;
    for (k, op) in ops.iter().enumerate() {
        c.run(*op).map_err(|e| {
            let mut s = String::new();
            let _ = write!(s, "{policy:?} (no_range {no_range}) step {k} {op:?}: {e}");
            fail(s)
        })?;
    }
    c.drain()
        .map_err(|e| fail(format!("{policy:?} (no_range {no_range}) at the end: {e}")))
}

/// Runs `total` operations in cases of `CASE_OPS`; returns the count run.
fn run_model(total: u64) -> u64 {
    let cases = u32::try_from(total.div_ceil(CASE_OPS as u64))
        .unwrap()
        .max(1);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let ran = std::cell::Cell::new(0u64);
    let strategy = (
        prop::sample::select(Policy::ALL.to_vec()),
        // One case in four on a hypervisor without HYP_UNSHARE_RANGE.
        prop::sample::select(vec![false, false, false, true]),
        proptest::collection::vec(op(), CASE_OPS),
    );
    let result = runner.run(&strategy, |(policy, no_range, ops)| {
        ran.set(ran.get() + ops.len() as u64);
        case(policy, no_range, &ops)
    });
    if let Err(e) = result {
        panic!("s2pin-core model: {e}");
    }
    ran.get()
}

/// Runs `total` operations and prints the count and what they did.
fn run_and_report(total: u64) {
    let start = std::time::Instant::now();
    let ran = run_model(total);
    println!(
        "s2pin-core model: {ran} operations, 0 failures ({:.1} s)\n  {}",
        start.elapsed().as_secs_f64(),
        stats::line()
    );
}

/// The short form, in `cargo test` (`cargo xtask test host`).
#[test]
fn host_side_matches_the_model() {
    run_and_report(20_000);
}

/// The long form (`cargo xtask model`): `S2PIN_MODEL_OPS` operations
/// (default 10^6). `cargo test --release -p s2pin-core --test model --
/// --ignored --nocapture`.
#[test]
#[ignore = "long form: cargo xtask model"]
fn host_side_matches_the_model_long() {
    let total = std::env::var("S2PIN_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000u64);
    run_and_report(total);
}

/// The model is not vacuous: each policy's characteristic step gives the
/// expected mapping.
#[test]
fn policies_differ_on_numa() {
    for policy in Policy::ALL {
        let mut c = Check::new(*policy);
        c.run(Op::Slot {
            id: 0,
            gfn: 0,
            npages: 4,
            // Not THP-backed: 4 KiB pages (blocks_split_or_go_whole has blocks).
            page: THP_PAGES as u8,
            ro: false,
        })
        .unwrap();
        for g in 0..4 {
            c.run(Op::Fault {
                gfn: g,
                write: true,
                enomem: false,
            })
            .unwrap();
        }
        assert_eq!(c.w.el2.map.len(), 4);
        // NUMA PROT_NONE over pages 0..2, then mprotect(PROT_READ) of 2..4.
        c.run(Op::Begin {
            ev: event::PROTECTION_VMA as u8,
            page: THP_PAGES as u8,
            len: 2,
            change: 1,
        })
        .unwrap();
        c.run(Op::End { k: 0 }).unwrap();
        c.run(Op::Begin {
            ev: event::PROTECTION_VMA as u8,
            page: THP_PAGES as u8 + 2,
            len: 2,
            change: 4,
        })
        .unwrap();
        c.run(Op::End { k: 0 }).unwrap();
        let got: Vec<(u64, bool)> =
            c.w.el2
                .map
                .iter()
                .map(|(g, m)| (g - WIN.base_gfn, m.1))
                .collect();
        let want: &[(u64, bool)] = match policy {
            Policy::Eager => &[],
            Policy::Confirm => &[(2, false), (3, false)],
            Policy::Keep => &[(0, true), (1, true), (2, false), (3, false)],
        };
        assert_eq!(got, want, "{policy:?}");
        // A munmap unmaps under every policy.
        c.run(Op::Begin {
            ev: event::UNMAP as u8,
            page: THP_PAGES as u8,
            len: 4,
            change: 1,
        })
        .unwrap();
        assert!(c.w.el2.map.is_empty());
        c.drain().unwrap();
    }
}

/// An invalidation between a fault's pin and its map makes it retry.
#[test]
fn fault_racing_an_invalidation_retries() {
    let mut c = Check::new(Policy::Confirm);
    c.run(Op::Slot {
        id: 0,
        gfn: 0,
        npages: 4,
        page: 0,
        ro: false,
    })
    .unwrap();
    c.run(Op::FaultStart {
        gfn: 1,
        write: true,
    })
    .unwrap();
    c.run(Op::FaultPin { k: 0 }).unwrap();
    let old = c.w.faults[0].pinned.unwrap().0;
    // munmap of the page: the host frees the frame (after our extra pin).
    c.run(Op::Begin {
        ev: event::UNMAP as u8,
        page: 1,
        len: 1,
        change: 1,
    })
    .unwrap();
    c.run(Op::End { k: 0 }).unwrap();
    c.run(Op::FaultFinish {
        k: 0,
        enomem: false,
    })
    .unwrap();
    assert!(c.w.el2.map.is_empty());
    assert!(c.w.host.frames[old as usize].freed);
    c.run(Op::Fault {
        gfn: 1,
        write: true,
        enomem: false,
    })
    .unwrap();
    assert_ne!(c.w.el2.map[&(WIN.base_gfn + 1)].0, old);
    c.drain().unwrap();
}

/// 2 MiB blocks (`BLOCK` pages here), step by step: a fault on THP-backed
/// memory shares its whole block; a munmap of the block unshares it whole;
/// MADV_DONTNEED of one page splits it (one memcache page) and, with an
/// empty memcache, unshares the whole block instead; mprotect(PROT_READ) of
/// a whole block write-protects it in one call and a later write splits it;
/// teardown reclaims the rest.
#[test]
fn blocks_split_or_go_whole() {
    let b = BLOCK as u64;
    let mut c = Check::new(Policy::Confirm);
    c.run(Op::Slot {
        id: 0,
        gfn: 0,
        npages: 12,
        page: 0,
        ro: false,
    })
    .unwrap();
    let fault = |c: &mut Check, gfn: u8| {
        c.run(Op::Fault {
            gfn,
            write: true,
            enomem: false,
        })
        .unwrap();
    };
    let event = |c: &mut Check, ev: u32, page: usize, len: usize, change: u8| {
        c.run(Op::Begin {
            ev: ev as u8,
            page: page as u8,
            len: len as u8,
            change,
        })
        .unwrap();
        c.run(Op::End { k: 0 }).unwrap();
    };
    let base = WIN.base_gfn;
    let mapped = |c: &Check| -> Vec<u64> { c.w.el2.map.keys().map(|g| g - base).collect() };

    // One fault maps the block; the memcache keeps its spare pages.
    fault(&mut c, 1);
    assert_eq!(mapped(&c), (0..b).collect::<Vec<_>>());
    assert!(c.w.el2.blocks.contains(&base));
    assert_eq!(c.w.el2.memcache, BLOCK_SPARE);
    // munmap-like invalidation of the whole block (no change): one unshare, no memory.
    event(&mut c, event::UNMAP, 0, BLOCK, 0);
    assert!(c.w.el2.map.is_empty() && c.w.el2.blocks.is_empty());
    assert_eq!(c.w.el2.memcache, BLOCK_SPARE);
    fault(&mut c, 2);
    assert!(c.w.el2.blocks.contains(&base));
    // MADV_DONTNEED of page 1: a split, one memcache page.
    event(&mut c, event::CLEAR, 1, 1, 1);
    assert_eq!(mapped(&c), vec![0, 2, 3]);
    assert!(c.w.el2.blocks.is_empty());
    assert_eq!(c.w.el2.memcache, BLOCK_SPARE - 1);

    // The next block, and an empty memcache: the whole block goes.
    fault(&mut c, 5);
    assert!(c.w.el2.blocks.contains(&(base + b)));
    c.w.el2.memcache = 0;
    event(&mut c, event::CLEAR, BLOCK + 1, 1, 1);
    assert_eq!(mapped(&c), vec![0, 2, 3]);
    assert!(c.w.el2.blocks.is_empty());
    // The guest re-faults: page 5 is a 4 KiB frame now, the rest stay THP
    // frames that no longer form a block: 4 KiB pages.
    fault(&mut c, 4);
    fault(&mut c, 5);
    assert_eq!(mapped(&c), vec![0, 2, 3, 4, 5]);
    assert!(c.w.el2.blocks.is_empty());

    // mprotect(PROT_READ) of a whole block: one write-protect, the block stays.
    fault(&mut c, 9);
    let third = base + 2 * b;
    assert!(c.w.el2.blocks.contains(&third));
    event(&mut c, event::PROTECTION_VMA, 2 * BLOCK, BLOCK, 4);
    assert!(c.w.el2.blocks.contains(&third));
    assert!((third..third + b).all(|g| !c.w.el2.map[&g].1));
    // Writable again, and a write: that page's permissions split the block.
    event(&mut c, event::PROTECTION_VMA, 2 * BLOCK, BLOCK, 3);
    let mc = c.w.el2.memcache;
    c.run(Op::Fault {
        gfn: 9,
        write: true,
        enomem: false,
    })
    .unwrap();
    assert!(c.w.el2.blocks.is_empty());
    assert!(c.w.el2.map[&(third + 1)].1 && !c.w.el2.map[&third].1);
    assert_eq!(c.w.el2.memcache, mc - 1);
    c.drain().unwrap();
}
