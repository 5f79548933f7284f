"""The multi-adapter LoRA layer: one frozen base projection, each trial's tokens through its own adapter only.

mLoRA's BatchLoRA (TUDB-Labs/mLoRA, `mlora/model/modules/lora.py`) runs the base weight once over the whole
batch and adds each adapter's low-rank update on that adapter's slice of the batch. A pack step's batch keeps
each trial's tokens contiguous (`pack.batch`), so its LoRA work is a *segment* matmul (Punica's SGMV, S-LoRA):
token span g times adapter g, nothing else. `Routing` says which span belongs to which slot; a slot absent from
a layer (its trial did not target that module) and the padding add nothing there. PEFT cannot do this in
training (its mixed-adapter batches, `adapter_names`, are inference-only).

Two executions of the same sum, chosen per forward (`grouped_ok`):
- grouped (CUDA, bf16/fp16, every width a multiple of 8): `torch._grouped_mm` over the spans, two launches per
  layer forward whatever the number of trials, each token multiplied by its own adapter only (ranks padded with
  zeros to the largest rank in the layer). Before it (2026-12-05, H100, 8 trials) every token went through every
  trial's A and B stacked and a [tokens x sum(ranks)] mask picked its own columns: K-fold LoRA work, and the
  pack fell from 40k tokens/s at 8 trials to 25k at 16.
- segments (the CPU, fp32, odd widths): one pair of matmuls per span. Exact in fp32, which is what the CPU
  parity tests check against a trial trained alone.

Adapters are kept in fp32 (as the solo recipe does), and a trial's numbers do not depend on which other trials
share its batch: its dropout mask is drawn from a seed of (trial seed, step, micro-batch, layer) over the
trial's own rows (or tokens), so it is the same whoever else is in the batch, and the same again when gradient
checkpointing recomputes a layer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from trial_worker._compat import foreach_add, foreach_copy, foreach_mul, grouped_mm, has_grouped_mm
from trial_worker.config import targeted

# "auto": grouped where `grouped_ok`, else segments; "segments" / "grouped" force one (tests, benchmarks).
MODE = "auto"
GROUPED_MM = has_grouped_mm()  # asked once, not per layer per forward


@dataclass
class Routing:
    """Which rows (tokens, in a padding-free batch) go through which adapter slot, and the dropout seeds."""

    spans: list[tuple[int, int, Optional[int]]] = field(default_factory=list)  # (first row, end row, slot)
    seeds: dict[int, int] = field(default_factory=dict)  # slot -> dropout seed of this forward (training only)
    training: bool = True
    per_token: bool = False  # a padding-free batch [1, tokens]: each token is a row (pack.batch.Batch)
    lengths: dict[int, int] = field(default_factory=dict)  # slot -> its real tokens in its row (row layout)
    _offsets: dict = field(default_factory=dict)

    def set(self, spans, seeds: Optional[dict], *, per_token: bool = False, lengths: Optional[dict] = None) -> None:
        self.spans, self.seeds, self.per_token, self.lengths = spans, seeds or {}, per_token, lengths or {}
        self.training = seeds is not None
        self._offsets = {}

    def token_spans(self, row_length: int) -> list[tuple[int, int, Optional[int]]]:
        """The spans in tokens of the flattened [rows * row_length] batch."""
        if self.per_token or row_length == 1:
            return self.spans
        return [(s * row_length, e * row_length, slot) for s, e, slot in self.spans]

    def offsets(self, row_length: int, device) -> torch.Tensor:
        """int32 [spans]: where each span ends in the flattened batch (grouped matmul groups), one copy a forward."""
        if row_length not in self._offsets:
            ends = [e for _, e, _ in self.token_spans(row_length)]
            self._offsets[row_length] = torch.tensor(ends, dtype=torch.int32).to(device, non_blocking=True)
        return self._offsets[row_length]


class LoRAAdapter(nn.Module):
    """One trial's A/B pair on one projection, kept in fp32: `A` [r, in] and `B` [out, r]. In a pack they are views
    of the trial's one flat parameter (`new_adapters`), each a leaf of its own whose gradient is a view of the flat
    parameter's."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.r = A.shape[0]
        self.scaling = alpha / self.r
        self.dropout = dropout


def new_adapters(shapes: list[tuple[int, int]], r: int, alpha: float, dropout: float, generator: torch.Generator,
                 device, *, bf16_init: bool) -> tuple[nn.Parameter, list[LoRAAdapter]]:
    """A trial's adapters on layers of (in, out) `shapes`, and the one flat fp32 parameter they are views of
    (PEFT's init: A Kaiming-uniform, B zero).

    Drawn as the solo worker's adapters are, number for number: `generator` is seeded with the trial's seed, as
    the solo worker seeds the global RNG before PEFT builds its adapters (`recipe.QLoRATrial._setup_process`),
    and the adapters of the trial's layers are made in the model's module order, as PEFT makes them. PEFT's
    `nn.Linear` lora_A [r, in] and lora_B [out, r] first draw their default init (Kaiming-uniform, a=sqrt(5):
    bound 1/sqrt(fan in)), then lora_A is drawn again and lora_B zeroed; then TRL's SFTTrainer casts the adapters
    of a quantized (`bf16_init`) model to bf16, and the recipe back to fp32: A keeps bf16's rounding.

    One flat tensor per trial: drawn on the CPU and copied to the device once (not once per tensor, 224 for the
    1B shape), and its optimizer steps, zeroes, clips and checks one tensor (one launch each, not 224). The
    optimizer's update is elementwise, the same on the flat tensor as on its pieces; an 8-bit optimizer quantizes
    its state in blocks of 256 elements of the flat tensor, which are each piece's own blocks where every piece's
    size is a multiple of 256 (every LoRA tensor of the 1B shape at r 8/16/32), else within the GPU's 1% parity."""
    sizes = [n for i, o in shapes for n in (r * i, o * r)]
    flat = torch.zeros(sum(sizes), dtype=torch.float32)
    views = list(torch.split(flat, sizes))
    with torch.no_grad():
        for k, (i, o) in enumerate(shapes):
            A = views[2 * k].view(r, i)
            bound = 1.0 / math.sqrt(i)
            A.uniform_(-bound, bound, generator=generator)  # lora_A's nn.Linear default init (redrawn below)
            torch.empty(o, r).uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), generator=generator)
            A.uniform_(-bound, bound, generator=generator)  # PEFT's kaiming_uniform_(a=sqrt(5))
        if bf16_init:
            for k in range(len(shapes)):
                views[2 * k].copy_(views[2 * k].to(torch.bfloat16))
    flat = nn.Parameter(flat.to(device))
    flat.grad = torch.zeros_like(flat)
    params = torch.split(flat.detach(), sizes)
    grads = torch.split(flat.grad, sizes)
    adapters = []
    for k, (i, o) in enumerate(shapes):
        a = LoRAAdapter(params[2 * k].view(r, i), params[2 * k + 1].view(o, r), alpha, dropout)
        a.A.grad, a.B.grad = grads[2 * k].view(r, i), grads[2 * k + 1].view(o, r)
        adapters.append(a)
    return flat, adapters


def grouped_ok(x: torch.Tensor, in_features: int, out_features: int, ranks) -> bool:
    """Whether `torch._grouped_mm` runs this layer: CUDA, a 16-bit dtype, 16-byte aligned widths (8 elements)."""
    if MODE != "auto":
        return MODE == "grouped"
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and GROUPED_MM
            and in_features % 8 == 0 and out_features % 8 == 0 and all(r % 8 == 0 for r in ranks))


class MultiLoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or bitsandbytes Linear4bit) plus one LoRA adapter per packed trial."""

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
        r = self.routing
        present = {slot: self.adapters[str(slot)] for _, _, slot in r.spans
                   if slot is not None and str(slot) in self.adapters}
        if not present:
            return y
        if r.per_token:
            x = x.reshape(-1, 1, x.shape[-1])  # [1, tokens, features] -> one "row" per token, as the routing counts
        row_length = x.shape[1] if x.dim() == 3 else 1
        x2 = self._dropped(x, present).reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        spans = r.token_spans(row_length)
        dtype = x.dtype  # the compute dtype (bf16 on a GPU, as the solo trial's autocast); the weights stay fp32
        if grouped_ok(x, self.in_features, self.out_features, [a.r for a in present.values()]):
            delta = self._grouped(x2, spans, present, r.offsets(row_length, x.device), dtype)
            return (y2 + delta.to(y.dtype)).reshape(y.shape)
        pieces = []
        for start, end, slot in spans:
            a = present.get(slot) if slot is not None else None
            if a is None:
                pieces.append(y2[start:end])
                continue
            h = (x2[start:end] @ a.A.to(dtype).t()) * a.scaling
            pieces.append(y2[start:end] + (h @ a.B.to(dtype).t()).to(y.dtype))
        return torch.cat(pieces).reshape(y.shape)

    def _grouped(self, x2: torch.Tensor, spans, present: dict, offsets: torch.Tensor, dtype) -> torch.Tensor:
        """[tokens, out]: span g's tokens times span g's adapter (zeros for padding and absent slots), two
        grouped matmuls. Ranks below the layer's largest are zero-padded: zero columns of A and rows of B
        contribute nothing and get zero gradients.

        The work per layer does not grow with the number of trials: the groups' weights are gathered into one
        [groups, r, in] / [groups, out, r] pair in one multi-tensor copy each (`_foreach_copy_`, casting to the
        compute dtype), and in the backward their gradients come back as one pair too, spread onto every
        trial's own gradients in one multi-tensor add (`_spread`). Before (2026-12-06, H100, 24 trials), autograd
        stacked the trials' fp32 tensors and accumulated each trial's gradient by itself: two small kernels a
        trial a layer in every backward (K x 224 at 112 layers)."""
        groups = [present.get(slot) if slot is not None else None for _, _, slot in spans]
        rmax = max(a.r for a in present.values())
        where = [g for g, a in enumerate(groups) if a is not None]
        adapters: list[LoRAAdapter] = [a for a in groups if a is not None]
        n, dev = len(groups), x2.device
        new = torch.zeros if any(a is None or a.r < rmax for a in groups) else torch.empty
        with torch.no_grad():
            A = new(n, rmax, self.in_features, dtype=dtype, device=dev)
            B = new(n, self.out_features, rmax, dtype=dtype, device=dev)
            a_rows, b_rows = A.unbind(0), B.unbind(0)  # one call for every group's view
            a_views = [a_rows[g] if a.r == rmax else a_rows[g][:a.r] for g, a in zip(where, adapters)]
            b_views = [b_rows[g] if a.r == rmax else b_rows[g][:, :a.r] for g, a in zip(where, adapters)]
            scales = [a.scaling for a in adapters]
            scaled = any(s != 1.0 for s in scales)
            foreach_copy(a_views, [a.A for a in adapters])
            foreach_copy(b_views, foreach_mul([a.B for a in adapters], scales) if scaled else [a.B for a in adapters])
        if torch.is_grad_enabled() and any(a.A.requires_grad for a in adapters):
            A.requires_grad_()
            B.requires_grad_()
            A.register_post_accumulate_grad_hook(functools.partial(
                _spread, [a.A for a in adapters], where, [a.r for a in adapters], None, rows=True))
            B.register_post_accumulate_grad_hook(functools.partial(
                _spread, [a.B for a in adapters], where, [a.r for a in adapters], scales if scaled else None,
                rows=False))
        h = grouped_mm(x2.contiguous(), A.transpose(1, 2), offsets)
        return grouped_mm(h, B.transpose(1, 2), offsets)

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


def _spread(params: list, where: list, ranks: list, scales: Optional[list], stacked: torch.Tensor, *, rows: bool) -> None:
    """After the backward gave the gathered weights `stacked` their gradient: add group `where[i]`'s part (its
    first `ranks[i]` rows of A, or columns of B, times its scaling) to `params[i]`'s gradient, in one multi-tensor
    add; the gathered gradient is then dropped."""
    grad = stacked.grad.float()
    stacked.grad = None
    full, groups = grad.shape[1 if rows else 2], grad.unbind(0)
    parts = [groups[g] if r == full else groups[g][:r] if rows else groups[g][:, :r] for g, r in zip(where, ranks)]
    if scales is not None:
        parts = foreach_mul(parts, scales)
    # A trial's span is one span in a pack step, but a slot given two spans gets both: its k-th part goes in the
    # k-th add (one multi-tensor add must not write a tensor twice).
    rounds: list[list[int]] = []
    count: dict[int, int] = {}
    for i, p in enumerate(params):
        k = count[id(p)] = count.get(id(p), -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    for batch in rounds:
        fresh = [i for i in batch if params[i].grad is None]  # a trial's first micro-batch; kept from then on
        for i in fresh:
            params[i].grad = parts[i].clone(memory_format=torch.contiguous_format)
        have = [i for i in batch if i not in fresh]
        if have:
            foreach_add([params[i].grad for i in have], [parts[i] for i in have])


def target_names(model, targets) -> list[str]:
    """Qualified names of the linear layers LoRA may wrap: `targets` ('all-linear' or module names, `targeted`)."""
    from trial_worker._compat import import_bitsandbytes

    bnb = import_bitsandbytes()

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, bnb.nn.Linear4bit)) or name.endswith("lm_head"):
            continue
        if targeted(name, targets):
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
