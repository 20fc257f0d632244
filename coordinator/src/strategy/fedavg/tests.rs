//! FedAvg's arithmetic, sampling and quorum rules.

use super::*;
use pollen_proto::NamedTensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn params(a: f32, b: [f32; 2]) -> Parameters {
    Parameters::new(vec![
        NamedTensor::new("a", vec![1], vec![a]),
        NamedTensor::new("b", vec![2], b.to_vec()),
    ])
    .expect("valid")
}

fn clients(n: usize) -> Vec<ClientInfo> {
    (0..n)
        .map(|i| ClientInfo {
            id: format!("c{i:02}"),
            num_examples: 10,
            agent_version: "test".into(),
            properties: Default::default(),
            data: None,
        })
        .collect()
}

fn update(id: &str, p: Parameters, n: u64) -> crate::strategy::ClientUpdate {
    crate::strategy::ClientUpdate {
        client_id: id.into(),
        num_examples: n,
        parameters: p,
    }
}

fn summary(id: &str, n: u64, loss: f64) -> FitSummary {
    FitSummary {
        client_id: id.into(),
        num_examples: n,
        metrics: [("loss".to_string(), loss)].into(),
    }
}

#[test]
fn fedavg_equals_a_hand_computed_weighted_average() {
    let mut s = FedAvg::new(FedAvgConfig::default());
    let global = Arc::new(params(0.0, [0.0, 0.0]));
    let mut agg = s.fit_aggregator(1, &global);
    agg.fold(&update("x", params(1.0, [2.0, -4.0]), 10))
        .expect("fold");
    agg.fold(&update("y", params(4.0, [8.0, 2.0]), 30))
        .expect("fold");
    agg.fold(&update("z", params(-2.0, [0.0, 1.0]), 60))
        .expect("fold");
    let results = [
        summary("x", 10, 1.0),
        summary("y", 30, 2.0),
        summary("z", 60, 0.5),
    ];
    let (p, metrics) = s
        .aggregate_fit(1, &global, agg, &results, &[])
        .expect("aggregates");
    let p = p.expect("parameters");
    // a: (10*1 + 30*4 + 60*-2) / 100 = 0.1
    // b0: (10*2 + 30*8 + 0) / 100 = 2.6 ; b1: (10*-4 + 30*2 + 60*1) / 100 = 0.8
    assert!((p.tensors[0].data[0] - 0.1).abs() < 1e-6);
    assert!((p.tensors[1].data[0] - 2.6).abs() < 1e-6);
    assert!((p.tensors[1].data[1] - 0.8).abs() < 1e-6);
    // loss: (10*1 + 30*2 + 60*0.5) / 100 = 1.0
    assert!((metrics["loss"] - 1.0).abs() < 1e-12);
}

#[test]
fn sampling_follows_flowers_arithmetic() {
    let c = FedAvgConfig::default(); // fraction 0.1, min_fit 2, min_available 2
    assert_eq!(c.num_fit_clients(19), 2); // floor(1.9) = 1 -> raised to min 2
    assert_eq!(c.num_fit_clients(100), 10);
    assert_eq!(c.num_fit_clients(1000), 100);
    assert_eq!(c.num_fit_clients(1), 0); // below min_available_clients
    let c = FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: 5,
        min_available_clients: 5,
        ..Default::default()
    };
    assert_eq!(c.num_fit_clients(4), 0);
    assert_eq!(c.num_fit_clients(7), 7);
    assert_eq!(FedAvgConfig::default().num_evaluate_clients(100), 0);
}

#[test]
fn configure_fit_samples_distinct_clients_reproducibly_and_adds_the_round() {
    let mut s = FedAvg::new(FedAvgConfig::default())
        .with_fit_config([("lr".to_string(), scalar::f64(0.1))].into());
    let fleet = clients(19);
    let pick = |s: &mut FedAvg| {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        s.configure_fit(3, &params(0.0, [0.0, 0.0]), &fleet, &mut rng)
    };
    let a = pick(&mut s);
    let b = pick(&mut s);
    assert_eq!(a, b);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0].client_id, a[1].client_id);
    assert_eq!(scalar::as_i64(&a[0].config["round"]), Some(3));
    assert_eq!(scalar::as_f64(&a[0].config["lr"]), Some(0.1));
}

#[test]
fn quorum_and_accept_failures_decide_whether_a_round_succeeds() {
    let failure = ClientFailure::new("c9", crate::strategy::FailureReason::Timeout, "no answer");
    let global = Arc::new(params(0.0, [0.0, 0.0]));
    let mut s = FedAvg::new(FedAvgConfig::default());
    let agg = s.fit_aggregator(1, &global);
    let err = s
        .aggregate_fit(1, &global, agg, &[summary("x", 1, 0.0)], &[])
        .expect_err("below quorum");
    assert_eq!(
        err,
        StrategyError::Quorum {
            round: 1,
            got: 1,
            min: 2
        }
    );

    let mut strict = FedAvg::new(FedAvgConfig {
        accept_failures: false,
        ..Default::default()
    });
    let agg = strict.fit_aggregator(1, &global);
    let results = [summary("x", 1, 0.0), summary("y", 1, 0.0)];
    let err = strict
        .aggregate_fit(1, &global, agg, &results, std::slice::from_ref(&failure))
        .expect_err("failures not accepted");
    assert!(matches!(err, StrategyError::FailuresNotAccepted { .. }));
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let bad = FedAvgConfig {
        fraction_fit: 0.0,
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().contains("fraction_fit"));
    let bad = FedAvgConfig {
        min_available_clients: 1,
        min_fit_clients: 3,
        ..Default::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("min_available_clients")
    );
}
