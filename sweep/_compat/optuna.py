"""Optuna internals used by the record (tested: tests/compat/test_compat.py; optuna <5.1)."""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

import optuna

logger = logging.getLogger(__name__)


def trial_id(trial: Any) -> int:
    """The storage's id of a trial (`FrozenTrial._trial_id` / `Trial._trial_id`): what storage calls take."""
    return trial._trial_id


def cached_frozen(trial: optuna.trial.Trial) -> optuna.trial.FrozenTrial:
    """A `Trial`'s view of itself without a storage round trip (`Trial._cached_frozen_trial`): the searcher
    reads its own intermediate values and user attrs at each rung."""
    return trial._cached_frozen_trial


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study (`Study._study_id`): optuna-dashboard's page of the study is named by it."""
    return study._study_id


def trial_of_number(study: optuna.Study, number: int) -> int:
    """The storage id of the study's trial `number`."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study writes through (`Study._storage`)."""
    return study._storage


def _rdb_backend(storage: optuna.storages.BaseStorage) -> Optional[optuna.storages.RDBStorage]:
    """The RDBStorage under a storage (`_CachedStorage._backend`, which every study over a URL has); None if not RDB."""
    from optuna.storages._cached_storage import _CachedStorage

    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def suggest_param(trial: optuna.trial.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    """`trial`'s value of `name` drawn by its study's sampler from `dist`, through the public `suggest_*` call that
    matches the distribution (and written to the study, as any suggest is)."""
    d = optuna.distributions
    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, d.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"no suggest call for {type(dist).__name__} ({name})")


def write_running_trial(trial: optuna.trial.Trial, user_attrs: Mapping[str, Any],
                        report: Optional[tuple[int, float]] = None) -> None:
    """Set several user attrs of a running trial, and report one intermediate value (`report`: (step, value)),
    in ONE database transaction.

    `Trial.set_user_attr` and `Trial.report` commit once per call: a finished trial's dozen attributes were a
    dozen commits on the controller's event loop (62 PostgreSQL commits per trial in
    benchmarks/results/controller_scale.json). RDBStorage's own `_set_trial_attr_without_commit` and
    `_set_trial_intermediate_value_without_commit` (what its public setters run inside one session) are called
    in a single session here; the same checks apply (`UpdateFinishedTrialError` on a finished trial), and all
    or nothing lands. Other storages, or an Optuna without these methods: the public calls, one by one.
    The trial's own cache (`cached_frozen`) is updated as the public calls would.
    """
    backend = _rdb_backend(trial.storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session as session_scope
    except ImportError:
        backend = None
    if backend is None or not all(hasattr(backend, m) for m in (
            "_set_trial_attr_without_commit", "_set_trial_intermediate_value_without_commit")):
        logger.debug("one commit per attribute: no RDBStorage internals for %s", type(trial.storage).__name__)
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        if report is not None:
            trial.report(report[1], report[0])
        return
    tid = trial_id(trial)
    step, value = (int(report[0]), float(report[1])) if report is not None else (None, None)
    if step is not None and step in cached_frozen(trial).intermediate_values:
        step = None  # as `Trial.report`: the first value reported at a step stands
    with session_scope(backend.scoped_session) as session:
        for key, v in user_attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, tid, key, v)
        if step is not None:
            backend._set_trial_intermediate_value_without_commit(session, tid, step, value)
    cached_frozen(trial).user_attrs.update(user_attrs)
    if step is not None:
        cached_frozen(trial).intermediate_values[step] = value


def set_user_attr_of_finished_trial(storage: optuna.storages.BaseStorage, trial_id: int, key: str, value: Any) -> None:
    """Write a trial user attr even when the trial has finished (RDB storages only).

    Optuna refuses to change a finished trial; this writes the attribute row directly through its
    SQLAlchemy models (`optuna.storages._rdb`), unwrapping the cache of `_CachedStorage`.
    """
    backend = _rdb_backend(storage)
    if backend is None:
        raise TypeError(f"annotating a finished trial needs an RDBStorage, got {type(storage).__name__}")
    storage = backend
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        attr = models.TrialUserAttributeModel.find_by_trial_and_key(trial, key, session)
        if attr is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        else:
            attr.value_json = json.dumps(value)
