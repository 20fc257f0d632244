//! The `[strategy]` table of a run spec: which strategy, with Flower's parameter names and
//! defaults, and what it builds.
//!
//! | `name` | Flower | what differs from FedAvg | its settings (defaults) |
//! | --- | --- | --- | --- |
//! | `fedavg` | `FedAvg` | | |
//! | `fedavgm` | `FedAvgM` | server momentum on the aggregate | `server_learning_rate` (1.0), `server_momentum` (0.0) |
//! | `fedprox` | `FedProx` | devices add `mu/2 * |w - w_global|^2` to their loss | `proximal_mu` (required) |
//! | `fedadam` | `FedAdam` | Adam on the server | `eta` (0.1), `eta_l`, `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-9) |
//! | `fedyogi` | `FedYogi` | Yogi on the server | `eta` (0.01), `eta_l`, `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-3) |
//! | `fedadagrad` | `FedAdagrad` | Adagrad on the server | `eta` (0.1), `eta_l`, `tau` (1e-9) |
//! | `fedmedian` | `FedMedian` | coordinate-wise median | |
//! | `fedtrimmedavg` | `FedTrimmedAvg` | coordinate-wise trimmed mean | `beta` (0.2) |
//! | `krum` | `Krum` | Krum / Multi-Krum | `num_malicious_clients` (0), `num_clients_to_keep` (0: Krum) |
//! | `bulyan` | `Bulyan` | Krum selection + trimmed mean around the median | `num_malicious_clients` (0) |
//!
//! Every strategy also takes Flower's sampling settings (`fraction_fit`, `fraction_evaluate`,
//! `min_fit_clients`, `min_evaluate_clients`, `min_available_clients`, `accept_failures`) and
//! Pollen's `close_after` (close a round once this many results are in, so that sampling more
//! over-selects) and `norm_bound` (clip every update's change to this L2 norm). `eta_l`, the
//! client learning rate of the FedOpt family, overrides `train.learning_rate` when given. A
//! setting that belongs to another strategy is refused with the strategies it belongs to.

use serde::{Deserialize, Serialize};

use super::aggregate::Rule;
use super::fedavg::FedAvgConfig;
use super::server_opt::{self, ServerOptimizer};

/// The strategies a spec can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    Fedavg,
    Fedavgm,
    Fedprox,
    Fedadam,
    Fedyogi,
    Fedadagrad,
    Fedmedian,
    Fedtrimmedavg,
    Krum,
    Bulyan,
}

impl StrategyName {
    pub const ALL: [StrategyName; 10] = [
        StrategyName::Fedavg,
        StrategyName::Fedavgm,
        StrategyName::Fedprox,
        StrategyName::Fedadam,
        StrategyName::Fedyogi,
        StrategyName::Fedadagrad,
        StrategyName::Fedmedian,
        StrategyName::Fedtrimmedavg,
        StrategyName::Krum,
        StrategyName::Bulyan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StrategyName::Fedavg => "fedavg",
            StrategyName::Fedavgm => "fedavgm",
            StrategyName::Fedprox => "fedprox",
            StrategyName::Fedadam => "fedadam",
            StrategyName::Fedyogi => "fedyogi",
            StrategyName::Fedadagrad => "fedadagrad",
            StrategyName::Fedmedian => "fedmedian",
            StrategyName::Fedtrimmedavg => "fedtrimmedavg",
            StrategyName::Krum => "krum",
            StrategyName::Bulyan => "bulyan",
        }
    }

    /// Whether the strategy combines updates with a robust rule (it keeps every update of a
    /// round in memory, and weighs clients equally).
    pub fn is_robust(self) -> bool {
        matches!(
            self,
            StrategyName::Fedmedian
                | StrategyName::Fedtrimmedavg
                | StrategyName::Krum
                | StrategyName::Bulyan
        )
    }
}

fn d_fraction_fit() -> f64 {
    FedAvgConfig::default().fraction_fit
}
fn d_fraction_evaluate() -> f64 {
    FedAvgConfig::default().fraction_evaluate
}
fn d_min_fit() -> usize {
    FedAvgConfig::default().min_fit_clients
}
fn d_min_evaluate() -> usize {
    FedAvgConfig::default().min_evaluate_clients
}
fn d_min_available() -> usize {
    FedAvgConfig::default().min_available_clients
}
fn d_true() -> bool {
    true
}

/// The `[strategy]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    pub name: StrategyName,
    #[serde(default = "d_fraction_fit")]
    pub fraction_fit: f64,
    #[serde(default = "d_fraction_evaluate")]
    pub fraction_evaluate: f64,
    #[serde(default = "d_min_fit")]
    pub min_fit_clients: usize,
    #[serde(default = "d_min_evaluate")]
    pub min_evaluate_clients: usize,
    #[serde(default = "d_min_available")]
    pub min_available_clients: usize,
    #[serde(default = "d_true")]
    pub accept_failures: bool,
    /// Close a fit round once this many results are in; sample more to over-select.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_after: Option<usize>,
    /// Clip every update's change to the global model to this L2 norm before folding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
    // Strategy settings, Flower's names; `None` means the strategy's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proximal_mu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_l: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_malicious_clients: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_clients_to_keep: Option<usize>,
}

impl StrategyConfig {
    /// FedAvg with Flower's defaults.
    pub fn fedavg() -> Self {
        Self::named(StrategyName::Fedavg)
    }

    /// `name` with every setting at its default.
    pub fn named(name: StrategyName) -> Self {
        let d = FedAvgConfig::default();
        Self {
            name,
            fraction_fit: d.fraction_fit,
            fraction_evaluate: d.fraction_evaluate,
            min_fit_clients: d.min_fit_clients,
            min_evaluate_clients: d.min_evaluate_clients,
            min_available_clients: d.min_available_clients,
            accept_failures: d.accept_failures,
            close_after: None,
            norm_bound: None,
            server_learning_rate: None,
            server_momentum: None,
            proximal_mu: None,
            eta: None,
            eta_l: None,
            beta_1: None,
            beta_2: None,
            tau: None,
            beta: None,
            num_malicious_clients: None,
            num_clients_to_keep: None,
        }
    }

    /// Flower's sampling and failure settings.
    pub fn sampling(&self) -> FedAvgConfig {
        FedAvgConfig {
            fraction_fit: self.fraction_fit,
            fraction_evaluate: self.fraction_evaluate,
            min_fit_clients: self.min_fit_clients,
            min_evaluate_clients: self.min_evaluate_clients,
            min_available_clients: self.min_available_clients,
            accept_failures: self.accept_failures,
        }
    }

    /// The strategy settings that are set, by name.
    fn settings(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("server_learning_rate", self.server_learning_rate.is_some()),
            ("server_momentum", self.server_momentum.is_some()),
            ("proximal_mu", self.proximal_mu.is_some()),
            ("eta", self.eta.is_some()),
            ("eta_l", self.eta_l.is_some()),
            ("beta_1", self.beta_1.is_some()),
            ("beta_2", self.beta_2.is_some()),
            ("tau", self.tau.is_some()),
            ("beta", self.beta.is_some()),
            (
                "num_malicious_clients",
                self.num_malicious_clients.is_some(),
            ),
            ("num_clients_to_keep", self.num_clients_to_keep.is_some()),
        ]
    }

    /// The settings `name` reads.
    pub fn settings_of(name: StrategyName) -> &'static [&'static str] {
        match name {
            StrategyName::Fedavg | StrategyName::Fedmedian => &[],
            StrategyName::Fedavgm => &["server_learning_rate", "server_momentum"],
            StrategyName::Fedprox => &["proximal_mu"],
            StrategyName::Fedadam | StrategyName::Fedyogi => {
                &["eta", "eta_l", "beta_1", "beta_2", "tau"]
            }
            StrategyName::Fedadagrad => &["eta", "eta_l", "tau"],
            StrategyName::Fedtrimmedavg => &["beta"],
            StrategyName::Krum => &["num_malicious_clients", "num_clients_to_keep"],
            StrategyName::Bulyan => &["num_malicious_clients"],
        }
    }

    /// Checks the sampling settings, that every strategy setting given belongs to `name`, and
    /// the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.sampling().validate()?;
        let own = Self::settings_of(self.name);
        for (field, set) in self.settings() {
            if set && !own.contains(&field) {
                let owners: Vec<&str> = StrategyName::ALL
                    .iter()
                    .filter(|n| Self::settings_of(**n).contains(&field))
                    .map(|n| n.as_str())
                    .collect();
                return Err(format!(
                    "strategy.{field} is a setting of {}, not of {}{}",
                    owners.join(", "),
                    self.name.as_str(),
                    if own.is_empty() {
                        String::from(" (which has none)")
                    } else {
                        format!(" (which has {})", own.join(", "))
                    }
                ));
            }
        }
        if self.close_after == Some(0) {
            return Err("strategy.close_after must be at least 1 (or left out)".into());
        }
        if let Some(k) = self.close_after
            && k < self.min_fit_clients
        {
            return Err(format!(
                "strategy.close_after = {k} would close rounds below min_fit_clients = {}",
                self.min_fit_clients
            ));
        }
        positive("norm_bound", self.norm_bound)?;
        positive("eta", self.eta)?;
        positive("eta_l", self.eta_l)?;
        positive("tau", self.tau)?;
        positive("server_learning_rate", self.server_learning_rate)?;
        unit_interval("server_momentum", self.server_momentum)?;
        unit_interval("beta_1", self.beta_1)?;
        unit_interval("beta_2", self.beta_2)?;
        if let Some(mu) = self.proximal_mu
            && !(mu.is_finite() && mu >= 0.0)
        {
            return Err(format!(
                "strategy.proximal_mu = {mu} must be 0 or a positive number"
            ));
        }
        if self.name == StrategyName::Fedprox && self.proximal_mu.is_none() {
            return Err(
                "strategy fedprox needs proximal_mu (Flower has no default; 0.01 to 1 are usual)"
                    .into(),
            );
        }
        if let Some(beta) = self.beta
            && !(0.0..0.5).contains(&beta)
        {
            return Err(format!(
                "strategy.beta = {beta} must be at least 0 and below 0.5 (the fraction cut from each end)"
            ));
        }
        self.server_optimizer().map(drop)
    }

    /// The aggregation rule.
    pub fn rule(&self) -> Rule {
        let f = self.num_malicious_clients.unwrap_or(0);
        match self.name {
            StrategyName::Fedmedian => Rule::Median,
            StrategyName::Fedtrimmedavg => Rule::TrimmedMean {
                beta: self.beta.unwrap_or(0.2),
            },
            StrategyName::Krum => Rule::Krum {
                num_malicious: f,
                to_keep: self.num_clients_to_keep.unwrap_or(0),
            },
            StrategyName::Bulyan => Rule::Bulyan { num_malicious: f },
            _ => Rule::WeightedMean,
        }
    }

    /// The server optimizer, for the strategies that have one.
    pub fn server_optimizer(&self) -> Result<Option<Box<dyn ServerOptimizer>>, String> {
        server_opt::build(self)
    }
}

fn positive(field: &str, value: Option<f64>) -> Result<(), String> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(format!("strategy.{field} = {v} must be a positive number"))
        }
        _ => Ok(()),
    }
}

fn unit_interval(field: &str, value: Option<f64>) -> Result<(), String> {
    match value {
        Some(v) if !(0.0..1.0).contains(&v) => Err(format!(
            "strategy.{field} = {v} must be at least 0 and below 1"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StrategyConfig, String> {
        let c: StrategyConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn every_strategy_parses_with_its_defaults() {
        for name in StrategyName::ALL {
            let extra = if name == StrategyName::Fedprox {
                "proximal_mu = 0.1\n"
            } else {
                ""
            };
            let c = parse(&format!("name = \"{}\"\n{extra}", name.as_str()))
                .unwrap_or_else(|e| panic!("{}: {e}", name.as_str()));
            assert_eq!(c.name, name);
            assert_eq!(c.sampling(), FedAvgConfig::default());
        }
    }

    #[test]
    fn a_setting_of_another_strategy_is_refused_with_its_owners() {
        let e = parse("name = \"fedavg\"\neta = 0.1\n").expect_err("eta");
        assert!(
            e.contains("strategy.eta") && e.contains("fedadam") && e.contains("fedavg"),
            "{e}"
        );
        let e = parse("name = \"krum\"\nbeta = 0.1\n").expect_err("beta");
        assert!(e.contains("fedtrimmedavg"), "{e}");
        let e = parse("name = \"fedprox\"\n").expect_err("mu");
        assert!(e.contains("proximal_mu"), "{e}");
        let e = parse("name = \"fedavg\"\nclose_after = 1\nmin_fit_clients = 2\n")
            .expect_err("close below quorum");
        assert!(e.contains("close_after"), "{e}");
        let e = parse("name = \"fedtrimmedavg\"\nbeta = 0.5\n").expect_err("beta");
        assert!(e.contains("strategy.beta"), "{e}");
    }

    #[test]
    fn names_choose_rules() {
        let mut c = StrategyConfig::named(StrategyName::Krum);
        c.num_malicious_clients = Some(2);
        c.num_clients_to_keep = Some(3);
        assert_eq!(
            c.rule(),
            Rule::Krum {
                num_malicious: 2,
                to_keep: 3
            }
        );
        assert_eq!(
            StrategyConfig::named(StrategyName::Fedtrimmedavg).rule(),
            Rule::TrimmedMean { beta: 0.2 }
        );
        assert_eq!(StrategyConfig::fedavg().rule(), Rule::WeightedMean);
    }
}
