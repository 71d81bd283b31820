//! The command line (clap) and its validation into a [`Config`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::layout::{self, Range};

/// Most vCPUs the guest payload supports (its stacks).
pub const MAX_VCPUS: u32 = guest::MAX_VCPUS as u32;

/// How guest memory is backed in the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backing {
    /// Private anonymous memory with `MADV_NOHUGEPAGE` (4 KiB pages).
    Anon,
    /// Private anonymous memory with `MADV_HUGEPAGE` (2 MiB THP where possible).
    Thp,
    /// A `memfd_create` file mapped `MAP_SHARED` (shmem).
    Memfd,
}

/// The module's MMU-notifier policy for the VM (`S2PIN_POLICY_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Unmap only pages whose host PTE really became PROT_NONE (the default).
    Confirm,
    /// Unmap on every protection event, as KVM does.
    Eager,
    /// As confirm, but keep pinned pages of accessible VMAs mapped.
    Keep,
}

/// The hypervisor device s2vmm runs the guest on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// `/dev/s2pin`: the s2pin module under el2 (pinned guest memory).
    S2pin,
    /// `/dev/kvm`: stock KVM (the kernel booted at EL2 runs it); the payload
    /// then uses the UART console and PSCI power-off; no pinning counters.
    Kvm,
}

/// What the guest payload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestMode {
    /// Fill and verify the memory (one vCPU), or both halves on two vCPUs.
    Fill,
    /// Touch the memory in a loop, reporting pass counts (each vCPU its own part).
    Touch,
    /// Make each kind of exit once (MMIO test device, PSCI, WFI, console).
    Exits,
    /// Malformed guest calls.
    Hostile,
}

/// A change to guest memory that a VMM thread makes while the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// `madvise(MADV_DONTNEED)`: the pages are dropped, later reads see zeros.
    DontNeed(Range),
    /// `munmap` then a fresh anonymous `mmap` at the same address (vCPUs paused meanwhile).
    Munmap(Range),
    /// `mprotect` to this protection; a guest access it forbids exits to the VMM,
    /// which then restores read-write and runs the guest again.
    Mprotect(Range, Prot),
}

/// A host protection for `--mprotect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    /// `PROT_READ`.
    ReadOnly,
    /// `PROT_NONE`.
    None,
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "s2vmm",
    version,
    color = clap::ColorChoice::Never,
    about = "Run the pinned-s2 guest payload on /dev/s2pin",
    long_about = "Runs the bare-metal guest payload (qemu/guest) in a VM of the s2pin host module: \
                  one thread per vCPU, the payload's console and MMIO test device emulated, the \
                  pinning counters printed at the end. Exit status: the guest's (0 when it passed), \
                  1 for any error, 2 for a bad command line."
)]
pub struct Cli {
    /// The guest payload image (an arm64 Image, `build/guest.bin`).
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// Memory the guest tests, e.g. 64M or 1G (per vCPU in touch mode); the VM gets 2 MiB more for the image.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs, 1 to 4 (fill: 1 or 2).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// How guest memory is backed.
    #[arg(long, value_enum, default_value_t = Backing::Anon)]
    pub backing: Backing,
    /// The MMU-notifier policy.
    #[arg(long, value_enum, default_value_t = Policy::Confirm)]
    pub policy: Policy,
    /// Bind guest memory to this NUMA node (mbind MPOL_BIND).
    #[arg(long)]
    pub node: Option<u32>,
    /// With --node: allocate all guest memory on that node before the guest runs, then drop the
    /// policy of private memory so that NUMA balancing may move it (memfd keeps its policy).
    #[arg(long, requires = "node")]
    pub place: bool,
    /// The hypervisor device: s2pin (/dev/s2pin) or kvm (/dev/kvm, stock KVM).
    #[arg(long, value_enum, default_value_t = Device::S2pin)]
    pub device: Device,
    /// Print the counters at the end.
    #[arg(long)]
    pub stats: bool,
    /// Write the counters as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// What the guest does.
    #[arg(long, value_enum, default_value_t = GuestMode::Fill)]
    pub mode: GuestMode,
    /// Touch mode: log2 of passes between two progress reports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub passes_log2: u8,
    /// Touch mode: reports of vCPU 0 before the guest shuts down (0: until --seconds or a signal).
    #[arg(long, default_value_t = 4)]
    pub reports: u16,
    /// Stop the guest after this many seconds (touch mode with --reports 0).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Run the hook (--madvise-dontneed, --munmap, --mprotect) after this report of vCPU 0.
    #[arg(long, default_value_t = 1)]
    pub hook_at: u16,
    /// While the guest runs: madvise(MADV_DONTNEED) OFFSET+LENGTH of the tested memory.
    #[arg(long, value_name = "OFF+LEN", value_parser = parse_range)]
    pub madvise_dontneed: Option<Range>,
    /// While the guest runs: munmap OFFSET+LENGTH of the tested memory and map fresh memory there.
    #[arg(long, value_name = "OFF+LEN", value_parser = parse_range)]
    pub munmap: Option<Range>,
    /// While the guest runs: mprotect OFFSET+LENGTH:ro|none; restored to read-write at the guest's fault.
    #[arg(long, value_name = "OFF+LEN:ro|none", value_parser = parse_mprotect)]
    pub mprotect: Option<(Range, Prot)>,
    /// Write the host frame numbers of guest memory (from /proc/self/pagemap) to FILE at the hook.
    #[arg(long, value_name = "FILE")]
    pub dump_pfns: Option<PathBuf>,
    /// Test sub-commands instead of a guest run.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Sub-commands that test the device's handling of hostile user space.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bad ioctls and races (overlapping/unaligned/overflowing slots, kernel and unmapped
    /// addresses, RUN from another process, two threads on one vCPU, closing the VM fd while a
    /// vCPU runs): one PASS/FAIL line each, with the errno.
    Hostile {
        /// The guest payload image.
        #[arg(long, default_value = "/root/guest.bin")]
        image: PathBuf,
    },
    /// Hostile guests on the real path: garbage guest calls, PSCI abuse, accesses outside guest
    /// memory and beyond the IPA space, an MMIO burst, trapped registers; each VM must end with
    /// a clear exit and s2vmm and the host must go on (a normal guest passes afterwards).
    HostileGuests(crate::hostile_guests::HostileGuestsArgs),
    /// s2vmm killed with SIGKILL at random (seeded) moments: while guests of 1 to 4 vCPUs fault
    /// memory in, while NUMA balancing or a munmap is forwarded, during an earlier VM's teardown;
    /// the leak check after each kill and at the end. Exit status 0 when nothing leaked.
    Killloop(crate::killloop::KillLoopArgs),
    /// The nothing-leaked check (run it when no VM should exist): every frame of the host's RAM
    /// host-owned and unshared at EL2, the module's pin and VM counts 0, locked_vm and MemFree
    /// back, no oops/WARNING/lockdep in the kernel log. One line `leakcheck: OK|LEAK ...`;
    /// exit status 0, or 1 on a leak.
    Leakcheck(crate::leakcheck::LeakcheckArgs),
    /// Random valid and invalid ioctls, slot changes, runs, mmaps and closes from several threads
    /// and a forked child; every errno must be documented and nothing left at the end.
    Fuzz(crate::fuzz::FuzzArgs),
    /// VMs filling and checking their memory round after round while a VMM thread per VM
    /// mprotects, drops and remaps random ranges of it; checksum failures must be 0.
    Soak(crate::soak::SoakArgs),
    /// Hypercalls and stage-2 table pages at scale: VMs held at once, each faulted in fully, then
    /// NUMA scan, mprotect(PROT_READ) and munmap of the measured VM's memory and every teardown,
    /// counted with the module's counters (issue 13).
    Scale(crate::scale::ScaleArgs),
}

/// A checked configuration for one guest run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The image path.
    pub image: PathBuf,
    /// Bytes of tested memory (per vCPU in touch mode).
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Backing.
    pub backing: Backing,
    /// Policy.
    pub policy: Policy,
    /// NUMA node to bind to.
    pub node: Option<u32>,
    /// Allocate on the node, then drop the policy.
    pub place: bool,
    /// The hypervisor device.
    pub device: Device,
    /// Print stats.
    pub stats: bool,
    /// JSON stats file.
    pub stats_json: Option<PathBuf>,
    /// The guest's mode.
    pub mode: GuestMode,
    /// Touch: log2 passes per report.
    pub passes_log2: u8,
    /// Touch: reports before shutdown.
    pub reports: u16,
    /// Stop after this long.
    pub seconds: Option<u64>,
    /// The hook's report number.
    pub hook_at: u16,
    /// The hook.
    pub hook: Option<HookAction>,
    /// Where to dump the pfns.
    pub dump_pfns: Option<PathBuf>,
}

/// A command line that parses but makes no sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus {0}: the guest payload runs on 1 to {MAX_VCPUS} vCPUs")]
    Vcpus(u32),
    /// Fill/exits/hostile with a vCPU count the payload does not support.
    #[error("--mode {mode} runs on {allowed} vCPU(s), not {got}")]
    ModeVcpus {
        /// The mode.
        mode: &'static str,
        /// What it takes.
        allowed: &'static str,
        /// What was asked.
        got: u32,
    },
    /// Memory size out of range or not whole MiB.
    #[error("--mem {0:#x}: expected whole MiB from 1M to {max}M", max = guest::MAX_MIB)]
    Mem(u64),
    /// More than one hook.
    #[error("--madvise-dontneed, --munmap and --mprotect are exclusive")]
    TwoHooks,
    /// A hook outside the tested memory, or not page aligned.
    #[error("hook range {0}: must be page aligned and inside the tested memory ({1:#x} bytes)")]
    HookRange(Range, u64),
    /// A hook that needs touch mode.
    #[error("hooks need --mode touch (they run after a progress report of the guest)")]
    HookMode,
    /// --hook-at 0 or beyond the reports.
    #[error("--hook-at {0}: must be 1 or more and below --reports {1} (or --reports 0)")]
    HookAt(u16, u16),
    /// Touch mode with no way to end.
    #[error("--mode touch --reports 0 needs --seconds")]
    Endless,
}

impl Cli {
    /// Checks the guest-run options and turns them into a [`Config`].
    pub fn config(&self) -> Result<Config, ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let mode_vcpus = |mode, allowed, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::ModeVcpus {
                    mode,
                    allowed,
                    got: self.vcpus,
                })
            }
        };
        match self.mode {
            GuestMode::Fill => mode_vcpus("fill", "1 or 2", self.vcpus <= 2)?,
            GuestMode::Exits => mode_vcpus("exits", "1", self.vcpus == 1)?,
            GuestMode::Hostile => mode_vcpus("hostile", "1", self.vcpus == 1)?,
            GuestMode::Touch => {}
        }
        let mib = self.mem >> 20;
        if self.mem & ((1 << 20) - 1) != 0 || mib == 0 || mib > u64::from(guest::MAX_MIB) {
            return Err(ConfigError::Mem(self.mem));
        }
        let hooks = [
            self.madvise_dontneed.map(HookAction::DontNeed),
            self.munmap.map(HookAction::Munmap),
            self.mprotect.map(|(r, p)| HookAction::Mprotect(r, p)),
        ];
        let mut set = hooks.into_iter().flatten();
        let hook = set.next();
        if set.next().is_some() {
            return Err(ConfigError::TwoHooks);
        }
        if self.mode == GuestMode::Touch && self.reports == 0 && self.seconds.is_none() {
            return Err(ConfigError::Endless);
        }
        if let Some(h) = hook {
            if self.mode != GuestMode::Touch {
                return Err(ConfigError::HookMode);
            }
            let r = h.range();
            if !r.is_page_aligned() || r.end().is_none_or(|e| e > self.mem) {
                return Err(ConfigError::HookRange(r, self.mem));
            }
            if self.hook_at == 0 || (self.reports != 0 && self.hook_at >= self.reports) {
                return Err(ConfigError::HookAt(self.hook_at, self.reports));
            }
        }
        Ok(Config {
            image: self.image.clone(),
            mem: self.mem,
            vcpus: self.vcpus,
            backing: self.backing,
            policy: self.policy,
            node: self.node,
            place: self.place,
            device: self.device,
            stats: self.stats,
            stats_json: self.stats_json.clone(),
            mode: self.mode,
            passes_log2: self.passes_log2,
            reports: self.reports,
            seconds: self.seconds,
            hook_at: self.hook_at,
            hook,
            dump_pfns: self.dump_pfns.clone(),
        })
    }
}

impl HookAction {
    /// The range it changes (offsets into the tested memory).
    #[must_use]
    pub fn range(&self) -> Range {
        match *self {
            Self::DontNeed(r) | Self::Munmap(r) | Self::Mprotect(r, _) => r,
        }
    }

    /// Its name in output lines.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::DontNeed(_) => "madvise-dontneed",
            Self::Munmap(_) => "munmap",
            Self::Mprotect(_, Prot::ReadOnly) => "mprotect-ro",
            Self::Mprotect(_, Prot::None) => "mprotect-none",
        }
    }
}

/// `64M`, `1G`, `4096K`, `2097152` (bytes) -> bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    layout::parse_size(s).ok_or_else(|| format!("`{s}`: expected a size like 64M, 1G or 4096K"))
}

fn parse_range(s: &str) -> Result<Range, String> {
    let (off, len) = s
        .split_once('+')
        .ok_or_else(|| format!("`{s}`: expected OFFSET+LENGTH, e.g. 1M+256K"))?;
    let offset = parse_size(off)?;
    let len = parse_size(len)?;
    if len == 0 {
        return Err(format!("`{s}`: the length is 0"));
    }
    Ok(Range { offset, len })
}

fn parse_mprotect(s: &str) -> Result<(Range, Prot), String> {
    let (r, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: expected OFFSET+LENGTH:ro or OFFSET+LENGTH:none"))?;
    let prot = match p {
        "ro" => Prot::ReadOnly,
        "none" => Prot::None,
        _ => return Err(format!("`{p}`: expected ro or none")),
    };
    Ok((parse_range(r)?, prot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("s2vmm").chain(args.iter().copied()))
    }

    #[test]
    fn the_issue_command_line_parses() {
        let c = cli(&[
            "--image",
            "/root/guest.bin",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--policy",
            "confirm",
            "--stats",
        ])
        .unwrap();
        let cfg = c.config().unwrap();
        assert_eq!(cfg.mem, 64 << 20);
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.policy, Policy::Confirm);
        assert_eq!(cfg.backing, Backing::Anon);
        assert_eq!(cfg.mode, GuestMode::Fill);
        assert!(cfg.stats && cfg.hook.is_none());
        let c = cli(&[
            "--backing",
            "thp",
            "--policy",
            "keep",
            "--node",
            "1",
            "--stats-json",
            "/tmp/s.json",
        ])
        .unwrap();
        let cfg = c.config().unwrap();
        assert_eq!(
            (cfg.backing, cfg.policy, cfg.node),
            (Backing::Thp, Policy::Keep, Some(1))
        );
        assert_eq!(cfg.stats_json, Some(PathBuf::from("/tmp/s.json")));
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        for bad in [
            &["--mem", "64X"][..],
            &["--backing", "hugetlb"],
            &["--policy", "lazy"],
            &["--vcpus", "-1"],
            &["--madvise-dontneed", "1M"],
            &["--madvise-dontneed", "1M+0"],
            &["--mprotect", "0+4K:rw"],
            &["--passes-log2", "32"],
            &["--bogus"],
        ] {
            assert!(cli(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nonsense_is_refused_by_config() {
        let e = |a: &[&str]| cli(a).unwrap().config().unwrap_err();
        assert_eq!(e(&["--vcpus", "0"]), ConfigError::Vcpus(0));
        assert_eq!(e(&["--vcpus", "5"]), ConfigError::Vcpus(5));
        assert!(matches!(
            e(&["--vcpus", "3"]),
            ConfigError::ModeVcpus { got: 3, .. }
        ));
        assert!(matches!(
            e(&["--mode", "exits", "--vcpus", "2"]),
            ConfigError::ModeVcpus { .. }
        ));
        assert_eq!(e(&["--mem", "0"]), ConfigError::Mem(0));
        assert_eq!(e(&["--mem", "1025M"]), ConfigError::Mem(1025 << 20));
        assert_eq!(e(&["--mem", "1536K"]), ConfigError::Mem(1536 << 10));
        assert_eq!(e(&["--madvise-dontneed", "0+4K"]), ConfigError::HookMode);
        assert_eq!(
            e(&[
                "--mode",
                "touch",
                "--madvise-dontneed",
                "0+4K",
                "--munmap",
                "0+4K"
            ]),
            ConfigError::TwoHooks
        );
        assert!(matches!(
            e(&["--mode", "touch", "--mem", "4M", "--munmap", "3M+2M"]),
            ConfigError::HookRange(..)
        ));
        assert!(matches!(
            e(&["--mode", "touch", "--munmap", "100+4K"]),
            ConfigError::HookRange(..)
        ));
        assert_eq!(
            e(&["--mode", "touch", "--munmap", "0+4K", "--hook-at", "4"]),
            ConfigError::HookAt(4, 4)
        );
        assert_eq!(
            e(&["--mode", "touch", "--reports", "0"]),
            ConfigError::Endless
        );
        // Offsets near u64::MAX do not wrap around.
        assert!(matches!(
            e(&["--mode", "touch", "--munmap", "18446744073709547520+8K"]),
            ConfigError::HookRange(..)
        ));
    }

    #[test]
    fn hooks_parse() {
        let c = cli(&["--mode", "touch", "--mprotect", "1M+256K:none"]).unwrap();
        let cfg = c.config().unwrap();
        let h = cfg.hook.unwrap();
        assert_eq!(
            h,
            HookAction::Mprotect(
                Range {
                    offset: 1 << 20,
                    len: 256 << 10
                },
                Prot::None
            )
        );
        assert_eq!(h.name(), "mprotect-none");
        let c = cli(&["--mode", "touch", "--madvise-dontneed", "0+2M"]).unwrap();
        assert_eq!(c.config().unwrap().hook.unwrap().name(), "madvise-dontneed");
    }
}
