//! Unit tests of the codecs: the fixtures shared by every test (a small model with every kind of
//! tensor, deterministic noise, a blob rebuilder for tampering) and the tests of what the codecs
//! must do: round trips within each codec's documented error bounds, blob sizes, error feedback,
//! wire weights, names and top-k selection. The tests of what they must refuse (hostile blobs,
//! bad inputs) are in `refusals`, the fixtures being shared through `super::*`.

use std::collections::{BTreeMap, HashMap};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::decode::le_u32s;
use super::quantize::{channels, top_k, top_k_count};
use super::*;
use crate::blob::{
    self, Container, EncodedBlob, NamedTensor, Parameters, known_codec, sha256_hex, verify,
    verify_inline,
};
use crate::fleet::weights::Body;

mod refusals;

/// Deterministic values in [-scale, scale) (xorshift64), so that tests need no RNG crate.
fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A small model with every kind of tensor: 4-D, 2-D with channels of very different
/// magnitudes and one of zeros, 1-D, a scalar, an empty tensor, f16-subnormal values.
fn model(seed: u64) -> Parameters {
    let mut fc = noise(seed + 2, 48, 1.0);
    for (row, chunk) in fc.chunks_mut(16).enumerate() {
        let magnitude = [1e-3, 0.0, 40.0][row];
        chunk.iter_mut().for_each(|v| *v *= magnitude);
    }
    let mut bias = noise(seed + 1, 4, 0.1);
    bias[3] = 3e-7; // below f16's normal range (2^-14)
    Parameters::new(vec![
        NamedTensor::new("conv.weight", vec![4, 2, 3, 3], noise(seed, 72, 0.5)),
        NamedTensor::new("conv.bias", vec![4], bias),
        NamedTensor::new("fc.weight", vec![3, 16], fc),
        NamedTensor::new("temperature", vec![], vec![0.25]),
        NamedTensor::new("empty", vec![0, 5], vec![]),
    ])
    .expect("valid")
}

/// The base a device was sent, its digest, and weights after local training.
fn base_and_update() -> (Parameters, String, Parameters) {
    let base = model(1);
    let sha = base.encode().sha256;
    let mut weights = base.clone();
    for (i, t) in weights.tensors.iter_mut().enumerate() {
        let step = noise(100 + i as u64, t.data.len(), 0.01);
        t.data.iter_mut().zip(step).for_each(|(w, s)| *w += s);
    }
    (base, sha, weights)
}

/// Symmetric int8 scale of each value's channel, as the encoder computes it.
fn scales_of(t: &NamedTensor, values: &[f32]) -> Vec<f32> {
    let channels = channels(&t.shape);
    let per = values.len().checked_div(channels).unwrap_or(0).max(1);
    values
        .chunks(per)
        .flat_map(|c| {
            let s = c.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            std::iter::repeat_n(s, c.len())
        })
        .collect()
}

fn round_trip(
    params: &Parameters,
    codec: UpdateCodec,
    base: Option<(&Parameters, &str)>,
) -> (EncodedBlob, Parameters) {
    let blob = encode(params, codec, base, None).expect("encodes");
    assert_eq!(blob.codec, codec.wire());
    verify(&blob.bytes, &blob.sha256, blob.codec as i32).expect("verifies");
    let back = decode(&blob.bytes, blob.codec, Some(&params.specs()), base).expect("decodes");
    assert_eq!(back.specs(), params.specs());
    (blob, back)
}

/// Re-serialises a blob after `edit` changed its tensors or metadata.
#[allow(clippy::type_complexity)]
fn rebuild(
    bytes: &[u8],
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>),
) -> Vec<u8> {
    let Container {
        mut metadata,
        tensors,
    } = Container::parse(bytes).expect("valid blob");
    let mut owned: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut owned, &mut metadata);
    let views = owned.iter().map(|(n, (dtype, shape, data))| {
        let view = TensorView::new(*dtype, shape.clone(), data).expect("sized");
        (n.clone(), view)
    });
    safetensors::serialize(views, Some(metadata)).expect("serializes")
}

fn data_mut<'a>(p: &'a mut Parameters, name: &str) -> &'a mut Vec<f32> {
    let t = p.tensors.iter_mut().find(|t| t.name == name);
    &mut t.expect("the model has it").data
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|i| i.to_le_bytes()).collect()
}

#[test]
fn f32_through_the_codec_api_is_the_plain_blob() {
    let p = model(7);
    let (blob, back) = round_trip(&p, UpdateCodec::F32, None);
    assert_eq!(blob.bytes, p.encode().bytes);
    assert_eq!(back, p);
    let unhashed = encode_unhashed(&p, UpdateCodec::F32, None, None).expect("encodes");
    assert!(unhashed.sha256.is_empty());
    // A base given to an absolute codec is ignored.
    let other = model(8);
    let back = decode(
        &blob.bytes,
        Codec::SafetensorsF32,
        None,
        Some((&other, "x")),
    )
    .expect("decodes");
    assert_eq!(back, p);
}

#[test]
fn f16_round_trips_within_half_an_f16_ulp() {
    let p = model(3);
    let (blob, back) = round_trip(&p, UpdateCodec::F16, None);
    let mut worst = 0f32;
    for (t, b) in p.tensors.iter().zip(&back.tensors) {
        for (&x, &y) in t.data.iter().zip(&b.data) {
            // Half an ulp: 2^-11 relative for normal f16, 2^-25 absolute below 2^-14.
            let bound = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
            assert!((x - y).abs() <= bound, "{}: {x} -> {y}", t.name);
            if x.abs() >= 2f32.powi(-14) {
                worst = worst.max((x - y).abs() / x.abs());
            }
        }
    }
    println!(
        "f16: worst relative error {worst:e} (bound 2^-11 = {:e})",
        2f32.powi(-11)
    );
    // The same decode without `expected` takes names and shapes from the blob.
    let again = decode(&blob.bytes, Codec::SafetensorsF16, None, None).expect("decodes");
    assert_eq!(again, back);
}

#[test]
fn int8_round_trips_within_half_a_scale_per_channel() {
    let p = model(4);
    let (blob, back) = round_trip(&p, UpdateCodec::Int8, None);
    let mut worst = 0f32;
    for (t, b) in p.tensors.iter().zip(&back.tensors) {
        for ((&x, &y), s) in t.data.iter().zip(&b.data).zip(scales_of(t, &t.data)) {
            // Rounding to the nearest code: s/2; x/s and q*s round too: 2 * 127 * 2^-24 s.
            assert!(
                (x - y).abs() <= s * (0.5 + 2f32.powi(-15)),
                "{}: {x} -> {y}",
                t.name
            );
            if s > 0.0 {
                worst = worst.max((x - y).abs() / s);
            }
        }
    }
    println!("int8: worst error {worst} scales (bound 0.5)");
    // The channel of zeros decodes to zeros exactly.
    let fc = back.get("fc.weight").expect("present");
    assert!(fc.data[16..32].iter().all(|&v| v == 0.0));
    // Scales are per row of 2-D and 4-D tensors, one for 1-D tensors and scalars.
    let c = Container::parse(&blob.bytes).expect("parses");
    let shape = |n: &str| c.tensors[n].shape().to_vec();
    assert_eq!(shape("conv.weight:scale"), [4]);
    assert_eq!(shape("fc.weight:scale"), [3]);
    assert_eq!(shape("conv.bias:scale"), [1]);
    assert_eq!(shape("temperature:scale"), [1]);
    assert_eq!(shape("empty:scale"), [0]);
    assert_eq!(c.metadata[META_CODEC], "int8");
    let again = decode(&blob.bytes, Codec::SafetensorsInt8, None, None).expect("decodes");
    assert_eq!(again, back);
}

#[test]
fn delta_f16_and_delta_int8_return_the_base_plus_the_delta_within_bounds() {
    let (base, sha, w) = base_and_update();
    for codec in [UpdateCodec::DeltaF16, UpdateCodec::DeltaInt8] {
        let (blob, back) = round_trip(&w, codec, Some((&base, &sha)));
        let c = Container::parse(&blob.bytes).expect("parses");
        assert_eq!(c.metadata[META_CODEC], codec.name());
        assert_eq!(c.metadata[META_BASE_SHA256], sha);
        let mut worst = 0f32;
        for ((t, b), r) in w.tensors.iter().zip(&base.tensors).zip(&back.tensors) {
            let d: Vec<f32> = t.data.iter().zip(&b.data).map(|(w, b)| w - b).collect();
            let scales = scales_of(t, &d);
            for (i, (&x, &y)) in t.data.iter().zip(&r.data).enumerate() {
                let coding = match codec {
                    UpdateCodec::DeltaF16 => (d[i].abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
                    _ => scales[i] * (0.5 + 2f32.powi(-15)),
                };
                // Plus the rounding of w - b and of b + delta.
                let bound = coding + (x.abs() + d[i].abs()) * 2f32.powi(-23);
                assert!((x - y).abs() <= bound, "{codec} {}: {x} -> {y}", t.name);
                worst = worst.max((x - y).abs());
            }
        }
        println!("{codec}: worst absolute error {worst:e} for updates of at most 0.01");
    }
}

#[test]
fn top_k_keeps_the_largest_entries_exactly_and_leaves_the_rest_at_the_base() {
    let (base, sha, w) = base_and_update();
    let fraction = 0.25;
    let (blob, back) = round_trip(&w, UpdateCodec::DeltaTopK { fraction }, Some((&base, &sha)));
    let stored = Container::parse(&blob.bytes).expect("parses");
    let mut kept_total = 0;
    for ((t, b), r) in w.tensors.iter().zip(&base.tensors).zip(&back.tensors) {
        let d: Vec<f32> = t.data.iter().zip(&b.data).map(|(w, b)| w - b).collect();
        let kept = le_u32s(stored.tensors[&format!("{}:idx", t.name)].data()).to_vec();
        let k = if d.is_empty() {
            0
        } else {
            ((fraction * d.len() as f64).ceil() as usize).max(1)
        };
        assert_eq!(kept.len(), k, "{}", t.name);
        kept_total += k;
        let smallest_kept = kept
            .iter()
            .map(|&i| d[i as usize].abs())
            .fold(f32::INFINITY, f32::min);
        for (i, ((&d, &b), &r)) in d.iter().zip(&b.data).zip(&r.data).enumerate() {
            if kept.contains(&(i as u32)) {
                assert_eq!(r, b + d, "exact where kept");
            } else {
                assert_eq!(r, b, "the base elsewhere");
                assert!(d.abs() <= smallest_kept, "only the largest are kept");
            }
        }
    }
    println!(
        "delta-topk:{fraction}: {kept_total} of {} values, {} bytes (f32 {})",
        w.num_params(),
        blob.bytes.len(),
        w.encode().bytes.len()
    );
    // A fraction of 1 sends the whole delta: base + (w - b) everywhere.
    let (_, all) = round_trip(
        &w,
        UpdateCodec::DeltaTopK { fraction: 1.0 },
        Some((&base, &sha)),
    );
    for ((t, b), r) in w.tensors.iter().zip(&base.tensors).zip(&all.tensors) {
        for ((&x, &b), &y) in t.data.iter().zip(&b.data).zip(&r.data) {
            assert_eq!(y, b + (x - b));
        }
    }
}

#[test]
fn int8_and_f16_blobs_are_a_quarter_and_a_half_of_f32_for_a_200k_value_model() {
    let base = Parameters::new(vec![
        NamedTensor::new("fc1.weight", vec![256, 780], noise(1, 256 * 780, 0.1)),
        NamedTensor::new("fc1.bias", vec![256], noise(2, 256, 0.1)),
        NamedTensor::new("fc2.weight", vec![10, 256], noise(3, 2560, 0.1)),
        NamedTensor::new("fc2.bias", vec![10], noise(4, 10, 0.1)),
    ])
    .expect("valid");
    let sha = base.encode().sha256;
    let mut w = base.clone();
    for t in &mut w.tensors {
        let step = noise(9, t.data.len(), 0.001);
        t.data.iter_mut().zip(step).for_each(|(w, s)| *w += s);
    }
    assert!(w.num_params() > 200_000);
    let f32_len = w.encode().bytes.len() as f64;
    let mut ratios = HashMap::new();
    for codec in [
        UpdateCodec::F16,
        UpdateCodec::Int8,
        UpdateCodec::DeltaF16,
        UpdateCodec::DeltaInt8,
        UpdateCodec::DeltaTopK { fraction: 0.1 },
        UpdateCodec::DeltaTopK { fraction: 0.01 },
    ] {
        let blob = encode(&w, codec, Some((&base, &sha)), None).expect("encodes");
        let ratio = blob.bytes.len() as f64 / f32_len;
        println!(
            "{codec}: {} bytes, {ratio:.4} of f32's {f32_len} ({} values)",
            blob.bytes.len(),
            w.num_params()
        );
        ratios.insert(codec.to_string(), ratio);
    }
    assert!((0.49..0.51).contains(&ratios["f16"]));
    assert!((0.24..0.26).contains(&ratios["int8"]));
    assert!((0.49..0.51).contains(&ratios["delta-f16"]));
    assert!((0.24..0.26).contains(&ratios["delta-int8"]));
    assert!(
        (0.19..0.21).contains(&ratios["delta-topk:0.1"]),
        "8 bytes per kept value"
    );
}

#[test]
fn error_feedback_sends_every_coordinate_once_over_two_rounds_at_fraction_one_half() {
    // Base zeros, so the delta is the weights exactly (dyadic values: no rounding).
    let w = Parameters::new(vec![
        NamedTensor::new("a", vec![4], vec![3.0, -3.0, 2.0, 2.0]),
        NamedTensor::new("b", vec![2, 3], vec![4.0, -3.5, 3.0, -2.75, 2.5, -2.25]),
    ])
    .expect("valid");
    let zeros = Parameters::new(
        w.tensors
            .iter()
            .map(|t| NamedTensor::new(&t.name, t.shape.clone(), vec![0.0; t.data.len()]))
            .collect(),
    )
    .expect("valid");
    let sha = zeros.encode().sha256;
    let codec = UpdateCodec::DeltaTopK { fraction: 0.5 };
    let mut residual = Parameters::default();
    let sent = |blob: &EncodedBlob, name: &str| -> (Vec<u32>, Vec<f32>) {
        let c = Container::parse(&blob.bytes).expect("parses");
        let idx = le_u32s(c.tensors[&format!("{name}:idx")].data()).to_vec();
        let val =
            blob::f32s_checked(name, c.tensors[&format!("{name}:val")].data()).expect("finite");
        (idx, val)
    };

    let first = encode(&w, codec, Some((&zeros, &sha)), Some(&mut residual)).expect("encodes");
    assert_eq!(sent(&first, "a"), (vec![0, 1], vec![3.0, -3.0]));
    assert_eq!(sent(&first, "b"), (vec![0, 1, 2], vec![4.0, -3.5, 3.0]));
    assert_eq!(residual.get("a").expect("a").data, [0.0, 0.0, 2.0, 2.0]);
    assert_eq!(
        residual.get("b").expect("b").data,
        [0.0, 0.0, 0.0, -2.75, 2.5, -2.25]
    );

    // Round two: delta + residual = a [3, -3, 4, 4], b [4, -3.5, 3, -5.5, 5, -4.5].
    let second = encode(&w, codec, Some((&zeros, &sha)), Some(&mut residual)).expect("encodes");
    assert_eq!(sent(&second, "a"), (vec![2, 3], vec![4.0, 4.0]));
    assert_eq!(sent(&second, "b"), (vec![3, 4, 5], vec![-5.5, 5.0, -4.5]));
    assert_eq!(residual.get("a").expect("a").data, [3.0, -3.0, 0.0, 0.0]);
    assert_eq!(
        residual.get("b").expect("b").data,
        [4.0, -3.5, 3.0, 0.0, 0.0, 0.0]
    );

    let back =
        decode(&second.bytes, Codec::DeltaTopk, None, Some((&zeros, &sha))).expect("decodes");
    assert_eq!(
        back.get("b").expect("b").data,
        [0.0, 0.0, 0.0, -5.5, 5.0, -4.5]
    );

    // A failed encode leaves the residual as it was.
    let before = residual.clone();
    let mut bad = w.clone();
    data_mut(&mut bad, "b")[4] = f32::NAN;
    let err =
        encode(&bad, codec, Some((&zeros, &sha)), Some(&mut residual)).expect_err("NaN weight");
    assert!(
        matches!(&err, BlobError::NonFinite { tensor, index: 4, .. } if tensor == "b"),
        "{err}"
    );
    assert_eq!(residual, before);
    let mut empty = Parameters::default();
    encode(&bad, codec, Some((&zeros, &sha)), Some(&mut empty)).expect_err("NaN weight");
    assert!(empty.tensors.is_empty());
    // A residual of another model is refused.
    let mut other =
        Parameters::new(vec![NamedTensor::new("a", vec![4], vec![0.0; 4])]).expect("valid");
    let err = encode(&w, codec, Some((&zeros, &sha)), Some(&mut other)).expect_err("layout");
    assert_eq!(
        err,
        BlobError::Layout {
            role: "residual",
            tensor: "b".into(),
            problem: "it has no such tensor".into()
        }
    );
}

#[test]
fn wire_weights_carry_the_codec_and_every_known_codec_verifies() {
    let (base, sha, w) = base_and_update();
    let specs = w.specs();
    let blob = encode(&w, UpdateCodec::Int8, None, None).expect("encodes");
    let inline = blob.to_inline();
    match &inline.body {
        Some(Body::Inline(b)) => assert_eq!(b.codec, Codec::SafetensorsInt8 as i32),
        other => panic!("{other:?}"),
    }
    match blob.to_reference("key", "").body {
        Some(Body::Reference(r)) => assert_eq!(r.codec, Codec::SafetensorsInt8 as i32),
        other => panic!("{other:?}"),
    }
    let back = Parameters::from_wire(&inline, Some(&specs)).expect("absolute codecs decode");
    assert_eq!(
        back,
        decode(&blob.bytes, blob.codec, None, None).expect("decodes")
    );

    let delta =
        encode_unhashed(&w, UpdateCodec::DeltaF16, Some((&base, &sha)), None).expect("encodes");
    assert!(delta.sha256.is_empty());
    let err = Parameters::from_wire(&delta.to_inline(), Some(&specs)).expect_err("no base");
    assert!(matches!(err, BlobError::MissingBase { .. }), "{err}");
    Parameters::from_wire_with_base(&delta.to_inline(), Some(&specs), Some((&base, &sha)))
        .expect("decodes against its base");

    for number in 1..=6 {
        let codec = known_codec(number).expect("known");
        assert_eq!(codec as i32, number);
        verify(&blob.bytes, &blob.sha256, number).expect("verifies");
        verify_inline(&blob.bytes, "", number).expect("verifies");
    }
    for number in [0, 7, -1] {
        let err = verify(&blob.bytes, &blob.sha256, number).expect_err("unknown");
        assert_eq!(err, BlobError::UnsupportedCodec(number));
        let err = verify_inline(&blob.bytes, "", number).expect_err("unknown");
        assert_eq!(err, BlobError::UnsupportedCodec(number));
    }
    assert_eq!(sha256_hex(&blob.bytes), blob.sha256);
}

#[test]
fn codec_names_parse_and_print_the_same() {
    for codec in [
        UpdateCodec::F32,
        UpdateCodec::F16,
        UpdateCodec::Int8,
        UpdateCodec::DeltaF16,
        UpdateCodec::DeltaInt8,
        UpdateCodec::DeltaTopK { fraction: 0.01 },
    ] {
        assert_eq!(codec.to_string().parse::<UpdateCodec>(), Ok(codec));
        assert_eq!(Codec::from(codec), codec.wire());
    }
    assert_eq!(
        UpdateCodec::DeltaTopK { fraction: 0.01 }.to_string(),
        "delta-topk:0.01"
    );
    assert!(matches!(
        "int4".parse::<UpdateCodec>(),
        Err(BlobError::UnknownCodec(_))
    ));
    assert!(matches!(
        "delta-topk".parse::<UpdateCodec>(),
        Err(BlobError::UnknownCodec(_))
    ));
    assert_eq!(
        "delta-topk:2".parse::<UpdateCodec>(),
        Err(BlobError::BadFraction(2.0))
    );
    assert!(!UpdateCodec::Int8.is_delta() && UpdateCodec::DeltaInt8.is_delta());
}

#[test]
fn top_k_selection_breaks_ties_by_the_lower_index() {
    let d = [1.0, -2.0, 2.0, 0.5, -2.0, 0.0];
    let mut scratch = Vec::new();
    assert_eq!(top_k(&d, 2, &mut scratch), [1, 2]);
    assert_eq!(top_k(&d, 3, &mut scratch), [1, 2, 4]);
    assert_eq!(top_k(&d, 4, &mut scratch), [0, 1, 2, 4]);
    assert_eq!(top_k(&d, 6, &mut scratch), [0, 1, 2, 3, 4, 5]);
    assert_eq!(top_k(&[], 0, &mut scratch), Vec::<u32>::new());
    assert_eq!(top_k_count(0.01, 50), 1);
    assert_eq!(top_k_count(0.25, 10), 3);
    assert_eq!(top_k_count(1.0, 10), 10);
    assert_eq!(top_k_count(0.5, 0), 0);
}
