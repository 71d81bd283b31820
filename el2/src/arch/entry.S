/*
 * Boot entry, secondary entry, stage-1 MMU enable and exception vectors,
 * built from the shared macros of baremetal/src/boot.S.
 *
 * Instruction budget: an exception vector slot is 128 bytes (32 instructions),
 * so each slot only makes room for the frame, saves x0/x1, records which slot
 * fired and branches to the shared save code.
 */

.equ FRAME_SIZE, 288          /* 31 GPRs + ELR, SPSR, ESR, FAR, HPFAR (see exception.rs) */
.equ STACK_SIZE, {stack_size} /* layout::STACK_SIZE */
.equ MAX_CPUS, {max_cpus}     /* layout::MAX_CPUS */

/* MAIR_EL2: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL2: RES1 (31, 23), TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA). */
.equ TCR_VALUE, 0x80803519
/* SCTLR_EL2: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30c5183d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (baremetal/src/image_header.S); QEMU loads the
     * image at RAM base + text_offset (boot_contract::HYP_IMAGE_ADDR). */
    arm64_image_header primary_entry, {text_offset}

primary_entry:
    mov     x19, x0              /* DTB */
    zero_bss
    mov     x0, #0
    bl      cpu_setup
    mov     x0, x19
    bl      primary_main
3:  wfe
    b       3b

/* Secondary CPUs arrive here from PSCI CPU_ON with x0 = their CPU index. */
.global secondary_entry
secondary_entry:
    mov     x19, x0
    cmp     x0, #MAX_CPUS
    b.hs    4f
    bl      cpu_setup
    mov     x0, x19
    bl      secondary_main
4:  wfe
    b       4b

/* x0 = CPU index: its stack, the MMU, the vectors. Clobbers x0..x2. */
cpu_setup:
    set_stack STACKS, STACK_SIZE, x0
    mmu_on  el2, BOOT_PT, MAIR_VALUE, TCR_VALUE, SCTLR_VALUE, 16
    set_vbar el2, VECTORS
    ret

.macro vector kind
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       trap_common
.endm

.section .text.vectors, "ax"
.global VECTORS
/* Slots 0-7: el2 itself (fatal); 8-11: the host or a guest (AArch64). */
vector_table VECTORS, vector

/* x0 = vector index; the interrupted x0/x1 are at [sp]. */
trap_common:
    gprs    stp, sp
    mrs     x1, elr_el2
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el2
    mrs     x2, esr_el2
    stp     x1, x2, [sp, #256]
    mrs     x1, far_el2
    mrs     x2, hpfar_el2
    stp     x1, x2, [sp, #272]
    mov     x1, x0
    mov     x0, sp
    bl      handle_trap
    ldp     x30, x1, [sp, #240]
    msr     elr_el2, x1
    ldr     x1, [sp, #256]
    msr     spsr_el2, x1
    gprs    ldp, sp
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #FRAME_SIZE
    eret

/*
 * enter_host(x0 = arg, x1 = entry): drops to the host at EL1h with x0 = arg,
 * x1..x3 = 0, interrupts masked. Never returns.
 */
.section .text, "ax"
.global enter_host
enter_host:
    msr     elr_el2, x1
    mov     x1, #0x3c5           /* EL1h, DAIF masked */
    msr     spsr_el2, x1
    mov     x1, #0
    mov     x2, #0
    mov     x3, #0
    isb
    eret
