import os
import sys
from pathlib import Path

# tests/ itself: the shared helpers (sweep_helpers, pg_server) import by name from any suite.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Offline always: tests never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The project's tiny Llama (2 layers, random weights, its own tokenizer), written once per session."""
    from trial_worker.inputs.demo import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("assets") / "tiny-llama"))


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session (skipped where initdb/psycopg are missing)."""
    import pg_server as pg  # tests/pg_server.py (tests/ is on sys.path: above)

    if not pg.available():
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    pytest.importorskip("psycopg")
    srv = pg.start()
    yield srv
    pg.cleanup(srv)
