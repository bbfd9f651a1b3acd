"""The run lease: one driver at a time per store. `<store>.lease.json` names its owner (host, pid,
the process's start time, when it took the lease); it is created atomically (O_EXCL; on object
storage a conditional put, `If-None-Match: *`) before the store is opened and removed when the
run ends, however it ends. A lease whose owner is gone
(this host, the process no longer there) is taken over by `resume=true` (or `overwrite=true`,
which replaces the store anyway), never by a plain run; one held by a live process refuses the
run in one line naming the owner, and so does another host's (whose liveness this host cannot
see) unless resume or overwrite is asked for. Taking over a stale lease is atomic locally (one
contender's rename wins); object storage has no rename, so there two drivers taking over the same
dead driver's lease at the same moment could both proceed: resume one driver at a time."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from actors import storage_fs
from actors.store import StoreError


def lease_path(store_path) -> Path | str:
    return storage_fs.beside(store_path, ".lease.json")


def _started(pid: int) -> float | None:
    """The process's start time (tells a live owner from a reused pid), or None if gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "process_started": _started(pid),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def _owner_alive(owner: dict) -> bool | None:
    """True / False on this host; None for another host's process (not visible from here)."""
    if owner.get("host") != socket.gethostname():
        return None
    started = _started(int(owner.get("pid", -1)))
    return started is not None and abs(started - float(owner.get("process_started") or started)) < 1.0


class Lease:
    """Held while a run writes its store; `release()` when it ends."""

    def __init__(self, path: Path | str, owner: dict, took_over: dict | None):
        self.path, self.owner, self.took_over = path, owner, took_over

    @classmethod
    def acquire(cls, store_path, take_over: bool) -> Lease:
        """`take_over`: a stale lease may be taken (the run was given resume=true or overwrite=true)."""
        path = lease_path(store_path)
        me, took_over = _me(), None
        for _ in range(3):
            if not storage_fs.create_exclusive(path, json.dumps(me).encode()):
                try:
                    owner = json.loads(storage_fs.read_text(path))
                except (OSError, ValueError):  # vanished, or half-written by a writer that died
                    owner = {"host": "?", "pid": -1}
                alive = _owner_alive(owner)
                who = f"{owner.get('host')} pid {owner.get('pid')} since {owner.get('since', '?')}"
                if alive:
                    raise StoreError(
                        f"{store_path} is in use by another driver ({who}; lease {path}): wait for it to finish, "
                        "or choose another storage.run"
                    ) from None
                if not take_over:
                    state = "whose liveness this host cannot check" if alive is None else "that is gone"
                    raise StoreError(
                        f"{store_path} has a lease held by a driver {state} ({who}; lease {path}): run again with "
                        "resume=true (or overwrite=true) to take it over, only once that driver has stopped"
                    ) from None
                try:  # take it over: only one contender's rename succeeds (locally)
                    stale = storage_fs.beside(path, f".stale.{me['pid']}")
                    storage_fs.move(path, stale)
                    storage_fs.remove(stale)
                    took_over = owner
                except FileNotFoundError:
                    pass
                continue
            return cls(path, me, took_over)
        raise StoreError(f"{store_path}: could not take the lease {path} (other drivers are contending for it)")

    def release(self) -> None:
        """Remove the lease if it is still this process's."""
        try:
            if json.loads(storage_fs.read_text(self.path)).get("pid") == self.owner["pid"]:
                storage_fs.remove(self.path)
        except (OSError, ValueError):
            pass
