"""NaN/inf loss (#6 item 6): a learning rate that really diverges; the trial stops at once, FAIL with the reason."""

from __future__ import annotations

import json
import math
import time

import optuna

from sweep_helpers import small_spec, sweep_cli, sweep_env

RUNGS = (4, 8, 16)


def test_a_diverging_trial_is_stopped_recorded_fail_and_never_reaches_asha(tmp_path, assets, fault_row):
    # AdamW's decoupled decay multiplies the weights by (1 - lr * weight_decay) = -99 each step at
    # lr 10, wd 10: they overflow float32 within a few steps and the loss becomes NaN (seen at step ~7).
    # max_failures 2: Ray would retry a failed trial twice; a diverged one must not train again.
    spec = small_spec(tmp_path, assets, name="diverge", rungs=RUNGS, training={"weight_decay": 10.0},
                      params={"learning_rate": {"type": "choice", "values": [10.0, 0.02, 0.005]}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 2})
    t0 = time.perf_counter()
    r = sweep_cli("run", spec, cwd=tmp_path, env=sweep_env(tmp_path))
    seconds = time.perf_counter() - t0
    # A failed trial makes `sweep run` exit 1; the sweep itself finished every trial.
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout

    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{tmp_path / 'diverge.db'}")
    trials = {t.params["learning_rate"]: t for t in study.trials}
    assert len(study.trials) == 3 and len(trials) == 3
    bad = trials[10.0]
    assert bad.state.name == "FAIL"
    reason = bad.user_attrs["fail_reason"]
    assert "NonFiniteLoss" in reason and "training diverged" in reason and "learning_rate=10" in reason, reason
    # Stopped within one evaluation: the step where it went NaN is before the next rung.
    step = int(reason.split(" at step ")[1].split()[0])
    reported = sorted(bad.intermediate_values)
    nxt = [r for r in RUNGS if r > (reported[-1] if reported else 0)][0]
    assert step <= nxt, (step, reported)
    assert all(math.isfinite(v) for v in bad.intermediate_values.values())
    for lr in (0.02, 0.005):
        assert trials[lr].state.name in ("COMPLETE", "PRUNED"), (lr, trials[lr].state)
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert f"trial {bad.number:>3} " in r.stdout and "training diverged" in r.stdout

    # Nothing non-finite ever reached Tune (so ASHA's rung cut-offs, built from reports, stay finite).
    results = [json.loads(line) for p in (tmp_path / "runs").rglob("result.json") for line in p.read_text().splitlines() if line.strip()]
    assert results, "no Ray result files"
    assert all(math.isfinite(x["val_loss"]) for x in results if "val_loss" in x)
    # Ray's retries (max_failures 2) failed at once with the first reason, without training again.
    [error_txt] = list((tmp_path / "runs").rglob("error.txt"))
    failures = error_txt.read_text().split("Failure # ")[1:]
    assert len(failures) == 3, failures
    assert "NonFiniteLoss" in failures[0] and "TrialNotRetried" not in failures[0]
    assert all("TrialNotRetried: NonFiniteLoss: training diverged" in f for f in failures[1:]), failures[1:]
    assert "TrialNotRetried: NonFiniteLoss: training diverged" in reason
    # Each of Ray's retries is in the study, with the error that ended the attempt before it.
    errors = [e["error"] for e in bad.user_attrs["retries"]]
    assert len(errors) == 2 and "NonFiniteLoss: training diverged" in errors[0] and "TrialNotRetried" in errors[1], errors
    # No report from a retry. Tune's own result.json is not the record: on each retry Ray's JsonLoggerCallback
    # copies the file back from the trial's storage folder, which can drop the rows it had (CI saw it empty).
    bad_rows = [json.loads(line) for line in (error_txt.parent / "result.json").read_text().splitlines() if line.strip()]
    assert len(bad_rows) <= len(reported), bad_rows
    assert [row["training_iteration"] for row in bad_rows] == list(range(1, len(bad_rows) + 1)), bad_rows
    fault_row(fault="NaN/inf loss (diverging trial)",
              injected="`sweep run`, grid lr in {10, 0.02, 0.005} with weight_decay 10: lr 10 overflows to NaN by step ~7; "
                       "max_failures 2",
              lost=f"0 of 3 trials; FAIL reason recorded; {len(results)} Ray results all finite; Ray's {len(failures) - 1} "
                   "retries failed at once with the same reason (no training repeated)", seconds=seconds)
