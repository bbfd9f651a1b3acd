"""`python -m pipelines.lens`: generate from prompts while recording logit-lens trajectories
of every layer, through a pipeline of stage actors; writes lens.zarr, heatmaps and a summary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipelines.config import ConfigError, exit_with_error, register

register()


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
    repo = str(Path(__file__).resolve().parent.parent)
    ray.init(
        address="local",  # always a new cluster: never one some other `ray start` left running
        num_cpus=cluster.num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        # Workers import actors/ from this checkout, installed or not.
        runtime_env={"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )
    return _cluster_used("private local cluster (started by this driver, stopped with it)")


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


def steering_edits(cfg, hf_config) -> tuple[tuple, tuple | None]:
    """(edits, coefficient sweep) from `steer.*`; the vector's metadata must fit the model."""
    from actors.steering import SteeringEdit
    from pipelines.vectors import SteeringVector

    s = cfg.steer
    if s.vector is None:
        return (), None
    vec = SteeringVector.load(s.vector, model=cfg.model.name, hidden_size=hf_config.hidden_size)
    edit = SteeringEdit(vec.layer, vec.site, vec.vector, s.positions, 1.0)
    return (edit,), tuple(s.coefficients) if s.coefficients else (float(s.coefficient),)


def run(cfg: DictConfig, out_dir: Path, score_ids: tuple[int, ...] = ()) -> dict:
    """`out_dir`: Hydra's output directory (pipelines/run_dir.py: the run's directory, or its
    staging directory when storage.root is a URL)."""
    from actors import storage_fs
    from actors.checkpoint import resolve_checkpoint
    from actors.coordinator import Coordinator
    from actors.run_spec import GenerationSettings, SteeringSettings, check_cluster, check_run, fingerprint
    from actors.sampling import SamplingSpec
    from actors.store import LensStore
    from pipelines.config import cluster_settings, model_checks, run_spec, validate
    from pipelines.heatmap import write_heatmap
    from pipelines.prompts import encode_prompt, special_ids
    from pipelines.run_dir import run_location

    validate(cfg)
    where = run_location(out_dir, cfg.storage.root)  # the store, its logs and (uploaded) the rest
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)  # before the tokenizer loads
    tokenizer = checkpoint.tokenizer()
    prompts = [encode_prompt(tokenizer, p, cfg.generation.chat_template) for p in cfg.prompts]
    eos, pad = special_ids(tokenizer, hf_config)
    steering, coefficients = steering_edits(cfg, hf_config)
    g, c = cfg.generation, cfg.cluster
    results_cfg = OmegaConf.to_container(cfg, resolve=True)
    # What determines the numbers: not where they are stored or how the stages are spread.
    determining = {k: results_cfg[k] for k in ("model", "capture", "generation", "prompts", "steer")}
    if cfg.steer.vector:  # the vector's bytes, not just its path
        import hashlib

        determining["steer_vector_sha256"] = hashlib.sha256(Path(cfg.steer.vector).read_bytes()).hexdigest()
    fp = fingerprint(determining)
    attrs = {
        "model": {
            "name": cfg.model.name,
            "source": checkpoint.source,
            "revision": cfg.model.revision,
            "path": str(checkpoint.path),
        },
        "config": results_cfg,
        "fingerprint": fp,
        **run_info(),
    }
    existing = "resume" if cfg.resume else "overwrite" if cfg.overwrite else "refuse"
    spec = run_spec(
        cfg, str(checkpoint.path), str(storage_fs.join(where, "lens.zarr")), existing, attrs=attrs,
        generation=GenerationSettings(
            g.max_new_tokens, SamplingSpec(g.temperature, g.top_p, g.seed, eos if g.stop_at_eos else (), pad)
        ),
        steering=SteeringSettings(edits=steering, coefficients=coefficients, score_ids=tuple(score_ids)),
    )  # fmt: skip
    model_checks(check_run, spec, hf_config, prompts)  # every check against the model, before any compute
    texts = list(cfg.prompts)
    if c.executor == "ray":
        attrs["ray_cluster"] = connect_ray(c)  # recorded in the store, its summary and the run log
    # The coordinator runs here, in the driver (its stages are Ray actors): the store is written
    # where storage.root was checked, and the lease, Ctrl-C and a lost head all meet this process.
    summary = Coordinator(spec).run(prompts, texts)
    store = LensStore.open(storage_fs.join(where, "lens.zarr"))
    for old in {*out_dir.glob("heatmap_prompt*.png"), *storage_fs.glob(where, "heatmap_prompt*.png")}:
        storage_fs.remove(old)  # a replaced run's, maybe of more prompts
    plots = [  # one per prompt and lens: heatmap_prompt0.png (logit), heatmap_prompt0_tuned.png
        write_heatmap(
            store,
            i,
            tokenizer,
            out_dir / f"heatmap_prompt{i}{'' if lens == 'logit' else '_' + lens}.png",
            cfg.plot.max_positions,
            lens=lens,
        )  # fmt: skip
        for i in range(min(cfg.plot.max_prompts, store.group["tokens"].shape[0]))
        for lens in store.lenses
    ]
    summary["plots"] = [str(storage_fs.join(where, p.name)) for p in plots]  # a URL root's: once uploaded
    print_summary(store, tokenizer, summary)
    return summary


def print_summary(store, tokenizer, summary: dict, last: int = 4) -> None:
    from pipelines.heatmap import token_label

    out = sys.stdout
    n_prompts = store.group["tokens"].shape[0]
    steered = bool(store.attrs["config"]["steer"]["vector"])
    coefficients = store["coefficient"]
    for i in range(n_prompts):
        label = f", steering coefficient {coefficients[i]:g}" if steered else ""
        print(f"\n=== row {i}{label}: {str(store.group['prompt_text'][i])!r}", file=out)
        print(f"generated: {str(store.group['generated_text'][i])!r}", file=out)
        ids, probs = store.top1_table(i)
        toks = store.tokens(i)
        n = ids.shape[1]
        cols = list(range(max(0, n - last), n))
        header = "layer | " + " | ".join(f"after {token_label(tokenizer, toks[j])!r}" for j in cols)
        print(header, file=out)
        step = max(1, len(store.layers) // 10)
        for li in list(range(0, len(store.layers), step)) + (
            [len(store.layers) - 1] if (len(store.layers) - 1) % step else []
        ):
            cells = " | ".join(f"{token_label(tokenizer, ids[li, j])!r} {probs[li, j]:.2f}" for j in cols)
            print(f"{store.layers[li]:>5} | {cells}", file=out)
    captured = int(store.group["lens_mask"][:].sum())
    print(
        f"\n{summary['generated_tokens']} tokens generated, {summary['positions']} positions run "
        f"({captured} with a lens) in "
        f"{summary['generate_s']} s ({summary['tokens_per_s']} tokens/s, {summary['positions_per_s']} positions/s; "
        f"stages {summary['stages']})",
        file=out,
    )
    peaks = {info["pid"]: info["peak_rss_bytes"] / 2**20 for info in summary["stage_info"]}
    if len(peaks) < len(summary["stage_info"]):  # stages in one process (cluster=inprocess)
        print(f"peak RSS of the process running every stage: {max(peaks.values()):.0f} MiB", file=out)
    else:
        print(f"peak RSS per stage process: {', '.join(f'{p:.0f} MiB' for p in peaks.values())}", file=out)
    print(f"store:    {summary['store']}", file=out)
    for p in summary["plots"]:
        print(f"heatmap:  {p}", file=out)


def save_run_record(cfg: DictConfig, out_dir: Path) -> None:
    """`<run>/.hydra/config.yaml` and `overrides.yaml`, written by the driver when its run
    completes (the config sets `hydra.output_subdir: null`): Hydra writes its record before the
    app runs, so a run refused for an occupied directory would rewrite the record of the run
    that lives there. An interrupted run's config is in its store's attrs until it is resumed."""
    from hydra.core.hydra_config import HydraConfig

    record = out_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), record / "overrides.yaml")


@hydra.main(version_base=None, config_path="../conf", config_name="lens")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from actors import storage_fs
    from actors.executor import ClusterError
    from actors.store import StoreError
    from pipelines.run_dir import run_location, upload_staged

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out_dir)
        save_run_record(cfg, out_dir)
        return summary
    except KeyboardInterrupt:
        store = storage_fs.join(run_location(out_dir, cfg.storage.root), "lens.zarr")
        print(
            f"\ninterrupted: {store} keeps every finished micro-batch and does not read as complete; "
            "run the same command with resume=true to continue",
            file=sys.stderr,
        )
        sys.exit(130)
    except (ConfigError, StoreError, ValueError, ClusterError) as err:
        # An error raised inside a stage actor arrives wrapped; report its cause.
        exit_with_error(str(getattr(err, "cause", None) or err))
    finally:
        upload_staged(out_dir, cfg.storage.root)


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import LensConf, check_overrides

    check_overrides(LensConf, object_storage=True)
    head_watch.exit_on_loss()
    main()
