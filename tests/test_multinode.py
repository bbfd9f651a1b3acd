"""Runs over several Ray nodes on this machine (`ray.cluster_utils.Cluster`: a head and worker
raylets on loopback, each with its own CPUs): stages placed on distinct nodes by
`cluster.placement`, and a whole node removed mid-run from the test side (a Coordinator subclass
that, at a chosen step, kills the raylet of the node holding stage 1). With a spare node the
lost stage restarts there and the store equals an uninterrupted run's; with none the run stops
in one line and `resume` completes it once a node is added. Every store is also checked
against the unsliced Hugging Face model (KL to the final layer at every lens position)."""

from __future__ import annotations

import pytest

from actors.coordinator import Coordinator
from actors.sampling import SamplingSpec
from actors.store import LensStore
from reference import assert_kl_to_final_matches_hf, assert_stores_equal, run_lens, run_spec
from tiny_models import load_reference

# rows of different lengths, three micro-batches of two
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43], [50, 51, 52]]
COMMON = dict(num_stages=2, micro_batch_size=2, micro_batches_in_flight=2, max_new_tokens=6)
# a dead raylet is noticed in ~3 s instead of Ray's default ~15 s
FAST_HEALTH_CHECK = {
    "prestart_worker_first_driver": False,  # no idle task workers (as pipelines/session.py)
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs (nothing of a run lands there) and two worker nodes of 2 CPUs;
    this process is the driver. Add nodes with `cluster.add_node(num_cpus=...)`. One cluster
    serves the module's three node tests, in file order (they share one test process: the
    `xdist_group` mark): strict spread on the two workers; a third worker is added and one
    removed (two left); one of those two removed (one left, no spare), then one added."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.session import worker_runtime_env

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECK})
    for _ in range(2):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.shutdown()  # this process's own cluster, if an earlier module left it up (conftest's ray_cluster)
    ray.init(address=c.address, runtime_env=worker_runtime_env(), log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoints, tmp_path_factory):
    """The same run on one node: every stage in this process."""
    path = tiny_checkpoints["llama"]
    _, store = run_lens(path, tmp_path_factory.mktemp("one_node") / "ref.zarr", prompts=PROMPTS, **COMMON)
    return store


def _spec(path, store_path, **cluster):
    return run_spec(
        model_path=str(path), store_path=str(store_path), executor="ray", activations="float32",
        sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0), lens_window=4, progress=False, **COMMON, **cluster,
    )  # fmt: skip


class RemoveNode(Coordinator):
    """Kill (no graceful shutdown) every process of the node holding stage 1 once micro-batch 2
    has made 2 steps: batch 0 is written by then, batches 1 and 2 are in flight. Returns once
    stage 1's process is gone: a raylet's workers end some time after it is killed, and a run
    whose last steps finished first would meet the loss only in its summary."""

    cluster = None
    removed = None

    def stepped(self, mb, steps):
        if self.removed is None and (mb, steps) == (2, 2):
            import psutil

            self.removed = next(i["node_id"] for i in self.stages.info() if i["stage"] == 1)
            stage = psutil.Process(self.stages.pid(1))
            node = next(n for n in self.cluster.list_all_nodes() if n.node_id == self.removed)
            self.cluster.remove_node(node, allow_graceful=False)
            try:
                stage.wait(timeout=60)
            except psutil.TimeoutExpired:
                stage.kill()  # its node is gone: what is left of it goes too
                stage.wait(timeout=10)


def _nodes(summary) -> list[str]:
    return [info["node_id"] for info in sorted(summary["stage_info"], key=lambda i: i["stage"])]


def _check_against_hf(store: LensStore, path) -> None:
    assert assert_kl_to_final_matches_hf(load_reference(path), store) > 0


@pytest.mark.xdist_group("multinode_cluster")
def test_strict_spread_places_two_stages_on_distinct_nodes_and_the_store_equals_one_nodes(
    cluster, tiny_checkpoints, uninterrupted, tmp_path
):
    """Each worker node has room for both stages, so only the strategy keeps them apart."""
    path = tiny_checkpoints["llama"]
    summary = Coordinator(_spec(path, tmp_path / "spread.zarr", placement="STRICT_SPREAD")).run(PROMPTS)
    nodes = _nodes(summary)
    workers = {n.node_id for n in cluster.list_all_nodes()} - {cluster.head_node.node_id}
    assert len(set(nodes)) == 2 and set(nodes) <= workers, (nodes, workers)
    store = LensStore.open(tmp_path / "spread.zarr")
    assert store.is_complete and store.verify() == []
    assert store.attrs["summary"]["stage_info"][0]["node_id"] == nodes[0]  # recorded with the results
    assert_stores_equal(store, uninterrupted)
    _check_against_hf(store, path)


@pytest.mark.xdist_group("multinode_cluster")
def test_a_removed_node_s_stage_restarts_on_a_spare_node_and_the_store_equals_an_uninterrupted_run(
    cluster, tiny_checkpoints, uninterrupted, tmp_path
):
    """Each stage fills a node (2 CPUs); a third worker node is the spare."""
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    workers = {n.node_id for n in cluster.list_all_nodes()} - {cluster.head_node.node_id}
    path = tiny_checkpoints["llama"]
    coordinator = RemoveNode(_spec(path, tmp_path / "moved.zarr", cpus_per_stage=2, max_restarts=2))
    coordinator.cluster = cluster
    summary = coordinator.run(PROMPTS)
    assert coordinator.removed is not None and summary["stage_restarts"] >= 1
    nodes = _nodes(summary)
    # stage 1 now runs on the worker that held no stage (the removed one is gone)
    assert nodes[1] in workers and coordinator.removed not in nodes and nodes[0] != nodes[1]
    store = LensStore.open(tmp_path / "moved.zarr")
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, uninterrupted)
    _check_against_hf(store, path)


@pytest.mark.xdist_group("multinode_cluster")
def test_with_no_node_to_move_to_the_run_stops_in_one_line_and_resume_completes_on_an_added_node(
    cluster, tiny_checkpoints, uninterrupted, tmp_path
):
    from actors.executor import ClusterError

    path = tiny_checkpoints["llama"]
    store_path = tmp_path / "stranded.zarr"
    coordinator = RemoveNode(_spec(path, store_path, cpus_per_stage=2, max_restarts=2, restart_timeout_s=10))
    coordinator.cluster = cluster
    with pytest.raises(ClusterError) as err:
        coordinator.run(PROMPTS)
    message = str(err.value)
    assert coordinator.removed is not None
    assert "\n" not in message and "restart_timeout_s=10" in message and "'CPU': 2" in message, message
    assert "resume=true" in message
    stopped = LensStore.open(store_path)
    assert not stopped.is_complete and stopped.group["batch_done"][0] == 1  # batch 0 was kept
    added = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    summary = Coordinator(_spec(path, store_path, cpus_per_stage=2, existing="resume")).run(PROMPTS)
    assert added.node_id in _nodes(summary) and all(start > 0 for start, _ in summary["batches_run"])
    store = LensStore.open(store_path)
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, uninterrupted)
    _check_against_hf(store, path)


def test_a_lost_head_ends_the_driver_in_one_line_and_resume_on_a_new_cluster_completes(tiny_with_tokenizer, tmp_path):
    """A driver joined to a `ray start` head holds its run after the first micro-batch (a
    wrapper that waits there); the test kills every process of the head (GCS, raylet, agents,
    stage actors). The driver ends in one line naming the head and the store, releases its
    lease, and leaves a store that does not read complete; `resume=true` on a new (private)
    cluster completes it, equal to an uninterrupted run's."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from driver import REPO, ray_head, run_driver, stop_session

    base = [f"model.name={tiny_with_tokenizer}", "cluster.micro_batch_size=1", "storage.shard_batches=1",
            "generation.max_new_tokens=4", "plot.max_prompts=0",
            "progress=false", 'prompts=["The lighthouse keeper", "Once upon a time", "In the beginning", "A cat sat"]',
            f"storage.root={tmp_path}"]  # fmt: skip
    marker = tmp_path / "first-batch-written"
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    fault = json.dumps({"hang_driver": {"after_batches": 1, "marker": str(marker)}})
    with ray_head() as (gcs, _, env, session):
        driver = subprocess.Popen(
            [sys.executable, wrapper, fault, "pipelines.lens", *base, "storage.run=cut", f"cluster.address={gcs}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(env, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-3000:]
                time.sleep(0.2)
            stop_session(session)  # the head is gone, with the stage actors it held
            _, stderr = driver.communicate(timeout=120)
        finally:
            driver.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("distlens: error:")]
    assert driver.returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    store_path = tmp_path / "cut" / "lens.zarr"
    assert f"the Ray head at {gcs} stopped answering" in errors[0] and str(store_path) in errors[0], errors[0]
    assert "resume=true" in errors[0]
    assert not (tmp_path / "cut" / "lens.zarr.lease.json").exists()  # released on the way out
    store = LensStore.open(store_path)
    assert not store.is_complete and store.done_batches() == {0}
    resumed = run_driver("pipelines.lens", *base, "storage.run=cut", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the uninterrupted reference in this process's stages: the executor does not change the numbers
    full = run_driver("pipelines.lens", *base, "storage.run=full", "cluster=inprocess", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    store, reference = LensStore.open(store_path), LensStore.open(tmp_path / "full" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, reference)
    assert sorted(r["batch"] for r in store.write_log() if r["event"] == "done") == [0, 1, 2, 3]
