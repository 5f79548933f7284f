"""Profile sweep's trial worker on the GPU: where a QLoRA step's time goes.

    python benchmarks/trial_throughput.py --sides sweep --batches 2 --steps 1   # builds the assets once
    python benchmarks/profile_trial.py --eff 2 --dist lognormal --batches padded,flat

For each way of batching (`padded`: the stock right-padded micro-batches; `flat`: the worker's
padding-free bucketed ones) it trains a few warm-up steps, then profiles `--steps` steps and prints:
the wall time of each step, the GPU's kernel time and idle share, the host synchronisations
(`torch.cuda.set_sync_debug_mode`, counted by call site) and the top kernels and CPU ops.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_one(a, batching: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    from trial_worker.config import JobConfig
    from trial_worker.recipe import QLoRATrial

    liger = None if a.liger == "auto" else a.liger == "on"
    mb = min(4, a.eff)
    job = JobConfig.model_validate({
        "model": {"name_or_path": f"{a.work}/model", "lora": {"r": 16, "alpha": 16, "dropout": 0.0}},
        "data": {"path": f"{a.work}/data-{a.dist}", "format": "text", "max_seq_length": 1024,
                 "validation_split": "validation"},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": mb, "gradient_accumulation_steps": a.eff // mb,
                     "bf16": True, "optim": "adamw_8bit", "logging_steps": 1000, "use_liger_kernel": liger},
        "budget": {"min": a.warmup + a.steps + 1, "max": a.warmup + a.steps + 1},
    })
    trial = QLoRATrial(job, output_dir=tempfile.mkdtemp()).setup()
    if a.check:
        check_rows_stay_apart(trial)
    if batching == "padded":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trial.trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=trial.trainer.processing_class.pad_token_id)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=0, warmup=a.warmup, active=a.steps, repeat=1), acc_events=True)
    syncs: collections.Counter = collections.Counter()
    step_s: list[float] = []

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-2] if "site-packages/torch/" not in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
            syncs[f"{str(message).split(':')[0][:60]} @ {where}"] += 1

    class Step(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            prof.start()

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()
            if state.global_step == a.warmup:
                warnings.simplefilter("always")  # every sync, not the first per call site
                warnings.showwarning = on_warning
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - self.t)
            prof.step()

    shown = warnings.showwarning
    trial.trainer.add_callback(Step())
    try:
        trial.train()
    finally:
        warnings.showwarning = shown
        torch.cuda.set_sync_debug_mode("default")
    prof.stop()
    ev = prof.key_averages()
    from torch.autograd import DeviceType

    # Kernels only: user annotations (ProfilerStep*, Optimizer.step#...) also carry device time spans.
    kernels = [e for e in ev if e.device_type == DeviceType.CUDA]
    if not kernels:
        kernels = [e for e in ev if not e.key.startswith("ProfilerStep") and "#" not in e.key]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / a.steps
    timed = step_s[a.warmup:a.warmup + a.steps]
    wall_ms = 1e3 * sum(timed) / len(timed)
    print(f"\n===== {batching}: eff {a.eff} ({trial.execution.micro_batch} x {trial.execution.accumulation}, "
          f"checkpointing {trial.execution.gradient_checkpointing}), {a.dist} rows, liger={trial.trainer.args.use_liger_kernel}")
    print(f"step wall ms (all steps): {[round(1e3 * s) for s in step_s]}")
    print(f"profiled steps: {wall_ms:.0f} ms a step wall, GPU kernels {gpu_ms:.0f} ms ({100 * gpu_ms / wall_ms:.0f}% busy)")
    print(f"host syncs in {a.steps} steps (first {a.warmup} untimed): {sum(syncs.values())}")
    for where, n in syncs.most_common(12):
        print(f"  {n:>5}  {where}")
    print(ev.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    trial.cleanup()
    gc.collect()


def check_rows_stay_apart(trial) -> None:
    """Logits of 3 training rows inside one flattened micro-batch vs each row alone (bf16: compared
    with the error of a micro-batch whose rows may see each other)."""
    import torch

    model, ds = trial.trainer.model, trial.trainer.train_dataset
    rows = [{"input_ids": ds[i]["input_ids"][:300]} for i in range(3)]
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in trial.trainer.data_collator(rows).items()}
    batch.pop("num_tokens"), batch.pop("labels")
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flat = model(**batch).logits[0].float()
        one = {k: batch[k] for k in ("input_ids", "position_ids")}
        leaky = model(**one, cu_seq_lens_q=batch["cu_seq_lens_q"][[0, -1]], cu_seq_lens_k=batch["cu_seq_lens_k"][[0, -1]],
                      max_length_q=one["input_ids"].shape[1], max_length_k=one["input_ids"].shape[1]).logits[0].float()
        s, worst, leak = 0, 0.0, 0.0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]], device="cuda")).logits[0].float()
            worst = max(worst, float((alone - flat[s:s + n]).abs().max()))
            leak = max(leak, float((alone - leaky[s:s + n]).abs().max()))
            s += n
    model.train()
    print(f"CHECK rows alone vs flattened: max |logit diff| {worst:.4g}; with rows seeing each other {leak:.4g} "
          f"-> {'PASS' if leak > 4 * worst else 'FAIL'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eff", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--dist", default="lognormal", choices=["fixed", "lognormal"])
    ap.add_argument("--batches", default="padded,flat", help="which batchings to profile, in turn")
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--liger", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--check", action="store_true", help="first check that flattened rows stay apart (logits)")
    a = ap.parse_args()
    for batching in a.batches.split(","):
        profile_one(a, batching)


if __name__ == "__main__":
    main()
