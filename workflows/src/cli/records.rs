//! The commands over recorded runs: `pollen runs`, `pollen status` and `pollen dashboard`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use pollen_coordinator::RunStore;
use pollen_coordinator::records::{Database, RunOverview, RunRow};

use super::report::show_metric;
use super::shutdown_on_ctrl_c;

fn open_records(runs_dir: &Path, database: Option<&str>) -> anyhow::Result<Arc<RunStore>> {
    let database = Database::parse(database).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        database != Database::Sqlite || runs_dir.join("pollen.db").exists(),
        "no run records in {}: start a run first (pollen simulate), or pass --runs-dir",
        runs_dir.display()
    );
    crate::run::open_records(runs_dir, &database)
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
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// One JSON object per run on stdout.
    #[arg(long)]
    pub json: bool,
    /// Ask a `pollen serve` instead of reading the records.
    #[command(flatten)]
    pub server: super::serve::ServerArgs,
}

/// What the service's API says of a run.
#[derive(serde::Deserialize)]
struct RemoteRuns {
    runs: Vec<RunOverview>,
}

#[derive(serde::Deserialize)]
struct RemoteRun {
    run: RunOverview,
    rounds: Vec<pollen_coordinator::RoundRecord>,
}

pub async fn runs(a: RunsArgs) -> anyhow::Result<()> {
    let runs = match &a.server.server {
        Some(_) => {
            let body = a.server.get("/api/runs").await?;
            serde_json::from_str::<RemoteRuns>(&body)
                .with_context(|| format!("unexpected answer: {body}"))?
                .runs
        }
        None => open_records(&a.runs_dir, a.database.as_deref())?.overviews()?,
    };
    print_runs(runs, a.json)
}

fn print_runs(runs: Vec<RunOverview>, json: bool) -> anyhow::Result<()> {
    if !json {
        println!(
            "{:<36} {:<10} {:>7} {:<9} {:>9} {:>9}  CREATED",
            "RUN", "STATUS", "ROUNDS", "METRIC", "LAST", "BEST"
        );
    }
    for overview in runs {
        if json {
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
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// One JSON object ({"run": ..., "rounds": [...]}) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Ask a `pollen serve` instead of reading the records (RUN is then an exact id).
    #[command(flatten)]
    pub server: super::serve::ServerArgs,
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let (row, rounds) = match &a.server.server {
        Some(_) => {
            let body = a.server.get(&format!("/api/runs/{}", a.run)).await?;
            let remote: RemoteRun = serde_json::from_str(&body)
                .with_context(|| format!("unexpected answer: {body}"))?;
            (remote.run.run, remote.rounds)
        }
        None => {
            let store = open_records(&a.runs_dir, a.database.as_deref())?;
            let row = find_run(&store.list_runs()?, &a.run)?;
            let rounds = store.rounds(&row.id)?;
            (row, rounds)
        }
    };
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

/// Who may use the HTTP endpoint (dashboard, API, event stream, /metrics).
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Operators and their token digests (TOML, `pollen operator add` writes it): every
    /// request then needs an operator's token and a policy that permits it. Required to
    /// listen beyond loopback.
    #[arg(long, env = "POLLEN_OPERATORS", value_name = "FILE")]
    pub operators: Option<PathBuf>,
    /// Cedar policy over operators, actions and runs [default: the built-in one: admin,
    /// viewer, analyst and scraper roles].
    #[arg(long, value_name = "FILE", requires = "operators")]
    pub operator_policy: Option<PathBuf>,
}

impl OperatorArgs {
    pub fn access(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<pollen_dashboard::access::Access>>> {
        Ok(match &self.operators {
            Some(file) => Some(std::sync::Arc::new(pollen_dashboard::access::Access::load(
                file,
                self.operator_policy.as_deref(),
            )?)),
            None => None,
        })
    }
}

/// Arguments of `pollen dashboard`.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub operators: OperatorArgs,
}

/// Arguments of `pollen operator add`.
#[derive(Args, Debug)]
pub struct OperatorAddArgs {
    /// The operators file to create or extend.
    #[arg(long, default_value = "operators.toml")]
    pub file: PathBuf,
    pub name: String,
    /// Roles of the default policy: admin, viewer, analyst, scraper.
    #[arg(long, value_delimiter = ',', default_value = "viewer")]
    pub roles: Vec<String>,
    /// Fleets whose runs the operator may see.
    #[arg(long, value_delimiter = ',')]
    pub fleets: Vec<String>,
}

/// `pollen operator add`: a new random token for NAME, printed once; the file keeps only its
/// SHA-256.
pub fn operator_add(a: OperatorAddArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let existing = match std::fs::read_to_string(&a.file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", a.file.display())),
    };
    let table: toml::Table =
        toml::from_str(&existing).with_context(|| format!("{} is not TOML", a.file.display()))?;
    let taken = table
        .get("operator")
        .and_then(|v| v.as_array())
        .is_some_and(|ops| {
            ops.iter()
                .any(|o| o.get("name").and_then(|n| n.as_str()) == Some(a.name.as_str()))
        });
    anyhow::ensure!(
        !taken,
        "{} already has an operator {:?}",
        a.file.display(),
        a.name
    );
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let mut entry = toml::Table::new();
    entry.insert("name".into(), a.name.clone().into());
    entry.insert(
        "token_sha256".into(),
        pollen_dashboard::access::token_digest(&token).into(),
    );
    entry.insert("roles".into(), a.roles.clone().into());
    entry.insert("fleets".into(), a.fleets.clone().into());
    let entry = toml::to_string(&entry)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.file)
        .with_context(|| format!("opening {}", a.file.display()))?;
    write!(file, "\n[[operator]]\n{entry}")?;
    // Checks the whole file as the server will read it.
    pollen_dashboard::access::Access::load(&a.file, None)?;
    eprintln!(
        "operator {:?} added to {} (roles {:?}, fleets {:?}); its token (shown only now):",
        a.name,
        a.file.display(),
        a.roles,
        a.fleets
    );
    println!("{token}");
    Ok(())
}

pub async fn dashboard(a: DashboardArgs) -> anyhow::Result<()> {
    let runs = open_records(&a.runs_dir, a.database.as_deref())?;
    let shutdown = shutdown_on_ctrl_c("stopping the dashboard");
    let sources = pollen_dashboard::HttpSources {
        runs: Some(runs),
        access: a.operators.access()?,
        control: None,
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
