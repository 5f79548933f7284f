"""Finding a study by name: $SWEEP_HOME/studies.json, storage URLs, messages without passwords."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sweep.record import (
    StorageError,
    StudyNotFound,
    load_study,
    open_storage,
    register_study,
    registered_studies,
    resolve_study,
    safe_url,
)

ROOT = Path(__file__).resolve().parents[2]
PG = "postgresql+psycopg://sweep:hunter2@127.0.0.1:5432/sweeps"


def test_registry_stores_no_password(sweep_home):
    register_study("demo", PG)
    text = (sweep_home / "studies.json").read_text()
    assert "hunter2" not in text
    assert json.loads(text) == {"demo": "postgresql+psycopg://sweep@127.0.0.1:5432/sweeps"}


def test_resolve_by_name_and_explicit_storage_wins(sweep_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register_study("demo", "sqlite:///demo.db")  # relative: stored absolute, works from any folder
    assert resolve_study("demo") == (f"sqlite:///{tmp_path / 'demo.db'}", "demo")
    assert resolve_study("demo", "sqlite:////elsewhere.db") == ("sqlite:////elsewhere.db", "demo")
    assert resolve_study("never-registered", "sqlite:////x.db") == ("sqlite:////x.db", "never-registered")
    register_study("other", "sqlite:///other.db")
    assert set(registered_studies()) == {"demo", "other"}


def test_resolve_unknown_name_lists_known_ones(sweep_home):
    register_study("demo", "sqlite:////tmp/demo.db")
    with pytest.raises(StudyNotFound, match=r"no study named 'dmeo' \(known studies: demo\).*--storage"):
        resolve_study("dmeo")


def test_resolve_a_spec_file_gives_its_name_and_default_storage():
    spec = ROOT / "search_spaces" / "demo_cpu.yaml"
    assert resolve_study(str(spec)) == (f"sqlite:///{spec.parent.resolve() / 'demo_cpu.db'}", "demo_cpu")
    assert resolve_study(str(spec), "sqlite:////x.db") == ("sqlite:////x.db", "demo_cpu")


def test_load_study_names_the_studies_a_storage_holds(storage_url):
    optuna.create_study(storage=open_storage(storage_url), study_name="real")
    with pytest.raises(StudyNotFound, match=r"no study named 'nope' in .*; it holds: real"):
        load_study(storage_url, "nope")


def test_status_of_a_missing_sqlite_file_does_not_create_it(tmp_path):
    with pytest.raises(StudyNotFound, match="no study database"):
        load_study(f"sqlite:///{tmp_path / 'missing.db'}", "x")
    assert not (tmp_path / "missing.db").exists()


def test_storage_errors_never_show_the_password():
    assert safe_url(PG) == "postgresql+psycopg://sweep:***@127.0.0.1:5432/sweeps"
    with pytest.raises(StorageError) as e:
        open_storage("postgresql+psycopg://sweep:hunter2@127.0.0.1:1/sweeps")  # nothing listens on port 1
    assert "hunter2" not in str(e.value) and "sweep:***@127.0.0.1:1" in str(e.value)


def test_study_tools_do_not_import_ray_or_torch():
    code = (
        "import sys, sweep.record, sweep.record.leaderboard, sweep.record.export\n"
        "heavy = [m for m in ('ray', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_postgres_study_found_by_name_with_the_password_from_pgpassword(pg_server, monkeypatch, sweep_home):
    url = pg_server.create_database("registry_pw")
    optuna.create_study(storage=open_storage(url), study_name="pg")
    register_study("pg", url)
    assert pg_server.password not in (sweep_home / "studies.json").read_text()
    stored, name = resolve_study("pg")
    assert pg_server.password not in stored
    monkeypatch.setenv("PGPASSWORD", pg_server.password)  # libpq's own way to get it
    assert load_study(stored, name).study_name == "pg"


def test_postgres_restart_during_a_sweep_is_survived(pg_server, drive):
    """pool_pre_ping: connections the restart killed are replaced, not used."""
    url = pg_server.create_database("restart")
    search = drive.make_search(open_storage(url))
    search.suggest("t1")
    search.on_trial_result("t1", drive.result(10, 2.0))
    pg_server.restart()
    search.on_trial_result("t1", drive.result(20, 1.5, 1))
    search.on_trial_complete("t1", result=drive.result(40, 1.2, 2))
    t = load_study(url, "s").trials[0]
    assert t.state.name == "COMPLETE" and t.intermediate_values == {10: 2.0, 20: 1.5, 40: 1.2}
