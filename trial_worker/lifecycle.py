"""What every trial does at a rung, solo (`recipe.QLoRATrial`, a Trainer) or packed (`pack.engine`): one copy.

- `check_finite`: a NaN/inf training or validation loss stops the trial (`NonFiniteLoss`) before anything
  non-finite is reported, so ASHA's rung cut-offs only ever hold finite values.
- `rung_report`: the rung's report to Tune (`config.REPORT_KEYS`) and the counters saved with its checkpoint.
- `TRIAL_STATE_FILE`, `write_state`, `read_state`, `counters`: those counters beside the checkpoint's own files, read
  back on a resume so throughput and time figures go on across attempts.

Imports no torch: the caller passes the peak memory figure.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from trial_worker.config import REPORT_KEYS, JobConfig

# A rung's checkpoint folder: transformers' Trainer's name (`trainer_utils.PREFIX_CHECKPOINT_DIR`-step), which the
# solo recipe gets from the Trainer and the pack writes itself; `sweep train --resume` finds them by it.
CHECKPOINT_PREFIX = "checkpoint"
TRIAL_STATE_FILE = "sweep_trial_state.json"  # our own counters, saved beside the checkpoint's own files
COUNTERS = ("wall_s", "train_s", "tokens")  # carried over from the attempts before this one


class NonFiniteLoss(FloatingPointError):
    """The training or validation loss became NaN/inf: the trial diverged and is stopped.

    Raised at the first log step or rung evaluation that sees it, before anything non-finite
    is reported, so ASHA's rung cut-offs only ever hold finite values.
    """


def check_finite(job: JobConfig, what: str, value: float, step: int) -> None:
    """Raise NonFiniteLoss, naming the trial's optimisation settings, if `value` is NaN or infinite."""
    if not math.isfinite(float(value)):
        t = job.training
        raise NonFiniteLoss(
            f"training diverged: {what} is {float(value)} at step {step} (learning_rate={t.learning_rate:g}, "
            f"weight_decay={t.weight_decay:g}, max_grad_norm={t.max_grad_norm:g}, optim={t.optim}); "
            "the trial is stopped and recorded FAIL"
        )


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The checkpoint folder of `step` under a trial's (or a production run's) output folder."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def read_state(checkpoint_dir: Optional[str | Path]) -> dict:
    """What a checkpoint was saved with beside its own files ({} without a checkpoint or without the file)."""
    path = Path(checkpoint_dir) / TRIAL_STATE_FILE if checkpoint_dir else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def counters(state: dict) -> dict[str, float]:
    """The counters carried over from the attempts before (zeros where `state` has none)."""
    return {k: float(state.get(k, 0.0)) for k in COUNTERS}


def write_state(directory: str | Path, state: dict) -> None:
    (Path(directory) / TRIAL_STATE_FILE).write_text(json.dumps(state))


def rung_report(job: JobConfig, *, step: int, rung_steps: Sequence[int], start_step: int, val: dict,
                train_loss: float, check_train_loss: bool, last_lr: float, offset: dict, train_s: float,
                tokens: float, t_start: float, setup_s: float, peak_mem_gb: float, micro_batch: int,
                accumulation: int, gradient_checkpointing: bool) -> tuple[dict, dict]:
    """(metrics, state) of the rung at `step`: the report to Tune and the counters to save with its checkpoint.

    `val`: {"val_loss", "ppl", "tokens"} of the rung's evaluation; `train_loss`: the mean since the last rung
    (checked when `check_train_loss`); `offset`: the counters of the attempts before this one; `train_s`,
    `tokens`: this attempt's; `t_start`: `time.perf_counter()` when this attempt started."""
    check_finite(job, "validation loss", val["val_loss"], step)
    if check_train_loss:
        check_finite(job, "train loss", train_loss, step)
    eff = job.training.effective_batch_size
    total_train_s = offset["train_s"] + train_s
    total_tokens = offset["tokens"] + tokens
    wall_s = offset["wall_s"] + time.perf_counter() - t_start
    metrics = {
        "steps": step,
        "samples": step * eff,
        "rung": max(i for i, s in enumerate(rung_steps) if s == step),
        "val_loss": val["val_loss"],
        "ppl": val["ppl"],
        "train_loss": train_loss,
        "scheduled_lr": last_lr,
        "tokens_per_s": total_tokens / total_train_s if total_train_s > 0 else 0.0,
        "samples_per_s": (step - start_step) * eff / train_s if train_s > 0 else 0.0,
        "peak_mem_gb": peak_mem_gb,
        "wall_s": wall_s,
        "train_s": total_train_s,
        "setup_s": setup_s,
        "micro_batch": micro_batch,
        "accumulation": accumulation,
        "gradient_checkpointing": gradient_checkpointing,
    }
    assert set(metrics) == set(REPORT_KEYS)
    state = {"wall_s": wall_s, "train_s": total_train_s, "tokens": total_tokens, "val_tokens": val["tokens"]}
    return metrics, state
