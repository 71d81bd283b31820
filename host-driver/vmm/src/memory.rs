//! Guest memory in the VMM: one mapping, 2 MiB aligned (so that guest 2 MiB
//! ranges can be host huge pages), backed as `--backing` says, optionally
//! bound to a NUMA node, and the changes the test hooks make to it.
//!
//! | backing | mapping |
//! |---|---|
//! | `anon` | `MAP_PRIVATE | MAP_ANONYMOUS`, `MADV_NOHUGEPAGE` (4 KiB pages) |
//! | `thp` | `MAP_PRIVATE | MAP_ANONYMOUS`, `MADV_HUGEPAGE` |
//! | `memfd` | `memfd_create` + `MAP_SHARED` (shmem) |
//!
//! `--node N` applies `mbind(MPOL_BIND, {N})`; for `memfd` with
//! `MPOL_F_NUMA_BALANCING`, without which Linux 6.1's NUMA scanner skips
//! shmem mappings (their policy is not "migrate on fault").

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::args::{Backing, Prot};
use crate::backend::Region;
use crate::layout::{Range, PAGE, RAM_BASE};

/// Host huge page size (the mapping's alignment).
pub const HUGE: usize = 2 << 20;

const MPOL_BIND: libc::c_long = 2;
const MPOL_F_NUMA_BALANCING: libc::c_long = 1 << 13;

/// The guest's memory.
#[derive(Debug)]
pub struct GuestMemory {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
    node: Option<u32>,
    memfd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory owned by this value until
// drop; concurrent access goes through raw volatile reads and writes, and
// the guest writes it too, which no Rust reference ever covers.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; every method takes `&self` and uses system calls or
// volatile accesses on the mapping, never Rust references into it.
unsafe impl Sync for GuestMemory {}

fn os(call: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{call}: {e}"))
}

impl GuestMemory {
    /// Maps `len` bytes (a multiple of the page size).
    pub fn new(len: usize, backing: Backing, node: Option<u32>) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE as usize) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory size {len:#x} is not a positive multiple of the page size"),
            ));
        }
        let memfd = match backing {
            Backing::Memfd => {
                let name = CString::new("s2vmm-guest").map_err(io::Error::other)?;
                // SAFETY: a valid C string; the result is checked.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(os("memfd_create"));
                }
                // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let size = libc::off_t::try_from(len).map_err(io::Error::other)?;
                // SAFETY: plain system call on our fd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
                    return Err(os("ftruncate"));
                }
                Some(fd)
            }
            Backing::Anon | Backing::Thp => None,
        };
        // Reserve len + 2 MiB, then put the real mapping at the first 2 MiB
        // boundary inside and give back the rest.
        let reserve = len + HUGE;
        // SAFETY: a fresh PROT_NONE reservation the kernel places; checked.
        let r = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(os("mmap (reservation)"));
        }
        let start = (r as usize).next_multiple_of(HUGE);
        let head = start - r as usize;
        let tail = reserve - head - len;
        // SAFETY: both pieces lie inside the reservation just made, which
        // nothing else uses.
        unsafe {
            if head > 0 {
                libc::munmap(r, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        let mem = Self {
            base: NonNull::new(start as *mut u8).ok_or_else(|| os("mmap"))?,
            len,
            backing,
            node,
            memfd,
        };
        mem.map_fresh(0, len)?;
        Ok(mem)
    }

    /// Maps `[off, off + len)` anew (MAP_FIXED over what is there) with
    /// the backing's flags, advice and NUMA binding.
    fn map_fresh(&self, off: usize, len: usize) -> io::Result<()> {
        let addr = self.base.as_ptr().wrapping_add(off).cast::<libc::c_void>();
        let (flags, fd, prot) = match &self.memfd {
            Some(fd) => (
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                libc::PROT_READ | libc::PROT_WRITE,
            ),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                libc::PROT_READ | libc::PROT_WRITE,
            ),
        };
        let file_off = libc::off_t::try_from(off).map_err(io::Error::other)?;
        // SAFETY: [addr, addr + len) lies inside our own 2 MiB-aligned
        // mapping (callers check the range), which MAP_FIXED replaces.
        let m = unsafe {
            libc::mmap(
                addr,
                len,
                prot,
                flags,
                fd,
                if fd < 0 { 0 } else { file_off },
            )
        };
        if m == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let advice = match self.backing {
            Backing::Anon => Some(libc::MADV_NOHUGEPAGE),
            Backing::Thp => Some(libc::MADV_HUGEPAGE),
            Backing::Memfd => None,
        };
        if let Some(a) = advice {
            // SAFETY: advice on our own mapping.
            if unsafe { libc::madvise(addr, len, a) } != 0 {
                let e = io::Error::last_os_error();
                // A kernel without THP refuses both advices; without THP
                // there is nothing NOHUGEPAGE would prevent.
                if !(a == libc::MADV_NOHUGEPAGE && e.raw_os_error() == Some(libc::EINVAL)) {
                    return Err(os("madvise"));
                }
            }
        }
        if let Some(node) = self.node {
            self.bind(addr, len, node)?;
        }
        Ok(())
    }

    fn bind(&self, addr: *mut libc::c_void, len: usize, node: u32) -> io::Result<()> {
        if node >= 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--node {node}: at most node 63"),
            ));
        }
        let mask: libc::c_ulong = 1 << node;
        let mode = match self.backing {
            Backing::Memfd => MPOL_BIND | MPOL_F_NUMA_BALANCING,
            Backing::Anon | Backing::Thp => MPOL_BIND,
        };
        // SAFETY: mbind(addr, len, mode, &mask, maxnode, flags) on our own
        // mapping; the mask outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr,
                len,
                mode,
                &raw const mask,
                64 as libc::c_ulong,
                0 as libc::c_uint,
            )
        };
        if r != 0 {
            return Err(os(&format!("mbind(MPOL_BIND, node {node})")));
        }
        Ok(())
    }

    /// Allocates every page now (`MADV_POPULATE_WRITE`), where the memory
    /// policy says; then, for private memory, drops the policy
    /// (`MPOL_DEFAULT`) so that NUMA balancing may move the pages later. A
    /// memfd keeps its `MPOL_BIND | MPOL_F_NUMA_BALANCING` (Linux 6.1 scans
    /// shared memory only under such a policy).
    pub fn place(&self) -> io::Result<()> {
        /// `MADV_POPULATE_WRITE` (Linux 5.14).
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let (addr, len) = (self.addr() as *mut libc::c_void, self.len());
        // SAFETY: advice on our own mapping (read-write, nothing else uses it yet).
        if unsafe { libc::madvise(addr, len, MADV_POPULATE_WRITE) } != 0 {
            return Err(os("madvise(MADV_POPULATE_WRITE)"));
        }
        if self.backing == Backing::Memfd {
            return Ok(());
        }
        // SAFETY: mbind(addr, len, MPOL_DEFAULT, NULL, 0, 0) on our own mapping.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr,
                len,
                0 as libc::c_long,
                core::ptr::null::<libc::c_ulong>(),
                0 as libc::c_ulong,
                0 as libc::c_uint,
            )
        };
        if r != 0 {
            return Err(os("mbind(MPOL_DEFAULT)"));
        }
        Ok(())
    }

    /// Host virtual address of the first byte.
    #[must_use]
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slot 0 over all of this memory at guest RAM's base: the one memory
    /// slot of every guest s2vmm sets up.
    #[must_use]
    pub fn ram_slot(&self) -> Region {
        Region {
            slot: 0,
            guest_phys_addr: RAM_BASE,
            memory_size: self.len as u64,
            userspace_addr: self.addr(),
            readonly: false,
        }
    }

    /// Whether it is empty (never).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, len: u64) -> io::Result<(usize, usize)> {
        let end = off.checked_add(len);
        match (usize::try_from(off), usize::try_from(len), end) {
            (Ok(o), Ok(l), Some(e))
                if e <= self.len as u64 && o % PAGE as usize == 0 && l % PAGE as usize == 0 =>
            {
                Ok((o, l))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {off:#x}+{len:#x} is not page aligned inside guest memory"),
            )),
        }
    }

    /// Copies `data` to offset `off` (before the guest runs).
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let end = off.checked_add(data.len() as u64);
        match (usize::try_from(off), end) {
            (Ok(o), Some(e)) if e <= self.len as u64 => {
                // SAFETY: [o, o + len) is inside the mapping (checked); the
                // guest does not run yet, so nothing else writes it.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        self.base.as_ptr().add(o),
                        data.len(),
                    );
                }
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write beyond guest memory",
            )),
        }
    }

    /// Reads the 8-byte word at `off` (8-aligned, inside).
    #[must_use]
    pub fn read_u64(&self, off: u64) -> Option<u64> {
        let o = usize::try_from(off).ok()?;
        if o % 8 != 0 || o.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: an aligned word inside the mapping; volatile because the
        // guest writes it behind the compiler's back.
        Some(unsafe { self.base.as_ptr().add(o).cast::<u64>().read_volatile() })
    }

    /// `MADV_DONTNEED` (`MADV_REMOVE` for memfd, whose pages would stay in
    /// the file): the pages are dropped and read back as zeros.
    pub fn dontneed(&self, r: Range) -> io::Result<()> {
        let (o, l) = self.check(r.offset, r.len)?;
        let advice = match self.backing {
            Backing::Memfd => libc::MADV_REMOVE,
            Backing::Anon | Backing::Thp => libc::MADV_DONTNEED,
        };
        // SAFETY: advice on a range of our own mapping.
        if unsafe { libc::madvise(self.base.as_ptr().add(o).cast(), l, advice) } != 0 {
            return Err(os("madvise(MADV_DONTNEED)"));
        }
        Ok(())
    }

    /// `munmap` then a fresh mapping at the same place (zeros; for memfd
    /// the file range is punched out first).
    pub fn munmap_remap(&self, r: Range) -> io::Result<()> {
        let (o, l) = self.check(r.offset, r.len)?;
        // SAFETY: a range of our own mapping; it is mapped again at once
        // below (nothing but the guest, through its pins, uses it meanwhile).
        let addr = unsafe { self.base.as_ptr().add(o) };
        // SAFETY: as above.
        if unsafe { libc::munmap(addr.cast(), l) } != 0 {
            return Err(os("munmap"));
        }
        if let Some(fd) = &self.memfd {
            let (fo, fl) = (
                libc::off_t::try_from(o).map_err(io::Error::other)?,
                libc::off_t::try_from(l).map_err(io::Error::other)?,
            );
            // SAFETY: plain system call on our memfd.
            let rc = unsafe {
                libc::fallocate(
                    fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    fo,
                    fl,
                )
            };
            if rc != 0 {
                return Err(os("fallocate(PUNCH_HOLE)"));
            }
        }
        self.map_fresh(o, l)
    }

    /// `mprotect` to `prot`, or back to read-write with `None`.
    pub fn protect(&self, r: Range, prot: Option<Prot>) -> io::Result<()> {
        let (o, l) = self.check(r.offset, r.len)?;
        let p = match prot {
            Some(Prot::ReadOnly) => libc::PROT_READ,
            Some(Prot::None) => libc::PROT_NONE,
            None => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a range of our own mapping.
        if unsafe { libc::mprotect(self.base.as_ptr().add(o).cast(), l, p) } != 0 {
            return Err(os("mprotect"));
        }
        Ok(())
    }

    /// The NUMA node of each page of `[off, off + len)` (`move_pages` with
    /// no target nodes only reports); a negative value is the errno for a
    /// page not present (`-ENOENT`).
    pub fn nodes(&self, off: u64, len: u64) -> io::Result<Vec<i32>> {
        let (o, l) = self.check(off, len)?;
        let pages: Vec<*mut libc::c_void> = (0..l / PAGE as usize)
            .map(|i| {
                self.base
                    .as_ptr()
                    .wrapping_add(o + i * PAGE as usize)
                    .cast()
            })
            .collect();
        let mut status = vec![0i32; pages.len()];
        // SAFETY: move_pages(0, n, pages, NULL, status, 0) only queries: it
        // reads `n` pointers (addresses of our own mapping) and writes `n`
        // ints into `status`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                pages.len() as libc::c_ulong,
                pages.as_ptr(),
                core::ptr::null::<i32>(),
                status.as_mut_ptr(),
                0,
            )
        };
        if rc < 0 {
            return Err(os("move_pages"));
        }
        Ok(status)
    }

    /// Host frame numbers of `[off, off + len)` from /proc/self/pagemap
    /// (needs CAP_SYS_ADMIN; 0 for a page not present).
    pub fn pfns(&self, off: u64, len: u64) -> io::Result<Vec<u64>> {
        use std::io::{Read, Seek, SeekFrom};
        let (o, l) = self.check(off, len)?;
        let mut f = std::fs::File::open("/proc/self/pagemap")?;
        let first = (self.addr() + o as u64) / PAGE;
        f.seek(SeekFrom::Start(first * 8))?;
        let mut buf = vec![0u8; l / PAGE as usize * 8];
        f.read_exact(&mut buf)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                let e = u64::from_le_bytes(w);
                if e >> 63 == 1 {
                    e & ((1 << 55) - 1)
                } else {
                    0
                }
            })
            .collect())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the VM that pinned it is
        // gone or keeps its own pins.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> Range {
        Range { offset, len }
    }

    /// The backings this machine supports (THP advice needs a kernel with THP).
    fn backings() -> Vec<Backing> {
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        [Backing::Anon, Backing::Thp, Backing::Memfd]
            .into_iter()
            .filter(|b| thp || *b != Backing::Thp)
            .collect()
    }

    #[test]
    fn every_backing_maps_aligned_zeroed_memory() {
        for b in backings() {
            let m = GuestMemory::new(4 << 20, b, None).unwrap();
            assert_eq!(m.addr() % HUGE as u64, 0, "{b:?}");
            assert_eq!(m.read_u64(0), Some(0));
            m.write(8, &7u64.to_le_bytes()).unwrap();
            assert_eq!(m.read_u64(8), Some(7));
            assert_eq!(m.read_u64(4 << 20), None);
            assert_eq!(m.read_u64(3), None);
            assert!(m.write((4 << 20) - 4, &[0; 8]).is_err());
            // Every page written is on some node (0 on a one-node machine);
            // a kernel without NUMA (ENOSYS) or a sandbox (EPERM) cannot say.
            match m.nodes(0, PAGE) {
                Ok(nodes) => {
                    assert_eq!(nodes.len(), 1);
                    assert!(nodes[0] >= 0, "{b:?}: {nodes:?}");
                }
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
                    ),
                    "{e}"
                ),
            }
        }
        assert!(GuestMemory::new(0, Backing::Anon, None).is_err());
        assert!(GuestMemory::new(100, Backing::Anon, None).is_err());
    }

    #[test]
    fn hooks_zero_or_protect_exactly_their_range() {
        for b in backings() {
            let m = GuestMemory::new(1 << 20, b, None).unwrap();
            for p in 0..256u64 {
                m.write(p * PAGE, &(p + 1).to_le_bytes()).unwrap();
            }
            m.dontneed(r(PAGE, 2 * PAGE)).unwrap();
            assert_eq!(m.read_u64(0), Some(1));
            assert_eq!(m.read_u64(PAGE), Some(0), "{b:?}");
            assert_eq!(m.read_u64(2 * PAGE), Some(0));
            assert_eq!(m.read_u64(3 * PAGE), Some(4));
            m.munmap_remap(r(8 * PAGE, PAGE)).unwrap();
            assert_eq!(m.read_u64(8 * PAGE), Some(0), "{b:?}");
            assert_eq!(m.read_u64(9 * PAGE), Some(10));
            m.protect(r(16 * PAGE, PAGE), Some(Prot::ReadOnly)).unwrap();
            assert_eq!(m.read_u64(16 * PAGE), Some(17));
            m.protect(r(16 * PAGE, PAGE), None).unwrap();
            m.write(16 * PAGE, &[1]).unwrap();
            assert!(m.dontneed(r(1, PAGE)).is_err());
            assert!(m.dontneed(r(0, 2 << 20)).is_err());
            assert!(m.protect(r(u64::MAX - 4095, PAGE), None).is_err());
        }
    }
}
