"""Watching the Ray head a driver uses: when its GCS stops answering, the driver ends in one line.

Without a head the driver cannot go on (its stage actors, placement group and object store are
gone or unreachable), and Ray itself only gives up after about a minute, with a native stack
trace. A command-line driver calls `exit_on_loss()` first (a notebook never does: its kernel is
not ended for it); `watch(address)`, called once the driver is connected, then probes the GCS
port every second from a daemon thread; after `GRACE_S` seconds without an answer it runs what the current run
registered with `on_loss` (the coordinator releases its store lease there and says where the
finished micro-batches are), prints one `distlens: error:` line and exits with status 2 at
once, without Ray's shutdown (which would wait on the lost head).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

GRACE_S = 10.0  # how long the head may not answer before the driver gives up (a GCS restart is quicker)
_hooks: list = []  # callables returning a hint for the error line (the current run's)
_watching: set[str] = set()
_enabled = False


def exit_on_loss() -> None:
    """This process is a command-line driver: a lost head ends it (see `watch`)."""
    global _enabled
    _enabled = True


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def _lost(address: str, silent_s: float) -> None:
    hints = []
    for hook in list(_hooks):
        with contextlib.suppress(Exception):  # a hook must never keep the driver from ending
            hints.append(hook())
    hint = "; ".join(h for h in hints if h) or "start a cluster and run the same command again"
    print(
        f"distlens: error: the Ray head at {address} stopped answering ({silent_s:.0f}s); {hint}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(2)


def watch(address: str, period_s: float = 1.0, grace_s: float | None = None) -> None:
    """Start watching the head whose GCS is at `address` (host:port), once per address."""
    host, _, port = address.rpartition(":")
    if not _enabled or address in _watching or not port.isdigit():
        return
    _watching.add(address)
    grace = GRACE_S if grace_s is None else grace_s

    def loop() -> None:
        import ray

        silent_since = None
        while True:
            time.sleep(period_s)
            if not ray.is_initialized():  # this driver disconnected (its own cluster stops with it)
                _watching.discard(address)
                return
            if _answers(host, int(port)):
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= grace:
                _lost(address, time.monotonic() - silent_since)

    threading.Thread(target=loop, name="distlens-head-watch", daemon=True).start()


@contextlib.contextmanager
def on_loss(hook):
    """While the block runs, `hook()` runs if the head is lost; it returns a hint for the error line."""
    _hooks.append(hook)
    try:
        yield
    finally:
        _hooks.remove(hook)
