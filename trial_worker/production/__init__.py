"""`sweep train`: the production run of a training config, with the trial's own code.

A production run is one `QLoRATrial` (recipe.py) whose budget ladder has a single rung,
the run's length (`budget.max` steps; `sweep export --steps/--epochs` sets it), so its LR
schedule, data, masking and loss are exactly a trial's. On top of a trial it:

- saves a resumable checkpoint every `training.save_steps` steps, keeping the newest
  `training.save_total_limit` (the Trainer's own rotation), and always one at the end;
- `resume=True` continues from the newest `checkpoint-N` in the output folder, at the same
  step, LR, optimizer state, RNG and data position (the Trainer's `resume_from_checkpoint`);
- writes into the output folder: `config.yaml` (the job), `loss.csv` and `loss.png` (the
  training loss curve, whole across resumes: it is the Trainer state's log history),
  `metrics.json` (final validation loss/perplexity, tokens/s, ...), `adapter/` (the LoRA
  adapter as safetensors, with the tokenizer);
- `merge=True` writes `merged/`: the base in 16 bit with the adapter folded in
  (`merge_and_unload`), loadable with plain `AutoModelForCausalLM.from_pretrained`.

`formats.export_formats(job)` gives the same job as TRL/PEFT/bitsandbytes/Axolotl configs.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from trial_worker.checkpoint import choose
from trial_worker.config import JobConfig
from trial_worker.lifecycle import CHECKPOINT_PREFIX

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
METRICS_FILE = "metrics.json"
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
# loss.csv: the Trainer's log history under the names the trials' reports use (`steps`, `scheduled_lr`).
LOSS_COLUMNS = {"steps": "step", "epoch": "epoch", "loss": "loss", "scheduled_lr": "learning_rate", "grad_norm": "grad_norm"}


class ProductionError(Exception):
    """A production run cannot start as asked (existing checkpoints without --resume, ...)."""


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders under `output_dir`, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint that passes its hash check (`trial_worker.checkpoint`); each newer one
    skipped (cut short, corrupted, emptied) is logged with the reason."""
    chosen, notes = choose(reversed(checkpoints(output_dir)))
    for note in notes:
        log(note)
    if chosen is not None and notes:
        log(f"falling back to {chosen.name}")
    return chosen


def train(job: JobConfig, output_dir: str | os.PathLike, *, resume: bool = False, merge: bool = False,
          merge_dtype: Optional[str] = None, callbacks: Iterable[Any] = (),
          log: Callable[[str], None] = print) -> dict:
    """Run the production job into `output_dir`; return the final metrics (see the module doc)."""
    from trial_worker.recipe import QLoRATrial

    out = Path(output_dir)
    job = job.at_top_rung()  # a production run evaluates once, at the end
    resume_from = latest_checkpoint(out, log) if resume else None
    if resume and resume_from is None:
        log(f"no intact checkpoint in {out} to resume from: starting from step 0")
    if not resume and checkpoints(out):
        raise ProductionError(
            f"{out} already holds checkpoints ({checkpoints(out)[-1].name}); continue that run with --resume, "
            "or give another output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    if resume_from is not None:
        log(f"resuming from {resume_from}")

    trial = QLoRATrial(job, output_dir=out)
    try:
        trial.setup()
        for cb in callbacks:
            trial.trainer.add_callback(cb)
        metrics = dict(trial.train(resume_from=str(resume_from) if resume_from else None) or {})
        history = trial.trainer.state.log_history
        rows = write_loss_curve(history, out)
        metrics["loss_rows"] = rows
        adapter = out / ADAPTER_DIR
        trial.trainer.model.save_pretrained(adapter, safe_serialization=True)
        trial.trainer.processing_class.save_pretrained(adapter)
    finally:
        trial.cleanup()
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"step {metrics.get('steps')}: val_loss {metrics.get('val_loss', float('nan')):.4f}, "
        f"ppl {metrics.get('ppl', float('nan')):.3f}; adapter in {adapter}")
    if merge:
        merged = merge_adapter(job, adapter, out / MERGED_DIR, dtype=merge_dtype)
        log(f"merged model in {merged}")
    return metrics


def write_loss_curve(log_history: list[dict], out: Path) -> int:
    """loss.csv (one row per logged step) and, where matplotlib is installed, loss.png; returns the row count."""
    rows = [{col: h.get(key, "") for col, key in LOSS_COLUMNS.items()} for h in log_history if "loss" in h]
    with open(out / LOSS_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: wrote {LOSS_CSV} but no {LOSS_PNG} (pip install matplotlib)")
        return len(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["steps"] for r in rows], [r["loss"] for r in rows], label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / LOSS_PNG, dpi=100)
    plt.close(fig)
    return len(rows)


def merge_dtype_of(job: JobConfig, dtype: Optional[str]) -> str:
    """The merged model's dtype: as asked, else the 16-bit compute dtype, else bfloat16."""
    if dtype:
        return dtype
    compute = job.model.quantization.bnb_4bit_compute_dtype
    return compute if compute in ("bfloat16", "float16") else "bfloat16"


def merge_adapter(job: JobConfig, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  dtype: Optional[str] = None) -> Path:
    """The base (unquantized) + the adapter folded in (`merge_and_unload`), saved as a plain checkpoint.

    The merge runs in fp32 and is cast to `dtype` (default: 16-bit) once, at the end.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trial_worker.formats import dtype_of

    m = job.model
    base = AutoModelForCausalLM.from_pretrained(m.name_or_path, revision=m.revision,
                                                trust_remote_code=m.trust_remote_code, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(dtype_of(merge_dtype_of(job, dtype)))
    merged.config.use_cache = True  # an inference checkpoint
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out)
    return out


def load_run(run_dir: str | os.PathLike) -> tuple[JobConfig, Path]:
    """(job, adapter folder) of a finished `sweep train` output folder."""
    run = Path(run_dir)
    cfg, adapter = run / CONFIG_FILE, run / ADAPTER_DIR
    if not cfg.exists() or not (adapter / "adapter_model.safetensors").exists():
        raise ProductionError(f"{run} is not a finished `sweep train` output (needs {CONFIG_FILE} and "
                              f"{ADAPTER_DIR}/adapter_model.safetensors)")
    return JobConfig.model_validate(yaml.safe_load(cfg.read_text())), adapter
