"""The packed training loop: several trials, one frozen base, one forward/backward per pack step.

Each pack step takes the next micro-batch of every running trial, builds one batch (`batch.build`), runs the
base once with each trial's rows through its own adapter (`lora.MultiLoRALinear`), and computes each trial's
loss on its own rows only: the sum of its response tokens' cross-entropy divided by the number of response
tokens in its whole effective batch (all its accumulation micro-batches), as the Trainer's
`num_items_in_batch` does. The backward of the sum of those losses gives each adapter exactly the gradient of
its own loss, since no trial's loss depends on another's adapter.

Everything that makes a trial that trial is its own: optimizer and LR schedule (built by the Trainer's own
helpers from the trial's `SFTConfig`, horizon = the top rung), micro-batch and accumulation (as written),
data order (a permutation per epoch seeded by the trial's seed), LoRA init and dropout (the trial's own
generators), budget steps, rung evaluation, checkpoints and reports. A trial can join or leave between any two
pack steps without changing another's numbers.

Faults stay with their trial: a non-finite loss fails that trial before the backward (the others' step goes on);
out of memory undoes the step (every trial's accumulation window restarts from its first micro-batch, with its
dropout generator rewound) and sends the newest trial back to wait for room, or fails it with `TrialOOM` when it
was alone.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

from trial_worker.checkpoint import write_manifest
from trial_worker.config import REPORT_KEYS, JobConfig
from trial_worker.pack.batch import Seq, build, pack_rows, tokenize

Report = Callable[[dict, str], None]
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "sweep_trial_state.json"
CPU_MAX_TRIALS = 8  # on the CPU nothing measures memory: a plain cap on trials per pack
GPU_MICRO_TOKENS = 8192  # a trial's rows per pack step on a GPU, in max_seq_length-token rows
EVAL_TOKENS = 16384  # validation sequences per evaluation forward


def pack_key(job: JobConfig) -> str:
    """What trials must share to train in one pack: the base model (not LoRA), data, precision."""
    model = job.model.model_dump(mode="json")
    model.pop("lora")
    t = job.training
    return json.dumps({"model": model, "data": job.data.model_dump(mode="json"), "bf16": t.bf16, "fp16": t.fp16,
                       "use_cpu": t.use_cpu}, sort_keys=True)


class PackedTrial:
    """One trial in a pack: its adapter slot, optimizer, schedule, data position, counters and reports."""

    def __init__(self, engine: "PackEngine", trial_id: str, job: JobConfig, slot: int, report: Report,
                 output_dir: Path, started_at: Optional[float] = None):
        from trial_worker.formats import rung_steps

        self.engine, self.id, self.job, self.slot, self.report = engine, trial_id, job, slot, report
        self.output_dir = output_dir
        self.rung_steps = rung_steps(job)
        self.step = 0
        self.epoch, self.pos = 0, 0
        self.order: Optional[list[int]] = None
        # set by `PackEngine.add`: the trial's adapter parameters by name, its optimizer and LR scheduler
        self.named_params: Any = None
        self.params: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.start_step = 0
        self.window: Optional[list[list[Seq]]] = None  # the micro-batches of the current optimizer step
        self.micro = 0
        self.window_targets = 0
        self.loss_acc = 0.0
        self.history: list[tuple[int, float]] = []  # (step, training loss of that step)
        self.since_rung: list[float] = []
        self.last_lr = float("nan")
        self.tokens = 0.0
        self.train_s = 0.0
        self.t_start = time.perf_counter()
        self.started_at = started_at or time.time()  # when the trial started: `setup_s` counts from it
        self.setup_s: Optional[float] = None  # set at its first pack step
        self.offset = {"wall_s": 0.0, "train_s": 0.0, "tokens": 0.0}
        self.micro_rows = engine.micro_rows(job)
        self.params_ok = None  # a device flag: the adapter is finite after its last optimizer step
        self.state = "running"  # running | parked (reported a rung, waits to be told to go on) | waiting | done | failed
        self.error: Optional[BaseException] = None

    # --------------------------------------------------------------- data order
    def _next_rows(self, n: int) -> list[Seq]:
        data = self.engine.train_seqs
        out: list[Seq] = []
        while len(out) < n:
            if self.order is None or self.pos >= len(self.order):
                if self.order is not None:
                    self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order_of(self.epoch)
            out.append(data[self.order[self.pos]])
            self.pos += 1
        return out

    def start_window(self) -> None:
        rows = self._next_rows(self.job.training.effective_batch_size)  # the step's data, in the trial's own order
        m = self.micro_rows
        self.window = [rows[i:i + m] for i in range(0, len(rows), m)]
        self.window_targets = sum(s.n_targets for mb in self.window for s in mb)
        self.micro, self.loss_acc = 0, 0.0

    @property
    def dropout_seed(self) -> int:
        """The seed of this micro-batch's dropout masks: the trial's seed, step and micro-batch, nothing else."""
        return (self.job.training.seed * 1_000_003 + self.step) * 1009 + self.micro

    def rewind_window(self) -> None:
        """Undo the current optimizer step's micro-batches (after an out-of-memory pack step)."""
        for p in self.params:
            p.grad = None
        self.micro, self.loss_acc = 0, 0.0

    def check_finite(self, what: str, value: float, step: int) -> None:
        """NonFiniteLoss with the solo trial's message when `value` is NaN/inf."""
        from trial_worker.recipe import check_finite

        check_finite(self.job, what, value, step)

    # --------------------------------------------------------------- optimizer step
    def optimizer_step(self) -> None:
        import torch

        t = self.job.training
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.last_lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Checked with the next step's losses (no sync of its own): an adapter gone non-finite fails its trial
        # before its rows are mixed with anyone's.
        self.params_ok = torch.stack(torch._foreach_norm(self.params)).sum().isfinite()
        self.step += 1
        self.history.append((self.step, self.loss_acc))
        self.since_rung.append(self.loss_acc)
        self.window = None

    # --------------------------------------------------------------- checkpoints
    def save(self, directory: Path, extra: dict) -> None:
        import torch
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.named_params.items()}, str(directory / ADAPTER_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "trainer_state.pt")
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, **extra}
        (directory / STATE_FILE).write_text(json.dumps(state))
        write_manifest(directory)  # last: a checkpoint without it was cut short

    def load(self, directory: str) -> None:
        import torch
        from safetensors.torch import load_file

        saved = load_file(str(Path(directory) / ADAPTER_FILE))
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(saved[n])
        st = torch.load(Path(directory) / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.order = None if self.pos == 0 and self.epoch == 0 else self._order_of(self.epoch)  # type: ignore[assignment]
        self.offset = {k: float(state.get(k, 0.0)) for k in self.offset}
        self.last_lr = float(self.scheduler.get_last_lr()[0])

    def _order_of(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.job.training.seed + epoch)
        return torch.randperm(len(self.engine.train_seqs), generator=g).tolist()


class PackEngine:
    """The base model of a pack and the trials training on it (`add`, `remove`, `step`, `evaluate`)."""

    def __init__(self, job: JobConfig, *, output_dir: str,
                 max_trials: Optional[int] = None, gradient_checkpointing: Optional[bool] = None):
        import torch

        from trial_worker.data import load_splits
        from trial_worker.model import freeze_base, load_base, load_tokenizer, use_cpu
        from trial_worker.pack.lora import Routing, install
        from trial_worker.recipe import quiet_libraries

        quiet_libraries()
        self.key = pack_key(job)
        self.job = job
        self.cpu = use_cpu(job.training)
        if job.training.torch_threads:
            torch.set_num_threads(job.training.torch_threads)
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
        self.tokenizer = load_tokenizer(job.model)
        self.model = load_base(job.model, cpu=self.cpu)
        freeze_base(self.model)
        from trial_worker.graphs import lm_head_not_plain

        why = lm_head_not_plain(self.model)
        if why:  # the pack's loss is `graphs.per_token_nll`: hidden @ W^T and a cross-entropy, nothing more
            raise ValueError(f"packed trials cannot train {job.model.name_or_path}: {why}, which the pack's loss does "
                             "not apply; set resources.packing: off")
        self.routing = Routing()
        self.layers = install(self.model, self.routing)
        # Checkpointing is a systems choice, as in the solo worker (execution.py): a pack runs without it (the
        # fastest execution); admission by measured memory keeps the pack within the card.
        self.checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        train_rows, val_rows = load_splits(job.data, tokenizer=self.tokenizer)
        L = job.data.max_seq_length
        self.train_seqs, self.val_seqs = tokenize(train_rows, self.tokenizer, L), tokenize(val_rows, self.tokenizer, L)
        for name, before, seqs in (("train", len(train_rows), self.train_seqs), ("validation", len(val_rows), self.val_seqs)):
            if not seqs:
                raise ValueError(f"none of the {before} {name} rows has a response token within max_seq_length={L}; "
                                 "raise data.max_seq_length")
        self.val_groups = pack_rows(self.val_seqs, EVAL_TOKENS)  # validation sequences, a forward's worth each
        from trial_worker.graphs import runs_varlen

        # Padding-free batches where the varlen kernel keeps sequences apart; else one row per trial (pack.batch).
        self.flat = not self.cpu and runs_varlen(self.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.output_dir = Path(output_dir)
        self.max_trials = max_trials or (CPU_MAX_TRIALS if self.cpu else 64)
        self.trials: dict[str, PackedTrial] = {}
        self.failed: list[PackedTrial] = []  # out of the pack with an error, for the owner to collect
        self.steps = 0
        self.peak_bytes = 0.0  # peak allocated over the last pack steps, and with how many trials
        self.peak_trials = 0
        self.base_bytes = torch.cuda.memory_allocated() if not self.cpu else 0.0

    def micro_rows(self, job: JobConfig) -> int:
        """Rows of a trial per pack step: on the CPU as written; on a GPU as much of its effective batch as fits
        `GPU_MICRO_TOKENS` (a divisor of it). The loss is normalised on the whole effective batch either way, so
        the split is a systems choice that leaves the optimisation as it is (see `execution.py`)."""
        t = job.training
        if self.cpu:
            return t.per_device_train_batch_size
        cap = max(t.per_device_train_batch_size, GPU_MICRO_TOKENS // job.data.max_seq_length)
        return max(d for d in range(1, t.effective_batch_size + 1) if t.effective_batch_size % d == 0 and d <= cap)

    # --------------------------------------------------------------- membership
    def running(self) -> list[PackedTrial]:
        return [t for t in self.trials.values() if t.state == "running"]

    def fits(self) -> bool:
        """Room for one more trial: under the cap, and (GPU) the last steps' peak scaled to K+1 trials fits."""
        import torch

        from trial_worker.execution import MEMORY_SHARE

        k = sum(t.state in ("running", "parked") for t in self.trials.values())
        if k >= self.max_trials:
            return False
        if self.cpu or not self.peak_trials:
            return True
        per_trial = max(0.0, self.peak_bytes - self.base_bytes) / self.peak_trials
        total = torch.cuda.get_device_properties(self.device).total_memory
        return self.peak_bytes + per_trial * (k + 1 - self.peak_trials) <= MEMORY_SHARE * total

    def readmit(self) -> None:
        """Trials sent back to wait by an out-of-memory step go on, oldest first, while there is room."""
        for t in list(self.trials.values()):
            if t.state == "waiting" and self.fits():
                t.state = "running"

    def add(self, trial_id: str, job: JobConfig, report: Report, resume_from: Optional[str] = None,
            started_at: Optional[float] = None) -> PackedTrial:
        """Join a trial (a fresh LoRA from its seed, or its checkpoint `resume_from`); it trains from the next step.
        `started_at` (`time.time()`, default now): when the trial started, for its reports' `setup_s`."""
        import torch
        from transformers import Trainer, get_scheduler

        from trial_worker.formats import sft_config
        from trial_worker.pack import unpackable

        problems = unpackable(job.model_dump(mode="json"))
        if problems:
            field, value, why = problems[0]
            raise ValueError(f"packed trials cannot train {field}={value!r}: {why}; set resources.packing: off")
        if pack_key(job) != self.key:
            raise ValueError(f"trial {trial_id} does not share this pack's base model, data and precision")
        if trial_id in self.trials:
            raise ValueError(f"trial {trial_id} is already in this pack")
        slot = min(set(range(len(self.trials) + 1)) - {t.slot for t in self.trials.values()})
        trial = PackedTrial(self, trial_id, job, slot, report, self.output_dir / trial_id, started_at)
        lora = job.model.lora
        init = torch.Generator().manual_seed(job.training.seed)
        named = {}
        from trial_worker.pack.lora import LoRAAdapter

        for name, layer in self.layers.items():
            if lora.target_modules != "all-linear" and name.rsplit(".", 1)[-1] not in lora.target_modules:
                continue
            adapter = LoRAAdapter(layer.in_features, layer.out_features, lora.r, lora.alpha, lora.dropout, init, self.device)
            layer.adapters[str(slot)] = adapter
            named[f"{name}.lora_A"], named[f"{name}.lora_B"] = adapter.A, adapter.B
        if not named:
            raise ValueError(f"model.lora.target_modules {lora.target_modules} names none of the model's linear layers")
        trial.named_params = named
        trial.params = list(named.values())
        args = sft_config(job, str(trial.output_dir), cpu=self.cpu)
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        decay = args.weight_decay
        from trial_worker._compat import lean_bnb_step

        # bitsandbytes' own step waits for the GPU after every parameter: K trials x 224 waits a pack step.
        trial.optimizer = lean_bnb_step(opt_cls([{"params": trial.params, "weight_decay": decay}], **opt_kwargs))
        top = trial.rung_steps[-1]
        trial.scheduler = get_scheduler(args.lr_scheduler_type, trial.optimizer,
                                        num_warmup_steps=args.get_warmup_steps(top), num_training_steps=top,
                                        scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        self.trials[trial_id] = trial
        if resume_from:
            trial.load(resume_from)
        trial.start_step = trial.step
        if trial.step >= top:
            trial.state = "done"
        return trial

    def remove(self, trial_id: str) -> None:
        """Take a trial out (pruned, done, failed or gone): its adapters and optimizer state are freed at once."""
        trial = self.trials.pop(trial_id, None)
        if trial is None:
            return
        for layer in self.layers.values():
            if str(trial.slot) in layer.adapters:
                del layer.adapters[str(trial.slot)]
        trial.optimizer = trial.scheduler = trial.params = trial.named_params = None
        gc.collect()
        if not self.cpu:
            import torch

            torch.cuda.empty_cache()

    # --------------------------------------------------------------- one step
    def _losses(self, parts, seeds: Optional[dict] = None):
        """(per-part loss sums, real tokens per slot) of one forward of `parts` = [(slot, seqs)];
        `seeds` (slot -> dropout seed) in training, None in evaluation (no dropout)."""
        import torch

        from trial_worker.graphs import per_token_nll, varlen_inputs

        batch = build(parts, self.pad_id, self.device, flat=self.flat)
        self.routing.set(batch.spans, seeds, per_token=self.flat, lengths=batch.tokens)
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
        if self.flat:
            inputs = varlen_inputs({**inputs, "cu_seq_lens_q": batch.cu_seq_lens, "cu_seq_lens_k": batch.cu_seq_lens,
                                    "max_length_q": batch.max_length, "max_length_k": batch.max_length}, self.model)
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        # Every position through the LM head in chunks, no boolean indexing: no host sync mid-step.
        nll = per_token_nll(hidden.reshape(-1, hidden.shape[-1]), self.model.get_output_embeddings().weight,
                            batch.targets.reshape(-1))
        sums = torch.zeros(len(parts), dtype=torch.float32, device=self.device).index_add(0, batch.owner, nll)
        return sums, batch.tokens

    def step(self) -> bool:
        """One pack step over every running trial; False when none is running."""
        import torch

        trials = self.running()
        if not trials:
            return False
        t0 = time.perf_counter()
        for t in trials:
            if t.setup_s is None:
                t.setup_s = time.time() - t.started_at
            if t.window is None:
                t.start_window()
        windows = [t.window for t in trials if t.window is not None]
        try:
            sums, tokens = self._losses([(t.slot, w[t.micro]) for t, w in zip(trials, windows)],
                                        {t.slot: t.dropout_seed for t in trials})
            losses = sums / torch.tensor([float(t.window_targets) for t in trials], device=self.device)
            ready = torch.stack([torch.ones((), dtype=torch.bool, device=self.device) if t.params_ok is None
                                 else t.params_ok for t in trials])
            flat = torch.cat([losses.detach(), ready.float()]).tolist()  # the step's one host sync
            values, finite = flat[:len(trials)], flat[len(trials):]
            bad = [i for i in range(len(trials)) if not (math.isfinite(values[i]) and finite[i])]
            if not bad:
                losses.sum().backward()
        except torch.OutOfMemoryError as e:
            sums = losses = None
            self._out_of_memory(trials, e)
            return True
        finally:
            self.routing.set([], None)
        if bad:
            # A non-finite loss or adapter: the step is dropped for everyone before any backward (activations
            # that overflowed would meet zero gradients, 0 x inf, in the shared matmuls); the trials that went
            # bad fail, and the others redo the same micro-batch next step, with the same numbers.
            for i in bad:
                t = trials[i]
                what, v = ("train loss", values[i]) if finite[i] else ("adapter weights", float("nan"))
                self._fail(t, functools.partial(t.check_finite, what, v, t.step + 1))
            return True
        if not self.cpu:
            self.peak_bytes, self.peak_trials = torch.cuda.max_memory_allocated(self.device), len(trials)
            torch.cuda.reset_peak_memory_stats(self.device)
        dt = time.perf_counter() - t0
        self.steps += 1
        for i, (t, w) in enumerate(zip(trials, windows)):
            t.loss_acc += values[i]
            t.micro += 1
            t.tokens += tokens[t.slot]
            t.train_s += dt
            if t.micro == len(w):
                t.optimizer_step()
                if t.step in t.rung_steps:
                    self._fail(t, functools.partial(self._rung, t))
        return True

    def _fail(self, trial: PackedTrial, action: Callable[[], None]) -> None:
        """Run `action`; an exception fails that trial only (it leaves the pack, the error kept for its owner)."""
        try:
            action()
        except Exception as e:  # noqa: BLE001 - any failure of one trial's work is that trial's
            trial.state, trial.error = "failed", e
            self.failed.append(trial)
            self.remove(trial.id)

    def _out_of_memory(self, trials: list[PackedTrial], error: BaseException) -> None:
        import torch

        from trial_worker.execution import memory_figures, peak_memory_gb
        from trial_worker.recipe import TrialOOM

        peak = peak_memory_gb()
        for t in trials:
            t.rewind_window()
        gc.collect()
        torch.cuda.empty_cache()
        newest = trials[-1]
        if len(trials) == 1:
            newest.state = "failed"
            newest.error = TrialOOM(f"oom: out of memory alone in its pack (micro-batch "
                                    f"{newest.micro_rows}); {memory_figures(peak)}; "
                                    f"last error: {str(error).strip().splitlines()[0][:300] if str(error).strip() else 'out of memory'}")
            self.failed.append(newest)
            self.remove(newest.id)
        else:
            self.max_trials = len(trials) - 1  # what fits, learnt the hard way
            newest.state = "waiting"

    def _rung(self, t: PackedTrial) -> None:
        val = self.evaluate(t.slot)
        step = t.step
        train_loss = sum(t.since_rung) / len(t.since_rung) if t.since_rung else float("nan")
        t.check_finite("validation loss", val["val_loss"], step)
        t.check_finite("train loss", train_loss, step)
        t.since_rung = []
        eff = t.job.training.effective_batch_size
        train_s = t.offset["train_s"] + t.train_s
        tokens = t.offset["tokens"] + t.tokens
        wall_s = t.offset["wall_s"] + time.perf_counter() - t.t_start
        from trial_worker.execution import peak_memory_gb

        metrics = {
            "steps": step, "samples": step * eff,
            "rung": max(i for i, s in enumerate(t.rung_steps) if s == step),
            "val_loss": val["val_loss"], "ppl": val["ppl"], "train_loss": train_loss, "scheduled_lr": t.last_lr,
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "samples_per_s": (step - t.start_step) * eff / t.train_s if t.train_s > 0 else 0.0,
            "peak_mem_gb": peak_memory_gb(), "wall_s": wall_s, "train_s": train_s,
            "setup_s": t.setup_s or 0.0,
            "micro_batch": t.micro_rows,
            "accumulation": eff // t.micro_rows,
            "gradient_checkpointing": self.checkpointing,
        }
        assert set(metrics) == set(REPORT_KEYS)
        directory = t.output_dir / f"checkpoint-{step}"
        t.save(directory, {"wall_s": wall_s, "train_s": train_s, "tokens": tokens, "val_tokens": val["tokens"]})
        t.state = "done" if step >= t.rung_steps[-1] else "parked"
        t.report(dict(metrics), str(directory))

    # --------------------------------------------------------------- evaluation
    def evaluate(self, slot: Optional[int]) -> dict[str, float]:
        """{"val_loss", "ppl", "tokens"}: token-mean loss over the validation split with `slot`'s adapter (None: the base)."""
        import torch

        total, n = torch.zeros((), dtype=torch.float64, device=self.device), 0
        with torch.no_grad():
            for seqs in self.val_groups:
                sums, _ = self._losses([(slot, seqs)])
                total += sums.double().sum()
                n += sum(s.n_targets for s in seqs)
        total = float(total)  # one sync for the whole split
        self.routing.set([], None)
        val = total / n
        return {"val_loss": val, "ppl": math.exp(min(val, 700.0)), "tokens": n}
