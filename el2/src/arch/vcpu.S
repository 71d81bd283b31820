/*
 * Guest entry and exit.
 *
 * __guest_enter(x0 = &mut VcpuContext) saves the host's callee-saved
 * registers and the context pointer on the EL2 stack, points VBAR_EL2 at
 * GUEST_VECTORS and erets into the guest with its x0..x30, PC and PSTATE.
 * Every exception from the guest (lower EL) lands in GUEST_VECTORS, whose
 * slots push the guest's x0/x1, record the slot and branch to guest_exit,
 * which saves the guest's GPRs, PC and PSTATE into the context, puts
 * VBAR_EL2 back to the host's VECTORS and returns the slot index in x0 to
 * the caller of __guest_enter. Exceptions at EL2 itself while the guest
 * vectors are installed (a hypervisor bug) go to the host table's slots,
 * which report them as fatal.
 *
 * Instruction budget: a guest vector slot is 3 instructions; guest_exit
 * is 30 instructions plus the callee-saved restore.
 *
 * Everything else (EL1 system registers, FP/SIMD, timers, HCR/VTTBR/CPTR)
 * is switched by arch/vcpu.rs around the call, which may also answer an
 * exit and call __guest_enter again at once (the fast path): the guest's
 * state outside the context stays in the CPU meanwhile.
 */

.equ VCPU_PC, 256             /* vcpu::VCPU_PC_OFFSET: pc, then pstate */
.equ HOST_SAVE, 112           /* x19..x30, the context pointer, padding */
.equ HOST_CTX, 96             /* offset of the context pointer in HOST_SAVE */

.section .text, "ax"
.global __guest_enter
__guest_enter:
    sub     sp, sp, #HOST_SAVE
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    str     x0, [sp, #HOST_CTX]
    adrp    x1, GUEST_VECTORS
    add     x1, x1, :lo12:GUEST_VECTORS
    msr     vbar_el2, x1
    ldp     x1, x2, [x0, #VCPU_PC]
    msr     elr_el2, x1
    msr     spsr_el2, x2
    isb
    gprs    ldp, x0
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret
    dsb     nsh                  /* no speculation past the eret */
    isb

/* Slots 0-7 (EL2 itself): the host table's slot. 8-15 (the guest): exit. */
.macro guest_vector kind
    .if \kind < 8
    b       VECTORS + \kind * 0x80
    .else
    stp     x0, x1, [sp, #-16]!
    mov     x0, #\kind
    b       guest_exit
    .endif
.endm

.section .text.vectors, "ax"
.global GUEST_VECTORS
vector_table GUEST_VECTORS, guest_vector

/* x0 = slot; the guest's x0/x1 at [sp], the host's save area above them. */
guest_exit:
    ldr     x1, [sp, #16 + HOST_CTX]
    gprs    stp, x1
    str     x30, [x1, #240]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x1, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x1, #VCPU_PC]
    adrp    x2, VECTORS
    add     x2, x2, :lo12:VECTORS
    msr     vbar_el2, x2
    isb
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    add     sp, sp, #HOST_SAVE
    ret

/* FP/SIMD save and load: x0 = &FpState (16-byte aligned, 528 bytes). */
.arch_extension fp
.arch_extension simd
.equ FP_FPSR, 512             /* vcpu::FP_FPSR_OFFSET: fpsr, then fpcr */

.section .text, "ax"
.global __fpsimd_save
__fpsimd_save:
    stp     q0, q1, [x0, #0]
    stp     q2, q3, [x0, #32]
    stp     q4, q5, [x0, #64]
    stp     q6, q7, [x0, #96]
    stp     q8, q9, [x0, #128]
    stp     q10, q11, [x0, #160]
    stp     q12, q13, [x0, #192]
    stp     q14, q15, [x0, #224]
    stp     q16, q17, [x0, #256]
    stp     q18, q19, [x0, #288]
    stp     q20, q21, [x0, #320]
    stp     q22, q23, [x0, #352]
    stp     q24, q25, [x0, #384]
    stp     q26, q27, [x0, #416]
    stp     q28, q29, [x0, #448]
    stp     q30, q31, [x0, #480]
    mrs     x1, fpsr
    mrs     x2, fpcr
    add     x0, x0, #FP_FPSR
    stp     x1, x2, [x0]
    ret

.global __fpsimd_load
__fpsimd_load:
    ldp     q0, q1, [x0, #0]
    ldp     q2, q3, [x0, #32]
    ldp     q4, q5, [x0, #64]
    ldp     q6, q7, [x0, #96]
    ldp     q8, q9, [x0, #128]
    ldp     q10, q11, [x0, #160]
    ldp     q12, q13, [x0, #192]
    ldp     q14, q15, [x0, #224]
    ldp     q16, q17, [x0, #256]
    ldp     q18, q19, [x0, #288]
    ldp     q20, q21, [x0, #320]
    ldp     q22, q23, [x0, #352]
    ldp     q24, q25, [x0, #384]
    ldp     q26, q27, [x0, #416]
    ldp     q28, q29, [x0, #448]
    ldp     q30, q31, [x0, #480]
    add     x0, x0, #FP_FPSR
    ldp     x1, x2, [x0]
    msr     fpsr, x1
    msr     fpcr, x2
    ret
