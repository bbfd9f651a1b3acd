"""The CPU suite: named workloads (trajectories of several lengths, the long trajectory, the
scaling workloads, a steering sweep, a steering study, tuned-lens training, Jacobian-lens
fitting, capture against plain generation in rounds) on named systems, each measurement in a
fresh process; `workloads` picks which run.
Writes results.json / results.csv (one row per system x workload x size: median and min/max
over repeats); the report is `report`'s."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.bench import peers
from pipelines.bench.agreement import agreement, like_for_like, same_scores
from pipelines.bench.capture import capture_rows
from pipelines.bench.corpus_workload import corpus_rows
from pipelines.bench.jacobian import jacobian_rows
from pipelines.bench.report import report
from pipelines.bench.settings import check, sweep_dataset_path
from pipelines.bench.study import study_rows
from pipelines.bench.tune import tune_rows
from pipelines.bench.worker import measure

METRICS = (
    "tokens_per_s", "wall_s", "peak_rss", "largest_process_rss", "bytes_written", "positions", "lens_ms_per_row",
    "gemm_gflops", "layers", "lens_share", "bytes_per_row", "compression", "lens_layers", "lens_components",
    "rows_per_s", "rows", "generated_tokens", "row_steps", "useful_row_steps", "slot_occupancy", "sequences_per_s",
    "output_dims_per_s",
)  # fmt: skip


def row(system: str, workload: str, size: int, runs: list[dict], **extra) -> dict:
    """One table row from a measurement's repeats: the median of each figure, its min and max."""
    good = [r for r in runs if "error" not in r]
    out = {"system": system, "workload": workload, "T": size, "repeats": len(good), **extra}
    if not good:
        out["error"] = runs[0]["error"] if runs else "not run"
        return out
    for key in METRICS:
        values = [r[key] for r in good if r.get(key) is not None]
        if values:
            out[key] = float(np.median(values))
            out[f"{key}_min"], out[f"{key}_max"] = float(min(values)), float(max(values))
    return out


def run(cfg, out_dir: Path) -> list[dict]:
    from actors.checkpoint import resolve_checkpoint
    from pipelines.prompts import encode_prompt

    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    tokenizer = checkpoint.tokenizer()
    prompt = encode_prompt(tokenizer, cfg.prompt)
    hf = checkpoint.config()
    check(cfg, hf, len(prompt))
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    base = {"model_path": str(checkpoint.path), "prompt": prompt, "prompts": cfg.prompts, "scratch": str(scratch)}
    rows = []
    chosen = set(cfg.workloads)

    def measure_one(job):
        """One measurement of `job` (over the run's model and prompt) in a fresh process."""
        python = sys.executable
        if job["system"] in peers.ENV_OF:
            try:
                python = peers.peer_python(job["system"])
            except subprocess.CalledProcessError as err:
                return {"error": f"could not install {peers.ENVS[peers.ENV_OF[job['system']]]}: {err}"}
        return measure({**base, **job}, python)

    def bench(label, workload, size, repeats=None, **job):
        # job["T"], where given, is the tokens generated (a sweep's size is its coefficients)
        runs = [measure_one({"T": size, **job}) for _ in range(repeats or cfg.repeats)]
        r = row(label, workload, size, runs, **{k: v for k, v in job.items() if k in ("stages", "executor")})
        rows.append(r)
        # every row as it is measured: a run that stops later keeps what it measured
        (out_dir / "results.partial.json").write_text(json.dumps({"rows": rows}, indent=2))
        if "error" in r:
            shown = f"error: {r['error']}"
        elif workload in ("sweep", "study"):
            shown = f"{r['wall_s']:.3f} s"
        elif workload == "jacobian":
            shown = f"{r['sequences_per_s']:.3f} sequences/s, {r['output_dims_per_s']:.0f} output dims/s"
        elif workload == "lens_floor":
            shown = f"{r['lens_ms_per_row']:.3f} ms per (position, layer); GEMM {r['gemm_gflops']:.0f} GFLOP/s"
        else:
            shown = f"{r['tokens_per_s']:.2f} tokens/s"
        print(f"{workload:>12} T={size:<5} {label:<28} {shown}", flush=True)
        return r, runs[0]

    # the exact lens's own cost here: a ceiling on any system's capture throughput
    if cfg.lens_floor and "lens_floor" in chosen:
        floor, _ = bench("lens_floor", "lens_floor", 0, system="lens_floor")
        floor["prompt_tokens"] = len(prompt)
    long_t = cfg.long_size - len(prompt) if cfg.long_size and "long" in chosen else None
    long_workload = f"trajectory_{cfg.long_size}pos"
    long_ours = {}  # prompts per batch -> (row, run) of distlens at the long size
    if long_t:  # the long trajectory: distlens and plain generation, one repeat (minutes each)
        bench("hf_generate", long_workload, long_t, repeats=1, system="hf_generate")
        for p in cfg.long_prompts:
            r, got = long_ours[p] = bench(long_label(p), long_workload, long_t, repeats=1, system="distlens",
                                          executor="local", stages=2, prompts=p)  # fmt: skip
            r["prompts"] = p
            r.update(long_memory(got))
            if p > 1:
                r["note"] = f"{p} prompts in one batch; tokens/s over all of them"
    for size in cfg.sizes if "trajectory" in chosen else []:
        trajectory_rows(cfg, size, len(prompt), rows, bench)
    if long_t and cfg.baseline_long:  # measured, not extrapolated: the slowest row of the run
        print(f"[bench] paper_baseline at T={long_t}: every token re-runs the whole prefix (about an hour here)",
              flush=True)  # fmt: skip
        base_row, base_run = bench("paper_baseline", long_workload, long_t, repeats=1, system="paper_baseline")
        base_row.update(long_memory(base_run), prompts=1, note="measured; prompts run one at a time")
        if 1 in long_ours:  # like for like: the one-prompt run sees the baseline's trajectory
            ours_row, ours_run = long_ours[1]
            ours_row.update(agreement(ours_run, base_run, len(prompt)))
    elif long_t:
        rows.append(extrapolate_baseline(rows, long_t, cfg.long_size))
    if "scaling" in chosen:
        scaling_rows(cfg, hf, bench)
    if "sweep" in chosen:
        rows += sweep_rows(cfg, tokenizer, hf, bench)
    if cfg.study_datasets and "study" in chosen:
        rows += study_rows(cfg, bench)
    if cfg.tune_steps and "tune" in chosen:
        rows += tune_rows(cfg, bench)
    if "jacobian" in chosen:
        rows += jacobian_rows(cfg, bench)

    def keep(so_far):
        """Every measurement of a workload in rounds as it is made: a run stopped in its rounds keeps them."""
        (out_dir / "results.partial.json").write_text(json.dumps({"rows": rows + so_far}, indent=2))

    if "capture" in chosen:
        rows += capture_rows(cfg, measure_one, row, keep)
    if "corpus" in chosen:
        rows += corpus_rows(cfg, measure_one, row, out_dir, keep)
    write(rows, cfg, out_dir)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    report(rows, out_dir)
    return rows


def trajectory_rows(cfg, size: int, prompt_len: int, rows: list[dict], bench) -> None:
    """The `trajectory` workload at T=`size`: HF generate, distlens (local and Ray, each stage
    count), the peers (checked like for like against distlens), distlens without capture, and
    the paper's baseline with and without capture (up to `baseline_max`)."""
    workload = "trajectory"
    bench("hf_generate", workload, size, system="hf_generate")
    ours = {}
    for executor, counts in (("local", cfg.stages), ("ray", cfg.ray_stages)):
        for stages in counts:
            label = f"distlens_{executor}_{stages}stage"
            _, ours[label] = bench(label, workload, size, system="distlens", executor=executor, stages=stages)
    for peer in cfg.peers:
        if peer == "steering_vectors":
            continue  # a steering peer: measured in the sweep workload
        for label, extra in peers.VARIANTS.get(peer, {peer: {}}).items():
            # like the baseline, a variant without a KV cache takes minutes at the larger sizes
            reps = 1 if extra.get("tl_generate") == "nocache" and size > min(cfg.sizes) else None
            peer_row, peer_run = bench(label, workload, size, repeats=reps, system=peer, **extra)
            peer_row.update(like_for_like(peer_run, ours.get("distlens_local_2stage")))
    nocap, _ = bench("distlens_local_2stage_nocapture", workload, size, system="distlens", executor="local", stages=2,
                     no_capture=True)  # fmt: skip
    if size <= cfg.baseline_max:
        reps = 1 if size > min(cfg.sizes) else None  # the baseline's larger sizes take minutes each
        base_row, base_run = bench("paper_baseline", workload, size, repeats=reps, system="paper_baseline")
        base_nocap, _ = bench(
            "paper_baseline_nocapture", workload, size, repeats=reps, system="paper_baseline", no_capture=True
        )
        for r in rows:
            if r["workload"] == workload and r["T"] == size and r["system"] in ours:
                r.update(agreement(ours[r["system"]], base_run, prompt_len))
        if "peak_rss" in base_row and "peak_rss" in base_nocap:
            base_row["capture_memory"] = base_row["peak_rss"] - base_nocap["peak_rss"]
    for r in rows:
        if (r["workload"] == workload and r["T"] == size and r["system"] == "distlens_local_2stage"
                and "peak_rss" in r and "peak_rss" in nocap):  # fmt: skip
            r["capture_memory"] = r["peak_rss"] - nocap["peak_rss"]


def long_label(prompts: int) -> str:
    return "distlens_local_2stage" if prompts == 1 else f"distlens_local_2stage_batch{prompts}"


def long_memory(run: dict) -> dict:
    """At the long size there is no run without capture to subtract (the baseline's would take
    another hour): capture memory there is the peak RSS above the process's RSS before it
    generates. The baseline's has loaded its model by then (the figure is its kept softmaxes and
    prefix activations); distlens loads its stages inside the run, so its figure holds its model's
    weights too (KV cache, windows and lens besides): the comparison favours the baseline."""
    return {"capture_memory": run["capture_rss"]} if run.get("capture_rss") is not None else {}


def extrapolate_baseline(rows, size: int, positions: int) -> dict:
    """The baseline re-runs the whole prefix per token, so its wall time grows quadratically in
    T: fit the measured sizes and say plainly that the long figure is extrapolated."""
    measured = sorted((r["T"], r["wall_s"]) for r in rows if r["system"] == "paper_baseline" and "wall_s" in r)
    out = {"system": "paper_baseline", "workload": f"trajectory_{positions}pos", "T": size, "extrapolated": True}
    if len(measured) < 2:
        return {**out, "error": "too few measured sizes to extrapolate"}
    t, w = np.array(measured, float).T
    # Token i costs a + b*i (a prefix of i positions re-run), so T tokens cost a*T + b*T^2/2.
    (a, b), *_ = np.linalg.lstsq(np.stack([t, t**2], 1), w, rcond=None)
    wall = float(a * size + b * size**2)
    note = f"fit wall = a*T + b*T^2 to measured T={[int(x) for x in t]}"
    return {**out, "wall_s": wall, "tokens_per_s": size / wall, "note": note}


def spaced_layers(n_layers: int, n: int) -> list[int]:
    """`n` layer indices spread evenly over `n_layers`, first and last included (n=1: the last)."""
    if n == 1:
        return [n_layers - 1]
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, n)})


def scaling_rows(cfg, hf, bench) -> None:
    """`trajectory_components` (resid_post, attn_out and mlp_out at every layer, T=min(sizes)) and
    the scaling workloads at T=scaling_size with distlens local 2-stage: throughput against the
    number of layers captured (T column = layers), and against prompts per batch (T column =
    prompts; with capture, without, and HF generate on the same batch). Throughput against T
    and against stages are the trajectory rows. Rows go to `bench`'s list."""
    local = dict(system="distlens", executor="local", stages=2)
    if cfg.components:
        bench("distlens_local_2stage", "trajectory_components", min(cfg.sizes), components=list(cfg.components),
              **local)  # fmt: skip
    t = cfg.scaling_size
    for n in cfg.scaling_layers:
        r, _ = bench("distlens_local_2stage", "scaling_layers", n, T=t, layers=spaced_layers(hf.num_hidden_layers, n),
                     **local)  # fmt: skip
        r["note"] = f"T={t}; T column = layers captured"
    for p in cfg.scaling_prompts:
        for label, job in (
            ("distlens_local_2stage", local),
            ("distlens_local_2stage_nocapture", {**local, "no_capture": True}),
            ("hf_generate", {"system": "hf_generate"}),
        ):
            r, _ = bench(label, "scaling_prompts", p, T=t, prompts=p, **job)
            r["note"] = f"T={t}; T column = prompts per batch"


def sweep_rows(cfg, tokenizer, hf, bench) -> list[dict]:
    """A steering sweep on one dataset's test items: M coefficients as a batch dimension in
    one pass, against one unsteered pass, one pass per coefficient, and the steering-vectors
    library (one pass per coefficient); answer-letter logits are compared like for like.
    Once per steered span (`sweep_positions`): `last` injects at the label position only (the
    paper's label-position steering; the prompt before it is computed once per item and
    shared by every coefficient), `all` at every position (the stage before the steered
    layer is shared)."""
    from pipelines.datasets import load_items, split_items
    from pipelines.prompts import choice_prompt

    _, test = split_items(load_items(sweep_dataset_path(cfg)), 0.5, 0)
    prompts = [choice_prompt(tokenizer, item) for item in test[: cfg.sweep_items]]
    vector = (np.random.default_rng(0).standard_normal(hf.hidden_size) * 4).astype(np.float32).tolist()
    job = dict(system="distlens", executor="local", stages=2, no_capture=True, prompt_list=[p.prefix for p in prompts],
               vector=vector, steer_layer=hf.num_hidden_layers // 2,
               score_ids=list(prompts[0].label_ids[:2]), T=1)  # fmt: skip
    rows = []
    unsteered, _ = bench("distlens_unsteered_pass", "sweep", 1, **{**job, "vector": None})
    for where in cfg.sweep_positions:
        job["steer_positions"] = where
        tag = {"steer_positions": where}
        for m in cfg.sweep_coefficients:
            coefs = [float(x) for x in np.linspace(-1.5, 1.5, m)] if m > 1 else [1.0]
            one, one_run = bench("distlens_sweep_one_pass", "sweep", m, coefficients=coefs, **job)
            one.update(tag)
            if "wall_s" in unsteered and "wall_s" in one:
                one["cost_vs_unsteered_pass"] = one["wall_s"] / unsteered["wall_s"]
            if m != max(cfg.sweep_coefficients):
                continue
            per = [bench(f"distlens_pass_coefficient_{c:+.1f}", "sweep", 1, coefficients=[c], **job)[0] for c in coefs]
            for r in per:
                r.update(tag)
            total = sum(r.get("wall_s", np.nan) for r in per)
            rows.append({"system": "distlens_one_pass_per_coefficient", "workload": "sweep", "T": m, "wall_s": total,
                         "cost_vs_unsteered_pass": total / unsteered.get("wall_s", np.nan), **tag})  # fmt: skip
            if "steering_vectors" in cfg.peers:
                sv, sv_run = bench("steering_vectors", "sweep", m, system="steering_vectors", coefficients=coefs,
                                   **{k: v for k, v in job.items() if k != "system"})  # fmt: skip
                sv.update(tag)
                if "wall_s" in sv and "wall_s" in unsteered:
                    sv["cost_vs_unsteered_pass"] = sv["wall_s"] / unsteered["wall_s"]
                sv.update(same_scores(sv_run, one_run))
    return rows


def write(rows, cfg, out_dir: Path) -> None:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}  # fmt: skip
    meta = {"machine": machine, "repeats": cfg.repeats, "model": cfg.model.name, "prompts": cfg.prompts,
            "workloads": list(cfg.workloads), "capture_rounds": cfg.capture_rounds,
            "warm_up": "each repeat is a fresh process; only generation is timed, after the model is loaded"}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {out_dir}/results.csv, results.json")
