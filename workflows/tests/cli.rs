//! The `pollen` binary as a user runs it.

use std::process::Command;

#[test]
fn simulate_json_prints_one_json_object_per_round_and_nothing_else() {
    let runs = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "simulate",
            "--rounds",
            "2",
            "--clients",
            "10",
            "--json",
            "--runs-dir",
        ])
        .arg(runs.path())
        .output()
        .expect("pollen runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(v["round"], i as u64 + 1);
        for key in [
            "accuracy",
            "loss",
            "sampled",
            "succeeded",
            "failed",
            "seconds",
        ] {
            assert!(
                v.get(key).is_some_and(|x| !x.is_null()),
                "{key} missing in {line}"
            );
        }
        assert_eq!(v["sampled"], 2); // max(floor(10 * 0.1), min_fit_clients = 2)
    }
    let acc = serde_json::from_str::<serde_json::Value>(lines[1]).expect("json")["accuracy"]
        .as_f64()
        .expect("number");
    assert!(
        acc > 0.85,
        "accuracy after 2 rounds of 2 x 6,000 examples: {acc}"
    );
    assert!(stderr.contains("records:"), "summary on stderr: {stderr}");
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    let spec =
        pollen_workflows::spec::DEFAULT_SPEC.replace("fraction_fit = 0.1", "fraction_fit = 2.0");
    std::fs::write(&path, spec).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["simulate", "--config"])
        .arg(&path)
        .output()
        .expect("pollen runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("fraction_fit"),
        "{stderr}"
    );
}
