"""Training data: load (`load_dataset`), pick the validation rows, and normalise every format
into TRL's *prompt-completion* form, so SFTTrainer puts the loss on the response tokens only.

Formats (`data.format`, or `auto` from the columns):

- `sharegpt`    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}  (FineTome-100k)
- `messages`    {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
- `instruction` {"instruction", "input" (optional), "output" | "response"}                (Alpaca)
- `text`        {"text": "<s>[INST] question [/INST] answer </s>"}                       (guanaco-llama2-1k)

Chat formats become {"prompt": [messages before the last assistant turn], "completion":
[that turn]}: TRL renders both with the tokenizer's chat template and masks the prompt.
`text` rows are split after their last `[/INST]` when they have one; rows without it get an
empty prompt, so the loss covers the whole text (plain language modelling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trial_worker.config import DataConfig

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}
INST_END = "[/INST]"
DEFAULT_VALIDATION_FRACTION = 0.1
HOLDOUT_SEED = 0  # fixed, not training.seed: every trial of a sweep must validate on the same rows

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


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


def _load(path: str):
    """A DatasetDict from a hub id, a local data file, or a local folder of data files."""
    from datasets import load_dataset

    p = Path(path).expanduser()
    if p.is_file():
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataFormatError(f"data.path {path!r}: unsupported file type {p.suffix!r}; use one of {sorted(_BUILDERS)}")
        return load_dataset(builder, data_files={"train": str(p)})
    if p.is_dir():
        return load_dataset(str(p))
    if os.path.isabs(path) or path.startswith((".", "~")):
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    return load_dataset(path)  # a hub id


def _normalise(ds, cfg: DataConfig):
    fmt = cfg.format if cfg.format != "auto" else detect_format(ds.column_names)
    out = ds.map(
        normalise_row,
        fn_kwargs={"fmt": fmt, "system_prompt": cfg.system_prompt},
        remove_columns=ds.column_names,
        keep_in_memory=True,
        desc=None,
    )
    return out.filter(lambda r: len(r["completion"]) > 0, keep_in_memory=True)


def load_splits(cfg: DataConfig):
    """(train, validation) Datasets in prompt-completion form, capped by max_train/eval_samples.

    Validation rows: `validation_split` if named; else `validation_fraction` of the train split
    (fixed seed); else the data's own `validation` split; else 10% of train.
    """
    dd = _load(cfg.path)
    if cfg.split not in dd:
        raise DataFormatError(f"data.split {cfg.split!r} not found in {cfg.path!r}; splits: {sorted(dd)}")
    train = dd[cfg.split]
    if cfg.validation_split:
        if cfg.validation_split not in dd:
            raise DataFormatError(
                f"data.validation_split {cfg.validation_split!r} not found in {cfg.path!r}; splits: {sorted(dd)}"
            )
        val = dd[cfg.validation_split]
    elif cfg.validation_fraction is None and "validation" in dd and cfg.split != "validation":
        val = dd["validation"]
    else:
        parts = train.train_test_split(test_size=cfg.validation_fraction or DEFAULT_VALIDATION_FRACTION,
                                       seed=HOLDOUT_SEED, shuffle=True)
        train, val = parts["train"], parts["test"]
    train, val = _normalise(train, cfg), _normalise(val, cfg)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.select(range(min(cfg.max_eval_samples, len(val))))
    if len(train) == 0 or len(val) == 0:
        raise DataFormatError(f"{cfg.path!r}: {len(train)} train and {len(val)} validation rows with a response; need >= 1 each")
    return train, val
