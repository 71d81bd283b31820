//! IPA-space geometry and `VTCR_EL2` for the 4 KiB granule.
//!
//! Like Linux (`kvm_get_vtcr`, `stage2_pgtable_levels(ipa) =
//! ARM64_HW_PGTABLE_LEVELS(ipa - 4)`), a stage-2 uses as few levels as
//! possible, resolving up to 4 extra bits with up to 16 concatenated tables
//! at the start level instead of adding a level:
//!
//! | IPA bits | start level | root tables |
//! |----------|-------------|-------------|
//! | 32       | 2           | 4           |
//! | 33       | 2           | 8           |
//! | 34       | 2           | 16          |
//! | 35..=39  | 1           | 1           |
//! | 40       | 1           | 2           |
//! | 41       | 1           | 4           |
//! | 42       | 1           | 8           |
//! | 43       | 1           | 16          |
//! | 44..=48  | 0           | 1           |

use crate::pgtable::{Error, IpaConfig};

/// `VTCR_EL2.T0SZ` shift.
pub const VTCR_T0SZ_SHIFT: u32 = 0;
/// `VTCR_EL2.SL0` shift.
pub const VTCR_SL0_SHIFT: u32 = 6;
/// `VTCR_EL2.IRGN0` = `0b01`: inner write-back read/write-allocate walks.
pub const VTCR_IRGN0_WBWA: u64 = 0b01 << 8;
/// `VTCR_EL2.ORGN0` = `0b01`: outer write-back read/write-allocate walks.
pub const VTCR_ORGN0_WBWA: u64 = 0b01 << 10;
/// `VTCR_EL2.SH0` = `0b11`: inner shareable walks.
pub const VTCR_SH0_INNER: u64 = 0b11 << 12;
/// `VTCR_EL2.TG0` = `0b00`: 4 KiB granule.
pub const VTCR_TG0_4K: u64 = 0b00 << 14;
/// `VTCR_EL2.PS` shift.
pub const VTCR_PS_SHIFT: u32 = 16;
/// `VTCR_EL2.VS`: 16-bit VMIDs. Not set by [`vtcr_el2`]; OR it in when the
/// CPU supports 16-bit VMIDs (`ID_AA64MMFR1_EL1.VMIDBits == 0b0010`).
pub const VTCR_VS: u64 = 1 << 19;
/// `VTCR_EL2` bit 31 is RES1.
pub const VTCR_RES1: u64 = 1 << 31;

/// Smallest supported IPA size.
pub const MIN_IPA_BITS: u8 = 32;
/// Largest supported IPA size.
pub const MAX_IPA_BITS: u8 = 48;
/// Largest output address size (bits) this crate's descriptors encode.
pub const MAX_PA_BITS: u8 = 48;
/// Largest `ID_AA64MMFR0_EL1.PARange` value used: `0b0101`, 48 bits. Larger
/// values (52 bits) need FEAT_LPA2 descriptors and are clamped to this, as
/// Linux does without LPA2.
pub const MAX_PA_RANGE: u8 = 5;

/// Physical address size in bits for a `PARange` / `VTCR_EL2.PS` encoding,
/// after clamping to [`MAX_PA_RANGE`].
#[must_use]
pub const fn pa_range_bits(pa_range: u8) -> u8 {
    match pa_range {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        _ => 48,
    }
}

impl IpaConfig {
    /// The geometry for an `ipa_bits` IPA space, or [`Error::BadConfig`]
    /// outside `32..=48`.
    pub const fn new(ipa_bits: u8) -> Result<Self, Error> {
        if ipa_bits < MIN_IPA_BITS || ipa_bits > MAX_IPA_BITS {
            return Err(Error::BadConfig);
        }
        // Levels needed if the root may resolve up to 9 + 4 bits.
        let levels = (ipa_bits - 8) / 9;
        let start_level = 4 - levels;
        // Bits resolved by the start level (all of them, across concatenated tables).
        let root_bits = ipa_bits - (12 + 9 * (3 - start_level));
        let root_tables = if root_bits > 9 {
            1usize << (root_bits - 9)
        } else {
            1
        };
        Ok(Self {
            ipa_bits,
            start_level,
            root_tables,
        })
    }

    /// Size of the IPA space in bytes.
    #[must_use]
    pub const fn ipa_size(&self) -> u64 {
        1u64 << self.ipa_bits
    }

    /// Number of valid entries across the concatenated root tables.
    #[must_use]
    pub const fn root_entries(&self) -> usize {
        let root_bits = self.ipa_bits - (12 + 9 * (3 - self.start_level));
        1usize << root_bits
    }

    /// `VTCR_EL2.T0SZ`.
    #[must_use]
    pub const fn t0sz(&self) -> u8 {
        64 - self.ipa_bits
    }

    /// `VTCR_EL2.SL0` for the 4 KiB granule: 2 = level 0, 1 = level 1,
    /// 0 = level 2.
    #[must_use]
    pub const fn sl0(&self) -> u8 {
        2 - self.start_level
    }
}

/// `VTCR_EL2` for `config` with output size `pa_range` (the
/// `ID_AA64MMFR0_EL1.PARange` encoding, clamped to 48 bits): T0SZ, SL0,
/// write-back inner-shareable walks, 4 KiB granule, PS and RES1.
///
/// Fails with [`Error::BadConfig`] if the IPA space is larger than the PA
/// range (Linux refuses such a VM as well).
pub const fn vtcr_el2(config: IpaConfig, pa_range: u8) -> Result<u64, Error> {
    let ps = if pa_range > MAX_PA_RANGE {
        MAX_PA_RANGE
    } else {
        pa_range
    };
    if config.ipa_bits > pa_range_bits(ps) {
        return Err(Error::BadConfig);
    }
    Ok(VTCR_RES1
        | ((ps as u64) << VTCR_PS_SHIFT)
        | VTCR_TG0_4K
        | VTCR_SH0_INNER
        | VTCR_ORGN0_WBWA
        | VTCR_IRGN0_WBWA
        | ((config.sl0() as u64) << VTCR_SL0_SHIFT)
        | ((config.t0sz() as u64) << VTCR_T0SZ_SHIFT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bits: u8) -> (u8, usize) {
        let c = IpaConfig::new(bits).unwrap();
        assert_eq!(c.ipa_bits, bits);
        (c.start_level, c.root_tables)
    }

    #[test]
    fn geometry_follows_linux() {
        assert_eq!(cfg(32), (2, 4));
        assert_eq!(cfg(33), (2, 8));
        assert_eq!(cfg(34), (2, 16));
        assert_eq!(cfg(35), (1, 1));
        assert_eq!(cfg(36), (1, 1));
        assert_eq!(cfg(39), (1, 1));
        assert_eq!(cfg(40), (1, 2));
        assert_eq!(cfg(42), (1, 8));
        assert_eq!(cfg(43), (1, 16));
        assert_eq!(cfg(44), (0, 1));
        assert_eq!(cfg(48), (0, 1));
        assert_eq!(IpaConfig::new(31), Err(Error::BadConfig));
        assert_eq!(IpaConfig::new(49), Err(Error::BadConfig));
        assert_eq!(IpaConfig::new(36).unwrap().root_entries(), 64);
        assert_eq!(IpaConfig::new(40).unwrap().root_entries(), 1024);
    }

    #[test]
    fn every_size_resolves_exactly_its_bits() {
        for bits in MIN_IPA_BITS..=MAX_IPA_BITS {
            let c = IpaConfig::new(bits).unwrap();
            assert!(c.root_tables >= 1 && c.root_tables <= 16);
            let covered =
                12 + 9 * (3 - u32::from(c.start_level)) + c.root_entries().trailing_zeros();
            assert_eq!(covered, u32::from(bits));
            // No extra level where concatenating <= 16 tables one level
            // down would do: the root then resolves more than 4 bits.
            if c.start_level < 2 {
                assert!(c.root_entries().trailing_zeros() > 4, "{bits}");
            }
        }
    }

    #[test]
    fn vtcr_known_values() {
        // 40-bit IPA, 40-bit PA: the classic KVM value.
        assert_eq!(vtcr_el2(IpaConfig::new(40).unwrap(), 2), Ok(0x8002_3558));
        // 48-bit IPA, 48-bit PA: T0SZ 16, SL0 2 (level 0), PS 5.
        assert_eq!(vtcr_el2(IpaConfig::new(48).unwrap(), 5), Ok(0x8005_3590));
        // 32-bit IPA, 32-bit PA: T0SZ 32, SL0 0 (level 2), PS 0.
        assert_eq!(vtcr_el2(IpaConfig::new(32).unwrap(), 0), Ok(0x8000_3520));
        // 36-bit IPA on a 44-bit PA CPU: T0SZ 28, SL0 1, PS 4.
        assert_eq!(vtcr_el2(IpaConfig::new(36).unwrap(), 4), Ok(0x8004_355c));
        // 52-bit PARange is clamped to 48.
        assert_eq!(vtcr_el2(IpaConfig::new(48).unwrap(), 6), Ok(0x8005_3590));
    }

    #[test]
    fn vtcr_rejects_ipa_larger_than_pa() {
        assert_eq!(
            vtcr_el2(IpaConfig::new(44).unwrap(), 2),
            Err(Error::BadConfig)
        );
        assert_eq!(
            vtcr_el2(IpaConfig::new(40).unwrap(), 0),
            Err(Error::BadConfig)
        );
    }
}
