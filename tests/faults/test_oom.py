"""GPU out of memory (#6 item 7): retried with a smaller micro-batch at the same effective batch; `oom` FAIL when nothing fits.

CPU has no OOM to provoke, so the test patches the trial worker: a `sitecustomize` module put first
on the PYTHONPATH of `sweep run` (which its Ray workers inherit) wraps the recipe's trainer so that
every training step whose micro-batch is above N raises a real `torch.OutOfMemoryError` (the
exception CUDA raises), inside the real trial worker of a real `sweep run`.
"""

from __future__ import annotations

import os
import time

import optuna

from sweep_helpers import small_spec, sweep_cli, sweep_env

RUNGS = (2, 4)
EIGHT_BY_ONE = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}

# Run by every Python process of the sweep at start-up; patches `trial_worker.recipe` when it is imported.
OOM_PATCH = """
import importlib.abc, importlib.machinery, sys

LIMIT = {limit}


def _patch(recipe):
    make = recipe._lean_trainer_class

    def patched():
        import torch

        cls = make()
        step = cls.training_step

        def training_step(self, *args, **kwargs):
            mb = self.args.per_device_train_batch_size
            if mb > LIMIT:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by the test: micro-batch {{mb}} > {{LIMIT}})")
            return step(self, *args, **kwargs)

        cls.training_step = training_step
        return cls

    recipe._lean_trainer_class = patched


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trial_worker.recipe":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
"""


def oom_env(tmp_path, limit: int) -> dict:
    """`sweep run`'s environment with training steps of micro-batch > `limit` running out of memory."""
    patch_dir = tmp_path / "oom_patch"
    patch_dir.mkdir()
    (patch_dir / "sitecustomize.py").write_text(OOM_PATCH.format(limit=limit))
    env = sweep_env(tmp_path)
    env["PYTHONPATH"] = f"{patch_dir}{os.pathsep}{env['PYTHONPATH']}"
    return env


def _sweep(tmp_path, assets, name, inject):
    spec = small_spec(tmp_path, assets, name=name, rungs=RUNGS, training=EIGHT_BY_ONE,
                      params={"learning_rate": {"type": "choice", "values": [0.01]}})
    t0 = time.perf_counter()
    r = sweep_cli("run", spec, cwd=tmp_path, env=oom_env(tmp_path, inject))
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
              injected="`sweep run`, effective batch 8 as 8x1; the test's patch raises a real "
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
              injected="as above with the limit at 0 (every micro-batch runs out)",
              lost="0 of 1 trials: FAIL, reason `TrialOOM: oom: ...` with the 4 executions tried and the memory figures",
              seconds=seconds)
