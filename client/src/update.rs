//! What a device sends back after training: its model, changed by local differential privacy
//! when the instruction asks, and encoded in the codec the instruction names (f32 weights, or
//! the change from the global model as f16, int8 or top-k with error feedback).
//!
//! Fit config keys (set by the coordinator from the run spec):
//! - `update_codec`: `f32` (default), `delta-f16`, `delta-int8`, `delta-topk:<fraction>`.
//! - `local_dp_clip`, `local_dp_noise`: clip the change to this L2 norm, then add Gaussian
//!   noise of this standard deviation to every value, before anything leaves the device.
//!
//! Top-k keeps what it did not send (the residual) per run and adds it to the next update, so
//! that every change is sent eventually (Stich et al. 2018; Karimireddy et al. 2019).

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::Mutex;

use pollen_proto::Parameters;
use pollen_proto::blob::EncodedBlob;
use pollen_proto::codec::{self, UpdateCodec};
use pollen_proto::scalar::{self, ScalarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::client::ClientError;

/// Runs whose top-k residuals are kept (the current one and the one before, while runs change).
const RESIDUAL_RUNS: usize = 2;

/// How one instruction wants its update sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateOptions {
    pub codec: UpdateCodec,
    /// Local DP: (clipping norm, noise standard deviation).
    pub local_dp: Option<(f64, f64)>,
}

impl UpdateOptions {
    /// Reads the instruction's config; a bad value is a bad instruction naming the key.
    pub fn from_config(config: &ScalarMap) -> Result<Self, ClientError> {
        let codec = match config.get("update_codec") {
            None => UpdateCodec::F32,
            Some(v) => {
                let name = scalar::as_str(v).ok_or_else(|| {
                    ClientError::bad_instruction(format!(
                        "config update_codec = {v:?} must be a codec name"
                    ))
                })?;
                let codec = UpdateCodec::from_str(name).map_err(|e| {
                    ClientError::bad_instruction(format!("config update_codec: {e}"))
                })?;
                if !matches!(codec, UpdateCodec::F32) && !codec.is_delta() {
                    return Err(ClientError::bad_instruction(format!(
                        "config update_codec = {name}: updates are sent as f32 weights or as deltas (delta-f16, delta-int8, delta-topk:<fraction>)"
                    )));
                }
                codec
            }
        };
        let number = |key: &str| -> Result<Option<f64>, ClientError> {
            match config.get(key) {
                None => Ok(None),
                Some(v) => scalar::as_f64(v)
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Some)
                    .ok_or_else(|| {
                        ClientError::bad_instruction(format!(
                            "config {key} = {v:?} must be 0 or a positive number"
                        ))
                    }),
            }
        };
        let local_dp = match (number("local_dp_clip")?, number("local_dp_noise")?) {
            (None, None) => None,
            (Some(clip), Some(noise)) if clip > 0.0 => Some((clip, noise)),
            _ => {
                return Err(ClientError::bad_instruction(
                    "config local_dp_clip (> 0) and local_dp_noise go together",
                ));
            }
        };
        Ok(Self { codec, local_dp })
    }
}

/// Encodes updates; holds top-k's residuals between a device's rounds.
#[derive(Debug, Default)]
pub struct UpdateEncoder {
    residuals: Mutex<VecDeque<(String, Parameters)>>,
}

impl UpdateEncoder {
    /// Turns a trained model into the blob to upload (or send inline). `base` is the global
    /// model as this device decoded it and `base_sha256` the digest of the blob it came in:
    /// deltas are computed against it and name it. `hash`: whether to compute the blob's
    /// digest (always for uploads; inline blobs may go without).
    pub fn encode(
        &self,
        run_id: &str,
        config: &ScalarMap,
        mut parameters: Parameters,
        base: &Parameters,
        base_sha256: &str,
        hash: bool,
    ) -> Result<EncodedBlob, ClientError> {
        let options = UpdateOptions::from_config(config)?;
        if let Some((clip, noise)) = options.local_dp {
            privatize(&mut parameters, base, clip, noise)?;
        }
        let codec = options.codec;
        let base = codec.is_delta().then_some((base, base_sha256));
        let encode = |residual: Option<&mut Parameters>| {
            if hash {
                codec::encode(&parameters, codec, base, residual)
            } else {
                codec::encode_unhashed(&parameters, codec, base, residual)
            }
        };
        let blob = if matches!(codec, UpdateCodec::DeltaTopK { .. }) {
            let mut runs = self.residuals.lock().unwrap_or_else(|e| e.into_inner());
            let at = match runs.iter().position(|(r, _)| r == run_id) {
                Some(at) => at,
                None => {
                    runs.push_front((run_id.to_string(), Parameters::default()));
                    runs.truncate(RESIDUAL_RUNS);
                    0
                }
            };
            encode(Some(&mut runs[at].1))
        } else {
            encode(None)
        };
        blob.map_err(|e| ClientError::training(format!("encoding the update: {e}")))
    }
}

/// Local DP: clips `parameters - base` to L2 norm `clip` and adds Gaussian noise of standard
/// deviation `noise` to every value, with a generator seeded by the operating system (noise a
/// reader of the run's seed could reproduce would protect nothing).
fn privatize(
    parameters: &mut Parameters,
    base: &Parameters,
    clip: f64,
    noise: f64,
) -> Result<(), ClientError> {
    if parameters.specs() != base.specs() {
        return Err(ClientError::training(
            "local DP: the trained model does not have the global model's tensors",
        ));
    }
    let norm = parameters
        .tensors
        .iter()
        .zip(&base.tensors)
        .flat_map(|(p, b)| p.data.iter().zip(&b.data))
        .map(|(p, b)| (f64::from(*p) - f64::from(*b)).powi(2))
        .sum::<f64>()
        .sqrt();
    let scale = if norm > clip { clip / norm } else { 1.0 };
    let gaussian = Normal::new(0.0, noise.max(f64::MIN_POSITIVE))
        .map_err(|e| ClientError::bad_instruction(format!("local DP noise {noise}: {e}")))?;
    let mut rng = ChaCha20Rng::from_os_rng();
    for (p, b) in parameters.tensors.iter_mut().zip(&base.tensors) {
        for (p, b) in p.data.iter_mut().zip(&b.data) {
            let delta = (f64::from(*p) - f64::from(*b)) * scale;
            let noised = if noise > 0.0 {
                delta + gaussian.sample(&mut rng)
            } else {
                delta
            };
            *p = (f64::from(*b) + noised) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_proto::NamedTensor;
    use pollen_proto::fleet::Codec;

    fn model(values: Vec<f32>) -> Parameters {
        let n = values.len();
        Parameters::new(vec![NamedTensor::new("w", vec![n], values)]).expect("valid")
    }

    fn config(pairs: &[(&str, pollen_proto::fleet::Scalar)]) -> ScalarMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn without_settings_an_update_is_f32_weights() {
        let enc = UpdateEncoder::default();
        let base = model(vec![0.0; 4]);
        let blob = enc
            .encode("r", &ScalarMap::new(), model(vec![1.0; 4]), &base, "", true)
            .expect("encodes");
        assert_eq!(blob.codec, Codec::SafetensorsF32);
        assert_eq!(blob.bytes, model(vec![1.0; 4]).encode().bytes);
    }

    #[test]
    fn an_int8_delta_decodes_against_the_base_it_names() {
        let enc = UpdateEncoder::default();
        let base = model(vec![0.5, -0.5, 1.0, 0.0]);
        let sha = base.encode().sha256;
        let cfg = config(&[("update_codec", scalar::string("delta-int8"))]);
        let trained = model(vec![0.6, -0.4, 0.9, 0.05]);
        let blob = enc
            .encode("r", &cfg, trained.clone(), &base, &sha, true)
            .expect("encodes");
        assert_eq!(blob.codec, Codec::DeltaInt8);
        let back =
            codec::decode(&blob.bytes, blob.codec, None, Some((&base, &sha))).expect("decodes");
        for (a, b) in back.tensors[0].data.iter().zip(&trained.tensors[0].data) {
            assert!((a - b).abs() < 0.1 / 127.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn top_k_sends_what_it_held_back_in_the_next_round() {
        let enc = UpdateEncoder::default();
        let base = model(vec![0.0; 4]);
        let cfg = config(&[("update_codec", scalar::string("delta-topk:0.5"))]);
        let trained = model(vec![4.0, 3.0, 2.0, 1.0]);
        let first = enc
            .encode("r", &cfg, trained.clone(), &base, "b", true)
            .expect("encodes");
        let sent =
            codec::decode(&first.bytes, first.codec, None, Some((&base, "b"))).expect("decodes");
        assert_eq!(sent.tensors[0].data, vec![4.0, 3.0, 0.0, 0.0]);
        // The same change again, plus the held-back [0, 0, 2, 1]: [4, 3, 4, 2], of which the
        // two largest go.
        let second = enc
            .encode("r", &cfg, trained, &base, "b", true)
            .expect("encodes");
        let sent =
            codec::decode(&second.bytes, second.codec, None, Some((&base, "b"))).expect("decodes");
        assert_eq!(sent.tensors[0].data, vec![4.0, 0.0, 4.0, 0.0]);
        // Another run starts with an empty residual.
        let other = enc
            .encode("s", &cfg, model(vec![0.0, 0.0, 0.0, 1.0]), &base, "b", true)
            .expect("encodes");
        let sent =
            codec::decode(&other.bytes, other.codec, None, Some((&base, "b"))).expect("decodes");
        assert_eq!(sent.tensors[0].data[3], 1.0);
    }

    #[test]
    fn local_dp_clips_the_change_and_adds_noise_of_the_asked_size() {
        let n = 20_000;
        let base = model(vec![0.0; n]);
        // A change of norm 100 clipped to 1, plus noise of standard deviation 0.5.
        let mut p = model(vec![100.0 / (n as f32).sqrt(); n]);
        privatize(&mut p, &base, 1.0, 0.0).expect("clips");
        let norm: f64 = p.tensors[0]
            .data
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        let mut q = model(vec![0.0; n]);
        privatize(&mut q, &base, 1.0, 0.5).expect("noises");
        let var = q.tensors[0]
            .data
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());
    }

    #[test]
    fn bad_settings_are_bad_instructions_naming_the_key() {
        let e = UpdateOptions::from_config(&config(&[("update_codec", scalar::string("zip"))]))
            .expect_err("codec");
        assert!(e.message.contains("update_codec"), "{}", e.message);
        let e = UpdateOptions::from_config(&config(&[("update_codec", scalar::string("int8"))]))
            .expect_err("absolute int8 is not an update codec");
        assert!(e.message.contains("delta"), "{}", e.message);
        let e = UpdateOptions::from_config(&config(&[("local_dp_noise", scalar::f64(1.0))]))
            .expect_err("noise without clip");
        assert!(e.message.contains("local_dp_clip"), "{}", e.message);
    }
}
