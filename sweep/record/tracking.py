"""W&B: one run per trial, written on the driver by a Ray Tune callback (the worker is untouched).

Each Optuna trial gets one W&B run: group = study name, name = ``trial-<number>``, id =
``run_id(study, number)`` (deterministic, so a trial resumed from its checkpoint, or a
sweep resumed after a stop, continues the same run with ``resume="allow"``), config = the
trial's params plus the fixed job settings (secrets removed; the storage URL is never in
it), one ``log`` per rung at ``step=<budget value>``, and the final state and rung reached
in the summary. The Optuna trial gets the run's id/project/URL as user attrs
(``wandb_run_id``, ``wandb_project``, ``wandb_entity``, ``wandb_url``, ``wandb_run_dir``);
the study gets ``wandb_dir`` (where offline runs are), ``wandb_project``, ``wandb_mode``.

Mode (the spec's ``tracking.wandb.mode``): ``auto`` is online when ``WANDB_API_KEY`` is set,
else offline; ``disabled`` means no W&B (and no wandb import). Offline runs live under
``<output_dir>/wandb/<study>/wandb/offline-run-*``; ``sweep wandb-sync STUDY`` uploads them.

The tests read a run's ``.wandb`` file back with tests/wandb_log.py (no network).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

# Metrics logged at each rung (keys of the worker's report).
LOGGED_KEYS = ("val_loss", "ppl", "train_loss", "scheduled_lr", "tokens_per_s", "samples_per_s",
               "peak_mem_gb", "wall_s", "samples", "rung")
DEFAULT_PROJECT = "sweep"


def _need_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("``wandb`` package not found; install it with `pip install 'sweep[wandb]'` "
                          "or set tracking.wandb.mode: disabled") from None
    return wandb


def resolve_mode(mode: str) -> Optional[str]:
    """"online", "offline", or None (disabled) for a spec's tracking.wandb.mode."""
    if mode == "disabled":
        return None
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in ("online", "offline"):
        raise ValueError(f"tracking.wandb.mode is {mode!r}, but must be one of auto, online, offline, disabled")
    return mode


def run_id(study_name: str, number: int) -> str:
    """The W&B run id of trial `number` of a study: the same on every resume.

    W&B ids may not hold / \\ # ? % : or spaces, and are at most 128 characters.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "study"
    return f"{slug[:100]}-trial-{int(number)}"


def wandb_root(out_dir, study_name: str) -> Path:
    """Folder given to ``wandb.init(dir=...)`` for a study; runs go in its ``wandb/`` subfolder."""
    return Path(out_dir) / "wandb" / re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name)


def run_config(params: dict, job: dict, *, study_name: str, number: int, unit: str, rungs: list) -> dict:
    """W&B config: searched params at the top level (panels use them by name), fixed settings under `job`."""
    from sweep.record import scrub

    job = scrub(json.loads(json.dumps(job, default=str)))
    job.pop("storage", None)
    return {**params, "job": job, "study": study_name, "trial_number": number, "budget_unit": unit, "rungs": list(rungs)}


def open_run(*, project, entity, group, name, run_id, job_type, root, mode, config):
    """A W&B run that continues (same id) if it exists; several may be open at once in one process."""
    wandb = _need_wandb()
    return wandb.init(project=project, entity=entity, group=group, name=name, id=run_id, resume="allow",
                      job_type=job_type, dir=str(root), mode=mode, config=config, reinit="create_new",
                      settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                              disable_git=True))


def make_train_callback(spec, out_dir):
    """For `sweep train`: a Trainer callback logging the production run to W&B (the loss and LR at
    every logging step, final metrics in the summary), or None when tracking is disabled. A resumed
    run (`--resume`) continues the same W&B run: its id comes from the output folder."""
    cfg = spec.tracking.wandb
    mode = resolve_mode(cfg.mode)
    if mode is None:
        return None
    _need_wandb()
    from transformers import TrainerCallback

    out = Path(out_dir).resolve()
    rid = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec.name}-train-{hashlib.sha1(str(out).encode()).hexdigest()[:10]}")[:128]
    config = run_config({}, spec.job().model_dump(mode="json"), study_name=spec.name, number=-1, unit=spec.budget.unit,
                        rungs=spec.budget.rungs)

    class WandbTrain(TrainerCallback):
        run = None

        def on_train_begin(self, args, state, control, **kw):
            out.mkdir(parents=True, exist_ok=True)
            self.run = open_run(project=cfg.project or DEFAULT_PROJECT, entity=cfg.entity, group=spec.name,
                                name="train", run_id=rid, job_type="train", root=out, mode=mode, config=config)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.run is not None and logs:
                self.run.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if self.run is not None:
                self.run.summary["global_step"] = state.global_step
                self.run.finish()
                self.run = None

    return WandbTrain()


def make_wandb_callback(searcher, spec, study_name: str, out_dir, console=None):
    """A Tune callback that mirrors each trial to a W&B run, or None when tracking is disabled.

    Records where the runs are on the study (``wandb_dir``, ``wandb_project``, ``wandb_mode``).
    """
    cfg = spec.tracking.wandb
    mode = resolve_mode(cfg.mode)
    if mode is None:
        return None
    _need_wandb()
    from ray.tune import Callback

    root = wandb_root(out_dir, study_name).resolve()
    project = cfg.project or DEFAULT_PROJECT
    study = searcher.study
    study.set_user_attr("wandb_dir", str(root))
    study.set_user_attr("wandb_project", project)
    study.set_user_attr("wandb_mode", mode)
    if cfg.entity:
        study.set_user_attr("wandb_entity", cfg.entity)
    job = spec.job().model_dump(mode="json")

    class WandbTrials(Callback):
        """One W&B run per Tune trial; several are open at once (``reinit="create_new"``).

        Tune pickles its callbacks with the experiment state: open runs hold threads and
        sockets, so they are left out and reopened (same id, resume="allow") after a restore.
        """

        # Everything comes in as arguments: Tune pickles the class by value, and a method
        # that closed over `console` or the spec would drag them into the pickle.
        def __init__(self, searcher, mode, project, entity, root, study_name, job, unit, rungs, console):
            self.searcher, self.mode, self.project, self.entity = searcher, mode, project, entity
            self.root, self.study_name, self.job = root, study_name, job
            self.unit, self.rungs = unit, rungs
            self.runs: dict[str, Any] = {}
            self.console = console

        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k not in ("runs", "console")}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self.runs, self.console = {}, None

        def _warn(self, text: str) -> None:
            logger.warning(text)
            if self.console is not None:
                self.console.print(f"[yellow]W&B:[/] {text}", markup=True, highlight=False)

        def _run(self, trial):
            run = self.runs.get(trial.trial_id)
            if run is not None:
                return run
            number = self.searcher.trial_number(trial.trial_id)
            if number is None:
                return None
            Path(self.root).mkdir(parents=True, exist_ok=True)
            try:
                run = open_run(project=self.project, entity=self.entity, group=self.study_name,
                               name=f"trial-{number}", run_id=run_id(self.study_name, number), job_type="trial",
                               root=self.root, mode=self.mode,
                               config=run_config(dict(trial.config), self.job, study_name=self.study_name,
                                                 number=number, unit=self.unit, rungs=self.rungs))
            except Exception as e:  # tracking must never stop a sweep
                self._warn(f"could not start the run of trial {number}: {e}")
                return None
            self.runs[trial.trial_id] = run
            self._annotate(number, run)
            return run

        def _annotate(self, number: int, run) -> None:
            from sweep._compat.optuna import study_storage, trial_of_number
            from sweep.record import set_trial_user_attr_any_state

            st = self.searcher.study
            attrs = {"wandb_run_id": run.id, "wandb_project": self.project, "wandb_entity": self.entity,
                     "wandb_url": run.url if self.mode == "online" else None,
                     "wandb_run_dir": str(Path(run.dir).parent)}
            try:
                tid = trial_of_number(st, number)
                for k, v in attrs.items():
                    set_trial_user_attr_any_state(study_storage(st), tid, k, v)
            except Exception as e:
                self._warn(f"could not store the run id on trial {number}: {e}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run = self._run(trial)
            step = result.get(self.unit)
            if run is None or step is None or result.get("val_loss") is None:
                return
            row = {k: result[k] for k in LOGGED_KEYS if isinstance(result.get(k), (int, float))}
            if step in self.rungs:
                row["rung"] = self.rungs.index(step) + 1
            try:
                if result.get("checkpoint_note"):
                    run.summary.update({"checkpoint_note": str(result["checkpoint_note"])})
                run.log(row, step=int(step))
            except Exception as e:
                self._warn(f"could not log trial {trial.trial_id}: {e}")

        def _finish(self, trial, state: str, reason: Optional[str] = None):
            run = self._run(trial)
            if run is None:
                return
            last = trial.last_result or {}
            b = last.get(self.unit)
            summary = {
                "state": state,
                "rung_reached": (self.rungs.index(b) + 1) if b in self.rungs else 0,
                "budget_reached": b,
                "val_loss_last": last.get("val_loss"),
                "optuna_trial_number": self.searcher.trial_number(trial.trial_id),
            }
            if reason:
                from sweep.record import error_summary

                summary["fail_reason"] = error_summary(reason)
            try:
                run.summary.update(summary)
                run.finish(exit_code=1 if state == "FAIL" else 0)
            except Exception as e:
                self._warn(f"could not finish the run of trial {trial.trial_id}: {e}")
            self.runs.pop(trial.trial_id, None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, self.searcher.final_state(trial.trial_id) or "COMPLETE")

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = self.searcher.fail_reason(trial.trial_id)
            self._finish(trial, "FAIL", reason)

        def on_trial_recover(self, iteration, trials, trial, **info):
            # Ray retries the trial (`max_failures`); its run goes on, and counts the retries.
            run = self.runs.get(trial.trial_id)
            n = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
            if run is not None and n:
                try:
                    run.summary.update({"retries": int(n)})
                except Exception as e:
                    self._warn(f"could not note the retry of trial {trial.trial_id}: {e}")

        def on_experiment_end(self, trials, **info):
            for tid, run in list(self.runs.items()):
                try:
                    run.finish()
                except Exception:
                    pass
                self.runs.pop(tid, None)

    return WandbTrials(searcher, mode, project, cfg.entity, str(root), study_name, job,
                       spec.budget.unit, list(spec.budget.rungs), console)


# ------------------------------------------------------------------ offline runs


def offline_runs(root) -> list[Path]:
    """Offline run folders under a study's W&B folder (oldest first)."""
    root = Path(root)
    base = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(p for p in base.glob("offline-run-*") if p.is_dir())


def sync_offline(root, *, project: Optional[str] = None, entity: Optional[str] = None, dry_run: bool = False) -> list[Path]:
    """Upload a study's offline runs with `wandb sync` (the key from WANDB_API_KEY or `wandb login`)."""
    runs = offline_runs(root)
    if dry_run or not runs:
        return runs
    cmd = [sys.executable, "-m", "wandb", "sync", "--no-include-synced"]
    if project:
        cmd += ["--project", project]
    if entity:
        cmd += ["--entity", entity]
    r = subprocess.run(cmd + [str(p) for p in runs], stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"wandb sync exited with {r.returncode}")
    return runs
