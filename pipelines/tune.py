"""`python -m pipelines.tune`: train a tuned lens (one affine translator per layer) on the
pipeline's own stages, and with `evaluate=true` compare it with the logit lens on held-out text;
`lens=jacobian` fits the Jacobian lens on the same corpus and split (pipelines/jacobian_tune.py),
and with `evaluate=true` compares it with the logit lens and the tuned lens of `tuned_lens=<file>`.
Each stage trains its layers' translators against the final distribution rebuilt from the
final-normed states the last stage sends back; one optimizer step per micro-batch of
`train.batch` sequences of `data.tokens` tokens. Writes the translators (safetensors with
metadata), per-stage checkpoints (`resume=true` continues from the latest step every stage
saved), `train.zarr` (each step's KL before the update, per layer and position), `loss.png`, and
with `evaluate=true` `heldout.zarr` (every lens compared), `eval.json`, `eval.md` and `eval.png`.

Training text: files given by path (`.txt`: paragraphs; `.jsonl`: `text`, `question` or
`statement`), or by default the shared behaviour datasets' questions, chat-templated, each
followed by the model's own sampled continuation (`corpus.jsonl`, made once per run). The lens
is distilled from the model itself, so any text the model reads is sound training data;
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

from pipelines import session
from pipelines.config import ConfigError, at_least, choice, cluster_settings, model_checks, register, run_spec
from pipelines.datasets import documents

register()


def default_corpus(cfg, checkpoint, tokenizer, out_dir: Path) -> list[str]:
    """The shared datasets' questions (a seeded shuffle, at most `data.max_documents`), each
    rendered as a chat prompt and followed by the model's own sampled continuation: made once
    by a generation run of the pipeline and kept in `corpus.jsonl` (resume and evaluate reuse it)."""
    from actors.run_spec import CaptureSettings, GenerationSettings
    from actors.sampling import SamplingSpec
    from pipelines.datasets import dataset_root
    from pipelines.prompts import encode_prompt, render_prompt, special_ids

    cached = out_dir / "corpus.jsonl"
    if cached.is_file():
        return [json.loads(line)["text"] for line in cached.read_text(encoding="utf-8").splitlines()]
    root = dataset_root(None)
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise ConfigError(f"data.paths=[] and no .jsonl files in {root}: give text or JSONL files")
    questions = documents([str(f) for f in files])
    random.Random(cfg.data.seed).shuffle(questions)
    questions = questions[: cfg.data.max_documents]
    prompts = [render_prompt(tokenizer, q) for q in questions]
    d = cfg.data
    if d.continuation_tokens:
        eos, pad = special_ids(tokenizer, checkpoint.config())
        spec = run_spec(
            cfg, str(checkpoint.path), str(out_dir / "corpus.zarr"), "overwrite",
            capture=CaptureSettings(layers=(), kl_to_final=False),
            generation=GenerationSettings(d.continuation_tokens, SamplingSpec(
                temperature=d.temperature, seed=d.seed, eos_token_ids=eos, pad_token_id=pad)),
        )  # fmt: skip
        from dataclasses import replace

        spec = replace(spec, cluster=replace(spec.cluster, micro_batch_size=d.generate_batch))
        print(
            f"[distlens] sampling {d.continuation_tokens} tokens after each of {len(prompts)} questions",
            file=sys.stderr,
        )
        coordinate(cfg, spec, [encode_prompt(tokenizer, q) for q in questions], checkpoint)
        from actors.store import LensStore

        store = LensStore.open(out_dir / "corpus.zarr")
        by_source = dict(zip(store["source"].tolist(), (str(t) for t in store.group["generated_text"][:])))
        prompts = [prompt + by_source[i] for i, prompt in enumerate(prompts)]
    aside = cached.with_suffix(".partial")
    aside.write_text("".join(json.dumps({"text": t}) + "\n" for t in prompts), encoding="utf-8")
    aside.rename(cached)
    return prompts


def coordinate(cfg, spec, prompts: list[list[int]], checkpoint) -> dict:
    """One pipeline run of `spec` over `prompts` on the configured executor, the coordinator in
    this process (pipelines/session.py)."""
    from actors.run_spec import check_run

    model_checks(check_run, spec, checkpoint.config(), prompts)
    session.connect(cfg.cluster)
    return session.run_coordinator(spec, prompts)


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


def training_sequences(cfg, out_dir: Path, checkpoint) -> list[list[int]]:
    """The training split's `data.tokens`-token sequences (the held-out documents written to
    heldout.json), as `train` cuts them: what the Jacobian lens is fitted on."""
    from pipelines.prompts import special_ids

    d, tokenizer = cfg.data, checkpoint.tokenizer()
    docs = documents(list(d.paths)) if d.paths else default_corpus(cfg, checkpoint, tokenizer, out_dir)
    train_docs, heldout = split_documents(docs, d.heldout_fraction, d.seed)
    (out_dir / "heldout.json").write_text(json.dumps(heldout))
    eos, _ = special_ids(tokenizer, checkpoint.config())
    return sequences(tokenizer, train_docs, d.tokens, eos[0] if eos else 0)


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
    for name in ("max_documents", "generate_batch", "heldout_sequences"):
        at_least(f"data.{name}", d[name], 1)
    at_least("data.continuation_tokens", d.continuation_tokens, 0)
    choice("train.schedule", t.schedule, ("constant", "linear", "cosine"))
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} is out of range: must be > 0")
    if not d.temperature >= 0:
        raise ConfigError(f"data.temperature={d.temperature} is out of range: must be >= 0")
    if not 0 < d.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} is out of range: must be in (0, 1)")
    if cfg.cluster.tp_size != 1:
        raise ConfigError(f"cluster.tp_size={cfg.cluster.tp_size}: tuned-lens training runs tp_size=1 stages")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train (unless `evaluate=true` finds this run's translators already made), then evaluate;
    `lens=jacobian`: fit the Jacobian lens instead (pipelines/jacobian_tune.py)."""
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_cluster

    choice("lens", cfg.lens, ("tuned", "jacobian"))
    if cfg.tuned_lens is not None and not (cfg.lens == "jacobian" and cfg.evaluate):
        raise ConfigError(
            f"tuned_lens={cfg.tuned_lens!r} is the tuned lens that lens=jacobian evaluate=true compares with: "
            "give both, or drop it (lens=tuned evaluates its own translators)"
        )
    if cfg.lens == "jacobian":
        from pipelines import jacobian_tune

        return jacobian_tune.run(cfg, out_dir, training_sequences, evaluate)
    if cfg.merge:
        raise ConfigError("merge=[...] merges Jacobian-lens fits: give lens=jacobian")
    validate_tune(cfg)
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    model_checks(check_cluster, cluster_settings(cfg.cluster), checkpoint.config())
    translators = out_dir / "translators.safetensors"
    result = {}
    if not (cfg.evaluate and translators.is_file() and not cfg.resume):
        result = train(cfg, out_dir, checkpoint)
    if cfg.evaluate:
        result["evaluation"] = evaluate(cfg, out_dir, checkpoint, {"tuned": str(translators)})
    return result


def train(cfg: DictConfig, out_dir: Path, checkpoint) -> dict:
    from dataclasses import replace

    from actors.run_spec import CaptureSettings, GenerationSettings
    from actors.sampling import SamplingSpec
    from actors.slicing import plan_stages
    from actors.tuned_lens import TuneSpec, merge_stage_checkpoints
    from pipelines.prompts import special_ids

    hf_config = checkpoint.config()
    tokenizer = checkpoint.tokenizer()
    d, t = cfg.data, cfg.train
    ck = out_dir / "checkpoints"
    if not cfg.resume and ck.exists() and any(ck.iterdir()):
        raise ConfigError(
            f"{out_dir} already holds a tuned-lens run: pass resume=true to continue it, or another storage.run"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = documents(list(d.paths)) if d.paths else default_corpus(cfg, checkpoint, tokenizer, out_dir)
    train_docs, heldout = split_documents(docs, d.heldout_fraction, d.seed)
    (out_dir / "heldout.json").write_text(json.dumps(heldout))
    eos, _ = special_ids(tokenizer, hf_config)
    seqs = sequences(tokenizer, train_docs, d.tokens, eos[0] if eos else 0)
    if not seqs:
        raise ConfigError(f"data.tokens={d.tokens}: the training text holds no sequence that long")
    rng = np.random.default_rng(t.seed)
    need = t.steps * t.batch  # epochs over the sequences, each in its own seeded order
    order = np.concatenate([rng.permutation(len(seqs)) for _ in range(-(-need // len(seqs)))])[:need]
    n_stages = len(plan_stages(hf_config, cfg.cluster.num_stages))
    start = latest_step(ck, n_stages) if cfg.resume else 0
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
    spec = replace(spec, tune=spec_tune, cluster=replace(spec.cluster, micro_batch_size=t.batch, max_restarts=0))
    (out_dir / "sequences.json").write_text(json.dumps({  # the same data for other trainers (the benchmark's)
        "train": [seqs[i] for i in order], "heldout": sequences(tokenizer, heldout, d.tokens, eos[0] if eos else 0),
        "steps": t.steps, "batch": t.batch, "lr": t.lr, "warmup": t.warmup, "weight_decay": t.weight_decay,
        "betas": list(t.betas), "schedule": t.schedule, "seed": t.seed,
    }))  # fmt: skip
    t0 = time.perf_counter()
    if prompts:
        coordinate(cfg, spec, prompts, checkpoint)
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
    tokens = len(prompts) * d.tokens
    print(
        f"translators: {path} ({t.steps} steps of {t.batch} x {d.tokens} tokens; this run {len(prompts) // t.batch} "
        f"steps, {tokens} tokens in {wall:.0f} s, {tokens / max(wall, 1e-9):.0f} tokens/s)"
    )
    for layer, curve in sorted(losses.items()):
        print(f"layer {layer:>3}: KL to the final layer {curve[0]:.3f} -> {curve[-1]:.3f} nats")
    return {"translators": str(path), "wall_s": wall, "tokens": tokens, "losses": losses}


def evaluate(cfg: DictConfig, out_dir: Path, checkpoint, files: dict[str, str]) -> dict:
    """The logit lens and the lenses of `files` ({"tuned": translators, "jacobian": J-lens file})
    over the held-out documents (cut into `data.tokens`-token sequences, at most
    `data.heldout_sequences`): per layer, the mean KL to the final layer and the top-1 agreement
    with the final layer's top token. Writes heldout.zarr, eval.json, eval.md, eval.png."""
    from actors.run_spec import CaptureSettings, GenerationSettings
    from actors.sampling import SamplingSpec
    from actors.store import LensStore
    from actors.vocabulary import LENSES
    from pipelines.prompts import special_ids

    tokenizer = checkpoint.tokenizer()
    d = cfg.data
    eos, _ = special_ids(tokenizer, checkpoint.config())
    seqs = sequences(tokenizer, heldout_documents(cfg, out_dir, checkpoint), d.tokens, eos[0] if eos else 0)
    seqs = seqs[: d.heldout_sequences]
    if not seqs:
        raise ConfigError(f"data.tokens={d.tokens}: the held-out documents hold no sequence that long")
    lenses = tuple(lens for lens in LENSES if lens == "logit" or lens in files)
    spec = run_spec(
        cfg, str(checkpoint.path), str(out_dir / "heldout.zarr"), "overwrite",
        capture=CaptureSettings(layers=None, components=("resid_post",), k=1, window=d.tokens + 1, lenses=lenses,
                                tuned_lens=files.get("tuned"), jacobian_lens=files.get("jacobian")),
        generation=GenerationSettings(1, SamplingSpec(eos_token_ids=(), pad_token_id=0)),
        attrs={"model": {"name": cfg.model.name, "revision": cfg.model.revision}, "config": OmegaConf.to_container(cfg)},
    )  # fmt: skip
    coordinate(cfg, spec, seqs, checkpoint)
    table = lens_agreement(LensStore.open(out_dir / "heldout.zarr"))
    table["heldout_tokens"] = len(seqs) * d.tokens
    (out_dir / "eval.json").write_text(json.dumps(table, indent=1))
    (out_dir / "eval.md").write_text(eval_markdown(table))
    plot_evaluation(table, out_dir / "eval.png", cfg.model.name)
    print(eval_markdown(table))
    return table


def heldout_documents(cfg, out_dir: Path, checkpoint) -> list[str]:
    """The run's held-out documents: heldout.json, written when the lens was trained or fitted
    here; for a lens made elsewhere (a merge, a file put there), the split `data.*` makes, written
    there now."""
    path = out_dir / "heldout.json"
    if not path.is_file():
        training_sequences(cfg, out_dir, checkpoint)
    return json.loads(path.read_text())


def lens_agreement(store) -> dict:
    """Per captured layer (resid_post): mean KL(final || lens) in nats and the fraction of
    positions whose lens top-1 is the final layer's top-1, for every lens the store records
    (`{lens}_kl`, `{lens}_top1`; `lenses` lists them, the logit lens first)."""
    mask = store["lens_mask"]  # [row, position]
    ci = store.components.index("resid_post")
    final_top = store["topk_ids"][:, -1, ci, :, 0]  # the last layer's lens is the final distribution
    table = {"layers": store.layers, "lenses": store.lenses}
    for lens in store.lenses:
        kl = store.field("kl_to_final", lens)[:, :, ci]  # [row, layer, position]
        top = store.field("topk_ids", lens)[:, :, ci, :, 0]
        table[f"{lens}_kl"] = [float(kl[:, li][mask].mean()) for li in range(len(store.layers))]
        table[f"{lens}_top1"] = [float((top[:, li] == final_top)[mask].mean()) for li in range(len(store.layers))]
    table["positions"] = int(mask.sum())
    return table


def eval_markdown(t: dict) -> str:
    """`lens_agreement`'s table in markdown: a KL column, then a top-1 column, per lens."""
    lenses = t["lenses"]
    columns = [f"{lens} KL" for lens in lenses] + [f"{lens} top-1" for lens in lenses]
    lines = [
        f"Held-out: {t['positions']} positions. KL(final || lens) in nats, and top-1 agreement with the final layer.",
        "",
        "| layer | " + " | ".join(columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for i, layer in enumerate(t["layers"]):
        cells = [f"{t[f'{lens}_kl'][i]:.3f}" for lens in lenses] + [f"{t[f'{lens}_top1'][i]:.2f}" for lens in lenses]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LENS_COLORS = {"logit": "tab:gray", "tuned": "tab:blue", "jacobian": "tab:orange"}


def plot_evaluation(t: dict, path: Path, model: str) -> Path:
    from pipelines.plots import pyplot

    lenses = t["lenses"]
    plt = pyplot()
    fig, (kl_ax, top_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for lens in lenses:
        kl_ax.plot(t["layers"], t[f"{lens}_kl"], marker="o", ms=3, color=LENS_COLORS[lens], label=f"{lens} lens")
        top_ax.plot(t["layers"], t[f"{lens}_top1"], marker="o", ms=3, color=LENS_COLORS[lens], label=f"{lens} lens")
    kl_ax.set_yscale("symlog", linthresh=0.01)
    kl_ax.set_ylabel("KL(final || lens), nats (held-out mean)")
    top_ax.set_ylabel("top-1 agreement with the final layer")
    top_ax.set_ylim(0, 1.02)
    for ax in (kl_ax, top_ax):
        ax.set_xlabel("layer (resid_post)")
        ax.legend(fontsize=8)
    title = " vs ".join(reversed(lenses))
    fig.suptitle(f"{title} lens on held-out text, {model} ({t['positions']} positions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def step_losses(out_dir: Path, batch: int) -> dict[int, list[float]]:
    """Each layer's mean training KL per step (before that step's update), from the run's
    stores: `train.from<S>.zarr` holds steps S+1.. until the next resumed run's start."""
    import warnings

    from actors.store import LensStore

    starts = sorted(int(p.name[10:].split(".")[0]) for p in out_dir.glob("train.from*.zarr"))
    curves: dict[int, list[float]] = {}
    for start, stop in zip(starts, [*starts[1:], None]):
        store = LensStore.open(out_dir / f"train.from{start}.zarr")
        kl = store["kl_to_final"][:, :, 0]  # [row, layer, position]
        for li, layer in enumerate(store.layers):
            if np.isnan(kl[:, li]).all():
                continue  # the last layer: no translator
            with warnings.catch_warnings():  # rows a killed run never wrote are all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                per_row = np.nanmean(kl[:, li], axis=1)
            steps = per_row[: len(per_row) // batch * batch].reshape(-1, batch).mean(axis=1)
            steps = steps if stop is None else steps[: stop - start]
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

    with session.refusals():
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import TuneConf, check_overrides

    check_overrides(TuneConf)
    head_watch.exit_on_loss()
    main()
