/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* /dev/s2pin (s2pin_shim.c), set up by the module's init and exit. */
#ifndef S2PIN_SHIM_H
#define S2PIN_SHIM_H

/* Registers /dev/s2pin and the debugfs files; 0 or a negative errno. */
int s2pin_shim_init(void);
/* Undoes s2pin_shim_init(); the fops owner keeps the module while any fd is open. */
void s2pin_shim_exit(void);

#endif /* S2PIN_SHIM_H */
