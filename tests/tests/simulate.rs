//! Whole simulations: real models, real data, over the device path (proxy, MQTT, S3) and over
//! direct gRPC.

use pollen_proto::mqtt::BrokerConfig;
use pollen_train::ModelSpec;
use pollen_workflows::RunSpec;
use pollen_workflows::simulate::{SimulateOptions, Transport, simulate};
use tokio_util::sync::CancellationToken;

async fn run_with(
    spec: RunSpec,
    transport: Transport,
    broker: Option<BrokerConfig>,
) -> (pollen_workflows::simulate::Simulation, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = SimulateOptions::new(dir.path());
    options.transport = transport;
    options.broker = broker;
    let sim = simulate(&spec, &options, CancellationToken::new(), |_| {})
        .await
        .expect("simulation runs");
    (sim, dir)
}

async fn run(spec: RunSpec) -> (pollen_workflows::simulate::Simulation, tempfile::TempDir) {
    run_with(spec, Transport::Grpc, None).await
}

/// 6 devices with 10,000 examples each, all sampled, 3 rounds, evaluated on 2,000 test images.
fn small_2nn() -> RunSpec {
    let mut spec = RunSpec::default_spec();
    spec.rounds = 3;
    spec.data.clients = Some(6);
    let f = &mut spec.strategy;
    f.fraction_fit = 0.5;
    f.min_available_clients = 6;
    spec.round_timeout = std::time::Duration::from_secs(600);
    spec.evaluate.test_examples = Some(2000);
    spec
}

fn assert_learns(sim: &pollen_workflows::simulate::Simulation) {
    let initial = sim.summary.initial_evaluation.as_ref().expect("round 0");
    let accs: Vec<f64> = sim
        .summary
        .rounds
        .iter()
        .map(|r| r.accuracy.expect("evaluated"))
        .collect();
    assert!(initial.metrics["accuracy"] < 0.3, "{initial:?}");
    assert!(accs[2] > 0.88, "after 3 rounds: {accs:?}");
    for r in &sim.summary.rounds {
        assert_eq!(
            (r.sampled, r.succeeded, r.failed),
            (3, 3, 0),
            "{:?}",
            r.failures
        );
        assert!(r.bytes_received > 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_3_round_run_over_mosquitto_and_embedded_s3_improves_accuracy() {
    let broker = BrokerConfig::new(pollen_tests::mosquitto_url());
    let (sim, dir) = run_with(small_2nn(), Transport::Device, Some(broker)).await;
    assert_learns(&sim);
    // The global models went through the S3 folder, once per round.
    let objects = dir.path().join("s3/pollen/runs").join(&sim.run_id);
    assert!(
        objects.join("round-0000/global.safetensors").exists(),
        "{objects:?}"
    );
    assert!(objects.join("round-0002/global.safetensors").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_simulation_uses_the_embedded_broker_and_s3() {
    let (sim, _dir) = run_with(small_2nn(), Transport::Device, None).await;
    assert_learns(&sim);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_2nn_simulation_over_grpc_improves_test_accuracy() {
    let mut spec = RunSpec::default_spec();
    spec.rounds = 3;
    spec.data.clients = Some(20);
    let f = &mut spec.strategy;
    f.fraction_fit = 0.2; // 4 of 20 clients, 3,000 examples each
    spec.evaluate.test_examples = Some(2000);
    let (sim, _dir) = run(spec).await;
    let initial = sim
        .summary
        .initial_evaluation
        .as_ref()
        .expect("round-0 evaluation");
    let initial_acc = initial.metrics["accuracy"];
    let accs: Vec<f64> = sim
        .summary
        .rounds
        .iter()
        .map(|r| r.accuracy.expect("evaluated"))
        .collect();
    assert!(
        initial_acc < 0.3,
        "an untrained model is near chance: {initial_acc}"
    );
    assert!(accs[2] > 0.88, "after 3 rounds: {accs:?}");
    for r in &sim.summary.rounds {
        assert_eq!((r.sampled, r.succeeded, r.failed), (4, 4, 0));
        assert!(r.train_loss.is_some_and(|l| l.is_finite() && l > 0.0));
    }
    assert!(sim.run_dir.join("models/round-0003.safetensors").exists());
    let saved = std::fs::read_to_string(sim.run_dir.join("spec.toml")).expect("spec saved");
    assert!(saved.contains("seed = 42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_clients_learn_as_grpc_clients_do() {
    let (sim, _dir) = run_with(small_2nn(), Transport::InProcess, None).await;
    assert_learns(&sim);
    for r in &sim.summary.rounds {
        assert_eq!(r.failed, 0, "{r:?}");
        // Each sampled client got the model and sent one back, counted like gRPC traffic.
        assert!(r.bytes_sent > 0 && r.bytes_received > 0, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cnn_learns_in_a_two_round_federated_run() {
    let mut spec = RunSpec::default_spec();
    spec.model = ModelSpec::preset("mnist-cnn").expect("preset");
    spec.rounds = 2;
    spec.data.clients = Some(60); // 1,000 examples each
    spec.train.learning_rate = 0.05;
    spec.evaluate.test_examples = Some(1000);
    spec.evaluate.batch_size = 250;
    // What is tested is learning, not the deadline: on a loaded 2-core machine one CNN fit
    // took longer than the spec's 60 s and the round closed with nobody (seen under `nice`
    // with two busy loops beside it).
    spec.round_timeout = std::time::Duration::from_secs(900);
    // Over the device path: 6.65 MB blobs through S3, only URLs over MQTT.
    let (sim, _dir) = run_with(spec, Transport::Device, None).await;
    let acc = sim.summary.rounds[1].accuracy.expect("evaluated");
    assert_eq!(sim.summary.rounds[1].succeeded, 6);
    assert!(acc > 0.85, "CNN accuracy after 2 rounds: {acc}");
    assert_eq!(sim.summary.parameters.num_params(), 1_663_370);
}

/// `simulation.failure_rate`: simulated devices fail some fits; each failure is recorded as the
/// device's client error with its message, and rounds go on with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreliable_simulated_devices_fail_with_client_errors_and_rounds_go_on() {
    let mut spec = small_2nn();
    spec.simulation.failure_rate = 0.4;
    let f = &mut spec.strategy;
    f.fraction_fit = 1.0;
    f.min_fit_clients = 2;
    let (sim, _dir) = run(spec).await;
    let rounds = &sim.summary.rounds;
    let failures: Vec<_> = rounds.iter().flat_map(|r| &r.failures).collect();
    assert!(
        !failures.is_empty(),
        "no simulated failure in 18 fits at 40%"
    );
    for f in &failures {
        assert_eq!(f.reason, "client_error", "{f:?}");
        assert!(f.message.contains("simulated device failure"), "{f:?}");
    }
    for r in rounds {
        assert_eq!(r.sampled, 6);
        assert_eq!(r.succeeded + r.failed, 6, "{r:?}");
        assert_eq!(
            r.failures_by_reason
                .get("client_error")
                .copied()
                .unwrap_or(0),
            r.failed
        );
    }
    // Fewer updates per round, still learning.
    assert!(rounds.iter().any(|r| r.succeeded < 6));
    assert!(
        rounds[2].accuracy.expect("evaluated") > 0.85,
        "{:?}",
        rounds[2]
    );
}
