//! Expected values are worked out by hand in the comments; those marked "flwr" were also
//! printed by flwr 1.42.0's own functions (numpy 2.4.6): `aggregate_median`,
//! `aggregate_trimmed_avg`, `_compute_distances`, `aggregate_krum`, `aggregate_bulyan`.
use super::*;

fn run(f: impl Fn(&[&[f32]], &mut [f32]) -> Result<(), String>, models: &[&[f32]]) -> Vec<f32> {
    let mut out = vec![f32::NAN; models[0].len()];
    f(models, &mut out).unwrap();
    out
}

#[test]
fn the_median_of_an_odd_count_is_the_middle_value() {
    // Columns {1, 3, 2} -> 2, {5, 1, 2} -> 2, {-2, 0, 7} -> 0 (flwr: [2, 2, 0]).
    let models: [&[f32]; 3] = [&[1.0, 5.0, -2.0], &[3.0, 1.0, 0.0], &[2.0, 2.0, 7.0]];
    assert_eq!(run(coordinate_median, &models), [2.0, 2.0, 0.0]);
}

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_two_middle_values() {
    // {1, 2, 4, 8} -> (2 + 4) / 2 = 3; {10, 0, 3, -1} -> (0 + 3) / 2 = 1.5 (flwr: [3, 1.5]).
    let models: [&[f32]; 4] = [&[1.0, 10.0], &[2.0, 0.0], &[4.0, 3.0], &[8.0, -1.0]];
    assert_eq!(run(coordinate_median, &models), [3.0, 1.5]);
    // numpy adds the two middle values in f32: (0.1f32 + 0.2f32) / 2 (flwr:
    // 0.15000000596046448).
    let models: [&[f32]; 2] = [&[0.1, 0.7], &[0.2, 0.3]];
    let out = run(coordinate_median, &models);
    assert_eq!(out, [(0.1_f32 + 0.2_f32) / 2.0, 0.5]);
    assert_eq!(f64::from(out[0]), 0.15000000596046448);
}

#[test]
fn trim_counts_truncate_beta_times_n_toward_zero() {
    assert_eq!(trim_counts(5, 0.2), Ok((1, 3))); // int(1.0) = 1
    assert_eq!(trim_counts(4, 0.2), Ok((0, 4))); // int(0.8) = 0: nothing is cut
    assert_eq!(trim_counts(10, 0.25), Ok((2, 6))); // int(2.5) = 2
    assert_eq!(trim_counts(3, 0.49), Ok((1, 1))); // int(1.47) = 1: the median is left
    assert_eq!(trim_counts(1, 0.2), Ok((0, 1)));
}

#[test]
fn trimmed_mean_averages_what_is_left_after_cutting_int_beta_n_from_each_end() {
    // n = 5, beta = 0.2 cuts one value at each end.
    // Column 0 sorted: -50 1 2 3 100 -> mean(1, 2, 3) = 2.
    // Column 1 sorted: -8 0.25 0.5 0.75 1 -> mean(0.25, 0.5, 0.75) = 0.5 (flwr: [2, 0.5]).
    let models: [&[f32]; 5] = [
        &[1., 0.5],
        &[100., 0.25],
        &[3., 0.75],
        &[-50., 1.],
        &[2., -8.],
    ];
    assert_eq!(run(|m, o| trimmed_mean(m, 0.2, o), &models), [2.0, 0.5]);
    // n = 4, beta = 0.2: int(0.8) = 0 cuts nothing: (1 + 100 + 3 - 50) / 4 = 13.5 (flwr).
    let models: [&[f32]; 4] = [&[1.0], &[100.0], &[3.0], &[-50.0]];
    assert_eq!(run(|m, o| trimmed_mean(m, 0.2, o), &models), [13.5]);
    // n = 10, beta = 0.25 cuts int(2.5) = 2: -40 -7 | 0 1 2 3 5 9 | 12 100 -> 20 / 6
    // (flwr: 3.3333332538604736).
    let values = [9.0, -7.0, 3.0, 0.0, 12.0, 5.0, 1.0, 100.0, -40.0, 2.0];
    let rows: Vec<[f32; 1]> = values.iter().map(|&v| [v]).collect();
    let models: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
    let out = run(|m, o| trimmed_mean(m, 0.25, o), &models);
    assert_eq!(f64::from(out[0]), 3.3333332538604736);
}

#[test]
fn trimmed_mean_refuses_beta_outside_zero_to_one_half() {
    // flwr 1.42.0: ValueError("Proportion to cut must be in the range [0, 0.5).").
    let models: [&[f32]; 2] = [&[1.0], &[2.0]];
    for beta in [0.5, -0.1, f64::NAN, 1.0] {
        let err = trimmed_mean(&models, beta, &mut [0.0]).unwrap_err();
        assert!(err.starts_with("beta = "), "{err}");
    }
}

// Krum example, n = 5 models of 2 values, the last an outlier:
//   m0 = (0, 0), m1 = (1, 0), m2 = (0, 2), m3 = (1, 1), m4 = (9, 9).
// Squared distances: d01 = 1, d02 = 4, d03 = 2, d04 = 162, d12 = 5, d13 = 1, d14 = 145,
//   d23 = 2, d24 = 130, d34 = 128.
// f = 1: each score sums the n - f - 2 = 2 nearest others:
//   s0 = 1 + 2 = 3, s1 = 1 + 1 = 2, s2 = 2 + 4 = 6, s3 = 1 + 2 = 3, s4 = 128 + 130 = 258.
const K: [&[f32]; 5] = [
    &[0.0, 0.0],
    &[1.0, 0.0],
    &[0.0, 2.0],
    &[1.0, 1.0],
    &[9.0, 9.0],
];

#[test]
fn pairwise_squared_distances_are_symmetric_sums_of_squares() {
    // flwr's float32 norm gives 1.9999998807907104 for 2 and 162.00001525878906 for 162;
    // the f64 sums here are exact.
    let d = pairwise_squared_distances(&K).unwrap();
    let expected = [
        [0.0, 1.0, 4.0, 2.0, 162.0],
        [1.0, 0.0, 5.0, 1.0, 145.0],
        [4.0, 5.0, 0.0, 2.0, 130.0],
        [2.0, 1.0, 2.0, 0.0, 128.0],
        [162.0, 145.0, 130.0, 128.0, 0.0],
    ];
    assert_eq!(d, expected.map(Vec::from).to_vec());
}

#[test]
fn krum_with_one_malicious_client_picks_the_model_nearest_its_neighbours() {
    let d = pairwise_squared_distances(&K).unwrap();
    assert_eq!(krum_scores(&d, 1).unwrap(), [3.0, 2.0, 6.0, 3.0, 258.0]);
    assert_eq!(krum_select(&d, 1, 0).unwrap(), [1]);
    let mut out = [0.0; 2];
    assert_eq!(krum(&K, &[1, 1, 1, 1, 1], 1, 0, &mut out).unwrap(), [1]);
    assert_eq!(out, [1.0, 0.0]); // flwr: [1, 0]
}

#[test]
fn multi_krum_keeping_two_averages_them_weighted_by_examples() {
    // Lowest scores: s1 = 2, then s0 = s3 = 3, the tie going to the lower index (as numpy's
    // argsort happened to order it for flwr). Kept {1, 0} with 1 and 3 examples:
    // (1 * (1, 0) + 3 * (0, 0)) / 4 = (0.25, 0) (flwr: [0.25, 0]).
    let d = pairwise_squared_distances(&K).unwrap();
    assert_eq!(krum_select(&d, 1, 2).unwrap(), [1, 0]);
    let mut out = [0.0; 2];
    assert_eq!(krum(&K, &[3, 1, 2, 2, 2], 1, 2, &mut out).unwrap(), [1, 0]);
    assert_eq!(out, [0.25, 0.0]);
}

#[test]
fn krum_matches_flowers_own_krum_and_multi_krum_tests() {
    // krum_test.py: n = 3, f = 1, so one neighbour each. Over 4 coordinates
    // d(0.2, 0.7) = 1, d(0.2, 1.0) = 2.56, d(0.7, 1.0) = 0.36: scores (1, 0.36, 0.36),
    // the tie goes to index 1: 0.7.
    let models: [&[f32]; 3] = [&[0.2; 4], &[0.7; 4], &[1.0; 4]];
    let mut out = [0.0; 4];
    krum(&models, &[5, 5, 5], 1, 0, &mut out).unwrap();
    assert_eq!(out, [0.7; 4]);
    // multikrum_test.py: 0.2, 0.5, 1.0 keeping 2: scores (0.36, 0.36, 1), kept {0, 1},
    // equal weights: (0.2 + 0.5) / 2 = 0.35 (flwr: 0.3499999940395355).
    let models: [&[f32]; 3] = [&[0.2; 4], &[0.5; 4], &[1.0; 4]];
    assert_eq!(krum(&models, &[5, 5, 5], 1, 2, &mut out).unwrap(), [0, 1]);
    assert_eq!(out, [0.35; 4]);
}

#[test]
fn the_krum_neighbour_count_is_clamped_to_one() {
    // Values 0, 1, 3: d01 = 1, d02 = 9, d12 = 4. n - f - 2 = 0 for f = 1 (and negative for
    // f = 5) is clamped to one neighbour: scores (1, 1, 4). A lone model scores 0.
    let models: [&[f32]; 3] = [&[0.0], &[1.0], &[3.0]];
    let d = pairwise_squared_distances(&models).unwrap();
    assert_eq!(krum_scores(&d, 1).unwrap(), [1.0, 1.0, 4.0]);
    assert_eq!(krum_scores(&d, 5).unwrap(), [1.0, 1.0, 4.0]);
    // f = 0: n - 2 = 1 neighbour as well.
    assert_eq!(krum_scores(&d, 0).unwrap(), [1.0, 1.0, 4.0]);
    assert_eq!(krum_scores(&[vec![0.0]], 0).unwrap(), [0.0]);
}

#[test]
fn krum_refuses_to_keep_more_models_than_there_are() {
    // Flower's `[len(scores) - to_keep:]` wraps around: keeping 4 of 3 kept 1 (flwr).
    let models: [&[f32]; 3] = [&[0.0], &[1.0], &[5.0]];
    let d = pairwise_squared_distances(&models).unwrap();
    let err = krum_select(&d, 0, 4).unwrap_err();
    assert!(err.starts_with("to_keep = 4"), "{err}");
    assert_eq!(krum_select(&d, 0, 3).unwrap(), [0, 1, 2]); // scores (1, 1, 16)
}

// Bulyan example, n = 7, f = 1 (theta = 5 selected, beta = 3 averaged per coordinate):
//   m0 = (0, 4), m1 = (1, 3), m2 = (2, 0), m3 = (3, 1), m4 = (4, 2), m5 = (50, 50),
//   m6 = (100, -100).
// Squared distances: d01 = 2, d02 = 20, d03 = 18, d04 = 20, d12 = 10, d13 = 8, d14 = 10,
//   d23 = 2, d24 = 8, d34 = 2; every distance to m5 or m6 is over 4000.
// Repeated Krum, n - f - 2 nearest over the models left:
//   7 left, 4 nearest: s0 = 2+18+20+20 = 60, s1 = 2+8+10+10 = 30, s2 = 2+8+10+20 = 40,
//     s3 = 2+2+8+18 = 30, s4 = 40: m1 (tie with m3, lower index).
//   6 left, 3 nearest: s0 = 18+20+20 = 58, s2 = 2+8+20 = 30, s3 = 2+2+18 = 22, s4 = 30: m3.
//   5 left, 2 nearest: s0 = 40, s2 = 8+20 = 28, s4 = 8+20 = 28: m2.
//   4 left, 1 nearest: s0 = 20, s4 = 20, s5 = 4420: m0.
//   3 left, 1 nearest: s4 = 4420, s5 = 4420, s6 = 19620: m4.
// Selected m1, m3, m2, m0, m4. Column 0 {1, 3, 2, 0, 4}: median 2, nearest three 2, 1, 3:
// mean 2. Column 1 {3, 1, 0, 4, 2}: the same, 2 (flwr: [2, 2]).
const B: [&[f32]; 7] = [
    &[0.0, 4.0],
    &[1.0, 3.0],
    &[2.0, 0.0],
    &[3.0, 1.0],
    &[4.0, 2.0],
    &[50.0, 50.0],
    &[100.0, -100.0],
];

#[test]
fn bulyan_discards_outliers_then_averages_the_values_nearest_the_median() {
    let mut out = [0.0; 2];
    let selected = bulyan(&B, 1, &mut out).unwrap();
    assert_eq!(selected, [1, 3, 2, 0, 4]);
    assert_eq!(out, [2.0, 2.0]);
    // One Multi-Krum pass over all seven (scores 60, 30, 40, 30, 40, ...) keeps the same
    // five, in score order.
    let selected = bulyan_with(&B, 1, BulyanSelection::MultiKrum, &mut out).unwrap();
    assert_eq!(selected, [1, 3, 2, 4, 0]);
    assert_eq!(out, [2.0, 2.0]);
}

#[test]
fn bulyan_matches_flowers_own_bulyan_test() {
    // bulyan_test.py: f = 0 keeps all six and averages all six per coordinate:
    // (0.2 + 0.5 + 0.7 + 12 + 0.1 + 0.1) / 6 = 2.2666667 (flwr: 2.2666666507720947).
    let models: [&[f32]; 6] = [
        &[0.2; 4], &[0.5; 4], &[0.7; 4], &[12.0; 4], &[0.1; 4], &[0.1; 4],
    ];
    let mut out = [0.0; 4];
    bulyan(&models, 0, &mut out).unwrap();
    assert_eq!(
        out,
        [((0.2 + 0.5 + 0.7 + 12.0 + 0.1 + 0.1) / 6.0) as f32; 4]
    );
    assert_eq!(f64::from(out[0]), 2.2666666507720947);
}

#[test]
fn bulyan_needs_at_least_four_f_plus_three_models() {
    // flwr: ValueError("The Bulyan aggregation requires then number of clients to be
    // greater or equal to the 4 * num_malicious + 3. ...") for 6 models and f = 1.
    let err = bulyan(&B[..6], 1, &mut [0.0; 2]).unwrap_err();
    assert!(
        err.contains("4 * num_malicious + 3 = 7 models, got 6"),
        "{err}"
    );
    let err = bulyan_with(&B[..2], 0, BulyanSelection::MultiKrum, &mut [0.0; 2]).unwrap_err();
    assert!(err.contains("= 3 models, got 2"), "{err}");
}

#[test]
fn bulyans_nearest_values_break_ties_toward_the_smaller_value() {
    // Median 2: distances 2 1 0 1 2; beta = 2 takes 2, then 1 over 3: (2 + 1) / 2.
    assert_eq!(
        closest_to_median_mean(&mut [4.0, 3.0, 2.0, 1.0, 0.0], 2),
        1.5
    );
    // Median 2 of {10, 0, 2.5, 1, 2}: distances 8 2 0.5 1 0 -> 2, 2.5, 1: 5.5 / 3.
    assert_eq!(
        closest_to_median_mean(&mut [10.0, 0.0, 2.5, 1.0, 2.0], 3),
        (5.5_f64 / 3.0) as f32
    );
    // Even count {0, 1, 3, 10}: median 2, distances 2 1 1 8 -> 1 and 3: 2.
    assert_eq!(closest_to_median_mean(&mut [10.0, 3.0, 1.0, 0.0], 2), 2.0);
}

#[test]
fn bad_shapes_and_weights_are_refused_naming_the_parameter() {
    let err = coordinate_median(&[], &mut []).unwrap_err();
    assert!(err.starts_with("models"), "{err}");
    let err = coordinate_median(&[&[1.0, 2.0], &[1.0]], &mut [0.0; 2]).unwrap_err();
    assert!(err.starts_with("models[1] has 1 values"), "{err}");
    let err = trimmed_mean(&[&[1.0, 2.0]], 0.1, &mut [0.0; 3]).unwrap_err();
    assert!(err.starts_with("out has 3 values"), "{err}");
    let err = krum(&K, &[1, 1], 1, 0, &mut [0.0; 2]).unwrap_err();
    assert!(err.starts_with("num_examples"), "{err}");
    let err = krum(&K, &[0, 0, 1, 1, 1], 1, 2, &mut [0.0; 2]).unwrap_err();
    assert!(
        err.starts_with("num_examples of the kept models [1, 0] sum to 0"),
        "{err}"
    );
    let err = krum_scores(&[vec![0.0, 1.0], vec![1.0]], 0).unwrap_err();
    assert!(err.starts_with("distances: row 1"), "{err}");
}

#[test]
fn the_parallel_path_gives_the_serial_paths_bits_on_large_models() {
    // Deterministic scrambled values in [-1, 1).
    let value = |i: usize, k: usize| ((i * 7919 + k * 104_729) % 2003) as f32 / 1001.5 - 1.0;
    let len = PARALLEL_MIN_VALUES + 777;
    let owned: Vec<Vec<f32>> = (0..7)
        .map(|i| (0..len).map(|k| value(i, k)).collect())
        .collect();
    let models: Vec<&[f32]> = owned.iter().map(|m| &m[..]).collect();
    let same = |kernel: &(dyn Fn(&mut [f32]) -> f32 + Sync)| {
        let (mut serial, mut parallel) = (vec![0.0; len], vec![0.0; len]);
        map_columns(&models, &mut serial, false, kernel);
        map_columns(&models, &mut parallel, true, kernel);
        serial == parallel
    };
    assert!(same(&median_of));
    assert!(same(&|c| closest_to_median_mean(c, 3)));
    assert!(same(&|c| c.iter().map(|&x| x * 0.5).sum()));
    assert_eq!(
        distances_impl(&models, false),
        distances_impl(&models, true)
    );
    // The public entry points (parallel at this size) against a naive column, far from
    // the first chunk.
    let k = len - 5;
    let mut column: Vec<f32> = models.iter().map(|m| m[k]).collect();
    column.sort_unstable_by(f32::total_cmp);
    let mut out = vec![0.0; len];
    coordinate_median(&models, &mut out).unwrap();
    assert_eq!(out[k], column[3]);
    trimmed_mean(&models, 0.2, &mut out).unwrap(); // int(1.4) = 1 cut at each end
    assert_eq!(out[k], mean_f64(&column[1..6]));
    let d = pairwise_squared_distances(&models).unwrap();
    let naive: f64 = models[2]
        .iter()
        .zip(models[5])
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    assert!(
        (d[2][5] - naive).abs() <= 1e-9 * naive,
        "{} vs {naive}",
        d[2][5]
    );
    assert_eq!(d[2][5], d[5][2]);
}
