"""Shared fixtures: the project's tiny Llama and task data, written once per test session."""

from __future__ import annotations

import pytest

from trial_worker.config import JobConfig
from trial_worker.inputs.demo import write_task_data


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> str:
    return str(write_task_data(tmp_path_factory.mktemp("assets") / "tasks", n_train=200, n_val=40))


@pytest.fixture
def make_job(tiny_model, task_data):
    """A small CPU QLoRA job on the tiny model; keyword sections override the defaults."""

    def make(*, model=None, lora=None, data=None, training=None, budget=None) -> JobConfig:
        return JobConfig.model_validate({
            "model": {
                "name_or_path": tiny_model,
                "quantization": {"bnb_4bit_compute_dtype": "float32"},
                "lora": {"r": 8, "alpha": 16, **(lora or {})},
                **(model or {}),
            },
            "data": {"path": task_data, "max_seq_length": 64, **(data or {})},
            "training": {
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 8,
                "gradient_checkpointing": False,
                "use_cpu": True,
                "torch_threads": 2,
                "logging_steps": 2,
                **(training or {}),
            },
            "budget": {"min": 5, "max": 20, "reduction_factor": 2, **(budget or {})},
        })

    return make
