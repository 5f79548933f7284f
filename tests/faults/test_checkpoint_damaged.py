"""Checkpoint corrupted or deleted (#6 item 3): detected by its hashes, the trial falls back to the
previous checkpoint or restarts from step 0, and the reason is recorded in the study.

A real `sweep run` (one trial, `max_failures: 1`) reaches its second rung; the newest checkpoint in
Tune's run folder is then damaged on disk (bytes flipped in the adapter, same size: only a hash can
tell; or every checkpoint folder deleted) and the trial's Ray worker is killed, so that Tune retries
the trial from that checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import optuna
import pytest

from sweep_helpers import LiveCli, small_spec, sweep_env, trial_workers

RUNGS = (10, 40, 160)
BUDGET = {"unit": "steps", "min": 10, "max": 160, "reduction_factor": 4}


def _rows(result_json) -> list[dict]:
    return [json.loads(x) for x in result_json.read_text().splitlines() if x.strip()]


def _flip_bytes(path, n=64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: a size check alone would not see it


@pytest.mark.parametrize("damage", ["corrupted", "deleted"])
def test_a_damaged_checkpoint_is_detected_and_the_trial_falls_back_or_restarts(tmp_path, assets, fault_row, damage):
    name = f"ckpt-{damage}"
    spec = small_spec(tmp_path, assets, name=name, rungs=RUNGS, budget=BUDGET,
                      params={"learning_rate": {"type": "choice", "values": [0.01]}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 1, "max_failures": 1})
    env = sweep_env(tmp_path)
    t0 = time.perf_counter()
    run = LiveCli("run", spec, cwd=tmp_path, env=env)
    run_dir = tmp_path / "runs" / name
    try:
        # Tune has the rung-2 result, so it holds both rung checkpoints (written into its run folder by the
        # worker before the report); the trial is now training towards rung 3.
        assert run.wait_for(f" rung 2/{len(RUNGS)}", 300), "the trial never reached its second rung:\n" + run.tail()
        [trial_dir] = [d for d in run_dir.iterdir() if d.is_dir() and any(d.glob("checkpoint_*"))]
        ckpts = sorted(trial_dir.glob("checkpoint_*"))
        assert len(ckpts) == 2, ckpts
        older, newest = ckpts
        if damage == "corrupted":
            _flip_bytes(newest / "adapter_model.safetensors")
        else:
            for c in ckpts:
                shutil.rmtree(c)
        workers, deadline = [], time.time() + 20
        while not workers and time.time() < deadline and run.proc.poll() is None:
            workers = trial_workers(run.proc.pid, env["SWEEP_HOME"])
            time.sleep(0.1)
        assert workers, "no Ray trial worker found:\n" + run.tail()
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
    finally:
        returncode = run.finish()
    seconds = time.perf_counter() - t0
    out = run.stdout
    assert returncode == 0, run.tail()

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    [trial] = study.trials
    assert trial.state.name == "COMPLETE", (trial.state, trial.user_attrs.get("fail_reason"))
    assert sorted(trial.intermediate_values) == list(RUNGS)
    # Ray retried the killed trial with its newest checkpoint (rung 2), which the trial then checked.
    [retry] = trial.user_attrs["retries"]
    assert "actor died" in retry["error"] and retry["resumes_from"] == RUNGS[1], retry
    [event] = trial.user_attrs["checkpoint_events"]
    if damage == "corrupted":
        want = (f"checkpoint {newest.name} rejected: adapter_model.safetensors fails its SHA-256 check (corrupted); "
                f"resumed from {older.name}")
    else:
        want = f"checkpoint {newest.name} rejected: missing (deleted); restarted from step 0"
    assert event["note"] == want, event
    assert want in " ".join(out.split())  # said on the terminal too

    # The first report after the retry came from where the trial went on, and it repeats the first life's
    # value there exactly (same optimizer, LR, RNG and data position). The first life's values are the
    # study's (the first report of a rung stands): Ray's JsonLoggerCallback copies result.json back from
    # the trial's storage folder on a retry, which drops the rows reported since Tune last synced it.
    # The rows after the retry stay (no retry follows to drop them).
    rows = _rows(trial_dir / "result.json")
    first_life = trial.intermediate_values
    [after] = [r for r in rows if r.get("checkpoint_note")] or [None]  # the retry's first report carries the note
    assert after is not None, [{k: r.get(k) for k in ("steps", "training_iteration", "iterations_since_restore")} for r in rows]
    went_on_at = RUNGS[1] if damage == "corrupted" else RUNGS[0]
    assert after["steps"] == went_on_at and after["checkpoint_note"] == want, after
    assert after["val_loss"] == pytest.approx(first_life[went_on_at], rel=1e-5), (after, first_life)
    assert rows[-1]["steps"] == RUNGS[-1]

    injected = ("bytes flipped mid-file in the newest checkpoint's adapter (same size)" if damage == "corrupted"
                else "every checkpoint folder of the trial deleted")
    fault_row(fault=f"checkpoint {damage}",
              injected=f"`sweep run` (1 trial, max_failures 1) past rung 2; {injected}; then `kill -9` of the trial worker "
                       "so Tune retries from that checkpoint",
              lost=f"0 of 1 trials: detected by SHA-256 manifest; {want.split('; ')[-1]} (step {went_on_at} re-reported "
                   f"with the same val_loss {after['val_loss']:.4f}); COMPLETE at {RUNGS[-1]}; reason in the study's "
                   "`checkpoint_events`", seconds=seconds)
