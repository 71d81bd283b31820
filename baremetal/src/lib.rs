//! Pieces the bare-metal programs share: el2 (EL2), the conformance test
//! host (EL1) and the guest payload (EL1 of a VM).
//!
//! - [`pl011`]: a `core::fmt::Write` for the PL011 UART, and [`console`]:
//!   a locked line console on it (el2 and the test host; each keeps its own
//!   line format around it).
//! - `src/image_header.S`: the assembler macro `arm64_image_header` for the
//!   64-byte arm64 Image header. Each program's `arch/mod.rs` puts it in front
//!   of its `entry.S` in one `global_asm!`, for example
//!   `global_asm!(include_str!("../../../baremetal/src/image_header.S"), include_str!("entry.S"))`,
//!   and its `entry.S` starts `_start` with
//!   `arm64_image_header <entry>, <text_offset>[, <res4>]`.
//!
//! - `src/boot.S`: the boot and exception-entry macros (`zero_bss`,
//!   `set_stack`, `mmu_on`, `set_vbar`, `vector_table`, `gprs`), included
//!   the same way after `image_header.S`.
//! - `build` (feature `build`, for build scripts): links a program with
//!   its `linker.ld` at the boot contract's address.
//!
//! [`IMAGE_HEADER_S`] holds the same text, so that host tests can check it.

#![no_std]

#[cfg(feature = "build")]
pub mod build;
pub mod console;
pub mod pl011;

/// The text of `src/image_header.S` (the `arm64_image_header` macro).
pub const IMAGE_HEADER_S: &str = include_str!("image_header.S");

#[cfg(test)]
mod tests {
    use super::IMAGE_HEADER_S;

    /// The code lines of the `arm64_image_header` macro, comments stripped.
    fn header_lines() -> impl Iterator<Item = &'static str> {
        IMAGE_HEADER_S
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(".macro arm64_image_header"))
            .skip(1)
            .map(|l| l.find("/*").map_or(l, |i| &l[..i]).trim())
            .take_while(|l| *l != ".endm")
            .filter(|l| !l.is_empty())
    }

    #[test]
    fn image_header_macro_is_64_bytes_with_the_magic_at_56() {
        let mut offset = 0;
        let mut magic_at = None;
        for line in header_lines() {
            offset += match line.split_whitespace().next() {
                Some("b" | ".long") => 4,
                Some(".quad") => 8,
                Some(".ascii") => {
                    assert_eq!(line, ".ascii  \"ARM\\x64\"");
                    magic_at = Some(offset);
                    4
                }
                other => panic!("unexpected directive {other:?} in the header macro"),
            };
        }
        assert_eq!(offset, 64);
        assert_eq!(magic_at, Some(56));
    }
}
