"""Private corners of Ray, TRL, transformers, bitsandbytes and torch that the worker relies on, each named once here.

`trial_worker` never imports `sweep`, so these live apart from `sweep/_compat/`. Covered by
`tests/compat/test_compat.py` for the versions `pyproject.toml` allows (ray <2.61, trl <1.17).
"""

from __future__ import annotations

from typing import Any, Optional


def storage_checkpoint() -> dict:
    """{"path", "local"} of the checkpoint Tune is copying into the run's storage, from Ray Train's private
    session (`ray.train._internal.session.get_storage`): Tune numbers a checkpoint before the copy, and only
    the session knows which one a failed `tune.report` was writing. Raises outside a Tune session."""
    import pyarrow.fs
    from ray.train._internal.session import get_storage

    storage = get_storage()
    return {"path": storage.checkpoint_fs_path,
            "local": isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)}


def add_logged_tokens(trainer: Any, tokens: int) -> int:
    """Add `tokens` to TRL's SFTTrainer count of trained tokens (its private `_total_train_tokens`) and make it
    log `num_tokens` as that count (its private `_metrics["train"]` store, which its `log` averages and
    prints): the worker counts the tokens it really trained on, not the padded batch. Returns the count."""
    trainer._total_train_tokens = getattr(trainer, "_total_train_tokens", 0) + int(tokens)
    trainer._metrics["train"]["num_tokens"] = [int(trainer._total_train_tokens)]
    return trainer._total_train_tokens


def fused_head_nll(model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
    """The training loss through TRL's fused LM head (softcap, scale, bias and a trained head handled, no logits
    materialised): the sum of per-token NLL over `num_items_in_batch` (default: the batch's label tokens), as
    TRL's own `SFTTrainer.compute_loss` takes it. `trl.trainer.add_fused_lm_head` and its `FusedCausalLMOutput`
    (`log_probs`, `label_mask`) are exported and documented in their docstrings, but that `SFTTrainer.__init__`
    puts the head on the model it trains (so `fused_lm_head=True` works on ours) is its own undocumented choice."""
    import torch

    outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
    n = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    return -outputs.log_probs.sum() / torch.as_tensor(n).clamp(min=1)


def import_bitsandbytes() -> Any:
    """`import bitsandbytes`, without importing torch's compiler backend for it.

    bitsandbytes (0.45-0.50) wraps its CPU ops in `torch.compile` at import time (`backends.default.ops`); the
    call itself compiles nothing, but it imports Inductor (`torch._inductor.compile_fx` and some 160 modules more):
    a pack engine's build took 3.9 s with it, 1.8 s without, on a 2-core CPU (tiny model, 2026-12-07), in every
    pack and trial process, for ops a CUDA run never calls. During the import each `torch.compile(fn, ...)` is answered by a wrapper that makes the
    same call the first time `fn` runs, so what runs, and when it compiles, is unchanged."""
    import sys

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import functools

    import torch

    real = torch.compile

    def deferred(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(...)
            return lambda f: deferred(f, **kwargs)
        compiled: list = []

        @functools.wraps(fn)
        def run(*args, **kw):
            if not compiled:
                compiled.append(real(fn, **kwargs))
            return compiled[0](*args, **kw)

        return run

    torch.compile = deferred  # type: ignore[assignment]
    try:
        import bitsandbytes
    finally:
        torch.compile = real  # type: ignore[assignment]
    return bitsandbytes


def apply_liger(model: Any) -> bool:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on the loaded `model`, as transformers' Trainer applies them
    for `use_liger_kernel` (liger_kernel's private `_apply_liger_kernel_to_instance`), without Liger's loss (the
    caller computes its own). False where Liger has no kernels for the model's type (nothing is changed then)."""
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as e:
        raise ImportError(f"training.use_liger_kernel is true, but Liger Kernel does not import here ({e}): install it "
                          "(pip install 'sweep[gpu]', or liger-kernel), or set training.use_liger_kernel: false") from None

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    monkey_patch._apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                                 cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def attn_implementation(config: Any) -> Optional[str]:
    """The attention a transformers model config runs (`PretrainedConfig._attn_implementation`, set by
    `from_pretrained(attn_implementation=...)`); None for an object without one."""
    return getattr(config, "_attn_implementation", None)


def function_trainable(fn: Any) -> Any:
    """Ray Tune's Trainable class for a function trainable (`ray.tune.trainable.wrap_function`, what `tune.Tuner`
    does to a function): the sweep subclasses it to restore past a checkpoint folder that is gone."""
    from ray.tune.trainable import wrap_function

    return wrap_function(fn)


_LEAN_BNB: dict = {}


def lean_bnb_step(optimizer: Any) -> Any:
    """`optimizer`, if a non-paged bitsandbytes optimizer, made to step without waiting for the GPU.

    bitsandbytes' `Optimizer8bit.step` (0.4x-0.50) calls `torch.cuda.synchronize()` after every
    parameter's update (`sync_gpu`): 224 waits a step for Llama-3.2-1B's LoRA adapters, which
    serialise the host with the GPU and undo what CUDA graphs gain. The syncs are needed for
    paged state only (bitsandbytes keeps them there); without paging the kernels are ordered on
    the stream like any other. The step below is bitsandbytes' own loop (same state, same
    kernels, same order) minus the per-parameter sync; its class is swapped in on the instance,
    so checkpoints and `state_dict` are unchanged."""
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if not isinstance(optimizer, Optimizer8bit) or getattr(optimizer, "is_paged", True):
        return optimizer
    cls = type(optimizer)
    if cls not in _LEAN_BNB:
        _LEAN_BNB[cls] = type(f"Lean{cls.__name__}", (cls,), {"step": _bnb_step_without_sync})
    optimizer.__class__ = _LEAN_BNB[cls]
    return optimizer


def _bnb_step_without_sync(self, closure=None):
    import torch

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
    return loss


# ---------------------------------------------------------------- torch's private multi-tensor and grouped ops


def foreach_norm(tensors: Any) -> Any:
    """The 2-norm of each tensor, in one launch per dtype/device group (`torch._foreach_norm`, what
    `clip_grad_norm_` uses): the pack's finite-adapter check after every optimizer step without a loop."""
    import torch

    return torch._foreach_norm(tensors)


def foreach_mul(tensors: Any, scalar: Any) -> Any:
    """Each tensor times `scalar` (a number or a 0-d tensor), in one launch (`torch._foreach_mul`)."""
    import torch

    return torch._foreach_mul(tensors, scalar)


def foreach_copy(dst: Any, src: Any) -> None:
    """Copy each of `src` into each of `dst` (casting to its dtype), in one multi-tensor call (`torch._foreach_copy_`):
    the grouped LoRA gathers every trial's adapter of a layer with it."""
    import torch

    torch._foreach_copy_(dst, src)


def foreach_add(dst: Any, src: Any) -> None:
    """Add each of `src` to each of `dst` in place, in one multi-tensor call (`torch._foreach_add_`): the grouped LoRA
    spreads a layer's gathered gradient onto every trial's with it."""
    import torch

    torch._foreach_add_(dst, src)


def has_grouped_mm() -> bool:
    """Whether this torch has `torch._grouped_mm` (2.8+)."""
    import torch

    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: Any, w: Any, offsets: Any) -> Any:
    """Row group g of `x` [tokens, k] (rows offsets[g-1]:offsets[g], int32 ends) times `w[g]` [k, n]
    (`torch._grouped_mm`, the kernel MoE layers use; torch 2.13 also names it `nn.functional.grouped_mm`)."""
    import torch

    return torch._grouped_mm(x, w, offsets)
