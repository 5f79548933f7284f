"""Word problems with worked answers: a generated chat task a 135M model fails and 120 steps do not saturate.

The dates task (`inputs.demo.write_date_data`) is learnt to a val loss of ~0.0001 by every config within a few
dozen steps, so a search over it cannot tell configs apart. These problems need several dependent steps each
(shopping totals and change, hours to minutes and back, a date some days later across a month end, the weekday
some days later), and the reply is the worked solution in a fixed form, one calculation per line, ending in
`Answer: ...`:

    Mia buys 3 pens at $4 each and 5 cups at $7 each. She pays with a $50 note. How much change does she get?
    3 * 4 = 12
    5 * 7 = 35
    12 + 35 = 47
    50 - 47 = 3
    Answer: 3

The form is learnt in a few steps; the arithmetic (products up to 9 x 19, sums and differences up to 200,
division by 60 and by 7, month lengths, leap years) is learnt slowly and in part, so val loss keeps falling
past the top rung and exact match stays well below 1. The reply is deterministic given the question, so
exact match of the whole reply (`trial_worker.production.compare.exact_match`) scores it, and `final_answer` reads the
last line for a looser check.

Generated with a fixed seed; the validation split is drawn first from its own seed, and no question of it
appears in the training split (`write_word_problems` drops duplicates), so it is held out.
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

SYSTEM_PROMPT = ("Solve the problem. Write one calculation per line, then a last line 'Answer: ' "
                 "followed by the answer only.")

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Ruth", "Kai", "Nora", "Sam")
_ITEMS = ("pens", "cups", "books", "apples", "tickets", "candles", "plates", "stamps", "shirts", "lamps",
          "maps", "bowls")
WEEKDAYS = tuple(calendar.day_name)  # Monday ... Sunday


def _shopping(rng: random.Random) -> tuple[str, str, list[str], int]:
    name = rng.choice(_NAMES)
    item1, item2 = rng.sample(_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(2, 19), rng.randint(2, 19)
    text = f"{name} buys {a} {item1} at ${p} each and {b} {item2} at ${q} each."
    steps = [f"{a} * {p} = {a * p}", f"{b} * {q} = {b * q}", f"{a * p} + {b * q} = {a * p + b * q}"]
    return name, text, steps, a * p + b * q


def _total(rng: random.Random) -> tuple[str, str]:
    name, text, steps, total = _shopping(rng)
    return f"{text} How much does {name} spend in total?", "\n".join(steps + [f"Answer: {total}"])


def _change(rng: random.Random) -> tuple[str, str]:
    name, text, steps, total = _shopping(rng)
    bill = next(b for b in (20, 50, 100, 200, 500) if b > total)
    question = f"{text} {name} pays with a ${bill} note. How much change does {name} get?"
    return question, "\n".join(steps + [f"{bill} - {total} = {bill - total}", f"Answer: {bill - total}"])


def _to_minutes(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(1, 9), rng.randint(1, 59)
    what = rng.choice(("A train ride", "A film", "A hike", "A flight", "A meeting"))
    return (f"{what} lasts {h} h {m} min. How many minutes is that?",
            f"{h} * 60 = {h * 60}\n{h * 60} + {m} = {h * 60 + m}\nAnswer: {h * 60 + m}")


def _from_minutes(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(1, 9), rng.randint(0, 59)
    total = h * 60 + m
    return (f"How many hours and minutes are {total} minutes?",
            f"{total} = {h} * 60 + {m}\nAnswer: {h} h {m} min")


def _days_after(rng: random.Random) -> tuple[str, str]:
    y, mo = rng.randint(2021, 2028), rng.randint(1, 12)
    days = calendar.monthrange(y, mo)[1]
    d, k = rng.randint(days - 24, days), rng.randint(2, 28)  # about half of them cross the month's end
    end = datetime.date(y, mo, d) + datetime.timedelta(days=k)
    month = calendar.month_name[mo]
    steps = [f"{month} {y} has {days} days", f"{d} + {k} = {d + k}"]
    if d + k > days:
        steps.append(f"{d + k} - {days} = {d + k - days}")
    return (f"What is the date {k} days after {month} {d}, {y}? Give it as YYYY-MM-DD.",
            "\n".join(steps + [f"Answer: {end.isoformat()}"]))


def _weekday(rng: random.Random) -> tuple[str, str]:
    start, k = rng.randrange(7), rng.randint(3, 60)
    q, r = divmod(k, 7)
    end = WEEKDAYS[(start + r) % 7]
    return (f"Today is {WEEKDAYS[start]}. What day of the week is it in {k} days?",
            f"{k} = {q} * 7 + {r}\n{WEEKDAYS[start]} + {r} days = {end}\nAnswer: {end}")


# name -> generator of (question, worked answer); drawn with equal weight
KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "total": _total, "change": _change, "to_minutes": _to_minutes, "from_minutes": _from_minutes,
    "days_after": _days_after, "weekday": _weekday,
}


def make_word_problems(n: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct chats {"messages": [system, user, assistant]} from `seed`, none of whose questions is in `exclude`."""
    rng = random.Random(seed)
    kinds = list(KINDS.values())
    out: list[dict] = []
    seen = set(exclude)
    while len(out) < n:
        question, answer = rng.choice(kinds)(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]})
    return out


def split_word_problems(n_train: int, n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation drawn first from its own seed, train from `seed` without its questions."""
    val = make_word_problems(n_val, seed + 1_000_003)
    held_out = frozenset(r["messages"][1]["content"] for r in val)
    return make_word_problems(n_train, seed, exclude=held_out), val


def write_word_problems(path: str | os.PathLike, *, n_train: int = 4000, n_val: int = 200, seed: int = 0) -> Path:
    """Write `train.jsonl` and `validation.jsonl` of word problems (chat `messages` format) into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "validation"), split_word_problems(n_train, n_val, seed)):
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return path


def final_answer(reply: str) -> Optional[str]:
    """The text after the last `Answer:` of a reply (stripped), or None when there is none."""
    head, sep, tail = reply.rpartition("Answer:")
    return tail.strip().splitlines()[0].strip() if sep and tail.strip() else None
