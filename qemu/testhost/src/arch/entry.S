/*
 * Boot entry (boot CPU and PSCI CPU_ON secondaries), the EL1 stage-1 MMU
 * switch-on and the EL1 exception vectors of the conformance test host.
 *
 * Instruction budget: each vector slot is 32 instructions; a slot only makes
 * the frame, saves x0/x1, records its index and branches to shared code.
 * Rust never runs with the MMU off: `cpu_setup` enables it first.
 */

.equ FRAME_SIZE, 272          /* x0..x30, ELR_EL1, SPSR_EL1, pad (see arch/mod.rs Frame) */
.equ STACK_SIZE, 0x8000       /* arch::STACK_SIZE */
.equ MAX_CPUS, 8              /* arch::MAX_CPUS */

/* MAIR_EL1: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL1: EPD1, TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA). */
.equ TCR_VALUE, 0x803519
/* SCTLR_EL1: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30d0180d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (qemu/baremetal/src/image_header.S): el2 checks the magic. */
    arm64_image_header primary_entry, 0

primary_entry:
    mov     x20, x0              /* DTB */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  mov     x19, #0
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
    adrp    x1, STACKS
    add     x1, x1, :lo12:STACKS
    add     x2, x19, #1
    mov     x0, #STACK_SIZE
    madd    x1, x2, x0, x1
    mov     sp, x1
    msr     tpidr_el1, x19
    adrp    x0, BOOT_PT
    add     x0, x0, :lo12:BOOT_PT
    msr     ttbr0_el1, x0
    ldr     x0, =MAIR_VALUE
    msr     mair_el1, x0
    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #0xf         /* PARange */
    cmp     x1, #5
    mov     x0, #5
    csel    x1, x1, x0, ls       /* at most 48 bits */
    ldr     x0, =TCR_VALUE
    bfi     x0, x1, #32, #3      /* IPS */
    msr     tcr_el1, x0
    adrp    x0, VECTORS
    add     x0, x0, :lo12:VECTORS
    msr     vbar_el1, x0
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x0, =SCTLR_VALUE
    msr     sctlr_el1, x0
    isb
    ret

.macro vector kind
    .balign 0x80
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       trap_common
.endm

.section .text.vectors, "ax"
.balign 0x800
.global VECTORS
VECTORS:
    vector 0
    vector 1
    vector 2
    vector 3
    vector 4    /* current EL, SP_ELx: sync (the injected external abort) */
    vector 5
    vector 6
    vector 7
    vector 8
    vector 9
    vector 10
    vector 11
    vector 12
    vector 13
    vector 14
    vector 15

trap_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
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
    ldp     x28, x29, [sp, #224]
    ldp     x26, x27, [sp, #208]
    ldp     x24, x25, [sp, #192]
    ldp     x22, x23, [sp, #176]
    ldp     x20, x21, [sp, #160]
    ldp     x18, x19, [sp, #144]
    ldp     x16, x17, [sp, #128]
    ldp     x14, x15, [sp, #112]
    ldp     x12, x13, [sp, #96]
    ldp     x10, x11, [sp, #80]
    ldp     x8, x9, [sp, #64]
    ldp     x6, x7, [sp, #48]
    ldp     x4, x5, [sp, #32]
    ldp     x2, x3, [sp, #16]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #FRAME_SIZE
    eret
