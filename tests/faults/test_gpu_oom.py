"""GPU out of memory for real (#6 item 7, the GPU half; tests/faults/test_oom.py is the CPU half with an injected OOM).

`training.gpu_memory_fraction` caps a trial's CUDA allocator at a share of the GPU (by default the
share Ray gave it, `resources.gpus_per_trial` < 1). A trial over its share gets a real
`torch.OutOfMemoryError` from CUDA's caching allocator, and the recipe's policy takes over: half
the micro-batch at the same effective batch, or `TrialOOM` ("oom: ...") when micro-batch 1 does
not fit, with the memory released for the next trial.

The model is Llama-shaped with random weights (4 layers, hidden 1024, vocab 8192; NF4 + LoRA r16
on the 7 projections), rows of 1024 tokens, no gradient checkpointing, `execution: as_written`
(so the memory probe does not pick a fitting micro-batch first). The caps are set from the
measured peak of micro-batch 1 (P1) on this GPU: 2.5 x P1 (16 rows cannot fit, 1 row fits) and
halfway between the loaded model and P1 (not even 1 row fits). With SWEEP_GPU_OOM_RESULTS=path
the figures are written there as JSON (benchmarks/results/gpu_oom.json).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import time
from pathlib import Path

import pytest

from trial_worker.config import JobConfig
from trial_worker.recipe import QLoRATrial, TrialOOM, run

pytestmark = pytest.mark.gpu

SEQ = 1024
EFF = 16
LLAMA = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, intermediate_size=4096,
             vocab_size=8192, tie_word_embeddings=True, max_position_embeddings=2 * SEQ)
LORA = {"r": 16, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
GiB = 2**30
RETRY = re.compile(r"out of memory at micro-batch (\d+)x(\d+) \((.*?)\); retrying as (\d+)x(\d+)")


def _job(assets, *, mb: int, acc: int, fraction=None, steps=(2, 4)) -> JobConfig:
    return JobConfig.model_validate({
        "name": "gpu-oom",
        "model": {"name_or_path": assets["model"], "quantization": {"bnb_4bit_compute_dtype": "bfloat16"}, "lora": LORA},
        "data": {"path": assets["data"], "format": "text", "max_seq_length": SEQ, "validation_split": "validation"},
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": mb, "gradient_accumulation_steps": acc,
                     "per_device_eval_batch_size": 1, "gradient_checkpointing": False, "bf16": True, "optim": "adamw_torch",
                     "logging_steps": 1, "execution": "as_written", "use_liger_kernel": False,
                     "gpu_memory_fraction": fraction},
        "budget": {"unit": "steps", "min": steps[0], "max": steps[-1], "reduction_factor": 2},
    })


@pytest.fixture(scope="module")
def results():
    """What the tests measured; written to $SWEEP_GPU_OOM_RESULTS at the end of the module."""
    out: dict = {}
    yield out
    path = os.environ.get("SWEEP_GPU_OOM_RESULTS")
    if path and out:
        Path(path).write_text(json.dumps(out, indent=1, default=str) + "\n")


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, results):
    """A Llama-shaped model (random weights) and 1024-token text rows; P1 = peak of one micro-batch-1 step on this GPU."""
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trial_worker.inputs.demo import build_tokenizer

    root = tmp_path_factory.mktemp("gpu-oom")
    model_dir, data_dir = root / "model", root / "data"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16).save_pretrained(model_dir)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    build_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], vocab_size=1000).save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data_dir.mkdir()
    for split, n in (("train", 64), ("validation", 4)):
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                ids = tok(" ".join(rng.choices(words, k=SEQ)), add_special_tokens=False)["input_ids"][: SEQ - 2]
                f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    assets = {"model": str(model_dir), "data": str(data_dir)}

    gc.collect()
    torch.cuda.empty_cache()
    trial = QLoRATrial(_job(assets, mb=1, acc=1, steps=(1,)), output_dir=root / "calibrate").setup()
    loaded = torch.cuda.memory_allocated()
    trial.train()
    p1 = torch.cuda.max_memory_allocated()
    trial.cleanup()
    total = torch.cuda.get_device_properties(0).total_memory
    import bitsandbytes
    import peft
    import trl

    results.update({
        "device": torch.cuda.get_device_name(), "total_memory_gib": round(total / GiB, 2), "date": "2026-11-23",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__},
        "model": {**LLAMA, "quantization": "nf4 + double quant, bf16 compute", "lora": LORA, "seq": SEQ,
                  "gradient_checkpointing": False, "optim": "adamw_torch"},
        "calibration": {"loaded_gib": round(loaded / GiB, 3), "peak_micro_batch_1_gib": round(p1 / GiB, 3),
                        "seconds_incl_model_build": round(time.perf_counter() - t0, 1)},
    })
    return {**assets, "loaded": loaded, "p1": p1, "total": total, "root": root}


def test_real_cuda_oom_is_retried_with_a_smaller_micro_batch_under_the_cap(gpu_model, results, fault_row, capfd):
    import torch

    fraction = round(2.5 * gpu_model["p1"] / gpu_model["total"], 4)
    cap_gib = fraction * gpu_model["total"] / GiB
    reports = []
    t0 = time.perf_counter()
    run(_job(gpu_model, mb=EFF, acc=1, fraction=fraction), report=lambda m, d: reports.append(m),
        output_dir=gpu_model["root"] / "a")
    seconds = time.perf_counter() - t0
    retries = RETRY.findall(capfd.readouterr().err)
    assert retries and retries[0][:2] == (str(EFF), "1"), retries  # 16 x 1 ran out of memory first
    assert all("CUDA out of memory" in r[2] and "injected" not in r[2] for r in retries), retries
    executed = [(m["micro_batch"], m["accumulation"]) for m in reports]
    assert [m["steps"] for m in reports] == [2, 4], reports  # the trial finished: both rungs reported, once each
    assert all(mb * acc == EFF for mb, acc in executed) and executed[-1][0] < EFF, executed  # same effective batch
    assert executed[-1] == (int(retries[-1][3]), int(retries[-1][4])), (executed, retries)  # reported as executed
    assert all(math.isfinite(m["val_loss"]) for m in reports)
    assert reports[-1]["peak_mem_gb"] <= cap_gib, (reports[-1]["peak_mem_gb"], cap_gib)  # it trained within its share
    results["retry_fits"] = {
        "gpu_memory_fraction": fraction, "cap_gib": round(cap_gib, 3), "written": f"{EFF}x1",
        "tried": [f"{a}x{b}" for a, b, *_ in retries] + [f"{executed[-1][0]}x{executed[-1][1]}"],
        "oom_errors": [r[2] for r in retries], "reports": [{k: m[k] for k in ("steps", "micro_batch", "accumulation",
                                                                             "peak_mem_gb", "val_loss", "tokens_per_s")}
                                                            for m in reports],
        "seconds": round(seconds, 1), "allocated_after_gib": round(torch.cuda.memory_allocated() / GiB, 3),
    }
    fault_row(fault="GPU out of memory for real (GPU), smaller micro-batch fits",
              injected=f"trial capped by `training.gpu_memory_fraction` {fraction:g} ({cap_gib:.2f} GiB = 2.5 x the "
                       f"micro-batch-1 peak) on {torch.cuda.get_device_name()}; written {EFF}x1, 1024-token rows; real CUDA OOM",
              lost=f"0: retried {' -> '.join(results['retry_fits']['tried'])}, both rungs reported as executed",
              seconds=seconds)


def test_real_cuda_oom_at_micro_batch_one_fails_tagged_oom_and_frees_the_gpu(gpu_model, results, fault_row):
    import torch

    loaded, p1, total = gpu_model["loaded"], gpu_model["p1"], gpu_model["total"]
    fraction = round((loaded + p1) / 2 / total, 4)  # above the loaded model, below one row's training step
    cap_gib = fraction * total / GiB
    assert loaded < fraction * total < p1
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with pytest.raises(TrialOOM) as exc:
        run(_job(gpu_model, mb=4, acc=1, fraction=fraction), report=lambda m, d: None, output_dir=gpu_model["root"] / "b")
    seconds = time.perf_counter() - t0
    msg = str(exc.value)
    exc = None  # drop the traceback before measuring
    gc.collect()
    after, reserved_after = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    assert msg.startswith("oom: out of memory at every micro-batch of effective batch 4 (tried 4x1, 2x2, 1x4)"), msg
    assert "GiB allocated; after freeing:" in msg and f"capped at {fraction:g} of the GPU" in msg, msg
    assert "CUDA out of memory" in msg and "injected" not in msg, msg
    assert after - before <= 32 * 2**20, (before, after)  # the GPU memory of the failed trial is released

    # The next trial in this process: no cap (whole GPU), trains as written with more memory than the cap allowed.
    reports = []
    t1 = time.perf_counter()
    run(_job(gpu_model, mb=4, acc=1, steps=(2,)), report=lambda m, d: reports.append(m), output_dir=gpu_model["root"] / "next")
    next_seconds = time.perf_counter() - t1
    assert [(m["steps"], m["micro_batch"], m["accumulation"]) for m in reports] == [(2, 4, 1)], reports
    assert math.isfinite(reports[0]["val_loss"]) and reports[0]["peak_mem_gb"] > cap_gib, (reports, cap_gib)
    results["nothing_fits"] = {
        "gpu_memory_fraction": fraction, "cap_gib": round(cap_gib, 3), "written": "4x1", "message": msg,
        "allocated_before_gib": round(before / GiB, 4), "allocated_after_gib": round(after / GiB, 4),
        "reserved_after_gib": round(reserved_after / GiB, 4), "seconds": round(seconds, 1),
        "next_trial": {"gpu_memory_fraction": None, "executed": "4x1", "peak_mem_gb": reports[0]["peak_mem_gb"],
                       "val_loss": reports[0]["val_loss"], "seconds": round(next_seconds, 1)},
    }
    fault_row(fault="GPU out of memory for real (GPU) at micro-batch 1",
              injected=f"cap {fraction:g} of the GPU ({cap_gib:.2f} GiB: above the loaded model, below one row's step); "
                       "written 4x1; real CUDA OOM",
              lost=f"0 of 1 trials: `TrialOOM: oom: ...` after 4x1, 2x2, 1x4 with the memory figures; allocated "
                   f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB; the next trial (no cap) trains 4x1 at "
                   f"{reports[0]['peak_mem_gb']:.2f} GiB",
              seconds=seconds + next_seconds)


def test_sweep_run_caps_a_trial_at_its_ray_gpu_share_and_records_the_retry(gpu_model, results, fault_row, tmp_path):
    """End to end: `resources.gpus_per_trial` below 1 -> `trial_job` caps the trial at that share -> real OOM -> retry."""
    import optuna
    import yaml

    from sweep_helpers import sweep_cli

    share = round(2.5 * gpu_model["p1"] / gpu_model["total"], 4)
    job = _job(gpu_model, mb=EFF, acc=1).model_dump(mode="json")
    job["training"].pop("gpu_memory_fraction")  # left to the GPU share
    job["name"] = name = "gpu-share-oom"
    spec = {**job, "search": {"sampler": "grid", "params": {"learning_rate": {"type": "choice", "values": [1e-4]}}},
            "resources": {"gpus_per_trial": share, "cpus_per_trial": 2, "max_concurrent_trials": 1},
            "output_dir": str(tmp_path / "runs")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# sweep run {name}.yaml\n" + yaml.safe_dump(spec, sort_keys=False))
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SWEEP_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    t0 = time.perf_counter()
    r = sweep_cli("run", path, cwd=tmp_path, env=env, timeout=400)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}")
    assert r.returncode == 0 and len(study.trials) == 1, (r.stdout[-3000:], r.stderr[-3000:])
    trial = study.trials[0]
    assert trial.state.name == "COMPLETE", (trial.state, trial.user_attrs.get("fail_reason"))
    mb, acc = trial.user_attrs["micro_batch"], trial.user_attrs["accumulation"]
    assert mb < EFF and mb * acc == EFF, trial.user_attrs  # written 16x1, as_written: only an OOM retry makes it smaller
    for step in (2, 4):
        rung = trial.user_attrs[f"rung_{step}"]
        assert rung["micro_batch"] * rung["accumulation"] == EFF, rung
        assert rung["peak_mem_gb"] <= share * gpu_model["total"] / GiB, rung
    results["sweep_run_gpu_share"] = {"gpus_per_trial": share, "cap_gib": round(share * gpu_model["total"] / GiB, 3),
                                      "written": f"{EFF}x1", "recorded": f"{mb}x{acc}", "state": trial.state.name,
                                      "peak_mem_gb": trial.user_attrs.get("peak_mem_gb"), "seconds": round(seconds, 1)}
    fault_row(fault="GPU out of memory for real (GPU) in `sweep run`, trials sharing a GPU",
              injected=f"`resources.gpus_per_trial: {share:g}`, `gpu_memory_fraction` unset (filled from Ray's share); "
                       f"written {EFF}x1",
              lost=f"0 of 1 trials: COMPLETE, recorded as executed {mb}x{acc}", seconds=seconds)
