//! Each built-in strategy, assembled from its `[strategy]` table as a run builds it, against
//! aggregates computed by hand (the kernels' own tests compare them with Flower's code).

use std::sync::Arc;

use pollen_proto::{NamedTensor, Parameters};

use super::config::{StrategyConfig, StrategyName};
use super::fedavg::{FedAvg, FedAvgConfig};
use super::{ClientFailure, ClientUpdate, FailureReason, FitSummary, Strategy};
use crate::privacy::{CentralDp, Mechanism, PrivacyConfig};

fn model(values: &[f32]) -> Parameters {
    Parameters::new(vec![NamedTensor::new(
        "w",
        vec![values.len()],
        values.to_vec(),
    )])
    .expect("valid")
}

/// The strategy a spec with this table builds (without evaluation).
fn build(config: &StrategyConfig) -> FedAvg {
    config.validate().expect("valid config");
    let mut s = FedAvg::new(FedAvgConfig {
        min_fit_clients: 1,
        min_available_clients: 1,
        ..config.sampling()
    })
    .named(config.name.as_str())
    .with_rule(config.rule());
    if let Some(opt) = config.server_optimizer().expect("optimizer") {
        s = s.with_server_optimizer(opt);
    }
    if let Some(bound) = config.norm_bound {
        s = s.with_norm_bound(bound);
    }
    s
}

/// One round: every `(values, examples)` folded in order, then aggregated from `global`.
fn round(s: &mut FedAvg, r: u64, global: &[f32], clients: &[(&[f32], u64)]) -> Vec<f32> {
    let global = Arc::new(model(global));
    let mut agg = s.fit_aggregator(r, &global);
    let mut results = Vec::new();
    for (i, (values, n)) in clients.iter().enumerate() {
        let update = ClientUpdate {
            client_id: format!("c{i}"),
            num_examples: *n,
            parameters: model(values),
        };
        agg.fold(&update).expect("fold");
        results.push(FitSummary {
            client_id: update.client_id,
            num_examples: *n,
            metrics: Default::default(),
        });
    }
    let (p, _) = s
        .aggregate_fit(r, &global, agg, &results, &[])
        .expect("aggregates");
    p.expect("a model").tensors[0].data.clone()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} != {want:?}");
    }
}

fn named(name: StrategyName) -> StrategyConfig {
    StrategyConfig::named(name)
}

#[test]
fn fedavgm_carries_server_momentum_across_rounds() {
    let mut c = named(StrategyName::Fedavgm);
    c.server_momentum = Some(0.5);
    let mut s = build(&c);
    // Round 1: aggregate 2 from 0: pseudo-gradient -2, v = -2, w = 0 - (-2) = 2.
    let w = round(&mut s, 1, &[0.0], &[(&[1.0], 10), (&[3.0], 10)]);
    close(&w, &[2.0]);
    // Round 2: aggregate 3 from 2: gradient -1, v = 0.5 * -2 - 1 = -2, w = 2 + 2 = 4.
    let w = round(&mut s, 2, &w, &[(&[3.0], 10)]);
    close(&w, &[4.0]);
}

#[test]
fn fedadam_takes_a_bias_corrected_step_the_size_of_eta() {
    let mut s = build(&named(StrategyName::Fedadam));
    // delta 2: m = 0.2, v = 0.04, m / sqrt(v) = 1; step 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    // = 0.1 * 0.141067 / 0.19 = 0.0742460 (Flower's round-plus-one exponents).
    let w = round(&mut s, 1, &[0.0], &[(&[2.0], 1)]);
    close(&w, &[0.074_246]);
}

#[test]
fn fedyogi_moves_by_eta_times_m_over_root_v_plus_tau() {
    let mut s = build(&named(StrategyName::Fedyogi));
    // delta 2: m = 0.2; v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04; 0.01 * 0.2 / (0.2 + 0.001).
    let w = round(&mut s, 1, &[0.0], &[(&[2.0], 1)]);
    close(&w, &[0.01 * 0.2 / 0.201]);
}

#[test]
fn fedadagrad_accumulates_squared_deltas() {
    let mut s = build(&named(StrategyName::Fedadagrad));
    // m = delta = 2, v = 4: 0.1 * 2 / 2 = 0.1.
    let w = round(&mut s, 1, &[0.0], &[(&[2.0], 1)]);
    close(&w, &[0.1]);
    // From 0.1 to an aggregate of 1.1: delta 1, v = 5: 0.1 + 0.1 / sqrt(5).
    let w = round(&mut s, 2, &w, &[(&[1.1], 1)]);
    close(&w, &[0.1 + 0.1 / 5f32.sqrt()]);
}

#[test]
fn fedmedian_ignores_weights_and_one_wild_model() {
    let mut s = build(&named(StrategyName::Fedmedian));
    let w = round(
        &mut s,
        1,
        &[0.0, 0.0],
        &[(&[1.0, -1.0], 1), (&[5.0, 7.0], 100), (&[2.0, 0.0], 1)],
    );
    close(&w, &[2.0, 0.0]);
    // An even count takes the middle two's mean.
    let w = round(
        &mut s,
        2,
        &[0.0],
        &[(&[1.0], 1), (&[5.0], 1), (&[2.0], 1), (&[10.0], 1)],
    );
    close(&w, &[3.5]);
}

#[test]
fn fedtrimmedavg_cuts_a_fifth_from_each_end_by_default() {
    let mut s = build(&named(StrategyName::Fedtrimmedavg));
    // int(0.2 * 5) = 1 cut from each end: mean of 2, 3, 4.
    let clients: Vec<(&[f32], u64)> = vec![
        (&[4.0], 1),
        (&[100.0], 1),
        (&[2.0], 1),
        (&[-50.0], 1),
        (&[3.0], 1),
    ];
    let w = round(&mut s, 1, &[0.0], &clients);
    close(&w, &[3.0]);
}

#[test]
fn krum_picks_the_most_central_model_and_multi_krum_averages_the_best() {
    let clients: Vec<(&[f32], u64)> = vec![
        (&[1.0], 10),
        (&[1.1], 10),
        (&[0.9], 10),
        (&[1.05], 10),
        (&[50.0], 10),
    ];
    // f = 1: scores sum the n - f - 2 = 2 smallest squared distances: 1.0 -> 0.0125,
    // 1.1 -> 0.0125, 0.9 -> 0.0325, 1.05 -> 0.005, 50 -> huge.
    let mut c = named(StrategyName::Krum);
    c.num_malicious_clients = Some(1);
    let w = round(&mut build(&c), 1, &[0.0], &clients);
    close(&w, &[1.05]);
    // Multi-Krum keeping 2: 1.05 and, of the tie at 0.0125, the first (1.0); equal examples.
    c.num_clients_to_keep = Some(2);
    let w = round(&mut build(&c), 1, &[0.0], &clients);
    close(&w, &[1.025]);
}

#[test]
fn bulyan_averages_the_values_nearest_the_median_of_a_krum_selection() {
    let mut c = named(StrategyName::Bulyan);
    c.num_malicious_clients = Some(1);
    let clients: Vec<(&[f32], u64)> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0]
        .iter()
        .map(|v| (std::slice::from_ref(v), 1u64))
        .collect();
    // n = 7 >= 4f + 3. Repeated Krum selects theta = 5 models: 3, 4, 2, 5, 1 (the outlier
    // never). Then the beta = theta - 2f = 3 values nearest their median 3: 2, 3, 4 -> 3.
    let w = round(&mut build(&c), 1, &[0.0], &clients);
    close(&w, &[3.0]);
    // Too few clients for f: the round fails instead of trusting a poisoned mean.
    let mut s = build(&c);
    let global = Arc::new(model(&[0.0]));
    let mut agg = s.fit_aggregator(2, &global);
    for i in 0..6 {
        agg.fold(&ClientUpdate {
            client_id: format!("c{i}"),
            num_examples: 1,
            parameters: model(&[i as f32]),
        })
        .expect("fold");
    }
    let results: Vec<FitSummary> = (0..6)
        .map(|i| FitSummary {
            client_id: format!("c{i}"),
            num_examples: 1,
            metrics: Default::default(),
        })
        .collect();
    let e = s
        .aggregate_fit(2, &global, agg, &results, &[])
        .expect_err("n < 4f + 3");
    assert!(
        e.to_string().contains('7') || e.to_string().contains("4f"),
        "{e}"
    );
}

#[test]
fn a_norm_bound_scales_large_changes_down_before_averaging() {
    let mut c = named(StrategyName::Fedavg);
    c.norm_bound = Some(2.0);
    let mut s = build(&c);
    // [3, 4] has norm 5: scaled to [1.2, 1.6]; [0, 1] is within the bound.
    let global = Arc::new(model(&[0.0, 0.0]));
    let mut agg = s.fit_aggregator(1, &global);
    for (i, v) in [[3.0f32, 4.0], [0.0, 1.0]].iter().enumerate() {
        agg.fold(&ClientUpdate {
            client_id: format!("c{i}"),
            num_examples: 10,
            parameters: model(v),
        })
        .expect("fold");
    }
    let results: Vec<FitSummary> = (0..2)
        .map(|i| FitSummary {
            client_id: format!("c{i}"),
            num_examples: 10,
            metrics: Default::default(),
        })
        .collect();
    let (p, metrics) = s
        .aggregate_fit(1, &global, agg, &results, &[])
        .expect("aggregates");
    close(&p.expect("model").tensors[0].data, &[0.6, 1.3]);
    assert_eq!(metrics["clipped"], 1.0);
}

#[test]
fn central_dp_weighs_clients_equally_and_divides_by_the_sampled_count() {
    let dp = CentralDp::seeded(
        PrivacyConfig {
            mechanism: Mechanism::Central,
            noise_multiplier: 0.0,
            clipping_norm: 1.0,
            delta: 1e-5,
            adaptive: None,
        },
        1,
    );
    let mut s = FedAvg::new(FedAvgConfig {
        min_fit_clients: 1,
        min_available_clients: 1,
        ..Default::default()
    })
    .with_central_dp(dp);
    let global = Arc::new(model(&[0.0, 0.0]));
    let mut agg = s.fit_aggregator(1, &global);
    // [3, 4] clipped to [0.6, 0.8]; [0, 0.5] kept. Examples (10, 30) do not weigh under DP.
    for (i, (v, n)) in [([3.0f32, 4.0], 10u64), ([0.0, 0.5], 30)]
        .iter()
        .enumerate()
    {
        agg.fold(&ClientUpdate {
            client_id: format!("c{i}"),
            num_examples: *n,
            parameters: model(v),
        })
        .expect("fold");
    }
    let results: Vec<FitSummary> = [10u64, 30]
        .iter()
        .enumerate()
        .map(|(i, n)| FitSummary {
            client_id: format!("c{i}"),
            num_examples: *n,
            metrics: Default::default(),
        })
        .collect();
    // Three were sampled: the third failed, and the sum is still divided by 3.
    let failures = [ClientFailure::new("c2", FailureReason::Timeout, "late")];
    let (p, _) = s
        .aggregate_fit(1, &global, agg, &results, &failures)
        .expect("aggregates");
    close(&p.expect("model").tensors[0].data, &[0.2, 1.3 / 3.0]);
    let spent = s.privacy().expect("accounted");
    assert_eq!((spent.mechanism.as_str(), spent.steps), ("central", 1));
}

#[test]
fn a_server_optimizer_that_diverges_fails_the_round_and_keeps_the_model() {
    let mut c = named(StrategyName::Fedadam);
    c.eta = Some(f64::MAX);
    let mut s = build(&c);
    let global = Arc::new(model(&[0.0]));
    let mut agg = s.fit_aggregator(1, &global);
    agg.fold(&ClientUpdate {
        client_id: "c0".into(),
        num_examples: 1,
        parameters: model(&[f32::MAX]),
    })
    .expect("fold");
    let results = [FitSummary {
        client_id: "c0".into(),
        num_examples: 1,
        metrics: Default::default(),
    }];
    let e = s
        .aggregate_fit(1, &global, agg, &results, &[])
        .expect_err("non-finite");
    assert!(e.to_string().contains("non-finite"), "{e}");
}
