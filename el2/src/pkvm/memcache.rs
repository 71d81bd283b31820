//! A VM's memcache: host-donated pages (owned by the hypervisor) that serve
//! as the VM's stage-2 tables and vCPU state (ABI §2.7).
//!
//! The memcache is the VM's [`TableMemory`]: `alloc_table` takes a free
//! page, `free_table` puts it back (tables freed while the VM is live go
//! back to its memcache). The root tables are not free pages: they are
//! reserved at VM creation and handed out once by `alloc_contiguous`.
//! Table contents are reached through the [`PageAccess`] the platform gave
//! this VM. Nothing here allocates after a top-up reserved room for the
//! pages, so the stage-2 code's calls cannot fail on the heap.

use alloc::collections::TryReserveError;
use alloc::vec::Vec;

use stage2::mm::{Table, TableMemory};
use stage2::{Hpa, Pfn, PAGE_SHIFT};

use super::platform::PageAccess;

/// The root tables reserved for `Stage2::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Root {
    pfn: Pfn,
    pages: usize,
    taken: bool,
}

/// One VM's pool of hypervisor-owned pages.
#[derive(Debug)]
pub struct Memcache<A: PageAccess> {
    access: A,
    /// Free pages, used last-in first-out.
    free: Vec<Pfn>,
    /// A free page known to hold only zeros: a table that was given back
    /// empty (`free_zeroed_table`) and not handed out since. One is enough
    /// for the common case of a last-level table emptied by an unshare and
    /// needed again by the next share, whose zeroing it saves.
    zeroed: Option<Pfn>,
    /// Pages handed out as non-root tables.
    tables: usize,
    root: Root,
}

impl<A: PageAccess> Memcache<A> {
    /// An empty memcache whose root tables are `[root, root + pages)`
    /// (already owned by the hypervisor).
    pub fn new(access: A, root: Pfn, pages: usize) -> Self {
        Self {
            access,
            free: Vec::new(),
            zeroed: None,
            tables: 0,
            root: Root {
                pfn: root,
                pages,
                taken: false,
            },
        }
    }

    /// Number of free pages.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// The free pages (last one used first).
    #[must_use]
    pub fn free_list(&self) -> &[Pfn] {
        &self.free
    }

    /// How many pages the free list holds without allocating.
    #[must_use]
    pub fn free_capacity(&self) -> usize {
        self.free.capacity()
    }

    /// Table pages in use, the root included (while the stage-2 exists).
    #[must_use]
    pub fn table_pages(&self) -> usize {
        self.tables + if self.root.taken { self.root.pages } else { 0 }
    }

    /// The reserved root tables: first frame and count.
    #[must_use]
    pub fn root(&self) -> (Pfn, usize) {
        (self.root.pfn, self.root.pages)
    }

    /// Makes room for `n` more free pages, so that [`add`](Self::add)
    /// and every later [`free_table`](TableMemory::free_table) cannot
    /// allocate: the free list's capacity covers every page it can ever
    /// hold again (the free ones, the tables in use, and `n`). vCPU pages
    /// never come back to the free list.
    pub fn reserve(&mut self, n: usize) -> Result<(), TryReserveError> {
        self.free.try_reserve(self.tables.saturating_add(n))
    }

    /// Adds a hypervisor-owned page to the free list (after
    /// [`reserve`](Self::reserve); if there is no room the push allocates).
    pub fn add(&mut self, pfn: Pfn) {
        self.free.push(pfn);
    }

    /// Takes a free page (for vCPU state or a table).
    pub fn take(&mut self) -> Option<Pfn> {
        self.take_zeroed().map(|(pfn, _)| pfn)
    }

    /// Takes a free page and says whether it is known to hold only zeros.
    fn take_zeroed(&mut self) -> Option<(Pfn, bool)> {
        let pfn = self.free.pop()?;
        let zeroed = self.zeroed == Some(pfn);
        if zeroed {
            self.zeroed = None;
        }
        Some((pfn, zeroed))
    }

    /// The next page [`take`](Self::take) would return.
    #[must_use]
    pub fn peek(&self) -> Option<Pfn> {
        self.free.last().copied()
    }

    /// `pfn` leaves the memcache for good (returned to the host).
    pub fn release(&mut self, pfn: Pfn) {
        self.access.release(pfn);
    }
}

fn pfn_of(pa: Hpa) -> Pfn {
    Pfn(pa.raw() >> PAGE_SHIFT)
}

fn pa_of(pfn: Pfn) -> Hpa {
    Hpa(pfn.raw() << PAGE_SHIFT)
}

impl<A: PageAccess> TableMemory for Memcache<A> {
    fn available(&self) -> usize {
        self.free.len()
    }

    fn alloc_table(&mut self) -> Option<Hpa> {
        self.alloc_table_zeroed().map(|(t, _)| t)
    }

    fn alloc_table_zeroed(&mut self) -> Option<(Hpa, bool)> {
        // `Stage2::new` takes a single-page root with `alloc_table`.
        if !self.root.taken && self.root.pages == 1 {
            self.root.taken = true;
            return Some((pa_of(self.root.pfn), false));
        }
        let (pfn, zeroed) = self.take_zeroed()?;
        self.tables += 1;
        Some((pa_of(pfn), zeroed))
    }

    fn free_zeroed_table(&mut self, table: Hpa) {
        self.free_table(table);
        let pfn = pfn_of(table);
        if self.free.last() == Some(&pfn) {
            #[cfg(any(test, feature = "fake"))]
            debug_assert!(
                self.access.table(pfn).iter().all(|&e| e == 0),
                "table {pfn:?} given back as zeroed is not"
            );
            self.zeroed = Some(pfn);
        }
    }

    fn free_table(&mut self, table: Hpa) {
        if self.root.taken && pfn_of(table) == self.root.pfn {
            // `Stage2::destroy` of a single-page root.
            self.root.taken = false;
            return;
        }
        // Cannot allocate: `reserve` made room for every table in use.
        self.free.push(pfn_of(table));
        self.tables = self.tables.saturating_sub(1);
    }

    fn alloc_contiguous(&mut self, count: usize) -> Option<Hpa> {
        // Only the root is ever allocated contiguously, exactly once.
        if self.root.taken || count != self.root.pages {
            return None;
        }
        self.root.taken = true;
        Some(pa_of(self.root.pfn))
    }

    fn free_contiguous(&mut self, _base: Hpa, _count: usize) {
        // The root stays reserved: finalize returns it to the host.
        self.root.taken = false;
    }

    fn table(&self, table: Hpa) -> &Table {
        self.access.table(pfn_of(table))
    }

    fn table_mut(&mut self, table: Hpa) -> &mut Table {
        self.access.table_mut(pfn_of(table))
    }
}
