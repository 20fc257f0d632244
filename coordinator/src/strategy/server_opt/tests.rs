//! Two rounds of each optimizer on a 2-value model starting at (1, 2), worked by hand in
//! the comments. "flwr" values were printed by flwr 1.42.0's own strategies (numpy 2.4.6),
//! `aggregate_fit` on one client whose model is the aggregate.
use super::*;

/// The model after each of two rounds, widened to f64 to compare with Flower's printout.
fn two_steps(opt: &mut dyn ServerOptimizer, aggregates: [[f32; 2]; 2]) -> [f64; 4] {
    let mut current = [1.0_f32, 2.0];
    let mut after = [0.0; 4];
    for (round, aggregate) in aggregates.iter().enumerate() {
        opt.step_in_place(round as u64 + 1, &mut current, aggregate)
            .unwrap();
        after[2 * round..2 * round + 2].copy_from_slice(&current.map(f64::from));
    }
    after
}

fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) {
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() <= tolerance, "{actual:?} vs {expected:?}");
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

#[test]
fn defaults_are_flowers() {
    let avgm = r#"{"server_learning_rate":1.0,"server_momentum":0.0}"#;
    assert_eq!(json(&FedAvgMConfig::default()), avgm);
    let adam = r#"{"eta":0.1,"eta_l":0.1,"beta_1":0.9,"beta_2":0.99,"tau":1e-9}"#;
    assert_eq!(json(&FedAdamConfig::default()), adam);
    let yogi = r#"{"eta":0.01,"eta_l":0.0316,"beta_1":0.9,"beta_2":0.99,"tau":0.001}"#;
    assert_eq!(json(&FedYogiConfig::default()), yogi);
    let adagrad = r#"{"eta":0.1,"eta_l":0.1,"tau":1e-9}"#;
    assert_eq!(json(&FedAdagradConfig::default()), adagrad);
}

#[test]
fn configs_take_flowers_field_names_default_the_rest_and_refuse_unknown_ones() {
    let c: FedAdamConfig = serde_json::from_str(r#"{"eta": 0.5, "beta_2": 0.999}"#).unwrap();
    let adam = r#"{"eta":0.5,"eta_l":0.1,"beta_1":0.9,"beta_2":0.999,"tau":1e-9}"#;
    assert_eq!(json(&c), adam);
    assert!(serde_json::from_str::<FedYogiConfig>(r#"{"beta1": 0.9}"#).is_err());
    assert!(serde_json::from_str::<FedAdagradConfig>(r#"{"beta_1": 0.9}"#).is_err());
}

#[test]
fn validation_names_the_field_at_fault() {
    for (config, message) in [
        (
            r#"{"eta": -0.1}"#,
            "strategy.eta = -0.1 must be a finite number > 0",
        ),
        (r#"{"eta_l": 0}"#, "strategy.eta_l = 0 must be"),
        (
            r#"{"beta_1": 1.0}"#,
            "strategy.beta_1 = 1 must be in [0, 1)",
        ),
        (
            r#"{"beta_2": -0.5}"#,
            "strategy.beta_2 = -0.5 must be in [0, 1)",
        ),
        (r#"{"tau": 0}"#, "strategy.tau = 0 must be"),
    ] {
        let yogi: FedYogiConfig = serde_json::from_str(config).unwrap();
        assert!(FedOpt::yogi(&yogi).unwrap_err().starts_with(message));
        let adam: FedAdamConfig = serde_json::from_str(config).unwrap();
        assert!(FedOpt::adam(&adam).unwrap_err().starts_with(message));
    }
    let adagrad = FedAdagradConfig {
        eta: f64::NAN,
        ..Default::default()
    };
    assert!(
        FedOpt::adagrad(&adagrad)
            .unwrap_err()
            .starts_with("strategy.eta = NaN")
    );
    for (config, message) in [
        (
            r#"{"server_learning_rate": 0}"#,
            "strategy.server_learning_rate = 0",
        ),
        (
            r#"{"server_momentum": -0.9}"#,
            "strategy.server_momentum = -0.9",
        ),
        (
            r#"{"server_momentum": 1.0}"#,
            "strategy.server_momentum = 1 must be in [0, 1)",
        ),
    ] {
        let avgm: FedAvgMConfig = serde_json::from_str(config).unwrap();
        assert!(FedAvgM::new(avgm).unwrap_err().starts_with(message));
    }
}

#[test]
fn fedadagrad_two_steps_match_the_hand_computation_and_flowers_bits() {
    // Round 1: delta = (0.3, -0.4), m = delta, v = (0.09, 0.16), sqrt(v) = (0.3, 0.4):
    //   x += 0.1 * (0.3 / 0.3, -0.4 / 0.4) -> (1.1, 1.9).
    // Round 2: delta = (1.5 - 1.1, 1.6 - 1.9) = (0.4, -0.3), v = (0.25, 0.25), sqrt = 0.5:
    //   x += 0.1 * (0.4, -0.3) / 0.5 -> (1.18, 1.84).
    let mut opt = FedOpt::adagrad(&FedAdagradConfig::default()).unwrap();
    let after = two_steps(&mut opt, [[1.3, 1.6], [1.5, 1.6]]);
    assert_close(&after, &[1.1, 1.9, 1.18, 1.84], 1e-6);
    let flwr = [
        1.100000023841858,
        1.899999976158142,
        1.1800000667572021,
        1.840000033378601,
    ];
    assert_eq!(after, flwr);
    let m: Vec<f64> = opt.first_moment().iter().map(|&x| f64::from(x)).collect();
    assert_eq!(m, [0.3999999761581421, -0.2999999523162842]); // flwr m_t: the last delta
    assert_eq!(opt.steps(), 2);
}

#[test]
fn fedyogi_two_steps_match_the_hand_computation_and_flowers_bits() {
    // Round 1: delta = (0.3, -0.4); m = 0.1 delta = (0.03, -0.04);
    //   v = 0 - 0.01 delta^2 sign(0 - delta^2) = (0.0009, 0.0016); sqrt = (0.03, 0.04);
    //   x += 0.01 m / (sqrt(v) + 0.001) = (1 + 0.0003 / 0.031, 2 - 0.0004 / 0.041)
    //     = (1.0096774, 1.9902439).
    // Round 2 (aggregate (1.2, 2.0)): delta = (0.1903226, 0.0097561);
    //   m = 0.9 m + 0.1 delta = (0.0460323, -0.0350244);
    //   delta^2 = (0.0362227, 0.0000952): v < delta^2 in the first coordinate (sign -1),
    //   v > delta^2 in the second (sign +1): v = (0.0009 + 0.000362227, 0.0016 - 0.00000095)
    //   = (0.0012622, 0.0015990); sqrt(v) + 0.001 = (0.0365278, 0.0409881);
    //   x += 0.01 m / that = (1.0096774 + 0.0126020, 1.9902439 - 0.0085450)
    //   = (1.0222794, 1.9816989).
    let mut opt = FedOpt::yogi(&FedYogiConfig::default()).unwrap();
    let after = two_steps(&mut opt, [[1.3, 1.6], [1.2, 2.0]]);
    assert_close(&after, &[1.0096774, 1.9902439, 1.0222794, 1.9816989], 2e-7);
    let flwr = [
        1.0096774101257324,
        1.990243911743164,
        1.0222793817520142,
        1.9816988706588745,
    ];
    assert_eq!(after, flwr);
    let v: Vec<f64> = opt.second_moment().iter().map(|&x| f64::from(x)).collect();
    assert_eq!(v, [0.0012622267240658402, 0.0015990479150786996]); // flwr v_t
}

#[test]
fn fedadam_two_steps_use_the_bias_corrected_rate_of_round_plus_one() {
    // Round 1: step = 0.1 sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.1 * 0.1410674 / 0.19
    //   = 0.0742460; m = (0.03, -0.04), v = (0.0009, 0.0016), m / sqrt(v) = (1, -1):
    //   x = (1.0742460, 1.9257540).
    // Round 2 (aggregate (1.2, 2.0)): step = 0.1 sqrt(1 - 0.99^3) / (1 - 0.9^3)
    //   = 0.1 * 0.1723398 / 0.271 = 0.0635940; delta = (0.1257540, 0.0742460);
    //   m = (0.027 + 0.0125754, -0.036 + 0.0074246) = (0.0395754, -0.0285754);
    //   v = (0.000891 + 0.0001581, 0.001584 + 0.0000551) = (0.0010491, 0.0016391);
    //   sqrt(v) = (0.0323905, 0.0404861): x = (1.0742460 + 0.0777006, 1.9257540 - 0.0448852)
    //   = (1.1519466, 1.8808688).
    let mut opt = FedOpt::adam(&FedAdamConfig::default()).unwrap();
    assert_close(
        &[opt.step_size(1), opt.step_size(2)],
        &[0.0742460, 0.0635940],
        1e-7,
    );
    let after = two_steps(&mut opt, [[1.3, 1.6], [1.2, 2.0]]);
    assert_close(&after, &[1.0742460, 1.9257540, 1.1519466, 1.8808688], 2e-7);
    // flwr's weights are float64; round 1 is the same number rounded to f32, round 2 is
    // within f32 precision (its state went float64 after round 1, ours stays f32).
    let flwr = [
        1.0742459742305495,
        1.9257540142449567,
        1.1519466390072428,
        1.880868873110587,
    ];
    assert_eq!(
        after[..2],
        flwr[..2]
            .iter()
            .map(|&x| f64::from(x as f32))
            .collect::<Vec<_>>()
    );
    assert_close(&after, &flwr, 2e-7);
}

#[test]
fn fedavgm_with_momentum_two_steps_match_the_hand_computation_and_flowers_bits() {
    // Rate 0.5, momentum 0.9. Round 1: g = (1, 2) - (0.5, 2.5) = (0.5, -0.5), v = g,
    //   x = (1 - 0.25, 2 + 0.25) = (0.75, 2.25).
    // Round 2: g = (0.75, 2.25) - (0.25, 2.25) = (0.5, 0); v = 0.9 (0.5, -0.5) + g
    //   = (0.95, -0.45); x = (0.75 - 0.475, 2.25 + 0.225) = (0.275, 2.475).
    let config = r#"{"server_learning_rate": 0.5, "server_momentum": 0.9}"#;
    let mut opt = FedAvgM::new(serde_json::from_str(config).unwrap()).unwrap();
    let after = two_steps(&mut opt, [[0.5, 2.5], [0.25, 2.25]]);
    assert_close(&after, &[0.75, 2.25, 0.275, 2.475], 1e-6);
    assert_eq!(after, [0.75, 2.25, 0.2750000059604645, 2.4749999046325684]); // flwr
    assert_eq!(opt.momentum(), [0.95_f32, -0.45]);
}

#[test]
fn fedavgm_with_its_defaults_returns_the_aggregate_bit_for_bit() {
    // Flower skips the optimizer (server_opt is false): (0.1, 2.7) then (0.3, -1) (flwr).
    let mut opt = FedAvgM::new(FedAvgMConfig::default()).unwrap();
    let after = two_steps(&mut opt, [[0.1, 2.7], [0.3, -1.0]]);
    assert_eq!(after, [0.1_f32, 2.7, 0.3, -1.0].map(f64::from));
    assert!(opt.momentum().is_empty());
    // Rate 0.5 without momentum: x - 0.5 (x - a) = (1 - 0.5 * 0.5, 2 + 0.5 * 0.5).
    let config = r#"{"server_learning_rate": 0.5}"#;
    let mut opt = FedAvgM::new(serde_json::from_str(config).unwrap()).unwrap();
    assert_eq!(opt.step(1, &[1.0, 2.0], &[0.5, 2.5]).unwrap(), [0.75, 2.25]);
    assert!(opt.momentum().is_empty());
}

#[test]
fn a_step_refuses_models_of_another_length_and_changes_nothing() {
    let mut opt = FedOpt::yogi(&FedYogiConfig::default()).unwrap();
    let mut current = [1.0, 2.0];
    let err = opt.step_in_place(1, &mut current, &[1.0]).unwrap_err();
    assert!(
        err.starts_with("aggregate has 1 values, current has 2"),
        "{err}"
    );
    assert!(opt.first_moment().is_empty() && opt.steps() == 0);
    opt.step_in_place(1, &mut current, &[1.5, 2.5]).unwrap();
    let err = opt.step(2, &[1.0; 3], &[1.0; 3]).unwrap_err();
    assert!(err.starts_with("current has 3 values"), "{err}");
    assert_eq!(opt.steps(), 1);
}

#[test]
fn build_reads_flowers_settings_from_the_strategy_table_and_defaults_the_rest() {
    let mut c = StrategyConfig::named(StrategyName::Fedyogi);
    c.eta = Some(0.5);
    let mut built = build(&c).unwrap().unwrap();
    let yogi = FedYogiConfig {
        eta: 0.5,
        ..Default::default()
    };
    let mut direct = FedOpt::yogi(&yogi).unwrap();
    let (current, aggregate) = ([1.0, 2.0], [1.3, 1.6]);
    let expected = direct.step(1, &current, &aggregate).unwrap();
    assert_eq!(built.step(1, &current, &aggregate).unwrap(), expected);
    c.beta_1 = Some(1.0);
    assert!(build(&c).err().unwrap().starts_with("strategy.beta_1 = 1"));
    // FedAvgM with its defaults is FedAvg, and FedAvg has no server optimizer.
    assert!(
        build(&StrategyConfig::named(StrategyName::Fedavgm))
            .unwrap()
            .is_none()
    );
    assert!(build(&StrategyConfig::fedavg()).unwrap().is_none());
    let mut c = StrategyConfig::named(StrategyName::Fedavgm);
    c.server_momentum = Some(0.9);
    assert!(build(&c).unwrap().is_some());
    for name in [StrategyName::Fedadam, StrategyName::Fedadagrad] {
        assert!(build(&StrategyConfig::named(name)).unwrap().is_some());
    }
}

#[test]
fn sign_is_numpys() {
    assert_eq!([sign(2.0), sign(-0.5), sign(0.0)], [1.0, -1.0, 0.0]);
    assert!(sign(f32::NAN).is_nan());
}
