//! Learning for real fleets, end to end: every strategy, FedBuff, compressed updates and
//! models, and differential privacy train MNIST over the device path (proxy, embedded MQTT
//! broker, embedded S3 server, edge agents); simulated attackers show what robust aggregation
//! is for.

use pollen_coordinator::privacy::{Mechanism, PrivacyConfig, RdpAccountant};
use pollen_coordinator::strategy::config::{StrategyConfig, StrategyName};
use pollen_workflows::RunSpec;
use pollen_workflows::device::{AttackKind, AttackSpec};
use pollen_workflows::simulate::{SimulateOptions, Simulation, Transport, simulate};
use pollen_workflows::spec::CompressionSpec;
use tokio_util::sync::CancellationToken;

async fn run(spec: &RunSpec, transport: Transport) -> (Simulation, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = SimulateOptions::new(dir.path());
    options.transport = transport;
    let sim = simulate(spec, &options, CancellationToken::new(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", spec.strategy.name.as_str()));
    (sim, dir)
}

/// 20 devices with 3,000 examples each, 7 sampled per round (enough for Bulyan with one
/// attacker), evaluated on 2,000 test images.
fn small(name: StrategyName, rounds: u64) -> RunSpec {
    let mut spec = RunSpec::default_spec();
    spec.rounds = rounds;
    spec.data.clients = Some(20);
    spec.strategy = StrategyConfig {
        fraction_fit: 0.35,
        ..StrategyConfig::named(name)
    };
    spec.round_timeout = std::time::Duration::from_secs(600);
    spec.evaluate.test_examples = Some(2000);
    spec
}

fn accuracies(sim: &Simulation) -> Vec<f64> {
    sim.summary
        .rounds
        .iter()
        .map(|r| r.accuracy.expect("evaluated"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_strategy_trains_over_the_device_path() {
    for name in StrategyName::ALL {
        let mut spec = small(name, 2);
        let s = &mut spec.strategy;
        match name {
            // Flower's defaults (eta 0.1) take server steps of 0.1 per weight, too large for
            // two rounds of an MLP; the FedOpt paper tunes eta per task.
            StrategyName::Fedadam | StrategyName::Fedadagrad => s.eta = Some(0.01),
            StrategyName::Fedavgm => s.server_momentum = Some(0.5),
            StrategyName::Fedprox => s.proximal_mu = Some(0.1),
            StrategyName::Krum => {
                s.num_malicious_clients = Some(1);
                s.num_clients_to_keep = Some(3);
            }
            StrategyName::Bulyan => s.num_malicious_clients = Some(1),
            _ => {}
        }
        spec.validate().expect("valid spec");
        let (sim, dir) = run(&spec, Transport::Device).await;
        let accs = accuracies(&sim);
        eprintln!("{}: {accs:?}", name.as_str());
        for r in &sim.summary.rounds {
            assert_eq!(
                (r.status, r.sampled, r.succeeded),
                (pollen_coordinator::records::RoundStatus::Ok, 7, 7),
                "{}: {r:?}",
                name.as_str()
            );
        }
        // Well above chance (10%) after two rounds; the server optimizers start slower.
        assert!(accs[1] > 0.6, "{} after 2 rounds: {accs:?}", name.as_str());
        // The run's spec names its strategy.
        let saved = std::fs::read_to_string(sim.run_dir.join("spec.toml")).expect("spec");
        assert!(saved.contains(&format!("name = \"{}\"", name.as_str())));
        drop(dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fedbuff_publishes_versions_from_updates_as_they_arrive_over_the_device_path() {
    let mut spec = small(StrategyName::Fedavg, 6);
    spec.fedbuff = Some(pollen_coordinator::fedbuff::FedBuffConfig {
        buffer_size: 3,
        concurrency: 5,
        max_staleness: 4,
        ..Default::default()
    });
    spec.validate().expect("valid spec");
    let (sim, _dir) = run(&spec, Transport::Device).await;
    let accs = accuracies(&sim);
    assert_eq!(sim.summary.rounds.len(), 6);
    assert!(accs[5] > 0.85, "{accs:?}");
    let mut stale_seen = false;
    for r in &sim.summary.rounds {
        let a = r.asynchronous.as_ref().expect("a FedBuff record");
        assert_eq!(r.succeeded, 3, "{r:?}");
        assert!(a.max_staleness <= 4);
        stale_seen |= a.max_staleness > 0;
        assert!(a.in_flight <= 5);
    }
    assert!(
        stale_seen,
        "five devices training, three per version: some update was a version behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn int8_and_top_k_updates_learn_with_a_fraction_of_the_bytes_over_the_device_path() {
    let plain = small(StrategyName::Fedavg, 2);
    let (sim, _d) = run(&plain, Transport::Device).await;
    let f32_received: u64 = sim.summary.rounds.iter().map(|r| r.bytes_received).sum();
    let f32_sent: u64 = sim.summary.rounds.iter().map(|r| r.bytes_sent).sum();

    let mut int8 = plain.clone();
    int8.compression = Some(CompressionSpec {
        update: "int8".into(),
        model: "int8".into(),
        topk_fraction: 0.01,
    });
    int8.validate().expect("valid");
    let (sim, _d) = run(&int8, Transport::Device).await;
    assert!(accuracies(&sim)[1] > 0.85, "{:?}", accuracies(&sim));
    let received: u64 = sim.summary.rounds.iter().map(|r| r.bytes_received).sum();
    let sent: u64 = sim.summary.rounds.iter().map(|r| r.bytes_sent).sum();
    // int8 values and one f32 scale per output channel: about a quarter of the f32 bytes.
    assert!(
        received * 3 < f32_received && sent * 3 < f32_sent,
        "int8 {received} / {sent} bytes, f32 {f32_received} / {f32_sent}"
    );

    let mut topk = plain.clone();
    topk.compression = Some(CompressionSpec {
        update: "topk".into(),
        model: "f32".into(),
        topk_fraction: 0.05,
    });
    topk.validate().expect("valid");
    let (sim, _d) = run(&topk, Transport::Device).await;
    assert!(accuracies(&sim)[1] > 0.8, "{:?}", accuracies(&sim));
    let received: u64 = sim.summary.rounds.iter().map(|r| r.bytes_received).sum();
    // 5% of the values, each with its index: about a tenth of the f32 bytes.
    assert!(
        received * 8 < f32_received,
        "top-k {received}, f32 {f32_received}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn central_dp_reports_the_accountants_epsilon_after_every_round() {
    let mut spec = small(StrategyName::Fedavg, 3);
    spec.privacy = Some(PrivacyConfig {
        mechanism: Mechanism::Central,
        noise_multiplier: 0.3,
        clipping_norm: 1.0,
        delta: 1e-5,
        adaptive: None,
    });
    spec.validate().expect("valid");
    let (sim, _dir) = run(&spec, Transport::Device).await;
    // 7 of 20 devices per round: the subsampled Gaussian mechanism at q = 0.35, composed.
    let mut accountant = RdpAccountant::new();
    for (i, r) in sim.summary.rounds.iter().enumerate() {
        accountant.step(0.3, 7.0 / 20.0, 1).expect("step");
        let p = r.privacy.as_ref().expect("privacy in every record");
        assert_eq!((p.mechanism.as_str(), p.steps), ("central", i as u64 + 1));
        let (epsilon, _) = accountant.epsilon(1e-5).expect("epsilon");
        assert!(
            (p.epsilon - epsilon).abs() < 1e-9,
            "{} vs {epsilon}",
            p.epsilon
        );
    }
    let record = std::fs::read_to_string(sim.run_dir.join("metrics.jsonl")).expect("records");
    assert!(record.contains("\"epsilon\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_flipping_attackers_break_fedavg_but_not_the_median() {
    // 10 devices, all sampled every round, 3 of them sending -4x their change.
    let spec_for = |name| {
        let mut spec = RunSpec::default_spec();
        spec.rounds = 3;
        spec.data.clients = Some(10);
        spec.strategy = StrategyConfig {
            fraction_fit: 1.0,
            min_available_clients: 10,
            ..StrategyConfig::named(name)
        };
        spec.evaluate.test_examples = Some(2000);
        spec.simulation.attack = Some(AttackSpec {
            kind: AttackKind::SignFlip,
            fraction: 0.3,
            scale: None,
        });
        spec.validate().expect("valid");
        spec
    };
    let (fedavg, _a) = run(&spec_for(StrategyName::Fedavg), Transport::InProcess).await;
    let (median, _b) = run(&spec_for(StrategyName::Fedmedian), Transport::InProcess).await;
    let (fedavg, median) = (accuracies(&fedavg), accuracies(&median));
    assert!(fedavg[2] < 0.5, "FedAvg under attack: {fedavg:?}");
    assert!(median[2] > 0.85, "FedMedian under attack: {median:?}");
}
