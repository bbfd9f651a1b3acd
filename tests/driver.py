"""Run the drivers as a user does: `python -m pipelines.<name> overrides...` in a subprocess."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_driver(
    module: str, *overrides: str, cwd: Path, timeout: float = 600, env: dict | None = None, script: bool = False
) -> subprocess.CompletedProcess:
    """`env`: extra variables for this run (e.g. RAY_ADDRESS); `script`: `module` is a script
    path run as `python <script> ...` (a test-side wrapper around a driver). The process is
    forked from a Python that has the heavy libraries imported (tests/driver_zygote.py) when
    its environment differs from that Python's only in variables those libraries do not read
    at import; else a fresh one."""
    env = {**_environment(), **(env or {})}
    started = _environment(_ZYGOTE.env)
    if all(_read_late(k) for k in env.keys() | started.keys() if env.get(k) != started.get(k)):
        return _ZYGOTE.run([module, *overrides], cwd=cwd, env=env, timeout=timeout, script=script)
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


def run_here(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m <module> overrides...` run in this test process (`runpy`, as `__main__`, with
    this argv and working directory), for runs a driver refuses before any compute and before
    Ray: the same code from the command line on, the exit code its `SystemExit` carries (1 and
    the traceback for any other exception, as Python's), stdout and stderr captured. Logging
    handlers the run configured (Hydra's) are closed and the process's own put back."""
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    from actors import head_watch

    out, err = io.StringIO(), io.StringIO()
    argv, here, watched = sys.argv, os.getcwd(), head_watch._enabled
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        sys.argv = [module, *overrides]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, head_watch._enabled = argv, watched
        os.chdir(here)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess([sys.executable, "-m", module, *overrides], code, out.getvalue(), err.getvalue())


def _environment(of: dict | None = None) -> dict:
    """A driver's variables: this process's (or `of`), this checkout first on the path, loopback Ray."""
    env = dict(os.environ if of is None else of, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _read_late(name: str) -> bool:
    """Variables read when a driver uses them, not when the zygote's libraries import (it never
    imports Ray). Some are set in the test process by what it runs, for good, and made every later
    driver of that process a fresh Python (seconds of imports each): the first `ray.init` sets
    RAY_AUTH_MODE, RAY_CLIENT_MODE, RAY_USAGE_STATS_ENABLED and PYTHONBREAKPOINT; torch's inductor
    sets TORCHINDUCTOR_CACHE_DIR (read when it compiles); DeepSpeed's import sets
    PYTORCH_NVML_BASED_CUDA_CHECK (the zygote's own import of it sets the same)."""
    late = ("PYTEST_CURRENT_TEST", "PYTHONBREAKPOINT", "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")
    return name in late or name.startswith(("RAY_", "AWS_", "DISTLENS_"))


class _Zygote:
    """One tests/driver_zygote.py per test process, started on first use with the variables
    this process had when it imported this module (`env`)."""

    def __init__(self):
        self.env = dict(os.environ)
        self.proc: subprocess.Popen | None = None
        self.pending = b""  # answer bytes read past the last full line

    def _started(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = _environment(self.env)
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("driver_zygote.py"))],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            )  # fmt: skip
            self.pending = b""
        return self.proc

    def _answer(self, timeout: float | None) -> dict | None:
        """The zygote's next answer line, or None if none came within `timeout` seconds."""
        import json
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"tests/driver_zygote.py ended (exit {self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float, script: bool):
        import json

        proc = self._started()
        with tempfile.TemporaryDirectory(prefix="dl-driver-") as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            request = {"argv": argv, "cwd": str(cwd), "env": env, "out": out, "err": err, "script": script}
            proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._answer(None)["pid"]
            done = self._answer(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._answer(None)
                raise subprocess.TimeoutExpired(argv, timeout, _read(out), _read(err))
            return subprocess.CompletedProcess([sys.executable, *argv], done["returncode"], _read(out), _read(err))


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


_ZYGOTE = _Zygote()


def stop_session(session: int, timeout: float = 60) -> None:
    """SIGKILL every process of one session (a head started by `ray_head`: its GCS, raylet,
    agents and workers), and only those: never `ray stop`, which ends every Ray on the machine."""
    import time

    import psutil

    def members():
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == session:
                    found.append(proc)
            except (OSError, psutil.Error):
                pass
        return found

    deadline = time.monotonic() + timeout
    while (procs := members()) and time.monotonic() < deadline:
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)


@contextmanager
def ray_head(num_cpus: int = 2):
    """A real Ray head on loopback (`ray start --head`, in a session of its own), stopped on
    exit by ending that session's processes. Yields (gcs address, dashboard port, env for
    clients, session id: `stop_session(session)` kills the head mid-test)."""
    from actors.distributed import free_port

    # A Ray temp dir of its own (short: Ray's socket paths must fit 107 bytes): its session, and
    # the "latest cluster" record that `cluster.address=auto` reads, are this head's even while
    # another test run on this machine starts heads of its own.
    tmp = tempfile.mkdtemp(prefix="dlray-", dir="/tmp")
    # a token of its own (as `ray get-auth-token --generate` makes one): a fresh machine has no
    # ~/.ray/auth_token until some earlier `ray.init` wrote one, and `ray start` creates none
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_TMPDIR=tmp,
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_prestart_worker_first_driver="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    head = [
        "ray", "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        # the job agent's HTTP port on a free one: its default (52365) may be another Ray's on this machine (a
        # driver's private cluster, a second test run), and an agent that cannot bind never takes jobs
        "--dashboard-agent-listen-port", "0", "--ray-client-server-port", str(free_port()),
    ]  # fmt: skip
    started = subprocess.Popen(head, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    session = started.pid
    try:
        out, err = started.communicate(timeout=180)
        assert started.returncode == 0, err[-2000:]
        # readiness, not luck: `ray start` returns before the job agent can take submissions
        ready = subprocess.run([sys.executable, "-m", "pipelines.ready", f"127.0.0.1:{port}", "--timeout", "180"],
                               env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=240)  # fmt: skip
        assert ready.returncode == 0, ready.stderr[-2000:]
        yield f"127.0.0.1:{port}", dashboard, env, session
    finally:
        stop_session(session)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def serving(*overrides: str, cwd: Path, env: dict, timeout: float = 300):
    """`python -m pipelines.serve overrides...` (a fresh process: Ray Serve's replica imports this
    checkout) from its start until it prints that it serves; yields its stderr's file. Ended with
    Ctrl-C, as a user ends it, which must take the app down and exit 0."""
    import time

    out, err = Path(cwd) / "serve.out", Path(cwd) / "serve.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", *overrides], cwd=cwd, env=dict(env, PYTHONPATH=str(REPO)),
            stdout=o, stderr=e, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while "serving" not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.5)
            yield err
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 0, err.read_text()[-3000:]
        finally:
            proc.kill()
