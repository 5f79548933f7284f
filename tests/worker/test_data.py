import json

import pytest
import torch

from trial_worker.config import DataConfig
from trial_worker.data import DataFormatError, detect_format, load_splits
from trial_worker.recipe import QLoRATrial

SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "What is 2 + 2?"},
    {"from": "gpt", "value": "4"},
    {"from": "human", "value": "And 3 + 3?"},
    {"from": "gpt", "value": "6"},
]}
MESSAGES = {"messages": [{"role": "user", "content": "Uppercase: tiger"}, {"role": "assistant", "content": "TIGER"}]}
TEXT = {"text": "<s>[INST] Reverse the word: stone [/INST] enots </s>"}
INSTRUCTION = {"instruction": "Add the numbers.", "input": "7 and 5", "output": "12"}
RESPONSE = {"instruction": "Say hi.", "response": "hi"}


def _write(path, row, n=20):
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("row, fmt, prompt, completion", [
    (SHAREGPT, "sharegpt",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
     [{"role": "assistant", "content": "6"}]),
    (MESSAGES, "messages", [MESSAGES["messages"][0]], [MESSAGES["messages"][1]]),
    (INSTRUCTION, "instruction", [{"role": "user", "content": "Add the numbers.\n\n7 and 5"}],
     [{"role": "assistant", "content": "12"}]),
    (RESPONSE, "instruction", [{"role": "user", "content": "Say hi."}], [{"role": "assistant", "content": "hi"}]),
    (TEXT, "text", "<s>[INST] Reverse the word: stone [/INST]", " enots </s>"),
])
def test_each_format_loads_from_a_local_jsonl(tmp_path, row, fmt, prompt, completion):
    path = _write(tmp_path / "d.jsonl", row)
    assert detect_format(list(row)) == fmt
    for f in ("auto", fmt):
        train, val = load_splits(DataConfig(path=path, format=f, validation_fraction=0.25))
        assert (len(train), len(val)) == (15, 5)
        assert train[0]["prompt"] == prompt and train[0]["completion"] == completion


def test_plain_text_without_instruction_marker_is_language_modelling(tmp_path):
    path = _write(tmp_path / "d.jsonl", {"text": "just some text"})
    train, _ = load_splits(DataConfig(path=path, validation_fraction=0.5))
    assert train[0] == {"prompt": "", "completion": "just some text"}


def test_validation_sources_and_caps(task_data, tmp_path):
    # A folder with train/validation files: its validation split by default.
    train, val = load_splits(DataConfig(path=task_data))
    assert (len(train), len(val)) == (200, 40)
    # A named split, and caps.
    train, val = load_splits(DataConfig(path=task_data, validation_split="validation",
                                        max_train_samples=50, max_eval_samples=7))
    assert (len(train), len(val)) == (50, 7)
    # A fraction of train, the same rows every time (trials must compare on one split).
    a = load_splits(DataConfig(path=task_data, validation_fraction=0.1))[1]
    b = load_splits(DataConfig(path=task_data, validation_fraction=0.1))[1]
    assert len(a) == 20 and a["prompt"] == b["prompt"]
    # A parquet file works like a JSONL one.
    import datasets

    datasets.Dataset.from_list([MESSAGES] * 10).to_parquet(tmp_path / "d.parquet")
    assert len(load_splits(DataConfig(path=str(tmp_path / "d.parquet"), validation_fraction=0.2))[0]) == 8


def test_rows_that_do_not_fit_are_an_error_not_an_empty_run(make_job, tmp_path):
    path = _write(tmp_path / "d.jsonl", SHAREGPT)
    job = make_job(data={"path": path, "validation_fraction": 0.25, "max_seq_length": 16})
    with pytest.raises(ValueError, match="raise data.max_seq_length"):
        QLoRATrial(job, output_dir=str(tmp_path / "out")).setup()


def test_errors_name_the_problem(tmp_path):
    path = _write(tmp_path / "d.jsonl", {"question": "q", "answer": "a"})
    with pytest.raises(DataFormatError, match="cannot tell the data format"):
        load_splits(DataConfig(path=path))
    with pytest.raises(DataFormatError, match="validation_split 'test' not found"):
        load_splits(DataConfig(path=_write(tmp_path / "m.jsonl", MESSAGES), validation_split="test"))
    with pytest.raises(FileNotFoundError):
        load_splits(DataConfig(path=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("row, answers", [
    (SHAREGPT, ["4<|eot_id|>", "6<|eot_id|>"]),  # every assistant turn is trained on, nothing between them
    (MESSAGES, ["TIGER<|eot_id|>"]),
    (INSTRUCTION, ["12<|eot_id|>"]),
    (TEXT, [" enots </s><|eot_id|>"]),      # TRL appends the eos to plain-text completions
])
def test_loss_is_on_response_tokens_only(make_job, tmp_path, row, answers):
    path = _write(tmp_path / "d.jsonl", row)
    job = make_job(data={"path": path, "validation_fraction": 0.25, "max_seq_length": 256})
    trial = QLoRATrial(job, output_dir=str(tmp_path / "out")).setup()
    tok = trial.trainer.processing_class
    batch = next(iter(trial.trainer.get_train_dataloader()))
    # A padding-free micro-batch: rows back to back, each starting at position 0, then bucket padding.
    n = int(batch["num_tokens"])
    starts = (batch["position_ids"][0, :n] == 0).nonzero().flatten().tolist() + [n]
    assert len(starts) - 1 == min(job.training.per_device_train_batch_size, len(trial.trainer.train_dataset))
    for a, b in zip(starts, starts[1:]):
        ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
        trained = labels != -100
        assert (labels[trained] == ids[trained]).all()
        # The runs of trained tokens are exactly the responses; the last one ends the sequence.
        edges = torch.diff(trained.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
        run_starts, run_ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
        assert [tok.decode(ids[s:e]) for s, e in zip(run_starts, run_ends)] == answers
        assert run_ends[-1] == len(ids)
    # Padding never counts either.
    assert (batch["labels"][0, n:] == -100).all()
    trial.cleanup()
