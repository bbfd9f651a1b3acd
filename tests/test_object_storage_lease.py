"""One driver per run on object storage: while a live driver holds an `s3://` store's lease
(a conditional put on moto's S3 server on 127.0.0.1, tests/test_object_storage.py's fixture),
a second driver on the same store is refused in one line naming the first; the first then
finishes its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from driver import REPO, run_driver
from test_object_storage import BUCKET, LENS, s3  # noqa: F401  (s3: the moto server, a fixture of this module too)

from actors.store import LensStore


def test_a_second_driver_on_a_live_drivers_s3_store_is_refused_naming_it(s3, tiny_with_tokenizer, tmp_path):  # noqa: F811
    """Driver A stops after its first micro-batch (of two) and waits, holding the lease; B, with
    and without resume=true, exits 2 with one error line naming A's host and pid and writes
    nothing; A is released, completes the store and removes its lease."""
    env, fs = s3
    url = f"s3://{BUCKET}/lease"
    args = [
        f"model.name={tiny_with_tokenizer}",
        *LENS,
        "cluster=inprocess",
        "storage.shard_batches=1",  # A's first batch is stored (and recorded) while A holds the run
        f"storage.root={url}",
        "storage.run=shared",
    ]
    held, release = tmp_path / "a-holds-the-run", tmp_path / "a-may-go-on"
    fault = json.dumps({"hold_driver": {"after_batches": 1, "marker": str(held), "until": str(release)}})
    a = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("faulty_driver.py")), fault, "pipelines.lens", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **env},
    )  # fmt: skip
    try:
        while not held.exists():
            assert a.poll() is None, a.stderr.read()[-3000:]
            time.sleep(0.2)
        lease = json.loads(fs.cat_file(f"{BUCKET}/lease/shared/lens.zarr.lease.json"))
        assert lease["pid"] == a.pid
        assert LensStore.open(f"{url}/shared/lens.zarr").done_batches() == {0}  # A is mid-run
        for extra in ((), ("resume=true",)):
            b = run_driver("pipelines.lens", *args, *extra, cwd=tmp_path, env=env)
            errors = [line for line in b.stderr.splitlines() if line.startswith("distlens: error:")]
            assert b.returncode == 2 and len(errors) == 1, b.stderr[-3000:]
            assert "Traceback" not in b.stderr, b.stderr[-3000:]
            assert f"{url}/shared/lens.zarr is in use by another driver ({lease['host']} pid {a.pid} since" in errors[0]
            assert json.loads(fs.cat_file(f"{BUCKET}/lease/shared/lens.zarr.lease.json")) == lease  # still A's
        release.touch()
        _, err = a.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(timeout=60)
    assert a.returncode == 0, err[-3000:]
    store = LensStore.open(f"{url}/shared/lens.zarr")
    assert store.is_complete and store.verify() == []
    assert {r["pid"] for r in store.write_log()} == {a.pid}  # B wrote nothing
    assert not fs.exists(f"{BUCKET}/lease/shared/lens.zarr.lease.json")  # released at the end
