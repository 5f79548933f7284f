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

How a step is sized (a systems choice, as the solo worker's micro-batch: the loss is normalised on the whole
effective batch however it is split): on the CPU each trial's micro-batch is as written; on a GPU a pack step
carries up to `step_tokens` tokens, a budget set from the measured activation bytes per token and the card's
free memory, shared by the running trials (each gets what is left of its effective batch, up to an even share
of the rest) and re-split every step as trials join and leave. A trial alone in the pack runs its whole
effective batch in one forward when it fits.

Nothing serial on the hot path: a trial that reaches a rung is evaluated a validation group per pack step,
batched with the others being evaluated, while the rest train; its checkpoint is written by a writer thread,
and its rung is reported (and so recorded) only once the checkpoint is on disk.

Faults stay with their trial: a non-finite loss fails that trial before the backward (the others' step goes on);
out of memory undoes the step (every trial's accumulation window restarts from its first micro-batch, with its
dropout generator rewound), shrinks the step's token budget while it is above one row per trial, then sends the
newest trial back to wait for room, and fails a trial with `TrialOOM` only when one row of it alone does not fit.
"""

from __future__ import annotations

import functools
import gc
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

from trial_worker._compat import foreach_norm
from trial_worker.checkpoint import write_manifest
from trial_worker.config import JobConfig, targeted
from trial_worker.lifecycle import check_finite, checkpoint_dir, counters, read_state, rung_report, write_state
from trial_worker.marks import enabled as marking, mark
from trial_worker.pack.batch import IGNORE_INDEX, Seq, build, pack_rows

Report = Callable[[dict, str], None]
ADAPTER_FILE = "adapter.safetensors"
CPU_MAX_TRIALS = 8  # on the CPU nothing measures memory: a plain cap on trials per pack
FIRST_STEP_TOKENS = 16384  # a GPU pack step's token budget until a step has measured the bytes per token
MAX_STEP_TOKENS = 131072  # beyond this a bigger step gains nothing (the matmuls are saturated long before)
EVAL_TOKENS = 16384  # validation sequences per evaluation group (one trial's share of an evaluation forward)
EVAL_GROUPS = 4  # evaluation groups (of several trials) per evaluation forward
WARM_UP_ID = "pack-warm-up"  # the throwaway trial of `PackEngine._warm_up`


# Optimizers whose update of a tensor depends on the whole tensor, not element by element: Adafactor factors a
# matrix's second moment into row and column means and scales each tensor's update by its own RMS. They step each
# adapter matrix, as the solo worker's (PEFT's lora_A / lora_B), not the trial's one flat tensor: on the flat
# tensor Adafactor trained the pack's trials 17% of what they learnt away from their own processes (CPU, tiny
# Llama, benchmarks/pack_parity.py --tiny --optim adafactor, 2026-12-07); per matrix, as far as the others.
PER_TENSOR_OPTIMIZERS = frozenset({"adafactor"})
# bitsandbytes' 8-bit optimizers quantize a tensor's state in blocks of 256 elements and keep a tensor of fewer than
# 4,096 elements in 32 bits (`min_8bit_size`): the trial's flat tensor is theirs only where every adapter matrix is
# whole blocks and 8-bit (the 1B shape at r >= 2); else they too step each matrix (the tiny Llama: 7.5e-6 apart
# on the flat tensor, CPU, 2026-12-07).
BNB_8BIT_OPTIMIZERS = frozenset({"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit"})
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


def steps_per_tensor(optim: str, sizes: list[int]) -> bool:
    """Whether `optim` must step each adapter matrix (of `sizes` elements) to step as on the trial's own."""
    return optim in PER_TENSOR_OPTIMIZERS or (optim in BNB_8BIT_OPTIMIZERS
                                              and any(n < BNB_MIN_8BIT or n % BNB_BLOCK for n in sizes))


def pack_key(job: JobConfig) -> str:
    """What trials must share to train in one pack: the base model (not LoRA) and precision. Their data may
    differ (a search over `max_seq_length`): each trial trains and is scored on its own (`data_key`, `PackData`)."""
    model = job.model.model_dump(mode="json")
    model.pop("lora")
    t = job.training
    return json.dumps({"model": model, "bf16": t.bf16, "fp16": t.fp16, "use_cpu": t.use_cpu,
                       "use_liger_kernel": t.use_liger_kernel}, sort_keys=True)


def data_key(job: JobConfig) -> str:
    """Which of a pack's datasets a trial trains on: its whole `data` section."""
    return json.dumps(job.data.model_dump(mode="json"), sort_keys=True)


class PackData:
    """One dataset of a pack, as `pack.data.tokenized` makes it for a job's `data` section: the train and
    validation sequences, the validation split in groups of a forward's worth, and the longest train row."""

    def __init__(self, train: list[Seq], val: list[Seq]):
        self.train, self.val = train, val
        self.val_groups = pack_rows(val, EVAL_TOKENS)
        self.longest = max(len(q.ids) for q in train)  # a step gives every trial at least one row


class PackedTrial:
    """One trial in a pack: its adapter slot, optimizer, schedule, data position, counters and reports."""

    def __init__(self, engine: "PackEngine", trial_id: str, job: JobConfig, slot: int, report: Report,
                 output_dir: Path, started_at: Optional[float] = None):
        from trial_worker.formats import rung_steps

        self.engine, self.id, self.job, self.slot, self.report = engine, trial_id, job, slot, report
        self.data = engine.data_for(job)  # the rows it trains and is scored on
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
        self.window: Optional[list[Seq]] = None  # the rows of the current optimizer step (its effective batch)
        self.cursor = 0  # rows of the window already trained
        self.micro = 0  # micro-batches of the window already trained
        self.chunk: list[Seq] = []  # this pack step's micro-batch
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
        self.micro_rows = job.training.per_device_train_batch_size  # of the last micro-batch (reports)
        self.accumulation = job.training.gradient_accumulation_steps  # micro-batches of the last window (reports)
        self.params_ok = None  # a device flag: the adapter is finite after its last optimizer step
        # running | evaluating (a rung) | saving (its rung checkpoint) | parked (reported a rung, waits to be told
        # to go on) | waiting (for room) | done | failed
        self.state = "running"
        self.error: Optional[BaseException] = None

    # --------------------------------------------------------------- data order
    def _next_rows(self, n: int) -> list[Seq]:
        """The next `n` rows of the trial's order, fewer where its epoch ends first: as the Trainer steps, an
        optimizer step never spans two epochs (the last of an epoch takes what is left of it, `Trainer`'s
        `remainder` micro-batches, the last of them partial), then the next epoch's order starts."""
        data = self.data.train
        if self.order is None or self.pos >= len(self.order):
            if self.order is not None:
                self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._order_of(self.epoch)
        out = [data[i] for i in self.order[self.pos:self.pos + n]]
        self.pos += len(out)
        return out

    def start_window(self) -> None:
        self.window = self._next_rows(self.job.training.effective_batch_size)  # the step's data, in its own order
        self.window_targets = sum(s.n_targets for s in self.window)
        self.cursor, self.micro, self.loss_acc = 0, 0, 0.0

    def tokens_left(self) -> int:
        """Tokens of the current window not trained yet."""
        return sum(len(s.ids) for s in self.window[self.cursor:]) if self.window is not None else 0

    def take(self, budget: Optional[int]) -> list[Seq]:
        """This step's micro-batch: the window's next rows, as written (`budget` None: the CPU) or as many as
        fit `budget` tokens (at least one row)."""
        assert self.window is not None
        if budget is None:
            n = self.job.training.per_device_train_batch_size
        else:
            n, used = 0, 0
            for s in self.window[self.cursor:]:
                if n and used + len(s.ids) > budget:
                    break
                n, used = n + 1, used + len(s.ids)
        self.chunk = self.window[self.cursor:self.cursor + n]
        return self.chunk

    @property
    def dropout_seed(self) -> int:
        """The seed of this micro-batch's dropout masks: the trial's seed, step and micro-batch, nothing else."""
        return (self.job.training.seed * 1_000_003 + self.step) * 1009 + self.micro

    def rewind_window(self) -> None:
        """Undo the current optimizer step's micro-batches (after an out-of-memory pack step)."""
        for p in self.params:
            p.grad.zero_()  # in place: the adapters' gradients are views of it
        self.cursor, self.micro, self.loss_acc = 0, 0, 0.0

    def check_finite(self, what: str, value: float, step: int) -> None:
        """NonFiniteLoss with the solo trial's message when `value` is NaN/inf."""
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
        # Zeroed in place, never None: the adapters' gradients are views of it (`lora.new_adapters`).
        self.optimizer.zero_grad(set_to_none=False)
        # Checked with the next step's losses (no sync of its own): an adapter gone non-finite fails its trial
        # before its rows are mixed with anyone's.
        self.params_ok = torch.stack(foreach_norm(self.params)).sum().isfinite()
        self.step += 1
        self.history.append((self.step, self.loss_acc))
        self.since_rung.append(self.loss_acc)
        self.window = None

    # --------------------------------------------------------------- checkpoints
    def save(self, directory: Path, extra: dict) -> Callable[[], None]:
        """The checkpoint write of the trial as it is now, to run on the writer thread: it holds the trial's
        tensors, which do not change while the trial waits for its report (evaluated, saving, then parked)."""
        named, optimizer, scheduler = dict(self.named_params), self.optimizer, self.scheduler
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, **extra}

        def write() -> None:
            import torch
            from safetensors.torch import save_file

            directory.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, str(directory / ADAPTER_FILE))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       directory / "trainer_state.pt")
            write_state(directory, state)
            write_manifest(directory)  # last: a checkpoint without it was cut short

        return write

    def load(self, directory: str) -> None:
        import torch
        from safetensors.torch import load_file

        saved = load_file(str(Path(directory) / ADAPTER_FILE))
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(saved[n])
        st = torch.load(Path(directory) / "trainer_state.pt", map_location="cpu", weights_only=False)
        held = [len(g["params"]) for g in st["optimizer"]["param_groups"]]
        if held != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise ValueError(f"checkpoint {directory} holds optimizer state for {sum(held)} tensors; this pack keeps one "
                             "flat tensor per trial: it was written by an earlier version of sweep's pack, which "
                             "this one cannot continue (resume the study with that version, or start the trial anew)")
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        state = read_state(directory)
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.order = None if self.pos == 0 and self.epoch == 0 else self._order_of(self.epoch)  # type: ignore[assignment]
        self.offset = counters(state)
        self.last_lr = float(self.scheduler.get_last_lr()[0])

    def _order_of(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.job.training.seed + epoch)
        return torch.randperm(len(self.data.train), generator=g).tolist()


class Evaluation:
    """One evaluation of `slot`'s adapter (None: the untrained base) on the validation split, run a validation
    group per pack step, batched with the others in progress, while the trials train: a trial's rung (`owner`
    is that trial), or one asked for (the base's, for the controller). `done(metrics, error)` once at its end."""

    def __init__(self, slot: Optional[int], done: Callable[[Optional[dict], Optional[BaseException]], None],
                 groups: list, owner: Optional[PackedTrial] = None):
        self.slot, self.done, self.owner = slot, done, owner
        self.groups = groups  # the validation split it scores, in groups (`PackData.val_groups`)
        self.pos = 0  # validation groups done
        self.total: Any = None  # the loss sum so far, on the device
        self.n = 0  # target tokens so far


class PackEngine:
    """The base model of a pack and the trials training on it (`add`, `remove`, `step`, `evaluate`)."""

    def __init__(self, job: JobConfig, *, output_dir: str, max_trials: Optional[int] = None,
                 gradient_checkpointing: Optional[bool] = None, data_process: Optional[bool] = None,
                 warm_up: Optional[bool] = None):
        from trial_worker.model import use_cpu
        from trial_worker.pack.data import start

        self.cpu = use_cpu(job.training)
        # The data (tokenizer, rows, chat template, tokens) is made beside the imports, CUDA's start and the
        # base's load: in a process of its own on a GPU (`data_process`, default: not on the CPU; pack.data).
        self.data_process = not self.cpu if data_process is None else data_process
        data = start(job, own_process=self.data_process)
        from trial_worker.formats import liger_wanted

        warm = not self.cpu if warm_up is None else warm_up
        # Liger's Triton kernels, compiled beside the imports and the load for the warm-up to find (`pack.kernels`)
        warmer = None
        if warm and not self.cpu and liger_wanted(job, cpu=False):
            from trial_worker.pack.kernels import start as start_kernels

            warmer = start_kernels(job)
        import torch

        from trial_worker._compat import apply_liger
        from trial_worker.model import freeze_base, load_base
        from trial_worker.pack.lora import Routing, install
        from trial_worker.recipe import quiet_libraries

        quiet_libraries()
        mark("engine: imports")
        self.key = pack_key(job)
        self.job = job
        if job.training.torch_threads:
            torch.set_num_threads(job.training.torch_threads)
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
        mark("engine: device ready")
        self.model = load_base(job.model, cpu=self.cpu)
        mark("engine: base model read")
        freeze_base(self.model)
        # Liger's fused RMSNorm, RoPE and SwiGLU, as the solo worker runs them (TRL's `use_liger_kernel`): on a GPU
        # where installed, unless the job says no. The pack's loss is its own (`graphs.per_token_nll`).
        self.liger = liger_wanted(job, cpu=self.cpu) and apply_liger(self.model)
        mark("engine: base model loaded")
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
        from trial_worker.graphs import runs_varlen

        # Padding-free batches where the varlen kernel keeps sequences apart; else one row per trial (pack.batch).
        self.flat = not self.cpu and runs_varlen(self.model)
        self.output_dir = Path(output_dir)
        self.max_trials = max_trials or (CPU_MAX_TRIALS if self.cpu else 64)
        self.trials: dict[str, PackedTrial] = {}
        self.failed: list[PackedTrial] = []  # out of the pack with an error, for the owner to collect
        self.steps = 0
        self.base_bytes = torch.cuda.memory_allocated() if not self.cpu else 0.0
        # GPU: the step's token budget and the measured activation bytes per token it comes from
        self.step_tokens: Optional[int] = None if self.cpu else FIRST_STEP_TOKENS
        self.token_bytes: Optional[float] = None
        self.evaluating: list[Evaluation] = []  # in progress, in the order they were asked for
        self.eval_groups = EVAL_GROUPS
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-checkpoints")
        self.datasets: dict[str, PackData] = {}  # by `data_key`: the engine's job's, and its trials' others
        self.making: dict[str, Future] = {}  # datasets being made (`data_ready`), each waited for on its own thread
        self.data_waits = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pack-data-wait")
        self.saves: list[tuple[PackedTrial, Future, dict, Path]] = []  # checkpoint writes in flight
        self.warmed_up = False  # (GPU) its throwaway first step ran through (`_warm_up`)
        if warm:
            self._warm_up(job)
        if warmer is not None:  # of no more use (what it has not compiled by now, the warm-up did)
            warmer.kill()
            warmer.wait()
        self.pad_id, train, val = data()
        mark("engine: data ready")
        self.data = self.datasets[data_key(job)] = PackData(train, val)  # the job's own: the base evaluation's

    # The engine's own dataset (its job's), by the names of a pack with one.
    @property
    def train_seqs(self) -> list[Seq]:
        return self.data.train

    @property
    def val_seqs(self) -> list[Seq]:
        return self.data.val

    @property
    def val_groups(self) -> list:
        return self.data.val_groups

    @val_groups.setter
    def val_groups(self, groups: list) -> None:
        self.data.val_groups = groups

    @property
    def longest(self) -> int:
        """The longest train row of any of the pack's datasets: every trial gets at least one row a step."""
        return max(d.longest for d in self.datasets.values())

    def data_ready(self, job: JobConfig) -> bool:
        """Whether `job`'s dataset is made; if not, its making starts (in its own process on a GPU, as the
        engine's first), and a later call takes it once made. Raises what making it raised."""
        key = data_key(job)
        if key in self.datasets:
            return True
        if key not in self.making:
            from trial_worker.pack.data import start

            mark(f"engine: another dataset ({job.data.path}, max_seq_length {job.data.max_seq_length}) started")
            self.making[key] = self.data_waits.submit(start(job, own_process=self.data_process))
        future = self.making[key]
        if not future.done():
            return False
        del self.making[key]
        _, train, val = future.result()
        self.datasets[key] = PackData(train, val)
        mark(f"engine: another dataset ready ({len(train)} train, {len(val)} validation rows)")
        return True

    def data_for(self, job: JobConfig) -> PackData:
        """`job`'s dataset, made now if it is not yet (`data_ready` makes it beside the pack's steps)."""
        while not self.data_ready(job):
            wait([self.making[data_key(job)]])
        return self.datasets[data_key(job)]

    def _warm_up(self, job: JobConfig) -> None:
        """One throwaway training step while the data is still being made: a trial of `job`'s settings joins
        (adapters, optimizer and scheduler built, as `add` builds them), trains one synthetic row forward and
        backward, takes its optimizer step and leaves. On a GPU a step's first run loads its CUDA kernels
        (cuBLAS, bitsandbytes' 4-bit matmul and 8-bit optimizer, Liger's Triton kernels, the varlen attention, the
        grouped matmul) and `add` its imports; done here they overlap the data's making instead of holding back
        the first trial's first step. Nothing of it stays: no trial, slot, counter, memory measure or budget, and
        no random stream any trial draws from (each trial's are seeded by its own seed)."""
        import torch

        n = max(2, min(256, job.data.max_seq_length))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        ids = tuple(1 + (7 * i) % max(1, vocab - 1) for i in range(n))
        row = Seq(ids, ids[1:] + (IGNORE_INDEX,))
        self.pad_id, self.datasets[data_key(job)] = 0, PackData([row], [row])
        try:
            trial = self.add(WARM_UP_ID, job, lambda metrics, checkpoint: None)
            mark("engine: warm-up trial added")
            trial.start_window()
            sums, _ = self._losses([(trial.slot, trial.take(None))], {trial.slot: 0})
            self._mark_done("engine: warm-up forward")
            sums.sum().backward()
            self._mark_done("engine: warm-up backward")
            trial.optimizer.step()
            if not self.cpu:
                torch.cuda.synchronize(self.device)
            self.warmed_up = True
            mark("engine: warmed up")
        except Exception as e:  # noqa: BLE001 - only a head start: whatever failed here, a real step meets it again
            mark(f"engine: warm-up failed ({type(e).__name__}: {str(e)[:200]})")
        finally:
            self.routing.set([], None)
            self.remove(WARM_UP_ID)
            del self.datasets[data_key(job)]

    def _mark_done(self, event: str) -> None:
        """Mark `event` once the GPU has done the work queued so far: the benchmark's split of the warm-up (a sync
        only a marked run pays)."""
        if marking():
            if not self.cpu:
                import torch

                torch.cuda.synchronize(self.device)
            mark(event)

    # --------------------------------------------------------------- membership
    def running(self) -> list[PackedTrial]:
        return [t for t in self.trials.values() if t.state == "running"]

    def _usable_bytes(self) -> float:
        import torch

        from trial_worker.execution import MEMORY_SHARE

        return MEMORY_SHARE * torch.cuda.get_device_properties(self.device).total_memory

    def _state_bytes(self, job: JobConfig) -> float:
        """A trial's own memory, upper bound: fp32 adapter, its gradient and two fp32 optimizer moments."""
        lora = job.model.lora
        n = sum(lora.r * (layer.in_features + layer.out_features) for name, layer in self.layers.items()
                if targeted(name, lora.target_modules))
        return 16.0 * n

    def fits(self, job: Optional[JobConfig] = None) -> bool:
        """Room for one more trial (`job`): under the cap, and (GPU) its state plus one row per trial of
        activations, at the measured bytes per token, within the card's usable memory."""
        import torch

        k = sum(t.state not in ("waiting", "done", "failed") for t in self.trials.values())
        if k >= self.max_trials:
            return False
        if self.cpu or self.token_bytes is None:
            return True
        new = self._state_bytes(job) if job is not None else 0.0
        return torch.cuda.memory_allocated(self.device) + new + self.token_bytes * (k + 1) * self.longest \
            <= self._usable_bytes()

    def _budget(self) -> None:
        """The step's token budget from the measured bytes per token and what the card has left."""
        import torch

        if self.token_bytes is None:
            return
        free = self._usable_bytes() - torch.cuda.memory_allocated(self.device)
        self.step_tokens = int(max(self.longest, min(MAX_STEP_TOKENS, free / self.token_bytes)))

    def readmit(self) -> None:
        """Trials sent back to wait by an out-of-memory step go on, oldest first, while there is room."""
        for t in list(self.trials.values()):
            if t.state == "waiting" and self.fits(t.job):
                t.state = "running"

    def add(self, trial_id: str, job: JobConfig, report: Report, resume_from: Optional[str] = None,
            started_at: Optional[float] = None) -> PackedTrial:
        """Join a trial (a fresh LoRA from its seed, or its checkpoint `resume_from`); it trains from the next step.
        `started_at` (`time.time()`, default now): when the trial started, for its reports' `setup_s`.
        The job is trusted to be one a pack trains as written: the sweep's trial plan decides that, once
        (`trial_worker.pack.trials_pack`); a direct user asks it the same."""
        import torch
        from transformers import Trainer, get_scheduler

        from trial_worker.formats import sft_config

        if pack_key(job) != self.key:
            raise ValueError(f"trial {trial_id} does not share this pack's base model and precision")
        if trial_id in self.trials:
            raise ValueError(f"trial {trial_id} is already in this pack")
        slot = min(set(range(len(self.trials) + 1)) - {t.slot for t in self.trials.values()})
        trial = PackedTrial(self, trial_id, job, slot, report, self.output_dir / trial_id, started_at)
        lora = job.model.lora
        wrapped = [(name, layer) for name, layer in self.layers.items()
                    if targeted(name, lora.target_modules)]
        if not wrapped:
            has = sorted({name.rsplit(".", 1)[-1] for name in self.layers})
            raise ValueError(f"model.lora.target_modules {lora.target_modules} names none of the model's linear layers "
                             f"({', '.join(has)}); name some of them, or write all-linear")
        from trial_worker.pack.lora import new_adapters

        flat, adapters = new_adapters([(layer.in_features, layer.out_features) for _, layer in wrapped], lora.r,
                                      lora.alpha, lora.dropout, torch.Generator().manual_seed(job.training.seed),
                                      self.device, bf16_init=job.model.quantization.load_in_4bit)
        named = {}
        for (name, layer), adapter in zip(wrapped, adapters):
            layer.adapters[str(slot)] = adapter
            named[f"{name}.lora_A"], named[f"{name}.lora_B"] = adapter.A, adapter.B
        trial.named_params = named
        trial.params = [flat]  # what the optimizer steps, clips and zeroes: the adapters are views of it
        args = sft_config(job, str(trial.output_dir), cpu=self.cpu)
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        decay = args.weight_decay
        from trial_worker._compat import lean_bnb_step

        # The flat tensor where the update is elementwise; each adapter matrix where it is not (`steps_per_tensor`):
        # the pieces are views of the flat tensor and their gradients views of its gradient, so an update of a piece is
        # an update of the flat tensor, and clipping, zeroing and the finiteness check still see one tensor.
        pieces = list(named.values())
        stepped = pieces if steps_per_tensor(job.training.optim, [p.numel() for p in pieces]) else trial.params
        # bitsandbytes' own step waits for the GPU after every parameter: a wait per trial step for nothing.
        trial.optimizer = lean_bnb_step(opt_cls([{"params": stepped, "weight_decay": decay}], **opt_kwargs))
        top = trial.rung_steps[-1]
        trial.scheduler = get_scheduler(args.lr_scheduler_type, trial.optimizer,
                                        num_warmup_steps=args.get_warmup_steps(top), num_training_steps=top,
                                        scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        self.trials[trial_id] = trial
        if resume_from:
            try:
                trial.load(resume_from)
            except BaseException:
                self.remove(trial_id)  # a trial that cannot resume does not stay in the pack
                raise
        trial.start_step = trial.step
        if trial.step >= top:
            trial.state = "done"
        return trial

    def remove(self, trial_id: str) -> None:
        """Take a trial out (pruned, done, failed or gone): its adapters and optimizer state are freed at once."""
        trial = self.trials.pop(trial_id, None)
        if trial is None:
            return
        self.remove_evaluation(trial)
        for layer in self.layers.values():
            if str(trial.slot) in layer.adapters:
                del layer.adapters[str(trial.slot)]
        # Freed by their reference counts, here and now (tests/pack: no garbage-collector pass needed); their
        # memory stays in this process's CUDA cache for the next steps. A full `gc.collect()` and `empty_cache()`
        # per leaving trial had cost the pack's loop a pause each time, every other trial waiting.
        trial.optimizer = trial.scheduler = trial.params = trial.named_params = None

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
        # The LM head on the positions with a target only (listed on the host: no sync), in chunks.
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.select)
        nll = per_token_nll(hidden, self.model.get_output_embeddings().weight, batch.targets)
        sums = torch.zeros(len(parts), dtype=torch.float32, device=self.device).index_add(0, batch.owner, nll)
        return sums, batch.tokens

    def busy(self) -> bool:
        """Whether a step has anything to do: a trial training, in a rung evaluation, or a checkpoint in flight."""
        return bool(self.running() or self.evaluating or self.saves)

    def step(self) -> bool:
        """One pack step: a training forward/backward over every running trial, and one evaluation forward for
        the trials in a rung evaluation; False when there is nothing to do."""
        self._finish_saves()
        trials = self.running()
        if not (trials or self.evaluating or self.saves):
            return False
        t0 = time.perf_counter()
        evaluations = min(len(self.evaluating), self.eval_groups)
        if trials:
            self._train(trials)
        if self.evaluating:
            self._evaluate_some()
        if marking():  # the benchmark's trace of the pack: who trained, how many tokens, the step's host time
            tokens = sum(len(q.ids) for t in trials for q in t.chunk)
            mark(f"pack step k={len(trials)} tok={tokens} ev={evaluations} s={time.perf_counter() - t0:.4f}")
        if not trials and not evaluations:  # only checkpoints in flight: wait a little for one
            wait([f for _, f, _, _ in self.saves], timeout=0.05, return_when=FIRST_COMPLETED)
            self._finish_saves()
        return True

    def _shares(self, trials: list[PackedTrial]) -> list[Optional[int]]:
        """Each trial's tokens this step (None: as written, the CPU): what is left of its window, up to an even
        share of what the others leave of the budget (smallest needs first)."""
        if self.step_tokens is None:
            return [None] * len(trials)
        need = [t.tokens_left() for t in trials]
        out: list[Optional[int]] = [0] * len(trials)
        left = self.step_tokens
        order = sorted(range(len(trials)), key=lambda i: need[i])
        for n, i in enumerate(order):
            out[i] = min(need[i], left // (len(order) - n))
            left -= out[i] or 0
        return out

    def _train(self, trials: list[PackedTrial]) -> None:
        import torch

        t0 = time.perf_counter()
        for t in trials:
            if t.setup_s is None:
                t.setup_s = time.time() - t.started_at
            if t.window is None:
                t.start_window()
        chunks = [t.take(share) for t, share in zip(trials, self._shares(trials))]
        before = 0
        if not self.cpu:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            sums, tokens = self._losses([(t.slot, c) for t, c in zip(trials, chunks)],
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
            return
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
            return
        if not self.cpu:
            step_tokens = sum(tokens.values())
            measured = (torch.cuda.max_memory_allocated(self.device) - before) / max(1, step_tokens)
            # the largest seen (a step of long rows costs more per token): the budget never grows into an OOM
            self.token_bytes = max(measured, self.token_bytes or 0.0)
            self._budget()
        dt = time.perf_counter() - t0
        self.steps += 1
        if self.steps <= 3:
            mark(f"engine: training step {self.steps} done ({len(trials)} trials, {sum(tokens.values())} tokens)")
        for i, (t, c) in enumerate(zip(trials, chunks)):
            t.loss_acc += values[i]
            t.cursor += len(c)
            t.micro += 1
            t.micro_rows = len(c)
            t.tokens += tokens[t.slot]
            t.train_s += dt
            if t.cursor >= len(t.window or ()):
                t.accumulation = t.micro
                t.optimizer_step()
                if t.step in t.rung_steps:
                    t.state = "evaluating"
                    self.evaluating.append(Evaluation(t.slot, functools.partial(self._rung_evaluated, t), t.data.val_groups,
                                                      owner=t))

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
        floor = len(trials) * self.longest
        if self.step_tokens is not None and self.step_tokens > floor:
            # the step was too big: smaller steps, everyone stays (the measured cost was low for these rows)
            self.step_tokens = max(floor, int(self.step_tokens * 0.7))
            if self.token_bytes is not None:
                self.token_bytes *= 1.0 / 0.7
        elif len(trials) == 1:
            newest.state = "failed"
            newest.error = TrialOOM(f"oom: out of memory alone in its pack (micro-batch "
                                    f"{newest.micro_rows}); {memory_figures(peak)}; "
                                    f"last error: {str(error).strip().splitlines()[0][:300] if str(error).strip() else 'out of memory'}")
            self.failed.append(newest)
            self.remove(newest.id)
        else:
            self.max_trials = len(trials) - 1  # what fits, learnt the hard way
            newest.state = "waiting"

    def remove_evaluation(self, trial: PackedTrial) -> None:
        self.evaluating = [e for e in self.evaluating if e.owner is not trial]

    # --------------------------------------------------------------- rungs: evaluation, checkpoint, report
    def _evaluate_some(self) -> None:
        """One evaluation forward: the next validation group of up to `EVAL_GROUPS` trials in a rung evaluation
        (no gradients: the training step's activations are already freed); a trial whose last group is done
        goes on to its checkpoint write."""
        import torch

        now = self.evaluating[:self.eval_groups]
        parts = [(e.slot, e.groups[e.pos]) for e in now]
        try:
            with torch.no_grad():
                sums, _ = self._losses(parts)
        except torch.OutOfMemoryError as e:
            sums = None
            gc.collect()
            torch.cuda.empty_cache()
            if len(now) > 1:
                self.eval_groups = len(now) - 1  # fewer trials per evaluation forward from now on
            else:
                from trial_worker.recipe import TrialOOM

                self.evaluating.remove(now[0])
                now[0].done(None, TrialOOM(f"oom: out of memory in its evaluation alone ({EVAL_TOKENS} tokens): {e}"))
            return
        finally:
            self.routing.set([], None)
        for i, ev in enumerate(now):
            part = sums[i].double()
            ev.total = part if ev.total is None else ev.total + part
            ev.n += sum(q.n_targets for q in parts[i][1])
            ev.pos += 1
            if ev.pos == len(ev.groups):
                self.evaluating.remove(ev)
                val = float(ev.total) / ev.n  # one sync per evaluation
                ev.done({"val_loss": val, "ppl": math.exp(min(val, 700.0)), "tokens": ev.n}, None)

    def _rung_evaluated(self, t: PackedTrial, metrics: Optional[dict], error: Optional[BaseException]) -> None:
        """A trial's rung evaluation ended: on to its rung report and checkpoint, or the error fails the trial."""
        if error is not None:
            self._fail(t, functools.partial(_raise, error))
        elif metrics is not None:
            self._fail(t, functools.partial(self._rung, t, metrics))

    def _rung(self, t: PackedTrial, val: dict) -> None:
        """The rung's report; its checkpoint goes to the writer thread, and the report out once it is written."""
        step = t.step
        from trial_worker.execution import peak_memory_gb

        metrics, state = rung_report(
            t.job, step=step, rung_steps=t.rung_steps, start_step=t.start_step, val=val,
            train_loss=sum(t.since_rung) / len(t.since_rung) if t.since_rung else float("nan"),
            check_train_loss=bool(t.since_rung), last_lr=t.last_lr, offset=t.offset, train_s=t.train_s,
            tokens=t.tokens, t_start=t.t_start, setup_s=t.setup_s or 0.0, peak_mem_gb=peak_memory_gb(),
            micro_batch=t.micro_rows, accumulation=t.accumulation, gradient_checkpointing=self.checkpointing)
        t.since_rung = []
        directory = checkpoint_dir(t.output_dir, step)
        write = t.save(directory, state)
        t.state = "saving"
        self.saves.append((t, self.writer.submit(write), metrics, directory))

    def _finish_saves(self) -> None:
        """Report each rung whose checkpoint is written (durable: the manifest is its last file); a write that
        failed (a full disk) fails its trial with that error."""
        done = [s for s in self.saves if s[1].done()]
        self.saves = [s for s in self.saves if not s[1].done()]
        for t, future, metrics, directory in done:
            if t.id not in self.trials or self.trials[t.id] is not t:
                continue  # it left while its checkpoint was written

            def report(t=t, future=future, metrics=metrics, directory=directory) -> None:
                future.result()
                t.state = "done" if t.step >= t.rung_steps[-1] else "parked"
                mark(f"engine: rung reported {t.id} step {t.step}")
                t.report(dict(metrics), str(directory))

            self._fail(t, report)

    # --------------------------------------------------------------- evaluation
    def queue_evaluation(self, slot: Optional[int], done: Callable[[Optional[dict], Optional[BaseException]], None],
                         job: Optional[JobConfig] = None) -> None:
        """Evaluate `slot`'s adapter (None: the base) on the validation split of `job`'s data (default: the
        engine's job's) beside the pack's training (`Evaluation`); `done({"val_loss", "ppl", "tokens"}, None)` or
        `done(None, error)` at its end."""
        mark(f"engine: evaluation of {'the base' if slot is None else f'slot {slot}'} queued")
        groups = (self.data if job is None else self.data_for(job)).val_groups
        self.evaluating.append(Evaluation(slot, done, groups))

    def evaluate(self, slot: Optional[int], job: Optional[JobConfig] = None) -> dict[str, float]:
        """{"val_loss", "ppl", "tokens"}: token-mean loss over the validation split (of `job`'s data, default the
        engine's) with `slot`'s adapter (None: the base), now, on the caller's thread (with the pack idle: tests,
        benchmarks)."""
        box: dict = {}
        self.queue_evaluation(slot, lambda metrics, error: box.update(metrics=metrics, error=error), job)
        while not box:
            self._evaluate_some()
        if box["error"] is not None:
            raise box["error"]
        return box["metrics"]


def _raise(error: BaseException) -> None:
    raise error
