//! How a round's updates are folded: an aggregation rule (a running example-weighted sum, or a
//! robust rule that keeps every update until the round ends), behind optional norm bounding of
//! each update's change to the global model.

use std::sync::Arc;

use pollen_proto::{NamedTensor, Parameters};
use rayon::prelude::*;

use super::robust;
use super::{ClientUpdate, FitAggregator, Folded};

/// How updates combine into the next model.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The `num_examples`-weighted mean (FedAvg): a running sum, O(model) memory.
    WeightedMean,
    /// Coordinate-wise median of the client models (FedMedian), unweighted.
    Median,
    /// Coordinate-wise mean after cutting the `beta` fraction of largest and smallest values
    /// (FedTrimmedAvg), unweighted.
    TrimmedMean { beta: f64 },
    /// Krum (`to_keep` = 0: the one model closest to its n - f - 2 nearest neighbours) or
    /// Multi-Krum (the `to_keep` best, averaged).
    Krum {
        num_malicious: usize,
        to_keep: usize,
    },
    /// Bulyan: Krum selection of n - 2f models, then a trimmed mean around the median.
    Bulyan { num_malicious: usize },
}

impl Rule {
    /// Whether the rule must see every update (and keep them in memory) before combining.
    pub fn buffers(&self) -> bool {
        !matches!(self, Rule::WeightedMean)
    }
}

/// Model-shaped arithmetic on flat copies of [`Parameters`] (tensors concatenated in order).
pub fn flatten(p: &Parameters) -> Vec<f32> {
    let mut out = Vec::with_capacity(p.num_params());
    for t in &p.tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

/// The inverse of [`flatten`], shaped like `template`.
pub fn unflatten(template: &Parameters, flat: &[f32]) -> Parameters {
    let mut at = 0;
    let tensors = template
        .tensors
        .iter()
        .map(|t| {
            let n = t.data.len();
            let data = flat[at..at + n].to_vec();
            at += n;
            NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data,
            }
        })
        .collect();
    Parameters { tensors }
}

/// Checks that `update` has `template`'s names and shapes (in the same order).
fn same_shape(template: &Parameters, update: &Parameters) -> Result<(), String> {
    if update.tensors.len() != template.tensors.len() {
        return Err(format!(
            "update has {} tensors, the model has {}",
            update.tensors.len(),
            template.tensors.len()
        ));
    }
    for (t, m) in update.tensors.iter().zip(&template.tensors) {
        if t.name != m.name || t.shape != m.shape {
            return Err(format!(
                "update tensor {:?} {:?} does not match model tensor {:?} {:?}",
                t.name, t.shape, m.name, m.shape
            ));
        }
    }
    Ok(())
}

/// L2 norm of `update - global`, accumulated in f64.
pub fn delta_norm(global: &Parameters, update: &Parameters) -> f64 {
    global
        .tensors
        .iter()
        .zip(&update.tensors)
        .map(|(g, u)| {
            g.data
                .iter()
                .zip(&u.data)
                .map(|(g, u)| {
                    let d = f64::from(*u) - f64::from(*g);
                    d * d
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Moves `update` towards `global` so that `|update - global| = bound` when it is larger.
/// Returns whether it was scaled.
pub fn clip_to(global: &Parameters, update: &mut Parameters, bound: f64) -> bool {
    let norm = delta_norm(global, update);
    // A NaN norm cannot reach here: updates are checked finite before they are folded.
    if norm <= bound {
        return false;
    }
    let scale = (bound / norm) as f32;
    for (g, u) in global.tensors.iter().zip(update.tensors.iter_mut()) {
        for (g, u) in g.data.iter().zip(u.data.iter_mut()) {
            *u = g + (*u - g) * scale;
        }
    }
    true
}

/// Below this many values a tensor is folded on the calling thread: splitting small tensors
/// across rayon's workers costs more than it saves.
const PARALLEL_MIN_LEN: usize = 1 << 16;
const CHUNK: usize = 1 << 14;

/// A running sum of weighted updates: O(model) memory.
pub struct WeightedSum {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    sums: Vec<Vec<f32>>,
    total_weight: f64,
    count: usize,
}

impl WeightedSum {
    pub fn shaped_like(template: &Parameters) -> Self {
        Self {
            names: template.tensors.iter().map(|t| t.name.clone()).collect(),
            shapes: template.tensors.iter().map(|t| t.shape.clone()).collect(),
            sums: template
                .tensors
                .iter()
                .map(|t| vec![0.0; t.data.len()])
                .collect(),
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Adds `weight * update` (the caller checked the shapes).
    fn add(&mut self, update: &Parameters, weight: f64) {
        let w = weight as f32;
        for (sum, t) in self.sums.iter_mut().zip(&update.tensors) {
            axpy(sum, w, &t.data);
        }
        self.total_weight += weight;
        self.count += 1;
    }

    /// The weighted mean, or `None` without weight.
    fn mean(self) -> Option<Parameters> {
        if self.count == 0 || self.total_weight <= 0.0 {
            return None;
        }
        let inv = (1.0 / self.total_weight) as f32;
        let tensors = self
            .names
            .into_iter()
            .zip(self.shapes)
            .zip(self.sums)
            .map(|((name, shape), mut data)| {
                scale(&mut data, inv);
                NamedTensor { name, shape, data }
            })
            .collect();
        Some(Parameters { tensors })
    }
}

/// `y += a * x`, in parallel for large tensors.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    if y.len() >= PARALLEL_MIN_LEN {
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x));
    } else {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
    }
}

fn scale(y: &mut [f32], a: f32) {
    if y.len() >= PARALLEL_MIN_LEN {
        y.par_chunks_mut(CHUNK)
            .for_each(|y| y.iter_mut().for_each(|v| *v *= a));
    } else {
        y.iter_mut().for_each(|v| *v *= a);
    }
}

/// What the aggregator does with each update before the rule sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Folding {
    /// Scale each update's change to the global model down to this L2 norm.
    pub clip: Option<f64>,
    /// Every update weighs 1 instead of its `num_examples` (central DP: one client, one
    /// bounded contribution).
    pub unit_weights: bool,
}

enum Body {
    Sum(WeightedSum),
    /// `(client, num_examples, flat model)` per update, in arrival order.
    Buffer(Rule, Vec<(String, u64, Vec<f32>)>),
}

/// The aggregator every built-in strategy hands the driver.
pub struct RuleAggregator {
    global: Arc<Parameters>,
    folding: Folding,
    clipped: usize,
    body: Body,
}

impl RuleAggregator {
    pub fn new(rule: Rule, global: Arc<Parameters>, folding: Folding) -> Self {
        let body = match rule {
            Rule::WeightedMean => Body::Sum(WeightedSum::shaped_like(&global)),
            other => Body::Buffer(other, Vec::new()),
        };
        Self {
            global,
            folding,
            clipped: 0,
            body,
        }
    }
}

impl FitAggregator for RuleAggregator {
    fn fold(&mut self, update: &ClientUpdate) -> Result<(), String> {
        // Everything is checked before anything is added, so a bad update leaves the
        // aggregate as it was.
        same_shape(&self.global, &update.parameters)?;
        // A copy only when the update has to be moved (clipped); the mean reads it in place.
        let mut clipped = None;
        if let Some(bound) = self.folding.clip {
            let mut p = update.parameters.clone();
            if clip_to(&self.global, &mut p, bound) {
                self.clipped += 1;
                clipped = Some(p);
            }
        }
        let parameters = clipped.as_ref().unwrap_or(&update.parameters);
        let weight = if self.folding.unit_weights {
            1
        } else {
            update.num_examples
        };
        match &mut self.body {
            Body::Sum(sum) => sum.add(parameters, weight as f64),
            Body::Buffer(_, kept) => {
                kept.push((update.client_id.clone(), weight, flatten(parameters)));
            }
        }
        Ok(())
    }

    fn count(&self) -> usize {
        match &self.body {
            Body::Sum(s) => s.count,
            Body::Buffer(_, kept) => kept.len(),
        }
    }

    fn finish(self: Box<Self>) -> Result<Folded, String> {
        let count = self.count();
        let clipped = self.clipped;
        let parameters = match self.body {
            Body::Sum(sum) => sum.mean(),
            Body::Buffer(_, kept) if kept.is_empty() => None,
            Body::Buffer(rule, kept) => Some(unflatten(&self.global, &combine(&rule, &kept)?)),
        };
        Ok(Folded {
            parameters,
            count,
            clipped,
        })
    }
}

/// A robust rule over buffered flat models.
fn combine(rule: &Rule, kept: &[(String, u64, Vec<f32>)]) -> Result<Vec<f32>, String> {
    let models: Vec<&[f32]> = kept.iter().map(|(_, _, m)| m.as_slice()).collect();
    let len = models[0].len();
    let mut out = vec![0.0f32; len];
    match rule {
        // Never buffered (it keeps a running sum), but a mean of what was kept is still one.
        Rule::WeightedMean => {
            let all: Vec<usize> = (0..kept.len()).collect();
            weighted_mean_of(&all, kept, &mut out);
        }
        Rule::Median => robust::coordinate_median(&models, &mut out)?,
        Rule::TrimmedMean { beta } => robust::trimmed_mean(&models, *beta, &mut out)?,
        Rule::Krum {
            num_malicious,
            to_keep,
        } => {
            let distances = robust::pairwise_squared_distances(&models)?;
            let chosen = robust::krum_select(&distances, *num_malicious, *to_keep)?;
            weighted_mean_of(&chosen, kept, &mut out);
        }
        Rule::Bulyan { num_malicious } => {
            robust::bulyan(&models, *num_malicious, &mut out)?;
        }
    }
    Ok(out)
}

/// The `num_examples`-weighted mean of the chosen buffered models (Multi-Krum averages its
/// selection as Flower's `aggregate` does).
fn weighted_mean_of(chosen: &[usize], kept: &[(String, u64, Vec<f32>)], out: &mut [f32]) {
    let total: f64 = chosen.iter().map(|&i| kept[i].1 as f64).sum();
    out.iter_mut().for_each(|v| *v = 0.0);
    for &i in chosen {
        let w = if total > 0.0 {
            (kept[i].1 as f64 / total) as f32
        } else {
            1.0 / chosen.len() as f32
        };
        axpy(out, w, &kept[i].2);
    }
}
