"""The sweep spec: a YAML file parsed with `yaml.safe_load` and validated with pydantic.

A spec is a job (`trial_worker.config.JobConfig`: model, data, training, budget) plus
the controller's sections: `search`, `resources`, `storage`, `tracking`. Without a
`search` section the same file is a training config (what `sweep export` writes).

`load_spec` reports every problem at once as a `SpecError`: file, line, field path,
value, and what is allowed. Nothing here imports torch, transformers, ray or optuna.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from trial_worker.config import (
    BudgetConfig,
    DataConfig,
    JobConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    Strict,
    TrainingConfig,
    apply_params,
    searchable_params,
)

# ---------------------------------------------------------------- search space


class Choice(Strict):
    type: Literal["choice"]
    values: list[Union[bool, int, float, str]] = Field(..., min_length=1)


class Uniform(Strict):
    type: Literal["uniform"]
    low: float = Field(..., allow_inf_nan=False)
    high: float = Field(..., allow_inf_nan=False)


class LogUniform(Strict):
    type: Literal["loguniform"]
    low: float = Field(..., allow_inf_nan=False)
    high: float = Field(..., allow_inf_nan=False)


class IntRange(Strict):
    type: Literal["int"]
    low: int = Field(..., ge=-(10**9), le=10**9)
    high: int = Field(..., ge=-(10**9), le=10**9)
    step: int = Field(1, gt=0, le=10**9)
    log: bool = False


Param = Annotated[Union[Choice, Uniform, LogUniform, IntRange], Field(discriminator="type")]


class SearchConfig(Strict):
    params: dict[str, Param] = Field(..., min_length=1, description="name -> distribution; names are HF/TRL knob names")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    num_trials: Optional[int] = Field(None, gt=0, le=100_000, description="trials to run (grid: default = every combination)")
    metric: Literal["val_loss"] = "val_loss"
    mode: Literal["min"] = "min"
    seed: int = Field(0, ge=0, lt=2**32)
    n_startup_trials: int = Field(4, ge=0, description="TPE: random trials before the model-based ones")


def _yaml_on_off(v: Any) -> Any:
    """YAML 1.1 (PyYAML's `safe_load`) reads unquoted on/off (and yes/no, true/false) as booleans: take them as
    the words the user wrote, so `packing: on` works unquoted, as the README and our messages write it."""
    if isinstance(v, bool):
        return "on" if v else "off"
    return v


# A setting whose values include "on" and "off": every such field of the spec uses this type (tests/spec).
OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]


class ResourcesConfig(Strict):
    gpus_per_trial: float = Field(1.0, ge=0.0, le=64)
    cpus_per_trial: float = Field(1.0, gt=0.0, le=1024)
    max_concurrent_trials: Optional[int] = Field(None, gt=0, le=10_000)
    max_failures: int = Field(0, ge=0, le=100, description="Ray retries of a failed trial from its last checkpoint")
    packing: OnOffAuto = Field(
        "auto", description="on: the trials on a GPU (or the CPU) train together in one warm process on one shared base, "
        "each with its own adapter, optimizer, schedule, batch and data order (trial_worker.pack); off: one trial per "
        "process; auto: packed on GPUs where a pack trains every setting as written, else one trial per process (trial_worker/pack: trials_pack)")


class WandbConfig(Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline"
    )
    project: Optional[str] = None
    entity: Optional[str] = None


class TrackingConfig(Strict):
    wandb: WandbConfig = Field(default_factory=lambda: WandbConfig(mode="disabled"))


class SweepSpec(JobConfig):
    """A search space file: a job plus what the controller needs to search over it."""

    search: Optional[SearchConfig] = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: Optional[str] = Field(None, description="SQLAlchemy URL of the study; default: SQLite beside the spec")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: Optional[str] = Field(
        None, description="Ray Tune's run folder (results, checkpoints, its saved state): a local or mounted "
        "folder (NFS), or a URI that Ray Tune writes through pyarrow.fs (s3://bucket/prefix, gs://bucket/prefix, "
        "hdfs://..., abfs://...); on several nodes it must be storage all nodes share. Default ./sweep_runs")

    @field_validator("output_dir")
    @classmethod
    def _output_dir_uri(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "://" in v:
            problem = run_storage_uri_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _storage_scheme(self):
        if self.storage is not None and not self.storage.split(":", 1)[0].startswith(("sqlite", "postgresql", "mysql")):
            raise ValueError(f"storage must be a SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...), got {_redact(self.storage)!r}")
        return self

    def search_params(self) -> Optional[dict]:
        """`search.params` as plain data (None without a search): what the values trials may take are."""
        return self.search.model_dump()["params"] if self.search else None

    def job(self) -> JobConfig:
        """The job part of the spec (what a trial worker receives)."""
        return JobConfig.of(self.model_dump())

    @property
    def num_trials(self) -> int:
        s = self.search
        if s is None:
            return 1
        if s.num_trials:
            return s.num_trials
        if s.sampler == "grid":
            return math.prod(len(p.values) for p in s.params.values())  # type: ignore[union-attr]
        return 20


# ------------------------------------------------------------------ errors


@dataclass
class Problem:
    path: str
    message: str
    value: Any = None
    line: Optional[int] = None
    has_value: bool = True

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        val = f" = {_short(self.value)}" if self.has_value else ""
        return f"{where}: {self.path or '<top>'}{val}: {self.message}"


class SpecError(Exception):
    """Everything wrong with one spec file, reported at once."""

    headline = "the spec is not valid"

    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems
        n = len(problems)
        lines = [f"{file}: {self.headline}, found {n} problem{'s' if n != 1 else ''}:"]
        lines += ["  " + p.render(file) for p in problems]
        super().__init__("\n".join(lines))


def _short(v: Any) -> str:
    """A value for a message: whole up to 240 characters (a path or URL stays whole), else cut."""
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 240 else s[:237] + "..."


def _redact(url: str) -> str:
    """A URL with its password (and any credential in its query: `_URI_CREDENTIALS`) replaced, for messages
    (never show secrets)."""
    import re

    url = re.sub(rf"((?:^|[?&])(?:{'|'.join(_URI_CREDENTIALS)})=)[^&]*", r"\1***", url)
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


# Section name -> model class, to list allowed keys for an unknown one.
_SECTION_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): SweepSpec,
    ("model",): ModelConfig,
    ("model", "quantization"): QuantizationConfig,
    ("model", "lora"): LoraConfig,
    ("data",): DataConfig,
    ("training",): TrainingConfig,
    ("budget",): BudgetConfig,
    ("search",): SearchConfig,
    ("resources",): ResourcesConfig,
    ("tracking",): TrackingConfig,
    ("tracking", "wandb"): WandbConfig,
}
_PARAM_MODELS: dict[str, type[BaseModel]] = {"choice": Choice, "uniform": Uniform, "loguniform": LogUniform, "int": IntRange}


def _allowed_keys(loc: tuple) -> Optional[list[str]]:
    parent = tuple(str(x) for x in loc[:-1])
    if len(parent) == 3 and parent[:2] == ("search", "params"):
        return None  # handled by the union tag
    if len(parent) == 4 and parent[:2] == ("search", "params"):
        model = _PARAM_MODELS.get(parent[3])
        return sorted(model.model_fields) if model else None
    model = _SECTION_MODELS.get(parent)
    return sorted(model.model_fields) if model else None


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        # Union members add their tag to the path (search.params.lr.loguniform.low): keep it readable.
        path_parts = [str(x) for x in loc]
        if len(loc) >= 4 and loc[:2] == ("search", "params") and loc[3] in _PARAM_MODELS:
            path_parts.pop(3)
        path = ".".join(path_parts)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown field" + (f"; did you mean {close[0]!r}?" if close else "") + (
                f" Allowed: {', '.join(allowed)}" if allowed else ""
            )
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg = "a search parameter needs `type:` one of choice, uniform, loguniform, int"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        value = e.get("input")
        if isinstance(value, str) and "://" in value:
            value = _redact(value)  # a URI with credentials is refused, and never echoed
        out.append(Problem(path, msg, value, has_value=e["type"] != "missing"))
    return out


# ------------------------------------------------------------ cross-field rules


def check_rules(spec: SweepSpec) -> list[Problem]:
    """Rules that span fields; each returns a Problem naming the field, the value and what is allowed."""
    problems: list[Problem] = []
    job = spec.job()
    if spec.search is not None:
        allowed = searchable_params()
        for name, p in spec.search.params.items():
            path = f"search.params.{name}"
            if name not in allowed:
                close = difflib.get_close_matches(name, list(allowed), n=1)
                problems.append(Problem(path, "not a searchable knob" + (f"; did you mean {close[0]!r}?" if close else "")
                                        + f" Searchable: {', '.join(sorted(allowed))}", name))
                continue
            if isinstance(p, (Uniform, LogUniform, IntRange)):
                if p.low > p.high:
                    problems.append(Problem(path + ".low", f"low ({p.low}) is greater than high ({p.high}); need low <= high", p.low))
                    continue
                if isinstance(p, LogUniform) or (isinstance(p, IntRange) and p.log):
                    if p.low <= 0:
                        problems.append(Problem(path + ".low", "a log-scale range needs low > 0", p.low))
                        continue
                values: list[Any] = [p.low, p.high]
            else:
                values = list(p.values)
            for v in values:
                try:
                    apply_params(job, {name: v})
                except ValidationError as e:
                    reason = e.errors()[0]["msg"].removeprefix("Value error, ")
                    problems.append(Problem(path, f"value {v!r} is not allowed for {name}: {reason}", v))
                    break
        if spec.search.sampler == "grid":
            bad = [n for n, p in spec.search.params.items() if not isinstance(p, Choice)]
            if bad:
                problems.append(Problem("search.sampler", f"grid search needs `type: choice` for every param; not choice: {', '.join(bad)}", "grid"))
    if spec.resources.gpus_per_trial > 1 and spec.resources.gpus_per_trial != int(spec.resources.gpus_per_trial):
        problems.append(Problem("resources.gpus_per_trial", "above 1, GPUs per trial must be a whole number", spec.resources.gpus_per_trial))
    if job.training.use_cpu and spec.resources.gpus_per_trial > 0:
        problems.append(Problem("resources.gpus_per_trial", "training.use_cpu is true, so trials need 0 GPUs", spec.resources.gpus_per_trial))
    share, cap = spec.resources.gpus_per_trial, job.training.gpu_memory_fraction
    if cap is not None and 0 < share < 1 and cap > share:
        problems.append(Problem("training.gpu_memory_fraction", f"trials share a GPU (resources.gpus_per_trial: {share:g}), so each may "
                                f"cap its memory at {share:g} at most (leave it unset for exactly that)", cap))
    from trial_worker.entry import PackingRefused, trials_pack

    try:  # the plan's own packing decision, without the cluster's GPUs
        trials_pack(spec.resources.model_dump(), job.model_dump(mode="json"), spec.search_params())
    except PackingRefused as e:
        problems += [Problem(field, why, value) for field, value, why in e.problems]
    q = job.model.quantization
    if job.training.bf16 and q.load_in_4bit and q.bnb_4bit_compute_dtype == "float16":
        problems.append(Problem("model.quantization.bnb_4bit_compute_dtype", "training.bf16 is true: use bfloat16 compute (or fp16 training)", "float16"))
    if job.training.fp16 and q.load_in_4bit and q.bnb_4bit_compute_dtype == "bfloat16":
        problems.append(Problem("model.quantization.bnb_4bit_compute_dtype", "training.fp16 is true: use float16 compute (or bf16 training)", "bfloat16"))
    return problems


# ------------------------------------------------------------------ loading


def _line_of(root: Optional[yaml.Node], path: str) -> Optional[int]:
    node, line = root, None
    for part in path.split(".") if path else []:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if str(k.value) == part:
                    nxt, line = v, k.start_mark.line + 1
                    break
            if nxt is None:
                return line if line else (node.start_mark.line + 1)
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_spec(text: str, file: str = "<spec>", *, default_name: Optional[str] = None) -> SweepSpec:
    """Parse and validate spec text; raise SpecError listing every problem."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise SpecError(file, [Problem("", f"not valid YAML: {e.problem or e}" + (" (only plain YAML is accepted: no !!python tags)" if "python" in str(e) else ""), line=line, has_value=False)]) from None
    except yaml.YAMLError as e:
        raise SpecError(file, [Problem("", f"not valid YAML: {e}", has_value=False)]) from None
    if data is None:
        raise SpecError(file, [Problem("", "the file is empty; a spec needs at least model, data and budget sections", has_value=False)])
    if not isinstance(data, dict):
        raise SpecError(file, [Problem("", f"the top level must be a mapping of sections, got {type(data).__name__}", data)])
    if default_name and "name" not in data:
        data["name"] = default_name
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        problems = _pydantic_problems(e) + _rules_despite(data, e)
    else:
        problems = check_rules(spec)
    if problems:  # in the file's order
        raise SpecError(file, sorted(locate(problems, root), key=lambda p: p.line or 0))
    return spec


def _rules_despite(data: dict, error: ValidationError) -> list[Problem]:
    """The cross-field rules (`check_rules`) on what did validate, so that one report holds every problem.

    Each field pydantic refused is taken out (its default stands in) and the rest validated again; the
    rules' problems on other fields are kept. None when a field that has no default is missing or refused.
    """
    pruned, refused = copy.deepcopy(data), []
    for _ in range(8):  # each round takes out what the previous one refused (a section's own rule, ...)
        errors = error.errors()
        if any(e["type"] == "missing" for e in errors):
            return []
        taken = [loc for e in errors if (loc := _take_out(pruned, e["loc"]))]
        if not taken:
            return []
        refused += taken
        try:
            spec = SweepSpec.model_validate(pruned)
        except ValidationError as again:
            error = again
            continue
        return [p for p in check_rules(spec)
                if not any(p.path == r or p.path.startswith(r + ".") or r.startswith(p.path + ".") for r in refused)]
    return []


def _take_out(data: Any, loc: tuple) -> Optional[str]:
    """Remove the value at pydantic's `loc` from `data` (a union's tag in the path is skipped); its dotted path,
    or None when there is nothing to remove."""
    node, path = data, []  # type: Any, list[Any]
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            if last:
                del node[part]
                return ".".join(map(str, path + [part]))
            node, path = node[part], path + [part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            if last:
                return None  # an item of a list: its field cannot fall back to a default
            node, path = node[part], path + [part]
        elif not (isinstance(part, str) and part in _PARAM_MODELS):
            return None
    return None


def locate(problems: list[Problem], root: Optional[yaml.Node]) -> list[Problem]:
    """`problems` with the line of their field in the spec's YAML (`root`: `yaml.compose` of its text)."""
    for p in problems:
        p.line = _line_of(root, p.path)
    return problems


def load_spec(path: Union[str, Path]) -> SweepSpec:
    """Read a spec file. Relative local paths in it resolve against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(str(path), [Problem("", "no such file", has_value=False)]) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise SpecError(str(path), [Problem("", f"cannot read the file: {e}", has_value=False)]) from None
    stem = "".join(c if (c.isalnum() or c in "_.-") else "_" for c in p.stem) or "sweep"
    return parse_spec(text, str(path), default_name=stem)


def resolve_paths(spec: SweepSpec, base_dir: Union[str, Path]) -> SweepSpec:
    """The spec with its local model/data paths absolute against its folder (`JobConfig.resolved`)."""
    return spec.resolved(base_dir)


# What Ray Tune's `RunConfig(storage_path=...)` reads through pyarrow.fs (`FileSystem.from_uri`) besides a local path.
RUN_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# Credentials pyarrow would take from an s3:// URI: they belong in the environment, never in a spec the study records.
_URI_CREDENTIALS = ("access_key", "secret_key", "session_token")


def is_uri(path: str) -> bool:
    """Whether a run folder setting is a URI (s3://...) rather than a local or mounted path."""
    return "://" in path


def run_storage_uri_problem(uri: str) -> Optional[str]:
    """Why `uri` cannot be the run folder (`output_dir`), or None. Only its form is checked (no network)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    allowed = ", ".join(f"{s}://" for s in RUN_STORAGE_SCHEMES)
    if parts.scheme == "file":
        return f"write a local or mounted folder as a plain path ({parts.path!r}), not a file:// URI"
    if parts.scheme not in RUN_STORAGE_SCHEMES:
        return (f"URI scheme {parts.scheme!r} is not one Ray Tune's storage reads; allowed: a local or mounted folder "
                f"(NFS), or {allowed}")
    if not parts.netloc:
        return f"{parts.scheme}:// needs a bucket (or host): {parts.scheme}://BUCKET/PREFIX"
    secrets = sorted(k for k in parse_qs(parts.query) if k in _URI_CREDENTIALS)
    if parts.password is not None or secrets:
        return ("credentials do not go in the spec (the study records it): give them in the environment of every "
                "node (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)"
                + (f"; found {', '.join(secrets)}" if secrets else "; found user:password@"))
    return None


def run_storage(spec: SweepSpec) -> str:
    """Where Ray Tune keeps the sweep's run folders (`RunConfig(storage_path=...)`): a URI exactly as written
    (Ray opens it with pyarrow.fs, query parameters such as `endpoint_override` included), else the local or
    mounted folder made absolute (default ./sweep_runs)."""
    out = spec.output_dir or "sweep_runs"
    return out if is_uri(out) else str(Path(out).expanduser().resolve())


def default_storage(spec: SweepSpec, spec_path: Union[str, Path]) -> str:
    """SQLite file beside the spec, named after it."""
    folder = Path(spec_path).resolve().parent
    return f"sqlite:///{folder / (spec.name + '.db')}"


def spec_hash(spec: SweepSpec) -> str:
    """A stable hash of the validated spec (to notice edits between run and resume)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def public_dict(spec: SweepSpec) -> dict:
    """The spec as plain data with the storage password removed (safe to store and export)."""
    d = spec.model_dump(mode="json")
    if d.get("storage"):
        d["storage"] = _redact(d["storage"])
    return d
