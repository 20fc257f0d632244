//! LibTorch against burn on the same weights and data, and LibTorch's own training and errors.

use std::path::Path;

use pollen_proto::Parameters;

use crate::backend::{Backend, Engine};
use crate::data::arrays::{MnistSplit, read_mnist};
use crate::data::{LocalData, Raw};
use crate::manifest::{
    MANIFEST_VERSION, Normalize, OptimizerKind, TaskKind, TaskManifest, TaskSpec, TrainSpec,
};
use crate::model::{ModelSpec, TorchScriptConfig};
use crate::task::Task;

fn manifest(model: ModelSpec) -> TaskManifest {
    let mut task = TaskSpec::new(TaskKind::Classification);
    task.classes = Some((0..10).map(|d| d.to_string()).collect());
    task.shape = Some(vec![1, 28, 28]);
    task.normalize = Normalize::None;
    task.holdout = Some(0.2);
    TaskManifest {
        version: MANIFEST_VERSION,
        name: "torch-tests".into(),
        seed: 3,
        task,
        model,
        train: sgd(10),
        fitted: Default::default(),
    }
}

fn sgd(batch_size: usize) -> TrainSpec {
    TrainSpec {
        local_epochs: 1,
        batch_size,
        learning_rate: 0.05,
        optimizer: OptimizerKind::Sgd,
        momentum: 0.9,
        weight_decay: 0.0,
        clip_grad_norm: None,
        proximal_mu: 0.0,
        time_budget: None,
    }
}

/// The first `n` MNIST training images, prepared for `task` (a fifth held out).
fn mnist(task: &Task, n: usize) -> LocalData {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let raw =
        Raw::Arrays(read_mnist(&dir, MnistSplit::Train, Some((0..n).collect())).expect("MNIST"));
    task.prepare(&raw).expect("prepares")
}

fn accuracy(task: &Task, data: &LocalData, params: &Parameters) -> (f64, f64) {
    let (loss, _, metrics) = task
        .evaluate(data, &data.holdout, params, 50)
        .expect("evaluates");
    let acc = pollen_proto::scalar::numeric_entries(&metrics)
        .find(|(k, _)| *k == "accuracy")
        .map(|(_, v)| v)
        .expect("accuracy");
    (loss, acc)
}

fn presets() -> [(&'static str, ModelSpec); 2] {
    [
        ("mnist-2nn", ModelSpec::preset("mnist-2nn").expect("preset")),
        ("mnist-cnn", ModelSpec::preset("mnist-cnn").expect("preset")),
    ]
}

#[test]
fn libtorch_computes_burns_forward_pass_on_the_same_weights() {
    for (name, model) in presets() {
        let burn = Task::new(manifest(model.clone()))
            .expect("task")
            .with_backend(Backend::Burn);
        let torch = Task::new(manifest(model))
            .expect("task")
            .with_backend(Backend::Libtorch);
        assert_eq!(burn.engine().expect("burn"), Engine::Burn);
        assert_eq!(torch.engine().expect("libtorch"), Engine::Libtorch);
        let data = mnist(&burn, 500);
        // Trained a little, so that the outputs are not those of random weights.
        let params = burn
            .fit(
                &data,
                &burn.initial_parameters().expect("init"),
                &sgd(10),
                1,
            )
            .expect("fits")
            .parameters;
        let (burn_loss, burn_acc) = accuracy(&burn, &data, &params);
        let (torch_loss, torch_acc) = accuracy(&torch, &data, &params);
        eprintln!("{name}: burn {burn_loss:.6} {burn_acc}, libtorch {torch_loss:.6} {torch_acc}");
        assert!(
            (burn_loss - torch_loss).abs() <= 1e-4 * burn_loss.max(1.0),
            "{name}: holdout loss {burn_loss} on burn, {torch_loss} on LibTorch"
        );
        assert_eq!(burn_acc, torch_acc, "{name}");
    }
}

/// Same batches, same SGD: the two libraries train the same model.
#[test]
fn libtorch_trains_the_built_in_families_as_burn_does() {
    for (name, model) in presets() {
        let task = Task::new(manifest(model))
            .expect("task")
            .with_backend(Backend::Libtorch);
        let data = mnist(&task, 1000);
        let start = task.initial_parameters().expect("burn's initial weights");
        let (_, before) = accuracy(&task, &data, &start);
        // Plain SGD: momentum 0.9 at this rate is chaotic enough early on that float rounding
        // alone sends the two runs apart.
        let cfg = TrainSpec {
            momentum: 0.0,
            ..sgd(10)
        };
        let out = task.fit(&data, &start, &cfg, 5).expect("fits");
        let (_, after) = accuracy(&task, &data, &out.parameters);
        let burn = Task::new(task.manifest.clone())
            .expect("task")
            .with_backend(Backend::Burn);
        let burn_out = burn.fit(&data, &start, &cfg, 5).expect("fits");
        let (_, burn_after) = accuracy(&burn, &data, &burn_out.parameters);
        eprintln!(
            "{name}: {before} -> {after} after one epoch over 800 images (burn: {burn_after}, loss {} vs {})",
            out.loss, burn_out.loss
        );
        assert_eq!(out.num_examples, 800);
        assert_eq!(out.steps, 80);
        assert_eq!(
            out.parameters.specs(),
            start.specs(),
            "{name}: same names and shapes"
        );
        assert!(after > before + 0.3, "{name}: {before} -> {after}");
        // Same batches, same SGD: the same model, up to float rounding.
        assert!(
            (out.loss - burn_out.loss).abs() <= 1e-3 * burn_out.loss,
            "{name}: training loss {} on LibTorch, {} on burn",
            out.loss,
            burn_out.loss
        );
        assert!(
            (after - burn_after).abs() <= 0.01,
            "{name}: {after} vs burn's {burn_after}"
        );
        // The same seed draws the same batches.
        let again = task.fit(&data, &start, &cfg, 5).expect("fits");
        assert!(
            (again.loss - out.loss).abs() < 1e-6,
            "{} vs {}",
            again.loss,
            out.loss
        );
    }
}

#[test]
fn weights_that_do_not_fit_the_network_are_refused_by_name() {
    let task = Task::new(manifest(ModelSpec::preset("mnist-2nn").expect("preset")))
        .expect("task")
        .with_backend(Backend::Libtorch);
    let data = mnist(&task, 100);
    let mut params = task.initial_parameters().expect("init");
    params.tensors.retain(|t| t.name != "fc3.bias");
    let e = task
        .fit(&data, &params, &sgd(10), 1)
        .expect_err("missing tensor");
    assert!(e.to_string().contains("fc3.bias"), "{e}");
}

#[test]
fn a_file_that_is_not_a_torchscript_module_fails_with_how_to_make_one() {
    let bytes = bytes::Bytes::from_static(b"not a zip archive of TorchScript");
    let sha256 = pollen_proto::blob::sha256_hex(&bytes);
    let model = ModelSpec::TorchScript(TorchScriptConfig {
        file: None,
        sha256: sha256.clone(),
        size_bytes: bytes.len() as u64,
        initial: None,
    });
    let task = Task::new(manifest(model))
        .expect("task")
        .with_files([(sha256.as_str(), bytes)])
        .expect("the file is the one named");
    let e = task.initial_parameters().expect_err("not a module");
    assert!(
        e.to_string().contains("not a TorchScript module")
            && e.to_string().contains("torch.jit.script"),
        "{e}"
    );
    // A task whose file did not come is refused before anything loads.
    let other = ModelSpec::TorchScript(TorchScriptConfig {
        file: None,
        sha256: "ab".repeat(32),
        size_bytes: 1,
        initial: None,
    });
    let e = Task::new(manifest(other))
        .expect("task")
        .with_files(std::iter::empty())
        .expect_err("no file");
    assert!(e.to_string().contains(&"ab".repeat(32)), "{e}");
}
