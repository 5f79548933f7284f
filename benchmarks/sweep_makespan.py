"""A whole sweep, packed vs one trial per process, on the same trials: makespan, GPU utilization and memory,
training tokens/s, time to the first step, and the speed of a trial alone in its pack.

The reference search space (`search_spaces/llama32_1b.yaml`: learning rate, scheduler, batch 1/2/4,
accumulation 2/4/8, ASHA with reduction factor 2) over a Llama-3.2-1B-shaped model (random weights, written
locally, NF4 + double quant, bf16 compute, LoRA r16 on the 7 projections), on ShareGPT-like conversations whose
token lengths are lognormal (mean ~450, 5th-95th percentile ~172-943). Both modes (`resources.packing: on` /
`off`) run the same spec with the seeded random sampler (`search.sampler: random`, `--seed`), so trial N has the
same params in both (checked from the two studies: `same_trials`), and the same ASHA ladder (`--ladder`); each
is a real `sweep run` in its own process, with `nvidia-smi` sampled every 0.5 s. Which trials ASHA promotes can
still differ (asynchronous halving decides from the rung results in hand, and the modes finish rungs in other
orders): `training_tokens` and `rungs_reached` say how much work each mode did.

    python benchmarks/sweep_makespan.py --mode packed                  # GPU: 24 trials, rungs 30 -> 60 -> 120
    python benchmarks/sweep_makespan.py --mode solo --max-s 540        # the other mode in its own call
    python benchmarks/sweep_makespan.py --mode lone                    # one trial: alone in a pack, own process
    python benchmarks/sweep_makespan.py --mode packed --trials 12 --ladder 20,40,80   # a smaller sweep
    python benchmarks/sweep_makespan.py --merge a.json b.json          # modes measured in separate calls, compared
    python benchmarks/sweep_makespan.py --tiny --mode both --trials 4 --ladder 2,4 --rows 200   # CPU try-out

Each mode's figures are merged into `benchmarks/results/sweep_makespan.json` (or `--out`); with both modes
there, the file compares them (`makespan_speedup`, `same_trials`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
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


REFERENCE_LADDER = "30,60,120"  # search_spaces/llama32_1b.yaml's budget
# The lone-trial measurement's config: the reference space's largest effective batch (4 x 8), which a pack
# slowed most (issue 19: 8-12k tokens/s in a pack, 40.5k in its own process).
LONE_PARAMS = {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "per_device_train_batch_size": 4,
               "gradient_accumulation_steps": 8}


def parse_ladder(text: str) -> dict:
    """`--ladder 30,60,120` -> the spec's budget (min, max, reduction_factor); the rungs must be a geometric ladder."""
    try:
        rungs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--ladder {text!r}: need whole numbers of steps, e.g. 30,60,120") from None
    if not rungs or any(r <= 0 for r in rungs):
        raise SystemExit(f"--ladder {text!r}: need positive step counts, e.g. 30,60,120")
    eta = rungs[1] // rungs[0] if len(rungs) > 1 else 2
    want = [rungs[0] * eta ** k for k in range(len(rungs))]
    if eta < 2 or rungs != want:
        raise SystemExit(f"--ladder {text!r}: ASHA's rungs are min * eta**k (eta >= 2 a whole number), e.g. 30,60,120")
    return {"min": rungs[0], "max": rungs[-1], "reduction_factor": eta}


def make_spec(work: Path, assets: dict, data_dir: Path, *, mode: str, trials: int, budget: dict, seed: int,
              tiny: bool, params: dict | None = None, name: str | None = None) -> Path:
    """The reference spec for `mode` ("packed": resources.packing on, "solo": off), its trials drawn by the
    seeded random sampler; `params`: fixed values instead of the searched ones (a choice of one value each)."""
    import yaml

    from sweep.spec import load_spec

    spec = yaml.safe_load((ROOT / "search_spaces" / "llama32_1b.yaml").read_text())
    name = name or f"makespan_{mode}"
    spec["name"] = name
    spec["model"]["name_or_path"] = assets["model"]
    spec["data"].update({"path": str(data_dir), "validation_fraction": 0.05, "max_eval_samples": 500})
    # The same trials in both modes: random draws from one seed do not depend on results or timing (TPE's do).
    spec["search"].update({"sampler": "random", "seed": seed, "num_trials": trials})
    if params:
        spec["search"]["params"] = {k: {"type": "choice", "values": [v]} for k, v in params.items()}
    spec["budget"].update(budget)
    spec["resources"] = {"gpus_per_trial": 0 if tiny else 1, "cpus_per_trial": 1 if tiny else 4,
                         "packing": "on" if mode == "packed" else "off"}
    spec["tracking"] = {"wandb": {"mode": "disabled"}}
    spec["output_dir"] = str(work / f"runs_{name}")
    spec["storage"] = f"sqlite:///{work / f'{name}.db'}"
    if tiny:
        spec["model"]["quantization"]["bnb_4bit_compute_dtype"] = "float32"
        spec["model"]["attn_implementation"] = "sdpa"
        spec["training"].update({"bf16": False, "optim": "adamw_torch", "use_cpu": True})
        spec["data"]["max_seq_length"] = 256
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    loaded = load_spec(path)  # the spec as `sweep run` reads it: the ladder asked for, nothing else
    if loaded.search.sampler != "random" or loaded.budget.rungs != [budget["min"] * budget["reduction_factor"] ** k
                                                                     for k in range(len(loaded.budget.rungs))]:
        raise SystemExit(f"{path}: not the ladder or sampler asked for: {loaded.budget.rungs}, {loaded.search.sampler}")
    return path


def prepare(work: Path, tiny: bool, data_dir: Path, rows: int) -> tuple[dict, dict, str, dict]:
    """The model, the conversations, the device's name and the library versions (run in a child process)."""
    import torch

    assets = build_assets(work / "assets", tiny=tiny, seq=64, rows=4)
    lengths = write_conversations(assets["model"], data_dir, rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return assets, lengths, device, versions()


class Sampler(threading.Thread):
    """nvidia-smi every 0.5 s: [(time, utilization %, memory used GiB)] of GPU 0."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()

    def run(self):
        if not shutil.which("nvidia-smi"):
            return
        p = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                              "--format=csv,noheader,nounits", "-lms", "500"], stdout=subprocess.PIPE, text=True)
        for line in p.stdout or []:
            if self.stop.is_set():
                break
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem / 1024))
        p.terminate()

    def mean(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        xs = [u for t, u, _ in self.samples if since <= t <= until]
        return round(sum(xs) / len(xs), 1) if xs else None

    def peak_gib(self) -> float | None:
        return round(max(m for _, _, m in self.samples), 2) if self.samples else None


def _rungs(t) -> list[tuple[int, dict]]:
    """A study trial's rung reports (user attrs rung_<step>), by step."""
    return sorted((int(k[5:]), v) for k, v in t.user_attrs.items() if k.startswith("rung_") and k[5:].isdigit())


def _tokens(r: dict) -> float:
    """Training tokens of a trial up to a rung report (its mean rate over its training time)."""
    return (r.get("tokens_per_s") or 0.0) * (r.get("train_s") or 0.0)


def lone_segments(trials: list) -> list[dict]:
    """The stretches between two rung reports of a trial (or its first step and its first rung) when no other
    trial of the sweep was running: the trial alone on the GPU (in packed mode: alone in its pack). Each with
    its training tokens/s over the stretch's training time and over its wall time."""
    spans = [(t.number, t.datetime_start.timestamp(), (t.datetime_complete or dt.datetime.now()).timestamp())
             for t in trials if t.datetime_start is not None]
    out = []
    for t in trials:
        rungs, start = _rungs(t), t.datetime_start
        if not rungs or start is None or rungs[0][1].get("setup_s") is None:
            continue
        t0 = start.timestamp()
        prev = (t0 + rungs[0][1]["setup_s"], 0.0, 0.0, 0)  # (time, tokens, train_s, step) at its first step
        for step, r in rungs:
            if r.get("wall_s") is None or r.get("train_s") is None:
                break
            now = (t0 + r["wall_s"], _tokens(r), r["train_s"], step)
            alone = not any(n != t.number and s < now[0] and e > prev[0] for n, s, e in spans)
            d_tok, d_train, d_wall = now[1] - prev[1], now[2] - prev[2], now[0] - prev[0]
            if alone and d_tok > 0 and d_train > 0 and d_wall > 0:
                out.append({"trial": t.number, "steps": [prev[3], step], "tokens": round(d_tok),
                            "tokens_per_s_train": round(d_tok / d_train), "tokens_per_s_wall": round(d_tok / d_wall),
                            "effective_batch": t.params.get("per_device_train_batch_size", 0)
                            * t.params.get("gradient_accumulation_steps", 0)})
            prev = now
    return out


def run_mode(work: Path, spec: Path, name: str, max_s: float | None = None) -> dict:
    """One real `sweep run` of `spec`; its makespan, utilization, memory, tokens and setup figures from the study.

    `max_s`: the sweep is stopped as Ctrl-C stops it after that many seconds (the figures then cover an
    unfinished sweep: `cut_at_s` says so, and its makespan is a lower bound)."""
    import optuna

    marks_file = work / f"{name}.marks.jsonl"  # the moments the controller, packs and trials mark (trial_worker.marks)
    marks_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               SWEEP_TIMELINE=str(marks_file))
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    marks: dict[str, float] = {}
    p = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec)], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cut = threading.Timer(max_s, lambda: p.send_signal(signal.SIGINT)) if max_s else None
    if cut:
        cut.start()
    log, timeline = [], []
    for line in p.stdout or []:
        log.append(line)
        if len(timeline) < 40:  # where the time before the first training step goes: the controller's first lines
            timeline.append([round(time.time() - t0, 1), line.rstrip()[:160]])
        if "ASHA over" in line and "trials_start" not in marks:
            marks["trials_start"] = time.time()
    p.wait()
    t1 = time.time()
    was_cut = bool(cut and not cut.is_alive() and t1 - t0 >= (max_s or 0))
    if cut:
        cut.cancel()
    sampler.stop.set()
    (work / f"{name}.log").write_text("".join(log))
    if p.returncode != 0 and not was_cut:
        raise SystemExit(f"sweep run ({name}) exited {p.returncode}:\n{''.join(log[-60:])}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / f'{name}.db'}")
    trials = study.get_trials(deepcopy=False)
    tokens, setups, packs, first_steps, peaks = 0.0, [], set(), [], []
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
        rungs = _rungs(t)
        if not rungs:
            continue
        last, first = rungs[-1][1], rungs[0][1]
        tokens += _tokens(last)
        # From the trial's start to its first step (`setup_s`; reports before it had only wall - train time)
        setup = first["setup_s"] if first.get("setup_s") is not None else (first.get("wall_s") or 0.0) - (first.get("train_s") or 0.0)
        setups.append(setup)
        if t.datetime_start is not None:
            first_steps.append(t.datetime_start.timestamp() + setup)
        peaks += [r["peak_mem_gb"] for _, r in rungs if r.get("peak_mem_gb") is not None]
        if t.user_attrs.get("pack"):
            packs.add(t.user_attrs["pack"])
    makespan = t1 - t0
    start = marks.get("trials_start", t0)
    first_step = min(first_steps) if first_steps else None
    setups.sort()
    alone = lone_segments(trials)
    alone_tokens = sum(a["tokens"] for a in alone)
    moments = _moments(marks_file, t0)
    trace = _pack_trace(moments)
    # From the reports: the Optuna trial's creation (the searcher's suggestion, seconds before Tune starts the
    # trial) + `setup_s` (from Tune's start): an underestimate. A pack's own trace says when its first step began.
    by_reports = round(first_step - t0, 1) if first_step else None
    steps = trace.get("pack_steps")
    return {
        "makespan_s": round(makespan, 1),
        "trials_phase_s": round(t1 - start, 1),
        "before_first_trial_s": round(start - t0, 1),
        "timeline": timeline,
        "marks": _marks(moments),
        **trace,
        "time_to_first_training_step_s": round(steps[0][0] - steps[0][4], 1) if steps else by_reports,
        "time_to_first_training_step_s_by_reports": by_reports,
        "training_tokens": round(tokens),
        "training_tokens_per_s_over_makespan": round(tokens / makespan),
        "training_tokens_per_s_over_trials_phase": round(tokens / (t1 - start)),
        "mean_gpu_util_pct": sampler.mean(t0, t1),
        "mean_gpu_util_pct_from_first_trial": sampler.mean(start, t1),
        "mean_gpu_util_pct_from_first_training_step": sampler.mean(first_step, t1) if first_step else None,
        "peak_gpu_mem_gib_nvidia_smi": sampler.peak_gib(),
        "peak_mem_gb_reported": round(max(peaks), 2) if peaks else None,
        "util_samples": len(sampler.samples),
        "per_trial_setup_s_median": round(setups[len(setups) // 2], 1) if setups else None,
        "per_trial_setup_s_max": round(setups[-1], 1) if setups else None,
        # A trial alone on the GPU (packed: alone in its pack), from its rung reports: every such stretch, and
        # their token-weighted speed (the tail of a packed sweep; every trial of a solo one).
        "alone_tokens_per_s_train": round(sum(a["tokens_per_s_train"] * a["tokens"] for a in alone) / alone_tokens)
        if alone_tokens else None,
        "alone_segments": alone,
        "states": states,
        "packs": sorted(packs),
        "params": [dict(t.params) for t in trials],
        "rungs_reached": [[s for s, _ in _rungs(t)] for t in trials],
        **({"cut_at_s": max_s, "finished": False} if was_cut else {"finished": True}),
    }


def _moments(path: Path, t0: float) -> list[tuple[float, int, str]]:
    """[(s after the start, pid, moment)] of the run's marks file (none from an older tree, which marks nothing)."""
    try:
        from trial_worker.marks import read
    except ImportError:  # an older tree (a same-call baseline)
        return []
    return read(str(path), t0)


def _marks(moments: list) -> list:
    """[(s after the start, process, moment)]: every moment marked but the pack steps (`_pack_trace`) and the
    trials' joins and admissions after the first 8 (the start-up), process ids as c/p/t + a number (controller,
    pack, trial) in order of first appearance."""
    names: dict[int, str] = {}
    out = []
    seen: dict[str, int] = {}
    for s, pid, event in moments:
        what = event.split(" ")[1] if event.startswith("pack: ") else event
        if event.startswith("pack step ") or (what in ("join", "admit", "trial: started")
                                              and seen.setdefault(what, 0) >= 8):
            continue
        seen[what] = seen.get(what, 0) + 1
        if pid not in names:
            kind = event.split(":")[0][:1]
            names[pid] = f"{kind}{sum(n.startswith(kind) for n in names.values())}"
        out.append([s, names[pid], event])
    return out


def _pack_trace(moments: list) -> dict:
    """The packs' steps (`pack step` moments): `pack_steps` [[s after the start, trials training, tokens, validation
    groups, host s of the step]], and `pack_trace`: where the packs' time went, by how many trials trained."""
    steps = []
    for s, _pid, event in moments:
        if event.startswith("pack step "):
            f = dict(kv.split("=") for kv in event[len("pack step "):].split())
            steps.append([s, int(f["k"]), int(f["tok"]), int(f["ev"]), float(f["s"].rstrip("s"))])
    if not steps:
        return {}
    by_k: dict[str, list[float]] = {}
    for _, k, tok, ev, took in steps:
        key = "0 (evaluations, checkpoints)" if k == 0 else "1" if k == 1 else "2-3" if k < 4 else "4-7" if k < 8 else "8-15" \
            if k < 16 else "16+"
        b = by_k.setdefault(key, [0, 0.0, 0, 0])
        b[0], b[1], b[2], b[3] = b[0] + 1, b[1] + took, b[2] + tok, b[3] + ev
    # Trials parked at a rung: from their rung's report to Tune's word to go on (`proceed`) or stop (`leave`)
    reported: dict[str, float] = {}
    parked = 0.0
    for s, _pid, event in moments:
        if event.startswith("engine: rung reported "):
            reported[event.split()[3]] = s
        elif event.startswith(("pack: proceed ", "pack: leave ")) and event.split()[2] in reported:
            parked += s - reported.pop(event.split()[2])
    span = steps[-1][0] - (steps[0][0] - steps[0][4])
    busy = sum(x[4] for x in steps)
    return {"pack_steps": steps, "pack_trace": {
        "first_step_end_s": steps[0][0], "last_step_end_s": steps[-1][0], "steps": len(steps),
        "in_steps_s": round(busy, 1), "between_steps_s": round(span - busy, 1),
        "trial_s_parked_at_rungs": round(parked, 1),
        "by_trials_training": {k: {"steps": v[0], "s": round(v[1], 1), "tokens": v[2],
                                   "tokens_per_s": round(v[2] / v[1]) if v[1] else None, "validation_groups": v[3]}
                               for k, v in sorted(by_k.items())}}}


def compare(result: dict) -> None:
    """With both modes in `result`: did they train the same trials (params per trial number), the same rungs,
    and how much sooner did packing finish."""
    for k in ("makespan_speedup", "makespan_speedup_at_least", "tokens_per_s_over_makespan_ratio", "same_trials"):
        result.pop(k, None)
    if "packed" not in result or "solo" not in result:
        return
    p, s = result["packed"], result["solo"]
    n = min(len(p["params"]), len(s["params"]))
    differ = [i for i in range(n) if p["params"][i] != s["params"][i]]
    rungs_differ = [i for i in range(n) if p["rungs_reached"][i] != s["rungs_reached"][i]] if (
        "rungs_reached" in p and "rungs_reached" in s) else None
    result["same_trials"] = {"compared": n, "identical_params": not differ, "params_differ_at": differ,
                             "rungs_reached_differ_at": rungs_differ}
    key = "makespan_speedup" if s.get("finished", True) else "makespan_speedup_at_least"  # a cut solo: a bound
    result[key] = round(s["makespan_s"] / p["makespan_s"], 2)
    result["tokens_per_s_over_makespan_ratio"] = round(
        p["training_tokens_per_s_over_makespan"] / max(1, s["training_tokens_per_s_over_makespan"]), 2)
    print(f"makespan: solo {s['makespan_s']} s, packed {p['makespan_s']} s: {key} {result[key]}x; "
          f"same params for trials 0-{n - 1}: {not differ}", flush=True)


def _summary(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k not in ("params", "alone_segments", "rungs_reached", "versions", "timeline",
                                                                  "pack_steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["packed", "solo", "both", "lone"], default="both",
                    help="lone: one trial (LONE_PARAMS) as a packed sweep of one, then in its own process")
    ap.add_argument("--trials", type=int, default=24, help="trials per mode (the reference sweep: 24)")
    ap.add_argument("--ladder", default=REFERENCE_LADDER, help="ASHA's rungs in optimizer steps, min * eta**k "
                    f"(default {REFERENCE_LADDER}, the reference spec's)")
    ap.add_argument("--rungs", help=argparse.SUPPRESS)  # older form: min,max with eta 2
    ap.add_argument("--seed", type=int, default=0, help="the random sampler's seed (the same in both modes)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a try-out of the script)")
    ap.add_argument("--work", default="/tmp/sweep_makespan")
    ap.add_argument("--max-s", type=float, help="stop a mode's sweep after this many seconds (figures of an unfinished sweep)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_makespan.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: merge these result files (modes "
                    "measured in separate calls) into --out and compare them")
    a = ap.parse_args()
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if a.merge:
        for f in a.merge:
            part = json.loads(Path(f).read_text())
            result.update(part)  # each mode's section, and the run's settings
        compare(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps({m: _summary(result[m]) for m in ("packed", "solo", "lone") if m in result}, indent=1))
        return
    if a.trials < 1:
        raise SystemExit(f"--trials is {a.trials}, but must be >= 1")
    if a.rungs:
        lo, hi = (int(x) for x in a.rungs.split(","))
        budget = {"min": lo, "max": hi, "reduction_factor": 2}
    else:
        budget = parse_ladder(a.ladder)
    ladder = [budget["min"] * budget["reduction_factor"] ** k for k in range(64)
              if budget["min"] * budget["reduction_factor"] ** k < budget["max"]] + [budget["max"]]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "conversations"
    # In a child process: building the model on the GPU leaves a CUDA context and cached blocks behind, which
    # this process would hold through both sweeps (less memory for them, more in nvidia-smi's figures).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assets, lengths, device, libs = pool.submit(prepare, work, a.tiny, data_dir, a.rows).result()
    settings = {"benchmark": "sweep_makespan", "search_space": "search_spaces/llama32_1b.yaml", "sampler": "random",
                "seed": a.seed, "model": "tiny" if a.tiny else "Llama-3.2-1B-shaped (random weights), NF4 + double quant, bf16",
                "rows": lengths, "trials": a.trials, "ladder_steps": ladder}
    stamp = {"device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": libs}
    if a.mode == "lone":  # beside the sweeps' figures, whatever their settings
        lone = {"params": LONE_PARAMS, "steps": budget["max"], "model": settings["model"], **stamp}
        for mode in ("packed", "solo"):
            name = f"makespan_lone_{mode}"
            shutil.rmtree(work / f"runs_{name}", ignore_errors=True)
            (work / f"{name}.db").unlink(missing_ok=True)
            spec = make_spec(work, assets, data_dir, mode=mode, trials=1, seed=a.seed, tiny=a.tiny, params=LONE_PARAMS,
                             budget={"min": budget["max"], "max": budget["max"], "reduction_factor": 2}, name=name)
            figures = run_mode(work, spec, name, a.max_s)
            last = figures["alone_segments"]
            lone[mode] = {"tokens_per_s_train": round(sum(x["tokens"] for x in last)
                                                      / max(1e-9, sum(x["tokens"] / x["tokens_per_s_train"] for x in last)))
                          if last else None, "makespan_s": figures["makespan_s"],
                          "time_to_first_training_step_s": figures["time_to_first_training_step_s"],
                          "peak_gpu_mem_gib_nvidia_smi": figures["peak_gpu_mem_gib_nvidia_smi"]}
            print(json.dumps({f"lone_{mode}": lone[mode]}), flush=True)
        if lone["packed"]["tokens_per_s_train"] and lone["solo"]["tokens_per_s_train"]:
            lone["alone_in_pack_vs_own_process"] = round(lone["packed"]["tokens_per_s_train"] / lone["solo"]["tokens_per_s_train"], 2)
        result["lone"] = lone
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        return
    if any(result.get(k) != v for k, v in settings.items() if k in result and k != "rows") and any(
            m in result for m in ("packed", "solo")):
        # Figures of other settings do not compare: start the file afresh (a lone measurement stays).
        print(f"{out}: earlier figures were of other settings; replaced", flush=True)
        result = {k: v for k, v in result.items() if k == "lone"}
    result.update(settings)
    result.pop("rungs_steps", None)
    for mode in (["packed", "solo"] if a.mode == "both" else [a.mode]):
        name = f"makespan_{mode}"
        shutil.rmtree(work / f"runs_{name}", ignore_errors=True)
        (work / f"{name}.db").unlink(missing_ok=True)
        spec = make_spec(work, assets, data_dir, mode=mode, trials=a.trials, budget=budget, seed=a.seed, tiny=a.tiny)
        figures = run_mode(work, spec, name, a.max_s)
        figures.update(stamp)
        result[mode] = figures
        print(json.dumps({mode: _summary(figures)}, indent=1), flush=True)
        compare(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
