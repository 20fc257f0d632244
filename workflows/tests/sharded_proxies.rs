//! Three `pollen proxy --shard auto` processes share one fleet of 30 simulated agents (two
//! `pollen fleet simulate` processes) for a `pollen coordinator` run, against Mosquitto on
//! 127.0.0.1:1883 (`mosquitto -d`). Each device is bridged by exactly one proxy; one proxy is
//! killed (SIGKILL) in the middle of a round, the others take its devices over, and the run
//! finishes with every device training again.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use support::{Killed, metric, require_mosquitto};

const DEVICES: usize = 30;
const ROUNDS: u64 = 6;
const PROXIES: [&str; 3] = ["p0", "p1", "p2"];

/// The lines a stream prints, as they come, with when they came; also written to
/// `$POLLEN_TEST_LOGS/<name>.log` when that is set, to see what the processes did.
fn lines(name: &str, stream: impl Read + Send + 'static) -> Receiver<(Instant, String)> {
    use std::io::Write;
    let (tx, rx) = channel();
    let mut log = std::env::var_os("POLLEN_TEST_LOGS").map(|dir| {
        std::fs::File::create(std::path::Path::new(&dir).join(format!("{name}.log")))
            .expect("log file")
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            // Kept logging after the test stopped listening.
            let _ = tx.send((Instant::now(), line));
        }
    });
    rx
}

/// The first line of `rx` containing `marker`, the rest of the line after it.
fn wait_for(rx: &Receiver<(Instant, String)>, marker: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, line) = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("{what} never printed {marker:?}: {e}"));
        if let Some((_, rest)) = line.split_once(marker) {
            return rest.trim().to_string();
        }
    }
}

/// The next round record the coordinator prints.
fn next_round(rounds: &Receiver<(Instant, String)>, seen: usize) -> (Instant, serde_json::Value) {
    let (at, line) = rounds
        .recv_timeout(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("the run stopped after {seen} rounds: {e}"));
    (at, serde_json::from_str(&line).expect("a JSON round"))
}

fn pollen(repo: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pollen"));
    c.args(args).current_dir(repo);
    c
}

/// Waits until every proxy in `urls` bridges exactly the devices the rendezvous hash over
/// `live` gives it; how long that took.
fn wait_for_split(urls: &BTreeMap<&str, String>, live: &[&str], devices: &[String]) -> Duration {
    let mut expected: BTreeMap<&str, u64> = live.iter().map(|p| (*p, 0)).collect();
    for d in devices {
        let owner = pollen_proxy::membership::owner(d, live).expect("a live proxy");
        *expected.get_mut(owner).expect("owner is live") += 1;
    }
    let started = Instant::now();
    loop {
        let now: BTreeMap<&str, (Option<u64>, Option<u64>)> = urls
            .iter()
            .map(|(p, url)| {
                (
                    *p,
                    (
                        metric(url, "pollen_proxy_bridges"),
                        metric(url, "pollen_proxy_live_proxies"),
                    ),
                )
            })
            .collect();
        if now.iter().all(|(p, (bridges, live_seen))| {
            *bridges == Some(expected[p]) && *live_seen == Some(live.len() as u64)
        }) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the proxies never split the fleet as {expected:?}: (bridges, live proxies) {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn auto_sharded_proxies_bridge_each_device_once_and_take_over_a_killed_one() {
    require_mosquitto();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fleet = format!("shards-{:08x}", rand::random::<u32>());
    let devices: Vec<String> = (0..DEVICES).map(|k| format!("sim-{k:06}")).collect();
    // Rendezvous hashing over three ids could leave one without devices by chance; a test
    // that killed an idle proxy would prove nothing.
    for p in PROXIES {
        assert!(
            devices
                .iter()
                .any(|d| pollen_proxy::membership::owner(d, &PROXIES) == Some(p)),
            "{p} owns no device"
        );
    }

    let mut simulators = Vec::new();
    for index in 0..2 {
        let mut child = pollen(
            &repo,
            &[
                "fleet",
                "simulate",
                "--devices",
                &DEVICES.to_string(),
                "--shard",
                &format!("{index}/2"),
                "--fleet",
                &fleet,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pollen fleet simulate starts");
        let _log = lines(
            &format!("simulate-{index}-err"),
            child.stderr.take().expect("piped"),
        );
        let out = lines(
            &format!("simulate-{index}"),
            child.stdout.take().expect("piped"),
        );
        simulators.push((Killed(child), out));
    }
    for (_, out) in &simulators {
        wait_for(out, "\"agents\"", "pollen fleet simulate");
    }

    // Every device in every round, and no round before all 30 are back.
    let runs = tempfile::tempdir().expect("tempdir");
    let spec = std::fs::read_to_string(repo.join("workflows/mnist-2nn.toml")).expect("spec");
    let spec_path = runs.path().join("all.toml");
    std::fs::write(
        &spec_path,
        spec.replace("fraction_fit = 0.1", "fraction_fit = 1.0")
            .replace(
                "min_available_clients = 2",
                &format!("min_available_clients = {DEVICES}"),
            ),
    )
    .expect("write spec");
    let mut coordinator = pollen(
        &repo,
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            &ROUNDS.to_string(),
            "--wait-for-clients",
            "120s",
            "--json",
        ],
    )
    .arg("--config")
    .arg(&spec_path)
    .arg("--runs-dir")
    .arg(runs.path())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("pollen coordinator starts");
    let rounds = lines("rounds", coordinator.stdout.take().expect("piped"));
    let coordinator_log = lines("coordinator", coordinator.stderr.take().expect("piped"));
    let coordinator = Killed(coordinator);
    let endpoint = wait_for(&coordinator_log, "Fleet gRPC API on", "pollen coordinator");

    let mut proxies = BTreeMap::new();
    let mut urls = BTreeMap::new();
    for id in PROXIES {
        let mut child = pollen(
            &repo,
            &[
                "proxy",
                "--shard",
                "auto",
                "--proxy-id",
                id,
                "--fleet",
                &fleet,
                "--coordinator",
                &endpoint,
                "--http",
                "127.0.0.1:0",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pollen proxy starts");
        let log = lines(id, child.stderr.take().expect("piped"));
        let addr = wait_for(&log, "Prometheus metrics on", "pollen proxy");
        urls.insert(id, addr);
        proxies.insert(id, Killed(child));
    }
    let split = wait_for_split(&urls, &PROXIES, &devices);
    eprintln!("three proxies split the fleet {split:?} after their metrics came up");

    // Kill p1 in the middle of a round: once it has published that round's commands to its
    // devices, which then train for a while before they answer. Rounds printed before the
    // split was seen are only read now, so the round is found by p1's command count: one
    // command per device of p1 per round.
    let p1_count = devices
        .iter()
        .filter(|d| pollen_proxy::membership::owner(d, &PROXIES) == Some("p1"))
        .count() as u64;
    let mut records = Vec::new();
    let split_seen = Instant::now();
    loop {
        let (at, record) = next_round(&rounds, records.len());
        records.push(record);
        if at > split_seen {
            break;
        }
    }
    let done = records.len() as u64;
    let killed_in = loop {
        let published = metric(&urls["p1"], "pollen_proxy_commands_published_total").unwrap_or(0);
        if published > done * p1_count {
            break published.div_ceil(p1_count);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        killed_in,
        done + 1,
        "p1 published commands beyond the next round"
    );
    assert!(
        killed_in < ROUNDS,
        "rounds ran faster than the test could watch them: {records:?}"
    );
    let killed_at = Instant::now();
    drop(proxies.remove("p1"));
    urls.remove("p1");
    let survivors = ["p0", "p2"];
    wait_for_split(&urls, &survivors, &devices);
    let takeover = killed_at.elapsed();
    eprintln!(
        "p0 and p2 bridge every device {takeover:?} after p1 was killed in round {killed_in}"
    );
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    while records.len() < ROUNDS as usize {
        records.push(next_round(&rounds, records.len()).1);
    }
    drop(coordinator);
    let numbers: Vec<u64> = records
        .iter()
        .map(|r| r["round"].as_u64().expect("round"))
        .collect();
    assert_eq!(numbers, (1..=ROUNDS).collect::<Vec<_>>());
    for r in &records {
        assert_eq!(r["status"], "ok", "{r}");
        eprintln!(
            "round {}: {} succeeded, {} failed in {:.2}s",
            r["round"], r["succeeded"], r["failed"], r["seconds"]
        );
    }
    let all: BTreeSet<&str> = devices.iter().map(String::as_str).collect();
    fn participants(r: &serde_json::Value) -> BTreeSet<&str> {
        r["participants"]
            .as_array()
            .expect("participants")
            .iter()
            .filter_map(|p| p.as_str())
            .collect()
    }
    // The round p1 died in lost p1's devices, and only those; every other round trained on
    // every device, the rounds after it through p0 and p2.
    let p1_devices: BTreeSet<&str> = devices
        .iter()
        .filter(|d| pollen_proxy::membership::owner(d, &PROXIES) == Some("p1"))
        .map(String::as_str)
        .collect();
    for r in &records {
        if r["round"] == killed_in {
            let lost: BTreeSet<&str> = all.difference(&participants(r)).copied().collect();
            assert!(
                !lost.is_empty(),
                "p1 was killed after round {killed_in} had its answers: {r}"
            );
            assert!(lost.is_subset(&p1_devices), "{lost:?} were not p1's: {r}");
        } else {
            assert_eq!(participants(r), all, "{r}");
        }
    }
    assert!(
        records.last().expect("rounds")["accuracy"]
            .as_f64()
            .expect("accuracy")
            > 0.85,
        "{:?}",
        records.last()
    );
}
