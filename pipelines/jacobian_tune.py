"""`python -m pipelines.tune lens=jacobian`: fit the Jacobian lens (actors/jacobian_lens.py) on
the pipeline's own stages, the backward stage to stage (actors/jacobian_coordinator.py), on the
tuned lens's corpus and training split. Writes `jacobian_lens.safetensors` and, beside it,
`fit_sequences.jsonl` (the token ids fitted on, one JSON list per line); checkpoints every
`jacobian.save_every` micro-batches (partial fits: sums and counts), which `resume=true`
continues from. `merge=[a,b,...]` writes the merge of partial fits (files or run folders).
`evaluate=true` then compares it with the logit lens (and the tuned lens of `tuned_lens=<file>`)
on the held-out split, as the tuned lens's evaluation does (pipelines/tune.py: eval.json/md/png);
on a run folder that already holds a fit, it evaluates that fit without fitting again."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines import session
from pipelines.config import ConfigError, at_least, cluster_settings, model_checks

SEQUENCES_FILE = "fit_sequences.jsonl"


def validate(cfg) -> None:
    j = cfg.jacobian
    for name in ("block", "sequences", "batch", "save_every"):
        at_least(f"jacobian.{name}", j[name], 1)
    at_least("jacobian.skip", j.skip, 0)
    at_least("data.tokens", cfg.data.tokens, 2)
    if not 0 < cfg.data.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={cfg.data.heldout_fraction} is out of range: must be in (0, 1)")
    if j.skip >= cfg.data.tokens:
        raise ConfigError(
            f"jacobian.skip={j.skip} leaves no source position in sequences of data.tokens={cfg.data.tokens}: "
            "must be < data.tokens"
        )
    if cfg.cluster.tp_size != 1:
        raise ConfigError(
            f"cluster.tp_size={cfg.cluster.tp_size}: the Jacobian lens is fitted on tp_size=1 pipeline stages "
            "(no backward through DeepSpeed AutoTP's all-reduce); split the model with cluster.num_stages"
        )


def run(cfg, out_dir: Path, corpus: Callable, evaluate: Callable) -> dict:
    """Fit (or with `merge`, merge), then with `evaluate=true` evaluate the fit in `out_dir` beside
    the logit lens and the `tuned_lens` given, on the held-out split; with `evaluate=true` a fit
    already in `out_dir` is evaluated as it is, not fitted again. `corpus(cfg, out_dir,
    checkpoint)`: the training split's sequences, as the tuned lens trains on them;
    `evaluate(cfg, out_dir, checkpoint, files)`: the tuned lens's evaluation (pipelines/tune.py)."""
    from actors.checkpoint import resolve_checkpoint
    from actors.run_spec import check_cluster

    validate(cfg)
    if cfg.merge and not cfg.evaluate:
        return merge(list(cfg.merge), out_dir)
    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    model_checks(check_cluster, cluster_settings(cfg.cluster), hf_config)
    tuned = tuned_lens(cfg, hf_config)
    result = merge(list(cfg.merge), out_dir) if cfg.merge else fitted(cfg, out_dir, checkpoint, corpus)
    if cfg.evaluate:
        files = {"jacobian": result["jacobian_lens"], **({"tuned": tuned} if tuned else {})}
        result["evaluation"] = evaluate(cfg, out_dir, checkpoint, files)
    return result


def tuned_lens(cfg, hf_config) -> str | None:
    """`tuned_lens`: the translators file evaluate=true compares with (resolved), checked from its
    header against this model before anything is fitted; None when not given."""
    from actors.tuned_lens import check_translators

    if cfg.tuned_lens is None:
        return None
    path = str(Path(cfg.tuned_lens).expanduser().resolve())
    try:
        check_translators(path, cfg.model.name, hf_config.hidden_size, hf_config.num_hidden_layers)
    except ValueError as err:  # its message names capture.tuned_lens, the lens driver's key
        raise ConfigError("tuned_lens" + str(err).removeprefix("capture.tuned_lens")) from None
    return path


def fitted(cfg, out_dir: Path, checkpoint, corpus: Callable) -> dict:
    """The fit in `out_dir`: made here, continued (`resume=true`), or the one already finished
    there (with `resume=true` or `evaluate=true`)."""
    from actors.jacobian_lens import FILE_NAME

    final, ck = out_dir / FILE_NAME, out_dir / "checkpoints"
    if final.is_file():
        if not (cfg.resume or cfg.evaluate):
            raise ConfigError(
                f"{out_dir} already holds a Jacobian lens ({FILE_NAME}): give another storage.run, "
                "or evaluate=true to evaluate it"
            )
        print(f"[distlens] already fitted: {final}", file=sys.stderr)
        return {"jacobian_lens": str(final)}
    if not cfg.resume and ck.exists() and any(ck.glob("jacobian.mb*.safetensors")):
        raise ConfigError(
            f"{out_dir} already holds a Jacobian-lens fit: pass resume=true to continue it, or another storage.run"
        )
    d = checkpoint.config().hidden_size
    if d % cfg.jacobian.block:
        raise ConfigError(f"jacobian.block={cfg.jacobian.block} does not divide d_model={d}: choose a divisor of {d}")
    out_dir.mkdir(parents=True, exist_ok=True)
    seqs = choose(cfg, corpus(cfg, out_dir, checkpoint))
    return fit(cfg, out_dir, checkpoint, seqs)


def choose(cfg, seqs: list[list[int]]) -> list[list[int]]:
    """`jacobian.sequences` of the training sequences, in a seeded order (`data.seed`)."""
    if not seqs:
        raise ConfigError(f"data.tokens={cfg.data.tokens}: the training text holds no sequence that long")
    order = np.random.default_rng(cfg.data.seed).permutation(len(seqs))[: cfg.jacobian.sequences]
    if len(order) < cfg.jacobian.sequences:
        print(f"[distlens] jacobian.sequences={cfg.jacobian.sequences}: the corpus holds {len(order)}; fitting on those",
              file=sys.stderr)  # fmt: skip
    return [seqs[i] for i in order]


def fit(cfg, out_dir: Path, checkpoint, seqs: list[list[int]]) -> dict:
    from actors.jacobian_coordinator import JacobianCoordinator
    from actors.jacobian_fit import FitSpec
    from actors.jacobian_lens import FILE_NAME, save_fit

    j, ck = cfg.jacobian, out_dir / "checkpoints"
    plan = plan_digest(seqs, j.batch, j.skip)
    base, first = resume_point(ck, plan) if cfg.resume else (None, 0)
    spec = FitSpec(block=j.block, skip=j.skip)
    coordinator = JacobianCoordinator(
        str(checkpoint.path), checkpoint.config(), cfg.cluster.num_stages, spec, executor(cfg),
        dtype=cfg.model.dtype, device=cfg.cluster.device, model=cfg.model.name, revision=cfg.model.revision or "",
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        result = coordinator.fit(
            seqs, j.batch, base, first, j.save_every, lambda f, done: save_checkpoint(ck, f, done, plan), cfg.progress
        )
    finally:
        coordinator.close()
    wall = time.perf_counter() - t0
    aside = out_dir / (SEQUENCES_FILE + ".partial")
    aside.write_text("".join(json.dumps(s) + "\n" for s in seqs), encoding="utf-8")
    aside.replace(out_dir / SEQUENCES_FILE)
    path = save_fit(
        out_dir / FILE_NAME, result, extra={"block": j.block, "batch": j.batch, "data_tokens": cfg.data.tokens}
    )
    n_new = len(seqs) - first * j.batch
    print(
        f"jacobian lens: {path} ({result.sequences} sequences, {result.tokens} tokens, {result.positions} source "
        f"positions; this run {n_new} sequences in {wall:.0f} s, {n_new / max(wall, 1e-9):.3g} seq/s, "
        f"{n_new * result.d_model / max(wall, 1e-9):.0f} output dims/s)"
    )
    return {"jacobian_lens": str(path), "wall_s": wall, "sequences": result.sequences, "tokens": result.tokens}


def executor(cfg):
    """A new executor of `cfg.cluster` for this fit (Ray connected first); no stage restarts."""
    from dataclasses import replace

    from actors.executor import LocalExecutor, RayExecutor

    if cfg.cluster.executor != "ray":
        return LocalExecutor()
    session.connect(cfg.cluster)
    return RayExecutor.for_cluster(replace(cluster_settings(cfg.cluster), max_restarts=0))


def plan_digest(seqs: list[list[int]], batch: int, skip: int) -> str:
    """What a checkpoint belongs to: the sequences, in order, their micro-batches and skip."""
    return hashlib.sha256(json.dumps([batch, skip, seqs]).encode()).hexdigest()[:16]


def save_checkpoint(ck: Path, fit, done: int, plan: str) -> Path:
    """The fit of the first `done` micro-batches (float64 sums), the older checkpoints removed."""
    import torch

    from actors.jacobian_lens import save_fit

    ck.mkdir(parents=True, exist_ok=True)
    path = save_fit(ck / f"jacobian.mb{done}.safetensors", fit, {"micro_batches": done, "plan": plan}, torch.float64)
    for old in ck.glob("jacobian.mb*.safetensors"):
        if old != path:
            old.unlink()
    return path


def resume_point(ck: Path, plan: str) -> tuple:
    """(the latest checkpoint's fit, micro-batches it holds), or (None, 0) with none."""
    from actors.jacobian_lens import load_fit, read_meta

    found = sorted(ck.glob("jacobian.mb*.safetensors"), key=lambda p: int(p.name[len("jacobian.mb") :].split(".")[0]))
    if not found:
        return None, 0
    meta = read_meta(found[-1], "resume")
    if meta.get("plan") != plan:
        raise ConfigError(
            f"resume=true: the checkpoint {found[-1]} was fitted on other sequences or jacobian.batch/skip: "
            "resume with the settings it was started with, or give another storage.run"
        )
    print(f"[distlens] resuming the Jacobian fit after {meta['micro_batches']} micro-batches", file=sys.stderr)
    return load_fit(found[-1], where="resume"), int(meta["micro_batches"])


def merge(paths: list[str], out_dir: Path) -> dict:
    """`merge=[...]`: one fit from partial fits (each a file or a run folder holding one); their
    fit_sequences.jsonl are joined when every one has it."""
    from actors.jacobian_lens import FILE_NAME, load_fit, merge_fits, save_fit

    files = [Path(p).expanduser() / FILE_NAME if Path(p).expanduser().is_dir() else Path(p).expanduser() for p in paths]
    final = out_dir / FILE_NAME
    if final.exists():
        raise ConfigError(f"{out_dir} already holds a Jacobian lens ({FILE_NAME}): give another storage.run")
    fits = [load_fit(f, where="merge") for f in files]  # refused in one line: missing, not a fit
    try:
        merged = merge_fits(fits)
    except ValueError as err:  # another model, hidden size, skip or layers
        raise ConfigError(
            f"merge={[str(f) for f in files]}: {err}; merge only fits of one model, hidden size, skip and layers"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = [f.with_name(SEQUENCES_FILE) for f in files]
    if all(p.is_file() for p in listed):
        aside = out_dir / (SEQUENCES_FILE + ".partial")
        aside.write_text("".join(p.read_text(encoding="utf-8") for p in listed), encoding="utf-8")
        aside.replace(out_dir / SEQUENCES_FILE)
    path = save_fit(final, merged, extra={"merged": [str(f) for f in files]})
    print(f"jacobian lens: {path} (merged {len(fits)} fits: {merged.sequences} sequences, {merged.tokens} tokens)")
    return {"jacobian_lens": str(path), "sequences": merged.sequences}
