//! The command line of `cargo xtask` (clap): every command, subcommand and
//! option, with the help `--help` prints. main.rs dispatches each command to
//! its module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::initramfs::Extra;
use crate::qemu::{Machine, DEFAULT_CPU};

/// The project's runner: boots el2 and Debian in QEMU, runs the test suites
/// and the benchmarks, and installs whatever each step needs on first use,
/// so a fresh clone needs nothing but rustup and cargo.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    disable_help_subcommand = false,
    after_help = "Build and platform notes (Debian packages, the module's cross build, the QEMU \
                  machine): docs/BUILD.md"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot Debian's arm64 kernel at EL1 under el2 in QEMU (a root shell, or
    /// `--exec CMD`).
    #[command(long_about = RUN_ABOUT, after_help = RUN_AFTER)]
    Run(RunArgs),
    /// Run test suites (default: every suite); the last line is
    /// "N passed, N failed".
    Test(TestArgs),
    /// Run a benchmark and write its section of docs/PERFORMANCE.md.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The soak: 4 VMs x 2 vCPUs fill and check their memory under memory pressure, NUMA
    /// balancing, THP compaction, VMM mprotect/munmap/MADV_DONTNEED and the ioctl fuzzer; ends
    /// with the nothing-leaked check.
    Soak(crate::soak::SoakArgs),
    /// The kill loop (issue 12): s2vmm killed with SIGKILL at random moments under el2 (two NUMA
    /// nodes), 100 times by default, plus one OOM kill; the nothing-leaked check after each.
    Killloop(crate::reliability::KillLoopArgs),
    /// Regenerate host-driver/include/hyp_abi.h and s2pin_uapi.h from the
    /// hypercalls and s2pin-uapi crates.
    GenHeader,
    /// Install the rustup targets and components of rust-toolchain.toml.
    Install,
    /// The long forms of the model tests (10^6 operations each): the host
    /// side of s2pin.ko and the EL2 dispatcher, each against its reference model.
    Model(crate::model::ModelArgs),
}

/// `cargo xtask run --help`, above the options.
const RUN_ABOUT: &str = "\
Boots Debian's arm64 kernel at EL1 under the el2 hypervisor in QEMU and leaves you at a root \
shell in the host (`poweroff` ends QEMU, Ctrl-A x kills it).

The host modules from host-driver/kmod are built for that kernel and put at /root/s2pin.ko and \
/root/hyp_isolation_test.ko (if the build fails, the boot goes on without them):
    insmod /root/s2pin.ko; cat /sys/kernel/s2pin/version
and the VMM at /usr/bin/s2vmm with the guest payload at /root/guest.bin (s2vmm loads \
/root/s2pin.ko itself when /dev/s2pin is missing):
    s2vmm --image /root/guest.bin --mem 64M --vcpus 2 --policy confirm --stats";

/// `cargo xtask run --help`, below the options.
const RUN_AFTER: &str =
    "Exit status: with --exec, the command's; 2 for a bad command line; 1 for other errors.";

/// `cargo xtask run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Run CMD in the host (sh), print its output, exit with its status.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// CPUs, 1 to 64.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub smp: u32,
    /// Memory, e.g. 2G or 1536M; a bare number is MiB (1G to 27G under el2).
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_mem_mib)]
    pub mem: u64,
    /// NUMA nodes, 1 or 2 (CPUs and memory split in halves; 2 needs --smp 2+).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=2))]
    pub numa: u32,
    /// QEMU -cpu model.
    #[arg(long, value_name = "MODEL", default_value = DEFAULT_CPU, value_parser = parse_cpu)]
    pub cpu: String,
    /// Put FILE into the host's initramfs (default destination /root/<name>);
    /// repeatable.
    #[arg(long, value_name = "FILE[:/DEST]", value_parser = parse_add)]
    pub add: Vec<Extra>,
    /// Boot the same kernel directly at EL2, without el2.
    #[arg(long)]
    pub no_hyp: bool,
    /// Kill QEMU after SECS [default: 300 with --exec, none otherwise].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// More kernel command-line arguments; repeatable.
    #[arg(long, value_name = "ARGS")]
    pub append: Vec<String>,
    /// Show the whole console (no `quiet`).
    #[arg(short, long)]
    pub verbose: bool,
}

impl RunArgs {
    /// The machine these options describe.
    pub fn machine(&self) -> Machine {
        Machine {
            smp: self.smp,
            mem_mib: self.mem,
            numa_nodes: self.numa,
            cpu: self.cpu.clone(),
        }
    }
}

/// `cargo xtask test`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Each suite prints PASS/FAIL lines; the last line of the run is \
                        \"N passed, N failed\". XTASK_BOOT_MODE=no-hyp runs the boot suite \
                        against Linux at EL2 (a check of the harness itself)."
)]
pub struct TestArgs {
    /// Suites to run, in this order (default: every suite in the default
    /// run, in its order).
    #[arg(value_name = "SUITE", value_parser = crate::suites::names())]
    pub suites: Vec<String>,
}

/// `cargo xtask bench <name>`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Instruction counts of our stage2 against aarch64-paging under
    /// callgrind (valgrind).
    Stage2,
    /// Boot to user space with and without el2, 3 runs each.
    Boot(crate::benches::boot::BootArgs),
    /// Guest instructions per hypercall round trip (QEMU -icount).
    Hvc,
    /// Stock KVM against eager/confirm/keep under NUMA balancing.
    #[command(long_about = crate::benches::numa::ABOUT)]
    Numa(crate::benches::numa::NumaArgs),
    /// Hypercalls and stage-2 table pages at scale (issue 13): 1 GiB munmap, mprotect and NUMA
    /// scan of pinned memory; with --large 8 VMs at once in a 16 GiB host.
    Scale(crate::benches::scale::ScaleArgs),
}

/// `2G`, `1536M`, `1536` (MiB, as QEMU reads it) -> MiB.
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}`: expected a size like 2G or 1536M");
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let mult = match t[digits..].to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|m| *m > 0).ok_or_else(bad)
}

/// A QEMU CPU model: one word.
fn parse_cpu(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(char::is_whitespace) {
        return Err(format!(
            "`{s}`: expected a QEMU CPU model such as max or cortex-a57"
        ));
    }
    Ok(s.to_string())
}

/// `FILE` -> `/root/<name>`, `FILE:/DEST` -> `/DEST`.
pub fn parse_add(s: &str) -> Result<Extra, String> {
    let bad = || format!("`{s}`: expected FILE or FILE:/DEST");
    let (source, dest) = match s.rsplit_once(':') {
        Some((src, dest)) if dest.starts_with('/') && !src.is_empty() => {
            (PathBuf::from(src), dest.to_string())
        }
        _ => {
            let p = PathBuf::from(s);
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(bad)?
                .to_string();
            (p, format!("/root/{name}"))
        }
    };
    let ok = dest.len() > 1
        && !dest.ends_with('/')
        && dest
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(Extra { source, dest })
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["cargo xtask", "run"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(r) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_match_the_issue() {
        let o = run(&[]).unwrap();
        assert_eq!(o.machine(), Machine::default());
        assert_eq!(o.machine().cpu, "max,pauth-impdef=on");
        assert!(!o.no_hyp && o.exec.is_none() && o.timeout.is_none());
    }

    #[test]
    fn run_options_parse() {
        let o = run(&[
            "--exec",
            "uname -a; exit 3",
            "--smp=2",
            "--mem",
            "1536M",
            "--numa",
            "2",
            "--cpu",
            "cortex-a57",
            "--add",
            "/tmp/x.ko",
            "--add=/tmp/y:/opt/y",
            "--no-hyp",
            "--timeout",
            "30",
            "--verbose",
            "--append",
            "nokaslr",
        ])
        .unwrap();
        assert_eq!(o.exec.as_deref(), Some("uname -a; exit 3"));
        assert_eq!(
            o.machine(),
            Machine {
                smp: 2,
                mem_mib: 1536,
                numa_nodes: 2,
                cpu: "cortex-a57".into()
            }
        );
        assert_eq!(o.add[0].dest, "/root/x.ko");
        assert_eq!(o.add[1].source, PathBuf::from("/tmp/y"));
        assert_eq!(o.add[1].dest, "/opt/y");
        assert!(o.no_hyp && o.verbose);
        assert_eq!(o.timeout, Some(30));
        assert_eq!(o.append, ["nokaslr"]);
        assert!(run(&["-v"]).unwrap().verbose);
    }

    #[test]
    fn bad_run_options_are_usage_errors() {
        for bad_args in [
            &["--bogus"][..],
            &["--exec"],
            &["--smp", "0"],
            &["--smp", "x"],
            &["--mem", "2X"],
            &["--mem", "0"],
            &["--numa", "3"],
            &["--timeout", "0"],
            &["--cpu", ""],
            &["--add", ""],
            &["--add", "f:/a/../b"],
            &["--no-hyp=1"],
            &["--smp", "65"],
            &["--smp=-1"],
            &["--mem", "99999999999999999999T"],
        ] {
            let e = run(bad_args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad_args:?}");
        }
        // The messages name the option, the value and what is expected.
        let msg = run(&["--mem=1X"]).unwrap_err().to_string();
        assert!(
            msg.contains("--mem") && msg.contains("expected a size like 2G"),
            "{msg}"
        );
    }

    #[test]
    fn run_help_lists_every_option() {
        let help = Cli::command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        for opt in [
            "--exec",
            "--smp",
            "--mem",
            "--numa",
            "--cpu",
            "--add",
            "--no-hyp",
            "--timeout",
            "--append",
            "--verbose",
            "-v,",
            "--help",
            "/root/s2pin.ko",
            "/root/hyp_isolation_test.ko",
            "max,pauth-impdef=on",
            "300 with --exec",
            "2 for a bad command line",
        ] {
            assert!(help.contains(opt), "{opt}\n{help}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem_mib("2G"), Ok(2048));
        assert_eq!(parse_mem_mib("2g"), Ok(2048));
        assert_eq!(parse_mem_mib("1536"), Ok(1536));
        assert_eq!(parse_mem_mib("512MiB"), Ok(512));
        assert!(parse_mem_mib("G").is_err());
        assert!(parse_mem_mib("-1G").is_err());
        assert!(parse_mem_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn suites_and_benches_parse() {
        let t = Cli::try_parse_from(["cargo xtask", "test", "boot", "host"]).unwrap();
        assert!(matches!(t.command, Command::Test(a) if a.suites == ["boot", "host"]));
        assert!(Cli::try_parse_from(["cargo xtask", "test", "nosuch"]).is_err());
        for b in ["stage2", "boot", "hvc", "numa", "scale"] {
            assert!(
                Cli::try_parse_from(["cargo xtask", "bench", b]).is_ok(),
                "{b}"
            );
        }
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "nosuch"]).is_err());
    }
}
