"""The pack process a controller starts before Ray (`trial_worker.pack.early`) never outlives what owns it and
is adopted only by the actor it was started for. (A whole sweep that adopts it, and survives either process
killed, is tests/pack/test_sweep_packed.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from trial_worker.pack.early import adopt


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    from trial_worker.config import JobConfig
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    root = tmp_path_factory.mktemp("early")
    model, data = write_tiny_llama(root / "tiny"), write_task_data(root / "tasks", n_train=40, n_val=8)
    return JobConfig.model_validate({
        "model": {"name_or_path": str(model), "quantization": {"bnb_4bit_compute_dtype": "float32"},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"path": str(data), "format": "text", "max_seq_length": 64},
        "training": {"bf16": False, "use_cpu": True, "torch_threads": 1},
        "budget": {"min": 2, "max": 4},
    }).model_dump(mode="json")


RESOURCES = {"packing": "on", "gpus_per_trial": 0, "cpus_per_trial": 1}
PARENT = """
import json, sys, time
from trial_worker.pack.early import start
early = start(json.loads(sys.argv[1]), resources=json.loads(sys.argv[2]), search_params=None, pack_name="p-0")
print(json.dumps(early.ticket), flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def _started(job: dict, tmp_path):
    """A controller stand-in that starts an early pack and waits: yields (its process, the ticket); both ended after."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(job), json.dumps(RESOURCES)],
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    ticket = {"pid": -1}
    try:
        line = parent.stdout.readline()
        assert line, "the stand-in controller started no early pack"
        ticket = json.loads(line)
        yield parent, ticket
    finally:
        parent.kill()
        parent.wait()
        if ticket["pid"] > 0:
            try:
                os.kill(ticket["pid"], signal.SIGKILL)
            except OSError:
                pass


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_the_early_pack_ends_when_its_controller_is_killed_before_adopting_it(job, tmp_path):
    with _started(job, tmp_path) as (parent, ticket):
        assert psutil.pid_exists(ticket["pid"])
        assert not _gone(ticket["pid"], within=1.0)  # it lives while its controller does
        parent.kill()
        parent.wait()
        assert _gone(ticket["pid"]), "the early pack outlived its killed controller"


def test_only_the_actor_of_its_gpu_adopts_it_and_only_once(job, tmp_path):
    with _started(job, tmp_path) as (_, ticket):
        # an actor Ray gave another GPU than the one the pack was started on ends it and builds its own
        assert adopt(dict(ticket, device="3"), gpu_ids=[1]) is None
        assert _gone(ticket["pid"])

    with _started(job, tmp_path) as (_, ticket):
        relay = adopt(ticket, gpu_ids=[])
        assert relay is not None
        info = relay.call("info")
        assert info["pid"] == ticket["pid"] and info["name"] == "p-0" and info["trials"] == 0
        with pytest.raises(ValueError, match="not a pack method"):
            relay.call("_apply_leave", "x")
        # A second actor (a restart of the first, which is gone) does not share it: it is ended.
        assert adopt(ticket, gpu_ids=[]) is None
        assert _gone(ticket["pid"])


def test_the_early_pack_ends_with_the_actor_that_adopted_it(job, tmp_path):
    with _started(job, tmp_path) as (parent, ticket):
        relay = adopt(ticket, gpu_ids=[])
        assert relay is not None and relay.call("info")["pid"] == ticket["pid"]
        relay.lease.close()  # as when the actor's process ends
        assert _gone(ticket["pid"]), "the early pack outlived the actor that adopted it"
        assert parent.poll() is None
