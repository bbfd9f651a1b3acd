"""The steering-study workload: a `pipelines.steer` study over several datasets packed into
shared micro-batches against the same study run one dataset at a time (same process, model
loaded once), and the study's forward passes in rows/s against plain Hugging Face forward
passes over the same padded rows (each micro-batch as the study ran it, in one batch)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def compose_steer(model: str, datasets, data_root: str | None, overrides: list[str]):
    """The steer driver's config, composed by Hydra as `python -m pipelines.steer` would (its
    default cluster: two Ray stage actors on a local cluster)."""
    from hydra import compose, initialize_config_dir

    from pipelines.config import register

    register()  # the schemas conf/steer.yaml names
    repo = Path(__file__).resolve().parents[2]
    names = "all" if datasets == "all" else "[" + ",".join(datasets) + "]"
    # the cost on neutral prompts is left out: the workload times the three study runs, as it did before them
    args = [f"model.name={model}", f"dataset={names}", "progress=false", "steering.cost_prompts=0", *overrides]
    if data_root:
        args.append(f"data.root={data_root}")
    with initialize_config_dir(str(repo / "conf"), version_base=None):
        return compose("steer", args)


def steer_study(job: dict) -> dict:
    """One study (`mode` packed or one_at_a_time) timed from the first run to the last; the
    packed one also times HF forward passes over every run's rows."""
    from actors.checkpoint import resolve_checkpoint
    from pipelines.datasets import dataset_root, resolve_dataset
    from pipelines.session import executor_for
    from pipelines.study import Study, Task, dataset_names, run_study, train_test_items

    cfg = compose_steer(job["model"], job["datasets"], job.get("data_root"), job["overrides"])
    root = dataset_root(cfg.data.root)
    names = dataset_names(cfg.dataset, root)
    tasks = [Task(name, *train_test_items(resolve_dataset(name, root), cfg.data)) for name in names]
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config, tokenizer = checkpoint.config(), checkpoint.tokenizer()
    executor = executor_for(cfg)
    out = Path(job["scratch"]) / job["mode"]
    t0 = time.perf_counter()
    runs = {}
    if job["mode"] == "packed":
        study = Study(cfg, checkpoint, tokenizer, hf_config, executor, out, several=True)
        results, _ = run_study(study, tasks, cfg)
        runs = study.runs
    else:
        results = []
        for task in tasks:
            study = Study(cfg, checkpoint, tokenizer, hf_config, executor, out / task.name)
            results += run_study(study, [task], cfg)[0]
            runs.update({f"{task.name}/{k}": v for k, v in study.runs.items()})
    wall = time.perf_counter() - t0
    figures = {
        "wall_s": wall, "datasets": len(tasks), "runs": len(runs),
        "mean_of_slopes": {r["dataset"]: r["mean_of_slopes"] for r in results},
        "study_forward_s": sum(r["generate_s"] for r in runs.values()),
        "rows": int(sum(_rows(r["store"]) for r in runs.values())),
    }  # fmt: skip
    if job["mode"] == "packed":
        figures["hf_forward_s"] = sum(
            hf_forward_seconds(checkpoint.path, r["store"], cfg.cluster.micro_batch_size) for r in runs.values()
        )
        figures["padded_tokens"] = int(sum(_padded(r["store"], cfg.cluster.micro_batch_size) for r in runs.values()))
    return figures


def _rows(store_path: str) -> int:
    from actors.store import LensStore

    return int(LensStore.open(store_path)["lengths"].shape[0])


def _batches(store_path: str, batch: int):
    """The run's rows as its micro-batches fed them: each prompt left-padded to the longest."""
    from actors.store import LensStore

    store = LensStore.open(store_path)
    tokens, lengths = store["tokens"], store["prompt_lengths"]
    for start in range(0, len(lengths), batch):
        group = [tokens[i, : lengths[i]] for i in range(start, min(start + batch, len(lengths)))]
        cols = max(len(g) for g in group)
        ids = np.zeros((len(group), cols), np.int64)
        mask = np.zeros_like(ids)
        for i, g in enumerate(group):
            ids[i, cols - len(g) :], mask[i, cols - len(g) :] = g, 1
        yield torch.from_numpy(ids), torch.from_numpy(mask)


def _padded(store_path: str, batch: int) -> int:
    return sum(ids.numel() for ids, _ in _batches(store_path, batch))


def hf_forward_seconds(model_path, store_path: str, batch: int) -> float:
    """Plain HF forward passes (no cache, no capture) over the run's padded micro-batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    batches = list(_batches(store_path, batch))
    with torch.no_grad():
        model(batches[0][0][:1, :8])  # warm-up
        t0 = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def study_rows(cfg, bench) -> list[dict]:
    """The study workload's rows: packed and one at a time (wall time, same per-dataset
    results), and the packed study's forward rows/s against HF's on the same rows."""
    datasets = cfg.study_datasets
    job = dict(system="steer_study", model=cfg.model.name, datasets=datasets if datasets == "all" else list(datasets),
               data_root=cfg.data_root, overrides=list(cfg.study_overrides))  # fmt: skip
    packed, packed_run = bench("steer_packed", "study", 0, repeats=1, mode="packed", **job)
    alone, alone_run = bench("steer_one_at_a_time", "study", 0, repeats=1, mode="one_at_a_time", **job)
    out = []
    if "error" in packed_run or "error" in alone_run:
        return out
    diff = max(
        abs(packed_run["mean_of_slopes"][k] - alone_run["mean_of_slopes"][k]) for k in packed_run["mean_of_slopes"]
    )
    packed.update(
        datasets=packed_run["datasets"], runs=packed_run["runs"], rows=packed_run["rows"],
        speedup_vs_one_at_a_time=alone_run["wall_s"] / packed_run["wall_s"], max_slope_difference=diff,
        study_rows_per_s=packed_run["rows"] / packed_run["study_forward_s"],
        hf_forward_rows_per_s=packed_run["rows"] / packed_run["hf_forward_s"],
        fraction_of_hf_forward=packed_run["hf_forward_s"] / packed_run["study_forward_s"],
    )  # fmt: skip
    alone.update(datasets=alone_run["datasets"], runs=alone_run["runs"], rows=alone_run["rows"])
    return out
