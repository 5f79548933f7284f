"""Trial throughput: the seed stack vs sweep's trial worker, same model, same rows, same run.

    python benchmarks/trial_throughput.py                                  # on a CUDA GPU (the device tool)
    python benchmarks/trial_throughput.py --tiny --steps 2 --warmup 1      # a smoke run on the CPU

(a) seed stack: transformers `Trainer` + PEFT + bitsandbytes, micro-batch 4, gradient
    checkpointing, full logits, right-padded micro-batches — the set-up the seeds used, as
    ../shared/DESIGN.md measured it.
(b) sweep: `trial_worker.recipe.QLoRATrial` with the same hyperparameters (effective batch =
    4 x accumulation), executing it as its memory probe decides (micro-batch, checkpointing),
    padding-free bucketed micro-batches, TRL's chunked LM-head loss, Liger kernels where installed.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256, tied embeddings), random weights, NF4 + double quant, bf16 compute, LoRA r16
alpha16 on the 7 linear projections. Rows, the same for both sides, in two length distributions:
`fixed` (every row 1,024 tokens) and `lognormal` (realistic chat rows: mean ~450 tokens,
5th-95th percentile ~175-910, capped at 1,024). Tokens/s counts real tokens (what the collator
received), never padding. Each side runs in its own process, every (distribution, effective
batch) in turn, memory freed and the peak reset between them.
Writes benchmarks/results/trial_throughput.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from typing import Optional
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
LOGGING_STEPS = 10  # the worker's default (training.logging_steps): a log is a host sync


LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA = 400.0, 0.5  # mean ~450, p5-p95 ~175-910 tokens
DISTRIBUTIONS = ("fixed", "lognormal")


def row_lengths(dist: str, n: int, seq: int, rng: random.Random) -> list[int]:
    """Token lengths of `n` rows: all `seq` (fixed), or lognormal like real chat rows, capped at `seq`."""
    if dist == "fixed":
        return [seq] * n
    scale = seq / 1024  # the tiny smoke run keeps the shape of the distribution
    return [max(16, min(seq, round(rng.lognormvariate(math.log(LOGNORMAL_MEDIAN * scale), LOGNORMAL_SIGMA))))
            for _ in range(n)]


def build_assets(work: Path, *, tiny: bool, seq: int, rows: int) -> dict:
    """Model folder (random weights, bf16 safetensors) with its tokenizer, and one folder of `text` rows
    (train.jsonl, validation.jsonl) per length distribution."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trial_worker.inputs.demo import build_tokenizer

    model_dir = work / "model"
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(**(TINY if tiny else LLAMA32_1B), torch_dtype="bfloat16")
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
        tok = build_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], vocab_size=1000)
        tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assets = {"model": str(model_dir)}
    for dist in DISTRIBUTIONS:
        data_dir = work / f"data-{dist}"
        assets[dist] = str(data_dir)
        if (data_dir / "train.jsonl").exists():
            continue
        rng = random.Random(1)
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("validation", 16)):
            with open(data_dir / f"{split}.jsonl", "w") as f:
                for length in row_lengths(dist, n, seq, rng):
                    text = " ".join(rng.choices(words, k=length))  # ~2+ tokens a word: longer than needed, cut
                    ids = tok(text, add_special_tokens=False)["input_ids"][: length - 2]
                    f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    return assets


class TokenCount:
    """Wraps a data collator and counts the real tokens it hands out (padding excluded)."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens += int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())
        return batch


def _timer_callback(warmup: int, counter: TokenCount, stop_at: int = 0):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Steady-state time and real tokens of the steps after `warmup`, the GPU synchronised at both ends only.

        No sync in between: a training loop keeps the GPU queued ahead of the host, and a sync per
        step would add the host's time to the GPU's (`step_s` is therefore host time per step).

        The collator has run for a step's micro-batches by its `on_step_end` (the dataloader may fetch
        one micro-batch ahead: the same lead at both ends), so counter differences are the timed steps' tokens.
        """

        def __init__(self):
            self.t_begin = None  # the first step's start: `run_tokens_per_s` counts every step, warm-up included
            self.t0 = self.t1 = None
            self.tok0 = self.tok1 = 0
            self.steps = 0
            self.step_s: list[float] = []
            self._t = None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            if self.t_begin is None or state.global_step == warmup:
                self._sync()
            self._t = time.perf_counter()
            if self.t_begin is None:
                self.t_begin = self._t
            if state.global_step == warmup and self.t0 is None:
                self.t0 = self._t

        def on_step_end(self, args, state, control, **kw):
            last = state.global_step == warmup or (stop_at and state.global_step >= stop_at) or state.global_step >= state.max_steps
            if last:
                self._sync()
            now = time.perf_counter()
            self.step_s.append(round(now - self._t, 4))
            if state.global_step == warmup:
                self.tok0 = counter.tokens
            if self.t0 is not None and state.global_step > warmup:
                self.t1 = now
                self.tok1 = counter.tokens
                self.steps = state.global_step - warmup
            if stop_at and state.global_step >= stop_at:
                control.should_training_stop = True  # before the worker's rung: no evaluation or checkpoint to wait for

    return Timer()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _fresh() -> None:
    """Free the previous run and start the peak-memory count afresh."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _result(timer, trainer, execution: dict) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = timer.tok1 - timer.tok0
    return {"tokens_per_s": tokens / (timer.t1 - timer.t0), "real_tokens_timed": tokens, "steps_timed": timer.steps,
            # every step from the first, warm-up (and CUDA graph captures) included: what a short rung sees
            "run_tokens_per_s": timer.tok1 / (timer.t1 - timer.t_begin),
            "step_s": timer.step_s, "peak_gib": _peak_gib(), "losses": losses, "execution": execution}


def run_seed(assets: dict, dist: str, eff: int, steps: int, warmup: int, seq: int) -> dict:
    """The seed stack: Trainer + PEFT + bnb, micro-batch 4 (or eff if smaller), gradient checkpointing, padded."""
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
    ds = load_dataset("json", data_files=str(Path(assets[dist]) / "train.jsonl"), split="train")
    ds = ds.map(lambda r: tok(r["text"], truncation=True, max_length=seq), remove_columns=["text"])
    mb = min(4, eff)
    args = TrainingArguments(
        output_dir="/tmp/seed-bench", max_steps=warmup + steps, per_device_train_batch_size=mb,
        gradient_accumulation_steps=eff // mb, gradient_checkpointing=True, learning_rate=LR,
        lr_scheduler_type="constant", optim="adamw_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        logging_steps=LOGGING_STEPS, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
    )
    counter = TokenCount(DataCollatorForLanguageModeling(tok, mlm=False))
    timer = _timer_callback(warmup, counter)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counter, callbacks=[timer])
    _fresh()
    trainer.train()
    return _result(timer, trainer, {"micro_batch": mb, "accumulation": eff // mb, "gradient_checkpointing": True,
                                    "batches": "right-padded"})


def run_sweep(assets: dict, dist: str, eff: int, steps: int, warmup: int, seq: int, graphs: Optional[bool] = None) -> dict:
    """sweep's trial worker on the same job, executing the effective batch as it chooses (`graphs`: training.cuda_graphs)."""
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
        "data": {"path": assets[dist], "format": "text", "max_seq_length": seq, "validation_split": "validation"},
        "training": {"learning_rate": LR, "lr_scheduler_type": "constant", "per_device_train_batch_size": mb,
                     "gradient_accumulation_steps": eff // mb, "gradient_checkpointing": True, "bf16": cuda,
                     "optim": "adamw_8bit" if cuda else "adamw_torch", "logging_steps": LOGGING_STEPS, "seed": SEED,
                     "torch_compile": os.environ.get("SWEEP_BENCH_COMPILE") == "1", "cuda_graphs": graphs},
        "budget": {"min": warmup + steps + 1, "max": warmup + steps + 1},  # the same constant LR
    })
    trial = QLoRATrial(job, output_dir=tempfile.mkdtemp(prefix="sweep-bench-")).setup()
    counter = TokenCount(trial.trainer.data_collator)
    trial.trainer.data_collator = counter
    timer = _timer_callback(warmup, counter, stop_at=warmup + steps)
    trial.trainer.add_callback(timer)
    _fresh()
    trial.train()
    ex = trial.execution
    g = trial.trainer._sweep_graphs
    out = _result(timer, trial.trainer, {"micro_batch": ex.micro_batch, "accumulation": ex.accumulation,
                                         "gradient_checkpointing": ex.gradient_checkpointing, "source": ex.source,
                                         "liger": bool(trial.trainer.args.use_liger_kernel),
                                         "batches": type(counter.collate).__name__,
                                         "cuda_graphs": None if g is None else
                                         {"shapes": len(g.graphs), "replays": g.replays, "disabled": g.disabled}})
    trial.cleanup()
    return out


def merge_result(out: Path, label: str, result: dict) -> None:
    """Write `result` under `label` into the JSON file `out`, keeping the other labels' results there."""
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))


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
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", default="2,4,8,32", help="effective batch sizes")
    ap.add_argument("--dists", default=",".join(DISTRIBUTIONS), help="row-length distributions")
    ap.add_argument("--sides", default="seed,sweep", help="seed, sweep (the worker as it runs), eager (the worker without CUDA graphs)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trial_throughput.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)  # one side's runs, in a child process
    a = ap.parse_args()
    work = Path(a.work + ("-tiny" if a.tiny else ""))
    batches = [int(x) for x in a.batches.split(",")]
    dists = a.dists.split(",")
    if a.side:
        assets = {"model": str(work / "model"), **{d: str(work / f"data-{d}") for d in DISTRIBUTIONS}}
        fn = {"seed": run_seed, "sweep": run_sweep, "eager": functools.partial(run_sweep, graphs=False)}[a.side]
        for dist in dists:
            for eff in batches:
                try:
                    res = fn(assets, dist, eff, a.steps, a.warmup, a.seq)
                except Exception as e:  # one run's failure (say, memory) must not lose the others
                    import traceback

                    res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
                print("RESULT " + json.dumps({"dist": dist, "eff": eff, **res}), flush=True)
                _fresh()
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
                  "quant": "NF4 + double quant, bf16 compute", "optim": "adamw_8bit",
                  "rows": {"fixed": f"{a.seq} tokens", "lognormal": f"median {LOGNORMAL_MEDIAN:g} sigma {LOGNORMAL_SIGMA:g}, "
                                                                  f"16..{a.seq} tokens"}},
        "runs": {d: {} for d in dists},
    }
    for side in a.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--seq", str(a.seq), "--work", a.work, "--batches", a.batches, "--dists", a.dists] + (["--tiny"] if a.tiny else [])
        t = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in p.stdout:
            if not line.startswith("RESULT "):
                continue
            res = json.loads(line[len("RESULT "):])
            dist, eff = res.pop("dist"), str(res.pop("eff"))
            results["runs"][dist].setdefault(eff, {})[side] = res
            if "error" in res:
                print(f"{dist:>9} eff {eff:>3} {side:>5}: FAILED {res['error']}", flush=True)
            else:
                print(f"{dist:>9} eff {eff:>3} {side:>5}: {res['tokens_per_s']:>9.0f} tokens/s (whole run {res['run_tokens_per_s']:.0f})  peak {res['peak_gib']:.1f} GiB  "
                      f"loss@{len(res['losses'])} {(res['losses'] or [math.nan])[-1]:.4f}  {res['execution']}", flush=True)
        p.wait()
        print(f"{side}: {time.time() - t:.0f}s, exit {p.returncode}", flush=True)
    for dist, runs in results["runs"].items():
        for eff, entry in runs.items():
            s, w = entry.get("seed", {}), entry.get("sweep", {})
            if s.get("losses") and w.get("losses"):
                entry["speedup"] = round(w["tokens_per_s"] / s["tokens_per_s"], 3)
                entry["final_loss_rel_diff"] = round(abs(w["losses"][-1] - s["losses"][-1]) / s["losses"][-1], 5)
                print(f"{dist:>9} eff {eff:>3}: x{entry['speedup']:.2f}, final loss differs by "
                      f"{100 * entry['final_loss_rel_diff']:.2f}%", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
