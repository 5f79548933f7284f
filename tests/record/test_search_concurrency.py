"""Search under concurrency: with many trials RUNNING (a pack trains a GPU's worth at once), the sweep's sampler
proposes away from them, not near-copies of its running favourites (TPE's constant liar, `sweep.space.make_sampler`).

Driven as Tune drives it: `StudySearch.suggest` on a real study; a suggested trial that is not told stays RUNNING.
"""

from __future__ import annotations

import math

import optuna
import pytest

from sweep.space import NoRepeatSampler, make_sampler, optuna_space
from sweep.spec import parse_spec

HEAD = """
name: s
model: {{name_or_path: m}}
data: {{path: d}}
budget: {{min: 10, max: 40}}
search:
  n_startup_trials: 4
  seed: {seed}
  params:
"""
CONTINUOUS = """\
    learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
    warmup_ratio: {type: uniform, low: 0.0, high: 0.2}
"""
REFERENCE = """\
    learning_rate: {type: choice, values: [1.0e-4, 2.0e-4, 3.0e-4, 5.0e-4]}
    lr_scheduler_type: {type: choice, values: [linear, cosine, constant]}
    per_device_train_batch_size: {type: choice, values: [1, 2, 4]}
    gradient_accumulation_steps: {type: choice, values: [2, 4, 8]}
"""  # search_spaces/llama32_1b.yaml's space (108 configs: NoRepeatSampler around TPE)


def _loss(p: dict) -> float:
    """A smooth objective with one good region (lr ~3e-4, warm-up 0.1, cosine, batch 2)."""
    return ((math.log10(p["learning_rate"]) + 3.5) ** 2 + 10 * (p.get("warmup_ratio", 0.1) - 0.1) ** 2
            + 0.3 * (p.get("lr_scheduler_type", "cosine") != "cosine")
            + 0.1 * abs(math.log2(p.get("per_device_train_batch_size", 2)) - 1))


def _distance(space: dict, a: dict, b: dict) -> float:
    """Each param's distance in [0, 1]: a float's share of its (log) range, 1 for a different choice."""
    d = 0.0
    for k, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            d += a[k] != b[k]
        else:
            f = math.log if dist.log else float
            d += abs(f(a[k]) - f(b[k])) / (f(dist.high) - f(dist.low))
    return d


def _asks_while_running(params: str, seed: int, liar: bool) -> list[float]:
    """10 trials finished, then 8 asked in a row while the earlier ones run: each new ask's distance to the
    nearest RUNNING trial."""
    from sweep.record.search import StudySearch

    spec = parse_spec(HEAD.format(seed=seed) + params, "s.yaml")
    space, sampler = optuna_space(spec), make_sampler(spec)
    if not liar:  # the same sampler without the liar: what the test must tell apart
        tpe = sampler.inner if isinstance(sampler, NoRepeatSampler) else sampler
        assert isinstance(tpe, optuna.samplers.TPESampler)
        tpe._constant_liar = False
    search = StudySearch(space, sampler=sampler, study_name="s", storage=optuna.storages.InMemoryStorage(), top_rung=40)
    for i in range(10):
        config = search.suggest(f"done{i}")
        search.on_trial_complete(f"done{i}", {"steps": 40, "val_loss": _loss(config), "training_iteration": 1})
    running: list[dict] = []
    nearest = []
    for i in range(8):
        config = search.suggest(f"run{i}")
        if running:
            nearest.append(min(_distance(space, config, r) for r in running))
        running.append(config)
    states = {t.state for t in search.study.trials[10:]}
    assert states == {optuna.trial.TrialState.RUNNING}
    return nearest


def test_the_sweeps_tpe_is_a_constant_liar():
    spec = parse_spec(HEAD.format(seed=0) + CONTINUOUS, "s.yaml")
    assert make_sampler(spec)._constant_liar is True


@pytest.mark.parametrize("params, bound", [(CONTINUOUS, 0.1), (REFERENCE, 2.0)], ids=["continuous", "reference"])
def test_new_asks_keep_away_from_the_running_trials(params, bound):
    # continuous: every new ask at least 10% of a range from each running trial (without the liar TPE asks within
    # 0.5-6% of one: a near-copy); reference space: on average 2 of the 4 choices differ from the nearest running
    # trial (without: 1.3-1.7; no exact copies either way, NoRepeatSampler sees to that).
    seeds = (0, 1, 2)
    for liar in (True, False):
        nearest = [d for seed in seeds for d in _asks_while_running(params, seed, liar)]
        spread = min(nearest) if params is CONTINUOUS else sum(nearest) / len(nearest)
        assert (spread >= bound) is liar, (liar, spread, nearest)
    if params is REFERENCE:
        assert min(nearest) >= 1  # no ask repeats a running config
