"""The command line as a user reads it: plain flags in --help, `sweep --version`."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("command, flags", [("status", ["--json"]), ("train", ["--resume", "--merge"]),
                                            ("validate", ["--no-data-check"]), ("dashboard", ["--wandb"]),
                                            ("wandb-sync", ["--dry-run"])])
def test_help_shows_boolean_flags_as_plain_flags(command, flags):
    r = _sweep(command, "--help")
    assert r.returncode == 0, r.stderr
    for flag in [*flags, "--help"]:
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(flag + " "))
        assert not re.match(rf"\s*{flag}\s+<", line), line  # no `<bool>` as if the flag took a value
    # options that take a value still show what it is
    assert re.search(r"--storage <str>|--out <path>|--merge-dtype <str>|spec <path>", r.stdout) or command == "validate"


def test_version():
    r = _sweep("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sweep {version('sweep')}", (r.stdout, r.stderr)
