//! Server-side optimizers that turn a round's aggregate into the next global model, as Flower's
//! strategies do (flwr 1.42.0, `flwr/server/strategy/`; line numbers below are from that
//! release): FedAvgM (Hsu et al., 2019, `fedavgm.py`) and the FedOpt family (Reddi et al.,
//! 2021, "Adaptive Federated Optimization": `fedadagrad.py`, `fedadam.py`, `fedyogi.py`, on
//! `fedopt.py`). The aggregate is the FedAvg of the round (example-weighted); the optimizer
//! treats `aggregate - current` as a pseudo-gradient step and moves `current`. [`build`]
//! makes the optimizer a run spec's `[strategy]` table names.
//!
//! State (momentum, first and second moments) is flat f32 vectors created at the first step
//! with the model's length, as Flower creates its `np.zeros_like` lists then. Arithmetic
//! follows numpy's on float32 arrays with Python-float hyper-parameters (cast to f32, in
//! Flower's order of operations), so FedAvgM, FedAdagrad and FedYogi reproduce Flower's bits.
//! FedAdam's bias-corrected step size is a numpy float64, which makes Flower's new weights
//! float64 under numpy 2; here that update is computed in f64 and rounded to f32 once, so
//! later rounds drift from Flower's in the last bits.
//!
//! Flower's `eta_l` (the clients' learning rate) is stored by the strategies and never used by
//! them; it is kept in the configs for compatibility and validated, nothing more.

use serde::{Deserialize, Serialize};

use super::config::{StrategyConfig, StrategyName};

/// A server optimizer: one step per aggregated round.
pub trait ServerOptimizer: Send {
    /// Moves `current` (the global model the round started from) in place, given the round's
    /// `aggregate`. `server_round` is 1-based, as in Flower; only FedAdam's step size uses it.
    /// An error leaves `current` and the optimizer state unchanged.
    fn step_in_place(
        &mut self,
        server_round: u64,
        current: &mut [f32],
        aggregate: &[f32],
    ) -> Result<(), String>;

    /// The next global model: [`ServerOptimizer::step_in_place`] on a copy of `current`.
    fn step(
        &mut self,
        server_round: u64,
        current: &[f32],
        aggregate: &[f32],
    ) -> Result<Vec<f32>, String> {
        let mut next = current.to_vec();
        self.step_in_place(server_round, &mut next, aggregate)?;
        Ok(next)
    }

    /// How many steps have been taken.
    fn steps(&self) -> u64;
}

/// The server optimizer a `[strategy]` table asks for, its unset settings at Flower's
/// defaults: FedAvgM, FedAdam, FedYogi or FedAdagrad. `None` for the other strategies, and for
/// FedAvgM at rate 1 without momentum, which Flower does not apply (fedavgm.py:117-119, 152).
pub fn build(config: &StrategyConfig) -> Result<Option<Box<dyn ServerOptimizer>>, String> {
    let c = config;
    let optimizer: Box<dyn ServerOptimizer> = match c.name {
        StrategyName::Fedavgm => {
            let d = FedAvgMConfig::default();
            let m = FedAvgMConfig {
                server_learning_rate: c.server_learning_rate.unwrap_or(d.server_learning_rate),
                server_momentum: c.server_momentum.unwrap_or(d.server_momentum),
            };
            m.validate()?;
            if m == d {
                return Ok(None);
            }
            Box::new(FedAvgM::new(m)?)
        }
        StrategyName::Fedadam => {
            let d = FedAdamConfig::default();
            Box::new(FedOpt::adam(&FedAdamConfig {
                eta: c.eta.unwrap_or(d.eta),
                eta_l: c.eta_l.unwrap_or(d.eta_l),
                beta_1: c.beta_1.unwrap_or(d.beta_1),
                beta_2: c.beta_2.unwrap_or(d.beta_2),
                tau: c.tau.unwrap_or(d.tau),
            })?)
        }
        StrategyName::Fedyogi => {
            let d = FedYogiConfig::default();
            Box::new(FedOpt::yogi(&FedYogiConfig {
                eta: c.eta.unwrap_or(d.eta),
                eta_l: c.eta_l.unwrap_or(d.eta_l),
                beta_1: c.beta_1.unwrap_or(d.beta_1),
                beta_2: c.beta_2.unwrap_or(d.beta_2),
                tau: c.tau.unwrap_or(d.tau),
            })?)
        }
        StrategyName::Fedadagrad => {
            let d = FedAdagradConfig::default();
            Box::new(FedOpt::adagrad(&FedAdagradConfig {
                eta: c.eta.unwrap_or(d.eta),
                eta_l: c.eta_l.unwrap_or(d.eta_l),
                tau: c.tau.unwrap_or(d.tau),
            })?)
        }
        _ => return Ok(None),
    };
    Ok(Some(optimizer))
}

/// FedAvgM's knobs, with Flower's names and defaults (fedavgm.py:98-99).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAvgMConfig {
    /// Server-side learning rate.
    pub server_learning_rate: f64,
    /// Server-side momentum factor; 0 disables momentum.
    pub server_momentum: f64,
}

impl Default for FedAvgMConfig {
    fn default() -> Self {
        Self {
            server_learning_rate: 1.0,
            server_momentum: 0.0,
        }
    }
}

impl FedAvgMConfig {
    /// Checks ranges; the message names the field. Flower silently ignores a negative momentum
    /// (fedavgm.py:168 tests `> 0.0`); here it is refused.
    pub fn validate(&self) -> Result<(), String> {
        positive("server_learning_rate", self.server_learning_rate)?;
        unit_interval("server_momentum", self.server_momentum)
    }
}

/// FedAvgM: SGD with heavy-ball momentum on the pseudo-gradient `current - aggregate`
/// (fedavgm.py:152-191): `v = server_momentum * v + g` (`v = g` at the first step; no
/// Nesterov), `current -= server_learning_rate * v`. With the defaults (rate 1, momentum 0)
/// Flower skips the optimizer and returns the aggregate as it is (fedavgm.py:117-119).
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvgM {
    config: FedAvgMConfig,
    momentum: Vec<f32>,
    steps: u64,
}

impl FedAvgM {
    pub fn new(config: FedAvgMConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Self {
            config,
            momentum: Vec::new(),
            steps: 0,
        })
    }

    pub fn config(&self) -> &FedAvgMConfig {
        &self.config
    }

    /// The momentum vector: empty until a step with momentum > 0.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }
}

impl ServerOptimizer for FedAvgM {
    fn step_in_place(
        &mut self,
        _server_round: u64,
        current: &mut [f32],
        aggregate: &[f32],
    ) -> Result<(), String> {
        check_lengths(current, aggregate, &self.momentum)?;
        self.steps += 1;
        let FedAvgMConfig {
            server_learning_rate,
            server_momentum,
        } = self.config;
        if server_learning_rate == 1.0 && server_momentum == 0.0 {
            current.copy_from_slice(aggregate);
            return Ok(());
        }
        let lr = server_learning_rate as f32;
        if server_momentum > 0.0 {
            // Flower keys the first step on `server_round > 1` (legacy, fedavgm.py:169) or on
            // the vector being unset (Message API); the vector's absence is the sturdier test.
            let first = self.momentum.is_empty();
            if first {
                self.momentum.resize(current.len(), 0.0);
            }
            let mu = server_momentum as f32;
            for ((x, &a), v) in current.iter_mut().zip(aggregate).zip(&mut self.momentum) {
                let g = *x - a;
                *v = if first { g } else { mu * *v + g };
                *x -= lr * *v;
            }
        } else {
            for (x, &a) in current.iter_mut().zip(aggregate) {
                *x -= lr * (*x - a);
            }
        }
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

/// FedAdam's knobs, with Flower's names and defaults (fedadam.py:107-111).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAdamConfig {
    /// Server-side learning rate.
    pub eta: f64,
    /// Client-side learning rate (unused by the server, as in Flower).
    pub eta_l: f64,
    /// First-moment decay.
    pub beta_1: f64,
    /// Second-moment decay.
    pub beta_2: f64,
    /// Added to `sqrt(v)`: the degree of adaptivity.
    pub tau: f64,
}

impl Default for FedAdamConfig {
    fn default() -> Self {
        Self {
            eta: 1e-1,
            eta_l: 1e-1,
            beta_1: 0.9,
            beta_2: 0.99,
            // The Message API's `flwr.serverapp.strategy.FedAdam` defaults to 1e-3.
            tau: 1e-9,
        }
    }
}

impl FedAdamConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_fedopt(self.eta, self.eta_l, self.beta_1, self.beta_2, self.tau)
    }
}

/// FedYogi's knobs, with Flower's names and defaults (fedyogi.py:107-111).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedYogiConfig {
    pub eta: f64,
    pub eta_l: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub tau: f64,
}

impl Default for FedYogiConfig {
    fn default() -> Self {
        Self {
            eta: 1e-2,
            eta_l: 0.0316,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }
    }
}

impl FedYogiConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_fedopt(self.eta, self.eta_l, self.beta_1, self.beta_2, self.tau)
    }
}

/// FedAdagrad's knobs, with Flower's names and defaults (fedadagrad.py:103-105). Flower fixes
/// `beta_1 = beta_2 = 0` for it (fedadagrad.py:122-123), so `m` is the latest delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAdagradConfig {
    pub eta: f64,
    pub eta_l: f64,
    pub tau: f64,
}

impl Default for FedAdagradConfig {
    fn default() -> Self {
        Self {
            eta: 1e-1,
            eta_l: 1e-1,
            // The Message API's `flwr.serverapp.strategy.FedAdagrad` defaults to 1e-3.
            tau: 1e-9,
        }
    }
}

impl FedAdagradConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_fedopt(self.eta, self.eta_l, 0.0, 0.0, self.tau)
    }
}

/// Which second-moment rule a [`FedOpt`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedOptRule {
    /// `v += delta^2` (fedadagrad.py:164-166).
    Adagrad,
    /// `v = beta_2 v + (1 - beta_2) delta^2` (fedadam.py:170-173), with a bias-corrected step.
    Adam,
    /// `v -= (1 - beta_2) delta^2 sign(v - delta^2)` (fedyogi.py:170-173).
    Yogi,
}

/// The FedOpt family: with `delta = aggregate - current`,
/// `m = beta_1 m + (1 - beta_1) delta`, `v` by [`FedOptRule`], both starting from zeros at the
/// first step (fedadam.py:160-169), then `current += step * m / (sqrt(v) + tau)`, where
/// `step = eta` for Adagrad and Yogi, and for Adam the bias-corrected
/// `eta * sqrt(1 - beta_2^(r + 1)) / (1 - beta_1^(r + 1))` with `r` the server round
/// (fedadam.py:179-183: the exponent is `server_round + 1`, not the step count).
#[derive(Debug, Clone, PartialEq)]
pub struct FedOpt {
    rule: FedOptRule,
    eta: f64,
    beta_1: f64,
    beta_2: f64,
    tau: f64,
    m: Vec<f32>,
    v: Vec<f32>,
    steps: u64,
}

impl FedOpt {
    pub fn adam(c: &FedAdamConfig) -> Result<Self, String> {
        c.validate()?;
        Ok(Self::with(
            FedOptRule::Adam,
            c.eta,
            c.beta_1,
            c.beta_2,
            c.tau,
        ))
    }

    pub fn yogi(c: &FedYogiConfig) -> Result<Self, String> {
        c.validate()?;
        Ok(Self::with(
            FedOptRule::Yogi,
            c.eta,
            c.beta_1,
            c.beta_2,
            c.tau,
        ))
    }

    pub fn adagrad(c: &FedAdagradConfig) -> Result<Self, String> {
        c.validate()?;
        Ok(Self::with(FedOptRule::Adagrad, c.eta, 0.0, 0.0, c.tau))
    }

    fn with(rule: FedOptRule, eta: f64, beta_1: f64, beta_2: f64, tau: f64) -> Self {
        Self {
            rule,
            eta,
            beta_1,
            beta_2,
            tau,
            m: Vec::new(),
            v: Vec::new(),
            steps: 0,
        }
    }

    pub fn rule(&self) -> FedOptRule {
        self.rule
    }

    /// `m`: empty before the first step.
    pub fn first_moment(&self) -> &[f32] {
        &self.m
    }

    /// `v`: empty before the first step.
    pub fn second_moment(&self) -> &[f32] {
        &self.v
    }

    /// The factor applied to `m / (sqrt(v) + tau)` in `server_round`.
    pub fn step_size(&self, server_round: u64) -> f64 {
        match self.rule {
            FedOptRule::Adam => {
                let r = server_round as f64 + 1.0;
                self.eta * (1.0 - self.beta_2.powf(r)).sqrt() / (1.0 - self.beta_1.powf(r))
            }
            FedOptRule::Adagrad | FedOptRule::Yogi => self.eta,
        }
    }
}

impl ServerOptimizer for FedOpt {
    fn step_in_place(
        &mut self,
        server_round: u64,
        current: &mut [f32],
        aggregate: &[f32],
    ) -> Result<(), String> {
        check_lengths(current, aggregate, &self.m)?;
        if self.m.is_empty() {
            self.m.resize(current.len(), 0.0);
            self.v.resize(current.len(), 0.0);
        }
        self.steps += 1;
        // numpy casts the Python floats to float32 against float32 arrays.
        let (b1, one_minus_b1) = (self.beta_1 as f32, (1.0 - self.beta_1) as f32);
        let (b2, one_minus_b2) = (self.beta_2 as f32, (1.0 - self.beta_2) as f32);
        let (tau, eta) = (self.tau as f32, self.eta as f32);
        let adam_step = self.step_size(server_round);
        let states = self.m.iter_mut().zip(self.v.iter_mut());
        for ((x, &a), (m, v)) in current.iter_mut().zip(aggregate).zip(states) {
            let delta = a - *x;
            *m = b1 * *m + one_minus_b1 * delta;
            let delta2 = delta * delta;
            *v = match self.rule {
                FedOptRule::Adagrad => *v + delta2,
                FedOptRule::Adam => b2 * *v + one_minus_b2 * delta2,
                FedOptRule::Yogi => *v - one_minus_b2 * delta2 * sign(*v - delta2),
            };
            let denominator = v.sqrt() + tau;
            *x = match self.rule {
                // `eta_norm` is a numpy float64 (fedadam.py:186): the update is float64.
                FedOptRule::Adam => {
                    (f64::from(*x) + adam_step * f64::from(*m) / f64::from(denominator)) as f32
                }
                FedOptRule::Adagrad | FedOptRule::Yogi => *x + eta * *m / denominator,
            };
        }
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

/// `np.sign`: 0 for zero, NaN for NaN (`f32::signum` gives 1 for +0).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x
    }
}

fn check_lengths(current: &[f32], aggregate: &[f32], state: &[f32]) -> Result<(), String> {
    if aggregate.len() != current.len() {
        return Err(format!(
            "aggregate has {} values, current has {}",
            aggregate.len(),
            current.len()
        ));
    }
    if !state.is_empty() && state.len() != current.len() {
        return Err(format!(
            "current has {} values, the optimizer state has {}",
            current.len(),
            state.len()
        ));
    }
    Ok(())
}

fn validate_fedopt(eta: f64, eta_l: f64, beta_1: f64, beta_2: f64, tau: f64) -> Result<(), String> {
    positive("eta", eta)?;
    positive("eta_l", eta_l)?;
    unit_interval("beta_1", beta_1)?;
    unit_interval("beta_2", beta_2)?;
    positive("tau", tau)
}

fn positive(name: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "strategy.{name} = {value} must be a finite number > 0"
        ))
    }
}

fn unit_interval(name: &str, value: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("strategy.{name} = {value} must be in [0, 1)"))
    }
}

#[cfg(test)]
mod tests;
