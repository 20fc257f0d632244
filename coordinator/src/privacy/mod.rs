//! Differential privacy for federated rounds: what the `[privacy]` table of a run spec asks
//! for, central DP applied at aggregation, local DP applied on the devices, and the Rényi-DP
//! accountant both report through.
//!
//! - **Central** (DP-FedAvg, McMahan et al. 2018; Flower's
//!   `DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`): each update's change to the
//!   global model is clipped to L2 norm `C`, the clipped changes are summed with equal weights,
//!   Gaussian noise of standard deviation `z * C` is added to the sum, and the result is divided
//!   by the number of clients sampled (a fixed denominator, so that one client moves the average
//!   by at most `C / n`). Adaptive clipping (Andrew et al. 2021) moves `C` each round towards the
//!   `target_clipped_quantile` of update norms, using a noised count of unclipped updates, and
//!   splits the noise budget between the two releases.
//! - **Local** (Flower's `LocalDpMod`): each device clips its own change to `C` and adds noise
//!   of standard deviation `z * C` before uploading; the coordinator never sees an un-noised
//!   update. Devices read the settings from the fit config (`local_dp_clip`, `local_dp_noise`).
//!
//! Epsilon is reported for the spec's `delta` after every round: for central DP by composing
//! the subsampled Gaussian mechanism over rounds (sampling rate = clients sampled / clients
//! available; Pollen samples without replacement, the accountant assumes Poisson sampling, as
//! TF Privacy and Opacus do), for local DP by composing the Gaussian mechanism over the most
//! rounds any one device took part in (no amplification: the coordinator knows who took part).
//!
//! Noise comes from a generator seeded by the operating system, never from the run's seed: a
//! reader of the spec could otherwise subtract it.

use std::collections::HashMap;

use pollen_proto::scalar::{self, ScalarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::strategy::PrivacySpent;

pub mod accountant;

pub use accountant::RdpAccountant;

/// Where the noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    Central,
    Local,
}

/// Adaptive clipping's knobs, with Flower's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveClipping {
    /// The quantile of update norms the clipping norm moves towards.
    pub target_clipped_quantile: f64,
    /// Geometric learning rate of the clipping norm.
    pub clip_norm_lr: f64,
    /// Standard deviation of the noise on the count of unclipped updates; `None`: the number
    /// of sampled clients / 20, as Flower.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clipped_count_stddev: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_clipped_quantile: 0.5,
            clip_norm_lr: 0.2,
            clipped_count_stddev: None,
        }
    }
}

/// The `[privacy]` table of a run spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    pub mechanism: Mechanism,
    /// `z`: noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// `C`: L2 bound on each update's change to the global model (the starting value with
    /// adaptive clipping).
    pub clipping_norm: f64,
    /// Epsilon is reported for this delta.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Central DP only: move the clipping norm towards a quantile of the update norms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveClipping>,
}

fn default_delta() -> f64 {
    1e-5
}

impl PrivacyConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(format!(
                "privacy.noise_multiplier = {} must be 0 or a positive number",
                self.noise_multiplier
            ));
        }
        if !(self.clipping_norm.is_finite() && self.clipping_norm > 0.0) {
            return Err(format!(
                "privacy.clipping_norm = {} must be a positive number",
                self.clipping_norm
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "privacy.delta = {} must be between 0 and 1",
                self.delta
            ));
        }
        if let Some(a) = &self.adaptive {
            if self.mechanism == Mechanism::Local {
                return Err(
                    "privacy.adaptive is central DP's: devices cannot learn a shared clipping norm"
                        .into(),
                );
            }
            if !(a.target_clipped_quantile > 0.0 && a.target_clipped_quantile < 1.0) {
                return Err(format!(
                    "privacy.adaptive.target_clipped_quantile = {} must be between 0 and 1",
                    a.target_clipped_quantile
                ));
            }
            if !(a.clip_norm_lr.is_finite() && a.clip_norm_lr > 0.0) {
                return Err(format!(
                    "privacy.adaptive.clip_norm_lr = {} must be a positive number",
                    a.clip_norm_lr
                ));
            }
            if let Some(s) = a.clipped_count_stddev
                && !(s.is_finite() && s > 0.0)
            {
                return Err(format!(
                    "privacy.adaptive.clipped_count_stddev = {s} must be a positive number"
                ));
            }
        }
        Ok(())
    }
}

/// Central DP's state: the clipping norm, the accountant and the noise source.
#[derive(Debug)]
pub struct CentralDp {
    config: PrivacyConfig,
    clip: f64,
    accountant: RdpAccountant,
    rng: ChaCha20Rng,
    steps: u64,
}

impl CentralDp {
    pub fn new(config: PrivacyConfig) -> Self {
        Self {
            clip: config.clipping_norm,
            config,
            accountant: RdpAccountant::new(),
            rng: ChaCha20Rng::from_os_rng(),
            steps: 0,
        }
    }

    /// A generator seeded by the caller: tests only (the noise must be unknowable in a run).
    #[cfg(test)]
    pub fn seeded(config: PrivacyConfig, seed: u64) -> Self {
        let mut dp = Self::new(config);
        dp.rng = ChaCha20Rng::seed_from_u64(seed);
        dp
    }

    /// The norm updates are clipped to this round.
    pub fn clipping_norm(&self) -> f64 {
        self.clip
    }

    /// The noise multiplier on the updates: all of `z` with a fixed clipping norm; with
    /// adaptive clipping, what is left once the count's noise has its share (Andrew et al.
    /// 2021, Theorem 1; Flower's `noise_multiplier_delta`).
    fn update_noise_multiplier(&self, sampled: usize) -> Result<f64, String> {
        let z = self.config.noise_multiplier;
        let Some(adaptive) = &self.config.adaptive else {
            return Ok(z);
        };
        if z == 0.0 {
            return Ok(0.0);
        }
        let sigma_b = count_stddev(adaptive, sampled);
        let rest = z.powi(-2) - (2.0 * sigma_b).powi(-2);
        if rest <= 0.0 {
            return Err(format!(
                "privacy.noise_multiplier = {z} is too small for a clipped-count noise of {sigma_b}: raise one of them"
            ));
        }
        Ok(rest.powf(-0.5))
    }

    /// The noised average: `current + (sum of clipped deltas + N(0, (z C)^2)) / sampled`.
    /// `mean` is the equal-weight mean of the `folded` clipped client models, `clipped` of them
    /// were scaled down; `rate` is the round's sampling rate for the accountant.
    pub fn privatize(
        &mut self,
        current: &[f32],
        mean: &[f32],
        folded: usize,
        clipped: usize,
        sampled: usize,
        rate: f64,
    ) -> Result<Vec<f32>, String> {
        let n = sampled.max(folded).max(1) as f64;
        let z_delta = self.update_noise_multiplier(sampled)?;
        let std = z_delta * self.clip;
        let noise = Normal::new(0.0f64, std.max(f64::MIN_POSITIVE))
            .map_err(|e| format!("noise of standard deviation {std}: {e}"))?;
        let mut out = Vec::with_capacity(current.len());
        for (c, m) in current.iter().zip(mean) {
            let sum = (f64::from(*m) - f64::from(*c)) * folded as f64;
            let noised = if std > 0.0 {
                sum + noise.sample(&mut self.rng)
            } else {
                sum
            };
            out.push((f64::from(*c) + noised / n) as f32);
        }
        if let Some(adaptive) = self.config.adaptive.clone() {
            // The count of updates the norm did not have to clip, noised, moves the norm.
            let sigma_b = count_stddev(&adaptive, sampled);
            let below = (folded - clipped.min(folded)) as f64;
            let noisy = below
                + Normal::new(0.0, sigma_b)
                    .map_err(|e| format!("clipped-count noise {sigma_b}: {e}"))?
                    .sample(&mut self.rng);
            let fraction = noisy / n;
            self.clip *=
                (-adaptive.clip_norm_lr * (fraction - adaptive.target_clipped_quantile)).exp();
        }
        self.accountant
            .step(self.config.noise_multiplier, rate.clamp(0.0, 1.0), 1)
            .map_err(|e| e.to_string())?;
        self.steps += 1;
        Ok(out)
    }

    /// Privacy spent over the rounds aggregated so far.
    pub fn spent(&self) -> Option<PrivacySpent> {
        let (epsilon, _) = self.accountant.epsilon(self.config.delta).ok()?;
        Some(PrivacySpent {
            mechanism: "central".into(),
            epsilon,
            delta: self.config.delta,
            noise_multiplier: self.config.noise_multiplier,
            clipping_norm: self.clip,
            steps: self.steps,
        })
    }
}

fn count_stddev(adaptive: &AdaptiveClipping, sampled: usize) -> f64 {
    adaptive
        .clipped_count_stddev
        .unwrap_or(sampled.max(1) as f64 / 20.0)
}

/// Local DP as the coordinator sees it: what devices are told, and how often each took part.
#[derive(Debug, Clone)]
pub struct LocalDp {
    config: PrivacyConfig,
    participations: HashMap<String, u64>,
}

impl LocalDp {
    pub fn new(config: PrivacyConfig) -> Self {
        Self {
            config,
            participations: HashMap::new(),
        }
    }

    /// The fit config that makes a device clip and noise its update.
    pub fn fit_config(&self) -> ScalarMap {
        let mut m = ScalarMap::new();
        m.insert(
            "local_dp_clip".into(),
            scalar::f64(self.config.clipping_norm),
        );
        m.insert(
            "local_dp_noise".into(),
            scalar::f64(self.config.noise_multiplier * self.config.clipping_norm),
        );
        m
    }

    pub fn participated(&mut self, client: &str) {
        *self.participations.entry(client.to_string()).or_default() += 1;
    }

    /// The privacy of the device that took part most often.
    pub fn spent(&self) -> Option<PrivacySpent> {
        let steps = self.participations.values().copied().max().unwrap_or(0);
        let mut accountant = RdpAccountant::new();
        accountant
            .step(self.config.noise_multiplier, 1.0, steps)
            .ok()?;
        let (epsilon, _) = accountant.epsilon(self.config.delta).ok()?;
        Some(PrivacySpent {
            mechanism: "local".into(),
            epsilon,
            delta: self.config.delta,
            noise_multiplier: self.config.noise_multiplier,
            clipping_norm: self.config.clipping_norm,
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(z: f64, adaptive: Option<AdaptiveClipping>) -> PrivacyConfig {
        PrivacyConfig {
            mechanism: Mechanism::Central,
            noise_multiplier: z,
            clipping_norm: 1.0,
            delta: 1e-5,
            adaptive,
        }
    }

    #[test]
    fn without_noise_central_dp_is_the_clipped_sum_over_the_sampled_count() {
        let mut dp = CentralDp::seeded(config(0.0, None), 1);
        // Two of four sampled clients folded, their clipped mean moved w from 1 to 2: the sum
        // of changes is 2, over the 4 sampled the average moves by 0.5.
        let out = dp
            .privatize(&[1.0], &[2.0], 2, 0, 4, 0.1)
            .expect("privatize");
        assert!((out[0] - 1.5).abs() < 1e-6, "{out:?}");
        let spent = dp.spent().expect("accounted");
        assert_eq!(spent.steps, 1);
        assert!(spent.epsilon.is_infinite(), "no noise, no privacy");
    }

    #[test]
    fn noise_has_the_calibrated_standard_deviation() {
        let mut dp = CentralDp::seeded(config(2.0, None), 7);
        let n = 20_000;
        let current = vec![0.0f32; n];
        // One sampled client: noise std z * C / 1 = 2 on every coordinate.
        let out = dp
            .privatize(&current, &current, 1, 0, 1, 0.01)
            .expect("privatize");
        let var = out.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
        assert!(dp.spent().expect("accounted").epsilon.is_finite());
    }

    #[test]
    fn adaptive_clipping_grows_the_norm_when_nothing_fits_and_shrinks_it_when_all_does() {
        let adaptive = AdaptiveClipping {
            clipped_count_stddev: Some(1e-9),
            ..Default::default()
        };
        let mut dp = CentralDp::seeded(config(0.0, Some(adaptive.clone())), 3);
        // All 10 updates clipped: the unclipped fraction 0 is below the 0.5 target.
        dp.privatize(&[0.0], &[0.0], 10, 10, 10, 0.1)
            .expect("privatize");
        let grown = dp.clipping_norm();
        assert!((grown - (0.2f64 * 0.5).exp()).abs() < 1e-6, "{grown}");
        let mut dp = CentralDp::seeded(config(0.0, Some(adaptive)), 3);
        dp.privatize(&[0.0], &[0.0], 10, 0, 10, 0.1)
            .expect("privatize");
        assert!((dp.clipping_norm() - (-0.2f64 * 0.5).exp()).abs() < 1e-6);
    }

    #[test]
    fn adaptive_clipping_refuses_a_noise_budget_the_count_would_exhaust() {
        let adaptive = AdaptiveClipping {
            clipped_count_stddev: Some(0.1),
            ..Default::default()
        };
        let mut dp = CentralDp::seeded(config(1.0, Some(adaptive)), 3);
        let e = dp
            .privatize(&[0.0], &[0.0], 1, 0, 1, 0.1)
            .expect_err("z^-2 < (2 sigma_b)^-2");
        assert!(e.contains("noise_multiplier"), "{e}");
    }

    #[test]
    fn local_dp_tells_devices_their_noise_and_counts_the_busiest_device() {
        let mut dp = LocalDp::new(PrivacyConfig {
            mechanism: Mechanism::Local,
            noise_multiplier: 1.5,
            clipping_norm: 0.5,
            delta: 1e-5,
            adaptive: None,
        });
        let cfg = dp.fit_config();
        assert_eq!(scalar::as_f64(&cfg["local_dp_noise"]), Some(0.75));
        dp.participated("a");
        dp.participated("a");
        dp.participated("b");
        let spent = dp.spent().expect("spent");
        assert_eq!(spent.steps, 2);
        let mut one = RdpAccountant::new();
        one.step(1.5, 1.0, 2).expect("step");
        assert_eq!(spent.epsilon, one.epsilon(1e-5).expect("eps").0);
    }

    #[test]
    fn bad_privacy_settings_name_the_field() {
        let mut c = config(1.0, None);
        c.clipping_norm = 0.0;
        assert!(c.validate().expect_err("C").contains("clipping_norm"));
        let mut c = config(1.0, Some(AdaptiveClipping::default()));
        c.mechanism = Mechanism::Local;
        assert!(c.validate().expect_err("local").contains("adaptive"));
        let mut c = config(1.0, None);
        c.delta = 1.0;
        assert!(c.validate().expect_err("delta").contains("privacy.delta"));
    }
}
