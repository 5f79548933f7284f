"""`sweep export`: the best COMPLETE trial of a study as a full training config.

The config is the spec stored in the study (`record_spec`) without its `search` section,
with the trial's parameters written into their sections (the same mapping as
`trial_worker.config.apply_params`) and the budget fixed at the top rung. It is
validated as a spec before it is written, so `sweep validate best.yaml` passes and
`sweep train best.yaml` runs it. Only COMPLETE trials qualify: a PRUNED trial's loss
was measured at a smaller budget.

`-o FOLDER/` writes the same config as `train.yaml` plus the job in other tools' terms:
`sft_config.json` (TRL `SFTConfig(**json)`), `lora_config.json` (PEFT `LoraConfig`),
`bnb_config.json` (transformers `BitsAndBytesConfig`), `axolotl.yaml`, and `EXPORT.md`
(study, trial, its val loss/perplexity). `--steps N` / `--epochs E` re-derive the schedule
for the production length: the effective batch and the warmup *ratio* are kept, so the
warmup steps and the LR decay stretch with the run.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Optional, Union

import optuna
import yaml
from optuna.trial import TrialState

from trial_worker.config import JobConfig, apply_params


class ExportError(Exception):
    """The study cannot give a training config (no COMPLETE trial, no recorded spec...)."""


# Sections of a spec that do not belong in a training config: the search itself and the
# study's database (a training run is not a trial of the study).
_DROP = ("search", "storage")


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The COMPLETE trial with the best value (lowest for a minimizing study)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        have = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        spec = study.user_attrs.get("spec") or {}
        top = (spec.get("budget") or {}).get("max")
        unit = (spec.get("budget") or {}).get("unit", "steps")
        where = f" ({top} {unit})" if top else ""
        raise ExportError(
            f"study {study.study_name!r} has no COMPLETE trial ({have}); a trial is COMPLETE when it "
            f"trains to the top rung{where}. Run more trials (sweep run ... --num-trials N) or wait for "
            "the running ones; PRUNED trials are never exported"
        )
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def training_config(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """The stored spec with `trial`'s params applied, no search section, budget = top rung."""
    spec = study.user_attrs.get("spec")
    if not isinstance(spec, dict):
        raise ExportError(
            f"study {study.study_name!r} has no recorded spec (user attr 'spec'); "
            "only studies created by `sweep run` can be exported"
        )
    config = {k: copy.deepcopy(v) for k, v in spec.items() if k not in _DROP}
    try:
        job = apply_params(JobConfig.of(config), dict(trial.params)).at_top_rung()
    except (KeyError, ValueError) as e:
        raise ExportError(f"trial {trial.number}'s params do not fit the recorded spec: {e}") from None
    return with_job(config, job)


def with_job(config: dict, job: JobConfig) -> dict:
    """`config` with its job sections replaced by `job`'s; the spec's order: name, model, data, training,
    budget, then the rest."""
    return {**job.model_dump(mode="json"), **{k: v for k, v in config.items() if k not in JobConfig.model_fields}}


def production_steps(job: JobConfig, *, steps: Optional[int] = None, epochs: Optional[float] = None) -> Optional[int]:
    """Optimizer steps of the production run: `steps`, or `epochs` passes over the train split at the effective batch."""
    if steps is not None and epochs is not None:
        raise ExportError("give --steps or --epochs, not both")
    if steps is not None:
        if steps < 1:
            raise ExportError(f"--steps is {steps}, but must be >= 1")
        return steps
    if epochs is None:
        return None
    if not epochs > 0:
        raise ExportError(f"--epochs is {epochs}, but must be > 0")
    from trial_worker.entry import load_splits  # datasets: only for --epochs

    try:
        train, _ = load_splits(job.data)
    except (OSError, ValueError) as e:
        raise ExportError(f"--epochs needs the training data to count its rows: {e}") from None
    return max(1, math.ceil(epochs * len(train) / job.training.effective_batch_size))


def _header(study: optuna.Study, trial: optuna.trial.FrozenTrial, out_path: Path) -> str:
    a = trial.user_attrs
    ppl = a.get("ppl_last")
    if ppl is None and trial.value is not None and trial.value < 700:
        ppl = math.exp(trial.value)
    unit = a.get("budget_unit", "steps")
    lines = [
        f"# Exported by `sweep export` from study {study.study_name!r}: the best COMPLETE trial.",
        f"# trial {trial.number}: val_loss {trial.value:.4f}, ppl {ppl:.3f}"
        + (f", at {a['budget_reached']} {unit}" if a.get("budget_reached") else ""),
    ]
    base = study.user_attrs.get("base_val_loss")
    if base is not None:
        lines.append(f"# base model: val_loss {base:.4f}, ppl {study.user_attrs.get('base_ppl', float('nan')):.3f}")
    if trial.params:
        lines.append("# params: " + ", ".join(f"{k}={v!r}" for k, v in sorted(trial.params.items())))
    if study.user_attrs.get("spec_hash"):
        lines.append(f"# spec hash: {study.user_attrs['spec_hash']}")
    lines.append(f"# Run it:  sweep train {out_path.name}")
    return "\n".join(lines) + "\n"


YAML_SUFFIXES = (".yaml", ".yml")


def is_folder_target(out: Union[str, os.PathLike]) -> bool:
    """`-o best.yaml` (a .yaml/.yml file) asks for the training config only; any other path (`-o export`,
    `-o export/`, an existing folder) for a folder of every format. Another suffix (`-o best.json`) is refused:
    the config is YAML, and a folder named like a file would surprise."""
    s = str(out)
    if s.endswith(("/", os.sep)) or Path(s).is_dir():
        return True
    suffix = Path(s).suffix.lower()
    if suffix in YAML_SUFFIXES:
        return False
    if suffix:
        raise ExportError(f"-o {s}: the training config is YAML: give a file ending in .yaml or .yml, or a folder "
                          "(no suffix) for it and every other format")
    return True


def export_best(study: optuna.Study, out_path: Union[str, os.PathLike], *, steps: Optional[int] = None,
                epochs: Optional[float] = None) -> str:
    """Write the best COMPLETE trial of `study` as a training config YAML (or, to a folder, every
    format); return a one-line summary."""
    folder = Path(out_path) if is_folder_target(out_path) else None
    target = folder / TRAIN_CONFIG if folder else Path(out_path)
    trial = best_complete_trial(study)
    config = training_config(study, trial)
    n = production_steps(JobConfig.of(config), steps=steps, epochs=epochs)
    if n is not None:
        config = with_job(config, JobConfig.of(config).for_steps(n))
    text = _header(study, trial, target) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)

    # The file must load as a spec exactly as `sweep validate` / `sweep train` will load it.
    from sweep.spec import SpecError, parse_spec

    try:
        spec = parse_spec(text, str(target))
    except SpecError as e:
        raise ExportError(f"the exported config does not validate (the recorded spec may be from an older sweep):\n{e}") from None
    if spec.search is not None:
        raise ExportError("internal: the exported config still has a search section")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)
    info = f"trial {trial.number}, val_loss {trial.value:.4f}" + (f", {n} steps" if n is not None else "")
    if folder is not None:
        info += _write_formats(study, trial, folder, spec.job())
    return info


TRAIN_CONFIG = "train.yaml"


def _write_formats(study: optuna.Study, trial: optuna.trial.FrozenTrial, folder: Path, job: JobConfig) -> str:
    """The job in TRL/PEFT/bitsandbytes/Axolotl terms, and EXPORT.md, beside `train.yaml` in `folder`."""
    import json

    from trial_worker.entry import export_formats

    formats = export_formats(job)
    header = _header(study, trial, folder / TRAIN_CONFIG)
    for name, data in formats.items():
        if data is None:  # no 4-bit quantization: no BitsAndBytesConfig
            continue
        if name.endswith(".json"):
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        else:
            text = header.replace("# Run it:  sweep train", "# sweep's own config:") + yaml.safe_dump(data, sort_keys=False)
        (folder / name).write_text(text)
    t = job.training
    (folder / "EXPORT.md").write_text(
        "# Export of the best COMPLETE trial\n\n```\n" + header + "```\n\n"
        f"Production run: {job.budget.max} optimizer steps at effective batch {t.effective_batch_size} "
        f"(per_device_train_batch_size {t.per_device_train_batch_size} x gradient_accumulation_steps "
        f"{t.gradient_accumulation_steps}), warmup ratio {t.warmup_ratio}, schedule {t.lr_scheduler_type}.\n\n"
        "| file | what |\n|---|---|\n"
        f"| `{TRAIN_CONFIG}` | sweep's training config: `sweep train {TRAIN_CONFIG}` |\n"
        "| `sft_config.json` | TRL: `SFTConfig(**json.load(open('sft_config.json')))` |\n"
        "| `lora_config.json` | PEFT: `LoraConfig(**json.load(open('lora_config.json')))` |\n"
        + ("| `bnb_config.json` | transformers: `BitsAndBytesConfig.from_dict(json.load(open('bnb_config.json')))` |\n"
           if formats["bnb_config.json"] is not None else "")
        + "| `axolotl.yaml` | an Axolotl-style config of the same job |\n"
    )
    return f"; wrote {', '.join(n for n, d in formats.items() if d is not None)}, EXPORT.md"
