"""Training data: load (`load_dataset`), pick the validation rows, and normalise every format
into TRL's *prompt-completion* form, so SFTTrainer puts the loss on the response tokens only.

Formats (`data.format`, or `auto` from the columns):

- `sharegpt`    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}  (FineTome-100k)
- `messages`    {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
- `instruction` {"instruction", "input" (optional), "output" | "response"}                (Alpaca)
- `text`        {"text": "<s>[INST] question [/INST] answer </s>"}                       (guanaco-llama2-1k)

A folder of `.txt`/`.pdf` documents (no data files in it) is plain text for continued
pre-training: the text of each file (PDF text extracted with `pypdf`) is cut into pieces of
at most `max_seq_length` tokens (words when no tokenizer is given), each a `text` row.

Chat formats become {"prompt": [messages before the last assistant turn], "completion":
[that turn]}. Given the tokenizer, `load_splits` also tokenizes them here (`tokenize_chat`):
the whole conversation rendered with the chat template, and a `completion_mask` that is 1 on
the tokens of *every* assistant turn (its content and end-of-turn token) and 0 elsewhere —
system, user, role headers, template filler. It needs no `{% generation %}` markers in the
template (ChatML and most hub templates have none): each assistant turn's span is found by
rendering the conversation up to it. TRL builds the labels from that mask.
`text` rows are split after their last `[/INST]` when they have one; rows without it get an
empty prompt, so the loss covers the whole text (plain language modelling).
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Optional

from trial_worker.config import DataConfig

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
INST_END = "[/INST]"
DEFAULT_VALIDATION_FRACTION = 0.1
HOLDOUT_SEED = 0  # fixed, not training.seed: every trial of a sweep must validate on the same rows

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DOCUMENT_SUFFIXES = (".txt", ".pdf")
SPECIAL_TOKEN_ROOM = 2  # BOS/EOS the tokenizer adds around each chunk


class DataFormatError(ValueError):
    pass


def detect_format(columns: list[str]) -> str:
    """The data format implied by a dataset's columns."""
    cols = set(columns)
    if "conversations" in cols:
        return "sharegpt"
    if "messages" in cols:
        return "messages"
    if "instruction" in cols and ({"output", "response"} & cols):
        return "instruction"
    if "text" in cols:
        return "text"
    raise DataFormatError(
        f"cannot tell the data format from the columns {sorted(cols)}; expected 'conversations' (sharegpt), "
        "'messages', 'instruction' + 'output'/'response', or 'text'. Set data.format or rename the columns."
    )


def _chat_to_prompt_completion(messages: list[dict[str, str]], system_prompt: str | None) -> dict[str, Any]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last <= 0:  # no assistant turn, or nothing before it: nothing to learn from this row
        return {"prompt": [], "completion": []}
    return {"prompt": messages[:last], "completion": [messages[last]]}


def normalise_row(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> dict[str, Any]:
    """One raw row of format `fmt` in prompt-completion form (empty prompt/completion: drop it)."""
    if fmt == "sharegpt":
        msgs = []
        for turn in row["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataFormatError(f"unknown sharegpt speaker {turn['from']!r}; known: {sorted(SHAREGPT_ROLES)}")
            msgs.append({"role": role, "content": turn["value"] or ""})
        return _chat_to_prompt_completion(msgs, system_prompt)
    if fmt == "messages":
        msgs = [{"role": m["role"], "content": m["content"] or ""} for m in row["messages"]]
        return _chat_to_prompt_completion(msgs, system_prompt)
    if fmt == "instruction":
        user = row["instruction"] or ""
        if row.get("input"):
            user = f"{user}\n\n{row['input']}"
        answer = row.get("output") if row.get("output") is not None else row.get("response")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer or ""}]
        return _chat_to_prompt_completion(msgs, system_prompt)
    if fmt == "text":
        text = row["text"] or ""
        cut = text.rfind(INST_END)
        if cut < 0:
            return {"prompt": "", "completion": text}
        cut += len(INST_END)
        return {"prompt": text[:cut], "completion": text[cut:]}
    raise DataFormatError(f"unknown data format {fmt!r}")


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation rendered by the chat template, [(start, end) character span of each assistant turn]).

    A turn's span starts where the template's own generation prompt ends (rendering the
    turns before it with `add_generation_prompt=True`) and ends where the rendering up to and
    including it ends, less trailing whitespace (ChatML's newline after `<|im_end|>` is filler,
    not something the model should learn to say). That needs the template to render a
    conversation's start as a prefix of the whole; a template that rewrites earlier turns (e.g.
    drops past reasoning) fails with a clear error.
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        # up to and including the turn: the whole rendering when it is the last turn (one render fewer a row)
        upto = (text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])).rstrip()
        if not text.startswith(upto) or start > len(upto):
            raise DataFormatError(
                f"the chat template does not render assistant turn {i} as a prefix of the whole conversation, so its "
                "tokens cannot be told apart; use a template that renders turns in order (or one with "
                "{% generation %} markers and the text format)"
            )
        spans.append((start, len(upto)))
    return text, spans


def _span_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character lies in one of `spans` (sorted, disjoint), else 0."""
    starts = [s for s, _ in spans]
    mask = []
    for a, _ in offsets:
        i = bisect.bisect_right(starts, a) - 1
        mask.append(int(i >= 0 and a < spans[i][1]))
    return mask


def tokenize_chat(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """{"input_ids", "completion_mask"}: the conversation's tokens, 1 on every assistant turn's tokens."""
    return _tokenize_conversations(tokenizer, [messages])[0]


def _tokenize_conversations(tokenizer, conversations: list[list[dict]]) -> list[dict[str, list[int]]]:
    """`tokenize_chat` of each conversation, the texts encoded in one call (the tokenizer's own threads)."""
    rendered = [assistant_spans(tokenizer, m) for m in conversations]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    # A token belongs to the turn its first character is in (a BPE piece straddling a boundary is rare).
    return [{"input_ids": list(ids), "completion_mask": _span_mask(offsets, spans)}
            for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]


def _tokenize_rows(rows: dict[str, list], tokenizer) -> dict[str, list]:
    out = _tokenize_conversations(tokenizer, [list(p) + list(c) for p, c in zip(rows["prompt"], rows["completion"])])
    return {"input_ids": [o["input_ids"] for o in out], "completion_mask": [o["completion_mask"] for o in out]}


def tokenize_chats(ds, tokenizer):
    """Chat prompt-completion rows with `input_ids` and `completion_mask` added (`tokenize_chat`); other rows as they are.

    The prompt/completion columns stay (the evaluation reads its prompts from them); the
    trainer keeps only the model's inputs.
    """
    if len(ds) == 0 or not isinstance(ds[0]["prompt"], list):
        return ds  # text rows: TRL tokenizes prompt + completion itself
    return ds.map(_tokenize_rows, fn_kwargs={"tokenizer": tokenizer}, batched=True, batch_size=512,
                  keep_in_memory=True, desc=None)


# The field of each format, and (chat formats) the speaker/text keys of its turns.
FORMAT_FIELDS = {"sharegpt": "conversations", "messages": "messages", "instruction": "instruction", "text": "text"}
TURN_KEYS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}


def row_problem(row: dict[str, Any], fmt: str) -> str | None:
    """Why `normalise_row` cannot take this raw row of format `fmt` (a field missing or of the wrong type);
    None when it can. Text fields may be null (an empty text)."""
    field = FORMAT_FIELDS[fmt]
    if row.get(field) is None and not (fmt == "text" and field in row):
        return f"has no {field!r} field (format {fmt}); fields: {sorted(row)}"
    if fmt in TURN_KEYS:
        who, what = TURN_KEYS[fmt]
        turns = row[field]
        if not isinstance(turns, list):
            return f"{field!r} must be a list of turns, got {type(turns).__name__}"
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get(who), str) and what in turn
                    and isinstance(turn[what], (str, type(None)))):
                return f"{field}[{i}] must be an object with a string {who!r} and a string {what!r}, got {_short(turn)}"
            if fmt == "sharegpt" and turn[who].lower() not in SHAREGPT_ROLES:
                return f"{field}[{i}]: unknown sharegpt speaker {turn[who]!r}; known: {sorted(SHAREGPT_ROLES)}"
        return None
    texts = ("instruction", "input", "output", "response") if fmt == "instruction" else ("text",)
    for key in texts:
        if not isinstance(row.get(key), (str, type(None))):
            return f"{key!r} must be a string, got {type(row[key]).__name__}"
    return None


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def document_files(folder: Path) -> list[Path]:
    """The .txt/.pdf files of a folder (recursively, sorted) when it holds no data files, else []."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if any(f.suffix.lower() in BUILDERS for f in files):
        return []
    return [f for f in files if f.suffix.lower() in DOCUMENT_SUFFIXES]


def document_text(path: Path) -> str:
    """The text of a .txt file, or of every page of a .pdf (pypdf's text extraction)."""
    if path.suffix.lower() != ".pdf":
        return path.read_text(encoding="utf-8", errors="replace")
    try:
        from pypdf import PdfReader
    except ImportError:
        raise ImportError(f"reading {path} needs the `pypdf` package: pip install pypdf") from None
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def chunk_text(text: str, max_tokens: int, tokenizer=None) -> list[str]:
    """`text` cut into consecutive pieces of at most `max_tokens` tokens (or words, without a tokenizer)."""
    size = max(1, max_tokens - SPECIAL_TOKEN_ROOM)
    if tokenizer is None:
        words = text.split()
        return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = (tokenizer.decode(ids[i : i + size]).strip() for i in range(0, len(ids), size))
    return [p for p in pieces if p]


def _load_documents(files: list[Path], max_seq_length: int, tokenizer=None):
    from datasets import Dataset, DatasetDict

    chunks = [c for f in files for c in chunk_text(document_text(f), max_seq_length, tokenizer)]
    if not chunks:
        raise DataFormatError(f"the documents {[str(f) for f in files]} hold no extractable text")
    return DatasetDict({"train": Dataset.from_dict({"text": chunks})})


def _load(path: str, *, max_seq_length: int = 1024, tokenizer=None):
    """A DatasetDict from a hub id, a local data file, a local folder of data files, or of documents."""
    from datasets import load_dataset

    p = Path(path).expanduser()
    if p.is_dir() and (docs := document_files(p)):
        return _load_documents(docs, max_seq_length, tokenizer)
    if p.is_file():
        builder = BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataFormatError(f"data.path {path!r}: unsupported file type {p.suffix!r}; use one of {sorted(BUILDERS)}")
        return load_dataset(builder, data_files={"train": str(p)})
    if p.is_dir():
        return load_dataset(str(p))
    if os.path.isabs(path) or path.startswith((".", "~")):
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    return load_dataset(path)  # a hub id


def has_response(row: dict[str, Any]) -> bool:
    """Whether a normalised row has something to learn (rows without are dropped)."""
    return len(row["completion"]) > 0


# Why `normalise_row` gives a row no response, by format: said when rows are dropped.
DROP_REASONS = {
    "sharegpt": "no 'gpt' turn after another turn",
    "messages": "no 'assistant' message after another message",
    "instruction": "no instruction before the answer",
    "text": "empty text",
}


def _normalise(ds, cfg: DataConfig):
    fmt = cfg.format if cfg.format != "auto" else detect_format(ds.column_names)
    out = ds.map(
        normalise_row,
        fn_kwargs={"fmt": fmt, "system_prompt": cfg.system_prompt},
        remove_columns=ds.column_names,
        keep_in_memory=True,
        desc=None,
    )
    return out.filter(has_response, keep_in_memory=True)


def split_names(available: list[str], cfg: DataConfig, path: str) -> tuple[str, str | None]:
    """(split to train on, split to validate on), or None for the second: hold out part of the train split.

    Validation rows: `validation_split` if named; else `validation_fraction` of the train split
    (fixed seed); else the data's own `validation` split; else 10% of train.
    """
    if cfg.split not in available:
        raise DataFormatError(f"data.split {cfg.split!r} not found in {path!r}; splits: {sorted(available)}")
    if cfg.validation_split:
        if cfg.validation_split not in available:
            raise DataFormatError(
                f"data.validation_split {cfg.validation_split!r} not found in {path!r}; splits: {sorted(available)}"
            )
        return cfg.split, cfg.validation_split
    if cfg.validation_fraction is None and "validation" in available and cfg.split != "validation":
        return cfg.split, "validation"
    return cfg.split, None


def holdout(n: int, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(train row indices, validation row indices) of a train split of `n` rows when no validation split is used.

    The same rows as `datasets`' `train_test_split(test_size, seed=HOLDOUT_SEED, shuffle=True)` gives
    (its numpy permutation), computed without `datasets` so a preflight check can use it too.
    """
    import math

    import numpy as np

    n_val = math.ceil((cfg.validation_fraction or DEFAULT_VALIDATION_FRACTION) * n)
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n).tolist()
    return order[n_val:], order[:n_val]


def load_splits(cfg: DataConfig, tokenizer=None):
    """(train, validation) Datasets in prompt-completion form, capped by max_train/eval_samples.

    `tokenizer` cuts documents (a folder of .txt/.pdf) into `max_seq_length`-token pieces, and
    tokenizes chat rows with assistant masks (`tokenize_chats`).
    Which rows validate: `split_names`, `holdout`.
    """
    dd = _load(cfg.path, max_seq_length=cfg.max_seq_length, tokenizer=tokenizer)
    train_name, val_name = split_names(list(dd), cfg, cfg.path)
    train = dd[train_name]
    if val_name is not None:
        val = dd[val_name]
    else:
        train_rows, val_rows = holdout(len(train), cfg)
        train, val = train.select(train_rows, keep_in_memory=True), train.select(val_rows, keep_in_memory=True)
    train, val = _normalise(train, cfg), _normalise(val, cfg)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.select(range(min(cfg.max_eval_samples, len(val))))
    if len(train) == 0 or len(val) == 0:
        raise DataFormatError(f"{cfg.path!r}: {len(train)} train and {len(val)} validation rows with a response; need >= 1 each")
    if tokenizer is not None:
        train, val = tokenize_chats(train, tokenizer), tokenize_chats(val, tokenizer)
    return train, val


# ---------------------------------------------------------------- batching (padding-free micro-batches)

IGNORE_INDEX = -100
BUCKETS_PER_OCTAVE = 4  # flattened lengths round up to 4 sizes per doubling: <= 25% padding, ~12% on average
# With CUDA graphs (graphs.py) every new length is a capture, and a host-bound step pays nothing for
# padding: 2 sizes per doubling (<= 50% padding) halve the captures of a trial.
GRAPH_BUCKETS_PER_OCTAVE = 2
MIN_BUCKET = 64


def bucket_length(n: int, per_octave: int = BUCKETS_PER_OCTAVE) -> int:
    """`n` rounded up to the next of a few fixed sizes, so the kernels see a handful of shapes.

    Sizes are multiples of `2**(floor(log2 n) - log2 per_octave)` (`per_octave` sizes per doubling,
    a power of two; never below `MIN_BUCKET`): with 4, a micro-batch of rows totalling 900 tokens
    runs as 1,024, one of 1,100 as 1,280.
    """
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(MIN_BUCKET, 1 << max(0, n.bit_length() - 1 - (per_octave.bit_length() - 1)))
    return -(-n // step) * step


class FlatCollator:
    """Padding-free micro-batches: the rows of a micro-batch concatenated into one sequence.

    Each row keeps its own position ids (0, 1, 2, ... from its first token), so the attention
    implementation confines every token to its own row: transformers detects the packed layout from
    the position ids (`masking_utils.find_packed_sequence_indices`; a block-diagonal causal mask for
    sdpa/eager/flex, sequence boundaries for flash-attention). A row's first label is masked, so no
    token is trained as the continuation of the row before it. The sequence is then padded up to
    `bucket_length` with one extra "row" of pad tokens whose labels are ignored, so the kernels see a
    handful of shapes instead of a new one every step.

    Returns {"input_ids", "labels", "position_ids"} of shape [1, L]; the row boundaries as
    flash-attention's varlen kernels take them ("cu_seq_lens_q/k", "max_length_q/k", the padding
    counted as one more row); and "num_tokens", the real (non-padding) tokens of the micro-batch,
    which the trainer pops before the forward.

    `row_slots` (for CUDA graphs, graphs.py): the row boundaries are padded with empty rows to
    `row_slots` rows and the maximum row length is the bucket length, so a micro-batch's shape
    depends on its bucket alone.
    """

    def __init__(self, pad_token_id: int, *, bucket: bool = True, per_octave: int = BUCKETS_PER_OCTAVE,
                 row_slots: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.bucket = bucket
        self.per_octave = per_octave
        self.row_slots = row_slots

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        # Host time the GPU waits for: rows arrive as Python lists, which numpy converts several times
        # faster than torch does; a token-by-token build took ~38 ms for 32 rows of 1,024 tokens on
        # 2 CPU cores, these whole-array operations ~6 ms.
        ids = [np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]
        labels = [np.asarray(ex["labels"] if "labels" in ex else ex["input_ids"], dtype=np.int64) for ex in examples]
        lengths = [len(r) for r in ids]
        n = sum(lengths)
        pad = (bucket_length(n, self.per_octave) if self.bucket else n) - n
        if pad:
            ids.append(np.full(pad, self.pad_token_id, dtype=np.int64))
            labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            lengths.append(pad)
        starts: np.ndarray = np.zeros(len(lengths) + 1, dtype=np.int64)
        starts[1:] = np.cumsum(lengths)
        # Position ids restart at 0 at every row (and at the padding, one more "row").
        positions = np.arange(n + pad, dtype=np.int64) - np.repeat(starts[:-1], lengths)
        labels = np.concatenate(labels)
        labels[starts[:-1]] = IGNORE_INDEX  # no row's first token is a target of the row before it
        longest = max(lengths)
        if self.row_slots is not None and len(lengths) <= self.row_slots:
            starts = np.concatenate([starts, np.full(self.row_slots - len(lengths), n + pad, dtype=np.int64)])
            longest = n + pad
        cu = torch.from_numpy(starts.astype(np.int32))
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(positions)[None],
            # Row boundaries for varlen attention kernels, built here on the host: derived from the
            # position ids on the GPU they would cost a device-to-host sync in every layer.
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(),
            "max_length_q": longest,
            "max_length_k": longest,
            "num_tokens": torch.tensor(n, dtype=torch.long),
        }
