"""The session room: what every driver (lens, steer, tune, demo, the notebook API) does to run.
Connect to or start Ray, choose the executor, run the Coordinator in the driver's own process
(its stages through the executor), record the run, and end a refused run in one line.

The one rule: Ray is connected here (`connect`, `connect_ray`), only for `cluster.executor=ray`;
the Coordinator always runs in the driver's process (`run_coordinator`), so the store is written
where storage.root was checked and the lease, Ctrl-C and a lost head all meet this process; its
stages run through the executor: a LocalExecutor in this process, or RayExecutor stage actors
(one per run, or `executor_for`'s pool kept across a study's runs)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.errors import exit_with_error

_POOLS: dict = {}  # stage actors kept across a study's runs and multirun jobs: the model loads once


def connect(cluster) -> dict | None:
    """Ray for a `cluster.executor=ray` run (`connect_ray`: {"kind", "address"}); None in-process."""
    return connect_ray(cluster) if cluster.executor == "ray" else None


def connect_ray(cluster) -> dict:
    """Join `cluster.address` (host:port, `auto` = the cluster last started on this machine with
    `ray start`, or `ray://...`), else $RAY_ADDRESS; with neither, start a private local cluster
    bound to loopback, even when a `ray start` cluster runs on this machine (Ray's own
    `ray.init()` would join that one). Prints and returns which: {"kind", "address"}."""
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:  # a local cluster: loopback only (set before Ray reads it, if it has not yet)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return _cluster_used("connected already (this process)")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return _cluster_used(f"joined ({'cluster.address' if cluster.address else '$RAY_ADDRESS'}={address})")
    # Ray reads the switch once, when first imported; something may have imported it before
    # this call, so give its constant the value the environment now holds (the processes
    # ray.init starts read the environment themselves).
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() not in ("0", "false")
    ray.init(
        address="local",  # always a new cluster: never one some other `ray start` left running
        num_cpus=cluster.num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        # No idle task workers started with the first driver: stage actors get processes of their
        # own, so those would only pay Ray's imports (~0.6 CPU-s each, one per CPU) and wait.
        _system_config={"prestart_worker_first_driver": False},
        runtime_env=worker_runtime_env(),
    )
    return _cluster_used("private local cluster (started by this driver, stopped with it)")


def worker_runtime_env() -> dict:
    """What a cluster this process starts gives its workers so that they import actors/ from
    this checkout: nothing when the installed distlens is this checkout (the README's editable
    install, or an installed copy imported from site-packages), else PYTHONPATH. A runtime_env
    sends every worker through Ray's set-up process first, which imports Ray once more before it
    becomes the worker (~0.5 CPU-s a stage actor, measured)."""
    import importlib.metadata
    import json

    repo = Path(__file__).resolve().parent.parent
    if repo.name in ("site-packages", "dist-packages"):
        return {}
    for dist in importlib.metadata.distributions(name="distlens"):  # a checkout's own egg-info may come first
        if json.loads(dist.read_text("direct_url.json") or "{}").get("url") == repo.as_uri():
            return {}
    return {"env_vars": {"PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}}


def _cluster_used(kind: str) -> dict:
    import ray

    from actors import head_watch

    info = {"kind": kind, "address": ray.get_runtime_context().gcs_address}
    print(f"[distlens] ray cluster: {kind} at {info['address']}", file=sys.stderr, flush=True)
    head_watch.watch(info["address"])  # a command-line driver ends in one line if this head goes
    return info


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port address that nothing answers at is refused at once (Ray itself retries for
    minutes); `auto`, `ray://` and other forms are left to Ray."""
    import socket

    from actors.executor import ClusterError

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        source = "cluster.address" if os.environ.get("RAY_ADDRESS") != address else "$RAY_ADDRESS"
        raise ClusterError(
            f"no Ray cluster answers at {address} ({source}; {err.strerror or err}): start one with "
            "`ray start --head`, fix the address, or unset it to start a local cluster"
        ) from err


def cluster_identity(cfg) -> dict | None:
    """Which Ray cluster this job's stages ran on (its GCS address), recorded per result so a
    multirun's report shows every job joined the same one; None in-process."""
    if cfg.cluster.executor != "ray":
        return None
    import ray

    return {"address": ray.get_runtime_context().gcs_address}


def executor_for(cfg):
    """One executor per cluster shape, reused by every run of this process (connecting Ray
    first for `cluster.executor=ray`): a study's runs load the model once."""
    from actors.executor import LocalExecutor, RayExecutor
    from pipelines.config import cluster_settings

    c = cfg.cluster
    key = (c.executor, c.num_stages, c.cpus_per_stage, c.gpus_per_stage, c.placement)
    if key not in _POOLS:
        if c.executor == "ray":
            connect_ray(c)
            _POOLS[key] = RayExecutor.for_cluster(cluster_settings(c), persistent=True)
        else:
            _POOLS[key] = LocalExecutor()  # in-process workers are rebuilt per run (cheap at this size)
    return _POOLS[key]


def run_coordinator(spec, prompts: list[list[int]], texts: list[str] | None = None, executor=None, stops=None) -> dict:
    """One pipeline run of `spec` over `prompts` (token ids; `texts`: their text, stored beside
    them; `stops`: each prompt's own `actors.run_spec.RowStop` or None): the Coordinator runs
    here, in the driver's process, its stages through `executor` (left open), or without one
    through a new executor of `spec.cluster` for this run only (Ray connected first: `connect`).
    Returns the run's summary."""
    from actors.coordinator import Coordinator

    return Coordinator(spec, executor).run(prompts, texts, stops)


def run_info() -> dict:
    """Package versions and the git commit, recorded in every store."""
    import importlib.metadata as md
    import subprocess

    versions = {}
    for pkg in ("torch", "transformers", "deepspeed", "ray", "zarr", "numcodecs", "hydra-core"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"versions": versions, "git_commit": commit}


def save_run_record(cfg, out_dir: Path) -> None:
    """`<run>/.hydra/config.yaml` and `overrides.yaml`, written by the driver when its run
    completes (the config sets `hydra.output_subdir: null`): Hydra writes its record before the
    app runs, so a run refused for an occupied directory would rewrite the record of the run
    that lives there. An interrupted run's config is in its store's attrs until it is resumed."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    record = out_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    # as run (resolved: a corpus run's prompts are []); a config composed with Hydra's own node
    # (a study's inner runs) leaves it out: its sweep paths resolve only inside a Hydra job
    run_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg
    OmegaConf.save(run_cfg, record / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), record / "overrides.yaml")


@contextmanager
def refusals(
    out_dir: Path | None = None, storage_root: str | None = None, interrupted: Callable[[], str] | None = None
) -> Iterator[None]:
    """Every driver's `main` runs inside this. A bad config, dataset, store or cluster ends the
    driver in one line, exit code 2 (an error raised inside a stage actor arrives wrapped: its
    cause is reported). Ctrl-C ends it with `interrupted()`'s line, exit code 130, when the
    driver gives one (else it propagates). With `storage_root`, the files the run staged in
    `out_dir` are uploaded at the end, whatever happened (pipelines/run_dir.py)."""
    from actors.executor import ClusterError
    from actors.store import StoreError
    from pipelines.datasets import DatasetError

    try:
        yield
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\n{interrupted()}", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, DatasetError, StoreError, ValueError, ClusterError) as err:
        exit_with_error(str(getattr(err, "cause", None) or err))
    finally:
        if storage_root is not None:
            from pipelines.run_dir import upload_staged

            upload_staged(out_dir, storage_root)
