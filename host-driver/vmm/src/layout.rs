//! Where things are in the guest: the RAM window, the image, the tested
//! memory, the guest payload's argument, and the arm64 Image header.
//!
//! Guest RAM starts at IPA [`RAM_BASE`] (`qemu/guest`'s `GUEST_RAM_BASE`);
//! the image is copied to `RAM_BASE + 0x8_0000`, and the memory the payload
//! tests starts at the first 2 MiB boundary after the image, which
//! [`Image::parse`] checks is [`TEST_OFFSET`]. The VM's memory is one slot
//! of `TEST_OFFSET + tested bytes` backed by one host mapping.

use core::fmt;

use guest::{Arg, Mode};

use crate::args::GuestMode;

/// IPA of guest RAM (slot 0 and the VM's memory window start here).
pub const RAM_BASE: u64 = guest::GUEST_RAM_BASE;
/// Offset of the image in guest RAM.
pub const IMAGE_OFFSET: u64 = guest::GUEST_IMAGE_BASE - guest::GUEST_RAM_BASE;
/// Offset of the tested memory in guest RAM.
pub const TEST_OFFSET: u64 = guest::TEST_ALIGN;
/// IPA size the VM is created with (the payload's stage 1 uses 40-bit IPs).
pub const IPA_BITS: u32 = 40;
/// Host page size.
pub const PAGE: u64 = 4096;
/// The MMIO test device: IPA and size of the window the VMM emulates.
pub const MMIO_BASE: u64 = guest::MMIO_TEST_BASE;
/// Bytes of the MMIO test device window.
pub const MMIO_SIZE: u64 = 0x1000;

/// A byte range of the tested memory (offsets from its start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl Range {
    /// One past the last byte, if it does not overflow.
    #[must_use]
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }

    /// Whether both ends are page aligned.
    #[must_use]
    pub fn is_page_aligned(&self) -> bool {
        self.offset.is_multiple_of(PAGE) && self.len.is_multiple_of(PAGE)
    }

    /// Pages in the range.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.offset, self.len)
    }
}

/// `64M`, `1G`, `4K`, `4096` (bytes) -> bytes.
#[must_use]
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s.get(..digits)?.parse().ok()?;
    let shift = match s.get(digits..)?.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The parts of an arm64 Image header the VMM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// `image_size`: bytes the image occupies in memory, bss included.
    pub size: u64,
    /// `res4`: offset of the payload's secondary-vCPU entry (0: none).
    pub secondary_offset: u64,
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than the header or no magic.
    #[error("not an arm64 Image (no ARM\\x64 magic at offset 56)")]
    NotImage,
    /// Bigger than the room before the tested memory.
    #[error("the image needs {0:#x} bytes; at most {max:#x} fit before the tested memory", max = TEST_OFFSET - IMAGE_OFFSET)]
    TooLarge(u64),
    /// The file is larger than its header says.
    #[error("the file has {file:#x} bytes but the header says {header:#x}")]
    FileSize {
        /// File length.
        file: u64,
        /// `image_size`.
        header: u64,
    },
    /// The secondary entry offset is outside the image or misaligned.
    #[error("secondary entry offset {0:#x} is outside the image or not 4-byte aligned")]
    Secondary(u64),
}

impl Image {
    /// Checks the header of `data`.
    pub fn parse(data: &[u8]) -> Result<Self, ImageError> {
        let word = |off: usize| -> Option<u64> {
            let b: [u8; 8] = data.get(off..off + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        let magic = data.get(56..60).ok_or(ImageError::NotImage)?;
        if magic != b"ARM\x64" {
            return Err(ImageError::NotImage);
        }
        let size = word(16).ok_or(ImageError::NotImage)?;
        let secondary_offset = word(48).ok_or(ImageError::NotImage)?;
        if size == 0 || size > TEST_OFFSET - IMAGE_OFFSET {
            return Err(ImageError::TooLarge(size));
        }
        let file = data.len() as u64;
        if file > size {
            return Err(ImageError::FileSize { file, header: size });
        }
        if secondary_offset >= size || !secondary_offset.is_multiple_of(4) {
            return Err(ImageError::Secondary(secondary_offset));
        }
        Ok(Self {
            size,
            secondary_offset,
        })
    }

    /// IPA of vCPU 0's entry.
    #[must_use]
    pub fn entry(&self) -> u64 {
        RAM_BASE + IMAGE_OFFSET
    }

    /// IPA where other vCPUs enter (with x0 = their index), if the image has one.
    #[must_use]
    pub fn secondary_entry(&self) -> Option<u64> {
        (self.secondary_offset != 0).then(|| self.entry() + self.secondary_offset)
    }
}

/// The guest's memory plan for one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What the payload does and on how many vCPUs.
    pub mode: GuestMode,
    /// vCPUs.
    pub vcpus: u32,
    /// Tested bytes per "unit" (touch: per vCPU; otherwise in total).
    pub mem: u64,
    /// Touch: reports, log2 passes per report.
    pub reports: u16,
    /// Touch: log2 passes per report.
    pub passes_log2: u8,
}

impl Plan {
    /// Bytes of tested memory in total.
    #[must_use]
    pub fn tested_bytes(&self) -> u64 {
        match self.mode {
            GuestMode::Touch => self.mem * u64::from(self.vcpus),
            GuestMode::Exits | GuestMode::Hostile => 0,
            GuestMode::Fill => self.mem,
        }
    }

    /// Bytes of guest RAM: the image area plus the tested memory.
    #[must_use]
    pub fn ram_bytes(&self) -> u64 {
        TEST_OFFSET + self.tested_bytes().max(PAGE)
    }

    /// The payload's argument (vCPU 0's x0).
    #[must_use]
    pub fn arg(&self) -> u64 {
        let mib = u16::try_from(self.mem >> 20).unwrap_or(guest::MAX_MIB);
        let a = match (self.mode, self.vcpus) {
            (GuestMode::Fill, 1) => Arg {
                mib,
                ..Arg::new(Mode::Fill)
            },
            (GuestMode::Fill, _) => Arg {
                mib,
                ..Arg::new(Mode::Smp)
            },
            (GuestMode::Touch, _) => Arg {
                mib,
                reports: self.reports,
                passes_log2: self.passes_log2,
                ..Arg::new(Mode::Touch)
            },
            (GuestMode::Exits, _) => Arg::new(Mode::Exits),
            (GuestMode::Hostile, _) => Arg::new(Mode::Hostile),
        };
        a.encode()
    }

    /// How vCPU `i` starts: vCPU 0 at the entry with the argument; in touch
    /// mode the others at the secondary entry with their index (once vCPU 0
    /// has published the argument); in the SMP fill powered off until vCPU
    /// 0's PSCI CPU_ON.
    #[must_use]
    pub fn start(&self, i: u32, image: &Image) -> Start {
        match (i, self.mode, image.secondary_entry()) {
            (0, _, _) => Start::On {
                entry: image.entry(),
                x0: self.arg(),
            },
            (_, GuestMode::Touch, Some(entry)) => Start::AfterFirstLine {
                entry,
                x0: u64::from(i),
            },
            _ => Start::Off,
        }
    }
}

/// How a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Powered on at `entry` with `x0`.
    On {
        /// Entry IPA.
        entry: u64,
        /// x0.
        x0: u64,
    },
    /// Powered on at `entry` with `x0`, but run only after vCPU 0 printed its
    /// first console line (the payload's other vCPUs read the argument vCPU
    /// 0 stores before it prints).
    AfterFirstLine {
        /// Entry IPA.
        entry: u64,
        /// x0.
        x0: u64,
    },
    /// Powered off (`S2PIN_VCPU_START_OFF`).
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64, res4: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[16..24].copy_from_slice(&size.to_le_bytes());
        h[48..56].copy_from_slice(&res4.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None);
    }

    #[test]
    fn image_headers_are_checked() {
        let img = Image::parse(&header(0x4000, 0x100)).unwrap();
        assert_eq!(img.entry(), 0x4008_0000);
        assert_eq!(img.secondary_entry(), Some(0x4008_0100));
        assert_eq!(
            Image::parse(&header(0x4000, 0)).unwrap().secondary_entry(),
            None
        );
        assert_eq!(Image::parse(&[0; 10]), Err(ImageError::NotImage));
        let mut bad = header(0x4000, 0);
        bad[56] = b'X';
        assert_eq!(Image::parse(&bad), Err(ImageError::NotImage));
        assert_eq!(
            Image::parse(&header(0x18_0001, 0)),
            Err(ImageError::TooLarge(0x18_0001))
        );
        assert_eq!(Image::parse(&header(0, 0)), Err(ImageError::TooLarge(0)));
        assert_eq!(
            Image::parse(&header(32, 0)),
            Err(ImageError::FileSize {
                file: 64,
                header: 32
            })
        );
        assert_eq!(
            Image::parse(&header(0x4000, 0x4000)),
            Err(ImageError::Secondary(0x4000))
        );
        assert_eq!(
            Image::parse(&header(0x4000, 2)),
            Err(ImageError::Secondary(2))
        );
    }

    #[test]
    fn plans_give_the_payload_its_argument() {
        let img = Image::parse(&header(0x4000, 0x100)).unwrap();
        let fill = Plan {
            mode: GuestMode::Fill,
            vcpus: 1,
            mem: 64 << 20,
            reports: 0,
            passes_log2: 0,
        };
        assert_eq!(fill.arg(), 1 | 64 << 16);
        assert_eq!(fill.ram_bytes(), (2 + 64) << 20);
        let smp = Plan { vcpus: 2, ..fill };
        assert_eq!(Arg::decode(smp.arg()).unwrap().mode, Mode::Smp);
        assert_eq!(smp.start(1, &img), Start::Off);
        let touch = Plan {
            mode: GuestMode::Touch,
            vcpus: 3,
            mem: 4 << 20,
            reports: 5,
            passes_log2: 2,
        };
        let a = Arg::decode(touch.arg()).unwrap();
        assert_eq!(
            (a.mode, a.mib, a.reports, a.passes_log2),
            (Mode::Touch, 4, 5, 2)
        );
        assert_eq!(touch.ram_bytes(), (2 + 12) << 20);
        assert_eq!(
            touch.start(2, &img),
            Start::AfterFirstLine {
                entry: 0x4008_0100,
                x0: 2
            }
        );
        assert_eq!(
            touch.start(0, &img),
            Start::On {
                entry: 0x4008_0000,
                x0: touch.arg()
            }
        );
        let exits = Plan {
            mode: GuestMode::Exits,
            ..fill
        };
        assert_eq!(Arg::decode(exits.arg()).unwrap().mode, Mode::Exits);
        assert_eq!(exits.ram_bytes(), (2 << 20) + PAGE);
    }
}
