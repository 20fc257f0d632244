//! Local training throughput of one client (samples/s), for quick profiling:
//! `cargo run --release -p pollen-client --example train_speed -- [mnist-2nn|mnist-cnn] [batch]`.

use std::sync::Arc;
use std::time::Instant;

use pollen_client::mnist::Mnist;
use pollen_client::model::{ModelKind, initial_parameters};
use pollen_client::trainer::{self, LocalData, TrainConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind: ModelKind = args
        .get(1)
        .map_or("mnist-2nn", String::as_str)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let batch: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist");
    let mnist = Mnist::load(dir)?;
    let train = Arc::new(mnist.train);
    let data = LocalData {
        split: train,
        indices: (0..600).collect(),
    };
    let params = initial_parameters(kind, 1)?;
    let cfg = TrainConfig {
        local_epochs: 1,
        batch_size: batch,
        learning_rate: 0.05,
    };
    for _ in 0..5 {
        let t = Instant::now();
        let out = trainer::fit(kind, &params, &data, cfg, 1)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "{}: {} samples in {:.3} s = {:.0} samples/s, {:.3} ms/step",
            kind.name(),
            out.num_examples,
            s,
            out.num_examples as f64 / s,
            s * 1000.0 / out.steps as f64
        );
    }
    let test = LocalData::all(Arc::new(mnist.test));
    let t = Instant::now();
    let ev = trainer::evaluate(kind, &params, &test, 1000)?;
    println!(
        "evaluate 10k: {:.3} s (acc {:.3})",
        t.elapsed().as_secs_f64(),
        ev.accuracy
    );
    Ok(())
}
