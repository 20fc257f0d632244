//! How the CLI prints rounds, finished runs and devices.

use indicatif::{ProgressBar, ProgressStyle};
use pollen_coordinator::RoundRecord;
use pollen_proxy::DeviceRecord;

use crate::spec::RunSpec;

/// A metric as a person reads it: fractions as percentages.
pub fn show_metric(name: &str, value: f64) -> String {
    match name {
        "accuracy" | "macro_f1" => format!("{:.2}%", value * 100.0),
        _ => format!("{value:.4}"),
    }
}

/// Prints rounds as JSON lines (`json`, for scripts: nothing else goes to stdout) or drives a
/// progress bar on stderr.
pub fn reporter(
    spec: &RunSpec,
    json: bool,
) -> (ProgressBar, impl FnMut(&RoundRecord) + Send + 'static) {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(spec.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let b = bar.clone();
    let report = move |r: &RoundRecord| {
        if json {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("round {} could not be printed: {e}", r.round),
            }
        } else {
            let name = r.primary_metric.as_deref().unwrap_or("accuracy");
            let value = r
                .metrics
                .get(name)
                .map_or("-".to_string(), |v| show_metric(name, *v));
            let privacy = r.privacy.as_ref().map_or(String::new(), |p| {
                format!("  ε {:.2} (δ {:e})", p.epsilon, p.delta)
            });
            b.set_message(format!(
                "{name} {value}  ok {}/{}  {:.2}s/round{privacy}",
                r.succeeded, r.sampled, r.seconds
            ));
            b.inc(1);
        }
    };
    (bar, report)
}

/// The one line a finished run ends with: final metric, median round, failures, records.
pub fn print_summary(run_id: &str, run_dir: &std::path::Path, rounds: &[RoundRecord]) {
    let mut secs: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().unwrap_or(0.0);
    let metric = rounds
        .iter()
        .rev()
        .find_map(|r| r.primary_metric.clone())
        .unwrap_or_else(|| "accuracy".into());
    let evaluation = rounds
        .iter()
        .rev()
        .find_map(|r| r.evaluation.clone())
        .unwrap_or_else(|| "no".into());
    let last = rounds
        .last()
        .and_then(|r| r.metrics.get(&metric))
        .map_or("-".into(), |v| show_metric(&metric, *v));
    // MNIST runs are compared with McMahan et al. by the round that first reaches 97%.
    let first97 = if metric == "accuracy" {
        let at = rounds
            .iter()
            .find(|r| r.accuracy.is_some_and(|a| a >= 0.97))
            .map_or("not reached".into(), |r| format!("at round {}", r.round));
        format!(", 97% {at}")
    } else {
        String::new()
    };
    let failed: usize = rounds.iter().map(|r| r.failed).sum();
    // What a run with differential privacy spent, as its accountant reports it.
    let privacy = rounds
        .iter()
        .rev()
        .find_map(|r| r.privacy.as_ref())
        .map_or(String::new(), |p| {
            format!(
                ", {} DP ε = {:.2} at δ = {:e} (noise multiplier {}, {} steps)",
                p.mechanism, p.epsilon, p.delta, p.noise_multiplier, p.steps
            )
        });
    let moved: u64 = rounds.iter().map(|r| r.bytes_sent + r.bytes_received).sum();
    eprintln!(
        "run {run_id}: {} rounds, final {metric} {last} ({evaluation} evaluation){first97}, median {median:.3} s/round, {failed} client failures, {:.1} MB of weights moved{privacy}\nrecords: {}",
        rounds.len(),
        moved as f64 / 1e6,
        run_dir.display()
    );
}

/// A table of devices, as `pollen devices` and `pollen run` show them.
pub fn print_devices(devices: &[DeviceRecord]) {
    eprintln!(
        "{:<24} {:<8} {:>9} {:<20} {:<10} {:>10}",
        "DEVICE", "STATE", "EXAMPLES", "DATA", "AGENT", "LAST SEEN"
    );
    let now = pollen_proto::now_unix_ms();
    for d in devices {
        let ago = now.saturating_sub(d.last_seen_unix_ms) as f64 / 1000.0;
        eprintln!(
            "{:<24} {:<8} {:>9} {:<20} {:<10} {:>9.1}s",
            d.device_id,
            if d.online { "online" } else { "offline" },
            d.num_examples,
            d.data.as_ref().map_or("-".to_string(), |v| v.summary()),
            d.agent_version,
            ago
        );
    }
}
