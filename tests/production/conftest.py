"""Fixtures for the production-run tests: the project's tiny Llama and task data, a small CPU job."""

from __future__ import annotations

import pytest

from trial_worker.config import JobConfig
from trial_worker.inputs.demo import write_task_data


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> str:
    return str(write_task_data(tmp_path_factory.mktemp("assets") / "tasks", n_train=160, n_val=24))


@pytest.fixture(scope="session")
def make_job(tiny_model, task_data):
    """A small CPU QLoRA training config (no search); keyword sections override the defaults."""

    def make(*, model=None, lora=None, data=None, training=None, budget=None) -> JobConfig:
        return JobConfig.model_validate({
            "name": "prod",
            "model": {
                "name_or_path": tiny_model,
                "quantization": {"bnb_4bit_compute_dtype": "float32"},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.1, **(lora or {})},  # dropout: resume restores the RNG
                **(model or {}),
            },
            "data": {"path": task_data, "max_seq_length": 64, "validation_split": "validation", **(data or {})},
            "training": {
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 8,
                "gradient_checkpointing": False,
                "warmup_ratio": 0.1,
                "use_cpu": True,
                "torch_threads": 2,
                "logging_steps": 1,
                **(training or {}),
            },
            "budget": {"min": 12, "max": 12, **(budget or {})},
        })

    return make
