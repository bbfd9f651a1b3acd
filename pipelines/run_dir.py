"""Where a driver's run directory is. For a local `storage.root` it is Hydra's output directory
itself. For an object-storage root (`s3://bucket/prefix`) Hydra gets a local staging directory
(its own log needs a local file): the stores, their write logs and `run.log` go straight to
object storage, and the small files the driver writes (`.hydra/`, heatmaps, a steer study's
summaries, vectors and plots) are staged there and uploaded when the driver ends."""

from __future__ import annotations

import time
from pathlib import Path

from actors import storage_fs
from pipelines.errors import exit_with_error

STARTED = int(time.time())  # files staged since this process started are this run's (whole seconds: mtimes may be)


def hydra_root(root: str) -> str:
    """What Hydra puts its run and sweep directories under (the `local_dir` resolver of
    conf/*.yaml): `root` itself, or for a URL a staging directory in the distlens cache named
    after the URL."""
    if not storage_fs.is_url(root):
        return root
    from actors.checkpoint import cache_root

    scheme, rest = str(root).rstrip("/").split("://", 1)
    return str(cache_root() / "staging" / scheme / rest)


def run_location(output_dir: Path, root: str) -> Path | str:
    """Where the run's files live: Hydra's `output_dir`, or the same place under the URL root."""
    if not storage_fs.is_url(root):
        return output_dir
    return storage_fs.join(root, *output_dir.relative_to(hydra_root(root)).parts)


def upload_staged(output_dir: Path, root: str) -> list[str]:
    """Upload what this run staged in `output_dir` to its place under the URL `root` (nothing
    for a local root). Hydra's own job log stays in staging: `run.log` is the run's log there,
    and a run refused for an occupied directory must not replace the log of the run in it. A
    failed upload is one error line naming the staging directory (exit code 2)."""
    if not storage_fs.is_url(root) or not output_dir.is_dir():
        return []
    from hydra.core.hydra_config import HydraConfig

    job_log = f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else "*.log-none"
    where = run_location(output_dir, root)
    try:
        return storage_fs.upload(output_dir, where, since=STARTED, skip=(job_log,))
    except OSError as err:
        exit_with_error(f"could not upload the run's files to {where} ({err}); they are in {output_dir}")
