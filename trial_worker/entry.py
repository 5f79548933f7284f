"""The one module that talks to Ray: a Tune function trainable around `recipe.run`.

The controller uses it as::

    tune.with_parameters(run_trial, job=job.model_dump())

and imports nothing else from `trial_worker` (`evaluate_base`, `prepare_assets` are
re-exported here). Importing this module loads neither torch nor Ray.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Union

from trial_worker.config import JobConfig, apply_params
from trial_worker.demo_assets import prepare_assets

__all__ = ["run_trial", "evaluate_base", "prepare_assets", "trial_job", *sorted(_LAZY := {
    # name -> module: the rest of what `sweep` may call, imported when first used so that
    # importing this module stays free of torch/transformers.
    "train": "trial_worker.production",
    "load_run": "trial_worker.production",
    "export_formats": "trial_worker.production",
    "ProductionError": "trial_worker.production",
    "compare": "trial_worker.generate",
    "serve": "trial_worker.chat",
    "load_splits": "trial_worker.data",
})]


def __getattr__(name: str):
    """The lazily imported part of the entry point (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trial_job(config: dict[str, Any], job: Union[dict, JobConfig], *, cpus: float | None = None,
              gpus: float | None = None) -> JobConfig:
    """The job a trial runs: the sweep's job with the trial's sampled params applied.

    When the job leaves `torch_threads` unset, it becomes `cpus` (the CPUs Ray gave the trial).
    When it leaves `gpu_memory_fraction` unset and `gpus` (the GPUs Ray gave it) is a share of one
    GPU (`resources.gpus_per_trial: 0.25`), the trial's CUDA memory is capped at that share, so trials
    sharing a GPU cannot take each other's memory; whole GPUs leave it unset (no cap).
    """
    base = job if isinstance(job, JobConfig) else JobConfig.model_validate(job)
    out = apply_params(base, config)
    fill: dict[str, Any] = {}
    if out.training.torch_threads is None and cpus:
        fill["torch_threads"] = max(1, int(cpus))
    if out.training.gpu_memory_fraction is None and gpus and 0 < gpus < 1:
        fill["gpu_memory_fraction"] = float(gpus)
    if fill:
        data = out.model_dump()
        data["training"].update(fill)
        out = JobConfig.model_validate(data)
    return out


def run_trial(config: dict[str, Any], job: dict) -> None:
    """Ray Tune function trainable: one QLoRA trial, reporting at each rung with a checkpoint.

    `config` holds the searched params by flat name (`learning_rate`, `lora_r`, ...). Resumes
    from `ray.tune.get_checkpoint()` when Tune hands one back (a restored or retried trial).
    Each report carries `REPORT_KEYS` plus `steps` and `samples`, so ASHA's `time_attr`
    can be either budget unit.
    """
    import ray
    from ray import tune

    from trial_worker.recipe import run

    assigned = ray.get_runtime_context().get_assigned_resources()
    trial = trial_job(config, job, cpus=assigned.get("CPU"), gpus=assigned.get("GPU"))

    def report(metrics: dict, checkpoint_dir: str) -> None:
        metrics = dict(metrics, steps=metrics["step"])
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        # Tune has copied the checkpoint into the run's storage; the local copy is dead weight.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    output_dir = tempfile.mkdtemp(prefix="sweep-trial-")
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run(trial, report=report, output_dir=output_dir)
        else:
            with checkpoint.as_directory() as resume_from:
                run(trial, report=report, resume_from=resume_from, output_dir=output_dir)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def evaluate_base(job: Union[dict, JobConfig]) -> dict[str, float]:
    """{"val_loss", "ppl", "tokens"} of the job's base model on its validation split (no training)."""
    from trial_worker.recipe import evaluate_base as _evaluate_base

    return _evaluate_base(job if isinstance(job, JobConfig) else JobConfig.model_validate(job))
