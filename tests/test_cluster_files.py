"""cluster/: each file is valid YAML with the parts the README promises, and the commands in it
name config keys and groups that exist."""

from __future__ import annotations

import shlex

import pytest
import yaml
from driver import REPO

from pipelines.config import LensConf, check_overrides

CLUSTER = REPO / "cluster"


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _lens_overrides(command: str) -> list[str]:
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "pipelines.lens"], command
    return args[3:]


def test_runtime_env_is_a_ray_runtime_env():
    env = _load("runtime_env.yaml")
    assert set(env) <= {"env_vars", "excludes", "pip", "working_dir", "py_modules"}
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    assert ".git/" in env["excludes"]


def test_launcher_config_has_a_gpu_worker_type_that_installs_the_project():
    config = _load("ray-cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and types[gpu[0]]["max_workers"] >= 1
    assert any("pip install" in c for c in config["setup_commands"])


def test_rayjob_manifest_runs_the_driver_and_tears_down():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)  # the embedded runtime env parses too
    overrides = _lens_overrides(spec["entrypoint"])
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("storage.root=")]
    assert roots and roots[0].startswith("s3://")  # a pod's disk goes with the pod
    # exits on an unknown key or group option (the bucket itself is not reachable from here)
    check_overrides(LensConf, [o for o in overrides if not o.startswith("storage.root=")])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "distlens-s3"}} in head["envFrom"]  # credentials from a Secret, not the config
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("name", ["runtime_env.yaml", "ray-cluster.yaml", "rayjob.yaml"])
def test_cluster_readme_explains_each_file(name):
    assert f"`{name}`" in (CLUSTER / "README.md").read_text()
