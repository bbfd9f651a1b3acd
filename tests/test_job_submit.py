"""The way from a laptop to a cluster, on loopback: a real Ray head started with `ray start`,
the lens driver submitted with `ray job submit --working-dir .`, its store checked, the head
stopped."""

from __future__ import annotations

import os
import subprocess

from driver import REPO

from actors.distributed import free_port
from actors.store import LensStore


def test_ray_job_submit_runs_the_lens_driver_on_a_loopback_head(tiny_with_tokenizer, tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    head = [
        "ray", "start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
    ]  # fmt: skip
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        job = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--working-dir",
                ".",
                "--runtime-env",
                "cluster/runtime_env.yaml",
                "--",
                "python",
                "-m",
                "pipelines.lens",
                f"model.name={tiny_with_tokenizer}",
                f"storage.root={tmp_path}",
                "storage.run=job",
                "generation.max_new_tokens=3",
            ],  # fmt: skip
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    store = LensStore.open(tmp_path / "job" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    summary = store.attrs["summary"]
    assert len(summary["stages"]) == 2 and len({info["pid"] for info in summary["stage_info"]}) == 2
