"""`sweep train --merge` then `sweep export-gguf`: the GGUF file loads back with transformers' GGUF
loader and answers the held-out prompts exactly as the merged model does (greedy).

On the project's tiny Llama: the writer does not depend on the model's size, and the real
model's merge + export takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from sweep.cli import app
from trial_worker.inputs.demo import make_tasks
from trial_worker.production.compare import generate

runner = CliRunner()


def test_merged_model_round_trips_through_gguf(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trial_worker.inputs.demo import write_task_data

    data = write_task_data(tmp_path / "tasks", n_train=64, n_val=16)
    config = tmp_path / "train.yaml"
    config.write_text(f"""
name: ggufrun
model: {{name_or_path: {tiny_model}, quantization: {{bnb_4bit_compute_dtype: float32}}, lora: {{r: 4, alpha: 16}}}}
data: {{path: {data}, max_seq_length: 64, validation_split: validation, max_eval_samples: 8}}
training: {{learning_rate: 1.0e-4, per_device_train_batch_size: 4, gradient_checkpointing: false, use_cpu: true,
           torch_threads: 2, logging_steps: 2}}
budget: {{min: 6, max: 6}}
resources: {{gpus_per_trial: 0}}
""")
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", str(config), "-o", str(run), "--merge"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export-gguf", str(run)])
    assert r.exit_code == 0, r.output
    gguf_file = run / "run.gguf"
    assert gguf_file.is_file() and "bf16" in r.output  # the merge is bf16; the file keeps it bit for bit

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    merged_tok = AutoTokenizer.from_pretrained(run / "merged")
    back = AutoModelForCausalLM.from_pretrained(run, gguf_file=gguf_file.name, dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(run, gguf_file=gguf_file.name)
    # The same weights (q/k permuted and back) and the same tokenizer, with its chat template.
    m, b = merged.state_dict(), back.state_dict()
    assert all(torch.equal(m[k], b[k]) for k in m if k != "lm_head.weight" or not merged.config.tie_word_embeddings)
    assert back_tok.chat_template == merged_tok.chat_template
    prompts = [row["messages"][:1] for row in make_tasks(10, seed=99)]
    ids = [merged_tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]
    assert ids == [back_tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                   for p in prompts]
    answers = [generate(merged, merged_tok, p, max_new_tokens=12) for p in prompts]
    assert answers == [generate(back, back_tok, p, max_new_tokens=12) for p in prompts]
    # The comparison means something: the answers depend on the prompt (a small LR keeps the
    # tiny model from learning to stop at once).
    assert len(set(answers)) > 1


def test_export_gguf_refuses_a_folder_that_is_no_run(tmp_path):
    r = runner.invoke(app, ["export-gguf", str(tmp_path)])
    assert r.exit_code == 2 and "neither a model folder" in r.output
    r = runner.invoke(app, ["export-gguf", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["export-gguf", str(tmp_path), "--type", "q4"])
    assert r.exit_code == 2 and "must be one of auto, f16, bf16, f32, q8_0" in r.output
