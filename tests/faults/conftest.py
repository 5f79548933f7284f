"""The fault battery: every test injects one fault for real and records a row of the outcome table.

Each test calls `fault_row(...)`. When the whole suite has run and SWEEP_FAULT_TABLE=1 is set, the
table in this folder's README.md (between the TABLE markers) is rewritten from those rows, with
pass/fail and times: a tracked file changes only when someone asks for it
(`SWEEP_FAULT_TABLE=1 pytest tests/faults`), never as a side effect of a test run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- TABLE BEGIN (written by tests/faults/conftest.py) -->", "<!-- TABLE END -->"

_rows: dict[str, dict] = {}
_outcomes: dict[str, str] = {}
_durations: dict[str, float] = {}
_collected: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.faults)
            _collected.add(item.nodeid)


@pytest.fixture
def fault_row(request):
    """fault_row(fault=, injected=, lost=, seconds=None): this test's row of the outcome table."""
    t0 = time.perf_counter()

    def record(*, fault: str, injected: str, lost: str, seconds: float | None = None) -> None:
        _rows[request.node.nodeid] = {"fault": fault, "injected": injected, "lost": lost,
                                      "seconds": seconds if seconds is not None else time.perf_counter() - t0}

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if item.nodeid not in _collected:
        return
    _durations[item.nodeid] = _durations.get(item.nodeid, 0.0) + rep.duration
    if rep.failed or (rep.when == "call") or (rep.skipped and item.nodeid not in _outcomes):
        if _outcomes.get(item.nodeid) != "failed":
            _outcomes[item.nodeid] = rep.outcome


def pytest_sessionfinish(session, exitstatus):
    files = {nodeid.split("::", 1)[0].rsplit("/", 1)[-1] for nodeid in _collected}
    if (os.environ.get("SWEEP_FAULT_TABLE") != "1" or not _collected or not _collected <= set(_outcomes) or not README.exists()
            or files != {p.name for p in HERE.glob("test_*.py")}
            or session.config.getoption("keyword", "") or session.config.getoption("markexpr", "") not in ("", "faults")):
        return  # a partial run (-k, one file) leaves the committed table alone
    lines = ["| fault | injected how | time (s) | survived | results lost | test |", "|---|---|---|---|---|---|"]
    for nodeid in sorted(_collected, key=lambda n: (list(_rows).index(n) if n in _rows else 1e9, n)):
        row = _rows.get(nodeid)
        if row is None and _outcomes[nodeid] == "failed":  # failed before recording its row: still shown
            row = {"fault": "(failed before recording its row)", "injected": "", "lost": "see the test", "seconds": _durations[nodeid]}
        if row is None:
            continue
        ok = {"passed": "yes", "failed": "**NO**", "skipped": "skipped"}[_outcomes[nodeid]]
        secs = max(row["seconds"], 0.0)
        lines.append(f"| {row['fault']} | {row['injected']} | {secs:.1f} | {ok} | {row['lost']} | `{nodeid.split('::', 1)[1]}` |")
    total = sum(_durations.values())
    lines.append("")
    skipped = sum(1 for o in _outcomes.values() if o == "skipped")
    lines.append(f"{sum(1 for o in _outcomes.values() if o == 'passed')} of {len(_collected)} fault tests passed"
                 + (f" ({skipped} skipped: the `gpu`-marked ones need CUDA)" if skipped else "") + "; "
                 f"suite time {total:.0f} s (2 shared CPU cores), {time.strftime('%Y-%m-%d')}.")
    text = README.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny Llama and task data, written once for every sweep of the suite."""
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    root = tmp_path_factory.mktemp("fault-assets")
    return {"model": str(write_tiny_llama(root / "tiny-llama")),
            "data": str(write_task_data(root / "tasks", n_train=200, n_val=40))}
