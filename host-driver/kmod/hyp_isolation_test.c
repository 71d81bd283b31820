// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * hyp_isolation_test: a test-only module that proves from kernel context that
 * the host cannot read the hypervisor's memory.
 *
 *   insmod hyp_isolation_test.ko phys=0x40000000
 *
 * It maps <phys> with memremap() and reads 8 bytes with
 * copy_from_kernel_nofault(), so a translation or permission fault injected by
 * the hypervisor is fixed up to an error instead of an oops. It logs exactly
 * one outcome line:
 *
 *   hyp_isolation_test: phys 0x... FAULTED (-14): the host cannot read it
 *   hyp_isolation_test: phys 0x... READABLE: value 0x...
 *
 * then, if the kernel runs at EL1, issues HYP_VERSION again and logs whether
 * the hypervisor still answers. Its init always fails so nothing needs
 * unloading: -EFAULT ("Bad address") when the read faulted, -ECANCELED
 * ("Operation canceled") when it did not; -EINVAL/-ENOMEM for a bad or
 * unmappable phys.
 *
 * /dev/mem proves nothing here (STRICT_DEVMEM refuses RAM before touching it),
 * hence a module.
 *
 * If the hypervisor injects a synchronous external abort instead of a
 * translation fault, Linux 6.1 has no fixup for it in kernel mode: the kernel
 * oopses in insmod's context ("Internal error: synchronous external abort")
 * after the "reading" line, insmod dies, and the system stays up. The caller
 * then checks /sys/kernel/s2pin/version (a fresh HVC on every read) to
 * confirm the hypervisor still answers.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/uaccess.h>

#include "s2pin_hvc.h"

static unsigned long phys;
module_param(phys, ulong, 0444);
MODULE_PARM_DESC(phys, "8-byte aligned physical address to read (the hypervisor's memory)");

static void hyp_isolation_report_hyp(void)
{
	struct s2pin_version v;

	if (!s2pin_kernel_at_el1()) {
		pr_info("kernel at EL2: no hypervisor to ask\n");
		return;
	}
	v = s2pin_hvc_version();
	if (v.err != HYP_SUCCESS)
		pr_info("after the read: hypervisor VERSION failed: error %ld\n",
			v.err);
	else
		pr_info("after the read: hypervisor still answers VERSION %lu.%lu\n",
			v.major, v.minor);
}

static int __init hyp_isolation_test_init(void)
{
	u64 val = 0;
	void *va;
	long ret;

	if (!phys || !IS_ALIGNED(phys, sizeof(u64))) {
		pr_err("usage: insmod hyp_isolation_test.ko phys=<8-byte aligned physical address> (got %#lx)\n",
		       phys);
		return -EINVAL;
	}
	va = memremap(phys, sizeof(val), MEMREMAP_WB);
	if (!va) {
		pr_err("phys %#lx: memremap failed\n", phys);
		return -ENOMEM;
	}
	pr_info("phys %#lx: reading 8 bytes through memremap\n", phys);
	ret = copy_from_kernel_nofault(&val, va, sizeof(val));
	memunmap(va);
	if (ret)
		pr_info("phys %#lx FAULTED (%ld): the host cannot read it\n",
			phys, ret);
	else
		pr_info("phys %#lx READABLE: value %#llx\n", phys, val);
	hyp_isolation_report_hyp();
	return ret ? -EFAULT : -ECANCELED;
}

module_init(hyp_isolation_test_init);

MODULE_DESCRIPTION("pinned-s2 test: the host cannot read hypervisor memory");
MODULE_LICENSE("Dual MIT/GPL");
