"""`sweep dashboard`: optuna-dashboard served on localhost; the W&B workspace built and serialised offline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from views_helpers import ROOT, build_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout=2.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def test_dashboard_serves_the_study_on_localhost(sqlite_url, tmp_path):
    build_study(sqlite_url, name="dash", n=5)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "dashboard", "dash", "--storage", sqlite_url,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ), start_new_session=True)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/studies")
                studies = json.loads(body)["study_summaries"]
                break
            except OSError:
                time.sleep(0.3)
        assert studies is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 60 s"
        assert [s["study_name"] for s in studies] == ["dash"]
        sid = studies[0]["study_id"]
        status, page = _get(f"http://127.0.0.1:{port}/dashboard/studies/{sid}")
        assert status == 200 and "<html" in page.lower()
        status, body = _get(f"http://127.0.0.1:{port}/api/studies/{sid}")
        assert len(json.loads(body)["trials"]) == 5
        # Bound to localhost only.
        with socket.socket() as s:
            s.settimeout(1)
            ip = socket.gethostbyname(socket.gethostname())
            if not ip.startswith("127."):
                assert s.connect_ex((ip, port)) != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    line = proc.stdout.read().splitlines()[0]
    assert line.startswith(f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/studies/")


def test_wandb_workspace_is_built_and_serialised_without_publishing(sqlite_url, tmp_path):
    build_study(sqlite_url, name="wsp", n=5)
    out = tmp_path / "workspace.json"
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "dashboard", "wsp", "--storage", sqlite_url, "--wandb",
                        "--entity", "my-team", "--save-json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "not published" in r.stdout
    ws = json.loads(out.read_text())
    assert ws["entity"] == "my-team" and ws["project"] == "sweep" and ws["displayName"] == "sweep: wsp"
    all_panels = [p for s in ws["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    panels = {p["viewType"]: p["config"] for p in all_panels}
    lines = [p["config"] for p in all_panels if p["viewType"] == "Run History Line Plot"]
    pc = [c["accessor"] for c in panels["Parallel Coordinates Plot"]["columns"]]
    # The demo spec's searched params, then the loss they lead to.
    assert pc == ["config:learning_rate.value", "config:lr_scheduler_type.value",
                  "config:per_device_train_batch_size.value", "config:lora_r.value", "summary:val_loss"]
    curves = [c for c in lines if c["metrics"] == ["val_loss"]]
    assert len(curves) == 1 and curves[0]["xAxis"] == "_step"  # the budget step: runs log at step=<budget>
    scatter = panels["Scatter Plot"]
    assert (scatter["xAxis"], scatter["yAxis"]) == ("summary:samples_per_s", "summary:val_loss")
    text = json.dumps(ws)
    assert "summary:state" in text and "summary:rung_reached" in text  # the runs table columns
    assert '"wsp"' in text  # filtered to the study's group


def test_wandb_sync_lists_offline_runs_and_refuses_a_study_without_tracking(sqlite_url, tmp_path):
    st = build_study(sqlite_url, name="nosync", n=2)
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "wandb-sync", "nosync", "--storage", sqlite_url],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "has no W&B runs" in r.stderr
    # Two offline runs written the way the tracking callback writes them.
    import wandb

    from sweep.record.tracking import run_id, wandb_root

    root = wandb_root(tmp_path / "runs", "nosync")
    for n in range(2):
        run = wandb.init(project="p", group="nosync", id=run_id("nosync", n), dir=str(root), mode="offline",
                         reinit="create_new", settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        run.log({"val_loss": 1.0}, step=10)
        run.finish()
    st.set_user_attr("wandb_dir", str(root))
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "wandb-sync", "nosync", "--storage", sqlite_url, "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 offline runs" in r.stdout and "nosync-trial-0" in r.stdout and "nosync-trial-1" in r.stdout
