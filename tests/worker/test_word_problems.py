"""The word-problem task (trial_worker.inputs.word_problems): deterministic, held out, and checkable by exact match."""

from __future__ import annotations

import calendar
import datetime
import json
import re

from trial_worker.production.compare import exact_match
from trial_worker.inputs.word_problems import KINDS, WEEKDAYS, final_answer, split_word_problems, write_word_problems


def _solve(question: str) -> str:
    """The answer, worked out from the question alone (not by the generator's code)."""
    if m := re.search(r"buys (\d+) \w+ at \$(\d+) each and (\d+) \w+ at \$(\d+) each\.", question):
        a, p, b, q = map(int, m.groups())
        bill = re.search(r"with a \$(\d+) note", question)
        return str(int(bill.group(1)) - (a * p + b * q)) if bill else str(a * p + b * q)
    if m := re.search(r"lasts (\d+) h (\d+) min", question):
        return str(int(m.group(1)) * 60 + int(m.group(2)))
    if m := re.search(r"are (\d+) minutes", question):
        h, mins = divmod(int(m.group(1)), 60)
        return f"{h} h {mins} min"
    if m := re.search(r"(\d+) days after (\w+) (\d+), (\d+)", question):
        k, month, d, y = int(m.group(1)), list(calendar.month_name).index(m.group(2)), int(m.group(3)), int(m.group(4))
        return (datetime.date(y, month, d) + datetime.timedelta(days=k)).isoformat()
    if m := re.search(r"Today is (\w+)\. .* in (\d+) days", question):
        return WEEKDAYS[(WEEKDAYS.index(m.group(1)) + int(m.group(2))) % 7]
    raise AssertionError(f"no kind matches {question!r}")


def test_generation_is_deterministic_and_seeded():
    assert split_word_problems(300, 60, seed=0) == split_word_problems(300, 60, seed=0)
    assert split_word_problems(300, 60, seed=0)[0] != split_word_problems(300, 60, seed=1)[0]


def test_the_validation_split_is_held_out(tmp_path):
    write_word_problems(tmp_path, n_train=2000, n_val=200, seed=0)
    rows = {name: [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")] for name in ("train", "validation")}
    questions = {name: [r["messages"][1]["content"] for r in rs] for name, rs in rows.items()}
    assert (len(rows["train"]), len(rows["validation"])) == (2000, 200)
    assert len(set(questions["validation"])) == 200 and len(set(questions["train"])) == 2000
    assert not set(questions["train"]) & set(questions["validation"])


def test_every_answer_is_right_and_scored_by_exact_match():
    train, val = split_word_problems(600, 120, seed=0)
    kinds_seen = set()
    for row in train + val:
        system, user, assistant = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert final_answer(assistant["content"]) == _solve(user["content"]), user["content"]
        # every line before the answer is a true statement about numbers, one calculation each
        for line in assistant["content"].splitlines()[:-1]:
            if " = " in line and "days" not in line:
                lhs, rhs = line.split(" = ")
                assert eval(lhs) == eval(rhs), line  # noqa: S307 - digits and + - * only, generated here
        kinds_seen.add(next(kind for phrase, kind in KIND_OF.items() if phrase in user["content"]))
        assert exact_match(assistant["content"], assistant["content"]) == 1.0
        wrong = re.sub(r"\d(?=\D*$)", lambda m: str((int(m.group()) + 1) % 10), assistant["content"])
        assert exact_match(wrong, assistant["content"]) == 0.0
    assert kinds_seen == set(KINDS)
    assert final_answer("To solve this we add.") is None


KIND_OF = {"in total": "total", "change": "change", "How many minutes": "to_minutes",
           "hours and minutes": "from_minutes", "days after": "days_after", "day of the week": "weekday"}
