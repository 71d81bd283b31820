//! `cargo xtask soak` and the `soak` suite: one boot under el2 in which
//! `s2vmm soak` runs 4 VMs of 2 vCPUs, each filling and checking its memory
//! round after round while a VMM thread per VM mprotects, drops and replaces
//! random ranges of it, and the host meanwhile
//! * is under memory pressure (Debian's `stress-ng --vm`, when the
//!   initramfs has it; otherwise a loop that fills and frees half a GiB of
//!   tmpfs),
//! * runs NUMA balancing on two nodes with the NUMA benchmark's tight knobs,
//! * has THP on (`always`, defrag `always`) and compacts memory every 5 s,
//! * runs the ioctl fuzzer (`s2vmm fuzz --shared`) round after round.
//!
//! The end is the nothing-leaked check (`s2vmm leakcheck` against a
//! baseline taken before anything ran) and a look at the kernel log. The
//! suite is the 1-minute form with the short fuzz (`s2vmm fuzz`, 1500 calls,
//! before the soak starts) in the same boot.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::check::{Check, Tally};
use crate::initramfs::Extra;
use crate::qemu::Machine;
use crate::run::{exec_script, ingredients, shim_extras};
use crate::util::progress;

/// Debian's stress-ng for arm64 is dynamically linked: these packages hold
/// the libraries of its `DT_NEEDED` closure (and glibc's loader).
const STRESS_PACKAGES: &[&str] = &[
    "libc6",
    "libegl1",
    "libglvnd0",
    "libgles2",
    "libjudydebian1",
    "libapparmor1",
    "libbsd0",
    "libmd0",
    "libcrypt1",
    "libgbm1",
    "libdrm2",
    "libwayland-server0",
    "libexpat1",
    "libffi8",
    "libjpeg62-turbo",
    "libkmod2",
    "liblzma5",
    "libzstd1",
    "libssl3",
    "libsctp1",
    "libxxhash0",
    "zlib1g",
];

/// `/usr/bin/stress-ng` and its libraries for the initramfs.
fn stress_extras(root: &Path) -> Result<Vec<Extra>> {
    let p = crate::assets::debian_package(root, "stress-ng")?;
    let mut extras = p.extras(&["usr/bin/stress-ng"])?;
    for lib in STRESS_PACKAGES {
        extras.extend(crate::assets::debian_package(root, lib)?.libraries());
    }
    Ok(extras)
}

/// `cargo xtask soak` options.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Minutes the VMs run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub minutes: u64,
    /// Seed of the VMM's chaos threads and of the fuzzer.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// What one soak boot does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Seconds of soak.
    pub seconds: u64,
    /// VMs (2 vCPUs each).
    pub vms: u32,
    /// Tested memory per VM, MiB.
    pub mem_mib: u64,
    /// Seed.
    pub seed: u64,
    /// Calls of the short fuzz before the soak (0: none).
    pub short_fuzz: u64,
}

/// The machine: two NUMA nodes so that balancing has somewhere to move
/// pages, 2 GiB.
fn machine() -> Machine {
    Machine {
        smp: 4,
        mem_mib: 2048,
        numa_nodes: 2,
        cpu: crate::qemu::DEFAULT_CPU.into(),
    }
}

/// NUMA balancing on with the NUMA benchmark's knobs (scan at once, every
/// 100 ms, 256 MiB per scan).
const KNOBS: &str = "echo 1 > /proc/sys/kernel/numa_balancing && \
    cd /sys/kernel/debug/sched/numa_balancing && echo 0 > scan_delay_ms && \
    echo 100 > scan_period_min_ms && echo 100 > scan_period_max_ms && echo 256 > scan_size_mb; \
    echo \"CHECK knobs=$?\"; cd /root";

/// The script the host runs.
fn script(p: &Plan) -> String {
    let Plan {
        seconds,
        vms,
        mem_mib,
        seed,
        short_fuzz,
    } = p;
    let mut s = String::new();
    s.push_str("dmesg -n 1\ninsmod /root/s2pin.ko; echo \"CHECK insmod=$?\"\n");
    s.push_str("s2vmm leakcheck --save /tmp/leakbase; echo \"CHECK leakbase=$?\"\n");
    s.push_str(KNOBS);
    s.push('\n');
    s.push_str(
        "T=/sys/kernel/mm/transparent_hugepage; echo always > $T/enabled && echo always > $T/defrag; \
         echo \"CHECK thp=$?\"\n",
    );
    if *short_fuzz > 0 {
        s.push_str(&format!(
            "s2vmm fuzz --seed {seed} --iters {short_fuzz}; echo \"CHECK fuzz=$?\"\n"
        ));
    }
    let stress_secs = seconds + 60;
    s.push_str(&format!(
        "rm -f /tmp/stop\n\
         ( n=0; while [ ! -e /tmp/stop ]; do echo 1 > /proc/sys/vm/compact_memory; n=$((n+1)); sleep 5; done; \
           echo \"FIG compactions=$n\" ) &\n\
         export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu\n\
         if stress-ng --version >/dev/null 2>&1; then\n\
           echo \"FIG pressure=stress-ng\"\n\
           stress-ng --vm 2 --vm-bytes 25% --vm-method all --page-in --timeout {stress_secs}s --metrics-brief > /tmp/stress.log 2>&1 &\n\
           SP=$!\n\
         else\n\
           echo \"FIG pressure=tmpfs-loop\"\n\
           ( n=0; while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/tmp/press bs=1M count=512 2>/dev/null; rm -f /tmp/press; n=$((n+1)); done; \
             echo \"FIG pressure_rounds=$n\" ) &\n\
           SP=\n\
         fi\n\
         ( i=0; f=0; c=0; while [ ! -e /tmp/stop ]; do \
             s2vmm fuzz --shared --seed $(({seed} + 1000 + i)) --iters 500 > /tmp/fuzz.log 2>&1 || {{ f=$((f+1)); grep -E 'FAIL' /tmp/fuzz.log | head -5 | sed 's/^/FUZZFAIL /'; }}; \
             n=$(sed -n 's/.*: PASS in .* s: \\([0-9]*\\) calls.*/\\1/p; s/.*: FAIL in .* s: \\([0-9]*\\) calls.*/\\1/p' /tmp/fuzz.log); c=$((c + ${{n:-0}})); \
             i=$((i+1)); done; echo \"FIG fuzz_runs=$i fuzz_failed=$f fuzz_calls=$c\" ) &\n\
         s2vmm soak --vms {vms} --vcpus 2 --mem {mem_mib}M --seconds {seconds} --seed {seed} --json /tmp/soak.json; echo \"CHECK soak=$?\"\n\
         touch /tmp/stop; [ -n \"$SP\" ] && kill $SP 2>/dev/null; wait\n\
         grep -E 'stress-ng: (info|metrc).*(vm|bogo)' /tmp/stress.log 2>/dev/null | tail -3\n\
         echo 0 > /proc/sys/kernel/numa_balancing\n\
         s2vmm leakcheck --base /tmp/leakbase; echo \"CHECK leak=$?\"\n\
         echo \"CHECK dmesg_bad=$(dmesg | grep -ciE 'oops|warning|bug:|call trace|lockdep|circular locking')\"\n\
         dmesg | grep -iE 'oops|warning|bug:|call trace|lockdep' | head -20\n\
         echo SOAKJSON; cat /tmp/soak.json; echo ENDJSON\n"
    ));
    s
}

/// The `CHECK name=value` and `FIG name=value` lines of the output.
fn values(lines: &[String]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in lines {
        for prefix in ["CHECK ", "FIG "] {
            if let Some(rest) = l.trim().strip_prefix(prefix) {
                for kv in rest.split_whitespace() {
                    if let Some((k, v)) = kv.split_once('=') {
                        m.insert(k.to_string(), v.to_string());
                    }
                }
            }
        }
    }
    m
}

/// The soak's JSON (between the SOAKJSON and ENDJSON lines).
fn soak_json(lines: &[String]) -> Option<serde_json::Value> {
    let start = lines.iter().position(|l| l.trim() == "SOAKJSON")?;
    let end = lines.iter().position(|l| l.trim() == "ENDJSON")?;
    serde_json::from_str(&lines.get(start + 1..end)?.join("\n")).ok()
}

/// Runs one soak boot; returns the checks and the output.
pub fn measure(root: &Path, p: &Plan) -> Result<(Vec<Check>, Vec<String>)> {
    let ing = ingredients(root, false)?;
    let mut extras = shim_extras(root, &ing.debian)?;
    match stress_extras(root) {
        Ok(e) => extras.extend(e),
        Err(e) => progress(&format!(
            "soak: no stress-ng ({e:#}); the memory pressure is a tmpfs fill-and-free loop"
        )),
    }
    let timeout = Duration::from_secs(p.seconds + 1200 + p.short_fuzz / 5);
    progress(&format!(
        "soak: {} VMs x 2 vCPUs x {} MiB for {} s under memory pressure, NUMA balancing, THP compaction and the fuzzer (timeout {} s)",
        p.vms,
        p.mem_mib,
        p.seconds,
        timeout.as_secs()
    ));
    let r = exec_script(root, &ing, &machine(), &script(p), &extras, timeout)?;
    let status = r.finish()?;
    let v = values(&r.output);
    let is0 = |k: &str| v.get(k).map(String::as_str) == Some("0");
    let text = r.output.join("\n");
    let grep = |pat: &str| {
        r.output
            .iter()
            .filter(|l| l.contains(pat))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut out = vec![Check::new(
        "soak: s2pin.ko loads; NUMA balancing knobs and THP set",
        is0("insmod") && is0("knobs") && is0("thp") && is0("leakbase"),
        format!("status {status}\n{}", grep("CHECK")),
    )];
    if p.short_fuzz > 0 {
        out.push(Check::new(
            format!(
                "soak: s2vmm fuzz, {} calls from 3 threads and a forked child: every errno documented, nothing left",
                p.short_fuzz
            ),
            is0("fuzz"),
            grep("s2vmm fuzz"),
        ));
    }
    let j = soak_json(&r.output);
    let num = |k: &str| {
        j.as_ref()
            .and_then(|j| j.get(k))
            .and_then(serde_json::Value::as_u64)
    };
    out.push(Check::new(
        format!(
            "soak: {} VMs x 2 vCPUs fill and check their memory for {} s under pressure: rounds > 0, 0 failed, 0 checksum failures (guest and VMM)",
            p.vms, p.seconds
        ),
        is0("soak")
            && num("rounds").is_some_and(|n| n > 0)
            && num("rounds_failed") == Some(0)
            && num("guest_checksum_failures") == Some(0)
            && num("vmm_word_mismatches") == Some(0),
        grep("s2vmm soak"),
    ));
    out.push(Check::new(
        "soak: the fuzzer's long form during the soak: no failed run",
        v.get("fuzz_runs").is_some_and(|n| n != "0") && is0("fuzz_failed"),
        format!("{}\n{}", grep("FIG"), grep("FUZZFAIL")),
    ));
    out.push(Check::new(
        "soak: nothing leaked (every RAM frame host-owned, pins, VMs, locked_vm, MemFree back)",
        is0("leak"),
        grep("leakcheck"),
    ));
    out.push(Check::new(
        "soak: no Oops, WARNING, BUG or lockdep report in dmesg",
        is0("dmesg_bad"),
        text.clone(),
    ));
    Ok((out, r.output))
}

/// The `soak` suite: the 1-minute form with the short fuzz.
pub fn run(root: &Path, tally: &mut Tally) {
    progress(
        "soak: the 1-minute soak and the short ioctl fuzz (one boot under el2, with a timeout)",
    );
    let plan = Plan {
        seconds: 60,
        vms: 4,
        mem_mib: 1,
        seed: 1,
        short_fuzz: 1500,
    };
    match measure(root, &plan) {
        Ok((checks, _)) => tally.record_all(checks),
        Err(e) => tally.record(Check::error(
            "soak: boot under el2 with s2pin.ko and s2vmm",
            &e,
        )),
    }
}

/// `cargo xtask soak`: prints the figures; fails if any check failed.
pub fn soak(root: &Path, a: &SoakArgs) -> Result<()> {
    let plan = Plan {
        seconds: a.minutes * 60,
        vms: 4,
        mem_mib: 4,
        seed: a.seed,
        short_fuzz: 0,
    };
    let (checks, output) = measure(root, &plan)?;
    for l in output.iter().filter(|l| {
        l.starts_with("s2vmm soak: ") && !l.contains(" round ")
            || l.starts_with("leakcheck")
            || l.starts_with("FIG")
            || l.starts_with("FUZZFAIL")
            || l.contains("stress-ng")
    }) {
        println!("{l}");
    }
    let mut failed = 0;
    for c in &checks {
        println!("{} {}", if c.ok { "PASS" } else { "FAIL" }, c.name);
        if !c.ok {
            failed += 1;
            println!("{}", c.detail);
        }
    }
    if failed > 0 {
        bail!("{failed} soak check(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_json_are_read_from_the_output() {
        let lines: Vec<String> = [
            "CHECK insmod=0",
            "FIG fuzz_runs=3 fuzz_failed=0 fuzz_calls=1400",
            "SOAKJSON",
            "{\"rounds\": 12,",
            "\"rounds_failed\": 0}",
            "ENDJSON",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        let v = values(&lines);
        assert_eq!(v["insmod"], "0");
        assert_eq!(v["fuzz_calls"], "1400");
        let j = soak_json(&lines).unwrap();
        assert_eq!(j["rounds"], 12);
    }

    #[test]
    fn the_script_soaks_for_the_planned_time_and_ends_with_the_leak_check() {
        let s = script(&Plan {
            seconds: 60,
            vms: 4,
            mem_mib: 16,
            seed: 7,
            short_fuzz: 0,
        });
        assert!(s.contains("s2vmm soak --vms 4 --vcpus 2 --mem 16M --seconds 60 --seed 7"));
        assert!(!s.contains("s2vmm fuzz --seed 7"));
        assert!(s.find("s2vmm soak --vms").unwrap() < s.find("leakcheck --base").unwrap());
    }
}
