"""`StudySearch`: a Ray Tune `Searcher` over Optuna's ask/tell whose only state is the study.

It replaces Ray's OptunaSearch, which gets four things wrong for ASHA:
  * it reports intermediate values at Ray's report count (1, 2, 3), not at the budget step
    (10, 20, 40), so the curves, the TPE sampler and optuna-dashboard see the wrong x axis;
  * a trial that ASHA stopped at a low rung is told COMPLETE with its low-budget loss, so
    it competes with fully trained trials as if it were one;
  * the result on which Tune stops a trial (the rung where ASHA cuts it, or the top rung)
    reaches only `on_trial_complete`, so the stock searcher never records that rung;
  * a failed `tell` (database locked, connection dropped) is logged as a warning and the
    trial stays RUNNING in the study forever.

Here: values are reported at `result[budget_key]`; a trial is COMPLETE only when its last
report reached `top_rung`, PRUNED when it ended earlier without error, FAIL on error; every
storage write is retried with backoff and then raised. Each rung's metrics and the final
ones are stored as trial user attrs (keys listed in `sweep.record`).

The study is the searcher's only state. Which study trial a Ray trial runs is the trial's user attr
`ray_trial_id`; whether it has finished, its last rung and its fail reason are the study's; how many trials
the sweep has is the study's user attr `num_trials`. A save (Tune's `searcher-state-*.pkl`, its `tuner.pkl`)
holds only how to reach the study (name, storage), the space and the settings; a restore reads the rest from
the study. What a resumed Tune does not hold is said in the study too: `sweep resume` sets `ray_trial_id` to
None on each RUNNING trial that no Ray trial of Tune's restored state runs (`release_trials`), and the next
`suggest` hands such a trial out again with its recorded params (never sampled anew).

This module imports Ray; `sweep status`/`export` never import it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Dict, Optional, TypeVar

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from sweep._compat.optuna import cached_frozen, study_storage, suggest_param, write_running_trial
from sweep._compat.optuna import trial_id as storage_id
from sweep.record import FAIL_REASON_MAX_CHARS, finite_or_none, set_trial_user_attr_any_state
from trial_worker.config import REPORT_KEYS

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Metrics kept per rung and, from the last report, on the trial.
RUNG_KEYS = tuple(k for k in REPORT_KEYS if k != "rung")
ASK_FAILED = "ask failed"  # the fail reason of a trial that a failed `ask` left (see `StudySearch._fail_orphans`)
FINAL_KEYS = ("tokens_per_s", "samples_per_s", "peak_mem_gb", "wall_s", "micro_batch", "accumulation", "gradient_checkpointing")


def _transient_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc as sa_exc

    return (
        optuna.exceptions.StorageInternalError,
        sa_exc.OperationalError,   # database is locked, server closed the connection
        sa_exc.InterfaceError,
        sa_exc.DisconnectionError,
        sa_exc.TimeoutError,       # connection pool exhausted
        ConnectionError,
        TimeoutError,
    )


def storage_error_text(e: BaseException) -> str:
    """What the database itself said (first line): Optuna wraps every failed commit in a StorageInternalError
    whose own text blames "invalid data", and SQLAlchemy's text carries the SQL; the driver's message names
    the real cause (database is locked, connection refused) and never holds the password."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "orig", None) or e.__cause__
        if inner is None:
            break
        e = inner
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _num(v: Any) -> Any:
    """A rung metric as the study stores it: bools (e.g. gradient_checkpointing) as they are, numbers JSON-safe."""
    return v if isinstance(v, bool) else finite_or_none(v)


class StudySearch(Searcher):
    """A Tune searcher on a persistent study, with budget-step reports and truthful trial states.

    Args:
        space: Optuna distributions by parameter name.
        metric / mode: the reported metric to optimise ("val_loss", "min").
        sampler: the Optuna sampler (seeded by the caller).
        study_name / storage: the study (created if missing, else continued).
        budget_key: the reported key holding the budget value ("steps" or "samples").
        top_rung: the budget of the top rung; a trial is COMPLETE only on reaching it.
        retries / retry_backoff_s: storage writes are tried `retries` times, waiting
            backoff, 2*backoff, 4*backoff... between tries, then the error is raised.
        resumed: a searcher for `sweep resume` built anew (Tune saved nothing to restore): as one restored.
    """

    # What a save keeps is the rest of `__dict__`: the space, the settings, the sampler and how to reach the study.
    _CACHES = ("_study", "_ids", "_trials_of", "_told", "_handed_out", "_finished_before")

    def __init__(
        self,
        space: Dict[str, optuna.distributions.BaseDistribution],
        metric: str = "val_loss",
        mode: str = "min",
        sampler: Optional[optuna.samplers.BaseSampler] = None,
        study_name: str = "sweep",
        storage: Optional[optuna.storages.BaseStorage] = None,
        *,
        budget_key: str = "steps",
        top_rung: int,
        retries: int = 5,
        retry_backoff_s: float = 0.5,
        resumed: bool = False,
    ):
        if not isinstance(space, dict) or not space:
            raise ValueError("space must be a non-empty dict of Optuna distributions (name -> distribution)")
        if retries < 1:
            raise ValueError(f"The value of `retries` is {retries}, but must be `retries >= 1`")
        if top_rung <= 0:
            raise ValueError(f"The value of `top_rung` is {top_rung}, but must be `top_rung > 0`")
        super().__init__(metric=metric, mode=mode)
        self._space = dict(space)
        self._sampler = sampler or optuna.samplers.TPESampler()
        self._study_name = study_name
        self._storage = storage
        self._budget_key = budget_key
        self._top_rung = int(top_rung)
        self._retries = int(retries)
        self._retry_backoff_s = float(retry_backoff_s)
        self._open(restored=resumed)

    def _open(self, *, restored: bool) -> None:
        """The study, and the caches this process keeps of it (never saved: the study has all of them)."""
        self._ids: dict[str, tuple[int, int]] = {}  # Ray trial id -> (storage id, number), as the study names them
        # Ray trial id -> its study trial as last read or written here (this controller alone writes the trials
        # it runs: it holds the study's lease), and the storage ids it told: a rung costs one write, no read.
        self._trials_of: dict[str, optuna.trial.Trial] = {}
        self._told: set[int] = set()
        self._handed_out: set[int] = set()          # storage ids of the trials this process handed to Tune
        direction = "minimize" if self.mode == "min" else "maximize"
        self._study = self.retry("open study", lambda: optuna.create_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler, direction=direction,
            load_if_exists=True))
        # Trials the study had finished when this searcher was restored: Tune may hold them (its save is older),
        # but they are neither trained nor recorded again (`finished_before`).
        self._finished_before: set[str] = set()
        if restored:
            self._finished_before = {t.user_attrs["ray_trial_id"] for t in self._trials()
                                     if t.state.is_finished() and t.user_attrs.get("ray_trial_id")}
            # A seeded sampler restored from an older save would repeat the draws made since.
            self._sampler.reseed_rng()

    # ------------------------------------------------------------ retries
    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, tried again on a transient storage error (`retries` tries in all, backing off), then raised.
        A write to a trial the study has already finished returns None: the study holds its end."""
        transient = _transient_errors()
        delay, t0 = self._retry_backoff_s, time.monotonic()
        for attempt in range(1, self._retries + 1):
            try:
                return fn()
            except optuna.exceptions.UpdateFinishedTrialError as e:
                # The study already holds this trial's end (a resumed sweep meets trials a killed controller had
                # finished): the study is the record, so the write is dropped, never fatal to the sweep.
                logger.debug("study %s: %s skipped, the trial has finished: %s", self._study_name, what, e)
                return None  # type: ignore[return-value]
            except transient as e:
                if attempt == self._retries:
                    logger.error("study %s: %s failed %d times, giving up: %s", self._study_name, what, attempt,
                                 storage_error_text(e))
                    # For the controller: the sweep stops on a write that could not be made (`sweep resume` later).
                    setattr(e, "study_write_failed", (what, attempt, time.monotonic() - t0))
                    raise
                logger.warning("study %s: %s failed (try %d of %d), retrying in %.1fs: %s",
                               self._study_name, what, attempt, self._retries, delay, storage_error_text(e))
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ the study, read
    def _trials(self, states=None) -> list:
        return self._study.get_trials(deepcopy=False, states=states)

    def _lookup(self, trial_id: str) -> Optional[tuple[int, int]]:
        """(storage id, number) of the study trial that Ray trial `trial_id` runs, or None."""
        if trial_id not in self._ids:
            self._index(self.retry("read the study", self._trials))
        return self._ids.get(trial_id)

    def _index(self, trials: list) -> None:
        """Learn which Ray trial runs which of `trials` (the study's), as the study names them."""
        for t in trials:
            rid = t.user_attrs.get("ray_trial_id")
            if rid:
                self._ids[rid] = (storage_id(t), t.number)

    def _trial(self, trial_id: str) -> Optional[optuna.trial.Trial]:
        """The study trial of Ray trial `trial_id` (None if the study names none)."""
        if trial_id not in self._trials_of:
            found = self._lookup(trial_id)
            if found is None:
                return None
            self._trials_of[trial_id] = self.retry("read the trial", lambda: optuna.trial.Trial(self._study, found[0]))
        return self._trials_of[trial_id]

    def _finished(self, ot_trial: optuna.trial.Trial) -> bool:
        return storage_id(ot_trial) in self._told or cached_frozen(ot_trial).state.is_finished()

    def _study_is_full(self, trials: list) -> bool:
        """Whether the study already holds every trial the sweep is to have (its user attr `num_trials`, written
        by the controller; no limit without it). The study, not Tune's trial counter, says so: Tune restored from
        a save older than the study (a trial started and was pruned between two of Tune's saves, then a kill)
        counts fewer trials than the study holds and asks for more, which would train trials beyond the spec's
        count. Trials left by an `ask` that failed midway (`_fail_orphans`) are not counted."""
        cap = self._study.user_attrs.get("num_trials")
        if cap is None:
            return False
        held = sum(1 for t in trials if not str(t.user_attrs.get("fail_reason", "")).startswith(ASK_FAILED))
        if held < int(cap):
            return False
        logger.info("study %s holds its %d trials: no trial added (Ray Tune asked for one more)", self._study_name, held)
        return True

    @staticmethod
    def _released(trials: list) -> Optional[int]:
        """The storage id of the first RUNNING trial of `trials` that no Ray trial runs (`release_trials`), or None."""
        for t in trials:
            if t.state == TrialState.RUNNING and "ray_trial_id" in t.user_attrs and t.user_attrs["ray_trial_id"] is None:
                return storage_id(t)
        return None

    # ------------------------------------------------------------ Searcher API
    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: Dict, **spec) -> bool:
        return False  # the space, metric and mode were given at construction (as OptunaSearch answers)

    def suggest(self, trial_id: str) -> Optional[Dict]:
        from trial_worker.entry import mark

        mark(f"controller: suggest {trial_id}")  # the benchmark's timeline (`SWEEP_TIMELINE`), else nothing
        # One read of the study: which Ray trial runs what, which trial no Ray trial runs, how many there are.
        trials = self.retry("read the study", self._trials)
        self._index(trials)
        found = self._ids.get(trial_id)
        if found is not None:  # Tune asks once per trial; asked again, the same params
            return dict(next(t for t in trials if storage_id(t) == found[0]).params)
        released = self._released(trials)
        if released is not None:
            return self._continue(trial_id, released)
        if self.retry("read the study's trial count", lambda: self._study_is_full(trials)):
            return Searcher.FINISHED

        def ask():
            try:
                return self._study.ask(fixed_distributions=self._space)
            except _transient_errors() as e:
                self._fail_orphans(e)
                raise

        ot_trial = self.retry("ask", ask)
        self._own(trial_id, ot_trial)
        return dict(ot_trial.params)

    def _own(self, trial_id: str, ot_trial: optuna.trial.Trial) -> None:
        """Name Ray trial `trial_id` on the study trial it runs."""
        self.retry("set ray_trial_id", lambda: ot_trial.set_user_attr("ray_trial_id", trial_id))
        self._ids[trial_id] = (storage_id(ot_trial), ot_trial.number)
        self._trials_of[trial_id] = ot_trial
        self._handed_out.add(storage_id(ot_trial))

    def _continue(self, trial_id: str, tid: int) -> Dict:
        """Hand a study trial that no Ray trial runs (asked for before a kill, not in Tune's save) to Ray trial
        `trial_id`, with its recorded params: it runs from step 0, in the same study trial."""
        ot_trial = self.retry("read the trial", lambda: optuna.trial.Trial(self._study, tid))
        self._own(trial_id, ot_trial)
        logger.info("trial %d (asked for before the controller was killed) runs again from step 0 as %s",
                    ot_trial.number, trial_id)
        params = dict(cached_frozen(ot_trial).params)
        # A kill inside the ask leaves a trial with some or none of its params written: the sampler draws the
        # rest now, as the ask would have (never the spec's defaults under a trial's number).
        for name, dist in self._space.items():
            if name not in params:
                params[name] = self.retry(f"suggest {name}", functools.partial(suggest_param, ot_trial, name, dist))
        return params

    def _running(self, trial_id: str, what: str) -> Optional[optuna.trial.Trial]:
        """The study trial of Ray trial `trial_id` while it runs; None (said in the log) for a trial the study does
        not name, or has finished (a resumed Tune's older state: its later reports change nothing)."""
        ot_trial = self._trial(trial_id)
        if ot_trial is None:
            logger.error("Received %s of trial %s, which the study does not name; ignored", what, trial_id)
        elif self._finished(ot_trial):
            logger.debug("Received %s of trial %s after it finished; ignored", what, trial_id)
            return None
        return ot_trial

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        ot_trial = self._running(trial_id, "a result")
        if ot_trial is None:
            return
        frozen = cached_frozen(ot_trial)
        attrs, report = self._rung_writes(frozen, result)
        if attrs or report:
            # One transaction for the rung: its metrics and its intermediate value land together or not at all.
            self.retry("store rung", lambda: write_running_trial(ot_trial, attrs, report))

    def _rung_writes(self, frozen, result: Dict) -> tuple[dict, Optional[tuple[int, float]]]:
        """What a rung report adds to the study: (user attrs, (budget step, value) to report or None)."""
        value, budget = result.get(self.metric), result.get(self._budget_key)
        if value is None or budget is None:
            logger.debug("result of trial %d has no %s/%s; not a rung report", frozen.number, self.metric, self._budget_key)
            return {}, None
        step = int(budget)
        attrs: dict[str, Any] = {}
        if result.get("pack") and frozen.user_attrs.get("pack") != result["pack"]:
            attrs["pack"] = str(result["pack"])  # trial_worker.pack
        note = result.get("checkpoint_note")
        if note:  # the trial resumed past a checkpoint that failed its hash check: say which and why
            attrs["checkpoint_events"] = [*frozen.user_attrs.get("checkpoint_events", []),
                                          {"reported_at": step, "note": str(note)[:FAIL_REASON_MAX_CHARS]}]
        if step in frozen.intermediate_values:
            return attrs, None  # a rung reported again after a restart from its checkpoint: the first report stands
        attrs[f"rung_{step}"] = {k: _num(result.get(k)) for k in RUNG_KEYS if k in result}
        return attrs, (step, float(value))

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        ot_trial = self._running(trial_id, "the completion")
        if ot_trial is None:
            return
        frozen = cached_frozen(ot_trial)
        # Tune sends the result on which it stops a trial (ASHA's cut, or the top rung)
        # only here, never to on_trial_result: it is a rung report too.
        attrs, report = self._rung_writes(frozen, result) if result else ({}, None)
        # The trial's last rung, as the study records it (the first report of each rung stands).
        steps = dict(frozen.intermediate_values)
        if report:
            steps[report[0]] = report[1]
        budget = max(steps) if steps else None
        last = {**frozen.user_attrs.get(f"rung_{budget}", {}), **attrs.get(f"rung_{budget}", {})} if steps else {}
        value = _num(steps[budget]) if budget is not None else None
        reached_top = budget is not None and budget >= self._top_rung

        if error:
            state, told = TrialState.FAIL, None
        elif reached_top and value is not None:
            state, told = TrialState.COMPLETE, value
        elif reached_top:
            state, told = TrialState.FAIL, None
            if "fail_reason" not in frozen.user_attrs:
                attrs["fail_reason"] = f"{self.metric} is {steps[budget]!r} at the top rung"
        else:
            state, told = TrialState.PRUNED, None  # ASHA stopped it below the top rung

        attrs.update({
            "rung_reached": len(steps),
            "budget_reached": int(budget) if budget is not None else 0,
            "budget_unit": self._budget_key,
            "val_loss_last": value,
            "ppl_last": _num(last.get("ppl")),
            **{k: _num(last.get(k)) for k in FINAL_KEYS},
            "ray_trial_id": trial_id,
        })
        # The last rung and every attribute of the finished trial in one transaction (they were a commit each:
        # benchmarks/results/controller_scale.json), then the tell (Optuna's own: state, value, sampler hook).
        self.retry("store the trial's result", lambda: write_running_trial(ot_trial, attrs, report))
        # skip_if_finished: a retry after a write that did land must not fail the sweep.
        self.retry("tell", lambda: self._study.tell(ot_trial, told, state=state, skip_if_finished=True))
        self._told.add(storage_id(ot_trial))
        logger.debug("trial %s (number %d) -> %s at %s %s", trial_id, frozen.number, state.name, self._budget_key, budget)

    def _fail_orphans(self, error: BaseException) -> None:
        """FAIL the trial a failed `ask` created in the storage before it broke, so a retry leaves none RUNNING.

        Every trial this searcher asks for is named by `ray_trial_id` at once, and a trial `release_trials`
        frees has it set to None: a RUNNING trial without the attribute at all is such an orphan.
        """
        try:
            for t in self._trials(states=(TrialState.RUNNING,)):
                if "ray_trial_id" not in t.user_attrs:
                    study_storage(self._study).set_trial_user_attr(storage_id(t), "fail_reason", f"{ASK_FAILED}: {error}")
                    self._study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception as e:  # the storage is still failing: the next try cleans up
            logger.debug("could not clean up after a failed ask: %s", e)

    # ------------------------------------------------------------ for callbacks and the controller
    def record_failure(self, trial_id: str, reason: str) -> None:
        """Attach the error text of a failed trial (user attr `fail_reason`).

        Ray tells the searcher about an error before its callbacks run, so the trial is
        usually FAIL already; the attribute is written to it all the same.
        """
        reason = (reason or "trial failed")[-FAIL_REASON_MAX_CHARS:]
        ot_trial = self._trial(trial_id)
        if ot_trial is None:
            return
        if self._finished(ot_trial):
            storage = study_storage(self._study)
            self.retry("record failure", lambda: set_trial_user_attr_any_state(storage, storage_id(ot_trial), "fail_reason", reason))
        else:
            self.retry("record failure", lambda: ot_trial.set_user_attr("fail_reason", reason))

    def fail_reason(self, trial_id: str) -> Optional[str]:
        """The fail reason the study holds for a Ray trial (None if none)."""
        found = self._lookup(trial_id)
        return self.retry("read the trial", lambda: self._frozen(found[0])).user_attrs.get("fail_reason") if found else None

    def _frozen(self, tid: int) -> optuna.trial.FrozenTrial:
        return study_storage(self._study).get_trial(tid)

    def record_retry(self, trial_id: str, error: str, resumes_from: int) -> None:
        """Note a Ray retry (`max_failures`) of an unfinished trial (user attr `retries`): why the attempt
        ended, and the budget value of the checkpoint the next attempt goes on from (0: the start)."""
        ot_trial = self._trial(trial_id)
        if ot_trial is None or self._finished(ot_trial):
            return
        retries = [*cached_frozen(ot_trial).user_attrs.get("retries", []),
                   {"error": error[:FAIL_REASON_MAX_CHARS], "resumes_from": int(resumes_from), "unit": self._budget_key}]
        self.retry("record retry", lambda: ot_trial.set_user_attr("retries", retries))

    def trial_number(self, trial_id: str) -> Optional[int]:
        """The Optuna trial number of a Ray trial (None if unknown)."""
        found = self._lookup(trial_id)
        return found[1] if found is not None else None

    def final_state(self, trial_id: str) -> Optional[str]:
        """"COMPLETE", "PRUNED" or "FAIL" once the study has finished the trial, else None."""
        found = self._lookup(trial_id)
        state = self.retry("read the trial", lambda: self._frozen(found[0])).state if found else None
        return state.name if state is not None and state.is_finished() else None

    def finished_before(self, trial_id: str) -> bool:
        """Whether the study had already finished this Ray trial when this searcher was restored (`sweep resume`):
        Tune may start it again from its older saved state, but it is neither trained nor recorded again."""
        return trial_id in self._finished_before

    def storage_trial_ids(self) -> set[int]:
        """The storage ids of the study trials this process handed to Tune (asked for or continued)."""
        return set(self._handed_out)

    @property
    def study(self) -> optuna.Study:
        return self._study

    # ------------------------------------------------------------ saving
    # Tune pickles the searcher (tuner.pkl) and saves it (searcher-state-*.pkl): only how to reach the study,
    # the space and the settings; a restore reads everything else from the study.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k not in self._CACHES})
        self._open(restored=True)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if not isinstance(state, dict) or "_space" not in state:
            raise ValueError(f"{checkpoint_path} is not a StudySearch checkpoint")
        self.__setstate__(state)


def release_trials(study: optuna.Study, held: set) -> tuple[int, int]:
    """For `sweep resume`, before Tune starts: every RUNNING study trial that no Ray trial in `held` (Tune's
    restored trials; empty when Tune saved nothing) runs gets `ray_trial_id` None, so the searcher hands it out
    again with its recorded params. Returns (released, finished trials in the study)."""
    released = finished = 0
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished():
            finished += 1
        elif t.state == TrialState.RUNNING and t.user_attrs.get("ray_trial_id") not in held:
            if "ray_trial_id" not in t.user_attrs or t.user_attrs["ray_trial_id"] is not None:
                study_storage(study).set_trial_user_attr(storage_id(t), "ray_trial_id", None)
            released += 1
    return released, finished
