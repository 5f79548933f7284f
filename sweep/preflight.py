"""Preflight: a spec's data, model and storage checked before a sweep creates or touches anything.

`sweep run` and `sweep resume` call `preflight` before they create or open a study, register its
name or start Ray, so bad input costs a second and leaves nothing behind: the data path exists, its
rows parse and have the format's fields, at least one train and one validation row has a response
(the worker's own split and drop rules, `trial_worker.inputs.check`), the model folder has a config,
weights and tokenizer files, a hub id can load while offline, and the study's SQLite file and the
run folder can be written. `sweep validate` runs the local part of it (no assets written, no hub ids,
no storage). Problems come as a `PreflightError` in the spec errors' form (file:line, field = value,
what is wrong); rows that will be dropped, and a missing chat template, come back as warnings.

Nothing here imports torch, transformers, datasets or Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import yaml

from sweep.spec import Problem, SpecError, SweepSpec, is_uri, locate


class PreflightError(SpecError):
    """The spec is valid, but what it points at (data, model, storage) cannot run."""

    headline = "cannot start"


def preflight(spec: SweepSpec, spec_path: Union[str, os.PathLike], *, storage_url: Optional[str] = None,
              storage_field: str = "storage", prepare: bool = True, hub: bool = True,
              local_only: bool = False) -> list[str]:
    """Check what `spec` (read from `spec_path`) points at; raise PreflightError listing every problem, or
    return the warnings, each a line ready to print.

    `prepare`: write the demo assets the spec generates first (as `sweep run` would), then check them;
    without it a generated asset that is not written yet is not checked. `storage_url`: the study's URL
    (checked when SQLite), named `storage_field` in messages (`--storage` when given on the command line).
    `local_only` (`sweep validate`): data and model paths only, no hub ids, storage or run folder.
    """
    from trial_worker.entry import check_job, prepare_assets

    spec_path = Path(spec_path)
    job = spec.job()
    if prepare:
        job = prepare_assets(job, spec_path.parent)
    else:
        job = job.resolved(spec_path.parent)
        pending = [what for what, path, gen in (("model", job.model.name_or_path, job.model.generate),
                                                ("data", job.data.path, job.data.generate))
                   if gen and not Path(path).exists()]
        if pending:
            verb, them = ("are", "them") if len(pending) > 1 else ("is", "it")
            return [f"{spec_path}: note: the generated {' and '.join(pending)} {verb} not written yet (`sweep run` "
                    f"writes {them}), so {'they are' if len(pending) > 1 else 'it is'} not checked"]
    found = check_job(job, hub=hub and not local_only, searched_lengths=_searched_lengths(spec))
    problems = [Problem(f.field, f.message, _shown(spec, f.field, f.value)) for f in found.problems]
    if not local_only:
        problems += _writable(spec, storage_url, storage_field)
    warnings = [Problem(f.field, f.message, _shown(spec, f.field, f.value)) for f in found.warnings]
    root = _yaml_root(spec_path)
    if problems:
        raise PreflightError(str(spec_path), _locate_fields(problems, root))
    return [f"warning: {w.render(str(spec_path))}" for w in _locate_fields(warnings, root)]


def _searched_lengths(spec: SweepSpec) -> tuple[int, ...]:
    """The `max_seq_length` values a search may give a trial: a choice's values, an int range's low end."""
    p = (spec.search_params() or {}).get("max_seq_length")
    if not isinstance(p, dict):
        return ()
    if p.get("type") == "choice":
        return tuple(v for v in p.get("values", []) if isinstance(v, int) and not isinstance(v, bool))
    if p.get("type") == "int" and isinstance(p.get("low"), int):
        return (p["low"],)
    return ()


def _shown(spec: SweepSpec, field: str, resolved: object) -> object:
    """The value a message shows: as written in the spec (the messages name the resolved path)."""
    return {"data.path": spec.data.path, "model.name_or_path": spec.model.name_or_path}.get(field, resolved)


def _yaml_root(spec_path: Path) -> Optional[yaml.Node]:
    try:
        return yaml.compose(spec_path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _locate_fields(problems: list[Problem], root: Optional[yaml.Node]) -> list[Problem]:
    """Spec fields get their line; command-line options (--storage) none."""
    locate([p for p in problems if not p.path.startswith("-")], root)
    return problems


def _writable(spec: SweepSpec, storage_url: Optional[str], storage_field: str) -> list[Problem]:
    """Problems with where the sweep writes: the SQLite study file and the run folder."""
    from sweep.record import _sqlite_file, url_without_password

    out = []
    db = _sqlite_file(storage_url) if storage_url else None
    if db is not None:
        why = _cannot_write(db.resolve(), file=True)
        if why:
            out.append(Problem(storage_field, f"the study database cannot be written: {why}",
                               url_without_password(str(storage_url))))
    if spec.output_dir and is_uri(spec.output_dir):
        return out  # Ray Tune opens the URI itself (pyarrow.fs, credentials from the environment) when it starts
    runs = Path(spec.output_dir or "sweep_runs")
    why = _cannot_write(runs.resolve(), file=False)
    if why:
        out.append(Problem("output_dir", f"the run folder cannot be written: {why}", str(runs)))
    return out


def _cannot_write(path: Path, *, file: bool) -> Optional[str]:
    """Why `path` (a file, or a folder to create) cannot be written by this user; None when it can."""
    if path.exists():
        if file and not path.is_file():
            return f"{path} is not a file"
        if not file and not path.is_dir():
            return f"{path} is not a folder"
        if not os.access(path, os.W_OK):
            return f"{path} is read-only for this user"
        if file and not os.access(path.parent, os.W_OK):  # SQLite writes its journal beside the file
            return f"its folder {path.parent} is read-only for this user (SQLite writes a journal there)"
        return None
    if file and not path.parent.is_dir():
        return f"the folder {path.parent} does not exist"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} is read-only for this user"
    return None
