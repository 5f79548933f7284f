"""GPU out of memory (#6 item 7): retried with a smaller micro-batch at the same effective batch; `oom` FAIL when nothing fits.

CPU has no OOM to provoke, so the recipe's test hook SWEEP_INJECT_OOM_ABOVE_MICRO_BATCH=N makes
every training step whose micro-batch is above N raise a real `torch.OutOfMemoryError` (the
exception CUDA raises), inside the real trial worker of a real `sweep run`.
"""

from __future__ import annotations

import time

import optuna

from sweep_helpers import small_spec, sweep_cli, sweep_env

RUNGS = (2, 4)
EIGHT_BY_ONE = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}


def _sweep(tmp_path, assets, name, inject):
    spec = small_spec(tmp_path, assets, name=name, rungs=RUNGS, training=EIGHT_BY_ONE,
                      params={"learning_rate": {"type": "choice", "values": [0.01]}})
    t0 = time.perf_counter()
    r = sweep_cli("run", spec, cwd=tmp_path, env=sweep_env(tmp_path, SWEEP_INJECT_OOM_ABOVE_MICRO_BATCH=str(inject)))
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    assert len(study.trials) == 1, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stdout
    return r, study.trials[0], seconds


def test_oom_is_retried_with_a_smaller_micro_batch_at_the_same_effective_batch(tmp_path, assets, fault_row):
    r, trial, seconds = _sweep(tmp_path, assets, "oom-retry", inject=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert trial.state.name == "COMPLETE", (trial.state, trial.user_attrs.get("fail_reason"))
    # 8x1 and 4x2 ran out of memory; 2x4 trained: the same effective batch 8, reported as executed.
    assert (trial.user_attrs["micro_batch"], trial.user_attrs["accumulation"]) == (2, 4), trial.user_attrs
    for step in RUNGS:
        rung = trial.user_attrs[f"rung_{step}"]
        assert (rung.get("micro_batch"), rung.get("accumulation")) == (2, 4), rung
    assert sorted(trial.intermediate_values) == list(RUNGS)  # each rung once, no duplicate report
    fault_row(fault="GPU out of memory, smaller micro-batch fits",
              injected="`sweep run`, effective batch 8 as 8x1; `SWEEP_INJECT_OOM_ABOVE_MICRO_BATCH=2` raises a real "
                       "`torch.OutOfMemoryError` in training steps with micro-batch > 2",
              lost="0 of 1 trials; retried 8x1 -> 4x2 -> 2x4, COMPLETE with micro_batch 2 x accumulation 4 recorded at each rung",
              seconds=seconds)


def test_oom_at_micro_batch_one_fails_the_trial_tagged_oom_with_memory_figures(tmp_path, assets, fault_row):
    r, trial, seconds = _sweep(tmp_path, assets, "oom-fail", inject=0)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert trial.state.name == "FAIL"
    reason = trial.user_attrs["fail_reason"]
    assert "TrialOOM" in reason and "oom: out of memory at every micro-batch of effective batch 8" in reason, reason
    assert "tried 8x1, 4x2, 2x4, 1x8" in reason and "GiB" in reason and "peak" in reason, reason
    assert "oom:" in r.stdout  # the FAIL line on the terminal says why
    fault_row(fault="GPU out of memory at micro-batch 1",
              injected="as above with `SWEEP_INJECT_OOM_ABOVE_MICRO_BATCH=0` (every micro-batch runs out)",
              lost="0 of 1 trials: FAIL, reason `TrialOOM: oom: ...` with the 4 executions tried and the memory figures",
              seconds=seconds)
