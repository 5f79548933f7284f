"""The package boundary of DESIGN.md: `sweep` reaches `trial_worker` only through its entry
point (and the shared, torch-free `trial_worker.config`); `trial_worker` never imports `sweep`."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(folder: str) -> list[tuple[str, str]]:
    out = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.append((f.name, node.module))
            elif isinstance(node, ast.Import):
                out += [(f.name, a.name) for a in node.names]
    return out


def test_sweep_uses_only_the_worker_entry_point_and_shared_config():
    bad = [(f, m) for f, m in _imports("sweep") + _imports("dashboards")
           if m.startswith("trial_worker") and m not in ("trial_worker.entry", "trial_worker.config")]
    assert not bad, bad


def test_dashboards_never_import_sweep():
    # `sweep dashboard` opens the study and hands the dashboards what they show: no edge back into `sweep`
    bad = [(f, m) for f, m in _imports("dashboards") if m == "sweep" or m.startswith("sweep.")]
    assert not bad, bad


def test_trial_worker_never_imports_sweep():
    bad = [(f, m) for f, m in _imports("trial_worker") if m == "sweep" or m.startswith("sweep.")]
    assert not bad, bad


def test_importing_the_entry_point_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, trial_worker.entry; print(','.join(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
