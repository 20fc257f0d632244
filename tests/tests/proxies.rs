//! One fleet bridged by several proxies (`pollen proxy --shard i/n`), over Mosquitto and the
//! embedded S3 server: every device is bridged by exactly one proxy and rounds use them all.
//!
//! Needs Mosquitto on 127.0.0.1:1883 (`mosquitto -d`).

mod harness;

use std::time::Duration;

use harness::{Behaviour, Harness, TestClient, all_of, model, mosquitto, values};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_split_across_proxies_bridges_every_device_exactly_once() {
    const SHARDS: u32 = 3;
    let h = Harness::start_sharded(mosquitto(), SHARDS).await;
    let ids: Vec<String> = (0..8).map(|i| format!("gw-{i}")).collect();
    let mut owned = [0u64; SHARDS as usize];
    for id in &ids {
        owned[pollen_proxy::shard::owner(id, SHARDS) as usize] += 1;
    }
    // Eight ids over three shards: a test that silently left a shard empty would prove little.
    assert!(owned.iter().all(|&n| n > 0), "{owned:?}");
    let _agents: Vec<_> = ids
        .iter()
        .map(|id| h.agent(id, TestClient(Behaviour::Shift(2.0, 10))))
        .collect();
    for (i, proxy) in h.proxies.iter().enumerate() {
        assert!(
            proxy
                .wait_for_bridges(owned[i] as usize, Duration::from_secs(20))
                .await,
            "proxy {i} did not bridge its {} devices: {:?}",
            owned[i],
            proxy.stats()
        );
    }
    // Its own devices and no others: one bridge each. Read before the run, whose end lets
    // bridges close.
    for (i, proxy) in h.proxies.iter().enumerate() {
        let stats = proxy.stats();
        assert_eq!(stats.bridges_open, owned[i], "proxy {i}: {stats:?}");
    }

    let summary = h
        .run(
            2,
            all_of(ids.len()),
            Duration::from_secs(20),
            model([0.0; 4]),
        )
        .await;
    for r in &summary.rounds {
        assert_eq!(r.succeeded, 8, "round {}: {:?}", r.round, r.failures);
    }
    for v in values(&summary.parameters) {
        assert!((v - 4.0).abs() < 1e-5, "{v}");
    }
    for (i, proxy) in h.proxies.iter().enumerate() {
        let stats = proxy.stats();
        // One fit command per own device per round.
        assert_eq!(
            stats.commands_published,
            2 * owned[i],
            "proxy {i}: {stats:?}"
        );
        // Replies (results and progress) from its own devices only: another shard's replies,
        // which every proxy hears, are neither routed nor counted as unknown.
        assert!(
            stats.replies_received >= 2 * owned[i],
            "proxy {i}: {stats:?}"
        );
        assert_eq!(
            (
                stats.replies_unknown,
                stats.replies_late,
                stats.replies_duplicate
            ),
            (0, 0, 0),
            "proxy {i}: {stats:?}"
        );
    }
    h.shutdown().await;
}
