"""The multi-adapter LoRA layer: one frozen base projection, each trial's tokens through its own adapter.

mLoRA's BatchLoRA (TUDB-Labs/mLoRA, `mlora/model/modules/lora.py`) runs the base weight once over the whole
batch and adds each adapter's low-rank update on that adapter's slice of the batch. We do the same on token
ranges of the batch (rows, or tokens of a padding-free batch): `Routing` says which belong to which slot; a slot absent
from a layer (its trial did not target that module) adds nothing there. PEFT cannot do this in training (its mixed-adapter
batches, `adapter_names`, are inference-only).

Adapters are kept in fp32 (as the solo recipe does), and a trial's numbers do not depend on which other trials
share its batch: its dropout mask is drawn from a seed
of (trial seed, step, micro-batch, layer) over the trial's own rows (or tokens), so it
is the same whoever else is in the batch, and the same again when gradient checkpointing recomputes a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class Routing:
    """Which rows (tokens, in a padding-free batch) go through which adapter slot, and the dropout seeds."""

    spans: list[tuple[int, int, Optional[int]]] = field(default_factory=list)  # (first row, end row, slot)
    seeds: dict[int, int] = field(default_factory=dict)  # slot -> dropout seed of this forward (training only)
    training: bool = True
    per_token: bool = False  # a padding-free batch [1, tokens]: each token is a row (pack.batch.Batch)
    lengths: dict[int, int] = field(default_factory=dict)  # slot -> its real tokens in its row (row layout)
    _masks: dict = field(default_factory=dict)

    def set(self, spans, seeds: Optional[dict], *, per_token: bool = False, lengths: Optional[dict] = None) -> None:
        self.spans, self.seeds, self.per_token, self.lengths = spans, seeds or {}, per_token, lengths or {}
        self.training = seeds is not None
        self._masks = {}

    def block_mask(self, slots: tuple, ranks: tuple, scalings: tuple, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, sum(ranks)] bool: row i may use the rank columns of its own slot only, [sum(ranks)]: each
        column's LoRA scaling), built once per forward for each set of adapters a layer holds."""
        key = (slots, ranks, scalings, dtype)
        if key not in self._masks:
            rows = self.spans[-1][1] if self.spans else 0
            owner = torch.full((rows,), -1, dtype=torch.long)
            for start, end, slot in self.spans:
                if slot in slots:
                    owner[start:end] = slots.index(slot)
            column = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(ranks))
            scale = torch.repeat_interleave(torch.tensor(scalings, dtype=dtype), torch.tensor(ranks))
            self._masks[key] = ((owner[:, None] == column[None, :]).to(device), scale.to(device))
        return self._masks[key]


class LoRAAdapter(nn.Module):
    """One trial's A/B pair on one projection (PEFT's init: A Kaiming-uniform, B zero), kept in fp32."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 generator: torch.Generator, device):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=torch.float32, device="cpu"))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device="cpu"))
        # nn.init.kaiming_uniform_(a=sqrt(5)) as PEFT does, drawn from the trial's own generator on the CPU
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
        self.to(device)
        self.r = r
        self.scaling = alpha / r
        self.dropout = dropout


class MultiLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or bitsandbytes Linear4bit) plus one LoRA adapter per packed trial.

    All trials' adapters run as two matmuls, whatever their number: the rows times every trial's A stacked
    (ranks side by side), each row keeping only its own trial's rank columns (`torch.where`, so a non-finite
    value elsewhere cannot leak in), scaled per trial, times every trial's B side by side. A step of K trials
    then launches the same few kernels per layer as a step of one: the packed step is not bound by the host
    launching K x 7 x layers small matmuls. The extra work is a rank-sum-wide matmul on each side (sum of the
    trials' r columns), small beside the base projection while that sum is well under the hidden size.
    """

    def __init__(self, base: nn.Module, routing: Routing, index: int):
        super().__init__()
        self.base = base
        self.routing = routing
        self.index = index  # this layer's place in the model: part of its dropout seeds
        self.adapters = nn.ModuleDict()  # str(slot) -> LoRAAdapter

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.routing.per_token:
            x = x.reshape(-1, 1, x.shape[-1])  # [1, tokens, features] -> one "row" per token, as the routing counts
        present = [(slot, self.adapters[str(slot)]) for _, _, slot in self.routing.spans
                   if slot is not None and str(slot) in self.adapters]
        if not present:
            return y
        slots = tuple(s for s, _ in present)
        adapters = [a for _, a in present]
        dtype = x.dtype  # the compute dtype (bf16 on a GPU, as the solo trial's autocast); the weights stay fp32
        A = torch.cat([a.A for a in adapters]) if len(adapters) > 1 else adapters[0].A
        B = torch.cat([a.B for a in adapters], dim=1) if len(adapters) > 1 else adapters[0].B
        keep, scale = self.routing.block_mask(slots, tuple(a.r for a in adapters), tuple(a.scaling for a in adapters),
                                              x.device, dtype)
        h = self._dropped(x, dict(present)) @ A.to(dtype).t()
        h = torch.where(keep[:, None, :], h, 0.0) * scale
        return y + (h @ B.to(dtype).t()).to(y.dtype).reshape(y.shape)

    def _dropped(self, x: torch.Tensor, adapters: dict) -> torch.Tensor:
        """`x` with each trial's LoRA dropout on its own rows (a mask from its own seed; none in evaluation)."""
        r = self.routing
        if not r.training or not any(a.dropout for a in adapters.values()):
            return x
        pieces = []
        for start, end, slot in r.spans:
            part, a = x[start:end], adapters.get(slot)
            if a is not None and a.dropout and slot in r.seeds:
                g = torch.Generator(device=x.device).manual_seed((r.seeds[slot] * 1_000_003 + self.index) % 2**63)
                keep = torch.ones_like(part)  # drawn over the trial's own tokens only: the same whoever pads its row
                keep[:, :part.shape[1] if r.per_token else r.lengths.get(slot, part.shape[1])].bernoulli_(
                    1.0 - a.dropout, generator=g)
                part = part * keep / (1.0 - a.dropout)
            pieces.append(part)
        return torch.cat(pieces)


def target_names(model, targets) -> list[str]:
    """Qualified names of the linear layers LoRA may wrap: `targets` ('all-linear' or module short names)."""
    import bitsandbytes as bnb

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, bnb.nn.Linear4bit)) or name.endswith("lm_head"):
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            out.append(name)
    return out


def install(model, routing: Routing) -> dict[str, MultiLoRALinear]:
    """Wrap every linear layer of the decoder (not the LM head) in a `MultiLoRALinear`; return them by name."""
    layers = {}
    for index, name in enumerate(target_names(model, "all-linear")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = MultiLoRALinear(getattr(parent, child), routing, index)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers
