"""`StudySearch`: Ray Tune's OptunaSearch, made to record the truth in the study.

The stock searcher (ray.tune.search.optuna.OptunaSearch) gets four things wrong for ASHA:
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
from ray.tune.search.optuna import OptunaSearch

from sweep._compat.optuna import cached_frozen, study_storage, suggest_param, write_running_trial
from sweep._compat.optuna import trial_id as storage_id
from sweep._compat.ray import completed_trials, pop_searcher_trials, searcher_trials, set_searcher_trials
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


class StudySearch(OptunaSearch):
    """OptunaSearch on a persistent study, with budget-step reports and truthful trial states.

    Args:
        space: Optuna distributions by parameter name.
        metric / mode: the reported metric to optimise ("val_loss", "min").
        sampler: the Optuna sampler (seeded by the caller).
        study_name / storage: the study (created if missing, else continued).
        budget_key: the reported key holding the budget value ("steps" or "samples").
        top_rung: the budget of the top rung; a trial is COMPLETE only on reaching it.
        retries / retry_backoff_s: storage writes are tried `retries` times, waiting
            backoff, 2*backoff, 4*backoff... between tries, then the error is raised.
    """

    # The Ray trial ids in the Tune state a resume restores (set by `sweep.resume` before `Tuner.restore`).
    tune_trials: Optional[set] = None

    _ot_study: Any  # the Optuna study (OptunaSearch sets it up; None while unpickled, until `__setstate__`)

    def __init__(
        self,
        space: Dict[str, optuna.distributions.BaseDistribution],
        metric: str = "val_loss",
        mode: str = "min",
        sampler: Optional[optuna.samplers.BaseSampler] = None,
        study_name: Optional[str] = None,
        storage: Optional[optuna.storages.BaseStorage] = None,
        *,
        budget_key: str = "steps",
        top_rung: int,
        retries: int = 5,
        retry_backoff_s: float = 0.5,
    ):
        if not isinstance(space, dict) or not space:
            raise ValueError("space must be a non-empty dict of Optuna distributions (name -> distribution)")
        if retries < 1:
            raise ValueError(f"The value of `retries` is {retries}, but must be `retries >= 1`")
        if top_rung <= 0:
            raise ValueError(f"The value of `top_rung` is {top_rung}, but must be `top_rung > 0`")
        self._budget_key = budget_key
        self._top_rung = int(top_rung)
        self._retries = int(retries)
        self._retry_backoff_s = float(retry_backoff_s)
        self._last_results: dict[str, dict] = {}   # ray trial id -> last result seen
        self._final_states: dict[str, str] = {}    # ray trial id -> COMPLETE/PRUNED/FAIL
        self._fail_reasons: dict[str, str] = {}
        self._finished_before: set[str] = set()    # ray trial ids the study had finished when this searcher was restored
        self._pending: list[int] = []              # storage ids of study trials to hand out again (see `_reconcile`)
        super().__init__(space, metric=metric, mode=mode, sampler=sampler, study_name=study_name, storage=storage)

    # ------------------------------------------------------------ retries
    def _retry(self, what: str, fn: Callable[[], T]) -> Optional[T]:
        transient = _transient_errors()
        delay, t0 = self._retry_backoff_s, time.monotonic()
        for attempt in range(1, self._retries + 1):
            try:
                return fn()
            except optuna.exceptions.UpdateFinishedTrialError as e:
                # The study already holds this trial's end (a resumed sweep meets trials a killed controller had
                # finished): the study is the record, so the write is dropped, never fatal to the sweep.
                logger.debug("study %s: %s skipped, the trial has finished: %s", self._study_name, what, e)
                return None
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

    # ------------------------------------------------------------ Searcher API
    def suggest(self, trial_id: str) -> Optional[Dict]:
        trials = searcher_trials(self)
        if trial_id not in trials and self._pending:
            return self._continue_pending(trial_id)
        new = trial_id not in trials
        if new and self._retry("count the study's trials", self._study_is_full):
            return Searcher.FINISHED

        def ask():
            try:
                return super(StudySearch, self).suggest(trial_id)
            except _transient_errors() as e:
                self._fail_orphans(e)
                raise

        config = self._retry("ask", ask)
        if new and trial_id in trials:
            ot_trial = trials[trial_id]
            self._retry("set ray_trial_id", lambda: ot_trial.set_user_attr("ray_trial_id", trial_id))
        return config

    def _study_is_full(self) -> bool:
        """Whether the study already holds every trial the sweep is to have (its user attr `num_trials`, written
        by the controller; no limit without it). The study, not Tune's trial counter, says so: Tune restored from
        a save older than the study (a trial started and was pruned between two of Tune's saves, then a kill)
        counts fewer trials than the study holds and asks for more, which would train trials beyond the spec's
        count. Trials left by an `ask` that failed midway (`_fail_orphans`) are not counted."""
        cap = self._ot_study.user_attrs.get("num_trials")
        if cap is None:
            return False
        held = sum(1 for t in self._ot_study.get_trials(deepcopy=False)
                   if not str(t.user_attrs.get("fail_reason", "")).startswith(ASK_FAILED))
        if held < int(cap):
            return False
        logger.info("study %s holds its %d trials: no trial added (Ray Tune asked for one more)", self._study_name, held)
        return True

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        if trial_id in completed_trials(self):
            logger.debug("Received a result for trial %s after it finished; ignored: %s", trial_id, result)
            return
        ot_trial = searcher_trials(self).get(trial_id)
        if ot_trial is None:
            logger.error("Received a result for trial %s that this searcher did not suggest; ignored", trial_id)
            return
        attrs, report = self._rung_writes(trial_id, ot_trial, result)
        if attrs or report:
            # One transaction for the rung: its metrics and its intermediate value land together or not at all.
            self._retry("store rung", lambda: write_running_trial(ot_trial, attrs, report))

    def _rung_writes(self, trial_id: str, ot_trial, result: Dict) -> tuple[dict, Optional[tuple[int, float]]]:
        """What a rung report adds to the study: (user attrs, (budget step, value) to report or None)."""
        value, budget = result.get(self.metric), result.get(self._budget_key)
        if value is None or budget is None:
            logger.debug("result of trial %s has no %s/%s; not a rung report", trial_id, self.metric, self._budget_key)
            return {}, None
        step = int(budget)
        frozen = cached_frozen(ot_trial)
        attrs: dict[str, Any] = {}
        if result.get("pack") and frozen.user_attrs.get("pack") != result["pack"]:
            attrs["pack"] = str(result["pack"])  # trial_worker.pack
        note = result.get("checkpoint_note")
        if note:  # the trial resumed past a checkpoint that failed its hash check: say which and why
            attrs["checkpoint_events"] = [*frozen.user_attrs.get("checkpoint_events", []),
                                          {"reported_at": step, "note": str(note)[:FAIL_REASON_MAX_CHARS]}]
        prev = self._last_results.get(trial_id)
        if prev is None or step > prev[self._budget_key]:
            # Only what the record needs: the searcher's checkpoint stays small and picklable.
            keep = {*RUNG_KEYS, self.metric, self._budget_key}
            self._last_results[trial_id] = {k: result[k] for k in keep if k in result}
        if step in frozen.intermediate_values:
            return attrs, None  # a rung reported again after a restart from its checkpoint: the first report stands
        attrs[f"rung_{step}"] = {k: _num(result.get(k)) for k in RUNG_KEYS if k in result}
        return attrs, (step, float(value))

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        if trial_id in completed_trials(self):
            logger.debug("Received a second completion for trial %s; ignored", trial_id)
            return
        ot_trial = searcher_trials(self).get(trial_id)
        if ot_trial is None:
            logger.error("Completion of trial %s that this searcher did not suggest; nothing recorded", trial_id)
            return
        # Tune sends the result on which it stops a trial (ASHA's cut, or the top rung)
        # only here, never to on_trial_result: it is a rung report too.
        attrs, report = self._rung_writes(trial_id, ot_trial, result) if result else ({}, None)
        last = self._last_results.get(trial_id, {})
        budget = last.get(self._budget_key)
        value = _num(last.get(self.metric))
        reached_top = budget is not None and budget >= self._top_rung

        if error:
            state, told = TrialState.FAIL, None
        elif reached_top and value is not None:
            state, told = TrialState.COMPLETE, value
        elif reached_top:
            state, told = TrialState.FAIL, None
            self._fail_reasons.setdefault(trial_id, f"{self.metric} is {last.get(self.metric)!r} at the top rung")
        else:
            state, told = TrialState.PRUNED, None  # ASHA stopped it below the top rung

        frozen = cached_frozen(ot_trial)
        attrs.update({
            "rung_reached": len(frozen.intermediate_values.keys() | ({report[0]} if report else set())),
            "budget_reached": int(budget) if budget is not None else 0,
            "budget_unit": self._budget_key,
            "val_loss_last": value,
            "ppl_last": _num(last.get("ppl")),
            **{k: _num(last.get(k)) for k in FINAL_KEYS},
            "ray_trial_id": trial_id,
        })
        if trial_id in self._fail_reasons:
            attrs["fail_reason"] = self._fail_reasons[trial_id]
        # The last rung and every attribute of the finished trial in one transaction (they were a commit each:
        # benchmarks/results/controller_scale.json), then the tell (Optuna's own: state, value, sampler hook).
        self._retry("store the trial's result", lambda: write_running_trial(ot_trial, attrs, report))

        def tell():
            # skip_if_finished: a retry after a write that did land must not fail the sweep.
            return self._ot_study.tell(ot_trial, told, state=state, skip_if_finished=True)

        self._retry("tell", tell)
        completed_trials(self).add(trial_id)
        self._final_states[trial_id] = state.name
        self._last_results.pop(trial_id, None)
        logger.debug("trial %s (number %d) -> %s at %s %s", trial_id, frozen.number, state.name, self._budget_key, budget)

    def _fail_orphans(self, error: BaseException) -> None:
        """FAIL the trial a failed `ask` created in the storage before it broke, so a retry leaves none RUNNING.

        Every trial this searcher asks for gets `ray_trial_id` at once; a RUNNING trial
        without it, unknown to this searcher, is such an orphan.
        """
        known = self.storage_trial_ids()
        try:
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if storage_id(t) not in known and "ray_trial_id" not in t.user_attrs:
                    study_storage(self._ot_study).set_trial_user_attr(storage_id(t), "fail_reason", f"{ASK_FAILED}: {error}")
                    self._ot_study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception as e:  # the storage is still failing: the next try cleans up
            logger.debug("could not clean up after a failed ask: %s", e)

    # ------------------------------------------------------------ for callbacks
    def record_failure(self, trial_id: str, reason: str) -> None:
        """Attach the error text of a failed trial (user attr `fail_reason`).

        Ray tells the searcher about an error before its callbacks run, so the trial is
        usually FAIL already; the attribute is written to it all the same.
        """
        reason = (reason or "trial failed")[-FAIL_REASON_MAX_CHARS:]
        self._fail_reasons[trial_id] = reason
        ot_trial = searcher_trials(self).get(trial_id)
        if ot_trial is None:
            return
        storage = study_storage(self._ot_study)
        if trial_id in completed_trials(self):
            self._retry("record failure", lambda: set_trial_user_attr_any_state(storage, storage_id(ot_trial), "fail_reason", reason))
        else:
            self._retry("record failure", lambda: ot_trial.set_user_attr("fail_reason", reason))

    def record_retry(self, trial_id: str, error: str, resumes_from: int) -> None:
        """Note a Ray retry (`max_failures`) of an unfinished trial (user attr `retries`): why the attempt
        ended, and the budget value of the checkpoint the next attempt goes on from (0: the start)."""
        ot_trial = searcher_trials(self).get(trial_id)
        if ot_trial is None or trial_id in completed_trials(self):
            return
        retries = [*cached_frozen(ot_trial).user_attrs.get("retries", []),
                   {"error": error[:FAIL_REASON_MAX_CHARS], "resumes_from": int(resumes_from), "unit": self._budget_key}]
        self._retry("record retry", lambda: ot_trial.set_user_attr("retries", retries))

    def trial_number(self, trial_id: str) -> Optional[int]:
        """The Optuna trial number of a Ray trial (None if unknown)."""
        t = searcher_trials(self).get(trial_id)
        return t.number if t is not None else None

    def final_state(self, trial_id: str) -> Optional[str]:
        """"COMPLETE", "PRUNED" or "FAIL" once the trial has finished, else None."""
        return self._final_states.get(trial_id)

    def finished_before(self, trial_id: str) -> bool:
        """Whether the study had already finished this Ray trial when this searcher was restored (`sweep resume`):
        Tune may start it again from its older saved state, but it is neither trained nor recorded again."""
        return trial_id in self._finished_before

    def storage_trial_ids(self) -> set[int]:
        """The storage ids of the study trials this searcher asked for (or continued)."""
        return {storage_id(t) for t in searcher_trials(self).values()}

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # ------------------------------------------------------------ checkpointing
    # Tune pickles the searcher (tuner.pkl) and saves it in its experiment checkpoint.
    # Optuna Trial objects hold a storage cache with a lock; keep their ids instead and
    # rebuild the study and the unfinished trials from the storage on restore.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        pop_searcher_trials(state)
        state["study_trial_ids"] = {rid: storage_id(t) for rid, t in searcher_trials(self).items()}
        state["_ot_study"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        trial_ids = state.pop("study_trial_ids", None) or pop_searcher_trials(state)
        state.pop("_ot_study", None)
        state.setdefault("_finished_before", set())
        state.setdefault("_pending", [])
        self.__dict__.update(state)
        set_searcher_trials(self, {})
        self._ot_study = None
        if not self._space:
            return
        self._setup_study(self._mode)
        self._retry("read the study", lambda: self._reconcile(trial_ids))

    def _reconcile(self, trial_ids: dict) -> None:
        """Make this searcher, unpickled from Tune's last save, agree with the study (the record).

        Tune saves its searcher every few seconds; the controller may have died after it. So: a Ray trial that
        the study has finished since is marked told (`finished_before`; `sweep.resume` marks it ended in Tune's
        state too, so it does not run again, and nothing is recorded twice); a study
        trial still RUNNING that this save never heard of (asked for after it) is handed out again, with its
        recorded params, by the next `suggest` (never sampled anew); and the sampler's random state, saved
        before the draws made after that save, is drawn afresh so it cannot repeat them.
        """
        study_trials = {storage_id(t): t for t in self._ot_study.get_trials(deepcopy=False)}
        saved = set(trial_ids)
        # The study names each trial's Ray trial id: it wins over a pickled map that may be older than Tune's state.
        trial_ids = {**trial_ids, **{t.user_attrs["ray_trial_id"]: tid for tid, t in study_trials.items()
                                     if "ray_trial_id" in t.user_attrs}}
        trials, told = {}, completed_trials(self)
        for rid, tid in trial_ids.items():
            if not isinstance(tid, int):  # a Trial pickled by an older checkpoint
                tid = storage_id(tid)
            trials[rid] = optuna.trial.Trial(self._ot_study, tid)
            t = study_trials.get(tid)
            if t is not None and t.state.is_finished():
                self._finished_before.add(rid)
                told.add(rid)
                self._final_states.setdefault(rid, t.state.name)
        set_searcher_trials(self, trials)
        # Lost: RUNNING in the study, but not among the trials Tune restores (`tune_trials`, set by `sweep.resume`
        # from Tune's saved state; without it, those this searcher's save knew).
        tune = StudySearch.tune_trials if StudySearch.tune_trials is not None else saved
        self._pending = sorted((tid for tid, t in study_trials.items() if t.state == TrialState.RUNNING
                                and t.user_attrs.get("ray_trial_id") not in tune),
                               key=lambda tid: study_trials[tid].number)
        self._ot_study.sampler.reseed_rng()

    def continue_running_trials(self) -> int:
        """Hand the study's RUNNING trials out first, with their recorded params (a resume with no Tune state to
        restore); returns how many finished trials the study holds."""
        trials = self._ot_study.get_trials(deepcopy=False)
        self._pending = [storage_id(t) for t in sorted(trials, key=lambda t: t.number) if t.state == TrialState.RUNNING]
        self._ot_study.sampler.reseed_rng()  # the seeded sampler would repeat the first trials' draws
        return sum(1 for t in trials if t.state.is_finished())

    def _continue_pending(self, trial_id: str) -> Dict:
        """Hand a study trial the controller asked for before a kill (but Tune never saved) to Ray trial `trial_id`,
        with its recorded params: it runs from step 0, in the same study trial."""
        tid = self._pending.pop(0)
        ot_trial = optuna.trial.Trial(self._ot_study, tid)
        searcher_trials(self)[trial_id] = ot_trial
        self._retry("set ray_trial_id", lambda: ot_trial.set_user_attr("ray_trial_id", trial_id))
        logger.info("trial %d (asked for before the controller was killed) runs again from step 0 as %s",
                    ot_trial.number, trial_id)
        params = dict(cached_frozen(ot_trial).params)
        # A kill inside the ask leaves a trial with some or none of its params written: the sampler draws the
        # rest now, as the ask would have (never the spec's defaults under a trial's number).
        for name, dist in self._space.items():
            if name not in params:
                params[name] = self._retry(f"suggest {name}", functools.partial(suggest_param, ot_trial, name, dist))
        return params

    def _setup_study(self, mode):
        # No warm-start points here; the stock set-up creates or loads the study.
        self._retry("open study", lambda: super(StudySearch, self)._setup_study(mode))

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if not isinstance(state, dict):
            raise ValueError(f"{checkpoint_path} is not a StudySearch checkpoint")
        self.__setstate__(state)
