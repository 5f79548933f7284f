"""Does ASHA pay? Grid vs ASHA vs random search on a spec whose space is all `choice`s.

    # on the GPU: every grid config trained to the top rung, val loss and seconds at each rung
    python benchmarks/search_efficiency.py table search_spaces/smollm2_tasks.yaml -o table.json --workers 6
    # anywhere (seconds): the three searches replayed on that table over sampler seeds
    python benchmarks/search_efficiency.py replay table.json --seeds 0 1 2 \
        -o benchmarks/results/search_efficiency.json [--live STUDY --storage URL]

Method (a tabular benchmark, as HPOBench / NAS-Bench do): the trials are deterministic given
their params and training seed (the LR schedule spans the top rung whatever rung a trial
stops at), so a trial that ASHA stops at rung r has exactly the curve of the same config in
the full grid up to r. The grid is trained once, for real (QLoRA trials of `trial_worker.recipe`,
`--workers` at a time sharing the GPU, as Ray's fractional GPUs would), and each search is then
replayed on that table with the tool's own parts:

- grid: every config to the top rung;
- ASHA: the spec's sampler (TPE, seeded with each seed) asking through an Optuna study, Ray
  Tune's own `ASHAScheduler` (the spec's rungs and reduction factor) deciding at each rung,
  `resources.max_concurrent_trials` trials running at once in simulated time, `num_trials` trials;
- random: distinct configs drawn at random (seeded), each to the top rung, until the next one
  would exceed ASHA's GPU-seconds for that seed.

GPU-seconds of a trial = its wall seconds up to the rung it reached (model load and
evaluations included) x the GPU share each trial had in the table run (1 / workers). Best val
loss = the lowest top-rung val loss among the trials that reached the top rung.
`--live` adds the real `sweep run` of the same spec (its study): best value and GPU-seconds.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------- the table (GPU)

def _grid(spec) -> tuple[list[str], list[tuple]]:
    params = spec.search.params
    bad = [n for n, p in params.items() if p.type != "choice"]
    if bad:
        raise SystemExit(f"{spec.name}: the grid needs `type: choice` for every search param; not choice: {bad}")
    names = sorted(params)
    return names, list(itertools.product(*(params[n].values for n in names)))


def _train_one(job: dict, params: dict, share: float, cpus: int) -> dict:
    """One config trained to the top rung in this worker process: its report at every rung."""
    from trial_worker.entry import trial_job
    from trial_worker.recipe import run

    job = trial_job(params, job, cpus=cpus, gpus=share)
    reports = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-eff-") as tmp:
        try:
            run(job, report=lambda m, d: reports.append(m), output_dir=tmp)
            error = None
        except Exception as e:  # a failed config is a row of the table, not the end of the benchmark
            error = f"{type(e).__name__}: {e}"[:300]
    return {"params": params, "error": error, "process_s": time.perf_counter() - t0,
            # the table's rows keep the key `step` of results/search_efficiency.json
            "rungs": [{"step": m["steps"], **{k: m[k] for k in ("val_loss", "wall_s", "train_s", "micro_batch", "accumulation")}}
                      for m in reports]}


def make_table(spec_path: Path, out: Path, workers: int, cpus: int) -> dict:
    from sweep.spec import load_spec, resolve_paths
    from trial_worker.entry import prepare_assets

    spec = load_spec(spec_path)
    job = prepare_assets(resolve_paths(spec, spec_path.parent).job(), spec_path.parent).model_dump(mode="json")
    names, grid = _grid(spec)
    share = 1.0 / workers
    t0 = time.perf_counter()
    import multiprocessing

    import torch

    table = {
        "spec": str(spec_path), "spec_name": spec.name, "names": names, "rungs": spec.budget.rungs,
        "budget_unit": spec.budget.unit, "workers": workers, "gpu_share": share,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "table_wall_s": None, "rows": [],
    }
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_one, job, dict(zip(names, values)), share, cpus) for values in grid]
        for f in futures:
            r = f.result()
            table["rows"].append(r)
            table["table_wall_s"] = time.perf_counter() - t0
            out.write_text(json.dumps(table, indent=1) + "\n")  # after each row: a cut-short run keeps what it did
            last = r["rungs"][-1] if r["rungs"] else {}
            print(f"[{len(table['rows'])}/{len(grid)}] {r['params']} -> val_loss {last.get('val_loss')} "
                  f"wall {last.get('wall_s', 0):.1f}s {r['error'] or ''}", flush=True)
    print(f"wrote {out}: {len(grid)} configs in {table['table_wall_s']:.0f} s")
    return table


# ---------------------------------------------------------------------------- the replays (CPU)

class _Trial:
    """What Ray's ASHAScheduler needs of a trial: an id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def __hash__(self):
        return hash(self.trial_id)


def _curves(table: dict) -> dict[tuple, list[dict]]:
    top = table["rungs"][-1]
    return {tuple(r["params"][n] for n in table["names"]): r["rungs"] for r in table["rows"]
            if not r["error"] and r["rungs"] and r["rungs"][-1]["step"] == top}


def replay_grid(table: dict) -> dict:
    curves = _curves(table)
    gpu_s = sum(c[-1]["wall_s"] for c in curves.values()) * table["gpu_share"]
    best = min(curves, key=lambda k: curves[k][-1]["val_loss"])
    return {"trials": len(curves), "best_val_loss": curves[best][-1]["val_loss"],
            "best_params": dict(zip(table["names"], best)), "gpu_s": gpu_s}


def replay_asha(table: dict, spec, seed: int) -> dict:
    """The spec's sampler + Ray's ASHAScheduler over the table, `max_concurrent_trials` at a time."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sweep.space import make_sampler, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves, names, share = _curves(table), table["names"], table["gpu_share"]
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"seed": seed})})
    study = optuna.create_study(direction="minimize", sampler=make_sampler(spec))
    space = optuna_space(spec)
    b = spec.budget
    asha = ASHAScheduler(time_attr="steps", metric="val_loss", mode="min", max_t=b.max,
                         grace_period=b.min, reduction_factor=b.reduction_factor)
    n, concurrency = spec.num_trials, spec.resources.max_concurrent_trials or spec.num_trials
    events: list = []
    seq = itertools.count()
    launched, gpu_s, finished, end = 0, 0.0, [], 0.0

    def launch(now: float) -> None:
        nonlocal launched
        ot = study.ask(space)
        key = tuple(ot.params[k] for k in names)
        trial = _Trial(f"t{launched}")
        asha.on_trial_add(None, trial)
        launched += 1
        heapq.heappush(events, (now + curves[key][0]["wall_s"], next(seq), trial, ot, key, 0))

    for _ in range(min(concurrency, n)):
        launch(0.0)
    while events:
        now, _, trial, ot, key, k = heapq.heappop(events)
        row = curves[key][k]
        ot.report(row["val_loss"], row["step"])
        result = {"steps": row["step"], "val_loss": row["val_loss"], "training_iteration": k + 1}
        top = k == len(curves[key]) - 1
        if top or asha.on_trial_result(None, trial, result) == TrialScheduler.STOP:
            if top:
                study.tell(ot, row["val_loss"])
                finished.append((row["val_loss"], key))
            else:
                study.tell(ot, state=optuna.trial.TrialState.PRUNED)
            asha.on_trial_complete(None, trial, result)
            gpu_s += row["wall_s"] * share
            end = now
            if launched < n:
                launch(now)
        else:
            nxt = curves[key][k + 1]
            heapq.heappush(events, (now + nxt["wall_s"] - row["wall_s"], next(seq), trial, ot, key, k + 1))
    best_loss, best_key = min(finished)
    return {"seed": seed, "trials": n, "reached_top": len(finished), "best_val_loss": best_loss,
            "best_params": dict(zip(names, best_key)), "gpu_s": gpu_s, "simulated_wall_s": end}


def replay_random(table: dict, seed: int, gpu_budget_s: float) -> dict:
    """Distinct random configs, each to the top rung, while the GPU-seconds stay within `gpu_budget_s` (>= 1 trial)."""
    curves = _curves(table)
    keys = sorted(curves)
    random.Random(seed).shuffle(keys)
    spent, tried = 0.0, []
    for key in keys:
        cost = curves[key][-1]["wall_s"] * table["gpu_share"]
        if tried and spent + cost > gpu_budget_s:
            break
        spent += cost
        tried.append(key)
    best = min(tried, key=lambda k: curves[k][-1]["val_loss"])
    return {"seed": seed, "trials": len(tried), "best_val_loss": curves[best][-1]["val_loss"],
            "best_params": dict(zip(table["names"], best)), "gpu_s": spent}


def live_sweep(study_name: str, storage: str, gpus_per_trial: float) -> dict:
    """The real `sweep run` of the spec, from its study: best top-rung value and GPU-seconds."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    gpu_s = 0.0
    for t in study.trials:
        rungs = [v for k, v in t.user_attrs.items() if k.startswith("rung_") and isinstance(v, dict)]
        gpu_s += max((r.get("wall_s", 0.0) for r in rungs), default=0.0) * gpus_per_trial
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value) if done else None
    return {"study": study_name, "trials": len(study.trials), "complete": len(done),
            "best_val_loss": best.value if best else None, "best_params": best.params if best else None,
            "gpu_s": gpu_s}


def replay(table_path: Path, seeds: list[int], out: Path, live: str | None, storage: str | None) -> dict:
    from sweep.spec import load_spec

    table = json.loads(table_path.read_text())
    spec = load_spec(ROOT / table["spec"] if not Path(table["spec"]).is_absolute() else Path(table["spec"]))
    grid = replay_grid(table)
    asha = [replay_asha(table, spec, s) for s in seeds]
    rand = [replay_random(table, s, a["gpu_s"]) for s, a in zip(seeds, asha)]

    def mean(xs):
        return sum(xs) / len(xs)

    gaps = [(a["best_val_loss"] - grid["best_val_loss"]) / grid["best_val_loss"] for a in asha]
    summary = {
        "asha_gap_to_grid_best_pct": [round(100 * g, 3) for g in gaps],
        "asha_mean_gap_pct": round(100 * mean(gaps), 3),
        "asha_gpu_s_fraction_of_grid": [round(a["gpu_s"] / grid["gpu_s"], 4) for a in asha],
        "random_gap_to_grid_best_pct": [round(100 * (r["best_val_loss"] - grid["best_val_loss"]) / grid["best_val_loss"], 3)
                                        for r in rand],
        "target": "ASHA within 1% of the grid's best val loss using <= 25% of the grid's GPU-seconds",
    }
    summary["target_met_every_seed"] = all(g <= 0.01 for g in gaps) and all(
        f <= 0.25 for f in summary["asha_gpu_s_fraction_of_grid"])
    result = {
        "benchmark": "search_efficiency",
        "date": table["date"], "device": table["device"], "spec": table["spec"],
        "method": "tabular: the full grid trained once for real, searches replayed on it (see the script's doc)",
        "grid_table": {"configs": len(table["rows"]), "workers_sharing_the_gpu": table["workers"],
                       "rungs": table["rungs"], "budget_unit": table["budget_unit"],
                       "wall_s": round(table["table_wall_s"], 1),
                       "rows": [{"params": r["params"], "error": r["error"],
                                 "val_loss": [x["val_loss"] for x in r["rungs"]],
                                 "wall_s": [round(x["wall_s"], 2) for x in r["rungs"]]} for r in table["rows"]]},
        "grid": grid, "asha": asha, "random_at_asha_gpu_s": rand, "summary": summary,
    }
    if live:
        result["live_asha_sweep"] = live_sweep(live, storage, spec.resources.gpus_per_trial)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"grid": {k: grid[k] for k in ("best_val_loss", "gpu_s")}, **summary}, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="train every grid config to the top rung (GPU)")
    t.add_argument("spec", type=Path)
    t.add_argument("-o", "--out", type=Path, default=Path("search_table.json"))
    t.add_argument("--workers", type=int, default=6, help="trials at once, sharing the GPU")
    t.add_argument("--cpus", type=int, default=max(1, (os.cpu_count() or 2) // 8), help="torch threads per trial")
    r = sub.add_parser("replay", help="grid vs ASHA vs random on a table, over sampler seeds")
    r.add_argument("table", type=Path)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_efficiency.json")
    r.add_argument("--live", help="study name of a real `sweep run` of the same spec")
    r.add_argument("--storage", help="its storage URL")
    a = p.parse_args()
    if a.cmd == "table":
        make_table(a.spec, a.out, a.workers, a.cpus)
    else:
        replay(a.table, a.seeds, a.out, a.live, a.storage)


if __name__ == "__main__":
    main()
