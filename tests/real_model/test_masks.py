"""Assistant-only loss: the tokens that carry a label are exactly those of the assistant's turns.

Checked token by token on a multi-turn, system-prompted conversation, for ChatML (SmolLM2's
template, no `{% generation %}` markers) and for the project's own Llama-3 style template,
then through TRL's own label building in a real trial set-up.
"""

from __future__ import annotations

import json


from trial_worker.data import tokenize_chat

CONVERSATION = [
    {"role": "system", "content": "Convert dates to ISO 8601. Reply with the date only."},
    {"role": "user", "content": "Convert to ISO 8601: March 5, 2021"},
    {"role": "assistant", "content": "2021-03-05"},
    {"role": "user", "content": "And the 9th of February, 1995?"},
    {"role": "assistant", "content": "1995-02-09"},
]


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive tokens whose mask is 1."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _check_masks(tokenizer, end_of_turn: str) -> None:
    enc = tokenize_chat(tokenizer, CONVERSATION)
    ids, mask = enc["input_ids"], enc["completion_mask"]
    # The tokens are the template's own tokenization of the whole conversation.
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert len(mask) == len(ids)
    # Each labelled run is one assistant turn, token for token: its content and its end-of-turn token.
    expected = [tokenizer(m["content"] + end_of_turn, add_special_tokens=False)["input_ids"]
                for m in CONVERSATION if m["role"] == "assistant"]
    assert _runs(ids, mask) == expected
    # ... and nothing else: no system/user/header token carries a label.
    unlabelled = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in unlabelled
    assert "2021-03-05" not in unlabelled and "1995-02-09" not in unlabelled


def test_chatml_masks_every_assistant_turn_and_nothing_else(smollm2_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    assert "{% generation %}" not in tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"  # the GGUF's EOS id, which generation stops on
    _check_masks(tok, "<|im_end|>")  # the newline ChatML puts after <|im_end|> is filler: no label


def test_own_template_masks_every_assistant_turn_and_nothing_else(tiny_model):
    from transformers import AutoTokenizer

    _check_masks(AutoTokenizer.from_pretrained(tiny_model), "<|eot_id|>")


def test_trainer_labels_follow_the_masks(tiny_model, tmp_path):
    """TRL's label building in a real trial keeps exactly our masks: -100 off the assistant turns, the token id on them."""
    from trial_worker.config import JobConfig
    from trial_worker.recipe import QLoRATrial

    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    job = JobConfig.model_validate({
        "model": {"name_or_path": tiny_model, "quantization": {"bnb_4bit_compute_dtype": "float32"}},
        "data": {"path": str(data), "validation_fraction": 0.25, "max_seq_length": 256},
        "training": {"use_cpu": True, "torch_threads": 2, "gradient_checkpointing": False},
        "budget": {"min": 1, "max": 2, "reduction_factor": 2},
    })
    trial = QLoRATrial(job, output_dir=tmp_path / "out")
    try:
        trial.setup()
        tok = trial.trainer.processing_class
        expected = {len(e["input_ids"]): e for e in (tokenize_chat(tok, r["messages"]) for r in rows)}
        turns = []
        for row in list(trial.trainer.train_dataset) + list(trial.trainer.eval_dataset):
            ids, labels = row["input_ids"], row["labels"]
            want = expected[len(ids)]
            assert ids == want["input_ids"]
            assert [int(x != -100) for x in labels] == want["completion_mask"]
            assert all(x in (-100, i) for x, i in zip(labels, ids))
            turns.append(len(_runs(ids, want["completion_mask"])))
        assert sorted(turns) == [1] * 4 + [2] * 4  # both assistant turns of the two-round chats are learnt
    finally:
        trial.cleanup()
