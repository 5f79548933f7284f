"""Padding-free micro-batches: a row in a flattened batch is computed as if alone, at one of a few
lengths. (That the optimizer sees the same loss padded or flattened: test_execution.py.)"""

from __future__ import annotations

import torch

from trial_worker.data import FlatCollator, bucket_length
from trial_worker.model import load_model


def test_bucket_lengths_are_few_and_never_short():
    sizes = {bucket_length(n) for n in range(1, 4097)}
    assert all(bucket_length(n) >= n for n in range(1, 4097))
    assert all(bucket_length(n) - n < max(64, n / 4) for n in range(1, 4097))  # under 25% padding (64 tokens when short)
    assert len(sizes) <= 4 * 7  # four sizes per doubling from 64 to 4096


def test_a_row_alone_and_inside_a_flattened_batch_give_the_same_logits(make_job):
    job = make_job()
    assert job.model.quantization.load_in_4bit  # the real QLoRA model: 4-bit base + LoRA
    tok, model = load_model(job.model, job.training)
    model.eval()
    rows = [tok(t)["input_ids"] for t in ("What is 12 + 30? 42", "Reverse abc: cba", "Sort 3 1 2: 1 2 3 and more")]
    batch = FlatCollator(tok.pad_token_id)([{"input_ids": r} for r in rows])
    n = sum(map(len, rows))
    assert batch["input_ids"].shape == (1, bucket_length(n)) and int(batch["num_tokens"]) == n
    starts = [sum(map(len, rows[:i])) for i in range(len(rows))]
    assert all(batch["labels"][0, s] == -100 for s in starts)  # no row is a target of the row before it
    assert (batch["labels"][0, n:] == -100).all()  # nor is the bucket padding
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        leaky = model(input_ids=batch["input_ids"]).logits[0]  # one long sequence: rows see each other
        for row, s in zip(rows, starts):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            assert torch.allclose(alone, flat[s:s + len(row)], atol=1e-5), (alone - flat[s:s + len(row)]).abs().max()
    s, row = starts[-1], rows[-1]
    assert not torch.allclose(model(input_ids=torch.tensor([row])).logits[0], leaky[s:s + len(row)], atol=1e-4), \
        "the check must be able to see cross-row attention"
