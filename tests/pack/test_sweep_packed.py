"""A real `sweep run` in packed mode on the CPU: one pack server trains every trial; its process is killed
with `kill -9` mid-sweep, and each trial goes on from its own last rung checkpoint (Tune's max_failures).
The study keeps its form: one Optuna trial per Tune trial, intermediate values at the budget steps,
PRUNED/COMPLETE, per-rung attrs, plus the pack each trial ran in."""

from __future__ import annotations

import json
import os
import signal
import time

import optuna
import pytest

from sweep_helpers import LiveCli, small_spec, sweep_env
from trial_worker.config import REPORT_KEYS

RUNGS = (4, 8, 16, 32)  # long enough after the first rung that the kill lands mid-training


def pack_processes(sweep_home: str) -> list:
    """The run's pack server processes (Ray gives the actor's process the title ray::PackServer...)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if " ".join(p.cmdline()).startswith("ray::PackServer") and p.environ().get("SWEEP_HOME") == sweep_home:
                out.append(p)
        except psutil.Error:
            pass
    return out


def early_packs(sweep_home: str) -> list:
    """The run's pack processes started before Ray (`trial_worker.pack.process`), which its first actor adopts."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if "trial_worker.pack.process" in " ".join(p.cmdline()) and p.environ().get("SWEEP_HOME") == sweep_home:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("victim", ["actor", "early pack"])
def test_packed_sweep_survives_its_pack_killed_and_keeps_the_record(tmp_path, victim):
    """The first pack is built in a process the controller starts before Ray, and its Ray actor relays to it
    (`trial_worker.pack.early`). Killing either (the actor, or the process that holds the model) fails the
    trials in the pack, not the sweep: the process does not outlive its actor, the actor comes back with a
    pack of its own, and every trial goes on from its last rung."""
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    assets = {"model": str(write_tiny_llama(tmp_path / "assets" / "tiny-llama")),
              "data": str(write_task_data(tmp_path / "assets" / "tasks", n_train=200, n_val=40))}
    name = "packed"
    spec = small_spec(tmp_path, assets, name=name, rungs=RUNGS, resources={
        "gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 4, "max_failures": 1, "packing": "on"},
        params={"learning_rate": {"type": "choice", "values": [0.02, 0.005]},
                "per_device_train_batch_size": {"type": "choice", "values": [2, 4]}})
    env = sweep_env(tmp_path, SWEEP_TIMELINE=str(tmp_path / "marks.jsonl"))
    run = LiveCli("run", spec, cwd=tmp_path, env=env)
    killed = []
    early = []
    try:
        assert run.wait_for(" rung 1/", 300), "no trial reached its first rung:\n" + run.tail()
        deadline = time.time() + 60  # Tune has registered a checkpoint: a retry can go on from it
        while time.time() < deadline and not any(
                f.stat().st_size > 0 and list(f.parent.glob("checkpoint_*")) for f in (tmp_path / "runs").rglob("result.json")):
            time.sleep(0.05)
        packs = pack_processes(env["SWEEP_HOME"])
        assert len(packs) == 1, packs  # one pack for the CPU, holding every trial
        early = early_packs(env["SWEEP_HOME"])
        assert len(early) == 1, early  # the process that holds the model and the trials
        target = packs[0] if victim == "actor" else early[0]
        os.kill(target.pid, signal.SIGKILL)
        killed.append(target.pid)
        if victim == "actor":  # the pack process ends with its actor: no second copy of the model stays
            early[0].wait(timeout=10)
    finally:
        returncode = run.finish()
    assert returncode == 0, run.tail()
    assert not early_packs(env["SWEEP_HOME"])
    from trial_worker.marks import read

    marks = read(str(tmp_path / "marks.jsonl"), 0.0)
    events = [e for _, _, e in marks]
    assert "pack: early pack adopted" in events, events
    # the pack's engine was built by the early process, beside Ray's start: its imports began before Ray was up
    building = [t for t, pid, e in marks if e == "pack: engine build" and pid == early[0].pid]
    ray_up = [t for t, _, e in marks if e == "controller: ray up"]
    assert building and building[0] < ray_up[0], marks
    # after the kill, the restarted actor built a pack of its own
    assert any(e == "pack: engine build" and pid not in (early[0].pid,) for _, pid, e in marks if _ > building[0]), marks

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    trials = study.trials
    assert len(trials) == 4 and len({t.user_attrs["ray_trial_id"] for t in trials}) == 4
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert "COMPLETE" in {t.state.name for t in trials}
    assert study.user_attrs["base_val_loss"] > 0
    for t in trials:
        assert t.user_attrs["pack"] == f"sweep-pack-{name}-0"
        assert set(t.intermediate_values) <= set(RUNGS) and RUNGS[0] in t.intermediate_values
        rung = t.user_attrs[f"rung_{RUNGS[0]}"]
        assert set(REPORT_KEYS) - {"rung"} <= set(rung), rung
        assert rung["micro_batch"] * rung["accumulation"] == t.params["per_device_train_batch_size"]
    # The kill was survived by Tune's retries, each from the trial's own last rung checkpoint or step 0,
    # and no life of a trial reported a rung twice.
    retries = [e for t in trials for e in t.user_attrs.get("retries", [])]
    assert retries, "no trial was retried after its pack was killed"
    assert all(e["resumes_from"] in (0, *RUNGS) for e in retries), retries
    for rj in (tmp_path / "runs").rglob("result.json"):
        rows = [json.loads(x) for x in rj.read_text().splitlines() if x.strip()]
        lives = [[]]
        for r in rows:
            if r["training_iteration"] == 1 and lives[-1]:
                lives.append([])
            lives[-1].append(r["steps"])
        assert all(life == sorted(set(life)) for life in lives), lives
        for r in rows:
            if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1:
                assert r["steps"] == RUNGS[r["training_iteration"] - 1], r  # went on at the next rung


@pytest.mark.parametrize("user_setting", [None, "1"])
def test_packed_trials_start_together_unless_the_user_limits_tunes_pending_trials(tmp_path, user_setting):
    """With no `max_concurrent_trials`, Tune keeps one trial pending at a time under a searcher of its own: packed
    trials would start one after another, each waiting for its actor. The sweep lets them all be pending (a
    packed trial's actor only waits on its pack), so every trial is asked for before the first one starts; a
    `TUNE_MAX_PENDING_TRIALS_PG` the user set is kept."""
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    assets = {"model": str(write_tiny_llama(tmp_path / "assets" / "tiny-llama")),
              "data": str(write_task_data(tmp_path / "assets" / "tasks", n_train=100, n_val=20))}
    spec = small_spec(tmp_path, assets, name="together", rungs=RUNGS, num_trials=4, resources={
        "gpus_per_trial": 0, "cpus_per_trial": 1, "packing": "on"},
        params={"learning_rate": {"type": "choice", "values": [0.02, 0.005, 0.001, 0.0005]}})
    env = sweep_env(tmp_path)
    env.pop("TUNE_MAX_PENDING_TRIALS_PG", None)
    if user_setting:
        env["TUNE_MAX_PENDING_TRIALS_PG"] = user_setting
    run = LiveCli("run", spec, cwd=tmp_path, env=env)
    try:
        assert run.wait_for(r"trial +\d+ started", 300), "no trial started:\n" + run.tail()
        asked = len(optuna.load_study(study_name="together", storage=f"sqlite:///{tmp_path / 'together.db'}").trials)
        run.proc.send_signal(signal.SIGINT)
    finally:
        returncode = run.finish()
    assert returncode == 130, run.tail()
    if user_setting is None:
        assert asked == 4, f"{asked} of 4 trials asked for when the first started:\n" + run.tail()
    else:  # one pending at a time: the next trial is asked for once the one before has started
        assert asked <= 2, f"{asked} of 4 trials asked for when the first started:\n" + run.tail()
