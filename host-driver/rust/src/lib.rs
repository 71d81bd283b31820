//! The logic of the `s2pin` host kernel module, in Rust.
//!
//! `host-driver/kmod/s2pin_glue.c` is a thin C layer: it reads `CurrentEL`,
//! issues the HVCs (`arm_smccc_1_2_hvc`) and does the sysfs plumbing. It
//! hands the eight result registers x0..x7 of every call to the functions
//! here, which decode them with the [`hypercalls`] crate (the one source of
//! the ABI) and format what the module shows. Their C declarations are
//! `host-driver/kmod/s2pin_core.h`.
//!
//! The xtask (`qemu/src/modules.rs`) builds this crate as a `staticlib` for
//! `aarch64-unknown-none-softfloat` (no FP/SIMD, like the kernel's
//! `-mgeneral-regs-only`) with the workspace's `kmod` profile, merges it into
//! one relocatable object and links that into `s2pin.ko`. On the host it is
//! an ordinary library (with `std`, for the tests).
//!
//! Nothing here panics on any register values or buffer length: errors are
//! returned as negative Linux errno values. A panic handler still has to
//! exist; in the kernel it calls `s2pin_rust_panic()` (C), which calls
//! `panic()`.

#![no_std]

// On the host the crate links std (its panic runtime and the test harness);
// the code itself uses only `core`.
#[cfg(not(target_os = "none"))]
extern crate std;

pub mod format;
pub mod shim;

use core::ffi::c_int;

use hypercalls::Regs;

pub use format::{
    check_version, feature_line, host_call, host_call_count, supported_name, version_line,
    version_log_line, Error, VersionCheck,
};

/// Linux `EINVAL`: a null pointer or an unknown host call index.
pub const EINVAL: isize = 22;
/// Linux `ENOSPC`: the output buffer is too small.
pub const ENOSPC: isize = 28;
/// Linux `EIO`: the `HYP_FEATURES` call failed.
pub const EIO: isize = 5;

/// The negative errno for an [`Error`].
#[must_use]
pub const fn errno(e: Error) -> isize {
    match e {
        Error::NoRoom => -ENOSPC,
        Error::NoSuchCall => -EINVAL,
        Error::CallFailed => -EIO,
    }
}

/// Reads x0..x7 from `x`.
///
/// # Safety
/// `x` is null or points to eight readable `u64`s.
unsafe fn regs_at(x: *const u64) -> Option<Regs> {
    if x.is_null() {
        return None;
    }
    // SAFETY: the caller promises eight readable u64s at a non-null `x`;
    // read_unaligned asks for no alignment.
    Some(unsafe { x.cast::<Regs>().read_unaligned() })
}

/// Runs `f` on the registers at `x` and the `len` bytes at `buf`, and turns
/// its result into a byte count or a negative errno.
///
/// # Safety
/// `x` is null or points to eight readable `u64`s; `buf` is null or points
/// to `len` writable bytes that nothing else accesses during the call.
unsafe fn with_out(
    x: *const u64,
    buf: *mut u8,
    len: usize,
    f: impl FnOnce(&Regs, &mut [u8]) -> Result<usize, Error>,
) -> isize {
    // SAFETY: forwarded from the caller.
    let Some(regs) = (unsafe { regs_at(x) }) else {
        return -EINVAL;
    };
    if buf.is_null() || len > isize::MAX as usize {
        return -EINVAL;
    }
    // SAFETY: the caller promises `len` writable bytes at the non-null `buf`,
    // not aliased during the call; `len` fits an isize as a slice needs.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    match f(&regs, out) {
        // A count is at most `len`, which fits an isize.
        Ok(n) => isize::try_from(n).unwrap_or(-EINVAL),
        Err(e) => errno(e),
    }
}

/// Writes the content of `/sys/kernel/s2pin/version` for the registers
/// x0..x7 that `HYP_VERSION` returned: `"<major>.<minor>\n"`,
/// `"error <x0>\n"` or `"malformed reply (x0 <x0>)\n"` (no NUL). Returns the
/// number of bytes written, or `-ENOSPC` (buffer too small), `-EINVAL`
/// (null pointer).
///
/// # Safety
/// `x` is null or points to eight readable `u64`s; `buf` is null or points
/// to `len` writable bytes that nothing else accesses during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_version(x: *const u64, buf: *mut u8, len: usize) -> isize {
    // SAFETY: forwarded from the caller.
    unsafe { with_out(x, buf, len, version_line) }
}

/// Writes the line the module logs at load for the registers `HYP_VERSION`
/// returned (ending in `\n`, no NUL). Returns like [`s2pin_format_version`].
///
/// # Safety
/// As for [`s2pin_format_version`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_version_log(
    x: *const u64,
    buf: *mut u8,
    len: usize,
) -> isize {
    // SAFETY: forwarded from the caller.
    unsafe { with_out(x, buf, len, version_log_line) }
}

/// Judges the registers `HYP_VERSION` returned: 0 when the hypervisor's ABI
/// major is the module's, 1 when it is another (incompatible), -1 when the
/// call failed, its reply is malformed or `x` is null.
///
/// # Safety
/// `x` is null or points to eight readable `u64`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_version_check(x: *const u64) -> c_int {
    // SAFETY: forwarded from the caller.
    match unsafe { regs_at(x) }.map(|regs| check_version(&regs)) {
        Some(VersionCheck::Compatible(_)) => 0,
        Some(VersionCheck::Incompatible(_)) => 1,
        Some(VersionCheck::Failed(_)) | None => -1,
    }
}

/// The number of host calls the `features` file lists.
#[unsafe(no_mangle)]
pub extern "C" fn s2pin_host_call_count() -> usize {
    host_call_count()
}

/// The function id of host call `index` (`0 <= index <
/// s2pin_host_call_count()`), to pass to `HYP_FEATURES`; 0 for any other
/// index.
#[unsafe(no_mangle)]
pub extern "C" fn s2pin_host_call_id(index: usize) -> u64 {
    host_call(index).map_or(0, |f| u64::from(f.id()))
}

/// Writes the line of `/sys/kernel/s2pin/features` for host call `index` and
/// the registers `HYP_FEATURES(s2pin_host_call_id(index))` returned:
/// `"<NAME> 0x<id> <0|1>\n"` or `"<NAME> 0x<id> error <x0>\n"` (no NUL).
/// Returns the number of bytes written, or `-ENOSPC`, `-EINVAL` (null
/// pointer, unknown index).
///
/// # Safety
/// As for [`s2pin_format_version`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_feature(
    index: usize,
    x: *const u64,
    buf: *mut u8,
    len: usize,
) -> isize {
    // SAFETY: forwarded from the caller.
    unsafe { with_out(x, buf, len, |regs, out| feature_line(index, regs, out)) }
}

/// For the load-time list of supported calls: writes `" <NAME>"` when host
/// call `index` is supported according to the registers
/// `HYP_FEATURES(s2pin_host_call_id(index))` returned, nothing when it is
/// not. Returns the number of bytes written (0 for unsupported), `-EIO` when
/// the call failed, or `-ENOSPC`, `-EINVAL`.
///
/// # Safety
/// As for [`s2pin_format_version`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_supported_name(
    index: usize,
    x: *const u64,
    buf: *mut u8,
    len: usize,
) -> isize {
    // SAFETY: forwarded from the caller.
    unsafe { with_out(x, buf, len, |regs, out| supported_name(index, regs, out)) }
}

#[cfg(target_os = "none")]
mod kernel {
    extern "C" {
        /// `host-driver/kmod/s2pin_glue.c`: calls `panic()` with the
        /// location. Never returns.
        fn s2pin_rust_panic(file: *const u8, file_len: usize, line: u32) -> !;
    }

    /// Unreachable by design (nothing here panics); if it ever runs, the
    /// kernel panics with the location rather than continuing in an
    /// unknown state.
    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
        // SAFETY: `file` is a valid &str for the call; the C function reads
        // `file_len` bytes of it and does not keep the pointer.
        unsafe { s2pin_rust_panic(file.as_ptr(), file.len(), line) }
    }
}

// ---------------------------------------------------------------------------
// The shim (/dev/s2pin): decisions the C glue asks for. See `shim`.

use s2pin_uapi::{Policy, S2pinCreateVm, S2pinRun, S2pinUserspaceMemoryRegion, STATS_COUNT};
use shim::{ExitInfo, InvState, Memslot, PteState, RegionOp, UnshareRun, Window};

/// Validates `S2PIN_CREATE_VM`'s argument at `arg`; on success stores the
/// IPA size (the default for 0) at `ipa_bits` and returns 0, else `-EINVAL`.
///
/// # Safety
/// `arg` is null or points to a readable `struct s2pin_create_vm`;
/// `ipa_bits` is null or points to a writable `u32`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_create_vm_check(
    arg: *const S2pinCreateVm,
    ipa_bits: *mut u32,
) -> c_int {
    if arg.is_null() || ipa_bits.is_null() {
        return -22;
    }
    // SAFETY: non-null and readable, as the caller promises; read_unaligned
    // asks for no alignment.
    let a = unsafe { arg.read_unaligned() };
    match shim::check_create_vm(&a) {
        Ok((bits, _)) => {
            // SAFETY: non-null and writable, as the caller promises.
            unsafe { ipa_bits.write_unaligned(bits) };
            0
        }
        Err(e) => -e,
    }
}

/// Validates a `SET_USER_MEMORY_REGION` request `region` against the `n`
/// slots at `slots` (indexed by slot id) and the RAM window. Returns 0 with
/// the new slot stored at `out` (create), 1 (delete slot `region->slot`), or
/// a negative errno (`-EINVAL`, `-EEXIST`).
///
/// # Safety
/// `slots` points to `n` readable slots (or is null with `n` 0); `region`
/// is null or readable; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_memslot_check(
    slots: *const Memslot,
    n: usize,
    region: *const S2pinUserspaceMemoryRegion,
    win_base_gfn: u64,
    win_pages: u64,
    out: *mut Memslot,
) -> c_int {
    if region.is_null() || out.is_null() || (slots.is_null() && n != 0) {
        return -22;
    }
    // SAFETY: as the caller promises.
    let slots = unsafe { slice_or_empty(slots, n) };
    // SAFETY: non-null and readable, as the caller promises.
    let r = unsafe { region.read_unaligned() };
    let window = Window {
        base_gfn: win_base_gfn,
        pages: win_pages,
    };
    match shim::check_region(slots, &r, window) {
        Ok(RegionOp::Create(s)) => {
            // SAFETY: non-null and writable, as the caller promises.
            unsafe { out.write_unaligned(s) };
            0
        }
        Ok(RegionOp::Delete) => 1,
        Err(e) => -e,
    }
}

/// The index of the slot (among the `n` at `slots`) holding `gfn`, or -1.
///
/// # Safety
/// `slots` points to `n` readable slots (or is null with `n` 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_memslot_find(slots: *const Memslot, n: usize, gfn: u64) -> c_int {
    if slots.is_null() {
        return -1;
    }
    // SAFETY: as the caller promises.
    let slots = unsafe { slice_or_empty(slots, n) };
    shim::find_slot(slots, gfn)
        .and_then(|i| c_int::try_from(i).ok())
        .unwrap_or(-1)
}

/// A slice of `n` items at `p`, empty for a null `p`.
///
/// # Safety
/// `p` is null or points to `n` readable, initialised items not written
/// during the returned borrow.
unsafe fn slice_or_empty<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if p.is_null() {
        &[]
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { core::slice::from_raw_parts(p, n) }
    }
}

/// The page indices of `slot` whose host pages intersect `[start, end)`:
/// returns 1 and stores them in `*first`..`*last` (exclusive), or 0 when
/// none does.
///
/// # Safety
/// `slot` is null or readable; `first` and `last` are null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_slot_page_range(
    slot: *const Memslot,
    start: u64,
    end: u64,
    first: *mut u64,
    last: *mut u64,
) -> c_int {
    if first.is_null() || last.is_null() {
        return 0;
    }
    // SAFETY: as the caller promises.
    let Some(slot) = (unsafe { slot.as_ref() }) else {
        return 0;
    };
    match shim::slot_page_range(slot, start, end) {
        Some((f, l)) => {
            // SAFETY: non-null and writable, as the caller promises.
            unsafe {
                first.write_unaligned(f);
                last.write_unaligned(l);
            }
            1
        }
        None => 0,
    }
}

/// Appends page `gfn -> pfn` to the unshare run at `run` if it continues
/// it (1), else returns 0: flush the run, then [`s2pin_run_start`].
///
/// # Safety
/// `run` is null or points to a writable `struct s2pin_unshare_run`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_run_extend(run: *mut UnshareRun, gfn: u64, pfn: u64) -> c_int {
    // SAFETY: as the caller promises.
    match unsafe { run.as_mut() } {
        Some(r) => c_int::from(r.extend(gfn, pfn)),
        None => 0,
    }
}

/// Makes the run at `run` the single page `gfn -> pfn`.
///
/// # Safety
/// As [`s2pin_run_extend`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_run_start(run: *mut UnshareRun, gfn: u64, pfn: u64) {
    // SAFETY: as the caller promises.
    if let Some(r) = unsafe { run.as_mut() } {
        r.start(gfn, pfn);
    }
}

/// `invalidate_range_start` of host range `[start, end)` on `st`.
///
/// # Safety
/// `st` is null or points to a writable `struct s2pin_inv` (VM lock held).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_inv_begin(st: *mut InvState, start: u64, end: u64) {
    // SAFETY: as the caller promises.
    if let Some(st) = unsafe { st.as_mut() } {
        st.begin(start, end);
    }
}

/// `invalidate_range_end` on `st`.
///
/// # Safety
/// As [`s2pin_inv_begin`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_inv_finish(st: *mut InvState) {
    // SAFETY: as the caller promises.
    if let Some(st) = unsafe { st.as_mut() } {
        st.finish();
    }
}

/// Makes faults that started before now retry (a slot was deleted).
///
/// # Safety
/// As [`s2pin_inv_begin`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_inv_bump(st: *mut InvState) {
    // SAFETY: as the caller promises.
    if let Some(st) = unsafe { st.as_mut() } {
        st.bump();
    }
}

/// 1 if a fault that read `snapshot` (of `st->seq`) before pinning the page
/// at `hva` may map it now, else 0 (retry).
///
/// # Safety
/// `st` is null or points to a readable `struct s2pin_inv` (VM lock held).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_inv_may_map(st: *const InvState, snapshot: u64, hva: u64) -> c_int {
    // SAFETY: as the caller promises.
    match unsafe { st.as_ref() } {
        Some(st) => c_int::from(st.may_map(snapshot, hva)),
        None => 0,
    }
}

/// The policy with code `p`; an unknown code (never stored) acts as eager,
/// which unmaps the most.
fn policy(p: u32) -> Policy {
    Policy::from_u32(p).unwrap_or(Policy::Eager)
}

/// What `invalidate_range_start` of event `ev` does under policy `p`:
/// 0 nothing, 1 unmap (the event can change the frame), 2 unmap (eager).
#[unsafe(no_mangle)]
pub extern "C" fn s2pin_policy_at_start(p: u32, ev: u32) -> u32 {
    shim::at_start(policy(p), ev) as u32
}

/// 1 if `invalidate_range_end` of event `ev` walks the host page tables
/// under policy `p`.
#[unsafe(no_mangle)]
pub extern "C" fn s2pin_policy_walk_at_end(p: u32, ev: u32) -> c_int {
    c_int::from(shim::walk_at_end(policy(p), ev))
}

/// What `invalidate_range_end` does with one pinned page in state `s` under
/// policy `p`: 0 keep, 1 unmap (protnone), 2 unmap (frame changed),
/// 3 write-protect. A null `s` gives 2.
///
/// # Safety
/// `s` is null or points to a readable `struct s2pin_pte_state`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_policy_at_end(p: u32, s: *const PteState) -> u32 {
    // SAFETY: as the caller promises.
    match unsafe { s.as_ref() } {
        Some(s) => shim::at_end(policy(p), s) as u32,
        None => shim::PageAction::UnmapChanged as u32,
    }
}

/// Decodes the registers `x` that `HYP_VCPU_RUN` returned; for exits user
/// space handles, writes the whole `struct s2pin_run` at `run` (one volatile
/// store of a kernel copy, user space may write the page meanwhile) except
/// `immediate_exit`; fills `info`. Returns the next step (`S2PIN_ACT_*`).
///
/// # Safety
/// `x` is null or points to eight readable `u64`s; `run` is null or points
/// to a writable, 8-byte aligned `struct s2pin_run`; `info` is null or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_handle_exit(
    x: *const u64,
    run: *mut S2pinRun,
    info: *mut ExitInfo,
) -> c_int {
    // SAFETY: forwarded from the caller.
    let Some(regs) = (unsafe { regs_at(x) }) else {
        return shim::ExitAction::Malformed as c_int;
    };
    if run.is_null() || info.is_null() || !run.is_aligned() {
        return shim::ExitAction::Malformed as c_int;
    }
    // SAFETY: non-null, aligned and readable (the caller promises); a
    // volatile read of plain integers user space may be writing.
    let mut local = unsafe { run.read_volatile() };
    let mut inf = ExitInfo::default();
    let action = shim::handle_exit(&regs, &mut local, &mut inf);
    if action == shim::ExitAction::User {
        // SAFETY: as above, writable.
        unsafe { run.write_volatile(local) };
    }
    // SAFETY: non-null and writable, as the caller promises.
    unsafe { info.write_unaligned(inf) };
    action as c_int
}

/// Writes `"<name> <value>\n"` for each of the `S2PIN_STATS_COUNT` counters
/// at `vals`. Returns the byte count or `-ENOSPC`/`-EINVAL`.
///
/// # Safety
/// `vals` is null or points to `S2PIN_STATS_COUNT` readable `u64`s; `buf`
/// is null or points to `len` writable bytes nothing else accesses.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_stats(vals: *const u64, buf: *mut u8, len: usize) -> isize {
    if vals.is_null() || buf.is_null() || len > isize::MAX as usize {
        return -EINVAL;
    }
    // SAFETY: as the caller promises.
    let v = unsafe { vals.cast::<[u64; STATS_COUNT]>().read_unaligned() };
    // SAFETY: as the caller promises.
    let out = unsafe { core::slice::from_raw_parts_mut(buf, len) };
    match shim::stats_text(&v, out) {
        Ok(n) => isize::try_from(n).unwrap_or(-EINVAL),
        Err(e) => errno(e),
    }
}

/// The `host_page_state` line for `pfn` from the registers `x` that
/// `HYP_HOST_PAGE_STATE(pfn)` returned. Returns like [`s2pin_format_version`].
///
/// # Safety
/// As [`s2pin_format_version`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn s2pin_format_host_page_state(
    pfn: u64,
    x: *const u64,
    buf: *mut u8,
    len: usize,
) -> isize {
    // SAFETY: forwarded from the caller.
    unsafe {
        with_out(x, buf, len, |regs, out| {
            shim::host_page_state_line(pfn, regs, out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::ptr;
    use hypercalls::{encode_result, AbiVersion, HypError, Reply};

    #[test]
    fn the_c_entry_points_write_and_count() {
        let cur = AbiVersion::CURRENT;
        let regs = encode_result(&Ok(Reply::Version(cur)));
        let mut buf = [0u8; 32];
        // SAFETY: regs is eight u64s, buf is 32 writable bytes.
        let n = unsafe { s2pin_format_version(regs.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        let want = std::format!("{}.{}\n", cur.major, cur.minor);
        assert_eq!(n, want.len() as isize);
        assert_eq!(&buf[..want.len()], want.as_bytes());
        // SAFETY: as above.
        assert_eq!(unsafe { s2pin_version_check(regs.as_ptr()) }, 0);
        let failed = HypError::NotSupported.encode();
        // SAFETY: as above.
        assert_eq!(unsafe { s2pin_version_check(failed.as_ptr()) }, -1);
        // SAFETY: a null `x` is allowed.
        assert_eq!(unsafe { s2pin_version_check(ptr::null()) }, -1);
        // SAFETY: buf is 32 writable bytes; only 2 are offered.
        let short = unsafe { s2pin_format_version(regs.as_ptr(), buf.as_mut_ptr(), 2) };
        assert_eq!(short, -ENOSPC);
        // SAFETY: a null `buf` is allowed.
        let null = unsafe { s2pin_format_version(regs.as_ptr(), ptr::null_mut(), 8) };
        assert_eq!(null, -EINVAL);
    }

    #[test]
    fn the_c_feature_entry_points() {
        assert_eq!(s2pin_host_call_count(), hypercalls::HostFunction::ALL.len());
        assert_eq!(s2pin_host_call_id(0), 0xc600_0000);
        assert_eq!(s2pin_host_call_id(s2pin_host_call_count()), 0);
        let yes = encode_result(&Ok(Reply::Features { supported: true }));
        let mut buf = [0u8; 64];
        // SAFETY: yes is eight u64s, buf is 64 writable bytes.
        let n = unsafe { s2pin_format_feature(1, yes.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        assert_eq!(&buf[..n as usize], b"HYP_FEATURES 0xc6000001 1\n");
        let failed = HypError::NotSupported.encode();
        // SAFETY: as above.
        let e = unsafe { s2pin_format_supported_name(1, failed.as_ptr(), buf.as_mut_ptr(), 64) };
        assert_eq!(e, -EIO);
        // SAFETY: as above.
        let e = unsafe { s2pin_format_feature(999, yes.as_ptr(), buf.as_mut_ptr(), 64) };
        assert_eq!(e, -EINVAL);
    }
}
