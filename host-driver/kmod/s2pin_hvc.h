/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Issuing this project's hypercalls from the host kernel.
 *
 * Every function id, register meaning and error code comes from hyp_abi.h,
 * which `cargo xtask gen-header` generates from the hypercalls crate; nothing
 * here retypes an ABI number.
 *
 * The calls always use HVC #0, never the PSCI conduit: on this platform PSCI
 * goes to the firmware with SMC, and the hypervisor listens on HVC. They go
 * through arm_smccc_1_2_hvc() (docs/ABI.md §2.1): every argument register
 * x1..x7 is passed explicitly (unused ones zero, as the ABI requires), and
 * the compiler knows x0..x7 all come back as results. The SMCCC 1.1 macros
 * leave unused argument registers undefined and assume x4..x7 preserved,
 * which this ABI does not promise.
 */
#ifndef S2PIN_HVC_H
#define S2PIN_HVC_H

#include <linux/arm-smccc.h>
#include <linux/types.h>
#include <asm/ptrace.h>
#include <asm/sysreg.h>

#include "hyp_abi.h"

/*
 * Whether the kernel runs at EL1, so that an HVC goes to whatever sits at
 * EL2. When the kernel itself runs at EL2 (the --no-hyp comparison boot,
 * VHE), an HVC would trap into the kernel's own vectors and kill it: never
 * issue one then. is_hyp_mode_available() and __boot_cpu_mode are not
 * exported to modules, so read CurrentEL.
 */
static inline bool s2pin_kernel_at_el1(void)
{
	return read_sysreg(CurrentEL) == CurrentEL_EL1;
}

/* The outcome of HYP_VERSION, for hyp_isolation_test.ko (s2pin.ko decodes in Rust). */
struct s2pin_version {
	/* x0: HYP_SUCCESS, or an ABI error code (HYP_NOT_SUPPORTED, ...). */
	long err;
	unsigned long major;
	unsigned long minor;
};

/* Issues one call: x0 = @fn, x1 = @a1, x2..x7 = 0. */
static inline struct arm_smccc_1_2_regs s2pin_hvc1(unsigned long fn, unsigned long a1)
{
	struct arm_smccc_1_2_regs args = { .a0 = fn, .a1 = a1 };
	struct arm_smccc_1_2_regs res;

	arm_smccc_1_2_hvc(&args, &res);
	return res;
}

/*
 * Issues one call (x0 = @fn, x1 = @a1, x2..x7 = 0) and stores the result
 * registers x0..x7 in @x, for the Rust decoders of s2pin_core.h. Only call
 * it when s2pin_kernel_at_el1().
 */
static inline void s2pin_hvc_regs(unsigned long fn, unsigned long a1, u64 x[8])
{
	struct arm_smccc_1_2_regs res = s2pin_hvc1(fn, a1);

	x[0] = res.a0;
	x[1] = res.a1;
	x[2] = res.a2;
	x[3] = res.a3;
	x[4] = res.a4;
	x[5] = res.a5;
	x[6] = res.a6;
	x[7] = res.a7;
}

/* Issues HYP_VERSION. Only call it when s2pin_kernel_at_el1(). */
static inline struct s2pin_version s2pin_hvc_version(void)
{
	struct arm_smccc_1_2_regs res = s2pin_hvc1(HYP_VERSION, 0);
	struct s2pin_version v;

	v.err = (long)res.a0;
	v.major = res.a1;
	v.minor = res.a2;
	return v;
}

#endif /* S2PIN_HVC_H */
