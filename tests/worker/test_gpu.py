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


def test_flattened_rows_attend_only_to_themselves_on_gpu(make_job):
    """On CUDA a padding-free micro-batch runs torch's varlen flash-attention kernel: same logits as each row alone."""
    import torch

    from trial_worker.data import FlatCollator
    from trial_worker.model import _varlen_kernel, load_model

    assert _varlen_kernel() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    job = make_job(model={"quantization": {"bnb_4bit_compute_dtype": "bfloat16"}}, training={"use_cpu": None, "bf16": True})
    tok, model = load_model(job.model, job.training)
    model.eval()
    rows = [tok(t)["input_ids"] for t in ("What is 12 + 30? 42", "Reverse abc: cba", "Sort 3 1 2: 1 2 3 and more")]
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in FlatCollator(tok.pad_token_id)([{"input_ids": r} for r in rows]).items()}
    batch.pop("num_tokens"), batch.pop("labels")
    with torch.no_grad():
        flat = model(**batch).logits[0].float()
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      cu_seq_lens_q=batch["cu_seq_lens_q"][[0, -1]], cu_seq_lens_k=batch["cu_seq_lens_k"][[0, -1]],
                      max_length_q=batch["input_ids"].shape[1], max_length_k=batch["input_ids"].shape[1]).logits[0].float()
        s, worst = 0, 0.0
        for row in rows:
            alone = model(input_ids=torch.tensor([row], device="cuda")).logits[0].float()
            worst = max(worst, float((alone - flat[s:s + len(row)]).abs().max()))
            s += len(row)
        # CUDA graphs' layout (graphs.py): row boundaries padded with empty rows, max length = the bucket.
        slotted = FlatCollator(tok.pad_token_id, row_slots=6)([{"input_ids": r} for r in rows])
        slotted = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in slotted.items()}
        assert slotted["cu_seq_lens_q"].shape[0] == 7 and slotted["max_length_q"] == flat.shape[0]
        slotted.pop("num_tokens"), slotted.pop("labels")
        with_slots = model(**slotted).logits[0].float()
    s, row = s - len(rows[-1]), rows[-1]
    leak = float((leaky[s:s + len(row)] - flat[s:s + len(row)]).abs().max())
    ulp = 2**-7 * float(flat.abs().max())  # bf16: one unit in the last place of the largest logit
    assert worst <= 4 * ulp, f"a row inside the flattened batch differs from the row alone by {worst} ({worst / ulp:.1f} ulp)"
    n = sum(map(len, rows))
    assert float((with_slots[:n] - flat[:n]).abs().max()) <= ulp, "empty rows in the boundaries must change nothing"
    assert leak > 4 * worst, f"one boundary for all rows must show as cross-row attention ({leak} vs {worst})"
