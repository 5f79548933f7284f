#!/usr/bin/env bash
# Issue #19's GPU measurements in as few device calls as they fit: each stage named on the command line runs
# in turn, and copies its results to $OUT as soon as it ends (a call cut short by its time limit still brings
# back every stage that finished). Run from the repository root, with the GPU site unpacked on PYTHONPATH
# (../shared/device/make-gpu-site.sh prints how). Stages, with the wall time each took on an H100 (2026-12-07):
#
#   steps     the pack engine alone at K = 1a, 8, 24 mixed trials; torch.profiler at K=24 with its chrome trace
#             (benchmarks/pack_steps.py; ~60-100 s). With .baseline/ (an older checkout, e.g.
#             `git archive <commit> | tar x -C .baseline`) it runs that checkout's engine first, same card;
#             with LIGER_AB=1 this tree's engine without Liger's kernels first.
#   pycache   byte-code for the image's own packages where it lacks it (in place, or where read-only in a cache
#             under $PYCACHE, default /tmp/pyc, for the later stages of the call); `import peft` timed (~30 s)
#   startup   a pack's start-up parts one after another in a fresh process (imports, CUDA, the 4-bit load, the
#             data), the load and the data under cProfile (benchmarks/pack_startup.py; ~40 s)
#   engine    a pack engine's whole build (benchmarks/pack_startup.py --engine) by its marks, twice (Triton's cache
#             cold, then warm), then under -X importtime (the 40 slowest imports; ~90 s)
#   packed    the reference 24-trial sweep, packed (benchmarks/sweep_makespan.py; ~280 s)
#   baseline  the packed sweep with SWEEP_EARLY_PACK=0: its first pack built in its Ray actor, after Ray's start
#   solo      the same 24 trials, one trial per process, cut at $SOLO_S s (default 480): figures of an unfinished
#             sweep, tokens/s over its wall time (the whole one takes >600 s, a device call's limit)
#   lone      one trial alone in a pack, then in its own process (~150 s)
#   parity    packed vs own-process val loss at every rung, 4 fixed configs (benchmarks/pack_parity.py; ~110 s)
#
#   bash benchmarks/pack_gpu.sh pycache parity packed   # one call (~420 s): start-up figures need pycache first
#   bash benchmarks/pack_gpu.sh steps packed       # one call (~400 s)
#   bash benchmarks/pack_gpu.sh solo               # the next
#   bash benchmarks/pack_gpu.sh parity lone        # and the next
#   TINY=1 bash benchmarks/pack_gpu.sh steps packed solo lone parity   # a CPU try-out of the script (tiny model)
set -uo pipefail
OUT=${OUT:-$PWD/out-pack}
W=${W:-/tmp/sweep_makespan}
mkdir -p "$OUT" "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=${PY:-python}
TRIALS=24; KS=1a,8,24; STEPS_TINY=(); SWEEP_TINY=(); PARITY_TINY=(); STARTUP_TINY=()
if [ -n "${TINY:-}" ]; then
    TRIALS=4; KS=1a,2; STEPS_TINY=(--tiny --steps 2 --warmup 1); SWEEP_TINY=(--tiny --ladder 2,4 --rows 200)
    PARITY_TINY=(--tiny); STARTUP_TINY=(--tiny)
fi
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
date -u +"%Y-%m-%dT%H:%M:%SZ" > "$OUT/started"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
git rev-parse HEAD > "$OUT/commit" 2>/dev/null || true

keep() {  # copy the stage's result files to $OUT now
    for f in "$@"; do [ -e "$f" ] && cp -r "$f" "$OUT/"; done
    cp "$W"/*.marks.jsonl "$OUT/" 2>/dev/null || true
}

for stage in "$@"; do
    stamp "$stage"
    case $stage in
        steps)
            if [ -d .baseline/trial_worker ]; then
                $PY benchmarks/pack_steps.py --root .baseline --label before --ks $KS --profile-k 24 "${STEPS_TINY[@]}" \
                    --out "$OUT/pack_steps.json" 2>&1 | tail -40
            fi
            if [ -n "${LIGER_AB:-}" ]; then  # the same engine without Liger's kernels first, same card
                $PY benchmarks/pack_steps.py --label no-liger --liger off --ks $KS --profile-k 24 "${STEPS_TINY[@]}" \
                    --out "$OUT/pack_steps.json" 2>&1 | tail -40
            fi
            $PY benchmarks/pack_steps.py --label after --ks $KS --profile-k 24 "${STEPS_TINY[@]}" \
                --trace "$OUT/pack_k24_trace.json" --out "$OUT/pack_steps.json" 2>&1 | tail -40
            ;;
        pycache)
            # The image's own packages (torch, transformers, peft, ...) and the unpacked GPU site (Ray, bitsandbytes,
            # TRL, Optuna...: make-gpu-site.sh strips their __pycache__) may come without byte-code, which pip would
            # have compiled: every process then compiles what it imports, each time (a read-only path) or the
            # first time. A user's `pip install` leaves it compiled: run this stage first for start-up figures. Compiled once here: in place where writable, else into a cache of our own
            # (PYTHONPYCACHEPREFIX, $PYCACHE) that the later stages of the call use.
            dirs=$($PY -c "import importlib.util as u, os; print(' '.join(os.path.dirname(s.origin) for s in map(u.find_spec, ('torch', 'transformers', 'peft', 'accelerate', 'safetensors', 'tokenizers', 'huggingface_hub', 'bitsandbytes', 'trl', 'liger_kernel', 'triton', 'datasets', 'ray', 'optuna', 'sqlalchemy', 'alembic', 'pydantic', 'pandas', 'pyarrow', 'numpy', 'wandb', 'jinja2', 'yaml', 'rich')) if s))")
            missing=0; readonly=0
            for d in $dirs; do
                nc=$(find "$d" -name '*.pyc' | wc -l); np=$(find "$d" -name '*.py' | wc -l)
                echo "$d: $nc .pyc of $np .py, writable: $([ -w "$d" ] && echo yes || echo no)"
                [ "$nc" -lt $(( np / 2 )) ] && missing=1 && { [ -w "$d" ] || readonly=1; }
            done
            $PY -c "import time; t = time.perf_counter(); import peft; print(f'import peft before: {time.perf_counter() - t:.2f} s')" 2>/dev/null
            if [ $missing = 1 ]; then
                [ $readonly = 1 ] && export PYTHONPYCACHEPREFIX=${PYCACHE:-/tmp/pyc} && echo "byte-code cache: $PYTHONPYCACHEPREFIX"
                $PY -m compileall -q -j 0 $dirs >/dev/null 2>&1
                $PY -c "import time; t = time.perf_counter(); import peft; print(f'import peft after: {time.perf_counter() - t:.2f} s')" 2>/dev/null
            fi
            ;;
        startup)
            $PY benchmarks/pack_startup.py "${STARTUP_TINY[@]}" --out "$OUT/pack_startup.json" 2>&1 | grep -v '^Map\|^Filter\|^Loading' | tail -60
            ;;
        engine)  # a pack engine's build by its marks: cold (Triton's cache empty), again, and its imports' times
            for run in cold warm; do
                $PY benchmarks/pack_startup.py --engine --label "engine-$run" "${STARTUP_TINY[@]}" --out "$OUT/pack_startup.json" 2>&1 \
                    | grep -v '^Map\|^Filter\|^Loading' | tail -30
            done
            $PY -X importtime benchmarks/pack_startup.py --engine --label engine-importtime "${STARTUP_TINY[@]}" \
                --out "$OUT/pack_startup.json" 2> "$OUT/engine_importtime.txt" >/dev/null
            sort -t'|' -k2 -n -r "$OUT/engine_importtime.txt" | head -40
            ;;
        packed)  # named once more in the same call: run again (Triton's kernels then come from its cache), as _2, _3...
            n=1; sfx=""; while [ -e "$OUT/makespan_packed$sfx.json" ]; do n=$((n + 1)); sfx="_$n"; done
            $PY benchmarks/sweep_makespan.py --mode packed --trials $TRIALS "${SWEEP_TINY[@]}" --work "$W$sfx" --out "$OUT/makespan_packed$sfx.json" 2>&1 | tail -40
            cp "$W$sfx/makespan_packed.marks.jsonl" "$OUT/makespan_packed$sfx.marks.jsonl" 2>/dev/null || true
            ;;
        baseline)  # the packed sweep with its first pack built in its Ray actor (no pack started before Ray)
            SWEEP_EARLY_PACK=0 $PY benchmarks/sweep_makespan.py --mode packed --trials $TRIALS "${SWEEP_TINY[@]}" --work "$W/baseline" \
                --out "$OUT/makespan_packed_baseline.json" 2>&1 | tail -40
            cp "$W"/baseline/makespan_packed.marks.jsonl "$OUT/makespan_packed_baseline.marks.jsonl" 2>/dev/null || true
            ;;
        solo)
            $PY benchmarks/sweep_makespan.py --mode solo --trials $TRIALS "${SWEEP_TINY[@]}" --work "$W" --max-s "${SOLO_S:-480}" \
                --out "$OUT/makespan_solo.json" 2>&1 | tail -40
            keep
            ;;
        lone)
            $PY benchmarks/sweep_makespan.py --mode lone "${SWEEP_TINY[@]}" --work "$W" --out "$OUT/makespan_lone.json" 2>&1 | tail -40
            keep
            ;;
        parity)
            $PY benchmarks/pack_parity.py "${PARITY_TINY[@]}" --out "$OUT/pack_parity.json" 2>&1 | tail -40
            ;;
        *)
            echo "unknown stage $stage (pycache, steps, startup, engine, packed, baseline, solo, lone, parity)"; exit 2
            ;;
    esac
    stamp "$stage done"
done
