"""How a trial executes its effective batch: micro-batch size, accumulation, checkpointing.

`per_device_train_batch_size x gradient_accumulation_steps` is the effective batch, an
optimisation hyperparameter. How it runs is a systems choice: a bigger micro-batch without
gradient checkpointing is much faster when it fits. The loss is the token-mean over the
whole effective batch however it is split (the Trainer's `num_items_in_batch`), so a
config executed as 8x1 or as 2x4 trains the same model.

On a GPU the plan comes from a short probe: a forward+backward of one full-length
micro-batch for each candidate, fastest first, keeping the first whose peak memory fits
under a share of the card. Results are cached per (model, sequence length, LoRA set-up,
quantization, GPU) in `$SWEEP_HOME/execution_plans.json`, so a sweep probes once.
On the CPU the job runs as written.

The memory side of running a trial lives here too: the per-process GPU cap
(`cap_gpu_memory`), the peak-memory count (`reset_peak_memory`, `peak_memory_gb`) and the
figures an out-of-memory failure reports (`memory_figures`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from trial_worker.config import JobConfig

MEMORY_SHARE = 0.85  # of the card's memory a plan may use at its probed peak (the rest: fragmentation, eval)


@dataclass(frozen=True)
class Execution:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    source: str = "as written"  # "as written" | "probe" | "cache"

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation


class DoesNotFit(RuntimeError):
    """No execution of the effective batch fits in memory."""


def as_written(job: JobConfig) -> Execution:
    t = job.training
    return Execution(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing)


def candidates(effective_batch: int, max_micro_batch: int = 64) -> list[tuple[int, bool]]:
    """(micro_batch, checkpointing) to try, fastest first: the largest micro-batch without
    checkpointing, halving; then the same with checkpointing."""
    mbs = [d for d in range(min(effective_batch, max_micro_batch), 0, -1) if effective_batch % d == 0]
    return [(mb, False) for mb in mbs] + [(mb, True) for mb in mbs]


def choose(effective_batch: int, measure: Callable[[int, bool], Optional[float]], limit_bytes: float,
           *, max_micro_batch: int = 64) -> Execution:
    """The first candidate whose measured peak memory fits under `limit_bytes`.

    `measure(micro_batch, checkpointing)` returns the peak bytes of one training step, or
    None when it ran out of memory. Candidates after a fit are not measured.
    """
    tried = []
    for mb, ckpt in candidates(effective_batch, max_micro_batch):
        peak = measure(mb, ckpt)
        tried.append((mb, ckpt, peak))
        if peak is not None and peak <= limit_bytes:
            return Execution(mb, effective_batch // mb, ckpt, "probe")
    detail = ", ".join(f"{mb}x{'ckpt' if c else 'nockpt'}={'OOM' if p is None else f'{p / 2**30:.1f}GiB'}"
                       for mb, c, p in tried)
    raise DoesNotFit(f"no execution of effective batch {effective_batch} fits in {limit_bytes / 2**30:.1f} GiB: {detail}")


def smaller(execution: Execution) -> Optional[Execution]:
    """The OOM fallback: about half the micro-batch at the same effective batch (the largest divisor
    of it <= micro_batch // 2), accumulation grown to match; None when the micro-batch is already 1."""
    eff = execution.effective_batch
    mbs = [d for d in range(execution.micro_batch // 2, 0, -1) if eff % d == 0]
    if not mbs:
        return None
    return Execution(mbs[0], eff // mbs[0], execution.gradient_checkpointing, "oom retry")


def cache_key(job: JobConfig, device_name: str, total_bytes: int, extra: Iterable[str] = ()) -> str:
    m, d = job.model, job.data
    parts = [m.name_or_path, m.revision or "", str(d.max_seq_length), str(d.packing), json.dumps(m.lora.model_dump(), sort_keys=True),
             json.dumps(m.quantization.model_dump(), sort_keys=True), str(m.attn_implementation), device_name, str(total_bytes),
             str(job.training.effective_batch_size), *extra]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _cache_path() -> Path:
    from trial_worker.config import sweep_home

    return sweep_home() / "execution_plans.json"


def cached(key: str) -> Optional[Execution]:
    try:
        data = json.loads(_cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return Execution(**{**data, "source": "cache"}) if data else None


def remember(key: str, plan: Execution) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(plan)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs a probe next time


def probe_gpu(model, job: JobConfig, *, vocab_size: int, limit_share: float = MEMORY_SHARE) -> Execution:
    """Probe the loaded PEFT model on the current GPU (see `choose`); cached."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    share = job.training.gpu_memory_fraction or 1.0  # a trial capped at a share of the GPU plans within it
    key = cache_key(job, props.name, props.total_memory, extra=[f"cap={share:g}"] if share < 1 else [])
    hit = cached(key)
    if hit is not None:
        return hit
    seq = job.data.max_seq_length
    dtype = torch.bfloat16 if job.training.bf16 else (torch.float16 if job.training.fp16 else None)

    def measure(mb: int, ckpt: bool) -> Optional[float]:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab_size, (mb, seq), device="cuda")
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        except torch.OutOfMemoryError:
            return None
        finally:
            out = None
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    plan = choose(job.training.effective_batch_size, measure, limit_share * share * props.total_memory)
    remember(key, plan)
    return plan


# ---------------------------------------------------------------- memory

def reset_peak_memory() -> None:
    """Start this trial's peak-memory count afresh (Tune reuses worker processes across trials)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


_gpu_cap: Optional[float] = None  # the fraction this process's CUDA allocator is capped at (None: no cap)


def cap_gpu_memory(fraction: Optional[float], *, cpu: bool) -> None:
    """Cap this process's CUDA caching allocator at `fraction` of the GPU's memory (None: lift any cap).

    `training.gpu_memory_fraction`, by default the GPU share Ray gave the trial when trials share a GPU:
    a trial going over its share then gets a real `torch.OutOfMemoryError` (and `run`'s smaller
    micro-batch) instead of taking the memory of the trials beside it. The cap
    (`torch.cuda.set_per_process_memory_fraction`: total memory x fraction) is per process and stays
    set, so each trial sets its own (Tune reuses worker processes). It bounds what PyTorch's allocator
    reserves, not the CUDA context or memory allocated outside PyTorch.
    """
    global _gpu_cap
    import torch

    if cpu or not torch.cuda.is_available() or (fraction is None and _gpu_cap is None):
        return
    torch.cuda.set_per_process_memory_fraction(1.0 if fraction is None else fraction)
    _gpu_cap = fraction


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this trial, or the process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30  # Linux reports KiB, macOS bytes


def memory_figures(peak_gb: float) -> str:
    """Peak of the failed attempt, and the accelerator's state once its memory was freed."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        cap = "" if _gpu_cap is None else (f"; this trial capped at {_gpu_cap:g} of the GPU = {_gpu_cap * total / 2**30:.2f} GiB "
                                           "(training.gpu_memory_fraction)")
        return (f"peak {peak_gb:.2f} GiB allocated; after freeing: {torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved, "
                f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB on {torch.cuda.get_device_name()}{cap}")
    return f"peak {peak_gb:.2f} GiB process RSS (CPU)"
