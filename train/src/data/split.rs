//! The local holdout: which examples a device keeps out of training for federated evaluation.
//!
//! Examples of one series stay together where the series are many enough: a seeded choice of
//! whole series (recordings, machines) goes to the holdout. With fewer series than that
//! (round(series x fraction) = 0) each series is split in time instead: its last readings go
//! to the holdout, and training windows that would overlap them are left out, so that no
//! reading is both trained on and evaluated.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{Examples, LocalData};

/// Splits `examples`, keeping about `fraction` of them out of training; `seed` fixes the
/// choice.
pub fn split(examples: Examples, fraction: f64, seed: u64) -> LocalData {
    let n = examples.len();
    if fraction <= 0.0 || n < 2 {
        return LocalData {
            train: (0..n).collect(),
            holdout: Vec::new(),
            examples,
        };
    }
    let mut by_series: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &s) in examples.series.iter().enumerate() {
        by_series.entry(s).or_default().push(i);
    }
    let series: Vec<u32> = by_series.keys().copied().collect();
    let whole = (series.len() as f64 * fraction).round() as usize;
    let (mut train, mut holdout) = (Vec::new(), Vec::new());
    if whole >= 1 && whole < series.len() {
        let mut shuffled = series;
        shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        for (k, s) in shuffled.iter().enumerate() {
            let members = &by_series[s];
            if k < whole {
                holdout.extend(members);
            } else {
                train.extend(members);
            }
        }
    } else {
        let span = examples.span;
        for members in by_series.values() {
            let mut members = members.clone();
            members.sort_by_key(|&i| examples.position[i]);
            let keep_out = (members.len() as f64 * fraction).round() as usize;
            if keep_out == 0 || keep_out >= members.len() {
                train.extend(members);
                continue;
            }
            let cut = members.len() - keep_out;
            let first_held = examples.position[members[cut]];
            holdout.extend(&members[cut..]);
            train.extend(
                members[..cut]
                    .iter()
                    .filter(|&&i| examples.position[i] + span <= first_held),
            );
        }
    }
    train.sort_unstable();
    holdout.sort_unstable();
    LocalData {
        examples,
        train,
        holdout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(series: Vec<u32>, position: Vec<u32>, span: u32) -> Examples {
        let n = series.len();
        Examples {
            shape: vec![1],
            x: vec![0.0; n],
            labels: None,
            targets: None,
            series,
            position,
            span,
        }
    }

    #[test]
    fn many_series_are_held_out_whole() {
        let series: Vec<u32> = (0..100).map(|i| i / 10).collect();
        let d = split(examples(series.clone(), (0..100).collect(), 1), 0.2, 7);
        assert_eq!(d.holdout.len(), 20);
        assert_eq!(d.train.len(), 80);
        let held: std::collections::BTreeSet<u32> = d.holdout.iter().map(|&i| series[i]).collect();
        assert_eq!(held.len(), 2);
        assert!(d.train.iter().all(|i| !held.contains(&series[*i])));
        assert_eq!(split(examples(series, (0..100).collect(), 1), 0.2, 7), d);
    }

    #[test]
    fn one_series_is_split_in_time_without_overlapping_windows() {
        // Ten windows of 4 readings every 2 readings: the last two are held out, and the
        // training windows that share readings with them are dropped.
        let d = split(
            examples(vec![0; 10], (0..10).map(|i| i * 2).collect(), 4),
            0.2,
            1,
        );
        assert_eq!(d.holdout, vec![8, 9]);
        // Window 8 starts at reading 16: window 7 (readings 14..18) overlaps it and is left out,
        // window 6 (12..16) ends where it starts.
        assert_eq!(d.train, vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn no_holdout_keeps_everything_for_training() {
        let d = split(examples(vec![0, 1, 2], vec![0, 0, 0], 1), 0.0, 1);
        assert_eq!((d.train.len(), d.holdout.len()), (3, 0));
    }
}
