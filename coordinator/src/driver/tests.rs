//! The driver over a [`MemoryStore`], with the tests playing the devices: what the coordinator
//! does with weights that travel through object storage, without a broker or an S3 server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pollen_proto::blob::{check_digest, sha256_hex};
use pollen_proto::codec::UpdateCodec;
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
    /// Never answers a fit (counts the cancels it gets).
    Hang,
    /// Answers `Shift(1.0)` this long after the instruction.
    Late(Duration),
    /// Uploads `global + 1` truthfully but claims this many examples (it announced 10).
    Claim(u64),
    /// Sends `delta` as an int8 change of the global model it decoded, naming that model's
    /// digest; with `false`, names another digest.
    Int8Delta(f32, bool),
}

/// Registers `id` with the coordinator and answers its instructions until told to stop. A
/// transfer the store refuses becomes a `BLOB_TRANSFER` failure naming why. Returns how many
/// cancels it received.
fn device(
    registry: &Arc<Registry>,
    store: &Arc<MemoryStore>,
    id: &str,
    answer: Answer,
) -> Arc<AtomicUsize> {
    let cancels = Arc::new(AtomicUsize::new(0));
    let counted = cancels.clone();
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
                ServerMsg::Fit(_) if matches!(answer, Answer::Hang) => continue,
                ServerMsg::Fit(ins) => {
                    if let Answer::Late(after) = answer {
                        tokio::time::sleep(after).await;
                    }
                    (ins.request_id, ins.round, fit(&store, ins, answer))
                }
                ServerMsg::GetParameters(ins) => (ins.request_id, 0, offer(&store, ins)),
                ServerMsg::Cancel(_) => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
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
    cancels
}

fn reference(location: String, bytes: &Bytes, sha256: String, codec: Codec) -> Weights {
    Weights {
        body: Some(Body::Reference(BlobRef {
            location,
            sha256,
            size_bytes: bytes.len() as u64,
            codec: codec as i32,
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
    let codec = Codec::try_from(global.codec).map_err(|e| e.to_string())?;
    let base =
        pollen_proto::codec::decode(&global_bytes, codec, None, None).map_err(|e| e.to_string())?;
    let mut params = base.clone();
    let upload = ins.upload.ok_or("no upload URL")?;
    let delta = match answer {
        Answer::Shift(delta) | Answer::Int8Delta(delta, _) => delta,
        _ => 1.0,
    };
    for t in &mut params.tensors {
        t.data.iter_mut().for_each(|x| *x += delta);
    }
    let mut num_examples = 10;
    let mut blob = params.encode();
    if let Answer::Int8Delta(_, honest) = answer {
        let named = if honest {
            global.sha256.clone()
        } else {
            "0".repeat(64)
        };
        blob = pollen_proto::codec::encode(
            &params,
            UpdateCodec::DeltaInt8,
            Some((&base, &named)),
            None,
        )
        .map_err(|e| e.to_string())?;
    }
    let (bytes, sha256, location) = match answer {
        Answer::Shift(_) | Answer::Late(_) | Answer::Int8Delta(..) | Answer::Hang => {
            (blob.bytes, blob.sha256, upload.location)
        }
        Answer::Claim(n) => {
            num_examples = n;
            (blob.bytes, blob.sha256, upload.location)
        }
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
        weights: Some(reference(location, &bytes, sha256, blob.codec)),
        num_examples,
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
        weights: Some(reference(
            upload.location,
            &blob.bytes,
            blob.sha256,
            Codec::SafetensorsF32,
        )),
    }))
}

/// One round of FedAvg over every registered client, weights through `store`.
async fn one_round(
    registry: &Arc<Registry>,
    store: &Arc<MemoryStore>,
    initial: Option<Parameters>,
) -> RunSummary {
    run_with(registry, store, initial, DriverConfig::default()).await
}

/// `config.num_rounds` rounds (1 when left at the default) of FedAvg over every registered
/// client, each round's deadline 10 s unless `config` says otherwise.
async fn run_with(
    registry: &Arc<Registry>,
    store: &Arc<MemoryStore>,
    initial: Option<Parameters>,
    config: DriverConfig,
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
    let defaults = DriverConfig::default();
    let config = DriverConfig {
        num_rounds: if config.num_rounds == defaults.num_rounds {
            1
        } else {
            config.num_rounds
        },
        round_timeout: if config.round_timeout == defaults.round_timeout {
            Duration::from_secs(10)
        } else {
            config.round_timeout
        },
        wait_for_clients: Duration::from_secs(1),
        ..config
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

#[tokio::test(start_paused = true)]
async fn a_round_that_meets_its_target_cancels_the_stragglers() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    device(&registry, &store, "dev-a", Answer::Shift(1.0));
    device(&registry, &store, "dev-b", Answer::Shift(3.0));
    let hang = device(&registry, &store, "dev-slow", Answer::Hang);
    let config = DriverConfig {
        close_after: Some(2),
        round_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let summary = run_with(&registry, &store, Some(model(0.0)), config).await;
    let r = &summary.rounds[0];
    assert_eq!(r.closure.as_deref(), Some("target"));
    assert_eq!(r.stragglers, vec!["dev-slow"]);
    assert_eq!(
        (r.sampled, r.succeeded, r.failed),
        (3, 2, 0),
        "{:?}",
        r.failures
    );
    assert_eq!(values(&summary.parameters), vec![2.0; 4]);
    assert_eq!(registry.counters().snapshot().stragglers_dropped, 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        hang.load(Ordering::SeqCst),
        1,
        "the straggler was told to cancel"
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_after_the_deadline_times_out_and_is_counted_late_when_it_comes() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    device(&registry, &store, "dev-a", Answer::Shift(1.0));
    let late = device(
        &registry,
        &store,
        "dev-late",
        Answer::Late(Duration::from_secs(30)),
    );
    let config = DriverConfig {
        round_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let summary = run_with(&registry, &store, Some(model(0.0)), config).await;
    let r = &summary.rounds[0];
    assert_eq!(r.closure.as_deref(), Some("deadline"));
    assert_eq!(r.failures_by_reason.get("timeout"), Some(&1));
    assert_eq!(
        values(&summary.parameters),
        vec![1.0; 4],
        "only the timely update"
    );
    // The clock moves to the late answer, which is dropped and counted; the device reads the
    // cancel it was sent at the deadline once it is done.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(registry.counters().snapshot().replies_late, 1);
    assert_eq!(
        late.load(Ordering::SeqCst),
        1,
        "told to cancel at the deadline"
    );
}

#[tokio::test]
async fn more_examples_than_announced_is_refused_and_does_not_weigh_in() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    device(&registry, &store, "dev-honest", Answer::Shift(2.0));
    device(&registry, &store, "dev-boaster", Answer::Claim(10_000_000));
    let summary = one_round(&registry, &store, Some(model(0.0))).await;
    let r = &summary.rounds[0];
    assert_eq!(r.participants, vec!["dev-honest"]);
    assert_eq!(r.rejections.get("too_many_examples"), Some(&1), "{r:?}");
    assert_eq!(values(&summary.parameters), vec![2.0; 4]);
}

#[tokio::test]
async fn int8_changes_are_added_to_the_coordinators_own_model_and_a_foreign_base_is_refused() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    device(&registry, &store, "dev-a", Answer::Int8Delta(0.5, true));
    device(&registry, &store, "dev-b", Answer::Int8Delta(1.5, true));
    device(
        &registry,
        &store,
        "dev-forger",
        Answer::Int8Delta(9.0, false),
    );
    let config = DriverConfig {
        model_codec: UpdateCodec::Int8,
        ..Default::default()
    };
    let summary = run_with(&registry, &store, Some(model(0.25)), config).await;
    let r = &summary.rounds[0];
    assert_eq!(r.rejections.get("base"), Some(&1), "{:?}", r.failures);
    // 0.25 + mean(0.5, 1.5), within int8's rounding of each change (scale 1.5 / 127).
    for v in values(&summary.parameters) {
        assert!((v - 1.25).abs() < 0.01, "{v}");
    }
    // The global model went out as int8 (a four-value model is too small to show the saving:
    // the scales and the metadata outweigh it).
    let sent = store
        .get(&store.keys().global(RUN, 0), 1 << 20)
        .await
        .expect("the global model is stored");
    assert!(Parameters::decode(&sent, None).is_err(), "not f32");
    let decoded = pollen_proto::codec::decode(&sent, Codec::SafetensorsInt8, None, None)
        .expect("int8 weights");
    assert!((values(&decoded)[0] - 0.25).abs() < 1e-6);
}

#[tokio::test(start_paused = true)]
async fn fedbuff_publishes_a_version_every_k_updates_and_drops_stale_ones() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new(""));
    // The fast devices answer in a second, and a version is published about every second;
    // the slow one, five versions behind when it answers, is staler than the limit of 1.
    device(
        &registry,
        &store,
        "dev-a",
        Answer::Late(Duration::from_secs(1)),
    );
    device(
        &registry,
        &store,
        "dev-b",
        Answer::Late(Duration::from_secs(1)),
    );
    device(
        &registry,
        &store,
        "dev-slow",
        Answer::Late(Duration::from_secs(5)),
    );
    let config = DriverConfig {
        num_rounds: 7,
        fedbuff: Some(crate::fedbuff::FedBuffConfig {
            buffer_size: 2,
            concurrency: 3,
            max_staleness: 1,
            staleness_exponent: 0.5,
            server_learning_rate: 1.0,
        }),
        ..Default::default()
    };
    let summary = run_with(&registry, &store, Some(model(0.0)), config).await;
    let versions: Vec<u64> = summary.rounds.iter().map(|r| r.round).collect();
    assert_eq!(versions, (1..=7).collect::<Vec<u64>>());
    for r in &summary.rounds {
        let a = r.asynchronous.as_ref().expect("fedbuff records");
        assert_eq!(r.succeeded, 2, "{r:?}");
        assert!(a.max_staleness <= 1, "{a:?}");
    }
    // Each version moves the model by the mean of two weighted +1 changes: 1 when both were
    // fresh, 1/sqrt(2) when both were one version old.
    let w = values(&summary.parameters)[0];
    assert!(w > 7.0 / 2f32.sqrt() - 1e-4 && w <= 7.0 + 1e-4, "{w}");
    let stale = registry.counters().snapshot().updates_stale;
    assert!(stale >= 1, "the slow device's update was dropped as stale");
    let dropped: usize = summary
        .rounds
        .iter()
        .filter_map(|r| r.asynchronous.as_ref())
        .map(|a| a.dropped_stale)
        .sum();
    assert_eq!(
        dropped as u64, stale,
        "the records count what the counter counts"
    );
}

/// A run resumed after round 2 (a new driver, as a restarted coordinator builds it from the
/// records: round 2's model and sampler position) samples and trains rounds 3 and 4 exactly
/// as the uninterrupted run did.
#[tokio::test]
async fn a_resumed_run_samples_and_trains_as_the_uninterrupted_run() {
    let registry = Arc::new(Registry::new(Arc::default()));
    let store = Arc::new(MemoryStore::new("t/"));
    let fleet = |registry: &Arc<Registry>| {
        for i in 0..6 {
            device(registry, &store, &format!("dev-{i}"), Answer::Shift(1.0));
        }
    };
    let driver = |registry: &Arc<Registry>| {
        let strategy = FedAvg::new(FedAvgConfig {
            fraction_fit: 0.5,
            fraction_evaluate: 0.0,
            min_fit_clients: 1,
            min_available_clients: 6,
            ..Default::default()
        })
        .with_initial_parameters(model(0.0));
        RoundDriver::new(
            registry.clone(),
            Box::new(strategy),
            DriverConfig {
                num_rounds: 4,
                seed: 7,
                round_timeout: Duration::from_secs(10),
                wait_for_clients: Duration::from_secs(5),
                ..DriverConfig::default()
            },
        )
        .with_store(store.clone())
    };
    fleet(&registry);
    let whole = driver(&registry)
        .run(CancellationToken::new())
        .await
        .expect("the whole run");
    let sampled = |r: &crate::records::RoundRecord| {
        let mut p = r.participants.clone();
        p.sort();
        p
    };
    // Three of six each round, not always the same three: the sampler's position matters.
    assert!(whole.rounds.iter().all(|r| r.participants.len() == 3));
    assert_ne!(sampled(&whole.rounds[2]), sampled(&whole.rounds[3]));

    // The run ends by stopping its clients; the fleet joins again for the resumed run.
    fleet(&registry);
    let after_two = &whole.rounds[1];
    let resumed = driver(&registry)
        .with_resume(super::Resume {
            parameters: model(2.0),
            completed: 2,
            model_round: 2,
            rng_word_pos: after_two.rng_word_pos.expect("recorded with the round"),
        })
        .run(CancellationToken::new())
        .await
        .expect("the resumed run");
    assert_eq!(
        resumed.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        [3, 4]
    );
    assert!(resumed.initial_evaluation.is_none());
    for (again, first) in resumed.rounds.iter().zip(&whole.rounds[2..]) {
        assert_eq!(sampled(again), sampled(first), "round {}", again.round);
        assert_eq!(again.rng_word_pos, first.rng_word_pos);
    }
    assert_eq!(values(&resumed.parameters), values(&whole.parameters));
    assert_eq!(values(&resumed.parameters), vec![4.0; 4]);
}
