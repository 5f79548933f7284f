"""Effective batch vs execution: the split of a batch into micro-batches does not change training."""

from __future__ import annotations

import pytest

from trial_worker.execution import DoesNotFit, Execution, candidates, choose, smaller
from trial_worker.recipe import QLoRATrial

GiB = 2**30


def _losses(job, tmp_path, *, padded: bool = False) -> list[float]:
    """Per-step training losses of `job`; `padded`: the stock right-padded micro-batches instead of flattened ones."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trial = QLoRATrial(job, output_dir=tmp_path).setup()
    try:
        if padded:
            trial.trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=trial.trainer.processing_class.pad_token_id)
        trial.train()
        return [h["loss"] for h in trial.trainer.state.log_history if "loss" in h]
    finally:
        trial.cleanup()


def test_8x1_and_2x4_train_the_same_model(make_job, tmp_path):
    """Token-mean loss over the whole effective batch: 20 steps of 8x1 and of 2x4 match within 1%."""
    common = dict(learning_rate=5e-3, logging_steps=1, execution="as_written", seed=7)
    budget = {"min": 20, "max": 20}
    one = _losses(make_job(training=dict(common, per_device_train_batch_size=8, gradient_accumulation_steps=1), budget=budget),
                  tmp_path / "a")
    four = _losses(make_job(training=dict(common, per_device_train_batch_size=2, gradient_accumulation_steps=4), budget=budget),
                   tmp_path / "b")
    assert len(one) == len(four) == 20
    assert one[-1] < one[0] - 0.3, "the model must actually train for the comparison to mean anything"
    for step, (a, b) in enumerate(zip(one, four), 1):
        assert b == pytest.approx(a, rel=0.01), f"step {step}: 8x1 loss {a:.5f} vs 2x4 loss {b:.5f}"


def test_flattened_and_padded_batches_train_the_same_model(make_job, tmp_path):
    """Token-mean over the whole effective batch: per-step losses of 8 steps agree within 1e-4 (fp32)."""
    common = dict(learning_rate=5e-3, logging_steps=1, execution="as_written", seed=3)

    def job(mb: int):
        return make_job(lora={"dropout": 0.0}, training=dict(common, per_device_train_batch_size=mb,
                                                              gradient_accumulation_steps=8 // mb),
                        budget={"min": 8, "max": 8})

    padded = _losses(job(8), tmp_path / "padded", padded=True)
    flat = _losses(job(8), tmp_path / "flat")
    flat_2x4 = _losses(job(2), tmp_path / "flat2x4")
    assert len(padded) == len(flat) == len(flat_2x4) == 8
    assert padded[-1] < padded[0] - 0.1, "the model must actually train for the comparison to mean anything"
    for step, (a, b, c) in enumerate(zip(padded, flat, flat_2x4), 1):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: padded 8x1 loss {a:.6f} vs flattened 8x1 {b:.6f}"
        assert c == pytest.approx(a, rel=1e-4), f"step {step}: padded 8x1 loss {a:.6f} vs flattened 2x4 {c:.6f}"


def test_candidates_try_big_micro_batches_without_checkpointing_first():
    assert candidates(8) == [(8, False), (4, False), (2, False), (1, False), (8, True), (4, True), (2, True), (1, True)]
    assert candidates(12, max_micro_batch=4)[:3] == [(4, False), (3, False), (2, False)]


def _fake_memory(per_sample_gib: float, ckpt_share: float = 0.25, fixed_gib: float = 2.0):
    """Peak memory of a step as a probe would measure it: fixed + activations per sample."""
    measured = []

    def measure(mb: int, ckpt: bool):
        measured.append((mb, ckpt))
        return (fixed_gib + mb * per_sample_gib * (ckpt_share if ckpt else 1.0)) * GiB

    return measure, measured


def test_probe_keeps_the_fastest_execution_that_fits():
    measure, measured = _fake_memory(per_sample_gib=3.0)
    plan = choose(8, measure, limit_bytes=20 * GiB)  # 8x3+2=26 too big, 4x3+2=14 fits
    assert plan == Execution(4, 2, False, "probe")
    assert measured == [(8, False), (4, False)], "stops probing at the first fit"


def test_probe_falls_back_to_checkpointing_when_nothing_fits_without():
    measure, _ = _fake_memory(per_sample_gib=10.0)
    plan = choose(8, measure, limit_bytes=11.5 * GiB)  # no-ckpt needs 12 even at mb 1; ckpt: mb 4 needs 12, mb 2 needs 7
    assert plan == Execution(2, 4, True, "probe")


def test_probe_treats_out_of_memory_as_not_fitting():
    def measure(mb, ckpt):
        return None if mb > 2 else 1 * GiB  # a real OOM above micro-batch 2

    assert choose(8, measure, limit_bytes=10 * GiB) == Execution(2, 4, False, "probe")


def test_probe_says_why_when_nothing_fits():
    measure, _ = _fake_memory(per_sample_gib=10.0, fixed_gib=50.0)
    with pytest.raises(DoesNotFit, match=r"effective batch 8 fits in 12.0 GiB: 8xnockpt=130.0GiB"):
        choose(8, measure, limit_bytes=12 * GiB)


def test_oom_fallback_halves_the_micro_batch_at_the_same_effective_batch():
    chain, x = [], Execution(8, 1, False)
    while x is not None:
        chain.append((x.micro_batch, x.accumulation))
        x = smaller(x)
    assert chain == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert smaller(Execution(6, 2, True)) == Execution(3, 4, True, "oom retry")  # largest divisor of 12 <= 3
    assert smaller(Execution(1, 8, False)) is None
