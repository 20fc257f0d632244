//! PyTorch users' path, end to end (feature `torch`): a model written in Python and exported
//! with `torch.jit.script` trains federatedly on LibTorch over the device path (proxy, embedded
//! MQTT broker, embedded S3, edge agents), and every checkpoint goes back to PyTorch with
//! `load_state_dict`, giving the accuracy Pollen recorded.
//!
//! Needs LibTorch (Debian: `apt-get install libtorch-dev python3-torch`) and a Python with
//! `torch` and `safetensors`: `POLLEN_PYTHON` (default `/usr/bin/python3`, Debian's, which has
//! python3-torch), with safetensors on its `PYTHONPATH` (`.ci/run` installs it with
//! `pip install --target`).
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::Command;

use pollen_coordinator::records::RoundStatus;
use pollen_train::Backend;
use pollen_workflows::RunSpec;
use pollen_workflows::simulate::{SimulateOptions, Simulation, Transport, simulate};
use tokio_util::sync::CancellationToken;

/// Test images both sides evaluate on: the first N of MNIST's test split.
const TEST_EXAMPLES: usize = 2000;

fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> String {
    std::env::var("POLLEN_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// Runs `tests/python/torch_checks.py` with `args`; its stdout.
fn torch_checks(args: &[&str]) -> String {
    let script = checkout().join("tests/python/torch_checks.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (set POLLEN_PYTHON to a Python with torch and safetensors): {e}",
                python()
            )
        });
    assert!(
        out.status.success(),
        "{} {} {args:?} failed (it needs torch and safetensors: apt-get install python3-torch; \
         pip install --target DIR safetensors and PYTHONPATH=DIR):\n{}",
        python(),
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The accuracy Python measures for a checkpoint, and the round its header names.
fn python_accuracy(args: &[&str]) -> (f64, u64) {
    let out = torch_checks(args);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    (
        v["accuracy"].as_f64().expect("accuracy"),
        v["round"].as_u64().expect("round"),
    )
}

fn mnist() -> String {
    checkout().join("data/mnist").display().to_string()
}

/// MNIST over `clients` devices, `per_round` of them sampled, evaluated centrally on the first
/// [`TEST_EXAMPLES`] test images.
fn spec(model: &str, rounds: u64, clients: usize, per_round: usize) -> RunSpec {
    let text = format!(
        r#"
name = "torch-e2e"
seed = 7
rounds = {rounds}
model = {model}
round_timeout = "600s"

[data]
dir = "data/mnist"
clients = {clients}
partition = {{ kind = "iid" }}

[strategy]
name = "fedavg"
fraction_fit = {fraction}

[train]
local_epochs = 1
batch_size = 32
learning_rate = 0.05
momentum = 0.9

[evaluate]
centralized = true
test_examples = {TEST_EXAMPLES}
"#,
        fraction = per_round as f64 / clients as f64,
    );
    RunSpec::parse(&text, "tests/torch.rs").expect("valid spec")
}

async fn run(spec: &RunSpec, backend: Backend) -> (Simulation, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = SimulateOptions::new(dir.path());
    options.transport = Transport::Device;
    options.backend = backend;
    let sim = simulate(spec, &options, CancellationToken::new(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", spec.name));
    (sim, dir)
}

fn final_checkpoint(sim: &Simulation) -> (PathBuf, f64) {
    let last = sim.summary.rounds.last().expect("rounds");
    let path = sim
        .run_dir
        .join("models")
        .join(format!("round-{:04}.safetensors", last.round));
    (path, last.accuracy.expect("centralized evaluation"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torchscript_model_trains_over_the_device_path_and_loads_back_into_pytorch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("small_cnn.pt");
    let module_str = module.display().to_string();
    torch_checks(&["script", &module_str]);
    let model = format!(r#"{{ family = "torchscript", file = "{module_str}" }}"#);
    let (sim, _runs) = run(&spec(&model, 3, 20, 4), Backend::Auto).await;

    for r in &sim.summary.rounds {
        assert_eq!(
            (r.status, r.succeeded),
            (RoundStatus::Ok, 4),
            "round {}: {:?}",
            r.round,
            r.failures
        );
    }
    // The initial weights are the module's own, which one device sent (Flower's way): chance.
    let initial = sim
        .summary
        .initial_evaluation
        .as_ref()
        .and_then(|e| e.metrics.get("accuracy").copied())
        .expect("the initial model is evaluated");
    let (checkpoint, recorded) = final_checkpoint(&sim);
    eprintln!("TorchScript CNN: initial {initial:.4}, after 3 rounds {recorded:.4}");
    assert!(initial < 0.3, "an untrained module at {initial}");
    assert!(
        recorded >= 0.9 && recorded - initial >= 0.6,
        "3 rounds of 4 devices x 3,000 examples should take the CNN from {initial} to 90%, got {recorded}"
    );

    // Back into the user's own module, strictly by its state_dict names.
    let (python, round) = python_accuracy(&[
        "scripted",
        &module_str,
        &checkpoint.display().to_string(),
        &mnist(),
        &TEST_EXAMPLES.to_string(),
    ]);
    assert_eq!(round, 3, "the checkpoint's header names its round");
    assert!(
        (python - recorded).abs() <= 0.001,
        "PyTorch measures {python} on the final checkpoint, Pollen recorded {recorded}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn built_in_mlp_and_cnn_checkpoints_load_into_pollen_models_py() {
    // The 2NN trained by burn, the CNN once by burn and once by LibTorch: a checkpoint loads
    // whichever library made it.
    let cases = [
        (r#""mnist-2nn""#, 2, Backend::Burn),
        (r#""mnist-cnn""#, 2, Backend::Burn),
        (r#""mnist-cnn""#, 2, Backend::Libtorch),
    ];
    for (model, rounds, backend) in cases {
        let mut spec = spec(model, rounds, 30, 3);
        spec.train.batch_size = 50;
        let (sim, _runs) = run(&spec, backend).await;
        let (checkpoint, recorded) = final_checkpoint(&sim);
        let (python, round) = python_accuracy(&[
            "builtin",
            &checkpoint.display().to_string(),
            &mnist(),
            &TEST_EXAMPLES.to_string(),
        ]);
        let model = format!("{model} on {}", backend.as_str());
        eprintln!("{model}: Pollen {recorded:.4}, pollen_models.py {python:.4}");
        assert_eq!(round, rounds);
        assert!(recorded > 0.8, "{model} after {rounds} rounds: {recorded}");
        assert!(
            (python - recorded).abs() <= 0.001,
            "{model}: pollen_models.py measures {python}, Pollen recorded {recorded}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_output_does_not_fit_the_task_fails_its_fits_with_the_shape_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("seven_classes.pt");
    let module_str = module.display().to_string();
    torch_checks(&["script", &module_str, "--wrong-output"]);
    let model = format!(r#"{{ family = "torchscript", file = "{module_str}" }}"#);
    let mut spec = spec(&model, 2, 20, 2);
    // The module's initial weights come from the spec, so that the run reaches its rounds.
    let initial = dir.path().join("initial.safetensors");
    let export = format!(
        "import torch, safetensors.torch; m = torch.jit.load({module_str:?}); \
         safetensors.torch.save_file({{k: v.contiguous() for k, v in m.named_parameters()}}, {:?})",
        initial.display().to_string()
    );
    let out = Command::new(python())
        .args(["-c", &export])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let pollen_train::ModelSpec::TorchScript(c) = &mut spec.model {
        c.initial = Some(initial.display().to_string());
    }
    spec.evaluate.centralized = false;
    spec.strategy.fraction_evaluate = 0.1;
    let dir_runs = tempfile::tempdir().expect("tempdir");
    let mut options = SimulateOptions::new(dir_runs.path());
    options.transport = Transport::Device;
    let sim = simulate(&spec, &options, CancellationToken::new(), |_| {})
        .await
        .expect("the run goes on through failed rounds");
    assert_eq!(sim.summary.rounds.len(), 2, "every round was held");
    for r in &sim.summary.rounds {
        assert_eq!(r.status, RoundStatus::Failed, "round {}", r.round);
        assert_eq!(r.failures_by_reason.get("client_error"), Some(&2), "{r:?}");
        for f in &r.failures {
            assert!(
                f.message.contains("[32, 7]") && f.message.contains("one logit per class"),
                "{}",
                f.message
            );
        }
    }
}

/// Every built-in family, rebuilt by `python/pollen_models.py` from a checkpoint's header,
/// computes burn's outputs on the same weights and inputs.
#[test]
fn every_family_in_pollen_models_py_computes_burns_forward_pass() {
    use pollen_proto::{NamedTensor, Parameters};
    use pollen_train::manifest::TaskKind;
    use pollen_train::model::{ModelIo, forward_values, initial_parameters};
    use rand::{Rng, SeedableRng};

    let cases = [
        (
            r#"{"family": "mlp", "hidden": [16, 8], "activation": "tanh"}"#,
            vec![6],
        ),
        (
            r#"{"family": "cnn1d", "channels": [4, 8], "kernel_size": 3, "hidden": [8]}"#,
            vec![3, 16],
        ),
        (
            r#"{"family": "cnn2d", "channels": [4, 8], "kernel_size": 3, "hidden": [16]}"#,
            vec![1, 12, 12],
        ),
        (
            r#"{"family": "rnn", "cell": "gru", "hidden_size": [8, 6], "hidden": [5]}"#,
            vec![3, 7],
        ),
        (
            r#"{"family": "rnn", "cell": "lstm", "hidden_size": [8], "activation": "gelu"}"#,
            vec![3, 7],
        ),
        (r#"{"family": "autoencoder", "hidden": [6, 3]}"#, vec![8]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (i, (model, input)) in cases.into_iter().enumerate() {
        let spec: pollen_train::ModelSpec = serde_json::from_str(model).expect("a family");
        let anomaly = spec.family() == "autoencoder";
        let io = ModelIo {
            kind: if anomaly {
                TaskKind::Anomaly
            } else {
                TaskKind::Classification
            },
            outputs: if anomaly { input.iter().product() } else { 3 },
            input: input.clone(),
        };
        let params = initial_parameters(&spec, &io, i as u64).expect("weights");
        let batch = 5;
        let x: Vec<f32> = (0..batch * io.input_len())
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let y = forward_values(&spec, &io, &params, x.clone(), batch).expect("forward");
        let manifest = serde_json::json!({
            "task": {
                "kind": if anomaly { "anomaly" } else { "classification" },
                "classes": ["a", "b", "c"],
                "shape": input,
            },
            "model": spec,
        });
        let checkpoint = dir.path().join(format!("family-{i}.safetensors"));
        let meta = std::collections::HashMap::from([
            ("pollen.manifest".to_string(), manifest.to_string()),
            ("pollen.round".to_string(), "0".to_string()),
        ]);
        std::fs::write(&checkpoint, params.encode_with_metadata(meta)).expect("write");
        let io_file = dir.path().join(format!("io-{i}.safetensors"));
        let tensors = Parameters::new(vec![
            NamedTensor::new("x", vec![batch, io.input_len()], x),
            NamedTensor::new("y", vec![batch, io.outputs], y),
        ])
        .expect("tensors");
        std::fs::write(&io_file, tensors.encode_with_metadata(Default::default())).expect("write");
        let out = torch_checks(&[
            "forward",
            &checkpoint.display().to_string(),
            &io_file.display().to_string(),
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        let diff = v["max_abs_diff"].as_f64().expect("diff");
        eprintln!(
            "{model}: max |PyTorch - burn| = {diff:e} (outputs up to {})",
            v["max_abs"]
        );
        assert!(diff <= 1e-4, "{model}: PyTorch and burn differ by {diff}");
    }
}
