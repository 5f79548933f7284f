"""The multi-adapter LoRA layer: one frozen base projection, each trial's rows through its own adapter.

mLoRA's BatchLoRA (TUDB-Labs/mLoRA, `mlora/model/modules/lora.py`) runs the base weight once over the whole
batch and adds each adapter's low-rank update on that adapter's slice of the batch. We do the same on row
ranges of the batch: `Routing` says which rows belong to which trial's slot; a slot absent from a layer (its
trial did not target that module) adds nothing there. PEFT cannot do this in training (its mixed-adapter
batches, `adapter_names`, are inference-only).

Adapters are kept in fp32 (as the solo recipe does), and their dropout draws from the trial's own generator,
so a trial's numbers do not depend on which other trials share its batch: a dropout mask is drawn from a seed
of (trial seed, step, micro-batch, layer) over the trial's own rows and length (padding beyond it kept), so it
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
    """Which rows of the current batch go through which adapter slot: [(first row, end row, slot or None)]."""

    spans: list[tuple[int, int, Optional[int]]] = field(default_factory=list)
    seeds: dict[int, int] = field(default_factory=dict)  # slot -> dropout seed of this forward
    lengths: dict[int, int] = field(default_factory=dict)  # slot -> the length of its own longest row
    training: bool = True


class LoRAAdapter(nn.Module):
    """One trial's A/B pair on one projection (PEFT's init: A Kaiming-uniform, B zero)."""

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
        self.scaling = alpha / r
        self.dropout = dropout

    def delta(self, x: torch.Tensor, seed: Optional[int], length: int) -> torch.Tensor:
        x = x.float()
        if self.dropout and seed is not None:
            g = torch.Generator(device=x.device).manual_seed(seed)
            keep = torch.ones_like(x)
            keep[:, :length].bernoulli_(1.0 - self.dropout, generator=g)
            x = x * keep / (1.0 - self.dropout)
        return (x @ self.A.t()) @ self.B.t() * self.scaling


class MultiLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or bitsandbytes Linear4bit) plus one LoRA adapter per packed trial."""

    def __init__(self, base: nn.Module, routing: Routing, index: int):
        super().__init__()
        self.base = base
        self.index = index  # this layer's place in the model: part of its dropout seeds
        self.routing = routing
        self.adapters = nn.ModuleDict()  # str(slot) -> LoRAAdapter

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        spans = self.routing.spans
        if not spans or not any(str(s) in self.adapters for _, _, s in spans if s is not None):
            return y
        pieces = []
        for start, end, slot in spans:
            adapter = self.adapters[str(slot)] if slot is not None and str(slot) in self.adapters else None
            if adapter is None:
                pieces.append(y.new_zeros((end - start, *y.shape[1:])))
            else:
                seed = self.routing.seeds.get(slot) if self.routing.training else None
                if seed is not None:
                    seed = (seed * 1_000_003 + self.index) % 2**63
                pieces.append(adapter.delta(x[start:end], seed, self.routing.lengths.get(slot, x.shape[1])).to(y.dtype))
        return y + torch.cat(pieces, dim=0)


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
