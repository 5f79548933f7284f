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
    out = copy.deepcopy(spec)
    for key in _DROP:
        out.pop(key, None)
    job_part = {k: out[k] for k in JobConfig.model_fields if k in out}
    try:
        job = apply_params(JobConfig.model_validate(job_part), dict(trial.params))
    except (KeyError, ValueError) as e:
        raise ExportError(f"trial {trial.number}'s params do not fit the recorded spec: {e}") from None
    job_dict = job.model_dump(mode="json")
    top = job.budget.rungs[-1]
    job_dict["budget"]["min"] = top
    job_dict["budget"]["max"] = top
    out.update(job_dict)
    # Keep the spec's section order: name, model, data, training, budget, then the rest.
    order = [k for k in JobConfig.model_fields if k in out] + [k for k in out if k not in JobConfig.model_fields]
    return {k: out[k] for k in order}


def production_steps(config: dict, *, steps: Optional[int] = None, epochs: Optional[float] = None) -> Optional[int]:
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
    job = JobConfig.model_validate({k: config[k] for k in JobConfig.model_fields if k in config})
    from trial_worker.entry import load_splits  # datasets: only for --epochs

    try:
        train, _ = load_splits(job.data)
    except (OSError, ValueError) as e:
        raise ExportError(f"--epochs needs the training data to count its rows: {e}") from None
    return max(1, math.ceil(epochs * len(train) / job.training.effective_batch_size))


def reschedule(config: dict, steps: Optional[int]) -> dict:
    """The config with its run length set to `steps` optimizer steps (budget in steps, one rung)."""
    if steps is None:
        return config
    out = copy.deepcopy(config)
    out["budget"] = {**out["budget"], "unit": "steps", "min": steps, "max": steps}
    return out


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


def is_folder_target(out: Union[str, os.PathLike]) -> bool:
    """`-o OUT/` (a trailing slash, or an existing folder) asks for every format; a file path, for the YAML only."""
    s = str(out)
    return s.endswith(("/", os.sep)) or Path(s).is_dir()


def export_best(study: optuna.Study, out_path: Union[str, os.PathLike], *, steps: Optional[int] = None,
                epochs: Optional[float] = None) -> str:
    """Write the best COMPLETE trial of `study` as a training config YAML (or, to a folder, every
    format); return a one-line summary."""
    if is_folder_target(out_path):
        return _export_folder(study, Path(out_path), steps=steps, epochs=epochs)
    out_path = Path(out_path)
    trial = best_complete_trial(study)
    config = training_config(study, trial)
    n = production_steps(config, steps=steps, epochs=epochs)
    config = reschedule(config, n)
    text = _header(study, trial, out_path) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)

    # The file must load as a spec exactly as `sweep validate` / `sweep train` will load it.
    from sweep.spec import SpecError, parse_spec

    try:
        parsed = parse_spec(text, str(out_path))
    except SpecError as e:
        raise ExportError(f"the exported config does not validate (the recorded spec may be from an older sweep):\n{e}") from None
    if parsed.search is not None:
        raise ExportError("internal: the exported config still has a search section")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out_path)
    return f"trial {trial.number}, val_loss {trial.value:.4f}" + (f", {n} steps" if n is not None else "")


TRAIN_CONFIG = "train.yaml"


def _export_folder(study: optuna.Study, folder: Path, *, steps: Optional[int], epochs: Optional[float]) -> str:
    import json

    from trial_worker.entry import export_formats

    info = export_best(study, folder / TRAIN_CONFIG, steps=steps, epochs=epochs)
    trial = best_complete_trial(study)
    config = yaml.safe_load((folder / TRAIN_CONFIG).read_text())
    job = JobConfig.model_validate({k: config[k] for k in JobConfig.model_fields if k in config})
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
    return info + f"; wrote {', '.join(n for n, d in formats.items() if d is not None)}, EXPORT.md"
