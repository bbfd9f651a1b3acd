"""A run whose storage fills up: a real small filesystem (a tmpfs this test mounts; the test
needs root) is filled from the test side right after the first micro-batch is written (a
driver wrapper, tests/faulty_driver.py). The driver stops with one line naming the path, the
store does not read as complete, and once the space is freed `resume=true` completes a store
equal to an uninterrupted run's, array by array."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from driver import run_driver

from actors.store import LensStore
from reference import assert_stores_equal

BASE = ["cluster=inprocess", "cluster.micro_batch_size=1", "storage.shard_batches=1", "generation.max_new_tokens=4", "progress=false",
        "capture.activations=float32", "plot.max_prompts=0"]  # fmt: skip
PROMPTS = '["The lighthouse keeper", "Once upon a time", "In the beginning", "A cat sat"]'


def cannot_mount(reason: str) -> None:
    """Skip outside CI; under CI (`CI` set: it runs as root) a disk that cannot be mounted fails
    the test, naming why, so the full-disk path is never silently left untested there."""
    if os.environ.get("CI"):
        pytest.fail(f"CI={os.environ['CI']!r} but the full-disk test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        cannot_mount(f"mounting a tmpfs needs root (running as uid {os.geteuid()})")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except OSError as err:  # no mount command at all
        cannot_mount(f"cannot run mount: {err}")
    if done.returncode:
        cannot_mount(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _lens(model, root, run, *extra, faults=None, cwd):
    args = (f"model.name={model}", *BASE, f"prompts={PROMPTS}", f"storage.root={root}", f"storage.run={run}", *extra)
    if faults is None:
        return run_driver("pipelines.lens", *args, cwd=cwd)
    wrapper = str(Path(__file__).with_name("faulty_driver.py"))
    return run_driver(wrapper, json.dumps(faults), "pipelines.lens", *args, cwd=cwd, script=True)


def test_a_full_disk_stops_in_one_line_and_resume_completes_after_space_is_freed(
    tiny_with_tokenizer, small_disk, tmp_path
):
    full = _lens(tiny_with_tokenizer, tmp_path, "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    filler = small_disk / "filler"
    cut = _lens(tiny_with_tokenizer, small_disk, "cut", faults={"fill_disk": {"after_batches": 1, "filler": str(filler)}},
                cwd=tmp_path)  # fmt: skip
    errors = [line for line in cut.stderr.splitlines() if line.startswith("distlens: error:")]
    assert cut.returncode != 0 and len(errors) == 1, cut.stderr[-3000:]
    assert "Traceback" not in cut.stderr and "Logging error" not in cut.stderr, cut.stderr[-3000:]
    assert str(small_disk / "cut") in errors[0] and "No space left on device" in errors[0], errors[0]
    assert "resume=true" in errors[0]
    store = LensStore.open(small_disk / "cut" / "lens.zarr")
    assert not store.is_complete and store.done_batches() == {0}
    assert any("incomplete" in p for p in store.verify())
    filler.unlink()  # space freed
    resumed = _lens(tiny_with_tokenizer, small_disk, "cut", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store, reference = LensStore.open(small_disk / "cut" / "lens.zarr"), LensStore.open(tmp_path / "full" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    assert_stores_equal(store, reference, atol=0)  # same process layout: bit for bit
    done = [r["batch"] for r in store.write_log() if r["event"] == "done"]
    assert sorted(done) == [0, 1, 2, 3]  # every batch completed once: batch 0 was not written again


def test_under_ci_a_disk_that_cannot_be_mounted_fails_naming_why(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI='true'.*needs root"):
        cannot_mount("mounting a tmpfs needs root")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        cannot_mount("mounting a tmpfs needs root")
