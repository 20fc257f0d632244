//! `pollen serve --config FILE`: the service's settings in a TOML file whose keys are its
//! flags' names (`runs_dir` for `--runs-dir`), so that the file and the command line are one
//! vocabulary with one validation: the file's settings become flags, and the flags given on
//! the command line come after them and win.

use std::path::Path;

use anyhow::Context;
use clap::{CommandFactory, Parser};

use super::serve::ServeArgs;

/// The commented default configuration (`pollen serve --print-default-config`).
pub const DEFAULT_TOML: &str = r#"# pollen serve configuration (`pollen serve --config serve.toml`). Keys are the flags' names
# (`runs_dir` for --runs-dir); flags given on the command line override the file. The values
# shown are the defaults.

# The fleet whose proxies and agents join: only runs whose spec names it ([devices] fleet) run
# here.
fleet = "default"
# The Fleet gRPC API, where proxies and direct agents join.
listen = "127.0.0.1:50051"
# The dashboard, its JSON API, the control API (submit, stop, resume) and /metrics. Beyond
# loopback it needs operators.
http = "127.0.0.1:0"
# Checkpoints, logs and (without `database`) the SQLite run table.
runs_dir = "runs"
# The run table in PostgreSQL instead: postgres://user:password@host:5432/pollen
# database = "postgres://pollen@db.example:5432/pollen"
# How long each run waits for its strategy's min_available_clients.
wait_for_clients = "10m"

# Mutual TLS on the Fleet API (`pollen fleet provision` writes these).
# tls_cert = "pki/coordinator.pem"
# tls_key = "pki/coordinator.key"
# client_ca = "pki/ca.pem"

# Operators (`pollen operator add`) and, optionally, a Cedar policy of your own.
# operators = "operators.toml"
# operator_policy = "operators.cedar"

# Object storage: an S3-compatible endpoint, or the embedded S3 server on s3_listen.
# s3_endpoint = "https://minio.example:9000"
s3_bucket = "pollen"
s3_region = "us-east-1"
s3_virtual_hosted = false
s3_listen = "127.0.0.1:0"
# s3_tls_cert = "pki/coordinator.pem"
# s3_tls_key = "pki/coordinator.key"
# s3_ca = "pki/ca.pem"
# Weights inline in gRPC instead of object storage (direct clients only).
inline_weights = false
"#;

/// `pollen serve`'s arguments alone, parsed with later flags overriding earlier ones.
#[derive(Parser)]
#[command(name = "pollen serve", args_override_self = true)]
struct ServeCommand {
    #[command(flatten)]
    args: ServeArgs,
}

/// The flags `table` (a config file's settings) stands for; `origin` names it in errors.
fn flags(table: &toml::Table, origin: &str) -> anyhow::Result<Vec<String>> {
    let command = ServeCommand::command();
    let known: Vec<&str> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "config" | "print-default-config" | "help"))
        .collect();
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        anyhow::ensure!(
            known.contains(&flag.as_str()),
            "{origin}: unknown setting {key:?}; the settings are: {}",
            known
                .iter()
                .map(|k| k.replace('-', "_"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match value {
            toml::Value::Boolean(true) => out.push(format!("--{flag}")),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.extend([format!("--{flag}"), s.clone()]),
            toml::Value::Integer(i) => out.extend([format!("--{flag}"), i.to_string()]),
            other => {
                anyhow::bail!("{origin}: {key} = {other}: give a string, a number or true/false")
            }
        }
    }
    Ok(out)
}

/// `pollen serve`'s arguments from the file at `path`, then `command_line` (the arguments
/// after `serve`), which override it.
pub fn with_file(path: &Path, command_line: &[String]) -> anyhow::Result<ServeArgs> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| origin.clone())?;
    let from_file = flags(&table, &origin)?;
    let argv = std::iter::once("pollen serve".to_string())
        .chain(from_file)
        .chain(command_line.iter().cloned());
    ServeCommand::try_parse_from(argv)
        .map(|c| c.args)
        .map_err(|e| anyhow::anyhow!("{origin} with the command line: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn parse(args: &[&str]) -> ServeArgs {
        ServeCommand::try_parse_from(std::iter::once("pollen serve").chain(args.iter().copied()))
            .expect("parses")
            .args
    }

    #[test]
    fn the_printed_default_config_is_the_default() {
        let (_dir, path) = file(DEFAULT_TOML);
        let from_file = with_file(&path, &[]).expect("the default config parses");
        assert_eq!(format!("{from_file:?}"), format!("{:?}", parse(&[])));
    }

    #[test]
    fn the_file_sets_and_the_command_line_overrides() {
        let (_dir, path) = file(
            "listen = \"127.0.0.1:6000\"\nruns_dir = \"/srv/pollen\"\ninline_weights = true\n",
        );
        let a = with_file(&path, &["--listen".into(), "127.0.0.1:7000".into()]).expect("ok");
        assert_eq!(a.service.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(a.service.runs_dir, std::path::PathBuf::from("/srv/pollen"));
        assert!(a.service.inline_weights);
    }

    #[test]
    fn unknown_and_bad_settings_are_named() {
        let (_dir, path) = file("listen = \"127.0.0.1:6000\"\nrun_dir = \"x\"\n");
        let e = with_file(&path, &[]).expect_err("unknown").to_string();
        assert!(e.contains("\"run_dir\"") && e.contains("runs_dir"), "{e}");
        let (_dir, path) = file("listen = \"not an address\"\n");
        let e = format!("{:#}", with_file(&path, &[]).expect_err("bad value"));
        assert!(e.contains("serve.toml") && e.contains("--listen"), "{e}");
    }
}
