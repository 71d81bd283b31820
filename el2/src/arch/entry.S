/*
 * Boot entry, secondary entry, stage-1 MMU enable and exception vectors.
 *
 * Instruction budget: an exception vector slot is 128 bytes (32 instructions),
 * so each slot only makes room for the frame, saves x0/x1, records which slot
 * fired and branches to the shared save code.
 */

.equ FRAME_SIZE, 288          /* 31 GPRs + ELR, SPSR, ESR, FAR, HPFAR (see exception.rs) */
.equ STACK_SIZE, 0x10000      /* layout::STACK_SIZE */
.equ MAX_CPUS, 8              /* layout::MAX_CPUS */

/* MAIR_EL2: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL2: RES1 (31, 23), TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA). */
.equ TCR_VALUE, 0x80803519
/* SCTLR_EL2: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30c5183d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (qemu/baremetal/src/image_header.S). */
    arm64_image_header primary_entry, 0x80000

primary_entry:
    mov     x19, x0              /* DTB */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  mov     x0, #0
    bl      set_stack
    bl      enable_mmu
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
    bl      set_stack
    bl      enable_mmu
    mov     x0, x19
    bl      secondary_main
4:  wfe
    b       4b

/* sp = top of CPU x0's stack. Clobbers x1, x2. */
set_stack:
    adrp    x1, STACKS
    add     x1, x1, :lo12:STACKS
    add     x2, x0, #1
    mov     x0, #STACK_SIZE
    madd    x1, x2, x0, x1
    mov     sp, x1
    ret

/* Turns on the EL2 stage-1 MMU with the static identity map BOOT_PT. Clobbers x0, x1. */
enable_mmu:
    adrp    x0, BOOT_PT
    add     x0, x0, :lo12:BOOT_PT
    msr     ttbr0_el2, x0
    ldr     x0, =MAIR_VALUE
    msr     mair_el2, x0
    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #0xf         /* PARange */
    cmp     x1, #5
    mov     x0, #5
    csel    x1, x1, x0, ls       /* at most 48 bits */
    ldr     x0, =TCR_VALUE
    bfi     x0, x1, #16, #3      /* PS */
    msr     tcr_el2, x0
    isb
    tlbi    alle2
    dsb     nsh
    isb
    ldr     x0, =SCTLR_VALUE
    msr     sctlr_el2, x0
    isb
    adrp    x0, VECTORS
    add     x0, x0, :lo12:VECTORS
    msr     vbar_el2, x0
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
    vector 0    /* current EL, SP_EL0: sync */
    vector 1    /*   irq */
    vector 2    /*   fiq */
    vector 3    /*   serror */
    vector 4    /* current EL, SP_ELx: sync */
    vector 5    /*   irq */
    vector 6    /*   fiq */
    vector 7    /*   serror */
    vector 8    /* lower EL, AArch64: sync */
    vector 9    /*   irq */
    vector 10   /*   fiq */
    vector 11   /*   serror */
    vector 12   /* lower EL, AArch32: sync */
    vector 13   /*   irq */
    vector 14   /*   fiq */
    vector 15   /*   serror */

/* x0 = vector index; the interrupted x0/x1 are at [sp]. */
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
