"""Fixtures for the study record: a real Optuna storage per backend, no mocks."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNGS = [10, 20, 40]

SPACE = {
    "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
    "lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16]),
}


def make_search(storage, name="s", **kw):
    from sweep.record.search import StudySearch

    kw.setdefault("retry_backoff_s", 0.01)
    return StudySearch(
        dict(SPACE),
        metric="val_loss",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name=name,
        storage=storage,
        budget_key="steps",
        top_rung=RUNGS[-1],
        **kw,
    )


def result(steps: int, val_loss: float, i: int = 0) -> dict:
    """A rung report as the trial worker sends it (REPORT_KEYS + steps), plus Tune's own keys."""
    return {
        "steps": steps,
        "samples": steps * 8,
        "rung": RUNGS.index(steps) if steps in RUNGS else -1,
        "val_loss": val_loss,
        "ppl": math.exp(val_loss),
        "train_loss": val_loss + 0.1,
        "scheduled_lr": 1e-4,
        "tokens_per_s": 1000.0 + i,
        "samples_per_s": 10.0 + i,
        "peak_mem_gb": 1.5,
        "wall_s": 3.0 * steps,
        "train_s": 2.0 * steps,
        "training_iteration": i + 1,  # Ray's report count: must NOT be the step
        "done": False,
    }


def run_trial(search, trial_id: str, losses: list[float], *, error: bool = False) -> None:
    """Suggest, report one loss per rung (10, 20, 40...), then complete, exactly as Tune does.

    Tune passes the result on which it stops a trial (the rung where ASHA cuts it, or the
    top rung) only to `on_trial_complete`, not to `on_trial_result`; an error ends the
    trial with no result.
    """
    search.suggest(trial_id)
    results = [result(RUNGS[i], loss, i) for i, loss in enumerate(losses)]
    if error:
        for r in results:
            search.on_trial_result(trial_id, r)
        search.on_trial_complete(trial_id, error=True)
        return
    for r in results[:-1]:
        search.on_trial_result(trial_id, r)
    search.on_trial_complete(trial_id, result=results[-1] if results else None)


@pytest.fixture
def drive():
    """The helpers above, for tests: drive.make_search(storage), drive.run_trial(search, id, losses)..."""
    from types import SimpleNamespace

    return SimpleNamespace(make_search=make_search, result=result, run_trial=run_trial, RUNGS=RUNGS, SPACE=SPACE)


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def sweep_home(tmp_path, monkeypatch):
    """Each test gets its own study registry."""
    home = tmp_path / "sweep_home"
    monkeypatch.setenv("SWEEP_HOME", str(home))
    return home


# One entry per storage backend; every study test runs on each.
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if request.param == "postgresql":
        srv = request.getfixturevalue("pg_server")
        return srv.create_database(f"t_{uuid.uuid4().hex[:12]}")
    raise ValueError(f"storage backend {request.param!r}: this fixture knows {BACKENDS}")


@pytest.fixture
def demo_spec():
    """The demo search space as the controller records it: validated, paths resolved, secrets removed."""
    from sweep.spec import load_spec, public_dict, resolve_paths, spec_hash

    path = ROOT / "search_spaces" / "demo_cpu.yaml"
    spec = resolve_paths(load_spec(path), path.parent)
    return public_dict(spec), spec_hash(spec)
