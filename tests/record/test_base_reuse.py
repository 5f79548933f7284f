"""The base model's evaluation is done once per model, data and split: a later study of the same storage takes
its metrics from an earlier one (`sweep.record.base_eval_key`, `reuse_base_metrics`), and nothing else does."""

from __future__ import annotations

import os

import optuna
import yaml

from sweep.record import base_eval_key, open_storage, record_base_metrics, reuse_base_metrics
from sweep.spec import load_spec
from sweep_helpers import small_spec


def _job(tmp_path, **data):
    model, tasks = tmp_path / "model", tmp_path / "tasks"
    model.mkdir(exist_ok=True)
    tasks.mkdir(exist_ok=True)
    for f, text in ((model / "config.json", "{}"), (model / "model.safetensors", "x" * 64),
                    (tasks / "train.jsonl", '{"text": "a"}\n'), (tasks / "validation.jsonl", '{"text": "b"}\n')):
        if not f.exists():
            f.write_text(text)
    path = small_spec(tmp_path, {"model": str(model), "data": str(tasks)}, name="k",
                      params={"learning_rate": {"type": "choice", "values": [1e-3]}})
    if data:
        spec = yaml.safe_load(path.read_text())
        for section, fields in data.items():
            spec[section].update(fields)
        path.write_text(yaml.safe_dump(spec))
    return load_spec(path).job()


def test_the_key_follows_the_model_the_data_and_the_split_not_the_searched_settings(tmp_path):
    key = base_eval_key(_job(tmp_path), on_gpu=False)
    assert base_eval_key(_job(tmp_path), on_gpu=False) == key
    # what a sweep searches or how it trains leaves the base's loss alone
    assert base_eval_key(_job(tmp_path, model={"lora": {"r": 64, "alpha": 128}},
                              training={"learning_rate": 3e-3, "per_device_train_batch_size": 1}), on_gpu=False) == key
    # what the loss is measured on, with what, and where, does not
    assert base_eval_key(_job(tmp_path, data={"max_seq_length": 77}), on_gpu=False) != key
    assert base_eval_key(_job(tmp_path, data={"max_eval_samples": 5}), on_gpu=False) != key
    assert base_eval_key(_job(tmp_path, training={"bf16": True}), on_gpu=False) != key
    assert base_eval_key(_job(tmp_path), on_gpu=True) != key
    val = tmp_path / "tasks" / "validation.jsonl"
    val.write_text('{"text": "b"}\n{"text": "c"}\n')  # the held-out rows changed
    assert base_eval_key(_job(tmp_path), on_gpu=False) != key
    key = base_eval_key(_job(tmp_path), on_gpu=False)
    weights = tmp_path / "model" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same size, rewritten
    assert base_eval_key(_job(tmp_path), on_gpu=False) != key


def test_a_later_study_takes_the_base_of_an_earlier_one_with_the_same_key_only(storage_url):
    storage = open_storage(storage_url)
    first = optuna.create_study(storage=storage, study_name="first")
    assert reuse_base_metrics(first, storage, "k1") is None  # nothing to take: evaluated for this one
    record_base_metrics(first, 1.75, 5.75)
    other = optuna.create_study(storage=storage, study_name="other")
    assert reuse_base_metrics(other, storage, "k2") is None  # another model or data
    assert "base_val_loss" not in other.user_attrs

    later = optuna.create_study(storage=storage, study_name="later")
    assert reuse_base_metrics(later, storage, "k1") == "first"
    attrs = optuna.load_study(study_name="later", storage=storage_url).user_attrs
    assert (attrs["base_val_loss"], attrs["base_ppl"], attrs["base_from"], attrs["base_eval_key"]) == (1.75, 5.75, "first", "k1")
    # a study's own base is never replaced by another's
    record_base_metrics(other, 9.0, 8103.0)
    other.set_user_attr("base_eval_key", "k1")
    assert reuse_base_metrics(other, storage, "k1") is None
    assert optuna.load_study(study_name="other", storage=storage_url).user_attrs["base_val_loss"] == 9.0
