//! What the coordinator and the devices admit, over the device path (shared Mosquitto on
//! 127.0.0.1:1883, `mosquitto -d`): a device's claimed examples are bounded by what it
//! announced, and a device's owner may decline work by policy.

mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use harness::{
    Behaviour, Harness, TestClient, all_of, model, mosquitto, test_agent_options, values,
};
use pollen_client::agent::Agent;
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_proto::Parameters;
use pollen_proto::scalar::ScalarMap;

const CLAIMED: u64 = 10_000_000;

/// Every weight of `p` is `expected` (within float rounding of the averages).
fn assert_close(p: &Parameters, expected: f32) {
    let v = values(p);
    assert!(
        v.iter().all(|x| (x - expected).abs() < 1e-5),
        "{v:?} != {expected}"
    );
}

/// Announces 10 examples and claims ten million for a model pushed far off.
struct OverClaimer;

impl Client for OverClaimer {
    fn num_examples(&self) -> u64 {
        10
    }
    fn get_parameters(&mut self, _: &Work<'_>) -> Result<Parameters, ClientError> {
        Ok(model([0.0; 4]))
    }
    fn fit(&mut self, _: &Work<'_>, global: Parameters) -> Result<ClientFit, ClientError> {
        let mut p = global;
        p.tensors[0].data.iter_mut().for_each(|x| *x -= 500.0);
        Ok(ClientFit {
            parameters: p,
            num_examples: CLAIMED,
            metrics: ScalarMap::new(),
        })
    }
    fn evaluate(&mut self, _: &Work<'_>, _: Parameters) -> Result<ClientEvaluate, ClientError> {
        Err(ClientError::training("not used"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_claiming_more_examples_than_it_announced_is_rejected_and_counted() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(1.0, 10)));
    let stop = h.stop.child_token();
    let liar =
        Agent::new(test_agent_options("liar", &h.fleet, &h.broker), OverClaimer).expect("agent");
    let t = stop.clone();
    tokio::spawn(async move {
        let _ = liar.run(t).await;
    });
    let mut config = all_of(3);
    config.min_fit_clients = 2;
    let summary = h
        .run(2, config, Duration::from_secs(20), model([0.0; 4]))
        .await;
    for r in &summary.rounds {
        assert_eq!(r.succeeded, 2, "round {}: {:?}", r.round, r.failures);
        assert_eq!(
            r.rejections,
            BTreeMap::from([("too_many_examples".to_string(), 1)]),
            "round {}",
            r.round
        );
    }
    assert_close(&summary.parameters, 2.0);
    let metrics = reqwest::get(format!("{}/metrics", h.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pollen_updates_rejected_total") && l.ends_with(" 2")),
        "{metrics}"
    );
    stop.cancel();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_owner_forbids_this_hour_declines_and_the_round_goes_on() {
    use chrono::Timelike;
    use pollen_client::agent::consent::{Attribute, Consent};
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(1.0, 10)));
    // The owner permits work at any hour but this one and the next (the test may straddle
    // the hour), and only on mains power, which this device is on.
    let hour = chrono::Local::now().hour();
    let policy = format!(
        r#"@id("not-now")
        permit(principal, action, resource)
        when {{ context.hour != {hour} && context.hour != {next} && context.device.on_mains }};"#,
        next = (hour + 1) % 24
    );
    let consent = Consent::parse(
        &policy,
        "owner.cedar",
        BTreeMap::from([("on_mains".into(), Attribute::Bool(true))]),
    )
    .expect("policy parses");
    let mut options = test_agent_options("dev-owned", &h.fleet, &h.broker);
    options.consent = Some(Arc::new(consent));
    let owned = Agent::new(options, TestClient(Behaviour::Shift(100.0, 10))).expect("agent");
    let stats = owned.stats();
    let stop = h.stop.child_token();
    let t = stop.clone();
    tokio::spawn(async move {
        let _ = owned.run(t).await;
    });
    let mut config = all_of(3);
    config.min_fit_clients = 2;
    let summary = h
        .run(2, config, Duration::from_secs(20), model([0.0; 4]))
        .await;
    for r in &summary.rounds {
        assert_eq!(r.succeeded, 2, "round {}: {:?}", r.round, r.failures);
        assert_eq!(
            r.failures_by_reason,
            BTreeMap::from([("declined".to_string(), 1)]),
            "round {}: {:?}",
            r.round,
            r.failures
        );
        let f = &r.failures[0];
        assert!(
            f.message
                .contains("declined by the device owner's policy (owner.cedar)"),
            "{f:?}"
        );
    }
    // The declining device's update never counted.
    assert_close(&summary.parameters, 2.0);
    assert!(stats.snapshot().commands_declined >= 2);
    assert_eq!(stats.snapshot().fits_done, 0);
    stop.cancel();
    h.shutdown().await;
}
