"""A worker lost at any moment (#20 item 3): `kill -9` of a trial's worker (one trial per process) or of the pack
server (packed trials) at moments drawn from a seeded random generator over the sweep's life: while a worker
starts or loads, while it trains, in a rung evaluation or a checkpoint write, between trials while a reused
worker is reset. Each lost attempt is retried (`resources.max_failures`) and trains on.

Checked: exit 0; every trial finished (none FAIL, none RUNNING), one study trial per Tune trial; each failure
is one `retry` line on the terminal (no Ray traceback anywhere on it) and one entry in the trial's `retries`.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import optuna
import pytest

from sweep_helpers import LiveCli, small_spec, sweep_env

NUM_TRIALS = 4
KILLS = 2


def _victims(root_pid: int, home: str, packing: str) -> list:
    """The sweep's Ray worker processes that train: trial actors, and (packed) the pack server."""
    import psutil

    titles = ("ray::ResourceTrainable", "ray::SweepTrial", "ray::ImplicitFunc") + (("ray::PackServer",) if packing == "on" else ())
    out = []
    for p in psutil.process_iter():
        try:
            if " ".join(p.cmdline()).startswith(titles) and p.environ().get("SWEEP_HOME") == home:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("packing,seed", [("off", 11), ("on", 12)])
def test_a_worker_lost_at_random_moments_is_retried_and_trains(tmp_path, assets, fault_row, packing, seed):
    rng = random.Random(seed)
    spec = small_spec(tmp_path, assets, name="lost", rungs=(4, 8, 16), params={},
                      search={"sampler": "random", "seed": seed, "num_trials": NUM_TRIALS, "params": {
                          "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2,
                                 "max_failures": KILLS + 1, "packing": packing})
    env = sweep_env(tmp_path)
    t_start = time.perf_counter()
    run = LiveCli("run", spec, cwd=tmp_path, env=env)
    kills = []
    try:
        assert run.wait_for(r" started ", 240), run.tail()
        t0 = time.time()
        for at in sorted(rng.uniform(0.0, 5.0) for _ in range(KILLS)):  # the packed sweep trains for ~5 s
            while time.time() - t0 < at and run.proc.poll() is None:
                time.sleep(0.05)
            victims = _victims(run.proc.pid, env["SWEEP_HOME"], packing)
            if run.proc.poll() is not None or not victims:
                continue
            v = rng.choice(sorted(victims, key=lambda p: p.pid))
            title = " ".join(v.cmdline())[:40]
            os.kill(v.pid, signal.SIGKILL)
            kills.append(f"{at:.1f} s: {title.split()[0]}")
            time.sleep(0.5)
    finally:
        returncode = run.finish()
    seconds = time.perf_counter() - t_start
    assert returncode == 0, run.tail()
    assert kills, "no worker was found to kill:\n" + run.tail()
    text = run.stdout + run.stderr
    assert "Traceback" not in text and "Unhandled error" not in text, run.tail()
    study = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'lost.db'}")
    trials = study.trials
    assert len(trials) == NUM_TRIALS and len({t.user_attrs.get("ray_trial_id") for t in trials}) == NUM_TRIALS
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    retries = sum(len(t.user_attrs.get("retries", [])) for t in trials)
    lines = [x for x in run.out if re.search(r" retry( \d+)? from ", x)]
    assert retries == len(lines) >= 1, (retries, lines, run.tail())
    fault_row(fault=f"worker lost at random moments ({'packed' if packing == 'on' else 'one trial per process'})",
              injected=f"seed {seed}: `kill -9` at " + "; ".join(kills) + f" after the first trial started; max_failures {KILLS + 1}",
              lost=f"0 of {NUM_TRIALS} trials: all finished, none FAIL; {retries} retries, each one terminal line and one "
                   "`retries` entry; no Ray traceback", seconds=seconds)
