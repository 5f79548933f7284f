"""Exposure (#6 item 10): every TCP port our processes listen on is on 127.0.0.1.

`sweep run` (a real local Ray: GCS, raylet, workers, agents) and `sweep dashboard` (optuna-dashboard)
run for real; while they run, the listening sockets of every process of ours are read from
/proc/net/tcp{,6} and matched to PIDs through /proc/PID/fd. "Ours": the CLI's process tree, plus
any process whose environment carries this test's SWEEP_HOME (Ray processes that left the tree).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sweep_helpers import processes_with_env, small_spec, sweep_env


def _tree(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += kids.get(p, [])
    return out


def _ours(root: int, marker: bytes) -> set[int]:
    return _tree(root) | set(processes_with_env(marker))


def _address(hexip: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hexip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return ip.ipv4_mapped or ip


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, program) of every listening TCP socket held by `pids`."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            pass
    out = set()
    for fam in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{fam}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexip, hexport = f[1].split(":")
            try:
                prog = Path(f"/proc/{inodes[f[9]]}/cmdline").read_bytes().split(b"\0")[0].decode()[-40:]
            except OSError:
                prog = "?"
            out.add((str(_address(hexip)), int(hexport, 16), prog.rsplit("/", 1)[-1]))
    return out


def _watch(proc: subprocess.Popen, marker: bytes, until, timeout: float) -> set:
    seen, deadline = set(), time.time() + timeout
    while time.time() < deadline and not until(seen):
        seen |= listening(_ours(proc.pid, marker))
        time.sleep(0.3)
    return seen


def test_sweep_run_and_dashboard_listen_on_localhost_only(tmp_path, assets, fault_row):
    spec = small_spec(tmp_path, assets, name="exposed", rungs=(4, 8),
                      params={"learning_rate": {"type": "choice", "values": [0.02, 0.005]}})
    env = sweep_env(tmp_path)
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    t0 = time.perf_counter()
    run = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = _watch(run, marker, until=lambda s: run.poll() is not None, timeout=300)
        out = run.communicate(timeout=60)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    programs = {p for _, _, p in seen if p}
    assert any("gcs_server" in p for p in programs) and any("raylet" in p for p in programs), seen
    exposed = {s for s in seen if not ipaddress.ip_address(s[0]).is_loopback}
    assert not exposed, f"listening beyond 127.0.0.1: {sorted(exposed)}"
    n_run = len(seen)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dash = subprocess.Popen([sys.executable, "-m", "sweep.cli", "dashboard", str(spec), "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen_dash = _watch(dash, marker, until=lambda s: any(p == port for _, p, _ in s) or dash.poll() is not None,
                           timeout=60)
        time.sleep(1.0)
        seen_dash |= listening(_ours(dash.pid, marker))
    finally:
        dash.terminate()
        try:
            dash.wait(10)
        except subprocess.TimeoutExpired:
            dash.kill()
    assert any(p == port for _, p, _ in seen_dash), (seen_dash, dash.stdout.read()[-2000:])
    exposed = {s for s in seen_dash if not ipaddress.ip_address(s[0]).is_loopback}
    assert not exposed, f"dashboard listening beyond 127.0.0.1: {sorted(exposed)}"
    fault_row(fault="exposure: listening ports",
              injected="`sweep run` (local Ray) then `sweep dashboard`; /proc/net/tcp{,6} sampled every 0.3 s for the sockets "
                       "of their process trees (+ processes with the run's SWEEP_HOME)",
              lost=f"{n_run} listening sockets during the run ({', '.join(sorted(programs))}) + {len(seen_dash)} of the dashboard: "
                   "all on 127.0.0.1",
              seconds=time.perf_counter() - t0)


class _Evil:
    """A pickle that, once loaded, writes a file: what a planted tuner.pkl could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_resume_never_unpickles_a_run_folder_others_could_have_written(tmp_path, assets, fault_row):
    import json
    import pickle

    import optuna

    from sweep_helpers import sweep_cli

    t0 = time.perf_counter()
    spec = small_spec(tmp_path, assets, name="planted", rungs=(2, 4), params={"learning_rate": {"type": "choice", "values": [0.01]}})
    env = sweep_env(tmp_path)
    r = sweep_cli("run", spec, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "planted"
    def recorded() -> tuple:
        """What the study holds (the controller lease table beside it is bookkeeping a refused resume may touch)."""
        st = optuna.load_study(study_name="planted", storage=f"sqlite:///{tmp_path / 'planted.db'}")
        return (st.user_attrs, [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs,
                                 t.system_attrs) for t in st.trials])

    study_db = recorded()
    pwned = tmp_path / "PWNED"
    cases = []

    # 1. tuner.pkl replaced by a pickle that runs code, and left writable by every user.
    tuner = run_dir / "tuner.pkl"
    original = tuner.read_bytes()
    tuner.write_bytes(pickle.dumps(_Evil(pwned)))
    tuner.chmod(0o666)
    cases.append(("world-writable planted tuner.pkl", f"{tuner} is writable by every user"))
    r1 = sweep_cli("resume", spec, cwd=tmp_path, env=env, probe_imports=True)
    tuner.write_bytes(original)
    tuner.chmod(0o644)
    # 2. the searcher's pickle owned by another user.
    searcher = sorted(run_dir.glob("searcher-state-*.pkl"))[-1]
    os.chown(searcher, 65534, 65534)
    cases.append(("searcher state owned by another user", f"{searcher} belongs to user id 65534"))
    r2 = sweep_cli("resume", spec, cwd=tmp_path, env=env, probe_imports=True)
    os.chown(searcher, os.getuid(), os.getgid())
    # 3. Tune's experiment state cut short (the controller died, or the disk filled, while Tune copied it here)
    # and Ray's own copy of it (in the Ray session folder) gone too.
    from sweep.controller import _ray_temp_dir

    state = sorted(run_dir.glob("experiment_state-*.json"))[-1]
    text = state.read_text()
    json.loads(text)
    state.write_text(text[: len(text) // 2])
    ours = str(run_dir.parent).encode().hex()
    staged = {d.resolve() for d in _ray_temp_dir().glob("session_*/artifacts/*/planted/driver_artifacts")
              if any(ours in p.read_text() for p in d.glob("experiment_state-*.json"))}  # session_latest: a link
    assert staged, "Ray kept no copy of the run's experiment state in its session folder"
    for d in staged:
        d.rename(d.with_name("moved-away"))
    cases.append(("experiment state cut short, Ray's copy gone", f"{state.name} is cut short"))
    r3 = sweep_cli("resume", spec, cwd=tmp_path, env=env, probe_imports=True)
    for d in staged:
        d.with_name("moved-away").rename(d)

    for (what, says), r in zip(cases, (r1, r2, r3)):
        assert r.returncode == 2, (what, r.stdout[-2000:], r.stderr[-2000:])
        assert says in r.stderr and "Traceback" not in r.stderr, (what, r.stderr)
        assert "HEAVY_IMPORTED=\n" in r.stderr, (what, r.stderr)  # Ray never started: nothing was unpickled
    assert not pwned.exists()
    assert recorded() == study_db  # the study untouched

    # 4. The same cut-short state with Ray's copy there: put back from it, and the sweep resumes.
    r4 = sweep_cli("resume", spec, cwd=tmp_path, env=env)
    assert r4.returncode == 0 and "Traceback" not in r4.stderr, r4.stdout[-2000:] + r4.stderr[-3000:]
    said = " ".join(r4.stderr.split())
    assert f"sweep resume: Tune's {state.name} in {run_dir} was cut short; put back from Ray's own copy" in said, r4.stderr
    assert json.loads(state.read_text())["trial_data"], "the experiment state was not put back whole"
    study = optuna.load_study(study_name="planted", storage=f"sqlite:///{tmp_path / 'planted.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    fault_row(fault="restoring from a run folder the user did not write",
              injected="`sweep resume` after: tuner.pkl replaced by a code-running pickle, mode 666; the searcher's "
                       "pickle chown'd to another user; Tune's experiment state cut in half and Ray's session copy "
                       "moved away; then the same with Ray's copy back",
              lost=f"{len(cases)}/{len(cases)} refused (exit 2, path and cause named, no traceback) before Ray or any "
                   "pickle was loaded; the planted pickle never ran; study byte-identical; with Ray's copy there, the "
                   "state was put back from it and the sweep resumed (1 trial, COMPLETE)",
              seconds=time.perf_counter() - t0)
