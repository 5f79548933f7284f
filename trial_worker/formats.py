"""The job in other tools' terms: TRL's `SFTConfig`, PEFT's `LoraConfig`, bitsandbytes' config, Axolotl.

One home for every translation of a `JobConfig` into another library's arguments: the trial
(recipe.py, model.py) builds its trainer, adapters and 4-bit base from these, and `sweep export`
(through `trial_worker.entry.export_formats`) writes the same objects as files, so an exported
config is exactly what a trial ran.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from typing import TYPE_CHECKING, Any, Optional

from trial_worker.config import JobConfig, ModelConfig
from trial_worker.execution import Execution, as_written

if TYPE_CHECKING:  # pragma: no cover
    import torch

WSD_DECAY_FRACTION = 0.2
COSINE_MIN_LR_RATE = 0.1


def rung_steps(job: JobConfig) -> list[int]:
    """Optimizer steps at which this job reaches each rung of its budget ladder."""
    eff = job.training.effective_batch_size
    return [job.budget.steps_for(r, eff) for r in job.budget.rungs]


def liger_wanted(job: JobConfig, *, cpu: bool) -> bool:
    """Liger's kernels when asked for, or by default on a GPU where liger-kernel is installed."""
    if job.training.use_liger_kernel is not None:
        return job.training.use_liger_kernel
    return not cpu and importlib.util.find_spec("liger_kernel") is not None


def sft_config(job: JobConfig, output_dir: str, *, cpu: bool, execution: Optional[Execution] = None):
    """The job's `TrainingConfig` as TRL's `SFTConfig`, with the top rung as the schedule horizon.

    `execution` (default: as written) sets micro-batch, accumulation and checkpointing; the
    effective batch, and so the optimisation, is the job's whatever the execution.
    """
    from trl import SFTConfig

    return SFTConfig(**sft_kwargs(job, output_dir, cpu=cpu, execution=execution))


def sft_kwargs(job: JobConfig, output_dir: str, *, cpu: bool, execution: Optional[Execution] = None) -> dict[str, Any]:
    """`sft_config`'s keyword arguments as plain data (what `sweep export` writes as SFTConfig JSON)."""
    from trl import SFTConfig

    t, d = job.training, job.data
    execution = execution or as_written(job)
    if execution.effective_batch != t.effective_batch_size:
        raise ValueError(f"execution {execution} changes the effective batch {t.effective_batch_size}")
    max_steps = rung_steps(job)[-1]
    scheduler_kwargs: dict[str, Any] = {}
    if t.lr_scheduler_type == "cosine_with_min_lr":
        scheduler_kwargs["min_lr_rate"] = COSINE_MIN_LR_RATE
    elif t.lr_scheduler_type == "warmup_stable_decay":
        scheduler_kwargs["num_decay_steps"] = max(1, round(WSD_DECAY_FRACTION * max_steps))
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=execution.micro_batch,
        gradient_accumulation_steps=execution.accumulation,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        learning_rate=t.learning_rate,
        optim=t.optim,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        # An int, not warmup_ratio: the ratio field left TrainingArguments in transformers 5.
        warmup_steps=math.ceil(t.warmup_ratio * max_steps),
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs,
        gradient_checkpointing=execution.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=t.bf16,
        fp16=t.fp16,
        logging_steps=t.logging_steps,
        seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=not cpu,
        use_cpu=cpu,
        # SFT data: prompt-completion rows -> loss on the completion tokens only.
        max_length=d.max_seq_length,
        packing=d.packing,
        eval_packing=False,  # validation rows stay whole, so val_loss does not depend on packing
        completion_only_loss=True,
        dataset_num_proc=None,
        # Rungs decide when to save and evaluate (the callback below); `sweep train` also saves every save_steps.
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        save_only_model=False,
        use_liger_kernel=liger_wanted(job, cpu=cpu),
        torch_compile=t.torch_compile,
        report_to="none",
        # A NaN/inf check per micro-step is a host sync; NaN shows in the logged loss anyway.
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        log_level="warning",
    )
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    if "activation_checkpointing" in fields:  # the new name (transformers >= 5.2x); same switch
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    if t.group_by_length:  # renamed in transformers 5 (train_sampling_strategy)
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def dtype_of(name: str) -> "torch.dtype":
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def bnb_config(cfg: ModelConfig):
    """The job's 4-bit quantization as transformers' `BitsAndBytesConfig`."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype_of(q.bnb_4bit_compute_dtype),
    )


def peft_lora_config(cfg: ModelConfig):
    """The job's LoRA section as PEFT's `LoraConfig`."""
    from peft import LoraConfig

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )



# ---------------------------------------------------------------------------- export formats

_AXOLOTL_TYPES = {"messages": "chat_template", "sharegpt": "chat_template", "instruction": "alpaca",
                  "text": "completion", "auto": "chat_template"}


def export_formats(job: JobConfig, *, output_dir: str = "./output") -> dict[str, Any]:
    """The job as {"sft_config.json": TRL SFTConfig kwargs, "lora_config.json": PEFT LoraConfig,
    "bnb_config.json": BitsAndBytesConfig, "axolotl.yaml": an Axolotl-style config} (plain data).

    Built by the same functions a run uses (`sft_kwargs`, `peft_lora_config`, `bnb_config`),
    for a GPU (`use_cpu` false unless the job says so).
    """
    job = job.at_top_rung()  # a production run evaluates once, at the end
    cpu = bool(job.training.use_cpu)
    sft = json.loads(json.dumps(sft_kwargs(job, output_dir, cpu=cpu), default=str))
    lora = peft_lora_config(job.model).to_dict()
    lora = json.loads(json.dumps(lora, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    bnb = bnb_config(job.model).to_dict() if job.model.quantization.load_in_4bit else None
    return {"sft_config.json": sft, "lora_config.json": lora, "bnb_config.json": bnb,
            "axolotl.yaml": axolotl_config(job, output_dir=output_dir, sft=sft)}


def axolotl_config(job: JobConfig, *, output_dir: str, sft: dict) -> dict:
    m, d, t, q = job.model, job.data, job.training, job.model.quantization
    out: dict[str, Any] = {
        "base_model": m.name_or_path,
        "load_in_4bit": q.load_in_4bit,
        "adapter": "qlora" if q.load_in_4bit else "lora",
        "lora_r": m.lora.r,
        "lora_alpha": m.lora.alpha,
        "lora_dropout": m.lora.dropout,
    }
    if m.lora.target_modules == "all-linear":
        out["lora_target_linear"] = True
    else:
        out["lora_target_modules"] = list(m.lora.target_modules)
    ds: dict[str, Any] = {"path": d.path, "type": _AXOLOTL_TYPES[d.format], "split": d.split}
    if d.format in ("messages", "sharegpt"):
        ds["field_messages"] = "messages" if d.format == "messages" else "conversations"
    out["datasets"] = [ds]
    if d.validation_split:
        out["test_datasets"] = [{**ds, "split": d.validation_split}]
    else:
        out["val_set_size"] = d.validation_fraction or 0.1
    out.update({
        "sequence_len": d.max_seq_length,
        "sample_packing": d.packing,
        "train_on_inputs": False,
        "micro_batch_size": sft["per_device_train_batch_size"],
        "gradient_accumulation_steps": sft["gradient_accumulation_steps"],
        "eval_batch_size": t.per_device_eval_batch_size,
        "max_steps": sft["max_steps"],
        "learning_rate": t.learning_rate,
        "lr_scheduler": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "optimizer": t.optim,
        "weight_decay": t.weight_decay,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "adam_epsilon": t.adam_epsilon,
        "max_grad_norm": t.max_grad_norm,
        "bf16": t.bf16,
        "fp16": t.fp16,
        "gradient_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "output_dir": output_dir,
    })
    if t.save_steps:
        out["save_steps"] = t.save_steps
    if t.save_total_limit:
        out["save_total_limit"] = t.save_total_limit
    return out
