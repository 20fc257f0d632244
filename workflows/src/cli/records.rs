//! The commands over recorded runs: `pollen runs`, `pollen status` and `pollen dashboard`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use pollen_coordinator::RunStore;
use pollen_coordinator::records::RunRow;

use super::report::show_metric;
use super::shutdown_on_ctrl_c;

fn open_records(runs_dir: &Path) -> anyhow::Result<Arc<RunStore>> {
    anyhow::ensure!(
        runs_dir.join("pollen.db").exists(),
        "no run records in {}: start a run first (pollen simulate), or pass --runs-dir",
        runs_dir.display()
    );
    Ok(RunStore::open(runs_dir)?)
}

/// The run `wanted` names: an exact id, a unique prefix, or "latest".
fn find_run(runs: &[RunRow], wanted: &str) -> anyhow::Result<RunRow> {
    if wanted == "latest" {
        return runs
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no runs recorded yet"));
    }
    if let Some(r) = runs.iter().find(|r| r.id == wanted) {
        return Ok(r.clone());
    }
    let matching: Vec<&RunRow> = runs.iter().filter(|r| r.id.starts_with(wanted)).collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => anyhow::bail!("no run {wanted:?}; `pollen runs` lists them"),
        many => anyhow::bail!(
            "{wanted:?} matches {} runs ({}, ...); give more of the id",
            many.len(),
            many[0].id
        ),
    }
}

/// Arguments of `pollen runs`.
#[derive(Args, Debug)]
pub struct RunsArgs {
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// One JSON object per run on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn runs(a: RunsArgs) -> anyhow::Result<()> {
    let store = open_records(&a.runs_dir)?;
    let runs = store.overviews()?;
    if !a.json {
        println!(
            "{:<36} {:<10} {:>7} {:<9} {:>9} {:>9}  CREATED",
            "RUN", "STATUS", "ROUNDS", "METRIC", "LAST", "BEST"
        );
    }
    for overview in runs {
        if a.json {
            println!("{}", serde_json::to_string(&overview)?);
            continue;
        }
        let run = &overview.run;
        let metric = overview.metric.clone().unwrap_or_else(|| "accuracy".into());
        let (last, best) = match &overview.metric {
            Some(_) => (overview.value, overview.best),
            None => (overview.accuracy, overview.best_accuracy),
        };
        let show = |v: Option<f64>| v.map_or("-".into(), |v| show_metric(&metric, v));
        println!(
            "{:<36} {:<10} {:>3}/{:<3} {:<9} {:>9} {:>9}  {}",
            run.id,
            run.status,
            run.last_round,
            run.num_rounds,
            metric,
            show(last),
            show(best),
            run.created_at
        );
    }
    Ok(())
}

/// Arguments of `pollen status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Run id, a unique prefix of one, or "latest".
    pub run: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// One JSON object ({"run": ..., "rounds": [...]}) on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let store = open_records(&a.runs_dir)?;
    let row = find_run(&store.list_runs()?, &a.run)?;
    let rounds = store.rounds(&row.id)?;
    if a.json {
        println!("{}", serde_json::json!({ "run": row, "rounds": rounds }));
        return Ok(());
    }
    println!(
        "run {} ({}), {} of {} rounds, seed {}, records in {}",
        row.id, row.status, row.last_round, row.num_rounds, row.seed, row.dir
    );
    let metric = rounds
        .iter()
        .find_map(|r| r.primary_metric.clone())
        .unwrap_or_else(|| "accuracy".into());
    println!(
        "{:>5} {:<6} {:>9} {:>8} {:>7} {:>4} {:>5} {:>8}  FAILURES",
        "ROUND",
        "STATUS",
        metric.to_uppercase(),
        "LOSS",
        "SAMPLED",
        "OK",
        "FAIL",
        "SECONDS"
    );
    for r in &rounds {
        let failures = r
            .failures_by_reason
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        // Records from before primary metrics carry accuracy only.
        let value = r.metrics.get(&metric).copied().or(if metric == "accuracy" {
            r.accuracy
        } else {
            None
        });
        println!(
            "{:>5} {:<6} {:>9} {:>8} {:>7} {:>4} {:>5} {:>8.3}  {}",
            r.round,
            serde_json::to_value(r.status)?.as_str().unwrap_or("?"),
            value.map_or("-".into(), |v| show_metric(&metric, v)),
            r.loss.map_or("-".into(), |l| format!("{l:.4}")),
            r.sampled,
            r.succeeded,
            r.failed,
            r.seconds,
            failures
        );
    }
    Ok(())
}

/// Arguments of `pollen dashboard`.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

pub async fn dashboard(a: DashboardArgs) -> anyhow::Result<()> {
    let runs = open_records(&a.runs_dir)?;
    let shutdown = shutdown_on_ctrl_c("stopping the dashboard");
    let sources = pollen_dashboard::HttpSources {
        runs: Some(runs),
        ..Default::default()
    };
    let server = pollen_dashboard::serve_http(a.listen, sources, shutdown)
        .await
        .with_context(|| format!("serving the dashboard on {}", a.listen))?;
    eprintln!(
        "Dashboard of the runs in {} on http://{}/ (Ctrl-C to stop)",
        a.runs_dir.display(),
        server.addr
    );
    server.handle.await??;
    Ok(())
}
