"""How long the preflight check takes through the real CLI, on local files of growing size.

Each case is a fresh `python -m sweep.cli` process, as a user runs it: `sweep validate` on good data
(every line read and checked, the worker's split and drop rules applied) and `sweep run` on the same
data with its last line cut short (the whole file is read before the bad line is found; the run is
refused before any study, name or Ray). Rows are ShareGPT-style conversations of ~2 KB (about 450
tokens, the realistic length of DESIGN.md). Writes results/preflight_time.json.

    python benchmarks/preflight_time.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1_000, 10_000, 100_000)


def _row(rng: random.Random) -> dict:
    words = lambda n: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"]) for _ in range(n))  # noqa: E731
    return {"conversations": [{"from": "human", "value": words(rng.randint(20, 80))},
                              {"from": "gpt", "value": words(rng.randint(150, 350))}]}


def _timed(args: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="preflight-bench-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SWEEP_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    model = work / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_text("{}")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (model / "model.safetensors").write_bytes(b"")
    rng = random.Random(0)
    results = []
    for n in SIZES:
        good = work / f"good_{n}.jsonl"
        with open(good, "w") as f:
            f.writelines(json.dumps(_row(rng)) + "\n" for _ in range(n))
        bad = work / f"bad_{n}.jsonl"
        text = good.read_text()
        bad.write_text(text[: len(text) - 40] + "\n")  # the last line cut short
        for kind, data, command in (("good", good, "validate"), ("last line cut", bad, "run")):
            spec = work / f"{kind.replace(' ', '_')}_{n}.yaml"
            spec.write_text(yaml.safe_dump({
                "name": spec.stem, "model": {"name_or_path": str(model)}, "data": {"path": str(data)},
                "training": {"use_cpu": True}, "budget": {"min": 2, "max": 4}, "resources": {"gpus_per_trial": 0},
                "output_dir": str(work / "runs"),
                "search": {"params": {"learning_rate": {"type": "choice", "values": [0.01]}}}}))
            seconds, rc, last = min((_timed([command, spec.name], work, env) for _ in range(3)), key=lambda r: r[0])
            results.append({"rows": n, "megabytes": round(data.stat().st_size / 2**20, 1), "case": kind,
                            "command": f"sweep {command}", "seconds": round(seconds, 2), "exit": rc, "last_line": last[:160]})
            print(results[-1])
    out = ROOT / "benchmarks" / "results" / "preflight_time.json"
    out.write_text(json.dumps({"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
                               "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
