#!/usr/bin/env bash
# Issue 21 on the GPU machine: does the search pay on a real model? SmolLM2-135M-Instruct on the word problems
# (search_spaces/smollm2_word_problems.yaml): the full grid trained to the top rung in one pack, ASHA (TPE) and
# random search replayed on it over 5 seeds, and one live `sweep run` (packed). Run from the repository root on
# the GPU machine, one phase per device call, the calls in a row (each within 30 s of the last: /tmp is kept):
#
#   stage   take a carried part of the model (benchmarks/stage_smollm2.py receive); nothing else
#   table   (stage, then) write model + data, train the grid           -> $OUT/search_table.json
#   sweep   the live sweep, then the replays with it                   -> $OUT/search_efficiency.json, status.txt
#   all     table and sweep in one call
#   evaluate  (after sweep) export the best trial, train it, base vs tuned on 10 held-out prompts
#           -> $OUT/evaluation.tar.gz (evaluation.md, evaluation.csv, loss_curves.png)
#
# Knobs (environment): WHERE="lr_scheduler_type=cosine" (a sub-grid: 24 configs), BUDGET_MAX=60 (a lower top
# rung), TABLE_S / SWEEP_S (time limits of the two steps, s; a packed table cut short keeps every curve so far
# and is replayed at the highest rung all configs reached), WORKERS (configs in the pack at once, default all).
# The packages: carry .gpu-site in the first call (../shared/device/make-gpu-site.sh); it is unpacked once.
set -euo pipefail
phase=${1:-all}
OUT=${OUT:-$PWD/out-word-problems}
W=${W:-/tmp/wp-gpu}
mkdir -p "$OUT" "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then  # the GPU machine: its packages from the carried .gpu-site, once
  if [ ! -d /tmp/s/site ] && [ -f .gpu-site/site.tar.xz ]; then mkdir -p /tmp/s && tar xJf .gpu-site/site.tar.xz -C /tmp/s; fi
  export PYTHONPATH=$PWD:/tmp/s/site:/tmp/smollm2-stage/site${PYTHONPATH:+:$PYTHONPATH}
else  # a check of this script elsewhere, with the project's own environment
  export PYTHONPATH=$PWD:/tmp/smollm2-stage/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }

if [ -d .stage/smollm2 ]; then $PY benchmarks/stage_smollm2.py receive; fi
[ "$phase" = stage ] && exit 0
test -d /tmp/smollm2-stage/site || { echo "the model is not staged yet: carry the parts first"; exit 2; }

# The spec runs from $W, so its generated model and data (.demo_assets/ beside it) live outside the checkout.
# SPEC=... runs another spec of the same kind (the CPU check of this script: a tiny model, see benchmarks/README).
SRC=${SPEC:-search_spaces/smollm2_word_problems.yaml}
cp "$SRC" "$W/"
SPEC=$W/$(basename "$SRC")
NAME=$($PY -c "import yaml; print(yaml.safe_load(open('$SPEC'))['name'])")
DB="sqlite:///$W/study.db"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"; fi

if [ "$phase" = table ] || [ "$phase" = all ]; then
  stamp "model and data"
  $PY -c "
from sweep.spec import load_spec, resolve_paths
from trial_worker.entry import prepare_assets
s = load_spec('$SPEC'); prepare_assets(resolve_paths(s, '$W').job(), '$W')"
  stamp "grid table (packed)"
  # shellcheck disable=SC2086
  timeout "${TABLE_S:-480}" $PY benchmarks/search_efficiency.py table "$SPEC" -o "$W/search_table.json" --packed \
      --workers "${WORKERS:-64}" --cpus "${CPUS:-2}" ${WHERE:+--where $WHERE} ${BUDGET_MAX:+--budget-max $BUDGET_MAX} \
      2>&1 | grep -v -e Warning -e warn || true
  cp "$W/search_table.json" "$OUT/" || true
  stamp "table done"
fi

if [ "$phase" = sweep ] || [ "$phase" = all ]; then
  stamp "live sweep (packed)"
  timeout "${SWEEP_S:-360}" $PY -m sweep.cli run "$SPEC" --storage "$DB" 2>&1 | tail -40 || true
  $PY -m sweep.cli status "$NAME" --storage "$DB" | tee "$OUT/status.txt" || true
  cp "$W/study.db" "$OUT/study.db" || true
  stamp "replays (5 seeds) + the live sweep"
  # the highest rung every config reached (the top one unless the table was cut short)
  TOP=$($PY -c "
import json; t = json.load(open('$W/search_table.json'))
done = [max((x['step'] for x in r['rungs']), default=0) for r in t['rows'] if not r['error']]
print(max([s for s in t['rungs'] if all(d >= s for d in done)] or [0]))")
  echo "replaying at top rung $TOP"
  $PY benchmarks/search_efficiency.py replay "$W/search_table.json" --seeds 0 1 2 3 4 --top "$TOP" \
      -o "$OUT/search_efficiency.json" --live "$NAME" --storage "$DB" || true
  stamp "done"
fi

if [ "$phase" = evaluate ]; then
  stamp "export, train, evaluate"
  $PY -m sweep.cli export "$NAME" --storage "$DB" -o "$W/best.yaml"
  $PY -m sweep.cli train "$W/best.yaml" -o "$W/run"
  # a worked answer is up to ~40 tokens: 64 new tokens let every reply reach its `Answer:` line
  $PY -m sweep.cli evaluate "$W/run" --max-new-tokens 64
  tar czf "$OUT/evaluation.tar.gz" -C "$W/run" evaluation.md evaluation.csv loss_curves.png
  stamp "done"
fi
