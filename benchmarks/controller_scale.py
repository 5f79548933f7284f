"""Controller scale: the sweep controller, ASHA and the study searcher over many trials on many simulated GPUs.

    nice -n 10 python benchmarks/controller_scale.py --trials 100 300      # points merged into the results file
    nice -n 10 python benchmarks/controller_scale.py --trials 1000

What runs is `sweep.controller.run_sweep` itself (the spec, the PostgreSQL study, StudySearch with the spec's TPE
sampler, ASHA (`sweep.schedule.StudyASHA`) on the budget ladder, Tune with `max_concurrent_trials`, reuse of actors, rung checkpoints,
the progress callback), on the reference search space (search_spaces/llama32_1b.yaml: its params, sampler and
budget ladder 30 -> 60 -> 120 steps). Only the trial is simulated: `trial_worker.attempt.trainable` and
`evaluate_base` (what the controller's one-trial-per-process plan runs) are replaced, for this process, by a function that sleeps `--step-s` per optimizer step and reports a
synthetic learning curve with a small checkpoint at each rung, as the real worker does. No model is loaded.

The simulated GPUs are Ray's own `GPU` resource declared on this CPU machine (`ray.init(num_gpus=64)`): the
controller asks each trial for `{gpu: gpus_per_trial}` unchanged, Ray places at most 64 trials at once, one actor each.

Measured, per point (number of trials):
  - makespan (first trial start -> last trial end) vs the ideal: the sum of the trials' simulated work / 64;
    the slot-seconds in between are split into: trials waiting on the controller between rungs (report -> the next
    `train()` call), gaps between one trial and the next on an actor (stop/complete -> searcher ask -> start),
    start-up (actors starting) and the tail (the last trials running with no trial left to start);
  - time from a rung report (the trial's clock) to ASHA's decision on it (the scheduler's clock, same machine);
  - the study searcher's own time per call (ask / rung write / final tell), and study writes per second
    (PostgreSQL's own counters for the database: commits, rows inserted + updated);
  - the controller process's CPU seconds and peak RSS; the Ray system processes' CPU (GCS, raylet) and the
    actors' total RSS.
Writes benchmarks/results/controller_scale.json (each point merged in, with the machine and the date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/pg_server.py: a throwaway PostgreSQL server

RESULTS = ROOT / "benchmarks" / "results" / "controller_scale.json"


# ----------------------------------------------------------------------------------------------- the simulated trial
def simulated_trainable(step_s: float, rungs: list[int]):
    """A stand-in for `trial_worker.attempt.trainable(job, run_dir)`: the Tune function trainable of a
    simulated trial."""

    def trainable(job: dict, run_dir: str | None = None, function=None):
        def simulated_trial(config: dict) -> None:
            import math
            import random
            import tempfile as tf
            import time as t

            from ray import tune

            # A learning curve with a floor set by the params (so TPE has something to learn) and noise.
            lr = float(config.get("learning_rate", 2e-4))
            batch = int(config.get("per_device_train_batch_size", 2)) * int(config.get("gradient_accumulation_steps", 4))
            floor = 1.2 + 0.4 * abs(math.log10(lr / 3e-4)) + 0.02 * abs(math.log2(batch / 8))
            rng = random.Random(hash(tuple(sorted(map(str, config.items())))))
            done = 0
            checkpoint = tune.get_checkpoint()
            if checkpoint is not None:
                with checkpoint.as_directory() as d:
                    done = json.loads((Path(d) / "state.json").read_text())["step"]
            t_start = t.time()
            for rung in rungs:
                if rung <= done:
                    continue
                t.sleep((rung - done) * step_s)
                done = rung
                loss = floor + 2.0 / math.sqrt(rung) + rng.gauss(0, 0.01)
                with tf.TemporaryDirectory() as d:
                    (Path(d) / "state.json").write_text(json.dumps({"step": rung}))
                    tune.report({"val_loss": loss, "ppl": math.exp(loss), "steps": rung, "samples": rung * batch,
                                 "samples_per_s": batch / step_s, "t_start": t_start, "t_report": t.time()},
                                checkpoint=tune.Checkpoint.from_directory(d))

        return simulated_trial

    return trainable


def simulated_base(job) -> dict:
    return {"val_loss": 3.0, "ppl": 20.1, "tokens": 0}


# ----------------------------------------------------------------------------------------------- instrumentation
class Timings:
    """Wall time of the searcher's calls and of ASHA's decisions, recorded in the controller process."""

    def __init__(self):
        self.calls: dict[str, list[tuple[float, float]]] = {}  # name -> [(when, seconds)]
        self.decisions: list[tuple[float, float, str]] = []     # (when, report -> decision seconds, decision)
        self.decided: dict[tuple, float] = {}                    # (trial id, report time) -> decision time

    def add(self, name: str, when: float, seconds: float) -> None:
        self.calls.setdefault(name, []).append((when, seconds))


TIMINGS = Timings()  # the point being run; replaced by each point


def instrument() -> None:
    """Time StudySearch's ask / rung write / tell and ASHA's decisions into TIMINGS (wrappers that only measure)."""
    import sweep.schedule as schedule
    from sweep.record.search import StudySearch

    for name in ("suggest", "on_trial_result", "on_trial_complete"):
        original = getattr(StudySearch, name)

        def timed(self, *args, __original=original, __name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return __original(self, *args, **kwargs)
            finally:
                TIMINGS.add(__name, time.time(), time.perf_counter() - t0)

        setattr(StudySearch, name, timed)

    class TimedASHA(schedule.StudyASHA):
        def on_trial_result(self, tune_controller, trial, result):
            t0 = time.perf_counter()
            decision = super().on_trial_result(tune_controller, trial, result)
            now = time.time()
            TIMINGS.add("asha", now, time.perf_counter() - t0)
            if "t_report" in result:
                TIMINGS.decisions.append((now, now - result["t_report"], str(decision)))
                TIMINGS.decided[(trial.trial_id, result["t_report"])] = now
            return decision

    schedule.StudyASHA = TimedASHA  # the controller takes it from there when it builds the Tuner


class Sampler(threading.Thread):
    """The controller's RSS (peak) and the Ray processes' CPU, sampled every second, and the actors' memory (PSS:
    shared library pages counted once, not in every process as RSS would) every 10 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak_rss = 0
        self.ray_cpu: dict[int, tuple[str, float]] = {}   # pid -> (name, cpu seconds so far)
        self.actor_rss_peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        tick = 0
        while not self.stop_event.is_set():
            self.peak_rss = max(self.peak_rss, self.me.memory_info().rss)
            actors, tick = 0, tick + 1
            for p in self.me.children(recursive=True):
                try:
                    name = p.name()
                    cpu = p.cpu_times()
                    self.ray_cpu[p.pid] = (name, cpu.user + cpu.system)
                    if name.startswith("ray::") and tick % 10 == 1:
                        actors += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.actor_rss_peak = max(self.actor_rss_peak, actors)
            self.stop_event.wait(1.0)


def pg_counters(url: str) -> dict:
    import psycopg

    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
                         autocommit=True) as c:
        c.execute("SELECT pg_stat_force_next_flush()")
        row = c.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                        "WHERE datname = current_database()").fetchone()
    return dict(zip(("commits", "inserted", "updated", "deleted"), map(int, row)))


# ----------------------------------------------------------------------------------------------- one point
def run_point(n_trials: int, gpus: int, step_s: float, pg, work: Path, max_wall_s: float | None = None) -> dict:
    import psutil
    import ray
    import yaml
    from rich.console import Console

    import trial_worker.attempt as attempt
    from sweep.controller import run_sweep
    from sweep.spec import load_spec

    ref = yaml.safe_load((ROOT / "search_spaces" / "llama32_1b.yaml").read_text())
    b = ref["budget"]
    rungs = [b["min"] * b["reduction_factor"] ** k for k in range(10) if b["min"] * b["reduction_factor"] ** k <= b["max"]]
    name = f"scale{n_trials}"
    ref.update(name=name, output_dir=str(work / "runs"), tracking={"wandb": {"mode": "disabled"}})
    ref["search"]["num_trials"] = n_trials
    ref["resources"] = {"gpus_per_trial": 1, "cpus_per_trial": 1, "max_concurrent_trials": gpus, "max_failures": 0}
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(ref, sort_keys=False))
    spec = load_spec(spec_path)
    url = pg.create_database(name)

    # The controller's trial plan (one trial per process, trial_worker.pack.tune) takes both from
    # trial_worker.attempt when it is made.
    attempt.trainable = simulated_trainable(step_s, rungs)
    attempt.evaluate_base = simulated_base
    global TIMINGS
    TIMINGS = timings = Timings()

    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = "120"
    # The simulated GPUs: Ray's GPU resource declared on this node; the controller's own ray.init joins this Ray.
    ray.init(num_cpus=gpus, num_gpus=gpus, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level="WARNING", log_to_driver=False)
    sampler = Sampler()
    sampler.start()
    me = psutil.Process()
    cpu0, pg0, t0 = me.cpu_times(), pg_counters(url), time.time()
    stopper = None
    if max_wall_s:
        # Past max_wall_s, stop the sweep as Ctrl+C does (Tune stops starting trials and returns; run_sweep records
        # the unfinished trials FAIL): the point then covers the trials done by then.
        import signal

        stopper = threading.Timer(max_wall_s, lambda: os.kill(os.getpid(), signal.SIGINT))
        stopper.start()
    with open(work / f"{name}.log", "w") as log:
        summary = run_sweep(spec, spec_path=spec_path, storage=url, console=Console(file=log, width=160, highlight=False))
    stopped_early = stopper is not None and not stopper.is_alive()
    if stopper is not None:
        stopper.cancel()
    t1, cpu1 = time.time(), me.cpu_times()
    pg1 = pg_counters(url)
    sampler.stop_event.set()
    sampler.join()

    # The trials' own clocks: every report row Tune kept (result.json of each trial).
    rows = []
    for f in (work / "runs" / name).glob("*/result.json"):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    lives: dict[tuple, dict] = {}  # (pid, t_start) -> one trial's life on one actor
    for r in rows:
        life = lives.setdefault((r["pid"], r["t_start"]), {"pid": r["pid"], "trial_id": r["trial_id"],
                                                           "start": r["t_start"], "reports": []})
        life["reports"].append((r["t_report"], r["steps"]))
    for life in lives.values():
        life["reports"].sort()
        life["end"] = life["reports"][-1][0]
        life["steps"] = life["reports"][-1][1]
        life["work"] = life["steps"] * step_s
    decisions = sorted(timings.decisions)
    # A life ends when ASHA decides on its last report (stop, or the top rung reached): the slot is free then.
    for life in lives.values():
        life["freed"] = timings.decided.get((life["trial_id"], life["end"]), life["end"])
    start = min(x["start"] for x in lives.values())
    end = max(x["freed"] for x in lives.values())
    makespan = end - start
    work_s = sum(x["work"] for x in lives.values())
    ideal = work_s / gpus
    in_trial_wait = sum((x["end"] - x["start"]) - x["work"] for x in lives.values())
    by_actor: dict[int, list] = {}
    for life in lives.values():
        by_actor.setdefault(life["pid"], []).append(life)
    gaps = startup = tail = 0.0
    for ls in by_actor.values():
        ls.sort(key=lambda x: x["start"])
        startup += ls[0]["start"] - start
        tail += end - ls[-1]["freed"]
        gaps += sum(b["start"] - a["freed"] for a, b in zip(ls, ls[1:]))
    slots_never_used = gpus - len(by_actor)
    # Steady state: from the moment the last actor started its first trial to the moment the last trial started.
    # Every slot is up and trials are waiting to start, so a slot-second not spent on simulated work is the
    # controller's (or Ray's handling of the actors): no start-up, no tail in it.
    w0 = max(ls[0]["start"] for ls in by_actor.values())
    w1 = max(x["start"] for x in lives.values())
    busy = 0.0
    for life in lives.values():
        prev = 0
        for t_report, step in life["reports"]:
            a, b = t_report - (step - prev) * step_s, t_report
            busy += max(0.0, min(b, w1) - max(a, w0))
            prev = step
    steady = {"window_s": w1 - w0, "slots": len(by_actor), "work_pct_of_slot_time": 100 * busy / (len(by_actor) * (w1 - w0))
              if w1 > w0 else None,
              "trials_started_in_window": sum(1 for x in lives.values() if w0 <= x["start"] <= w1)}
    steady["controller_overhead_pct"] = 100 - steady["work_pct_of_slot_time"] if steady["work_pct_of_slot_time"] is not None else None
    lat = [x[1] for x in decisions]

    def stats(xs):
        xs = sorted(xs)
        return {"n": len(xs), "mean_ms": 1000 * statistics.fmean(xs) if xs else None,
                "p50_ms": 1000 * xs[len(xs) // 2] if xs else None,
                "p99_ms": 1000 * xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else None,
                "max_ms": 1000 * xs[-1] if xs else None, "total_s": sum(xs)}

    def growth(xs):
        """Mean of the first and the last fifth of a call's times, in call order: how it grows with the study."""
        xs = [s for _, s in sorted(xs)]
        k = max(1, len(xs) // 5)
        return {"first_fifth_mean_ms": 1000 * statistics.fmean(xs[:k]), "last_fifth_mean_ms": 1000 * statistics.fmean(xs[-k:])} if xs else {}

    ray_cpu: dict[str, float] = {}
    for name_, cpu in sampler.ray_cpu.values():
        key = name_ if not name_.startswith("ray::") else "ray workers (actors)"
        ray_cpu[key] = ray_cpu.get(key, 0.0) + cpu
    wall = t1 - t0
    writes = {k: pg1[k] - pg0[k] for k in pg0}
    lives_n = len(lives)
    point = {
        "trials": n_trials, "gpus": gpus, "step_s": step_s, "rungs": rungs, "states": summary["states"],
        "stopped_at_max_wall_s": max_wall_s if stopped_early else None,
        "trial_lives": lives_n, "reports": len(rows),
        "makespan_s": makespan, "ideal_makespan_s": ideal, "sum_trial_work_s": work_s,
        "overhead_vs_ideal_pct": 100 * (makespan - ideal) / ideal,
        "slot_seconds": {
            "total": gpus * makespan, "work": work_s,
            "trials_waiting_on_controller_between_rungs": in_trial_wait,
            "gaps_between_trials_on_an_actor": gaps,
            "startup_actors_starting": startup,
            "tail_no_trial_left_to_start": tail,
            "slots_never_used": slots_never_used * makespan,
        },
        "controller_overhead_pct_of_ideal": 100 * (in_trial_wait + gaps) / gpus / ideal,
        "steady_state": steady,
        "report_to_asha_decision": stats(lat),
        "searcher": {k: {**stats([s for _, s in v]), **growth(v)} for k, v in timings.calls.items()},
        "study_db": {**writes, "commits_per_s": writes["commits"] / wall,
                     "rows_written_per_s": (writes["inserted"] + writes["updated"] + writes["deleted"]) / wall},
        "controller_process": {"cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                               "cpu_pct_of_one_core": 100 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall,
                               "peak_rss_mib": sampler.peak_rss / 2**20},
        "ray_processes_cpu_s": ray_cpu, "actors_peak_pss_mib": sampler.actor_rss_peak / 2**20,
        "run_sweep_wall_s": wall,
        "load_average_after": os.getloadavg(),
    }
    return point


def machine(note: str) -> dict:
    import psutil

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "load_average_at_start": os.getloadavg(),
            "shared": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--gpus", type=int, default=64, help="simulated GPUs (Ray's GPU resource)")
    ap.add_argument("--step-s", type=float, default=1.0, help="simulated seconds per optimizer step")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--max-wall-s", type=float, default=None, help="stop a point's sweep (as Ctrl+C) after this long")
    ap.add_argument("--keep", action="store_true", help="keep each point's run folder and progress log (in /tmp)")
    ap.add_argument("--machine-note", default="", help="what else ran on this machine meanwhile (kept in the results)")
    args = ap.parse_args()

    import importlib.metadata as md

    import pg_server

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    instrument()
    pg = pg_server.start()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    try:
        for n in args.trials:
            work = Path(tempfile.mkdtemp(prefix=f"sweep-scale-{n}-"))
            print(f"{n} trials on {args.gpus} simulated GPUs, {args.step_s} s/step ...", flush=True)
            point = run_point(n, args.gpus, args.step_s, pg, work, args.max_wall_s)
            print(json.dumps(point, indent=1, default=str), flush=True)
            results.setdefault("points", {})[str(n)] = {**point, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                                        "machine": machine(args.machine_note)}
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        pg_server.cleanup(pg)
    results.update(
        benchmark="controller_scale",
        versions={p: md.version(p) for p in ("ray", "optuna", "sqlalchemy", "psycopg")} | {
            "python": platform.python_version(), "postgresql": os.popen("postgres --version").read().strip()},
        setup="sweep.controller.run_sweep on search_spaces/llama32_1b.yaml (TPE over its 4 params, ASHA 30 -> 60 -> 120 "
              "steps, reduction factor 2), PostgreSQL study on this machine, W&B off, simulated trial (sleep per step, "
              "synthetic curve, a small checkpoint per rung), Ray's GPU resource declared as the simulated GPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
