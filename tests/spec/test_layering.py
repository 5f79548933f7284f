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


def _module_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports, at its top or inside a function} over sweep, trial_worker and
    dashboards; `from package import name` counts as an edge to `package.name` when that is a module."""
    files = {}
    for pkg in ("sweep", "trial_worker", "dashboards"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != m:
                    graph[m].add(n)
    return graph


def test_no_import_cycles():
    # every module can be read knowing only what it imports: no two modules reach each other, even lazily
    graph = _module_graph()
    assert {"trial_worker.entry", "trial_worker.attempt", "trial_worker.pack.tune"} <= set(graph)
    assert "trial_worker.pack.tune" in graph["trial_worker.entry"]  # the graph sees the edges it should

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for n in graph[todo.pop()]:
                if n == b:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles
