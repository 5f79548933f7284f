"""Helpers shared by the CLI-level suites: a small sweep spec on the tiny Llama, and the real CLI in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Imports nothing heavy itself; reports at exit whether Ray/torch were imported (= a sweep started).
_CLI = ("import sys, atexit\n"
        "atexit.register(lambda: sys.stderr.write('\\nHEAVY_IMPORTED=' + ','.join(m for m in ('ray', 'torch') if m in sys.modules) + '\\n'))\n"
        "sys.argv = ['sweep'] + sys.argv[1:]\n"
        "from sweep.cli import main\n"
        "main()\n")


def sweep_cli(*args, cwd, env=None, timeout=600, probe_imports=False) -> subprocess.CompletedProcess:
    """`sweep ARGS` as a user runs it (a fresh Python process)."""
    cmd = [sys.executable, "-c", _CLI, *map(str, args)] if probe_imports else [sys.executable, "-m", "sweep.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def small_spec(work: Path, assets: dict | None, *, name: str, params: dict, rungs=(4, 8), num_trials=None,
               training: dict | None = None, eval_samples: int = 16, **top) -> Path:
    """A grid sweep over `params` on the tiny Llama: CPU, 1 CPU per trial, 2 at a time, W&B off.

    `assets` = {"model": dir, "data": dir} already written; None: the sweep writes them under work/assets.
    """
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo_cpu.yaml").read_text())
    demo["name"] = name
    if assets is None:
        assets = {"model": str(work / "assets" / "tiny-llama"), "data": str(work / "assets" / "tasks")}
    else:
        demo["model"].pop("generate", None)
        demo["data"].pop("generate", None)
    demo["model"]["name_or_path"] = assets["model"]
    demo["data"]["path"] = assets["data"]
    demo["data"]["max_eval_samples"] = eval_samples
    demo["training"].update({"logging_steps": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
                             **(training or {})})
    demo["budget"] = {"unit": "steps", "min": rungs[0], "max": rungs[-1], "reduction_factor": 2}
    demo["search"] = {"sampler": "grid", "seed": 1, "params": params}
    if num_trials:
        demo["search"]["num_trials"] = num_trials
    demo["resources"] = {"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2}
    demo["output_dir"] = str(work / "runs")
    demo.update(top)
    path = work / f"{name}.yaml"
    path.write_text(f"# sweep run {name}.yaml\n" + yaml.safe_dump(demo, sort_keys=False))
    return path


def sweep_env(work: Path, **extra) -> dict:
    env = dict(os.environ, SWEEP_HOME=str(work / "home"), PYTHONPATH=str(ROOT), **extra)
    return env


def processes_with_env(marker: bytes) -> list[int]:
    """PIDs of the processes a test started, found by a marker in their environment (e.g. its SWEEP_HOME):
    a killed controller's Ray processes are re-parented, so the process tree alone misses them."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if marker in Path(f"/proc/{d}/environ").read_bytes():
                    out.append(int(d))
            except OSError:
                pass
    return out


def kill_processes_with_env(marker: bytes) -> int:
    """`kill -9` every process carrying `marker` in its environment; wait until they are gone; return how many."""
    pids = processes_with_env(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while processes_with_env(marker) and time.time() < deadline:
        time.sleep(0.2)
    return len(pids)


# Ray titles an actor process `ray::<class>`: the sweep's trainable class once `tune.with_resources` wrapped it.
# (Ray names a restarted or reused actor after the class it was created as: either of the first two.)
TRIAL_ACTOR_TITLES = ("ray::ResourceTrainable", "ray::SweepTrial", "ray::ImplicitFunc")


def trial_workers(root_pid: int, sweep_home: str) -> list:
    """A run's Ray trial workers (Ray actors of the sweep's trainable): in the `sweep run` process tree, or
    (a worker Ray re-parented) any whose environment carries the run's SWEEP_HOME."""
    import psutil

    root = psutil.Process(root_pid)
    out = {}
    for p in list(root.children(recursive=True)) + list(psutil.process_iter()):
        try:
            if not " ".join(p.cmdline()).startswith(TRIAL_ACTOR_TITLES):
                continue
            if p in root.children(recursive=True) or p.environ().get("SWEEP_HOME") == sweep_home:
                out[p.pid] = p
        except psutil.Error:
            pass
    return list(out.values())


class LiveCli:
    """`sweep ARGS` as a user runs it, in a subprocess; stdout and stderr collected line by line as they come."""

    def __init__(self, *args, cwd: Path, env: dict):
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: [ls.append(x) for x in s], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> bool:
        """True once `count` stdout lines match `pattern`; False if the process ended or the time ran out first."""
        def seen():
            return sum(1 for line in list(self.out) if re.search(pattern, line)) >= count

        deadline = time.time() + timeout
        while time.time() < deadline:
            if seen():
                return True
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the reader threads finish the pipes
                return seen()
            time.sleep(0.05)
        return False

    def finish(self, timeout: float = 400) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.5)
            kill_processes_with_env(f"SWEEP_HOME={self.env['SWEEP_HOME']}\0".encode())  # nothing of Ray left behind
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def tail(self) -> str:
        return self.stdout[-3000:] + "\n--- stderr ---\n" + self.stderr[-4000:]


def write_tiny_family(family: str, tokenizer_from: str, path: Path) -> str:
    """A tiny decoder of another family than Llama (random weights, the tiny Llama's tokenizer from the folder
    `tokenizer_from`), written to `path`: Qwen2 (biased q/k/v, the LM head tied to the embeddings) or Phi-3 (fused
    `qkv_proj` and `gate_up_proj`, so Llama's layer names are not all there)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_from)
    config, model = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}[family]
    cfg = getattr(transformers, config)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.125, tie_word_embeddings=family == "qwen2")
    torch.manual_seed(0)
    getattr(transformers, model)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
