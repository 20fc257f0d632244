//! Micro-benchmark of FedAvg's streaming fold: one client update of the MNIST CNN's shapes
//! (1,663,370 parameters) added into the running weighted sum, and the final scaling.
//! `cargo bench --manifest-path micro-benches/Cargo.toml --bench fedavg`; whole-system numbers:
//! `pollen-bench aggregate`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pollen_coordinator::FedAvg;
use pollen_coordinator::fedavg::FedAvgConfig;
use pollen_coordinator::strategy::Strategy;
use pollen_proto::{NamedTensor, Parameters};

/// The MNIST CNN's tensors, by name and shape.
const CNN: &[(&str, &[usize])] = &[
    ("conv1.weight", &[32, 1, 5, 5]),
    ("conv1.bias", &[32]),
    ("conv2.weight", &[64, 32, 5, 5]),
    ("conv2.bias", &[64]),
    ("fc1.weight", &[3136, 512]),
    ("fc1.bias", &[512]),
    ("fc2.weight", &[512, 10]),
    ("fc2.bias", &[10]),
];

fn model(fill: f32) -> Parameters {
    Parameters::new(
        CNN.iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                NamedTensor::new(
                    *name,
                    shape.to_vec(),
                    (0..n).map(|i| fill + (i % 7) as f32).collect(),
                )
            })
            .collect(),
    )
    .expect("valid shapes")
}

fn fold(c: &mut Criterion) {
    let global = model(0.0);
    let update = model(1.0);
    let bytes = (global.num_params() * 4) as u64;
    let mut strategy = FedAvg::new(FedAvgConfig::default());
    let mut group = c.benchmark_group("fedavg");
    group.throughput(Throughput::Bytes(bytes));
    let mut aggregator = strategy.fit_aggregator(1, &global);
    group.bench_function("fold_cnn_update", |b| {
        b.iter(|| {
            aggregator
                .fold(std::hint::black_box(&update), 10)
                .expect("fold")
        })
    });
    group.throughput(Throughput::Bytes(10 * bytes));
    group.bench_function("fold_10_updates_and_finish_cnn", |b| {
        b.iter(|| {
            let mut agg = strategy.fit_aggregator(1, &global);
            for i in 0..10 {
                agg.fold(&update, 10 + i).expect("fold");
            }
            agg.finish()
        })
    });
    group.finish();
}

criterion_group!(benches, fold);
criterion_main!(benches);
