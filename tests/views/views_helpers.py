"""Helpers for the views tests: a study shaped like a finished sweep, the demo spec, a canary key."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNGS = [10, 20, 40]
CANARY_KEY = "canary" + "0123456789abcdef" * 2 + "cafe"  # a fake WANDB_API_KEY that must never be written


def demo_spec_dict(**changes) -> dict:
    d = yaml.safe_load((ROOT / "search_spaces" / "demo_cpu.yaml").read_text())
    d["budget"] = {"unit": "steps", "min": RUNGS[0], "max": RUNGS[-1], "reduction_factor": 2}
    d.update(changes)
    return d


def build_study(storage_url: str, name: str = "views", n: int = 8, seed: int = 0) -> optuna.Study:
    """A study shaped like a finished sweep: rungs at budget steps, COMPLETE/PRUNED/FAIL, rung attrs.

    Trial i's loss falls with its learning rate, so some trials are clearly better; the
    worse half stops at rung 1 or 2 (PRUNED), the last trial FAILs.
    """
    import random

    from sweep.record import open_storage, record_base_metrics, record_spec
    from sweep.spec import SweepSpec, public_dict, spec_hash

    rng = random.Random(seed)
    study = optuna.create_study(storage=open_storage(storage_url), study_name=name, direction="minimize")
    spec = SweepSpec.model_validate(demo_spec_dict(name=name))
    record_spec(study, public_dict(spec), spec_hash(spec))
    record_base_metrics(study, 4.2, math.exp(4.2))
    dists = {
        "learning_rate": optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True),
        "lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16]),
        "lr_scheduler_type": optuna.distributions.CategoricalDistribution(["linear", "cosine", "constant"]),
    }
    for i in range(n):
        t = study.ask(dists)
        lr, r = t.params["learning_rate"], t.params["lora_r"]
        quality = math.log10(lr / 3e-4) / 2 + r / 64 + rng.uniform(-0.05, 0.05)  # 0..~1.3, higher is better
        if i == n - 1:
            t.set_user_attr("fail_reason", "RuntimeError: CUDA out of memory")
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        reach = 3 if quality > 0.7 else (2 if quality > 0.4 else 1)
        loss = 4.2
        for k, step in enumerate(RUNGS[:reach]):
            loss = 4.2 - quality * (k + 1) * 0.6
            t.report(loss, step)
            t.set_user_attr(f"rung_{step}", {"val_loss": loss, "ppl": math.exp(loss), "train_loss": loss + 0.1,
                                             "samples_per_s": 20 + 10 * r / 16, "tokens_per_s": 1000 + 400 * r / 16,
                                             "peak_mem_gb": 0.5 + r / 32, "steps": step})
        t.set_user_attr("rung_reached", reach)
        t.set_user_attr("budget_reached", RUNGS[reach - 1])
        t.set_user_attr("budget_unit", "steps")
        t.set_user_attr("val_loss_last", loss)
        t.set_user_attr("samples_per_s", 20 + 10 * r / 16)
        t.set_user_attr("tokens_per_s", 1000 + 400 * r / 16)
        if reach == 3:
            study.tell(t, loss)
        else:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
    return study


def all_text_under(*roots) -> bytes:
    """Every byte of every file under the folders (to look for a leaked secret)."""
    blob = b""
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                blob += p.read_bytes()
    return blob
