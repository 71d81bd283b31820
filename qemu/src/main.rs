//! `cargo xtask`: the project's runner.
//!
//! ```text
//! cargo xtask run [OPTIONS]       boot Debian's kernel at EL1 under el2 in QEMU (a shell, or --exec CMD)
//! cargo xtask test [SUITE...]     run test suites (default: all); ends with "N passed, N failed"
//! cargo xtask bench stage2        instruction counts: our stage2 vs aarch64-paging (callgrind)
//! cargo xtask bench boot          boot time with and without el2, 3 runs each
//! cargo xtask bench hvc           guest instructions per hypercall round trip
//! cargo xtask bench numa          stock KVM vs the s2pin policies under NUMA balancing
//! cargo xtask gen-header          regenerate host-driver/include/hyp_abi.h and s2pin_uapi.h from hypercalls and s2pin-uapi
//! cargo xtask install             install the toolchain pieces the project needs
//! ```
//!
//! Every step that needs a tool installs it first, so a fresh clone needs
//! nothing but rustup and cargo.

mod assets;
mod bench;
mod boot;
mod conformance;
mod fuzz;
mod guest;
mod initramfs;
mod install;
mod modules;
mod numa_bench;
mod qemu;
mod shim;
mod suite;
mod util;
mod vmm;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  run [OPTIONS]        boot Debian's arm64 kernel at EL1 under el2 (`run --help` for options)
  test [SUITE...]      run test suites (default: all): host, boot, conformance, guest, shim, numa
  bench stage2         count instructions of stage2 vs aarch64-paging under callgrind
  bench boot           time boots to user space with and without el2 (3 runs each)
  bench hvc            guest instructions per hypercall round trip (QEMU -icount)
  bench numa [--minutes M] [--mem SIZE] [--quick]
                       stock KVM vs eager/confirm/keep under NUMA balancing (docs/PERFORMANCE.md)
  gen-header           regenerate host-driver/include/hyp_abi.h and s2pin_uapi.h
  install              install rustup targets and components
  help                 this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let root = util::workspace_root();
    let result = match cmd.as_str() {
        "run" => run(&root, rest),
        "test" => suite::test(&root, rest),
        "bench" => match rest {
            [what] if what == "stage2" => bench::stage2(&root),
            [what, more @ ..] if what == "boot" => boot::bench(&root, more),
            [what] if what == "hvc" => guest::bench_hvc(&root),
            [what, more @ ..] if what == "numa" => numa_bench::bench(&root, more),
            _ => Err(format!(
                "usage: cargo xtask bench stage2|boot|hvc|numa (got {rest:?}); other benchmarks arrive with later issues"
            )),
        },
        "gen-header" => gen_header(&root),
        "install" => install::rust_targets(),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask run [options]`: boot the host kernel under el2 in QEMU (or
/// directly with `--no-hyp`); see `boot::RUN_USAGE`.
fn run(root: &std::path::Path, args: &[String]) -> Result<(), String> {
    boot::run(root, args)
}

fn gen_header(root: &std::path::Path) -> Result<(), String> {
    for (rel, text) in [
        (hypercalls::C_HEADER_PATH, hypercalls::c_header()),
        (s2pin_uapi::C_HEADER_PATH, s2pin_uapi::c_header()),
    ] {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
