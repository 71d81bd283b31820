//! Workloads for `cargo xtask bench stage2`, run under callgrind.
//!
//! ```text
//! bench-stage2 <ours|aarch64-paging> <map4k|map2m|unmap|split>
//! ```
//!
//! Each run builds a fresh table, does any setup, then does the measured work
//! inside exactly one `#[inline(never)]` function whose name contains
//! [`MEASURED_MARKER`], so that `valgrind --tool=callgrind
//! --toggle-collect='*s2bench_measured_*'` counts that work and nothing else.
//! Afterwards (outside the measured function) it checks that the work was
//! really done by walking the table, and prints one line
//!
//! ```text
//! result impl=<impl> workload=<workload> tables=<N> mapped=<bytes>
//! ```
//!
//! where `tables` is the number of live 4 KiB translation tables other than
//! the root after the work, and `mapped` the bytes the table maps. Any failed
//! check exits non-zero.
//!
//! Both sides get the same addresses: IPA `[1 GiB, 2 GiB)`, a 39-bit IPA
//! space (one level-1 root table), output addresses at [`PA_2M`] (2 MiB but
//! not 1 GiB aligned) or, for the split, [`PA_1G`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes, UpdatableDescriptor};
use aarch64_paging::idmap::IdTranslation;
use aarch64_paging::paging::{Constraints, MemoryRegion, Stage2 as ApStage2};
use aarch64_paging::Mapping;
use stage2::mm::ArenaMemory;
use stage2::pgtable::{Attrs, Granule, MemType, PageState, Perms, Stage2};
use stage2::tlb::CountingTlb;
use stage2::{Hpa, Ipa, Vmid};

/// Substring of every measured function's name (the callgrind toggle).
pub const MEASURED_MARKER: &str = "s2bench_measured_";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// First IPA of the benchmarked range.
const IPA: u64 = GIB;
/// Size of the benchmarked range.
const SIZE: u64 = GIB;
/// Output address for the 4K/2M workloads: 2 MiB aligned but not 1 GiB
/// aligned, so that aarch64-paging (which has no "at most 2 MiB" option)
/// cannot use a 1 GiB block in `map2m`.
const PA_2M: u64 = 0x8_0020_0000;
/// Output address for the split workload: 1 GiB aligned.
const PA_1G: u64 = 0x8_0000_0000;
/// IPA size: 39 bits gives a single level-1 root table on both sides.
const IPA_BITS: u8 = 39;
/// aarch64-paging root level matching [`IPA_BITS`].
const AP_ROOT_LEVEL: usize = 1;

// ---------------------------------------------------------------------------
// Counting global allocator: aarch64-paging allocates each table with the
// global allocator as a 4 KiB, 4 KiB-aligned block (`PageTable`); nothing else
// in this program asks for that layout, so those are counted as tables. Both
// sides run with this allocator, so its cost is the same on both.
// ---------------------------------------------------------------------------

struct CountingAlloc;

static LIVE_PAGE_TABLES: AtomicUsize = AtomicUsize::new(0);

fn is_table_layout(layout: Layout) -> bool {
    layout.size() == 4096 && layout.align() == 4096
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counter has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_table_layout(layout) {
            LIVE_PAGE_TABLES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_table_layout(layout) {
            LIVE_PAGE_TABLES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: our caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_table_layout(layout) {
            LIVE_PAGE_TABLES.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: our caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A table-sized block never grows or shrinks: PageTable is never
        // reallocated, and a reallocated block is not a table afterwards.
        if is_table_layout(layout) {
            LIVE_PAGE_TABLES.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: our caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Workloads and sides.
// ---------------------------------------------------------------------------

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Map 1 GiB as 4 KiB pages into an empty table.
    Map4k,
    /// Map 1 GiB as 2 MiB blocks into an empty table.
    Map2m,
    /// Unmap the 1 GiB that `Map4k` mapped (the mapping is setup).
    Unmap,
    /// Split a 1 GiB block into 4 KiB pages (mapping the block is setup).
    Split,
}

impl Workload {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "map4k" => Some(Self::Map4k),
            "map2m" => Some(Self::Map2m),
            "unmap" => Some(Self::Unmap),
            "split" => Some(Self::Split),
            _ => None,
        }
    }
}

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Ours,
    AArch64Paging,
}

/// What a run leaves behind, for the checks and the report.
#[derive(Debug)]
struct Outcome {
    /// Live tables other than the root.
    tables: usize,
    /// Bytes mapped after the work.
    mapped: u64,
}

/// The layout every leaf must have after the work.
#[derive(Clone, Copy, Debug)]
struct Expect {
    /// Bytes that must be mapped, from [`IPA`].
    mapped: u64,
    /// Size of every leaf.
    leaf: u64,
    /// Output address of [`IPA`].
    pa: u64,
}

fn expectation(w: Workload) -> Expect {
    match w {
        Workload::Map4k => Expect {
            mapped: SIZE,
            leaf: 4 * KIB,
            pa: PA_2M,
        },
        Workload::Map2m => Expect {
            mapped: SIZE,
            leaf: 2 * MIB,
            pa: PA_2M,
        },
        Workload::Unmap => Expect {
            mapped: 0,
            leaf: 4 * KIB,
            pa: PA_2M,
        },
        Workload::Split => Expect {
            mapped: SIZE,
            leaf: 4 * KIB,
            pa: PA_1G,
        },
    }
}

// ----------------------------- ours ----------------------------------------

type Ours = Stage2<ArenaMemory, CountingTlb>;

const OURS_ATTRS: Attrs = Attrs {
    perms: Perms::RW,
    mem: MemType::Normal,
    state: PageState::Owned,
};

#[inline(never)]
fn s2bench_measured_ours_map(t: &mut Ours, hpa: u64, granule: Granule) -> Result<(), String> {
    t.map(
        black_box(Ipa::new(IPA)),
        black_box(Hpa::new(hpa)),
        black_box(SIZE),
        black_box(OURS_ATTRS),
        black_box(granule),
    )
    .map_err(|e| format!("map: {e:?}"))
}

#[inline(never)]
fn s2bench_measured_ours_unmap(t: &mut Ours) -> Result<u64, String> {
    t.unmap(black_box(Ipa::new(IPA)), black_box(SIZE))
        .map_err(|e| format!("unmap: {e:?}"))
}

#[inline(never)]
fn s2bench_measured_ours_split(t: &mut Ours) -> Result<(), String> {
    t.split(
        black_box(Ipa::new(IPA)),
        black_box(SIZE),
        black_box(Granule::Page),
    )
    .map_err(|e| format!("split: {e:?}"))
}

fn run_ours(w: Workload) -> Result<Outcome, String> {
    let mut t = Ours::new(
        IPA_BITS,
        Vmid(1),
        ArenaMemory::new(),
        CountingTlb::default(),
    )
    .map_err(|e| format!("Stage2::new: {e:?}"))?;
    match w {
        Workload::Map4k => s2bench_measured_ours_map(&mut t, PA_2M, Granule::Page)?,
        Workload::Map2m => s2bench_measured_ours_map(&mut t, PA_2M, Granule::Block2M)?,
        Workload::Unmap => {
            t.map(
                Ipa::new(IPA),
                Hpa::new(PA_2M),
                SIZE,
                OURS_ATTRS,
                Granule::Page,
            )
            .map_err(|e| format!("setup map: {e:?}"))?;
            let pages = s2bench_measured_ours_unmap(&mut t)?;
            if pages != SIZE / (4 * KIB) {
                return Err(format!(
                    "unmap reported {pages} pages, expected {}",
                    SIZE / (4 * KIB)
                ));
            }
        }
        Workload::Split => {
            t.map(
                Ipa::new(IPA),
                Hpa::new(PA_1G),
                SIZE,
                OURS_ATTRS,
                Granule::Largest,
            )
            .map_err(|e| format!("setup map: {e:?}"))?;
            let leaf = t
                .query(Ipa::new(IPA))
                .ok_or("setup: 1 GiB block not mapped")?;
            if leaf.size != GIB {
                return Err(format!(
                    "setup: expected a 1 GiB block, got a {}-byte leaf",
                    leaf.size
                ));
            }
            s2bench_measured_ours_split(&mut t)?;
        }
    }
    let e = expectation(w);
    let mut mapped = 0u64;
    let mut bad: Option<String> = None;
    t.walk(Ipa::new(0), 1u64 << IPA_BITS, |leaf| {
        let want_pa = e.pa + (leaf.ipa.raw() - IPA);
        if bad.is_none()
            && (leaf.size != e.leaf || leaf.hpa.raw() != want_pa || leaf.attrs != OURS_ATTRS)
        {
            bad = Some(format!("unexpected leaf {leaf:?}"));
        }
        mapped += leaf.size;
    })
    .map_err(|e| format!("walk: {e:?}"))?;
    if let Some(b) = bad {
        return Err(b);
    }
    let root_tables = t.config().root_tables;
    let tables = t
        .mm()
        .live()
        .checked_sub(root_tables)
        .ok_or("arena holds fewer pages than the root")?;
    Ok(Outcome { tables, mapped })
}

// ------------------------- aarch64-paging ----------------------------------

type Theirs = Mapping<IdTranslation<Stage2Attributes>, ApStage2>;

fn ap_flags() -> Stage2Attributes {
    Stage2Attributes::VALID
        | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
        | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
        | Stage2Attributes::S2AP_ACCESS_RW
        | Stage2Attributes::SH_INNER
        | Stage2Attributes::ACCESS_FLAG
        | Stage2Attributes::XN
}

fn region() -> MemoryRegion {
    MemoryRegion::new(IPA as usize, (IPA + SIZE) as usize)
}

#[inline(never)]
fn s2bench_measured_ap_map(t: &mut Theirs, pa: u64, c: Constraints) -> Result<(), String> {
    t.map_range(
        black_box(&region()),
        black_box(PhysicalAddress(pa as usize)),
        black_box(ap_flags()),
        black_box(c),
    )
    .map_err(|e| format!("map_range: {e}"))
}

#[inline(never)]
fn s2bench_measured_ap_unmap(t: &mut Theirs) -> Result<(), String> {
    // aarch64-paging unmaps by mapping without VALID; a block-aligned range
    // over a subtable frees the subtable.
    t.map_range(
        black_box(&region()),
        black_box(PhysicalAddress(0)),
        black_box(Stage2Attributes::empty()),
        black_box(Constraints::empty()),
    )
    .map_err(|e| format!("map_range (unmap): {e}"))
}

#[inline(never)]
fn s2bench_measured_ap_split(t: &mut Theirs) -> Result<(), String> {
    // aarch64-paging has no "split without change". `modify_range` splits a
    // block only where the range is not aligned to it, so touching the first
    // 4 KiB of each 2 MiB with a no-op updater splits the 1 GiB block into
    // 2 MiB blocks (first call) and each of those into pages, once each.
    let mut at = black_box(IPA);
    while at < IPA + SIZE {
        let r = MemoryRegion::new(at as usize, (at + 4 * KIB) as usize);
        t.modify_range(&r, &keep)
            .map_err(|e| format!("modify_range: {e}"))?;
        at += 2 * MIB;
    }
    Ok(())
}

/// The `modify_range` updater for the split: changes nothing.
fn keep(_: &MemoryRegion, _: &mut UpdatableDescriptor<'_, Stage2Attributes>) -> Result<(), ()> {
    Ok(())
}

fn run_ap(w: Workload) -> Result<Outcome, String> {
    let before = LIVE_PAGE_TABLES.load(Ordering::Relaxed);
    let mut t = Theirs::new(IdTranslation::new(), AP_ROOT_LEVEL, ApStage2);
    match w {
        Workload::Map4k => s2bench_measured_ap_map(&mut t, PA_2M, Constraints::NO_BLOCK_MAPPINGS)?,
        Workload::Map2m => s2bench_measured_ap_map(&mut t, PA_2M, Constraints::empty())?,
        Workload::Unmap => {
            t.map_range(
                &region(),
                PhysicalAddress(PA_2M as usize),
                ap_flags(),
                Constraints::NO_BLOCK_MAPPINGS,
            )
            .map_err(|e| format!("setup map_range: {e}"))?;
            s2bench_measured_ap_unmap(&mut t)?;
        }
        Workload::Split => {
            t.map_range(
                &region(),
                PhysicalAddress(PA_1G as usize),
                ap_flags(),
                Constraints::empty(),
            )
            .map_err(|e| format!("setup map_range: {e}"))?;
            let mut levels = Vec::new();
            t.walk_range(&region(), &mut |_, d, level| {
                if d.is_valid() {
                    levels.push(level);
                }
                Ok(())
            })
            .map_err(|e| format!("setup walk: {e}"))?;
            if levels != [1] {
                return Err(format!(
                    "setup: expected one level-1 block, got valid leaves at {levels:?}"
                ));
            }
            s2bench_measured_ap_split(&mut t)?;
        }
    }
    let e = expectation(w);
    let mut mapped = 0u64;
    let mut bad: Option<String> = None;
    let whole = MemoryRegion::new(0, 1usize << IPA_BITS);
    t.walk_range(&whole, &mut |mr, d, level| {
        if !d.is_valid() {
            return Ok(());
        }
        let size = (4 * KIB) << ((3 - level) * 9);
        let want_pa = e.pa + (mr.start().0 as u64 - IPA);
        let flags = d.flags() - Stage2Attributes::TABLE_OR_PAGE;
        if bad.is_none()
            && (size != e.leaf
                || mr.len() as u64 != size
                || d.output_address().0 as u64 != want_pa
                || flags != ap_flags())
        {
            bad = Some(format!("unexpected leaf {mr:?} at level {level}: {d:?}"));
        }
        mapped += size;
        Ok(())
    })
    .map_err(|e| format!("walk_range: {e}"))?;
    if let Some(b) = bad {
        return Err(b);
    }
    let live = LIVE_PAGE_TABLES.load(Ordering::Relaxed) - before;
    let tables = live.checked_sub(1).ok_or("no root table counted")?;
    Ok(Outcome { tables, mapped })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (imp, w) = match args.as_slice() {
        [i, w] => {
            let imp = match i.as_str() {
                "ours" => Impl::Ours,
                "aarch64-paging" => Impl::AArch64Paging,
                _ => return usage(),
            };
            let Some(w) = Workload::parse(w) else {
                return usage();
            };
            (imp, w)
        }
        _ => return usage(),
    };
    let outcome = match imp {
        Impl::Ours => run_ours(w),
        Impl::AArch64Paging => run_ap(w),
    };
    match outcome {
        Ok(o) => {
            let e = expectation(w);
            if o.mapped != e.mapped {
                eprintln!(
                    "bench-stage2: {} {}: {} bytes mapped, expected {}",
                    args[0], args[1], o.mapped, e.mapped
                );
                return ExitCode::FAILURE;
            }
            println!(
                "result impl={} workload={} tables={} mapped={}",
                args[0], args[1], o.tables, o.mapped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-stage2: {} {}: {e}", args[0], args[1]);
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: bench-stage2 <ours|aarch64-paging> <map4k|map2m|unmap|split>");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every workload runs natively on both sides and leaves the expected
    /// tables. One test, run in order, because the table counter is global.
    #[test]
    fn every_workload_runs_and_leaves_the_expected_tables() {
        let cases = [
            (Workload::Map4k, 513),
            (Workload::Map2m, 1),
            (Workload::Unmap, 0),
            (Workload::Split, 513),
        ];
        for (w, tables) in cases {
            for (imp, run) in [("ours", run_ours as fn(_) -> _), ("aarch64-paging", run_ap)] {
                let o = run(w).unwrap_or_else(|e| panic!("{imp} {w:?}: {e}"));
                assert_eq!(o.tables, tables, "{imp} {w:?}");
                assert_eq!(o.mapped, expectation(w).mapped, "{imp} {w:?}");
            }
        }
    }

    #[test]
    fn workload_names_parse() {
        assert_eq!(Workload::parse("map4k"), Some(Workload::Map4k));
        assert_eq!(Workload::parse("split"), Some(Workload::Split));
        assert_eq!(Workload::parse("map1g"), None);
    }
}
