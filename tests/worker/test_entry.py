import subprocess
import sys
from pathlib import Path

import pytest

from trial_worker.config import REPORT_KEYS
from trial_worker.entry import trial_job


def test_importing_the_entry_point_loads_no_heavy_library():
    code = ("import sys, trial_worker.entry; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'peft', 'trl', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_trial_job_applies_params_and_threads(make_job):
    job = make_job(training={"torch_threads": None})
    t = trial_job({"learning_rate": 1e-3, "lora_r": 4, "packing": True}, job.model_dump(), cpus=3.0)
    assert (t.training.learning_rate, t.model.lora.r, t.data.packing, t.training.torch_threads) == (1e-3, 4, True, 3)
    assert trial_job({}, make_job(training={"torch_threads": 1}), cpus=3).training.torch_threads == 1
    with pytest.raises(KeyError, match="lora_rank"):
        trial_job({"lora_rank": 4}, job)


def test_run_trial_under_ray_tune_reports_rungs_with_checkpoints(make_job, tmp_path):
    ray = pytest.importorskip("ray")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    job = make_job(training={"torch_threads": None}, budget={"min": 2, "max": 8})
    from trial_worker.entry import run_trial

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, job=job.model_dump()), {"cpu": 1}),
            param_space={"learning_rate": tune.grid_search([1e-3, 1e-2])},
            tune_config=tune.TuneConfig(
                metric="val_loss", mode="min", reuse_actors=True,
                scheduler=ASHAScheduler(time_attr="steps", max_t=8, grace_period=2, reduction_factor=2),
            ),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="t", verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors
    for result in results:
        m = result.metrics
        assert set(REPORT_KEYS) | {"steps"} <= set(m)
        assert "step" not in m and m["samples"] == m["steps"] * 4 and m["steps"] in (2, 4, 8)
        ckpt = Path(result.checkpoint.path)
        assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    steps = sorted(r.metrics["steps"] for r in results)
    assert steps[-1] == 8  # at least one trial reached the top rung
