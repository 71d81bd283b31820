/*
 * Boot entry (boot CPU and PSCI CPU_ON secondaries), the EL1 stage-1 MMU
 * switch-on and the EL1 exception vectors of the conformance test host,
 * built from the shared macros of baremetal/src/boot.S.
 *
 * Instruction budget: each vector slot is 32 instructions; a slot only makes
 * the frame, saves x0/x1, records its index and branches to shared code.
 * Rust never runs with the MMU off: `cpu_setup` enables it first.
 */

.equ FRAME_SIZE, 272          /* x0..x30, ELR_EL1, SPSR_EL1, pad (see arch/mod.rs Frame) */
.equ STACK_SIZE, {stack_size} /* arch::STACK_SIZE */
.equ MAX_CPUS, {max_cpus}     /* arch::MAX_CPUS */

/* MAIR_EL1: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL1: EPD1, TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA). */
.equ TCR_VALUE, 0x803519
/* SCTLR_EL1: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30d0180d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (baremetal/src/image_header.S): el2 checks the magic. */
    arm64_image_header primary_entry, 0

primary_entry:
    mov     x20, x0              /* DTB */
    zero_bss
    mov     x19, #0
    bl      cpu_setup
    mov     x0, x20
    bl      primary_main
3:  wfe
    b       3b

/* PSCI CPU_ON entry: x0 = CPU index (the context_id we passed). */
.global secondary_entry
secondary_entry:
    mov     x19, x0
    cmp     x19, #MAX_CPUS
    b.hs    5f
    bl      cpu_setup
    mov     x0, x19
    bl      secondary_main
5:  wfe
    b       5b

/* x19 = CPU index: stack, TPIDR_EL1, MMU, vectors. Clobbers x0..x2. */
cpu_setup:
    set_stack STACKS, STACK_SIZE, x19
    msr     tpidr_el1, x19
    mmu_on  el1, BOOT_PT, MAIR_VALUE, TCR_VALUE, SCTLR_VALUE, 32
    set_vbar el1, VECTORS
    ret

.macro vector kind
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       trap_common
.endm

.section .text.vectors, "ax"
.global VECTORS
/* Slot 4 (current EL, SP_ELx, sync) takes the injected external abort. */
vector_table VECTORS, vector

trap_common:
    gprs    stp, sp
    mrs     x1, elr_el1
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el1
    str     x1, [sp, #256]
    mov     x1, x0
    mov     x0, sp
    bl      handle_exception
    ldp     x30, x1, [sp, #240]
    msr     elr_el1, x1
    ldr     x1, [sp, #256]
    msr     spsr_el1, x1
    gprs    ldp, sp
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #FRAME_SIZE
    eret
