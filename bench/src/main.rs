//! `pollen-bench`: whole-system benchmarks of Pollen, apart from the product's `pollen` binary.
//! Each prints its workload, the machine and min / median / max over several runs, or one JSON
//! object with --json. Numbers are only meaningful from a release build:
//!
//!   cargo run --release --bin pollen-bench -- rounds --clients 100

use anyhow::Context;
use clap::{Parser, Subcommand};
use pollen_proto::mqtt::BrokerConfig;
use pollen_train::Backend;
use pollen_workflows::simulate::Transport;
use pollen_workflows::spec::RunSpec;

#[derive(Parser)]
#[command(
    name = "pollen-bench",
    version,
    about = "Benchmarks of Pollen: aggregation, no-op rounds, local training, the MNIST run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// FedAvg aggregation throughput (GB/s of update bytes folded) and its memory.
    Aggregate {
        #[arg(long, value_enum, default_value_t = pollen_bench::aggregate::Shape::Cnn)]
        shape: pollen_bench::aggregate::Shape,
        /// Parameters of --shape flat.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Client updates folded per aggregation.
        #[arg(long, default_value_t = 100)]
        updates: usize,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Start each update from its safetensors blob and time digest check + decode +
        /// fold, as the coordinator does in a round.
        #[arg(long)]
        from_wire: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rounds with no-op clients (they return the model they get): seconds per round, MQTT
    /// messages per second and peak RSS. Lists of --clients and --params run every
    /// combination, each in its own process (one JSON object per line with --json).
    Rounds {
        #[arg(long, value_delimiter = ',', default_value = "100")]
        clients: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "1000000")]
        params: Vec<usize>,
        #[arg(long, value_enum, default_value_t = Transport::InProcess)]
        transport: Transport,
        /// MQTT broker for the device path (e.g. mqtt://127.0.0.1:1883); embedded when absent.
        #[arg(long)]
        broker: Option<String>,
        /// Timed rounds (after one warm-up round).
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Fraction of the clients sampled each round.
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
        #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
        round_timeout: std::time::Duration,
        /// Device path: run every agent as a process of its own (`pollen-bench agent`), with
        /// the coordinator, embedded S3 and proxy in this one, as `pollen run` deploys them.
        #[arg(long)]
        agent_processes: bool,
        #[arg(long)]
        json: bool,
    },
    /// One no-op edge agent (what `bench rounds --agent-processes` starts per device); it
    /// stops when its stdin closes.
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        broker: String,
        #[arg(long)]
        fleet: String,
        #[arg(long)]
        device_id: String,
    },
    /// Local training throughput (samples/s) for each model and batch size.
    Train {
        #[arg(long, value_delimiter = ',', default_value = "mnist-2nn,mnist-cnn")]
        models: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "10,64")]
        batch_sizes: Vec<usize>,
        /// Images in the local epoch (600 = one of 100 IID clients).
        #[arg(long, default_value_t = 600)]
        examples: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Training libraries: burn, and libtorch in builds with --features torch [default:
        /// every one compiled in].
        #[arg(long, value_delimiter = ',', value_parser = Backend::parse)]
        backends: Vec<Backend>,
        /// Intra-op threads of LibTorch and PyTorch [default: the machine's cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Also measure PyTorch itself with this Python (it needs torch), in the same run.
        #[arg(long, value_name = "PYTHON")]
        pytorch: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The default MNIST 2NN simulation: seconds per round and time to 97% test accuracy.
    Mnist {
        #[arg(long, value_enum, default_value_t = Transport::Device)]
        transport: Transport,
        #[arg(long)]
        broker: Option<String>,
        /// Stop after this many rounds if the target is not reached.
        #[arg(long, default_value_t = 100)]
        max_rounds: u64,
        #[arg(long, default_value_t = 0.97)]
        target: f64,
        #[arg(long)]
        json: bool,
    },
}

/// Runs one benchmark and prints its report.
async fn run(which: Command) -> anyhow::Result<()> {
    match which {
        Command::Aggregate {
            shape,
            params,
            updates,
            runs,
            from_wire,
            json,
        } => {
            let options = pollen_bench::aggregate::AggregateOptions {
                shape,
                params,
                updates,
                runs,
                from_wire,
            };
            let report =
                tokio::task::spawn_blocking(move || pollen_bench::aggregate::run(&options))
                    .await??;
            pollen_bench::print_report(&report, &report.human(), json)
        }
        Command::Rounds {
            clients,
            params,
            transport,
            broker,
            rounds,
            fraction,
            round_timeout,
            agent_processes,
            json,
        } => {
            if clients.len() * params.len() > 1 {
                // Each combination in a process of its own, so that its peak RSS is its own.
                let exe = std::env::current_exe().context("locating the pollen-bench binary")?;
                for &n in &clients {
                    for &p in &params {
                        let mut cmd = std::process::Command::new(&exe);
                        cmd.args(["rounds", "--clients", &n.to_string()])
                            .args(["--params", &p.to_string()])
                            .args(["--transport", transport.name()])
                            .args(["--rounds", &rounds.to_string()])
                            .args(["--fraction", &fraction.to_string()])
                            .args([
                                "--round-timeout",
                                &humantime::format_duration(round_timeout).to_string(),
                            ]);
                        if let Some(b) = &broker {
                            cmd.args(["--broker", b]);
                        }
                        if agent_processes {
                            cmd.arg("--agent-processes");
                        }
                        if json {
                            cmd.arg("--json");
                        }
                        let status = cmd.status().context("running a benchmark process")?;
                        anyhow::ensure!(
                            status.success(),
                            "bench rounds --clients {n} --params {p} failed ({status})"
                        );
                        if !json {
                            println!();
                        }
                    }
                }
                return Ok(());
            }
            let options = pollen_bench::rounds::RoundsOptions {
                clients: clients[0],
                params: params[0],
                transport,
                broker: broker.map(BrokerConfig::new),
                rounds,
                fraction,
                round_timeout,
                agent_processes,
            };
            let report = pollen_bench::rounds::run(&options).await?;
            pollen_bench::print_report(&report, &report.human(), json)
        }
        Command::Agent {
            broker,
            fleet,
            device_id,
        } => pollen_bench::rounds::run_agent(BrokerConfig::new(broker), fleet, device_id).await,
        Command::Train {
            models,
            batch_sizes,
            examples,
            runs,
            backends,
            threads,
            pytorch,
            json,
        } => {
            let backends = if backends.is_empty() {
                let mut all = vec![Backend::Burn];
                if pollen_train::backend::LIBTORCH {
                    all.push(Backend::Libtorch);
                }
                all
            } else {
                backends
            };
            let options = pollen_bench::train::TrainOptions {
                models,
                batch_sizes,
                examples,
                runs,
                data_dir: RunSpec::default_spec().data_source().path,
                backends,
                threads: threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                pytorch,
            };
            let report =
                tokio::task::spawn_blocking(move || pollen_bench::train::run(&options)).await??;
            pollen_bench::print_report(&report, &report.human(), json)
        }
        Command::Mnist {
            transport,
            broker,
            max_rounds,
            target,
            json,
        } => {
            let options = pollen_bench::mnist::MnistOptions {
                transport,
                broker: broker.map(BrokerConfig::new),
                max_rounds,
                target,
            };
            let report = pollen_bench::mnist::run(&options).await?;
            pollen_bench::print_report(&report, &report.human(), json)
        }
    }
}

fn main() -> std::process::ExitCode {
    pollen_workflows::cli::main(run(Cli::parse().command))
}
