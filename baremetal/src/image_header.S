/*
 * The 64-byte arm64 Image header (Documentation/arch/arm64/booting.rst),
 * shared by el2, the test host and the guest payload (baremetal/).
 *
 *   arm64_image_header entry, text_offset[, res4]
 *
 * Put it first in the section at the image start (`_start`). `entry` is
 * where code0 branches; `text_offset` is the header field; `res4` (default
 * 0) is the reserved word before the magic, which the guest payload uses
 * for its secondary-vCPU entry offset. `__image_size` comes from each
 * program's linker script.
 */
.macro arm64_image_header entry, text_offset, res4=0
    b       \entry               /* code0 */
    .long   0                    /* code1 */
    .quad   \text_offset         /* text_offset */
    .quad   __image_size         /* image_size */
    .quad   0x2                  /* flags: little endian, 4K pages */
    .quad   0                    /* res2 */
    .quad   0                    /* res3 */
    .quad   \res4                /* res4 */
    .ascii  "ARM\x64"            /* magic */
    .long   0                    /* res5 */
.endm
