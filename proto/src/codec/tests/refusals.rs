//! Refusals: blobs that were tampered with, truncated or assembled by hand (top-k indices out
//! of range or repeated, bad int8 scales, wrong dtypes, metadata naming another codec or base,
//! sums that overflow) and inputs the encoder must not send. A decoder reads whatever arrives
//! over the network, so every such case must end in the error that names the problem.

use super::*;

#[test]
fn a_tampered_top_k_index_fails_the_digest_and_without_one_the_range_check() {
    let (base, sha, w) = base_and_update();
    let blob = encode(
        &w,
        UpdateCodec::DeltaTopK { fraction: 0.5 },
        Some((&base, &sha)),
        None,
    )
    .expect("encodes");
    let c = Container::parse(&blob.bytes).expect("parses");
    let idx = c.tensors["conv.weight:idx"].data();
    let first = u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]);
    let offset = idx.as_ptr() as usize - blob.bytes.as_ptr() as usize;
    let mut tampered = blob.bytes.to_vec();
    tampered[offset + 3] ^= 0x40; // the high byte of the first index
    let err = verify(&tampered, &blob.sha256, blob.codec as i32).expect_err("digest");
    assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
    let err = decode(&tampered, Codec::DeltaTopk, None, Some((&base, &sha))).expect_err("index");
    assert_eq!(
        err,
        BlobError::IndexOutOfRange {
            tensor: "conv.weight:idx".into(),
            position: 0,
            index: first | 0x4000_0000,
            len: 72
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "tensor \"conv.weight:idx\": index {} at position 0 is out of range for 72 values",
            first | 0x4000_0000
        )
    );
}

#[test]
fn top_k_indices_out_of_range_repeated_or_unpaired_are_refused() {
    let (base, sha, w) = base_and_update();
    let blob = encode(
        &w,
        UpdateCodec::DeltaTopK { fraction: 0.5 },
        Some((&base, &sha)),
        None,
    )
    .expect("encodes");
    let with = |idx: &[u32], val: &[f32]| {
        let (idx, val) = (idx.to_vec(), val.to_vec());
        rebuild(&blob.bytes, move |t, _| {
            t.insert(
                "conv.bias:idx".into(),
                (Dtype::U32, vec![idx.len()], u32_bytes(&idx)),
            );
            t.insert(
                "conv.bias:val".into(),
                (Dtype::F32, vec![val.len()], f32_bytes(&val)),
            );
        })
    };
    let decode_with = |bytes: &[u8]| decode(bytes, Codec::DeltaTopk, None, Some((&base, &sha)));
    decode_with(&with(&[0, 3], &[0.5, 0.5])).expect("valid");
    let err = decode_with(&with(&[0, 4], &[0.5, 0.5])).expect_err("out of range");
    assert_eq!(
        err,
        BlobError::IndexOutOfRange {
            tensor: "conv.bias:idx".into(),
            position: 1,
            index: 4,
            len: 4
        }
    );
    let err = decode_with(&with(&[1, 1], &[0.5, 0.5])).expect_err("duplicate");
    assert_eq!(
        err,
        BlobError::IndexNotIncreasing {
            tensor: "conv.bias:idx".into(),
            position: 1,
            index: 1,
            previous: 1
        }
    );
    let err = decode_with(&with(&[2, 1], &[0.5, 0.5])).expect_err("decreasing");
    assert!(
        matches!(
            err,
            BlobError::IndexNotIncreasing {
                index: 1,
                previous: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = decode_with(&with(&[0, 1], &[0.5])).expect_err("k differs");
    assert_eq!(
        err.to_string(),
        "tensor \"conv.bias\": top-k indices have shape [2] and values [1]; both must be [k] \
         with the same k"
    );
    let err = decode_with(&with(&[0, 1], &[0.5, f32::NAN])).expect_err("NaN value");
    assert!(
        matches!(&err, BlobError::NonFinite { tensor, index: 1, .. } if tensor == "conv.bias:val"),
        "{err}"
    );
    let missing = rebuild(&blob.bytes, |t, _| {
        t.remove("fc.weight:val");
    });
    let err = decode_with(&missing).expect_err("missing");
    assert_eq!(
        err,
        BlobError::Missing {
            tensor: "fc.weight:val".into()
        }
    );
}

#[test]
fn bad_int8_scales_are_refused_by_channel() {
    let p = model(5);
    let blob = encode(&p, UpdateCodec::Int8, None, None).expect("encodes");
    let with_scale = |channel: usize, value: f32| {
        rebuild(&blob.bytes, |t, _| {
            let data = &mut t.get_mut("fc.weight:scale").expect("scale").2;
            data[4 * channel..4 * channel + 4].copy_from_slice(&value.to_le_bytes());
        })
    };
    let specs = p.specs();
    for value in [f32::NAN, f32::INFINITY, -0.5] {
        let err = decode(
            &with_scale(2, value),
            Codec::SafetensorsInt8,
            Some(&specs),
            None,
        )
        .expect_err("bad scale");
        assert!(
            matches!(&err, BlobError::BadScale { tensor, channel: 2, .. } if tensor == "fc.weight:scale"),
            "{err}"
        );
    }
    let err = decode(
        &with_scale(2, f32::NAN),
        Codec::SafetensorsInt8,
        Some(&specs),
        None,
    )
    .expect_err("NaN");
    assert_eq!(
        err.to_string(),
        "tensor \"fc.weight:scale\": the scale of channel 2 is NaN; scales must be finite and >= 0"
    );
    // A scale so large that q * scale overflows: the value is refused.
    let err = decode(
        &with_scale(2, 3e38),
        Codec::SafetensorsInt8,
        Some(&specs),
        None,
    )
    .expect_err("overflow");
    assert!(
        matches!(&err, BlobError::NonFinite { tensor, .. } if tensor == "fc.weight"),
        "{err}"
    );

    let missing = rebuild(&blob.bytes, |t, _| {
        t.remove("conv.bias:scale");
    });
    let err = decode(&missing, Codec::SafetensorsInt8, Some(&specs), None).expect_err("missing");
    assert_eq!(
        err,
        BlobError::Missing {
            tensor: "conv.bias:scale".into()
        }
    );
    // Without `expected`, the tensor falls out of the model and its scale is left over.
    let orphan = rebuild(&blob.bytes, |t, _| {
        t.remove("conv.bias");
    });
    let err = decode(&orphan, Codec::SafetensorsInt8, None, None).expect_err("orphan");
    assert_eq!(
        err,
        BlobError::Unexpected {
            tensor: "conv.bias:scale".into()
        }
    );
    let reshaped = rebuild(&blob.bytes, |t, _| {
        t.get_mut("fc.weight:scale").expect("scale").1 = vec![1, 3];
    });
    let err = decode(&reshaped, Codec::SafetensorsInt8, Some(&specs), None).expect_err("shape");
    assert_eq!(
        err.to_string(),
        "tensor \"fc.weight:scale\" has shape [1, 3], expected [3]"
    );
}

#[test]
fn wrong_dtypes_are_named_with_the_dtype_expected() {
    let p = model(6);
    let specs = p.specs();
    let int8 = encode(&p, UpdateCodec::Int8, None, None).expect("encodes");
    let as_f32 = rebuild(&int8.bytes, |t, _| {
        // The I8 codes of the scalar replaced by one F32 value.
        t.insert(
            "temperature".into(),
            (Dtype::F32, vec![], f32_bytes(&[0.25])),
        );
    });
    let err = decode(&as_f32, Codec::SafetensorsInt8, Some(&specs), None).expect_err("dtype");
    assert_eq!(
        err.to_string(),
        "tensor \"temperature\" has dtype F32, expected I8"
    );
    // An f16 blob is not f32, and the f32 decoder says so.
    let f16 = encode(&p, UpdateCodec::F16, None, None).expect("encodes");
    let stripped = rebuild(&f16.bytes, |_, m| {
        m.clear();
    });
    let err = Parameters::decode(&stripped, Some(&specs)).expect_err("dtype");
    assert!(
        matches!(
            err,
            BlobError::Dtype {
                expected: "F32",
                ..
            }
        ),
        "{err}"
    );
    let err =
        decode(&f16.bytes, Codec::SafetensorsF16, Some(&specs[..1]), None).expect_err("extra");
    assert!(matches!(err, BlobError::Unexpected { .. }), "{err}");
}

#[test]
fn the_codec_in_the_metadata_must_be_the_one_on_the_wire() {
    let (base, sha, w) = base_and_update();
    let specs = w.specs();
    let blob = encode(&w, UpdateCodec::DeltaInt8, Some((&base, &sha)), None).expect("encodes");
    let err =
        decode(&blob.bytes, Codec::SafetensorsInt8, Some(&specs), None).expect_err("mismatch");
    assert_eq!(
        err,
        BlobError::CodecMismatch {
            wire: "int8".into(),
            blob: "delta-int8".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "the wire says codec int8 but the blob's metadata says \"delta-int8\""
    );
    // The f32 decoder refuses a blob that says it is something else.
    let f16 = encode(&w, UpdateCodec::F16, None, None).expect("encodes");
    let err = decode(&f16.bytes, Codec::SafetensorsF32, Some(&specs), None).expect_err("f32");
    assert!(matches!(err, BlobError::CodecMismatch { .. }), "{err}");
    // A compressed blob must say what it is.
    let unnamed = rebuild(&f16.bytes, |_, m| {
        m.remove(META_CODEC);
    });
    let err = decode(&unnamed, Codec::SafetensorsF16, Some(&specs), None).expect_err("unnamed");
    assert_eq!(
        err,
        BlobError::MissingMetadata {
            key: META_CODEC.into()
        }
    );
    let err = decode(&f16.bytes, Codec::Unspecified, None, None).expect_err("unspecified");
    assert_eq!(err, BlobError::UnsupportedCodec(0));
}

#[test]
fn a_delta_needs_the_base_it_was_computed_against() {
    let (base, sha, w) = base_and_update();
    let specs = w.specs();
    for codec in [
        UpdateCodec::DeltaF16,
        UpdateCodec::DeltaInt8,
        UpdateCodec::DeltaTopK { fraction: 0.1 },
    ] {
        let blob = encode(&w, codec, Some((&base, &sha)), None).expect("encodes");
        let err = decode(&blob.bytes, blob.codec, Some(&specs), None).expect_err("no base");
        assert_eq!(
            err,
            BlobError::MissingBase {
                codec: codec.name().into()
            }
        );
        let other = model(2).encode().sha256;
        let err = decode(&blob.bytes, blob.codec, Some(&specs), Some((&base, &other)))
            .expect_err("other base");
        assert_eq!(
            err,
            BlobError::BaseMismatch {
                expected: other.clone(),
                actual: sha.clone()
            }
        );
        let unnamed = rebuild(&blob.bytes, |_, m| {
            m.remove(META_BASE_SHA256);
        });
        let err = decode(&unnamed, blob.codec, Some(&specs), Some((&base, &sha)))
            .expect_err("no base digest");
        assert_eq!(
            err.to_string(),
            "the blob's metadata has no \"pollen.base_sha256\""
        );
        // Digests compare in either case.
        decode(
            &blob.bytes,
            blob.codec,
            Some(&specs),
            Some((&base, &sha.to_uppercase())),
        )
        .expect("same digest");
        let err = encode(&w, codec, None, None).expect_err("encode without base");
        assert_eq!(
            err,
            BlobError::MissingBase {
                codec: codec.name().into()
            }
        );
        let err = encode(&w, codec, Some((&base, "")), None).expect_err("no digest");
        assert_eq!(
            err,
            BlobError::MissingBase {
                codec: codec.name().into()
            }
        );
    }
    // A base of another shape is named, on either side.
    let mut reshaped = base.clone();
    reshaped.tensors[0].shape = vec![2, 4, 3, 3];
    let err = encode(&w, UpdateCodec::DeltaF16, Some((&reshaped, &sha)), None).expect_err("layout");
    assert_eq!(
        err.to_string(),
        "the base does not fit the model at tensor \"conv.bias\": its shape is [2, 4, 3, 3], \
         the model's [4]"
    );
    let blob = encode(&w, UpdateCodec::DeltaF16, Some((&base, &sha)), None).expect("encodes");
    let mut smaller = base.clone();
    smaller.tensors.pop();
    let err = decode(
        &blob.bytes,
        blob.codec,
        Some(&specs),
        Some((&smaller, &sha)),
    )
    .expect_err("layout");
    assert!(
        matches!(err, BlobError::Layout { role: "base", .. }),
        "{err}"
    );
    let err = decode(
        &blob.bytes,
        blob.codec,
        Some(&specs),
        Some((&reshaped, &sha)),
    )
    .expect_err("layout");
    assert!(
        matches!(err, BlobError::Layout { role: "base", .. }),
        "{err}"
    );
}

#[test]
fn a_base_plus_delta_that_overflows_is_refused() {
    let mut base = model(1);
    data_mut(&mut base, "conv.bias")[0] = 3e38;
    let sha = base.encode().sha256;
    let specs = base.specs();
    let topk = encode(
        &base,
        UpdateCodec::DeltaTopK { fraction: 1.0 },
        Some((&base, &sha)),
        None,
    )
    .expect("encodes");
    let huge = rebuild(&topk.bytes, |t, _| {
        t.insert(
            "conv.bias:idx".into(),
            (Dtype::U32, vec![1], u32_bytes(&[0])),
        );
        t.insert(
            "conv.bias:val".into(),
            (Dtype::F32, vec![1], f32_bytes(&[3e38])),
        );
    });
    let err =
        decode(&huge, Codec::DeltaTopk, Some(&specs), Some((&base, &sha))).expect_err("overflow");
    assert_eq!(
        err,
        BlobError::NonFiniteResult {
            tensor: "conv.bias".into(),
            index: 0,
            base: 3e38,
            delta: 3e38
        }
    );
    assert_eq!(
        err.to_string(),
        "tensor \"conv.bias\": base 300000000000000000000000000000000000000 + delta \
         300000000000000000000000000000000000000 at flat index 0 is not finite"
    );
    let int8 = encode(&base, UpdateCodec::DeltaInt8, Some((&base, &sha)), None).expect("encodes");
    let huge = rebuild(&int8.bytes, |t, _| {
        t.insert("conv.bias".into(), (Dtype::I8, vec![4], vec![127, 0, 0, 0]));
        t.insert(
            "conv.bias:scale".into(),
            (Dtype::F32, vec![1], f32_bytes(&[1e37])),
        );
    });
    let err =
        decode(&huge, Codec::DeltaInt8, Some(&specs), Some((&base, &sha))).expect_err("overflow");
    assert!(
        matches!(&err, BlobError::NonFiniteResult { tensor, index: 0, .. } if tensor == "conv.bias"),
        "{err}"
    );
    // And a delta that overflows f32 is refused before it is sent.
    let mut far = base.clone();
    data_mut(&mut far, "conv.bias")[0] = -3e38;
    let err = encode(&far, UpdateCodec::DeltaF16, Some((&base, &sha)), None).expect_err("inf");
    assert!(
        matches!(&err, BlobError::NonFinite { tensor, index: 0, .. } if tensor == "conv.bias"),
        "{err}"
    );
}

#[test]
fn values_beyond_f16_and_bad_inputs_are_refused_when_encoding() {
    let mut p = model(1);
    data_mut(&mut p, "fc.weight")[5] = 70_000.0;
    let err = encode(&p, UpdateCodec::F16, None, None).expect_err("beyond f16");
    assert_eq!(
        err.to_string(),
        "tensor \"fc.weight\": value 70000 at flat index 5 does not fit f16 (largest finite \
         value 65504)"
    );
    // Int8 has no range limit.
    encode(&p, UpdateCodec::Int8, None, None).expect("int8 scales it");
    data_mut(&mut p, "fc.weight")[5] = f32::NAN;
    for codec in [UpdateCodec::F16, UpdateCodec::Int8] {
        let err = encode(&p, codec, None, None).expect_err("NaN");
        assert!(
            matches!(err, BlobError::NonFinite { index: 5, .. }),
            "{err}"
        );
    }
    let base = model(1);
    let sha = base.encode().sha256;
    for fraction in [0.0, -0.1, 1.5, f64::NAN] {
        let err = encode(
            &base,
            UpdateCodec::DeltaTopK { fraction },
            Some((&base, &sha)),
            None,
        )
        .expect_err("fraction");
        assert!(matches!(err, BlobError::BadFraction(_)), "{err}");
    }
    let reserved =
        Parameters::new(vec![NamedTensor::new("w:scale", vec![1], vec![1.0])]).expect("valid");
    let err = encode(&reserved, UpdateCodec::Int8, None, None).expect_err("reserved");
    assert!(matches!(err, BlobError::ReservedName { .. }), "{err}");
    let mut short = model(1);
    short.tensors[0].data.pop();
    let err = encode(&short, UpdateCodec::F32, None, None).expect_err("short");
    assert!(matches!(err, BlobError::Length { .. }), "{err}");
}
