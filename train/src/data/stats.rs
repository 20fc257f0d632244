//! Federated statistics of a device's training examples: per-channel moments of the features,
//! moments of the regression targets and counts per label; only these aggregates leave the
//! device.

use pollen_proto::fleet::Statistics;
use pollen_proto::stats::Accumulator;

use super::LocalData;

/// Statistics of `data`'s training examples; `label_names` names class indices.
pub fn statistics(data: &LocalData, label_names: &[String]) -> Statistics {
    let e = &data.examples;
    let channels = e.channels();
    let per_channel = e.width() / channels.max(1);
    let mut features = Accumulator::new(channels);
    let mut row = vec![0.0f64; channels];
    for &i in &data.train {
        let x = e.example(i);
        if e.shape.len() == 1 {
            features.push(x.iter().map(|&v| f64::from(v)));
        } else {
            // Every reading (pixel) of a window (image) is one observation of its channels.
            for p in 0..per_channel {
                for (c, slot) in row.iter_mut().enumerate() {
                    *slot = f64::from(x[c * per_channel + p]);
                }
                features.push(row.iter().copied());
            }
        }
    }
    let targets = e.targets.as_ref().map(|t| {
        let mut acc = Accumulator::new(1);
        for &i in &data.train {
            acc.push([f64::from(t[i])]);
        }
        acc.to_moments()
    });
    let mut label_counts = std::collections::HashMap::new();
    if let Some(labels) = &e.labels {
        for &i in &data.train {
            let name = label_names
                .get(labels[i] as usize)
                .cloned()
                .unwrap_or_else(|| labels[i].to_string());
            *label_counts.entry(name).or_insert(0u64) += 1;
        }
    }
    Statistics {
        num_examples: data.train.len() as u64,
        features: Some(features.to_moments()),
        targets,
        label_counts,
    }
}
