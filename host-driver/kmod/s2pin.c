// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * s2pin: the host side of the pinned-s2 hypervisor.
 *
 * Today it only says hello. On load it asks the hypervisor for its ABI
 * version and for the calls it supports, logs both, and exposes:
 *
 *   /sys/kernel/s2pin/version   "<major>.<minor>\n" from a fresh HYP_VERSION
 *                               call on every read; "no hypervisor\n" when the
 *                               kernel runs at EL2 (no HVC is issued then);
 *                               "error <x0>\n" when the call fails (e.g.
 *                               another hypervisor answering HYP_NOT_SUPPORTED).
 *   /sys/kernel/s2pin/features  one line per host call this module knows,
 *                               "<NAME> 0x<id> <0|1>\n" (or "... error <x0>\n")
 *                               from fresh HYP_FEATURES calls; "no
 *                               hypervisor\n" at EL2.
 *
 * Because every read issues the HVCs again, reading a file also proves the
 * hypervisor still answers (the isolation test relies on that).
 *
 * The pinning, sharing and MMU-notifier forwarding arrive with later issues.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/sysfs.h>

#include "s2pin_hvc.h"

/* The host calls of hyp_abi.h, by name; a renamed or dropped call breaks the build. */
#define S2PIN_FN(name) { name, #name }
static const struct {
	unsigned long id;
	const char *name;
} s2pin_host_calls[] = {
	S2PIN_FN(HYP_VERSION),
	S2PIN_FN(HYP_FEATURES),
	S2PIN_FN(HYP_MEMCACHE_TOPUP),
	S2PIN_FN(HYP_MEMCACHE_RECLAIM),
	S2PIN_FN(HYP_VM_CREATE),
	S2PIN_FN(HYP_VCPU_CREATE),
	S2PIN_FN(HYP_VCPU_RUN),
	S2PIN_FN(HYP_SHARE),
	S2PIN_FN(HYP_UNSHARE),
	S2PIN_FN(HYP_DONATE),
	S2PIN_FN(HYP_RECLAIM),
	S2PIN_FN(HYP_WRPROTECT),
	S2PIN_FN(HYP_RELAX_PERMS),
	S2PIN_FN(HYP_TEST_CLEAR_YOUNG),
	S2PIN_FN(HYP_TEARDOWN_START),
	S2PIN_FN(HYP_TEARDOWN_RECLAIM),
	S2PIN_FN(HYP_TEARDOWN_FINALIZE),
	S2PIN_FN(HYP_VM_COUNTERS),
	S2PIN_FN(HYP_HOST_PAGE_STATE),
	S2PIN_FN(HYP_GUEST_PAGE_STATE),
};

static struct kobject *s2pin_kobj;

/* Formats the VERSION outcome the way the sysfs file and the log show it. */
static int s2pin_format_version(char *buf, size_t size)
{
	struct s2pin_version v;

	if (!s2pin_kernel_at_el1())
		return scnprintf(buf, size, "no hypervisor\n");
	v = s2pin_hvc_version();
	if (v.err != HYP_SUCCESS)
		return scnprintf(buf, size, "error %ld\n", v.err);
	return scnprintf(buf, size, "%lu.%lu\n", v.major, v.minor);
}

static ssize_t version_show(struct kobject *kobj, struct kobj_attribute *attr,
			    char *buf)
{
	return s2pin_format_version(buf, PAGE_SIZE);
}

static ssize_t features_show(struct kobject *kobj, struct kobj_attribute *attr,
			     char *buf)
{
	unsigned long supported = 0;
	int len = 0;
	size_t i;
	long err;

	if (!s2pin_kernel_at_el1())
		return sysfs_emit(buf, "no hypervisor\n");
	for (i = 0; i < ARRAY_SIZE(s2pin_host_calls); i++) {
		err = s2pin_hvc_features(s2pin_host_calls[i].id, &supported);
		if (err != HYP_SUCCESS)
			len += sysfs_emit_at(buf, len, "%s %#lx error %ld\n",
					     s2pin_host_calls[i].name,
					     s2pin_host_calls[i].id, err);
		else
			len += sysfs_emit_at(buf, len, "%s %#lx %lu\n",
					     s2pin_host_calls[i].name,
					     s2pin_host_calls[i].id, supported);
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

/* Logs the version and the supported calls once, at load. */
static void s2pin_log_hypervisor(void)
{
	unsigned long supported = 0;
	struct s2pin_version v;
	char names[512];
	int len = 0;
	size_t i;
	long err;

	if (!s2pin_kernel_at_el1()) {
		pr_info("kernel at EL2: no hypervisor, no HVC issued\n");
		return;
	}
	v = s2pin_hvc_version();
	if (v.err != HYP_SUCCESS) {
		pr_info("kernel at EL1; HYP_VERSION failed: error %ld\n", v.err);
		return;
	}
	pr_info("kernel at EL1; hypervisor ABI version %lu.%lu (module built for %u.%u)\n",
		v.major, v.minor, HYP_ABI_VERSION_MAJOR, HYP_ABI_VERSION_MINOR);
	if (v.major != HYP_ABI_VERSION_MAJOR)
		pr_warn("hypervisor ABI major %lu differs from ours (%u): incompatible\n",
			v.major, HYP_ABI_VERSION_MAJOR);
	names[0] = '\0';
	for (i = 0; i < ARRAY_SIZE(s2pin_host_calls); i++) {
		err = s2pin_hvc_features(s2pin_host_calls[i].id, &supported);
		if (err != HYP_SUCCESS) {
			pr_info("HYP_FEATURES(%s) failed: error %ld\n",
				s2pin_host_calls[i].name, err);
			return;
		}
		if (supported)
			len += scnprintf(names + len, sizeof(names) - len, " %s",
					 s2pin_host_calls[i].name);
	}
	pr_info("hypervisor supports:%s\n", len ? names : " (none)");
}

static int __init s2pin_init(void)
{
	int ret;

	s2pin_log_hypervisor();
	s2pin_kobj = kobject_create_and_add("s2pin", kernel_kobj);
	if (!s2pin_kobj)
		return -ENOMEM;
	ret = sysfs_create_group(s2pin_kobj, &s2pin_group);
	if (ret) {
		kobject_put(s2pin_kobj);
		return ret;
	}
	return 0;
}

static void __exit s2pin_exit(void)
{
	kobject_put(s2pin_kobj);
}

module_init(s2pin_init);
module_exit(s2pin_exit);

MODULE_DESCRIPTION("pinned-s2 host driver: hypervisor version and features over HVC");
MODULE_LICENSE("Dual MIT/GPL");
