//! Fuzz targets for every decoder that takes input from a peer. Under `cargo test` each runs
//! its corpus (`tests/__fuzz__/<target>/corpus` and `crashes`, the regression cases) and then
//! random inputs for a few seconds; `BOLERO_RANDOM_TEST_TIME_MS` lengthens that, and
//! `cargo bolero test --package pollen-fuzz <target>` fuzzes with libFuzzer's coverage guidance.
//!
//! Every target asserts what its decoder promises on arbitrary bytes: it returns (an error is
//! fine), never panics, and whatever it accepts satisfies the decoder's own invariants.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bolero::check;
use pollen_coordinator::counters::Counters;
use pollen_coordinator::registry::Registry;
use pollen_coordinator::strategy::ClientInfo;
use pollen_proto::blob::TensorSpec;
use pollen_proto::fleet::{ClientMessage, Codec, client_message::Msg};
use pollen_proto::{NamedTensor, Parameters};
use prost::Message;

/// How long each target runs random inputs in a plain `cargo test`.
const TEST_TIME: Duration = Duration::from_secs(3);

fn base() -> &'static (Parameters, String) {
    static BASE: OnceLock<(Parameters, String)> = OnceLock::new();
    BASE.get_or_init(|| {
        let p = Parameters::new(vec![
            NamedTensor::new(
                "layer.weight",
                vec![2, 3],
                vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25],
            ),
            NamedTensor::new("layer.bias", vec![2], vec![0.1, -0.1]),
        ])
        .expect("valid");
        let sha = p.encode().sha256;
        (p, sha)
    })
}

/// `input` read as edits of one of `seeds`: byte 0 picks the seed, then each 3 bytes
/// `(position hi, position lo, value)` overwrite, insert or delete one byte (by the value's
/// top bits). Random bytes almost never parse as JSON, TOML or safetensors; edits of valid
/// ones reach the checks behind the parser.
fn mutated(seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let Some((&pick, edits)) = input.split_first() else {
        return Vec::new();
    };
    let mut bytes = seeds[usize::from(pick) % seeds.len()].clone();
    for edit in edits.chunks_exact(3) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % bytes.len();
        match edit[2] >> 6 {
            0 => bytes.insert(at, edit[2] & 0x3f | 0x20),
            1 => {
                bytes.remove(at);
            }
            _ => bytes[at] = edit[2],
        }
    }
    bytes
}

/// The base blob in every codec (deltas against the base itself).
fn blob_seeds() -> Vec<Vec<u8>> {
    use pollen_proto::codec::UpdateCodec;
    let (base, sha) = base();
    [
        UpdateCodec::F32,
        UpdateCodec::F16,
        UpdateCodec::Int8,
        UpdateCodec::DeltaF16,
        UpdateCodec::DeltaInt8,
        UpdateCodec::DeltaTopK { fraction: 0.5 },
    ]
    .into_iter()
    .map(|codec| {
        let shifted = Parameters::new(
            base.tensors
                .iter()
                .map(|t| {
                    NamedTensor::new(
                        &t.name,
                        t.shape.clone(),
                        t.data.iter().map(|x| x + 0.5).collect(),
                    )
                })
                .collect(),
        )
        .expect("valid");
        pollen_proto::codec::encode(&shifted, codec, Some((base, sha)), None)
            .expect("encodes")
            .bytes
            .to_vec()
    })
    .collect()
}

/// Weight blobs (updates from devices, global models on devices) in every codec, as random
/// bytes and as edits of valid blobs: accepted blobs hold only finite values in the expected
/// shapes.
#[test]
fn weight_blobs() {
    let (base, sha) = base();
    let expected: Vec<TensorSpec> = base.specs();
    let seeds = blob_seeds();
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        let Some((&selector, rest)) = input.split_first() else {
            return;
        };
        let codec = Codec::try_from(i32::from(selector % 8)).unwrap_or(Codec::Unspecified);
        let edited = mutated(&seeds, rest);
        for (bytes, shapes) in [
            (rest, None),
            (rest, Some(expected.as_slice())),
            (edited.as_slice(), Some(expected.as_slice())),
        ] {
            if let Ok(p) = pollen_proto::codec::decode(bytes, codec, shapes, Some((base, sha))) {
                assert!(
                    p.tensors
                        .iter()
                        .all(|t| t.data.iter().all(|x| x.is_finite()))
                );
                if shapes.is_some() {
                    assert_eq!(p.specs(), expected);
                }
            }
        }
    });
}

/// MQTT command payloads as an edge agent receives them.
#[test]
fn mqtt_commands() {
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        if let Ok(command) = pollen_client::agent::parse_command(input) {
            assert!(!command.request_id.is_empty());
            assert!(!command.request_id.chars().any(char::is_control));
        }
    });
}

/// Proxy announcements as another proxy receives them: accepted ones name their topic's proxy.
#[test]
fn proxy_announcements() {
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        let topic = "pollen/f/pollen-proxy.p-1/proxy";
        if let Some(Some(status)) =
            pollen_proxy::decode_proxy_status(topic, "pollen-proxy.p-1", input)
        {
            assert_eq!(status.proxy_id, "p-1");
        }
        // A level that is no proxy's identity is refused whatever the payload.
        assert!(pollen_proxy::decode_proxy_status("pollen/f/gw-1/proxy", "gw-1", input).is_none());
    });
}

/// MQTT replies and statuses as a proxy receives them: accepted ones name their topic's device.
#[test]
fn mqtt_replies_and_statuses() {
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        let topic = "pollen/f/gw-1/reply";
        if let Some(reply) = pollen_proxy::decode_reply(topic, "gw-1", input) {
            assert_eq!(reply.device_id, "gw-1");
        }
        if let pollen_proxy::StatusUpdate::Status(s) =
            pollen_proxy::decode_status("pollen/f/gw-1/status", "gw-1", input)
        {
            assert_eq!(s.device_id, "gw-1");
        }
    });
}

/// Fleet stream messages from a client, routed by the coordinator's registry while a request
/// of that client is open (replies are pointed at it, so the matching path sees them).
#[test]
fn fleet_messages() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::new(Arc::new(Counters::default()));
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    registry.register(
        ClientInfo {
            id: "gw-1".into(),
            num_examples: 10,
            agent_version: "fuzz".into(),
            properties: Default::default(),
            data: None,
        },
        tx,
    );
    // A panic inside leaves nothing behind that a later input relies on: each input opens a
    // request of its own.
    let state = std::panic::AssertUnwindSafe((runtime, registry, std::sync::Mutex::new(rx)));
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        let (runtime, registry, rx) = &*state;
        let Ok(mut message) = ClientMessage::decode(input) else {
            return;
        };
        let (open, _reply) = runtime
            .block_on(registry.request("gw-1", 1, |_| Default::default()))
            .expect("gw-1 is registered");
        while rx.lock().is_ok_and(|mut rx| rx.try_recv().is_ok()) {}
        match &mut message.msg {
            Some(Msg::Parameters(m)) => m.request_id = open,
            Some(Msg::Fit(m)) => m.request_id = open,
            Some(Msg::Evaluate(m)) => m.request_id = open,
            Some(Msg::Failure(m)) => m.request_id = open,
            Some(Msg::Progress(m)) => m.request_id = open,
            Some(Msg::Statistics(m)) => m.request_id = open,
            Some(Msg::Join(_)) | None => {}
        }
        registry.route("gw-1", message);
    });
}

/// The shipped run specs.
fn spec_seeds() -> Vec<Vec<u8>> {
    [
        include_str!("../../workflows/mnist-2nn.toml"),
        include_str!("../../workflows/mnist-cnn.toml"),
        include_str!("../../workflows/mnist-2nn-noniid.toml"),
        include_str!("../../workflows/basicmotions.toml"),
        include_str!("../../workflows/experiments/fleet-fedbuff.toml"),
        include_str!("../../workflows/experiments/dp-adaptive.toml"),
    ]
    .into_iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Task manifests (JSON, digest already checked) as a device reads them: random bytes, and
/// edits of the manifests of the shipped specs.
#[test]
fn task_manifests() {
    let seeds: Vec<Vec<u8>> = spec_seeds()
        .iter()
        .filter_map(|text| {
            let spec =
                pollen_workflows::RunSpec::parse(std::str::from_utf8(text).ok()?, "seed").ok()?;
            Some(
                pollen_workflows::task::resolve_blind(&spec)
                    .ok()?
                    .to_bytes(),
            )
        })
        .collect();
    assert!(seeds.len() >= 4, "the shipped specs make manifests");
    for seed in &seeds {
        pollen_train::Task::parse(seed).expect("a shipped manifest parses");
    }
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        let _ = pollen_train::Task::parse(input);
        let _ = pollen_train::Task::parse(&mutated(&seeds, input));
    });
}

/// Run specs (TOML) as `pollen simulate --config` and `pollen run` read them: random text, and
/// edits of the shipped specs.
#[test]
fn run_specs() {
    let seeds = spec_seeds();
    check!().with_test_time(TEST_TIME).for_each(|input: &[u8]| {
        for bytes in [input.to_vec(), mutated(&seeds, input)] {
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = pollen_workflows::RunSpec::parse(text, "fuzz.toml");
            }
        }
    });
}
