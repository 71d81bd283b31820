//! VMSAv8-64 stage-2 descriptor encoding (4 KiB granule).
//!
//! Layout of a stage-2 descriptor as this crate writes it:
//!
//! | bits  | table descriptor      | block (L1/L2) / page (L3) descriptor        |
//! |-------|-----------------------|---------------------------------------------|
//! | 0     | valid = 1             | valid = 1                                   |
//! | 1     | 1 (table)             | 0 = block at L1/L2, 1 = page at L3          |
//! | 5:2   | entry count (11:2)    | MemAttr: `0b1111` Normal WB, `0b0001` Device-nGnRE |
//! | 7:6   | entry count           | S2AP: bit 6 = read, bit 7 = write           |
//! | 9:8   | entry count           | SH: `0b11` inner shareable                  |
//! | 10    | entry count           | AF (access flag)                            |
//! | 11    | entry count           | 0 (nG is not used at stage 2)               |
//! | 47:12 | next-level table      | output address                              |
//! | 54:53 | ignored               | XN: `0b10` = never execute, `0b00` = execute |
//! | 58:55 | ignored               | software: page state (bits 56:55)           |
//!
//! Page state in the software bits follows pKVM's `PKVM_PAGE_*`: Owned =
//! `0b00`, SharedOwned = `0b01` (SW0, bit 55), SharedBorrowed = `0b10`
//! (SW1, bit 56).
//!
//! Invalid descriptors (bit 0 clear) are always written as 0 outside of an
//! operation in progress; during a batched operation the page-table code may
//! park a pending value in an invalid descriptor (see [`PENDING`]).

use crate::addr::Hpa;
use crate::pgtable::{Attrs, MemType, PageState, Perms};

/// Bit 0: the descriptor is valid.
pub const VALID: u64 = 1 << 0;
/// Bit 1: table descriptor (levels 0..=2) or page descriptor (level 3).
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// Shift of MemAttr\[3:0\].
pub const MEMATTR_SHIFT: u32 = 2;
/// MemAttr field mask.
pub const MEMATTR_MASK: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr for Normal memory, inner and outer write-back cacheable.
pub const MEMATTR_NORMAL_WB: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr for Device-nGnRE memory.
pub const MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << MEMATTR_SHIFT;
/// S2AP\[0\]: read access.
pub const S2AP_R: u64 = 1 << 6;
/// S2AP\[1\]: write access.
pub const S2AP_W: u64 = 1 << 7;
/// SH = `0b11`: inner shareable.
pub const SH_INNER: u64 = 0b11 << 8;
/// Access flag.
pub const AF: u64 = 1 << 10;
/// Output / next-level table address, bits 47:12.
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// XN\[1:0\] = `0b10`: execute never at EL1 and EL0.
pub const XN: u64 = 0b10 << 53;
/// XN field mask (bits 54:53).
pub const XN_MASK: u64 = 0b11 << 53;
/// Shift of the software bits 58:55.
pub const SW_SHIFT: u32 = 55;
/// Software bits mask (58:55).
pub const SW_MASK: u64 = 0b1111 << SW_SHIFT;
/// Page state `SharedOwned` (SW0).
pub const SW_SHARED_OWNED: u64 = 0b01 << SW_SHIFT;
/// Page state `SharedBorrowed` (SW1).
pub const SW_SHARED_BORROWED: u64 = 0b10 << SW_SHIFT;
/// Mask of the page-state bits (56:55).
pub const SW_STATE_MASK: u64 = 0b11 << SW_SHIFT;
/// Permission bits of a leaf (S2AP and XN).
pub const PERMS_MASK: u64 = S2AP_R | S2AP_W | XN_MASK;

/// Shift of the entry count kept in a table descriptor's bits 11:2, which
/// hardware ignores in stage-2 table descriptors (4 KiB granule, 48-bit OA):
/// the number of valid entries in the next-level table. Lets an unmap tell
/// that a table became empty, and count the pages of a dropped table,
/// without scanning it.
pub const TABLE_COUNT_SHIFT: u32 = 2;
/// Mask of the entry count in a table descriptor (bits 11:2).
pub const TABLE_COUNT_MASK: u64 = 0x3ff << TABLE_COUNT_SHIFT;

/// Marker kept only in *invalid* descriptors while an operation is between
/// its break and make passes: "make this value valid". Never set in a valid
/// descriptor and never present once an operation returns.
pub const PENDING: u64 = 1 << 63;

/// A raw stage-2 descriptor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Descriptor(pub u64);

impl core::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Descriptor({:#018x})", self.0)
    }
}

/// The bits of a leaf descriptor other than the output address and the
/// block/page bit, for `attrs` with the access flag set.
#[must_use]
pub const fn leaf_attr_bits(attrs: Attrs) -> u64 {
    let mut bits = VALID | AF | SH_INNER | perm_bits(attrs.perms);
    bits |= match attrs.mem {
        MemType::Normal => MEMATTR_NORMAL_WB,
        MemType::Device => MEMATTR_DEVICE_NGNRE,
    };
    bits |= state_bits(attrs.state);
    bits
}

/// S2AP and XN bits for `perms`.
#[must_use]
pub const fn perm_bits(perms: Perms) -> u64 {
    let mut bits = 0;
    if perms.read {
        bits |= S2AP_R;
    }
    if perms.write {
        bits |= S2AP_W;
    }
    if !perms.exec {
        bits |= XN;
    }
    bits
}

/// Software bits for `state`.
#[must_use]
pub const fn state_bits(state: PageState) -> u64 {
    match state {
        PageState::Owned => 0,
        PageState::SharedOwned => SW_SHARED_OWNED,
        PageState::SharedBorrowed => SW_SHARED_BORROWED,
    }
}

impl Descriptor {
    /// The invalid descriptor.
    pub const INVALID: Self = Self(0);

    /// A table descriptor pointing at `table`.
    #[must_use]
    pub const fn table(table: Hpa) -> Self {
        Self((table.raw() & OA_MASK) | TABLE_OR_PAGE | VALID)
    }

    /// A table descriptor pointing at `table` whose `count` entries are
    /// valid (`count <= 512`).
    #[must_use]
    pub const fn table_with_count(table: Hpa, count: u64) -> Self {
        Self(Self::table(table).0 | ((count << TABLE_COUNT_SHIFT) & TABLE_COUNT_MASK))
    }

    /// The valid-entry count kept in a table descriptor.
    #[must_use]
    pub const fn table_count(self) -> u64 {
        (self.0 & TABLE_COUNT_MASK) >> TABLE_COUNT_SHIFT
    }

    /// A leaf at `level` (1 or 2: block, 3: page) mapping `hpa` with
    /// `attrs`, access flag set.
    #[must_use]
    pub const fn leaf(level: u8, hpa: Hpa, attrs: Attrs) -> Self {
        let page = if level == 3 { TABLE_OR_PAGE } else { 0 };
        Self((hpa.raw() & OA_MASK) | page | leaf_attr_bits(attrs))
    }

    /// The raw value.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Whether bit 0 is set.
    #[must_use]
    pub const fn is_valid(self) -> bool {
        self.0 & VALID != 0
    }

    /// Whether this is a valid table descriptor at `level` (0..=2).
    #[must_use]
    pub const fn is_table(self, level: u8) -> bool {
        level < 3 && self.0 & (VALID | TABLE_OR_PAGE) == (VALID | TABLE_OR_PAGE)
    }

    /// Whether this is a valid block (level 1, 2) or page (level 3) descriptor.
    #[must_use]
    pub const fn is_leaf(self, level: u8) -> bool {
        if level == 3 {
            self.0 & (VALID | TABLE_OR_PAGE) == (VALID | TABLE_OR_PAGE)
        } else {
            self.0 & (VALID | TABLE_OR_PAGE) == VALID
        }
    }

    /// Output address (leaf) or next-level table address (table).
    #[must_use]
    pub const fn address(self) -> Hpa {
        Hpa::new(self.0 & OA_MASK)
    }

    /// Access permissions of a leaf.
    #[must_use]
    pub const fn perms(self) -> Perms {
        Perms {
            read: self.0 & S2AP_R != 0,
            write: self.0 & S2AP_W != 0,
            exec: self.0 & XN_MASK == 0,
        }
    }

    /// Memory type of a leaf.
    #[must_use]
    pub const fn mem_type(self) -> MemType {
        if self.0 & MEMATTR_MASK == MEMATTR_NORMAL_WB {
            MemType::Normal
        } else {
            MemType::Device
        }
    }

    /// Page state of a leaf. The reserved encoding `0b11` (never written by
    /// this crate) reads as `SharedBorrowed`, the least privileged view.
    #[must_use]
    pub const fn state(self) -> PageState {
        match (self.0 & SW_STATE_MASK) >> SW_SHIFT {
            0 => PageState::Owned,
            1 => PageState::SharedOwned,
            _ => PageState::SharedBorrowed,
        }
    }

    /// Attributes of a leaf.
    #[must_use]
    pub const fn attrs(self) -> Attrs {
        Attrs {
            perms: self.perms(),
            mem: self.mem_type(),
            state: self.state(),
        }
    }

    /// Access flag.
    #[must_use]
    pub const fn young(self) -> bool {
        self.0 & AF != 0
    }

    /// The same leaf with its permissions replaced.
    #[must_use]
    pub const fn with_perms(self, perms: Perms) -> Self {
        Self((self.0 & !PERMS_MASK) | perm_bits(perms))
    }

    /// The same leaf with its page state replaced.
    #[must_use]
    pub const fn with_state(self, state: PageState) -> Self {
        Self((self.0 & !SW_STATE_MASK) | state_bits(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORMAL_RWX: Attrs = Attrs {
        perms: Perms::RWX,
        mem: MemType::Normal,
        state: PageState::Owned,
    };

    #[test]
    fn page_normal_rwx_owned() {
        let d = Descriptor::leaf(3, Hpa::new(0x1234_5000), NORMAL_RWX);
        // valid | page | MemAttr 1111 | S2AP 11 | SH 11 | AF | OA
        assert_eq!(d.raw(), 0x1234_5000 | 0b11 | 0x3c | 0xc0 | 0x300 | 0x400);
        assert_eq!(d.raw(), 0x1234_57ff);
        assert!(d.is_leaf(3));
        // The same low bits at level 2 would be a table descriptor.
        assert!(!d.is_leaf(2) && d.is_table(2));
        assert_eq!(d.attrs(), NORMAL_RWX);
        assert_eq!(d.address(), Hpa::new(0x1234_5000));
        assert!(d.young());
    }

    #[test]
    fn block_device_ro_xn_borrowed() {
        let attrs = Attrs {
            perms: Perms::R,
            mem: MemType::Device,
            state: PageState::SharedBorrowed,
        };
        let d = Descriptor::leaf(2, Hpa::new(0x4020_0000), attrs);
        let expect = 0x4020_0000
            | 0b01
            | (0b0001 << 2)
            | (1 << 6)
            | (0b11 << 8)
            | (1 << 10)
            | (1 << 54)
            | (1 << 56);
        assert_eq!(d.raw(), expect);
        assert_eq!(d.raw(), 0x0140_0000_4020_0745);
        assert!(d.is_leaf(2));
        assert!(!d.is_leaf(3));
        assert_eq!(d.attrs(), attrs);
    }

    #[test]
    fn shared_owned_write_only_bits() {
        let attrs = Attrs {
            perms: Perms {
                read: false,
                write: true,
                exec: true,
            },
            mem: MemType::Normal,
            state: PageState::SharedOwned,
        };
        let d = Descriptor::leaf(1, Hpa::new(0x8000_0000), attrs);
        assert_eq!(
            d.raw(),
            0x8000_0000 | 1 | 0x3c | 0x80 | 0x300 | 0x400 | (1 << 55)
        );
        assert_eq!(d.state(), PageState::SharedOwned);
        assert_eq!(d.perms(), attrs.perms);
    }

    #[test]
    fn table_descriptor() {
        let d = Descriptor::table(Hpa::new(0x8000_3000));
        assert_eq!(d.raw(), 0x8000_3003);
        assert!(d.is_table(0) && d.is_table(1) && d.is_table(2));
        // The same bit pattern at level 3 is a page.
        assert!(d.is_leaf(3));
        assert_eq!(d.address(), Hpa::new(0x8000_3000));
    }

    #[test]
    fn with_perms_and_state_touch_only_their_bits() {
        let d = Descriptor::leaf(3, Hpa::new(0x5000), NORMAL_RWX);
        let r = d.with_perms(Perms::R);
        assert_eq!(r.raw() ^ d.raw(), S2AP_W | XN);
        assert_eq!(r.perms(), Perms::R);
        let s = d.with_state(PageState::SharedBorrowed);
        assert_eq!(s.raw() ^ d.raw(), 1 << 56);
        assert_eq!(s.with_state(PageState::Owned), d);
        assert!(!Descriptor::INVALID.is_valid());
    }

    #[test]
    fn xn_encoding_is_0b10() {
        assert_eq!(XN, 0x0040_0000_0000_0000);
        assert_eq!(perm_bits(Perms::RX), S2AP_R);
        assert_eq!(perm_bits(Perms::RW), S2AP_R | S2AP_W | XN);
    }
}
