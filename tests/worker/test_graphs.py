"""The training loss a trial's micro-steps run (`graphs.token_nll`) and their CUDA graphs.

CPU: the chunked, sync-free loss is the model's own cross-entropy (value and gradients), and
the row slots a graphed micro-batch carries change nothing. GPU (`gpu` marker): a trial whose
micro-steps replay CUDA graphs trains the same model as the same trial run eagerly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trial_worker import graphs
from trial_worker.data import FlatCollator, bucket_length
from trial_worker.model import load_model


def _rows(tok):
    texts = ("What is 12 + 30? 42", "Reverse abc: cba", "Sort 3 1 2: 1 2 3 and more", "Spell cat: c a t")
    return [tok(t)["input_ids"] for t in texts]


def _lora_grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk_elements", [graphs.LOGIT_CHUNK_ELEMENTS, 300])  # one chunk; several (ragged) chunks
def test_token_nll_is_the_models_own_cross_entropy(make_job, monkeypatch, chunk_elements):
    job = make_job(model={"lora": {"dropout": 0.0}})
    tok, model = load_model(job.model, job.training)
    model.train()
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a gradient path that matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = FlatCollator(tok.pad_token_id, row_slots=5)([{"input_ids": r} for r in _rows(tok)])
    labels = batch["labels"].clone()
    labels[0, 3:6] = -100  # prompt tokens: not targets
    batch["labels"] = labels
    n_items = int((labels[:, 1:] != -100).sum()) + 7  # the effective batch has more label tokens than this micro-batch

    monkeypatch.setattr(graphs, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    ours = graphs.token_nll(model, batch, torch.tensor(n_items))
    ours.backward()
    ours_grads = _lora_grads(model)
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum") / n_items
    ref.backward()
    ref_grads = _lora_grads(model)

    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours_grads and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours_grads, ref_grads))
    assert any(g.abs().sum() > 0 for g in ours_grads)


def test_row_slots_pad_the_boundaries_with_empty_rows_and_change_nothing(make_job):
    job = make_job()
    tok, model = load_model(job.model, job.training)
    model.eval()
    rows = _rows(tok)[:2]
    n = sum(map(len, rows))
    plain = FlatCollator(tok.pad_token_id, per_octave=2)([{"input_ids": r} for r in rows])
    slotted = FlatCollator(tok.pad_token_id, per_octave=2, row_slots=3)([{"input_ids": r} for r in rows])
    length = bucket_length(n, 2)
    assert slotted["input_ids"].shape == (1, length)
    cu = slotted["cu_seq_lens_q"].tolist()
    assert len(cu) == 4 and cu[:2] == [0, len(rows[0])] and cu[-1] == length  # rows, the padding row, empty rows
    assert cu == sorted(cu) and slotted["max_length_q"] == length
    for key in ("input_ids", "labels", "position_ids", "num_tokens"):
        assert torch.equal(plain[key], slotted[key])
    # A micro-batch of as many rows as slots (no bucket padding) has no empty row to add.
    full = FlatCollator(tok.pad_token_id, per_octave=2, row_slots=3)([{"input_ids": [5] * 32}] * 2)
    assert full["cu_seq_lens_q"].tolist() == [0, 32, 64, 64]


def test_coarser_buckets_mean_fewer_shapes_and_never_double_padding():
    for per_octave in (1, 2, 4):
        lengths = [bucket_length(n, per_octave) for n in range(1, 8193)]
        assert all(b >= n for n, b in zip(range(1, 8193), lengths))
        assert all(b < 2 * n or b == 64 for n, b in zip(range(1, 8193), lengths))
    assert len({bucket_length(n, 2) for n in range(1, 8193)}) < len({bucket_length(n, 4) for n in range(1, 8193)})


def test_graphs_are_only_wanted_where_they_can_run():
    assert graphs.graphs_wanted(None, cpu=False, gradient_checkpointing=False, packing=False, micro_batch_tokens=2048)
    assert not graphs.graphs_wanted(None, cpu=False, gradient_checkpointing=False, packing=False,
                                    micro_batch_tokens=32 * 1024)  # bound by the GPU: no graphs unless asked
    assert graphs.graphs_wanted(True, cpu=False, gradient_checkpointing=False, packing=False, micro_batch_tokens=32 * 1024)
    assert not graphs.graphs_wanted(False, cpu=False, gradient_checkpointing=False, packing=False)
    assert not graphs.graphs_wanted(None, cpu=True, gradient_checkpointing=False, packing=False)
    assert not graphs.graphs_wanted(True, cpu=False, gradient_checkpointing=True, packing=False)
    assert not graphs.graphs_wanted(True, cpu=False, gradient_checkpointing=False, packing=True)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulation", [1, 3])
def test_graphed_and_eager_micro_steps_train_the_same_model(make_job, tmp_path, accumulation):
    """Per-step training losses and the last rung's val loss of a graphed trial match the eager trial's (bf16)."""
    from trial_worker.recipe import QLoRATrial

    def trial(cuda_graphs: bool):
        job = make_job(model={"quantization": {"bnb_4bit_compute_dtype": "bfloat16"}, "lora": {"dropout": 0.0}},
                       training={"use_cpu": None, "bf16": True, "cuda_graphs": cuda_graphs, "learning_rate": 2e-3,
                                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": accumulation,
                                 "execution": "as_written", "logging_steps": 1, "seed": 5, "optim": "adamw_torch"},
                       budget={"min": 6, "max": 12})
        reports = []
        t = QLoRATrial(job, output_dir=tmp_path / f"g{cuda_graphs}", report=lambda m, d: reports.append(m)).setup()
        try:
            t.train()
            g = t.trainer._sweep_graphs
            losses = [h["loss"] for h in t.trainer.state.log_history if "loss" in h]
            return losses, reports, (g.replays, len(g.graphs), g.disabled) if g is not None else None
        finally:
            t.cleanup()

    eager, eager_reports, none = trial(False)
    graphed, graphed_reports, (replays, shapes, disabled) = trial(True)
    assert none is None and disabled is None
    assert replays >= 12 * accumulation - 2 * shapes - 1 and shapes >= 1  # all but the warm-up and capture steps replayed
    assert len(eager) == len(graphed) == 12
    assert eager[-1] < eager[0], "the model must train for the comparison to mean anything"
    for step, (a, b) in enumerate(zip(eager, graphed), 1):
        assert b == pytest.approx(a, rel=2e-3), f"step {step}: eager {a:.5f} vs graphed {b:.5f}"
    for a, b in zip(eager_reports, graphed_reports):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=2e-3)


def test_a_softcapped_lm_head_falls_back_to_trls_loss_and_is_refused_by_packs(tmp_path, make_job):
    """Our loss is hidden @ W^T and a cross-entropy: a model whose logits are soft-capped (Gemma 2) trains through
    TRL's fused head instead, with the model's own loss, and packed trials refuse it by name."""
    import shutil

    from transformers import Gemma2Config, Gemma2ForCausalLM

    from trial_worker.pack.engine import PackEngine
    from trial_worker.recipe import QLoRATrial

    job = make_job(lora={"dropout": 0.0}, training={"logging_steps": 1}, budget={"min": 2, "max": 2})
    llama = job.model.name_or_path
    _, model = load_model(job.model, job.training)
    assert graphs.lm_head_not_plain(model) is None
    gemma_dir = tmp_path / "gemma2"
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0, initializer_range=0.5,
                       pad_token_id=model.config.pad_token_id, bos_token_id=model.config.bos_token_id,
                       eos_token_id=model.config.eos_token_id)
    Gemma2ForCausalLM(cfg).save_pretrained(gemma_dir)
    for f in Path(llama).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, gemma_dir / f.name)
    data = job.model_dump()
    data["model"]["name_or_path"] = str(gemma_dir)
    gemma_job = type(job).model_validate(data)

    trial = QLoRATrial(gemma_job, output_dir=tmp_path / "out").setup()
    try:
        assert trial.trainer._sweep_plain_head is False and trial.trainer._sweep_graphs is None
        assert "final_logit_softcapping=3.0" in graphs.lm_head_not_plain(trial.trainer.model)
        batch = next(iter(trial.trainer.get_train_dataloader()))
        batch.pop("num_tokens", None)
        own = trial.trainer.model(**{k: v for k, v in batch.items()}).loss  # the model's own loss, softcap applied
        ours = trial.trainer.compute_loss(trial.trainer.model, dict(batch))
        plain = graphs.token_nll(trial.trainer.model, dict(batch), None)  # what ignoring the softcap would give
        assert ours.item() == pytest.approx(own.item(), rel=1e-4)
        assert abs(plain.item() - own.item()) > 1e-3  # the softcap matters here: the check has teeth
    finally:
        trial.cleanup()
    with pytest.raises(ValueError, match="final_logit_softcapping=3.0.*resources.packing: off"):
        PackEngine(gemma_job, output_dir=str(tmp_path / "pack"))


@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
def test_only_our_varlen_attention_gets_the_placeholder_mask(make_job, attn):
    """The 4-D placeholder mask means "the varlen kernel keeps rows apart": any other attention would read it as
    "attend to everything" (bidirectional, across rows). "sdpa" in a spec is ours (sdpa + the varlen kernel)."""
    from trial_worker.model import FLAT_ATTENTION

    job = make_job(model={"attn_implementation": attn})
    _, model = load_model(job.model, job.training)
    backbone = graphs.causal_lm_parts(model)[0]
    assert graphs.runs_varlen(backbone) == (attn != "eager")
    assert (backbone.config._attn_implementation == FLAT_ATTENTION) == (attn != "eager")
    if torch.cuda.is_available():
        tok_ids = [[5, 6, 7, 8], [9, 10, 11]]
        batch = {k: v.cuda() if hasattr(v, "cuda") else v
                 for k, v in FlatCollator(0)([{"input_ids": r} for r in tok_ids]).items()}
        assert ("attention_mask" in graphs.varlen_inputs(batch, backbone)) == (attn != "eager")
