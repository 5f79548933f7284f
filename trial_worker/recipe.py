"""The QLoRA trial, top to bottom: setup -> _setup_model -> _setup_data -> train -> cleanup.

One trial is one TRL `SFTTrainer` run of a job (the shape of a torchtune recipe):

- setup: the process (threads, GPU memory cap, seed), then `_setup_model`: tokenizer + 4-bit
  base + LoRA (`model.py`) and the execution of the effective batch (`execution.py`); then
  `_setup_data`: prompt-completion rows (`data.py`); then the trainer, over an `SFTConfig`
  carrying every knob of `TrainingConfig` (`formats.py`) and padding-free micro-batches
  (`data.FlatCollator`). The LR schedule's horizon is the top rung (`budget.max`), so a trial
  promoted by ASHA continues its schedule instead of restarting it.
- train: `SFTTrainer.train`; a callback stops at each rung (`budget.rungs`, in optimizer
  steps), has the Trainer save a full checkpoint (adapter, optimizer, scheduler, RNG, data
  position), scores the validation split as a token-mean (`evaluate.py`) and calls
  `report(metrics, checkpoint_dir)`. `resume_from=<that dir>` continues at the same step,
  LR and data position (the Trainer's own `resume_from_checkpoint`).
- cleanup: free the model and accelerator memory.

`run(job, report=..., output_dir=...)` drives it; `evaluate_base(job)` scores the untrained
base on the same validation tokens.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any, Callable, Optional

from trial_worker.checkpoint import write_manifest
from trial_worker.config import JobConfig
from trial_worker.data import BUCKETS_PER_OCTAVE, GRAPH_BUCKETS_PER_OCTAVE, FlatCollator, load_splits
from trial_worker.evaluate import validation_loss
from trial_worker.execution import (Execution, as_written, cap_gpu_memory, memory_figures, peak_memory_gb, probe_gpu,
                                    reset_peak_memory, smaller)
from trial_worker.formats import rung_steps, sft_config
from trial_worker.lifecycle import check_finite, counters, read_state, rung_report, write_state
from trial_worker.lifecycle import checkpoint_dir as rung_checkpoint
from trial_worker.graphs import StepGraphs, causal_lm_parts, graphs_wanted, lm_head_not_plain, token_nll, varlen_inputs
from trial_worker.model import load_model, use_cpu

Report = Callable[[dict, str], None]


class TrialOOM(MemoryError):
    """`oom`: the trial ran out of accelerator memory at every micro-batch down to 1 (same effective batch).

    Its message starts with "oom:" and carries the executions tried and the memory figures; the
    study records it as the trial's FAIL reason.
    """




def quiet_libraries() -> None:
    """No progress bars or info logs from datasets/transformers in a trial's output."""
    import sys
    import warnings

    import transformers

    # transformers 5 renamed gradient_* to activation_checkpointing; TRL/PEFT still call the old names.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    # datasets reads this when imported (and its children inherit it): a pack, which never loads data itself
    # (`pack.data` does, in a process of its own), does not import datasets only to quiet it.
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        # Imported, or being imported by another thread now (a CPU pack's data thread, `pack.data`): the import
        # statement waits for that import to finish, where the half-made module in sys.modules has no
        # `disable_progress_bars` yet (seen: the pack's start failed on it).
        import datasets

        datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


class QLoRATrial:
    """One QLoRA SFT trial of `job`, writing checkpoints under `output_dir`."""

    def __init__(self, job: JobConfig, *, output_dir: str | os.PathLike, report: Optional[Report] = None,
                 execution: Optional[Execution] = None, started_at: Optional[float] = None):
        self.job = job
        self.started_at = started_at or time.time()  # the trial's start (`setup_s` counts from it)
        self.setup_s = 0.0
        self.forced_execution = execution  # an OOM retry's smaller micro-batch (see `run`)
        self.output_dir = str(output_dir)
        self.report = report or (lambda metrics, checkpoint_dir: None)
        self.rung_steps = rung_steps(job)
        self.t_start = time.perf_counter()
        self.trainer: Any = None  # the TRL SFTTrainer, built by `_setup_trainer`
        self.start_step = 0  # the step a resumed trial starts from (`_resume`)
        self.last_metrics: Optional[dict] = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> "QLoRATrial":
        """Model, data and trainer of the trial, on its device, ready to `train`."""
        self._setup_process()
        tokenizer, model = self._setup_model()
        train_ds, val_ds = self._setup_data(tokenizer)
        self._setup_trainer(model, tokenizer, train_ds, val_ds)
        return self

    def _setup_process(self) -> None:
        """This process, for this trial: threads, the GPU memory cap, a fresh peak count, the seed."""
        import torch
        from transformers import set_seed

        quiet_libraries()
        t = self.job.training
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        self.cpu = use_cpu(t)
        cap_gpu_memory(t.gpu_memory_fraction, cpu=self.cpu)  # before anything of the trial is on the GPU
        reset_peak_memory()
        set_seed(t.seed)  # before the LoRA weights are drawn: same params + seed -> same trial

    def _setup_model(self):
        """(tokenizer, the 4-bit base with LoRA adapters), and how the effective batch will execute."""
        t = self.job.training
        tokenizer, model = load_model(self.job.model, t)
        # The effective batch is the hyperparameter; how it runs is chosen for speed (execution.py).
        if self.forced_execution is not None:
            self.execution = self.forced_execution
        elif self.cpu or t.execution == "as_written":
            self.execution = as_written(self.job)
        else:
            self.execution = probe_gpu(model, self.job, vocab_size=model.config.vocab_size)
        return tokenizer, model

    def _setup_data(self, tokenizer):
        """(train, validation) prompt-completion rows; the trainer tokenises them."""
        train_ds, val_ds = load_splits(self.job.data, tokenizer=tokenizer)
        self.val_rows = val_ds  # prompt-completion rows, before tokenizing (evaluation prompts)
        return train_ds, val_ds

    def _setup_trainer(self, model, tokenizer, train_ds, val_ds) -> None:
        """TRL's SFTTrainer over the job's `SFTConfig`, with padding-free micro-batches and the rung callback."""
        import torch
        from transformers.trainer_callback import PrinterCallback

        graphs = graphs_wanted(self.job.training.cuda_graphs, cpu=self.cpu, packing=self.job.data.packing,
                               gradient_checkpointing=self.execution.gradient_checkpointing,
                               micro_batch_tokens=self.execution.micro_batch * self.job.data.max_seq_length)
        # Padding-free, bucketed micro-batches (data.FlatCollator); TRL's own packing is padding-free already.
        # With graphs: coarser buckets and a fixed number of row slots, so a shape is a bucket.
        collator = FlatCollator(tokenizer.pad_token_id, per_octave=GRAPH_BUCKETS_PER_OCTAVE if graphs else BUCKETS_PER_OCTAVE,
                                row_slots=self.execution.micro_batch + 1 if graphs else None)
        self.trainer = _lean_trainer_class()(
            model=model,
            args=sft_config(self.job, self.output_dir, cpu=self.cpu, execution=self.execution),
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=tokenizer,
            data_collator=None if self.job.data.packing else collator,
            callbacks=[_RungCallback(self)],
        )
        # TRL casts a quantized model's adapters to bf16; keep them fp32 (PEFT's own default). In bf16,
        # Adam steps below ~1/256 of a weight round away, which would bias a search towards high LRs;
        # and a resumed trial reloads its adapter in fp32, so only fp32 resumes exactly.
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        for name, before, ds in (("train", len(train_ds), self.trainer.train_dataset),
                                 ("validation", len(val_ds), self.trainer.eval_dataset)):
            if len(ds) == 0:
                raise ValueError(
                    f"none of the {before} {name} rows has a response token within max_seq_length="
                    f"{self.job.data.max_seq_length} (TRL drops rows whose prompt fills the whole sequence); "
                    "raise data.max_seq_length"
                )
        self.trainer.remove_callback(PrinterCallback)  # the rung reports are the output
        tr = self.trainer
        tr._sweep_autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(tr.accelerator.mixed_precision))
        # Our sync-free loss stands for the LM head only where it is hidden @ W^T, frozen; else TRL's fused head.
        tr._sweep_plain_head = lm_head_not_plain(model) is None
        tr._sweep_graphs = (StepGraphs(model, row_slots=self.execution.micro_batch + 1, autocast_dtype=tr._sweep_autocast)
                            if graphs and tr._sweep_plain_head else None)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self) -> dict[str, float]:
        """Token-mean loss of the current model over the validation split: {val_loss, ppl, tokens}."""
        from torch.utils.data import DataLoader
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        tr = self.trainer
        # Validation rows stay padded, one row each, whatever the training batches look like: the
        # scorer bounds its fp32 logits row by row, and val_loss must not depend on the batching.
        batches = DataLoader(tr.eval_dataset, batch_size=tr.args.per_device_eval_batch_size,
                             collate_fn=DataCollatorForLanguageModeling(pad_token_id=tr.processing_class.pad_token_id))
        return validation_loss(tr.model, batches, device=tr.args.device, autocast=tr.autocast_smart_context_manager)

    # ------------------------------------------------------------------ train
    def train(self, resume_from: Optional[str] = None) -> Optional[dict]:
        """Train to the top rung, reporting at each rung; return the last rung's metrics."""
        self._restore_counters(resume_from)
        self.trainer.train(resume_from_checkpoint=resume_from)
        return self.last_metrics

    def _restore_counters(self, resume_from: Optional[str]) -> None:
        self.offset = counters(read_state(resume_from))
        self.train_s = 0.0  # seconds in training steps, this process
        self.t_mark: Optional[float] = None
        self.logs: list[tuple[int, float]] = []  # (steps covered, mean loss) since the last report
        self.last_logged_step = 0  # the step training (re)starts at, set by the callback at train begin
        self.last_lr = float("nan")
        self.tokens_seen = 0.0

    # The callback calls these three at each step / log / checkpoint.
    def _on_log(self, step: int, logs: dict) -> None:
        if "loss" in logs:
            self._check_finite("train loss", logs["loss"], step)
            covered = step - self.last_logged_step
            self.logs.append((covered, float(logs["loss"])))
            self.last_logged_step = step
        if "learning_rate" in logs:
            self.last_lr = float(logs["learning_rate"])
        if "num_tokens" in logs:  # TRL: non-padding tokens trained by this process
            self.tokens_seen = float(logs["num_tokens"])

    def _check_finite(self, what: str, value: float, step: int) -> None:
        check_finite(self.job, what, value, step)

    def _on_rung(self, step: int, checkpoint_dir: str) -> None:
        val = self.evaluate()
        covered = sum(n for n, _ in self.logs)
        train_loss = sum(n * loss for n, loss in self.logs) / covered if covered else float("nan")
        metrics, state = rung_report(
            self.job, step=step, rung_steps=self.rung_steps, start_step=self.start_step, val=val,
            train_loss=train_loss, check_train_loss=bool(covered), last_lr=self.last_lr, offset=self.offset,
            train_s=self.train_s, tokens=self.tokens_seen, t_start=self.t_start, setup_s=self.setup_s,
            peak_mem_gb=peak_memory_gb(), micro_batch=self.execution.micro_batch,
            accumulation=self.execution.accumulation, gradient_checkpointing=self.execution.gradient_checkpointing)
        self.logs = []
        write_state(checkpoint_dir, state)
        write_manifest(checkpoint_dir)  # last: a checkpoint without it was cut short
        self.last_metrics = metrics
        self.report(dict(metrics), checkpoint_dir)

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        import torch

        self.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _RungCallback(trial: QLoRATrial):
    """A TrainerCallback that turns the rung steps into checkpoint + evaluate + report."""
    from transformers import TrainerCallback

    class RungCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            trial.start_step = state.global_step
            trial.last_logged_step = state.global_step
            trial.t_mark = time.perf_counter()
            trial.setup_s = time.time() - trial.started_at

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in trial.rung_steps:
                trial.train_s += time.perf_counter() - trial.t_mark
                control.should_log = True  # so train_loss and lr cover exactly up to the rung
                control.should_save = True

        def on_log(self, args, state, control, logs=None, **kw):
            trial._on_log(state.global_step, logs or {})

        def on_save(self, args, state, control, **kw):
            step = state.global_step
            checkpoint_dir = str(rung_checkpoint(args.output_dir, step))
            if step in trial.rung_steps:
                trial._on_rung(step, checkpoint_dir)  # hashes the checkpoint before reporting it
                trial.t_mark = time.perf_counter()  # eval, saving and reporting are not training time
            elif os.path.isdir(checkpoint_dir):  # a `save_steps` checkpoint of `sweep train`
                write_manifest(checkpoint_dir)

    return RungCallback()


def _lean_trainer_class():
    """TRL's SFTTrainer with a training loss that never waits for the GPU, replayed as CUDA graphs.

    For metrics (entropy, token accuracy, token count) the stock `compute_loss` calls
    `.item()` several times per micro-batch, and TRL's fused LM head indexes the label positions
    with a boolean mask. Each is a host-device sync, and a QLoRA step of a 1B model is bound by
    the CPU launching kernels, so the GPU then idles; a sync also stops a CUDA graph capture.
    Here the training loss is the same token-mean over the effective batch (`graphs.token_nll`,
    the LM head in chunks without a sync), replayed from a CUDA graph per micro-batch shape
    where `graphs.StepGraphs` can (`_sweep_graphs`, set by the recipe); the token count stays on
    the device until a log needs it, and everything else (evaluation, other loss types) is TRL's.
    """
    import torch
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def create_optimizer(self, *args, **kwargs):
            from trial_worker._compat import lean_bnb_step

            super().create_optimizer(*args, **kwargs)
            self.optimizer = lean_bnb_step(self.optimizer)  # no GPU wait after each parameter's update
            return self.optimizer

        def _lean(self) -> bool:
            a = self.args
            return (self.model.training and not self.aux_loss_enabled and self.label_smoother is None
                    and self.compute_loss_func is None and getattr(a, "loss_type", "nll") == "nll"
                    and self.accelerator.num_processes == 1)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real_tokens = inputs.pop("num_tokens", None)  # FlatCollator: tokens before the bucket padding
            if return_outputs or not self._lean():
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            mask = inputs.get("attention_mask")
            if getattr(self, "_sweep_plain_head", False):
                inputs = varlen_inputs(inputs, causal_lm_parts(model)[0])
                graphs = getattr(self, "_sweep_graphs", None)
                loss = graphs.run(inputs, num_items_in_batch) if graphs is not None else None
                if loss is None:
                    loss = token_nll(model, inputs, num_items_in_batch, autocast_dtype=getattr(self, "_sweep_autocast", None))
            else:  # TRL's fused LM head (softcap/scale/bias/trained head handled), eagerly
                from trial_worker._compat import fused_head_nll

                loss = fused_head_nll(model, inputs, num_items_in_batch)
            if real_tokens is not None:
                tokens = real_tokens
            else:
                tokens = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
            pending = getattr(self, "_sweep_tokens", None)
            self._sweep_tokens = tokens.detach() if pending is None else pending + tokens.detach()
            return loss

        def log(self, logs, *args, **kwargs):
            pending = getattr(self, "_sweep_tokens", None)
            if pending is not None:
                self._sweep_tokens = None
                from trial_worker._compat import add_logged_tokens  # TRL's private count and store

                add_logged_tokens(self, int(pending))
            return super().log(logs, *args, **kwargs)

    return LeanSFTTrainer


def run(job: JobConfig, *, report: Optional[Report] = None, resume_from: Optional[str] = None,
        output_dir: str | os.PathLike, started_at: Optional[float] = None) -> Optional[dict]:
    """Run one QLoRA trial of `job` up to its top rung, calling `report(metrics, checkpoint_dir)` at each rung.
    `started_at` (`time.time()`): when the trial started, for its reports' `setup_s` (default: now).

    `resume_from` is a checkpoint folder a previous `report` handed out: training continues
    from its step with the same optimizer, LR schedule, RNG and data position.
    Returns the metrics of the last rung.

    Out of memory (`torch.OutOfMemoryError`): memory is freed and the trial starts again from
    `resume_from` with half the micro-batch and twice the accumulation (same effective batch, so
    the same optimisation); rungs an earlier attempt reported are not reported twice. If even
    micro-batch 1 runs out, `TrialOOM` ("oom: ...", with the memory figures) is raised.
    """
    import torch

    reported: set[int] = set()

    def report_once(metrics: dict, checkpoint_dir: str) -> None:
        if metrics["steps"] not in reported:
            reported.add(metrics["steps"])
            (report or (lambda m, c: None))(metrics, checkpoint_dir)

    execution, tried = None, []
    while True:
        trial = QLoRATrial(job, output_dir=output_dir, report=report_once, execution=execution, started_at=started_at)
        error = None
        try:
            trial.setup()
            return trial.train(resume_from=resume_from)
        except torch.OutOfMemoryError as e:
            error = str(e).strip().splitlines()[0][:300] if str(e).strip() else "out of memory"
            peak = peak_memory_gb()
            tried.append(getattr(trial, "execution", None) or execution or as_written(job))
        finally:
            trial.cleanup()  # drops the trainer, gc.collect(), torch.cuda.empty_cache()
        execution = smaller(tried[-1])
        if execution is None:
            plans = ", ".join(f"{x.micro_batch}x{x.accumulation}" for x in tried)
            raise TrialOOM(f"oom: out of memory at every micro-batch of effective batch "
                           f"{tried[-1].effective_batch} (tried {plans}); {memory_figures(peak)}; last error: {error}")
        print(f"sweep: out of memory at micro-batch {tried[-1].micro_batch}x{tried[-1].accumulation} ({error}); "
              f"retrying as {execution.micro_batch}x{execution.accumulation}", file=sys.stderr, flush=True)


def evaluate_base(job: JobConfig, *, output_dir: Optional[str | os.PathLike] = None) -> dict[str, float]:
    """{"val_loss", "ppl", "tokens"} of the base model (4-bit, untrained LoRA) on the job's validation tokens.

    LoRA's B matrices start at zero, so the untrained adapter leaves the base's outputs
    unchanged; going through the same trial setup keeps tokens and masking identical.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sweep-base-") as tmp:
        trial = QLoRATrial(job, output_dir=output_dir or tmp)
        try:
            trial.setup()
            return trial.evaluate()
        finally:
            trial.cleanup()


