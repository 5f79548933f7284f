"""`sweep train`'s production run: checkpoints, resume after a crash, loss curve, adapter, merge."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from trial_worker import production


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    """A callback that kills the run right after optimizer step `step` (before any checkpoint of that step)."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Crash(f"simulated crash at step {step}")

    return Crash()


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def job(make_job):
    return make_job(training={"save_steps": 4, "save_total_limit": 2})


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    metrics = production.train(job, out)
    return out, metrics


@pytest.fixture(scope="module")
def resumed(job, tmp_path_factory):
    """The same run killed after step 6 (newest checkpoint: 4), then `--resume`d."""
    out = tmp_path_factory.mktemp("crashed")
    with pytest.raises(_Crash):
        production.train(job, out, callbacks=[_crash_at(6)])
    assert [p.name for p in production.checkpoints(out)] == ["checkpoint-4"]
    assert not (out / production.ADAPTER_DIR).exists()
    with pytest.raises(production.ProductionError, match="--resume"):
        production.train(job, out)  # never silently restarts over a crashed run's checkpoints
    metrics = production.train(job, out, resume=True, merge=True)
    return out, metrics


def test_output_folder_holds_config_curve_metrics_and_a_safetensors_adapter(uninterrupted, job):
    out, metrics = uninterrupted
    assert metrics["steps"] == 12
    assert {"config.yaml", "loss.csv", "loss.png", "metrics.json", "adapter"} <= {p.name for p in out.iterdir()}
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["steps"]) for r in rows] == list(range(1, 13))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(metrics["val_loss"]) and saved["ppl"] > 1
    # save_steps=4, save_total_limit=2: checkpoints 4, 8, 12 were written, the newest two kept
    assert [p.name for p in production.checkpoints(out)] == ["checkpoint-8", "checkpoint-12"]


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(uninterrupted, resumed):
    import torch

    (full, m_full), (res, m_res) = uninterrupted, resumed
    a, b = _adapter(full / "adapter"), _adapter(res / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert m_res["val_loss"] == pytest.approx(m_full["val_loss"], rel=1e-5)
    assert m_res["scheduled_lr"] == pytest.approx(m_full["scheduled_lr"], abs=1e-12)
    # the curve is whole across the crash: steps 1-4 from before it, 5-12 after
    full_rows = list(csv.DictReader(open(full / "loss.csv")))
    res_rows = list(csv.DictReader(open(res / "loss.csv")))
    assert [r["steps"] for r in res_rows] == [r["steps"] for r in full_rows]
    assert [float(r["loss"]) for r in res_rows] == pytest.approx([float(r["loss"]) for r in full_rows], rel=1e-5)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_loads_plainly_and_matches_base_plus_adapter(resumed, job):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = resumed
    merged_dir = out / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain: no PEFT, no quantization config
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(job.model.name_or_path, dtype=torch.float32)
    reference = _logits(PeftModel.from_pretrained(base, str(out / "adapter")).eval(), ids)
    got = _logits(merged.float().eval(), ids)
    # bf16 weights: equal up to bf16 rounding (the random tiny model has near-ties, so no argmax check)
    assert (got - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3
    # in fp32 the merge is exact
    exact = production.merge_adapter(job, out / "adapter", out / "merged32", dtype="float32")
    got32 = _logits(AutoModelForCausalLM.from_pretrained(exact).eval(), ids)
    torch.testing.assert_close(got32, reference, rtol=1e-4, atol=1e-4)


def test_resume_skips_a_corrupted_newest_checkpoint_for_the_older_one_and_ends_the_same(job, uninterrupted, tmp_path):
    """The newest checkpoint fails its hash check (bytes flipped in its optimizer state, same size):
    `--resume` says so, goes on from the older one, and still ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        production.train(job, out, callbacks=[_crash_at(10)])
    assert [p.name for p in production.checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    opt = out / "checkpoint-8" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    said = []
    metrics = production.train(job, out, resume=True, log=said.append)
    assert "checkpoint checkpoint-8 rejected: optimizer.pt fails its SHA-256 check (corrupted)" in said
    assert "falling back to checkpoint-4" in said and f"resuming from {out / 'checkpoint-4'}" in said
    assert metrics["steps"] == 12
    assert metrics["val_loss"] == pytest.approx(uninterrupted[1]["val_loss"], rel=1e-5)
