/*
 * Guest payload entry: arm64 Image header, stack, .bss, EL1 vectors and the
 * stage-1 MMU (identity map, 1 GiB blocks: the first GiB device, the next
 * 255 normal), then Rust `guest_main(arg)`; other vCPUs (PSCI CPU_ON) enter
 * at `secondary_entry` and run `guest_secondary(index)`.
 *
 * Built from the shared macros of baremetal/src/boot.S. Instruction budget:
 * each vector slot is 2 instructions (slot index, branch).
 */

.equ STACK_SIZE, {stack_size} /* arch::STACK_SIZE */
.equ MAX_VCPUS, {max_vcpus}   /* guest::MAX_VCPUS */
/* MAIR_EL1: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL1: EPD1, TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA), IPS = 40 bits. */
.equ TCR_VALUE, 0x200803519
/* SCTLR_EL1: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30d0180d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (baremetal/src/image_header.S); text_offset =
     * GUEST_IMAGE_IPA - GUEST_RAM_IPA; res4 = this payload's secondary
     * vCPU entry offset. */
    arm64_image_header entry, {text_offset}, (secondary_entry - _start)

entry:
    mov     x19, x0              /* the argument */
    zero_bss
    mov     x0, #0
    bl      cpu_setup
    mov     x0, x19
    bl      guest_main
3:  wfi
    b       3b

/* PSCI CPU_ON entry of the other vCPUs: x0 = vCPU index (< MAX_VCPUS). */
.global secondary_entry
secondary_entry:
    mov     x19, x0
    cmp     x0, #MAX_VCPUS
    b.hs    3b
    bl      cpu_setup
    mov     x0, x19
    bl      guest_secondary
    b       3b

/* Stack of vCPU x0, vectors, MMU on. Clobbers x0..x2. */
cpu_setup:
    set_stack STACK, STACK_SIZE, x0
    set_vbar el1, vectors
    mov     x0, #(3 << 20)       /* CPACR_EL1.FPEN: no FP traps */
    msr     cpacr_el1, x0
    mmu_on  el1, PT, MAIR_VALUE, TCR_VALUE, SCTLR_VALUE
    ret

.macro slot n
    mov     x0, #\n
    b       exception
.endm

vector_table vectors, slot

/* An exception at EL1: report it (Rust) and shut down. */
exception:
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    bl      guest_exception
4:  b       4b
