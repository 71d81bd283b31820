//! The `boot` suite: Debian's kernel under el2 in QEMU, four boots (a
//! checks script with the host modules, the interactive shell ended by a
//! typed `poweroff`, two NUMA nodes, plain `-cpu max`), each assertion one
//! [`Check`].

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::check::{Check, Tally};
use crate::initramfs::{Extra, Mode};
use crate::qemu::{self, Console, Machine};
use crate::run::{
    self, exec_script, has_host_modules, host_modules, kernel_cmdline, prepare, ExecRun,
    Ingredients, Prepared, HOST_MODULE, ISOLATION_MODULE, ISOLATION_PHYS,
};
use crate::util::progress;

/// The boot suite (registered in `suites/mod.rs`).
pub fn run(root: &Path, tally: &mut Tally) {
    progress("boot: QEMU boots with a timeout each");
    match SuiteMode::from_env() {
        Ok(mode) => tally.record_all(suite(root, mode)),
        Err(e) => tally.record(Check::error("boot: XTASK_BOOT_MODE", &e)),
    }
}

/// Which kernel the boot suite checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuiteMode {
    /// The real suite: the host at EL1 under el2.
    Hyp,
    /// Harness validation: the same checks against Linux booted at EL2
    /// (`XTASK_BOOT_MODE=no-hyp`): it must then report EL2, and the
    /// hypervisor-only checks are skipped.
    NoHyp,
}

impl SuiteMode {
    /// From `XTASK_BOOT_MODE` (`no-hyp`, or unset / `hyp`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("XTASK_BOOT_MODE").as_deref() {
            Err(_) | Ok("") | Ok("hyp") => Ok(Self::Hyp),
            Ok("no-hyp") => Ok(Self::NoHyp),
            Ok(other) => bail!("XTASK_BOOT_MODE=`{other}`: expected `hyp` or `no-hyp`"),
        }
    }
}

/// The ABI version el2 must report, from the one source of the ABI.
fn abi_version() -> String {
    format!(
        "{}.{}",
        hypercalls::ABI_VERSION_MAJOR,
        hypercalls::ABI_VERSION_MINOR
    )
}

/// Per-boot timeout in the suite: a hang fails, never stalls.
pub const SUITE_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The script the main boot check runs inside the host.
fn suite_script(module: bool) -> String {
    let mut s = String::from(
        "echo \"CHECK el=$(dmesg | grep -o 'CPU: All CPU(s) started at EL[0-9]')\"\n\
         echo \"CHECK online=$(cat /sys/devices/system/cpu/online)\"\n\
         echo 0 > /sys/devices/system/cpu/cpu3/online; r=$?\n\
         echo \"CHECK off=$r $(cat /sys/devices/system/cpu/online)\"\n\
         echo 1 > /sys/devices/system/cpu/cpu3/online; r=$?\n\
         echo \"CHECK on=$r $(cat /sys/devices/system/cpu/online)\"\n",
    );
    if module {
        s.push_str(&format!(
            "insmod /root/{HOST_MODULE}; echo \"CHECK insmod=$?\"\n\
             echo \"CHECK hypver=$(cat /sys/kernel/s2pin/version)\"\n"
        ));
    }
    s.push_str(
        "echo \"CHECK bad=$(dmesg | grep -cE 'Oops|BUG:|WARNING:|Kernel panic|Unable to handle|Call trace')\"\n",
    );
    if module {
        // Last, because it oopses on purpose: the host reads the hypervisor's
        // image from kernel context, which must take the abort el2 injects
        // (a synchronous external abort: Linux's own fault handling reports
        // it and kills insmod), and el2 must still answer afterwards.
        s.push_str(&format!(
            "insmod /root/{ISOLATION_MODULE} phys={ISOLATION_PHYS:#x}; echo \"CHECK iso_rc=$?\"\n\
             echo \"CHECK iso_sea=$(dmesg | grep -c 'Internal error: synchronous external abort')\"\n\
             echo \"CHECK iso_readable=$(dmesg | grep -c 'READABLE')\"\n\
             echo \"CHECK hypver2=$(cat /sys/kernel/s2pin/version)\"\n"
        ));
    }
    s
}

/// The value printed after `CHECK <key>=` in the command output.
fn check_value<'a>(output: &'a [String], key: &str) -> Option<&'a str> {
    let prefix = format!("CHECK {key}=");
    output
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
}

/// Runs the boot suite's boots and returns every assertion.
pub fn suite(root: &Path, mode: SuiteMode) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(Check::new(format!("boot: {name}"), ok, detail));
    };
    let ing = match run::ingredients(root, mode == SuiteMode::NoHyp) {
        Ok(i) => i,
        Err(e) => {
            check("build and fetch what a boot needs", false, format!("{e:#}"));
            return checks;
        }
    };
    let el = match mode {
        SuiteMode::Hyp => "EL1",
        SuiteMode::NoHyp => {
            progress("boot suite in harness-validation mode: Linux directly at EL2, no el2");
            "EL2"
        }
    };
    let machine = Machine::default();

    // Boot 1: the main checks from a script, with the host module if the
    // tree has one.
    let mut extras = Vec::new();
    let kmod = has_host_modules(root);
    if kmod {
        match host_modules(root, &ing.debian) {
            Ok(e) => extras = e,
            Err(e) => check("build the host module", false, format!("{e:#}")),
        }
    }
    let module = !extras.is_empty();
    let mut reached = false;
    progress(&format!(
        "boot 1/4: checks script, {} CPUs, {} MiB",
        machine.smp, machine.mem_mib
    ));
    match script_boot(root, &ing, &machine, &suite_script(module), &extras) {
        Err(e) => check("boot with a checks script", false, format!("{e:#}")),
        Ok(r) => {
            reached = r.userspace.is_some();
            let tail = r.captured.tail(30);
            let out = &r.output;
            let detail = |what: &str| {
                format!(
                    "{what}\ncommand output:\n{}\nconsole tail:\n{tail}",
                    out.join("\n")
                )
            };
            check(
                "reaches user space",
                r.userspace.is_some(),
                format!(
                    "no user-space marker within {} s\n{tail}",
                    r.timeout.as_secs()
                ),
            );
            if let Some(t) = r.userspace {
                progress(&format!(
                    "user space after {:.2} s (guest uptime {:?} s)",
                    t.as_secs_f64(),
                    r.guest_uptime
                ));
            }
            if mode == SuiteMode::Hyp {
                let banner = r.captured.lines.iter().any(|l| l.starts_with("el2: "));
                check(
                    "el2 prints its `el2: ` lines on the console",
                    banner,
                    tail.clone(),
                );
                // docs/DESIGN.md §8: on the CPUs we boot, nothing a guest
                // reaches is left neither switched nor trapped.
                let covered = r.captured.lines.iter().any(|l| {
                    l.contains("guest registers: every EL1 register is switched or trapped")
                });
                check(
                    "el2 switches or traps every EL1 register a guest can reach on this CPU",
                    covered,
                    tail.clone(),
                );
                check(
                    "el2 prints its trap counts and the host stage-2's shape at power-off",
                    trap_lines_at_power_off(&r.captured.lines),
                    tail.clone(),
                );
            }
            let want = format!("CPU: All CPU(s) started at {el}");
            check(
                &format!("kernel says \"{want}\""),
                check_value(out, "el") == Some(want.as_str()),
                detail("dmesg does not say it"),
            );
            check(
                "all CPUs online (0-3)",
                check_value(out, "online") == Some("0-3"),
                detail("/sys/devices/system/cpu/online"),
            );
            check(
                "cpu3 goes offline through sysfs",
                check_value(out, "off") == Some("0 0-2"),
                detail("echo 0 > cpu3/online"),
            );
            check(
                "cpu3 comes back online through sysfs",
                check_value(out, "on") == Some("0 0-3"),
                detail("echo 1 > cpu3/online"),
            );
            // The hypervisor's version through HVC, read by the host module.
            let version_check = "host module gets el2's ABI version through HVC";
            if module {
                check(
                    &format!("host module {HOST_MODULE} loads"),
                    check_value(out, "insmod") == Some("0"),
                    detail("insmod"),
                );
                let want = match mode {
                    SuiteMode::Hyp => abi_version(),
                    // At EL2 the module must see that nobody is there to ask.
                    SuiteMode::NoHyp => "no hypervisor".to_string(),
                };
                check(
                    &format!("{version_check} (/sys/kernel/s2pin/version = {want})"),
                    check_value(out, "hypver") == Some(want.as_str()),
                    detail("/sys/kernel/s2pin/version"),
                );
            } else if !kmod && mode == SuiteMode::Hyp {
                check(
                    version_check,
                    false,
                    "host-driver/kmod does not exist, so nothing asks el2 for its version".into(),
                );
            }
            check(
                "no oops, BUG, WARNING or panic in dmesg",
                check_value(out, "bad") == Some("0"),
                detail("dmesg has kernel errors"),
            );
            if module && mode == SuiteMode::Hyp {
                check(
                    "a host read of hypervisor memory takes an injected external abort",
                    check_value(out, "iso_sea") == Some("1")
                        && check_value(out, "iso_readable") == Some("0")
                        && check_value(out, "iso_rc") != Some("0"),
                    detail("hyp_isolation_test"),
                );
                check(
                    "el2 still answers HVCs after the abort",
                    check_value(out, "hypver2") == Some(abi_version().as_str()),
                    detail("/sys/kernel/s2pin/version after the abort"),
                );
            }
            check(
                "script exits 0 and QEMU powers off with status 0",
                r.status == Some(0)
                    && !r.captured.timed_out
                    && r.captured.status.is_some_and(|s| s.success()),
                format!(
                    "script status {:?}, QEMU status {:?}, timed out {}\n{tail}",
                    r.status, r.captured.status, r.captured.timed_out
                ),
            );
        }
    }

    // Without user space in boot 1 the other boots cannot say more: fail
    // them at once instead of waiting for two more timeouts.
    if !reached {
        check(
            "interactive and NUMA boots",
            false,
            "not run: the first boot did not reach user space".into(),
        );
        return checks;
    }

    // Boot 2: the interactive shell, ended by typing `poweroff`.
    progress("boot 2/4: interactive shell, then `poweroff` typed on the console");
    match prepare(
        root,
        &ing,
        &machine,
        Mode::Interactive,
        &[],
        Console::Captured,
        &kernel_cmdline(false, &[]),
    )
    .and_then(|p| interactive_poweroff(&p))
    {
        Err(e) => check("interactive boot", false, format!("{e:#}")),
        Ok((ready, c)) => {
            let tail = c.tail(30);
            check(
                "interactive shell starts on the console",
                ready,
                tail.clone(),
            );
            check(
                "`poweroff` in the shell ends QEMU with status 0",
                ready && !c.timed_out && c.status.is_some_and(|s| s.success()),
                format!(
                    "QEMU status {:?}, timed out {}\n{tail}",
                    c.status, c.timed_out
                ),
            );
            check(
                "the kernel powers down (\"reboot: Power down\")",
                c.lines.iter().any(|l| l.contains("reboot: Power down")),
                tail,
            );
        }
    }

    // Boot 3: two NUMA nodes; under el2 also a host read beyond the host
    // stage-2's IPA size (the tree's addresses end at 1 TiB on QEMU virt).
    progress("boot 3/4: --smp 2 --numa 2");
    let numa = Machine {
        smp: 2,
        numa_nodes: 2,
        ..machine.clone()
    };
    let beyond = module && mode == SuiteMode::Hyp;
    let mut numa_script = String::from(
        "echo \"CHECK nodes=$(cat /sys/devices/system/node/online)\"\n\
         echo \"CHECK balancing=$(cat /proc/sys/kernel/numa_balancing)\"\n",
    );
    if beyond {
        numa_script.push_str(&format!(
            "insmod /root/{HOST_MODULE}\n\
             insmod /root/{ISOLATION_MODULE} phys={BEYOND_IPA:#x}; echo \"CHECK far_rc=$?\"\n\
             echo \"CHECK far_sea=$(dmesg | grep -c 'Internal error: synchronous external abort')\"\n\
             echo \"CHECK far_readable=$(dmesg | grep -c 'READABLE')\"\n\
             echo \"CHECK hypver3=$(cat /sys/kernel/s2pin/version)\"\n"
        ));
    }
    match script_boot(
        root,
        &ing,
        &numa,
        &numa_script,
        if beyond { &extras } else { &[] },
    ) {
        Err(e) => check("NUMA boot", false, format!("{e:#}")),
        Ok(r) => {
            let detail = format!(
                "output:\n{}\nconsole tail:\n{}",
                r.output.join("\n"),
                r.captured.tail(30)
            );
            check(
                "two NUMA nodes online (0-1)",
                check_value(&r.output, "nodes") == Some("0-1"),
                detail.clone(),
            );
            check(
                "automatic NUMA balancing is on",
                check_value(&r.output, "balancing") == Some("1"),
                detail.clone(),
            );
            if beyond {
                let denied = format!("host access to {BEYOND_IPA:#x} (Translation fault)");
                check(
                    "a host read beyond the host IPA size is refused by el2 with an injected external abort, and el2 answers after it",
                    check_value(&r.output, "far_sea") == Some("1")
                        && check_value(&r.output, "far_readable") == Some("0")
                        && check_value(&r.output, "far_rc") != Some("0")
                        && check_value(&r.output, "hypver3") == Some(abi_version().as_str())
                        && r.captured.lines.iter().any(|l| l.contains(&denied)),
                    format!("want el2's line \"{denied} ... denied\"\n{detail}"),
                );
            }
        }
    }

    // Boot 4: plain `-cpu max` (QARMA5 pointer authentication, about 3x
    // slower under TCG): the host's pointer-auth keys must work at EL1 too.
    progress("boot 4/4: --cpu max");
    let plain_max = Machine {
        cpu: "max".into(),
        ..machine.clone()
    };
    match script_boot(
        root,
        &ing,
        &plain_max,
        "echo \"CHECK el=$(dmesg | grep -o 'CPU: All CPU(s) started at EL[0-9]')\"\n\
         echo \"CHECK online=$(cat /sys/devices/system/cpu/online)\"\n",
        &[],
    ) {
        Err(e) => check("plain -cpu max boot", false, format!("{e:#}")),
        Ok(r) => {
            let want = format!("CPU: All CPU(s) started at {el}");
            check(
                &format!("with plain -cpu max: \"{want}\", CPUs 0-3 online"),
                check_value(&r.output, "el") == Some(want.as_str())
                    && check_value(&r.output, "online") == Some("0-3"),
                format!(
                    "output:\n{}\nconsole tail:\n{}",
                    r.output.join("\n"),
                    r.captured.tail(30)
                ),
            );
        }
    }
    checks
}

/// A physical address beyond the host stage-2's IPA size on QEMU `virt`
/// (its device tree ends at 1 TiB: el2 makes the IPA 40 bits).
const BEYOND_IPA: u64 = 1 << 40;

/// Whether el2 printed its trap counts (at least one exception: the
/// SYSTEM_OFF itself) and the host stage-2's shape at power-off.
fn trap_lines_at_power_off(lines: &[String]) -> bool {
    let total = lines.iter().find_map(|l| {
        l.trim()
            .strip_prefix("el2: traps total: exceptions=")?
            .parse::<u64>()
            .ok()
    });
    let smc_off = lines
        .iter()
        .any(|l| l.trim().starts_with("el2: traps smc:") && l.contains(" system_off=1"));
    let shape = lines
        .iter()
        .any(|l| l.trim().starts_with("el2: host stage-2: ipa_bits="));
    total.is_some_and(|n| n > 0) && smc_off && shape
}

/// Boots with a quiet `--exec`-style `script`, its output captured (not
/// printed), under [`SUITE_BOOT_TIMEOUT`].
pub fn script_boot(
    root: &Path,
    ing: &Ingredients,
    machine: &Machine,
    script: &str,
    extras: &[Extra],
) -> Result<ExecRun> {
    exec_script(root, ing, machine, script, extras, SUITE_BOOT_TIMEOUT)
}

/// Boots to the interactive shell, waits for its ready line, types
/// `poweroff`, and returns whether the shell came up plus the console.
fn interactive_poweroff(p: &Prepared) -> Result<(bool, qemu::Captured)> {
    let ready_mark = p.markers.shell_ready();
    let mut ready = false;
    let mut watch = |line: &str, _: Duration, input: &mut dyn Write| {
        if !ready && line.trim() == ready_mark {
            ready = true;
            // The tty is open and buffers input until the shell reads it.
            let _ = input.write_all(b"echo typed-$((6*7))\npoweroff\n");
        }
    };
    let c = p.launch.run_captured(SUITE_BOOT_TIMEOUT, &mut watch)?;
    let echoed = c.lines.iter().any(|l| l.trim() == "typed-42");
    Ok((ready && echoed, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values_are_found() {
        let out: Vec<String> = ["noise", "CHECK online=0-3", " CHECK off=0 0-2 "]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(check_value(&out, "online"), Some("0-3"));
        assert_eq!(check_value(&out, "off"), Some("0 0-2"));
        assert_eq!(check_value(&out, "on"), None);
        assert!(suite_script(true).contains("insmod /root/s2pin.ko"));
        assert!(!suite_script(false).contains("insmod"));
    }

    #[test]
    fn trap_lines_are_recognised() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let good = lines(&[
            "reboot: Power down",
            "el2: traps total: exceptions=40",
            "el2: traps smc: cpu_on=3 system_off=1",
            "el2: host stage-2: ipa_bits=40 start_level=1 root_tables=2",
        ]);
        assert!(trap_lines_at_power_off(&good));
        assert!(!trap_lines_at_power_off(&good[..3]));
        let mut zero = good.clone();
        zero[1] = "el2: traps total: exceptions=0".into();
        assert!(!trap_lines_at_power_off(&zero));
    }
}
