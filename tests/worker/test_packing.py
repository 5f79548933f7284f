"""Packing keeps examples apart: a document packed after another sees only itself."""

from __future__ import annotations

import torch

from trial_worker.model import load_model
from trial_worker.recipe import QLoRATrial


def test_a_packed_document_attends_only_to_itself(make_job):
    job = make_job(data={"packing": True})
    tok, model = load_model(job.model, job.training)
    model.eval()
    a = tok("What is 12 + 30? 42", return_tensors="pt")["input_ids"][0]
    b = tok("Reverse abc: cba", return_tensors="pt")["input_ids"][0]
    packed = torch.cat([a, b])[None]
    # Packed rows carry per-document positions (TRL's padding-free packing); no attention mask.
    position_ids = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        alone = model(input_ids=b[None]).logits[0]
        together = model(input_ids=packed, position_ids=position_ids).logits[0, len(a):]
        leaky = model(input_ids=packed).logits[0, len(a):]  # one long document: b sees a
    assert torch.allclose(alone, together, atol=1e-4), (alone - together).abs().max()
    assert not torch.allclose(alone, leaky, atol=1e-4), "the check must be able to see cross-document attention"


def test_packed_training_batches_restart_positions_at_each_document(make_job, tmp_path):
    trial = QLoRATrial(make_job(data={"packing": True}, training={"per_device_train_batch_size": 2}),
                       output_dir=tmp_path).setup()
    try:
        batch = next(iter(trial.trainer.get_train_dataloader()))
        pos = batch["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist()
        assert len(starts) >= 2, "a packed row holds several examples"
        labels = batch["labels"][0]
        # Each document starts with its prompt: never a target, so no token is trained as the
        # continuation of the document before it.
        assert all(labels[s] == -100 for s in starts), [(s, int(labels[s])) for s in starts]
        assert (labels != -100).any()
    finally:
        trial.cleanup()
