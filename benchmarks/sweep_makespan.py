"""A whole sweep, packed vs one trial per process: makespan, GPU utilization, training tokens/s, setup.

The reference search space (`search_spaces/llama32_1b.yaml`: learning rate, scheduler, batch 1/2/4,
accumulation 2/4/8, ASHA with reduction factor 2 over three rungs) over a Llama-3.2-1B-shaped model (random
weights, written locally, NF4 + double quant, bf16 compute, LoRA r16 on the 7 projections), on ShareGPT-like
conversations whose token lengths are lognormal (mean ~450, 5th-95th percentile ~172-943). The same spec and
sampler seed run in both modes (`resources.packing: on` / `off`), each as a real `sweep run` in its own
process, with `nvidia-smi` sampled every 0.5 s.

    python benchmarks/sweep_makespan.py --mode both              # GPU
    python benchmarks/sweep_makespan.py --mode packed --tiny      # the same on the CPU with the tiny model

Each mode's figures are merged into `benchmarks/results/sweep_makespan.json` (or `--out`), so the two modes can
run in separate calls; the file says which run each came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from trial_throughput import build_assets, versions  # noqa: E402  (the same model and tokenizer)

MEAN_TOKENS, P5, P95 = 450, 172, 943


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths with the ShareGPT shape: median sqrt(p5*p95), spread from the p5-p95 ratio."""
    sigma = math.log(P95 / P5) / (2 * 1.6449)
    mu = math.log(math.sqrt(P5 * P95))
    rng = random.Random(seed)
    return [max(24, min(1024, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def write_conversations(tokenizer_dir: str, path: Path, n: int) -> dict:
    """`n` ShareGPT rows (a human turn of ~30% of the tokens, a gpt turn of the rest); their length figures."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(2)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    pool = tok(" ".join(rng.choices(words, k=40000)), add_special_tokens=False)["input_ids"]
    lengths = lognormal_lengths(n)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.jsonl", "w") as f:
        for total in lengths:
            body = max(8, total - 12)  # the chat template's role headers take ~12 tokens
            q = max(4, int(body * 0.3))
            at = rng.randrange(0, len(pool) - body)
            human, gpt = tok.decode(pool[at:at + q]), tok.decode(pool[at + q:at + body])
            f.write(json.dumps({"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}) + "\n")
    s = sorted(lengths)
    return {"rows": n, "mean_tokens": sum(s) / n, "p5": s[int(0.05 * n)], "p95": s[int(0.95 * n)]}


def make_spec(work: Path, assets: dict, data_dir: Path, *, mode: str, trials: int, rungs: tuple[int, int],
              tiny: bool) -> Path:
    import yaml

    spec = yaml.safe_load((ROOT / "search_spaces" / "llama32_1b.yaml").read_text())
    spec["name"] = f"makespan_{mode}"
    spec["model"]["name_or_path"] = assets["model"]
    spec["data"].update({"path": str(data_dir), "validation_fraction": 0.05, "max_eval_samples": 500})
    spec["search"]["num_trials"] = trials
    spec["budget"].update({"min": rungs[0], "max": rungs[1]})
    spec["resources"] = {"gpus_per_trial": 0 if tiny else 1, "cpus_per_trial": 1 if tiny else 4,
                         "packing": "on" if mode == "packed" else "off"}
    spec["tracking"] = {"wandb": {"mode": "disabled"}}
    spec["output_dir"] = str(work / f"runs_{mode}")
    spec["storage"] = f"sqlite:///{work / f'{mode}.db'}"
    if tiny:
        spec["model"]["quantization"]["bnb_4bit_compute_dtype"] = "float32"
        spec["model"]["attn_implementation"] = "sdpa"
        spec["training"].update({"bf16": False, "optim": "adamw_torch", "use_cpu": True})
        spec["data"]["max_seq_length"] = 256
    path = work / f"makespan_{mode}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Sampler(threading.Thread):
    """nvidia-smi utilization every 0.5 s: [(time, percent)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        if not shutil.which("nvidia-smi"):
            return
        p = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                             stdout=subprocess.PIPE, text=True)
        for line in p.stdout:
            if self.stop.is_set():
                break
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:
                pass
        p.terminate()

    def mean(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        xs = [u for t, u in self.samples if since <= t <= until]
        return sum(xs) / len(xs) if xs else None


def run_mode(work: Path, spec: Path, mode: str, max_s: float | None = None) -> dict:
    """One real `sweep run` of `spec`; its makespan, utilization, tokens and setup figures from the study.

    `max_s`: the sweep is stopped as Ctrl-C stops it after that many seconds (the figures then cover an
    unfinished sweep: `cut_at_s` says so, and its makespan is a lower bound)."""
    import optuna

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    marks: dict[str, float] = {}
    p = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec)], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cut = threading.Timer(max_s, lambda: p.send_signal(signal.SIGINT)) if max_s else None
    if cut:
        cut.start()
    log = []
    for line in p.stdout or []:
        log.append(line)
        if "ASHA over" in line and "trials_start" not in marks:
            marks["trials_start"] = time.time()
    p.wait()
    t1 = time.time()
    was_cut = bool(cut and not cut.is_alive() and t1 - t0 >= (max_s or 0))
    if cut:
        cut.cancel()
    sampler.stop.set()
    (work / f"{mode}.log").write_text("".join(log))
    if p.returncode != 0 and not was_cut:
        raise SystemExit(f"sweep run ({mode}) exited {p.returncode}:\n{''.join(log[-60:])}")
    name = f"makespan_{mode}"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / f'{mode}.db'}")
    tokens, setups, packs = 0.0, [], set()
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
        rungs = sorted((int(k.split("_")[1]), v) for k, v in t.user_attrs.items() if k.startswith("rung_") and k[5:].isdigit())
        if not rungs:
            continue
        last, first = rungs[-1][1], rungs[0][1]
        tokens += (last.get("tokens_per_s") or 0.0) * (last.get("train_s") or 0.0)
        # From the trial's start to its first step (`setup_s`; reports before it had only wall - train time)
        setups.append(first["setup_s"] if first.get("setup_s") is not None
                      else (first.get("wall_s") or 0.0) - (first.get("train_s") or 0.0))
        if t.user_attrs.get("pack"):
            packs.add(t.user_attrs["pack"])
    makespan = t1 - t0
    start = marks.get("trials_start", t0)
    setups.sort()
    return {
        "makespan_s": round(makespan, 1),
        "trials_phase_s": round(t1 - start, 1),
        "before_first_trial_s": round(start - t0, 1),
        "training_tokens": round(tokens),
        "training_tokens_per_s_over_makespan": round(tokens / makespan),
        "training_tokens_per_s_over_trials_phase": round(tokens / (t1 - start)),
        "mean_gpu_util_pct": sampler.mean(t0, t1),
        "mean_gpu_util_pct_from_first_trial": sampler.mean(start, t1),
        "util_samples": len(sampler.samples),
        "per_trial_setup_s_median": setups[len(setups) // 2] if setups else None,
        "per_trial_setup_s_max": setups[-1] if setups else None,
        "states": states,
        "packs": sorted(packs),
        "params": [dict(t.params) for t in study.trials],
        **({"cut_at_s": max_s, "finished": False} if was_cut else {"finished": True}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["packed", "solo", "both"], default="both")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rungs", default="10,40", help="budget min,max in optimizer steps (reduction factor 2)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a try-out of the script)")
    ap.add_argument("--work", default="/tmp/sweep_makespan")
    ap.add_argument("--max-s", type=float, help="stop a mode's sweep after this many seconds (figures of an unfinished sweep)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_makespan.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(work / "assets", tiny=a.tiny, seq=64, rows=4)
    data_dir = work / "conversations"
    lengths = write_conversations(assets["model"], data_dir, a.rows)
    lo, hi = (int(x) for x in a.rungs.split(","))
    rungs = (lo, hi)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result.update({"benchmark": "sweep_makespan", "search_space": "search_spaces/llama32_1b.yaml",
                   "model": "tiny" if a.tiny else "Llama-3.2-1B-shaped (random weights), NF4 + double quant, bf16",
                   "rows": lengths, "trials": a.trials, "rungs_steps": [rungs[0], rungs[1]]})
    for mode in (["packed", "solo"] if a.mode == "both" else [a.mode]):
        shutil.rmtree(work / f"runs_{mode}", ignore_errors=True)
        (work / f"{mode}.db").unlink(missing_ok=True)
        spec = make_spec(work, assets, data_dir, mode=mode, trials=a.trials, rungs=rungs, tiny=a.tiny)
        figures = run_mode(work, spec, mode, a.max_s)
        figures.update({"device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "versions": versions()})
        result[mode] = figures
        print(json.dumps({mode: {k: v for k, v in figures.items() if k != "params"}}, indent=1), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    if "packed" in result and "solo" in result:
        p, s = result["packed"], result["solo"]
        key = "makespan_speedup" if s.get("finished", True) else "makespan_speedup_at_least"  # a cut solo: a bound
        result.pop("makespan_speedup", None), result.pop("makespan_speedup_at_least", None)
        result[key] = round(s["makespan_s"] / p["makespan_s"], 2)
        out.write_text(json.dumps(result, indent=1))
        print(f"makespan: solo {s['makespan_s']} s, packed {p['makespan_s']} s: {key} {result[key]}x", flush=True)


if __name__ == "__main__":
    main()
