// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * s2pin: /dev/s2pin, a KVM-shaped device over the hypervisor's VM calls.
 *
 * The ioctl ABI is s2pin_uapi.h (generated from host-driver/uapi). The
 * decisions (slot validation and lookup, the fault/invalidate sequence
 * count, the notifier policies, decoding HYP_VCPU_RUN) are Rust
 * (s2pin_core.h); this file does the kernel calls: pinning and locked_vm
 * accounting, the MMU notifier, the host page-table walk, the HVCs, file
 * descriptors and debugfs. docs/DESIGN.md ("The host shim") explains the
 * rules and the lock order:
 *
 *   mmap_lock (held by the kernel around notifier callbacks, or taken by
 *   the fault path for pin_user_pages only)
 *     -> vm->slots_mutex (ioctls, never from a notifier)
 *       -> vm->lock (spinlock: slots, pin table, sequence count, stats;
 *          EL2 share/unshare/wrprotect are issued under it)
 *         -> page-table locks (the range_end walk)
 *
 * account_locked_vm() takes mmap_lock itself: it is called only from the
 * ioctl paths and teardown with no lock held, never from a notifier.
 * Pages are never unpinned while EL2 maps them: every unpin follows a
 * successful HYP_UNSHARE of the page (or teardown's reclaim of everything).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/anon_inodes.h>
#include <linux/debugfs.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mmzone.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/nodemask.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <asm/neon.h>
#include <asm/pgtable.h>

#include "s2pin_core.h"
#include "s2pin_hvc.h"
#include "s2pin_uapi.h"
#include "s2pin_shim.h"

static_assert(sizeof(struct s2pin_memslot) == 32);
static_assert(sizeof(struct s2pin_inv) == 32);
static_assert(sizeof(struct s2pin_pte_state) == 8);
static_assert(sizeof(struct s2pin_exit_info) == 32);
static_assert(sizeof(struct s2pin_unshare_run) == 24);
static_assert(sizeof(struct s2pin_vm_stats) == S2PIN_STATS_COUNT * 8);
static_assert(sizeof(struct s2pin_run) <= PAGE_SIZE);
static_assert(offsetof(struct s2pin_vm_stats, range_start_exclusive) ==
	      offsetof(struct s2pin_vm_stats, range_start_unmap) + 7 * sizeof(u64));
static_assert(offsetof(struct s2pin_vm_stats, calls_other) ==
	      offsetof(struct s2pin_vm_stats, calls_share) + 3 * sizeof(u64));

/*
 * Pin table entry: the struct page pointer, bit 0 set when EL2 maps it
 * read-only, bit 1 set while the page is part of a 2 MiB stage-2 block
 * (docs/DESIGN.md §9, "2 MiB blocks"): then all 512 entries of the
 * 2 MiB-aligned gfn range are pinned, carry the bit, map contiguous frames
 * from a 2 MiB-aligned one and share the same PIN_RO. Any change to part of
 * the block clears the bit on the rest (block_demote()).
 */
#define PIN_RO 1UL
#define PIN_BLOCK 2UL
#define PIN_PAGE(e) ((struct page *)((e) & ~(PIN_RO | PIN_BLOCK)))
#define BLOCK_PAGES 512UL
/* Free memcache pages kept after a block share, for splits in notifiers. */
#define BLOCK_SPARE 2

/* Pages accounted in locked_vm at once, and the surplus returned. */
#define ACCT_CHUNK 64
/* Pages handled per lock hold in the notifier and slot deletion. */
#define BATCH 32
/* Memcache pages donated when EL2 says HYP_ENOMEM. */
#define TOPUP_PAGES 8

struct s2pin_vm {
	struct kref ref;
	struct mmu_notifier mn;
	bool mn_registered;
	struct mm_struct *mm;		/* the creator's; pinned by the notifier registration */
	u32 handle;
	u32 policy;
	u32 ipa_bits;
	pid_t pid;
	u64 win_base_gfn, win_pages;	/* the guest RAM window */

	spinlock_t lock;
	struct s2pin_memslot slots[S2PIN_MAX_MEMSLOTS];
	unsigned long *pins[S2PIN_MAX_MEMSLOTS];	/* per page of the slot */
	u64 slot_gen[S2PIN_MAX_MEMSLOTS];
	struct s2pin_inv inv;
	struct s2pin_vm_stats stats;
	long acct_credit;		/* accounted in locked_vm but not pinned */
	bool dead;			/* no new mappings (teardown started) */
	bool no_unshare_range;		/* EL2 answered HYP_UNSHARE_RANGE with NOT_SUPPORTED */
	bool finalized;			/* the EL2 VM is gone */
	struct s2pin_vm_stats el2_last;	/* EL2 counters before finalize */
	/* Hypercalls made for the VM by kind (CALL_*), lock-free: calls_* of the stats. */
	atomic64_t calls[4];

	struct mutex slots_mutex;	/* SET_USER_MEMORY_REGION, CREATE_VCPU */
	struct mutex teardown_mutex;
	DECLARE_BITMAP(vcpu_created, S2PIN_MAX_VCPUS);

	spinlock_t donated_lock;
	struct list_head donated;	/* memcache pages (page->lru), freed after finalize */
	struct page *root;
	unsigned int root_order;
	bool leak;			/* EL2 refused teardown: never free what it may hold */

	struct dentry *dbg;
};

struct s2pin_vcpu {
	struct s2pin_vm *vm;
	u32 index;
	struct s2pin_run *run;		/* one zeroed page, mmap'd by user space */
	struct mutex run_lock;
	bool mmio_read_pending;
};

static atomic_long_t s2pin_pinned_pages = ATOMIC_LONG_INIT(0);

/* The cost of the last VM teardown (debugfs `last_teardown`). */
struct s2pin_teardown_cost {
	u64 handle;		/* 0: no teardown yet */
	u64 calls;		/* hypercalls of the whole teardown */
	u64 reclaim_calls;	/* of which HYP_TEARDOWN_RECLAIM */
	u64 most;		/* most page updates in one reclaim call */
	u64 unpinned;		/* pages unpinned */
};
static DEFINE_SPINLOCK(s2pin_last_teardown_lock);
static struct s2pin_teardown_cost s2pin_last_teardown;
static atomic_t s2pin_live_vms = ATOMIC_INIT(0);
static struct dentry *s2pin_dbg_root;
static bool s2pin_misc_registered;

static struct arm_smccc_1_2_regs hvc6(unsigned long fn, u64 a1, u64 a2, u64 a3,
				      u64 a4, u64 a5)
{
	struct arm_smccc_1_2_regs args = {
		.a0 = fn, .a1 = a1, .a2 = a2, .a3 = a3, .a4 = a4, .a5 = a5,
	};
	struct arm_smccc_1_2_regs res;

	arm_smccc_1_2_hvc(&args, &res);
	return res;
}

/* The kinds of the calls_* counters, in their order in the stats. */
enum { CALL_SHARE, CALL_UNSHARE, CALL_WRPROTECT, CALL_OTHER };

/*
 * A hypercall made for @vm, counted by kind in vm->calls (any context, any
 * lock held). HYP_VCPU_RUN and HYP_VM_COUNTERS go through hvc6() directly
 * and are not counted.
 */
static struct arm_smccc_1_2_regs vm_hvc(struct s2pin_vm *vm, unsigned long fn, u64 a1,
					u64 a2, u64 a3, u64 a4, u64 a5)
{
	int kind;

	switch (fn) {
	case HYP_SHARE:
		kind = CALL_SHARE;
		break;
	case HYP_UNSHARE:
	case HYP_UNSHARE_RANGE:
		kind = CALL_UNSHARE;
		break;
	case HYP_WRPROTECT:
		kind = CALL_WRPROTECT;
		break;
	default:
		kind = CALL_OTHER;
		break;
	}
	atomic64_inc(&vm->calls[kind]);
	return hvc6(fn, a1, a2, a3, a4, a5);
}

static long vm_hvc_err(struct s2pin_vm *vm, unsigned long fn, u64 a1, u64 a2, u64 a3,
		       u64 a4, u64 a5)
{
	return (long)vm_hvc(vm, fn, a1, a2, a3, a4, a5).a0;
}

static int hyp_errno(long e)
{
	switch (e) {
	case 0:
		return 0;
	case HYP_ENOMEM:
		return -ENOMEM;
	case HYP_ENOSPC:
		return -ENOSPC;
	case HYP_EEXIST:
		return -EEXIST;
	case HYP_EBUSY:
		return -EBUSY;
	case HYP_EINVAL:
	case HYP_ERANGE:
		return -EINVAL;
	default:
		return -EIO;
	}
}

/* ---- memcache and locked_vm ------------------------------------------ */

/* Donates @n zeroed pages to the VM's memcache. Sleeps; no lock held. */
static int vm_topup(struct s2pin_vm *vm, unsigned int n)
{
	unsigned int i;

	for (i = 0; i < n; i++) {
		struct page *page = alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO);
		long e;

		if (!page)
			return -ENOMEM;
		e = vm_hvc_err(vm, HYP_MEMCACHE_TOPUP, vm->handle, page_to_pfn(page), 1, 0, 0);
		if (e) {
			__free_page(page);
			return hyp_errno(e);
		}
		spin_lock(&vm->donated_lock);
		list_add(&page->lru, &vm->donated);
		spin_unlock(&vm->donated_lock);
	}
	return 0;
}

/*
 * Takes one page of locked_vm credit for a pin, accounting a chunk (or one
 * page, near the limit) when there is none. Never under a lock:
 * account_locked_vm() takes mmap_lock. -ENOMEM past RLIMIT_MEMLOCK.
 */
static int vm_account_one(struct s2pin_vm *vm)
{
	int ret;

	spin_lock(&vm->lock);
	if (vm->acct_credit > 0) {
		vm->acct_credit--;
		spin_unlock(&vm->lock);
		return 0;
	}
	spin_unlock(&vm->lock);
	ret = account_locked_vm(vm->mm, ACCT_CHUNK, true);
	if (!ret) {
		spin_lock(&vm->lock);
		vm->acct_credit += ACCT_CHUNK - 1;
		spin_unlock(&vm->lock);
		return 0;
	}
	return account_locked_vm(vm->mm, 1, true);
}

/*
 * Returns credit above @keep pages to locked_vm (RUN path, no lock held):
 * above two chunks on every entry, all of it when RUN returns, so that
 * locked_vm equals the pinned pages whenever no vCPU thread is in RUN.
 */
static void vm_settle_accounting(struct s2pin_vm *vm, long keep)
{
	long n = 0;

	spin_lock(&vm->lock);
	if (vm->acct_credit > keep) {
		n = vm->acct_credit - keep;
		vm->acct_credit -= n;
	}
	spin_unlock(&vm->lock);
	if (n)
		account_locked_vm(vm->mm, n, false);
}

/* ---- unsharing and write-protecting runs of pinned pages -------------- */

/*
 * Pins whose pages EL2 no longer maps, dropped once vm->lock is released:
 * room for one full run (HYP_MAX_PAGES_PER_CALL) when the allocation
 * succeeds, else BATCH pages on the stack (runs are then that short).
 */
struct unpin_buf {
	struct page **pages;
	unsigned int n, cap;
	struct page *local[BATCH];
};

static void unpin_buf_init(struct unpin_buf *u, gfp_t gfp)
{
	u->n = 0;
	u->pages = kmalloc_array(HYP_MAX_PAGES_PER_CALL, sizeof(*u->pages), gfp | __GFP_NOWARN);
	u->cap = HYP_MAX_PAGES_PER_CALL;
	if (!u->pages) {
		u->pages = u->local;
		u->cap = BATCH;
	}
}

static void unpin_buf_free(struct unpin_buf *u)
{
	if (u->pages != u->local)
		kfree(u->pages);
}

/*
 * A run of a slot's pin table, [lo, hi): slot indices whose pinned pages
 * all get the same call (the indices in between that are not pinned are
 * holes, which EL2 does not map either: under vm->lock the pin table and
 * EL2's mappings agree page for page). At most HYP_MAX_PAGES_PER_CALL
 * indices; never a page of a 2 MiB block (those go by block_unshare()).
 */
struct pin_run {
	u64 lo, hi;
	unsigned int pages;	/* pinned pages in it; 0: empty */
};

/* Counts @n pages unshared and unpinned (in @reason too): vm->lock held. */
static void count_unmapped(struct s2pin_vm *vm, unsigned int n, u64 *reason)
{
	vm->stats.unshares += n;
	vm->stats.unpins += n;
	vm->stats.pinned_now -= n;
	if (reason)
		*reason += n;
	vm->acct_credit += n;
}

/* Moves the pin at index @k to @u (EL2 no longer maps it): vm->lock held. */
static void take_pin(unsigned long *pins, u64 k, struct unpin_buf *u)
{
	u->pages[u->n++] = PIN_PAGE(pins[k]);
	pins[k] = 0;
}

/*
 * Whether EL2 still maps @gfn (HYP_GUEST_PAGE_STATE). Only asked when a
 * HYP_UNSHARE_RANGE reported another count than the pin table expected,
 * which the table's agreement with EL2 rules out: then only the pins of
 * pages EL2 no longer maps are dropped.
 */
static bool gfn_still_mapped(struct s2pin_vm *vm, u64 gfn)
{
	struct arm_smccc_1_2_regs r = vm_hvc(vm, HYP_GUEST_PAGE_STATE, vm->handle, gfn, 0, 0, 0);

	return r.a0 || r.a1 != HYP_PAGE_NONE;
}

/*
 * Without HYP_UNSHARE_RANGE: the pinned pages of @r in runs contiguous in
 * both gfn and pfn, one HYP_UNSHARE each. Returns the pages unshared.
 */
static unsigned int run_unshare_by_pfn(struct s2pin_vm *vm, unsigned long *pins, u64 base_gfn,
				       const struct pin_run *r, struct unpin_buf *u)
{
	struct s2pin_unshare_run pr = { 0 };
	unsigned int n = 0;
	u64 k = r->lo, j;
	long e;

	for (;;) {
		bool end = k >= r->hi;

		if (!end && pins[k] &&
		    s2pin_run_extend(&pr, base_gfn + k, page_to_pfn(PIN_PAGE(pins[k])))) {
			k++;
			continue;
		}
		if (pr.len) {
			e = vm_hvc_err(vm, HYP_UNSHARE, vm->handle, pr.pfn, pr.gfn, pr.len, 0);
			if (!e) {
				for (j = pr.gfn - base_gfn; j < pr.gfn - base_gfn + pr.len; j++)
					take_pin(pins, j, u);
				n += pr.len;
			} else {
				/* EL2 may still map them: keep the pins (a leak, never a use-after-free). */
				pr_err_ratelimited("HYP_UNSHARE gfn %llx x%llu failed: %ld; pages stay pinned\n",
						   pr.gfn, pr.len, e);
			}
			pr.len = 0;
		}
		if (end)
			break;
		if (pins[k])
			s2pin_run_start(&pr, base_gfn + k, page_to_pfn(PIN_PAGE(pins[k])));
		k++;
	}
	return n;
}

/*
 * Unshares every pinned page of @r (vm->lock held): one HYP_UNSHARE_RANGE,
 * or, on a hypervisor without it (HYP_NOT_SUPPORTED, remembered), one
 * HYP_UNSHARE per gfn-and-pfn-contiguous piece. Moves exactly the pins of
 * the pages EL2 unshared to @u, counts them (in @reason too) and empties
 * @r. A refused call leaves its pins in place (a leak, never a
 * use-after-free).
 */
static void run_unshare(struct s2pin_vm *vm, unsigned long *pins, u64 base_gfn,
			struct pin_run *r, struct unpin_buf *u, u64 *reason)
{
	struct arm_smccc_1_2_regs res;
	unsigned int n = 0;
	u64 k;

	if (!r->pages)
		return;
	if (!vm->no_unshare_range) {
		res = vm_hvc(vm, HYP_UNSHARE_RANGE, vm->handle, base_gfn + r->lo, r->hi - r->lo, 0, 0);
		if (!res.a0) {
			bool exact = res.a1 == r->pages;

			if (!exact)
				pr_err_ratelimited("HYP_UNSHARE_RANGE gfn %llx x%llu unshared %llu of %u pinned pages\n",
						   base_gfn + r->lo, r->hi - r->lo, (u64)res.a1, r->pages);
			for (k = r->lo; k < r->hi; k++) {
				if (!pins[k] || (!exact && gfn_still_mapped(vm, base_gfn + k)))
					continue;
				take_pin(pins, k, u);
				n++;
			}
			goto out;
		}
		if ((long)res.a0 != HYP_NOT_SUPPORTED) {
			pr_err_ratelimited("HYP_UNSHARE_RANGE gfn %llx x%llu failed: %ld; pages stay pinned\n",
					   base_gfn + r->lo, r->hi - r->lo, (long)res.a0);
			goto out;
		}
		vm->no_unshare_range = true;
	}
	n = run_unshare_by_pfn(vm, pins, base_gfn, r, u);
out:
	count_unmapped(vm, n, reason);
	r->pages = 0;
}

/*
 * Write-protects the pinned pages of @r with one HYP_WRPROTECT (vm->lock
 * held; @r holds no block page, so the call needs no memory). If EL2
 * refuses, the pages are unshared instead (counted as changed).
 */
static void run_wrprotect(struct s2pin_vm *vm, unsigned long *pins, u64 base_gfn,
			  struct pin_run *r, struct unpin_buf *u)
{
	struct arm_smccc_1_2_regs res;
	u64 k;

	if (!r->pages)
		return;
	res = vm_hvc(vm, HYP_WRPROTECT, vm->handle, base_gfn + r->lo, r->hi - r->lo, 0, 0);
	if (res.a0) {
		run_unshare(vm, pins, base_gfn, r, u, &vm->stats.unmapped_changed);
		return;
	}
	for (k = r->lo; k < r->hi; k++)
		if (pins[k])
			pins[k] |= PIN_RO;
	vm->stats.wrprotects += res.a1;
	vm->stats.wrprotected_lost_write += r->pages;
	r->pages = 0;
}

/*
 * Whether index @i can join @r: @r is empty, or @i is within one call's
 * reach of its start and @contiguous (no pinned page that went another
 * way lies between @r's last page and @i).
 */
static bool run_can_take(const struct pin_run *r, u64 i, bool contiguous)
{
	return !r->pages || (contiguous && i + 1 - r->lo <= HYP_MAX_PAGES_PER_CALL);
}

static void run_take(struct pin_run *r, u64 i)
{
	if (!r->pages)
		r->lo = i;
	r->hi = i + 1;
	r->pages++;
}

/*
 * Unpins (dirty) pages EL2 no longer maps; no lock of ours held. @may_lock:
 * the caller may sleep on the page lock. Notifier callbacks pass false:
 * migration and reclaim send MMU_NOTIFY_CLEAR with the page locked, so
 * set_page_dirty_lock() there would deadlock; set_page_dirty() takes no
 * lock (anonymous and shmem pages need none), as KVM marks pages dirty.
 */
static void unpin_pages(struct page **pages, unsigned int n, bool may_lock)
{
	unsigned int i;

	if (!n)
		return;
	if (may_lock) {
		unpin_user_pages_dirty_lock(pages, n, true);
	} else {
		for (i = 0; i < n; i++) {
			set_page_dirty(pages[i]);
			unpin_user_page(pages[i]);
		}
	}
	atomic_long_sub(n, &s2pin_pinned_pages);
}

/* ---- 2 MiB blocks ------------------------------------------------------ */

/* Contiguous frames whose pins go once vm->lock is dropped. */
struct block_unpin {
	unsigned long pfn;
	unsigned int n;
};

/* The slot index of the first page of the block holding index @i. */
static u64 block_start(const struct s2pin_memslot *s, u64 i)
{
	return i - ((s->base_gfn + i) & (BLOCK_PAGES - 1));
}

/* The block at @bs is no longer one (part of it changed): vm->lock held. */
static void block_demote(unsigned long *pins, u64 bs)
{
	u64 k;

	for (k = bs; k < bs + BLOCK_PAGES; k++)
		pins[k] &= ~PIN_BLOCK;
}

/*
 * Unshares the pages [lo, hi) of the block at index @bs of the pin table
 * @pins of a slot at @base_gfn (vm->lock held). The whole block is one HYP_UNSHARE with no memory; part
 * of it splits the block (one memcache page), and without that page
 * (HYP_ENOMEM: a notifier cannot top up) the whole block goes instead and
 * the guest re-faults the rest. Clears the unshared entries and fills @u
 * with the frames to unpin; returns how many (0 if EL2 refused: the pins
 * stay, a leak, never a use-after-free). The caller counts them.
 */
static unsigned int block_unshare(struct s2pin_vm *vm, unsigned long *pins, u64 base_gfn,
				  u64 bs, u64 lo, u64 hi, struct block_unpin *u)
{
	u64 g = base_gfn + bs, k;
	unsigned long pfn0 = page_to_pfn(PIN_PAGE(pins[bs]));
	long e;

	u->n = 0;
	if (lo != bs || hi != bs + BLOCK_PAGES) {
		e = vm_hvc_err(vm, HYP_UNSHARE, vm->handle, pfn0 + (lo - bs), g + (lo - bs), hi - lo, 0);
		if (!e) {
			block_demote(pins, bs);
			for (k = lo; k < hi; k++)
				pins[k] = 0;
			vm->stats.block_splits++;
			u->pfn = pfn0 + (lo - bs);
			u->n = hi - lo;
			return u->n;
		}
		if (e != HYP_ENOMEM)
			goto refused;
		vm->stats.block_fallbacks++;
	}
	e = vm_hvc_err(vm, HYP_UNSHARE, vm->handle, pfn0, g, BLOCK_PAGES, 0);
	if (e)
		goto refused;
	for (k = bs; k < bs + BLOCK_PAGES; k++)
		pins[k] = 0;
	vm->stats.block_unshares++;
	u->pfn = pfn0;
	u->n = BLOCK_PAGES;
	return u->n;
refused:
	pr_err_ratelimited("HYP_UNSHARE of block gfn %llx failed: %ld; pages stay pinned\n", g, e);
	return 0;
}

/* Unpins (dirty) the frames of @u; no lock of ours held. */
static void block_unpin_pages(const struct block_unpin *u, bool may_lock)
{
	unsigned int k;

	for (k = 0; k < u->n; k++) {
		struct page *p = pfn_to_page(u->pfn + k);

		if (may_lock) {
			unpin_user_pages_dirty_lock(&p, 1, true);
		} else {
			set_page_dirty(p);
			unpin_user_page(p);
		}
	}
	atomic_long_sub(u->n, &s2pin_pinned_pages);
}

/*
 * The pages [*first, *last) of slot @id whose host addresses are in
 * [start, end), and the slot's generation (a later change of the slot shows
 * as another generation). False if the slot is unused, the VM is dead or
 * nothing of the slot is in the range. Takes vm->lock.
 */
static bool vm_slot_pages(struct s2pin_vm *vm, unsigned int id, unsigned long start,
			  unsigned long end, u64 *first, u64 *last, u64 *gen)
{
	bool found = false;

	spin_lock(&vm->lock);
	if (vm->slots[id].used && !vm->dead) {
		*gen = vm->slot_gen[id];
		found = s2pin_slot_page_range(&vm->slots[id], start, end, first, last);
	}
	spin_unlock(&vm->lock);
	return found;
}

/*
 * One lock hold's worth of unmapping the pinned pages of slot indices
 * [*cur, last) of a slot (vm->lock held): gfn runs of up to
 * HYP_MAX_PAGES_PER_CALL indices, one HYP_UNSHARE_RANGE each, while @u has
 * room for their pins; a 2 MiB block ends the hold (block_unshare(), its
 * frames in @bu). Advances *cur past what it did; counts in @reason.
 */
static void unmap_pinned(struct s2pin_vm *vm, unsigned long *pins, const struct s2pin_memslot *s,
			 u64 *cur, u64 last, struct unpin_buf *u, struct block_unpin *bu,
			 u64 *reason)
{
	struct pin_run r = { 0 };
	u64 i;

	for (i = *cur; i < last; i++) {
		if (!pins[i])
			continue;
		if (pins[i] & PIN_BLOCK) {
			u64 bs = block_start(s, i);
			u64 hi = min_t(u64, bs + BLOCK_PAGES, last);

			run_unshare(vm, pins, s->base_gfn, &r, u, reason);
			count_unmapped(vm, block_unshare(vm, pins, s->base_gfn, bs, i, hi, bu), reason);
			i = hi;
			break;
		}
		if (u->n + r.pages >= u->cap)
			break;
		if (!run_can_take(&r, i, true))
			run_unshare(vm, pins, s->base_gfn, &r, u, reason);
		run_take(&r, i);
	}
	run_unshare(vm, pins, s->base_gfn, &r, u, reason);
	*cur = i;
}

/*
 * Unmaps and unpins every pinned page of the VM whose host address is in
 * [start, end), counting them in @reason.
 */
static void vm_unmap_hva_range(struct s2pin_vm *vm, unsigned long start,
			       unsigned long end, size_t reason_off, bool blockable)
{
	struct unpin_buf u;
	unsigned int id;
	bool init = false;

	for (id = 0; id < S2PIN_MAX_MEMSLOTS; id++) {
		u64 first, last, cur, gen;

		if (!vm_slot_pages(vm, id, start, end, &first, &last, &gen))
			continue;
		if (!init) {
			unpin_buf_init(&u, GFP_NOWAIT);
			init = true;
		}
		cur = first;
		while (cur < last) {
			struct block_unpin bu = { 0 };

			spin_lock(&vm->lock);
			if (vm->dead || vm->slot_gen[id] != gen || !vm->pins[id]) {
				spin_unlock(&vm->lock);
				break;
			}
			unmap_pinned(vm, vm->pins[id], &vm->slots[id], &cur, last, &u, &bu,
				     (u64 *)((char *)&vm->stats + reason_off));
			spin_unlock(&vm->lock);
			unpin_pages(u.pages, u.n, false);
			u.n = 0;
			block_unpin_pages(&bu, false);
			if (blockable)
				cond_resched();
		}
	}
	if (init)
		unpin_buf_free(&u);
}

/* ---- host page-table walk (HOST-side facts in docs/DESIGN.md) -------- */

/*
 * Reads the PTE or huge PMD mapping @addr in @mm: presence, protnone,
 * write, and the frame. Called from invalidate_range_end, where the
 * caller holds mmap_lock; walk_page_range() is not exported, so by hand.
 */
static void host_walk(struct mm_struct *mm, unsigned long addr,
		      struct s2pin_pte_state *st, unsigned long *pfn)
{
	pgd_t *pgd;
	p4d_t *p4d;
	pud_t *pudp, pud;
	pmd_t *pmdp, pmd;
	pte_t *ptep, pte;
	spinlock_t *ptl;

	memset(st, 0, sizeof(*st));
	*pfn = 0;
	pgd = pgd_offset(mm, addr);
	if (pgd_none(READ_ONCE(*pgd)) || pgd_bad(READ_ONCE(*pgd)))
		return;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(READ_ONCE(*p4d)) || p4d_bad(READ_ONCE(*p4d)))
		return;
	pudp = pud_offset(p4d, addr);
	pud = READ_ONCE(*pudp);
	if (pud_none(pud) || !pud_present(pud) || pud_bad(pud))
		return;
	pmdp = pmd_offset(pudp, addr);
	pmd = READ_ONCE(*pmdp);
	if (pmd_none(pmd))
		return;
	if (pmd_trans_huge(pmd)) {
		ptl = pmd_lock(mm, pmdp);
		pmd = READ_ONCE(*pmdp);
		if (pmd_trans_huge(pmd)) {
			st->present = pmd_present(pmd);
			st->protnone = pmd_protnone(pmd);
			st->writable = pmd_write(pmd);
			*pfn = pmd_pfn(pmd) + ((addr & ~PMD_MASK) >> PAGE_SHIFT);
			spin_unlock(ptl);
			return;
		}
		spin_unlock(ptl);
		pmd = READ_ONCE(*pmdp);
		if (pmd_none(pmd))
			return;
	}
	if (pmd_bad(pmd))
		return;
	ptep = pte_offset_map_lock(mm, pmdp, addr, &ptl);
	pte = READ_ONCE(*ptep);
	if (pte_present(pte)) {
		st->present = 1;
		st->protnone = pte_protnone(pte);
		st->writable = pte_write(pte);
		*pfn = pte_pfn(pte);
	}
	pte_unmap_unlock(ptep, ptl);
}

/* The policy's action for the pinned page at slot index @i (vm->lock held). */
static u32 confirm_action(struct s2pin_vm *vm, unsigned int id, u64 i, bool accessible)
{
	unsigned long e = vm->pins[id][i], pfn;
	u64 hva = vm->slots[id].uaddr + (i << PAGE_SHIFT);
	struct s2pin_pte_state st;

	host_walk(vm->mm, hva, &st, &pfn);
	st.same_frame = st.present && pfn == page_to_pfn(PIN_PAGE(e));
	st.vma_accessible = accessible;
	st.mapped_writable = !(e & PIN_RO);
	return s2pin_policy_at_end(vm->policy, &st);
}

/*
 * confirm/keep for the pages [lo, hi) of the block at slot index @bs
 * (vm->lock held): all kept, nothing to do; the whole block with one
 * action, one call (HYP_WRPROTECT or HYP_UNSHARE of 512 pages, no memory);
 * anything else unshares the whole block (a fallback: the guest re-faults
 * in 4 KiB or block pieces as the host maps them now).
 */
static void confirm_block(struct s2pin_vm *vm, unsigned int id, u64 bs, u64 lo, u64 hi,
			  bool accessible, struct block_unpin *u)
{
	unsigned long *pins = vm->pins[id];
	u32 first = confirm_action(vm, id, lo, accessible), act;
	bool same = true, changed = first == S2PIN_END_UNMAP_CHANGED;
	u64 k, *reason;

	for (k = lo + 1; k < hi; k++) {
		act = confirm_action(vm, id, k, accessible);
		same = same && act == first;
		changed = changed || act == S2PIN_END_UNMAP_CHANGED;
	}
	if (same && first == S2PIN_END_KEEP) {
		vm->stats.kept += hi - lo;
		return;
	}
	if (same && lo == bs && hi == bs + BLOCK_PAGES && first == S2PIN_END_WRPROTECT) {
		struct arm_smccc_1_2_regs r =
			vm_hvc(vm, HYP_WRPROTECT, vm->handle, vm->slots[id].base_gfn + bs, BLOCK_PAGES, 0, 0);

		if (r.a0 == 0) {
			for (k = bs; k < bs + BLOCK_PAGES; k++)
				pins[k] |= PIN_RO;
			vm->stats.wrprotects += r.a1;
			vm->stats.wrprotected_lost_write += BLOCK_PAGES;
			return;
		}
		changed = true;	/* cannot write-protect: unmap instead */
	}
	if (!(same && lo == bs && hi == bs + BLOCK_PAGES))
		vm->stats.block_fallbacks++;
	reason = (changed || first != S2PIN_END_UNMAP_PROTNONE) ?
		&vm->stats.unmapped_changed : &vm->stats.unmapped_protnone;
	count_unmapped(vm, block_unshare(vm, pins, vm->slots[id].base_gfn, bs, bs, bs + BLOCK_PAGES, u), reason);
}

/* The open runs of one confirm lock hold, by the action their pages get. */
struct confirm_runs {
	struct pin_run protnone, changed, wrprotect;
	u32 prev;	/* the action of the last pinned page looked at */
};

static void confirm_flush(struct s2pin_vm *vm, unsigned long *pins, u64 base_gfn,
			  struct confirm_runs *c, struct unpin_buf *u)
{
	run_unshare(vm, pins, base_gfn, &c->protnone, u, &vm->stats.unmapped_protnone);
	run_unshare(vm, pins, base_gfn, &c->changed, u, &vm->stats.unmapped_changed);
	run_wrprotect(vm, pins, base_gfn, &c->wrprotect, u);
}

/*
 * confirm/keep at invalidate_range_end of a protection event: look at the
 * host entry of every pinned page in [start, end) and unmap, write-protect
 * or keep it as the policy says. Pages that get the same action and lie in
 * one gfn run (no pinned page with another action in between) share one
 * call: HYP_UNSHARE_RANGE or HYP_WRPROTECT of up to HYP_MAX_PAGES_PER_CALL
 * pages; a block is one call of its own (confirm_block()).
 */
static void vm_confirm_range(struct s2pin_vm *vm, const struct mmu_notifier_range *range)
{
	bool accessible = range->vma &&
		(range->vma->vm_flags & (VM_READ | VM_WRITE | VM_EXEC));
	bool blockable = mmu_notifier_range_blockable(range);
	unsigned long start = range->start, end = range->end;
	struct unpin_buf u;
	unsigned int id;
	bool init = false;

	for (id = 0; id < S2PIN_MAX_MEMSLOTS; id++) {
		u64 first, last, cur, gen;

		if (!vm_slot_pages(vm, id, start, end, &first, &last, &gen))
			continue;
		if (!init) {
			unpin_buf_init(&u, GFP_NOWAIT);
			init = true;
		}
		cur = first;
		while (cur < last) {
			struct confirm_runs c = { .prev = S2PIN_END_KEEP };
			struct block_unpin bu = { 0 };
			unsigned long *pins;
			u64 base_gfn;

			spin_lock(&vm->lock);
			if (vm->dead || vm->slot_gen[id] != gen || !vm->pins[id]) {
				spin_unlock(&vm->lock);
				break;
			}
			pins = vm->pins[id];
			base_gfn = vm->slots[id].base_gfn;
			for (; cur < last; cur++) {
				struct pin_run *r;
				u32 act;

				if (!pins[cur])
					continue;
				if (pins[cur] & PIN_BLOCK) {
					u64 bs = block_start(&vm->slots[id], cur);
					u64 hi = min_t(u64, bs + BLOCK_PAGES, last);

					confirm_flush(vm, pins, base_gfn, &c, &u);
					confirm_block(vm, id, bs, cur, hi, accessible, &bu);
					cur = hi;
					break;
				}
				if (u.n + c.protnone.pages + c.changed.pages + c.wrprotect.pages >= u.cap)
					break;
				act = confirm_action(vm, id, cur, accessible);
				switch (act) {
				case S2PIN_END_KEEP:
					vm->stats.kept++;
					c.prev = act;
					continue;
				case S2PIN_END_UNMAP_PROTNONE:
					r = &c.protnone;
					break;
				case S2PIN_END_WRPROTECT:
					r = &c.wrprotect;
					break;
				default:
					act = S2PIN_END_UNMAP_CHANGED;
					r = &c.changed;
					break;
				}
				if (!run_can_take(r, cur, c.prev == act)) {
					if (r == &c.wrprotect)
						run_wrprotect(vm, pins, base_gfn, r, &u);
					else
						run_unshare(vm, pins, base_gfn, r, &u, r == &c.protnone ?
							    &vm->stats.unmapped_protnone :
							    &vm->stats.unmapped_changed);
				}
				run_take(r, cur);
				c.prev = act;
			}
			confirm_flush(vm, pins, base_gfn, &c, &u);
			spin_unlock(&vm->lock);
			unpin_pages(u.pages, u.n, false);
			u.n = 0;
			block_unpin_pages(&bu, false);
			if (blockable)
				cond_resched();
		}
	}
	if (init)
		unpin_buf_free(&u);
}

/* ---- the MMU notifier ------------------------------------------------ */

static void vm_teardown(struct s2pin_vm *vm);

static int s2pin_mn_start(struct mmu_notifier *mn, const struct mmu_notifier_range *range)
{
	struct s2pin_vm *vm = container_of(mn, struct s2pin_vm, mn);
	u32 ev = range->event;
	u32 act;
	size_t off;

	spin_lock(&vm->lock);
	s2pin_inv_begin(&vm->inv, range->start, range->end);
	if (ev <= MMU_NOTIFY_EXCLUSIVE)
		(&vm->stats.range_start_unmap)[ev]++;
	act = s2pin_policy_at_start(vm->policy, ev);
	spin_unlock(&vm->lock);
	if (act == S2PIN_START_NOTHING)
		return 0;
	off = act == S2PIN_START_UNMAP_EAGER ?
		offsetof(struct s2pin_vm_stats, unmapped_eager) :
		offsetof(struct s2pin_vm_stats, unmapped_invalidate);
	vm_unmap_hva_range(vm, range->start, range->end, off,
			   mmu_notifier_range_blockable(range));
	return 0;
}

static void s2pin_mn_end(struct mmu_notifier *mn, const struct mmu_notifier_range *range)
{
	struct s2pin_vm *vm = container_of(mn, struct s2pin_vm, mn);

	if (s2pin_policy_walk_at_end(vm->policy, range->event))
		vm_confirm_range(vm, range);
	spin_lock(&vm->lock);
	s2pin_inv_finish(&vm->inv);
	vm->stats.range_end++;
	spin_unlock(&vm->lock);
}

/* The creator's mm is going away (exit, kill -9, OOM): tear the VM down. */
static void s2pin_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	vm_teardown(container_of(mn, struct s2pin_vm, mn));
}

static const struct mmu_notifier_ops s2pin_mn_ops = {
	.release = s2pin_mn_release,
	.invalidate_range_start = s2pin_mn_start,
	.invalidate_range_end = s2pin_mn_end,
};

/* ---- teardown ---------------------------------------------------------- */

static void vm_read_el2_counters(struct s2pin_vm *vm, struct s2pin_vm_stats *s)
{
	struct arm_smccc_1_2_regs r;

	r = hvc6(HYP_VM_COUNTERS, vm->handle, HYP_COUNTERS_STAGE2, 0, 0, 0);
	if (!r.a0) {
		s->el2_s2_maps = r.a1;
		s->el2_s2_unmaps = r.a2;
		s->el2_s2_tlbi = r.a3;
		s->el2_s2_shares = r.a4;
		s->el2_s2_unshares = r.a5;
		s->el2_s2_donations = r.a6;
		s->el2_s2_reclaims = r.a7;
	}
	r = hvc6(HYP_VM_COUNTERS, vm->handle, HYP_COUNTERS_RUNTIME, 0, 0, 0);
	if (!r.a0) {
		s->el2_rt_faults = r.a1;
		s->el2_rt_vcpu_runs = r.a2;
		s->el2_rt_memcache_pages = r.a3;
		s->el2_rt_table_pages = r.a4;
		s->el2_rt_host_exits = r.a5;
		s->el2_rt_hyp_exits = r.a6;
		s->el2_rt_irq_exits = r.a7;
	}
}

/*
 * Stops the VM at EL2, reclaims everything, then unpins every page and
 * returns locked_vm, then finalizes and frees the memcache and root.
 * Idempotent; from the last fd's close or the notifier's ->release. No
 * vCPU can be in RUN here: RUN needs a vCPU fd (so a reference) and the
 * creator's mm (so no ->release yet).
 */
static void vm_teardown(struct s2pin_vm *vm)
{
	struct arm_smccc_1_2_regs r;
	unsigned int id, tries;
	u64 calls = 0, reclaim_calls = 0, most = 0, unpinned = 0;
	long credit;
	long e;

	mutex_lock(&vm->teardown_mutex);
	if (vm->finalized || vm->leak)
		goto out;
	spin_lock(&vm->lock);
	vm->dead = true;
	spin_unlock(&vm->lock);

	for (tries = 0;; tries++) {
		e = vm_hvc_err(vm, HYP_TEARDOWN_START, vm->handle, 0, 0, 0, 0);
		calls++;
		if (e != HYP_EBUSY || tries >= 1000)
			break;
		schedule_timeout_uninterruptible(1);
	}
	if (e && e != HYP_EBUSY) {
		pr_err("HYP_TEARDOWN_START of VM %#x failed: %ld; leaking its pages\n", vm->handle, e);
		vm->leak = true;
		goto out;
	}
	if (e == HYP_EBUSY) {
		/* Already dying (an earlier attempt) or a vCPU never stopped. */
		pr_warn("HYP_TEARDOWN_START of VM %#x: busy, reclaiming anyway\n", vm->handle);
	}
	for (tries = 0;;) {
		r = vm_hvc(vm, HYP_TEARDOWN_RECLAIM, vm->handle, 0, 0, 0, 0);
		calls++;
		reclaim_calls++;
		if (!r.a0 && r.a1 > most)
			most = r.a1;
		if ((long)r.a0 == HYP_ENOMEM && ++tries < 100) {
			schedule_timeout_uninterruptible(1);
			continue;
		}
		if (r.a0) {
			pr_err("HYP_TEARDOWN_RECLAIM of VM %#x failed: %ld; leaking its pages\n",
			       vm->handle, (long)r.a0);
			vm->leak = true;
			goto out;
		}
		if (!r.a2)
			break;
		cond_resched();
	}

	/* EL2 maps nothing of the VM any more: unpin everything. */
	for (id = 0; id < S2PIN_MAX_MEMSLOTS; id++) {
		unsigned long *pins;
		u64 i, npages, n = 0;

		spin_lock(&vm->lock);
		pins = vm->pins[id];
		npages = vm->slots[id].npages;
		spin_unlock(&vm->lock);
		if (!pins)
			continue;
		for (i = 0; i < npages; i++) {
			struct page *page;

			if (!pins[i])
				continue;
			page = PIN_PAGE(pins[i]);
			pins[i] = 0;
			unpin_user_pages_dirty_lock(&page, 1, true);
			n++;
			if (!(n % 512))
				cond_resched();
		}
		atomic_long_sub(n, &s2pin_pinned_pages);
		unpinned += n;
		spin_lock(&vm->lock);
		vm->stats.unpins += n;
		vm->stats.unshares += n;
		vm->stats.unmapped_teardown += n;
		vm->stats.pinned_now -= n;
		vm->acct_credit += n;
		spin_unlock(&vm->lock);
	}
	spin_lock(&vm->lock);
	credit = vm->acct_credit;
	vm->acct_credit = 0;
	spin_unlock(&vm->lock);
	if (credit > 0)
		account_locked_vm(vm->mm, credit, false);

	vm_read_el2_counters(vm, &vm->el2_last);
	e = vm_hvc_err(vm, HYP_TEARDOWN_FINALIZE, vm->handle, 0, 0, 0, 0);
	calls++;
	/* What this teardown cost, for debugfs `last_teardown`. */
	spin_lock(&s2pin_last_teardown_lock);
	s2pin_last_teardown = (struct s2pin_teardown_cost){
		.handle = vm->handle, .calls = calls, .reclaim_calls = reclaim_calls,
		.most = most, .unpinned = unpinned,
	};
	spin_unlock(&s2pin_last_teardown_lock);
	if (e) {
		pr_err("HYP_TEARDOWN_FINALIZE of VM %#x failed: %ld; leaking its root\n", vm->handle, e);
		vm->leak = true;
		goto out;
	}
	spin_lock(&vm->lock);
	vm->finalized = true;
	spin_unlock(&vm->lock);
	/* Every memcache, table and vCPU page and the root are back. */
	while (!list_empty(&vm->donated)) {
		struct page *page = list_first_entry(&vm->donated, struct page, lru);

		list_del(&page->lru);
		__free_page(page);
	}
	__free_pages(vm->root, vm->root_order);
	vm->root = NULL;
	atomic_dec(&s2pin_live_vms);
out:
	mutex_unlock(&vm->teardown_mutex);
}

static void vm_free(struct kref *ref)
{
	struct s2pin_vm *vm = container_of(ref, struct s2pin_vm, ref);
	unsigned int id;

	vm_teardown(vm);
	if (vm->mn_registered)
		mmu_notifier_unregister(&vm->mn, vm->mm);
	debugfs_remove(vm->dbg);
	if (vm->leak)
		return;	/* EL2 may still use the struct's pages' frames; keep all */
	for (id = 0; id < S2PIN_MAX_MEMSLOTS; id++)
		kvfree(vm->pins[id]);
	kfree(vm);
}

static void vm_put(struct s2pin_vm *vm)
{
	kref_put(&vm->ref, vm_free);
}

/* ---- stats ----------------------------------------------------------- */

static void vm_get_stats(struct s2pin_vm *vm, struct s2pin_vm_stats *s)
{
	bool finalized;

	mutex_lock(&vm->teardown_mutex);
	spin_lock(&vm->lock);
	*s = vm->stats;
	finalized = vm->finalized || vm->leak;
	spin_unlock(&vm->lock);
	if (finalized) {
		const u64 *src = (const u64 *)&vm->el2_last;
		u64 *dst = (u64 *)s;
		size_t i;

		for (i = offsetof(struct s2pin_vm_stats, el2_s2_maps) / sizeof(u64);
		     i <= offsetof(struct s2pin_vm_stats, el2_rt_irq_exits) / sizeof(u64); i++)
			dst[i] = src[i];
	} else {
		vm_read_el2_counters(vm, s);
	}
	s->calls_share = atomic64_read(&vm->calls[CALL_SHARE]);
	s->calls_unshare = atomic64_read(&vm->calls[CALL_UNSHARE]);
	s->calls_wrprotect = atomic64_read(&vm->calls[CALL_WRPROTECT]);
	s->calls_other = atomic64_read(&vm->calls[CALL_OTHER]);
	mutex_unlock(&vm->teardown_mutex);
}

static int stats_show(struct seq_file *m, void *unused)
{
	struct s2pin_vm *vm = m->private;
	struct s2pin_vm_stats s;
	char *buf;
	ssize_t n;

	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	vm_get_stats(vm, &s);
	n = s2pin_format_stats((const u64 *)&s, buf, PAGE_SIZE);
	if (n > 0)
		seq_write(m, buf, n);
	kfree(buf);
	return n < 0 ? n : 0;
}
DEFINE_SHOW_ATTRIBUTE(stats);

/* ---- the fault path -------------------------------------------------- */

static void run_mem_fault(struct s2pin_run *run, u64 gfn, u32 access, u32 kind, int error)
{
	struct s2pin_run_mem_fault f = {
		.gpa = gfn << PAGE_SHIFT, .access = access, .kind = kind, .error = error,
	};

	WRITE_ONCE(run->exit_reason, S2PIN_EXIT_MEM_FAULT);
	memset(&run->words, 0, sizeof(run->words));
	memcpy(&run->mem_fault, &f, sizeof(f));
}

/*
 * Pins the page at @hva for the guest (mmap_lock taken here). Under the
 * keep policy a page the host made PROT_NONE for NUMA balancing is pinned
 * without a NUMA hint fault (FOLL_FORCE follows protnone entries), so the
 * module's own pin never makes the host migrate a page keep leaves mapped;
 * FOLL_FORCE is used only where the VMA itself allows the access, so it
 * never overrides mprotect(). Returns 1 with *page, or a negative errno.
 */
static long vm_pin(struct s2pin_vm *vm, unsigned long hva, bool write,
		   struct page **page)
{
	unsigned int foll = FOLL_LONGTERM | (write ? FOLL_WRITE : 0);
	long n;

	mmap_read_lock(vm->mm);
	if (vm->policy == S2PIN_POLICY_KEEP) {
		struct vm_area_struct *vma = vma_lookup(vm->mm, hva);

		if (vma && (vma->vm_flags & VM_READ) &&
		    (!write || (vma->vm_flags & VM_WRITE)))
			foll |= FOLL_FORCE;
	}
	n = pin_user_pages(hva, 1, foll, page, NULL);
	mmap_read_unlock(vm->mm);
	return n == 1 ? 1 : (n < 0 ? n : -EFAULT);
}

/*
 * A write fault on a page EL2 maps read-only (after HYP_WRPROTECT, or a
 * read-only pin): pin it for writing; the same frame gets its write
 * permission back (HYP_RELAX_PERMS), a new frame replaces the old one. If
 * the host refuses the write, the mapping stays as it is and the fault goes
 * to user space. Returns as vcpu_fault().
 */
static int vcpu_write_upgrade(struct s2pin_vcpu *vcpu, const struct s2pin_exit_info *info,
			      int idx, u64 i, unsigned long hva, u64 gen, u64 seq,
			      unsigned long e)
{
	struct s2pin_vm *vm = vcpu->vm;
	struct page *page, *drop;
	long n, err;
	int ret;

	n = vm_pin(vm, hva, true, &page);
	if (n < 0) {
		if (n == -EINTR || n == -ERESTARTSYS)
			return 0;
		spin_lock(&vm->lock);
		vm->stats.user_faults++;
		spin_unlock(&vm->lock);
		run_mem_fault(vcpu->run, info->gfn, info->access, S2PIN_FAULT_HOST_DENIED, (int)n);
		return 1;
	}
	ret = vm_account_one(vm);
	if (ret) {
		unpin_user_page(page);
		return ret;
	}
	atomic_long_inc(&s2pin_pinned_pages);
	spin_lock(&vm->lock);
	if (vm->dead || vm->slot_gen[idx] != gen || !vm->pins[idx] ||
	    vm->pins[idx][i] != e || !s2pin_inv_may_map(&vm->inv, seq, hva)) {
		vm->stats.fault_retries++;
		vm->acct_credit++;
		spin_unlock(&vm->lock);
		unpin_pages(&page, 1, true);
		return 0;
	}
	if ((e & PIN_BLOCK) && page != PIN_PAGE(e)) {
		/* A new frame in a block: the page leaves it; the guest re-faults. */
		struct block_unpin u;
		u64 bs = block_start(&vm->slots[idx], i);

		count_unmapped(vm, block_unshare(vm, vm->pins[idx], vm->slots[idx].base_gfn,
						 bs, i, i + 1, &u), NULL);
		vm->acct_credit++;
		spin_unlock(&vm->lock);
		unpin_pages(&page, 1, true);
		block_unpin_pages(&u, true);
		return 0;
	}
	if (page == PIN_PAGE(e)) {
		err = vm_hvc_err(vm, HYP_RELAX_PERMS, vm->handle, info->gfn,
			      HYP_PROT_R | HYP_PROT_W | HYP_PROT_X, 0, 0);
		if (err == HYP_ENOMEM && (e & PIN_BLOCK)) {
			/* Splitting the block needs a memcache page: top up, retry. */
			vm->acct_credit++;
			spin_unlock(&vm->lock);
			unpin_pages(&page, 1, true);
			return vm_topup(vm, TOPUP_PAGES);
		}
		if (!err) {
			if (e & PIN_BLOCK) {
				block_demote(vm->pins[idx], block_start(&vm->slots[idx], i));
				vm->stats.block_splits++;
			}
			vm->pins[idx][i] = vm->pins[idx][i] & ~PIN_RO;
		}
		drop = page;	/* the second pin of the same page */
	} else {
		err = vm_hvc_err(vm, HYP_UNSHARE, vm->handle, page_to_pfn(PIN_PAGE(e)), info->gfn, 1, 0);
		if (!err) {
			vm->stats.unshares++;
			err = vm_hvc_err(vm, HYP_SHARE, vm->handle, page_to_pfn(page), info->gfn, 1,
				      HYP_PROT_R | HYP_PROT_W | HYP_PROT_X);
			if (err) {
				/* Nothing maps the gfn now; the old pin goes, the guest re-faults. */
				vm->pins[idx][i] = 0;
				vm->stats.pinned_now--;
				vm->stats.unpins++;
				vm->acct_credit += 2;	/* the new pin and the old */
				spin_unlock(&vm->lock);
				unpin_pages(&page, 1, true);
				page = PIN_PAGE(e);
				unpin_pages(&page, 1, true);
				return err == HYP_ENOMEM ? vm_topup(vm, TOPUP_PAGES) : -EIO;
			}
			vm->pins[idx][i] = (unsigned long)page;
			vm->stats.pins++;
			vm->stats.shares++;
			vm->stats.unpins++;
			drop = PIN_PAGE(e);
		} else {
			drop = page;
		}
	}
	if (!err)
		vm->stats.permission_faults++;
	vm->acct_credit++;
	spin_unlock(&vm->lock);
	unpin_pages(&drop, 1, true);
	if (err) {
		pr_err_ratelimited("remapping gfn %llx writable failed: %ld\n", info->gfn, err);
		return -EIO;
	}
	return 0;
}

/* Pins @nr pages from @hva, with vm_pin()'s flags. Returns how many, or a negative errno. */
static long vm_pin_n(struct s2pin_vm *vm, unsigned long hva, bool write,
		     struct page **pages, unsigned long nr)
{
	unsigned int foll = FOLL_LONGTERM | (write ? FOLL_WRITE : 0);
	long n;

	mmap_read_lock(vm->mm);
	if (vm->policy == S2PIN_POLICY_KEEP) {
		struct vm_area_struct *vma = vma_lookup(vm->mm, hva);

		if (vma && (vma->vm_flags & VM_READ) &&
		    (!write || (vma->vm_flags & VM_WRITE)) &&
		    hva + (nr << PAGE_SHIFT) <= vma->vm_end)
			foll |= FOLL_FORCE;
	}
	n = pin_user_pages(hva, nr, foll, pages, NULL);
	mmap_read_unlock(vm->mm);
	return n;
}

/* Whether the 512 pins of @pages are contiguous frames from a 2 MiB-aligned one. */
static bool pages_form_block(struct page **pages)
{
	unsigned long pfn0 = page_to_pfn(pages[0]), k;

	if (pfn0 & (BLOCK_PAGES - 1))
		return false;
	for (k = 1; k < BLOCK_PAGES; k++)
		if (page_to_pfn(pages[k]) != pfn0 + k)
			return false;
	return true;
}

/*
 * Tries to serve the fault at @gfn, whose page @page the caller pinned (and
 * accounted), with a 2 MiB block (docs/DESIGN.md §9): when the 2 MiB-aligned
 * gfn range around it lies in the slot, the slot's host addresses are
 * congruent to its gfns mod 2 MiB, no page of the range is pinned, @page is
 * in a folio of at least 2 MiB, and the 512 pages pinned from the range's
 * host address are contiguous frames from a 2 MiB-aligned one: then one
 * HYP_SHARE of 512 pages. Returns -EAGAIN (nothing changed, the caller
 * still holds @page) to fall back to the 4 KiB share, otherwise as
 * vcpu_fault() with @page's pin consumed.
 */
static int vcpu_fault_block(struct s2pin_vm *vm, int idx, u64 gen, u64 seq,
			    const struct s2pin_memslot *slot, u64 gfn, struct page *page,
			    bool ro)
{
	u64 g = gfn & ~(BLOCK_PAGES - 1), bs, k;
	struct folio *folio = page_folio(page);
	struct page **pages;
	unsigned long h, pfn0;
	struct arm_smccc_1_2_regs r;
	bool busy = false;
	long n, e;

	if (g < slot->base_gfn || (((slot->uaddr >> PAGE_SHIFT) - slot->base_gfn) & (BLOCK_PAGES - 1)))
		return -EAGAIN;
	bs = g - slot->base_gfn;
	if (bs + BLOCK_PAGES > slot->npages || !folio_test_large(folio) ||
	    folio_nr_pages(folio) < BLOCK_PAGES ||
	    (page_to_pfn(page) & (BLOCK_PAGES - 1)) != (gfn & (BLOCK_PAGES - 1)))
		return -EAGAIN;
	h = slot->uaddr + (bs << PAGE_SHIFT);

	spin_lock(&vm->lock);
	if (vm->dead || vm->slot_gen[idx] != gen || !vm->pins[idx]) {
		busy = true;
	} else {
		for (k = bs; k < bs + BLOCK_PAGES && !busy; k++)
			busy = vm->pins[idx][k] != 0;
	}
	spin_unlock(&vm->lock);
	if (busy)
		return -EAGAIN;

	pages = kvmalloc_array(BLOCK_PAGES, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return -EAGAIN;
	n = vm_pin_n(vm, h, !ro, pages, BLOCK_PAGES);
	if (n != BLOCK_PAGES || !pages_form_block(pages) ||
	    pages[gfn & (BLOCK_PAGES - 1)] != page) {
		if (n > 0)
			unpin_user_pages(pages, n);
		kvfree(pages);
		return -EAGAIN;
	}
	if (account_locked_vm(vm->mm, BLOCK_PAGES - 1, true)) {
		unpin_user_pages(pages, BLOCK_PAGES);
		kvfree(pages);
		return -EAGAIN;
	}
	/* The 512 pins hold the block; @page's own pin is the caller's, dropped. */
	unpin_user_page(page);
	atomic_long_add(BLOCK_PAGES - 1, &s2pin_pinned_pages);
	pfn0 = page_to_pfn(pages[0]);

	spin_lock(&vm->lock);
	busy = vm->dead || vm->slot_gen[idx] != gen || !vm->pins[idx];
	for (k = 0; k < BLOCK_PAGES && !busy; k++)
		busy = vm->pins[idx][bs + k] ||
			!s2pin_inv_may_map(&vm->inv, seq, h + (k << PAGE_SHIFT));
	if (busy) {
		vm->stats.fault_retries++;
		vm->acct_credit += BLOCK_PAGES;
		spin_unlock(&vm->lock);
		unpin_pages(pages, BLOCK_PAGES, true);
		kvfree(pages);
		return 0;
	}
	e = vm_hvc_err(vm, HYP_SHARE, vm->handle, pfn0, g, BLOCK_PAGES,
		    HYP_PROT_R | HYP_PROT_X | (ro ? 0 : HYP_PROT_W));
	if (e) {
		vm->acct_credit += BLOCK_PAGES;
		spin_unlock(&vm->lock);
		unpin_pages(pages, BLOCK_PAGES, true);
		kvfree(pages);
		if (e == HYP_ENOMEM)
			return vm_topup(vm, TOPUP_PAGES);
		pr_err_ratelimited("HYP_SHARE of block gfn %llx failed: %ld\n", g, e);
		return -EIO;
	}
	for (k = 0; k < BLOCK_PAGES; k++)
		vm->pins[idx][bs + k] = (unsigned long)pages[k] | PIN_BLOCK | (ro ? PIN_RO : 0);
	vm->stats.pins += BLOCK_PAGES;
	vm->stats.pinned_now += BLOCK_PAGES;
	vm->stats.faults++;
	vm->stats.shares += BLOCK_PAGES;
	vm->stats.blocks_shared++;
	spin_unlock(&vm->lock);
	kvfree(pages);

	/* Keep spare memcache pages: a notifier splitting a block cannot top up. */
	r = hvc6(HYP_VM_COUNTERS, vm->handle, HYP_COUNTERS_RUNTIME, 0, 0, 0);
	if (!r.a0 && r.a3 < BLOCK_SPARE)
		vm_topup(vm, BLOCK_SPARE - r.a3);	/* best effort: the share is done */
	return 0;
}

/*
 * Serves a stage-2 memory fault: 0 to re-enter the guest (mapped, or a
 * race: it faults again), 1 to return to user space (run filled), or a
 * negative errno for RUN.
 */
static int vcpu_fault(struct s2pin_vcpu *vcpu, const struct s2pin_exit_info *info)
{
	struct s2pin_vm *vm = vcpu->vm;
	struct s2pin_run *run = vcpu->run;
	bool write = info->access == S2PIN_ACCESS_WRITE;
	unsigned long e, hva;
	struct s2pin_memslot slot;
	bool ro, map_ro = false;
	struct page *page;
	u64 seq, i, gen;
	long n;
	int idx, ret;

	spin_lock(&vm->lock);
	if (vm->dead) {
		spin_unlock(&vm->lock);
		return -ESHUTDOWN;
	}
	idx = s2pin_memslot_find(vm->slots, S2PIN_MAX_MEMSLOTS, info->gfn);
	if (idx < 0) {
		vm->stats.user_faults++;
		spin_unlock(&vm->lock);
		run_mem_fault(run, info->gfn, info->access, S2PIN_FAULT_NO_SLOT, 0);
		return 1;
	}
	slot = vm->slots[idx];
	gen = vm->slot_gen[idx];
	ro = slot.flags & S2PIN_MEM_READONLY;
	if (ro && write) {
		vm->stats.user_faults++;
		spin_unlock(&vm->lock);
		run_mem_fault(run, info->gfn, info->access, S2PIN_FAULT_READONLY_SLOT, 0);
		return 1;
	}
	i = info->gfn - slot.base_gfn;
	hva = slot.uaddr + (i << PAGE_SHIFT);
	e = vm->pins[idx][i];
	seq = vm->inv.seq;
	spin_unlock(&vm->lock);
	if (e) {
		if (info->permission && write && (e & PIN_RO))
			return vcpu_write_upgrade(vcpu, info, idx, i, hva, gen, seq, e);
		return 0;	/* another vCPU mapped it meanwhile */
	}

	n = vm_pin(vm, hva, !ro, &page);
	if (n < 0 && !ro && !write && n != -EINTR && n != -ERESTARTSYS) {
		/* A read of a page the host maps read-only: map it read-only. */
		n = vm_pin(vm, hva, false, &page);
		map_ro = true;
	}
	if (n < 0) {
		if (n == -EINTR || n == -ERESTARTSYS)
			return 0;	/* the loop sees the signal */
		spin_lock(&vm->lock);
		vm->stats.user_faults++;
		spin_unlock(&vm->lock);
		run_mem_fault(run, info->gfn, info->access, S2PIN_FAULT_HOST_DENIED, (int)n);
		return 1;
	}
	ret = vm_account_one(vm);
	if (ret) {
		unpin_user_page(page);
		return ret;
	}
	atomic_long_inc(&s2pin_pinned_pages);

	if (!map_ro) {
		ret = vcpu_fault_block(vm, idx, gen, seq, &slot, info->gfn, page, ro);
		if (ret != -EAGAIN)
			return ret;
	}

	spin_lock(&vm->lock);
	if (vm->dead || vm->slot_gen[idx] != gen || !vm->pins[idx] ||
	    vm->pins[idx][i] || !s2pin_inv_may_map(&vm->inv, seq, hva)) {
		vm->stats.fault_retries++;
		vm->acct_credit++;
		spin_unlock(&vm->lock);
		unpin_pages(&page, 1, true);
		return 0;
	}
	e = vm_hvc_err(vm, HYP_SHARE, vm->handle, page_to_pfn(page), info->gfn, 1,
		    HYP_PROT_R | HYP_PROT_X | ((ro || map_ro) ? 0 : HYP_PROT_W));
	if (e) {
		vm->acct_credit++;
		spin_unlock(&vm->lock);
		unpin_pages(&page, 1, true);
		if ((long)e == HYP_ENOMEM)
			return vm_topup(vm, TOPUP_PAGES);
		pr_err_ratelimited("HYP_SHARE gfn %llx failed: %ld\n", info->gfn, (long)e);
		return -EIO;
	}
	vm->pins[idx][i] = (unsigned long)page | ((ro || map_ro) ? PIN_RO : 0);
	vm->stats.pins++;
	vm->stats.pinned_now++;
	vm->stats.faults++;
	vm->stats.shares++;
	spin_unlock(&vm->lock);
	return 0;
}

/* ---- vCPU fd ----------------------------------------------------------- */

static long vcpu_run(struct s2pin_vcpu *vcpu)
{
	struct s2pin_vm *vm = vcpu->vm;
	struct s2pin_run *run = vcpu->run;
	struct s2pin_exit_info info;
	long ret = 0;

	if (current->mm != vm->mm)
		return -EIO;
	if (!mutex_trylock(&vcpu->run_lock))
		return -EBUSY;
	if (READ_ONCE(vm->dead)) {
		ret = -ESHUTDOWN;
		goto out;
	}
	if (READ_ONCE(run->immediate_exit)) {
		WRITE_ONCE(run->exit_reason, S2PIN_EXIT_INTR);
		ret = -EINTR;
		goto out;
	}
	for (;;) {
		struct arm_smccc_1_2_regs r;
		u64 x[8], mmio = 0;
		int act;

		if (signal_pending(current)) {
			WRITE_ONCE(run->exit_reason, S2PIN_EXIT_INTR);
			ret = -EINTR;
			break;
		}
		/* Task work (NUMA balancing's scan) runs only on the way to user mode. */
		if (test_thread_flag(TIF_NOTIFY_RESUME) || READ_ONCE(current->task_works)) {
			WRITE_ONCE(run->exit_reason, S2PIN_EXIT_PENDING_WORK);
			break;
		}
		cond_resched();
		if (READ_ONCE(vm->acct_credit) > 2 * ACCT_CHUNK)
			vm_settle_accounting(vm, ACCT_CHUNK);
		if (vcpu->mmio_read_pending) {
			mmio = READ_ONCE(run->mmio.data);
			vcpu->mmio_read_pending = false;
		}
		/* HYP_VCPU_RUN clobbers FP/SIMD state (docs/ABI.md §3.7). */
		kernel_neon_begin();
		r = hvc6(HYP_VCPU_RUN, vm->handle, vcpu->index, mmio, 0, 0);
		kernel_neon_end();
		x[0] = r.a0; x[1] = r.a1; x[2] = r.a2; x[3] = r.a3;
		x[4] = r.a4; x[5] = r.a5; x[6] = r.a6; x[7] = r.a7;
		act = s2pin_handle_exit(x, run, &info);
		if (act == S2PIN_ACT_REENTER)
			continue;
		if (act == S2PIN_ACT_WFX) {
			cond_resched();
			continue;
		}
		if (act == S2PIN_ACT_POWERED_OFF) {
			/* Waits for another vCPU's CPU_ON; signals end the wait. */
			schedule_timeout_interruptible(1);
			continue;
		}
		if (act == S2PIN_ACT_MEM_FAULT) {
			int f = vcpu_fault(vcpu, &info);

			if (f < 0) {
				ret = f;
				break;
			}
			if (f > 0)
				break;
			continue;
		}
		if (act == S2PIN_ACT_USER) {
			u32 reason = READ_ONCE(run->exit_reason);

			vcpu->mmio_read_pending = info.mmio_read;
			spin_lock(&vm->lock);
			if (reason == S2PIN_EXIT_MMIO)
				vm->stats.mmio_exits++;
			else if (reason == S2PIN_EXIT_CONSOLE)
				vm->stats.console_exits++;
			spin_unlock(&vm->lock);
			break;
		}
		if (act == S2PIN_ACT_FAILED) {
			ret = READ_ONCE(vm->dead) ? -ESHUTDOWN : hyp_errno(info.hyp_error);
			if (ret == -EBUSY || ret == -EINVAL)
				ret = -EIO;
			pr_err_ratelimited("HYP_VCPU_RUN failed: %lld\n", info.hyp_error);
			break;
		}
		pr_err_ratelimited("HYP_VCPU_RUN: malformed reply (x0 %llx x1 %llx)\n", x[0], x[1]);
		ret = -EIO;
		break;
	}
out:
	vm_settle_accounting(vm, 0);
	mutex_unlock(&vcpu->run_lock);
	return ret;
}

static long vcpu_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct s2pin_vcpu *vcpu = f->private_data;

	switch (cmd) {
	case S2PIN_RUN:
		if (arg)
			return -EINVAL;
		return vcpu_run(vcpu);
	default:
		return -ENOTTY;
	}
}

static int vcpu_mmap(struct file *f, struct vm_area_struct *vma)
{
	struct s2pin_vcpu *vcpu = f->private_data;

	/* One shared page at offset 0 (a private mapping would be a COW copy). */
	if (vma->vm_pgoff != 0 || vma->vm_end - vma->vm_start != PAGE_SIZE ||
	    !(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	return remap_pfn_range(vma, vma->vm_start, virt_to_pfn(vcpu->run),
			       PAGE_SIZE, vma->vm_page_prot);
}

static int vcpu_release(struct inode *inode, struct file *f)
{
	struct s2pin_vcpu *vcpu = f->private_data;
	struct s2pin_vm *vm = vcpu->vm;

	free_page((unsigned long)vcpu->run);
	kfree(vcpu);
	vm_put(vm);
	return 0;
}

static const struct file_operations vcpu_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = vcpu_ioctl,
	.mmap = vcpu_mmap,
	.release = vcpu_release,
	.llseek = noop_llseek,
};

/* ---- VM fd ------------------------------------------------------------- */

static long vm_create_vcpu(struct s2pin_vm *vm, void __user *argp)
{
	struct s2pin_create_vcpu a;
	struct s2pin_vcpu *vcpu;
	unsigned int tries;
	long e;
	int fd;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (a.index >= S2PIN_MAX_VCPUS || (a.flags & ~S2PIN_VCPU_START_OFF) ||
	    (a.entry & 3) || ((a.flags & S2PIN_VCPU_START_OFF) && (a.entry || a.x0)))
		return -EINVAL;
	vcpu = kzalloc(sizeof(*vcpu), GFP_KERNEL_ACCOUNT);
	if (!vcpu)
		return -ENOMEM;
	vcpu->run = (struct s2pin_run *)get_zeroed_page(GFP_KERNEL_ACCOUNT);
	if (!vcpu->run) {
		kfree(vcpu);
		return -ENOMEM;
	}
	mutex_init(&vcpu->run_lock);
	vcpu->vm = vm;
	vcpu->index = a.index;

	mutex_lock(&vm->slots_mutex);
	if (READ_ONCE(vm->dead)) {
		e = -ESHUTDOWN;
		goto fail;
	}
	if (test_bit(a.index, vm->vcpu_created)) {
		e = -EEXIST;
		goto fail;
	}
	for (tries = 0;; tries++) {
		e = vm_hvc_err(vm, HYP_VCPU_CREATE, vm->handle, a.index, a.entry, a.x0,
			    (a.flags & S2PIN_VCPU_START_OFF) ? HYP_VCPU_START_OFF : 0);
		if (e != HYP_ENOMEM || tries >= 3)
			break;
		if (vm_topup(vm, TOPUP_PAGES))
			break;
	}
	if (e) {
		e = hyp_errno(e);
		goto fail;
	}
	set_bit(a.index, vm->vcpu_created);
	kref_get(&vm->ref);
	mutex_unlock(&vm->slots_mutex);
	fd = anon_inode_getfd("s2pin-vcpu", &vcpu_fops, vcpu, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		/* The EL2 vCPU stays (its index is used) until teardown. */
		free_page((unsigned long)vcpu->run);
		kfree(vcpu);
		vm_put(vm);
	}
	return fd;
fail:
	mutex_unlock(&vm->slots_mutex);
	free_page((unsigned long)vcpu->run);
	kfree(vcpu);
	return e;
}

/* Unmaps and unpins every page of a deleted slot's pin table; ioctl context. */
static void vm_drop_slot_pins(struct s2pin_vm *vm, unsigned long *pins,
			      const struct s2pin_memslot *s)
{
	struct unpin_buf u;
	u64 cur = 0;

	unpin_buf_init(&u, GFP_KERNEL);
	while (cur < s->npages) {
		struct block_unpin bu = { 0 };

		spin_lock(&vm->lock);
		unmap_pinned(vm, pins, s, &cur, s->npages, &u, &bu, &vm->stats.unmapped_memslot);
		spin_unlock(&vm->lock);
		unpin_pages(u.pages, u.n, true);
		u.n = 0;
		block_unpin_pages(&bu, true);
		cond_resched();
	}
	unpin_buf_free(&u);
}

static long vm_set_region(struct s2pin_vm *vm, void __user *argp)
{
	struct s2pin_userspace_memory_region r;
	struct s2pin_memslot s;
	unsigned long *pins;
	long ret;

	if (copy_from_user(&r, argp, sizeof(r)))
		return -EFAULT;
	if (current->mm != vm->mm)
		return -EIO;
	mutex_lock(&vm->slots_mutex);
	if (READ_ONCE(vm->dead)) {
		ret = -ESHUTDOWN;
		goto out;
	}
	ret = s2pin_memslot_check(vm->slots, S2PIN_MAX_MEMSLOTS, &r,
				  vm->win_base_gfn, vm->win_pages, &s);
	if (ret < 0)
		goto out;
	if (ret == 1) {
		struct s2pin_memslot old;

		spin_lock(&vm->lock);
		old = vm->slots[r.slot];
		pins = vm->pins[r.slot];
		memset(&vm->slots[r.slot], 0, sizeof(vm->slots[r.slot]));
		vm->pins[r.slot] = NULL;
		vm->slot_gen[r.slot]++;
		s2pin_inv_bump(&vm->inv);
		spin_unlock(&vm->lock);
		if (pins)
			vm_drop_slot_pins(vm, pins, &old);
		kvfree(pins);
		ret = 0;
		goto out;
	}
	if (!access_ok((void __user *)(unsigned long)s.uaddr, s.npages << PAGE_SHIFT)) {
		ret = -EINVAL;
		goto out;
	}
	pins = kvcalloc(s.npages, sizeof(*pins), GFP_KERNEL_ACCOUNT | __GFP_NOWARN);
	if (!pins) {
		ret = -ENOMEM;
		goto out;
	}
	spin_lock(&vm->lock);
	vm->slots[r.slot] = s;
	vm->pins[r.slot] = pins;
	vm->slot_gen[r.slot]++;
	spin_unlock(&vm->lock);
	ret = 0;
out:
	mutex_unlock(&vm->slots_mutex);
	return ret;
}

static long vm_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct s2pin_vm *vm = f->private_data;
	void __user *argp = (void __user *)arg;

	switch (cmd) {
	case S2PIN_SET_USER_MEMORY_REGION:
		return vm_set_region(vm, argp);
	case S2PIN_CREATE_VCPU:
		if (current->mm != vm->mm)
			return -EIO;
		return vm_create_vcpu(vm, argp);
	case S2PIN_GET_STATS: {
		struct s2pin_vm_stats s;

		vm_get_stats(vm, &s);
		if (copy_to_user(argp, &s, sizeof(s)))
			return -EFAULT;
		return 0;
	}
	default:
		return -ENOTTY;
	}
}

static int vm_release(struct inode *inode, struct file *f)
{
	vm_put(f->private_data);
	return 0;
}

static const struct file_operations vm_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = vm_ioctl,
	.release = vm_release,
	.llseek = noop_llseek,
};

/* ---- /dev/s2pin -------------------------------------------------------- */

static long dev_create_vm(void __user *argp)
{
	struct s2pin_create_vm a;
	struct arm_smccc_1_2_regs r;
	struct s2pin_vm *vm;
	char name[32];
	u32 bits;
	int ret, fd;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	ret = s2pin_create_vm_check(&a, &bits);
	if (ret)
		return ret;
	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm)
		return -ENOMEM;
	kref_init(&vm->ref);
	spin_lock_init(&vm->lock);
	spin_lock_init(&vm->donated_lock);
	mutex_init(&vm->slots_mutex);
	mutex_init(&vm->teardown_mutex);
	INIT_LIST_HEAD(&vm->donated);
	vm->policy = a.policy;
	vm->ipa_bits = bits;
	vm->win_base_gfn = a.mem_base >> PAGE_SHIFT;
	vm->win_pages = a.mem_size >> PAGE_SHIFT;
	vm->mm = current->mm;
	vm->pid = task_tgid_nr(current);
	vm->root_order = ilog2(HYP_ROOT_TABLE_PAGES(bits));
	vm->root = alloc_pages(GFP_KERNEL_ACCOUNT | __GFP_ZERO, vm->root_order);
	if (!vm->root) {
		kfree(vm);
		return -ENOMEM;
	}
	r = hvc6(HYP_VM_CREATE, bits, S2PIN_MAX_VCPUS, page_to_pfn(vm->root),
		 vm->win_base_gfn, vm->win_pages);
	if (r.a0) {
		__free_pages(vm->root, vm->root_order);
		kfree(vm);
		return hyp_errno((long)r.a0);
	}
	vm->handle = r.a1;
	atomic64_set(&vm->calls[CALL_OTHER], 1);	/* HYP_VM_CREATE */
	atomic_inc(&s2pin_live_vms);

	vm->mn.ops = &s2pin_mn_ops;
	ret = mmu_notifier_register(&vm->mn, current->mm);
	if (ret) {
		vm_put(vm);
		return ret;
	}
	vm->mn_registered = true;
	if (s2pin_dbg_root) {
		snprintf(name, sizeof(name), "%d-%x", vm->pid, vm->handle);
		vm->dbg = debugfs_create_dir(name, s2pin_dbg_root);
		debugfs_create_file("stats", 0444, vm->dbg, vm, &stats_fops);
	}
	fd = anon_inode_getfd("s2pin-vm", &vm_fops, vm, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		vm_put(vm);
	return fd;
}

static long dev_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	switch (cmd) {
	case S2PIN_GET_API_VERSION:
		return arg ? -EINVAL : S2PIN_API_VERSION;
	case S2PIN_GET_VCPU_MMAP_SIZE:
		return arg ? -EINVAL : PAGE_SIZE;
	case S2PIN_CREATE_VM:
		return dev_create_vm((void __user *)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = dev_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice s2pin_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "s2pin",
	.fops = &dev_fops,
	.mode = 0666,
};

/* ---- global debugfs ---------------------------------------------------- */

static int pinned_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%ld\n", atomic_long_read(&s2pin_pinned_pages));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pinned);

static int last_teardown_show(struct seq_file *m, void *unused)
{
	struct s2pin_teardown_cost t;

	spin_lock(&s2pin_last_teardown_lock);
	t = s2pin_last_teardown;
	spin_unlock(&s2pin_last_teardown_lock);
	if (!t.handle)
		seq_puts(m, "none\n");
	else
		seq_printf(m, "VM %#llx teardown: %llu hypercalls (%llu HYP_TEARDOWN_RECLAIM), at most %llu page updates in one, %llu pages unpinned; calls=%llu\n",
			   t.handle, t.calls, t.reclaim_calls, t.most, t.unpinned, t.calls);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(last_teardown);

static int vms_show(struct seq_file *m, void *unused)
{
	seq_printf(m, "%d\n", atomic_read(&s2pin_live_vms));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vms);

static DEFINE_MUTEX(hps_mutex);
static u64 hps_pfn;

static ssize_t hps_write(struct file *f, const char __user *ubuf, size_t len, loff_t *off)
{
	u64 pfn;
	int ret = kstrtou64_from_user(ubuf, len, 0, &pfn);

	if (ret)
		return ret;
	mutex_lock(&hps_mutex);
	hps_pfn = pfn;
	mutex_unlock(&hps_mutex);
	return len;
}

static ssize_t hps_read(struct file *f, char __user *ubuf, size_t len, loff_t *off)
{
	struct arm_smccc_1_2_regs r;
	char buf[128];
	ssize_t n;
	u64 pfn, x[8];

	mutex_lock(&hps_mutex);
	pfn = hps_pfn;
	mutex_unlock(&hps_mutex);
	r = hvc6(HYP_HOST_PAGE_STATE, pfn, 0, 0, 0, 0);
	x[0] = r.a0; x[1] = r.a1; x[2] = r.a2; x[3] = r.a3;
	x[4] = r.a4; x[5] = r.a5; x[6] = r.a6; x[7] = r.a7;
	n = s2pin_format_host_page_state(pfn, x, buf, sizeof(buf));
	if (n < 0)
		return n;
	return simple_read_from_buffer(ubuf, len, off, buf, n);
}

static const struct file_operations hps_fops = {
	.owner = THIS_MODULE,
	.read = hps_read,
	.write = hps_write,
	.llseek = default_llseek,
};

/*
 * `page_states`: HYP_HOST_PAGE_STATE for every pfn of the host's RAM, as
 * counts (the nothing-leaked check of `s2vmm leakcheck`). The walk covers
 * each online node's span [node_start_pfn, node_end_pfn): the hypervisor's
 * own range is not host RAM and so is not in it. With no VM alive, every
 * frame EL2 calls RAM must be host-owned and unshared: `vm`, `host_shared`
 * and `hyp_host_pages` (frames the host allocated, e.g. a memcache page,
 * that EL2 still owns) must all be 0. One walk at a time; it issues one HVC
 * per pfn (about half a million for 2 GiB), yields every 1024 and stops
 * with -EINTR on a fatal signal, so it is bounded by the node spans.
 */
struct s2pin_page_counts {
	u64 lo, hi;		/* lowest and highest pfn + 1 walked */
	u64 walked;
	u64 host_owned;		/* owner host, state owned, count 0 */
	u64 host_shared;	/* owner host but shared or a share count */
	u64 hyp;		/* owner hyp */
	u64 hyp_host_pages;	/* ... of which the host has a usable struct page */
	u64 vm;			/* owner a VM */
	u64 not_ram;		/* HYP_ERANGE: a hole in the span */
	u64 malformed;		/* any other reply */
};

static DEFINE_MUTEX(page_states_mutex);

static int page_counts_walk(struct s2pin_page_counts *c)
{
	int nid;

	memset(c, 0, sizeof(*c));
	c->lo = ULLONG_MAX;
	for_each_online_node(nid) {
		struct pglist_data *pg = NODE_DATA(nid);
		unsigned long pfn, end;

		if (!pg || !pg->node_spanned_pages)
			continue;
		pfn = pg->node_start_pfn;
		end = pgdat_end_pfn(pg);
		c->lo = min_t(u64, c->lo, pfn);
		c->hi = max_t(u64, c->hi, end);
		for (; pfn < end; pfn++) {
			struct arm_smccc_1_2_regs r = hvc6(HYP_HOST_PAGE_STATE, pfn, 0, 0, 0, 0);

			c->walked++;
			if ((long)r.a0 == HYP_ERANGE) {
				c->not_ram++;
			} else if (r.a0 || r.a1 > HYP_OWNER_VM ||
				   r.a3 > HYP_OWNER_STATE_SHARED_OWNED) {
				c->malformed++;
			} else if (r.a1 == HYP_OWNER_VM) {
				c->vm++;
			} else if (r.a1 == HYP_OWNER_HYP) {
				c->hyp++;
				if (pfn_valid(pfn) && !PageReserved(pfn_to_page(pfn)))
					c->hyp_host_pages++;
			} else if (r.a3 == HYP_OWNER_STATE_OWNED && !r.a4) {
				c->host_owned++;
			} else {
				c->host_shared++;
			}
			if (!(c->walked % 1024)) {
				if (fatal_signal_pending(current))
					return -EINTR;
				cond_resched();
			}
		}
	}
	if (c->lo == ULLONG_MAX)
		c->lo = 0;
	return 0;
}

static int page_states_show(struct seq_file *m, void *unused)
{
	struct s2pin_page_counts c;
	int ret;

	ret = mutex_lock_killable(&page_states_mutex);
	if (ret)
		return ret;
	ret = page_counts_walk(&c);
	mutex_unlock(&page_states_mutex);
	if (ret)
		return ret;
	seq_printf(m, "pfn_lo %#llx\npfn_hi %#llx\nwalked %llu\nhost_owned %llu\n"
		   "host_shared %llu\nhyp %llu\nhyp_host_pages %llu\nvm %llu\nnot_ram %llu\n"
		   "malformed %llu\n",
		   c.lo, c.hi, c.walked, c.host_owned, c.host_shared, c.hyp,
		   c.hyp_host_pages, c.vm, c.not_ram, c.malformed);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(page_states);

int s2pin_shim_init(void)
{
	int ret;

	s2pin_dbg_root = debugfs_create_dir("s2pin", NULL);
	if (IS_ERR(s2pin_dbg_root)) {
		s2pin_dbg_root = NULL;
	} else {
		debugfs_create_file("pinned", 0444, s2pin_dbg_root, NULL, &pinned_fops);
		debugfs_create_file("vms", 0444, s2pin_dbg_root, NULL, &vms_fops);
		debugfs_create_file("last_teardown", 0444, s2pin_dbg_root, NULL,
				    &last_teardown_fops);
		debugfs_create_file("host_page_state", 0600, s2pin_dbg_root, NULL, &hps_fops);
		debugfs_create_file("page_states", 0400, s2pin_dbg_root, NULL, &page_states_fops);
	}
	ret = misc_register(&s2pin_misc);
	if (ret) {
		pr_err("registering /dev/s2pin failed: %d\n", ret);
		debugfs_remove(s2pin_dbg_root);
		s2pin_dbg_root = NULL;
		return ret;
	}
	s2pin_misc_registered = true;
	return 0;
}

void s2pin_shim_exit(void)
{
	if (s2pin_misc_registered)
		misc_deregister(&s2pin_misc);
	/* Open fds hold the module (fops owner): no VM is left here. */
	mmu_notifier_synchronize();
	debugfs_remove(s2pin_dbg_root);
}
