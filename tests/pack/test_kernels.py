"""Liger's kernels compiled ahead of the pack's warm-up (`trial_worker.pack.kernels`): which models get it (CPU),
and that a Liger-patched model's forward and backward then compile nothing more (GPU: Triton's cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trial_worker.config import JobConfig
from trial_worker.pack.kernels import shape_of

SHAPE_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def _job(model: Path) -> JobConfig:
    return JobConfig.model_validate({"model": {"name_or_path": str(model)}, "data": {"path": "unused"},
                                     "budget": {"min": 1, "max": 2}})


def _model_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llama_like_local_models_get_their_sizes_others_none(tmp_path):
    shape = shape_of(_job(_model_folder(tmp_path, SHAPE_1B)))
    assert shape == {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64, "eps": 1e-5,
                     "dtype": "bfloat16"}
    # head_dim and the key/value heads from the defaults where the config leaves them out
    short = {k: v for k, v in SHAPE_1B.items() if k not in ("head_dim", "num_key_value_heads")}
    assert shape_of(_job(_model_folder(tmp_path, short)))["head_dim"] == 64
    assert shape_of(_job(_model_folder(tmp_path, short)))["kv_heads"] == 32
    for other in ({**SHAPE_1B, "model_type": "gemma"}, {**SHAPE_1B, "hidden_act": "gelu"},
                  {k: v for k, v in SHAPE_1B.items() if k != "hidden_size"}):
        assert shape_of(_job(_model_folder(tmp_path, other))) is None, other
    assert shape_of(_job(tmp_path / "absent")) is None  # a hub id, or no config: nothing ahead
    (tmp_path / "model" / "config.json").write_text("{not json")
    assert shape_of(_job(tmp_path / "model")) is None


@pytest.mark.gpu
def test_a_liger_patched_model_finds_every_kernel_compiled(tmp_path):
    """The warmer, in a process of its own as the pack starts it, then a one-layer Llama of the 1B's sizes with
    Liger applied as the pack applies it, trained one step: Triton's cache gains no kernel from the model."""
    cache = tmp_path / "triton"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    shape = shape_of(_job(_model_folder(tmp_path, SHAPE_1B)))
    subprocess.run([sys.executable, "-c", "import json, sys; from trial_worker.pack.kernels import compile_kernels; "
                    "compile_kernels(json.loads(sys.argv[1]))", json.dumps(shape)], env=env, check=True, timeout=300)
    ahead = {p.name for p in cache.iterdir()}
    assert ahead, "the warmer compiled nothing"
    code = f"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from trial_worker._compat import apply_liger
cfg = LlamaConfig(**{{k: v for k, v in {SHAPE_1B!r}.items() if k != "model_type"}}, num_hidden_layers=1, vocab_size=512)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
assert apply_liger(model)
model.requires_grad_(False)
ids = torch.randint(0, 512, (1, 256), device="cuda")
embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
out = model.model(inputs_embeds=embeds, position_ids=torch.arange(256, device="cuda")[None]).last_hidden_state
out.float().sum().backward()
with torch.no_grad():
    model.model(inputs_embeds=embeds, position_ids=torch.arange(256, device="cuda")[None])
torch.cuda.synchronize()
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    new = {p.name for p in cache.iterdir()} - ahead
    assert not new, f"the model compiled {len(new)} kernels the warmer had not: {sorted(new)[:5]}"
