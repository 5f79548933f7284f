"""Trial worker killed (#6 item 1): `kill -9` a trial's Ray worker mid-training; Ray retries it from its
last rung checkpoint (`resources.max_failures: 1`) and the study keeps one trial for it, ending normally."""

from __future__ import annotations

import json
import os
import signal
import time

import optuna

from sweep_helpers import LiveCli, small_spec, sweep_cli, sweep_env, trial_workers

RUNGS = (30, 60, 120)  # long enough between rungs that a kill lands mid-training


def test_a_killed_trial_worker_resumes_from_its_checkpoint_with_no_duplicate(tmp_path, assets, fault_row):
    spec = small_spec(tmp_path, assets, name="killed", rungs=RUNGS, resources={
        "gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 1},
        params={"learning_rate": {"type": "choice", "values": [0.02, 0.005]}},
        tracking={"wandb": {"mode": "offline", "project": "sweep-faults"}})
    t0 = time.perf_counter()
    run = LiveCli("run", spec, cwd=tmp_path, env=sweep_env(tmp_path))
    killed = []
    try:
        assert run.wait_for(" rung 1/", 240), "no trial reached its first rung:\n" + run.tail()
        # Tune registers a reported checkpoint just after the result; a kill in that instant restarts the
        # trial from scratch (also survived, below). Kill once it is on disk, mid-way to the next rung.
        # Tune writes a trial's result.json when it has processed (and registered the checkpoint of) a report.
        deadline = time.time() + 60
        while time.time() < deadline and not any(
                f.stat().st_size > 0 and list(f.parent.glob("checkpoint_*")) for f in (tmp_path / "runs").rglob("result.json")):
            time.sleep(0.05)
        time.sleep(0.2)
        home = sweep_env(tmp_path)["SWEEP_HOME"]
        workers, deadline = [], time.time() + 20
        while not workers and time.time() < deadline and run.proc.poll() is None:
            workers = trial_workers(run.proc.pid, home)
            time.sleep(0.1)
        assert workers, "no Ray trial worker process found:\n" + run.tail()
        for w in workers:  # every trial worker alive now, mid-training
            os.kill(w.pid, signal.SIGKILL)
            killed.append(w.pid)
    finally:
        returncode = run.finish()
    seconds = time.perf_counter() - t0
    assert returncode == 0, run.tail()

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'killed.db'}")
    trials = study.trials
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in trials]
    assert len(trials) == 2 and len(set(ray_ids)) == 2, ray_ids           # one Optuna trial per Ray trial
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert "COMPLETE" in {t.state.name for t in trials}

    # Tune's own record: the killed trials were restored; a trial that had reported rung k went on at rung k+1
    # (the first report of a restored life: iterations_since_restore 1, training_iteration k+1). Rows before a
    # retry may be missing: Ray's JsonLoggerCallback copies result.json back from the trial's storage folder
    # on a retry, dropping the rows reported since Tune last synced it; the rows after the last retry stay.
    resumed, restarted = [], 0
    for rj in (tmp_path / "runs").rglob("result.json"):
        rows = [json.loads(x) for x in rj.read_text().splitlines() if x.strip()]
        for r in rows:
            if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1:
                assert r["steps"] == RUNGS[r["training_iteration"] - 1], r  # continued at the next rung
                resumed.append(r["steps"])
        lives = [[]]
        for r in rows:  # a restart from scratch (training_iteration back to 1) begins a new life
            if r["training_iteration"] == 1 and lives[-1]:
                lives.append([])
            lives[-1].append(r["steps"])
        assert all(life == sorted(set(life)) for life in lives), lives   # within a life, no rung twice
        restarted += len(lives) - 1
    assert resumed, "no trial continued from its checkpoint"
    # The study says why each killed trial was retried and from which checkpoint it went on; so does the terminal.
    retries = [(t.number, e) for t in trials for e in t.user_attrs.get("retries", [])]
    assert retries and all("actor died" in e["error"] and e["unit"] == "steps" and e["resumes_from"] in (0, *RUNGS)
                           for _, e in retries), retries
    assert sorted(e["resumes_from"] for _, e in retries if e["resumes_from"]) == sorted(RUNGS[RUNGS.index(s) - 1] for s in resumed)
    said = " ".join(run.stdout.split())
    status = sweep_cli("status", "killed", cwd=tmp_path, env=sweep_env(tmp_path))
    assert status.returncode == 0, status.stderr
    for n, e in retries:
        where = f"its checkpoint at steps {e['resumes_from']}" if e["resumes_from"] else "the start"
        assert f"trial {n} retry 1 from {where}: {e['error']}" in said, (n, e, run.tail())
        assert f"trial {n} retried from {where}: {e['error']}" in " ".join(status.stdout.split()), status.stdout
    for t in trials:  # intermediate values at the rungs, each once (a re-reported rung: the first report stands)
        assert sorted(t.intermediate_values) == list(RUNGS[: len(t.intermediate_values)])
    # The W&B runs live in the controller, which the kill did not touch: one run per trial, continued
    # through the retry (each rung logged once, in order), ending in the state the study records.
    from sweep.record.tracking import offline_runs, wandb_root
    from wandb_log import read_offline_run

    runs = [read_offline_run(p) for p in offline_runs(wandb_root(tmp_path / "runs", "killed"))]
    by_trial = {t.number: [r for r in runs if r["id"] == t.user_attrs["wandb_run_id"]] for t in trials}
    assert all(len(v) == 1 for v in by_trial.values()) and len(runs) == len(trials), [r["id"] for r in runs]
    for t in trials:
        [run] = by_trial[t.number]
        logged = [row["_step"] for row in run["history"] if "val_loss" in row]
        assert logged == sorted(t.intermediate_values), (logged, t.intermediate_values)
        assert run["summary"]["state"] == t.state.name
        assert run["summary"].get("retries", 0) == len(t.user_attrs.get("retries", [])), (run["summary"], t.user_attrs)
    fault_row(fault="trial worker killed",
              injected=f"`kill -9` of {len(killed)} Ray trial worker(s) once Tune recorded its first rung and checkpoint, mid-way to rung 2; max_failures 1",
              lost=f"0 of 2 trials; no duplicate; {len(resumed)} resumed from the rung checkpoint "
                   f"(next report at step {', '.join(map(str, resumed))}), {restarted} restarted from scratch; each retry in the "
                   "study (`retries`: why, from which checkpoint) and on the terminal; "
                   f"{len(runs)} W&B runs (one per trial) continued, each rung logged once", seconds=seconds)
