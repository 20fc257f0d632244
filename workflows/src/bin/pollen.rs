//! `pollen`: the user CLI. Parsing and dispatch only; the commands are in
//! `pollen_workflows::cli`.

use clap::{Parser, Subcommand};
use pollen_workflows::cli::{data, fleet, records, serve, train};

#[derive(Parser)]
#[command(
    name = "pollen",
    version,
    about = "Federated learning for fleets of IoT gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a federated training run with simulated devices in this process. By default over
    /// the device path (proxy, embedded MQTT broker, embedded S3); --transport grpc uses direct
    /// gRPC clients, --transport in-process joins them to the coordinator in memory. Without --config: MNIST 2NN, 100 IID clients, C=0.1, E=1, B=10, lr=0.1.
    Simulate(train::SimulateArgs),
    /// Serve the Fleet gRPC API and run a spec's rounds with the clients that connect:
    /// `pollen proxy` bridges for MQTT devices, or direct `pollen-agent --coordinator` clients.
    Coordinator(train::CoordinatorArgs),
    /// A long-lived coordinator: the Fleet gRPC API, the dashboard, and a control API over
    /// HTTP that queues submitted runs and runs them in turn; queued and interrupted runs are
    /// taken up at start.
    Serve(serve::ServeArgs),
    /// Queue a run of SPEC on a `pollen serve` (--server URL); prints its id.
    Submit(serve::SubmitArgs),
    /// Stop a run on a `pollen serve`: the current round is abandoned, completed ones stay.
    Stop(serve::RunActionArgs),
    /// Queue an interrupted, stopped or failed run on a `pollen serve` to continue from its
    /// records.
    Resume(serve::RunActionArgs),
    /// Bridge MQTT devices to a coordinator: one Fleet client per online device of the fleet.
    Proxy(fleet::ProxyArgs),
    /// List the devices of a fleet from their retained status messages.
    Devices(fleet::DevicesArgs),
    /// A fleet's identities and broker policy (`pollen fleet provision`).
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
    /// List the recorded runs, newest first.
    Runs(records::RunsArgs),
    /// A run's rounds: accuracy, loss, participation, failures and durations.
    Status(records::StatusArgs),
    /// Start a run on the devices the registry holds: discover the fleet's online devices,
    /// select them by the spec's [devices] section, bridge them and train.
    Run(train::RunArgs),
    /// Get a CSV file ready for a run: see what it holds, or split it into one file per
    /// device.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// The centralized baseline of a simulation spec: the same model trained on the union of
    /// the simulated devices' training data, evaluated as the federated run is.
    Central(train::CentralArgs),
    /// Serve the web dashboard over the recorded runs (charts, participation, failures,
    /// configs) until Ctrl-C. Live runs serve their own dashboard.
    Dashboard(records::DashboardArgs),
    /// Operators of the HTTP endpoint (`pollen operator add NAME --roles viewer --fleets F`).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Add an operator with a new random bearer token (printed once on stdout; the file
    /// keeps its SHA-256).
    Add(records::OperatorAddArgs),
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Simulate(a) => train::simulate(a).await,
        Command::Coordinator(a) => train::coordinator(a).await,
        Command::Serve(a) => serve::serve(a).await,
        Command::Submit(a) => serve::submit(a).await,
        Command::Stop(a) => serve::stop(a).await,
        Command::Resume(a) => serve::resume(a).await,
        Command::Run(a) => train::run(a).await,
        Command::Central(a) => train::central(a).await,
        Command::Proxy(a) => fleet::proxy(a).await,
        Command::Devices(a) => fleet::devices(a).await,
        Command::Fleet { command } => fleet::fleet(command).await,
        Command::Runs(a) => records::runs(a).await,
        Command::Status(a) => records::status(a).await,
        Command::Dashboard(a) => records::dashboard(a).await,
        Command::Operator {
            command: OperatorCommand::Add(a),
        } => records::operator_add(a),
        Command::Data { command } => data::data(command),
    }
}

fn main() -> std::process::ExitCode {
    pollen_workflows::cli::main(dispatch(Cli::parse().command))
}
