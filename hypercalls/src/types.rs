//! Typed hypercall arguments.
//!
//! Each type holds only values the ABI allows (fields are private, constructors
//! check), so a [`Hypercall`](crate::Hypercall) built from them always encodes
//! to registers that decode back to it.

use core::fmt;
use core::ops::BitOr;

use crate::{MAX_IPA_BITS, MAX_PAGES_PER_CALL, MAX_VCPUS, MIN_IPA_BITS, PFN_BITS};

macro_rules! frame_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Frame 0.
            pub const ZERO: Self = Self(0);
            /// The largest frame number the ABI can carry.
            pub const MAX: Self = Self((1 << PFN_BITS) - 1);

            /// A frame number, or `None` if it does not fit in [`PFN_BITS`] bits.
            #[must_use]
            pub const fn new(raw: u64) -> Option<Self> {
                if raw >> PFN_BITS == 0 {
                    Some(Self(raw))
                } else {
                    None
                }
            }

            /// The raw frame number.
            #[must_use]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` if the result does not fit in [`PFN_BITS`] bits.
            #[must_use]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Self::new(v),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
    };
}

frame_type! {
    /// A host page frame number (host physical address >> 12), as the ABI
    /// carries it: at most [`PFN_BITS`] bits.
    Pfn
}

frame_type! {
    /// A guest page frame number (IPA >> 12), as the ABI carries it: at most
    /// [`PFN_BITS`] bits. Whether it lies inside a VM's IPA space is checked
    /// by the hypervisor (`ERANGE`), not by decoding.
    Gfn
}

/// Shift of the generation field in a [`VmHandle`].
pub const VM_HANDLE_GEN_SHIFT: u32 = 16;
/// Mask of the slot-index field in a [`VmHandle`].
pub const VM_HANDLE_INDEX_MASK: u32 = 0xFFFF;

/// A VM handle: slot index in bits 15:0, generation in bits 31:16.
///
/// The generation is never 0, so the raw value 0 is never a handle; a handle
/// whose VM was torn down is detectably stale because the slot's generation
/// moved on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct VmHandle(u32);

impl VmHandle {
    /// A handle from its parts, or `None` if `generation` is 0.
    #[must_use]
    pub const fn new(index: u16, generation: u16) -> Option<Self> {
        if generation == 0 {
            None
        } else {
            Some(Self(
                ((generation as u32) << VM_HANDLE_GEN_SHIFT) | index as u32,
            ))
        }
    }

    /// A handle from its raw value, or `None` if its generation is 0.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        if raw >> VM_HANDLE_GEN_SHIFT == 0 {
            None
        } else {
            Some(Self(raw))
        }
    }

    /// The raw value carried in a register.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The VM-table slot.
    #[must_use]
    pub const fn index(self) -> u16 {
        (self.0 & VM_HANDLE_INDEX_MASK) as u16
    }

    /// The slot's generation when the handle was issued (never 0).
    #[must_use]
    pub const fn generation(self) -> u16 {
        (self.0 >> VM_HANDLE_GEN_SHIFT) as u16
    }
}

impl fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmHandle({}.{})", self.index(), self.generation())
    }
}

/// The index of a vCPU within its VM: `0..MAX_VCPUS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct VcpuIndex(u16);

impl VcpuIndex {
    /// An index, or `None` if it is not below [`MAX_VCPUS`].
    #[must_use]
    pub const fn new(index: u16) -> Option<Self> {
        if index < MAX_VCPUS {
            Some(Self(index))
        } else {
            None
        }
    }

    /// The index.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// The number of vCPUs of a VM: `1..=MAX_VCPUS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct VcpuCount(u16);

impl VcpuCount {
    /// A count, or `None` if it is 0 or above [`MAX_VCPUS`].
    #[must_use]
    pub const fn new(n: u16) -> Option<Self> {
        if n >= 1 && n <= MAX_VCPUS {
            Some(Self(n))
        } else {
            None
        }
    }

    /// The count.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// The number of pages one call operates on: `1..=MAX_PAGES_PER_CALL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PageCount(u16);

impl PageCount {
    /// One page.
    pub const ONE: Self = Self(1);
    /// The per-call maximum.
    pub const MAX: Self = Self(MAX_PAGES_PER_CALL as u16);

    /// A count, or `None` if it is 0 or above [`MAX_PAGES_PER_CALL`].
    #[must_use]
    pub const fn new(n: u32) -> Option<Self> {
        if n >= 1 && n <= MAX_PAGES_PER_CALL {
            Some(Self(n as u16))
        } else {
            None
        }
    }

    /// The count.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0 as u32
    }
}

/// Stage-2 access permissions: a set of [`Prot::R`], [`Prot::W`], [`Prot::X`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Prot(u8);

impl Prot {
    /// No access.
    pub const NONE: Self = Self(0);
    /// Read (bit 0).
    pub const R: Self = Self(1 << 0);
    /// Write (bit 1).
    pub const W: Self = Self(1 << 1);
    /// Execute (bit 2).
    pub const X: Self = Self(1 << 2);
    /// Read and write.
    pub const RW: Self = Self(Self::R.0 | Self::W.0);
    /// Read and execute.
    pub const RX: Self = Self(Self::R.0 | Self::X.0);
    /// Read, write and execute.
    pub const RWX: Self = Self(Self::R.0 | Self::W.0 | Self::X.0);
    /// Every bit the ABI defines; the others are reserved.
    pub const ALL_BITS: u64 = Self::RWX.0 as u64;

    /// A set from raw bits, or `None` if a reserved bit is set.
    #[must_use]
    pub const fn from_bits(bits: u64) -> Option<Self> {
        if bits & !Self::ALL_BITS == 0 {
            Some(Self(bits as u8))
        } else {
            None
        }
    }

    /// The raw bits.
    #[must_use]
    pub const fn bits(self) -> u64 {
        self.0 as u64
    }

    /// Whether every permission in `other` is in `self`.
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no permission is set.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Readable.
    #[must_use]
    pub const fn read(self) -> bool {
        self.contains(Self::R)
    }

    /// Writable.
    #[must_use]
    pub const fn write(self) -> bool {
        self.contains(Self::W)
    }

    /// Executable.
    #[must_use]
    pub const fn exec(self) -> bool {
        self.contains(Self::X)
    }
}

impl BitOr for Prot {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "Prot({}{}{})",
            c(self.read(), 'r'),
            c(self.write(), 'w'),
            c(self.exec(), 'x')
        )
    }
}

/// The size of a VM's IPA space in bits: `MIN_IPA_BITS..=MAX_IPA_BITS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct IpaBits(u8);

impl IpaBits {
    /// An IPA size, or `None` outside `MIN_IPA_BITS..=MAX_IPA_BITS`.
    #[must_use]
    pub const fn new(bits: u8) -> Option<Self> {
        if bits >= MIN_IPA_BITS && bits <= MAX_IPA_BITS {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// The size in bits.
    #[must_use]
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Number of stage-2 translation levels (4 KiB granule), as KVM chooses
    /// them: the fewest levels whose root needs at most 16 concatenated tables.
    #[must_use]
    pub const fn levels(self) -> u8 {
        (self.0 - 8) / 9
    }

    /// The level of the root table (`4 - levels`: 0, 1 or 2).
    #[must_use]
    pub const fn start_level(self) -> u8 {
        4 - self.levels()
    }

    /// The number of concatenated root-table pages (1..=16) that
    /// `HYP_VM_CREATE` takes; the first one's pfn must be a multiple of it
    /// (`VTTBR_EL2.BADDR` alignment).
    #[must_use]
    pub const fn root_table_pages(self) -> u32 {
        // The root level resolves IPA bits [ipa_bits-1 : 12 + 9 * (levels-1)].
        let root_bits = self.0 as u32 - (12 + 9 * (self.levels() as u32 - 1));
        if root_bits > 9 {
            1 << (root_bits - 9)
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_handle_parts() {
        assert_eq!(VmHandle::new(3, 0), None);
        assert_eq!(VmHandle::from_raw(0), None);
        assert_eq!(
            VmHandle::from_raw(0xFFFF),
            None,
            "generation 0 is never issued"
        );
        let h = VmHandle::new(0xABCD, 0x1234).unwrap();
        assert_eq!(h.raw(), 0x1234_ABCD);
        assert_eq!((h.index(), h.generation()), (0xABCD, 0x1234));
        assert_eq!(VmHandle::from_raw(h.raw()), Some(h));
    }

    #[test]
    fn frame_numbers_are_bounded() {
        assert!(Pfn::new(1 << PFN_BITS).is_none());
        assert_eq!(Pfn::new((1 << PFN_BITS) - 1), Some(Pfn::MAX));
        assert_eq!(Gfn::MAX.checked_add(1), None);
        assert_eq!(Gfn::new(5).unwrap().checked_add(3), Gfn::new(8));
        assert_eq!(Pfn::new(1).unwrap().checked_add(u64::MAX), None);
    }

    #[test]
    fn counts_are_bounded() {
        assert_eq!(PageCount::new(0), None);
        assert_eq!(PageCount::new(MAX_PAGES_PER_CALL + 1), None);
        assert_eq!(PageCount::new(MAX_PAGES_PER_CALL), Some(PageCount::MAX));
        assert_eq!(VcpuCount::new(0), None);
        assert_eq!(VcpuCount::new(MAX_VCPUS + 1), None);
        assert_eq!(VcpuIndex::new(MAX_VCPUS), None);
        assert_eq!(
            VcpuIndex::new(MAX_VCPUS - 1).map(VcpuIndex::get),
            Some(MAX_VCPUS - 1)
        );
    }

    #[test]
    fn prot_bits() {
        assert_eq!(Prot::from_bits(8), None);
        assert_eq!(Prot::from_bits(7), Some(Prot::RWX));
        assert_eq!(Prot::R | Prot::W, Prot::RW);
        assert!(Prot::RW.contains(Prot::W) && !Prot::RW.exec());
        assert!(Prot::NONE.is_empty());
    }

    /// The root-table geometry as the Arm ARM tables give it for a 4 KiB
    /// granule (VTCR_EL2.SL0/T0SZ), written out by hand.
    #[test]
    fn root_table_geometry_matches_the_arm_tables() {
        let expect: &[(u8, u8, u32)] = &[
            // (ipa bits, start level, concatenated root tables)
            (32, 2, 4),
            (33, 2, 8),
            (34, 2, 16),
            (35, 1, 1),
            (36, 1, 1),
            (39, 1, 1),
            (40, 1, 2),
            (41, 1, 4),
            (42, 1, 8),
            (43, 1, 16),
            (44, 0, 1),
            (48, 0, 1),
        ];
        for &(bits, level, pages) in expect {
            let ipa = IpaBits::new(bits).unwrap();
            assert_eq!(
                (ipa.start_level(), ipa.root_table_pages()),
                (level, pages),
                "ipa_bits {bits}"
            );
        }
        assert_eq!(IpaBits::new(MIN_IPA_BITS - 1), None);
        assert_eq!(IpaBits::new(MAX_IPA_BITS + 1), None);
        for bits in MIN_IPA_BITS..=MAX_IPA_BITS {
            let p = IpaBits::new(bits).unwrap().root_table_pages();
            assert!(p.is_power_of_two() && p <= 16, "ipa_bits {bits}: {p}");
        }
    }
}
