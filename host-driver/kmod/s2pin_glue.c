// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * s2pin: the host side of the pinned-s2 hypervisor; the C glue.
 *
 * The logic is Rust (host-driver/rust, declared in s2pin_core.h): it
 * decodes the hypercall replies with the hypercalls crate and formats what
 * the module shows. This file only reads CurrentEL, issues the HVCs, and
 * does the sysfs and module plumbing.
 *
 * Today it only says hello. On load it asks the hypervisor for its ABI
 * version and for the calls it supports, logs both, and exposes:
 *
 *   /sys/kernel/s2pin/version   "<major>.<minor>\n" from a fresh HYP_VERSION
 *                               call on every read; "no hypervisor\n" when the
 *                               kernel runs at EL2 (no HVC is issued then);
 *                               "error <x0>\n" when the call fails (e.g.
 *                               another hypervisor answering HYP_NOT_SUPPORTED),
 *                               "malformed reply (x0 <x0>)\n" when the
 *                               registers are no valid reply.
 *   /sys/kernel/s2pin/features  one line per host call of the ABI,
 *                               "<NAME> 0x<id> <0|1>\n" (or "... error <x0>\n")
 *                               from fresh HYP_FEATURES calls; "no
 *                               hypervisor\n" at EL2.
 *
 * Because every read issues the HVCs again, reading a file also proves the
 * hypervisor still answers (the isolation test relies on that).
 *
 * Under a compatible hypervisor it also registers /dev/s2pin (s2pin_shim.c):
 * VMs whose guest memory is pinned on stage-2 faults and shared with EL2.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/sysfs.h>

#include "s2pin_core.h"
#include "s2pin_hvc.h"
#include "s2pin_shim.h"

static struct kobject *s2pin_kobj;

void s2pin_rust_panic(const char *file, size_t file_len, u32 line)
{
	panic("s2pin: Rust code panicked at %.*s:%u\n",
	      (int)min_t(size_t, file_len, 256), file, line);
}

static ssize_t version_show(struct kobject *kobj, struct kobj_attribute *attr,
			    char *buf)
{
	u64 x[8];

	if (!s2pin_kernel_at_el1())
		return sysfs_emit(buf, "no hypervisor\n");
	s2pin_hvc_regs(HYP_VERSION, 0, x);
	return s2pin_format_version(x, buf, PAGE_SIZE);
}

static ssize_t features_show(struct kobject *kobj, struct kobj_attribute *attr,
			     char *buf)
{
	size_t i, n = s2pin_host_call_count();
	ssize_t len = 0, ret;
	u64 x[8];

	if (!s2pin_kernel_at_el1())
		return sysfs_emit(buf, "no hypervisor\n");
	for (i = 0; i < n; i++) {
		s2pin_hvc_regs(HYP_FEATURES, s2pin_host_call_id(i), x);
		ret = s2pin_format_feature(i, x, buf + len, PAGE_SIZE - len);
		if (ret < 0)
			return ret;
		len += ret;
	}
	return len;
}

static struct kobj_attribute version_attr = __ATTR_RO(version);
static struct kobj_attribute features_attr = __ATTR_RO(features);

static struct attribute *s2pin_attrs[] = {
	&version_attr.attr,
	&features_attr.attr,
	NULL,
};

static const struct attribute_group s2pin_group = {
	.attrs = s2pin_attrs,
};

/*
 * Logs the version and the supported calls once, at load. Returns true when
 * a hypervisor with a compatible ABI answers (so /dev/s2pin can work).
 */
static bool s2pin_log_hypervisor(void)
{
	char line[160], names[512];
	size_t i, n = s2pin_host_call_count();
	ssize_t len = 0, ret;
	int check;
	u64 x[8];

	if (!s2pin_kernel_at_el1()) {
		pr_info("kernel at EL2: no hypervisor, no HVC issued\n");
		return false;
	}
	s2pin_hvc_regs(HYP_VERSION, 0, x);
	check = s2pin_version_check(x);
	ret = s2pin_format_version_log(x, line, sizeof(line));
	if (ret < 0) {
		pr_err("formatting the version failed: %zd\n", ret);
		return false;
	}
	if (check > 0)
		pr_warn("%.*s", (int)ret, line);
	else
		pr_info("%.*s", (int)ret, line);
	if (check != 0)
		return false;
	for (i = 0; i < n; i++) {
		s2pin_hvc_regs(HYP_FEATURES, s2pin_host_call_id(i), x);
		ret = s2pin_format_supported_name(i, x, names + len, sizeof(names) - len);
		if (ret == -EIO) {
			ret = s2pin_format_feature(i, x, line, sizeof(line));
			if (ret > 0)
				pr_info("HYP_FEATURES failed: %.*s", (int)ret, line);
			return false;
		}
		if (ret < 0) {
			pr_err("formatting the features failed: %zd\n", ret);
			return false;
		}
		len += ret;
	}
	if (len)
		pr_info("hypervisor supports:%.*s\n", (int)len, names);
	else
		pr_info("hypervisor supports: (none)\n");
	return true;
}

static int __init s2pin_init(void)
{
	bool hyp_ok;
	int ret;

	hyp_ok = s2pin_log_hypervisor();
	s2pin_kobj = kobject_create_and_add("s2pin", kernel_kobj);
	if (!s2pin_kobj)
		return -ENOMEM;
	ret = sysfs_create_group(s2pin_kobj, &s2pin_group);
	if (ret) {
		kobject_put(s2pin_kobj);
		return ret;
	}
	/* /dev/s2pin only under a compatible hypervisor; sysfs always. */
	if (hyp_ok && s2pin_shim_init())
		pr_err("/dev/s2pin is not available\n");
	return 0;
}

static void __exit s2pin_exit(void)
{
	s2pin_shim_exit();
	kobject_put(s2pin_kobj);
}

module_init(s2pin_init);
module_exit(s2pin_exit);

MODULE_DESCRIPTION("pinned-s2 host driver: /dev/s2pin (VMs with pinned, shared guest memory), hypervisor version and features");
MODULE_LICENSE("Dual MIT/GPL");
