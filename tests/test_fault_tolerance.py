"""A run survives the loss of a stage actor (Ray restarts it, the coordinator re-runs the
micro-batches in flight) and the loss of its driver (the same command with resume=true
continues from the completion records). Faults are injected from the test side at a chosen
step (a Coordinator subclass; a driver whose store writer is monkeypatched, in
tests/faulty_driver.py), never by a timer; every final store is compared with an uninterrupted run's,
array by array, and the write log shows no batch written twice."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from driver import run_driver

from actors.store import LensStore
from reference import assert_stores_equal, run_lens, run_spec

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43], [50, 51, 52]]


def _assert_each_batch_written_once(store: LensStore) -> Counter:
    log = store.write_log()
    done = Counter(r["batch"] for r in log if r["event"] == "done")
    assert set(done.values()) == {1}, done  # no batch completed twice
    assert sorted(done) == list(range(store.group["batch_done"].shape[0]))
    chunks = Counter((c) for r in log if r["event"] == "done" for c in r["prompt_chunks"])
    assert set(chunks.values()) == {1}, chunks  # and no chunk is covered by two completed writes
    return Counter(r["batch"] for r in log if r["event"] == "begin")


def _equal_texts(a: LensStore, b: LensStore) -> None:
    for name in ("prompt_text", "generated_text"):
        assert a.group[name][:].tolist() == b.group[name][:].tolist(), name


def test_stage_actor_killed_mid_run_is_restarted_and_the_store_equals_an_uninterrupted_run(
    ray_cluster, tiny_checkpoints, tmp_path
):
    from actors.coordinator import Coordinator
    from actors.sampling import SamplingSpec

    class KillStage(Coordinator):
        """SIGKILL stage 1's process once micro-batch 2 has made 2 steps: batch 0 is finished
        and written by then; batches 1 and 2 are in flight."""

        killed = None

        def stepped(self, mb, steps):
            if self.killed is None and (mb, steps) == (2, 2):
                self.killed = self.stages.pid(1)
                os.kill(self.killed, signal.SIGKILL)

    path = tiny_checkpoints["llama"]
    common = dict(prompts=PROMPTS, num_stages=2, micro_batch_size=2, micro_batches_in_flight=2, max_new_tokens=6)
    _, reference = run_lens(path, tmp_path / "reference.zarr", **common)
    spec = run_spec(
        model_path=str(path), store_path=str(tmp_path / "killed.zarr"), executor="ray", max_restarts=2,
        activations="float32", sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0), lens_window=4,
        progress=False, **{k: v for k, v in common.items() if k != "prompts"},
    )  # fmt: skip
    coordinator = KillStage(spec)
    summary = coordinator.run(PROMPTS)
    assert coordinator.killed is not None and summary["stage_restarts"] == 1
    killed = LensStore.open(tmp_path / "killed.zarr")
    assert killed.is_complete and killed.verify() == []
    assert_stores_equal(killed, reference)
    np.testing.assert_array_equal(killed["coefficient"], reference["coefficient"])
    begun = _assert_each_batch_written_once(killed)
    assert set(begun.values()) == {1}  # micro-batch 0 was finished before the kill: not recomputed
    written = [line for line in (tmp_path / "run.log").read_text().splitlines() if " written: rows " in line]
    assert f"; rows {len(PROMPTS)}/{len(PROMPTS)} done" in written[-1], written[-1]  # each row counted once
    # the restarted stage reloaded its weights in a new process
    assert summary["stage_info"][1]["pid"] not in (coordinator.killed, summary["stage_info"][0]["pid"])


def test_stage_actor_killed_while_loading_is_restarted_or_stops_in_one_line(ray_cluster, tiny_checkpoints, tmp_path):
    """SIGKILL stage 1's process once the stage actors exist and before their weights load: the
    run restarts it from the mid-run budget and the store equals an uninterrupted run's; with
    no budget (max_restarts=0) it stops with one ClusterError line, and nothing reads complete."""
    from actors.coordinator import Coordinator
    from actors.executor import ClusterError
    from actors.sampling import SamplingSpec

    class KillWhileLoading(Coordinator):
        killed = None

        def loading(self):
            self.killed = self.stages.pid(1)
            os.kill(self.killed, signal.SIGKILL)

    path = tiny_checkpoints["llama"]
    common = dict(prompts=PROMPTS, num_stages=2, micro_batch_size=2, micro_batches_in_flight=2, max_new_tokens=4)
    _, reference = run_lens(path, tmp_path / "reference.zarr", **common)

    def spec(name, restarts):
        return run_spec(
            model_path=str(path), store_path=str(tmp_path / name), executor="ray", max_restarts=restarts,
            activations="float32", sampling=SamplingSpec(eos_token_ids=(), pad_token_id=0), lens_window=4,
            progress=False, **{k: v for k, v in common.items() if k != "prompts"},
        )  # fmt: skip

    coordinator = KillWhileLoading(spec("killed.zarr", 2))
    summary = coordinator.run(PROMPTS)
    killed = LensStore.open(tmp_path / "killed.zarr")
    assert killed.is_complete and killed.verify() == []
    assert_stores_equal(killed, reference)
    assert summary["stage_info"][1]["pid"] not in (coordinator.killed, summary["stage_info"][0]["pid"])
    assert summary["stage_restarts"] == 1
    log = (tmp_path / "run.log").read_text()
    assert "stage failure 1 of at most 2 (while loading weights; loading again)" in log

    with pytest.raises(ClusterError) as refused:
        KillWhileLoading(spec("no_budget.zarr", 0)).run(PROMPTS)
    message = str(refused.value)
    assert "\n" not in message and "stages failed 1 times (cluster.max_restarts=0)" in message
    assert not (tmp_path / "no_budget.zarr").exists() or not LensStore.open(tmp_path / "no_budget.zarr").is_complete


BASE = [
    "cluster=inprocess",
    "cluster.micro_batch_size=1",
    "storage.shard_batches=1",
    "generation.max_new_tokens=4",
    "progress=false",
    "plot.max_prompts=0",  # no heatmaps: none is read here
]
LENS_PROMPTS = '["The lighthouse keeper", "Once upon a time", "In the beginning", "A cat sat"]'


def _lens(model, tmp_path, run, *extra, faults=None):
    args = (f"model.name={model}", *BASE, f"prompts={LENS_PROMPTS}", f"storage.root={tmp_path}", f"storage.run={run}")
    if faults is None:
        return run_driver("pipelines.lens", *args, *extra, cwd=tmp_path)
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    return run_driver(wrapper, json.dumps(faults), "pipelines.lens", *args, *extra, cwd=tmp_path, script=True)


@pytest.fixture(scope="session")
def uninterrupted(tiny_with_tokenizer, tmp_path_factory) -> LensStore:
    """The driver run the interrupted ones are compared with, made once per test run (every
    test process reads it: the tiny model's path is one for all)."""
    from conftest import made_once

    def make(root: Path) -> None:
        full = _lens(tiny_with_tokenizer, root, "full")
        assert full.returncode == 0, full.stderr[-3000:]

    return LensStore.open(made_once(tmp_path_factory, "fault_tolerance_full", make) / "full" / "lens.zarr")


@pytest.mark.parametrize(
    "fault,code",
    [
        ({"kill_driver": {"after_batches": 2}}, -9),  # SIGKILL right after batch 1's completion record
        ({"kill_driver": {"after_batches": 2, "mid_write": True}}, -9),  # between batch 1's data and its record
        ({"interrupt_driver": {"after_batches": 1}}, 130),  # Ctrl-C
    ],
    ids=["killed", "killed-mid-write", "ctrl-c"],
)
def test_driver_killed_then_resumed_equals_an_uninterrupted_run(
    fault, code, tiny_with_tokenizer, uninterrupted, tmp_path
):
    cut = _lens(tiny_with_tokenizer, tmp_path, "cut", faults=fault)
    assert cut.returncode == code, cut.stderr[-3000:]
    if code == 130:
        assert "interrupted" in cut.stderr and "resume=true" in cut.stderr
    store = LensStore.open(tmp_path / "cut" / "lens.zarr")
    assert not store.is_complete  # an interrupted store never reads as complete
    problems = store.verify()
    assert any("incomplete" in p for p in problems), problems
    finished = store.done_batches()
    assert finished == set(range(len(finished))) and 0 < len(finished) < 4
    resumed = _lens(tiny_with_tokenizer, tmp_path, "cut", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store, reference = LensStore.open(tmp_path / "cut" / "lens.zarr"), uninterrupted
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, reference, atol=0)  # same process layout: bit for bit
    _equal_texts(store, reference)
    begun = _assert_each_batch_written_once(store)
    for batch in finished:  # batches finished before the kill were not computed again
        assert begun[batch] == 1
    if fault.get("kill_driver", {}).get("mid_write"):
        assert begun[len(finished)] == 2  # the half-written batch was written again, whole
    pids = {r["pid"] for r in store.write_log()}
    assert len(pids) == 2  # two processes wrote this store


def test_one_driver_per_run_and_a_dead_drivers_lease_is_taken_over_by_resume_only(
    tiny_with_tokenizer, uninterrupted, tmp_path
):
    """Driver A holds the run (it stops after its first batch and waits); B is refused naming A,
    with or without resume=true; once A is killed, a plain run is refused (the lease is stale)
    and resume=true takes the lease over and completes a store equal to an uninterrupted run's."""
    import subprocess
    import sys
    import time

    from driver import REPO

    marker = tmp_path / "a-holds-the-run"
    args = [f"model.name={tiny_with_tokenizer}", *BASE, f"prompts={LENS_PROMPTS}", f"storage.root={tmp_path}",
            "storage.run=shared"]  # fmt: skip
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    fault = json.dumps({"hang_driver": {"after_batches": 1, "marker": str(marker)}})
    a = subprocess.Popen(
        [sys.executable, wrapper, fault, "pipelines.lens", *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        lease = json.loads((tmp_path / "shared" / "lens.zarr.lease.json").read_text())
        assert lease["pid"] == a.pid
        for extra in ((), ("resume=true",)):
            b = run_driver("pipelines.lens", *args, *extra, cwd=tmp_path)
            errors = [line for line in b.stderr.splitlines() if line.startswith("distlens: error:")]
            assert b.returncode == 2 and len(errors) == 1, b.stderr[-3000:]
            assert f"is in use by another driver ({lease['host']} pid {a.pid} since" in errors[0]
    finally:
        a.kill()
        a.wait(timeout=60)
    assert not LensStore.open(tmp_path / "shared" / "lens.zarr").is_complete
    stale = run_driver("pipelines.lens", *args, cwd=tmp_path)
    assert stale.returncode == 2 and f"held by a driver that is gone ({lease['host']} pid {a.pid}" in stale.stderr
    resumed = run_driver("pipelines.lens", *args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lease of {lease['host']} pid {a.pid}" in resumed.stderr
    assert not (tmp_path / "shared" / "lens.zarr.lease.json").exists()  # released at the end
    shared = LensStore.open(tmp_path / "shared" / "lens.zarr")
    assert shared.is_complete and shared.verify() == []
    assert_stores_equal(shared, uninterrupted)
    _assert_each_batch_written_once(shared)
