"""The way from a laptop to a cluster, on loopback: a real Ray head started with `ray start`
(and waited for until its job agent takes submissions), the lens driver submitted with
`ray job submit --working-dir .`, its store checked; with that head up, a driver given no
address starts a private cluster and `cluster.address=auto` joins the head; the head stopped."""

from __future__ import annotations

import subprocess

from driver import REPO, ray_head, run_driver

from actors.store import LensStore


def test_ray_job_submit_runs_the_lens_driver_on_a_loopback_head(tiny_with_tokenizer, tmp_path):
    with ray_head() as (gcs, dashboard, env, _):
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
        # which cluster a driver joins while that head is up: none unless told (a private local
        # cluster, gone with the driver); `cluster.address=auto` joins the head
        base = [f"model.name={tiny_with_tokenizer}", f"storage.root={tmp_path}", "generation.max_new_tokens=2"]
        env = {"RAY_AUTH_MODE": "token"}
        private = run_driver("pipelines.lens", *base, "storage.run=private", cwd=tmp_path, env=env)
        joined = run_driver("pipelines.lens", *base, "storage.run=auto", "cluster.address=auto", cwd=tmp_path, env=env)
        for result in (private, joined):
            assert result.returncode == 0, result.stderr[-3000:]
    used = {run: LensStore.open(tmp_path / run / "lens.zarr").attrs["ray_cluster"] for run in ("private", "auto")}
    assert used["private"]["kind"].startswith("private local cluster") and used["private"]["address"] != gcs
    assert used["auto"]["kind"].startswith("joined (cluster.address=auto)") and used["auto"]["address"] == gcs
    for run in ("private", "auto"):
        store = LensStore.open(tmp_path / run / "lens.zarr")
        assert store.attrs["summary"]["ray_cluster"] == used[run]
        log = (tmp_path / run / "run.log").read_text()
        assert f"ray cluster: {used[run]['kind']} at {used[run]['address']}" in log
    assert f"[distlens] ray cluster: {used['private']['kind']}" in private.stderr
    store = LensStore.open(tmp_path / "job" / "lens.zarr")
    assert store.is_complete and store.verify() == []
    summary = store.attrs["summary"]
    assert len(summary["stages"]) == 2 and len({info["pid"] for info in summary["stage_info"]}) == 2
