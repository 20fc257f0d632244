//! Run specs: TOML files that say everything a run needs, seed included.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pollen_client::ModelKind;
use pollen_client::partition::Partition;
use pollen_coordinator::FedAvgConfig;
use pollen_proto::scalar::{self, ScalarMap};
use serde::{Deserialize, Serialize};

/// The default spec (`workflows/mnist-2nn.toml`), built in so `pollen simulate` needs no file.
pub const DEFAULT_SPEC: &str = include_str!("../mnist-2nn.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: String,
    pub seed: u64,
    pub rounds: u64,
    pub model: ModelKind,
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    pub data: DataSpec,
    pub strategy: StrategySpec,
    pub train: TrainSpec,
    pub evaluate: EvaluateSpec,
    /// Which devices a run on a real fleet (`pollen run`) selects from the device registry.
    #[serde(default)]
    pub devices: DevicesSpec,
    /// How simulated devices misbehave (`pollen simulate` only).
    #[serde(default)]
    pub simulation: SimulationSpec,
}

/// Unreliable devices, for rehearsing what a real fleet does to a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationSpec {
    /// Fraction of fit commands a simulated device fails (it reports a training error instead
    /// of an update), drawn from the run's seed. 0 by default.
    #[serde(default)]
    pub failure_rate: f64,
}

/// Device selection for runs on a fleet: the most recently seen online devices of `fleet` with
/// at least `min_examples` local examples, up to `count` (all of them when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesSpec {
    #[serde(default = "default_fleet")]
    pub fleet: String,
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub min_examples: u64,
}

fn default_fleet() -> String {
    "default".into()
}

impl Default for DevicesSpec {
    fn default() -> Self {
        Self {
            fleet: default_fleet(),
            count: None,
            min_examples: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Folder with the MNIST IDX files; relative paths are tried from the current directory,
    /// then from the Pollen checkout.
    pub dir: PathBuf,
    /// Number of (simulated) clients the training set is split across.
    pub clients: usize,
    pub partition: Partition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum StrategySpec {
    Fedavg(FedAvgConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub local_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Evaluate the global model on the test set after every round.
    pub centralized: bool,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Evaluate on the first N test examples only (quicker smoke runs); all when absent.
    #[serde(default)]
    pub test_examples: Option<usize>,
}

fn default_eval_batch() -> usize {
    1000
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl RunSpec {
    /// Parses and validates a spec; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let spec: RunSpec = toml::from_str(text).map_err(|source| SpecError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        spec.validate().map_err(|message| SpecError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<(Self, String), SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let spec = Self::parse(&text, &path.display().to_string())?;
        Ok((spec, text))
    }

    pub fn default_spec() -> Self {
        Self::parse(DEFAULT_SPEC, "built-in mnist-2nn.toml").expect("the built-in spec is valid")
    }

    /// Checks values that TOML types alone cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        pollen_proto::topics::validate_id("name", &self.name).map_err(|e| e.to_string())?;
        pollen_proto::topics::validate_id("devices.fleet", &self.devices.fleet)
            .map_err(|e| e.to_string())?;
        if self.devices.count == Some(0) {
            return Err("devices.count must be at least 1 (or left out for all)".into());
        }
        if self.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        if self.data.clients == 0 {
            return Err("data.clients must be at least 1".into());
        }
        if self.round_timeout.is_zero() {
            return Err("round_timeout must be longer than 0s".into());
        }
        let StrategySpec::Fedavg(f) = &self.strategy;
        f.validate()?;
        if f.min_available_clients > self.data.clients {
            return Err(format!(
                "strategy.min_available_clients = {} exceeds data.clients = {}",
                f.min_available_clients, self.data.clients
            ));
        }
        if self.train.local_epochs == 0 || self.train.batch_size == 0 {
            return Err("train.local_epochs and train.batch_size must be at least 1".into());
        }
        if !(self.train.learning_rate.is_finite() && self.train.learning_rate > 0.0) {
            return Err(format!(
                "train.learning_rate = {} must be a positive number",
                self.train.learning_rate
            ));
        }
        if self.evaluate.batch_size == 0 {
            return Err("evaluate.batch_size must be at least 1".into());
        }
        let rate = self.simulation.failure_rate;
        if !(0.0..1.0).contains(&rate) {
            return Err(format!(
                "simulation.failure_rate = {rate} must be at least 0 and below 1"
            ));
        }
        Ok(())
    }

    /// The spec as TOML (what is saved next to the run's records).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunSpec always serializes")
    }

    /// The fit config every sampled client receives.
    pub fn fit_config(&self) -> ScalarMap {
        let mut m = ScalarMap::new();
        m.insert(
            "local_epochs".into(),
            scalar::int(self.train.local_epochs as i64),
        );
        m.insert(
            "batch_size".into(),
            scalar::int(self.train.batch_size as i64),
        );
        m.insert(
            "learning_rate".into(),
            scalar::f64(self.train.learning_rate),
        );
        m
    }

    /// Finds the data folder: as given, or relative to the Pollen checkout.
    pub fn resolve_data_dir(&self) -> PathBuf {
        let dir = &self.data.dir;
        if dir.is_absolute() || dir.exists() {
            return dir.clone();
        }
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        if checkout.exists() {
            checkout
        } else {
            dir.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_spec_is_the_paper_setup() {
        let s = RunSpec::default_spec();
        assert_eq!(s.model, ModelKind::Mnist2nn);
        assert_eq!(s.data.clients, 100);
        assert_eq!(s.data.partition, Partition::Iid);
        let StrategySpec::Fedavg(f) = &s.strategy;
        assert_eq!(f.fraction_fit, 0.1);
        assert_eq!(
            (
                s.train.local_epochs,
                s.train.batch_size,
                s.train.learning_rate
            ),
            (1, 10, 0.1)
        );
        // What is saved with a run parses back to the same spec.
        assert_eq!(
            RunSpec::parse(&s.to_toml(), "saved").expect("round trip"),
            s
        );
    }

    #[test]
    fn shipped_specs_parse() {
        for f in ["mnist-cnn.toml", "mnist-2nn-noniid.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            RunSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn bad_specs_name_the_field() {
        let bad = DEFAULT_SPEC.replace("fraction_fit = 0.1", "fraction_fit = 1.5");
        let e = RunSpec::parse(&bad, "x.toml")
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("x.toml") && e.contains("fraction_fit"), "{e}");
        let bad = DEFAULT_SPEC.replace("batch_size = 10", "batch_sise = 10");
        let e = RunSpec::parse(&bad, "x.toml")
            .expect_err("unknown field")
            .to_string();
        assert!(e.contains("batch_sise"), "{e}");
        let bad = DEFAULT_SPEC.replace("round_timeout = \"60s\"", "round_timeout = \"soon\"");
        assert!(RunSpec::parse(&bad, "x.toml").is_err());
        let bad = format!("{DEFAULT_SPEC}\n[simulation]\nfailure_rate = 1.0\n");
        let e = RunSpec::parse(&bad, "x.toml")
            .expect_err("a device that always fails")
            .to_string();
        assert!(e.contains("simulation.failure_rate"), "{e}");
    }
}
