"""The one place a spec's search space becomes Optuna distributions and a sampler.

Imported only by the commands that search (it loads optuna).
"""

from __future__ import annotations

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


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler the spec asks for, seeded."""
    s = spec.search
    if s is None:
        raise ValueError("the spec has no search section: nothing to sample")
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        return AskTellGridSampler({n: list(p.values) for n, p in s.params.items()}, seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True)
