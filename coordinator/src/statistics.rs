//! Federated statistics: clients' [`Statistics`] of their training data combined into the
//! statistics of the union, without a value of anyone's data leaving its device. The
//! coordinator does not know what the channels mean; the task that asked for them does.

use std::collections::BTreeMap;

use pollen_proto::fleet::Statistics;
use pollen_proto::stats::{self, Accumulator};
use serde::Serialize;

/// One client's share of the statistics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientShare {
    pub client_id: String,
    pub num_examples: u64,
    pub label_counts: BTreeMap<String, u64>,
}

/// The statistics of every accepted client's training data together.
#[derive(Debug, Clone, PartialEq)]
pub struct FederatedStatistics {
    pub clients: Vec<ClientShare>,
    pub num_examples: u64,
    pub features: Accumulator,
    pub targets: Option<Accumulator>,
    pub label_counts: BTreeMap<String, u64>,
}

/// Folds clients' statistics in as they arrive; a client whose statistics do not fit the
/// others' (another channel count, targets where others have none) is refused by name.
#[derive(Debug, Default)]
pub struct Combiner {
    combined: Option<FederatedStatistics>,
}

impl Combiner {
    /// Folds in one client's statistics. An error leaves the combination as it was.
    pub fn add(&mut self, client_id: &str, s: &Statistics) -> Result<(), String> {
        let features = s
            .features
            .as_ref()
            .ok_or("statistics without feature moments")?;
        stats::check(features, None).map_err(|e| format!("feature moments: {e}"))?;
        if let Some(t) = &s.targets {
            stats::check(t, Some(1)).map_err(|e| format!("target moments: {e}"))?;
        }
        let labelled: u64 = s.label_counts.values().sum();
        if labelled > s.num_examples {
            return Err(format!(
                "label counts add up to {labelled}, more than its {} examples",
                s.num_examples
            ));
        }
        let share = ClientShare {
            client_id: client_id.to_string(),
            num_examples: s.num_examples,
            label_counts: s
                .label_counts
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        };
        let Some(c) = self.combined.as_mut() else {
            let mut acc = Accumulator::new(features.mean.len());
            acc.merge(features).map_err(|e| e.to_string())?;
            let targets = match &s.targets {
                Some(t) => {
                    let mut a = Accumulator::new(1);
                    a.merge(t).map_err(|e| e.to_string())?;
                    Some(a)
                }
                None => None,
            };
            self.combined = Some(FederatedStatistics {
                num_examples: s.num_examples,
                features: acc,
                targets,
                label_counts: share.label_counts.clone(),
                clients: vec![share],
            });
            return Ok(());
        };
        if features.mean.len() != c.features.channels() {
            return Err(format!(
                "{} feature channels where the other clients have {}",
                features.mean.len(),
                c.features.channels()
            ));
        }
        if s.targets.is_some() != c.targets.is_some() {
            return Err(
                "target moments where the other clients have none, or none where they have some"
                    .into(),
            );
        }
        // Merge into copies first, so that a failure changes nothing.
        let mut acc = c.features.clone();
        acc.merge(features).map_err(|e| e.to_string())?;
        let targets = match (&c.targets, &s.targets) {
            (Some(a), Some(t)) => {
                let mut a = a.clone();
                a.merge(t).map_err(|e| e.to_string())?;
                Some(a)
            }
            _ => None,
        };
        c.features = acc;
        c.targets = targets;
        c.num_examples += s.num_examples;
        for (label, n) in &share.label_counts {
            *c.label_counts.entry(label.clone()).or_insert(0) += n;
        }
        c.clients.push(share);
        Ok(())
    }

    /// The combination; `None` when no client's statistics were accepted.
    pub fn finish(self) -> Option<FederatedStatistics> {
        self.combined
    }
}

impl FederatedStatistics {
    /// A JSON summary for the run's records (`statistics.json`).
    pub fn to_json(&self) -> serde_json::Value {
        let moments = |a: &Accumulator| {
            serde_json::json!({
                "count": a.count(),
                "mean": a.mean(),
                "std": a.std(),
                "min": a.min(),
                "max": a.max(),
            })
        };
        serde_json::json!({
            "clients": self.clients.len(),
            "num_examples": self.num_examples,
            "features": moments(&self.features),
            "targets": self.targets.as_ref().map(moments),
            "label_counts": self.label_counts,
            "per_client": self.clients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(values: &[[f64; 2]], labels: &[(&str, u64)]) -> Statistics {
        let mut acc = Accumulator::new(2);
        for v in values {
            acc.push(v.iter().copied());
        }
        Statistics {
            num_examples: values.len() as u64,
            features: Some(acc.to_moments()),
            targets: None,
            label_counts: labels.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn clients_combine_into_the_statistics_of_the_union() {
        let mut c = Combiner::default();
        c.add("a", &client(&[[1.0, 10.0], [3.0, 30.0]], &[("x", 2)]))
            .expect("fits");
        c.add("b", &client(&[[5.0, 50.0]], &[("x", 0), ("y", 1)]))
            .expect("fits");
        let f = c.finish().expect("combined");
        assert_eq!(f.num_examples, 3);
        assert_eq!(f.features.mean(), &[3.0, 30.0]);
        let std = f.features.std();
        assert!((std[0] - (8.0f64 / 3.0).sqrt()).abs() < 1e-12, "{std:?}");
        assert_eq!(f.label_counts, [("x".into(), 2), ("y".into(), 1)].into());
        assert_eq!(f.clients.len(), 2);
    }

    #[test]
    fn statistics_that_do_not_fit_are_refused_and_change_nothing() {
        let mut c = Combiner::default();
        c.add("a", &client(&[[1.0, 2.0]], &[])).expect("fits");
        let mut three = Accumulator::new(3);
        three.push([1.0, 2.0, 3.0]);
        let bad = Statistics {
            num_examples: 1,
            features: Some(three.to_moments()),
            ..Default::default()
        };
        let e = c.add("b", &bad).expect_err("3 channels");
        assert!(e.contains("3 feature channels"), "{e}");
        let mut nan = client(&[[1.0, 2.0]], &[]);
        if let Some(f) = nan.features.as_mut() {
            f.mean[0] = f64::NAN;
        }
        assert!(c.add("c", &nan).is_err());
        let lying = client(&[[1.0, 2.0]], &[("x", 5)]);
        assert!(
            c.add("d", &lying)
                .expect_err("5 > 1")
                .contains("label counts")
        );
        let f = c.finish().expect("a only");
        assert_eq!((f.num_examples, f.clients.len()), (1, 1));
    }
}
