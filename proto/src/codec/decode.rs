//! Decoding: a blob of any codec back to absolute f32 weights. A blob comes from the network, so
//! everything is checked before it is trusted: the codec and base named in the metadata, every
//! tensor's name, dtype and shape, scales and top-k indices, and that the weights (including
//! `base + delta`) are finite. The byte readers take views of the blob's bytes where alignment
//! allows, since decoding runs on every update a coordinator receives.

use std::borrow::Cow;
use std::collections::HashMap;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::check::{align, check_finite, numel};
use super::quantize::channels;
use super::{META_BASE_SHA256, META_CODEC, Repr, SCALE_SUFFIX, codec_name, is_delta};
use crate::blob::{self, BlobError, Container, NamedTensor, Parameters, TensorSpec, all_finite};
use crate::fleet::Codec;

/// Decodes a blob of any codec into absolute f32 weights, sorted by name as
/// [`Parameters::new`] sorts them. Verify the blob's digest and wire codec first
/// ([`blob::verify`]; [`blob::known_codec`] turns the wire number into a [`Codec`]).
///
/// - `expected`: the model's tensor names and shapes, when the receiver knows them. Without
///   it the names and shapes are the base's (deltas) or the blob's.
/// - `base`: for deltas, the model the sender was given and the SHA-256 of the blob it was
///   sent as; the blob must name that digest. Ignored by absolute codecs.
///
/// F32 is [`Parameters::decode`] (one bulk copy and a finiteness scan per tensor).
pub fn decode(
    bytes: &[u8],
    codec: Codec,
    expected: Option<&[TensorSpec]>,
    base: Option<(&Parameters, &str)>,
) -> Result<Parameters, BlobError> {
    let repr = Repr::of(codec)?;
    if repr == Repr::F32 {
        return Parameters::decode(bytes, expected);
    }
    let Container {
        metadata,
        tensors: mut stored,
    } = Container::parse(bytes)?;
    let wire = codec_name(codec);
    match metadata.get(META_CODEC) {
        Some(named) if named == wire => {}
        Some(named) => {
            return Err(BlobError::CodecMismatch {
                wire: wire.to_string(),
                blob: named.clone(),
            });
        }
        None => {
            return Err(BlobError::MissingMetadata {
                key: META_CODEC.to_string(),
            });
        }
    }
    let base = if is_delta(codec) {
        let (base, sha256) = base.ok_or_else(|| BlobError::MissingBase {
            codec: wire.to_string(),
        })?;
        let named = metadata
            .get(META_BASE_SHA256)
            .ok_or_else(|| BlobError::MissingMetadata {
                key: META_BASE_SHA256.to_string(),
            })?;
        if !named.eq_ignore_ascii_case(sha256) {
            return Err(BlobError::BaseMismatch {
                expected: sha256.to_string(),
                actual: named.clone(),
            });
        }
        Some(base)
    } else {
        None
    };

    let specs: Cow<'_, [TensorSpec]> = match (expected, base) {
        (Some(expected), _) => Cow::Borrowed(expected),
        (None, Some(base)) => Cow::Owned(base.specs()),
        (None, None) => Cow::Owned(specs_in_blob(&stored, repr)),
    };
    let base_tensors: Option<Vec<&NamedTensor>> = match base {
        Some(base) => {
            let model = specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice()));
            let aligned = align("base", model, base)?;
            Some(aligned.into_iter().map(|i| &base.tensors[i]).collect())
        }
        None => None,
    };

    // Names first: every stored tensor of every model tensor, then nothing else.
    let mut views = Vec::with_capacity(specs.len());
    for spec in specs.iter() {
        let mut take = |suffix: &str| {
            let name = format!("{}{suffix}", spec.name);
            match stored.remove(&name) {
                Some(view) => Ok((name, view)),
                None => Err(BlobError::Missing { tensor: name }),
            }
        };
        let suffixes = repr.suffixes();
        let first = take(suffixes[0])?;
        let second = suffixes.get(1).map(|s| take(s)).transpose()?;
        views.push((first, second));
    }
    if let Some(extra) = stored.keys().min() {
        return Err(BlobError::Unexpected {
            tensor: extra.clone(),
        });
    }

    let mut tensors = Vec::with_capacity(specs.len());
    for (i, (spec, (first, second))) in specs.iter().zip(views).enumerate() {
        let base = base_tensors.as_ref().map(|b| b[i].data.as_slice());
        let data = match (repr, second) {
            (Repr::Int8, Some(scale)) => decode_int8(spec, first, scale, base)?,
            (Repr::TopK, Some(val)) => {
                let base = base.ok_or_else(|| BlobError::MissingBase {
                    codec: wire.to_string(),
                })?;
                decode_top_k(spec, first, val, base)?
            }
            _ => decode_dense(spec, repr, first, base)?,
        };
        tensors.push(NamedTensor::new(
            spec.name.clone(),
            spec.shape.clone(),
            data,
        ));
    }
    Parameters::new(tensors)
}

/// Checks an f32 blob's codec metadata, when it has some: blobs of other tools have none.
pub(crate) fn check_f32_metadata(metadata: &HashMap<String, String>) -> Result<(), BlobError> {
    match metadata.get(META_CODEC) {
        Some(named) if named != codec_name(Codec::SafetensorsF32) => {
            Err(BlobError::CodecMismatch {
                wire: codec_name(Codec::SafetensorsF32).to_string(),
                blob: named.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// The model tensors of an absolute blob without `expected`: every tensor (f16), every tensor
/// but the scales (int8), sorted by name.
fn specs_in_blob(stored: &HashMap<String, TensorView<'_>>, repr: Repr) -> Vec<TensorSpec> {
    let mut specs: Vec<TensorSpec> = stored
        .iter()
        .filter(|(name, _)| repr != Repr::Int8 || !name.ends_with(SCALE_SUFFIX))
        .map(|(name, view)| TensorSpec {
            name: name.clone(),
            shape: view.shape().to_vec(),
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

fn check_view(
    name: &str,
    view: &TensorView<'_>,
    dtype: Dtype,
    shape: &[usize],
) -> Result<(), BlobError> {
    if view.dtype() != dtype {
        return Err(BlobError::Dtype {
            tensor: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
            expected: match dtype {
                Dtype::F16 => "F16",
                Dtype::I8 => "I8",
                Dtype::U32 => "U32",
                _ => "F32",
            },
        });
    }
    if view.shape() != shape {
        return Err(BlobError::Shape {
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: view.shape().to_vec(),
        });
    }
    Ok(())
}

/// F16 (and, for completeness, F32) tensors, plus the base for deltas.
fn decode_dense(
    spec: &TensorSpec,
    repr: Repr,
    (name, view): (String, TensorView<'_>),
    base: Option<&[f32]>,
) -> Result<Vec<f32>, BlobError> {
    let raw = view.data();
    let mut out = if repr == Repr::F16 {
        check_view(&name, &view, Dtype::F16, &spec.shape)?;
        let mut out = vec![0f32; numel(&spec.shape)];
        f16s_into(raw, &mut out);
        check_finite(&name, &out)?;
        out
    } else {
        check_view(&name, &view, Dtype::F32, &spec.shape)?;
        blob::f32s_checked(&name, raw)?
    };
    if let Some(base) = base {
        for (o, b) in out.iter_mut().zip(base) {
            *o += b;
        }
        let delta_at = |i: usize| match repr {
            Repr::F16 => f16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]).to_f32(),
            _ => f32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]),
        };
        check_result(&spec.name, &out, base, delta_at)?;
    }
    Ok(out)
}

/// Little-endian f16 bytes to f32, with `half`'s SIMD conversion. `out` holds as many values as
/// `bytes` (safetensors checked the tensor's size).
fn f16s_into(bytes: &[u8], out: &mut [f32]) {
    let bits = le_u16s(bytes);
    bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
}

fn decode_int8(
    spec: &TensorSpec,
    (name, view): (String, TensorView<'_>),
    (scale_name, scale_view): (String, TensorView<'_>),
    base: Option<&[f32]>,
) -> Result<Vec<f32>, BlobError> {
    check_view(&name, &view, Dtype::I8, &spec.shape)?;
    let channels = channels(&spec.shape);
    check_view(&scale_name, &scale_view, Dtype::F32, &[channels])?;
    let scales: Vec<f32> = le_u32s(scale_view.data())
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
    if let Some((channel, &value)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
    {
        return Err(BlobError::BadScale {
            tensor: scale_name,
            channel,
            value,
        });
    }
    let q: &[i8] = bytemuck::cast_slice(view.data());
    let mut out = vec![0f32; q.len()];
    let per = q.len().checked_div(channels).unwrap_or(0);
    if per > 0 {
        let chunks = out
            .chunks_exact_mut(per)
            .zip(q.chunks_exact(per))
            .zip(&scales);
        match base {
            None => {
                for ((out, q), &s) in chunks {
                    for (o, &q) in out.iter_mut().zip(q) {
                        *o = f32::from(q) * s;
                    }
                }
            }
            Some(base) => {
                for (((out, q), &s), base) in chunks.zip(base.chunks_exact(per)) {
                    for ((o, &q), &b) in out.iter_mut().zip(q).zip(base) {
                        *o = b + f32::from(q) * s;
                    }
                }
            }
        }
    }
    let delta_at = |i: usize| f32::from(q[i]) * scales[i / per.max(1)];
    match base {
        None => check_finite(&name, &out)?,
        Some(base) => check_result(&spec.name, &out, base, delta_at)?,
    }
    Ok(out)
}

fn decode_top_k(
    spec: &TensorSpec,
    (idx_name, idx_view): (String, TensorView<'_>),
    (val_name, val_view): (String, TensorView<'_>),
    base: &[f32],
) -> Result<Vec<f32>, BlobError> {
    let k = idx_view.shape().first().copied().unwrap_or(0);
    if idx_view.shape().len() != 1 || val_view.shape() != idx_view.shape() {
        return Err(BlobError::TopKShape {
            tensor: spec.name.clone(),
            idx: idx_view.shape().to_vec(),
            val: val_view.shape().to_vec(),
        });
    }
    check_view(&idx_name, &idx_view, Dtype::U32, &[k])?;
    check_view(&val_name, &val_view, Dtype::F32, &[k])?;
    let idx = le_u32s(idx_view.data());
    let len = base.len();
    let mut previous: Option<u32> = None;
    for (position, &index) in idx.iter().enumerate() {
        if index as usize >= len {
            return Err(BlobError::IndexOutOfRange {
                tensor: idx_name,
                position,
                index,
                len,
            });
        }
        if let Some(previous) = previous
            && index <= previous
        {
            return Err(BlobError::IndexNotIncreasing {
                tensor: idx_name,
                position,
                index,
                previous,
            });
        }
        previous = Some(index);
    }
    let val = blob::f32s_checked(&val_name, val_view.data())?;
    let mut out = base.to_vec();
    for (&i, &v) in idx.iter().zip(&val) {
        out[i as usize] += v;
    }
    let delta_at = |i: usize| {
        u32::try_from(i)
            .ok()
            .and_then(|i| idx.binary_search(&i).ok())
            .map_or(0.0, |p| val[p])
    };
    check_result(&spec.name, &out, base, delta_at)?;
    Ok(out)
}

/// Refuses a non-finite `base + delta`, naming both terms.
fn check_result(
    name: &str,
    out: &[f32],
    base: &[f32],
    delta_at: impl Fn(usize) -> f32,
) -> Result<(), BlobError> {
    if !all_finite(out)
        && let Some(index) = out.iter().position(|v| !v.is_finite())
    {
        return Err(BlobError::NonFiniteResult {
            tensor: name.to_string(),
            index,
            base: base[index],
            delta: delta_at(index),
        });
    }
    Ok(())
}

/// Little-endian u16s: a view of the bytes when aligned on a little-endian machine, else a copy.
fn le_u16s(bytes: &[u8]) -> Cow<'_, [u16]> {
    if cfg!(target_endian = "little") {
        match bytemuck::try_cast_slice(bytes) {
            Ok(bits) => Cow::Borrowed(bits),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
        }
    } else {
        Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    }
}

/// Little-endian u32s, as [`le_u16s`].
pub(super) fn le_u32s(bytes: &[u8]) -> Cow<'_, [u32]> {
    if cfg!(target_endian = "little") {
        match bytemuck::try_cast_slice(bytes) {
            Ok(words) => Cow::Borrowed(words),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
        }
    } else {
        Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}
