"""The pack engine alone (no Ray, no Tune): tokens/s of pack steps at K = 1-16 trials, and where a step's time goes.

    python benchmarks/pack_steps.py                               # a CUDA GPU: this tree's engine
    python benchmarks/pack_steps.py --root .baseline --label before   # an older checkout's engine, same rows
    python benchmarks/pack_steps.py --tiny --steps 2 --warmup 1   # a smoke run on the CPU

Model and rows are `trial_throughput.py`'s (Llama-3.2-1B shape, random weights, NF4 + double quant, bf16
compute, LoRA r16/alpha16 on the 7 projections; realistic row lengths: lognormal, mean ~450 tokens, cut at
1,024), so "K=1" compares with that benchmark's own-process worker at the same effective batch. Mixed packs
take the reference space's effective batches (batch {1,2,4} x accumulation {2,4,8}) in turn. Tokens/s counts
real tokens (what the trials trained), timed over `--steps` pack steps after `--warmup`; rungs are set beyond
the run, so no evaluation or checkpoint is timed. At K=`--profile-k` (GPU; default 8) a torch.profiler table: CUDA kernel time per
step, launches per step, top kernels. Figures merge into benchmarks/results/pack_steps.json under `--label`.

`--root` runs another checkout's `trial_worker` (the engine's API as of 2026-12-05: PackEngine(job,
output_dir=...), add, step, remove), so the before/after comparison runs on the same card in one call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose trial_worker runs")
    ap.add_argument("--label", default="after")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ks", default="1a,1b,4,8,16", help="1a: one trial of effective batch 32, 1b: of 4; N: N mixed")
    ap.add_argument("--lora-mode", default=None, help="trial_worker.pack.lora.MODE (auto, grouped, segments)")
    ap.add_argument("--profile-k", type=int, default=8, help="the pack size (of --ks) profiled with torch.profiler (GPU)")
    ap.add_argument("--trace", help="write the profiled steps' chrome trace here (gzipped, .gz added)")
    ap.add_argument("--liger", default="auto", choices=["auto", "on", "off"],
                    help="training.use_liger_kernel (auto: on a GPU where installed)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pack_steps.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from trial_throughput import LORA_TARGETS, build_assets, merge_result, versions  # noqa: E402

    # after trial_throughput, which puts this tree first on sys.path: `--root`'s trial_worker must come first
    sys.path.insert(0, str(Path(args.root).resolve()))

    from trial_worker.config import JobConfig
    from trial_worker.pack.engine import PackEngine

    if args.lora_mode:
        import trial_worker.pack.lora as lora

        lora.MODE = args.lora_mode
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seq = 128 if args.tiny else 1024
    assets = build_assets(Path(args.work), tiny=args.tiny, seq=seq, rows=2000 if not args.tiny else 64)

    def job(bs: int, ga: int, seed: int) -> JobConfig:
        return JobConfig.model_validate({
            "model": {"name_or_path": assets["model"], "attn_implementation": "sdpa",
                      "quantization": {"bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32"},
                      "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGETS}},
            "data": {"path": assets["lognormal"], "format": "text", "max_seq_length": seq},
            "training": {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "per_device_train_batch_size": bs,
                         "gradient_accumulation_steps": ga, "seed": seed, "bf16": cuda, "use_cpu": not cuda,
                         "optim": "adamw_8bit" if cuda else "adamw_torch", "gradient_checkpointing": False,
                         **({} if args.liger == "auto" else {"use_liger_kernel": args.liger == "on"})},
            "budget": {"min": 10_000, "max": 20_000},  # no rung inside the timed steps
        })

    t0 = time.time()
    engine = PackEngine(job(4, 8, 0), output_dir=str(Path(args.work) / "pack-out"))
    res: dict = {"label": args.label, "root": str(args.root), "engine_init_s": round(time.time() - t0, 1),
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "date": dt.date.today().isoformat(),
                 "versions": versions(), "lora_mode": args.lora_mode or "auto",
                 "liger": getattr(engine, "liger", None), "runs": {}}
    combos = sorted([(b, a) for b in (1, 2, 4) for a in (2, 4, 8)], key=lambda c: c[0] * c[1])
    n = 0

    def timed(steps: int) -> tuple[float, float]:
        sync()
        t = time.perf_counter()
        tok0 = sum(tr.tokens for tr in engine.trials.values())
        for _ in range(steps):
            engine.step()
        sync()
        dt_ = time.perf_counter() - t
        return (sum(tr.tokens for tr in engine.trials.values()) - tok0) / dt_, dt_ / steps

    for spec in args.ks.split(","):
        for tid in list(engine.trials):
            engine.remove(tid)
        k = int(spec.rstrip("ab"))
        picks = [(4, 8)] if spec == "1a" else [(2, 2)] if spec == "1b" else [combos[(i * 2 if k == 4 else i) % len(combos)]
                                                                          for i in range(k)]
        for bs, ga in picks:
            engine.add(f"t{n}", job(bs, ga, n), lambda m, d: None)
            n += 1
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed(args.warmup)
        tps, sps = timed(args.steps)
        name = {"1a": "K1 effective batch 32", "1b": "K1 effective batch 4"}.get(spec, f"K{k} mixed")
        res["runs"][name] = {"tokens_per_s": round(tps), "s_per_pack_step": round(sps, 4),
                             "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                             "step_tokens": getattr(engine, "step_tokens", None),
                             "effective_batches": [b * a for b, a in picks]}
        print(args.label, name, res["runs"][name], flush=True)
        if k == args.profile_k and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                _, profiled_s = timed(3)
            ka = prof.key_averages()
            # the GPU's busy share of the profiled steps: the union of its kernels' intervals over their span
            spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
            busy, end = 0.0, float("-inf")
            for a, b in spans:
                busy += max(0.0, b - max(a, end))
                end = max(end, b)
            if args.trace:
                import gzip

                prof.export_chrome_trace(args.trace)
                with open(args.trace, "rb") as f, gzip.open(args.trace + ".gz", "wb") as g:
                    g.write(f.read())
                Path(args.trace).unlink()
            kernels = sorted([e for e in ka if e.device_type.name == "CUDA"], key=lambda e: -e.self_device_time_total)
            total = sum(e.self_device_time_total for e in kernels)
            res[f"K{k} profile"] = {
                "s_per_step_profiled": round(profiled_s, 4),
                "gpu_busy_pct_profiled": round(100 * busy / max(1e-9, spans[-1][1] - spans[0][0]), 1) if spans else None,
                "cuda_kernel_ms_per_step": round(total / 3 / 1000, 1),
                "kernel_launches_per_step": sum(e.count for e in kernels) // 3,
                "top_kernels_ms_per_step": [(e.key[:80], round(e.self_device_time_total / 3 / 1000, 2), e.count // 3)
                                            for e in kernels[:25]],
                "top_cpu_ms_per_step": [(e.key[:60], round(e.self_cpu_time_total / 3 / 1000, 2), e.count // 3)
                                        for e in sorted([e for e in ka if e.device_type.name == "CPU"],
                                                        key=lambda e: -e.self_cpu_time_total)[:15]]}
            print(json.dumps(res[f"K{k} profile"], indent=0), flush=True)
    merge_result(Path(args.out), args.label, res)


if __name__ == "__main__":
    main()
