"""On/off settings work as written: YAML 1.1 reads unquoted `on`/`off` as true/false, and the spec takes them."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sweep.spec import _SECTION_MODELS, SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
# sweep run {name}.yaml
name: {name}
model: {{name_or_path: some/model}}
data: {{path: some/data}}
budget: {{min: 10, max: 40, reduction_factor: 2}}
search:
  params:
    learning_rate: {{type: loguniform, low: 1.0e-5, high: 1.0e-3}}
"""


def _literal_values(annotation) -> set:
    """The values a field's type allows, through Optional/Annotated/Union."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(_literal_values(a) for a in typing.get_args(annotation))) if typing.get_args(annotation) else set()


def on_off_fields() -> list[tuple[str, ...]]:
    """Every spec field (section path + name) whose allowed values include "on" and "off"."""
    return sorted((*section, name) for section, model in _SECTION_MODELS.items()
                  for name, f in model.model_fields.items() if {"on", "off"} <= _literal_values(f.annotation))


ON_OFF = on_off_fields()


def test_the_on_off_fields_are_found():
    assert ("resources", "packing") in ON_OFF  # the walk above sees the field every user writes


def _write(tmp_path: Path, field: tuple[str, ...], word: str) -> Path:
    name = f"{'_'.join(field)}_{word.strip(chr(39))}"
    text = BASE.format(name=name)
    for depth, key in enumerate(field[:-1]):  # nested sections as block mappings, then the field, unquoted
        text += "  " * depth + f"{key}:\n"
    text += "  " * (len(field) - 1) + f"{field[-1]}: {word}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("field", ON_OFF, ids=[".".join(f) for f in ON_OFF])
def test_unquoted_on_off_loads_as_written(tmp_path, field):
    for word, want in [("on", "on"), ("off", "off"), ("'on'", "on"), ("true", "on"), ("false", "off"), ("yes", "on"), ("no", "off")]:
        node: typing.Any = load_spec(_write(tmp_path, field, word))
        for key in field:
            node = getattr(node, key)
        assert node == want, (word, node)
    with pytest.raises(SpecError, match=rf"{'.'.join(field)} = 'maybe': Input should be .*'on' or 'off'"):
        load_spec(_write(tmp_path, field, "maybe"))
    with pytest.raises(SpecError, match=rf"{'.'.join(field)} = 1: Input should be .*'on' or 'off'"):
        load_spec(_write(tmp_path, field, "1"))  # a number is no on/off word: not taken as true


def test_sweep_validate_takes_unquoted_on_off(tmp_path):
    files = [str(_write(tmp_path, f, w)) for f in ON_OFF for w in ("on", "off")]
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "validate", "--no-data-check", *files],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok") == len(files), r.stdout
