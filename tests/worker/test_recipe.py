import math
import shutil
import time
from pathlib import Path

import pytest

from trial_worker.config import REPORT_KEYS, JobConfig
from trial_worker.formats import rung_steps, sft_config
from trial_worker.recipe import evaluate_base, run


def _job(tiny_model, task_data, **training) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"name_or_path": tiny_model, "quantization": {"bnb_4bit_compute_dtype": "float32"},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},  # dropout: resume must restore the RNG too
        "data": {"path": task_data, "max_seq_length": 64},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "gradient_checkpointing": False,
                     "use_cpu": True, "torch_threads": 2, "logging_steps": 3, **training},
        "budget": {"min": 5, "max": 20, "reduction_factor": 2},
    })


@pytest.fixture(scope="module")
def full_run(tiny_model, task_data, tmp_path_factory):
    """One uninterrupted trial to the top rung: (job, reports, output dir)."""
    job = _job(tiny_model, task_data)
    out = tmp_path_factory.mktemp("full")
    reports = []
    last = run(job, report=lambda m, d: reports.append((m, d)), output_dir=out, started_at=time.time() - 100.0)
    assert last == reports[-1][0]
    return job, reports, out


def test_reports_at_every_rung_with_a_resumable_checkpoint(full_run):
    job, reports, _ = full_run
    assert [m["steps"] for m, _ in reports] == [5, 10, 20]
    assert [m["rung"] for m, _ in reports] == [0, 1, 2]
    assert [m["samples"] for m, _ in reports] == [20, 40, 80]
    for metrics, ckpt in reports:
        assert set(metrics) == set(REPORT_KEYS)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
        assert metrics["ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
        assert metrics["tokens_per_s"] > 0 and metrics["peak_mem_gb"] > 0
        assert 0 < metrics["train_s"] < metrics["wall_s"]
        # set-up counts from when the trial started (here 100 s before `run`: a slow start is seen) to its first step
        assert 100 < metrics["setup_s"] == reports[0][0]["setup_s"] < 100 + metrics["wall_s"]
        files = {p.name for p in Path(ckpt).iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= files


def test_lr_schedule_spans_the_top_rung(full_run):
    # Linear decay over max=20 steps, not over the first rung's 5: a promoted trial continues it.
    # The reported LR is the one the rung's last step used (step s runs at lr * (20 - (s - 1)) / 20).
    job, reports, _ = full_run
    lr = job.training.learning_rate
    expected = [lr * (20 - (s - 1)) / 20 for s in (5, 10, 20)]
    assert [m["scheduled_lr"] for m, _ in reports] == pytest.approx(expected, abs=1e-9)


def test_training_lowers_the_loss(full_run):
    job, reports, _ = full_run
    base = evaluate_base(job)
    assert set(base) == {"val_loss", "ppl", "tokens"}
    val = [m["val_loss"] for m, _ in reports]
    assert val[-1] < val[0] < base["val_loss"]
    assert reports[-1][0]["train_loss"] < reports[0][0]["train_loss"]


def test_resume_from_a_rung_checkpoint_continues_the_same_run(full_run, tmp_path):
    job, reports, _ = full_run
    (m10, ckpt10), (m20, _) = reports[1], reports[2]
    saved = tmp_path / "rung1"
    shutil.copytree(ckpt10, saved)  # as Tune hands it back: a copy somewhere else
    resumed = []
    run(job, report=lambda m, d: resumed.append(m), resume_from=str(saved), output_dir=tmp_path / "out")

    assert [m["steps"] for m in resumed] == [20]  # continues at step 10, next rung 20
    r = resumed[0]
    assert r["scheduled_lr"] == pytest.approx(m20["scheduled_lr"], abs=1e-12)
    assert r["val_loss"] == pytest.approx(m20["val_loss"], rel=1e-6)
    assert r["train_loss"] == pytest.approx(m20["train_loss"], rel=1e-6)
    assert r["train_s"] > m10["train_s"]  # time counters carry over


def test_budget_in_samples_becomes_steps_of_the_effective_batch(tiny_model, task_data):
    job = _job(tiny_model, task_data, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    job = job.model_copy(update={"budget": job.budget.model_copy(update={"unit": "samples", "min": 12, "max": 48})})
    assert job.budget.rungs == [12, 24, 48]
    assert rung_steps(job) == [2, 4, 8]


def test_every_training_knob_reaches_sft_config(tiny_model, task_data, tmp_path):
    job = _job(tiny_model, task_data, optim="adafactor", weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
               adam_epsilon=1e-6, max_grad_norm=0.5, warmup_ratio=0.1, lr_scheduler_type="cosine",
               gradient_accumulation_steps=2, per_device_eval_batch_size=3, seed=7, group_by_length=True,
               gradient_checkpointing=True)
    job = job.model_copy(update={"data": job.data.model_copy(update={"packing": True, "max_seq_length": 48})})
    args = sft_config(job, str(tmp_path), cpu=True)
    assert args.max_steps == 20 and args.warmup_steps == 2
    assert (args.optim, args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (
        "adafactor", 0.1, 0.8, 0.95, 1e-6)
    assert (args.max_grad_norm, args.lr_scheduler_type, args.gradient_accumulation_steps) == (0.5, "cosine", 2)
    assert (args.per_device_eval_batch_size, args.seed, args.max_length, args.packing) == (3, 7, 48, True)
    assert args.gradient_checkpointing and args.use_cpu and args.report_to in ([], "none", ["none"])
    assert getattr(args, "group_by_length", None) or getattr(args, "train_sampling_strategy", None) == "group_by_length"


def test_packing_trains(tiny_model, task_data, tmp_path):
    job = _job(tiny_model, task_data)
    job = job.model_copy(update={
        "data": job.data.model_copy(update={"packing": True}),
        "budget": job.budget.model_copy(update={"min": 3, "max": 3}),
    })
    reports = []
    run(job, report=lambda m, d: reports.append(m), output_dir=tmp_path)
    assert [m["steps"] for m in reports] == [3] and math.isfinite(reports[0]["val_loss"])


def test_same_params_and_seed_give_the_same_trial(tiny_model, task_data, tmp_path):
    job = _job(tiny_model, task_data)
    job = job.model_copy(update={"budget": job.budget.model_copy(update={"min": 2, "max": 2})})
    first, second = [], []
    run(job, report=lambda m, d: first.append(m["val_loss"]), output_dir=tmp_path / "a")
    run(job, report=lambda m, d: second.append(m["val_loss"]), output_dir=tmp_path / "b")
    assert first == second


def test_libraries_are_quieted_while_another_thread_imports_datasets():
    """A CPU pack makes its data in a thread (which imports `datasets`) while its main thread quiets the
    libraries: caught half-imported, `datasets` must be waited for and quieted, not fail the pack's start
    ("partially initialized module 'datasets' has no attribute 'disable_progress_bars'")."""
    import subprocess
    import sys

    code = """
import sys, threading
import transformers  # imported first, as in the pack; datasets is then imported by the thread
t = threading.Thread(target=lambda: __import__("datasets"))
t.start()
while "datasets" not in sys.modules:
    pass
half = not hasattr(sys.modules["datasets"], "disable_progress_bars")
from trial_worker.recipe import quiet_libraries
quiet_libraries()
t.join()
from datasets import are_progress_bars_disabled
print("caught half-imported:", half, "quiet:", are_progress_bars_disabled())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quiet: True" in out.stdout, out.stdout
