"""A pack's made data (tokenizer, rows, tokens) is kept for the next sweep of the same inputs, and only for them
(`trial_worker.pack.data.cache_file`): a sweep reads it instead of making it again, gets exactly what making it
gives, and makes it again when the tokenizer, the data, or a data setting changed, or the kept file is broken."""

from __future__ import annotations

import shutil

import pytest

from trial_worker.config import JobConfig
from trial_worker.pack.data import cache_file, start


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    monkeypatch.setenv("SWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWEEP_TIMELINE", str(tmp_path / "marks.jsonl"))
    model = write_tiny_llama(tmp_path / "tiny")
    data = write_task_data(tmp_path / "tasks", n_train=60, n_val=12)
    return tmp_path, model, data


def _job(model, data, **data_settings) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"name_or_path": str(model), "quantization": {"bnb_4bit_compute_dtype": "float32"}},
        "data": {"path": str(data), "max_seq_length": 64, **data_settings},
        "training": {"bf16": False, "use_cpu": True},
        "budget": {"min": 2, "max": 4},
    })


def _kept_marks(tmp_path) -> int:
    marks = (tmp_path / "marks.jsonl")
    return marks.read_text().count("kept from an earlier sweep") if marks.exists() else 0


@pytest.mark.parametrize("own_process", [False, True])
def test_the_next_sweep_reads_the_kept_data_and_gets_what_making_it_gives(inputs, own_process):
    tmp_path, model, data = inputs
    job = _job(model, data)
    made = start(job, own_process=own_process)()
    assert cache_file(job).exists() and _kept_marks(tmp_path) == 0
    again = start(job, own_process=own_process)()
    assert _kept_marks(tmp_path) == 1
    assert again == made  # pad id, and every train and validation sequence with its targets


def test_other_inputs_or_settings_are_made_anew(inputs, tmp_path):
    _, model, data = inputs
    job = _job(model, data)
    key = cache_file(job)
    assert key is not None and cache_file(_job(model, data)) == key
    # weights do not make the data: another checkpoint of the same tokenizer reads the same kept data
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert cache_file(job) == key
    # a data setting, a data file, or a tokenizer file changed: another key
    assert cache_file(_job(model, data, max_seq_length=48)) != key
    assert cache_file(_job(model, data, system_prompt="Be brief.")) != key
    copy = tmp_path / "tasks2"
    shutil.copytree(data, copy)
    assert cache_file(_job(model, copy)) == key  # the same bytes elsewhere: the same data
    train = next(f for f in sorted(copy.rglob("*")) if f.is_file())
    train.write_text(train.read_text() + "\n")
    assert cache_file(_job(model, copy)) != key
    tok = model / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("{", "{\"model_max_length\": 77, ", 1))
    assert cache_file(job) != key


def test_a_broken_kept_file_is_made_again(inputs, monkeypatch):
    tmp_path, model, data = inputs
    job = _job(model, data)
    made = start(job, own_process=False)()
    kept = cache_file(job)
    kept.write_bytes(kept.read_bytes()[:100])  # cut short
    assert start(job, own_process=False)() == made
    assert _kept_marks(tmp_path) == 0
    assert start(job, own_process=False)() == made and _kept_marks(tmp_path) == 1  # kept anew
    monkeypatch.setenv("SWEEP_DATA_CACHE", "0")
    assert cache_file(job) is None
