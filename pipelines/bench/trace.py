"""The causal-trace benchmark (issue 31, item 4): the same trace grid on SmolLM2 (the test
fixtures' factual-recall pairs), in one run and on the same stages, two ways in turn:

- batched: pipelines.trace's way: every cell a row of micro-batches of `--micro-batch` rows, a
  cell at a layer of stage s taking the corrupted run's input to stage s (actors/tracing.py);
- one run per cell: each cell its own pass of one row through every stage, waited for before
  the next, with the clean source row run once per pair and kept (kinder to the baseline than
  re-running it per cell).

Reports cells/s of each and their ratio (target >= 5x), and checks the two grids agree.

`python -m pipelines.bench.trace [--pairs 4] [--sites resid_post] [--stages 2] [--micro-batch 32]
[--executor local|ray] [--out DIR]`
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PAIRS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "trace_pairs.jsonl"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--sites", default="resid_post")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--out", default="outputs/bench/trace")
    args = ap.parse_args(argv)

    from actors.checkpoint import resolve_checkpoint
    from actors.executor import LocalExecutor, RayExecutor
    from actors.tracing import InterventionRunner
    from pipelines.trace_pairs import read_pairs

    checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    config, tokenizer = checkpoint.config(), checkpoint.tokenizer()
    pairs, _, _ = read_pairs(str(PAIRS), tokenizer)
    pairs = pairs[: args.pairs]
    sites, layers = args.sites.split(","), list(range(config.num_hidden_layers))
    if args.executor == "ray":
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    executor = RayExecutor() if args.executor == "ray" else LocalExecutor()
    score_ids = sorted({p.target for p in pairs} | {p.foil for p in pairs if p.foil is not None})
    runner = InterventionRunner(
        checkpoint.path, config, args.stages, executor, [(la, s) for la in layers for s in sites], score_ids,
        args.micro_batch,
    )  # fmt: skip
    runner.trace_pair(pairs[0], 0, sites, layers[-1:])  # warm-up: the first calls' allocations
    results, grids = {}, {}
    for mode in ("batched", "one_run_per_cell"):
        started, cells, grids[mode] = time.perf_counter(), 0, []
        for i, pair in enumerate(pairs):
            out = runner.trace_pair(pair, i, sites, layers, one_at_a_time=mode != "batched")
            cells += out["cells"]
            grids[mode].append(out["target"])
            print(f"[bench.trace] {mode}: pair {i + 1}/{len(pairs)}, {cells} cells", flush=True)
        wall = time.perf_counter() - started
        results[mode] = {"cells": cells, "wall_s": round(wall, 3), "cells_per_s": round(cells / wall, 3)}
    runner.close()
    diff = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(grids["batched"], grids["one_run_per_cell"]))
    ratio = results["batched"]["cells_per_s"] / results["one_run_per_cell"]["cells_per_s"]
    report = {
        "model": "smollm2-135m-instruct", "pairs": len(pairs), "sites": sites, "layers": len(layers),
        "stages": args.stages, "micro_batch": args.micro_batch, "executor": args.executor, **results,
        "speedup": round(ratio, 2), "target": ">= 5x", "met": ratio >= 5,
        "max_abs_difference_of_target_logprob": diff,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
