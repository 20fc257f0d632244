//! Smoke runs of every `pollen-bench` command on tiny workloads: each finishes, prints one JSON object
//! with the documented fields, and its figures are consistent. Nothing here asserts a speed:
//! benchmark numbers come from `docs/BENCHMARKS.md`'s commands on a quiet machine.

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("pollen-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pollen-bench {args:?} failed: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object: {stdout}");
    serde_json::from_str(lines[0]).expect("JSON")
}

fn stats_ok(v: &serde_json::Value, runs: u64) {
    let (min, median, max) = (
        v["min"].as_f64().expect("min"),
        v["median"].as_f64().expect("median"),
        v["max"].as_f64().expect("max"),
    );
    assert!(0.0 < min && min <= median && median <= max, "{v}");
    assert_eq!(v["runs"], runs, "{v}");
}

fn machine_ok(v: &serde_json::Value) {
    assert!(
        v["machine"]["cores"].as_u64().is_some_and(|c| c >= 1),
        "{v}"
    );
    assert!(v["machine"]["cpu"].as_str().is_some_and(|c| !c.is_empty()));
}

#[test]
fn bench_aggregate_reports_throughput_and_memory_of_one_model_not_all_updates() {
    for wire in [false, true] {
        let mut args = vec![
            "aggregate",
            "--shape",
            "flat",
            "--params",
            "1000000",
            "--updates",
            "16",
            "--runs",
            "3",
        ];
        if wire {
            args.push("--from-wire");
        }
        let v = bench(&args);
        assert_eq!(v["bench"], "aggregate");
        assert_eq!(v["from_wire"], wire);
        let input = 16 * 1_000_000 * 4;
        assert_eq!(v["bytes_per_run"], input);
        stats_ok(&v["seconds"], 3);
        stats_ok(&v["gbps_stats"], 3);
        assert_eq!(v["gbps"], v["gbps_stats"]["median"]);
        // The updates (64 MB) are all in memory, so the process peaks above them; aggregating
        // them takes a few models' worth (the running sum, the result, one decoded update),
        // far below holding them all again.
        assert!(v["peak_rss_bytes"].as_u64().expect("rss") > input, "{v}");
        let aggregation = v["aggregation_rss_bytes"]
            .as_u64()
            .expect("aggregation rss");
        assert!(
            aggregation < input / 2,
            "aggregation took {aggregation} bytes: {v}"
        );
        machine_ok(&v);
    }
}

#[test]
fn bench_rounds_runs_no_op_rounds_on_every_transport() {
    for transport in ["in-process", "grpc", "device"] {
        let v = bench(&[
            "rounds",
            "--clients",
            "4",
            "--params",
            "10000",
            "--rounds",
            "2",
            "--transport",
            transport,
        ]);
        assert_eq!(v["bench"], "rounds");
        assert_eq!(v["transport"], transport);
        assert_eq!(v["sampled_per_round"], 4, "{v}");
        stats_ok(&v["round_seconds"], 2);
        assert_eq!(v["median_round_seconds"], v["round_seconds"]["median"]);
        // Every client got the model and sent it back: 4 x 2 blobs of 40 kB and a header.
        let bytes = v["bytes_per_round"].as_u64().expect("bytes");
        assert!((8 * 40_000..8 * 41_000).contains(&bytes), "{v}");
        assert!(v["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
        // Device path: 4 commands and at least 4 replies per round through the broker.
        match transport {
            "device" => assert!(v["mqtt_messages_per_second"].as_f64().expect("rate") > 0.0),
            _ => assert!(v["mqtt_messages_per_second"].is_null(), "{v}"),
        }
        machine_ok(&v);
    }
}

#[test]
fn bench_train_reports_samples_per_second_per_model_and_batch_size() {
    let v = bench(&[
        "train",
        "--models",
        "mnist-2nn",
        "--batch-sizes",
        "10,32",
        "--examples",
        "64",
        "--runs",
        "2",
    ]);
    assert_eq!(v["bench"], "train");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for (r, b) in results.iter().zip([10, 32]) {
        assert_eq!(r["model"], "mnist-2nn");
        assert_eq!(r["batch_size"], b);
        stats_ok(&r["samples_per_second"], 2);
        // samples/s x seconds per epoch = the epoch's examples (the medians of two runs are
        // means of two, so only nearly).
        let product = r["samples_per_second"]["median"].as_f64().expect("rate")
            * r["seconds_per_epoch"]["median"].as_f64().expect("s");
        assert!((product / 64.0 - 1.0).abs() < 0.2, "{r}");
    }
}

#[test]
fn bench_mnist_stops_at_the_target_accuracy() {
    // A low target that the first rounds reach: the run stops there and reports it.
    let v = bench(&[
        "mnist",
        "--transport",
        "in-process",
        "--max-rounds",
        "10",
        "--target",
        "0.5",
    ]);
    assert_eq!(v["bench"], "mnist");
    let round = v["target_round"].as_u64().expect("target reached");
    assert_eq!(v["rounds_run"], round, "the run stops at the target: {v}");
    assert!(v["final_accuracy"].as_f64().expect("accuracy") >= 0.5);
    assert!(
        v["wall_seconds_to_target"].as_f64().expect("wall")
            >= v["rounds_seconds_to_target"].as_f64().expect("rounds")
    );
    stats_ok(&v["round_seconds"], round);
}

/// A benchmark whose round fails ends at once with that round's error, however many rounds it
/// was asked for and however many agents it must stop.
#[test]
fn a_failed_round_ends_the_benchmark_promptly_with_its_error() {
    let start = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-bench"))
        .args([
            "rounds",
            "--clients",
            "200",
            "--params",
            "100000",
            "--rounds",
            "1000",
            "--transport",
            "device",
            // No device answers in time: round 1 fails.
            "--round-timeout",
            "1ms",
            "--json",
        ])
        .output()
        .expect("pollen-bench runs");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("error: round 1 did not succeed with all 200 sampled clients"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no report for a failed benchmark");
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
}
