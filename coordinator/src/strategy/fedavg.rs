//! FedAvg (McMahan et al., 2017): the new global model is the average of the clients' models,
//! weighted by their number of training examples; and the base the other built-in strategies
//! are assembled from (see [`super::config`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use pollen_proto::{Parameters, scalar, scalar::ScalarMap};
use rand::{RngCore, seq::index::sample};

use super::aggregate::{Folding, Rule, RuleAggregator, flatten, unflatten};
use super::server_opt::ServerOptimizer;
use crate::privacy::{CentralDp, LocalDp};
use crate::strategy::{
    ClientFailure, ClientInfo, EvaluateSummary, Evaluation, FitAggregator, FitSummary, Instruction,
    PrivacySpent, Strategy, StrategyError,
};

/// Server-side evaluation of a global model (Flower's `evaluate_fn`).
pub type EvaluateFn = Box<dyn FnMut(u64, &Parameters) -> Option<Evaluation> + Send>;

/// Combines clients' evaluation metrics, `(examples, metrics)` each (Flower's
/// `evaluate_metrics_aggregation_fn`); the default weights every entry by examples.
pub type MetricsAggregationFn =
    Box<dyn Fn(&[(u64, &BTreeMap<String, f64>)]) -> BTreeMap<String, f64> + Send>;

/// FedAvg's knobs, with Flower's names and meanings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAvgConfig {
    /// Fraction of available clients sampled for training each round.
    pub fraction_fit: f64,
    /// Fraction of available clients sampled for federated evaluation (0 disables it).
    pub fraction_evaluate: f64,
    /// Never sample fewer than this many clients for training; also the round's quorum.
    pub min_fit_clients: usize,
    /// Never sample fewer than this many clients for federated evaluation.
    pub min_evaluate_clients: usize,
    /// Do not start a round with fewer clients connected than this.
    pub min_available_clients: usize,
    /// When false, any failure in a round fails the round.
    pub accept_failures: bool,
}

impl Default for FedAvgConfig {
    fn default() -> Self {
        Self {
            fraction_fit: 0.1,
            fraction_evaluate: 0.0,
            min_fit_clients: 2,
            min_evaluate_clients: 2,
            min_available_clients: 2,
            accept_failures: true,
        }
    }
}

impl FedAvgConfig {
    /// Checks ranges; the message names the field and the allowed values.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.fraction_fit > 0.0 && self.fraction_fit <= 1.0) {
            return Err(format!(
                "strategy.fraction_fit = {} must be in (0, 1]",
                self.fraction_fit
            ));
        }
        if !(0.0..=1.0).contains(&self.fraction_evaluate) {
            return Err(format!(
                "strategy.fraction_evaluate = {} must be in [0, 1]",
                self.fraction_evaluate
            ));
        }
        if self.min_fit_clients == 0 {
            return Err("strategy.min_fit_clients must be at least 1".into());
        }
        if self.min_available_clients < self.min_fit_clients {
            return Err(format!(
                "strategy.min_available_clients = {} is below min_fit_clients = {}",
                self.min_available_clients, self.min_fit_clients
            ));
        }
        Ok(())
    }

    /// Flower's arithmetic: `max(floor(available * fraction_fit), min_fit_clients)`, capped at
    /// the number available; 0 when fewer than `min_available_clients` are connected.
    pub fn num_fit_clients(&self, available: usize) -> usize {
        sample_size(
            available,
            self.fraction_fit,
            self.min_fit_clients,
            self.min_available_clients,
        )
    }

    /// Same arithmetic for federated evaluation; 0 when `fraction_evaluate` is 0.
    pub fn num_evaluate_clients(&self, available: usize) -> usize {
        if self.fraction_evaluate == 0.0 {
            return 0;
        }
        sample_size(
            available,
            self.fraction_evaluate,
            self.min_evaluate_clients,
            self.min_available_clients,
        )
    }
}

fn sample_size(available: usize, fraction: f64, min: usize, min_available: usize) -> usize {
    if available < min_available.max(1) {
        return 0;
    }
    let n = ((available as f64) * fraction).floor() as usize;
    n.max(min).min(available)
}

/// FedAvg, and the base of every built-in strategy: Flower's sampling and failure rules, an
/// aggregation [`Rule`] (the example-weighted mean by default), and optionally norm bounding of
/// updates, central differential privacy and a server optimizer (FedAvgM, FedAdam, ...), in
/// that order: updates are clipped as they are folded, noise goes on the aggregate, and the
/// optimizer takes the noised aggregate (so its state never sees anything un-noised).
pub struct FedAvg {
    config: FedAvgConfig,
    name: &'static str,
    rule: Rule,
    norm_bound: Option<f64>,
    server: Option<Box<dyn ServerOptimizer>>,
    central_dp: Option<CentralDp>,
    local_dp: Option<LocalDp>,
    initial: Option<Parameters>,
    fit_config: ScalarMap,
    evaluate_config: ScalarMap,
    evaluate_fn: Option<EvaluateFn>,
    evaluate_metrics: Option<MetricsAggregationFn>,
    /// Clients available when the last fit round was sampled (DP's sampling rate).
    last_available: usize,
}

impl FedAvg {
    pub fn new(config: FedAvgConfig) -> Self {
        Self {
            config,
            name: "fedavg",
            rule: Rule::WeightedMean,
            norm_bound: None,
            server: None,
            central_dp: None,
            local_dp: None,
            initial: None,
            fit_config: ScalarMap::new(),
            evaluate_config: ScalarMap::new(),
            evaluate_fn: None,
            evaluate_metrics: None,
            last_available: 0,
        }
    }

    /// The strategy's name in logs and records (Flower's class name, lower-case).
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How updates combine (FedMedian, FedTrimmedAvg, Krum, Bulyan).
    pub fn with_rule(mut self, rule: Rule) -> Self {
        self.rule = rule;
        self
    }

    /// Scales every update's change to the global model down to this L2 norm before it is
    /// folded (norm bounding, Sun et al. 2019).
    pub fn with_norm_bound(mut self, bound: f64) -> Self {
        self.norm_bound = Some(bound);
        self
    }

    /// Applies a server optimizer to each round's aggregate (FedAvgM, FedAdam, ...).
    pub fn with_server_optimizer(mut self, optimizer: Box<dyn ServerOptimizer>) -> Self {
        self.server = Some(optimizer);
        self
    }

    /// Central differential privacy: updates clipped, folded with equal weights, Gaussian noise
    /// on their sum, privacy accounted after every round.
    pub fn with_central_dp(mut self, dp: CentralDp) -> Self {
        self.central_dp = Some(dp);
        self
    }

    /// Local differential privacy: devices clip and noise their own update (the fit config
    /// says how); the strategy only accounts for it.
    pub fn with_local_dp(mut self, dp: LocalDp) -> Self {
        for (k, v) in dp.fit_config() {
            self.fit_config.insert(k, v);
        }
        self.local_dp = Some(dp);
        self
    }

    /// How federated evaluation metrics combine (a task's exact aggregation of sums, say).
    pub fn with_evaluate_metrics_aggregation(mut self, f: MetricsAggregationFn) -> Self {
        self.evaluate_metrics = Some(f);
        self
    }

    /// The initial global model; without it the driver asks a client.
    pub fn with_initial_parameters(mut self, parameters: Parameters) -> Self {
        self.initial = Some(parameters);
        self
    }

    /// Config sent with every fit instruction (the driver adds `round`); entries already set
    /// (FedProx's `proximal_mu`, local DP's settings) are kept unless `config` names them too.
    pub fn with_fit_config(mut self, config: ScalarMap) -> Self {
        for (k, v) in config {
            self.fit_config.insert(k, v);
        }
        self
    }

    pub fn with_evaluate_config(mut self, config: ScalarMap) -> Self {
        self.evaluate_config = config;
        self
    }

    pub fn with_evaluate_fn(mut self, f: EvaluateFn) -> Self {
        self.evaluate_fn = Some(f);
        self
    }

    pub fn config(&self) -> &FedAvgConfig {
        &self.config
    }

    fn instructions(
        n: usize,
        round: u64,
        available: &[ClientInfo],
        base: &ScalarMap,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction> {
        if n == 0 {
            return Vec::new();
        }
        let mut config = base.clone();
        config.insert("round".into(), scalar::int(round as i64));
        let mut picked: Vec<usize> = sample(rng, available.len(), n).into_vec();
        // Sorted so that the same seed and the same fleet give the same order on every run.
        picked.sort_unstable();
        picked
            .into_iter()
            .map(|i| Instruction {
                client_id: available[i].id.clone(),
                config: config.clone(),
            })
            .collect()
    }

    /// What clipping and weighting the round's aggregator applies.
    fn folding(&self) -> Folding {
        let dp_clip = self.central_dp.as_ref().map(CentralDp::clipping_norm);
        let clip = match (self.norm_bound, dp_clip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Folding {
            clip,
            unit_weights: self.central_dp.is_some(),
        }
    }
}

impl Strategy for FedAvg {
    fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.initial.take()
    }

    fn min_available_clients(&self) -> usize {
        self.config.min_available_clients
    }

    fn configure_fit(
        &mut self,
        round: u64,
        _global: &Parameters,
        available: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction> {
        let n = self.config.num_fit_clients(available.len());
        self.last_available = available.len();
        let picked = Self::instructions(n, round, available, &self.fit_config, rng);
        if let Some(local) = self.local_dp.as_mut() {
            // A device spends privacy whenever it trains and releases a noised update, whether
            // or not the update arrives in time: count every instruction.
            for i in &picked {
                local.participated(&i.client_id);
            }
        }
        picked
    }

    fn fit_config(&mut self, round: u64) -> ScalarMap {
        let mut config = self.fit_config.clone();
        config.insert("round".into(), scalar::int(round as i64));
        config
    }

    fn fit_aggregator(&mut self, _round: u64, global: &Arc<Parameters>) -> Box<dyn FitAggregator> {
        Box::new(RuleAggregator::new(
            self.rule.clone(),
            global.clone(),
            self.folding(),
        ))
    }

    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &Parameters,
        aggregator: Box<dyn FitAggregator>,
        results: &[FitSummary],
        failures: &[ClientFailure],
    ) -> Result<(Option<Parameters>, BTreeMap<String, f64>), StrategyError> {
        if !self.config.accept_failures && !failures.is_empty() {
            return Err(StrategyError::FailuresNotAccepted {
                round,
                failures: failures.len(),
            });
        }
        if results.len() < self.config.min_fit_clients {
            return Err(StrategyError::Quorum {
                round,
                got: results.len(),
                min: self.config.min_fit_clients,
            });
        }
        let mut metrics = weighted_metrics(results.iter().map(|r| (r.num_examples, &r.metrics)));
        let folded = aggregator
            .finish()
            .map_err(|message| StrategyError::Aggregation { round, message })?;
        if self.folding().clip.is_some() {
            metrics.insert("clipped".into(), folded.clipped as f64);
        }
        let Some(aggregate) = folded.parameters else {
            return Ok((None, metrics));
        };
        if self.central_dp.is_none() && self.server.is_none() {
            return Ok((Some(aggregate), metrics));
        }
        let current = flatten(global);
        let mut next = flatten(&aggregate);
        if let Some(dp) = self.central_dp.as_mut() {
            let sampled = results.len() + failures.len();
            let rate = sampled as f64 / self.last_available.max(sampled).max(1) as f64;
            next = dp
                .privatize(&current, &next, folded.count, folded.clipped, sampled, rate)
                .map_err(|message| StrategyError::Aggregation { round, message })?;
        }
        if let Some(opt) = self.server.as_mut() {
            next = opt
                .step(round, &current, &next)
                .map_err(|message| StrategyError::Aggregation { round, message })?;
        }
        let next = unflatten(global, &next);
        if let Some((tensor, value)) = first_non_finite(&next) {
            return Err(StrategyError::Aggregation {
                round,
                message: format!(
                    "{} produced a non-finite value ({value}) in {tensor:?}; the model is kept",
                    self.name
                ),
            });
        }
        Ok((Some(next), metrics))
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        _global: &Parameters,
        available: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction> {
        let n = self.config.num_evaluate_clients(available.len());
        Self::instructions(n, round, available, &self.evaluate_config, rng)
    }

    fn aggregate_evaluate(
        &mut self,
        _round: u64,
        results: &[EvaluateSummary],
        failures: &[ClientFailure],
    ) -> Option<Evaluation> {
        if results.is_empty() || (!self.config.accept_failures && !failures.is_empty()) {
            return None;
        }
        let total: u64 = results.iter().map(|r| r.num_examples).sum();
        if total == 0 {
            return None;
        }
        let loss = results
            .iter()
            .map(|r| r.loss * r.num_examples as f64)
            .sum::<f64>()
            / total as f64;
        let metrics = match &self.evaluate_metrics {
            Some(f) => {
                let pairs: Vec<(u64, &BTreeMap<String, f64>)> = results
                    .iter()
                    .map(|r| (r.num_examples, &r.metrics))
                    .collect();
                f(&pairs)
            }
            None => weighted_metrics(results.iter().map(|r| (r.num_examples, &r.metrics))),
        };
        Some(Evaluation { loss, metrics })
    }

    fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<Evaluation> {
        self.evaluate_fn.as_mut().and_then(|f| f(round, parameters))
    }

    fn privacy(&self) -> Option<PrivacySpent> {
        match (&self.central_dp, &self.local_dp) {
            (Some(dp), _) => dp.spent(),
            (None, Some(dp)) => dp.spent(),
            (None, None) => None,
        }
    }
}

/// The first NaN or infinity in `p`, if any.
fn first_non_finite(p: &Parameters) -> Option<(String, f32)> {
    p.tensors.iter().find_map(|t| {
        t.data
            .iter()
            .find(|v| !v.is_finite())
            .map(|v| (t.name.clone(), *v))
    })
}

/// Example-weighted mean of every metric key (a key missing at a client is left out for it).
pub fn weighted_metrics<'a>(
    items: impl Iterator<Item = (u64, &'a BTreeMap<String, f64>)>,
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (n, metrics) in items {
        for (k, v) in metrics {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v * n as f64;
            e.1 += n as f64;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

#[cfg(test)]
mod tests;
