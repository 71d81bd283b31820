//! The counters s2vmm prints at the end: the VM's (`S2PIN_GET_STATS`), the
//! module's debugfs files for the VM, and a few host values (the process's
//! `locked_vm`, NUMA-balancing vmstat deltas), as text and as JSON.

use std::collections::BTreeMap;

use s2pin_uapi::S2pinVmStats;
use serde_json::{json, Map, Value};

/// vmstat counters of NUMA balancing and migration, reported as deltas
/// over the run.
pub const VMSTAT_KEYS: &[&str] = &[
    "numa_pte_updates",
    "numa_huge_pte_updates",
    "numa_hint_faults",
    "numa_hint_faults_local",
    "numa_pages_migrated",
    "pgmigrate_success",
    "pgmigrate_fail",
    "thp_migration_success",
    "thp_migration_fail",
];

/// (name, value, description) of every VM counter, in ABI order.
#[must_use]
pub fn counters(s: &S2pinVmStats) -> Vec<(&'static str, u64, &'static str)> {
    S2pinVmStats::FIELDS
        .iter()
        .zip(s.to_array())
        .map(|((name, doc), v)| (*name, v, *doc))
        .collect()
}

/// `after - before` per counter (gauges may go down: saturating at 0 is
/// wrong for them, so the difference is signed).
#[must_use]
pub fn delta(before: &S2pinVmStats, after: &S2pinVmStats) -> Vec<(&'static str, i128)> {
    S2pinVmStats::FIELDS
        .iter()
        .zip(before.to_array().into_iter().zip(after.to_array()))
        .map(|((name, _), (b, a))| (*name, i128::from(a) - i128::from(b)))
        .collect()
}

/// A value from `/proc/<pid>/status` in kB (e.g. `VmLck`).
#[must_use]
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `/proc/vmstat` as a map.
#[must_use]
pub fn parse_vmstat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// `name value` lines as a JSON object, if every line is one.
fn name_values(text: &str) -> Option<Value> {
    let mut m = Map::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        let (k, v, None) = (w.next()?, w.next()?, w.next()) else {
            return None;
        };
        m.insert(k.to_string(), json!(v.parse::<u64>().ok()?));
    }
    Some(Value::Object(m))
}

/// Everything printed at the end of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `policy`, `backing`, `mode`, `vcpus`, `mem_mib`, ...
    pub config: Vec<(&'static str, String)>,
    /// The VM's counters at the end (before teardown).
    pub vm: S2pinVmStats,
    /// The module's debugfs folder of the VM and its files (name, content).
    pub debugfs: Option<(String, Vec<(String, String)>)>,
    /// `locked_vm` of the process at the end, KiB (`VmLck`).
    pub locked_vm_kib: Option<u64>,
    /// vmstat deltas over the run ([`VMSTAT_KEYS`]).
    pub vmstat: Vec<(&'static str, i128)>,
    /// Pages of the tested memory per NUMA node at the end (node, pages).
    pub nodes: Vec<(i32, u64)>,
    /// The guest: exit, PASS lines, failures, checksums.
    pub guest: Vec<(&'static str, Value)>,
    /// Hook outcomes (name, key-values).
    pub hook: Vec<(String, Value)>,
}

impl Report {
    /// Human-readable lines.
    #[must_use]
    pub fn text(&self) -> String {
        let mut s = String::from("s2vmm: counters");
        for (k, v) in &self.config {
            s.push_str(&format!(" {k}={v}"));
        }
        s.push('\n');
        for (name, v, doc) in counters(&self.vm) {
            s.push_str(&format!("  {name:<32} {v:>12}  {doc}\n"));
        }
        if let Some(kib) = self.locked_vm_kib {
            s.push_str(&format!(
                "  {:<32} {:>12}  locked_vm of s2vmm (VmLck, KiB) at the end\n",
                "locked_vm_kib", kib
            ));
        }
        for (k, v) in &self.vmstat {
            s.push_str(&format!(
                "  {:<32} {v:>12}  /proc/vmstat {k}, change over the run\n",
                format!("vmstat_{k}")
            ));
        }
        for (node, n) in &self.nodes {
            s.push_str(&format!(
                "  {:<32} {n:>12}  pages of the tested memory on NUMA node {node} at the end\n",
                format!("pages_on_node{node}")
            ));
        }
        if let Some((dir, files)) = &self.debugfs {
            s.push_str(&format!("s2vmm: debugfs {dir}\n"));
            let ours: BTreeMap<&str, u64> = counters(&self.vm)
                .into_iter()
                .map(|(n, v, _)| (n, v))
                .collect();
            for (name, content) in files {
                let lines: Vec<&str> = content.trim().lines().collect();
                // A file of the same counters: say whether it agrees.
                let pairs: Option<Vec<(&str, u64)>> = lines
                    .iter()
                    .map(|l| {
                        let mut w = l.split_whitespace();
                        Some((w.next()?, w.next()?.parse().ok()?))
                    })
                    .collect();
                if let Some(pairs) =
                    pairs.filter(|p| p.len() > 1 && p.iter().all(|(k, _)| ours.contains_key(k)))
                {
                    let differ: Vec<String> = pairs
                        .iter()
                        .filter(|(k, v)| ours.get(k) != Some(v))
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    if differ.is_empty() {
                        s.push_str(&format!(
                            "    {name}: the {} counters above, equal\n",
                            pairs.len()
                        ));
                    } else {
                        s.push_str(&format!(
                            "    {name}: differs from S2PIN_GET_STATS: {}\n",
                            differ.join(", ")
                        ));
                    }
                    continue;
                }
                if let [one] = lines.as_slice() {
                    s.push_str(&format!("    {name}: {one}\n"));
                } else {
                    s.push_str(&format!("    {name}:\n"));
                    for l in lines {
                        s.push_str(&format!("      {l}\n"));
                    }
                }
            }
        }
        s
    }

    /// The JSON document of `--stats-json`.
    #[must_use]
    pub fn json(&self) -> Value {
        let mut vm = Map::new();
        for (name, v, _) in counters(&self.vm) {
            vm.insert(name.to_string(), json!(v));
        }
        let debugfs = self.debugfs.as_ref().map(|(dir, files)| {
            let mut m = Map::new();
            for (name, content) in files {
                let c = content.trim();
                let v = c
                    .parse::<u64>()
                    .map_or_else(|_| name_values(c).unwrap_or_else(|| json!(c)), |n| json!(n));
                m.insert(name.clone(), v);
            }
            json!({ "dir": dir, "files": m })
        });
        let mut vmstat = Map::new();
        for (k, v) in &self.vmstat {
            vmstat.insert(
                (*k).to_string(),
                json!(i64::try_from(*v).unwrap_or(i64::MAX)),
            );
        }
        let config: Map<String, Value> = self
            .config
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        let guest: Map<String, Value> = self
            .guest
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        let hook: Map<String, Value> = self.hook.iter().cloned().collect();
        let nodes: Map<String, Value> = self
            .nodes
            .iter()
            .map(|(node, n)| (node.to_string(), json!(n)))
            .collect();
        json!({
            "config": config,
            "vm": vm,
            "locked_vm_kib": self.locked_vm_kib,
            "vmstat_delta": vmstat,
            "pages_per_node": nodes,
            "debugfs": debugfs,
            "guest": guest,
            "hook": hook,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pinned: u64, pins: u64) -> S2pinVmStats {
        S2pinVmStats {
            pinned_now: pinned,
            pins,
            ..S2pinVmStats::default()
        }
    }

    #[test]
    fn text_and_json_carry_every_counter() {
        let r = Report {
            config: vec![("policy", "confirm".into())],
            vm: stats(16896, 16900),
            debugfs: Some((
                "123-0".into(),
                vec![
                    ("pinned".into(), "16896\n".into()),
                    ("stats".into(), "pins 16900\npinned_now 16896\n".into()),
                    ("other".into(), "a 1\nb 2\n".into()),
                    ("stale".into(), "pins 1\npinned_now 16896\n".into()),
                ],
            )),
            locked_vm_kib: Some(67584),
            vmstat: vec![("numa_pte_updates", 5)],
            nodes: vec![(1, 4096)],
            guest: vec![("status", json!(0))],
            hook: vec![("munmap".into(), json!({"pages": 2}))],
        };
        let t = r.text();
        assert!(t.starts_with("s2vmm: counters policy=confirm\n"), "{t}");
        for (name, _) in S2pinVmStats::FIELDS {
            assert!(t.contains(&format!("  {name} ")), "{name}");
        }
        assert!(
            t.contains("pinned_now                              16896"),
            "{t}"
        );
        assert!(
            t.contains("locked_vm_kib                           67584"),
            "{t}"
        );
        assert!(t.contains("vmstat_numa_pte_updates"));
        assert!(
            t.contains("  pages_on_node1                           4096  "),
            "{t}"
        );
        assert!(t.contains("s2vmm: debugfs 123-0"));
        let j = r.json();
        assert_eq!(j["vm"]["pinned_now"], 16896);
        assert_eq!(j["vm"]["pins"], 16900);
        assert_eq!(
            j["vm"].as_object().unwrap().len(),
            S2pinVmStats::FIELDS.len()
        );
        assert_eq!(j["locked_vm_kib"], 67584);
        assert_eq!(j["debugfs"]["files"]["pinned"], 16896);
        assert_eq!(j["debugfs"]["files"]["stats"]["pins"], 16900);
        assert!(
            t.contains("    stats: the 2 counters above, equal\n"),
            "{t}"
        );
        assert!(t.contains("    other:\n      a 1\n      b 2\n"), "{t}");
        assert!(
            t.contains("    stale: differs from S2PIN_GET_STATS: pins 1\n"),
            "{t}"
        );
        assert_eq!(j["vmstat_delta"]["numa_pte_updates"], 5);
        assert_eq!(j["pages_per_node"]["1"], 4096);
        assert_eq!(j["config"]["policy"], "confirm");
        assert_eq!(j["hook"]["munmap"]["pages"], 2);
        // It round-trips through text.
        let back: Value = serde_json::from_str(&j.to_string()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn deltas_are_signed() {
        let d = delta(&stats(10, 10), &stats(4, 20));
        assert_eq!(d[0], ("pinned_now", -6));
        assert_eq!(d[1], ("pins", 10));
    }

    #[test]
    fn proc_files_parse() {
        let status = "Name:\ts2vmm\nVmLck:\t   65536 kB\nVmPin:\t       0 kB\n";
        assert_eq!(status_kib(status, "VmLck"), Some(65536));
        assert_eq!(status_kib(status, "VmPin"), Some(0));
        assert_eq!(status_kib(status, "VmRSS"), None);
        let v = parse_vmstat("numa_pte_updates 12\nnuma_hint_faults 3\nbad line x\n");
        assert_eq!(v["numa_pte_updates"], 12);
        assert_eq!(v.get("bad"), None);
    }
}
