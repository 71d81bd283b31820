/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * GENERATED FILE - DO NOT EDIT.
 *
 * Generated from the Rust crate `hypercalls` (hypercalls/src), the single
 * source of the hypervisor's hypercall ABI. Regenerate with:
 *     cargo xtask gen-header
 * The contract is described in docs/ABI.md.
 *
 * Calling convention: HVC #0, SMCCC 64-bit fast calls. x0 = function id,
 * arguments in x1..x7; on return x0 = HYP_SUCCESS or a negative HYP_E* code,
 * results in x1..x7 (zero when unused). Unused argument registers and
 * reserved bits must be zero (else HYP_EINVAL).
 */

#ifndef HYP_ABI_H
#define HYP_ABI_H

/* ABI version (HYP_VERSION returns it) */
#define HYP_ABI_VERSION_MAJOR                   0 /* incompatible changes */
#define HYP_ABI_VERSION_MINOR                   3 /* compatible additions */

/* SMCCC function id layout (ABI.md 2.1) */
#define HYP_SMCCC_FN_BASE                       0xC6000000U /* fast call, SMC64, owner 6 (vendor hyp) */
#define HYP_SMCCC_FN_MASK                       0x0000FFFFU /* function number, bits 15:0 */
#define HYP_SMCCC_SVE_HINT                      0x00010000U /* SMCCC 1.3 SVE hint: ignored */

/* Host calls: HVC #0, id in x0 (ABI.md 3) */
#define HYP_VERSION                             0xC6000000U /* -> x1=major x2=minor */
#define HYP_FEATURES                            0xC6000001U /* x1=function_id -> x1=supported(0|1) */
#define HYP_MEMCACHE_TOPUP                      0xC6000010U /* x1=vm x2=pfn x3=nr_pages -> */
#define HYP_MEMCACHE_RECLAIM                    0xC6000011U /* x1=vm -> x1=count x2..x7=pfns */
#define HYP_VM_CREATE                           0xC6000020U /* x1=ipa_bits x2=nr_vcpus x3=root_pfn x4=mem_gfn x5=mem_pages -> x1=vm */
#define HYP_VCPU_CREATE                         0xC6000021U /* x1=vm x2=vcpu x3=entry_ipa x4=entry_x0 x5=flags -> */
#define HYP_VCPU_RUN                            0xC6000022U /* x1=vm x2=vcpu x3=mmio_read_data -> x1=exit_reason x2..x5=exit_info */
#define HYP_SHARE                               0xC6000030U /* x1=vm x2=pfn x3=gfn x4=nr_pages x5=prot -> */
#define HYP_UNSHARE                             0xC6000031U /* x1=vm x2=pfn x3=gfn x4=nr_pages -> */
#define HYP_DONATE                              0xC6000032U /* x1=vm x2=pfn x3=gfn x4=nr_pages x5=prot -> */
#define HYP_RECLAIM                             0xC6000033U /* x1=vm x2=pfn x3=gfn x4=nr_pages -> */
#define HYP_UNSHARE_RANGE                       0xC6000034U /* x1=vm x2=gfn x3=nr_pages -> x1=pages_unshared */
#define HYP_WRPROTECT                           0xC6000040U /* x1=vm x2=gfn x3=nr_pages -> x1=pages_changed */
#define HYP_RELAX_PERMS                         0xC6000041U /* x1=vm x2=gfn x3=prot -> */
#define HYP_TEST_CLEAR_YOUNG                    0xC6000042U /* x1=vm x2=gfn x3=nr_pages -> x1=young(0|1) */
#define HYP_TEARDOWN_START                      0xC6000050U /* x1=vm -> */
#define HYP_TEARDOWN_RECLAIM                    0xC6000051U /* x1=vm -> x1=reclaimed x2=more(0|1) */
#define HYP_TEARDOWN_FINALIZE                   0xC6000052U /* x1=vm -> */
#define HYP_VM_COUNTERS                         0xC6000060U /* x1=vm x2=group -> x1..x7=counters */
#define HYP_HOST_PAGE_STATE                     0xC6000070U /* x1=pfn -> x1=owner_kind x2=owner_vm x3=owner_state x4=share_count */
#define HYP_GUEST_PAGE_STATE                    0xC6000071U /* x1=vm x2=gfn -> x1=state x2=pfn x3=prot */

/* Guest calls: HVC #0 from a guest, provisional (ABI.md 4) */
#define HYP_GUEST_VERSION                       0xC6000100U /* -> x1=major x2=minor */
#define HYP_GUEST_CONSOLE_WRITE                 0xC6000101U /* x1=len x2..x3=bytes -> */
#define HYP_GUEST_SHARE_REQUEST                 0xC6000102U /* x1=gfn x2=nr_pages -> */
#define HYP_GUEST_UNSHARE_REQUEST               0xC6000103U /* x1=gfn x2=nr_pages -> */
#define HYP_GUEST_SHUTDOWN                      0xC6000104U /* -> */

/* Return codes in x0 (ABI.md 2.4) */
#define HYP_SUCCESS                             0 /* success */
#define HYP_NOT_SUPPORTED                       (-1) /* unknown or unimplemented function id */
#define HYP_ENOENT                              (-2) /* no such VM, vCPU or mapping (or a stale VM handle) */
#define HYP_E2BIG                               (-7) /* page count above the per-call maximum */
#define HYP_ENOMEM                              (-12) /* memcache too small: top up and retry */
#define HYP_EACCES                              (-13) /* page state forbids this transition */
#define HYP_EBUSY                               (-16) /* VM in the wrong lifecycle state, or a vCPU is running */
#define HYP_EEXIST                              (-17) /* already exists or already mapped */
#define HYP_EINVAL                              (-22) /* malformed argument or reserved bits set */
#define HYP_ENOSPC                              (-28) /* no free VM slot */
#define HYP_ERANGE                              (-34) /* not RAM, beyond the IPA space or vCPU count, or overflow */

/* Limits (ABI.md 2.3) */
#define HYP_PAGE_SHIFT                          12 /* 4 KiB pages */
#define HYP_PFN_BITS                            40 /* pfn and gfn registers: higher bits reserved */
#define HYP_PFN_MASK                            0xFFFFFFFFFFULL /* largest pfn or gfn */
#define HYP_MAX_PAGES_PER_CALL                  512 /* nr_pages maximum (else HYP_E2BIG) */
#define HYP_TEARDOWN_BATCH                      512 /* page updates per HYP_TEARDOWN_RECLAIM (a 2 MiB block: 512) */
#define HYP_MEMCACHE_RECLAIM_MAX                6 /* pfns per HYP_MEMCACHE_RECLAIM */
#define HYP_MAX_VCPUS                           64 /* vCPUs per VM */
#define HYP_MIN_IPA_BITS                        32 /* smallest IPA size */
#define HYP_MAX_IPA_BITS                        48 /* largest IPA size */
#define HYP_MAX_ROOT_TABLE_PAGES                16 /* see HYP_ROOT_TABLE_PAGES() */
#define HYP_CONSOLE_MAX_BYTES                   16 /* bytes per console write */

/* VM handles: slot index in 15:0, generation (never 0) in 31:16 (ABI.md 2.2) */
#define HYP_VM_HANDLE_INDEX_MASK                0x0000FFFFU /* slot index */
#define HYP_VM_HANDLE_GEN_SHIFT                 16 /* generation */

/* Stage-2 permissions (prot arguments) */
#define HYP_PROT_R                              1 /* read */
#define HYP_PROT_W                              2 /* write */
#define HYP_PROT_X                              4 /* execute */

/* HYP_VCPU_RUN exit reasons in x1 (ABI.md 5) */
#define HYP_EXIT_INTERRUPTED                    0 /* no info; run again */
#define HYP_EXIT_MEM_FAULT                      1 /* x2=gfn x3=access (HYP_ACCESS_*) x4=kind (HYP_FAULT_*) */
#define HYP_EXIT_CONSOLE                        2 /* x2=len (1..16) x3=bytes 0..7 x4=bytes 8..15 (little-endian) */
#define HYP_EXIT_SHARE_REQUEST                  3 /* x2=gfn x3=nr_pages */
#define HYP_EXIT_UNSHARE_REQUEST                4 /* x2=gfn x3=nr_pages */
#define HYP_EXIT_SHUTDOWN                       5 /* no info */
#define HYP_EXIT_UNHANDLED_TRAP                 6 /* x2=ESR_EL2 x3=FAR_EL2 */
#define HYP_EXIT_MMIO                           7 /* x2=IPA x3=size (1,2,4,8) x4=write (0|1) x5=data written (0 for a read) */
#define HYP_EXIT_WFX                            8 /* x2=wfe (0 WFI, 1 WFE); run again */
#define HYP_EXIT_SYSTEM_OFF                     9 /* x2=reset (0 SYSTEM_OFF, 1 SYSTEM_RESET) */
#define HYP_EXIT_POWERED_OFF                    10 /* no info; run again after a guest PSCI CPU_ON */
#define HYP_ACCESS_READ                         0 /* HYP_EXIT_MEM_FAULT x3: data read */
#define HYP_ACCESS_WRITE                        1 /* HYP_EXIT_MEM_FAULT x3: data write */
#define HYP_ACCESS_EXEC                         2 /* HYP_EXIT_MEM_FAULT x3: instruction fetch */
#define HYP_FAULT_UNMAPPED                      0 /* HYP_EXIT_MEM_FAULT x4: nothing mapped at gfn */
#define HYP_FAULT_PERMISSION                    1 /* HYP_EXIT_MEM_FAULT x4: mapped without the needed permission */

/* HYP_VCPU_CREATE start flags (x5, ABI.md 3.6) */
#define HYP_VCPU_START_OFF                      1 /* powered off until a guest PSCI CPU_ON; x3, x4 zero */

/* HYP_VM_COUNTERS groups (x2) and the register of each counter (ABI.md 3.18) */
#define HYP_COUNTERS_STAGE2                     0 /* group 0 */
#define HYP_CTR_S2_MAPS                         1 /* group 0 x1: pages mapped */
#define HYP_CTR_S2_UNMAPS                       2 /* group 0 x2: pages unmapped */
#define HYP_CTR_S2_TLBI                         3 /* group 0 x3: TLBI operations */
#define HYP_CTR_S2_SHARES                       4 /* group 0 x4: pages shared */
#define HYP_CTR_S2_UNSHARES                     5 /* group 0 x5: pages unshared */
#define HYP_CTR_S2_DONATIONS                    6 /* group 0 x6: pages donated */
#define HYP_CTR_S2_RECLAIMS                     7 /* group 0 x7: pages reclaimed */
#define HYP_COUNTERS_RUNTIME                    1 /* group 1 */
#define HYP_CTR_RT_FAULTS                       1 /* group 1 x1: stage-2 faults */
#define HYP_CTR_RT_VCPU_RUNS                    2 /* group 1 x2: guest entries */
#define HYP_CTR_RT_MEMCACHE_PAGES               3 /* group 1 x3: free memcache pages (gauge) */
#define HYP_CTR_RT_TABLE_PAGES                  4 /* group 1 x4: stage-2 table pages (gauge) */
#define HYP_CTR_RT_HOST_EXITS                   5 /* group 1 x5: exits returned to the host */
#define HYP_CTR_RT_HYP_EXITS                    6 /* group 1 x6: exits answered by the hypervisor */
#define HYP_CTR_RT_IRQ_EXITS                    7 /* group 1 x7: runs ended by a physical interrupt */

/* Page-state queries (ABI.md 2.5, 3.19, 3.20) */
#define HYP_OWNER_HOST                          0 /* HYP_HOST_PAGE_STATE x1 */
#define HYP_OWNER_HYP                           1 /* HYP_HOST_PAGE_STATE x1 */
#define HYP_OWNER_VM                            2 /* HYP_HOST_PAGE_STATE x1 (x2 = VM handle) */
#define HYP_OWNER_STATE_OWNED                   0 /* HYP_HOST_PAGE_STATE x3 */
#define HYP_OWNER_STATE_SHARED_OWNED            1 /* HYP_HOST_PAGE_STATE x3 */
#define HYP_PAGE_NONE                           0 /* HYP_GUEST_PAGE_STATE x1: unmapped */
#define HYP_PAGE_OWNED                          1 /* HYP_GUEST_PAGE_STATE x1 */
#define HYP_PAGE_SHARED_OWNED                   2 /* HYP_GUEST_PAGE_STATE x1 */
#define HYP_PAGE_SHARED_BORROWED                3 /* HYP_GUEST_PAGE_STATE x1 */

/* Helpers */
/* build a VM handle */
#define HYP_VM_HANDLE(index, gen) ((((unsigned int)(gen)) << HYP_VM_HANDLE_GEN_SHIFT) | ((unsigned int)(index) & HYP_VM_HANDLE_INDEX_MASK))
/* stage-2 levels for an IPA size (4 KiB granule) */
#define HYP_STAGE2_LEVELS(ipa_bits) (((ipa_bits) - 8) / 9)
/* root pages HYP_VM_CREATE takes (and the alignment of x3) */
#define HYP_ROOT_TABLE_PAGES(ipa_bits) (((ipa_bits) - 12 - 9 * (HYP_STAGE2_LEVELS(ipa_bits) - 1)) > 9 ? (1U << ((ipa_bits) - 21 - 9 * (HYP_STAGE2_LEVELS(ipa_bits) - 1))) : 1U)

#endif /* HYP_ABI_H */
