"""StudySearch on a real SQL study, driven as Tune's controller drives a searcher (no cluster)."""

from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from sweep.record import load_study, open_storage


def test_intermediate_values_sit_at_the_budget_steps(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "t1", [2.0, 1.5, 1.2])
    t = load_study(storage_url, "s").trials[0]
    assert t.intermediate_values == {10: 2.0, 20: 1.5, 40: 1.2}  # not Ray's report count 1, 2, 3


def test_trial_that_reached_the_top_rung_is_complete_with_its_top_rung_value(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "t1", [2.0, 1.5, 1.2])
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.COMPLETE
    assert t.value == pytest.approx(1.2)
    a = t.user_attrs
    assert a["rung_reached"] == 3 and a["budget_reached"] == 40 and a["budget_unit"] == "steps"
    assert a["val_loss_last"] == pytest.approx(1.2)
    assert a["ray_trial_id"] == "t1"
    assert a["tokens_per_s"] == pytest.approx(1002.0) and a["samples_per_s"] == pytest.approx(12.0)
    assert a["peak_mem_gb"] == pytest.approx(1.5) and a["wall_s"] == pytest.approx(120.0)
    assert a["rung_20"]["val_loss"] == pytest.approx(1.5) and a["rung_20"]["samples"] == 160
    assert search.final_state("t1") == "COMPLETE"
    assert search.trial_number("t1") == 0


def test_trial_stopped_by_asha_below_the_top_rung_is_pruned(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "t1", [2.0, 1.9])  # ASHA stopped it at 20 of 40
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.PRUNED
    assert t.intermediate_values == {10: 2.0, 20: 1.9}
    assert t.user_attrs["val_loss_last"] == pytest.approx(1.9)
    assert t.user_attrs["rung_reached"] == 2 and t.user_attrs["budget_reached"] == 20
    assert search.final_state("t1") == "PRUNED"
    # We tell no value; Optuna itself copies the last intermediate value onto a PRUNED trial.
    assert t.value == pytest.approx(1.9)
    # PRUNED trials never count as the best trial
    study = load_study(storage_url, "s")
    with pytest.raises(ValueError):
        _ = study.best_trial


def test_failed_trial_is_fail_with_the_reason_written_after_tune_told_the_searcher(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "t1", [2.0], error=True)
    # Tune calls search_alg.on_trial_complete(error=True) first, then the callbacks' on_trial_error.
    search.record_failure("t1", "Traceback ...\nRuntimeError: CUDA out of memory")
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.FAIL
    assert t.value is None
    assert t.user_attrs["fail_reason"].endswith("CUDA out of memory")
    assert t.user_attrs["val_loss_last"] == pytest.approx(2.0)
    assert search.final_state("t1") == "FAIL"


def test_reason_recorded_before_completion_is_kept(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    search.record_failure("t1", "worker died")
    search.on_trial_complete("t1", error=True)
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "worker died"


def test_nan_loss_at_the_top_rung_is_fail_not_complete(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "t1", [2.0, 1.5, float("nan")])
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.FAIL
    assert "nan" in t.user_attrs["fail_reason"]


def test_a_mixed_sweep_leaves_no_trial_running(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "a", [2.0, 1.5, 1.2])
    drive.run_trial(search, "b", [2.5])
    drive.run_trial(search, "c", [2.1, 1.6])
    drive.run_trial(search, "d", [], error=True)
    search.suggest("e")
    search.on_trial_complete("e")  # removed while PENDING: Tune completes it with no result
    states = [t.state.name for t in load_study(storage_url, "s").trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED", "FAIL", "PRUNED"]


def test_repeated_rung_report_after_a_restart_is_ignored(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    search.on_trial_result("t1", drive.result(10, 2.0, 0))
    search.on_trial_result("t1", drive.result(10, 2.05, 1))  # the trial restarted from its rung-10 checkpoint
    search.on_trial_result("t1", drive.result(20, 1.8, 2))
    search.on_trial_complete("t1", result=drive.result(20, 1.8, 2))
    t = load_study(storage_url, "s").trials[0]
    assert t.intermediate_values == {10: 2.0, 20: 1.8}


class FlakyStorage(optuna.storages.RDBStorage):
    """A real SQL storage whose first `fail_times` state writes fail like a locked SQLite file."""

    def __init__(self, *a, fail_times: int = 1, **kw):
        super().__init__(*a, **kw)
        self.fail_times = fail_times
        self.calls = 0

    def set_trial_state_values(self, trial_id, state, values=None):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise OperationalError("UPDATE trials ...", {}, Exception("database is locked"))
        return super().set_trial_state_values(trial_id, state, values)


def test_tell_is_retried_when_the_storage_fails_transiently(storage_url, drive, caplog):
    storage = FlakyStorage(storage_url, fail_times=2)
    search = drive.make_search(storage)
    with caplog.at_level("WARNING", logger="sweep.record.search"):
        drive.run_trial(search, "t1", [2.0, 1.5, 1.2])
    assert storage.calls == 3
    assert "tell failed (try 1 of 5)" in caplog.text
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.COMPLETE and t.value == pytest.approx(1.2)


def test_tell_failure_is_raised_after_the_retries_never_swallowed(storage_url, drive):
    storage = FlakyStorage(storage_url, fail_times=100)
    search = drive.make_search(storage, retries=3)
    with pytest.raises(OperationalError, match="database is locked"):
        drive.run_trial(search, "t1", [2.0, 1.5, 1.2])
    assert storage.calls == 3
    assert search.final_state("t1") is None  # not marked done: the record did not take it


class FlakyAskStorage(optuna.storages.RDBStorage):
    """Fails the first parameter write of a new trial: the trial row exists, the ask broke."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.failed = False

    def _set_trial_param(self, *a, **kw):  # what the cached storage in front of it calls
        if not self.failed:
            self.failed = True
            raise OperationalError("INSERT INTO trial_params ...", {}, Exception("server closed the connection unexpectedly"))
        return super()._set_trial_param(*a, **kw)


def test_ask_is_retried_and_the_half_created_trial_is_not_left_running(storage_url, drive):
    storage = FlakyAskStorage(storage_url)
    search = drive.make_search(storage)
    drive.run_trial(search, "t1", [2.0, 1.5, 1.2])
    trials = load_study(storage_url, "s").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "ask failed" in trials[0].user_attrs["fail_reason"]
    assert search.trial_number("t1") == 1


def test_fail_running_trials_ends_what_a_crashed_controller_left(storage_url, drive):
    from sweep.record import fail_running_trials

    search = drive.make_search(open_storage(storage_url))
    search.suggest("a")
    search.suggest("b")
    search.on_trial_result("b", drive.result(10, 2.0))
    study = load_study(storage_url, "s")
    assert fail_running_trials(study, "the controller stopped", keep=frozenset({0})) == [1]
    states = {t.number: t.state.name for t in load_study(storage_url, "s").trials}
    assert states == {0: "RUNNING", 1: "FAIL"}


def test_values_reported_at_budget_steps_feed_the_sampler(storage_url, drive):
    """TPE ranks PRUNED trials by how far they got: its input must use the budget steps."""
    search = drive.make_search(open_storage(storage_url))
    drive.run_trial(search, "a", [2.0, 1.5, 1.2])
    drive.run_trial(search, "b", [2.5, 2.4])
    study = load_study(storage_url, "s")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED][0]
    assert pruned.last_step == 20


def test_checkpoint_restore_continues_the_same_trials(storage_url, drive, tmp_path):
    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    search.on_trial_result("t1", drive.result(10, 2.0, 0))
    drive.run_trial(search, "t0", [2.2])
    ckpt = tmp_path / "searcher.pkl"
    search.save(str(ckpt))

    # Tune restores into a searcher built again from the same arguments.
    restored = drive.make_search(open_storage(storage_url))
    restored.restore(str(ckpt))
    assert restored.trial_number("t1") == 0
    assert restored.final_state("t0") == "PRUNED"
    restored.on_trial_result("t1", drive.result(20, 1.6, 1))
    restored.on_trial_result("t1", drive.result(40, 1.3, 2))
    restored.on_trial_complete("t1", result=drive.result(40, 1.3, 2))
    restored.on_trial_complete("t0")  # already finished before the checkpoint: ignored
    study = load_study(storage_url, "s")
    assert len(study.trials) == 2
    t1 = study.trials[0]
    assert t1.state == TrialState.COMPLETE and t1.intermediate_values == {10: 2.0, 20: 1.6, 40: 1.3}


def test_searcher_pickles_for_tunes_experiment_state(storage_url, drive):
    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    clone = pickle.loads(pickle.dumps(search))
    clone.on_trial_result("t1", drive.result(10, 2.0, 0))
    clone.on_trial_complete("t1", result=drive.result(10, 2.0, 0))
    assert load_study(storage_url, "s").trials[0].state == TrialState.PRUNED


def test_an_existing_study_is_continued_not_replaced(storage_url, drive):
    drive.run_trial(drive.make_search(open_storage(storage_url)), "a", [2.0, 1.5, 1.2])
    drive.run_trial(drive.make_search(open_storage(storage_url)), "b", [2.0, 1.5, 1.1])
    study = load_study(storage_url, "s")
    assert [t.number for t in study.trials] == [0, 1]
    assert study.best_trial.number == 1


def test_a_stop_result_also_sent_to_on_trial_result_is_recorded_once(storage_url, drive):
    """Some Tune paths send the last result to both hooks; the rung is recorded once."""
    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    for i, loss in enumerate([2.0, 1.5, 1.2]):
        search.on_trial_result("t1", drive.result(drive.RUNGS[i], loss, i))
    search.on_trial_complete("t1", result=drive.result(40, 1.2, 2))
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.COMPLETE and t.intermediate_values == {10: 2.0, 20: 1.5, 40: 1.2}


def test_a_searcher_restored_from_an_older_save_agrees_with_the_study(storage_url, drive, tmp_path):
    """Tune saves its run every few seconds; a controller killed after a save restores an older one. The study is
    the searcher's only state: a trial it finished since is not recorded again, a trial asked for after the save
    is run again with its recorded params (not sampled anew), and no later trial repeats its params."""
    storage = open_storage(storage_url)
    search = drive.make_search(storage)
    search.suggest("t1")
    search.on_trial_result("t1", drive.result(10, 2.0))
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    search.on_trial_result("t1", drive.result(20, 1.5, 1))
    search.on_trial_complete("t1", result=drive.result(40, 1.2, 2))
    lost = search.suggest("t2")  # asked for after the save: the saved searcher never heard of it
    search.on_trial_result("t2", drive.result(10, 3.0))
    before = {t.number: (t.state, t.value, dict(t.intermediate_values)) for t in load_study(storage_url, "s").trials}

    from sweep.record.search import release_trials

    # `sweep resume`: Tune's save holds t1 only; t2's study trial, which no Ray trial will run, is released.
    assert release_trials(load_study(storage_url, "s"), held={"t1"}) == (1, 1)
    restored = drive.make_search(open_storage(storage_url))
    restored.restore(str(tmp_path / "searcher.pkl"))  # as Tune.restore does
    assert restored.finished_before("t1") and restored.final_state("t1") == "COMPLETE"
    # Tune restarts t1 from its older state: its reports and its end change nothing.
    restored.on_trial_result("t1", drive.result(20, 9.0, 1))
    restored.on_trial_complete("t1", result=drive.result(40, 9.0, 2))
    # The next trial Tune asks for is the lost one, with its recorded params, in the same study trial.
    assert restored.suggest("t3") == lost and restored.trial_number("t3") == 1
    drive_rest = [drive.result(10, 2.5), drive.result(20, 2.4, 1)]
    restored.on_trial_result("t3", drive_rest[0])  # its rung 10 again: the first report stands
    restored.on_trial_complete("t3", result=drive_rest[1])
    fresh = restored.suggest("t4")
    study = load_study(storage_url, "s")
    after = {t.number: (t.state, t.value, dict(t.intermediate_values)) for t in study.trials}
    assert after[0] == before[0]  # finished before the kill: unchanged
    assert after[1][0] == TrialState.PRUNED and after[1][2] == {10: 3.0, 20: 2.4}
    assert len(study.trials) == 3  # the lost trial was not asked for again
    assert fresh != lost and fresh != study.trials[0].params  # the sampler's draws after the save are not repeated


@pytest.mark.parametrize("written", [0, 1])
def test_a_trial_killed_inside_its_ask_gets_the_rest_of_its_params_on_resume(storage_url, drive, tmp_path, written):
    """The controller killed while Optuna writes a new trial's params (after the trial row, before or between its
    params): the resumed sweep hands that trial out with every param of the space, those written kept and the
    rest drawn by the sampler, never with none (which would train the spec's defaults under that trial's number)."""
    space = drive.SPACE
    storage = open_storage(storage_url)
    search = drive.make_search(storage)
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    cut = optuna.load_study(study_name="s", storage=storage_url)
    half = cut.ask()  # the kill came inside the ask: the trial is there with `written` of its params
    kept = dict(list({"learning_rate": 1e-3, "lora_r": 8}.items())[:written])
    for name, value in kept.items():
        cut._storage.set_trial_param(half._trial_id, name, space[name].to_internal_repr(value), space[name])

    from sweep.record.search import release_trials

    assert release_trials(load_study(storage_url, "s"), held=set()) == (1, 0)  # `sweep resume`, Tune saved nothing
    restored = drive.make_search(open_storage(storage_url))
    restored.restore(str(tmp_path / "searcher.pkl"))
    config = restored.suggest("t1")
    assert set(config) == set(space) and restored.trial_number("t1") == 0
    assert {n: config[n] for n in kept} == kept
    assert all(space[n]._contains(space[n].to_internal_repr(v)) for n, v in config.items())
    study = load_study(storage_url, "s")
    assert len(study.trials) == 1 and study.trials[0].params == config  # the study holds what the trial runs


def test_a_write_to_a_trial_the_study_has_finished_is_skipped_not_fatal(storage_url, drive):
    from sweep.record import fail_running_trials

    search = drive.make_search(open_storage(storage_url))
    search.suggest("t1")
    study = load_study(storage_url, "s")
    assert fail_running_trials(study, "ended elsewhere") == [0]  # e.g. by another resume
    search.on_trial_result("t1", drive.result(10, 2.0))
    search.on_trial_complete("t1", result=drive.result(20, 1.9, 1))
    search.record_retry("t1", "worker died", 10)
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.FAIL and t.intermediate_values == {} and t.user_attrs["fail_reason"] == "ended elsewhere"


class Transactions:
    """The transactions a storage's engine commits, counted by SQLAlchemy's own events: all of them, and those
    that wrote (an INSERT, UPDATE or DELETE ran in them)."""

    def __init__(self, engine):
        from sqlalchemy import event

        self.commits = self.writes = 0
        self._wrote = False

        @event.listens_for(engine, "before_cursor_execute")
        def _statement(conn, cursor, statement, *a):
            self._wrote |= statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")

        @event.listens_for(engine, "commit")
        def _commit(conn):
            self.commits += 1
            self.writes += self._wrote
            self._wrote = False

    def take(self) -> tuple[int, int]:
        """(commits, writing commits) since the last call."""
        seen = (self.commits, self.writes)
        self.commits = self.writes = 0
        return seen


def test_a_finished_trial_is_written_in_one_transaction_not_one_per_attribute(storage_url, drive):
    # Each commit is a round trip on the controller's event loop; 13 attributes were 13 commits (#14).
    storage = open_storage(storage_url)
    tx = Transactions(storage.engine)
    search = drive.make_search(storage)
    search.suggest("t1")
    tx.take()
    search.on_trial_result("t1", drive.result(10, 2.0, 0))
    assert tx.take()[1] == 1  # the rung's metrics and its intermediate value together
    search.on_trial_result("t1", drive.result(20, 1.5, 1))
    search.on_trial_complete("t1", result=drive.result(40, 1.2, 2))
    commits, writes = tx.take()
    # the rung and every attribute of the finished trial, then Optuna's tell (the state); its reads besides
    assert writes == 1 + 2 and commits <= 1 + 5, (commits, writes)
    t = load_study(storage_url, "s").trials[0]
    assert t.state == TrialState.COMPLETE and t.intermediate_values == {10: 2.0, 20: 1.5, 40: 1.2}
    assert len(t.user_attrs) >= 15 and t.user_attrs["rung_reached"] == 3 and t.user_attrs["rung_40"]["val_loss"] == 1.2


def test_a_rung_whose_write_fails_leaves_nothing_half_written(storage_url, drive):
    from sqlalchemy import event

    storage = open_storage(storage_url)
    search = drive.make_search(storage, retries=2)
    search.suggest("t1")

    @event.listens_for(storage.engine, "before_cursor_execute")
    def _fail_the_intermediate_value(conn, cursor, statement, *a):
        # After the rung's metrics went in, in the same transaction.
        if "trial_intermediate_values" in statement and statement.lstrip().upper().startswith("INSERT"):
            raise OperationalError(statement, {}, Exception("database is locked"))

    with pytest.raises(optuna.exceptions.StorageInternalError):
        search.on_trial_result("t1", drive.result(10, 2.0, 0))
    t = load_study(storage_url, "s").trials[0]
    assert t.intermediate_values == {} and "rung_10" not in t.user_attrs
    event.remove(storage.engine, "before_cursor_execute", _fail_the_intermediate_value)
    search.on_trial_result("t1", drive.result(10, 2.0, 0))  # the database is back: the rung is written whole
    t = load_study(storage_url, "s").trials[0]
    assert t.intermediate_values == {10: 2.0} and t.user_attrs["rung_10"]["val_loss"] == 2.0


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_discrete_space_gets_no_config_twice_until_every_one_is_tried(storage_url, sampler):
    # 2 x 3 x 2 = 12 configs: the sweep's sampler (made from the spec, as the controller makes it), asked
    # through the study as Tune asks, gives 12 different ones (plain TPE repeats its favourites), then repeats.
    from sweep.record.search import StudySearch
    from sweep.space import make_sampler, optuna_space
    from sweep.spec import parse_spec

    spec = parse_spec(f"""
name: s
model: {{name_or_path: m}}
data: {{path: d}}
budget: {{min: 10, max: 40}}
search:
  sampler: {sampler}
  n_startup_trials: 3
  params:
    learning_rate: {{type: choice, values: [1.0e-4, 3.0e-4]}}
    lora_r: {{type: choice, values: [4, 8, 16]}}
    lr_scheduler_type: {{type: choice, values: [linear, cosine]}}
""", "s.yaml")
    search = StudySearch(optuna_space(spec), sampler=make_sampler(spec), study_name="s", storage=open_storage(storage_url),
                         top_rung=40)
    configs = []
    for i in range(13):
        config = search.suggest(f"t{i}")
        configs.append(tuple(sorted(config.items())))
        # a favourite: the first config scores best, so TPE keeps proposing it
        search.on_trial_complete(f"t{i}", {"steps": 40, "val_loss": 1.0 if i == 0 else 2.0 + i, "training_iteration": 1})
    assert len(set(configs[:12])) == 12, configs
    assert configs[12] in configs[:12]
    assert len(load_study(storage_url, "s").trials) == 13


def test_no_trial_beyond_the_studys_count_whatever_tune_asks(storage_url, drive, tmp_path):
    """Tune restored from a save older than the study asks for as many trials as its save lacks, though some of
    them have run and finished since: the searcher answers FINISHED once the study holds its `num_trials`, so no
    trial is added beyond the sweep's count; a trial a failed ask left (FAIL, "ask failed") does not count."""
    storage = open_storage(storage_url)
    search = drive.make_search(storage)
    search.study.set_user_attr("num_trials", 3)
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's last save: no trial yet
    drive.run_trial(search, "t1", [2.0])  # asked for, pruned and recorded after that save
    drive.run_trial(search, "t2", [2.1, 1.9, 1.7])
    orphan = search.study.ask()  # what a failed ask leaves, as `_fail_orphans` ends it
    orphan.set_user_attr("fail_reason", "ask failed: database is locked")
    search.study.tell(orphan, state=TrialState.FAIL)

    restored = drive.make_search(open_storage(storage_url))
    restored.restore(str(tmp_path / "searcher.pkl"))
    from ray.tune.search import Searcher

    assert restored.suggest("t3") not in (None, Searcher.FINISHED)  # the third trial of three
    assert restored.suggest("t4") == Searcher.FINISHED and restored.suggest("t5") == Searcher.FINISHED
    study = load_study(storage_url, "s")
    assert len([t for t in study.trials if t.user_attrs.get("fail_reason", "").startswith("ask failed")]) == 1
    assert len(study.trials) == 4  # three of the sweep's and the failed ask's
