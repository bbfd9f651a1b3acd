"""Shared fixtures: tiny checkpoints of real architectures, one Ray cluster for the test run, and
the real SmolLM2 checkpoint (fetched and converted once, then cached)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, before ray is imported
# One torch thread per test process, inherited by every driver, zygote and Ray worker it starts:
# four test processes share two cores, and OpenMP threads that spin-wait for a core another
# process holds made CPU-bound tests up to ten times slower (measured: three processes of small
# matmuls, 0.6 s alone, 5.5-7.0 s each side by side with two threads, 0.6 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

import actors.libraries  # noqa: E402, F401  torch & co. imported as a stage process does (collector paused, then frozen)
from tiny_models import FAMILIES, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


RAY_CPUS = 32  # the run's cluster's logical CPUs: 4 stages plus a coordinator for each of four test processes


def suite_ray(tmp_path_factory) -> str:
    """The GCS address of this test run's one Ray cluster, shared by its test processes: a
    `ray start` head on loopback (a session of its own), started by the first process that asks
    and stopped by the run's controlling process when the run ends (`pytest_unconfigure`). One
    cluster for the run, not one per test process: each costs seconds of CPU to start and its
    daemons (GCS, raylet, agents, log monitor) about 2 CPU-seconds a minute while it lives."""
    import json
    import subprocess

    from filelock import FileLock

    from actors.distributed import free_port

    shared = _run_folder(tmp_path_factory)
    record = shared / "suite_ray.json"
    with FileLock(str(shared / "suite_ray.lock")):
        if not record.exists():
            tmp = tempfile.mkdtemp(prefix="dlsuite-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
            # no token: its clients are this run's own processes (`ray start` would otherwise ask for one)
            env = dict(os.environ, RAY_TMPDIR=tmp, RAY_prestart_worker_first_driver="0", RAY_AUTH_MODE="disabled")
            env.pop("RAY_ADDRESS", None)
            port = free_port()
            head = ["ray", "start", "--head", "--port", str(port), "--num-cpus", str(RAY_CPUS),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_port())]  # fmt: skip
            started = subprocess.Popen(head, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)  # fmt: skip
            _, err = started.communicate(timeout=180)
            assert started.returncode == 0, err[-2000:]
            record.write_text(json.dumps({"address": f"127.0.0.1:{port}", "session": started.pid, "tmp": tmp}))
    return json.loads(record.read_text())["address"]


def pytest_unconfigure(config):
    """The run's controlling process (or the only one) stops the shared cluster, if one started."""
    import json
    import shutil

    if os.environ.get("PYTEST_XDIST_WORKER") or not hasattr(config, "_tmp_path_factory"):
        return
    record = config._tmp_path_factory.getbasetemp() / "suite_ray.json"
    if record.exists():
        from driver import stop_session

        started = json.loads(record.read_text())
        stop_session(started["session"])
        shutil.rmtree(started["tmp"], ignore_errors=True)
        record.unlink()


def _started_a_cluster() -> bool:
    """Whether this process has started a local Ray cluster of its own (an in-process bench
    workload does, as its fresh process would). Ray 2.60 then cannot create actors on a cluster
    the process joins later: they are cancelled before they start (reproduced with Ray alone:
    `ray.init(address="local")`, shutdown, `ray.init(address=<a running head>)`, any actor). Such
    a process starts a cluster of its own again instead. A session's folder ends with the pid of
    the process that started it."""
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    return any(ray_tmp.glob(f"session_*_{os.getpid()}"))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """This test process joined to the run's shared cluster (`suite_ray`); a module that
    connects this process to another cluster (test_multinode.py) disconnects it first, and the
    next module joins again. Each module's placement groups (its stage actors') are its own to
    release (its pools' fixtures): checked when the module ends."""
    import ray

    from pipelines.session import worker_runtime_env

    if not ray.is_initialized():
        # its workers import this checkout as a driver's own cluster's do (PYTHONPATH unless installed from here)
        if _started_a_cluster():
            ray.init(address="local", num_cpus=8, include_dashboard=False, runtime_env=worker_runtime_env(),
                     _system_config={"prestart_worker_first_driver": False}, log_to_driver=False)  # fmt: skip
        else:
            ray.init(address=suite_ray(tmp_path_factory), runtime_env=worker_runtime_env(), log_to_driver=False)
    yield ray
    import time

    job = ray.get_runtime_context().get_job_id()  # a placement group's id ends with its job's
    for _ in range(100):  # removed groups go within moments
        held = [g for g in ray.util.placement_group_table().values()
                if g["placement_group_id"].endswith(job) and g["state"] != "REMOVED"]  # fmt: skip
        if not held:
            return
        time.sleep(0.2)
    raise AssertionError(f"a module left placement groups held (the next module shares this cluster): {held}")


@pytest.fixture
def joined_ray(ray_cluster) -> dict:
    """Variables for `run_driver(env=...)` that make a Ray driver join this test process's
    cluster ($RAY_ADDRESS) instead of starting a private one of its own (~11 CPU-seconds of Ray's
    processes), where the cluster it runs on is not what the test checks."""
    return {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def pytest_sessionfinish(session):
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def smollm2():
    from actors.checkpoint import resolve_checkpoint

    return resolve_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama that shares SmolLM2's tokenizer and vocabulary, for fast
    end-to-end runs of the drivers."""

    def make(folder: Path) -> None:
        path = folder / "llama"
        save_tiny("llama", path, vocab_size=49152, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
        smollm2.tokenizer().save_pretrained(path)

    # one path for every test process: runs made in one process compare with another's
    return made_once(tmp_path_factory, "tiny_tok", make) / "llama"


def _run_folder(tmp_path_factory) -> Path:
    """The folder every test process of this run shares (the controlling process's base)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder every test process of this run shares, filled by `make(folder)` in whichever
    process asks first; the others wait for it (a file lock) and read what it wrote."""
    from filelock import FileLock

    shared = _run_folder(tmp_path_factory)
    folder, made = shared / name, shared / f"{name}.made"
    with FileLock(str(shared / f"{name}.lock")):
        if not made.exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def main_job(tmp_path_factory, smollm2):
    """The README's main job, word for word (`python -m pipelines.lens`, no arguments), run once
    per test run, whichever test process asks first (the others wait for it and read its
    output): (completed process, run folder). Its users only read the run folder."""
    import json
    import subprocess

    from driver import run_driver

    def make(cwd: Path) -> None:
        done = run_driver("pipelines.lens", cwd=cwd)
        record = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        (cwd / "newcomer.json").write_text(json.dumps(record))

    cwd = made_once(tmp_path_factory, "newcomer", make)
    ran = json.loads((cwd / "newcomer.json").read_text())
    result = subprocess.CompletedProcess(
        ["python", "-m", "pipelines.lens"], ran["returncode"], ran["stdout"], ran["stderr"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = (cwd / "outputs").iterdir()
    return result, run_dir


# The longest files first (measured: each takes minutes; order from a run's durations, 2026-12-06),
# so that no long file starts last and runs alone at the end.
LONGEST_FIRST = ("test_fault_tolerance.py", "test_multinode.py", "test_tensor_parallel.py", "test_object_storage.py",
                 "test_steer_driver.py", "test_job_submit.py", "test_continuous_batching.py", "test_viewer.py",
                 "test_default_model.py", "test_tuned_lens.py", "test_steering_pipeline.py", "test_store_scale.py",
                 "test_bench.py")  # fmt: skip
# Files whose tests share what an expensive module fixture builds (an S3 server and its runs,
# reference runs, a browser and its stores, a pool of stage actors) stay in one test process
# (pyproject's `--dist loadgroup`). Every other test goes to whichever process is free, so a
# file of many independent tests spreads over all of them (each process that runs one of its
# Ray tests joins the run's one cluster, `suite_ray`).
KEPT_TOGETHER = {"test_continuous_batching.py", "test_dataset_formats.py", "test_model_families.py", "test_object_storage.py",
                 "test_ray_executor.py", "test_staged_equals_unsliced.py", "test_tensor_parallel.py", "test_viewer.py"}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    for item in items:
        if item.path.name in KEPT_TOGETHER:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
