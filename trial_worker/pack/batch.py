"""Tokenised rows, and the dispatcher that builds one batch from several trials' micro-batches.

A row is (input ids, targets): `targets[t]` is the token that position t must predict when that token is part
of the response, else -100 (the prompt is masked, as TRL's `completion_only_loss` does). The tokenisation is
TRL's for prompt-completion rows: the prompt rendered with the chat template and a generation prompt, the
whole conversation rendered, the response starting where the two diverge.

Each trial's sequences are packed padding-free (first-fit, longest first) into rows of at most
`row_tokens` tokens; positions restart at 0 for each sequence, which transformers turns into a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`), so no sequence attends to another. No row holds
two trials' sequences: attention is computed per row, and a trial whose activations overflow must not reach
another's through a masked-out (0 x NaN) attention weight. Rows are padded to the longest row of the batch;
pad positions form a sequence of their own and have no targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Seq:
    ids: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def _prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(row: dict, tokenizer, max_length: int) -> Optional[Seq]:
    """One prompt-completion row as a `Seq` of at most `max_length` tokens (None: no response token left)."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational
        p_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        p_ids = tokenizer(prompt)["input_ids"]
        text = prompt + completion
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
    start = _prefix(p_ids, ids)
    ids = list(ids)[:max_length]
    targets = [t if i + 1 >= start else IGNORE_INDEX for i, t in enumerate(ids[1:])] + [IGNORE_INDEX]
    seq = Seq(tuple(ids), tuple(targets))
    return seq if seq.n_targets else None


def tokenize(rows, tokenizer, max_length: int) -> list[Seq]:
    """Every row that keeps a response token within `max_length`, in order."""
    out = [tokenize_row(r, tokenizer, max_length) for r in rows]
    return [s for s in out if s is not None]


def pack_rows(seqs: Sequence[Seq], row_tokens: int) -> list[list[Seq]]:
    """`seqs` first-fit into rows of at most max(row_tokens, longest) tokens, longest first (deterministic)."""
    cap = max([row_tokens, *(len(s.ids) for s in seqs)])
    rows: list[list[Seq]] = []
    room: list[int] = []
    for s in sorted(seqs, key=lambda s: -len(s.ids)):
        for i, free in enumerate(room):
            if len(s.ids) <= free:
                rows[i].append(s)
                room[i] -= len(s.ids)
                break
        else:
            rows.append([s])
            room.append(cap - len(s.ids))
    return rows


@dataclass
class Batch:
    """One forward pass: tensors [rows, length] and which rows belong to which slot."""

    input_ids: Any  # torch tensors (torch is imported lazily)
    position_ids: Any
    targets: Any
    spans: list[tuple[int, int, Optional[int]]]  # (first row, end row, slot)
    tokens: dict  # slot -> real (non-pad) tokens in the batch
    lengths: dict  # slot -> the length of its own longest row


def build(parts: Sequence[tuple[Optional[int], Sequence[Seq]]], row_tokens: int, pad_id: int, device) -> Batch:
    """The dispatcher: one batch from (slot, micro-batch sequences) of several trials; each trial's rows contiguous."""
    import torch

    rows: list[list[Seq]] = []
    spans: list[tuple[int, int, Optional[int]]] = []
    tokens: dict = {}
    lengths: dict = {}
    for slot, seqs in parts:
        packed = pack_rows(seqs, row_tokens)
        spans.append((len(rows), len(rows) + len(packed), slot))
        rows.extend(packed)
        tokens[slot] = sum(len(s.ids) for s in seqs)
        lengths[slot] = max(sum(len(s.ids) for s in row) for row in packed)
    length = max(sum(len(s.ids) for s in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    tgt = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.ids)
            ids[r, at:at + n] = torch.tensor(s.ids)
            tgt[r, at:at + n] = torch.tensor(s.targets)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(length - at)  # the padding: a sequence of its own, no targets
    return Batch(ids.to(device), pos.to(device), tgt.to(device), spans, tokens, lengths)
