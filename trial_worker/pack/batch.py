"""Tokenised rows, and the dispatcher that builds one batch from several trials' micro-batches.

A row is (input ids, targets): `targets[t]` is the token that position t must predict when that token is part
of the response, else -100 (the prompt is masked, as TRL's `completion_only_loss` does). The tokenisation is
the solo worker's: chat rows as `data.tokenize_chats` tokenized them (every assistant turn a target), text
rows as TRL tokenizes prompt-completion strings.

A pack step's batch is padding-free, as the solo worker's (`data.FlatCollator`): every trial's sequences
concatenated into one sequence, each trial's contiguous, positions restarting at 0 for each sequence, and the
sequence boundaries (`cu_seq_lens`) handed to the attention: on a CUDA GPU torch's varlen flash-attention
kernel confines each token to its own sequence (model.flat_attention); elsewhere transformers builds the
block-diagonal causal mask from the position ids. No sequence attends to another, so a trial whose
activations overflow cannot reach another's. The whole is padded up to a multiple of `FLAT_ALIGN` tokens with
one pad sequence that belongs to no trial and has no targets (the varlen kernel and the grouped LoRA matmul
take any length: the solo worker's coarser buckets, up to 25% padding, would only cost).

The positions that have a target are listed on the host (`Batch.select`), so the LM head and its loss run on
them only (no boolean indexing on the device, no host sync); prompts are a third of a chat row's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

IGNORE_INDEX = -100
FLAT_ALIGN = 64  # tokens: the flat batch's length is a multiple of it


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
    """One row as a `Seq` of at most `max_length` tokens (None: no response token left).

    Chat rows arrive tokenized by `data.tokenize_chats` (`input_ids`, and `completion_mask`: 1 on every assistant
    turn), the solo worker's rows too: the same tokens and targets. Text rows (prompt-completion strings) are
    tokenized here as TRL tokenizes them for the solo worker: prompt, then prompt + completion + EOS, the
    response starting where the two diverge."""
    if row.get("completion_mask") is not None:
        ids, mask = list(row["input_ids"])[:max_length], list(row["completion_mask"])[:max_length]
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]
    else:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            raise ValueError("a chat row reached the pack untokenized: load it with data.load_splits(..., tokenizer=)")
        p_ids = tokenizer(prompt)["input_ids"]
        text = prompt + completion
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        ids = list(tokenizer(text)["input_ids"])[:max_length]
        start = _prefix(p_ids, ids)
        targets = [t if i + 1 >= start else IGNORE_INDEX for i, t in enumerate(ids[1:])] + [IGNORE_INDEX]
    seq = Seq(tuple(ids), tuple(targets))
    return seq if seq.n_targets else None


def tokenize(rows, tokenizer, max_length: int) -> list[Seq]:
    """Every row that keeps a response token within `max_length`, in order."""
    out = [tokenize_row(r, tokenizer, max_length) for r in rows]
    return [s for s in out if s is not None]


def pack_rows(seqs: Sequence[Seq], row_tokens: int) -> list[list[Seq]]:
    """`seqs` first-fit into groups of at most max(row_tokens, longest) tokens, longest first (deterministic)."""
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
    """One forward pass, and which of its rows belong to which slot.

    flat (a CUDA GPU with the varlen kernel): one padding-free sequence [1, tokens], a "row" is a token, and
    `cu_seq_lens`/`max_length` give the sequence boundaries to the varlen kernel. Otherwise one row per trial
    [trials, longest], each row its trial's sequences back to back, padded at its end: attention there is one
    masked matmul per row, and with rows apart a masked-out (0 x NaN) weight cannot carry one trial's
    overflowed activations into another's.
    """

    input_ids: Any  # torch tensors (torch is imported lazily)
    position_ids: Any
    targets: Any  # [targets]: the target of each selected position (`select`)
    cu_seq_lens: Any  # flat: int32 [sequences + 1], where each sequence starts, then the total; else None
    max_length: Optional[int]  # flat: the longest sequence
    owner: Any  # [targets]: the index in `parts` of each selected position's trial
    spans: list[tuple[int, int, Optional[int]]]  # (first row, end row, slot); the flat padding's slot is None
    tokens: dict  # slot -> real (non-pad) tokens in the batch
    select: Any  # [targets]: the flattened positions that have a target, in order


def build(parts: Sequence[tuple[Optional[int], Sequence[Seq]]], pad_id: int, device, *, flat: bool) -> Batch:
    """The dispatcher: one batch from (slot, micro-batch sequences) of several trials (see `Batch`)."""
    import numpy as np
    import torch

    def put(a, dtype=torch.long):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(device, non_blocking=True)

    def layout(seqs: Sequence[Seq], length: Optional[int] = None):
        """(ids, targets, positions, sequence lengths) of `seqs` back to back, padded to `length` (own sequence)."""
        lengths = [len(s.ids) for s in seqs]
        ids = [np.asarray(s.ids, dtype=np.int64) for s in seqs]
        tgt = [np.asarray(s.targets, dtype=np.int64) for s in seqs]
        pad = (length if length is not None else -(-sum(lengths) // FLAT_ALIGN) * FLAT_ALIGN) - sum(lengths)
        if pad:
            ids.append(np.full(pad, pad_id, dtype=np.int64))
            tgt.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            lengths.append(pad)
        starts: Any = np.zeros(len(lengths) + 1, dtype=np.int64)
        starts[1:] = np.cumsum(lengths)
        positions = np.arange(starts[-1], dtype=np.int64) - np.repeat(starts[:-1], lengths)
        return np.concatenate(ids), np.concatenate(tgt), positions, lengths

    tokens = {slot: sum(len(s.ids) for s in seqs) for slot, seqs in parts}
    if flat:
        ids, tgt, pos, lengths = layout([s for _, seqs in parts for s in seqs])
        spans: list[tuple[int, int, Optional[int]]] = []
        at = 0
        for slot, _ in parts:
            spans.append((at, at + tokens[slot], slot))
            at += tokens[slot]
        if at < len(ids):
            spans.append((at, len(ids), None))
        owner = np.concatenate([np.repeat(np.arange(len(parts)), [tokens[slot] for slot, _ in parts]),
                                np.zeros(len(ids) - at, dtype=np.int64)])
        starts: Any = np.concatenate([[0], np.cumsum(lengths)])
        select = np.flatnonzero(tgt != IGNORE_INDEX)
        return Batch(put(ids)[None], put(pos)[None], put(tgt[select]), put(starts, torch.int32), int(max(lengths)),
                     put(owner[select]), spans, tokens, put(select))
    longest = max(tokens.values())
    rows = [layout(seqs, longest) for _, seqs in parts]
    targets = np.stack([r[1] for r in rows]).reshape(-1)
    select = np.flatnonzero(targets != IGNORE_INDEX)
    return Batch(put(np.stack([r[0] for r in rows])), put(np.stack([r[2] for r in rows])),
                 put(targets[select]), None, None, put(np.repeat(np.arange(len(parts)), longest)[select]),
                 [(i, i + 1, slot) for i, (slot, _) in enumerate(parts)], tokens, put(select))
