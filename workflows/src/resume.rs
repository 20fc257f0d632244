//! Crash resume: a run whose coordinator died (or that was stopped, or failed) continues in a
//! new coordinator from its records, as if it had never stopped.
//!
//! What it continues from is what the run store committed, round by round and atomically with
//! each round's record: the rounds `1..=k`, the sampler's position after round `k`
//! (`rng_word_pos`), and the checkpoint of the last successful round `j <= k` (round 0 is the
//! initial model, checkpointed before round 1). The interrupted round `k + 1` is redone from
//! scratch: its attempt was never recorded, its checkpoint (if written) and metrics line are
//! removed when the run is reopened, and replies to its instructions are dropped by the
//! proxies, whose sessions with the dead coordinator ended (the agents' late replies carry
//! the old sessions' command ids and are counted as unknown). The task is the manifest the
//! rounds used, `task.json`, byte for byte, so its digest and the devices' caches stay valid.
//!
//! Strategies whose state across rounds is not recorded are refused: server optimizers with
//! moments or momentum (FedAdam, FedYogi, FedAdagrad, FedAvgM with momentum), differential
//! privacy (its accountant), and FedBuff (the versions in flight).

use std::path::PathBuf;

use anyhow::Context;
use pollen_coordinator::records::{RoundStatus, RunHandle};
use pollen_coordinator::strategy::config::StrategyName;

use crate::spec::RunSpec;

/// What `pollen coordinator --resume` and `pollen resume` continue: a run whose coordinator
/// died, or that was stopped, or failed.
pub const RESUMABLE: &[&str] = &["interrupted", "cancelled", "failed"];

/// Where a reopened run stands, for [`crate::run::drive`].
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    /// The recorded task manifest (`task.json`), if the run got as far as writing it.
    pub task: Option<Vec<u8>>,
    /// The checkpoint to continue from, and the round that wrote it (0: the initial model).
    /// `None` when the run stopped before its initial model was checkpointed: it then starts
    /// over (no round was recorded).
    pub checkpoint: Option<(PathBuf, u64)>,
    /// Rounds recorded.
    pub completed: u64,
    pub rng_word_pos: u64,
}

/// Why `spec`'s run cannot be resumed, if it cannot.
pub fn refusal(spec: &RunSpec) -> Option<String> {
    if spec.fedbuff.is_some() {
        return Some(
            "FedBuff runs cannot be resumed: the versions in flight are not recorded".into(),
        );
    }
    if spec.privacy.is_some() {
        return Some(
            "runs with differential privacy cannot be resumed: the privacy accountant's state is not recorded".into(),
        );
    }
    let name = spec.strategy.name;
    let stateful = match name {
        StrategyName::Fedadam | StrategyName::Fedyogi | StrategyName::Fedadagrad => true,
        StrategyName::Fedavgm => spec.strategy.server_momentum.is_some_and(|m| m != 0.0),
        _ => false,
    };
    stateful.then(|| {
        format!(
            "strategy {name:?} keeps server-optimizer state across rounds that is not recorded, so the run cannot be resumed"
        )
    })
}

/// Reads where `run` stands from its recorded `rounds` and its directory.
pub fn locate(
    run: &RunHandle,
    rounds: &[pollen_coordinator::RoundRecord],
) -> anyhow::Result<ResumeFrom> {
    let completed = rounds.len() as u64;
    let task_path = run.dir().join("task.json");
    let task = match std::fs::read(&task_path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", task_path.display())),
    };
    let rng_word_pos = match rounds.last() {
        None => 0,
        Some(last) => last.rng_word_pos.with_context(|| {
            format!(
                "round {} of run {} does not record the sampler's position (it was recorded by an older pollen), so the run cannot be resumed exactly",
                last.round,
                run.id()
            )
        })?,
    };
    let model_round = rounds
        .iter()
        .rev()
        .find(|r| r.status == RoundStatus::Ok)
        .map_or(0, |r| r.round);
    let path = run.checkpoint_path(model_round);
    let checkpoint = if path.exists() {
        Some((path, model_round))
    } else {
        anyhow::ensure!(
            completed == 0,
            "run {}: the checkpoint of round {model_round}, which the resumed rounds start from, is missing ({})",
            run.id(),
            path.display()
        );
        None
    };
    anyhow::ensure!(
        completed == 0 || task.is_some(),
        "run {}: its task manifest {} is missing",
        run.id(),
        task_path.display()
    );
    Ok(ResumeFrom {
        task,
        checkpoint,
        completed,
        rng_word_pos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> RunSpec {
        let text = RunSpec::default_spec().to_toml();
        let text = match extra {
            "" => text,
            extra => text.replace("name = \"fedavg\"", extra),
        };
        RunSpec::parse(&text, "test").expect("valid")
    }

    #[test]
    fn stateless_strategies_resume_and_stateful_ones_are_refused_by_name() {
        assert_eq!(refusal(&spec("")), None);
        assert_eq!(refusal(&spec("name = \"fedavgm\"")), None);
        let adam = refusal(&spec("name = \"fedadam\"")).expect("refused");
        assert!(adam.contains("Fedadam"), "{adam}");
        let momentum = refusal(&spec("name = \"fedavgm\"\nserver_momentum = 0.9"));
        assert!(momentum.is_some());
    }
}
