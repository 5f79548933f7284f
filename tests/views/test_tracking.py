"""W&B tracking under a real Ray Tune run (toy trainable, real StudySearch + ASHA), read back offline."""

from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
# (views_helpers is imported inside functions: Ray workers import this module to unpickle the trainable.)
N_TRIALS = 8
RUNGS = [10, 20, 40]  # here, not imported: the trainable runs in a Ray worker


def _trainable(config):
    from ray import tune

    if config["lora_r"] == 16 and config["learning_rate"] > 3e-3:
        raise RuntimeError("diverged: loss is inf")
    loss = 3.0
    for i, steps in enumerate(RUNGS):
        loss -= config["learning_rate"] * 50 / (i + 1)
        tune.report({"steps": steps, "samples": steps * 8, "val_loss": loss, "ppl": 2.718 ** loss,
                     "train_loss": loss + 0.1, "scheduled_lr": config["learning_rate"], "tokens_per_s": 1000.0 + i,
                     "samples_per_s": 10.0 + i, "peak_mem_gb": 0.25, "wall_s": 1.0})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """8 trials, 2 at a time, each mirrored to an offline W&B run, with a canary API key in the env."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweep.controller import _make_progress_callback
    from sweep.record import open_storage
    from sweep.record.search import StudySearch
    from sweep.spec import SweepSpec
    from sweep.record.tracking import make_wandb_callback
    from views_helpers import CANARY_KEY, demo_spec_dict

    work = tmp_path_factory.mktemp("tracked")
    storage_url = f"sqlite:///{work / 'study.db'}"
    spec = SweepSpec.model_validate(demo_spec_dict(
        name="trk", output_dir=str(work / "runs"),
        storage="postgresql+psycopg://sweep:hunter2-db-pw@db:5432/sweep",
        tracking={"wandb": {"mode": "offline", "project": "sweep-tests"}}))
    space = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", CANARY_KEY)  # explicit offline mode: the key must be ignored and never written
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONFIG_DIR", str(work / "wandb_config"))
        mp.setenv("WANDB_CACHE_DIR", str(work / "wandb_cache"))
        mp.setenv("WANDB_DATA_DIR", str(work / "wandb_data"))
        search = StudySearch(space, sampler=optuna.samplers.RandomSampler(seed=3), study_name="trk",
                             storage=open_storage(storage_url), budget_key="steps", top_rung=RUNGS[-1],
                             retry_backoff_s=0.01)
        from rich.console import Console

        console = Console(file=open(work / "console.txt", "w"), highlight=False)
        cb = make_wandb_callback(search, spec, "trk", work / "runs", console)
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
        try:
            tune.Tuner(
                _trainable,
                tune_config=tune.TuneConfig(
                    metric="val_loss", mode="min", num_samples=N_TRIALS, search_alg=search,
                    scheduler=ASHAScheduler(time_attr="steps", grace_period=10, max_t=40, reduction_factor=2),
                    max_concurrent_trials=2,
                ),
                run_config=tune.RunConfig(storage_path=str(work / "runs"), name="trk", verbose=0,
                                          callbacks=[_make_progress_callback(search, spec, console), cb]),
            ).fit()
        finally:
            ray.shutdown()
    study = optuna.load_study(study_name="trk", storage=storage_url)
    return {"work": work, "study": study, "cb": cb, "spec": spec}


def _runs(tracked):
    from sweep.record.tracking import offline_runs
    from wandb_log import read_offline_run

    return [read_offline_run(p) for p in offline_runs(tracked["study"].user_attrs["wandb_dir"])]


def test_one_offline_run_per_trial_grouped_by_study_and_linked_from_the_trial(tracked):
    from sweep.record.tracking import run_id

    study, runs = tracked["study"], _runs(tracked)
    assert len(study.trials) == N_TRIALS
    assert sorted(r["id"] for r in runs) == sorted(run_id("trk", t.number) for t in study.trials)
    for r in runs:
        assert r["group"] == "trk" and r["project"] == "sweep-tests"
    by_id = {r["id"]: r for r in runs}
    for t in study.trials:
        rid = t.user_attrs["wandb_run_id"]
        assert by_id[rid]["name"] == f"trial-{t.number}"
        assert t.user_attrs["wandb_project"] == "sweep-tests"
        assert t.user_attrs["wandb_url"] is None  # offline: no URL until `sweep wandb-sync`
    assert study.user_attrs["wandb_mode"] == "offline"


def test_config_holds_params_and_job_settings_but_no_secret(tracked):
    study = tracked["study"]
    by_id = {r["id"]: r for r in _runs(tracked)}
    for t in study.trials:
        cfg = by_id[t.user_attrs["wandb_run_id"]]["config"]
        assert cfg["learning_rate"] == pytest.approx(t.params["learning_rate"])
        assert cfg["lora_r"] == t.params["lora_r"]
        assert cfg["job"]["model"]["lora"]["alpha"] == 16
        assert cfg["job"]["training"]["seed"] == 42
        assert cfg["rungs"] == RUNGS and cfg["budget_unit"] == "steps" and cfg["trial_number"] == t.number
        assert "storage" not in cfg and "storage" not in cfg["job"]
    from views_helpers import CANARY_KEY, all_text_under

    blob = all_text_under(tracked["work"])
    assert CANARY_KEY.encode() not in blob
    assert b"hunter2-db-pw" not in blob


def test_history_is_logged_at_the_budget_steps_and_matches_the_study(tracked):
    study = tracked["study"]
    by_id = {r["id"]: r for r in _runs(tracked)}
    assert max(len(t.intermediate_values) for t in study.trials) == 3
    for t in study.trials:
        hist = [h for h in by_id[t.user_attrs["wandb_run_id"]]["history"] if "val_loss" in h]
        steps = [h["_step"] for h in hist]
        assert steps == sorted(t.intermediate_values), (t.number, steps, t.intermediate_values)
        for h in hist:
            assert h["val_loss"] == pytest.approx(t.intermediate_values[h["_step"]])
            assert h["rung"] == RUNGS.index(h["_step"]) + 1
            for k in ("train_loss", "ppl", "scheduled_lr", "tokens_per_s", "samples_per_s", "peak_mem_gb"):
                assert k in h, k


def test_summary_holds_the_final_state_and_rung(tracked):
    study = tracked["study"]
    by_id = {r["id"]: r for r in _runs(tracked)}
    states = set()
    for t in study.trials:
        s = by_id[t.user_attrs["wandb_run_id"]]["summary"]
        states.add(s["state"])
        assert s["state"] == t.state.name, (t.number, s)
        assert s["rung_reached"] == len(t.intermediate_values)
        assert s["optuna_trial_number"] == t.number
        if t.state == TrialState.FAIL:
            assert "diverged" in s["fail_reason"]
    assert {"COMPLETE", "PRUNED"} <= states


def test_the_callback_pickles_without_its_runs_and_a_resumed_trial_continues_its_run(tracked, tmp_path):
    """Tune pickles callbacks into its experiment state; after a restore the same run id is used."""
    import ray.cloudpickle as cloudpickle

    from sweep.record.tracking import offline_runs
    from wandb_log import read_offline_run

    cb = tracked["cb"]
    again = pickle.loads(cloudpickle.dumps(cb))
    assert again.runs == {} and again.study_name == "trk"

    # A trial that restarts from its checkpoint reports rung 2 again, then rung 3, through a restored callback.
    class T:  # the two attributes of a Tune Trial the callback reads
        def __init__(self, trial_id, config):
            self.trial_id, self.config, self.last_result = trial_id, config, {}

    t0 = tracked["study"].trials[0]
    rid = t0.user_attrs["ray_trial_id"]
    trial = T(rid, dict(t0.params))
    again.on_trial_result(0, [], trial, {"steps": 40, "val_loss": 0.5, "ppl": 1.6})
    trial.last_result = {"steps": 40, "val_loss": 0.5}
    again.on_trial_complete(0, [], trial)
    dirs = [p for p in offline_runs(tracked["study"].user_attrs["wandb_dir"])
            if read_offline_run(p)["id"] == t0.user_attrs["wandb_run_id"]]
    assert len(dirs) == 2  # the same run id, continued (W&B merges the two on sync)
    assert read_offline_run(dirs[-1])["summary"]["rung_reached"] == 3
