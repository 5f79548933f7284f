import json
import subprocess
import sys
from pathlib import Path

from trial_worker.inputs.demo import make_tasks


def test_tiny_llama_loads_with_auto_classes(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert len(tok) <= 320 and model.config.vocab_size == len(tok)
    assert (Path(tiny_model) / "model.safetensors").exists()
    text = "What is 23 + 58? Reverse the word: apple"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_prompt_is_a_token_prefix_of_the_full_conversation(tiny_model):
    # TRL finds the completion where prompt and prompt+completion tokens diverge; they must not.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row in make_tasks(50, seed=3):
        msgs = row["messages"]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(msgs, return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        assert tok.decode(full[len(prompt):]) == msgs[1]["content"] + "<|eot_id|>"


def test_task_answers_are_right():
    for row in make_tasks(300, seed=1):
        q, a = row["messages"][0]["content"], row["messages"][1]["content"]
        if q.startswith("What is "):
            assert str(eval(q[len("What is "):-1])) == a
        elif q.startswith("Reverse the word: "):
            assert q.split(": ")[1][::-1] == a
        elif q.startswith("Uppercase: "):
            assert q.split(": ")[1].upper() == a


_PREPARE = """
import json, sys
from trial_worker.config import JobConfig
from trial_worker.inputs.demo import prepare_assets
job = JobConfig.model_validate({
    "model": {"name_or_path": "assets/tiny", "generate": "tiny-llama"},
    "data": {"path": "assets/data", "generate": "arithmetic"},
    "budget": {"min": 1, "max": 2},
})
print(json.dumps(prepare_assets(job, sys.argv[1]).model_dump()))
"""


def _prepare_in_processes(tmp: Path, n: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(tmp)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def test_prepare_assets_is_idempotent_and_safe_in_parallel(tmp_path):
    jobs = _prepare_in_processes(tmp_path, 2)
    assert jobs[0] == jobs[1]
    model_dir, data_dir = tmp_path / "assets" / "tiny", tmp_path / "assets" / "data"
    assert jobs[0]["model"]["name_or_path"] == str(model_dir)
    assert jobs[0]["data"]["path"] == str(data_dir)
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == ["data", "tiny"]  # no temp folders left
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    _prepare_in_processes(tmp_path, 1)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before  # not rewritten
    rows = [json.loads(line) for line in open(data_dir / "train.jsonl")]
    assert len(rows) == 600 and {m["role"] for m in rows[0]["messages"]} == {"user", "assistant"}
