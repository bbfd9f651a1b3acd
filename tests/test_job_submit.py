"""The way from a laptop to a cluster, on loopback: a real Ray head started with `ray start`,
the lens driver submitted with `ray job submit --working-dir .`, its store checked, the head
stopped."""

from __future__ import annotations

import subprocess

from driver import REPO, ray_head

from actors.store import LensStore


def test_ray_job_submit_runs_the_lens_driver_on_a_loopback_head(tiny_with_tokenizer, tmp_path):
    with ray_head() as (_, dashboard, env):
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
    store = LensStore.open(tmp_path / "job" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    summary = store.attrs["summary"]
    assert len(summary["stages"]) == 2 and len({info["pid"] for info in summary["stage_info"]}) == 2
