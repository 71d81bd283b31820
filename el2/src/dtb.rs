//! The device tree: what the hypervisor learns from it, and the edited copy
//! it hands to the host.
//!
//! Reading uses the `fdt` crate; writing uses rust-vmm's `vm-fdt`. The edit
//! is a full copy of the tree in which every memory node loses the
//! hypervisor's range, so the host never learns that memory exists.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;
use vm_fdt::FdtWriter;

/// A physical address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte (saturating).
    #[must_use]
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// Whether `addr` lies inside.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// What the hypervisor needs to know about the board, from its device
/// tree. (Not [`crate::pkvm::platform::Platform`], the dispatcher's view of
/// the machine services.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Board {
    /// RAM regions as the firmware described them.
    pub memory: Vec<Region>,
    /// Base of the PL011 UART.
    pub uart: Option<u64>,
    /// GICv3 distributor and redistributor regions.
    pub gic: Vec<Region>,
    /// Whether `/psci` uses the SMC conduit.
    pub psci_smc: bool,
    /// The initrd, from `/chosen`.
    pub initrd: Option<Region>,
    /// The kernel command line, from `/chosen`.
    pub bootargs: Option<String>,
    /// MPIDR affinity of every CPU, in device-tree order (index = CPU number).
    pub cpus: Vec<u64>,
    /// One past the highest physical address the tree describes: memory
    /// nodes, every `reg` in the CPU's address space and every bus's
    /// `ranges` window (a PCIe host bridge's 64-bit window included). The
    /// host's IPA space need reach no further ([`Board::host_ipa_bits`]).
    pub address_end: u64,
}

impl Board {
    /// The host stage-2's IPA size: the fewest bits (at least 32) that
    /// cover [`Board::address_end`], at most the CPU's physical address
    /// size `cpu_pa_bits` (what lies beyond that the host cannot address).
    #[must_use]
    pub fn host_ipa_bits(&self, cpu_pa_bits: u8) -> u8 {
        let needed = match self.address_end {
            0..=1 => 0,
            end => 64 - (end - 1).leading_zeros(),
        };
        (needed as u8).clamp(32, cpu_pa_bits.max(32))
    }
}

/// Why the device tree could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The blob does not parse.
    Parse(String),
    /// It describes no RAM.
    NoMemory,
    /// Writing the edited copy failed.
    Write(String),
}

fn be_cells(bytes: &[u8], cells: usize) -> Option<(u64, &[u8])> {
    let len = cells.checked_mul(4)?;
    if bytes.len() < len || cells > 2 {
        return None;
    }
    let mut v = 0u64;
    for chunk in bytes[..len].chunks_exact(4) {
        v = (v << 32) | u64::from(u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
    }
    Some((v, &bytes[len..]))
}

/// Decodes a `reg` value with the given cell sizes.
#[must_use]
pub fn decode_reg(mut value: &[u8], addr_cells: usize, size_cells: usize) -> Vec<Region> {
    let mut out = Vec::new();
    while !value.is_empty() {
        let Some((base, rest)) = be_cells(value, addr_cells) else {
            break;
        };
        let Some((size, rest)) = be_cells(rest, size_cells) else {
            break;
        };
        out.push(Region { base, size });
        value = rest;
    }
    out
}

fn encode_reg(regions: &[Region], addr_cells: usize, size_cells: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for r in regions {
        for (v, cells) in [(r.base, addr_cells), (r.size, size_cells)] {
            if cells == 2 {
                out.extend_from_slice(&((v >> 32) as u32).to_be_bytes());
            }
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
    }
    out
}

/// `regions` with `[cut.base, cut.end())` removed.
#[must_use]
pub fn subtract(regions: &[Region], cut: Region) -> Vec<Region> {
    let mut out = Vec::new();
    for r in regions {
        if r.end() <= cut.base || r.base >= cut.end() {
            out.push(*r);
            continue;
        }
        if r.base < cut.base {
            out.push(Region {
                base: r.base,
                size: cut.base - r.base,
            });
        }
        if r.end() > cut.end() {
            out.push(Region {
                base: cut.end(),
                size: r.end() - cut.end(),
            });
        }
    }
    out
}

fn is_memory_node(node: &FdtNode<'_, '_>) -> bool {
    node.property("device_type")
        .and_then(|p| p.as_str())
        .is_some_and(|s| s == "memory")
}

/// A node's `#address-cells` and `#size-cells` for its children (2 and 1
/// when absent or malformed, the devicetree specification's defaults).
fn child_cells(node: &FdtNode<'_, '_>) -> (usize, usize) {
    let cell = |name: &str, default: usize| {
        node.property(name)
            .and_then(|p| <[u8; 4]>::try_from(p.value).ok())
            .map_or(default, |b| u32::from_be_bytes(b) as usize)
    };
    (cell("#address-cells", 2), cell("#size-cells", 1))
}

/// The end of the highest CPU physical address among `node`'s children,
/// whose `reg` uses `cells`: each child's `reg`; a child with `ranges`
/// maps its own children into this address space: an empty `ranges`
/// one-to-one (visited in turn), else its windows (child address, parent
/// address in `cells.0` cells, size), whose parent side counts. Children of
/// a node without `ranges` (CPUs, I2C devices) are not in this space.
fn highest_end(node: &FdtNode<'_, '_>, cells: (usize, usize), depth: usize) -> u64 {
    let mut end = 0u64;
    if depth > 16 {
        return end;
    }
    for child in node.children() {
        if let Some(reg) = child.property("reg") {
            for r in decode_reg(reg.value, cells.0, cells.1) {
                end = end.max(r.end());
            }
        }
        let inner = child_cells(&child);
        let Some(ranges) = child.property("ranges") else {
            continue;
        };
        if ranges.value.is_empty() {
            end = end.max(highest_end(&child, inner, depth + 1));
            continue;
        }
        let entry = (inner.0 + cells.0 + inner.1) * 4;
        if entry == 0 {
            continue;
        }
        for e in ranges.value.chunks_exact(entry) {
            let parent = &e[inner.0 * 4..];
            if let Some((base, rest)) = be_cells(parent, cells.0) {
                if let Some((size, _)) = be_cells(rest, inner.1) {
                    end = end.max(base.saturating_add(size));
                }
            }
        }
    }
    end
}

fn root_cells(fdt: &Fdt<'_>) -> (usize, usize) {
    let c = fdt.root().cell_sizes();
    (c.address_cells, c.size_cells)
}

fn prop_u64(node: &FdtNode<'_, '_>, name: &str) -> Option<u64> {
    let v = node.property(name)?.value;
    match v.len() {
        4 => Some(u64::from(u32::from_be_bytes(v.try_into().ok()?))),
        8 => Some(u64::from_be_bytes(v.try_into().ok()?)),
        _ => None,
    }
}

/// Reads what the hypervisor needs from a device tree blob.
pub fn parse(blob: &[u8]) -> Result<Board, Error> {
    let fdt = Fdt::new(blob).map_err(|e| Error::Parse(alloc::format!("{e:?}")))?;
    let (ac, sc) = root_cells(&fdt);
    let mut p = Board::default();
    for node in fdt.all_nodes() {
        if is_memory_node(&node) {
            if let Some(reg) = node.property("reg") {
                p.memory.extend(decode_reg(reg.value, ac, sc));
            }
        }
    }
    p.memory.retain(|r| r.size != 0);
    if p.memory.is_empty() {
        return Err(Error::NoMemory);
    }
    let first_reg = |node: FdtNode<'_, '_>| {
        node.property("reg")
            .map(|r| decode_reg(r.value, ac, sc))
            .unwrap_or_default()
    };
    p.uart = fdt
        .find_compatible(&["arm,pl011"])
        .and_then(|n| first_reg(n).first().map(|r| r.base));
    if let Some(gic) = fdt.find_compatible(&["arm,gic-v3"]) {
        p.gic = first_reg(gic);
    }
    p.psci_smc = fdt
        .find_node("/psci")
        .and_then(|n| n.property("method"))
        .and_then(|m| m.as_str())
        .is_some_and(|m| m == "smc");
    if let Some(chosen) = fdt.find_node("/chosen") {
        if let (Some(start), Some(end)) = (
            prop_u64(&chosen, "linux,initrd-start"),
            prop_u64(&chosen, "linux,initrd-end"),
        ) {
            if end > start {
                p.initrd = Some(Region {
                    base: start,
                    size: end - start,
                });
            }
        }
        p.bootargs = chosen
            .property("bootargs")
            .and_then(|b| b.as_str())
            .map(ToString::to_string);
    }
    for cpu in fdt.cpus() {
        p.cpus.push(cpu.ids().first() as u64);
    }
    let memory_end = p.memory.iter().map(Region::end).max().unwrap_or(0);
    let devices_end = fdt
        .find_node("/")
        .map_or(0, |root| highest_end(&root, child_cells(&root), 0));
    p.address_end = devices_end.max(memory_end);
    Ok(p)
}

fn copy_node(
    w: &mut FdtWriter,
    node: FdtNode<'_, '_>,
    name: &str,
    cells: (usize, usize),
    cut: Region,
) -> Result<(), vm_fdt::Error> {
    let memory = is_memory_node(&node);
    let mut reg = None;
    if memory {
        let regions = node
            .property("reg")
            .map(|r| decode_reg(r.value, cells.0, cells.1))
            .unwrap_or_default();
        let kept = subtract(&regions, cut);
        if kept.is_empty() {
            return Ok(()); // All of it belongs to the hypervisor.
        }
        reg = Some(encode_reg(&kept, cells.0, cells.1));
    }
    let handle = w.begin_node(name)?;
    for prop in node.properties() {
        match (&reg, prop.name) {
            (Some(r), "reg") => w.property("reg", r)?,
            _ => w.property(prop.name, prop.value)?,
        }
    }
    for child in node.children() {
        let child_name = child.name;
        copy_node(w, child, child_name, cells, cut)?;
    }
    w.end_node(handle)
}

/// A copy of `blob` with `cut` removed from every memory node.
pub fn without_range(blob: &[u8], cut: Region) -> Result<Vec<u8>, Error> {
    let fdt = Fdt::new(blob).map_err(|e| Error::Parse(alloc::format!("{e:?}")))?;
    let reservations: Vec<vm_fdt::FdtReserveEntry> = fdt
        .memory_reservations()
        .filter_map(|r| vm_fdt::FdtReserveEntry::new(r.address() as u64, r.size() as u64).ok())
        .collect();
    let werr = |e: vm_fdt::Error| Error::Write(alloc::format!("{e:?}"));
    let mut w = FdtWriter::new_with_mem_reserv(&reservations).map_err(werr)?;
    let root = fdt
        .find_node("/")
        .ok_or_else(|| Error::Parse("no root node".to_string()))?;
    copy_node(&mut w, root, "", root_cells(&fdt), cut).map_err(werr)?;
    w.finish().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tree shaped like QEMU virt's, with two NUMA memory nodes.
    fn sample() -> Vec<u8> {
        let mut w = FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let chosen = w.begin_node("chosen").unwrap();
        w.property_string("bootargs", "console=ttyAMA0 quiet")
            .unwrap();
        w.property_u64("linux,initrd-start", 0x4800_0000).unwrap();
        w.property_u64("linux,initrd-end", 0x4810_0000).unwrap();
        w.end_node(chosen).unwrap();
        for (base, size, nid) in [
            (0x4000_0000u64, 0x2000_0000u64, 0u32),
            (0x6000_0000, 0x2000_0000, 1),
        ] {
            let m = w.begin_node(&alloc::format!("memory@{base:x}")).unwrap();
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u64("reg", &[base, size]).unwrap();
            w.property_u32("numa-node-id", nid).unwrap();
            w.end_node(m).unwrap();
        }
        let psci = w.begin_node("psci").unwrap();
        w.property_string("method", "smc").unwrap();
        w.end_node(psci).unwrap();
        let uart = w.begin_node("pl011@9000000").unwrap();
        w.property_string_list(
            "compatible",
            alloc::vec!["arm,pl011".into(), "arm,primecell".into()],
        )
        .unwrap();
        w.property_array_u64("reg", &[0x900_0000, 0x1000]).unwrap();
        w.end_node(uart).unwrap();
        let cpus = w.begin_node("cpus").unwrap();
        w.property_u32("#address-cells", 1).unwrap();
        w.property_u32("#size-cells", 0).unwrap();
        for i in 0..2u32 {
            let c = w.begin_node(&alloc::format!("cpu@{i}")).unwrap();
            w.property_string("device_type", "cpu").unwrap();
            w.property_u32("reg", i).unwrap();
            w.end_node(c).unwrap();
        }
        w.end_node(cpus).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    /// A tree with QEMU virt's PCIe host bridge (3-cell child addresses,
    /// a 64-bit window from 512 GiB to 1 TiB), a bus with an empty
    /// `ranges` whose child sits at `bus_child`, and CPUs (not addresses).
    fn buses(bus_child: u64) -> Vec<u8> {
        let mut w = FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        let m = w.begin_node("memory@40000000").unwrap();
        w.property_string("device_type", "memory").unwrap();
        w.property_array_u64("reg", &[0x4000_0000, 0x8000_0000])
            .unwrap();
        w.end_node(m).unwrap();
        let pcie = w.begin_node("pcie@10000000").unwrap();
        w.property_u32("#address-cells", 3).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_array_u64("reg", &[0x40_1000_0000, 0x1000_0000])
            .unwrap();
        #[rustfmt::skip]
        w.property_array_u32("ranges", &[
            0x0100_0000, 0, 0, 0, 0x3eff_0000, 0, 0x1_0000,
            0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2eff_0000,
            0x0300_0000, 0x80, 0, 0x80, 0, 0x80, 0,
        ])
        .unwrap();
        w.end_node(pcie).unwrap();
        let bus = w.begin_node("intc@8000000").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        w.property_null("ranges").unwrap();
        w.property_array_u64("reg", &[0x800_0000, 0x1_0000])
            .unwrap();
        let its = w.begin_node("its").unwrap();
        w.property_array_u64("reg", &[bus_child, 0x2_0000]).unwrap();
        w.end_node(its).unwrap();
        w.end_node(bus).unwrap();
        let cpus = w.begin_node("cpus").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 0).unwrap();
        let c = w.begin_node("cpu@0").unwrap();
        w.property_string("device_type", "cpu").unwrap();
        w.property_u64("reg", 0xff_0000_0000).unwrap();
        w.end_node(c).unwrap();
        w.end_node(cpus).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn address_end_covers_ram_devices_and_bus_windows() {
        // The PCIe 64-bit window ends at 1 TiB: 40 bits.
        let b = parse(&buses(0x808_0000)).unwrap();
        assert_eq!(b.address_end, 1 << 40);
        assert_eq!(b.host_ipa_bits(48), 40);
        // Never more than the CPU's physical address size.
        assert_eq!(b.host_ipa_bits(36), 36);
        // A device behind a one-to-one bus counts.
        let b = parse(&buses(0x200_0000_0000)).unwrap();
        assert_eq!(b.address_end, 0x200_0002_0000);
        assert_eq!(b.host_ipa_bits(48), 42);
        // Only RAM and a UART below 4 GiB: the smallest IPA size, 32 bits.
        let b = parse(&sample()).unwrap();
        assert_eq!(b.address_end, 0x8000_0000);
        assert_eq!(b.host_ipa_bits(48), 32);
        let at = |end| Board {
            address_end: end,
            ..Board::default()
        };
        assert_eq!(at(1 << 32).host_ipa_bits(48), 32);
        assert_eq!(at((1 << 32) + 1).host_ipa_bits(48), 33);
        assert_eq!(at(1 << 39).host_ipa_bits(48), 39);
        assert_eq!(at(u64::MAX).host_ipa_bits(48), 48);
        assert_eq!(at(0).host_ipa_bits(48), 32);
    }

    #[test]
    fn parses_board() {
        let p = parse(&sample()).unwrap();
        assert_eq!(
            p.memory,
            [
                Region {
                    base: 0x4000_0000,
                    size: 0x2000_0000
                },
                Region {
                    base: 0x6000_0000,
                    size: 0x2000_0000
                }
            ]
        );
        assert_eq!(p.uart, Some(0x900_0000));
        assert!(p.psci_smc);
        assert_eq!(
            p.initrd,
            Some(Region {
                base: 0x4800_0000,
                size: 0x10_0000
            })
        );
        assert_eq!(p.bootargs.as_deref(), Some("console=ttyAMA0 quiet"));
        assert_eq!(p.cpus, [0, 1]);
    }

    #[test]
    fn edited_tree_hides_the_cut_and_keeps_the_rest() {
        let cut = Region {
            base: 0x4000_0000,
            size: 32 << 20,
        };
        let edited = without_range(&sample(), cut).unwrap();
        let p = parse(&edited).unwrap();
        assert_eq!(
            p.memory,
            [
                Region {
                    base: 0x4200_0000,
                    size: 0x2000_0000 - (32 << 20)
                },
                Region {
                    base: 0x6000_0000,
                    size: 0x2000_0000
                }
            ]
        );
        let orig = parse(&sample()).unwrap();
        assert_eq!(p.uart, orig.uart);
        assert_eq!(p.initrd, orig.initrd);
        assert_eq!(p.bootargs, orig.bootargs);
        assert_eq!(p.cpus, orig.cpus);
        let fdt = Fdt::new(&edited).unwrap();
        let m = fdt.find_node("/memory@40000000").unwrap();
        assert_eq!(m.property("numa-node-id").unwrap().as_usize(), Some(0));
    }

    #[test]
    fn subtract_cases() {
        let r = |base, size| Region { base, size };
        assert_eq!(subtract(&[r(0, 100)], r(200, 10)), [r(0, 100)]);
        assert_eq!(subtract(&[r(0, 100)], r(0, 10)), [r(10, 90)]);
        assert_eq!(subtract(&[r(0, 100)], r(40, 10)), [r(0, 40), r(50, 50)]);
        assert_eq!(subtract(&[r(0, 100)], r(0, 100)), []);
        assert_eq!(subtract(&[r(10, 10)], r(0, 100)), []);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(&[0u8; 64]).is_err());
        assert!(parse(&[]).is_err());
        assert!(without_range(&[0xd0, 0x0d, 0xfe, 0xed], Region { base: 0, size: 1 }).is_err());
    }

    #[test]
    fn reg_decoding() {
        let bytes = encode_reg(
            &[Region {
                base: 0x1_0000_0000,
                size: 0x2000,
            }],
            2,
            1,
        );
        assert_eq!(bytes.len(), 12);
        assert_eq!(
            decode_reg(&bytes, 2, 1),
            [Region {
                base: 0x1_0000_0000,
                size: 0x2000
            }]
        );
        assert_eq!(decode_reg(&bytes[..7], 2, 1), []);
    }
}
