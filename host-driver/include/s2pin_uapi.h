/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * GENERATED FILE - DO NOT EDIT.
 *
 * The user-space ABI of /dev/s2pin (ioctl numbers, structures, exit
 * reasons), generated from the s2pin-uapi crate (host-driver/uapi).
 * Regenerate with: cargo xtask gen-header
 */
#ifndef S2PIN_UAPI_H
#define S2PIN_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* Version and limits */
#define S2PIN_API_VERSION 1 /* S2PIN_GET_API_VERSION returns it */
#define S2PIN_IOCTL_TYPE 0xBEU /* ioctl type byte (0xBE) */
#define S2PIN_MAX_MEMSLOTS 32 /* slot ids 0..S2PIN_MAX_MEMSLOTS-1 */
#define S2PIN_MAX_VCPUS 64 /* vCPU indices 0..S2PIN_MAX_VCPUS-1 */
#define S2PIN_PAGE_SIZE 4096 /* alignment of regions and the RAM window */
#define S2PIN_MIN_IPA_BITS 32 /* smallest ipa_bits */
#define S2PIN_MAX_IPA_BITS 48 /* largest ipa_bits */
#define S2PIN_DEFAULT_IPA_BITS 40 /* ipa_bits 0 means this */
#define S2PIN_CONSOLE_MAX 16 /* bytes per console exit */
#define S2PIN_STATS_COUNT 51 /* u64 counters in struct s2pin_vm_stats */

/* Flags */
#define S2PIN_MEM_READONLY 2 /* s2pin_userspace_memory_region.flags */
#define S2PIN_VCPU_START_OFF 1 /* s2pin_create_vcpu.flags */

/* MMU-notifier policies (s2pin_create_vm.policy) */
#define S2PIN_POLICY_CONFIRM 0 /* confirm */
#define S2PIN_POLICY_EAGER 1 /* eager */
#define S2PIN_POLICY_KEEP 2 /* keep */

/* Exit reasons (s2pin_run.exit_reason) */
#define S2PIN_EXIT_NONE 0 /* no exit yet */
#define S2PIN_EXIT_MMIO 1 /* run->mmio: emulate; a read's value goes in mmio.data */
#define S2PIN_EXIT_CONSOLE 2 /* run->console: print */
#define S2PIN_EXIT_MEM_FAULT 3 /* run->mem_fault: no slot / read-only slot / host forbids */
#define S2PIN_EXIT_SYSTEM_EVENT 4 /* run->system_event: the guest stopped */
#define S2PIN_EXIT_UNHANDLED_TRAP 5 /* run->unhandled: the vCPU cannot go on */
#define S2PIN_EXIT_SHARE_REQUEST 6 /* run->range: guest share request */
#define S2PIN_EXIT_UNSHARE_REQUEST 7 /* run->range: guest unshare request */
#define S2PIN_EXIT_INTR 8 /* RUN failed with EINTR */
#define S2PIN_EXIT_PENDING_WORK 9 /* task work ran on the way out; call RUN again */

/* Memory faults (s2pin_run.mem_fault) */
#define S2PIN_ACCESS_READ 0 /* access: data read */
#define S2PIN_ACCESS_WRITE 1 /* access: data write */
#define S2PIN_ACCESS_EXEC 2 /* access: instruction fetch */
#define S2PIN_FAULT_NO_SLOT 0 /* kind: no slot covers gpa */
#define S2PIN_FAULT_READONLY_SLOT 1 /* kind: write to a read-only slot */
#define S2PIN_FAULT_HOST_DENIED 2 /* kind: the host mapping forbids it (error = -errno) */

/* System events (s2pin_run.system_event.type) */
#define S2PIN_SYSTEM_EVENT_SHUTDOWN 1 /* HYP_GUEST_SHUTDOWN */
#define S2PIN_SYSTEM_EVENT_SYSTEM_OFF 2 /* PSCI SYSTEM_OFF */
#define S2PIN_SYSTEM_EVENT_SYSTEM_RESET 3 /* PSCI SYSTEM_RESET */

/* S2PIN_CREATE_VM argument. */
struct s2pin_create_vm {
	__u32 ipa_bits;   /* 32..48, 0 = S2PIN_DEFAULT_IPA_BITS */
	__u32 policy;     /* S2PIN_POLICY_* */
	__u64 flags;      /* 0 */
	__u64 mem_base;   /* guest RAM window [mem_base, mem_base + mem_size) */
	__u64 mem_size;
};

/* S2PIN_SET_USER_MEMORY_REGION argument (KVM's shape). */
struct s2pin_userspace_memory_region {
	__u32 slot;            /* 0..S2PIN_MAX_MEMSLOTS-1 */
	__u32 flags;           /* S2PIN_MEM_READONLY */
	__u64 guest_phys_addr;
	__u64 memory_size;     /* bytes; 0 deletes the slot */
	__u64 userspace_addr;
};

/* S2PIN_CREATE_VCPU argument. */
struct s2pin_create_vcpu {
	__u32 index;
	__u32 flags;  /* S2PIN_VCPU_START_OFF */
	__u64 entry;  /* entry IPA */
	__u64 x0;     /* guest x0 at entry */
};

struct s2pin_run_mmio {
	__u64 phys_addr;
	__u64 data;      /* a write's data; user space stores a read's value */
	__u32 len;       /* 1, 2, 4, 8 */
	__u8 is_write;
	__u8 pad[3];
};

struct s2pin_run_console {
	__u32 len;
	__u32 pad;
	__u8 bytes[S2PIN_CONSOLE_MAX];
};

struct s2pin_run_mem_fault {
	__u64 gpa;
	__u32 access;  /* S2PIN_ACCESS_* */
	__u32 kind;    /* S2PIN_FAULT_* */
	__s32 error;   /* S2PIN_FAULT_HOST_DENIED: -errno of the pin */
	__u32 pad;
};

struct s2pin_run_system_event {
	__u32 type;    /* S2PIN_SYSTEM_EVENT_* */
	__u32 pad;
};

struct s2pin_run_unhandled {
	__u64 esr;
	__u64 far;
};

struct s2pin_run_range {
	__u64 gfn;
	__u64 nr;
};

/* The page a vCPU fd maps (KVM's struct kvm_run in spirit). */
struct s2pin_run {
	__u8 immediate_exit;
	__u8 pad0[7];
	__u32 exit_reason;  /* S2PIN_EXIT_* */
	__u32 pad1;
	union {
		struct s2pin_run_mmio mmio;
		struct s2pin_run_console console;
		struct s2pin_run_mem_fault mem_fault;
		struct s2pin_run_system_event system_event;
		struct s2pin_run_unhandled unhandled;
		struct s2pin_run_range range;  /* SHARE_REQUEST, UNSHARE_REQUEST */
		__u64 words[8];
	};
};

/* S2PIN_GET_STATS argument: every counter of one VM. */
struct s2pin_vm_stats {
	__u64 pinned_now; /*  pages pinned now (gauge; also accounted in the creator's locked_vm) */
	__u64 pins; /*  pages pinned (pin_user_pages) since creation */
	__u64 unpins; /*  pages unpinned since creation */
	__u64 faults; /*  stage-2 memory faults served by pinning and sharing a page */
	__u64 fault_retries; /*  faults retried because an invalidation raced with them */
	__u64 permission_faults; /*  write faults on write-protected pages served again */
	__u64 user_faults; /*  memory faults handed to user space (no slot, read-only, host denied) */
	__u64 shares; /*  pages shared with the guest (HYP_SHARE) */
	__u64 unshares; /*  pages unshared from the guest (HYP_UNSHARE) */
	__u64 wrprotects; /*  pages write-protected at EL2 (HYP_WRPROTECT) */
	__u64 range_start_unmap; /*  invalidate_range_start calls, event MMU_NOTIFY_UNMAP */
	__u64 range_start_clear; /*  invalidate_range_start calls, event MMU_NOTIFY_CLEAR */
	__u64 range_start_protection_vma; /*  invalidate_range_start calls, event MMU_NOTIFY_PROTECTION_VMA */
	__u64 range_start_protection_page; /*  invalidate_range_start calls, event MMU_NOTIFY_PROTECTION_PAGE */
	__u64 range_start_soft_dirty; /*  invalidate_range_start calls, event MMU_NOTIFY_SOFT_DIRTY */
	__u64 range_start_release; /*  invalidate_range_start calls, event MMU_NOTIFY_RELEASE */
	__u64 range_start_migrate; /*  invalidate_range_start calls, event MMU_NOTIFY_MIGRATE */
	__u64 range_start_exclusive; /*  invalidate_range_start calls, event MMU_NOTIFY_EXCLUSIVE */
	__u64 range_end; /*  invalidate_range_end calls (all events) */
	__u64 unmapped_invalidate; /*  pages unmapped at range_start because the event can change the frame */
	__u64 unmapped_eager; /*  pages unmapped at range_start for a protection event (eager policy) */
	__u64 unmapped_protnone; /*  pages unmapped at range_end because their PTE/PMD became PROT_NONE */
	__u64 unmapped_changed; /*  pages unmapped at range_end because their frame changed or vanished */
	__u64 unmapped_memslot; /*  pages unmapped because their slot was deleted */
	__u64 unmapped_teardown; /*  pages unmapped by teardown */
	__u64 wrprotected_lost_write; /*  pages write-protected at range_end because they lost write permission */
	__u64 kept; /*  pinned pages a protection event covered that stayed mapped (avoided unmaps) */
	__u64 mmio_exits; /*  MMIO exits to user space */
	__u64 console_exits; /*  console exits to user space */
	__u64 blocks_shared; /*  2 MiB blocks shared (one HYP_SHARE of 512 pages; pages counted in shares too) */
	__u64 block_unshares; /*  whole 2 MiB blocks unshared in one call (notifier, slot deletion, write upgrade) */
	__u64 block_splits; /*  blocks split by a call that changed part of them (one memcache page each) */
	__u64 block_fallbacks; /*  blocks unshared whole because a split had no memcache page or the host entries differed */
	__u64 el2_s2_maps; /*  EL2 group 0: pages mapped in the VM's stage 2 */
	__u64 el2_s2_unmaps; /*  EL2 group 0: pages unmapped */
	__u64 el2_s2_tlbi; /*  EL2 group 0: TLB invalidations for the VM's VMID */
	__u64 el2_s2_shares; /*  EL2 group 0: pages shared */
	__u64 el2_s2_unshares; /*  EL2 group 0: pages unshared */
	__u64 el2_s2_donations; /*  EL2 group 0: pages donated */
	__u64 el2_s2_reclaims; /*  EL2 group 0: pages reclaimed */
	__u64 el2_rt_faults; /*  EL2 group 1: stage-2 faults taken */
	__u64 el2_rt_vcpu_runs; /*  EL2 group 1: successful HYP_VCPU_RUN calls */
	__u64 el2_rt_memcache_pages; /*  EL2 group 1: free memcache pages now (gauge) */
	__u64 el2_rt_table_pages; /*  EL2 group 1: stage-2 table pages in use now (gauge) */
	__u64 el2_rt_host_exits; /*  EL2 group 1: exits returned to the host */
	__u64 el2_rt_hyp_exits; /*  EL2 group 1: exits the hypervisor answered itself */
	__u64 el2_rt_irq_exits; /*  EL2 group 1: runs ended by a physical interrupt */
	__u64 calls_share; /*  HYP_SHARE calls made for this VM */
	__u64 calls_unshare; /*  HYP_UNSHARE and HYP_UNSHARE_RANGE calls made for this VM */
	__u64 calls_wrprotect; /*  HYP_WRPROTECT calls made for this VM */
	__u64 calls_other; /*  every other hypercall made for this VM (teardown's too), except HYP_VCPU_RUN and HYP_VM_COUNTERS */
};

/* ioctls (arm64 Linux _IOC encoding; values checked against <linux/ioctl.h>) */
#define S2PIN_GET_API_VERSION 0xBE00U /* _IO(0xBE, 0x00) */
#define S2PIN_CREATE_VM 0x4020BE01U /* _IOW(0xBE, 0x01, struct s2pin_create_vm) */
#define S2PIN_GET_VCPU_MMAP_SIZE 0xBE02U /* _IO(0xBE, 0x02) */
#define S2PIN_SET_USER_MEMORY_REGION 0x4020BE10U /* _IOW(0xBE, 0x10, struct s2pin_userspace_memory_region) */
#define S2PIN_CREATE_VCPU 0x4018BE11U /* _IOW(0xBE, 0x11, struct s2pin_create_vcpu) */
#define S2PIN_GET_STATS 0x8198BE12U /* _IOR(0xBE, 0x12, struct s2pin_vm_stats) */
#define S2PIN_RUN 0xBE20U /* _IO(0xBE, 0x20) */

#endif /* S2PIN_UAPI_H */
