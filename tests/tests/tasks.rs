//! Tasks other than MNIST, declared in specs and trained over the device path (proxy, embedded
//! MQTT broker, embedded S3): classification of real sensor windows, regression and
//! autoencoder anomaly detection on CSV files the test writes, as a user would bring them.

use std::fmt::Write as _;
use std::path::Path;

use pollen_workflows::RunSpec;
use pollen_workflows::simulate::{SimulateOptions, Simulation, Transport, simulate};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

async fn run(spec_text: &str, dir: &Path) -> (Simulation, RunSpec) {
    let spec = RunSpec::parse(spec_text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let options = SimulateOptions::new(dir.join("runs"));
    assert_eq!(options.transport, Transport::Device);
    let sim = simulate(&spec, &options, CancellationToken::new(), |_| {})
        .await
        .expect("simulation runs");
    (sim, spec)
}

fn metric(sim: &Simulation, round: usize, name: &str) -> f64 {
    let r = &sim.summary.rounds[round];
    *r.metrics
        .get(name)
        .unwrap_or_else(|| panic!("round {}: no {name} in {:?}", r.round, r.metrics))
}

/// A spec over `path` with the given `[task]` and `[model]` lines; devices evaluate on their
/// holdout (no server data).
fn spec(name: &str, path: &Path, task: &str, model: &str, train: &str, rounds: u64) -> String {
    format!(
        r#"
name = "{name}"
seed = 7
rounds = {rounds}
round_timeout = "60s"

[task]
{task}

[model]
{model}

[data]
path = {path:?}
clients = 4
partition = {{ kind = "iid" }}

[strategy]
name = "fedavg"
fraction_fit = 1.0
fraction_evaluate = 1.0
min_fit_clients = 4
min_available_clients = 4

[train]
{train}

[evaluate]
centralized = false
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1d_cnn_learns_to_tell_activities_from_smartwatch_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workflows/basicmotions.toml");
    let mut spec = RunSpec::load(&shipped).expect("shipped spec").0;
    spec.rounds = 6;
    let options = SimulateOptions::new(dir.path().join("runs"));
    let sim = simulate(&spec, &options, CancellationToken::new(), |_| {})
        .await
        .expect("simulation runs");
    let rounds = &sim.summary.rounds;
    // Four balanced activities: a trivial model is right a quarter of the time.
    let last = metric(&sim, rounds.len() - 1, "accuracy");
    assert!(last >= 0.85, "accuracy after 6 rounds: {last}");
    assert!(metric(&sim, rounds.len() - 1, "macro_f1") >= 0.8);
    let (first, final_loss) = (
        rounds[0].train_loss.expect("train loss"),
        rounds[rounds.len() - 1].train_loss.expect("train loss"),
    );
    assert!(
        final_loss < 0.75 * first,
        "train loss {first} -> {final_loss}"
    );
    for r in rounds {
        assert_eq!(r.evaluation.as_deref(), Some("centralized"), "{r:?}");
        assert_eq!((r.succeeded, r.failed), (4, 0), "{:?}", r.failures);
        // Devices evaluated on their holdouts too: exact federated macro-F1 from their sums.
        assert!(r.federated_metrics.contains_key("macro_f1"), "{r:?}");
    }
}

/// A machine's power draw from its temperature, load and speed, logged at very different
/// scales: federated scaling of features and target makes it trainable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_on_unscaled_sensor_columns_beats_predicting_the_mean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("power.csv");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut csv = String::from("machine,temperature_c,load_pct,rpm,power_w\n");
    let mut ys = Vec::new();
    for i in 0..1600 {
        let temp = 60.0 + 8.0 * normal(&mut rng);
        let load = 100.0 * rng.random::<f64>();
        let rpm = 1500.0 + 200.0 * normal(&mut rng);
        let power = 400.0
            + 12.0 * load
            + 3.0 * (temp - 60.0)
            + 0.2 * (rpm - 1500.0)
            + 10.0 * normal(&mut rng);
        ys.push(power);
        writeln!(csv, "m{},{temp:.3},{load:.3},{rpm:.1},{power:.2}", i % 7).expect("write");
    }
    std::fs::write(&path, csv).expect("csv");
    let text = spec(
        "power",
        &path,
        r#"kind = "regression"
features_except = ["machine"]
target = "power_w""#,
        r#"family = "mlp"
hidden = [32]"#,
        r#"optimizer = "adam"
learning_rate = 0.01
local_epochs = 3
batch_size = 32"#,
        8,
    );
    let (sim, _) = run(&text, dir.path()).await;
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let std = (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / ys.len() as f64).sqrt();
    let rounds = &sim.summary.rounds;
    let last = rounds.len() - 1;
    // Predicting the mean has an RMSE of the target's standard deviation (about 350 W here).
    let rmse = metric(&sim, last, "rmse");
    assert!(rmse < 0.3 * std, "RMSE {rmse} vs the target's std {std}");
    assert!(metric(&sim, last, "r2") > 0.9);
    assert!(metric(&sim, last, "rmse") < metric(&sim, 0, "rmse"));
    for r in rounds {
        // No server data: what a round reports is the devices' holdouts.
        assert_eq!(r.evaluation.as_deref(), Some("federated"), "{r:?}");
        assert_eq!(r.primary_metric.as_deref(), Some("rmse"));
        assert!(r.metrics.contains_key("mae"));
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sim.run_dir.join("task.json")).expect("task.json"))
            .expect("json");
    assert_eq!(
        manifest["task"]["features"],
        serde_json::json!(["temperature_c", "load_pct", "rpm"])
    );
    assert!(
        manifest["fitted"]["targets"]["std"][0]
            .as_f64()
            .expect("target scaling")
            > 100.0
    );
}

/// Two correlated sensor pairs; faults break the correlation. An autoencoder trained on the
/// normal rows scores the faulty ones higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoencoder_scores_faults_above_normal_readings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pump.csv");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut csv = String::from("pressure_in,pressure_out,flow,current,fault\n");
    for _ in 0..2000 {
        let p_in = 3.0 + 0.5 * normal(&mut rng);
        let flow = 20.0 + 4.0 * normal(&mut rng);
        let faulty = rng.random::<f64>() < 0.05;
        let (p_out, current) = if faulty {
            // A leaking seal: the outlet pressure no longer follows the inlet, and the motor
            // draws more current for the same flow.
            (
                3.0 + 0.5 * normal(&mut rng),
                0.25 * flow + 1.5 + 0.3 * normal(&mut rng),
            )
        } else {
            (
                1.8 * p_in + 0.05 * normal(&mut rng),
                0.25 * flow + 0.05 * normal(&mut rng),
            )
        };
        writeln!(
            csv,
            "{p_in:.4},{p_out:.4},{flow:.4},{current:.4},{}",
            u8::from(faulty)
        )
        .expect("write");
    }
    std::fs::write(&path, csv).expect("csv");
    let text = spec(
        "pump",
        &path,
        r#"kind = "anomaly"
features = ["pressure_in", "pressure_out", "flow", "current"]
label = "fault""#,
        r#"family = "autoencoder"
hidden = [16, 2]
activation = "tanh""#,
        r#"optimizer = "adam"
learning_rate = 0.01
local_epochs = 5
batch_size = 32"#,
        10,
    );
    let (sim, _) = run(&text, dir.path()).await;
    let last = sim.summary.rounds.len() - 1;
    // A score that knows nothing ranks faults at random: AUC 0.5.
    let auc = metric(&sim, last, "auc");
    assert!(auc > 0.9, "ROC AUC {auc}");
    let threshold = metric(&sim, last, "threshold");
    assert!(threshold > 0.0 && threshold.is_finite());
    let recall = metric(&sim, last, "recall");
    assert!(
        recall > 0.5,
        "recall {recall} at threshold {threshold}: {:?}",
        sim.summary.rounds[last].metrics
    );
    let (first, final_loss) = (
        sim.summary.rounds[0].train_loss.expect("train loss"),
        sim.summary.rounds[last].train_loss.expect("train loss"),
    );
    assert!(final_loss < first, "train loss {first} -> {final_loss}");
}

/// The coordinator's fitted scaling is the mean and standard deviation of the union of the
/// devices' training data, computed here in one pass over all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_statistics_equal_the_statistics_of_the_union() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("temps.csv");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut csv = String::from("site,kelvin,humidity,state\n");
    for i in 0..999 {
        // A large offset with a small spread: sums of squares would lose it.
        let k = 293.15 + 0.01 * normal(&mut rng);
        let h = 40.0 + 15.0 * rng.random::<f64>();
        writeln!(
            csv,
            "s{},{k:.6},{h:.4},{}",
            i % 3,
            if h > 47.5 { "wet" } else { "dry" }
        )
        .expect("write");
    }
    std::fs::write(&path, csv).expect("csv");
    let text = spec(
        "temps",
        &path,
        r#"kind = "classification"
features = ["kelvin", "humidity"]
label = "state""#,
        r#"family = "mlp"
hidden = [8]"#,
        r#"local_epochs = 1
batch_size = 16
learning_rate = 0.05"#,
        1,
    )
    .replace(
        r#"partition = { kind = "iid" }"#,
        r#"partition = { kind = "column", column = "site" }"#,
    )
    .replace("\nclients = 4\n", "\n")
    .replace("min_fit_clients = 4", "min_fit_clients = 3")
    .replace("min_available_clients = 4", "min_available_clients = 3");
    let (sim, spec) = run(&text, dir.path()).await;
    // One device per site.
    let partition: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(sim.run_dir.join("partition.json")).expect("partition.json"),
    )
    .expect("json");
    assert_eq!(partition.len(), 3);
    assert_eq!(sim.summary.rounds[0].sampled, 3);
    // The union of the devices' training examples, as the devices prepared them.
    let data = pollen_workflows::shares::SimulationData::load(&spec).expect("data");
    let task = pollen_train::Task::new(data.manifest.clone()).expect("task");
    let mut columns = vec![Vec::new(); 2];
    for share in &data.shares {
        let local = task.prepare(share).expect("fits");
        for &i in &local.train {
            for (c, v) in local.examples.example(i).iter().enumerate() {
                columns[c].push(f64::from(*v));
            }
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sim.run_dir.join("task.json")).expect("task.json"))
            .expect("json");
    let fitted = &manifest["fitted"]["features"];
    for (c, values) in columns.iter().enumerate() {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let fed_mean = fitted["mean"][c].as_f64().expect("mean");
        let fed_std = fitted["std"][c].as_f64().expect("std");
        assert!(
            ((fed_mean - mean) / mean).abs() < 1e-6,
            "channel {c}: mean {fed_mean} vs {mean}"
        );
        assert!(
            ((fed_std - std) / std).abs() < 1e-6,
            "channel {c}: std {fed_std} vs {std}"
        );
    }
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sim.run_dir.join("statistics.json")).expect("statistics.json"),
    )
    .expect("json");
    assert_eq!(stats["clients"], 3);
    assert_eq!(
        stats["num_examples"].as_u64().expect("n") as usize,
        columns[0].len()
    );
}

/// Three devices with files of their own behind a proxy, one of them missing a column.
struct Fleet {
    coordinator: pollen_workflows::run::LocalCoordinator,
    fleet: pollen_workflows::simulate::SimulatedFleet,
    runs: std::path::PathBuf,
}

async fn fleet_of(dir: &Path, files: &[&Path]) -> Fleet {
    use pollen_workflows::run::{LocalCoordinator, Storage};
    use pollen_workflows::simulate::{FleetOptions, SimulatedFleet};
    let storage = Storage::Embedded {
        root: dir.join("s3"),
        listen: "127.0.0.1:0".parse().expect("address"),
        tls: None,
    };
    let coordinator = LocalCoordinator::start("127.0.0.1:0".parse().expect("address"), &storage)
        .await
        .expect("coordinator starts");
    let clients: Vec<pollen_train::TaskClient> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            pollen_train::TaskClient::open(pollen_train::DataSource::new(*f), i as u64)
                .expect("data reads")
        })
        .collect();
    let fleet = SimulatedFleet::start(
        &coordinator,
        clients,
        FleetOptions {
            transport: Transport::Device,
            broker: None,
            fleet: format!("tasks-{}", rand::random::<u32>()),
            model: String::new(),
            compute_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
            agent_process: None,
            grpc_compression: false,
            object_store_ca: None,
        },
    )
    .await
    .expect("fleet starts");
    assert!(
        fleet
            .wait_joined(&coordinator, std::time::Duration::from_secs(60))
            .await
    );
    Fleet {
        coordinator,
        fleet,
        runs: dir.join("runs"),
    }
}

impl Fleet {
    /// Runs `spec` (its task resolved against `data`) over the fleet's devices.
    async fn run(&self, spec: &RunSpec, data: &Path) -> pollen_coordinator::RunSummary {
        let raw = pollen_train::DataSource::new(data).read().expect("reads");
        let manifest = pollen_workflows::task::resolve_with_data(spec, &raw).expect("resolves");
        let run = pollen_workflows::run::create_run(spec, &self.runs, &Default::default())
            .expect("records");
        pollen_workflows::run::drive(
            spec,
            manifest,
            self.coordinator.drive_options(run, None),
            |_| {},
            CancellationToken::new(),
        )
        .await
        .expect("the run completes")
    }

    async fn stop(self) {
        self.coordinator.token().cancel();
        self.fleet.join().await;
        self.coordinator.shut_down().await;
    }
}

fn state_csv(path: &Path, seed: u64, with_humidity: bool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut csv = String::from(if with_humidity {
        "temperature,humidity,state\n"
    } else {
        "temperature,state\n"
    });
    for _ in 0..300 {
        let t = 20.0 + 5.0 * normal(&mut rng);
        let h = 50.0 + 10.0 * normal(&mut rng);
        let state = if t + 0.5 * (h - 50.0) > 20.0 {
            "hot"
        } else {
            "cold"
        };
        if with_humidity {
            writeln!(csv, "{t:.3},{h:.3},{state}").expect("write");
        } else {
            writeln!(csv, "{t:.3},{state}").expect("write");
        }
    }
    std::fs::write(path, csv).expect("csv");
}

fn fleet_spec(model: &str, min_fit: usize) -> String {
    let mut text = spec(
        "states",
        Path::new("unused.csv"),
        r#"kind = "classification"
features = ["temperature", "humidity"]
label = "state""#,
        model,
        r#"optimizer = "adam"
learning_rate = 0.01
local_epochs = 2
batch_size = 16"#,
        2,
    );
    text = text
        .replace(
            "min_fit_clients = 4",
            &format!("min_fit_clients = {min_fit}"),
        )
        .replace("min_available_clients = 4", "min_available_clients = 3")
        .replace("clients = 4", "clients = 3");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_data_does_not_fit_fails_with_a_data_mismatch_and_rounds_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, bad) = (
        dir.path().join("a.csv"),
        dir.path().join("b.csv"),
        dir.path().join("bad.csv"),
    );
    state_csv(&a, 1, true);
    state_csv(&b, 2, true);
    state_csv(&bad, 3, false);
    let fleet = fleet_of(dir.path(), &[&a, &b, &bad]).await;
    let spec = RunSpec::parse(&fleet_spec("family = \"mlp\"\nhidden = [8]", 2), "t.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let summary = fleet.run(&spec, &a).await;
    for r in &summary.rounds {
        assert_eq!(
            r.status,
            pollen_coordinator::records::RoundStatus::Ok,
            "{r:?}"
        );
        assert_eq!(
            (r.sampled, r.succeeded, r.failed),
            (3, 2, 1),
            "{:?}",
            r.failures
        );
        let f = &r.failures[0];
        assert_eq!(
            (f.client.as_str(), f.reason.as_str()),
            ("sim-0002", "client_error")
        );
        assert!(
            f.message.contains("DataMismatch")
                && f.message.contains("\"humidity\"")
                && f.message.contains("bad.csv"),
            "{}",
            f.message
        );
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fleet_serves_two_runs_with_different_models_one_after_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            let f = dir.path().join(format!("d{i}.csv"));
            state_csv(&f, 10 + i, true);
            f
        })
        .collect();
    let refs: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    let fleet = fleet_of(dir.path(), &refs).await;
    let mlp = RunSpec::parse(&fleet_spec("family = \"mlp\"\nhidden = [8]", 3), "mlp.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let first = fleet.run(&mlp, &files[0]).await;
    let mut wide = mlp.clone();
    wide.name = "states-wide".into();
    wide.model = pollen_train::ModelSpec::from_value(
        serde_json::json!({"family": "mlp", "hidden": [32, 16], "activation": "tanh"}),
    )
    .expect("model");
    let second = fleet.run(&wide, &files[0]).await;
    for summary in [&first, &second] {
        for r in &summary.rounds {
            assert_eq!((r.succeeded, r.failed), (3, 0), "{:?}", r.failures);
        }
        let acc = summary.rounds[1].metrics["accuracy"];
        assert!(acc > 0.8, "accuracy {acc}");
    }
    // The devices trained what each run asked: a model with one hidden layer, then two.
    assert!(first.parameters.get("fc3.weight").is_none());
    assert_eq!(
        second.parameters.get("fc3.weight").expect("fc3").shape,
        vec![2, 16]
    );
    fleet.stop().await;
}
