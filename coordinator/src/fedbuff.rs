//! FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"):
//! devices train continuously on whatever model version they were given; the coordinator folds
//! each update's change into a buffer as it arrives, weighted by its staleness, and publishes a
//! new version every `buffer_size` updates. Pure logic over versions and updates: the driver
//! (`driver/fedbuff.rs`) keeps `concurrency` devices training and feeds the answers in.
//!
//! ```text
//! version v:  global_v
//! update from a device that trained on version u <= v:   staleness s = v - u
//!   s > max_staleness  -> dropped (counted)
//!   else               -> buffer += w(s) * (update - global_u),  w(s) = 1 / (1 + s)^exponent
//! after buffer_size updates: global_{v+1} = global_v + server_learning_rate * buffer / buffer_size
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use pollen_proto::Parameters;
use serde::{Deserialize, Serialize};

use crate::records::AsyncRecord;
use crate::strategy::aggregate::{flatten, unflatten};

/// The `[fedbuff]` table of a run spec: the asynchronous run mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedBuffConfig {
    /// K: updates folded into each new model version.
    pub buffer_size: usize,
    /// Devices kept training at once.
    pub concurrency: usize,
    /// Updates trained on a version more than this many versions old are dropped.
    pub max_staleness: u64,
    /// Staleness weight `1 / (1 + s)^staleness_exponent` (0.5: the paper's `1/sqrt(1 + s)`;
    /// 0: every update weighs the same).
    pub staleness_exponent: f64,
    /// Server step size on the buffered mean change.
    pub server_learning_rate: f64,
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        Self {
            buffer_size: 10,
            concurrency: 20,
            max_staleness: 10,
            staleness_exponent: 0.5,
            server_learning_rate: 1.0,
        }
    }
}

impl FedBuffConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer_size == 0 {
            return Err("fedbuff.buffer_size must be at least 1".into());
        }
        if self.concurrency == 0 {
            return Err("fedbuff.concurrency must be at least 1".into());
        }
        if !(self.staleness_exponent.is_finite() && self.staleness_exponent >= 0.0) {
            return Err(format!(
                "fedbuff.staleness_exponent = {} must be 0 or a positive number",
                self.staleness_exponent
            ));
        }
        if !(self.server_learning_rate.is_finite() && self.server_learning_rate > 0.0) {
            return Err(format!(
                "fedbuff.server_learning_rate = {} must be a positive number",
                self.server_learning_rate
            ));
        }
        Ok(())
    }

    /// The weight of an update `staleness` versions old.
    pub fn weight(&self, staleness: u64) -> f64 {
        (1.0 + staleness as f64).powf(-self.staleness_exponent)
    }
}

/// What became of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take {
    /// Folded with this staleness and weight.
    Folded { staleness: u64, weight: f64 },
    /// Trained on a version older than the limit: dropped.
    Stale { staleness: u64 },
    /// Trained on a version this buffer never published (or from the future): refused.
    UnknownVersion,
    /// Not the model's shapes.
    Mismatch,
}

/// The buffer, the current version and the versions in-flight work may still be based on.
#[derive(Debug)]
pub struct Buffer {
    config: FedBuffConfig,
    version: u64,
    /// Published versions not yet too stale to matter, oldest first.
    models: BTreeMap<u64, Arc<Parameters>>,
    sum: Vec<f64>,
    count: usize,
    staleness_sum: u64,
    staleness_max: u64,
    dropped_stale: usize,
}

impl Buffer {
    /// Starts at version 0 with `initial`.
    pub fn new(config: FedBuffConfig, initial: Arc<Parameters>) -> Self {
        let sum = vec![0.0; initial.num_params()];
        Self {
            config,
            version: 0,
            models: BTreeMap::from([(0, initial)]),
            sum,
            count: 0,
            staleness_sum: 0,
            staleness_max: 0,
            dropped_stale: 0,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn config(&self) -> &FedBuffConfig {
        &self.config
    }

    /// The current global model.
    pub fn global(&self) -> &Arc<Parameters> {
        // The current version is always kept.
        &self.models[&self.version]
    }

    /// Updates folded since the last version.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the buffer holds `buffer_size` updates: time to publish.
    pub fn is_full(&self) -> bool {
        self.count >= self.config.buffer_size
    }

    /// Folds `update`, trained on version `trained_on`, if it is fresh enough.
    pub fn take(&mut self, trained_on: u64, update: &Parameters) -> Take {
        if trained_on > self.version {
            return Take::UnknownVersion;
        }
        let staleness = self.version - trained_on;
        if staleness > self.config.max_staleness {
            self.dropped_stale += 1;
            return Take::Stale { staleness };
        }
        let Some(base) = self.models.get(&trained_on) else {
            return Take::UnknownVersion;
        };
        if base.specs() != update.specs() {
            return Take::Mismatch;
        }
        let weight = self.config.weight(staleness);
        let mut at = 0;
        for (b, u) in base.tensors.iter().zip(&update.tensors) {
            for (b, u) in b.data.iter().zip(&u.data) {
                self.sum[at] += weight * (f64::from(*u) - f64::from(*b));
                at += 1;
            }
        }
        self.count += 1;
        self.staleness_sum += staleness;
        self.staleness_max = self.staleness_max.max(staleness);
        Take::Folded { staleness, weight }
    }

    /// Publishes the next version from the buffer (empty or not) and starts a new buffer.
    /// Returns the new model and what went into it; `in_flight` is recorded as given.
    pub fn publish(&mut self, in_flight: usize) -> (Arc<Parameters>, AsyncRecord) {
        let current = self.global().clone();
        let step = if self.count == 0 {
            0.0
        } else {
            self.config.server_learning_rate / self.count as f64
        };
        let mut flat = flatten(&current);
        for (w, d) in flat.iter_mut().zip(&self.sum) {
            *w = (f64::from(*w) + step * d) as f32;
        }
        let next = Arc::new(unflatten(&current, &flat));
        let record = AsyncRecord {
            mean_staleness: if self.count == 0 {
                0.0
            } else {
                self.staleness_sum as f64 / self.count as f64
            },
            max_staleness: self.staleness_max,
            dropped_stale: self.dropped_stale,
            in_flight,
        };
        self.version += 1;
        self.models.insert(self.version, next.clone());
        let oldest = self.version.saturating_sub(self.config.max_staleness);
        self.models.retain(|v, _| *v >= oldest);
        self.sum.iter_mut().for_each(|v| *v = 0.0);
        self.count = 0;
        self.staleness_sum = 0;
        self.staleness_max = 0;
        self.dropped_stale = 0;
        (next, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_proto::NamedTensor;

    fn model(v: f32) -> Parameters {
        Parameters::new(vec![NamedTensor::new("w", vec![2], vec![v, -v])]).expect("valid")
    }

    fn config(k: usize, max_staleness: u64) -> FedBuffConfig {
        FedBuffConfig {
            buffer_size: k,
            concurrency: 4,
            max_staleness,
            staleness_exponent: 0.5,
            server_learning_rate: 1.0,
        }
    }

    #[test]
    fn fresh_updates_average_into_the_next_version() {
        let mut b = Buffer::new(config(2, 5), Arc::new(model(0.0)));
        assert_eq!(
            b.take(0, &model(1.0)),
            Take::Folded {
                staleness: 0,
                weight: 1.0
            }
        );
        assert!(!b.is_full());
        b.take(0, &model(3.0));
        assert!(b.is_full());
        let (next, record) = b.publish(4);
        // (1 + 3) / 2 = 2 on w[0], -2 on w[1].
        assert_eq!(next.tensors[0].data, vec![2.0, -2.0]);
        assert_eq!(b.version(), 1);
        assert_eq!((record.mean_staleness, record.max_staleness), (0.0, 0));
        assert_eq!(record.in_flight, 4);
        assert!(b.is_empty());
    }

    #[test]
    fn a_stale_update_counts_its_change_from_its_own_version_weighted_by_staleness() {
        let mut b = Buffer::new(config(1, 5), Arc::new(model(0.0)));
        b.take(0, &model(4.0));
        b.publish(0); // version 1 = 4
        b.take(1, &model(5.0));
        b.publish(0); // version 2 = 5
        // Trained on version 0 (w = 0) to w = 3: its change is +3, staleness 2, weight 1/sqrt(3).
        let Take::Folded { staleness, weight } = b.take(0, &model(3.0)) else {
            panic!("folded");
        };
        assert_eq!(staleness, 2);
        assert!((weight - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        let (next, record) = b.publish(0);
        let expected = 5.0 + 3.0 / 3f64.sqrt();
        assert!((f64::from(next.tensors[0].data[0]) - expected).abs() < 1e-5);
        assert_eq!(record.max_staleness, 2);
    }

    #[test]
    fn updates_staler_than_the_limit_are_dropped_and_counted() {
        let mut b = Buffer::new(config(1, 1), Arc::new(model(0.0)));
        for v in 1..=3 {
            b.take(v - 1, &model(v as f32));
            b.publish(0);
        }
        assert_eq!(b.take(1, &model(9.0)), Take::Stale { staleness: 2 });
        assert_eq!(b.take(7, &model(9.0)), Take::UnknownVersion);
        assert!(b.is_empty());
        b.take(3, &model(4.0));
        let (_, record) = b.publish(0);
        assert_eq!(record.dropped_stale, 1);
    }

    #[test]
    fn an_update_of_another_shape_is_refused() {
        let mut b = Buffer::new(config(1, 1), Arc::new(model(0.0)));
        let other =
            Parameters::new(vec![NamedTensor::new("w", vec![3], vec![0.0; 3])]).expect("valid");
        assert_eq!(b.take(0, &other), Take::Mismatch);
        assert!(b.is_empty());
    }

    #[test]
    fn bad_settings_name_the_field() {
        let c = FedBuffConfig {
            buffer_size: 0,
            ..Default::default()
        };
        assert!(c.validate().expect_err("k").contains("buffer_size"));
        let c = FedBuffConfig {
            server_learning_rate: -1.0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .expect_err("lr")
                .contains("server_learning_rate")
        );
    }
}
