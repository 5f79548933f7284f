"""Profile sweep's trial worker on the GPU: where a QLoRA step's time goes.

    python benchmarks/profile_trial.py [--eff 8] [--steps 4]   (after trial_throughput.py built the assets)

Prints GPU-busy share of the profiled steps and the top CUDA kernels by self time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eff", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--liger", default="auto", choices=["auto", "on", "off"])
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile, schedule

    from trial_worker.config import JobConfig
    from trial_worker.recipe import QLoRATrial

    from transformers import TrainerCallback

    liger = None if a.liger == "auto" else a.liger == "on"
    job = JobConfig.model_validate({
        "model": {"name_or_path": f"{a.work}/model", "lora": {"r": 16, "alpha": 16}},
        "data": {"path": f"{a.work}/data", "format": "text", "max_seq_length": 1024, "validation_split": "validation"},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": a.eff // 4,
                     "bf16": True, "optim": "adamw_8bit", "logging_steps": 1, "use_liger_kernel": liger},
        "budget": {"min": 3 + a.steps + 1, "max": 3 + a.steps + 1},
    })
    trial = QLoRATrial(job, output_dir=tempfile.mkdtemp()).setup()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=0, warmup=3, active=a.steps, repeat=1), acc_events=True)

    class Step(TrainerCallback):
        def on_train_begin(self, *x, **k):
            prof.start()

        def on_step_end(self, *x, **k):
            prof.step()

    trial.trainer.add_callback(Step())
    trial.train()
    prof.stop()
    ev = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ev) / 1e3
    print(f"execution {trial.execution}; liger={trial.trainer.args.use_liger_kernel}")
    print(f"profiled {a.steps} steps: GPU kernel time {cuda_total:.0f} ms")
    print(ev.table(sort_by="self_device_time_total", row_limit=28, max_name_column_width=70))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
