//! `pollen-bench`: whole-system benchmarks, each printing its workload, the machine and
//! min / median / max over several runs (or one JSON object with `--json`). They live apart
//! from the product's `pollen` binary, which neither builds nor ships them.
//!
//! - [`aggregate`]: FedAvg folding throughput (GB/s of update bytes) and its memory.
//! - [`rounds`]: rounds with no-op clients over direct gRPC or the whole device path (proxy,
//!   MQTT, S3, agents): seconds per round, MQTT messages per second, peak RSS.
//! - [`train`]: local training throughput (samples/s) of the models.
//! - [`mnist`]: the default MNIST 2NN simulation: seconds per round and wall time to 97%.
//!
//! Numbers are only meaningful from a release build (`cargo run --release --bin pollen-bench`);
//! the output says which build produced it. Micro-benchmarks of single functions are criterion
//! benches in `micro-benches/`.

pub mod aggregate;
pub mod mnist;
pub mod rounds;
pub mod train;

use serde::Serialize;

/// Min, median and max of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// How many measurements.
    pub runs: usize,
}

impl Stats {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Self {
            min: s[0],
            median,
            max: s[n - 1],
            runs: n,
        })
    }

    /// Statistics of `work / seconds` over every run: a rate (GB/s, samples/s) per run.
    pub fn of_rates(work: f64, seconds: &[f64]) -> Option<Self> {
        let rates: Vec<f64> = seconds.iter().map(|s| work / s).collect();
        Self::of(&rates)
    }

    /// Every figure times `k` (a change of unit).
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            min: self.min * k,
            median: self.median * k,
            max: self.max * k,
            runs: self.runs,
        }
    }

    /// "min 1.20, median 1.31, max 1.52 (5 runs)" with `unit` after each figure.
    pub fn describe(&self, digits: usize, unit: &str) -> String {
        format!(
            "min {:.digits$}{unit}, median {:.digits$}{unit}, max {:.digits$}{unit} ({} runs)",
            self.min, self.median, self.max, self.runs
        )
    }
}

/// What the numbers were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: u64,
    pub os: String,
    /// `release`, or `debug` (numbers from a debug build are not comparable).
    pub build: &'static str,
    pub pollen_version: &'static str,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(
                || std::env::consts::ARCH.to_string(),
                |(_, v)| v.trim().into(),
            );
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| proc_kib(&m, "MemTotal:"))
            .unwrap_or(0);
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            os: std::env::consts::OS.to_string(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            pollen_version: env!("CARGO_PKG_VERSION"),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB RAM, {} {} build",
            self.cpu,
            self.cores,
            self.memory_bytes as f64 / GIB,
            self.os,
            self.build
        )
    }
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
pub const MIB: f64 = 1024.0 * 1024.0;

/// A `/proc` field in kB, as bytes.
fn proc_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The process's peak resident set size (VmHWM) in bytes; `None` where `/proc` is missing.
pub fn peak_rss_bytes() -> Option<u64> {
    self_status("VmHWM:")
}

/// The process's current resident set size (VmRSS) in bytes.
pub fn rss_bytes() -> Option<u64> {
    self_status("VmRSS:")
}

fn self_status(field: &str) -> Option<u64> {
    proc_kib(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// Current and peak resident set size from one read of `/proc/self/status`. Two separate reads
/// race with the process's other threads (the RSS can grow past the peak read a moment before);
/// within one read the kernel reports the peak as at least the current RSS.
pub fn rss_and_peak_bytes() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    Some((proc_kib(&text, "VmRSS:")?, proc_kib(&text, "VmHWM:")?))
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5), so that a measurement's peak
/// does not include what set-up used and freed. Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes as "1.23 GiB" / "456.7 MiB".
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// The first lines every benchmark prints: what ran, and on what.
pub fn header(bench: &str, workload: &str, machine: &Machine) -> Vec<String> {
    vec![
        format!("bench {bench}: {workload}"),
        format!("machine: {}", machine.describe()),
    ]
}

/// Prints a finished benchmark: one JSON object, or the human lines.
pub fn print_report<T: Serialize>(report: &T, human: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        for line in human {
            println!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_of_sorted_samples() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).expect("samples");
        assert_eq!((s.min, s.median, s.max, s.runs), (1.0, 2.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).expect("samples");
        assert_eq!(s.median, 2.5);
        assert!(Stats::of(&[]).is_none());
        // Rates from durations: the slowest run is the lowest rate; with an even count the
        // median is the mean of the two middle rates, not the rate of the mean time.
        let r = Stats::of_rates(8.0, &[1.0, 2.0, 4.0]).expect("samples");
        assert_eq!((r.min, r.median, r.max), (2.0, 4.0, 8.0));
        let r = Stats::of_rates(8.0, &[1.0, 4.0]).expect("samples");
        assert_eq!(r.median, 5.0);
    }

    #[test]
    fn machine_and_memory_are_read_from_proc() {
        let m = Machine::detect();
        assert!(m.cores >= 1);
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(m.memory_bytes > 0);
            assert!(peak_rss_bytes().expect("VmHWM") > 0);
            assert!(rss_bytes().expect("VmRSS") > 0);
            let (now, peak) = rss_and_peak_bytes().expect("VmRSS and VmHWM");
            assert!(peak >= now && now > 0, "peak {peak} < current {now}");
        }
    }
}
