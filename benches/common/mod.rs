//! Shared by the bench binaries: peak memory, child-process scenarios, sample events.

#![allow(dead_code)]

use std::process::Command;

/// The binary's allocator (see `src/main.rs`), so the benches measure what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use profiles_sync::event::{Event, ParseOptions};
use profiles_sync::sample::SampleGenerator;

/// Peak resident memory of this process so far, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time this process has used so far (user + system, every thread), in seconds, from
/// `/proc/self/stat` (clock ticks, assumed 100 per second as on every Linux the project
/// supports). Less noisy than wall time on a shared machine: it counts the work, not the waits.
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // The fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// The whole machine's busy CPU time so far, in seconds (every process: the bench, the servers it
/// started, `psql`), from `/proc/stat`'s first line (user, nice, system, irq, softirq, steal).
pub fn machine_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0.0))
                .collect();
            // user nice system idle iowait irq softirq steal: all but idle and iowait.
            let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
            Some(busy / 100.0)
        })
        .unwrap_or(0.0)
}

/// Runs `scenario` of this bench binary in a fresh process (so its peak memory is its own) and
/// returns the JSON line it printed.
pub fn run_child(scenario: &str, extra: &[&str]) -> serde_json::Value {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .arg("--scenario")
        .arg(scenario)
        .args(extra)
        .output()
        .expect("run scenario");
    if !out.status.success() {
        panic!(
            "scenario {scenario} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    serde_json::from_str(line).expect("scenario JSON")
}

/// The scenario named by `--scenario NAME`, if this process is a child.
pub fn scenario() -> Option<(String, Vec<String>)> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--scenario")?;
    Some((args.get(i + 1)?.clone(), args[i + 2..].to_vec()))
}

/// The events of one round of `people` people, parsed, person by person.
pub fn rounds(people: u64, round: u64) -> impl Iterator<Item = Vec<Event>> {
    let opts = ParseOptions {
        now: jiff::Timestamp::now(),
        source_id: "bench".into(),
        trust_received_at: true,
    };
    let start = jiff::Timestamp::now().as_second() - 40 * 86_400;
    SampleGenerator::new(1, people, start)
        .round(round)
        .map(move |msgs| {
            msgs.iter()
                .filter_map(|m| Event::from_json(m, None, &opts).ok())
                .collect()
        })
}
