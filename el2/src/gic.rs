//! The GICv3 facts el2 relies on, in one place: the redistributor frames
//! and how a CPU finds its own (its GICR_TYPER affinity equals its MPIDR's),
//! and the interrupt that carries the host's timer deadline while a guest
//! runs. The binary's `arch` reads the frames; the walk is here, tested on
//! the build machine.

/// Bytes between two redistributors of a GICv3 region (RD + SGI frames).
pub const GICR_STRIDE: u64 = 0x2_0000;
/// GICR_TYPER, in the RD frame.
pub const GICR_TYPER: u64 = 0x8;
/// GICR_TYPER.Last: the last redistributor of the region.
pub const GICR_TYPER_LAST: u64 = 1 << 4;
/// The SGI/PPI frame, after the RD frame.
pub const GICR_SGI_FRAME: u64 = 0x1_0000;
/// GICR_ISENABLER0, in the SGI frame.
pub const GICR_ISENABLER0: u64 = 0x100;
/// The EL2 physical timer's interrupt (PPI).
pub const HYP_TIMER_PPI: u32 = 26;

/// Whether a GICR_TYPER (affinity in bits 63:32 as Aff3.Aff2.Aff1.Aff0)
/// belongs to the CPU with this MPIDR.
#[must_use]
pub fn typer_matches(typer: u64, mpidr: u64) -> bool {
    let aff = (mpidr & 0xff_ffff) | ((mpidr >> 8) & 0xff00_0000);
    typer >> 32 == aff
}

/// The redistributor (RD frame address) of the CPU with `mpidr` in the
/// GICR region `[base, base + size)`, reading each frame's GICR_TYPER with
/// `read_typer(rd)`; stops at the frame marked Last or the region's end.
pub fn find_redistributor(
    base: u64,
    size: u64,
    mpidr: u64,
    mut read_typer: impl FnMut(u64) -> u64,
) -> Option<u64> {
    let end = base.checked_add(size)?;
    let mut rd = base;
    while rd.checked_add(GICR_STRIDE)? <= end {
        let typer = read_typer(rd);
        if typer_matches(typer, mpidr) {
            return Some(rd);
        }
        if typer & GICR_TYPER_LAST != 0 {
            return None;
        }
        rd += GICR_STRIDE;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redistributor_affinity() {
        // MPIDR Aff3 = 1 (bits 39:32), Aff2 = 2, Aff1 = 3, Aff0 = 4, bit 31 RES1.
        let mpidr = (1 << 32) | (1 << 31) | (2 << 16) | (3 << 8) | 4;
        assert!(typer_matches(0x0102_0304 << 32 | GICR_TYPER_LAST, mpidr));
        assert!(!typer_matches(0x0102_0305 << 32, mpidr));
        assert!(typer_matches(1 << 32, 0x8000_0001));
        assert!(!typer_matches(1 << 32, 0x8000_0100));
    }

    #[test]
    fn walk_stops_at_last_and_at_the_end() {
        let base = 0x80a_0000;
        // Three redistributors for CPUs 0, 1, 2; the third is Last.
        let typer = |rd: u64| {
            let i = (rd - base) / GICR_STRIDE;
            i << 32 | if i == 2 { GICR_TYPER_LAST } else { 0 }
        };
        let size = 8 * GICR_STRIDE;
        assert_eq!(
            find_redistributor(base, size, 0x8000_0001, typer),
            Some(base + GICR_STRIDE)
        );
        assert_eq!(find_redistributor(base, size, 3, typer), None, "after Last");
        assert_eq!(
            find_redistributor(base, 2 * GICR_STRIDE, 2, typer),
            None,
            "beyond the region"
        );
        assert_eq!(find_redistributor(u64::MAX - 4, 8, 0, typer), None);
    }
}
