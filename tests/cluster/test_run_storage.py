"""The run folder on shared storage (`output_dir`): a URI such as s3://bucket/prefix is checked at `sweep validate`
and goes to Ray Tune's `RunConfig(storage_path=...)` unchanged (Ray opens it with pyarrow.fs); a local or mounted
folder (NFS) is made absolute. No S3 endpoint runs here: these tests hold the validation and the hand-over to Tune,
not a write to a bucket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sweep.spec import load_spec, run_storage

ROOT = Path(__file__).resolve().parents[2]
DEMO = (ROOT / "search_spaces" / "demo_cpu.yaml").read_text()
MINIO = "s3://sweeps/team-a?endpoint_override=http://127.0.0.1:9000&scheme=http"  # an S3-compatible server


def _spec(tmp_path: Path, output_dir: str, name: str = "s") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(DEMO.replace("name: demo_cpu\n", f"name: demo_cpu\noutput_dir: {output_dir!r}\n", 1))
    return p


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


GOOD = [MINIO, "gs://bucket/sweeps", "hdfs://namenode:8020/sweeps", "abfss://runs@account.dfs.core.windows.net/sweeps"]
BAD = {
    "ftp://host/sweeps": "URI scheme 'ftp' is not one Ray Tune's storage reads; allowed: a local or mounted folder",
    "s3:///sweeps": "s3:// needs a bucket",
    "file:///mnt/nfs/sweeps": "not a file:// URI",
    "s3://AKIAEXAMPLE:hunter2@bucket/sweeps": "credentials do not go in the spec",
    "s3://bucket/sweeps?secret_key=hunter2&region=eu-west-1": "found secret_key",
}


def test_a_storage_uri_validates_and_reaches_tune_unchanged(tmp_path):
    from sweep.controller import run_config, run_folder

    paths = [_spec(tmp_path, uri, f"good{i}") for i, uri in enumerate(GOOD)]
    r = _cli("validate", "--no-data-check", *map(str, paths), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count(": ok") == len(GOOD), r.stderr
    for uri, path in zip(GOOD, paths):
        spec = load_spec(path)
        assert run_config(spec, "demo_cpu", run_storage(spec), []).storage_path == uri
    # The study's folder goes in the URI's path; pyarrow's options stay in its query.
    assert run_folder(MINIO, "demo_cpu") == "s3://sweeps/team-a/demo_cpu?endpoint_override=http://127.0.0.1:9000&scheme=http"


def test_a_mounted_folder_is_a_local_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_spec(tmp_path, "shared/sweeps"))  # e.g. an NFS mount, relative to where `sweep run` runs
    assert run_storage(spec) == str(tmp_path / "shared" / "sweeps")
    assert run_storage(load_spec(_spec(tmp_path, "/mnt/nfs/sweeps"))) == "/mnt/nfs/sweeps"


def test_validate_refuses_a_bad_storage_uri_naming_file_field_value_and_what_is_allowed(tmp_path):
    paths = {value: _spec(tmp_path, value, f"bad{i}") for i, value in enumerate(BAD)}
    r = _cli("validate", "--no-data-check", *map(str, paths.values()), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hunter2" not in r.stderr  # a credential is refused, never echoed
    lines = [ln.strip() for ln in r.stderr.splitlines() if "output_dir = " in ln]
    assert len(lines) == len(BAD), r.stderr
    for (value, words), path, line in zip(BAD.items(), paths.values(), lines):
        assert line.startswith(f"{path}:") and words in line, line
        assert f"output_dir = '{value.split('://')[0]}://" in line  # the value itself is shown


def test_resume_on_a_storage_uri_is_refused_with_what_to_do(tmp_path):
    # A resume repairs Tune's saved files in the run folder: sweep does that on a local or mounted folder only.
    r = _cli("resume", str(_spec(tmp_path, "s3://bucket/sweeps")), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "output_dir = 's3://bucket/sweeps' is not a local or mounted folder" in r.stderr
    assert "mounted on every node" in r.stderr
