#!/usr/bin/env bash
# Runs the experiments of docs/RESULTS.md ("Learning for real fleets") and leaves their records
# in OUT (default runs/experiments): one JSON line per round in OUT/<spec>.jsonl, and the runs
# in OUT/runs (pollen.db, metrics.jsonl, checkpoints), which notebooks/learning.ipynb reads.
#
#   workflows/experiments/run.sh [OUT] [SPEC...]     # all specs, or the named ones
#
# Timing experiments (stragglers, FedBuff against rounds) go over the device path (proxy, MQTT,
# S3) and need the machine to themselves; the others compare accuracy and bytes and run
# in-process. The MNIST CNN runs take about 30 minutes each on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/experiments}"
shift || true
pollen="${POLLEN:-target/debug/pollen}"
[ -x "$pollen" ] || cargo build --bin pollen
mkdir -p "$out/runs"
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
  specs=(fedprox-stragglers fedprox-stragglers-mu0 fedprox-stragglers-mu0.1 fedprox-stragglers-mu1
    fleet-sync fleet-fedbuff
    robust-clean robust-sign_flip-fedavg robust-sign_flip-fedmedian robust-sign_flip-fedtrimmedavg
    robust-sign_flip-krum robust-sign_flip-multikrum robust-scale-fedavg robust-scale-fedmedian
    robust-scale-fedtrimmedavg robust-scale-krum robust-scale-multikrum dp-none dp-z0.5 dp-z1.0 dp-z2.0 dp-adaptive compress-2nn-f32
    compress-2nn-f16 compress-2nn-int8 compress-2nn-topk compress-cnn-f32 compress-cnn-f16
    compress-cnn-int8)
fi
for spec in "${specs[@]}"; do
  case "$spec" in
    fedprox-* | fleet-*) transport=device ;;
    *) transport=in-process ;;
  esac
  echo "== $spec ($transport)" >&2
  "$pollen" simulate --config "workflows/experiments/$spec.toml" --transport "$transport" \
    --runs-dir "$out/runs" --json > "$out/$spec.jsonl"
done
