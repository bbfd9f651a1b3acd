"""A causal trace's work (pipelines/trace.py is its driver; `distlens.trace` runs it from a
notebook): the config and pairs checked, trace.zarr created or resumed, every pair's cells run on
the stages (actors/tracing.py) with a progress bar, then the heatmaps, trace.html and trace.json."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipelines import session
from pipelines.config import ConfigError


def run(cfg, out_dir: Path) -> dict:
    from actors.checkpoint import load_tokenizer, resolve_checkpoint
    from actors.progress import progress_bar
    from actors.tracing import InterventionRunner
    from pipelines.config import check_trace
    from pipelines.trace_pairs import read_pairs
    from pipelines.trace_store import TraceStore, write_pictures

    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    hf_config = checkpoint.config()
    sites, layers = check_trace(cfg, hf_config)
    try:
        tokenizer = load_tokenizer(str(checkpoint.path))
    except Exception as err:
        raise ConfigError(f"model.name={cfg.model.name!r} has no tokenizer to read the pairs with ({err})") from None
    pairs, texts, identity = read_pairs(cfg.pairs, tokenizer)
    attrs = {
        "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": cfg.model.dtype},
        "pairs": identity, "sites": list(sites), "layers": list(layers),
        "estimator": "target log-prob at the last position; recovery = (patched - corrupt) / (clean - corrupt); "
        "patches restore resid_post/attn_out/mlp_out of the clean run at one position, aligned from the start",
    }  # fmt: skip
    path = out_dir / "trace.zarr"
    if path.exists() and cfg.resume:
        store = TraceStore.open(path, attrs)
    elif path.exists() and not cfg.overwrite:
        raise ConfigError(
            f"{path} exists: run the same command with resume=true to continue it, or overwrite=true to replace it"
        )
    else:
        shutil.rmtree(path, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        store = TraceStore.create(path, pairs, texts, sites, layers, attrs)
    todo = [i for i, done in enumerate(store.done) if not done]
    cells = {i: len(sites) * len(layers) * len(pairs[i].corrupt) for i in range(len(pairs))}
    score_ids = sorted({p.target for p in pairs} | {p.foil for p in pairs if p.foil is not None})
    started = time.perf_counter()
    runner = InterventionRunner(
        checkpoint.path, hf_config, cfg.cluster.num_stages, session.executor_for(cfg),
        [(layer, site) for layer in layers for site in sites], score_ids, cfg.cluster.micro_batch_size,
        cfg.model.dtype, cfg.cluster.device, tokenizer.pad_token_id or 0,
    )  # fmt: skip
    loaded = time.perf_counter()
    bar = progress_bar(sum(cells[i] for i in todo), "causal trace (cells)", cfg.progress)
    run_cells = 0
    for i in todo:
        store.write(i, runner.trace_pair(pairs[i], i, sites, layers))
        run_cells += cells[i]
        bar.update(cells[i])
        bar.set_postfix_str(f"pair {i + 1}/{len(pairs)}, {run_cells / (time.perf_counter() - loaded):.1f} cells/s")
    bar.close()
    wall = time.perf_counter() - loaded
    summary = {
        "pairs": len(pairs), "pairs_run": len(todo), "cells": sum(cells.values()), "cells_run": run_cells,
        "load_s": round(loaded - started, 3), "trace_s": round(wall, 3),
        "cells_per_s": round(run_cells / wall, 3) if run_cells else None,
    }  # fmt: skip
    store.complete(summary)
    pictures = write_pictures(path, out_dir, tokenizer)
    summary.update(store=str(path), pictures=[str(p) for p in pictures], page=str(out_dir / "trace.html"))
    (out_dir / "trace.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[distlens] causal trace: {summary['cells']} cells of {len(pairs)} pairs in {path}; {out_dir / 'trace.html'}"
    )
    return summary
