"""`sweep evaluate`: the base model vs the fine-tuned one, on the job's held-out split.

Both are the *same* trial set-up (`QLoRATrial.setup`: 4-bit base + LoRA, the same tokens and
response-only masking); the base is that model with its adapter switched off
(`disable_adapter`), the tuned one with the trained adapter's weights loaded. So the two
perplexities differ only by the adapter.

Then `num_prompts` held-out prompts are answered by both (greedy), side by side, with
automatic scores against the reference answer (exact match, token F1) and an empty 0-5
grade column for a person; written as `evaluation.md` and `evaluation.csv`. A prompt is
shown whole: every turn of a multi-turn conversation, system prompt included, since the
answer depends on all of them. Beside them, `loss_curves.png`: the run's training loss
(its `loss.csv`, when the adapter comes from a `sweep train` folder) with the held-out loss
of the base and of the tuned model.
"""

from __future__ import annotations

import csv
import os
import re
import string
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from trial_worker.config import JobConfig
from trial_worker.production import LOSS_CSV

DEFAULT_PROMPTS = 10
DEFAULT_MAX_NEW_TOKENS = 48
LOSS_CURVES_PNG = "loss_curves.png"
CSV_COLUMNS = ("id", "prompt", "reference", "base", "tuned", "base_exact", "tuned_exact",
               "base_f1", "tuned_f1", "base_grade_0_5", "tuned_grade_0_5")


# ---------------------------------------------------------------------------- scores

def normalise_answer(s: str) -> str:
    """Lower case, no punctuation or extra spaces (SQuAD's normalisation, without English articles)."""
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of whitespace tokens of the normalised answers."""
    p, r = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------- models

def load_adapter_weights(model, adapter_dir: str | os.PathLike) -> None:
    """Load a saved LoRA adapter (adapter_model.safetensors) into the trial's PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ValueError(f"the adapter in {adapter_dir} does not fit the job's LoRA set-up: unexpected {unexpected[:3]}")


def _prompt_text(row: dict) -> tuple[Any, str]:
    """(prompt as messages or text, reference answer) of a prompt-completion row."""
    completion = row["completion"]
    reference = completion[-1]["content"] if isinstance(completion, list) else completion
    return row["prompt"], reference.strip()


def generate(model, tokenizer, prompt: Any, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = 0.0) -> str:
    """The model's answer to `prompt` (chat messages or plain text); greedy when temperature is 0."""
    import torch

    if isinstance(prompt, list):
        enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                                  use_cache=True)
    kwargs.update(do_sample=True, temperature=temperature) if temperature > 0 else kwargs.update(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- the comparison

def compare(job: JobConfig, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            num_prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Perplexity and answers of base vs tuned on the held-out split; writes evaluation.md/.csv into `out_dir`."""
    from trial_worker.recipe import QLoRATrial

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sweep-eval-") as tmp:
        trial = QLoRATrial(job, output_dir=tmp)
        try:
            trial.setup()
            model, tok = trial.trainer.model, trial.trainer.processing_class
            with model.disable_adapter():
                base = trial.evaluate()
            load_adapter_weights(model, adapter_dir)
            tuned = trial.evaluate()
            rows: list[dict[str, Any]] = []
            for i, row in enumerate(trial.val_rows.select(range(min(num_prompts, len(trial.val_rows))))):
                prompt, reference = _prompt_text(row)
                with model.disable_adapter():
                    base_answer = generate(model, tok, prompt, max_new_tokens=max_new_tokens)
                tuned_answer = generate(model, tok, prompt, max_new_tokens=max_new_tokens)
                rows.append({
                    "id": i, "prompt": conversation_text(prompt), "reference": reference, "base": base_answer, "tuned": tuned_answer,
                    "base_exact": exact_match(base_answer, reference), "tuned_exact": exact_match(tuned_answer, reference),
                    "base_f1": token_f1(base_answer, reference), "tuned_f1": token_f1(tuned_answer, reference),
                    "base_grade_0_5": "", "tuned_grade_0_5": "",
                })
        finally:
            trial.cleanup()
    n = max(1, len(rows))
    summary = {
        "base": {"val_loss": base["val_loss"], "ppl": base["ppl"],
                 "exact": sum(r["base_exact"] for r in rows) / n, "f1": sum(r["base_f1"] for r in rows) / n},
        "tuned": {"val_loss": tuned["val_loss"], "ppl": tuned["ppl"],
                  "exact": sum(r["tuned_exact"] for r in rows) / n, "f1": sum(r["tuned_f1"] for r in rows) / n},
        "tokens": base["tokens"],
        "prompts": len(rows),
        "rows": rows,
    }
    _write_csv(rows, out / "evaluation.csv")
    summary["plot"] = plot_loss_curves(Path(adapter_dir).parent / LOSS_CSV, base["val_loss"], tuned["val_loss"],
                                       out / LOSS_CURVES_PNG)
    (out / "evaluation.md").write_text(render_markdown(job, adapter_dir, summary))
    return summary


def conversation_text(prompt: Any) -> str:
    """A prompt as a person reads it: each turn of a conversation on its own line as `role: content`."""
    if not isinstance(prompt, list):
        return str(prompt)
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def plot_loss_curves(loss_csv: Path, base_val: float, tuned_val: float, out_png: Path) -> Optional[Path]:
    """`out_png`: the training loss of `loss_csv` (if it exists) and the held-out loss before/after; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses = [], []
    if loss_csv.exists():
        with open(loss_csv, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("loss") not in (None, ""):
                    steps.append(float(r["steps"]))
                    losses.append(float(r["loss"]))
    last = steps[-1] if steps else 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(steps, losses, label="training loss (tuned run)")
    ax.plot([0, last], [base_val, tuned_val], "o--", color="tab:red", label="held-out loss: base -> tuned")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})


def _cell(s: Any) -> str:
    """One markdown table cell: lines kept apart with <br>, other whitespace folded, pipes escaped."""
    lines = (re.sub(r"\s+", " ", line).replace("|", "\\|") for line in str(s).splitlines())
    return "<br>".join(line for line in lines if line.strip()) or " "


def render_markdown(job: JobConfig, adapter_dir: str | os.PathLike, summary: dict) -> str:
    b, t = summary["base"], summary["tuned"]
    lines = [
        f"# Base vs tuned: {job.name}",
        "",
        f"Base `{job.model.name_or_path}`; adapter `{adapter_dir}`; held-out data `{job.data.path}` "
        f"({summary['tokens']} response tokens, the same tokens and masking for both).",
        "",
        "| model | val loss | perplexity | exact match | token F1 |",
        "|---|---|---|---|---|",
        f"| base | {b['val_loss']:.4f} | {b['ppl']:.3f} | {b['exact']:.2f} | {b['f1']:.2f} |",
        f"| tuned | {t['val_loss']:.4f} | {t['ppl']:.3f} | {t['exact']:.2f} | {t['f1']:.2f} |",
        "",
    ]
    if summary.get("plot"):
        lines += [f"![training loss and held-out loss, base vs tuned]({Path(summary['plot']).name})", ""]
    lines += [
        f"## {summary['prompts']} held-out prompts (greedy; grade 0-5 by a person)",
        "",
        "Each prompt is the whole conversation the models answered, one turn per line.",
        "",
        "| # | prompt | reference | base | tuned | EM base/tuned | F1 base/tuned | grade base | grade tuned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['id']} | {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['tuned'])} "
            f"| {r['base_exact']:.0f} / {r['tuned_exact']:.0f} | {r['base_f1']:.2f} / {r['tuned_f1']:.2f} |  |  |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- chat

def stream_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.7):
    """Yield the growing reply of `model` to a chat (`messages`: role/content dicts), token by token."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    kwargs: dict[str, Any] = dict(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer)
    kwargs.update(do_sample=True, temperature=temperature) if temperature > 0 else kwargs.update(do_sample=False)

    def work():
        with torch.no_grad():
            model.generate(**kwargs)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
