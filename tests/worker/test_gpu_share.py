"""`training.gpu_memory_fraction`: trials sharing a GPU are capped at their share (CPU part; the real OOM is
tests/faults/test_gpu_oom.py). The spec validates it; `trial_job` fills it from the GPU share Ray assigned."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from sweep.spec import SpecError, parse_spec
from trial_worker.entry import trial_job

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
name: t
model: {{name_or_path: some/model}}
data: {{path: some/data}}
budget: {{min: 10, max: 40}}
training: {{{training}}}
resources: {{gpus_per_trial: {gpus}}}
"""


@pytest.mark.parametrize("value", [0.25, 1, 0.001])
def test_a_share_of_the_gpu_is_accepted(value):
    spec = parse_spec(SPEC.format(training=f"gpu_memory_fraction: {value}", gpus=1), "t.yaml")
    assert spec.job().training.gpu_memory_fraction == value
    assert parse_spec(SPEC.format(training="", gpus=1), "t.yaml").training.gpu_memory_fraction is None


@pytest.mark.parametrize("value", ["0", "1.5", "-0.25", ".nan"])
def test_anything_but_a_share_is_rejected_naming_the_field(value):
    with pytest.raises(SpecError) as exc:
        parse_spec(SPEC.format(training=f"gpu_memory_fraction: {value}", gpus=1), "t.yaml")
    msg = str(exc.value)
    assert "training.gpu_memory_fraction" in msg and "need 0 < gpu_memory_fraction <= 1" in msg, msg


def test_a_cap_above_the_trials_gpu_share_is_rejected():
    with pytest.raises(SpecError) as exc:
        parse_spec(SPEC.format(training="gpu_memory_fraction: 0.5", gpus=0.25), "t.yaml")
    assert "training.gpu_memory_fraction" in str(exc.value) and "0.25 at most" in str(exc.value)
    parse_spec(SPEC.format(training="gpu_memory_fraction: 0.2", gpus=0.25), "t.yaml")  # within the share: fine


def test_it_is_not_a_search_parameter():
    with pytest.raises(SpecError, match="not a searchable knob"):
        parse_spec(SPEC.format(training="", gpus=1) + "search: {params: {gpu_memory_fraction: {type: choice, values: [0.5]}}}\n",
                   "t.yaml")


def test_sweep_validate_reports_it_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(SPEC.format(training="gpu_memory_fraction: 2", gpus=1)).lstrip())
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training.gpu_memory_fraction" in r.stderr and "gpu_memory_fraction = 2:" in r.stderr and f"{bad}:5" in r.stderr, r.stderr


JOB = {"model": {"name_or_path": "m"}, "data": {"path": "d"}, "budget": {"min": 2, "max": 4}}


def test_trial_job_caps_a_trial_at_its_fractional_gpu_share():
    assert trial_job({}, JOB, cpus=4, gpus=0.25).training.gpu_memory_fraction == 0.25
    assert trial_job({}, JOB, cpus=4, gpus=0.5).training.torch_threads == 4  # threads filled as before
    for whole in (None, 0, 1.0, 2.0):  # no GPU or whole GPUs: no cap
        assert trial_job({}, JOB, cpus=1, gpus=whole).training.gpu_memory_fraction is None
    written = {**JOB, "training": {"gpu_memory_fraction": 0.2}}
    assert trial_job({}, written, gpus=0.25).training.gpu_memory_fraction == 0.2  # the spec's own value wins
    with pytest.raises(ValidationError, match="gpu_memory_fraction"):
        trial_job({}, {**JOB, "training": {"gpu_memory_fraction": 0}})
