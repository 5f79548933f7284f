"""`sweep train` with tracking on: one offline W&B run, continued (not duplicated) by --resume."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sweep.cli import app

runner = CliRunner()


def test_train_logs_one_wandb_run_that_resume_continues(tiny_model, task_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from sweep.record.tracking import offline_runs
    from wandb_log import read_offline_run

    monkeypatch.setenv("WANDB_API_KEY", "")  # auto = offline: nothing leaves the machine
    monkeypatch.delenv("WANDB_API_KEY")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"""# sweep train train.yaml
name: wb
model: {{name_or_path: {tiny_model}, quantization: {{bnb_4bit_compute_dtype: float32}}, lora: {{r: 4, alpha: 8}}}}
data: {{path: {task_data}, max_seq_length: 64, validation_split: validation, max_eval_samples: 8}}
training: {{per_device_train_batch_size: 2, use_cpu: true, torch_threads: 2, logging_steps: 2, save_steps: 4,
           gradient_checkpointing: false}}
budget: {{min: 8, max: 8}}
resources: {{gpus_per_trial: 0}}
tracking: {{wandb: {{mode: auto, project: wbtest}}}}
""")
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out)])
    assert r.exit_code == 0, r.output
    runs = offline_runs(out)
    assert len(runs) == 1
    rec = read_offline_run(runs[0])
    assert rec["group"] == "wb" and rec["name"] == "train" and rec["project"] == "wbtest"
    steps = [h["_step"] for h in rec["history"] if "loss" in h]
    assert steps == [2, 4, 6, 8]
    assert rec["config"]["job"]["training"]["learning_rate"] > 0

    # A second invocation on the same folder with --resume logs to the same run id.
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    ids = {read_offline_run(p)["id"] for p in offline_runs(out)}
    assert ids == {rec["id"]}
