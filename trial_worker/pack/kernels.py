"""Liger's Triton kernels compiled in a process of their own while the pack imports and loads its base.

On a fresh machine the pack's warm-up step (`engine.PackEngine._warm_up`) compiles Liger's RMSNorm, RoPE and
SwiGLU kernels, forward and backward, when it first runs them, after the imports and the 4-bit load: its first
forward took 4.3 s and its backward 1.5 s against 1.3 s and 0.16 s with Triton's cache warm (H100, 2026-12-07,
`benchmarks/results/pack_startup.json`), all of it on the critical path to the first training step. Triton keeps
what it compiles in its cache (`~/.triton/cache`, or `TRITON_CACHE_DIR`), keyed by the kernel's source, its
arguments' types and specialisations and the GPU: `start` runs the same kernels, on tensors of the model's sizes
and dtype, in a light process (torch and Liger's modules: transformers' package, none of its models, no 4-bit
load) started beside the pack's data process, so that the warm-up finds them compiled. A GPU test
(`tests/pack/test_kernels.py`, passed on an H100 on 2026-12-07) checks that a Liger-patched model then compiles
nothing more. It is only a head start: a kernel it did not meet exactly (another
Liger version's arguments, a model whose Liger patch differs) is compiled by the warm-up as before.

Model types whose Liger patch is Llama's (RMSNorm with offset 0 and Llama's casting, the shared RoPE, SwiGLU with
SiLU) only; others get no head start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from trial_worker.config import JobConfig

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})
TOKENS = 256  # a flat pack batch is a multiple of 64 tokens (`batch.FLAT_ALIGN`): the same integer specialisations


def shape_of(job: JobConfig) -> Optional[dict]:
    """The sizes the kernels are compiled for, read from a local model folder's config.json; None where the model
    is not local, not Llama-like, or the file lacks a size."""
    path = Path(job.model.name_or_path) / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if c.get("model_type") not in LLAMA_LIKE or c.get("hidden_act", "silu") not in ("silu", "swish"):
        return None
    try:
        heads = int(c["num_attention_heads"])
        return {"hidden": int(c["hidden_size"]), "intermediate": int(c["intermediate_size"]), "heads": heads,
                "kv_heads": int(c.get("num_key_value_heads") or heads),
                "head_dim": int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                "eps": float(c.get("rms_norm_eps", 1e-6)), "dtype": job.model.quantization.bnb_4bit_compute_dtype}
    except (KeyError, TypeError, ValueError):
        return None


def start(job: JobConfig) -> Optional[subprocess.Popen]:
    """Start compiling the job's Liger kernels in a process of their own (on the GPU this process sees); None where
    there is nothing to compile ahead (`shape_of`) or `SWEEP_KERNEL_WARMER=0`."""
    from trial_worker.attempt import child_env

    if os.environ.get("SWEEP_KERNEL_WARMER", "1") == "0":
        return None
    shape = shape_of(job)
    if shape is None:
        return None
    return subprocess.Popen([sys.executable, "-m", "trial_worker.pack.kernels", json.dumps(shape), str(os.getpid())],
                            env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def compile_kernels(shape: dict) -> None:
    """Run Liger's RMSNorm, RoPE and SwiGLU forward and backward once on tensors of `shape`'s sizes, as the patched
    model runs them: hidden states [1, tokens, hidden] in the compute dtype, frozen weights, q/k as the attention
    makes them ([1, tokens, heads * head_dim] seen as [1, heads, tokens, head_dim]), gradients flowing back."""
    from types import SimpleNamespace

    import torch
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    dev, dtype = torch.device("cuda"), getattr(torch, shape["dtype"])
    T, H, hd = TOKENS, shape["hidden"], shape["head_dim"]
    x = torch.randn(1, T, H, device=dev, dtype=dtype, requires_grad=True)
    norm = LigerRMSNorm(H, eps=shape["eps"]).to(dev, dtype).requires_grad_(False)
    mlp = LigerSwiGLUMLP(SimpleNamespace(hidden_size=H, intermediate_size=shape["intermediate"], hidden_act="silu"))
    mlp = mlp.to(dev, dtype).requires_grad_(False)
    q_flat = torch.randn(1, T, shape["heads"] * hd, device=dev, dtype=dtype, requires_grad=True)
    k_flat = torch.randn(1, T, shape["kv_heads"] * hd, device=dev, dtype=dtype, requires_grad=True)
    q = q_flat.view(1, T, shape["heads"], hd).transpose(1, 2)
    k = k_flat.view(1, T, shape["kv_heads"], hd).transpose(1, 2)
    cos, sin = (torch.randn(1, T, hd, device=dev, dtype=dtype) for _ in range(2))
    qr, kr = liger_rotary_pos_emb(q, k, cos, sin)
    out = mlp(norm(x * 1))  # `* 1`: the norm runs in place on its input, as on the residual stream's sum
    loss = out.float().sum() + qr.transpose(1, 2).float().sum() + kr.transpose(1, 2).float().sum()
    loss.backward()
    with torch.no_grad():  # evaluation: the forward kernels without autograd
        liger_rotary_pos_emb(q, k, cos, sin)
        mlp(norm(x * 1))
    torch.cuda.synchronize()


def _main(shape: str, parent: int) -> None:
    from trial_worker.pack.data import exit_with

    from trial_worker.marks import mark

    exit_with(parent)  # gone with the pack that started it
    try:
        compile_kernels(json.loads(shape))
        mark("engine: Liger's kernels compiled ahead")
    except Exception as e:  # noqa: BLE001 - only a head start: the warm-up compiles what this did not
        mark(f"engine: Liger's kernels not compiled ahead ({type(e).__name__}: {str(e)[:200]})")
    finally:
        os._exit(0)  # no teardown of torch: the pack does not wait for it, and nothing here is worth keeping


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
