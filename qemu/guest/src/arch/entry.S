/*
 * Guest payload entry: arm64 Image header, stack, .bss, EL1 vectors and the
 * stage-1 MMU (identity map, 1 GiB blocks: the first GiB device, the next
 * 255 normal), then Rust `guest_main(arg)`; other vCPUs (PSCI CPU_ON) enter
 * at `secondary_entry` and run `guest_secondary(index)`.
 *
 * Instruction budget: each vector slot is 2 instructions (slot index, branch).
 */

.equ STACK_SIZE, 0x4000         /* arch::STACK_SIZE */
.equ MAX_VCPUS, 4              /* guest::MAX_VCPUS */
/* MAIR_EL1: attr0 = Device-nGnRE, attr1 = Normal WB RA WA. */
.equ MAIR_VALUE, 0xff04
/* TCR_EL1: EPD1, TG0 = 4K, SH0 = inner, ORGN0/IRGN0 = WB WA, T0SZ = 25 (39-bit VA), IPS = 40 bits. */
.equ TCR_VALUE, 0x200803519
/* SCTLR_EL1: RES1 bits | I | SA | C | M. */
.equ SCTLR_VALUE, 0x30d0180d

.section .text.head, "ax"
.global _start
_start:
    /* arm64 Image header (qemu/baremetal/src/image_header.S); res4 = this
     * payload's secondary vCPU entry offset. */
    arm64_image_header entry, 0x80000, (secondary_entry - _start)

entry:
    mov     x19, x0              /* the argument */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:  mov     x0, #0
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
    adrp    x1, STACK
    add     x1, x1, :lo12:STACK
    add     x2, x0, #1
    mov     x0, #STACK_SIZE
    madd    x1, x2, x0, x1
    mov     sp, x1
    adrp    x0, vectors
    add     x0, x0, :lo12:vectors
    msr     vbar_el1, x0
    mov     x0, #(3 << 20)       /* CPACR_EL1.FPEN: no FP traps */
    msr     cpacr_el1, x0
    adrp    x0, PT
    add     x0, x0, :lo12:PT
    msr     ttbr0_el1, x0
    ldr     x0, =MAIR_VALUE
    msr     mair_el1, x0
    ldr     x0, =TCR_VALUE
    msr     tcr_el1, x0
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x0, =SCTLR_VALUE
    msr     sctlr_el1, x0
    isb
    ret

.macro slot n
    .balign 0x80
    mov     x0, #\n
    b       exception
.endm

.balign 0x800
vectors:
    slot 0
    slot 1
    slot 2
    slot 3
    slot 4
    slot 5
    slot 6
    slot 7
    slot 8
    slot 9
    slot 10
    slot 11
    slot 12
    slot 13
    slot 14
    slot 15

/* An exception at EL1: report it (Rust) and shut down. */
exception:
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    bl      guest_exception
4:  b       4b
