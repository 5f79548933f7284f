"""Optuna internals used by the record (tested: tests/compat/test_compat.py; optuna <5.1)."""

from __future__ import annotations

import json
from typing import Any

import optuna


def trial_id(trial: Any) -> int:
    """The storage's id of a trial (`FrozenTrial._trial_id` / `Trial._trial_id`): what storage calls take."""
    return trial._trial_id


def cached_frozen(trial: optuna.trial.Trial) -> optuna.trial.FrozenTrial:
    """A `Trial`'s view of itself without a storage round trip (`Trial._cached_frozen_trial`): the searcher
    reads its own intermediate values and user attrs at each rung."""
    return trial._cached_frozen_trial


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study writes through (`Study._storage`)."""
    return study._storage


def set_user_attr_of_finished_trial(storage: optuna.storages.BaseStorage, trial_id: int, key: str, value: Any) -> None:
    """Write a trial user attr even when the trial has finished (RDB storages only).

    Optuna refuses to change a finished trial; this writes the attribute row directly through its
    SQLAlchemy models (`optuna.storages._rdb`), unwrapping the cache of `_CachedStorage`.
    """
    from optuna.storages._cached_storage import _CachedStorage

    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    if not isinstance(storage, optuna.storages.RDBStorage):
        raise TypeError(f"annotating a finished trial needs an RDBStorage, got {type(storage).__name__}")
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        attr = models.TrialUserAttributeModel.find_by_trial_and_key(trial, key, session)
        if attr is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        else:
            attr.value_json = json.dumps(value)
