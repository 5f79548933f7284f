"""Leaderboard order and `sweep export` on a study written by StudySearch."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from sweep.record.export import ExportError, export_best
from sweep.record.leaderboard import leaderboard, render, to_json
from sweep.record import load_study, open_storage, record_base_metrics, record_spec
from trial_worker.config import JobConfig


@pytest.fixture
def finished(storage_url, drive, demo_spec):
    """A study like a finished ASHA sweep: 2 COMPLETE, 3 PRUNED (one lower than any COMPLETE), 1 FAIL, 1 RUNNING."""
    storage = open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="s", direction="minimize")
    record_spec(study, *demo_spec)
    record_base_metrics(study, 2.5, 12.18)
    search = drive.make_search(storage)
    drive.run_trial(search, "a", [2.0, 1.6, 1.30])      # 0 COMPLETE
    drive.run_trial(search, "b", [1.9, 1.5, 1.10])      # 1 COMPLETE, best
    drive.run_trial(search, "c", [1.0])                 # 2 PRUNED at 10 with the lowest loss of all
    drive.run_trial(search, "d", [2.1, 1.7])            # 3 PRUNED at 20
    drive.run_trial(search, "e", [2.2, 1.65])           # 4 PRUNED at 20, better than d
    drive.run_trial(search, "f", [2.4], error=True)     # 5 FAIL
    search.record_failure("f", "RuntimeError: boom")
    search.suggest("g")                                 # 6 RUNNING
    search.on_trial_result("g", drive.result(10, 2.3))
    return load_study(storage_url, "s")


def test_leaderboard_ranks_complete_then_pruned_by_budget_then_others(finished):
    rows = leaderboard(finished)
    assert [r["number"] for r in rows] == [1, 0, 4, 3, 2, 6, 5]
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED", "PRUNED", "RUNNING", "FAIL"]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    best = rows[0]
    assert best["val_loss"] == pytest.approx(1.10) and best["rung_reached"] == 3 and best["budget_reached"] == 40
    assert best["tokens_per_s"] == pytest.approx(1002.0) and best["samples_per_s"] == pytest.approx(12.0)
    assert set(best["params"]) == {"learning_rate", "lora_r"}
    pruned_c = next(r for r in rows if r["number"] == 2)
    assert pruned_c["val_loss"] == pytest.approx(1.0) and pruned_c["budget_reached"] == 10
    running = next(r for r in rows if r["state"] == "RUNNING")
    assert running["val_loss"] == pytest.approx(2.3) and running["budget_reached"] == 10
    fail = rows[-1]
    assert fail["fail_reason"] == "RuntimeError: boom"


def test_leaderboard_json_carries_base_and_no_nan(finished):
    board = json.loads(to_json(leaderboard(finished), finished))
    assert board["study"] == "s"
    assert board["base"] == {"val_loss": 2.5, "ppl": 12.18}
    assert board["trials"][0]["number"] == 1


def test_render_shows_gain_over_base(finished):
    from rich.console import Console

    console = Console(record=True, width=200)
    render(leaderboard(finished), finished, console=console)
    text = console.export_text()
    assert "vs base" in text and "+1.400 +56%" in text  # 2.5 - 1.1, and the gain in percent
    assert "COMPLETE" in text and "PRUNED" in text and "FAIL" in text
    assert "trial   5 failed: RuntimeError: boom" in text


def test_render_on_a_narrow_terminal_lists_params_under_the_table(finished):
    from rich.console import Console

    console = Console(record=True, width=80)
    render(leaderboard(finished), finished, console=console)
    text = console.export_text()
    assert "COMPLETE" in text and "learning_rate=" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_base_metrics_are_written_once(storage_url):
    study = optuna.create_study(storage=open_storage(storage_url), study_name="s")
    assert record_base_metrics(study, 2.5, 12.18) is True
    assert record_base_metrics(study, 9.9, 9.9) is False
    assert load_study(storage_url, "s").user_attrs["base_val_loss"] == 2.5


def test_export_picks_the_best_complete_not_a_lower_pruned(finished, tmp_path):
    out = tmp_path / "best.yaml"
    info = export_best(finished, out)
    assert "trial 1" in info
    text = out.read_text()
    assert "study 's'" in text and "trial 1: val_loss 1.1000" in text and "sweep train best.yaml" in text

    data = yaml.safe_load(text)
    assert "search" not in data and "storage" not in data
    best = next(t for t in finished.trials if t.number == 1)
    job = JobConfig.model_validate({k: data[k] for k in JobConfig.model_fields})
    assert job.training.learning_rate == pytest.approx(best.params["learning_rate"])
    assert job.model.lora.r == best.params["lora_r"]
    assert job.budget.min == job.budget.max == 40
    assert data["resources"]["cpus_per_trial"] == 1  # the rest of the spec is kept


def test_exported_file_loads_back_as_a_training_config(finished, tmp_path):
    from sweep.spec import load_spec

    out = tmp_path / "best.yaml"
    export_best(finished, out)
    spec = load_spec(out)
    assert spec.search is None
    assert spec.budget.rungs == [40]
    assert spec.name == "demo_cpu"


def test_export_without_a_complete_trial_says_why(storage_url, drive, demo_spec, tmp_path):
    storage = open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="s")
    record_spec(study, *demo_spec)
    search = drive.make_search(storage)
    drive.run_trial(search, "a", [1.0, 0.9])
    with pytest.raises(ExportError, match=r"no COMPLETE trial \(1 PRUNED\).*top rung \(40 steps\)"):
        export_best(load_study(storage_url, "s"), tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()


def test_export_of_a_study_without_a_recorded_spec_says_why(storage_url, drive, tmp_path):
    drive.run_trial(drive.make_search(open_storage(storage_url)), "a", [2.0, 1.5, 1.2])
    with pytest.raises(ExportError, match="no recorded spec"):
        export_best(load_study(storage_url, "s"), tmp_path / "best.yaml")


def test_recorded_spec_holds_no_secret(storage_url, demo_spec):
    spec, h = demo_spec
    spec = dict(spec, storage="postgresql+psycopg://sweep:hunter2@db:5432/sweeps")
    spec["tracking"] = {"wandb": {"mode": "online", "api_key": "abc123"}}
    spec["data"] = dict(spec["data"], max_tokens=7)  # not a secret: kept
    study = optuna.create_study(storage=open_storage(storage_url), study_name="s")
    assert record_spec(study, spec, h) is True
    assert record_spec(study, spec, h) is False
    stored = json.dumps(load_study(storage_url, "s").user_attrs)
    assert "hunter2" not in stored and "abc123" not in stored
    assert "sweep:***@db" in stored
    assert load_study(storage_url, "s").user_attrs["spec"]["data"]["max_tokens"] == 7
