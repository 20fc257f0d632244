//! Byzantine-robust aggregation kernels over flat client models: the coordinate-wise median,
//! the trimmed mean, Krum / Multi-Krum and Bulyan, computed as Flower computes them
//! (`flwr.server.strategy.aggregate`, flwr 1.42.0; line numbers below are from that release).
//! They are pure functions of the clients' models, so a strategy can be tested on a handful of
//! numbers and then run on millions of them.
//!
//! Conventions:
//! - A client's model is one flat `&[f32]` (its tensors concatenated in a fixed order); all
//!   models have one length, and results are written into an `out` of that length. Errors name
//!   the parameter at fault.
//! - Inputs are assumed finite (the driver rejects NaN/Inf updates before aggregation). NaN
//!   never panics, but where it lands is unspecified.
//! - Means and distances accumulate in f64 and round once to f32. numpy accumulates float32
//!   arrays in float32, in an order set by its sort/partition internals, so a result can differ
//!   from Flower's in the last bit. The median of an even count is `(a + b) / 2` in f32, which
//!   is exactly numpy's arithmetic.
//! - Where Flower's outcome on ties depends on numpy internals, ties break deterministically
//!   here: equal Multi-Krum scores by client index (numpy's default `argsort` is not stable:
//!   on AVX-512 machines it dispatches to SIMD sorts, and even 5 scores with ties come out in
//!   varying order), and values equally far from Bulyan's median toward the smaller value
//!   (`argpartition`). Krum's single choice is `np.argmin`, the first minimum, here too.
//!
//! Coordinate-wise kernels copy [`COLUMN_CHUNK`] coordinates of every model into a scratch
//! buffer, one column per coordinate, so that each model is read sequentially and each column
//! is worked on in cache. Models of at least [`PARALLEL_MIN_VALUES`] values are split by chunk
//! across rayon's pool with the same per-coordinate arithmetic, so serial and parallel results
//! are bit-identical.

use rayon::prelude::*;

/// Coordinates per chunk of the coordinate-wise kernels (the scratch holds `n * COLUMN_CHUNK`).
pub const COLUMN_CHUNK: usize = 1024;
/// Models at least this long are aggregated on rayon's pool, smaller ones on the caller's thread.
pub const PARALLEL_MIN_VALUES: usize = 65_536;
/// Coordinates per partial distance matrix: the unit of parallel work for distances.
const DISTANCE_CHUNK: usize = 65_536;
/// Coordinates per tile within a distance chunk: all models' tiles fit in L2 together.
const DISTANCE_TILE: usize = 2048;

/// Flower's `aggregate_median` (aggregate.py:92, `np.median(..., axis=0)`): each coordinate is
/// the median of the clients' values, the mean of the two middle values for an even count.
/// Example counts are ignored.
pub fn coordinate_median(models: &[&[f32]], out: &mut [f32]) -> Result<(), String> {
    check_models(models, out.len())?;
    map_columns(models, out, is_large(out), median_of);
    Ok(())
}

/// How many values Flower's `_trim_mean` cuts from each end of `n` and how many it keeps:
/// `lowercut = int(beta * n)` truncates toward zero (aggregate.py:272), and values
/// `lowercut..n - lowercut` of the sorted column are kept (aggregate.py:273-279). flwr 1.42.0
/// refuses `beta` outside `[0, 0.5)` (aggregate.py:267, and `FedTrimmedAvg.__init__`); older
/// releases allowed `lowercut == n - lowercut`, which averaged nothing into NaN.
pub fn trim_counts(n: usize, beta: f64) -> Result<(usize, usize), String> {
    if !(0.0..0.5).contains(&beta) {
        return Err(format!("beta = {beta} must be in [0, 0.5)"));
    }
    if n == 0 {
        return Err("models: no model to aggregate".into());
    }
    let cut = (beta * n as f64) as usize;
    // beta < 0.5 keeps 2 * cut < n, rounding of beta * n aside; never average nothing.
    if 2 * cut >= n {
        return Err(format!("beta = {beta} trims all {n} models"));
    }
    Ok((cut, n - 2 * cut))
}

/// Flower's `aggregate_trimmed_avg` (`FedTrimmedAvg`, default `beta = 0.2`): per coordinate,
/// drop the `int(beta * n)` smallest and largest values and average the rest, unweighted
/// (see [`trim_counts`]).
pub fn trimmed_mean(models: &[&[f32]], beta: f64, out: &mut [f32]) -> Result<(), String> {
    check_models(models, out.len())?;
    let (cut, kept) = trim_counts(models.len(), beta)?;
    map_columns(models, out, is_large(out), |column| {
        column.sort_unstable_by(f32::total_cmp);
        mean_f64(&column[cut..cut + kept])
    });
    Ok(())
}

/// Squared Euclidean distances between every pair of models, accumulated in f64, with an exact
/// zero diagonal: Flower's `_compute_distances` (aggregate.py:255, `norm(w_i - w_j) ** 2`),
/// which numpy evaluates in float32 for float32 models.
pub fn pairwise_squared_distances(models: &[&[f32]]) -> Result<Vec<Vec<f64>>, String> {
    let len = models.first().map_or(0, |m| m.len());
    check_models(models, len)?;
    Ok(distances_impl(models, len >= PARALLEL_MIN_VALUES))
}

/// Krum scores as Flower's `aggregate_krum` computes them (aggregate.py:111-123): each row of
/// the distance matrix, self included, is sorted and entries `1..=num_closest` are summed, with
/// `num_closest = max(1, n - num_malicious - 2)` (past the row's end counts nothing, as a
/// Python slice does). With a zero diagonal this is the sum of the distances to the
/// `num_closest` nearest other models, whichever of equal zeros the sort puts first.
pub fn krum_scores(distances: &[Vec<f64>], num_malicious: usize) -> Result<Vec<f64>, String> {
    let n = check_square(distances)?;
    let all: Vec<usize> = (0..n).collect();
    Ok(scores_over(distances, &all, num_malicious))
}

/// The models Krum keeps (Flower's `aggregate_krum(results, num_malicious, to_keep)`):
/// `to_keep = 0` is Krum, the one model of lowest score (`np.argmin`, the first on ties,
/// aggregate.py:132); `to_keep >= 1` is Multi-Krum, the `to_keep` lowest scores
/// (aggregate.py:127), which Flower then averages weighted by `num_examples`
/// (aggregate.py:129, `aggregate(best_results)`; see [`krum`]). Indices come in ascending
/// score order, ties by index. Flower's slice `[len(scores) - to_keep:]` wraps around for
/// `to_keep > n`; that is an error here.
pub fn krum_select(
    distances: &[Vec<f64>],
    num_malicious: usize,
    to_keep: usize,
) -> Result<Vec<usize>, String> {
    let scores = krum_scores(distances, num_malicious)?;
    if to_keep > scores.len() {
        return Err(format!(
            "to_keep = {to_keep} exceeds the {} models to choose from",
            scores.len()
        ));
    }
    Ok(lowest(&scores, to_keep.max(1)))
}

/// Krum / Multi-Krum end to end, as Flower's `Krum` strategy aggregates: Krum copies the chosen
/// model into `out`; Multi-Krum writes the average of the kept models weighted by
/// `num_examples`. Returns the kept indices (see [`krum_select`]).
pub fn krum(
    models: &[&[f32]],
    num_examples: &[u64],
    num_malicious: usize,
    to_keep: usize,
    out: &mut [f32],
) -> Result<Vec<usize>, String> {
    check_models(models, out.len())?;
    if num_examples.len() != models.len() {
        return Err(format!(
            "num_examples has {} entries for {} models",
            num_examples.len(),
            models.len()
        ));
    }
    let kept = krum_select(&pairwise_squared_distances(models)?, num_malicious, to_keep)?;
    if let (0, Some(&chosen)) = (to_keep, kept.first()) {
        out.copy_from_slice(models[chosen]);
        return Ok(kept);
    }
    // Flower's `aggregate` (aggregate.py:28-43): sum(n_i * w_i) / sum(n_i), here in f64.
    let chosen: Vec<&[f32]> = kept.iter().map(|&i| models[i]).collect();
    let weights: Vec<f64> = kept.iter().map(|&i| num_examples[i] as f64).collect();
    let total: f64 = weights.iter().sum();
    if total == 0.0 {
        return Err(format!("num_examples of the kept models {kept:?} sum to 0"));
    }
    map_columns(&chosen, out, is_large(out), |column| {
        let sum: f64 = column
            .iter()
            .zip(&weights)
            .map(|(&x, w)| f64::from(x) * w)
            .sum();
        (sum / total) as f32
    });
    Ok(kept)
}

/// How Bulyan picks its `theta = n - 2f` models before the coordinate-wise step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BulyanSelection {
    /// `flwr.server.strategy.aggregate_bulyan` (aggregate.py:178-205): Krum `theta` times,
    /// each time over the models not yet chosen (the neighbour count shrinking with them).
    #[default]
    RepeatedKrum,
    /// `flwr.serverapp.strategy.Bulyan` (the Message API): one Multi-Krum pass keeping the
    /// `theta` lowest scores among all `n` models.
    MultiKrum,
}

/// The indices Bulyan keeps, in the order chosen. Requires `n >= 4 * num_malicious + 3`
/// (aggregate.py:166, Flower's `ValueError`; the Message API skips the round instead).
pub fn bulyan_select(
    distances: &[Vec<f64>],
    num_malicious: usize,
    selection: BulyanSelection,
) -> Result<Vec<usize>, String> {
    let n = check_square(distances)?;
    let (theta, _) = bulyan_sizes(n, num_malicious)?;
    match selection {
        BulyanSelection::MultiKrum => krum_select(distances, num_malicious, theta),
        BulyanSelection::RepeatedKrum => {
            let mut remaining: Vec<usize> = (0..n).collect();
            let mut chosen = Vec::with_capacity(theta);
            for _ in 0..theta {
                // `_find_reference_weights` then `results.pop(best_idx)` (aggregate.py:185,
                // 205): the list keeps its order, so ties still go to the lowest index.
                let scores = scores_over(distances, &remaining, num_malicious);
                let best = lowest(&scores, 1);
                chosen.push(remaining.remove(best[0]));
            }
            Ok(chosen)
        }
    }
}

/// Bulyan (El Mhamdi et al., 2018) as `flwr.server.strategy.Bulyan` aggregates: [`bulyan_with`]
/// and [`BulyanSelection::RepeatedKrum`]. Returns the selected indices.
pub fn bulyan(
    models: &[&[f32]],
    num_malicious: usize,
    out: &mut [f32],
) -> Result<Vec<usize>, String> {
    bulyan_with(models, num_malicious, BulyanSelection::RepeatedKrum, out)
}

/// Bulyan as Flower's `aggregate_bulyan` with its default inner rule,
/// `aggregate_krum` with `to_keep = 0` (the only rule Flower accepts; with `to_keep > 0` the
/// average is not one of the models and `_find_reference_weights` raises), so example counts
/// play no part. After selection, each coordinate is the mean of the `beta = theta - 2f`
/// selected values closest to the selected values' median (aggregate.py:176, 208-214,
/// `_aggregate_n_closest_weights`). Returns the selected indices.
pub fn bulyan_with(
    models: &[&[f32]],
    num_malicious: usize,
    selection: BulyanSelection,
    out: &mut [f32],
) -> Result<Vec<usize>, String> {
    check_models(models, out.len())?;
    let (_, beta) = bulyan_sizes(models.len(), num_malicious)?;
    let selected = bulyan_select(
        &pairwise_squared_distances(models)?,
        num_malicious,
        selection,
    )?;
    let chosen: Vec<&[f32]> = selected.iter().map(|&i| models[i]).collect();
    map_columns(&chosen, out, is_large(out), |column| {
        closest_to_median_mean(column, beta)
    });
    Ok(selected)
}

/// `(theta, beta) = (n - 2f, n - 4f)`, or Flower's refusal when `n < 4f + 3`.
fn bulyan_sizes(n: usize, num_malicious: usize) -> Result<(usize, usize), String> {
    let needed = num_malicious
        .checked_mul(4)
        .and_then(|x| x.checked_add(3))
        .ok_or_else(|| format!("num_malicious = {num_malicious} is too large"))?;
    if n < needed {
        return Err(format!(
            "Bulyan needs at least 4 * num_malicious + 3 = {needed} models, got {n} \
             (num_malicious = {num_malicious})"
        ));
    }
    Ok((n - 2 * num_malicious, n - 4 * num_malicious))
}

/// Krum scores of the models `subset`, each against the others in `subset` only.
fn scores_over(distances: &[Vec<f64>], subset: &[usize], num_malicious: usize) -> Vec<f64> {
    let n = subset.len();
    let num_closest = n.saturating_sub(num_malicious).saturating_sub(2).max(1);
    let mut row = Vec::with_capacity(n);
    subset
        .iter()
        .map(|&i| {
            row.clear();
            row.extend(subset.iter().map(|&j| distances[i][j]));
            row.sort_unstable_by(f64::total_cmp);
            row.iter().skip(1).take(num_closest).sum()
        })
        .collect()
}

fn check_square(distances: &[Vec<f64>]) -> Result<usize, String> {
    let n = distances.len();
    if n == 0 {
        return Err("distances: no model to score".into());
    }
    if let Some(i) = distances.iter().position(|row| row.len() != n) {
        return Err(format!("distances: row {i} does not have {n} entries"));
    }
    Ok(n)
}

/// Indices of the `k` lowest scores, ascending, ties by index (`k <= scores.len()`).
fn lowest(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b])); // stable: ties keep index order
    order.truncate(k);
    order
}

/// numpy's median of one column: the middle value, or `(a + b) / 2` in f32 for an even count.
fn median_of(column: &mut [f32]) -> f32 {
    let (n, half) = (column.len(), column.len() / 2);
    let (below, &mut middle, _) = column.select_nth_unstable_by(half, f32::total_cmp);
    if n % 2 == 1 {
        return middle;
    }
    let lower = below
        .iter()
        .copied()
        .max_by(f32::total_cmp)
        .unwrap_or(middle);
    (lower + middle) / 2.0
}

/// Mean of the `beta` values of `column` closest to its median (Flower's
/// `_aggregate_n_closest_weights` against `aggregate_median`). Distances are f32 like numpy's
/// `np.abs(median - w)`; in sorted order they fall then rise, so the `beta` closest are a
/// window grown outward from the median, taking the smaller value on ties (numpy's
/// `argpartition` leaves ties to its internals).
fn closest_to_median_mean(column: &mut [f32], beta: usize) -> f32 {
    column.sort_unstable_by(f32::total_cmp);
    let n = column.len();
    let half = n / 2;
    let median = if n % 2 == 1 {
        column[half]
    } else {
        (column[half - 1] + column[half]) / 2.0
    };
    // The window is column[lo..hi], empty at first.
    let mut lo = column.partition_point(|&x| x < median);
    let mut hi = lo;
    let mut sum = 0.0_f64;
    for _ in 0..beta.min(n) {
        let take_left = match (lo.checked_sub(1), column.get(hi)) {
            (Some(l), Some(&right)) => median - column[l] <= right - median,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if take_left {
            lo -= 1;
            sum += f64::from(column[lo]);
        } else {
            sum += f64::from(column[hi]);
            hi += 1;
        }
    }
    (sum / beta.min(n).max(1) as f64) as f32
}

fn mean_f64(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().map(|&x| f64::from(x)).sum();
    (sum / values.len() as f64) as f32
}

fn is_large(out: &[f32]) -> bool {
    out.len() >= PARALLEL_MIN_VALUES
}

fn check_models(models: &[&[f32]], out_len: usize) -> Result<(), String> {
    let Some(first) = models.first() else {
        return Err("models: no model to aggregate".into());
    };
    if let Some(i) = models.iter().position(|m| m.len() != first.len()) {
        return Err(format!(
            "models[{i}] has {} values, models[0] has {}",
            models[i].len(),
            first.len()
        ));
    }
    if out_len != first.len() {
        return Err(format!(
            "out has {out_len} values, the models have {}",
            first.len()
        ));
    }
    Ok(())
}

/// `out[k] = f(column k)`, where column k holds `models[i][k]` in client order (`f` may
/// reorder it). Callers have checked that `models` is non-empty and that every model is as
/// long as `out`.
fn map_columns<F>(models: &[&[f32]], out: &mut [f32], parallel: bool, f: F)
where
    F: Fn(&mut [f32]) -> f32 + Sync,
{
    let n = models.len();
    let chunk = |(index, out): (usize, &mut [f32]), scratch: &mut Vec<f32>| {
        let start = index * COLUMN_CHUNK;
        scratch.clear();
        scratch.resize(out.len() * n, 0.0);
        for (i, model) in models.iter().enumerate() {
            for (k, &x) in model[start..start + out.len()].iter().enumerate() {
                scratch[k * n + i] = x;
            }
        }
        for (o, column) in out.iter_mut().zip(scratch.chunks_exact_mut(n)) {
            *o = f(column);
        }
    };
    if parallel {
        out.par_chunks_mut(COLUMN_CHUNK)
            .enumerate()
            .for_each_init(Vec::new, |scratch, item| chunk(item, scratch));
    } else {
        let mut scratch = Vec::new();
        for item in out.chunks_mut(COLUMN_CHUNK).enumerate() {
            chunk(item, &mut scratch);
        }
    }
}

/// Pairwise squared distances: a partial upper triangle per [`DISTANCE_CHUNK`] coordinates,
/// summed in chunk order whether the partials were computed in parallel or not.
fn distances_impl(models: &[&[f32]], parallel: bool) -> Vec<Vec<f64>> {
    let n = models.len();
    let len = models.first().map_or(0, |m| m.len());
    let partial = |chunk: usize| {
        let mut acc = vec![0.0_f64; n * n];
        let end = ((chunk + 1) * DISTANCE_CHUNK).min(len);
        let mut start = chunk * DISTANCE_CHUNK;
        while start < end {
            let stop = (start + DISTANCE_TILE).min(end);
            for i in 0..n {
                for j in i + 1..n {
                    acc[i * n + j] +=
                        squared_distance(&models[i][start..stop], &models[j][start..stop]);
                }
            }
            start = stop;
        }
        acc
    };
    let chunks = len.div_ceil(DISTANCE_CHUNK);
    let partials: Vec<Vec<f64>> = if parallel {
        (0..chunks).into_par_iter().map(partial).collect()
    } else {
        (0..chunks).map(partial).collect()
    };
    let mut total = vec![0.0_f64; n * n];
    for part in &partials {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    let mut matrix = vec![vec![0.0_f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            matrix[i][j] = total[i * n + j];
            matrix[j][i] = total[i * n + j];
        }
    }
    matrix
}

/// `sum (a - b)^2` in f64 over eight independent lanes (vectorisable, fixed order).
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0_f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for k in 0..8 {
            let d = f64::from(x[k]) - f64::from(y[k]);
            lanes[k] += d * d;
        }
    }
    let tail: f64 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests;
