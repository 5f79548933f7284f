"""The one place a spec's search space becomes Optuna distributions and a sampler.

Imported only by the commands that search (it loads optuna).
"""

from __future__ import annotations

import itertools
import math
import random

import optuna
import optuna.distributions as od

from sweep.spec import SweepSpec


def optuna_space(spec: SweepSpec) -> dict[str, od.BaseDistribution]:
    """The spec's `search.params` as Optuna distributions."""
    out: dict[str, od.BaseDistribution] = {}
    for name, p in spec.search.params.items():  # type: ignore[union-attr]
        if p.type == "choice":
            out[name] = od.CategoricalDistribution(list(p.values))
        elif p.type == "uniform":
            out[name] = od.FloatDistribution(p.low, p.high)
        elif p.type == "loguniform":
            out[name] = od.FloatDistribution(p.low, p.high, log=True)
        else:
            out[name] = od.IntDistribution(p.low, p.high, step=p.step, log=p.log)
    return out


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell: Tune, not `study.stop()`, decides when the sweep ends.

    The stock `after_trial` calls `study.stop()` once the grid is used up, which raises
    outside `study.optimize`; `num_trials` (default: the grid's size) bounds the sweep.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


class NoRepeatSampler(optuna.samplers.BaseSampler):
    """A sampler that does not hand a trial the params of a trial the study already has, while others are left.

    Optuna's TPE and random samplers draw each trial afresh: over a space of `choice`s they repeat configs (a
    12-trial TPE sweep of a 48-config space trained one config twice, benchmarks/README.md), and a repeat
    trains the same trial again for nothing. This wrapper draws the whole config (the inner sampler's
    relative sample, its independent samples for the rest) and draws again, up to `tries` times, while the
    config equals one in the study (any state: a failed config would fail again); if every draw repeats, a
    finite space gives an untried config at random; once the space is used up a repeat is allowed.
    Used for spaces without a continuous param (`make_sampler`): those practically never repeat.

    With TPE's constant liar the running trials count here twice over: as configs not to repeat (`seen`, any
    state) and, inside TPE, as its worst results, so its draws keep away from their neighbours too; each draw
    of that TPE writes its relative params to the asking trial (`tpe:relative_params`, which the trial's own
    params then override), so a repeat drawn again costs one storage write.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, space: dict[str, od.BaseDistribution], tries: int = 32):
        self.inner, self.space, self.tries = inner, dict(space), tries

    def infer_relative_search_space(self, study, trial) -> dict[str, od.BaseDistribution]:
        return dict(self.space)  # the whole config is drawn at once, in `sample_relative`

    def sample_relative(self, study, trial, search_space) -> dict:
        seen = {_config_key(t.params) for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params}
        params: dict = {}
        for _ in range(self.tries):
            params = self._draw(study, trial)
            if _config_key(params) not in seen:
                return params
        # The sampler keeps to configs it has seen (TPE narrows onto its best): an untried one of a finite space,
        # drawn with a generator seeded by the trial's number.
        left = [c for c in _finite_configs(self.space) if _config_key(c) not in seen]
        return random.Random(trial.number).choice(left) if left else params

    def _draw(self, study, trial) -> dict:
        relative = self.inner.infer_relative_search_space(study, trial)
        params = dict(self.inner.sample_relative(study, trial, relative)) if relative else {}
        for name, dist in self.space.items():
            if name not in params:
                params[name] = self.inner.sample_independent(study, trial, name, dist)
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _finite_configs(space: dict[str, od.BaseDistribution], limit: int = 100_000) -> list[dict]:
    """Every config of a space of choices and integer ranges (of at most `limit` configs), else []."""
    values = []
    for name, dist in space.items():
        if isinstance(dist, od.CategoricalDistribution):
            values.append([(name, v) for v in dist.choices])
        elif isinstance(dist, od.IntDistribution) and not dist.log:
            values.append([(name, v) for v in range(dist.low, dist.high + 1, dist.step)])
        else:
            return []
    if math.prod(len(v) for v in values) > limit:
        return []
    return [dict(c) for c in itertools.product(*values)]


def _config_key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the spec asks for, seeded; TPE and random ones over a space of choices and integers do not
    repeat a config (`NoRepeatSampler`)."""
    s = spec.search
    if s is None:
        raise ValueError("the spec has no search section: nothing to sample")
    if s.sampler == "grid":
        return AskTellGridSampler({n: list(p.values) for n, p in s.params.items()}, seed=s.seed)
    inner: optuna.samplers.BaseSampler = (
        optuna.samplers.RandomSampler(seed=s.seed) if s.sampler == "random"
        # constant_liar: Tune asks for a trial whenever a slot frees, so many trials (a pack: up to a GPU's worth)
        # are RUNNING at each ask; TPE counts them as its worst results, so it proposes away from them instead of
        # near-copies of its running favourites (tests/record/test_search_concurrency.py). Optuna 5.0 defaults
        # to it; written out so that no other default (Optuna 4's was False) turns it off.
        else optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                        constant_liar=True))
    space = optuna_space(spec)
    if any(isinstance(d, od.FloatDistribution) for d in space.values()):
        return inner  # a continuous param: configs do not repeat, and each ask would read the study once more for nothing
    return NoRepeatSampler(inner, space)
