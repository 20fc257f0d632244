//! The arithmetic of the lossy codecs: rounding to f16 (refusing what f16 cannot hold),
//! symmetric per-channel int8 quantisation and the channel layout its scales follow, and top-k
//! selection with its fraction. The encoder uses all of it; the decoder reads int8 scales by
//! [`channels`] and the parser checks a top-k fraction as the encoder does, so the rules that
//! define each format sit apart from the container code of either direction.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::blob::BlobError;

/// Largest finite f16.
const F16_MAX: &str = "f16 (largest finite value 65504)";

pub(super) fn check_fraction(fraction: f64) -> Result<(), BlobError> {
    if fraction > 0.0 && fraction <= 1.0 {
        Ok(())
    } else {
        Err(BlobError::BadFraction(fraction))
    }
}

/// `max(1, ceil(fraction * n))`, at most `n`.
pub(super) fn top_k_count(fraction: f64, n: usize) -> usize {
    let k = (fraction * n as f64).ceil() as usize;
    k.max(1).min(n)
}

/// Flat indices, increasing, of the `k` entries of `d` of largest magnitude (ties: the lower
/// index). `magnitudes` is scratch space. `d` is finite.
pub(super) fn top_k(d: &[f32], k: usize, magnitudes: &mut Vec<u32>) -> Vec<u32> {
    let n = d.len();
    if k >= n {
        return (0..n as u32).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    // The bits of |v| without the sign order as |v| does (for finite v): select the k-th
    // largest magnitude on integers (linear time), then one pass in index order takes every
    // entry above it and as many equal to it as are still needed.
    let magnitude = |v: &f32| v.to_bits() & 0x7fff_ffff;
    magnitudes.clear();
    magnitudes.extend(d.iter().map(magnitude));
    let (_, &mut threshold, _) = magnitudes.select_nth_unstable(n - k);
    let above = magnitudes.iter().filter(|&&m| m > threshold).count();
    let mut ties = k - above;
    let mut idx = Vec::with_capacity(k);
    for (i, m) in d.iter().map(magnitude).enumerate() {
        if m > threshold {
            idx.push(i as u32);
        } else if m == threshold && ties > 0 {
            ties -= 1;
            idx.push(i as u32);
        }
    }
    idx
}

/// Dim 0 for tensors of two or more dimensions, else 1.
pub(super) fn channels(shape: &[usize]) -> usize {
    if shape.len() >= 2 { shape[0] } else { 1 }
}

/// Symmetric per-channel int8: the codes and one scale per channel.
pub(super) fn quantize_int8(shape: &[usize], values: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let channels = channels(shape);
    let mut q = vec![0i8; values.len()];
    let mut scales = vec![0f32; channels];
    let per = values.len().checked_div(channels).unwrap_or(0);
    if per == 0 {
        return (q, scales);
    }
    for ((q, x), s) in q
        .chunks_exact_mut(per)
        .zip(values.chunks_exact(per))
        .zip(&mut scales)
    {
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        // 0 for a channel of zeros (and for one below 127 f32 subnormals, which f32 cannot
        // scale): its codes stay 0.
        if scale > 0.0 {
            *s = scale;
            for (q, &x) in q.iter_mut().zip(x) {
                *q = round_to_i8(x / scale);
            }
        }
    }
    (q, scales)
}

/// Rounds to the nearest integer (ties to even) and saturates to i8. Adding and subtracting
/// 1.5 * 2^23 rounds exactly for |v| < 2^22 in plain SIMD arithmetic, where `f32::round`
/// would be a libm call per value on x86-64's baseline (no SSE4.1).
#[inline]
fn round_to_i8(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC) - MAGIC) as i8
}

/// `values` in f16; refuses values beyond f16's range. `values` are finite.
pub(super) fn to_f16(name: &str, values: &[f32]) -> Result<Vec<f16>, BlobError> {
    let mut halves = vec![f16::ZERO; values.len()];
    halves.convert_from_f32_slice(values);
    // Finite inputs: an infinite f16 (exponent bits all set) is a value beyond f16's range.
    let bits: &[u16] = halves.reinterpret_cast();
    let fits = |b: u16| b & 0x7c00 != 0x7c00;
    let all_fit = bits
        .chunks(1024)
        .all(|c| c.iter().fold(true, |ok, &b| ok & fits(b)));
    if !all_fit && let Some(index) = bits.iter().position(|&b| !fits(b)) {
        return Err(BlobError::Unrepresentable {
            tensor: name.to_string(),
            index,
            value: values[index],
            codec: F16_MAX,
        });
    }
    Ok(halves)
}
