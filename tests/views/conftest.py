"""Fixtures for the views of a study (W&B, report, dashboards): real studies, no mocks."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # views_helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own study registry, offline W&B with no real key, quiet Optuna."""
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path / "sweep_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"
