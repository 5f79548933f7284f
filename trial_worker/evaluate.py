"""Validation loss as the exact token-mean cross-entropy over all response tokens.

Sum of every label token's loss over the whole split, divided by the number of label
tokens: not a mean of per-batch means (which weights short batches up), so trials with
different eval batch sizes or padding get the same number for the same model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable, Optional

IGNORE_INDEX = -100
ROWS_PER_CHUNK = 1  # logits are upcast to fp32 one sequence at a time: bounded memory with 128k vocabularies


def token_loss_sum(model, batch: dict) -> tuple[float, int]:
    """(sum of next-token cross-entropy over label tokens, number of label tokens) for one batch."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    shift_labels = labels[:, 1:]
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, logits.shape[0], ROWS_PER_CHUNK):
        lg = logits[i : i + ROWS_PER_CHUNK, :-1].float()
        lb = shift_labels[i : i + ROWS_PER_CHUNK].to(lg.device)
        total += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").double()
    return float(total), int((shift_labels != IGNORE_INDEX).sum())


def validation_loss(
    model,
    batches: Iterable[dict],
    *,
    device=None,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> dict[str, float]:
    """{"val_loss", "ppl", "tokens"} over every batch (dicts with input_ids, attention_mask, labels).

    The model is put in eval mode (no dropout) and restored; the global RNG state is left as
    it was, so evaluating in the middle of training does not change what training does next.
    """
    import torch

    was_training = model.training
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), (autocast or contextlib.nullcontext)():
            for batch in batches:
                if device is not None:
                    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                s, n = token_loss_sum(model, batch)
                loss_sum += s
                n_tokens += n
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("the validation split has no response tokens to score (all labels are -100)")
    val_loss = loss_sum / n_tokens
    return {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 700.0)), "tokens": n_tokens}
