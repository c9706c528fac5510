#!/usr/bin/env bash
# Quality per compute, measured: train a domain feature network (the classifier task on
# clean images, configs/digits_classifier.py), then train CONFIG evaluating its EMA
# parameters every EVERY steps in that feature space (Euler/CFG as CONFIG's
# config.sample says, 500 samples against the test split), and print
# step | train_seconds | fd_domain | fd_domain_floor | acc_domain from
# <WORKDIR>/run/eval/metrics.jsonl. train_seconds is the loop's wall time without
# sampling and evaluation (docs/evaluation.md, "During training").
#
#   ./launch/measure_quality_per_compute.sh WORKDIR [CONFIG] [EXTRA FLAGS...]
#
# CONFIG defaults to configs/quickstart.py (~8 min on the 2-core CPU machine); an
# mnist5k config (configs/mnist5k_flow.py) gets an MNIST domain network (28×28, three
# levels) and is an accelerator job. EXTRA FLAGS go to CONFIG's training, after the
# script's own (so they win: --config.eval.every=50). Environment: EVERY (default 100
# for the digits, 1000 for mnist5k), DOMAIN_STEPS (default 1000), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:?usage: $0 WORKDIR [CONFIG] [EXTRA FLAGS...]}
CONFIG=${2:-configs/quickstart.py}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-.venv/bin/python}
DATA=$($PY - "$CONFIG" <<'PYEOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.get_config().data.name)
PYEOF
)
case "$DATA" in
  sklearn_digits) DOMAIN=(); EVERY=${EVERY:-100} ;;
  mnist5k) DOMAIN=(--config.data.name=mnist5k --config.model.channel_mult="(1,2,2)"
                   --config.model.attn_resolutions="(7,)"); EVERY=${EVERY:-1000} ;;
  *) echo "no domain feature network for data.name=$DATA (sklearn_digits, mnist5k)" >&2
     exit 1 ;;
esac
mkdir -p "$W"
$PY launch/train.py --config=configs/digits_classifier.py \
    --config.classifier.noise_conditional=False "${DOMAIN[@]}" \
    --config.train.num_steps="${DOMAIN_STEPS:-1000}" --workdir="$W/domain"
$PY launch/train.py --config="$CONFIG" --workdir="$W/run" --config.eval.every="$EVERY" \
    --config.eval.feature_workdir="$W/domain" --config.eval.metrics="('fd','acc')" \
    --config.eval.num_samples=500 "$@"
$PY - "$W/run/eval/metrics.jsonl" <<'PYEOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
  r = json.loads(line)
  rows[r["step"]] = r  # a rerun appends: keep each step's last evaluation
print("| step | train_seconds | fd_domain | fd_domain_floor | acc_domain |")
print("|---:|---:|---:|---:|---:|")
for step, r in sorted(rows.items()):
  print(f"| {step} | {r['train_seconds']:.1f} | {r['fd_domain']:.5f} | "
        f"{r['fd_domain_floor']:.5f} | {r['acc_domain']:.3f} |")
PYEOF
