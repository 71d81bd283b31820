/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The Rust part of s2pin.ko (host-driver/rust, crate s2pin-core), linked in
 * as s2pin_rust.o. Every function takes the eight result registers x0..x7
 * of one hypercall as `const u64 x[8]` and decodes them with the hypercalls
 * crate; the formatting ones write text (no NUL) into @buf and return the
 * number of bytes written, or a negative errno: -ENOSPC (buffer too small),
 * -EINVAL (null pointer, unknown host call index), -EIO (call failed, only
 * s2pin_format_supported_name). None of them issues an HVC or sleeps.
 * The authoritative documentation is host-driver/rust/src/lib.rs.
 */
#ifndef S2PIN_CORE_H
#define S2PIN_CORE_H

#include <linux/compiler.h>
#include <linux/types.h>

/* "<major>.<minor>\n", "error <x0>\n" or "malformed reply (x0 <x0>)\n" from HYP_VERSION's registers. */
ssize_t s2pin_format_version(const u64 *x, char *buf, size_t len);
/* The load-time log line for HYP_VERSION's registers, ending in "\n". */
ssize_t s2pin_format_version_log(const u64 *x, char *buf, size_t len);
/* 0: compatible ABI major; 1: another major; -1: the call failed or its reply is malformed. */
int s2pin_version_check(const u64 *x);

/* The host calls the features file lists, and their function ids (0 past the end). */
size_t s2pin_host_call_count(void);
u64 s2pin_host_call_id(size_t index);
/* "<NAME> 0x<id> <0|1>\n" (or "... error <x0>\n") from HYP_FEATURES(id of @index)'s registers. */
ssize_t s2pin_format_feature(size_t index, const u64 *x, char *buf, size_t len);
/* " <NAME>" if supported, nothing (0) if not, -EIO if HYP_FEATURES failed. */
ssize_t s2pin_format_supported_name(size_t index, const u64 *x, char *buf, size_t len);

/* Called by the Rust panic handler (never in practice): panics the kernel. */
void __noreturn s2pin_rust_panic(const char *file, size_t file_len, u32 line);

#endif /* S2PIN_CORE_H */
