/*
 * Boot and exception-entry macros shared by el2 (EL2), the test host (EL1)
 * and the guest payload (EL1 of a VM). Each program's `arch/mod.rs` puts
 * this file, with image_header.S, in front of its `entry.S` in one
 * `global_asm!`.
 *
 *   zero_bss                         clear [__bss_start, __bss_end)
 *   set_stack stacks, size, index    sp = stacks + (index + 1) * size
 *   mmu_on el, table, mair, tcr, sctlr[, pa_shift]
 *                                    identity map on at `el` (el1 or el2)
 *   set_vbar el, vectors             VBAR_ELx = vectors
 *   vector_table name, slot          16 slots of 128 bytes, slot n = `slot n`
 *   gprs op, base                    `op` (stp/ldp) x2..x29 at [base, #8 * n]
 *
 * Each says which registers it clobbers. No local labels leak out (\@).
 */

/* Clears .bss (16-byte aligned bounds from the linker script). Clobbers x1, x2. */
.macro zero_bss
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
.Lzero_bss_loop\@:
    cmp     x1, x2
    b.hs    .Lzero_bss_done\@
    stp     xzr, xzr, [x1], #16
    b       .Lzero_bss_loop\@
.Lzero_bss_done\@:
.endm

/*
 * sp = the top of stack `index` in the array `stacks` of `size`-byte
 * stacks. `index` is a register (it may be x0). Clobbers x0..x2.
 */
.macro set_stack stacks, size, index
    adrp    x1, \stacks
    add     x1, x1, :lo12:\stacks
    add     x2, \index, #1
    mov     x0, #\size
    madd    x1, x2, x0, x1
    mov     sp, x1
.endm

/*
 * Turns on the stage-1 MMU of `el` (el1 or el2) with the identity map
 * `table` in TTBR0, then the caches (SCTLR = `sctlr`). With `pa_shift`, the
 * 3-bit physical-size field of TCR at that bit (PS at 16 for EL2, IPS at 32
 * for EL1) is set from ID_AA64MMFR0_EL1.PARange, at most 48 bits; without
 * it, `tcr` is written as given. Clobbers x0, x1.
 */
.macro mmu_on el, table, mair, tcr, sctlr, pa_shift=-1
    adrp    x0, \table
    add     x0, x0, :lo12:\table
    msr     ttbr0_\el, x0
    ldr     x0, =\mair
    msr     mair_\el, x0
    .if \pa_shift >= 0
    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #0xf         /* PARange */
    cmp     x1, #5
    mov     x0, #5
    csel    x1, x1, x0, ls       /* at most 48 bits */
    ldr     x0, =\tcr
    bfi     x0, x1, #\pa_shift, #3
    .else
    ldr     x0, =\tcr
    .endif
    msr     tcr_\el, x0
    isb
    .ifc \el, el2
    tlbi    alle2
    .else
    tlbi    vmalle1
    .endif
    dsb     nsh
    isb
    ldr     x0, =\sctlr
    msr     sctlr_\el, x0
    isb
.endm

/* VBAR of `el` = `vectors`. Clobbers x0. */
.macro set_vbar el, vectors
    adrp    x0, \vectors
    add     x0, x0, :lo12:\vectors
    msr     vbar_\el, x0
    isb
.endm

/*
 * An exception vector table at label `name` (2 KiB aligned, in the current
 * section): 16 slots of 128 bytes (32 instructions), slot n expanding the
 * macro `slot` with argument n. Slots 0-3: current EL with SP_EL0 (sync,
 * IRQ, FIQ, SError); 4-7: current EL with SP_ELx; 8-11: lower EL, AArch64;
 * 12-15: lower EL, AArch32.
 */
.macro vector_table name, slot
    .balign 0x800
\name:
    .irp n, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    .balign 0x80
    \slot \n
    .endr
.endm

/*
 * `op` (stp or ldp) of x2..x29 in pairs, xN at [base, #8 * N]: the frame
 * layout of el2's trap frame and vCPU context and of the test host's frame.
 * x0, x1 and x30 are the caller's (they differ by program).
 */
.macro gprs op, base
    \op     x2, x3, [\base, #16]
    \op     x4, x5, [\base, #32]
    \op     x6, x7, [\base, #48]
    \op     x8, x9, [\base, #64]
    \op     x10, x11, [\base, #80]
    \op     x12, x13, [\base, #96]
    \op     x14, x15, [\base, #112]
    \op     x16, x17, [\base, #128]
    \op     x18, x19, [\base, #144]
    \op     x20, x21, [\base, #160]
    \op     x22, x23, [\base, #176]
    \op     x24, x25, [\base, #192]
    \op     x26, x27, [\base, #208]
    \op     x28, x29, [\base, #224]
.endm
