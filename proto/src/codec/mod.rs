//! Compressed weight codecs: global models in f16 or int8, and model updates as deltas against
//! the global model their sender was given (f16, int8, or the top-k entries with error
//! feedback).
//!
//! Every codec is a safetensors file. The compressed ones carry `"pollen.codec"` in the file's
//! `__metadata__`, and the deltas also `"pollen.base_sha256"`, the SHA-256 of the blob the base
//! model was sent as, so that a receiver checks that a delta was computed against the model it
//! sent. Per model tensor `<name>` of shape `[d0, ...]`:
//!
//! | codec | `pollen.codec` | stored |
//! |---|---|---|
//! | `CODEC_SAFETENSORS_F32` | (none) | `<name>` F32 |
//! | `CODEC_SAFETENSORS_F16` | `f16` | `<name>` F16 |
//! | `CODEC_SAFETENSORS_INT8` | `int8` | `<name>` I8, `<name>:scale` F32 `[d0]` (`[1]` below 2 dims) |
//! | `CODEC_DELTA_F16` | `delta-f16` | as f16, of `weights - base` |
//! | `CODEC_DELTA_INT8` | `delta-int8` | as int8, of `weights - base` |
//! | `CODEC_DELTA_TOPK` | `delta-topk` | `<name>:idx` U32 `[k]`, `<name>:val` F32 `[k]` |
//!
//! - **int8** is symmetric per output channel (PyTorch layout: dim 0 is the output row or
//!   channel): `scale = max|x| / 127` over the channel, `q = round(x / scale)`, `x ≈ q * scale`
//!   within `scale / 2`. A channel of zeros has scale 0.
//! - **f16** rounds to nearest: within `2^-11` relative (`2^-25` absolute below f16's normal
//!   range, `2^-14`). Values beyond f16's range (65504) are refused, not saturated.
//! - **top-k** sends, per tensor, the `k = max(1, ceil(fraction * numel))` entries of largest
//!   magnitude (ties: the lower index) of `delta + residual`, exactly; the sender keeps what it
//!   did not send as its residual and adds it to its next update (error feedback), so that
//!   every coordinate's update is sent eventually.
//!
//! [`decode`] returns absolute f32 weights (`base + delta` for deltas) and checks the container,
//! the codec named in the metadata against the wire's, the base's digest, dtypes, names (every
//! model tensor, nothing else), shapes, scales (finite, >= 0), top-k indices (in range, strictly
//! increasing, as many as values), that every stored value is finite, and that the result is
//! finite (`base + delta` may overflow).

use std::fmt;
use std::str::FromStr;

use crate::blob::BlobError;
use crate::fleet::Codec;

// Encoding and decoding share the format (the constants and `Repr` below), the lossy arithmetic
// (`quantize`) and the checks that tensors fit the model (`check`), and nothing else: each
// direction can then be read against the format table above without the other.
mod check;
mod decode;
mod encode;
mod quantize;
#[cfg(test)]
mod tests;

pub(crate) use decode::check_f32_metadata;
pub use decode::decode;
pub use encode::{encode, encode_unhashed};
use quantize::check_fraction;

/// `__metadata__` key naming a compressed blob's codec ([`codec_name`]).
pub const META_CODEC: &str = "pollen.codec";
/// `__metadata__` key of a delta's base: the lower-case hex SHA-256 of the base model's blob.
pub const META_BASE_SHA256: &str = "pollen.base_sha256";
/// Suffix of an int8 tensor's scales.
pub const SCALE_SUFFIX: &str = ":scale";
/// Suffix of a top-k tensor's flat indices.
pub const IDX_SUFFIX: &str = ":idx";
/// Suffix of a top-k tensor's values.
pub const VAL_SUFFIX: &str = ":val";

/// How to encode weights: a [`Codec`] and, for top-k, the fraction of entries kept. Written
/// and parsed as `f32`, `f16`, `int8`, `delta-f16`, `delta-int8` and `delta-topk:<fraction>`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateCodec {
    F32,
    F16,
    Int8,
    DeltaF16,
    DeltaInt8,
    /// Per tensor, the `max(1, ceil(fraction * numel))` largest entries; `fraction` in (0, 1].
    DeltaTopK {
        fraction: f64,
    },
}

impl UpdateCodec {
    /// The wire codec.
    pub fn wire(self) -> Codec {
        match self {
            Self::F32 => Codec::SafetensorsF32,
            Self::F16 => Codec::SafetensorsF16,
            Self::Int8 => Codec::SafetensorsInt8,
            Self::DeltaF16 => Codec::DeltaF16,
            Self::DeltaInt8 => Codec::DeltaInt8,
            Self::DeltaTopK { .. } => Codec::DeltaTopk,
        }
    }

    /// The name in blob metadata: `f32`, `f16`, `int8`, `delta-f16`, `delta-int8`, `delta-topk`.
    pub fn name(self) -> &'static str {
        codec_name(self.wire())
    }

    /// Whether it encodes `weights - base` (and so needs the base on both ends).
    pub fn is_delta(self) -> bool {
        is_delta(self.wire())
    }
}

impl From<UpdateCodec> for Codec {
    fn from(codec: UpdateCodec) -> Self {
        codec.wire()
    }
}

impl fmt::Display for UpdateCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeltaTopK { fraction } => write!(f, "{}:{fraction}", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

impl FromStr for UpdateCodec {
    type Err = BlobError;

    fn from_str(s: &str) -> Result<Self, BlobError> {
        Ok(match s {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "int8" => Self::Int8,
            "delta-f16" => Self::DeltaF16,
            "delta-int8" => Self::DeltaInt8,
            _ => {
                let fraction = s
                    .strip_prefix("delta-topk:")
                    .and_then(|f| f.parse::<f64>().ok())
                    .ok_or_else(|| BlobError::UnknownCodec(s.to_string()))?;
                check_fraction(fraction)?;
                Self::DeltaTopK { fraction }
            }
        })
    }
}

/// A codec's name, as blob metadata and logs spell it.
pub fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::Unspecified => "unspecified",
        Codec::SafetensorsF32 => "f32",
        Codec::SafetensorsF16 => "f16",
        Codec::SafetensorsInt8 => "int8",
        Codec::DeltaF16 => "delta-f16",
        Codec::DeltaInt8 => "delta-int8",
        Codec::DeltaTopk => "delta-topk",
    }
}

/// Whether blobs of `codec` are deltas, decoded against a base.
pub fn is_delta(codec: Codec) -> bool {
    matches!(codec, Codec::DeltaF16 | Codec::DeltaInt8 | Codec::DeltaTopk)
}

/// How a codec stores each tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repr {
    F32,
    F16,
    Int8,
    TopK,
}

impl Repr {
    fn of(codec: Codec) -> Result<Self, BlobError> {
        Ok(match codec {
            Codec::Unspecified => return Err(BlobError::UnsupportedCodec(codec as i32)),
            Codec::SafetensorsF32 => Self::F32,
            Codec::SafetensorsF16 | Codec::DeltaF16 => Self::F16,
            Codec::SafetensorsInt8 | Codec::DeltaInt8 => Self::Int8,
            Codec::DeltaTopk => Self::TopK,
        })
    }

    /// Suffixes of the stored tensors of one model tensor.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Self::F32 | Self::F16 => &[""],
            Self::Int8 => &["", SCALE_SUFFIX],
            Self::TopK => &[IDX_SUFFIX, VAL_SUFFIX],
        }
    }
}
