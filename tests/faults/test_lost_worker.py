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


PROGRESS = re.compile(r" (started|rung \d+/\d+|PRUNED at|COMPLETE at) ")  # a trial starts, reaches a rung, ends


def _victims(home: str, packing: str, task: str = "") -> list:
    """The sweep's Ray worker processes that train: trial actors, and (packed) the pack server; with `task`, only
    those running that task now (Ray titles a worker `ray::Class.task()` while it runs one)."""
    import psutil

    titles = ("ray::ResourceTrainable", "ray::SweepTrial", "ray::ImplicitFunc") + (("ray::PackServer",) if packing == "on" else ())
    out = []
    for p in psutil.process_iter():
        try:
            title = _title(p)
            if title.startswith(titles) and task in title and p.environ().get("SWEEP_HOME") == home:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _busy(home: str, packing: str, run: LiveCli, wait_s: float = 30.0) -> list:
    """The workers that hold a trial now: trial actors inside `train` and (packed, while any does) the pack server.
    An idle actor (one Tune keeps for its next trial, or one still starting) holds none: its loss costs no trial
    and no retry, so the kills that must cost one wait up to `wait_s` for a busy worker."""
    deadline = time.monotonic() + wait_s
    while run.proc.poll() is None and time.monotonic() < deadline:
        training = _victims(home, packing, task=".train")
        if training:
            return training + [p for p in _victims(home, packing) if _title(p).startswith("ray::PackServer")]
        time.sleep(0.01)
    return []


def _title(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _kill(victims: list, rng: random.Random) -> str:
    v = rng.choice(sorted(victims, key=lambda p: p.pid))
    title = (_title(v)[:48].split() or ["(gone)"])[0]
    try:
        os.kill(v.pid, signal.SIGKILL)
    except ProcessLookupError:
        return title + " (had ended)"
    return title


@pytest.mark.parametrize("packing,seed", [("off", 11), ("on", 12)])
def test_a_worker_lost_at_random_moments_is_retried_and_trains(tmp_path, assets, fault_row, packing, seed):
    rng = random.Random(seed)
    spec = small_spec(tmp_path, assets, name="lost", rungs=(4, 8, 16), params={},
                      search={"sampler": "random", "seed": seed, "num_trials": NUM_TRIALS, "params": {
                          "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2,
                                 "max_failures": KILLS + 2, "packing": packing})
    env = sweep_env(tmp_path)
    t_start = time.perf_counter()
    run = LiveCli("run", spec, cwd=tmp_path, env=env)
    kills = []
    try:
        # Kills at moments drawn over the sweep's progress, not its clock (CI machines differ in speed): right
        # after a random one of its first progress lines (a trial starting, reaching a rung, ending), plus a random
        # delay; then one while a reused worker is reset for its next trial (between trials).
        for n in sorted(rng.sample(range(1, 8), KILLS)):
            if not run.wait_for(PROGRESS.pattern, 240, count=n):
                break
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)
            victims = _busy(env["SWEEP_HOME"], packing, run)
            if victims:
                kills.append(f"{delay:.2f} s after progress line {n}: {_kill(victims, rng)}")
                time.sleep(0.5)
        while run.proc.poll() is None and not any("reset" in k for k in kills):
            resetting = _victims(env["SWEEP_HOME"], packing, task=".reset")
            if resetting:
                kills.append(f"in a reset for the next trial: {_kill(resetting, rng)}")
            time.sleep(0.01)
    finally:
        returncode = run.finish()
    seconds = time.perf_counter() - t_start
    print("kills:", kills)
    assert returncode == 0, f"kills: {kills}\n" + run.stdout
    assert kills, "no worker was found to kill:\n" + run.tail()
    text = run.stdout + run.stderr
    assert "Traceback" not in text and "Unhandled error" not in text and "(raylet)" not in text, run.tail()
    study = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'lost.db'}")
    trials = study.trials
    assert len(trials) == NUM_TRIALS and len({t.user_attrs.get("ray_trial_id") for t in trials}) == NUM_TRIALS
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    retries = sum(len(t.user_attrs.get("retries", [])) for t in trials)
    lines = [x for x in run.out if re.search(r" retry( \d+)? from ", x)]
    assert retries == len(lines) >= 1, (retries, lines, run.tail())
    if packing == "off":  # one trial per worker: a kill fails at most the one trial it ran (none if it was idle)
        assert len(lines) <= len(kills), (kills, lines)
    fault_row(fault=f"worker lost at random moments ({'packed' if packing == 'on' else 'one trial per process'})",
              injected=f"seed {seed}: `kill -9` " + "; ".join(kills) + f"; max_failures {KILLS + 2}",
              lost=f"0 of {NUM_TRIALS} trials: all finished, none FAIL; {retries} retries, each one terminal line and one "
                   "`retries` entry; no Ray traceback", seconds=seconds)
