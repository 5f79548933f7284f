"""The same trial on a CUDA GPU: 4-bit NF4 base on the GPU, bf16 compute, paged 8-bit AdamW."""

import shutil

import pytest

from trial_worker.config import REPORT_KEYS
from trial_worker.recipe import run

pytestmark = pytest.mark.gpu


def test_qlora_trial_on_gpu_reports_and_resumes(make_job, tmp_path):
    import bitsandbytes as bnb
    import torch

    from trial_worker.model import load_model

    job = make_job(
        model={"quantization": {"bnb_4bit_compute_dtype": "bfloat16"}},
        training={"use_cpu": None, "bf16": True, "gradient_checkpointing": True, "optim": "paged_adamw_8bit"},
        budget={"min": 4, "max": 8},
    )
    _, model = load_model(job.model, job.training)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.device.type == "cuda" for m in linears)
    del model

    reports = []
    run(job, report=lambda m, d: reports.append((m, d)), output_dir=tmp_path / "a")
    assert [m["steps"] for m, _ in reports] == [4, 8]
    assert all(set(m) == set(REPORT_KEYS) for m, _ in reports)
    assert reports[-1][0]["val_loss"] < reports[0][0]["val_loss"]
    assert 0 < reports[-1][0]["peak_mem_gb"] < 2 and torch.cuda.max_memory_allocated() > 0

    shutil.copytree(reports[0][1], tmp_path / "rung0")
    resumed = []
    run(job, report=lambda m, d: resumed.append(m), resume_from=str(tmp_path / "rung0"), output_dir=tmp_path / "b")
    assert [m["steps"] for m in resumed] == [8]
    assert resumed[0]["scheduled_lr"] == pytest.approx(reports[-1][0]["scheduled_lr"])
    assert resumed[0]["val_loss"] == pytest.approx(reports[-1][0]["val_loss"], rel=1e-3)  # GPU kernels: not bitwise
