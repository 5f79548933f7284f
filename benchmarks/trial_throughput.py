"""Trial throughput: the seed stack vs sweep's trial worker, same model, same data, same run.

    python benchmarks/trial_throughput.py                 # on a CUDA GPU (the device tool)
    python benchmarks/trial_throughput.py --steps 4 --tiny   # a smoke run on the CPU

(a) seed stack: transformers `Trainer` + PEFT + bitsandbytes, micro-batch 4, gradient
    checkpointing, full logits — the set-up the seeds used, as ../shared/DESIGN.md measured it.
(b) sweep: `trial_worker.recipe.QLoRATrial` with the same hyperparameters (effective batch =
    4 x accumulation), executing it as its memory probe decides (micro-batch, checkpointing),
    TRL's chunked LM-head loss, Liger kernels where installed.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256, tied embeddings), random weights, NF4 + double quant, bf16 compute, LoRA r16
alpha16 on the 7 linear projections. Data: the same 1024-token rows for both sides.
Each (side, effective batch) runs in its own process so peak memory is its own.
Writes benchmarks/results/trial_throughput.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA32_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096,
                  rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
SEED = 1234


def build_assets(work: Path, *, tiny: bool, seq: int, rows: int) -> dict:
    """Model folder (random weights, bf16 safetensors), tokenizer, and a JSONL of `text` rows of exactly `seq` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trial_worker.demo_assets import build_tokenizer

    model_dir, data_dir = work / "model", work / "data"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(**(TINY if tiny else LLAMA32_1B), torch_dtype="bfloat16")
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
        tok = build_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], vocab_size=1000)
        tok.save_pretrained(model_dir)
    if not (data_dir / "train.jsonl").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        rng = random.Random(1)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("validation", 16)):
            with open(data_dir / f"{split}.jsonl", "w") as f:
                for _ in range(n):
                    text = " ".join(rng.choices(words, k=seq))  # ~2+ tokens a word: longer than seq, truncated
                    ids = tok(text, add_special_tokens=False)["input_ids"][: seq - 2]
                    f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    return {"model": str(model_dir), "data": str(data_dir)}


def _timer_callback(warmup: int):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Steady-state time of the steps after `warmup`, with the GPU synchronised at both ends."""

        def __init__(self):
            self.t0 = None
            self.t1 = None
            self.steps = 0

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and self.t0 is None:
                self._sync()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.t0 is not None:
                self._sync()
                self.t1 = time.perf_counter()
                self.steps = state.global_step - warmup

    return Timer()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run_seed(assets: dict, eff: int, steps: int, warmup: int, seq: int) -> dict:
    """The seed stack: Trainer + PEFT + bnb, micro-batch 4 (or eff if smaller), gradient checkpointing."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments, set_seed)

    cuda = torch.cuda.is_available()
    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], quantization_config=bnb,
                                                 dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    ds = load_dataset("json", data_files=str(Path(assets["data"]) / "train.jsonl"), split="train")
    ds = ds.map(lambda r: tok(r["text"], truncation=True, max_length=seq), remove_columns=["text"])
    mb = min(4, eff)
    args = TrainingArguments(
        output_dir="/tmp/seed-bench", max_steps=warmup + steps, per_device_train_batch_size=mb,
        gradient_accumulation_steps=eff // mb, gradient_checkpointing=True, learning_rate=LR,
        lr_scheduler_type="constant", optim="adamw_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
    )
    timer = _timer_callback(warmup)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = timer.steps * eff * seq
    return {"tokens_per_s": tokens / (timer.t1 - timer.t0), "peak_gib": _peak_gib(), "losses": losses,
            "execution": {"micro_batch": mb, "accumulation": eff // mb, "gradient_checkpointing": True},
            "padding_fraction": _padding_fraction(ds, mb, seq)}


def _padding_fraction(ds, mb: int, seq: int) -> float:
    lens = [len(x) for x in ds["input_ids"]]
    padded = sum(max(lens[i:i + mb]) * len(lens[i:i + mb]) for i in range(0, len(lens), mb))
    return 1 - sum(lens) / padded if padded else 0.0


def run_sweep(assets: dict, eff: int, steps: int, warmup: int, seq: int) -> dict:
    """sweep's trial worker on the same job, executing the effective batch as it chooses."""
    import tempfile

    import torch

    from trial_worker.config import JobConfig
    from trial_worker.recipe import QLoRATrial

    cuda = torch.cuda.is_available()
    mb = min(4, eff)
    job = JobConfig.model_validate({
        "name": "bench",
        "model": {"name_or_path": assets["model"],
                  "quantization": {"bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32"},
                  "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGETS}},
        "data": {"path": assets["data"], "format": "text", "max_seq_length": seq, "validation_split": "validation"},
        "training": {"learning_rate": LR, "lr_scheduler_type": "constant", "per_device_train_batch_size": mb,
                     "gradient_accumulation_steps": eff // mb, "gradient_checkpointing": True, "bf16": cuda,
                     "optim": "adamw_8bit" if cuda else "adamw_torch", "logging_steps": 1, "seed": SEED,
                     "torch_compile": os.environ.get("SWEEP_BENCH_COMPILE") == "1"},
        "budget": {"min": warmup + steps, "max": warmup + steps},
    })
    trial = QLoRATrial(job, output_dir=tempfile.mkdtemp(prefix="sweep-bench-")).setup()
    timer = _timer_callback(warmup)
    trial.trainer.add_callback(timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trial.train()
    losses = [h["loss"] for h in trial.trainer.state.log_history if "loss" in h]
    ds = trial.trainer.train_dataset
    lens = [len(x) for x in ds["input_ids"]]
    tokens = timer.steps * eff * seq  # every row is exactly `seq` tokens (row_tokens below shows it)
    ex = trial.execution
    return {"tokens_per_s": tokens / (timer.t1 - timer.t0), "peak_gib": _peak_gib(), "losses": losses,
            "execution": {"micro_batch": ex.micro_batch, "accumulation": ex.accumulation,
                          "gradient_checkpointing": ex.gradient_checkpointing, "source": ex.source,
                          "liger": bool(trial.trainer.args.use_liger_kernel)},
            "padding_fraction": _padding_fraction(ds, ex.micro_batch, seq), "row_tokens": sorted(set(lens))[:3]}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger_kernel"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", default="8,32", help="effective batch sizes")
    ap.add_argument("--sides", default="seed,sweep")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trial_throughput.json"))
    ap.add_argument("--one", nargs=2, metavar=("SIDE", "EFF"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work + ("-tiny" if a.tiny else ""))
    batches = [int(x) for x in a.batches.split(",")]
    if a.one:
        side, eff = a.one[0], int(a.one[1])
        assets = {"model": str(work / "model"), "data": str(work / "data")}
        fn = run_seed if side == "seed" else run_sweep
        res = fn(assets, eff, a.steps, a.warmup, a.seq)
        print("RESULT " + json.dumps(res))
        return

    import torch

    rows = (a.warmup + a.steps) * max(batches) + 64
    t = time.time()
    build_assets(work, tiny=a.tiny, seq=a.seq, rows=rows)
    print(f"assets ready in {time.time() - t:.0f}s under {work}", flush=True)
    results: dict = {
        "benchmark": "trial_throughput",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "versions": versions(),
        "model": "Llama-3.2-1B shape, random weights" if not a.tiny else "tiny Llama (smoke)",
        "setup": {"seq": a.seq, "steps_timed": a.steps, "warmup_steps": a.warmup, "lr": LR, "lora": "r16 a16 7 proj",
                  "quant": "NF4 + double quant, bf16 compute", "optim": "adamw_8bit"},
        "runs": {},
    }
    for eff in batches:
        entry = {}
        for side in a.sides.split(","):
            cmd = [sys.executable, __file__, "--one", side, str(eff), "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--seq", str(a.seq), "--work", a.work] + (["--tiny"] if a.tiny else [])
            t = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                entry[side] = {"error": (p.stderr or p.stdout)[-3000:]}
                print(f"eff {eff} {side}: FAILED\n{p.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(line[-1][len("RESULT "):])
            res["wall_s"] = round(time.time() - t, 1)
            entry[side] = res
            print(f"eff {eff:>3} {side:>5}: {res['tokens_per_s']:>9.0f} tokens/s  peak {res['peak_gib']:.1f} GiB  "
                  f"loss@{len(res['losses'])} {res['losses'][-1]:.4f}  {res['execution']}", flush=True)
        if "tokens_per_s" in entry.get("seed", {}) and "tokens_per_s" in entry.get("sweep", {}):
            s, w = entry["seed"], entry["sweep"]
            entry["speedup"] = round(w["tokens_per_s"] / s["tokens_per_s"], 3)
            entry["final_loss_rel_diff"] = round(abs(w["losses"][-1] - s["losses"][-1]) / s["losses"][-1], 5)
            print(f"eff {eff:>3} speed-up x{entry['speedup']:.2f}, final loss differs by {100 * entry['final_loss_rel_diff']:.2f}%",
                  flush=True)
        results["runs"][str(eff)] = entry
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
