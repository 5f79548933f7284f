"""StudySearch under a real Ray Tune run with ASHA (a toy trainable, no model): the states Tune produces."""

from __future__ import annotations


import pytest
from optuna.trial import TrialState

from sweep.record import load_study, open_storage

pytestmark = pytest.mark.slow

RUNGS = [10, 20, 40]


def _trainable(config):
    from ray import tune

    if config["lora_r"] == 16:
        raise RuntimeError("diverged: loss is inf")  # a real failure: FAIL with its reason
    loss = 3.0
    for i, steps in enumerate(RUNGS):
        loss -= config["learning_rate"] * 100 / (i + 1)
        tune.report({"steps": steps, "val_loss": loss, "ppl": 2.718 ** loss,
                     "tokens_per_s": 100.0, "samples_per_s": 1.0, "peak_mem_gb": 0.1, "wall_s": 1.0})


def test_real_tune_run_records_budget_steps_and_true_states(storage_url, drive, tmp_path):
    import ray
    from ray import tune
    from ray.tune import Callback
    from ray.tune.schedulers import ASHAScheduler

    storage = open_storage(storage_url)
    search = drive.make_search(storage, name="tune")

    class RecordFailures(Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            search.record_failure(trial.trial_id, open(trial.error_file).read() if trial.error_file else "error")

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
    try:
        tuner = tune.Tuner(
            _trainable,
            tune_config=tune.TuneConfig(
                metric="val_loss", mode="min", num_samples=8, search_alg=search,
                scheduler=ASHAScheduler(time_attr="steps", grace_period=10, max_t=40, reduction_factor=2),
                max_concurrent_trials=1,  # one at a time: ASHA decisions do not depend on timing
            ),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), name="tune", verbose=0,
                                      callbacks=[RecordFailures()]),
        )
        tuner.fit()
    finally:
        ray.shutdown()

    study = load_study(storage_url, "tune")
    assert len(study.trials) == 8
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    for t in study.trials:
        assert set(t.intermediate_values) <= set(RUNGS)
        if t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == RUNGS and t.value == pytest.approx(t.intermediate_values[40])
        elif t.state == TrialState.PRUNED:
            assert max(t.intermediate_values) < 40
        else:
            assert t.state == TrialState.FAIL and "diverged" in t.user_attrs["fail_reason"]
