"""`python -m pipelines.tune`: train a tuned lens (one affine translator per layer) on the
pipeline's own stages. Each stage trains its layers' translators against the final
distribution rebuilt from the final-normed states the last stage sends back; one optimizer
step per micro-batch of `train.batch` sequences of `data.tokens` tokens. Writes the
translators (safetensors with metadata), per-stage checkpoints (`resume=true` continues from
the latest step every stage saved), `train.zarr` (each step's KL before the update, per layer
and position) and `loss.png`.

Training text: files given by path (`.txt`: paragraphs; `.jsonl`: `text`, `question` or
`statement`), or by default the shared behaviour datasets' question texts (offline here). The
lens is distilled from the model itself, so any text the model reads is sound training data;
held-out documents are split off by document, never by token."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipelines.config import (
    ConfigError,
    at_least,
    choice,
    cluster_settings,
    exit_with_error,
    model_checks,
    register,
    run_spec,
)

register()


def documents(paths: list[str], root: Path) -> list[str]:
    """The training text as documents: each given file's paragraphs (text) or records (JSONL),
    or every shared dataset's questions when no path is given."""
    files = [Path(p).expanduser() for p in paths] or sorted(root.glob("*.jsonl"))
    if not files:
        raise ConfigError(f"data.paths=[] and no .jsonl files in {root}: give text or JSONL files")
    docs = []
    for path in files:
        if not path.is_file():
            raise ConfigError(f"data.paths contains {str(path)!r}, which does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                body = next(
                    (record[k] for k in ("text", "question", "statement") if isinstance(record.get(k), str)), None
                )
                if body is None:
                    raise ConfigError(f"{path}:{number}: no 'text', 'question' or 'statement' field")
                docs.append(body)
        else:
            docs += [p.strip() for p in text.split("\n\n") if p.strip()]
    return docs


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle of whole documents: the last `heldout_fraction` are held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cut = len(docs) - max(1, round(len(docs) * heldout_fraction))
    return [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]


def sequences(tokenizer, docs: list[str], tokens: int, separator: int) -> list[list[int]]:
    """The documents' ids joined by `separator` and cut into sequences of `tokens` ids."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False).input_ids + [separator]
    return [ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, tokens)]


def latest_step(checkpoints: Path, n_stages: int) -> int:
    """The latest step for which every stage saved a checkpoint (0: none)."""
    steps = [
        {int(p.name.split(".step")[1].split(".")[0]) for p in checkpoints.glob(f"stage{s}.step*.safetensors")}
        for s in range(n_stages)
    ]
    common = set.intersection(*steps) if steps else set()
    return max(common, default=0)


def validate_tune(cfg) -> None:
    t, d = cfg.train, cfg.data
    for name in ("steps", "batch", "save_every"):
        at_least(f"train.{name}", t[name], 1)
    at_least("train.warmup", t.warmup, 0)
    at_least("data.tokens", d.tokens, 2)
    choice("train.schedule", t.schedule, ("constant", "linear", "cosine"))
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} is out of range: must be > 0")
    if not 0 < d.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} is out of range: must be in (0, 1)")
    if cfg.cluster.tp_size != 1:
        raise ConfigError(f"cluster.tp_size={cfg.cluster.tp_size}: tuned-lens training runs tp_size=1 stages")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    from actors.checkpoint import resolve_checkpoint
    from actors.coordinator import Coordinator
    from actors.run_spec import CaptureSettings, GenerationSettings, check_cluster, check_run
    from actors.sampling import SamplingSpec
    from actors.slicing import plan_stages
    from actors.tuned_lens import TuneSpec, merge_stage_checkpoints
    from pipelines.prompts import special_ids
    from pipelines.steer import dataset_root

    validate_tune(cfg)
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)
    tokenizer = checkpoint.tokenizer()
    d, t = cfg.data, cfg.train
    train_docs, heldout = split_documents(documents(list(d.paths), dataset_root(None)), d.heldout_fraction, d.seed)
    eos, _ = special_ids(tokenizer, hf_config)
    seqs = sequences(tokenizer, train_docs, d.tokens, eos[0] if eos else 0)
    if not seqs:
        raise ConfigError(f"data.tokens={d.tokens}: the training text holds no sequence that long")
    rng = np.random.default_rng(t.seed)
    need = t.steps * t.batch  # epochs over the sequences, each in its own seeded order
    order = np.concatenate([rng.permutation(len(seqs)) for _ in range(-(-need // len(seqs)))])[:need]
    ck = out_dir / "checkpoints"
    n_stages = len(plan_stages(hf_config, cfg.cluster.num_stages))
    start = latest_step(ck, n_stages) if cfg.resume else 0
    if not cfg.resume and ck.exists() and any(ck.iterdir()):
        raise ConfigError(
            f"{out_dir} already holds a tuned-lens run: pass resume=true to continue it, or another storage.run"
        )
    if start >= t.steps:
        print(f"[distlens] already trained: {t.steps} steps", file=sys.stderr)
    spec_tune = TuneSpec(
        steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), warmup=t.warmup,
        schedule=t.schedule, checkpoint_dir=str(ck), save_every=t.save_every, resume_step=start, model=cfg.model.name,
    )  # fmt: skip
    prompts = [seqs[i] for i in order[start * t.batch :]]
    spec = run_spec(
        cfg, str(checkpoint.path), str(out_dir / f"train.from{start}.zarr"), "overwrite",
        capture=CaptureSettings(layers=None, components=("resid_post",), k=1, window=d.tokens + 1),
        generation=GenerationSettings(1, SamplingSpec(eos_token_ids=(), pad_token_id=0)),
        attrs={"model": {"name": cfg.model.name, "revision": cfg.model.revision}, "config": OmegaConf.to_container(cfg)},
    )  # fmt: skip
    from dataclasses import replace

    spec = replace(spec, tune=spec_tune, cluster=replace(spec.cluster, micro_batch_size=t.batch, max_restarts=0))
    t0 = time.perf_counter()
    if prompts:
        model_checks(check_run, spec, hf_config, prompts)
        if cfg.cluster.executor == "ray":
            import ray

            from pipelines.lens import connect_ray

            connect_ray(cfg.cluster)
            ray.get(ray.remote(Coordinator).options(num_cpus=0).remote(spec).run.remote(prompts))
        else:
            Coordinator(spec).run(prompts)
    wall = time.perf_counter() - t0
    losses = step_losses(out_dir, t.batch)
    meta = {
        "model": cfg.model.name, "revision": cfg.model.revision, "tokens_seen": t.steps * t.batch * d.tokens,
        "final_loss": {str(k): v[-1] for k, v in losses.items()}, "config": OmegaConf.to_container(cfg),
        "heldout_documents": len(heldout),
    }  # fmt: skip
    path = merge_stage_checkpoints(
        ck, n_stages, t.steps, hf_config.hidden_size, out_dir / "translators.safetensors", meta
    )
    plot_losses(losses, out_dir / "loss.png")
    (out_dir / "heldout.json").write_text(json.dumps(heldout))
    print(f"translators: {path} ({t.steps} steps of {t.batch} x {d.tokens} tokens; {wall:.0f} s this run)")
    for layer, curve in sorted(losses.items()):
        print(f"layer {layer:>3}: KL to the final layer {curve[0]:.3f} -> {curve[-1]:.3f} nats")
    return {"translators": str(path), "wall_s": wall, "losses": losses}


def step_losses(out_dir: Path, batch: int) -> dict[int, list[float]]:
    """Each layer's mean training KL per step (before that step's update), from the run's stores."""
    from actors.store import LensStore

    stores = sorted(out_dir.glob("train.from*.zarr"), key=lambda p: int(p.name[10:].split(".")[0]))
    curves: dict[int, list[float]] = {}
    for path in stores:
        store = LensStore.open(path)
        kl = store["kl_to_final"][:, :, 0]  # [row, layer, position]
        for li, layer in enumerate(store.layers):
            if np.isnan(kl[:, li]).all():
                continue  # the last layer: no translator
            per_row = np.nanmean(kl[:, li], axis=1)
            steps = per_row[: len(per_row) // batch * batch].reshape(-1, batch).mean(axis=1)
            curves.setdefault(layer, []).extend(float(x) for x in steps)
    return curves


def plot_losses(curves: dict[int, list[float]], path: Path) -> Path:
    from pipelines.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    for i, (layer, curve) in enumerate(sorted(curves.items())):
        ax.plot(range(1, len(curve) + 1), curve, color=cmap(i / max(1, len(curves) - 1)), lw=1, label=f"layer {layer}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(final || tuned lens), nats")
    ax.set_yscale("log")
    ax.set_title("tuned-lens training, per layer (before each step's update)", fontsize=9)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@hydra.main(version_base=None, config_path="../conf", config_name="tune")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from actors.store import StoreError

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, StoreError, ValueError) as err:
        exit_with_error(str(err))


if __name__ == "__main__":
    from pipelines.config import TuneConf, check_overrides

    check_overrides(TuneConf)
    main()
