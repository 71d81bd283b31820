/*
 * memcpy and memset for el2, replacing the generic (weak) ones of
 * compiler_builtins, which move 8 bytes per 3-4 instructions: zeroing a
 * stage-2 table page took about 1,500 instructions, a 64-byte register
 * copy about 50 (docs/PERFORMANCE.md, "Hypercall round trips").
 *
 * General-purpose registers only: EL2 is built soft-float, and a guest's
 * (or the host's) V registers may be live in the CPU while EL2 runs (the
 * guest-exit fast path). Unaligned addresses are fine: EL2 maps RAM as
 * Normal memory with alignment checks off (SCTLR_EL2.A = 0); neither
 * routine is for device memory (el2 uses volatile accesses there).
 * memmove stays compiler_builtins'.
 */

.section .text, "ax"

/* memset(x0 = dst, w1 = byte, x2 = n) -> x0 = dst. Clobbers x1..x5. */
.global memset
.type memset, %function
memset:
    mov     x3, x0
    and     x1, x1, #0xff
    mov     x4, #0x0101010101010101
    mul     x1, x1, x4
    lsr     x5, x2, #6              /* 64-byte blocks */
    cbz     x5, 2f
1:  stp     x1, x1, [x3]
    stp     x1, x1, [x3, #16]
    stp     x1, x1, [x3, #32]
    stp     x1, x1, [x3, #48]
    add     x3, x3, #64
    subs    x5, x5, #1
    b.ne    1b
2:  and     x2, x2, #63
    lsr     x5, x2, #3              /* 8-byte words */
    cbz     x5, 4f
3:  str     x1, [x3], #8
    subs    x5, x5, #1
    b.ne    3b
4:  ands    x2, x2, #7              /* bytes */
    b.eq    6f
5:  strb    w1, [x3], #1
    subs    x2, x2, #1
    b.ne    5b
6:  ret
.size memset, . - memset

/* memcpy(x0 = dst, x1 = src, x2 = n) -> x0 = dst; the ranges must not
 * overlap. Clobbers x1..x12. */
.global memcpy
.type memcpy, %function
memcpy:
    mov     x3, x0
    lsr     x4, x2, #6              /* 64-byte blocks */
    cbz     x4, 2f
1:  ldp     x5, x6, [x1]
    ldp     x7, x8, [x1, #16]
    ldp     x9, x10, [x1, #32]
    ldp     x11, x12, [x1, #48]
    stp     x5, x6, [x3]
    stp     x7, x8, [x3, #16]
    stp     x9, x10, [x3, #32]
    stp     x11, x12, [x3, #48]
    add     x1, x1, #64
    add     x3, x3, #64
    subs    x4, x4, #1
    b.ne    1b
2:  and     x2, x2, #63
    lsr     x4, x2, #3              /* 8-byte words */
    cbz     x4, 4f
3:  ldr     x5, [x1], #8
    str     x5, [x3], #8
    subs    x4, x4, #1
    b.ne    3b
4:  ands    x2, x2, #7              /* bytes */
    b.eq    6f
5:  ldrb    w5, [x1], #1
    strb    w5, [x3], #1
    subs    x2, x2, #1
    b.ne    5b
6:  ret
.size memcpy, . - memcpy
