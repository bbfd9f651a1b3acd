"""Run the drivers as a user does: `python -m pipelines.<name> overrides...` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_driver(
    module: str, *overrides: str, cwd: Path, timeout: float = 600, env: dict | None = None, script: bool = False
) -> subprocess.CompletedProcess:
    """`env`: extra variables for this run (e.g. RAY_ADDRESS); `script`: `module` is a script
    path run as `python <script> ...` (a test-side wrapper around a driver)."""
    base = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    base.pop("RAY_ADDRESS", None)
    env = {**base, **(env or {})}
    return subprocess.run(
        [sys.executable, module, *overrides] if script else [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        # As in a terminal's foreground: Ctrl-C (SIGINT) interrupts, even when the test run
        # itself was started in the background, where shells start children ignoring SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def ray_head(num_cpus: int = 2):
    """A real Ray head on loopback (`ray start --head`), stopped on exit. Yields
    (gcs address, dashboard port, env for clients)."""
    from actors.distributed import free_port

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    head = [
        "ray", "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
    ]  # fmt: skip
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        # readiness, not luck: `ray start` returns before the job agent can take submissions
        ready = subprocess.run([sys.executable, "-m", "pipelines.ready", f"127.0.0.1:{port}", "--timeout", "180"],
                               env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=240)  # fmt: skip
        assert ready.returncode == 0, ready.stderr[-2000:]
        yield f"127.0.0.1:{port}", dashboard, env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
