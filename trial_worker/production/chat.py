"""`sweep chat`: a small Gradio chat with a tuned model, on 127.0.0.1 by default.

The model is a merged folder (any `from_pretrained` checkpoint), or a `sweep train` output
folder: its `merged/` when there is one, else the base (unquantized, for generation) with
the trained adapter. Replies stream token by token (`generate.stream_reply`); the system
prompt, temperature and max new tokens are controls on the page. The system prompt starts as
the one the run was trained with (a model tuned under a system prompt answers as taught only
under it), unless one is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DEFAULT_HOST = "127.0.0.1"


def load_chat_model(path: str | os.PathLike):
    """(model, tokenizer) for chatting, from a merged/plain model folder or a `sweep train` output folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trial_worker.production import ADAPTER_DIR, MERGED_DIR, load_run

    p = Path(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if (p / ADAPTER_DIR).is_dir() and not (p / "config.json").exists():
        if (p / MERGED_DIR / "config.json").exists():
            p = p / MERGED_DIR
        else:
            from peft import PeftModel

            job, adapter = load_run(p)
            base = AutoModelForCausalLM.from_pretrained(job.model.name_or_path, dtype=dtype,
                                                        trust_remote_code=job.model.trust_remote_code)
            model = PeftModel.from_pretrained(base, str(adapter)).to(device).eval()
            return model, AutoTokenizer.from_pretrained(str(adapter))
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def trained_system_prompt(path: str | os.PathLike) -> Optional[str]:
    """The system prompt every training chat of a `sweep train` output folder starts with, if they share one.

    None for a plain model folder, or when the training rows have no system turn or several.
    """
    from trial_worker.data import load_splits
    from trial_worker.production import ADAPTER_DIR, load_run

    p = Path(path)
    if not (p / ADAPTER_DIR).is_dir():
        return None
    job, _ = load_run(p)
    train, _ = load_splits(job.data)
    prompts = train["prompt"]
    firsts = {m[0]["content"] if isinstance(m, list) and m and m[0]["role"] == "system" else None for m in prompts}
    return firsts.pop() if len(firsts) == 1 else None


def respond(model, tokenizer, message: str, history: list, temperature: float, max_new_tokens: int,
            system_prompt: Optional[str] = None):
    """Gradio's chat function: the history (openai-style messages) plus the new message -> streamed reply."""
    from trial_worker.production.compare import stream_reply

    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in history or []:
        if isinstance(turn, dict):
            content = turn.get("content")
            if isinstance(content, list):  # Gradio 6: a list of {"type": "text", "text": ...} parts
                content = "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
            messages.append({"role": turn["role"], "content": str(content)})
        else:  # (user, assistant) pairs from older Gradio versions
            user, bot = turn
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot or ""}]
    messages.append({"role": "user", "content": message})
    yield from stream_reply(model, tokenizer, messages, max_new_tokens=int(max_new_tokens), temperature=float(temperature))


def build_app(model, tokenizer, *, title: str = "sweep chat", system_prompt: Optional[str] = None):
    """The Gradio chat page: a ChatInterface with the system prompt, temperature and max new tokens as controls."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("`sweep chat` needs the `gradio` package: pip install 'sweep[chat]' (or pip install gradio)") from None

    def fn(message, history, system, temperature, max_new_tokens):
        yield from respond(model, tokenizer, message, history, temperature, max_new_tokens, system_prompt=system or None)

    return gr.ChatInterface(
        fn,
        title=title,
        additional_inputs=[gr.Textbox(value=system_prompt or "", label="system prompt", lines=2),
                           gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature"),
                           gr.Slider(1, 2048, value=256, step=1, label="max new tokens")],
    )


def serve(path: str | os.PathLike, *, host: str = DEFAULT_HOST, port: int = 7860,
          system_prompt: Optional[str] = None) -> None:
    """Serve the chat page for `path` (see `load_chat_model`); the system prompt defaults to the trained one."""
    model, tok = load_chat_model(path)
    if system_prompt is None:
        try:
            system_prompt = trained_system_prompt(path)
        except (OSError, ValueError) as e:  # the training data moved or changed: chat without it
            print(f"sweep chat: no system prompt from the run's training data ({e}); give one with --system")
    build_app(model, tok, title=f"sweep chat: {Path(path).name}",
              system_prompt=system_prompt).queue().launch(server_name=host, server_port=port)
