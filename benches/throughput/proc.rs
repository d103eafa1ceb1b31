//! /proc: memory (RSS, peak RSS), CPU time per component between two snapshots, and the machine;
//! and, through `ss`, the bytes a process received on its connections to a broker.

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use crate::report::round;

/// The number in kB on the line of `path` that starts with `field` (`/proc/…/status`, `/proc/meminfo`).
fn kb_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find(|line| line.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// A field of `/proc/<pid>/status` in kB (`pid` may be `self`): `VmRSS`, `VmHWM` (peak RSS).
pub fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    kb_field(&format!("/proc/{pid}/status"), field)
}

/// kB in MB, to 0.1.
pub fn mb(kb: u64) -> f64 {
    round(kb as f64 / 1024.0, 1)
}

/// The peak RSS of process `pid` in MB (0 where it cannot be read).
pub fn peak_rss_mb(pid: u32) -> f64 {
    mb(proc_status_kb(&pid.to_string(), "VmHWM").unwrap_or(0))
}

/// utime, stime, cutime, cstime in clock ticks.
fn proc_ticks(stat_path: &str) -> Option<[u64; 4]> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some([fields[11].parse().ok()?, fields[12].parse().ok()?, fields[13].parse().ok()?, fields[14].parse().ok()?])
}

/// utime + stime in clock ticks (0 where it cannot be read).
fn own_ticks(stat_path: &str) -> u64 {
    proc_ticks(stat_path).map_or(0, |t| t[0] + t[1])
}

const TICK: f64 = 0.01; // USER_HZ is 100 on Linux

#[derive(Clone, Default)]
pub struct CpuSnapshot {
    at: Option<Instant>,
    this_process: u64,
    threads: HashMap<String, u64>,
    postgres: u64,
    /// Backends connected to the bench's databases.
    postgres_bench: u64,
    /// Backends of other databases (anything else using the same server meanwhile).
    postgres_other: u64,
    child: u64,
    broker: u64,
    system_busy: u64,
    system_total: u64,
}

pub fn cpu_snapshot(child: Option<u32>, broker: Option<u32>) -> CpuSnapshot {
    let mut snapshot = CpuSnapshot { at: Some(Instant::now()), ..Default::default() };
    snapshot.this_process = own_ticks("/proc/self/stat");
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
            let group = if name.starts_with("rdk:") {
                "librdkafka threads".to_string()
            } else if name.starts_with("tokio-r") {
                "tokio workers".to_string()
            } else {
                name
            };
            let ticks = own_ticks(&format!("{}/stat", path.display()));
            *snapshot.threads.entry(group).or_default() += ticks;
        }
    }
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let pid = process.file_name().to_string_lossy().to_string();
            if !pid.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres") {
                // Backends' own time, and the postmaster's reaped children (exited backends).
                let ticks = proc_ticks(&format!("/proc/{pid}/stat")).map_or(0, |t| t.iter().sum());
                snapshot.postgres += ticks;
                let cmdline =
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                        .to_string();
                if cmdline.contains("projector_bench_") {
                    snapshot.postgres_bench += ticks;
                } else if cmdline.contains("127.0.0.1(") || cmdline.contains("[local]") || cmdline.contains("::1(") {
                    snapshot.postgres_other += ticks;
                }
            }
        }
    }
    let ticks_of = |pid: Option<u32>| pid.map_or(0, |pid| own_ticks(&format!("/proc/{pid}/stat")));
    snapshot.child = ticks_of(child);
    snapshot.broker = ticks_of(broker);
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(line) = stat.lines().next() {
            let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            snapshot.system_total = values.iter().take(8).sum();
            snapshot.system_busy =
                snapshot.system_total - values.get(3).copied().unwrap_or(0) - values.get(4).copied().unwrap_or(0);
        }
    }
    snapshot
}

/// CPU seconds per component between two snapshots, and each as a share of the wall time.
pub fn cpu_split(before: &CpuSnapshot, after: &CpuSnapshot) -> Value {
    let wall = after.at.unwrap().duration_since(before.at.unwrap()).as_secs_f64();
    let seconds = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * TICK;
    let mut threads: Vec<(String, f64)> = after
        .threads
        .iter()
        .map(|(name, ticks)| (name.clone(), seconds(before.threads.get(name).copied().unwrap_or(0), *ticks)))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let busy = seconds(before.system_busy, after.system_busy);
    let total = seconds(before.system_total, after.system_total);
    json!({
        "wall_s": round(wall, 2),
        "bench_process_cpu_s": round(seconds(before.this_process, after.this_process), 2),
        "bench_process_threads_cpu_s": threads.iter().map(|(n, s)| json!({"thread": n, "cpu_s": round(*s, 2)})).collect::<Vec<_>>(),
        "postgres_cpu_s": round(seconds(before.postgres, after.postgres), 2),
        "postgres_bench_backends_cpu_s": round(seconds(before.postgres_bench, after.postgres_bench), 2),
        "postgres_other_databases_backends_cpu_s": round(seconds(before.postgres_other, after.postgres_other), 2),
        "engine_process_cpu_s": round(seconds(before.child, after.child), 2),
        "broker_process_cpu_s": round(seconds(before.broker, after.broker), 2),
        "machine_busy_percent": round(if total > 0.0 { 100.0 * busy / total } else { 0.0 }, 1),
    })
}

/// The machine: CPU model, cores, memory, load average at the start.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = kb_field("/proc/meminfo", "MemTotal:").map_or(0.0, |kb| round(kb as f64 / 1024.0 / 1024.0, 1));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    json!({ "cpu": cpu, "cores": cores, "memory_gib": memory_gib, "loadavg_at_start": load })
}

/// The bytes received so far on each established TCP connection of process `pid` to a port of
/// `ports` (the kernel's `tcp_info.bytes_received`, read by `ss`), by local and peer address.
/// `None` when `ss` cannot be run.
pub fn received_from(pid: u32, ports: &[u16]) -> Option<HashMap<String, u64>> {
    let filter = ports.iter().map(|port| format!("dport = :{port}")).collect::<Vec<_>>().join(" or ");
    let output = Command::new("ss").args(["-tinpH", "state", "established", &format!("( {filter} )")]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    // Each connection is a line (`Recv-Q Send-Q local peer users:((…,pid=N,…))`) followed by an
    // indented line of its `tcp_info`.
    let owner = format!("pid={pid},");
    let mut received = HashMap::new();
    let mut connection: Option<String> = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if !line.starts_with(char::is_whitespace) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            connection = (fields.len() >= 4 && line.contains(&owner)).then(|| format!("{} {}", fields[2], fields[3]));
        } else if let Some(connection) = connection.take() {
            let bytes = line.split_whitespace().find_map(|field| field.strip_prefix("bytes_received:"));
            received.insert(connection, bytes.and_then(|b| b.parse().ok()).unwrap_or(0));
        }
    }
    Some(received)
}

/// The bytes received between two [`received_from`] readings, on the connections open at the
/// second (one closed meanwhile is not counted).
pub fn received_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after.iter().map(|(connection, bytes)| bytes.saturating_sub(before.get(connection).copied().unwrap_or(0))).sum()
}
