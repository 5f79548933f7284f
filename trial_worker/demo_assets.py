"""The project's own tiny model and task data, so the demo and the tests run offline.

`write_tiny_llama` writes a real Llama-architecture checkpoint (random weights, seeded)
and a real byte-level BPE tokenizer with a Llama-3 chat template: the same files a hub
model has, loaded by the same `from_pretrained` calls. `write_task_data` writes short
tasks with reference answers (arithmetic, reversing, upper-casing, counting) as chat
`messages` JSONL. `prepare_assets` writes both where a job asks for them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import uuid
from pathlib import Path
from typing import Callable

from trial_worker.config import JobConfig

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, PAD, HEADER_START, HEADER_END]

# Llama 3's pre-tokenizer split. Its `\s*[\r\n]+` keeps "\n\n" one piece whether text
# follows or not, so a tokenized prompt stays a prefix of prompt + completion.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3's chat template, shortened (no tools, no date header). The assistant turn is
# wrapped in {% generation %} so TRL's assistant_only_loss also works with it.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


# --------------------------------------------------------------------------- tasks

_WORDS = (
    "apple river stone cloud green light tiger paper music ocean table water smile "
    "house bread plant dream night storm sugar glass zebra quiet north amber lemon"
).split()


def _task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _task_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


def _task_reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    return f"Reverse the word: {w}", w[::-1]


def _task_upper(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    return f"Uppercase: {w}", w.upper()


def _task_count(rng: random.Random) -> tuple[str, str]:
    w = "".join(rng.choice(string.ascii_lowercase[:6]) for _ in range(rng.randint(3, 9)))
    c = rng.choice(w)
    return f"How many times does '{c}' occur in {w}?", str(w.count(c))


def _task_next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 998)
    return f"What number comes after {n}?", str(n + 1)


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _task_add, _task_sub, _task_reverse, _task_upper, _task_count, _task_next,
]


def make_tasks(n: int, seed: int) -> list[dict]:
    """`n` chat examples {"messages": [user, assistant]} with exact reference answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, answer = rng.choice(TASKS)(rng)
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def write_task_data(path: str | os.PathLike, *, n_train: int = 600, n_val: int = 120, seed: int = 0) -> Path:
    """Write `train.jsonl` and `validation.jsonl` (chat `messages` format) into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("validation", n_val, seed + 1_000_003)):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in make_tasks(n, s):
                f.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------- model

def build_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `corpus`, with Llama 3's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: plain-text encoding starts with <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[EOS, HEADER_START, HEADER_END],
        model_max_length=2048, padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_llama(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 300,
    max_position_embeddings: int = 512,
    initializer_range: float | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama (safetensors) and its tokenizer into the folder `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = []
    for m in make_tasks(2000, seed=seed + 7):
        corpus.append(m["messages"][0]["content"])
        corpus.append(m["messages"][1]["content"])
    corpus += [string.ascii_letters + string.digits + string.punctuation, "user assistant system\n\n"]
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # 1/sqrt(hidden) rather than Llama's 0.02: with a frozen random lm_head of std 0.02 the
        # logits can hardly leave zero, and LoRA could not lower the loss in a few dozen steps.
        initializer_range=initializer_range if initializer_range is not None else hidden_size**-0.5,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- jobs

def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Write into a temp folder beside `target`, then rename: concurrent callers never see half a folder."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # a real failure, not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_assets(job: JobConfig, base_dir: str | os.PathLike = ".") -> JobConfig:
    """Write the generated model/data a job asks for (if missing) and return the job with its paths resolved.

    Relative paths are taken relative to `base_dir` (the spec's folder), by `JobConfig.resolved`.
    Idempotent and safe when several processes call it at once.
    """
    job = job.resolved(base_dir)
    if job.model.generate == "tiny-llama":
        _write_atomically(Path(job.model.name_or_path), write_tiny_llama)
    if job.data.generate == "arithmetic":
        _write_atomically(Path(job.data.path), write_task_data)
    return job
