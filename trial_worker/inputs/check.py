"""A job's data and model checked before anything starts, in about a second.

`check_data` reads local data files with the standard library (pyarrow for parquet), never with
`datasets`, and applies the worker's own rules to the rows: the format (`data.detect_format`), the
fields a format needs (`data.row_problem`), which rows validate (`data.split_names`, `data.holdout`)
and which rows are dropped for having no response (`data.normalise_row`, `data.has_response`). A file
that passes loads with `data.load_splits`. `check_model` looks at a model folder's file names (and
`tokenizer_config.json`), never loading a tokenizer or weights.

Both return a `Findings`: problems that stop a run and warnings that do not, each naming the spec
field it is about and its value. Hub ids are checked only while offline (`HF_HUB_OFFLINE`): a hub id
that is not in the local cache cannot load then.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trial_worker.config import ALL_LINEAR_LLAMA, DataConfig, JobConfig, ModelConfig, targeted
from trial_worker.data import (
    BUILDERS,
    DROP_REASONS,
    FORMAT_FIELDS,
    DataFormatError,
    detect_format,
    document_files,
    has_response,
    holdout,
    normalise_row,
    row_problem,
    split_names,
)

CHAT_FORMATS = ("sharegpt", "messages", "instruction")

# `datasets`' split keywords in data file names (datasets.data_files.SPLIT_KEYWORDS; not imported from
# there, as importing `datasets` alone takes longer than this whole check; a test keeps the two equal).
SPLIT_KEYWORDS = {
    "train": ["train", "training"],
    "validation": ["validation", "valid", "dev", "val"],
    "test": ["test", "testing", "eval", "evaluation"],
}
_NON_WORD = "-._ 0123456789"

# A tokenizer a model folder can be loaded with: any one of these sets of files.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",),
                   ("tekken.json",))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Finding:
    field: str    # the spec field it is about: data.path, model.name_or_path, ...
    value: Any    # that field's value
    message: str  # what is wrong (or worth knowing), and what is allowed


@dataclass
class Findings:
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    format: Optional[str] = None  # the data format found (auto resolved), when the rows were read
    # {"train": rows, "validation": rows}: the normalised rows the worker trains and validates on (those with a
    # response, capped as the worker caps them), for the check of their tokens (`check_lengths`)
    used: dict = field(default_factory=dict)


def offline() -> bool:
    """Whether Hugging Face downloads are switched off (HF_HUB_OFFLINE, or the older TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _looks_local(path: str) -> bool:
    """A path no hub id can be: absolute, ~ or ./ relative, a data file name, or more than owner/name."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or Path(path).suffix.lower() in BUILDERS
            or path.count("/") > 1)


def _hub_cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if repo_type == "dataset":  # `datasets`' own prepared copy also loads offline
        home = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return (home / repo_id.replace("/", "___")).is_dir()
    return False


def _missing(field_name: str, value: str, what: str, repo_type: str, hub: bool) -> list[Finding]:
    """Problems for a path that does not exist locally (none for a hub id that may load)."""
    if _looks_local(value):
        return [Finding(field_name, value, f"no such {what}: {value}")]
    if hub and offline() and not _hub_cached(value, repo_type):
        return [Finding(field_name, value, f"not a local {what} and not in the Hugging Face cache, and downloads are "
                        f"off (HF_HUB_OFFLINE): give a local {what}, or download it first (unset HF_HUB_OFFLINE)")]
    return []


# ----------------------------------------------------------------------------- data


class _Bad(Exception):
    """A data file that cannot be read as rows: FILE[:LINE]: why."""


def _split_of(file: Path, root: Path) -> str:
    """The split `datasets` gives a data file of a folder, from the keywords in its path (else train)."""
    parts = [p.lower() for p in file.relative_to(root).parts]
    for split, words in SPLIT_KEYWORDS.items():
        for w in words:
            for part in parts[:-1]:  # a folder named for the split
                if part == w:
                    return split
            name = parts[-1]
            i = name.find(w)
            while i >= 0:
                before, after = name[i - 1:i] if i else "", name[i + len(w):i + len(w) + 1]
                if (not before or before in _NON_WORD) and after and after in _NON_WORD:
                    return split
                i = name.find(w, i + 1)
    return "train"


def _read_rows(file: Path) -> list[tuple[str, dict]]:
    """[(where, row)] of one data file; `where` is FILE:LINE (or FILE: row N) for messages."""
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) for a file that is not parquet
            raise _Bad(f"{file}: not a readable parquet file: {e}") from None
        return [(f"{file}: row {i}", r) for i, r in enumerate(rows, 1)]
    if suffix == ".csv":
        with open(file, newline="", encoding="utf-8", errors="replace") as f:
            return [(f"{file}:{i}", r) for i, r in enumerate(csv.DictReader(f), 2)]
    if suffix == ".arrow":
        return []  # Arrow files are not read here: the worker's loader checks them
    data = file.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise _Bad(f"{file}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x}); "
                   "a data file is JSON lines in UTF-8") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = _parse(text)
        except ValueError as e:
            raise _Bad(f"{file}:{getattr(e, 'lineno', 1)}: not valid JSON: {getattr(e, 'msg', e)}") from None
        if all(isinstance(x, str) for x in items):  # a list of strings is read as a `text` column
            items = [{"text": x} for x in items]
        for i, x in enumerate(items, 1):
            if not isinstance(x, dict):
                raise _Bad(f"{file}: item {i} is a {type(x).__name__}; a JSON list must hold objects (one per row)")
        return [(f"{file}: item {i}", x) for i, x in enumerate(items, 1)]
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{file}:{i}"
        try:
            row = _parse(line)
        except ValueError as e:
            what = getattr(e, "msg", str(e))
            col = f" (column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            raise _Bad(f"{where}: not valid JSON: {what}{col}; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise _Bad(f"{where}: a row must be a JSON object {{...}}, got {type(row).__name__} {_shorten(line)}")
        rows.append((where, row))
    return rows


def _parse(text: str) -> Any:
    """JSON as Arrow's reader (which `datasets` uses) takes it: no NaN/Infinity, no key twice in one object,
    no lone UTF-16 surrogate escapes (Python's `json` accepts all three)."""
    value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeated_key)
    if "\\ud" in text.lower():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text") from None
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_repeated_key(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"key {twice!r} appears twice in one object")
    return out


def _shorten(s: str, n: int = 60) -> str:
    s = s.strip()
    return s if len(s) <= n else s[:n - 3] + "..."


def _json_type(value: Any, where: str = "") -> Any:
    """The type Arrow's JSON reader (which `datasets` uses) gives a value (at field path `where`): None (null:
    takes any type), "boolean", "number" (integers and floats mix), "string", ("list", element type) or
    ("struct", {key: type})."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: a bool is an int to Python, not to Arrow
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element = None
        for v in value:
            element = _merge_types(element, _json_type(v, where + "[]"), where + "[]")
        return ("list", element)
    return ("struct", {k: _json_type(v, f"{where}.{k}" if where else k) for k, v in value.items()})


class _TypeClash(Exception):
    def __init__(self, where: str, a: Any, b: Any):
        super().__init__(where)
        self.where, self.a, self.b = where, a, b


def _type_name(t: Any) -> str:
    return {"boolean": "a boolean", "number": "a number", "string": "a string", "list": "a list",
            "struct": "an object"}[t if isinstance(t, str) else t[0]]


def _merge_types(a: Any, b: Any, where: str) -> Any:
    """The type of a column holding values of types `a` and `b`, as Arrow infers it; `_TypeClash` where it has none."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            return ("list", _merge_types(a[1], b[1], where + "[]"))
        fields = dict(a[1])
        for k, t in b[1].items():
            fields[k] = _merge_types(fields.get(k), t, f"{where}.{k}" if where else k)
        return ("struct", fields)
    raise _TypeClash(where, a, b)


def _mixed_types(rows: list[tuple[str, dict]]) -> Optional[str]:
    """FILE:LINE of the first row with a field whose type differs from the same field's in earlier rows (a
    number and a boolean, a string and a number, a list and an object...): Arrow's JSON reader, and so the
    worker's loader, refuses such a file."""
    merged: Any = None
    for where, row in rows:
        try:
            merged = _merge_types(merged, _json_type(row), "")
        except _TypeClash as e:
            return (f"{where}: field {e.where!r} is {_type_name(e.b)} here and {_type_name(e.a)} in an earlier row; "
                    "a field must keep one type in every row (null may stand for any)")
    return None


def _uniform_turns(rows: list[tuple[str, dict]], fmt: str) -> Optional[str]:
    """FILE:LINE of the first turn whose keys differ from the file's first turn: `datasets` stores such
    turns as JSON text, which the worker cannot read as turns."""
    key, first = FORMAT_FIELDS[fmt], None
    for where, row in rows:
        for turn in row.get(key) or []:
            if first is None:
                first = set(turn)
            elif set(turn) != first:
                return (f"{where}: {key} has a turn with keys {sorted(turn)}, another with {sorted(first)}; "
                        "every turn of a file needs the same keys")
    return None


def check_data(cfg: DataConfig, *, hub: bool = True) -> Findings:
    """Findings about `cfg.path` (resolved, see `JobConfig.resolved`): see the module doc."""
    out = Findings()
    path = Path(cfg.path).expanduser()
    if not path.exists():
        out.problems += _missing("data.path", cfg.path, "file or folder", "dataset", hub)
        return out
    if path.is_dir():
        if document_files(path):
            return out  # documents: plain text, every row has a response
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            out.problems.append(Finding("data.path", cfg.path, f"the folder {cfg.path} holds no data files ({', '.join(sorted(BUILDERS))}) "
                                        "and no documents (.txt, .pdf)"))
            return out
    elif path.suffix.lower() not in BUILDERS:
        out.problems.append(Finding("data.path", cfg.path, f"{cfg.path}: unsupported file type {path.suffix!r}; use one of "
                                    f"{', '.join(sorted(BUILDERS))}, or a folder of them"))
        return out
    else:
        files = [path]
    splits: dict[str, list[tuple[str, dict]]] = {}
    try:
        for f in files:
            if f.suffix.lower() == ".arrow":
                return out
            rows = _read_rows(f)
            if not rows:
                raise _Bad(f"{f}: no rows (the file is empty)")
            splits.setdefault(_split_of(f, path) if path.is_dir() else "train", []).extend(rows)
        train_name, val_name = split_names(list(splits), cfg, cfg.path)
        fmts = {name: cfg.format if cfg.format != "auto" else detect_format(sorted({k for _, r in rows for k in r}))
                for name, rows in splits.items() if name in (train_name, val_name)}
        for name in fmts:
            if (why := _mixed_types(splits[name])) is not None:
                raise _Bad(why)
        for name, fmt in fmts.items():
            for where, row in splits[name]:
                if (why := row_problem(row, fmt)) is not None:
                    raise _Bad(f"{where}: {why}")
            if fmt in ("sharegpt", "messages") and (why := _uniform_turns(splits[name], fmt)):
                raise _Bad(why)
    except (_Bad, DataFormatError) as e:
        out.problems.append(Finding("data.path", cfg.path, str(e)))
        return out
    out.format = fmts[train_name]
    train = [r for _, r in splits[train_name]]
    if val_name is None:
        train_rows, val_rows = holdout(len(train), cfg)
        train, val = [train[i] for i in train_rows], [train[i] for i in val_rows]
    else:
        val = [r for _, r in splits[val_name]]
    kept, dropped = {}, []
    caps = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples}
    for name, used, fmt in (("train", train, fmts[train_name]), ("validation", val, fmts[val_name or train_name])):
        answered = [n for n in (normalise_row(r, fmt, cfg.system_prompt) for r in used) if has_response(n)]
        kept[name] = len(answered)
        out.used[name] = answered[:caps[name]] if caps[name] else answered
        if kept[name] < len(used):
            dropped.append(f"{cfg.path}: {len(used) - kept[name]} of {len(used)} {name} rows are dropped: {DROP_REASONS[fmt]}")
    if not kept["train"] or not kept["validation"]:
        out.problems.append(Finding("data.path", cfg.path, f"{cfg.path}: {kept['train']} train and {kept['validation']} validation "
                                    f"rows with a response (format {out.format}); need >= 1 each"
                                    + "".join(f"; {d}" for d in dropped)))
    else:
        out.warnings += [Finding("data.path", cfg.path, d) for d in dropped]
    return out


# ---------------------------------------------------------------------------- model


def check_model(cfg: ModelConfig, *, chat: bool, hub: bool = True) -> Findings:
    """Findings about the model folder `cfg.name_or_path` (resolved): a config, weights, tokenizer files, and
    (`chat`: the data is conversations) a chat template."""
    out = Findings()
    name = cfg.name_or_path
    path = Path(name).expanduser()
    if not path.exists():
        out.problems += _missing("model.name_or_path", name, "model folder", "model", hub)
        return out
    if not path.is_dir():
        out.problems.append(Finding("model.name_or_path", name, f"{name} is a file; a model is a folder with config.json, "
                                    "weights and tokenizer files (as `save_pretrained` writes)"))
        return out
    files = {p.name for p in path.iterdir()}
    lacks = []
    if "config.json" not in files:
        lacks.append("config.json")
    if not any(f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json") for f in files):
        lacks.append(f"weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES[:2])})")
    if not any(all(f in files for f in group) for group in TOKENIZER_FILES):
        lacks.append("tokenizer files (" + ", ".join(" + ".join(g) for g in TOKENIZER_FILES) + ")")
    if lacks:
        out.problems.append(Finding("model.name_or_path", name, f"the model folder {name} has no {'; no '.join(lacks)}"))
        return out
    weight_problems, tensors = _weights_problems(path, files)
    for why in weight_problems:
        out.problems.append(Finding("model.name_or_path", name, why))
    if out.problems:
        return out
    _check_targets(cfg, tensors, out)
    if chat and not _has_chat_template(path, files):
        out.warnings.append(Finding("model.name_or_path", name, "the tokenizer has no chat template; conversations "
                                    "are rendered with the worker's fallback template (trial_worker.model)"))
    return out


SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header


def _weights_problems(folder: Path, files: set[str]) -> tuple[list[str], set[str]]:
    """(What is wrong with a model folder's weight files, the tensor names of its safetensors headers), read only
    as far as their headers: an index
    (`*.index.json`) that does not parse or names shards that are not there, and a safetensors file whose
    header is cut short, does not parse, or describes more tensor bytes than the file holds (a copy or a
    download cut short); a PyTorch zip checkpoint (`.bin`) whose zip directory cannot be read."""
    import struct
    import zipfile

    problems, shards, names = [], set(), set()
    for index in sorted(f for f in files if f.endswith(".index.json")):
        try:
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            named = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"the weights index {folder / index} cannot be read ({type(e).__name__}: {e}); "
                            "it must be JSON with a 'weight_map' of tensor -> shard file")
            continue
        missing = sorted(n for n in named if not (folder / n).is_file())
        if missing:
            problems.append(f"the weights index {folder / index} names {len(missing)} shard file(s) that are not in the "
                            f"folder: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        shards |= {n for n in named if n not in missing}
    safetensors = sorted({f for f in files if f.endswith(".safetensors")} | {n for n in shards if n.endswith(".safetensors")})
    for f in safetensors:
        path = folder / f
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is None or n > min(size - 8, SAFETENSORS_MAX_HEADER):
                    problems.append(f"the weights file {path} is cut short or not safetensors: {size} bytes, "
                                    + ("too short for a header" if n is None else f"its header claims {n} bytes"))
                    continue
                header = json.loads(fh.read(n))
        except OSError as e:
            problems.append(f"the weights file {path} cannot be read: {e}")
            continue
        except ValueError as e:
            problems.append(f"the weights file {path} has a damaged safetensors header (not JSON: {e})")
            continue
        names |= {k for k in header if k != "__metadata__"}
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
        if len(ends) < sum(1 for k in header if k != "__metadata__"):
            problems.append(f"the weights file {path} has a damaged safetensors header (a tensor without data_offsets)")
        elif ends and 8 + n + max(ends) > size:
            problems.append(f"the weights file {path} is cut short: its header describes {8 + n + max(ends)} bytes, "
                            f"the file holds {size}; copy or download it again")
    if not safetensors:
        for f in sorted(f for f in files | shards if f.endswith(".bin")):
            path = folder / f
            try:
                with open(path, "rb") as fh:
                    zipped = fh.read(2) == b"PK"
                if zipped:
                    zipfile.ZipFile(path).close()  # reads the zip's central directory, at the end of the file
            except (OSError, zipfile.BadZipFile) as e:
                problems.append(f"the weights file {path} is cut short or damaged (its zip directory cannot be read: {e}); "
                                "copy or download it again")
    return problems, names


def weight_modules(tensors: set[str]) -> set[str]:
    """The module paths that hold a weight (`model.layers.0.self_attn.q_proj`), from a checkpoint's tensor names
    (a 4-bit checkpoint's `....weight.absmax` and the like included)."""
    import re

    return {m.group(1) for t in tensors if (m := re.match(r"^(.+)\.weight(?:\..+)?$", t))}


def layer_names(modules: set[str]) -> list[str]:
    """The short names `target_modules` may use (`q_proj`, `qkv_proj`, `dense_h_to_4h`...): the modules inside a
    decoder block (`...layers.N.self_attn.q_proj`, `h.N.attn.c_attn`), not its norms."""
    import re

    out = set()
    for module in modules:
        m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.(.+)$", module)
        if m and "." in m.group(1) and "norm" not in (short := m.group(1).rsplit(".", 1)[-1]) and not short.startswith("ln"):
            out.add(short)
    return sorted(out)


def _check_targets(cfg: ModelConfig, tensors: set[str], out: Findings) -> None:
    """`model.lora.target_modules` against the layers the checkpoint holds (read from its safetensors headers):
    none of them there is a problem (PEFT would stop every trial with "Target modules ... not found"), some of
    them missing a warning (LoRA then trains only on those found). Quiet where the layers cannot be read."""
    targets = cfg.lora.target_modules
    modules = weight_modules(tensors)
    if targets == "all-linear" or not modules:
        return
    # PEFT's matching of a list: a module whose path is the entry or ends with "." + the entry
    missing = [t for t in targets if not any(targeted(m, [t]) for m in modules)]
    if not missing:
        return
    layers = layer_names(modules)
    has = f"its decoder's layers are {', '.join(layers)}" if layers else f"it has {', '.join(sorted(modules)[:20])}"
    default = "(the default: Llama's layer names) " if list(targets) == ALL_LINEAR_LLAMA else ""
    if len(missing) == len(targets):
        out.problems.append(Finding("model.lora.target_modules", list(targets), (
            f"{default}names none of the layers of the model {cfg.name_or_path}: {has}; "
            "name some of them, or write all-linear")))
    else:
        found = [t for t in targets if t not in missing]
        out.warnings.append(Finding("model.lora.target_modules", list(targets), (
            f"{default}{', '.join(missing)} {'names' if len(missing) == 1 else 'name'} no layer of the model {cfg.name_or_path} ({has}), so LoRA trains "
            f"{', '.join(found)} only; name the layers you mean, or write all-linear")))


def _has_chat_template(path: Path, files: set[str]) -> bool:
    if {"chat_template.jinja", "chat_template.json"} & files or any(f.startswith("additional_chat_templates") for f in files):
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def check_job(job: JobConfig, *, hub: bool = True, searched_lengths: tuple[int, ...] = ()) -> Findings:
    """`check_data` and `check_model` of a job (paths resolved), together; a chat template is looked for
    when the data is conversations, and when both pass, the rows' tokens are checked (`check_lengths`)."""
    data = check_data(job.data, hub=hub)
    fmt = data.format or job.data.format
    model = check_model(job.model, chat=fmt in CHAT_FORMATS, hub=hub)
    found = Findings(problems=data.problems + model.problems, warnings=data.warnings + model.warnings, format=data.format)
    if not found.problems and fmt in CHAT_FORMATS and data.used:
        lengths = check_lengths(job, data.used, searched_lengths)
        found.problems += lengths.problems
        found.warnings += lengths.warnings
    return found


# ---------------------------------------------------------------------------- tokens

LENGTH_CHECK_ROWS = 2000  # rows per split whose tokens are counted (about a millisecond each)


class FolderTokenizer:
    """A model folder's own tokenizer (its `tokenizer.json`, through the `tokenizers` library) and chat template
    (rendered with jinja2 as transformers renders it), with the two calls the worker's `data.tokenize_chat`
    makes: the same tokens and the same completion mask as `trial_worker.model.load_tokenizer` gives, without
    importing transformers (and torch), so the preflight check stays about a second."""

    def __init__(self, folder: Path):
        import jinja2.ext
        import jinja2.sandbox
        from tokenizers import Tokenizer

        from trial_worker.model import FALLBACK_CHAT_TEMPLATE

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            config = {}
        config = config if isinstance(config, dict) else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        self.special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
                        if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None}
        class Generation(jinja2.ext.Extension):
            """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers), rendered as its body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols, Generation])

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        self.template = env.from_string(template or FALLBACK_CHAT_TEMPLATE)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def __call__(self, texts: list[str], add_special_tokens: bool = False, return_offsets_mapping: bool = True) -> dict:
        """As a transformers tokenizer called on a list of texts (`data.tokenize_chat` calls it so)."""
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs], "offset_mapping": [e.offsets for e in encs]}


def check_lengths(job: JobConfig, used: dict, searched: tuple[int, ...] = ()) -> Findings:
    """Rows that keep no response token within `data.max_seq_length` (the trainer keeps a row's first
    max_seq_length tokens and drops a row with no response token among them): a problem when a split keeps
    none, else a warning with the count. Counted with the model folder's own tokenizer and template on the
    rows the worker uses (up to `LENGTH_CHECK_ROWS` a split); a hub model, or a folder without a
    `tokenizer.json`, is not checked here (the worker says it when it tokenizes). `searched`: the lengths a search
    may give a trial (`search.params.max_seq_length`), each a problem when it leaves a split no row (those trials
    would fail)."""
    from trial_worker.data import DataFormatError, tokenize_chat

    out = Findings()
    folder = Path(job.model.name_or_path).expanduser()
    if not (folder / "tokenizer.json").is_file():
        return out
    try:
        tok = FolderTokenizer(folder)
    except Exception:  # noqa: BLE001 - a tokenizer or template this light reader cannot take: the worker checks it
        return out
    limit = job.data.max_seq_length
    for name, rows in used.items():
        checked = rows[:LENGTH_CHECK_ROWS]
        first = []  # each row's first response token (None: none)
        for row in checked:
            try:
                enc = tokenize_chat(tok, list(row["prompt"]) + list(row["completion"]))
            except DataFormatError as e:
                out.problems.append(Finding("model.name_or_path", job.model.name_or_path, str(e)))
                return out
            except Exception:  # noqa: BLE001 - a template error this reader does not share with transformers
                return Findings()
            first.append(next((i for i, m in enumerate(enc["completion_mask"]) if m), None))
        for value in sorted(set(searched)):
            if checked and all(f is None or f >= value for f in first):
                out.problems.append(Finding("search.params.max_seq_length", value, (
                    f"a trial given max_seq_length {value} keeps no {name} row with a response token (every prompt of "
                    f"the {'first ' if len(checked) < len(rows) else ''}{len(checked)} fills it): its trials would fail; "
                    "leave it out of the search")))
        short = sum(f is None or f >= limit for f in first)
        if not short:
            continue
        of = f"{short} of {'the first ' if len(checked) < len(rows) else ''}{len(checked)} {name} rows"
        what = (f"{of} keep no response token within data.max_seq_length = {limit} (their prompt fills it: the trainer "
                f"keeps a row's first {limit} tokens and drops a row with no response token among them)")
        if short == len(checked):
            out.problems.append(Finding("data.max_seq_length", limit, f"{what}; nothing is left to "
                                        f"{'train' if name == 'train' else 'validate'} on: raise data.max_seq_length"))
        else:
            out.warnings.append(Finding("data.max_seq_length", limit, f"{what}; they are dropped"))
    return out
