//! Specs: the shipped ones, and what a bad one is told.

use super::*;

#[test]
fn the_built_in_spec_is_the_paper_setup() {
    let s = RunSpec::default_spec();
    assert_eq!(s.model, ModelSpec::preset("mnist-2nn").expect("preset"));
    assert_eq!(s.data.clients, Some(100));
    assert_eq!(s.data.partition, Partition::Iid);
    let f = &s.strategy;
    assert_eq!(f.fraction_fit, 0.1);
    assert_eq!(
        (
            s.train.local_epochs,
            s.train.batch_size,
            s.train.learning_rate
        ),
        (1, 10, 0.1)
    );
    // What is saved with a run parses back to the same spec.
    assert_eq!(
        RunSpec::parse(&s.to_toml(), "saved").expect("round trip"),
        s
    );
}

#[test]
fn shipped_specs_parse_and_round_trip() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = 0;
    for folder in [dir.to_path_buf(), dir.join("experiments")] {
        for entry in std::fs::read_dir(&folder).expect("a spec folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml")
                && path.file_name() != Some("Cargo.toml".as_ref())
            {
                let (spec, _) = RunSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    RunSpec::parse(&spec.to_toml(), "saved").unwrap_or_else(|e| panic!("{e}")),
                    spec,
                    "{}",
                    path.display()
                );
                // An experiment's run is named after its file, so that its records
                // find their spec.
                if folder.ends_with("experiments") {
                    let stem = path.file_stem().and_then(|s| s.to_str());
                    assert_eq!(Some(spec.name.as_str()), stem, "{}", path.display());
                }
                found += 1;
            }
        }
    }
    assert!(found >= 30, "{found} specs");
}

#[test]
fn learning_settings_are_checked_together() {
    let with = |extra: &str| RunSpec::parse(&format!("{DEFAULT_SPEC}\n{extra}"), "x.toml");
    let e =
        with("[privacy]\nmechanism = \"central\"\nnoise_multiplier = 1.0\nclipping_norm = 1.0\n")
            .map(drop);
    assert!(e.is_ok(), "{e:?}");
    let e = with("[compression]\nupdate = \"f32\"\nmodel = \"int8\"\n")
        .expect_err("an int8 model needs delta updates")
        .to_string();
    assert!(e.contains("compression.model"), "{e}");
    let e = with("[fedbuff]\nbuffer_size = 0\n")
        .expect_err("K = 0")
        .to_string();
    assert!(e.contains("fedbuff.buffer_size"), "{e}");
    let robust = DEFAULT_SPEC.replace("name = \"fedavg\"", "name = \"fedmedian\"");
    let e = RunSpec::parse(
        &format!("{robust}\n[privacy]\nmechanism = \"central\"\nnoise_multiplier = 1.0\nclipping_norm = 1.0\n"),
        "x.toml",
    )
    .expect_err("DP calibrated for a mean")
    .to_string();
    assert!(e.contains("fedmedian"), "{e}");
    let e = with("[simulation]\nattack = { kind = \"sign_flip\", fraction = 1.5 }\n")
        .expect_err("fraction")
        .to_string();
    assert!(e.contains("simulation.attack.fraction"), "{e}");
    let fit = with("[compression]\nupdate = \"topk\"\ntopk_fraction = 0.05\n")
        .expect("valid")
        .fit_config();
    assert_eq!(
        fit.get("update_codec").and_then(scalar::as_str),
        Some("delta-topk:0.05")
    );
}

#[test]
fn bad_specs_name_the_field() {
    let bad = DEFAULT_SPEC.replace("fraction_fit = 0.1", "fraction_fit = 1.5");
    let e = RunSpec::parse(&bad, "x.toml")
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("x.toml") && e.contains("fraction_fit"), "{e}");
    let bad = DEFAULT_SPEC.replace("batch_size = 10", "batch_sise = 10");
    let e = RunSpec::parse(&bad, "x.toml")
        .expect_err("unknown field")
        .to_string();
    assert!(e.contains("batch_sise"), "{e}");
    let bad = DEFAULT_SPEC.replace("round_timeout = \"60s\"", "round_timeout = \"soon\"");
    assert!(RunSpec::parse(&bad, "x.toml").is_err());
    let bad = format!("{DEFAULT_SPEC}\n[simulation]\nfailure_rate = 1.0\n");
    let e = RunSpec::parse(&bad, "x.toml")
        .expect_err("a device that always fails")
        .to_string();
    assert!(e.contains("simulation.failure_rate"), "{e}");
    let bad = DEFAULT_SPEC.replace("model = \"mnist-2nn\"", "model = \"mnist-3nn\"");
    let e = RunSpec::parse(&bad, "x.toml")
        .expect_err("preset")
        .to_string();
    assert!(e.contains("mnist-3nn") && e.contains("mnist-2nn"), "{e}");
}

#[test]
fn a_task_spec_names_what_is_missing_or_inconsistent() {
    let base = r#"
name = "vib"
seed = 1
rounds = 3
round_timeout = "30s"

[task]
kind = "classification"
features = ["x", "y"]
label = "state"
window = { length = 32 }

[model]
family = "cnn1d"
channels = [8]

[data]
path = "vib.csv"
clients = 4
partition = { kind = "iid" }

[strategy]
name = "fedavg"
fraction_fit = 0.5
fraction_evaluate = 1.0

[train]
local_epochs = 1
batch_size = 16
learning_rate = 0.01
optimizer = "adam"

[evaluate]
centralized = false
"#;
    let spec = RunSpec::parse(base, "vib.toml").expect("valid");
    let manifest = spec.manifest_with(spec.task()).expect("manifest");
    assert_eq!(manifest.task.shape, Some(vec![2, 32]));
    assert_eq!(manifest.task.holdout, Some(0.2));
    let no_eval = base.replace("fraction_evaluate = 1.0", "fraction_evaluate = 0.0");
    let e = RunSpec::parse(&no_eval, "vib.toml")
        .expect_err("no evaluation")
        .to_string();
    assert!(e.contains("nothing evaluates the model"), "{e}");
    let mlp_on_typo = base.replace("channels = [8]", "chanels = [8]");
    let e = RunSpec::parse(&mlp_on_typo, "vib.toml")
        .expect_err("typo")
        .to_string();
    assert!(e.contains("model.chanels"), "{e}");
    let rnn_without_window = base.replace("window = { length = 32 }\n", "");
    let e = RunSpec::parse(&rnn_without_window, "vib.toml")
        .expect_err("2-D input")
        .to_string();
    assert!(e.contains("cnn1d") && e.contains("windows"), "{e}");
    let bad_lr = base.replace(
        "optimizer = \"adam\"",
        "optimizer = \"adam\"\nmomentum = 0.9",
    );
    let e = RunSpec::parse(&bad_lr, "vib.toml")
        .expect_err("momentum")
        .to_string();
    assert!(e.contains("train.momentum"), "{e}");
}
