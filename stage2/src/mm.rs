//! Memory for page tables.
//!
//! Table memory is reached only through [`TableMemory`]: the page-table code
//! never turns a physical address into a pointer itself, so this crate needs
//! no `unsafe`. At EL2 the implementation is a per-VM memcache of pages the
//! host donated, reached through the hypervisor's linear map; in tests it is
//! [`ArenaMemory`], a vector of boxed tables with fake physical addresses.
//!
//! Allocation is prepare-then-commit: an operation first asks
//! [`TableMemory::available`] whether it can get every table it may need,
//! fails with no change if not, and only then starts writing descriptors.
//! After a successful `available() >= n` check, the next `n` calls to
//! [`TableMemory::alloc_table`] must succeed.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::addr::{Hpa, PAGE_SIZE};

/// Number of descriptors in one 4 KiB table.
pub const ENTRIES: usize = 512;

/// One translation table: 512 raw 64-bit descriptors.
pub type Table = [u64; ENTRIES];

/// Allocation of, and access to, translation-table pages.
pub trait TableMemory {
    /// How many single tables [`alloc_table`](Self::alloc_table) can hand out
    /// right now without failing.
    fn available(&self) -> usize;

    /// Takes one 4 KiB table page. Its contents are unspecified; the caller
    /// zeroes it before use.
    fn alloc_table(&mut self) -> Option<Hpa>;

    /// Gives back a table page taken with [`alloc_table`](Self::alloc_table).
    fn free_table(&mut self, table: Hpa);

    /// Takes one table page like [`alloc_table`](Self::alloc_table) and
    /// says whether all its entries are known to be zero (it was given back
    /// with [`free_zeroed_table`](Self::free_zeroed_table) and not handed out
    /// since), so that the caller need not zero it again. The default knows
    /// nothing.
    fn alloc_table_zeroed(&mut self) -> Option<(Hpa, bool)> {
        self.alloc_table().map(|t| (t, false))
    }

    /// Gives back a table page whose 512 entries are all zero (a table that
    /// became empty: every removal writes 0). The default forgets that.
    fn free_zeroed_table(&mut self, table: Hpa) {
        self.free_table(table);
    }

    /// Takes `count` physically contiguous table pages aligned to
    /// `count * 4 KiB` (a concatenated stage-2 root). `count` is a power of
    /// two from 1 to 16. Each page is then reachable at `base + i * 4 KiB`.
    fn alloc_contiguous(&mut self, count: usize) -> Option<Hpa>;

    /// Gives back pages taken with [`alloc_contiguous`](Self::alloc_contiguous).
    fn free_contiguous(&mut self, base: Hpa, count: usize);

    /// The table at `table`, which must be a page this memory handed out.
    fn table(&self, table: Hpa) -> &Table;

    /// The table at `table`, mutably.
    fn table_mut(&mut self, table: Hpa) -> &mut Table;
}

/// Base of the fake physical addresses handed out by [`ArenaMemory`].
pub const ARENA_BASE: u64 = 0x8000_0000;

/// A heap-backed [`TableMemory`] for tests and benchmarks.
///
/// Pages get fake physical addresses `ARENA_BASE + index * 4 KiB`. A limit
/// on live pages lets tests exercise running out of memory.
#[derive(Debug)]
pub struct ArenaMemory {
    pages: Vec<Box<Table>>,
    free: Vec<usize>,
    /// Per page: given back with `free_zeroed_table` (checked to be zero)
    /// and not handed out since.
    zeroed: Vec<bool>,
    live: usize,
    limit: usize,
}

impl Default for ArenaMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl ArenaMemory {
    /// An arena with no limit.
    #[must_use]
    pub fn new() -> Self {
        Self::with_limit(usize::MAX)
    }

    /// An arena that hands out at most `limit` live pages.
    #[must_use]
    pub fn with_limit(limit: usize) -> Self {
        Self {
            pages: Vec::new(),
            free: Vec::new(),
            zeroed: Vec::new(),
            live: 0,
            limit,
        }
    }

    /// Number of pages currently handed out.
    #[must_use]
    pub fn live(&self) -> usize {
        self.live
    }

    /// Changes the limit on live pages.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    fn index(&self, pa: Hpa) -> usize {
        let off = pa.raw().wrapping_sub(ARENA_BASE);
        debug_assert!(
            off.is_multiple_of(PAGE_SIZE),
            "unaligned table address {pa}"
        );
        (off / PAGE_SIZE) as usize
    }

    fn address(index: usize) -> Hpa {
        Hpa::new(ARENA_BASE + index as u64 * PAGE_SIZE)
    }
}

impl TableMemory for ArenaMemory {
    fn available(&self) -> usize {
        self.limit.saturating_sub(self.live)
    }

    fn alloc_table(&mut self) -> Option<Hpa> {
        self.alloc_table_zeroed().map(|(t, _)| t)
    }

    fn free_table(&mut self, table: Hpa) {
        let index = self.index(table);
        debug_assert!(index < self.pages.len() && !self.free.contains(&index));
        self.free.push(index);
        self.live -= 1;
    }

    fn alloc_table_zeroed(&mut self) -> Option<(Hpa, bool)> {
        if self.live >= self.limit {
            return None;
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pages.push(Box::new([0; ENTRIES]));
                self.pages.len() - 1
            }
        };
        self.live += 1;
        let zeroed = self.zeroed.get_mut(index).is_some_and(core::mem::take);
        Some((Self::address(index), zeroed))
    }

    fn free_zeroed_table(&mut self, table: Hpa) {
        let index = self.index(table);
        debug_assert!(
            self.pages[index].iter().all(|&e| e == 0),
            "a table given back as zeroed is not: {table}"
        );
        if self.zeroed.len() <= index {
            self.zeroed.resize(index + 1, false);
        }
        self.zeroed[index] = true;
        self.free_table(table);
    }

    fn alloc_contiguous(&mut self, count: usize) -> Option<Hpa> {
        if count == 0 || self.available() < count {
            return None;
        }
        // Fresh pages at the end of the arena, padded so the first one is
        // aligned to `count` pages; the padding goes on the free list.
        while !self.pages.len().is_multiple_of(count) {
            self.pages.push(Box::new([0; ENTRIES]));
            self.free.push(self.pages.len() - 1);
        }
        let first = self.pages.len();
        for _ in 0..count {
            self.pages.push(Box::new([0; ENTRIES]));
        }
        self.live += count;
        Some(Self::address(first))
    }

    fn free_contiguous(&mut self, base: Hpa, count: usize) {
        let first = self.index(base);
        for i in first..first + count {
            self.free.push(i);
        }
        self.live -= count;
    }

    fn table(&self, table: Hpa) -> &Table {
        &self.pages[self.index(table)]
    }

    fn table_mut(&mut self, table: Hpa) -> &mut Table {
        let index = self.index(table);
        &mut self.pages[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_enforced_and_frees_return() {
        let mut m = ArenaMemory::with_limit(2);
        let a = m.alloc_table().unwrap();
        let b = m.alloc_table().unwrap();
        assert_eq!(m.alloc_table(), None);
        assert_eq!(m.available(), 0);
        m.free_table(a);
        assert_eq!(m.live(), 1);
        assert_eq!(m.alloc_table(), Some(a));
        m.table_mut(b)[3] = 7;
        assert_eq!(m.table(b)[3], 7);
    }

    #[test]
    fn a_table_given_back_zeroed_is_known_zero_once() {
        let mut m = ArenaMemory::new();
        let a = m.alloc_table().unwrap();
        m.free_zeroed_table(a);
        assert_eq!(m.alloc_table_zeroed(), Some((a, true)));
        m.table_mut(a)[9] = 1;
        m.free_table(a);
        assert_eq!(m.alloc_table_zeroed(), Some((a, false)));
        m.table_mut(a)[9] = 0;
        m.free_zeroed_table(a);
        assert_eq!(m.alloc_table(), Some(a));
        m.free_table(a);
        assert_eq!(m.alloc_table_zeroed(), Some((a, false)));
    }

    #[test]
    fn contiguous_is_aligned() {
        let mut m = ArenaMemory::new();
        let _ = m.alloc_table().unwrap();
        let root = m.alloc_contiguous(4).unwrap();
        assert!((root.raw() - ARENA_BASE).is_multiple_of(4 * PAGE_SIZE));
        assert_eq!(m.live(), 5);
        m.free_contiguous(root, 4);
        assert_eq!(m.live(), 1);
    }
}
