//! Agents built without LibTorch (the default build) asked to train a TorchScript model: every
//! fit fails with a `client_error` that says how to get LibTorch, the run goes on recording
//! it, and the global model stays the initial one.
#![cfg(not(feature = "torch"))]

use pollen_coordinator::records::RoundStatus;
use pollen_proto::{NamedTensor, Parameters};
use pollen_workflows::RunSpec;
use pollen_workflows::simulate::{SimulateOptions, Transport, simulate};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn agents_without_libtorch_refuse_a_torchscript_model_and_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Any bytes do: the agents check the file's digest, then refuse before loading it.
    let module = dir.path().join("model.pt");
    std::fs::write(&module, b"a TorchScript archive would be here").expect("write");
    // No device can make the module's weights, so the spec names them.
    let initial = Parameters::new(vec![
        NamedTensor::new("head.weight", vec![10, 784], vec![0.01; 7840]),
        NamedTensor::new("head.bias", vec![10], vec![0.0; 10]),
    ])
    .expect("tensors");
    let initial_file = dir.path().join("initial.safetensors");
    std::fs::write(
        &initial_file,
        initial.encode_with_metadata(Default::default()),
    )
    .expect("write");
    let text = format!(
        r#"
name = "torchscript-without-libtorch"
seed = 1
rounds = 2
round_timeout = "60s"
model = {{ family = "torchscript", file = "{}", initial = "{}" }}

[data]
dir = "data/mnist"
clients = 10
partition = {{ kind = "iid" }}

[strategy]
name = "fedavg"
fraction_fit = 0.3
fraction_evaluate = 0.3

[train]
local_epochs = 1
batch_size = 32
learning_rate = 0.05

[evaluate]
centralized = false
"#,
        module.display(),
        initial_file.display()
    );
    let spec = RunSpec::parse(&text, "tests/torchscript_without_libtorch.rs").expect("valid");
    let runs = tempfile::tempdir().expect("tempdir");
    let mut options = SimulateOptions::new(runs.path());
    options.transport = Transport::Device;
    let sim = simulate(&spec, &options, CancellationToken::new(), |_| {})
        .await
        .expect("the run goes on through its failed rounds");
    assert_eq!(sim.summary.rounds.len(), 2, "every round was held");
    for r in &sim.summary.rounds {
        assert_eq!(r.status, RoundStatus::Failed, "round {}", r.round);
        assert_eq!(r.failures_by_reason.get("client_error"), Some(&3), "{r:?}");
        for f in &r.failures {
            assert!(
                f.message.contains("built without LibTorch")
                    && f.message.contains("--features torch"),
                "{}",
                f.message
            );
        }
    }
    assert_eq!(
        *sim.summary.parameters, initial,
        "the global model is untouched"
    );
}
