"""Does ASHA pay? Grid vs ASHA vs random search on a spec whose space is all `choice`s.

    # on the GPU: every grid config trained to the top rung, val loss and seconds at each rung
    python benchmarks/search_efficiency.py table search_spaces/smollm2_word_problems.yaml -o table.json \
        --packed --workers 48            # one warm pack trains them all at once (or: --workers 12, a process each)
    # anywhere (seconds): the three searches replayed on that table over sampler seeds
    python benchmarks/search_efficiency.py replay table.json --seeds 0 1 2 3 4 \
        -o benchmarks/results/search_efficiency.json [--live STUDY --storage URL]
    # a reduced table: a sub-grid (--where NAME=VALUE ...) and/or a lower top rung (--budget-max 60)
    python benchmarks/search_efficiency.py table SPEC --packed --where lora_r=32 --budget-max 60 -o t.json

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

GPU-seconds of a trial: with a process per trial, its wall seconds up to the rung it reached
(model load and evaluations included) x the GPU share each trial had (1 / workers); packed
(`--packed`: one `PackServer` in this process trains up to `--workers` configs at once on one
warm base, as `resources.packing: on` does in a sweep), the table's wall seconds on the whole GPU
shared out by work: training rows seen up to that rung plus a third of each rung evaluation's rows
(a forward is about a third of a forward and backward). Best val loss = the lowest top-rung val
loss among the trials that reached the top rung.
`--live` adds the real `sweep run` of the same spec (its study): best value, GPU-seconds by
share, and its makespan (first trial start to last trial end: with packing, the GPU-seconds).

A reduced table (`--where`, `--budget-max`) is replayed on what it holds: the samplers ask within
its values, ASHA runs its rungs, and ASHA's trial count is the spec's scaled to the table's share
of the spec's grid (or `--asha-trials`).
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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------- the table (GPU)

def _grid(spec, where: Optional[dict[str, list]] = None) -> tuple[list[str], list[tuple]]:
    """The names of the spec's search params and every combination of their values (within `where`, if given)."""
    params = spec.search.params
    bad = [n for n, p in params.items() if p.type != "choice"]
    if bad:
        raise SystemExit(f"{spec.name}: the grid needs `type: choice` for every search param; not choice: {bad}")
    names = sorted(params)
    values = {n: list(params[n].values) for n in names}
    for n, keep in (where or {}).items():
        if n not in values:
            raise SystemExit(f"--where {n}=...: {n} is not a search param of {spec.name}; its params: {names}")
        kept = [v for v in values[n] if v in keep]
        if not kept:
            raise SystemExit(f"--where {n}={keep}: none of the spec's values {values[n]}")
        values[n] = kept
    return names, list(itertools.product(*(values[n] for n in names)))


def _scalar(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_where(items: list[str]) -> dict[str, list]:
    """`["lora_r=8,32", "learning_rate=1e-3"]` -> {"lora_r": [8, 32], "learning_rate": [0.001]}."""
    out: dict[str, list] = {}
    for item in items:
        name, sep, vals = item.partition("=")
        if not sep or not name or not vals:
            raise SystemExit(f"--where {item!r}: write NAME=VALUE[,VALUE...]")
        out.setdefault(name, []).extend(_scalar(v) for v in vals.split(","))
    return out


def _rung_row(m: dict) -> dict:
    # the table's rows keep the key `step` of results/search_efficiency.json
    return {"step": m["steps"], **{k: m.get(k) for k in ("samples", "val_loss", "wall_s", "train_s", "micro_batch",
                                                           "accumulation")}}


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
    rungs = [_rung_row(m) for m in reports]
    for r in rungs:
        r["gpu_s"] = r["wall_s"] * share
    return {"params": params, "error": error, "process_s": time.perf_counter() - t0, "rungs": rungs}


def _train_packed(job: dict, configs: list[dict], max_trials: int, cpus: int, on_progress) -> list[dict]:
    """Every config in one warm pack (`trial_worker.pack.server.PackServer`, here a plain object in this process,
    driven through the calls a packed Tune trial makes: join, poll, proceed, leave), up to `max_trials` at once.
    `on_progress(rows, final)` gets a row per config after each rung report (`done` false while it trains), so
    a run cut short keeps every config's curve so far; returns the rows in the order of `configs`."""
    from trial_worker.entry import trial_job
    from trial_worker.pack.server import PackServer

    server = PackServer("search-efficiency", max_trials=max_trials)
    ids = [f"c{i:03d}" for i in range(len(configs))]
    rows = {i: {"params": params, "error": None, "done": False, "process_s": None, "rungs": []}
            for i, params in zip(ids, configs)}
    t0 = time.time()
    for i, params in zip(ids, configs):
        server.join(i, trial_job(params, job, cpus=cpus).model_dump(mode="json"), None, t0)
    while not all(r["done"] for r in rows.values()):
        changed = False
        for i in ids:
            row = rows[i]
            if row["done"]:
                continue
            for event in server.poll(i, timeout=0.05):
                changed = True
                if event["kind"] == "report":
                    row["rungs"].append(_rung_row(event["metrics"]))
                    server.proceed(i)
                    continue
                if event["kind"] != "done":
                    row["error"] = f"{event.get('type')}: {event.get('message')}"[:300]
                server.leave(i)
                row["done"], row["process_s"] = True, time.time() - t0
                print(f"[{sum(r['done'] for r in rows.values())}/{len(ids)}] {row['params']} -> val_loss "
                      f"{row['rungs'][-1]['val_loss'] if row['rungs'] else None} {row['error'] or ''}", flush=True)
                break
        if changed:
            on_progress([rows[i] for i in ids], False)
    on_progress([rows[i] for i in ids], True)
    return [rows[i] for i in ids]


def _share_out_packed(table: dict, eval_rows: int) -> None:
    """Give each packed row's rungs `gpu_s`: the table's wall seconds (the whole GPU) shared out by work done."""
    def work(row: dict, k: int) -> float:
        return (row["rungs"][k].get("samples") or 0) + eval_rows * (k + 1) / 3

    total = sum(work(r, len(r["rungs"]) - 1) for r in table["rows"] if r["rungs"])
    for r in table["rows"]:
        for k, rung in enumerate(r["rungs"]):
            rung["gpu_s"] = table["table_wall_s"] * work(r, k) / total if total else 0.0


def make_table(spec_path: Path, out: Path, workers: int, cpus: int, *, packed: bool = False,
               where: Optional[dict[str, list]] = None, budget_max: Optional[int] = None) -> dict:
    """Train every grid config (within `where`) to the top rung (`budget_max` if given): `workers` processes
    sharing the GPU, or (`packed`) one pack in this process holding up to `workers` of them at once."""
    from sweep.spec import load_spec, resolve_paths
    from trial_worker.entry import prepare_assets

    spec = load_spec(spec_path)
    if budget_max is not None:
        if not spec.budget.min <= budget_max:
            raise SystemExit(f"--budget-max {budget_max}: must be >= the spec's budget.min ({spec.budget.min})")
        spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"max": budget_max})})
    job = prepare_assets(resolve_paths(spec, spec_path.parent).job(), spec_path.parent).model_dump(mode="json")
    names, grid = _grid(spec, where)
    share = 1.0 / workers
    t0 = time.perf_counter()
    import multiprocessing

    import torch

    table = {
        "spec": str(spec_path), "spec_name": spec.name, "names": names, "rungs": spec.budget.rungs,
        "budget_unit": spec.budget.unit, "budget": spec.budget.model_dump(), "where": where or {},
        "spec_grid_configs": len(_grid(spec)[1]), "packed": packed, "workers": workers,
        "gpu_share": share if not packed else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "table_wall_s": None, "rows": [],
    }

    def record(r: dict) -> None:
        table["rows"].append(r)
        table["table_wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(table, indent=1) + "\n")  # after each row: a cut-short run keeps what it did
        last = r["rungs"][-1] if r["rungs"] else {}
        print(f"[{len(table['rows'])}/{len(grid)}] {r['params']} -> val_loss {last.get('val_loss')} "
              f"wall {last.get('wall_s') or 0:.1f}s {r['error'] or ''}", flush=True)

    if packed:
        last_write = [0.0]

        def progress(rows: list[dict], final: bool) -> None:
            if not final and time.perf_counter() - last_write[0] < 10:
                return
            last_write[0] = time.perf_counter()
            table["rows"], table["table_wall_s"] = rows, time.perf_counter() - t0
            _share_out_packed(table, spec.data.max_eval_samples or 200)
            out.write_text(json.dumps(table, indent=1) + "\n")  # a cut-short run keeps every curve so far

        _train_packed(job, [dict(zip(names, values)) for values in grid], workers, cpus, progress)
        print(f"wrote {out}: {len(grid)} configs in {table['table_wall_s']:.0f} s (packed)")
        return table
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_one, job, dict(zip(names, values)), share, cpus) for values in grid]
        for f in futures:
            record(f.result())
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


def _cost(table: dict, rung: dict) -> float:
    """GPU-seconds of a trial up to this rung (tables before `gpu_s` was recorded: wall x the GPU share)."""
    return rung["gpu_s"] if rung.get("gpu_s") is not None else rung["wall_s"] * table["gpu_share"]


def replay_grid(table: dict) -> dict:
    curves = _curves(table)
    gpu_s = sum(_cost(table, c[-1]) for c in curves.values())
    ranked = sorted(curves, key=lambda k: curves[k][-1]["val_loss"])
    best, median = ranked[0], curves[ranked[len(ranked) // 2]][-1]["val_loss"]
    return {"trials": len(curves), "best_val_loss": curves[best][-1]["val_loss"],
            "best_params": dict(zip(table["names"], best)), "median_val_loss": median,
            "median_over_best_pct": round(100 * (median - curves[best][-1]["val_loss"]) / curves[best][-1]["val_loss"], 2),
            "gpu_s": gpu_s}


def table_spec(table: dict, spec, asha_trials: Optional[int] = None):
    """The spec as the table ran it: its budget, its params' values cut to those the table holds, and
    `num_trials` scaled to the table's share of the spec's grid (unless `asha_trials` is given)."""
    held = {n: {r["params"][n] for r in table["rows"]} for n in table["names"]}
    params = {n: p.model_copy(update={"values": [v for v in p.values if v in held[n]]}) if n in held else p
              for n, p in spec.search.params.items()}
    configs = len(_curves(table))
    full = table.get("spec_grid_configs") or configs
    n = asha_trials or max(2, round(spec.num_trials * configs / full))
    update: dict = {"search": spec.search.model_copy(update={"params": params, "num_trials": n})}
    if table.get("budget"):
        update["budget"] = spec.budget.model_validate(table["budget"])
    return spec.model_copy(update=update)


def replay_asha(table: dict, spec, seed: int) -> dict:
    """The spec's sampler + Ray's ASHAScheduler over the table, `max_concurrent_trials` at a time
    (`spec` as `table_spec` gives it)."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sweep.space import make_sampler, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves, names = _curves(table), table["names"]
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
        heapq.heappush(events, (now + _cost(table, curves[key][0]), next(seq), trial, ot, key, 0))

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
            gpu_s += _cost(table, row)
            end = now
            if launched < n:
                launch(now)
        else:
            nxt = curves[key][k + 1]
            heapq.heappush(events, (now + _cost(table, nxt) - _cost(table, row), next(seq), trial, ot, key, k + 1))
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
        cost = _cost(table, curves[key][-1])
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
    starts = [t.datetime_start for t in study.trials if t.datetime_start]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"study": study_name, "trials": len(study.trials), "complete": len(done), "states": states,
            "best_val_loss": best.value if best else None, "best_params": best.params if best else None,
            "gpu_s": gpu_s, "makespan_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None}


def cut_at(table: dict, top: int) -> None:
    """The table as if its top rung were `top` (a table cut short: every config's curve up to that rung; the
    trials' LR schedules still span the spec's top rung, so this is the search over the first `top` steps)."""
    if top not in table["rungs"]:
        raise SystemExit(f"--top {top}: not one of the table's rungs {table['rungs']}")
    table["rungs"] = [r for r in table["rungs"] if r <= top]
    for row in table["rows"]:
        row["rungs"] = [x for x in row["rungs"] if x["step"] <= top]
    if table.get("budget"):
        table["budget"] = dict(table["budget"], max=top)
    table["cut_at"] = top


def replay(table_path: Path, seeds: list[int], out: Path, live: str | None, storage: str | None,
           asha_trials: Optional[int] = None, top: Optional[int] = None) -> dict:
    from sweep.spec import load_spec

    table = json.loads(table_path.read_text())
    if top is not None:
        cut_at(table, top)
    spec_path = Path(table["spec"]) if Path(table["spec"]).is_absolute() else ROOT / table["spec"]
    if not spec_path.exists():  # a table made elsewhere (the GPU machine's copy of the spec): the repo's own
        spec_path = ROOT / "search_spaces" / spec_path.name
    spec = load_spec(spec_path)
    live_gpus_per_trial = spec.resources.gpus_per_trial
    spec = table_spec(table, spec, asha_trials)
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
        "asha_beats_random": [a["best_val_loss"] < r["best_val_loss"] for a, r in zip(asha, rand)],
        "asha_ties_random": [a["best_val_loss"] == r["best_val_loss"] for a, r in zip(asha, rand)],
        "grid_median_over_best_pct": grid["median_over_best_pct"],
        "asha_trials": spec.num_trials,
        "target": "ASHA within 1% of the grid's best val loss using <= 25% of the grid's GPU-seconds",
        "room_target": "the grid's median config >= 10% above its best in val loss at the top rung",
    }
    summary["target_met_every_seed"] = all(g <= 0.01 for g in gaps) and all(
        f <= 0.25 for f in summary["asha_gpu_s_fraction_of_grid"])
    summary["room_target_met"] = grid["median_over_best_pct"] >= 10
    result = {
        "benchmark": "search_efficiency",
        "date": table["date"], "device": table["device"], "spec": table["spec"],
        "method": "tabular: the full grid trained once for real, searches replayed on it (see the script's doc)",
        "grid_table": {"configs": len(table["rows"]), "workers_sharing_the_gpu": table["workers"],
                       "packed": table.get("packed", False), "where": table.get("where", {}),
                       "cut_at": table.get("cut_at"),
                       "rungs": table["rungs"], "budget_unit": table["budget_unit"],
                       "wall_s": round(table["table_wall_s"], 1),
                       "rows": [{"params": r["params"], "error": r["error"],
                                 "val_loss": [x["val_loss"] for x in r["rungs"]],
                                 "wall_s": [round(x["wall_s"], 2) for x in r["rungs"]],
                                 "gpu_s": [round(_cost(table, x), 2) for x in r["rungs"]]} for r in table["rows"]]},
        "grid": grid, "asha": asha, "random_at_asha_gpu_s": rand, "summary": summary,
    }
    if live:
        result["live_asha_sweep"] = live_sweep(live, storage, live_gpus_per_trial)
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
    t.add_argument("--workers", type=int, default=6, help="trials at once, sharing the GPU (--packed: in the pack)")
    t.add_argument("--cpus", type=int, default=max(1, (os.cpu_count() or 2) // 8), help="torch threads per trial")
    t.add_argument("--packed", action="store_true", help="train the configs together in one warm pack (this process)")
    t.add_argument("--where", nargs="+", default=[], metavar="NAME=V[,V]",
                   help="a sub-grid: only these values of these params (a reduced run)")
    t.add_argument("--budget-max", type=int, help="a lower top rung than the spec's budget.max (a reduced run)")
    r = sub.add_parser("replay", help="grid vs ASHA vs random on a table, over sampler seeds")
    r.add_argument("table", type=Path)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--asha-trials", type=int, help="ASHA's trials (default: the spec's, scaled to the table's share of its grid)")
    r.add_argument("--top", type=int, help="replay as if this rung were the top one (a table cut short)")
    r.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_efficiency.json")
    r.add_argument("--live", help="study name of a real `sweep run` of the same spec")
    r.add_argument("--storage", help="its storage URL")
    a = p.parse_args()
    if a.cmd == "table":
        make_table(a.spec, a.out, a.workers, a.cpus, packed=a.packed, where=parse_where(a.where), budget_max=a.budget_max)
    else:
        replay(a.table, a.seeds, a.out, a.live, a.storage, a.asha_trials, a.top)


if __name__ == "__main__":
    main()
