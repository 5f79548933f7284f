import bitsandbytes as bnb
import torch

from trial_worker.model import load_model


def _batch(tokenizer):
    rows = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Uppercase: tiger"}, {"role": "assistant", "content": "TIGER"}],
    ]
    enc = tokenizer.apply_chat_template(rows, padding=True, return_dict=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _lora_b_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def test_base_is_4bit_and_only_lora_trains(make_job):
    job = make_job(lora={"target_modules": "all-linear"})
    tokenizer, model = load_model(job.model, job.training)

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q k v o gate up down, in both layers
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # lora_A and lora_B per projection

    out = model(**_batch(tokenizer))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # B starts at zero, so A's first gradient is zero; every B must get a real one, layer 0 included.
    assert all(g.abs().sum() > 0 for g in _lora_b_grads(model).values())


def test_gradients_still_reach_every_layer_after_an_evaluation(make_job):
    # bitsandbytes repacks 4-bit CPU weights for inference in eval mode; training after an
    # evaluation must still send gradients through the frozen 4-bit layers.
    job = make_job()
    tokenizer, model = load_model(job.model, job.training)
    batch = _batch(tokenizer)
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    grads = _lora_b_grads(model)
    layer0 = [g for n, g in grads.items() if ".layers.0." in n]
    assert layer0 and all(g is not None and g.abs().sum() > 0 for g in layer0)
