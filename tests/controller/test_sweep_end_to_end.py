"""A real sweep: real Ray, real SQLite study, real QLoRA trials of a tiny Llama on the CPU."""

import json
from pathlib import Path

import optuna
import pytest

from sweep.spec import load_spec
from sweep_helpers import small_spec, sweep_cli, sweep_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNGS = [4, 8, 16]
N_TRIALS = 6


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One small sweep, run through the CLI exactly as a user runs it."""
    work = tmp_path_factory.mktemp("sweep")
    # A learning rate that learns and one that cannot: ASHA must stop some trials.
    params = {"learning_rate": {"type": "choice", "values": [2.0e-2, 1.0e-7]},
              "lora_r": {"type": "choice", "values": [4, 8, 16]}}
    spec_file = small_spec(work, None, name="e2e", params=params, rungs=RUNGS, num_trials=N_TRIALS, eval_samples=48)
    env = sweep_env(work)
    r = sweep_cli("run", spec_file, cwd=work, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    storage = f"sqlite:///{work / 'e2e.db'}"
    study = optuna.load_study(study_name="e2e", storage=storage)
    return {"work": work, "env": env, "study": study, "storage": storage, "out": r.stdout, "spec": spec_file}


def test_the_study_holds_every_trial_once_and_none_left_running(finished_sweep):
    trials = finished_sweep["study"].trials
    assert len(trials) == N_TRIALS
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"}, states
    assert "COMPLETE" in states and "PRUNED" in states, [t.state.name for t in trials]


def test_intermediate_values_sit_at_the_budget_steps(finished_sweep):
    for t in finished_sweep["study"].trials:
        steps = sorted(t.intermediate_values)
        if t.state.name == "COMPLETE":
            assert steps == RUNGS
            assert t.value == pytest.approx(t.intermediate_values[RUNGS[-1]])
        else:  # PRUNED: stopped by ASHA at a lower rung
            assert steps == RUNGS[: len(steps)] and len(steps) < len(RUNGS), steps


def test_pruned_trials_were_worse_at_the_rung_where_they_stopped(finished_sweep):
    trials = finished_sweep["study"].trials
    for t in trials:
        if t.state.name != "PRUNED":
            continue
        rung = max(t.intermediate_values)
        others = [o.intermediate_values[rung] for o in trials if o is not t and rung in o.intermediate_values]
        assert others and min(others) < t.intermediate_values[rung]


def test_training_beats_the_base_model(finished_sweep):
    study = finished_sweep["study"]
    base = study.user_attrs["base_val_loss"]
    assert study.best_trial.value < base - 0.1, (study.best_trial.value, base)


def test_status_reads_the_leaderboard_from_the_study(finished_sweep):
    r = sweep_cli("status", "e2e", "--json", cwd=finished_sweep["work"], env=finished_sweep["env"])
    assert r.returncode == 0, r.stderr
    board = json.loads(r.stdout)
    rows = board["trials"] if isinstance(board, dict) else board
    assert len(rows) == N_TRIALS
    assert rows[0]["state"] == "COMPLETE"
    assert rows[0]["number"] == finished_sweep["study"].best_trial.number


def test_export_writes_the_best_complete_trial_as_a_valid_training_config(finished_sweep):
    out = finished_sweep["work"] / "best.yaml"
    r = sweep_cli("export", "e2e", "-o", str(out), cwd=finished_sweep["work"], env=finished_sweep["env"])
    assert r.returncode == 0, r.stderr
    spec = load_spec(out)
    best = finished_sweep["study"].best_trial
    assert spec.search is None
    assert spec.training.learning_rate == pytest.approx(best.params["learning_rate"])
    assert spec.model.lora.r == best.params["lora_r"]
    assert spec.budget.max == RUNGS[-1]
    v = sweep_cli("validate", str(out), cwd=finished_sweep["work"])
    assert v.returncode == 0, v.stderr


def test_a_second_sweep_of_the_same_model_and_data_takes_the_base_from_the_first(finished_sweep):
    """The base evaluation ran beside the first sweep's trials and was recorded; a second sweep (another study in
    the same database, another search over the same model, data and split) does not evaluate it again."""
    f = finished_sweep
    first = f["study"].user_attrs
    assert "evaluating the base model" in f["out"] and first.get("base_eval_key") and "base_from" not in first
    r = sweep_cli("run", f["spec"], "--name", "e2e-again", "--num-trials", "1", cwd=f["work"], env=f["env"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = optuna.load_study(study_name="e2e-again", storage=f["storage"]).user_attrs
    assert (again["base_val_loss"], again["base_ppl"]) == (first["base_val_loss"], first["base_ppl"])
    assert again["base_from"] == "e2e" and again["base_eval_key"] == first["base_eval_key"]
    assert "evaluated for study 'e2e'" in r.stdout and "evaluating the base model" not in r.stdout, r.stdout
