"""Where a pack's start-up goes, one part at a time in a fresh process: the imports, CUDA's start, the 4-bit
load of the base, and the data (tokenizer, rows, tokens), each timed, the load and the data under cProfile.

    python benchmarks/pack_startup.py              # a CUDA GPU (the 1B shape of trial_throughput.py)
    python benchmarks/pack_startup.py --tiny       # the CPU, a tiny model
    python benchmarks/pack_startup.py --engine     # a pack engine's whole build as a pack makes it, its marks
                                                   # (seconds after this process started); twice in fresh processes:
                                                   # the second finds the kernels the first compiled (Triton's cache)

The pack's own start (`trial_worker.pack.engine.PackEngine`) runs these beside each other; here they run one
after another, so each one's own cost shows. Merges into benchmarks/results/pack_startup.json under `--label`.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _top(prof: cProfile.Profile, n: int = 18) -> list:
    """The `n` functions of most cumulative time: (function, cumulative s, own s, calls)."""
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{Path(file).name}:{line}:{fn}", round(ct, 3), round(tt, 3), nc))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="after")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/sweep-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pack_startup.json"))
    ap.add_argument("--engine", action="store_true", help="time a PackEngine's build by its marks, nothing else")
    args = ap.parse_args()
    if args.engine:
        return engine_build(args)
    res: dict = {"label": args.label, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "s": {}}
    s = res["s"]
    t = time.perf_counter()
    import torch

    s["import torch"] = round(time.perf_counter() - t, 2)
    from trial_worker._compat import import_bitsandbytes

    # bitsandbytes as the pack and the worker import it (before anything else does: without torch's compiler
    # stack), then transformers' modeling and peft (which would import bitsandbytes itself, where installed)
    for what, load in (("bitsandbytes", import_bitsandbytes), ("transformers", lambda: __import__("transformers")),
                       ("transformers' modeling", lambda: __import__("transformers.modeling_utils")),
                       ("peft", lambda: __import__("peft"))):
        t = time.perf_counter()
        load()
        s[f"import {what}"] = round(time.perf_counter() - t, 2)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trial_throughput import build_assets, merge_result  # noqa: E402

    cuda = torch.cuda.is_available()
    t = time.perf_counter()
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    s["cuda init"] = round(time.perf_counter() - t, 2)
    res["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    seq = 128 if args.tiny else 1024
    assets = build_assets(Path(args.work), tiny=args.tiny, seq=seq, rows=64 if args.tiny else 2000)

    from trial_worker.model import freeze_base, load_base
    from trial_worker.pack.data import tokenized

    job = _job(assets, cuda=cuda, seq=seq)
    for name, fn in (("load_base (4-bit)", lambda: freeze_base(load_base(job.model, cpu=not cuda))),
                     ("load_base again (files cached)", lambda: freeze_base(load_base(job.model, cpu=not cuda))),
                     ("data (tokenizer, rows, tokens)", lambda: tokenized(job))):
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        fn()
        if cuda:
            torch.cuda.synchronize()
        prof.disable()
        s[name] = round(time.perf_counter() - t, 2)
        res[f"profile: {name}"] = _top(prof)
        print(name, s[name], flush=True)
        for row in res[f"profile: {name}"][:12]:
            print("   ", row, flush=True)
    print(json.dumps(s), flush=True)
    merge_result(Path(args.out), args.label, res)


def _job(assets: dict, *, cuda: bool, seq: int):
    from trial_throughput import LORA_TARGETS  # noqa: E402

    from trial_worker.config import JobConfig

    return JobConfig.model_validate({
        "model": {"name_or_path": assets["model"], "attn_implementation": "sdpa",
                  "quantization": {"bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32"},
                  "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGETS}},
        "data": {"path": assets["lognormal"], "format": "text", "max_seq_length": seq},
        "training": {"bf16": cuda, "use_cpu": not cuda},
        "budget": {"min": 10, "max": 20},
    })


def engine_build(args) -> None:
    """A pack engine built as the pack server builds it, in this fresh process: its marks, seconds after the
    process started (the assets are made first, in a child process, so that nothing is imported before)."""
    import os
    import subprocess
    import tempfile

    import psutil

    started = psutil.Process().create_time()
    tiny = "--tiny" if args.tiny else ""
    seq = 128 if args.tiny else 1024
    # the assets, made (once) by another process: this one imports only what the engine imports
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                    "from trial_throughput import build_assets; from pathlib import Path; "
                    f"build_assets(Path({args.work!r}), tiny={bool(tiny)}, seq={seq}, rows={64 if tiny else 2000})"],
                   check=True)
    t_assets = time.time()
    timeline = tempfile.mktemp(suffix=".jsonl")
    os.environ["SWEEP_TIMELINE"] = timeline
    sys.path.insert(0, str(ROOT / "benchmarks"))
    assets = {"model": str(Path(args.work) / "model"), "lognormal": str(Path(args.work) / "data-lognormal")}
    from trial_worker.pack.engine import PackEngine

    job = _job(assets, cuda=not args.tiny, seq=seq)
    PackEngine(job, output_dir=tempfile.mkdtemp())
    from trial_worker.marks import read

    marks = [(round(t - (t_assets - started), 2), e) for t, _, e in read(timeline, started)]
    for m in marks:
        print(m, flush=True)
    res = {"label": args.label, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "assets_made_s": round(t_assets - started, 2), "marks_after_assets": marks}
    try:
        import torch

        res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    from trial_throughput import merge_result  # noqa: E402

    merge_result(Path(args.out), args.label, res)


if __name__ == "__main__":
    main()
