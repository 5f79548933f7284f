import math

import pytest
import torch

from trial_worker.recipe import QLoRATrial


def test_val_loss_is_the_token_mean_over_all_response_tokens(make_job, tmp_path):
    # Eval batch 8 over rows of different response lengths: a mean of batch means would differ.
    job = make_job(training={"per_device_eval_batch_size": 8})
    trial = QLoRATrial(job, output_dir=str(tmp_path)).setup()
    got = trial.evaluate()

    # By hand: one row at a time, HF's own loss (a mean over that row's label tokens) times its count.
    model, total, count, batch_means = trial.trainer.model, 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for row in trial.trainer.eval_dataset:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
        for batch in trial.trainer.get_eval_dataloader():
            batch_means.append(model(**batch).loss.item())

    assert got["tokens"] == count
    assert got["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert abs(sum(batch_means) / len(batch_means) - got["val_loss"]) > 1e-4  # the check can tell them apart
    trial.cleanup()


def test_evaluation_leaves_the_rng_and_train_mode_alone(make_job, tmp_path):
    trial = QLoRATrial(make_job(), output_dir=str(tmp_path)).setup()
    trial.trainer.model.train()
    state = torch.get_rng_state()
    trial.evaluate()
    assert torch.equal(state, torch.get_rng_state())
    assert trial.trainer.model.training
    trial.cleanup()
