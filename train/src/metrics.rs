//! Evaluation metrics that combine exactly across devices.
//!
//! A device does not report only its accuracy or RMSE (averages of averages are wrong for
//! macro-F1, R² and AUC); it reports additive sums under `sum.*` keys: per-class true
//! positives, false positives and false negatives; sums of errors and of targets; histograms
//! of anomaly scores. The coordinator adds them up over devices ([`aggregate`]) and computes
//! the metrics of the union ([`finalize`]), as if one evaluation had seen every holdout. A
//! server-side evaluation goes through the same two functions.

use std::collections::BTreeMap;

use pollen_proto::scalar::{self, ScalarMap};

use crate::manifest::TaskKind;

/// Prefix of the additive entries.
pub const SUM: &str = "sum.";

/// Anomaly-score histogram: 20 bins per decade from 1e-6 to 1e6, plus one below and one
/// above. Scores are mean squared reconstruction errors of standardised data, so this spans
/// every score that matters at a resolution of 12%.
const DECADES_FROM: f64 = -6.0;
const BINS_PER_DECADE: f64 = 20.0;
const BINS: usize = 12 * 20 + 2;

fn bin(score: f64) -> usize {
    // Zero, negative and NaN scores go to the bottom bin.
    if score.is_nan() || score <= 0.0 {
        return 0;
    }
    let b = ((score.log10() - DECADES_FROM) * BINS_PER_DECADE).floor();
    if b < 0.0 {
        0
    } else {
        (b as usize + 1).min(BINS - 1)
    }
}

/// The upper edge of a histogram bin.
fn bin_upper(b: usize) -> f64 {
    if b == 0 {
        return 10f64.powf(DECADES_FROM);
    }
    10f64.powf(DECADES_FROM + b as f64 / BINS_PER_DECADE)
}

/// What one evaluation pass accumulates.
#[derive(Debug, Clone, PartialEq)]
pub enum Tally {
    Classification {
        n: u64,
        correct: u64,
        tp: Vec<u64>,
        fp: Vec<u64>,
        fn_: Vec<u64>,
    },
    Regression {
        n: u64,
        sse: f64,
        sae: f64,
        sum_y: f64,
        sum_y2: f64,
    },
    Anomaly {
        n: u64,
        score: f64,
        normal: Vec<u64>,
        anomalous: Vec<u64>,
    },
}

impl Tally {
    pub fn new(kind: TaskKind, classes: usize) -> Self {
        match kind {
            TaskKind::Classification => Tally::Classification {
                n: 0,
                correct: 0,
                tp: vec![0; classes],
                fp: vec![0; classes],
                fn_: vec![0; classes],
            },
            TaskKind::Regression => Tally::Regression {
                n: 0,
                sse: 0.0,
                sae: 0.0,
                sum_y: 0.0,
                sum_y2: 0.0,
            },
            TaskKind::Anomaly => Tally::Anomaly {
                n: 0,
                score: 0.0,
                normal: vec![0; BINS],
                anomalous: vec![0; BINS],
            },
        }
    }

    /// One classified example.
    pub fn class(&mut self, predicted: usize, actual: usize) {
        if let Tally::Classification {
            n,
            correct,
            tp,
            fp,
            fn_,
        } = self
        {
            *n += 1;
            if predicted == actual {
                *correct += 1;
                tp[actual] += 1;
            } else {
                fp[predicted] += 1;
                fn_[actual] += 1;
            }
        }
    }

    /// One regression prediction, in the target's units.
    pub fn value(&mut self, predicted: f64, actual: f64) {
        if let Tally::Regression {
            n,
            sse,
            sae,
            sum_y,
            sum_y2,
        } = self
        {
            *n += 1;
            let e = predicted - actual;
            *sse += e * e;
            *sae += e.abs();
            *sum_y += actual;
            *sum_y2 += actual * actual;
        }
    }

    /// One anomaly score; `anomalous` when a label says so.
    pub fn score(&mut self, value: f64, anomalous: bool) {
        if let Tally::Anomaly {
            n,
            score,
            normal,
            anomalous: bad,
        } = self
        {
            *n += 1;
            *score += value;
            let b = bin(value);
            if anomalous {
                bad[b] += 1;
            } else {
                normal[b] += 1;
            }
        }
    }

    /// The additive sums as metrics entries (zeros left out).
    pub fn sums(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        let mut put = |k: String, v: f64| {
            if v != 0.0 {
                m.insert(format!("{SUM}{k}"), v);
            }
        };
        match self {
            Tally::Classification {
                n,
                correct,
                tp,
                fp,
                fn_,
            } => {
                put("n".into(), *n as f64);
                put("correct".into(), *correct as f64);
                for c in 0..tp.len() {
                    put(format!("tp.{c}"), tp[c] as f64);
                    put(format!("fp.{c}"), fp[c] as f64);
                    put(format!("fn.{c}"), fn_[c] as f64);
                }
            }
            Tally::Regression {
                n,
                sse,
                sae,
                sum_y,
                sum_y2,
            } => {
                put("n".into(), *n as f64);
                put("sse".into(), *sse);
                put("sae".into(), *sae);
                put("y".into(), *sum_y);
                put("y2".into(), *sum_y2);
            }
            Tally::Anomaly {
                n,
                score,
                normal,
                anomalous,
            } => {
                put("n".into(), *n as f64);
                put("score".into(), *score);
                for b in 0..BINS {
                    put(format!("hn.{b}"), normal[b] as f64);
                    put(format!("ha.{b}"), anomalous[b] as f64);
                }
            }
        }
        m
    }
}

/// The metrics of a set of sums. `quantile` sets the anomaly threshold.
pub fn finalize(
    kind: TaskKind,
    quantile: f64,
    sums: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let get = |k: &str| sums.get(&format!("{SUM}{k}")).copied().unwrap_or(0.0);
    let indexed = |prefix: &str| -> BTreeMap<usize, f64> {
        let p = format!("{SUM}{prefix}.");
        sums.iter()
            .filter_map(|(k, v)| k.strip_prefix(&p)?.parse().ok().map(|i: usize| (i, *v)))
            .collect()
    };
    let mut out = BTreeMap::new();
    let n = get("n");
    if n <= 0.0 {
        return out;
    }
    match kind {
        TaskKind::Classification => {
            out.insert("accuracy".into(), get("correct") / n);
            let (tp, fp, fn_) = (indexed("tp"), indexed("fp"), indexed("fn"));
            let classes: std::collections::BTreeSet<usize> = tp
                .keys()
                .chain(fp.keys())
                .chain(fn_.keys())
                .copied()
                .collect();
            let f1: Vec<f64> = classes
                .iter()
                .map(|c| {
                    let t = tp.get(c).copied().unwrap_or(0.0);
                    2.0 * t
                        / (2.0 * t
                            + fp.get(c).copied().unwrap_or(0.0)
                            + fn_.get(c).copied().unwrap_or(0.0))
                })
                .collect();
            if !f1.is_empty() {
                out.insert("macro_f1".into(), f1.iter().sum::<f64>() / f1.len() as f64);
            }
        }
        TaskKind::Regression => {
            let sse = get("sse");
            out.insert("rmse".into(), (sse / n).sqrt());
            out.insert("mae".into(), get("sae") / n);
            let ss_tot = get("y2") - get("y") * get("y") / n;
            if ss_tot > 0.0 {
                out.insert("r2".into(), 1.0 - sse / ss_tot);
            }
        }
        TaskKind::Anomaly => {
            out.insert("mean_score".into(), get("score") / n);
            let (hn, ha) = (indexed("hn"), indexed("ha"));
            let normal: Vec<f64> = (0..BINS)
                .map(|b| hn.get(&b).copied().unwrap_or(0.0))
                .collect();
            let anomalous: Vec<f64> = (0..BINS)
                .map(|b| ha.get(&b).copied().unwrap_or(0.0))
                .collect();
            let (nn, na) = (normal.iter().sum::<f64>(), anomalous.iter().sum::<f64>());
            if nn > 0.0 {
                let mut seen = 0.0;
                let cut = (0..BINS)
                    .find(|&b| {
                        seen += normal[b];
                        seen >= quantile * nn
                    })
                    .unwrap_or(BINS - 1);
                out.insert("threshold".into(), bin_upper(cut));
                let above = |h: &[f64]| h[cut + 1..].iter().sum::<f64>();
                out.insert("flagged".into(), (above(&normal) + above(&anomalous)) / n);
                if na > 0.0 {
                    out.insert("recall".into(), above(&anomalous) / na);
                    // P(score of an anomaly > score of a normal example), ties within a bin
                    // counted half: the area under the ROC curve of the binned scores.
                    let (mut below, mut wins) = (0.0, 0.0);
                    for b in 0..BINS {
                        wins += anomalous[b] * (below + 0.5 * normal[b]);
                        below += normal[b];
                    }
                    out.insert("auc".into(), wins / (na * nn));
                }
            }
        }
    }
    out
}

/// Federated metrics of many devices' evaluations (`(examples, metrics)` each): sums added,
/// then [`finalize`]d; entries a device reported without sums are averaged, weighted by
/// examples (Flower's default).
pub fn aggregate(
    kind: TaskKind,
    quantile: f64,
    results: &[(u64, &BTreeMap<String, f64>)],
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for (_, metrics) in results {
        for (k, v) in metrics.iter().filter(|(k, _)| k.starts_with(SUM)) {
            *sums.entry(k.clone()).or_insert(0.0) += v;
        }
    }
    let mut out = finalize(kind, quantile, &sums);
    let total: u64 = results.iter().map(|(n, _)| n).sum();
    if total > 0 {
        let mut weighted: BTreeMap<&str, f64> = BTreeMap::new();
        for (n, metrics) in results {
            for (k, v) in metrics.iter().filter(|(k, _)| !k.starts_with(SUM)) {
                *weighted.entry(k.as_str()).or_insert(0.0) += v * *n as f64;
            }
        }
        for (k, v) in weighted {
            out.entry(k.to_string()).or_insert(v / total as f64);
        }
    }
    out
}

/// A tally as the metrics an evaluation reports: its sums and its own metrics.
pub fn report(kind: TaskKind, quantile: f64, tally: &Tally) -> ScalarMap {
    let sums = tally.sums();
    let mut m = ScalarMap::new();
    for (k, v) in finalize(kind, quantile, &sums).into_iter().chain(sums) {
        m.insert(k, scalar::f64(v));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federated_macro_f1_equals_the_macro_f1_of_the_union() {
        // Device A sees only class 0, device B only class 1: averaging their own F1s is wrong.
        let mut a = Tally::new(TaskKind::Classification, 2);
        let mut b = Tally::new(TaskKind::Classification, 2);
        let mut union = Tally::new(TaskKind::Classification, 2);
        for (p, y) in [(0, 0), (0, 0), (1, 0)] {
            a.class(p, y);
            union.class(p, y);
        }
        for (p, y) in [(1, 1), (0, 1), (1, 1), (1, 1)] {
            b.class(p, y);
            union.class(p, y);
        }
        let (sa, sb) = (a.sums(), b.sums());
        let fed = aggregate(TaskKind::Classification, 0.99, &[(3, &sa), (4, &sb)]);
        let central = finalize(TaskKind::Classification, 0.99, &union.sums());
        assert_eq!(fed, central);
        assert!((fed["accuracy"] - 5.0 / 7.0).abs() < 1e-12);
        // Class 0: tp 2, fp 1, fn 1 -> 2/3; class 1: tp 3, fp 1, fn 1 -> 3/4.
        assert!((fed["macro_f1"] - (2.0 / 3.0 + 0.75) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn regression_metrics_are_those_of_the_union() {
        let (mut a, mut b) = (
            Tally::new(TaskKind::Regression, 0),
            Tally::new(TaskKind::Regression, 0),
        );
        a.value(1.0, 2.0);
        a.value(3.0, 3.0);
        b.value(10.0, 7.0);
        let fed = aggregate(
            TaskKind::Regression,
            0.99,
            &[(2, &a.sums()), (1, &b.sums())],
        );
        assert!((fed["rmse"] - (10.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((fed["mae"] - 4.0 / 3.0).abs() < 1e-12);
        // y = 2, 3, 7: mean 4, SS_tot = 4 + 1 + 9 = 14.
        assert!((fed["r2"] - (1.0 - 10.0 / 14.0)).abs() < 1e-12);
    }

    #[test]
    fn anomaly_scores_give_a_threshold_and_an_auc() {
        let mut t = Tally::new(TaskKind::Anomaly, 0);
        for i in 0..100 {
            t.score(0.1 + 0.001 * i as f64, false);
        }
        for i in 0..10 {
            t.score(5.0 + i as f64, true);
        }
        let m = finalize(TaskKind::Anomaly, 0.99, &t.sums());
        assert_eq!(m["auc"], 1.0);
        assert_eq!(m["recall"], 1.0);
        let threshold = m["threshold"];
        assert!(threshold > 0.19 && threshold < 0.3, "{threshold}");
        // Perfectly mixed scores: chance.
        let mut mixed = Tally::new(TaskKind::Anomaly, 0);
        for i in 0..50 {
            mixed.score(1.0 + i as f64, i % 2 == 0);
        }
        let auc = finalize(TaskKind::Anomaly, 0.99, &mixed.sums())["auc"];
        assert!((auc - 0.5).abs() < 0.05, "{auc}");
    }

    #[test]
    fn entries_without_sums_are_averaged_by_examples() {
        let a: BTreeMap<String, f64> = [("loss".to_string(), 1.0)].into();
        let b: BTreeMap<String, f64> = [("loss".to_string(), 4.0)].into();
        let m = aggregate(TaskKind::Regression, 0.99, &[(3, &a), (1, &b)]);
        assert_eq!(m["loss"], 1.75);
    }
}
