//! The weight-blob format: a safetensors file of named little-endian f32 tensors, identified by
//! its SHA-256.
//!
//! Every component exchanges weights as [`Parameters`]: an ordered list of named f32 tensors in
//! PyTorch layout (`Linear` weights are `[out, in]`), so a blob written by Pollen loads with
//! `safetensors.torch.load_file` and vice versa. Decoding checks, in this order, the digest
//! (always for blobs by reference, when given for inline ones), the container, the dtype, the
//! names and shapes against what the receiver expects, and that every value is finite, and names
//! the tensor at fault when one check fails.
//!
//! This module is the f32 codec (`CODEC_SAFETENSORS_F32`) and what every codec shares (digests,
//! codec checks, [`EncodedBlob`]); the compressed codecs (f16, int8, and updates as deltas
//! against the global model) are in [`crate::codec`], whose [`decode`](crate::codec::decode)
//! reads every codec.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};

use crate::fleet::{Codec, InlineBlob, Weights, weights::Body};

/// Name and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// One named f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A model's weights, independent of any framework: tensors sorted by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parameters {
    pub tensors: Vec<NamedTensor>,
}

/// Why a blob could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlobError {
    #[error("digest mismatch: expected sha256 {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "unsupported codec {0}; this build reads codecs 1 to 6 (safetensors f32, f16 and int8; \
         deltas in f16, int8 and top-k)"
    )]
    UnsupportedCodec(i32),
    #[error(
        "unknown codec name {0:?}; expected f32, f16, int8, delta-f16, delta-int8 or \
         delta-topk:<fraction>"
    )]
    UnknownCodec(String),
    #[error("not a valid safetensors blob: {0}")]
    Malformed(String),
    #[error("tensor {tensor:?} has dtype {dtype}, expected {expected}")]
    Dtype {
        tensor: String,
        dtype: String,
        expected: &'static str,
    },
    #[error("the wire says codec {wire} but the blob's metadata says {blob:?}")]
    CodecMismatch { wire: String, blob: String },
    #[error("the blob's metadata has no {key:?}")]
    MissingMetadata { key: String },
    #[error("codec {codec} needs the base model the delta was computed against, and its sha256")]
    MissingBase { codec: String },
    #[error(
        "the delta was computed against the model with sha256 {actual}, but the base here has \
         sha256 {expected}"
    )]
    BaseMismatch { expected: String, actual: String },
    #[error("the {role} does not fit the model at tensor {tensor:?}: {problem}")]
    Layout {
        role: &'static str,
        tensor: String,
        problem: String,
    },
    #[error(
        "tensor {tensor:?}: the scale of channel {channel} is {value}; scales must be finite and >= 0"
    )]
    BadScale {
        tensor: String,
        channel: usize,
        value: f32,
    },
    #[error(
        "tensor {tensor:?}: index {index} at position {position} is out of range for {len} values"
    )]
    IndexOutOfRange {
        tensor: String,
        position: usize,
        index: u32,
        len: usize,
    },
    #[error(
        "tensor {tensor:?}: index {index} at position {position} follows {previous}; indices must \
         be strictly increasing"
    )]
    IndexNotIncreasing {
        tensor: String,
        position: usize,
        index: u32,
        previous: u32,
    },
    #[error(
        "tensor {tensor:?}: top-k indices have shape {idx:?} and values {val:?}; both must be [k] \
         with the same k"
    )]
    TopKShape {
        tensor: String,
        idx: Vec<usize>,
        val: Vec<usize>,
    },
    #[error("tensor {tensor:?}: base {base} + delta {delta} at flat index {index} is not finite")]
    NonFiniteResult {
        tensor: String,
        index: usize,
        base: f32,
        delta: f32,
    },
    #[error("tensor {tensor:?}: value {value} at flat index {index} does not fit {codec}")]
    Unrepresentable {
        tensor: String,
        index: usize,
        value: f32,
        codec: &'static str,
    },
    #[error("top-k fraction {0} is not in (0, 1]")]
    BadFraction(f64),
    #[error("tensor {tensor:?}: names ending in {suffix:?} are reserved by the int8 codecs")]
    ReservedName {
        tensor: String,
        suffix: &'static str,
    },
    #[error("tensor {tensor:?} has shape {actual:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {tensor:?} is missing")]
    Missing { tensor: String },
    #[error("tensor {tensor:?} is not part of the model")]
    Unexpected { tensor: String },
    #[error("tensor {tensor:?} holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("tensor {tensor:?}: shape {shape:?} needs {expected} values, data has {actual}")]
    Length {
        tensor: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("weights message has no body")]
    Empty,
    #[error("weights by reference ({location}) need a blob store, and none is configured here")]
    NoStore { location: String },
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An encoded blob, its digest (empty when it was encoded unhashed) and its codec, cheap to
/// clone (the bytes are shared).
#[derive(Debug, Clone)]
pub struct EncodedBlob {
    pub bytes: Bytes,
    pub sha256: String,
    pub codec: Codec,
}

impl EncodedBlob {
    /// Wire weights naming this blob by reference: `location` is its object key, `url` a
    /// presigned GET for it (empty when the receiver reads the store itself).
    pub fn to_reference(&self, location: impl Into<String>, url: impl Into<String>) -> Weights {
        Weights {
            body: Some(Body::Reference(crate::fleet::BlobRef {
                location: location.into(),
                sha256: self.sha256.clone(),
                size_bytes: self.bytes.len() as u64,
                codec: self.codec as i32,
                url: url.into(),
            })),
        }
    }

    /// The blob as inline wire weights.
    pub fn to_inline(&self) -> Weights {
        Weights {
            body: Some(Body::Inline(InlineBlob {
                data: self.bytes.clone(),
                sha256: self.sha256.clone(),
                codec: self.codec as i32,
            })),
        }
    }
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape,
            data,
        }
    }

    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
        }
    }
}

impl Parameters {
    /// Builds parameters, sorting tensors by name so that two equal models compare equal and
    /// encode to the same bytes. Fails if a tensor's data does not fill its shape.
    pub fn new(mut tensors: Vec<NamedTensor>) -> Result<Self, BlobError> {
        for t in &tensors {
            let expected: usize = t.shape.iter().product();
            if expected != t.data.len() {
                return Err(BlobError::Length {
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                    expected,
                    actual: t.data.len(),
                });
            }
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { tensors })
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(NamedTensor::spec).collect()
    }

    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Encodes as safetensors without a digest, for inline weights whose transport protects
    /// them (see [`verify_inline`]).
    pub fn encode_unhashed(&self) -> EncodedBlob {
        EncodedBlob {
            bytes: self.safetensors(),
            sha256: String::new(),
            codec: Codec::SafetensorsF32,
        }
    }

    /// Encodes as safetensors and hashes the result.
    pub fn encode(&self) -> EncodedBlob {
        let bytes = self.safetensors();
        let sha256 = sha256_hex(&bytes);
        EncodedBlob {
            bytes,
            sha256,
            codec: Codec::SafetensorsF32,
        }
    }

    /// The f32 safetensors file with `metadata` in its header (`__metadata__`), as checkpoints
    /// are written: `safetensors.torch.load_file` reads the tensors, `safe_open(...).metadata()`
    /// the rest. Metadata never names a codec here: the blob is plain f32.
    pub fn encode_with_metadata(&self, mut metadata: HashMap<String, String>) -> Bytes {
        metadata.remove(crate::codec::META_CODEC);
        self.serialize(if metadata.is_empty() {
            None
        } else {
            Some(metadata)
        })
    }

    /// The f32 safetensors file. Every tensor's data must fill its shape ([`Parameters::new`]
    /// checks it; [`crate::codec::encode`] checks it again, since the fields are public).
    pub(crate) fn safetensors(&self) -> Bytes {
        self.serialize(None)
    }

    fn serialize(&self, metadata: Option<HashMap<String, String>>) -> Bytes {
        let raw: Vec<Cow<'_, [u8]>> = self.tensors.iter().map(|t| le_bytes(&t.data)).collect();
        let views = self.tensors.iter().zip(&raw).map(|(t, bytes)| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .expect("length was checked in Parameters::new");
            (t.name.clone(), view)
        });
        let bytes = safetensors::serialize(views, metadata)
            .expect("serializing in-memory f32 tensors cannot fail");
        Bytes::from(bytes)
    }

    /// Decodes a safetensors blob of f32 tensors (`CODEC_SAFETENSORS_F32`). `expected`, when
    /// given, must match the blob's names and shapes exactly. Rejects NaN and infinities, and a
    /// blob whose metadata names another codec. [`crate::codec::decode`] reads every codec.
    pub fn decode(bytes: &[u8], expected: Option<&[TensorSpec]>) -> Result<Self, BlobError> {
        let Container {
            metadata,
            tensors: mut by_name,
        } = Container::parse(bytes)?;
        crate::codec::check_f32_metadata(&metadata)?;
        let mut tensors = Vec::with_capacity(by_name.len());
        let mut take =
            |name: &str, view: TensorView<'_>, want: Option<&[usize]>| -> Result<(), BlobError> {
                if view.dtype() != Dtype::F32 {
                    return Err(BlobError::Dtype {
                        tensor: name.to_string(),
                        dtype: format!("{:?}", view.dtype()),
                        expected: "F32",
                    });
                }
                if let Some(want) = want
                    && view.shape() != want
                {
                    return Err(BlobError::Shape {
                        tensor: name.to_string(),
                        expected: want.to_vec(),
                        actual: view.shape().to_vec(),
                    });
                }
                let data = f32s_checked(name, view.data())?;
                tensors.push(NamedTensor::new(name, view.shape().to_vec(), data));
                Ok(())
            };
        match expected {
            Some(specs) => {
                for spec in specs {
                    let view = by_name
                        .remove(&spec.name)
                        .ok_or_else(|| BlobError::Missing {
                            tensor: spec.name.clone(),
                        })?;
                    take(&spec.name, view, Some(&spec.shape))?;
                }
                if let Some(extra) = by_name.keys().min() {
                    return Err(BlobError::Unexpected {
                        tensor: extra.clone(),
                    });
                }
            }
            None => {
                let mut names: Vec<String> = by_name.keys().cloned().collect();
                names.sort();
                for name in names {
                    let view = by_name.remove(&name).expect("name came from the map");
                    take(&name, view, None)?;
                }
            }
        }
        Parameters::new(tensors)
    }

    /// Verifies wire weights (digest, codec) and decodes them: models in any codec, but not
    /// deltas (they need the base they were computed against, see
    /// [`Parameters::from_wire_with_base`]). Only inline weights can be resolved here;
    /// references need the blob store of whoever holds them.
    pub fn from_wire(
        weights: &Weights,
        expected: Option<&[TensorSpec]>,
    ) -> Result<Self, BlobError> {
        Self::from_wire_with_base(weights, expected, None)
    }

    /// [`Parameters::from_wire`] for updates that may be deltas: `base` is the model the
    /// update's sender was given and the SHA-256 of the blob it was given it as (see
    /// [`crate::codec::decode`]). Absolute codecs ignore it.
    pub fn from_wire_with_base(
        weights: &Weights,
        expected: Option<&[TensorSpec]>,
        base: Option<(&Parameters, &str)>,
    ) -> Result<Self, BlobError> {
        match weights.body.as_ref() {
            None => Err(BlobError::Empty),
            Some(Body::Reference(r)) => Err(BlobError::NoStore {
                location: r.location.clone(),
            }),
            Some(Body::Inline(blob)) => {
                verify_inline(&blob.data, &blob.sha256, blob.codec)?;
                crate::codec::decode(&blob.data, known_codec(blob.codec)?, expected, base)
            }
        }
    }
}

/// A parsed safetensors container: its `__metadata__` and views of its tensors by name.
pub(crate) struct Container<'a> {
    pub(crate) metadata: HashMap<String, String>,
    pub(crate) tensors: HashMap<String, TensorView<'a>>,
}

impl<'a> Container<'a> {
    /// Parses the header once (safetensors checks that the offsets tile the data and that each
    /// tensor's bytes fill its dtype and shape) and views the tensors without copying.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, BlobError> {
        let malformed = |e: safetensors::SafeTensorError| BlobError::Malformed(e.to_string());
        let (header_len, header) = SafeTensors::read_metadata(bytes).map_err(malformed)?;
        let data = bytes
            .get(8 + header_len..)
            .ok_or_else(|| BlobError::Malformed("header runs past the end".into()))?;
        let tensors = header
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let bytes = data.get(start..end).ok_or_else(|| {
                    BlobError::Malformed(format!("tensor {name:?} runs past the end"))
                })?;
                let view =
                    TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(malformed)?;
                Ok((name, view))
            })
            .collect::<Result<_, BlobError>>()?;
        Ok(Self {
            metadata: header.metadata().clone().unwrap_or_default(),
            tensors,
        })
    }
}

/// The codec a wire number names, if this build reads it (`CODEC_UNSPECIFIED` it does not).
pub fn known_codec(codec: i32) -> Result<Codec, BlobError> {
    match Codec::try_from(codec) {
        Ok(Codec::Unspecified) | Err(_) => Err(BlobError::UnsupportedCodec(codec)),
        Ok(known) => Ok(known),
    }
}

/// Checks an inline blob: its codec, and its digest when the sender gave one. Inline bytes
/// travel inside a message whose transport already protects them (HTTP/2 over TCP or TLS, or
/// memory for in-process clients), so a sender may leave the digest out to save hashing
/// every update; blobs by reference always carry one ([`verify`]).
pub fn verify_inline(bytes: &[u8], sha256: &str, codec: i32) -> Result<(), BlobError> {
    if sha256.is_empty() {
        known_codec(codec)?;
        return Ok(());
    }
    verify(bytes, sha256, codec)
}

/// Checks a blob's codec (any this build reads, see [`known_codec`]) and digest.
pub fn verify(bytes: &[u8], sha256: &str, codec: i32) -> Result<(), BlobError> {
    known_codec(codec)?;
    check_digest(bytes, sha256)
}

/// Checks that `bytes` hash to `sha256` (hex, either case): any blob or document named by its
/// digest, weights or task manifests.
pub fn check_digest(bytes: &[u8], sha256: &str) -> Result<(), BlobError> {
    let actual = sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(BlobError::DigestMismatch {
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The little-endian bytes of `data`: a view of the floats themselves on little-endian
/// machines (no copy), a converted copy elsewhere.
pub(crate) fn le_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Little-endian bytes to f32s, refusing non-finite values. The source may be unaligned.
pub(crate) fn f32s_checked(name: &str, bytes: &[u8]) -> Result<Vec<f32>, BlobError> {
    // One bulk copy, then a branch-free scan the compiler vectorises; the slow search for
    // the offending index only runs on a bad blob.
    let out: Vec<f32> = if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(&bytes[..bytes.len() / 4 * 4])
    } else {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if !all_finite(&out)
        && let Some((index, &value)) = out.iter().enumerate().find(|(_, v)| !v.is_finite())
    {
        return Err(BlobError::NonFinite {
            tensor: name.to_string(),
            index,
            value,
        });
    }
    Ok(out)
}

/// Whether every value is finite, without an early exit (so that it vectorises).
pub fn all_finite(values: &[f32]) -> bool {
    values
        .chunks(1024)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

#[cfg(test)]
mod tests;
