//! The driver over a [`MemoryStore`], with the tests playing the devices: what the coordinator
//! does with weights that travel through object storage, without a broker or an S3 server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pollen_proto::blob::{check_digest, sha256_hex};
use pollen_proto::fleet::{
    BlobRef, ClientMessage, Codec, Failure, FailureCode, FitIns, FitRes, GetParametersIns,
    ParametersRes, ServerMessage, Weights, client_message::Msg as ClientMsg,
    server_message::Msg as ServerMsg, weights::Body,
};
use pollen_proto::{NamedTensor, Parameters};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DriverConfig, RoundDriver, RunSummary};
use crate::fedavg::{FedAvg, FedAvgConfig};
use crate::registry::Registry;
use crate::storage::{BlobStore, MemoryStore};
use crate::strategy::ClientInfo;

/// The run id of a driver without records, which names its objects.
const RUN: &str = "unrecorded";

fn model(value: f32) -> Parameters {
    Parameters::new(vec![NamedTensor::new("w", vec![4], vec![value; 4])]).expect("valid")
}

fn values(p: &Parameters) -> Vec<f32> {
    p.tensors[0].data.clone()
}

/// How a test device answers a fit.
#[derive(Clone, Copy)]
enum Answer {
    /// Uploads `global + delta` and names it truthfully.
    Shift(f32),
    /// Uploads `global + 1` but reports another digest.
    WrongDigest,
    /// Uploads one byte more than an update of this model may be, and reports its true size
    /// and digest.
    Oversize,
    /// Uploads `global + 1` to its own key, but names `dev-honest`'s key in its answer.
    OtherKey,
}

/// Registers `id` with the coordinator and answers its instructions until told to stop. A
/// transfer the store refuses becomes a `BLOB_TRANSFER` failure naming why.
fn device(registry: &Arc<Registry>, store: &Arc<MemoryStore>, id: &str, answer: Answer) {
    let (tx, mut rx) = mpsc::channel(16);
    let info = ClientInfo {
        id: id.to_string(),
        num_examples: 10,
        agent_version: "test".into(),
        properties: Default::default(),
        data: None,
    };
    registry.register(info, tx);
    let (registry, store, id) = (registry.clone(), store.clone(), id.to_string());
    tokio::spawn(async move {
        while let Some(Ok(ServerMessage { msg: Some(msg) })) = rx.recv().await {
            let (request_id, round, answered) = match msg {
                ServerMsg::Fit(ins) => (ins.request_id, ins.round, fit(&store, ins, answer)),
                ServerMsg::GetParameters(ins) => (ins.request_id, 0, offer(&store, ins)),
                ServerMsg::Stop(_) => break,
                _ => continue,
            };
            let msg = answered.unwrap_or_else(|message| {
                ClientMsg::Failure(Failure {
                    request_id,
                    round,
                    code: FailureCode::BlobTransfer as i32,
                    message,
                })
            });
            registry.route(&id, ClientMessage { msg: Some(msg) });
        }
    });
}

fn reference(location: String, bytes: &Bytes, sha256: String) -> Weights {
    Weights {
        body: Some(Body::Reference(BlobRef {
            location,
            sha256,
            size_bytes: bytes.len() as u64,
            codec: Codec::SafetensorsF32 as i32,
            url: String::new(),
        })),
    }
}

fn fit(store: &MemoryStore, ins: FitIns, answer: Answer) -> Result<ClientMsg, String> {
    let Some(Body::Reference(global)) = ins.weights.and_then(|w| w.body) else {
        return Err("the global model did not come by reference".into());
    };
    let global_bytes = store.download(&global.url).map_err(|e| e.to_string())?;
    check_digest(&global_bytes, &global.sha256).map_err(|e| e.to_string())?;
    let mut params = Parameters::decode(&global_bytes, None).map_err(|e| e.to_string())?;
    let upload = ins.upload.ok_or("no upload URL")?;
    let delta = match answer {
        Answer::Shift(delta) => delta,
        _ => 1.0,
    };
    for t in &mut params.tensors {
        t.data.iter_mut().for_each(|x| *x += delta);
    }
    let blob = params.encode();
    let (bytes, sha256, location) = match answer {
        Answer::Shift(_) => (blob.bytes, blob.sha256, upload.location),
        Answer::WrongDigest => (blob.bytes, "0".repeat(64), upload.location),
        Answer::Oversize => {
            let bytes = Bytes::from(vec![0u8; 2 * global_bytes.len() + 64 * 1024 + 1]);
            let sha256 = sha256_hex(&bytes);
            (bytes, sha256, upload.location)
        }
        Answer::OtherKey => {
            let other = store.keys().update(&ins.run_id, ins.round, "dev-honest");
            (blob.bytes, blob.sha256, other)
        }
    };
    store
        .upload(&upload.url, bytes.clone())
        .map_err(|e| e.to_string())?;
    Ok(ClientMsg::Fit(FitRes {
        request_id: ins.request_id,
        round: ins.round,
        weights: Some(reference(location, &bytes, sha256)),
        num_examples: 10,
        metrics: Default::default(),
    }))
}

/// Offers `model(0.5)` as the initial parameters.
fn offer(store: &MemoryStore, ins: GetParametersIns) -> Result<ClientMsg, String> {
    let upload = ins.upload.ok_or("no upload URL")?;
    let blob = model(0.5).encode();
    store
        .upload(&upload.url, blob.bytes.clone())
        .map_err(|e| e.to_string())?;
    Ok(ClientMsg::Parameters(ParametersRes {
        request_id: ins.request_id,
        weights: Some(reference(upload.location, &blob.bytes, blob.sha256)),
    }))
}

/// One round of FedAvg over every registered client, weights through `store`.
async fn one_round(
    registry: &Arc<Registry>,
    store: &Arc<MemoryStore>,
    initial: Option<Parameters>,
) -> RunSummary {
    let clients = registry.len();
    let mut strategy = FedAvg::new(FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: 1,
        min_available_clients: clients,
        ..Default::default()
    });
    if let Some(p) = initial {
        strategy = strategy.with_initial_parameters(p);
    }
    let config = DriverConfig {
        num_rounds: 1,
        round_timeout: Duration::from_secs(10),
        wait_for_clients: Duration::from_secs(1),
        ..Default::default()
    };
    RoundDriver::new(registry.clone(), Box::new(strategy), config)
        .with_store(store.clone())
        .run(CancellationToken::new())
        .await
        .expect("the run completes")
}

/// The objects left once the driver's deletions, which run in the background, are done.
async fn settled(store: &MemoryStore) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.stored().iter().any(|k| k.contains("/updates/"))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.stored()
}

#[tokio::test]
async fn updates_that_cannot_be_used_are_rejected_counted_and_deleted_from_the_store() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new("t/"));
    device(&registry, &store, "dev-honest", Answer::Shift(2.0));
    device(&registry, &store, "dev-liar", Answer::WrongDigest);
    device(&registry, &store, "dev-bloated", Answer::Oversize);
    device(&registry, &store, "dev-misnamer", Answer::OtherKey);
    let summary = one_round(&registry, &store, Some(model(0.0))).await;

    let r = &summary.rounds[0];
    assert_eq!(r.participants, vec!["dev-honest"], "{:?}", r.failures);
    assert_eq!(r.rejected_updates, 3);
    assert_eq!(registry.counters().snapshot().updates_rejected, 3);
    for (client, why) in [
        ("dev-liar", "digest mismatch"),
        ("dev-bloated", "more than the"),
        ("dev-misnamer", "this request's upload key is"),
    ] {
        let f = r.failures.iter().find(|f| f.client == client);
        let f = f.unwrap_or_else(|| panic!("{client} is not among {:?}", r.failures));
        assert_eq!(f.reason, "rejected", "{f:?}");
        assert!(f.message.contains(why), "{client}: {}", f.message);
    }
    // Only the honest update was folded.
    assert_eq!(values(&summary.parameters), vec![2.0; 4]);
    // Every upload is gone, folded or not; the global model the round read stays.
    assert_eq!(settled(&store).await, vec![store.keys().global(RUN, 0)]);
}

#[tokio::test]
async fn without_initial_parameters_a_client_uploads_them_to_its_initial_key() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    device(&registry, &store, "dev-a", Answer::Shift(1.0));
    let summary = one_round(&registry, &store, None).await;

    assert_eq!(summary.rounds[0].participants, vec!["dev-a"]);
    // Round 1 trained from the offered 0.5.
    assert_eq!(values(&summary.parameters), vec![1.5; 4]);
    let offered = store
        .get(&store.keys().initial(RUN, "dev-a"), 1 << 20)
        .await
        .expect("the offered weights are under the client's initial key");
    let offered = Parameters::decode(&offered, None).expect("decode");
    assert_eq!(values(&offered), vec![0.5; 4]);
    assert_eq!(
        settled(&store).await,
        vec![
            store.keys().initial(RUN, "dev-a"),
            store.keys().global(RUN, 0)
        ]
    );
}
