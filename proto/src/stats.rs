//! Per-channel moments ([`Moments`]) as devices accumulate them and coordinators combine them.
//!
//! A device folds its values in with Welford's update; two sets of moments combine with Chan
//! et al.'s pairwise formula. Both keep the mean and M2 (the sum of squared deviations from the
//! mean) rather than sums and sums of squares, whose difference loses every significant digit
//! when a channel's mean is large beside its spread (a temperature of 300 K +- 0.01 K).

use crate::fleet::Moments;

/// Why a set of moments cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MomentsError {
    #[error("moments have {got} channels where {expected} were expected")]
    Channels { expected: usize, got: usize },
    #[error("mean, m2, min and max have {mean}, {m2}, {min} and {max} entries; they must agree")]
    Ragged {
        mean: usize,
        m2: usize,
        min: usize,
        max: usize,
    },
    #[error("channel {channel}: {what} = {value} is not a finite number")]
    NonFinite {
        channel: usize,
        what: &'static str,
        value: f64,
    },
    #[error("channel {channel}: m2 = {value} is negative")]
    NegativeM2 { channel: usize, value: f64 },
    #[error("channel {channel}: min {min} is above max {max}")]
    Range { channel: usize, min: f64, max: f64 },
}

/// Running moments of `channels` channels that all receive the same number of values.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    count: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
}

impl Accumulator {
    pub fn new(channels: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
            min: vec![f64::INFINITY; channels],
            max: vec![f64::NEG_INFINITY; channels],
        }
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Folds in one value per channel (Welford).
    pub fn push(&mut self, values: impl IntoIterator<Item = f64>) {
        self.count += 1;
        let n = self.count as f64;
        for (c, x) in values.into_iter().enumerate().take(self.mean.len()) {
            let delta = x - self.mean[c];
            self.mean[c] += delta / n;
            self.m2[c] += delta * (x - self.mean[c]);
            self.min[c] = self.min[c].min(x);
            self.max[c] = self.max[c].max(x);
        }
    }

    /// Folds in another set of moments over the same channels (Chan et al.).
    pub fn merge(&mut self, other: &Moments) -> Result<(), MomentsError> {
        check(other, Some(self.channels()))?;
        if other.count == 0 {
            return Ok(());
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for c in 0..self.mean.len() {
            let delta = other.mean[c] - self.mean[c];
            self.mean[c] += delta * nb / n;
            self.m2[c] += other.m2[c] + delta * delta * na * nb / n;
            self.min[c] = self.min[c].min(other.min[c]);
            self.max[c] = self.max[c].max(other.max[c]);
        }
        self.count += other.count;
        Ok(())
    }

    /// Means per channel.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Population standard deviations per channel (0 for fewer than two values).
    pub fn std(&self) -> Vec<f64> {
        self.m2
            .iter()
            .map(|m2| {
                if self.count < 2 {
                    0.0
                } else {
                    (m2 / self.count as f64).max(0.0).sqrt()
                }
            })
            .collect()
    }

    pub fn min(&self) -> &[f64] {
        &self.min
    }

    pub fn max(&self) -> &[f64] {
        &self.max
    }

    /// The wire form.
    pub fn to_moments(&self) -> Moments {
        Moments {
            count: self.count,
            mean: self.mean.clone(),
            m2: self.m2.clone(),
            min: self.min.clone(),
            max: self.max.clone(),
        }
    }
}

/// Checks that wire moments are well formed (and have `channels` channels when given).
pub fn check(m: &Moments, channels: Option<usize>) -> Result<(), MomentsError> {
    let n = m.mean.len();
    if m.m2.len() != n || m.min.len() != n || m.max.len() != n {
        return Err(MomentsError::Ragged {
            mean: n,
            m2: m.m2.len(),
            min: m.min.len(),
            max: m.max.len(),
        });
    }
    if let Some(expected) = channels
        && expected != n
    {
        return Err(MomentsError::Channels { expected, got: n });
    }
    if m.count == 0 {
        return Ok(());
    }
    for c in 0..n {
        for (what, value) in [
            ("mean", m.mean[c]),
            ("m2", m.m2[c]),
            ("min", m.min[c]),
            ("max", m.max[c]),
        ] {
            if !value.is_finite() {
                return Err(MomentsError::NonFinite {
                    channel: c,
                    what,
                    value,
                });
            }
        }
        if m.m2[c] < 0.0 {
            return Err(MomentsError::NegativeM2 {
                channel: c,
                value: m.m2[c],
            });
        }
        if m.min[c] > m.max[c] {
            return Err(MomentsError::Range {
                channel: c,
                min: m.min[c],
                max: m.max[c],
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn merged_moments_equal_the_moments_of_the_union() {
        // A large offset with a small spread: sums of squares would lose it all in f64.
        let values: Vec<f64> = (0..10_000)
            .map(|i| 1e6 + ((i * 7919) % 1000) as f64 * 1e-3)
            .collect();
        let mut total = Accumulator::new(1);
        for part in values.chunks(1234) {
            let mut a = Accumulator::new(1);
            for &v in part {
                a.push([v]);
            }
            total.merge(&a.to_moments()).expect("same channels");
        }
        let (mean, std) = exact(&values);
        assert_eq!(total.count(), 10_000);
        assert!((total.mean()[0] - mean).abs() / mean < 1e-12);
        assert!(
            (total.std()[0] - std).abs() / std < 1e-9,
            "{}",
            total.std()[0]
        );
        assert_eq!(total.min()[0], 1e6);
        assert!((total.max()[0] - (1e6 + 0.999)).abs() < 1e-9);
    }

    #[test]
    fn bad_moments_are_refused_by_channel() {
        let mut a = Accumulator::new(2);
        a.push([1.0, 2.0]);
        a.push([3.0, 4.0]);
        let mut m = a.to_moments();
        m.m2[1] = f64::NAN;
        assert!(matches!(
            a.merge(&m),
            Err(MomentsError::NonFinite { channel: 1, .. })
        ));
        let mut m = a.to_moments();
        m.min.pop();
        assert!(matches!(a.merge(&m), Err(MomentsError::Ragged { .. })));
        let m = Accumulator::new(3).to_moments();
        assert!(matches!(
            a.merge(&m),
            Err(MomentsError::Channels {
                expected: 2,
                got: 3
            })
        ));
    }
}
