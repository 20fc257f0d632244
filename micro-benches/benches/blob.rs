//! Micro-benchmarks of the weight-blob codec at the MNIST CNN's size (1,663,370 f32):
//! safetensors encoding with its SHA-256, digest verification, and decoding with the
//! finiteness check. `cargo bench --manifest-path micro-benches/Cargo.toml --bench blob`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pollen_proto::blob::verify;
use pollen_proto::fleet::Codec;
use pollen_proto::{NamedTensor, Parameters};

fn model() -> Parameters {
    let shapes: &[(&str, &[usize])] = &[
        ("conv1.weight", &[32, 1, 5, 5]),
        ("conv1.bias", &[32]),
        ("conv2.weight", &[64, 32, 5, 5]),
        ("conv2.bias", &[64]),
        ("fc1.weight", &[3136, 512]),
        ("fc1.bias", &[512]),
        ("fc2.weight", &[512, 10]),
        ("fc2.bias", &[10]),
    ];
    Parameters::new(
        shapes
            .iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                NamedTensor::new(
                    *name,
                    shape.to_vec(),
                    (0..n).map(|i| (i % 13) as f32 * 0.01).collect(),
                )
            })
            .collect(),
    )
    .expect("valid shapes")
}

fn codec(c: &mut Criterion) {
    let params = model();
    let blob = params.encode();
    let specs = params.specs();
    let mut group = c.benchmark_group("blob");
    group.throughput(Throughput::Bytes(blob.bytes.len() as u64));
    group.bench_function("encode_cnn", |b| {
        b.iter(|| std::hint::black_box(&params).encode())
    });
    group.bench_function("verify_sha256_cnn", |b| {
        b.iter(|| verify(&blob.bytes, &blob.sha256, Codec::SafetensorsF32 as i32).expect("valid"))
    });
    group.bench_function("decode_cnn", |b| {
        b.iter(|| Parameters::decode(&blob.bytes, Some(&specs)).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
