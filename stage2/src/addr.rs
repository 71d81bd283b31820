//! Typed addresses.
//!
//! Every address space has its own type so that a guest-physical address can
//! never be handed where a host-physical one is expected. All of them are
//! `#[repr(transparent)]` over `u64`; conversions between address and frame
//! number are explicit and checked where they can fail.

use core::fmt;

/// Log2 of the translation granule: this crate supports the 4 KiB granule only.
pub const PAGE_SHIFT: u32 = 12;
/// Size of a page in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset bits within a page.
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $frame:ident, $to_frame:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// Wraps a raw address.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            #[must_use]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// Whether the address is a multiple of `align`, which must be a power of two.
            #[must_use]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align.wrapping_sub(1)) == 0
            }

            /// Whether the address is page aligned.
            #[must_use]
            pub const fn is_page_aligned(self) -> bool {
                self.is_aligned(PAGE_SIZE)
            }

            /// `self + bytes`, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self + bytes`, for callers that have already checked the range.
            /// Wraps on overflow rather than panicking.
            #[must_use]
            pub const fn wrapping_add(self, bytes: u64) -> Self {
                Self(self.0.wrapping_add(bytes))
            }

            /// The address rounded down to `align`, which must be a power of two.
            #[must_use]
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align.wrapping_sub(1)))
            }

            /// The frame number containing this address.
            #[must_use]
            pub const fn $to_frame(self) -> $frame {
                $frame(self.0 >> PAGE_SHIFT)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

macro_rules! frame_type {
    ($(#[$doc:meta])* $name:ident, $addr:ident, $to_addr:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// Wraps a raw frame number.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw frame number.
            #[must_use]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// The address of the first byte of the frame, or `None` if it
            /// does not fit in 64 bits.
            #[must_use]
            pub const fn $to_addr(self) -> Option<$addr> {
                if self.0 > (u64::MAX >> PAGE_SHIFT) {
                    None
                } else {
                    Some($addr(self.0 << PAGE_SHIFT))
                }
            }

            /// `self + n`, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// A host-physical address: what the host's stage-2 and the MMU output.
    Hpa,
    Pfn,
    pfn
);
address_type!(
    /// An intermediate-physical address: what a guest (or the host, under its
    /// own stage-2) believes is physical.
    Ipa,
    Gfn,
    gfn
);
frame_type!(
    /// A host page frame number: `Hpa >> PAGE_SHIFT`.
    Pfn,
    Hpa,
    hpa
);
frame_type!(
    /// A guest page frame number: `Ipa >> PAGE_SHIFT`.
    Gfn,
    Ipa,
    ipa
);

/// A virtual machine identifier as programmed into `VTTBR_EL2.VMID`.
///
/// VMID 0 is reserved for the host's own stage-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Vmid(pub u16);

/// Number of pages covered by `bytes`, if `bytes` is a whole number of pages.
#[must_use]
pub const fn bytes_to_pages(bytes: u64) -> Option<u64> {
    if bytes & PAGE_MASK == 0 {
        Some(bytes >> PAGE_SHIFT)
    } else {
        None
    }
}

/// Number of bytes in `pages` pages, or `None` on overflow.
#[must_use]
pub const fn pages_to_bytes(pages: u64) -> Option<u64> {
    if pages > (u64::MAX >> PAGE_SHIFT) {
        None
    } else {
        Some(pages << PAGE_SHIFT)
    }
}

/// The ABI's frame numbers (crate `hypercalls`, feature `abi`): validated
/// `HYP_PFN_BITS`-wide call arguments. Into these address types they
/// convert losslessly ([`From`]); back, only a frame below `2^PFN_BITS` does
/// ([`Pfn::to_abi`], [`Gfn::to_abi`]). The conversion lives here, on the
/// internal type, so the dispatcher crosses the boundary with `.into()`
/// instead of rebuilding values from raw numbers.
#[cfg(feature = "abi")]
mod abi {
    use super::{Gfn, Pfn};

    impl From<hypercalls::Pfn> for Pfn {
        fn from(p: hypercalls::Pfn) -> Self {
            Self(p.raw())
        }
    }

    impl From<hypercalls::Gfn> for Gfn {
        fn from(g: hypercalls::Gfn) -> Self {
            Self(g.raw())
        }
    }

    impl Pfn {
        /// The ABI's pfn for this frame, if it fits in `HYP_PFN_BITS`.
        #[must_use]
        pub const fn to_abi(self) -> Option<hypercalls::Pfn> {
            hypercalls::Pfn::new(self.0)
        }
    }

    impl Gfn {
        /// The ABI's gfn for this frame, if it fits in `HYP_PFN_BITS`.
        #[must_use]
        pub const fn to_abi(self) -> Option<hypercalls::Gfn> {
            hypercalls::Gfn::new(self.0)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn abi_frames_round_trip() {
            let p = hypercalls::Pfn::new(0x12_3456).unwrap();
            assert_eq!(Pfn::from(p).to_abi(), Some(p));
            let g = hypercalls::Gfn::new(7).unwrap();
            assert_eq!(Gfn::from(g).to_abi(), Some(g));
            assert_eq!(Pfn(1 << hypercalls::PFN_BITS).to_abi(), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let hpa = Hpa::new(0x4008_1234);
        assert_eq!(hpa.pfn(), Pfn::new(0x40081));
        assert_eq!(hpa.pfn().hpa(), Some(Hpa::new(0x4008_1000)));
        assert_eq!(Ipa::new(0x2000).gfn().ipa(), Some(Ipa::new(0x2000)));
    }

    #[test]
    fn overflow_is_checked() {
        assert_eq!(Pfn::new(u64::MAX).hpa(), None);
        assert_eq!(Hpa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Gfn::new(u64::MAX).checked_add(1), None);
        assert_eq!(pages_to_bytes(u64::MAX), None);
        assert_eq!(bytes_to_pages(4097), None);
        assert_eq!(bytes_to_pages(8192), Some(2));
    }

    #[test]
    fn alignment() {
        assert!(Ipa::new(0x20_0000).is_aligned(0x20_0000));
        assert!(!Ipa::new(0x20_1000).is_aligned(0x20_0000));
        assert_eq!(
            Ipa::new(0x20_1fff).align_down(PAGE_SIZE),
            Ipa::new(0x20_1000)
        );
        assert!(!Hpa::new(0x10).is_page_aligned());
    }
}
