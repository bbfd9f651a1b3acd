"""`python tests/faulty_driver.py '<fault json>' <module> [overrides...]`: runs a driver as a user
would, with a fault planted by the test side (a monkeypatch of the store's batch writer):
{"kill_driver": {"after_batches": 2}}: SIGKILL this process right after the 2nd batch's
completion record; with "mid_write": true, between the 2nd batch's data and its record; with
"in_object": true, inside the first object (a shard) written once the 2nd batch is taken: half
its bytes in zarr's own temporary file, never renamed (a local store);
{"interrupt_driver": {"after_batches": 1}}: SIGINT (Ctrl-C) after the 1st batch;
{"hang_driver": {"after_batches": 1, "marker": path}}: after the 1st batch, touch `marker` and
sleep (a driver that holds its run until the test kills it);
{"hold_driver": {"after_batches": 1, "marker": path, "until": path}}: after the 1st batch, touch
`marker` and wait (at most 600 s) until the test creates `until`, then go on and finish the run
(a live driver holding its lease mid-run);
{"fill_disk": {"after_batches": 1, "filler": path}}: after the 1st batch, write zeros to `filler`
until its filesystem has no space left (a real full disk: the test mounts a small tmpfs)."""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import zarr.storage._local as zarr_local

from actors.store import LensStore

fault = json.loads(sys.argv[1])
kill, interrupt, hang = fault.get("kill_driver"), fault.get("interrupt_driver"), fault.get("hang_driver")
hold = fault.get("hold_driver")
fill = fault.get("fill_disk")
written = 0
write_batch = LensStore.write_batch
put = zarr_local._put
kill_in_object = False


def killing_put(path, value, exclusive=False):
    """zarr's local object write (tmp file, then rename), killed half way through the tmp file."""
    if not kill_in_object or "/c/" not in str(path):
        return put(path, value, exclusive)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(value.as_buffer_like()).cast("B")
    with path.with_suffix(".killed.partial").open("wb") as f:
        f.write(view[: len(view) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def faulty_write_batch(self, batch, rows, data, texts, mark_done=True):
    global written, kill_in_object
    if kill and written + 1 == kill["after_batches"] and kill.get("in_object"):
        kill_in_object = True
    if kill and written + 1 == kill["after_batches"] and kill.get("mid_write"):
        write_batch(self, batch, rows, data, texts, mark_done=False)
        os.kill(os.getpid(), signal.SIGKILL)
    write_batch(self, batch, rows, data, texts, mark_done)
    written += 1
    if kill and written == kill["after_batches"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if interrupt and written == interrupt["after_batches"]:
        os.kill(os.getpid(), signal.SIGINT)
    if fill and written == fill["after_batches"]:
        fill_up(fill["filler"])
    if hang and written == hang["after_batches"]:
        Path(hang["marker"]).touch()
        time.sleep(600)
    if hold and written == hold["after_batches"]:
        Path(hold["marker"]).touch()
        deadline = time.monotonic() + 600
        while not Path(hold["until"]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def fill_up(path: str) -> None:
    try:
        with open(path, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise


LensStore.write_batch = faulty_write_batch
zarr_local._put = killing_put
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
