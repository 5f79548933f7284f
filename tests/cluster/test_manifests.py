"""docker/rayjob.yaml (KubeRay RayJob) and docker/compose.yaml, checked as files: neither Kubernetes nor a Docker
daemon runs here, so these tests read the manifests and hold them to the fields KubeRay and Compose read, and to
what the sweep needs from a cluster (trials on GPU workers only, one shared run folder, the study's URL and
password from a Secret or the environment, the image that pins the Ray of the cluster)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"

# The fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go, v1.4):
# a key outside them is dropped or refused by the API server, so a typo would silently change the job.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def _dockerfile(pattern: str, flags: int = 0) -> str:
    """The first group of `pattern` in docker/Dockerfile (which must have it)."""
    m = re.search(pattern, (DOCKER / "Dockerfile").read_text(), flags)
    assert m, f"docker/Dockerfile has no line matching {pattern!r}"
    return m.group(1)


def _image_workdir() -> str:
    return _dockerfile(r"^WORKDIR\s+(\S+)", re.M)


def _pinned_ray() -> str:
    return _dockerfile(r'"ray\[[^\]]*\]==([\d.]+)"')


RUN_FOLDER = f"{_image_workdir()}/sweep_runs"  # where `sweep run` writes Tune's run folder without output_dir


@pytest.fixture(scope="module")
def rayjob():
    docs = [d for d in yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"PersistentVolumeClaim", "RayJob"}, list(by_kind)
    return by_kind


def _groups(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    [container] = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    return container


def test_the_rayjob_has_the_fields_kuberay_reads_and_no_others(rayjob):
    job = rayjob["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode"}
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP and {"template", "rayStartParams"} <= set(cluster["headGroupSpec"])
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and {"groupName", "template", "rayStartParams"} <= set(group), group.keys()
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    for name, group in _groups(job):
        # rayStartParams is a map of strings in KubeRay's schema: `num-cpus: 0` (a number) is refused.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (name, group["rayStartParams"])


def test_trials_run_only_on_gpu_workers(rayjob):
    groups = dict(_groups(rayjob["RayJob"]))
    head = groups.pop("head")
    assert head["rayStartParams"].get("num-cpus") == "0" and head["rayStartParams"].get("num-gpus") == "0"
    head_limits = _ray_container(head)["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in head_limits, "the head is a CPU pod"
    for name, group in groups.items():
        res = _ray_container(group)["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, name
        assert res.get("requests", {}).get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]


def test_the_sweep_it_runs_is_the_reference_spec_on_the_secret_study(rayjob):
    from sweep.spec import load_spec

    job = rayjob["RayJob"]
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["sweep", "run"], words
    spec = load_spec(ROOT / words[2])  # a spec the image holds (it copies search_spaces/), and a valid one
    assert spec.resources.gpus_per_trial >= 1 and spec.output_dir is None  # Tune writes under RUN_FOLDER
    assert words[words.index("--address") + 1] == "auto"
    assert words[words.index("--storage") + 1] == '"$SWEEP_STORAGE"'
    env = {e["name"]: e for e in _ray_container(job["spec"]["rayClusterSpec"]["headGroupSpec"])["env"]}
    for name in ("SWEEP_STORAGE", "PGPASSWORD"):  # the driver (on the head) reads both, from the Secret
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and not ref.get("optional"), env[name]
        assert "value" not in env[name]
    text = (DOCKER / "rayjob.yaml").read_text()
    assert not re.search(r"postgresql\+psycopg://[^@\s]*:[^@\s]*@", text), "a password in a URL"


def test_every_node_mounts_one_shared_run_folder(rayjob):
    claim = rayjob["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every node writes the run folder"
    for name, group in _groups(rayjob["RayJob"]):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _ray_container(group)["volumeMounts"]}
        assert volumes[mounts[RUN_FOLDER]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name  # Ray's object store


def test_one_image_that_pins_the_clusters_ray(rayjob):
    job = rayjob["RayJob"]
    images = {_ray_container(g)["image"] for _, g in _groups(job)}
    assert len(images) == 1 and next(iter(images)).rsplit("/", 1)[-1].startswith("sweep:"), images
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _pinned_ray()
    assert "default" in _dockerfile(r'"ray\[([^\]]*)\]=='), "KubeRay submits the job through the dashboard: ray[default]"


# ------------------------------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_head_workers_database_and_dashboard(compose):
    services = compose["services"]
    assert {"db", "head", "worker", "dashboard"} <= set(services)
    head, worker = services["head"], services["worker"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / head["build"]["context"]).resolve() == ROOT
    assert head["image"] == worker["image"] == services["dashboard"]["image"]
    assert "--head" in head["command"].split() and "--block" in head["command"].split()
    assert {"--num-cpus=0", "--num-gpus=0"} <= set(head["command"].split()), "trials only on the workers"
    port = re.search(r"--port=(\d+)", head["command"]).group(1)
    assert f"--address=head:{port}" in worker["command"].split()
    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("head", "worker"):  # the same token on every Ray node
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_compose_shares_the_run_folder_and_keeps_secrets_out(compose):
    services = compose["services"]
    mounts = {name: dict(v.split(":", 1)[::-1] for v in services[name]["volumes"]) for name in ("head", "worker")}
    assert mounts["head"][RUN_FOLDER] == mounts["worker"][RUN_FOLDER] in compose["volumes"]
    assert services["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${PGPASSWORD:?")
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"postgresql\+psycopg://[^@\s]*:[^$@\s][^@\s]*@", text), "a literal password in a URL"
    for name, svc in services.items():  # nothing published beyond this machine
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), (name, p)
