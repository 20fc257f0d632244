//! Encoding: model weights to a blob of any codec. The f32 codec is the plain blob of
//! [`Parameters::encode`]; the compressed ones subtract the base (deltas), apply the codec's
//! arithmetic tensor by tensor, and write the result with its metadata as safetensors. Top-k's
//! error feedback is kept here too, since the residual changes only when a whole encode succeeds.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use half::f16;
use half::slice::HalfFloatSliceExt;
use safetensors::Dtype;
use safetensors::tensor::View;

use super::check::{align, check_finite, check_length};
use super::quantize::{check_fraction, quantize_int8, to_f16, top_k, top_k_count};
use super::{
    IDX_SUFFIX, META_BASE_SHA256, META_CODEC, Repr, SCALE_SUFFIX, UpdateCodec, VAL_SUFFIX,
};
use crate::blob::{self, BlobError, EncodedBlob, NamedTensor, Parameters};

/// Encodes `params` with `codec` and hashes the blob. See [`encode_unhashed`].
pub fn encode(
    params: &Parameters,
    codec: UpdateCodec,
    base: Option<(&Parameters, &str)>,
    residual: Option<&mut Parameters>,
) -> Result<EncodedBlob, BlobError> {
    let mut blob = encode_unhashed(params, codec, base, residual)?;
    blob.sha256 = blob::sha256_hex(&blob.bytes);
    Ok(blob)
}

/// Encodes `params` with `codec`, without a digest (for inline weights whose transport
/// protects them, see [`blob::verify_inline`]).
///
/// - `base`: for delta codecs, the model the sender was given (as it decoded it: what the
///   receiver will add the delta to) and the SHA-256 of the blob it came in, written into the
///   blob's metadata. Same tensor names and shapes as `params`. Ignored by the other codecs.
/// - `residual`: top-k's error-feedback state, kept by the sender between updates: the update
///   sent is `topk(weights - base + residual)`, and `residual` becomes what was not sent
///   (`weights - base + residual - sent`). An empty `Parameters` is zeros and is filled in;
///   `None` is zeros and keeps nothing. Otherwise it must have the model's names and shapes.
///   It is left unchanged when encoding fails. Ignored by the other codecs.
///
/// F32 gives the bytes of [`Parameters::encode`]. Non-finite values (weights, or deltas that
/// overflow) and values beyond f16's range for the f16 codecs are refused.
pub fn encode_unhashed(
    params: &Parameters,
    codec: UpdateCodec,
    base: Option<(&Parameters, &str)>,
    residual: Option<&mut Parameters>,
) -> Result<EncodedBlob, BlobError> {
    for t in &params.tensors {
        check_length(t)?;
    }
    let bytes = match Repr::of(codec.wire())? {
        Repr::F32 => params.safetensors(),
        repr => Bytes::from(encode_compressed(params, codec, repr, base, residual)?),
    };
    Ok(EncodedBlob {
        bytes,
        sha256: String::new(),
        codec: codec.wire(),
    })
}

fn encode_compressed(
    params: &Parameters,
    codec: UpdateCodec,
    repr: Repr,
    base: Option<(&Parameters, &str)>,
    residual: Option<&mut Parameters>,
) -> Result<Vec<u8>, BlobError> {
    let mut metadata = HashMap::from([(META_CODEC.to_string(), codec.name().to_string())]);
    let model = || {
        params
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
    };
    let missing_base = || BlobError::MissingBase {
        codec: codec.name().to_string(),
    };
    let base: Option<Vec<&NamedTensor>> = if codec.is_delta() {
        let (base, sha256) = base.ok_or_else(missing_base)?;
        if sha256.is_empty() {
            return Err(missing_base());
        }
        metadata.insert(META_BASE_SHA256.to_string(), sha256.to_ascii_lowercase());
        let aligned = align("base", model(), base)?;
        Some(aligned.into_iter().map(|i| &base.tensors[i]).collect())
    } else {
        None
    };
    if repr == Repr::Int8
        && let Some(t) = params
            .tensors
            .iter()
            .find(|t| t.name.ends_with(SCALE_SUFFIX))
    {
        return Err(BlobError::ReservedName {
            tensor: t.name.clone(),
            suffix: SCALE_SUFFIX,
        });
    }

    let mut out: Vec<(String, Stored)> = Vec::with_capacity(2 * params.tensors.len());
    match codec {
        UpdateCodec::DeltaTopK { fraction } => {
            check_fraction(fraction)?;
            let base = base.ok_or_else(missing_base)?;
            // An empty residual is zeros: nothing to add now, filled in at the end.
            let prior = match residual.as_deref() {
                Some(r) if !r.tensors.is_empty() => Some(align("residual", model(), r)?),
                _ => None,
            };
            let keep = residual.is_some();
            let mut kept = Vec::with_capacity(if keep { params.tensors.len() } else { 0 });
            let mut magnitudes = Vec::new();
            for (i, (t, b)) in params.tensors.iter().zip(&base).enumerate() {
                let mut d: Vec<f32> = t.data.iter().zip(&b.data).map(|(w, b)| w - b).collect();
                if let (Some(r), Some(of)) = (residual.as_deref(), &prior) {
                    for (d, r) in d.iter_mut().zip(&r.tensors[of[i]].data) {
                        *d += r;
                    }
                }
                check_finite(&t.name, &d)?;
                if u32::try_from(d.len()).is_err() {
                    return Err(BlobError::Malformed(format!(
                        "tensor {:?} has {} values; top-k indices are u32",
                        t.name,
                        d.len()
                    )));
                }
                let idx = top_k(&d, top_k_count(fraction, d.len()), &mut magnitudes);
                let val: Vec<f32> = idx.iter().map(|&i| d[i as usize]).collect();
                if keep {
                    for &i in &idx {
                        d[i as usize] = 0.0;
                    }
                    kept.push(d);
                }
                let k = vec![idx.len()];
                out.push((
                    format!("{}{IDX_SUFFIX}", t.name),
                    Stored::new(k.clone(), Data::U32(idx)),
                ));
                out.push((
                    format!("{}{VAL_SUFFIX}", t.name),
                    Stored::new(k, Data::F32(val)),
                ));
            }
            // Only now that every tensor encoded: a failed encode leaves the residual as it was.
            if let Some(r) = residual {
                match prior {
                    Some(of) => {
                        for (d, i) in kept.into_iter().zip(of) {
                            r.tensors[i].data = d;
                        }
                    }
                    None => {
                        r.tensors = params
                            .tensors
                            .iter()
                            .zip(kept)
                            .map(|(t, d)| NamedTensor::new(&t.name, t.shape.clone(), d))
                            .collect();
                    }
                }
            }
        }
        _ => {
            let mut delta = Vec::new();
            for (i, t) in params.tensors.iter().enumerate() {
                let values: &[f32] = match &base {
                    Some(base) => {
                        delta.clear();
                        delta.extend(t.data.iter().zip(&base[i].data).map(|(w, b)| w - b));
                        &delta
                    }
                    None => &t.data,
                };
                check_finite(&t.name, values)?;
                if repr == Repr::Int8 {
                    let (q, scales) = quantize_int8(&t.shape, values);
                    let scale_shape = vec![scales.len()];
                    out.push((t.name.clone(), Stored::new(t.shape.clone(), Data::I8(q))));
                    out.push((
                        format!("{}{SCALE_SUFFIX}", t.name),
                        Stored::new(scale_shape, Data::F32(scales)),
                    ));
                } else {
                    let halves = to_f16(&t.name, values)?;
                    out.push((
                        t.name.clone(),
                        Stored::new(t.shape.clone(), Data::F16(halves)),
                    ));
                }
            }
        }
    }
    safetensors::serialize(out, Some(metadata)).map_err(|e| BlobError::Malformed(e.to_string()))
}

/// A tensor to write.
struct Stored {
    shape: Vec<usize>,
    data: Data,
}

enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>),
    U32(Vec<u32>),
}

impl Stored {
    fn new(shape: Vec<usize>, data: Data) -> Self {
        Self { shape, data }
    }
}

impl View for Stored {
    fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::F16(_) => Dtype::F16,
            Data::I8(_) => Dtype::I8,
            Data::U32(_) => Dtype::U32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Little-endian bytes: the values themselves on little-endian machines.
    fn data(&self) -> Cow<'_, [u8]> {
        let little = cfg!(target_endian = "little");
        match &self.data {
            Data::F32(v) => blob::le_bytes(v),
            Data::I8(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::F16(v) if little => Cow::Borrowed(bytemuck::cast_slice(v.reinterpret_cast())),
            Data::F16(v) => Cow::Owned(v.iter().flat_map(|h| h.to_le_bytes()).collect()),
            Data::U32(v) if little => Cow::Borrowed(bytemuck::cast_slice(v)),
            Data::U32(v) => Cow::Owned(v.iter().flat_map(|i| i.to_le_bytes()).collect()),
        }
    }

    fn data_len(&self) -> usize {
        match &self.data {
            Data::F32(v) => 4 * v.len(),
            Data::F16(v) => 2 * v.len(),
            Data::I8(v) => v.len(),
            Data::U32(v) => 4 * v.len(),
        }
    }
}
