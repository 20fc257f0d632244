//! Simulated devices that behave like a real fleet's: they fail some fits, answer late (slow
//! hardware or links, heavy-tailed across the fleet), go to sleep and wake up, straggle (train
//! slower than asked, as FedProx's experiments model it), or attack (sign-flipped or scaled
//! updates, flipped labels). Everything is drawn from the run's seed, so two runs of one spec
//! meet the same fleet, whatever their strategy.
//!
//! Slowness never burns CPU: a device trains at the machine's speed and the runtime holds its
//! answer back for the simulated extra time ([`Client::answer_delay`]), outside the compute
//! slots, so a 2-core machine can play a fleet of slow devices.

use std::time::{Duration, Instant};

use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_proto::Parameters;
use pollen_proto::fleet::{DataSchema, Statistics};
use pollen_proto::scalar::{self, ScalarMap};
use pollen_train::TaskClient;
use pollen_train::data::Raw;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal};
use serde::{Deserialize, Serialize};

/// Extra time per fit answer: each device's own median is drawn once, log-normally across the
/// fleet around `median` (spread `device_sigma`: heavy-tailed, a few devices are always much
/// slower), and each answer log-normally around that (spread `sigma`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpec {
    #[serde(with = "humantime_serde")]
    pub median: Duration,
    /// 1.0: one device in ten is 3.6 times slower than the median device, one in a hundred 10
    /// times.
    #[serde(default = "one")]
    pub device_sigma: f64,
    #[serde(default = "half")]
    pub sigma: f64,
}

fn one() -> f64 {
    1.0
}

fn half() -> f64 {
    0.5
}

/// Devices that sleep and wake: on and off periods exponentially distributed with these
/// means. A fit that reaches a sleeping device is answered after it wakes (its broker queued
/// the command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilitySpec {
    #[serde(with = "humantime_serde")]
    pub mean_on: Duration,
    #[serde(with = "humantime_serde")]
    pub mean_off: Duration,
}

/// FedProx's systems heterogeneity: each fit, a device straggles with probability `fraction`
/// and then computes `slowdown` times slower than the machine. Without a time budget
/// (`train.time_budget`) a straggler finishes late and misses the deadline; with one it stops
/// early and sends the partial work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StragglerSpec {
    pub fraction: f64,
    #[serde(default = "default_slowdown")]
    pub slowdown: f64,
}

fn default_slowdown() -> f64 {
    10.0
}

/// How malicious devices attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Sends `global - scale * (trained - global)`: pushes the model back the way it learned.
    SignFlip,
    /// Sends `global + scale * (trained - global)`: one device's change weighs like many.
    Scale,
    /// Trains on flipped labels (class `i` becomes class `C - 1 - i`); array data only.
    LabelFlip,
}

/// Malicious devices: `fraction` of the fleet (chosen from the seed) attacks in every fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSpec {
    pub kind: AttackKind,
    pub fraction: f64,
    /// Sign flip: 4 by default (the honest majority's progress is then cancelled at 20%
    /// attackers); scale: 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

impl AttackSpec {
    pub fn scale(&self) -> f64 {
        self.scale.unwrap_or(match self.kind {
            AttackKind::SignFlip => 4.0,
            AttackKind::Scale => 10.0,
            AttackKind::LabelFlip => 1.0,
        })
    }
}

impl crate::spec::SimulationSpec {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let rate = self.failure_rate;
        if !(0.0..1.0).contains(&rate) {
            return Err(format!(
                "simulation.failure_rate = {rate} must be at least 0 and below 1"
            ));
        }
        if let Some(l) = &self.latency {
            for (field, v) in [("device_sigma", l.device_sigma), ("sigma", l.sigma)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!(
                        "simulation.latency.{field} = {v} must be 0 or a positive number"
                    ));
                }
            }
        }
        if let Some(a) = &self.availability
            && (a.mean_on.is_zero() || a.mean_off.is_zero())
        {
            return Err(
                "simulation.availability.mean_on and mean_off must be longer than 0s".into(),
            );
        }
        if let Some(s) = &self.stragglers {
            if !(0.0..=1.0).contains(&s.fraction) {
                return Err(format!(
                    "simulation.stragglers.fraction = {} must be between 0 and 1",
                    s.fraction
                ));
            }
            if !(s.slowdown.is_finite() && s.slowdown >= 1.0) {
                return Err(format!(
                    "simulation.stragglers.slowdown = {} must be at least 1",
                    s.slowdown
                ));
            }
        }
        if let Some(a) = &self.attack {
            if !(0.0..=1.0).contains(&a.fraction) {
                return Err(format!(
                    "simulation.attack.fraction = {} must be between 0 and 1",
                    a.fraction
                ));
            }
            if !a.scale().is_finite() || a.scale() <= 0.0 {
                return Err(format!(
                    "simulation.attack.scale = {} must be a positive number",
                    a.scale()
                ));
            }
        }
        Ok(())
    }

    /// Which of `n` devices are malicious.
    pub fn attackers(&self, n: usize, seed: u64) -> Vec<bool> {
        let mut out = vec![false; n];
        let Some(a) = &self.attack else {
            return out;
        };
        let k = ((a.fraction * n as f64).round() as usize).min(n);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xa77a_c4e5));
        for &i in &order[..k] {
            out[i] = true;
        }
        out
    }
}

/// Flips the labels of array data: class `i` of `classes` becomes class `C - 1 - i`.
pub fn flip_labels(raw: &mut Raw, classes: &[String]) -> Result<(), String> {
    let Raw::Arrays(arrays) = raw else {
        return Err(
            "simulation.attack.kind = label_flip needs array data (npy or MNIST), not CSV".into(),
        );
    };
    let Some(y) = arrays.y.as_mut() else {
        return Err("label_flip: the data has no labels".into());
    };
    let n = classes.len();
    for v in y.iter_mut() {
        let name = if v.fract() == 0.0 {
            format!("{}", *v as i64)
        } else {
            v.to_string()
        };
        let Some(i) = classes.iter().position(|c| *c == name) else {
            return Err(format!(
                "label_flip: label {name} is not one of the classes"
            ));
        };
        *v = classes[n - 1 - i]
            .parse::<f64>()
            .map_err(|_| format!("label_flip: class {:?} is not a number", classes[n - 1 - i]))?;
    }
    Ok(())
}

/// A sleeping and waking schedule, advanced lazily.
struct Schedule {
    on: bool,
    /// When the current period ends, since the simulation started.
    until: Duration,
    on_period: Exp<f64>,
    off_period: Exp<f64>,
}

impl Schedule {
    fn new(spec: &AvailabilitySpec, rng: &mut ChaCha8Rng) -> Option<Self> {
        let on_s = spec.mean_on.as_secs_f64();
        let off_s = spec.mean_off.as_secs_f64();
        let on_period = Exp::new(1.0 / on_s).ok()?;
        let off_period = Exp::new(1.0 / off_s).ok()?;
        // Start in the stationary distribution: on with probability mean_on / (on + off).
        let on = rng.random::<f64>() < on_s / (on_s + off_s);
        let first = if on { &on_period } else { &off_period };
        let until = Duration::from_secs_f64(first.sample(rng));
        Some(Self {
            on,
            until,
            on_period,
            off_period,
        })
    }

    /// How long from `now` (since the start) until the device is awake.
    fn wait_at(&mut self, now: Duration, rng: &mut ChaCha8Rng) -> Duration {
        while self.until <= now {
            self.on = !self.on;
            let period = if self.on {
                &self.on_period
            } else {
                &self.off_period
            };
            self.until += Duration::from_secs_f64(period.sample(rng));
        }
        if self.on {
            Duration::ZERO
        } else {
            self.until - now
        }
    }
}

/// One simulated device around the real trainer.
pub struct SimulatedDevice {
    inner: TaskClient,
    rng: ChaCha8Rng,
    failure_rate: f64,
    /// (this device's median latency in seconds, per-answer spread).
    latency: Option<(f64, f64)>,
    schedule: Option<Schedule>,
    stragglers: Option<StragglerSpec>,
    /// Update attacks (label flips are in the data already).
    attack: Option<(AttackKind, f64)>,
    started: Instant,
    delay: Duration,
}

impl SimulatedDevice {
    /// Device `index` of a fleet simulated after `spec`, started at `started`; `attacker` says
    /// whether it is one of the malicious ones.
    pub fn new(
        inner: TaskClient,
        spec: &crate::spec::SimulationSpec,
        seed: u64,
        index: usize,
        attacker: bool,
        started: Instant,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64 + 1) ^ 0x0fa1_1ed0);
        let latency = spec.latency.as_ref().and_then(|l| {
            let median = l.median.as_secs_f64().max(1e-9);
            let device = LogNormal::new(median.ln(), l.device_sigma).ok()?;
            Some((device.sample(&mut rng), l.sigma))
        });
        let schedule = spec
            .availability
            .as_ref()
            .and_then(|a| Schedule::new(a, &mut rng));
        let attack = spec
            .attack
            .as_ref()
            .filter(|a| attacker && a.kind != AttackKind::LabelFlip)
            .map(|a| (a.kind, a.scale()));
        Self {
            inner,
            rng,
            failure_rate: spec.failure_rate,
            latency,
            schedule,
            stragglers: spec.stragglers.clone(),
            attack,
            started,
            delay: Duration::ZERO,
        }
    }

    /// The simulated time on top of `computed`: straggling, latency, sleep.
    fn extra(&mut self, computed: Duration, slowdown: f64) -> Duration {
        let mut extra = computed.mul_f64(slowdown - 1.0);
        if let Some((median, sigma)) = self.latency
            && let Ok(d) = LogNormal::new(median.ln(), sigma)
        {
            extra += Duration::from_secs_f64(d.sample(&mut self.rng));
        }
        if let Some(schedule) = self.schedule.as_mut() {
            extra += schedule.wait_at(self.started.elapsed(), &mut self.rng);
        }
        extra
    }
}

impl Client for SimulatedDevice {
    fn num_examples(&self) -> u64 {
        self.inner.num_examples()
    }

    fn data_schema(&self) -> Option<DataSchema> {
        self.inner.data_schema()
    }

    fn get_parameters(&mut self, work: &Work<'_>) -> Result<Parameters, ClientError> {
        self.inner.get_parameters(work)
    }

    fn fit(&mut self, work: &Work<'_>, parameters: Parameters) -> Result<ClientFit, ClientError> {
        self.delay = Duration::ZERO;
        if self.failure_rate > 0.0 && self.rng.random::<f64>() < self.failure_rate {
            self.delay = self.extra(Duration::ZERO, 1.0);
            return Err(ClientError::training(format!(
                "simulated device failure in round {} (simulation.failure_rate = {})",
                work.round, self.failure_rate
            )));
        }
        let slowdown = match &self.stragglers {
            Some(s) if self.rng.random::<f64>() < s.fraction => s.slowdown,
            _ => 1.0,
        };
        // A straggler's time budget is spent `slowdown` times faster.
        let config: ScalarMap;
        let work = match work.config.get("time_budget_ms").and_then(scalar::as_f64) {
            Some(ms) if slowdown > 1.0 => {
                let mut c = work.config.clone();
                c.insert("time_budget_ms".into(), scalar::f64(ms / slowdown));
                config = c;
                Work {
                    config: &config,
                    ..*work
                }
            }
            _ => *work,
        };
        let global = self.attack.is_some().then(|| parameters.clone());
        let started = Instant::now();
        let mut fit = self.inner.fit(&work, parameters)?;
        self.delay = self.extra(started.elapsed(), slowdown);
        if let (Some((kind, scale)), Some(global)) = (self.attack, global) {
            let factor = match kind {
                AttackKind::SignFlip => -scale,
                AttackKind::Scale => scale,
                AttackKind::LabelFlip => 1.0,
            } as f32;
            for (t, g) in fit.parameters.tensors.iter_mut().zip(&global.tensors) {
                for (w, g) in t.data.iter_mut().zip(&g.data) {
                    *w = g + factor * (*w - g);
                }
            }
        }
        if slowdown > 1.0 {
            fit.metrics
                .insert("straggler_slowdown".into(), scalar::f64(slowdown));
        }
        Ok(fit)
    }

    fn evaluate(
        &mut self,
        work: &Work<'_>,
        parameters: Parameters,
    ) -> Result<ClientEvaluate, ClientError> {
        self.delay = Duration::ZERO;
        self.inner.evaluate(work, parameters)
    }

    fn statistics(&mut self, work: &Work<'_>) -> Result<Statistics, ClientError> {
        self.delay = Duration::ZERO;
        self.inner.statistics(work)
    }

    fn answer_delay(&mut self) -> Duration {
        std::mem::take(&mut self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SimulationSpec;

    #[test]
    fn the_attackers_are_the_asked_fraction_and_the_same_for_a_seed() {
        let spec = SimulationSpec {
            attack: Some(AttackSpec {
                kind: AttackKind::SignFlip,
                fraction: 0.2,
                scale: None,
            }),
            ..Default::default()
        };
        let a = spec.attackers(100, 7);
        assert_eq!(a.iter().filter(|x| **x).count(), 20);
        assert_eq!(a, spec.attackers(100, 7));
        assert_ne!(a, spec.attackers(100, 8));
        assert_eq!(SimulationSpec::default().attackers(5, 1), vec![false; 5]);
    }

    #[test]
    fn a_sleeping_device_answers_when_it_wakes() {
        let spec = AvailabilitySpec {
            mean_on: Duration::from_secs(10),
            mean_off: Duration::from_secs(10),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut s = Schedule::new(&spec, &mut rng).expect("schedule");
        let (mut asleep, mut waits) = (0, Duration::ZERO);
        for t in 0..2000 {
            let w = s.wait_at(Duration::from_millis(t * 500), &mut rng);
            if !w.is_zero() {
                asleep += 1;
                waits += w;
            }
        }
        // Half the time asleep, waiting on average about the remaining half-period... of an
        // exponential: its mean (memorylessness), 10 s.
        let share = asleep as f64 / 2000.0;
        assert!((0.35..0.65).contains(&share), "{share}");
        let mean_wait = waits.as_secs_f64() / asleep as f64;
        assert!((5.0..15.0).contains(&mean_wait), "{mean_wait}");
    }

    #[test]
    fn labels_flip_within_the_classes() {
        let mut raw = Raw::Arrays(pollen_train::data::arrays::Arrays {
            origin: "t".into(),
            shape: vec![1],
            x: vec![0.0; 3],
            y: Some(vec![0.0, 3.0, 9.0]),
        });
        let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        flip_labels(&mut raw, &classes).expect("flips");
        let Raw::Arrays(a) = raw else { panic!() };
        assert_eq!(a.y, Some(vec![9.0, 6.0, 0.0]));
    }
}
