//! The f32 blob: round trips, digests, and every way a blob can be wrong.

use super::*;

fn sample() -> Parameters {
    Parameters::new(vec![
        NamedTensor::new("fc2.bias", vec![2], vec![0.5, -0.5]),
        NamedTensor::new("fc1.weight", vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
    ])
    .expect("valid")
}

#[test]
fn encode_then_decode_returns_the_same_parameters() {
    let p = sample();
    let blob = p.encode();
    assert_eq!(blob.sha256, sha256_hex(&blob.bytes));
    let back = Parameters::from_wire(&blob.to_inline(), Some(&p.specs())).expect("decodes");
    assert_eq!(back, p);
    assert_eq!(back.tensors[0].name, "fc1.weight");
    assert_eq!(p.num_params(), 8);
}

#[test]
fn a_tampered_blob_fails_its_digest() {
    let blob = sample().encode();
    let mut wire = blob.to_inline();
    if let Some(Body::Inline(b)) = wire.body.as_mut() {
        let mut data = b.data.to_vec();
        let last = data.len() - 1;
        data[last] ^= 1;
        b.data = data.into();
    }
    let err = Parameters::from_wire(&wire, None).expect_err("tampered");
    assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
}

#[test]
fn an_inline_blob_may_leave_its_digest_out_but_a_reference_may_not() {
    let p = sample();
    let unhashed = p.encode_unhashed();
    assert!(unhashed.sha256.is_empty());
    assert_eq!(
        unhashed.bytes,
        p.encode().bytes,
        "same bytes, only no digest"
    );
    let back = Parameters::from_wire(&unhashed.to_inline(), Some(&p.specs())).expect("decodes");
    assert_eq!(back, p);
    // The codec is still checked without a digest.
    let err = verify_inline(&unhashed.bytes, "", 99).expect_err("unknown codec");
    assert!(matches!(err, BlobError::UnsupportedCodec(99)), "{err}");
    // A digest that is given is checked.
    let err = verify_inline(
        &unhashed.bytes,
        &"0".repeat(64),
        Codec::SafetensorsF32 as i32,
    )
    .expect_err("wrong digest");
    assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
    // What readers of referenced blobs use: no digest is a mismatch.
    let err = verify(&unhashed.bytes, "", Codec::SafetensorsF32 as i32).expect_err("empty");
    assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
}

#[test]
fn the_finiteness_scan_names_the_first_bad_value_past_any_chunk_boundary() {
    let n = 5000;
    let mut data = vec![0.5f32; n];
    data[4097] = f32::NEG_INFINITY;
    data[4999] = f32::NAN;
    assert!(!all_finite(&data));
    assert!(all_finite(&data[..4097]));
    let p = Parameters::new(vec![NamedTensor::new("w", vec![n], data)]).expect("valid");
    let err = Parameters::decode(&p.encode().bytes, None).expect_err("non-finite");
    match err {
        BlobError::NonFinite {
            tensor,
            index,
            value,
        } => {
            assert_eq!((tensor.as_str(), index), ("w", 4097));
            assert_eq!(value, f32::NEG_INFINITY);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn wrong_shapes_missing_and_extra_tensors_are_named() {
    let p = sample();
    let bytes = p.encode().bytes;
    let mut specs = p.specs();
    specs[0].shape = vec![3, 2];
    let err = Parameters::decode(&bytes, Some(&specs)).expect_err("shape");
    assert_eq!(
        err.to_string(),
        "tensor \"fc1.weight\" has shape [2, 3], expected [3, 2]"
    );
    let err = Parameters::decode(&bytes, Some(&p.specs()[..1])).expect_err("extra");
    assert_eq!(
        err,
        BlobError::Unexpected {
            tensor: "fc2.bias".into()
        }
    );
    let mut more = p.specs();
    more.push(TensorSpec {
        name: "fc3.bias".into(),
        shape: vec![1],
    });
    let err = Parameters::decode(&bytes, Some(&more)).expect_err("missing");
    assert_eq!(
        err,
        BlobError::Missing {
            tensor: "fc3.bias".into()
        }
    );
}

#[test]
fn nan_and_infinity_are_rejected_with_their_position() {
    let mut p = sample();
    p.tensors[1].data[1] = f32::NAN;
    let err = Parameters::decode(&p.encode().bytes, None).expect_err("nan");
    assert!(
        matches!(&err, BlobError::NonFinite { tensor, index: 1, .. } if tensor == "fc2.bias"),
        "{err}"
    );
    p.tensors[1].data[1] = f32::INFINITY;
    assert!(Parameters::decode(&p.encode().bytes, None).is_err());
}

#[test]
fn garbage_is_not_a_blob() {
    let err = Parameters::decode(b"definitely not safetensors", None).expect_err("garbage");
    assert!(matches!(err, BlobError::Malformed(_)));
    let err =
        Parameters::new(vec![NamedTensor::new("x", vec![2, 2], vec![1.0])]).expect_err("short");
    assert!(matches!(
        err,
        BlobError::Length {
            expected: 4,
            actual: 1,
            ..
        }
    ));
}
