//! Whole simulations: real models, real data, real gRPC on loopback.

use pollen_client::ModelKind;
use pollen_workflows::RunSpec;
use pollen_workflows::simulate::{SimulateOptions, simulate};
use pollen_workflows::spec::StrategySpec;
use tokio_util::sync::CancellationToken;

async fn run(spec: RunSpec) -> (pollen_workflows::simulate::Simulation, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = simulate(
        &spec,
        &SimulateOptions {
            runs_dir: dir.path().to_path_buf(),
            parallelism: None,
        },
        CancellationToken::new(),
        |_| {},
    )
    .await
    .expect("simulation runs");
    (sim, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_2nn_simulation_over_grpc_improves_test_accuracy() {
    let mut spec = RunSpec::default_spec();
    spec.rounds = 3;
    spec.data.clients = 20;
    let StrategySpec::Fedavg(f) = &mut spec.strategy;
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
async fn the_cnn_learns_in_a_two_round_federated_run() {
    let mut spec = RunSpec::default_spec();
    spec.model = ModelKind::MnistCnn;
    spec.rounds = 2;
    spec.data.clients = 60; // 1,000 examples each
    spec.train.learning_rate = 0.05;
    spec.evaluate.test_examples = Some(1000);
    spec.evaluate.batch_size = 250;
    let (sim, _dir) = run(spec).await;
    let acc = sim.summary.rounds[1].accuracy.expect("evaluated");
    assert_eq!(sim.summary.rounds[1].succeeded, 6);
    assert!(acc > 0.85, "CNN accuracy after 2 rounds: {acc}");
    assert_eq!(sim.summary.parameters.num_params(), 1_663_370);
}
