/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The Rust part of s2pin.ko (host-driver/rust, crate s2pin-core), linked in
 * as s2pin_rust.o. Every function takes the eight result registers x0..x7
 * of one hypercall as `const u64 x[8]` and decodes them with the hypercalls
 * crate; the formatting ones write text (no NUL) into @buf and return the
 * number of bytes written, or a negative errno: -ENOSPC (buffer too small),
 * -EINVAL (null pointer, unknown host call index), -EIO (call failed, only
 * s2pin_format_supported_name). None of them issues an HVC or sleeps.
 * The authoritative documentation is host-driver/rust/src/lib.rs.
 */
#ifndef S2PIN_CORE_H
#define S2PIN_CORE_H

#include <linux/compiler.h>
#include <linux/types.h>

/* "<major>.<minor>\n", "error <x0>\n" or "malformed reply (x0 <x0>)\n" from HYP_VERSION's registers. */
ssize_t s2pin_format_version(const u64 *x, char *buf, size_t len);
/* The load-time log line for HYP_VERSION's registers, ending in "\n". */
ssize_t s2pin_format_version_log(const u64 *x, char *buf, size_t len);
/* 0: compatible ABI major; 1: another major; -1: the call failed or its reply is malformed. */
int s2pin_version_check(const u64 *x);

/* The host calls the features file lists, and their function ids (0 past the end). */
size_t s2pin_host_call_count(void);
u64 s2pin_host_call_id(size_t index);
/* "<NAME> 0x<id> <0|1>\n" (or "... error <x0>\n") from HYP_FEATURES(id of @index)'s registers. */
ssize_t s2pin_format_feature(size_t index, const u64 *x, char *buf, size_t len);
/* " <NAME>" if supported, nothing (0) if not, -EIO if HYP_FEATURES failed. */
ssize_t s2pin_format_supported_name(size_t index, const u64 *x, char *buf, size_t len);

/*
 * The shim (/dev/s2pin). Layouts shared with Rust (host-driver/rust/src/shim.rs,
 * which asserts the sizes too).
 */
struct s2pin_userspace_memory_region;
struct s2pin_create_vm;
struct s2pin_run;

struct s2pin_memslot {
	u64 base_gfn;
	u64 npages;
	u64 uaddr;
	u32 flags;	/* S2PIN_MEM_READONLY */
	u32 used;	/* 0: free */
};

/* The fault/invalidate sequence count (KVM's mmu_invalidate_seq/_in_progress). */
struct s2pin_inv {
	u64 seq;
	u64 in_progress;
	u64 start;
	u64 end;
};

/* The host page-table state of one pinned page at invalidate_range_end (0/1 each). */
struct s2pin_pte_state {
	u8 present;
	u8 same_frame;
	u8 protnone;
	u8 writable;
	u8 vma_accessible;
	u8 mapped_writable;
	u8 pad[2];
};

/* Details of a HYP_VCPU_RUN exit. */
struct s2pin_exit_info {
	u64 gfn;
	u32 access;	/* S2PIN_ACCESS_* */
	u32 permission;	/* 1: permission fault, 0: unmapped */
	s64 hyp_error;	/* S2PIN_ACT_FAILED: the hypervisor's error code */
	u32 mmio_read;	/* 1: the next run passes run->mmio.data */
	u32 pad;
};

/* A run of pages contiguous in gfn and pfn, for one HYP_UNSHARE (len 0: empty). */
struct s2pin_unshare_run {
	u64 gfn;
	u64 pfn;
	u64 len;
};

/* s2pin_handle_exit() results. */
#define S2PIN_ACT_REENTER	0
#define S2PIN_ACT_MEM_FAULT	1
#define S2PIN_ACT_USER		2
#define S2PIN_ACT_POWERED_OFF	3
#define S2PIN_ACT_WFX		4
#define S2PIN_ACT_FAILED	(-1)
#define S2PIN_ACT_MALFORMED	(-2)

/* s2pin_policy_at_start() results. */
#define S2PIN_START_NOTHING		0
#define S2PIN_START_UNMAP_INVALIDATE	1
#define S2PIN_START_UNMAP_EAGER		2

/* s2pin_policy_at_end() results. */
#define S2PIN_END_KEEP			0
#define S2PIN_END_UNMAP_PROTNONE	1
#define S2PIN_END_UNMAP_CHANGED		2
#define S2PIN_END_WRPROTECT		3

/* 0 and the IPA size in *ipa_bits, or -EINVAL. */
int s2pin_create_vm_check(const struct s2pin_create_vm *arg, u32 *ipa_bits);
/* 0: create (*out filled), 1: delete, or -EINVAL / -EEXIST (KVM's rules). */
int s2pin_memslot_check(const struct s2pin_memslot *slots, size_t n,
			const struct s2pin_userspace_memory_region *region,
			u64 win_base_gfn, u64 win_pages, struct s2pin_memslot *out);
/* The slot index holding @gfn, or -1. */
int s2pin_memslot_find(const struct s2pin_memslot *slots, size_t n, u64 gfn);
/* 1 and the slot's page indices [*first, *last) whose host pages meet [start, end); else 0. */
int s2pin_slot_page_range(const struct s2pin_memslot *slot, u64 start, u64 end,
			  u64 *first, u64 *last);
/* 1 if gfn -> pfn continues @run (appended), else 0: flush it, then s2pin_run_start(). */
int s2pin_run_extend(struct s2pin_unshare_run *run, u64 gfn, u64 pfn);
void s2pin_run_start(struct s2pin_unshare_run *run, u64 gfn, u64 pfn);
void s2pin_inv_begin(struct s2pin_inv *st, u64 start, u64 end);
void s2pin_inv_finish(struct s2pin_inv *st);
void s2pin_inv_bump(struct s2pin_inv *st);
/* 1 if a fault that read @snapshot before pinning @hva may map it now. */
int s2pin_inv_may_map(const struct s2pin_inv *st, u64 snapshot, u64 hva);
u32 s2pin_policy_at_start(u32 policy, u32 event);
int s2pin_policy_walk_at_end(u32 policy, u32 event);
u32 s2pin_policy_at_end(u32 policy, const struct s2pin_pte_state *s);
/* S2PIN_ACT_*; fills *run for S2PIN_ACT_USER and *info always. */
int s2pin_handle_exit(const u64 *x, struct s2pin_run *run, struct s2pin_exit_info *info);
/* "<name> <value>\n" per counter of S2PIN_STATS_COUNT values. */
ssize_t s2pin_format_stats(const u64 *vals, char *buf, size_t len);
/* "<pfn> owner=... state=... count=<n>\n" from HYP_HOST_PAGE_STATE's registers. */
ssize_t s2pin_format_host_page_state(u64 pfn, const u64 *x, char *buf, size_t len);

/* Called by the Rust panic handler (never in practice): panics the kernel. */
void __noreturn s2pin_rust_panic(const char *file, size_t file_len, u32 line);

#endif /* S2PIN_CORE_H */
