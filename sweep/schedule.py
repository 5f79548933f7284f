"""When to stop a trial: Ray Tune's ASHA, its rungs kept in agreement with the study across a resume.

Tune pickles its scheduler once, when the sweep starts (in `tuner.pkl`), and never again: a restored
sweep's stock ASHA has empty rungs, so it would promote every trial until new results fill them. Here the
rungs are rebuilt from the study's intermediate values (the record) the first time a restored scheduler is
used, keyed by each trial's Ray trial id, so a restored trial that reports a rung again is not counted twice.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler

from sweep._compat.ray import asha_metric_op, asha_rungs


class StudyASHA(ASHAScheduler):
    """`ASHAScheduler` whose rungs are rebuilt from the study after a restore.

    Args:
        searcher: the sweep's `StudySearch` (its study is the record of the rungs).
        from_study: rebuild the rungs from the study before the first decision (a resume that starts a new Tuner).
        **kwargs: as `ASHAScheduler` (time_attr, max_t, grace_period, reduction_factor, ...).
    """

    def __init__(self, *, searcher, from_study: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._searcher = searcher
        self._rebuilt = not from_study

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._rebuilt = False  # unpickled by `Tuner.restore`: rebuild before the first decision

    def on_trial_add(self, tune_controller, trial):
        self._rebuild()
        return super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._rebuild()
        return super().on_trial_result(tune_controller, trial, result)

    def _rebuild(self) -> None:
        if self._rebuilt:
            return
        self._rebuilt = True
        study = self._searcher.study
        if study is None or not asha_metric_op(self):
            return
        for milestone, recorded in asha_rungs(self):
            for t in study.get_trials(deepcopy=False):
                value = t.intermediate_values.get(int(milestone))
                if value is not None and math.isfinite(value):
                    recorded.setdefault(t.user_attrs.get("ray_trial_id") or f"study trial {t.number}",
                                        asha_metric_op(self) * value)
