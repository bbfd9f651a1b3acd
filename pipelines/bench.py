"""`python -m pipelines.bench`: distlens against plain generation, the paper's naive baseline
and the peers, measured side by side in one invocation on one machine, each measurement in a
fresh process so its peak memory is its own. Writes results.csv / results.json (one row per
system x workload x size: median and min/max over repeats), table.md and plots."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipelines.bench_worker import agreement
from pipelines.config import exit_with_error, register

register()
REPO = Path(__file__).resolve().parent.parent
METRICS = (
    "tokens_per_s", "wall_s", "peak_rss", "largest_process_rss", "bytes_written", "positions", "lens_ms_per_row",
    "gemm_gflops", "layers", "lens_share", "bytes_per_row", "compression", "lens_layers", "lens_components",
)  # fmt: skip


PEER_ENVS = {  # each peer runs from a virtual environment the harness makes; the project's stays as it is
    "peers": ["transformer-lens==4.3.0", "nnsight==0.8.1"],
    "steering_vectors": ["steering-vectors==0.12.2"],  # needs transformers<5: shadowed inside its venv only
}
# TransformerLens is measured three ways: its own generate with its KV cache (its default), the
# same without the cache, and the HF model's own generate before the bridge wraps it; then
# run_with_cache and the lens.
PEER_VARIANTS = {
    "transformer_lens": {
        "transformer_lens": {"tl_generate": "cached"},
        "transformer_lens_nocache": {"tl_generate": "nocache"},
        "transformer_lens_hf_generate": {"tl_generate": "hf"},
    }
}
PEER_SYSTEMS = {"nnsight": "peers", "transformer_lens": "peers", "steering_vectors": "steering_vectors"}


def peer_python(env: str) -> str:
    """Python of a peer's virtual environment (system site packages visible, pins on top),
    created on first use under the distlens cache."""
    from actors.checkpoint import cache_root

    venv = cache_root() / "bench-venvs" / env
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        print(f"[bench] creating {venv} with {PEER_ENVS[env]}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_ENVS[env]], check=True)
        (venv / ".installed").write_text("\n".join(PEER_ENVS[env]))
    return str(python)


def measure(job: dict, python: str = sys.executable) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run(
        [python, "-m", "pipelines.bench_worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["no output"]
        return {"error": lines[-1][:300]}
    return json.loads(line[len("BENCH_RESULT ") :])


def row(system: str, workload: str, size: int, runs: list[dict], **extra) -> dict:
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


def like_for_like(peer: dict, ours: dict | None) -> dict:
    """A peer's lens against ours on every position: the same tokens, top-1 agreement >= 99.9%
    and top-1 log-prob within 1e-4 where they agree; otherwise the row says it disagrees."""
    if not ours or "top1" not in peer or "top1" not in ours:
        return {}
    mine, theirs = ours.get("tokens"), peer.get("tokens")
    if mine != theirs:
        if not mine or not theirs:
            return {"like_for_like": "disagrees: generated other tokens"}
        common = min(len(mine), len(theirs))
        part = next((i for i in range(common) if mine[i] != theirs[i]), common)
        said = ""
        if "last_top2_logprob" in ours and 0 < part <= len(ours["last_top2_logprob"]):
            # how close distlens's (= HF's) own choice was there: a near-tie, or a clear token
            gap = ours["top1_logprob"][-1][part - 1] - ours["last_top2_logprob"][part - 1]
            said = f"; the top-2 log-prob gap there is {gap:.2g}"
        return {"like_for_like": f"disagrees: generated other tokens from position {part}{said}"}
    a, b = np.asarray(peer["top1"]), np.asarray(ours["top1"])
    n = min(a.shape[1], b.shape[1])
    same = a[:, :n] == b[:, :n]
    diff = np.abs(np.asarray(peer["top1_logprob"])[:, :n] - np.asarray(ours["top1_logprob"])[:, :n])[same]
    out = {"top1_agreement": float(same.mean()), "max_logprob_diff": float(diff.max(initial=0.0))}
    out["like_for_like"] = "ok" if out["top1_agreement"] >= 0.999 and out["max_logprob_diff"] <= 1e-4 else "disagrees"
    return out


def run(cfg: DictConfig, out_dir: Path) -> list[dict]:
    from actors.checkpoint import resolve_checkpoint
    from actors.prompting import encode_prompt

    checkpoint = resolve_checkpoint(cfg.model.name, cfg.model.revision)
    tokenizer = checkpoint.tokenizer()
    prompt = encode_prompt(tokenizer, cfg.prompt)
    hf = checkpoint.config()
    check_config(cfg, hf.num_hidden_layers, len(prompt))
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    base = {"model_path": str(checkpoint.path), "prompt": prompt, "prompts": cfg.prompts, "scratch": str(scratch)}
    rows = []

    def bench(label, workload, size, repeats=None, **job):
        python = sys.executable
        if job["system"] in PEER_SYSTEMS:
            try:
                python = peer_python(PEER_SYSTEMS[job["system"]])
            except subprocess.CalledProcessError as err:
                runs = [{"error": f"could not install {PEER_ENVS[PEER_SYSTEMS[job['system']]]}: {err}"}]
                rows.append(row(label, workload, size, runs))
                return rows[-1], runs[0]
        # job["T"], where given, is the tokens generated (a sweep's size is its coefficients)
        runs = [measure({**base, "T": size, **job}, python) for _ in range(repeats or cfg.repeats)]
        r = row(label, workload, size, runs, **{k: v for k, v in job.items() if k in ("stages", "executor")})
        rows.append(r)
        # every row as it is measured: a run that stops later keeps what it measured
        (out_dir / "results.partial.json").write_text(json.dumps({"rows": rows}, indent=2))
        if "error" in r:
            shown = f"error: {r['error']}"
        elif workload == "sweep":
            shown = f"{r['wall_s']:.3f} s"
        elif workload == "lens_floor":
            shown = f"{r['lens_ms_per_row']:.3f} ms per (position, layer); GEMM {r['gemm_gflops']:.0f} GFLOP/s"
        else:
            shown = f"{r['tokens_per_s']:.2f} tokens/s"
        print(f"{workload:>12} T={size:<5} {label:<28} {shown}", flush=True)
        return r, runs[0]

    if cfg.lens_floor:  # the exact lens's own cost here: a ceiling on any system's capture throughput
        floor, _ = bench("lens_floor", "lens_floor", 0, system="lens_floor")
        floor["prompt_tokens"] = len(prompt)
    long_t = cfg.long_size - len(prompt) if cfg.long_size else None
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
    for size in cfg.sizes:
        workload = "trajectory"
        bench("hf_generate", workload, size, system="hf_generate")
        ours = {}
        for stages in cfg.stages:
            _, ours[f"distlens_local_{stages}stage"] = bench(
                f"distlens_local_{stages}stage", workload, size, system="distlens", executor="local", stages=stages
            )
        for stages in cfg.ray_stages:
            _, ours[f"distlens_ray_{stages}stage"] = bench(
                f"distlens_ray_{stages}stage", workload, size, system="distlens", executor="ray", stages=stages
            )
        for peer in cfg.peers:
            if peer == "steering_vectors":
                continue  # a steering peer: measured in the sweep workload
            for label, extra in PEER_VARIANTS.get(peer, {peer: {}}).items():
                # like the baseline, a variant without a KV cache takes minutes at the larger sizes
                reps = 1 if extra.get("tl_generate") == "nocache" and size > min(cfg.sizes) else None
                peer_row, peer_run = bench(label, workload, size, repeats=reps, system=peer, **extra)
                peer_row.update(like_for_like(peer_run, ours.get("distlens_local_2stage")))
        nocap, _ = bench(
            "distlens_local_2stage_nocapture",
            workload,
            size,
            system="distlens",
            executor="local",
            stages=2,
            no_capture=True,
        )
        if size <= cfg.baseline_max:
            reps = 1 if size > min(cfg.sizes) else None  # the baseline's larger sizes take minutes each
            base_row, base_run = bench("paper_baseline", workload, size, repeats=reps, system="paper_baseline")
            base_nocap, _ = bench(
                "paper_baseline_nocapture", workload, size, repeats=reps, system="paper_baseline", no_capture=True
            )
            for r in rows:
                if r["workload"] == workload and r["T"] == size and r["system"] in ours:
                    r.update(agreement(ours[r["system"]], base_run, len(prompt)))
            if "peak_rss" in base_row and "peak_rss" in base_nocap:
                base_row["capture_memory"] = base_row["peak_rss"] - base_nocap["peak_rss"]
        for r in rows:
            if (
                r["workload"] == workload
                and r["T"] == size
                and r["system"] == "distlens_local_2stage"
                and "peak_rss" in r
                and "peak_rss" in nocap
            ):
                r["capture_memory"] = r["peak_rss"] - nocap["peak_rss"]
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
    scaling_rows(cfg, hf, bench)
    rows += sweep_rows(cfg, base, tokenizer, hf, bench)
    write(rows, cfg, out_dir)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    report(rows, out_dir)
    return rows


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


def check_config(cfg, n_layers: int, prompt_len: int) -> None:
    """Refuse settings the workloads cannot run, naming the value and what is valid, before
    anything is measured."""
    from actors.stage import COMPONENTS
    from pipelines.config import ConfigError, _at_least, _choice

    try:
        if not cfg.sizes:
            raise ConfigError("sizes=[] is empty: give the trajectory's generated tokens T, e.g. sizes=[64,256]")
        for name in ("sizes", "stages", "ray_stages", "scaling_prompts", "sweep_coefficients", "long_prompts"):
            for value in cfg[name]:
                _at_least(name, value, 1)
        for name in ("scaling_size", "repeats", "prompts", "sweep_items"):
            _at_least(name, cfg[name], 1)
        if cfg.long_size is not None and cfg.long_size <= prompt_len:
            raise ConfigError(
                f"long_size={cfg.long_size} is out of range: positions must exceed the prompt's {prompt_len} "
                "(or long_size=null to skip the long trajectory)"
            )
        for value in cfg.sweep_positions:
            _choice("sweep_positions", value, ("last", "all"))
        for value in cfg.scaling_layers:
            if not 1 <= value <= n_layers:
                raise ConfigError(f"scaling_layers={value!r} is out of range: layers captured must be 1..{n_layers}")
        for value in cfg.components:
            _choice("components", value, COMPONENTS)
        if cfg.sweep_coefficients:
            path = sweep_dataset_path(cfg)
            if not path.is_file():
                raise ConfigError(
                    f"sweep_dataset={cfg.sweep_dataset!r}: {path} does not exist; set data_root (or "
                    "$DISTLENS_MWE_DIR) to the directory of the A/B datasets, or sweep_coefficients=[] to skip the sweep"
                )
    except ConfigError as err:
        exit_with_error(str(err))


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


def sweep_dataset_path(cfg) -> Path:
    """The A/B dataset the sweep workload scores (checked before anything is measured)."""
    from pipelines.steer import dataset_root

    return dataset_root(cfg.data_root) / f"{cfg.sweep_dataset}.jsonl"


def sweep_rows(cfg, base, tokenizer, hf, bench) -> list[dict]:
    """(e) A steering sweep on one dataset's test items: M coefficients as a batch dimension in
    one pass, against one unsteered pass, one pass per coefficient, and the steering-vectors
    library (one pass per coefficient); answer-letter logits are compared like for like.
    Once per steered span (`sweep_positions`): `last` injects at the label position only (the
    paper's label-position steering; the prompt before it is computed once per item and
    shared by every coefficient), `all` at every position (the stage before the steered
    layer is shared)."""
    from actors.mwe import load_items, split_items
    from actors.steering import ab_prompt

    _, test = split_items(load_items(sweep_dataset_path(cfg)), 0.5, 0)
    ab = [ab_prompt(tokenizer, item) for item in test[: cfg.sweep_items]]
    vector = (np.random.default_rng(0).standard_normal(hf.hidden_size) * 4).astype(np.float32).tolist()
    job = dict(system="distlens", executor="local", stages=2, no_capture=True, prompt_list=[p.prefix for p in ab],
               vector=vector, steer_layer=hf.num_hidden_layers // 2,
               score_ids=[ab[0].letters["A"], ab[0].letters["B"]], T=1)  # fmt: skip
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
                if "scores" in sv_run and "scores" in one_run:
                    diff = float(np.abs(np.asarray(sv_run["scores"]) - np.asarray(one_run["scores"])).max())
                    sv["max_score_diff_vs_distlens"] = diff
                    sv["like_for_like"] = "ok" if diff <= 1e-3 else "disagrees"
    return rows


def write(rows, cfg, out_dir: Path) -> None:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}  # fmt: skip
    meta = {"machine": machine, "repeats": cfg.repeats, "model": cfg.model.name, "prompts": cfg.prompts,
            "warm_up": "each repeat is a fresh process; only generation is timed, after the model is loaded"}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {out_dir}/results.csv, results.json")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets as ratios from this run's rows, each saying met or missed."""

    def find(system, workload="trajectory", size=None):
        for r in rows:
            if r["system"] == system and r["workload"] == workload and (size is None or r["T"] == size):
                return r
        return {}

    out = ["| target | measured | verdict |", "|---|---|---|"]
    base_sizes = sorted(
        r["T"]
        for r in rows
        if r["system"] == "paper_baseline" and r["workload"] == "trajectory" and "tokens_per_s" in r
    )
    if base_sizes:
        t = base_sizes[-1]
        ours, base = find("distlens_local_2stage", size=t), find("paper_baseline", size=t)
        if "tokens_per_s" in ours:
            ratio = ours["tokens_per_s"] / base["tokens_per_s"]
            out.append(
                f"| throughput >= 41x the paper's baseline (T={t}) | {ratio:.1f}x | {'met' if ratio >= 41 else 'MISSED'} |"
            )
        floor = find("lens_floor", "lens_floor")
        if "lens_ms_per_row" in floor and "tokens_per_s" in base:
            # The baseline projects each generated position once (L rows per token); distlens also
            # projects the prompt's positions, (T + prompt) / T as many. The ceilings count only the
            # baseline's own work, so they favour a system that did less than distlens does.
            per_token = floor["layers"] * floor["lens_ms_per_row"] / 1e3
            ceiling = 1 / per_token
            out.append(
                f"| ceiling set by the exact lens alone (T={t}; generated positions only, as the baseline; model "
                f"cost not counted) | {ceiling:.1f} tokens/s = {ceiling / base['tokens_per_s']:.1f}x the baseline "
                f"| {'the lens alone does not rule 41x out' if ceiling >= 41 * base['tokens_per_s'] else '41x NOT reachable on this machine'} |"
            )
            nocap = find("distlens_local_2stage_nocapture", size=t)
            if "tokens_per_s" in nocap:
                # The same lens plus a forward pass at the fastest this run measured (distlens without capture).
                both = 1 / (per_token + 1 / nocap["tokens_per_s"])
                share = (
                    f"; distlens (prompt positions too) runs at {ours['tokens_per_s'] / both:.0%} of it"
                    if "tokens_per_s" in ours
                    else ""
                )
                out.append(
                    f"| ceiling with the forward's cost too (T={t}; that lens + distlens's forward without capture) "
                    f"| {both:.1f} tokens/s = {both / base['tokens_per_s']:.1f}x the baseline{share} "
                    f"| {'41x reachable' if both >= 41 * base['tokens_per_s'] else '41x NOT reachable with this forward'} |"
                )
        if ours.get("capture_memory") and base.get("capture_memory"):
            mem = base["capture_memory"] / max(ours["capture_memory"], 1)
            out.append(
                f"| capture memory >= 7x lower than the baseline's (T={t}) | {mem:.1f}x lower | {'met' if mem >= 7 else 'MISSED'} |"
            )
    out += long_targets(rows)
    for t in sorted({r["T"] for r in rows if r["workload"] == "trajectory"}):
        ours, plain = find("distlens_local_2stage", size=t), find("hf_generate", size=t)
        if "tokens_per_s" in ours and "tokens_per_s" in plain:
            ratio = ours["tokens_per_s"] / plain["tokens_per_s"]
            out.append(
                f"| all-layer capture keeps >= 0.5x plain generation (T={t}) | {ratio:.2f}x | {'met' if ratio >= 0.5 else 'MISSED'} |"
            )
            own = find("distlens_local_2stage_nocapture", size=t)
            if "tokens_per_s" in own:  # the same engine without capture: what capture itself costs
                ratio = ours["tokens_per_s"] / own["tokens_per_s"]
                out.append(
                    f"| all-layer capture keeps >= 0.5x distlens's own generation without capture (T={t}) "
                    f"| {ratio:.2f}x | {'met' if ratio >= 0.5 else 'MISSED'} |"
                )
        for peer in ("nnsight", "transformer_lens"):
            # the peer's fastest way that does the same work (like for like), else its default
            ways = [r for r in rows if r["workload"] == "trajectory" and r["T"] == t and "tokens_per_s" in r]
            ways = [r for r in ways if r["system"] == peer or r["system"].startswith(peer + "_")]
            same = [r for r in ways if r.get("like_for_like") == "ok"]
            p = max(same, key=lambda r: r["tokens_per_s"]) if same else find(peer, size=t)
            if "tokens_per_s" in ours and "tokens_per_s" in p:
                ratio = ours["tokens_per_s"] / p["tokens_per_s"]
                agree = p.get("like_for_like", "unchecked")
                verdict = ("met" if ratio > 1 else "MISSED") if agree == "ok" else "not comparable: the peer disagrees"
                out.append(f"| faster than {p['system']} (T={t}; like for like: {agree}) | {ratio:.2f}x | {verdict} |")
            elif p.get("error"):
                out.append(f"| faster than {peer} (T={t}) | did not run: {p['error']} | MISSED |")
    sweeps = [r for r in rows if r["system"] == "distlens_sweep_one_pass" and "cost_vs_unsteered_pass" in r]
    for where in dict.fromkeys(r.get("steer_positions", "all") for r in sweeps):
        r = max((x for x in sweeps if x.get("steer_positions", "all") == where), key=lambda x: x["T"])
        verdict = "met" if r["cost_vs_unsteered_pass"] <= 2 else "MISSED"
        out.append(
            f"| {r['T']}-coefficient sweep <= 2x one unsteered pass (steering positions: {where}) "
            f"| {r['cost_vs_unsteered_pass']:.2f}x | {verdict} |"
        )
    return out


def long_targets(rows: list[dict]) -> list[str]:
    """The throughput and memory targets at the long trajectory, where the baseline was measured
    (not extrapolated): the largest T it was measured at. One row per distlens batch size; the
    baseline runs prompts one at a time (batched, it would keep every prompt's softmaxes at
    once), so its tokens/s is the same for any number of prompts."""
    base = next(
        (r for r in rows if r["system"] == "paper_baseline" and r["workload"].endswith("pos")
         and not r.get("extrapolated") and "tokens_per_s" in r),
        None,
    )  # fmt: skip
    if base is None:
        return []
    out = []
    t, workload = base["T"], base["workload"]
    ours = [
        r for r in rows if r["workload"] == workload and r["system"].startswith("distlens_") and "tokens_per_s" in r
    ]
    for r in sorted(ours, key=lambda r: r.get("prompts", 1)):
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        p = r.get("prompts", 1)
        batch = "one prompt" if p == 1 else f"{p} prompts in one batch, the baseline's one at a time"
        out.append(
            f"| throughput >= 41x the paper's baseline ({workload}, T={t}, the largest T it was measured at; {batch}) "
            f"| {ratio:.1f}x | {'met' if ratio >= 41 else 'MISSED'} |"
        )
        if p == 1 and r.get("capture_memory") and base.get("capture_memory"):
            mem = base["capture_memory"] / r["capture_memory"]
            out.append(
                f"| capture memory >= 7x lower than the baseline's ({workload}, T={t}; peak RSS above the process "
                f"before generating, distlens's with its model) | {mem:.1f}x lower | {'met' if mem >= 7 else 'MISSED'} |"
            )
    return out


def _mib(x) -> str:
    return f"{x / 2**20:,.0f}" if isinstance(x, float | int) and np.isfinite(x) else ""


def report(rows: list[dict], out_dir: Path) -> None:
    """table.md (every row) and the three plots."""
    from pipelines.plots import _pyplot

    lines = [
        "| workload | T | system | tokens/s (median, min-max) | wall s | peak RSS MiB (sum) | largest process MiB "
        "| capture memory MiB | lens share | bytes per row (compression) | like for like | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = (
            f"{r['tokens_per_s']:.2f} ({r.get('tokens_per_s_min', r['tokens_per_s']):.2f}-{r.get('tokens_per_s_max', r['tokens_per_s']):.2f})"
            if "tokens_per_s" in r and r["workload"] != "sweep"
            else ""
        )
        agree = r.get("like_for_like") or (
            f"top-1 {r['top1_agreement']:.4f}, dlogp {r['max_logprob_diff']:.1e}" if "top1_agreement" in r else ""
        )
        if "lens_ms_per_row" in r:
            r = {
                **r,
                "note": f"{r['lens_ms_per_row']:.3f} ms per (position, layer); fp32 GEMM {r['gemm_gflops']:.0f} GFLOP/s",
            }
        note = (
            r.get("error")
            or r.get("note")
            or (f"{r['cost_vs_unsteered_pass']:.2f}x one unsteered pass" if "cost_vs_unsteered_pass" in r else "")
        )
        if r.get("extrapolated"):
            note = "EXTRAPOLATED: " + note
        wall = f"{r['wall_s']:.2f}" if "wall_s" in r else ""
        system = r["system"] + (f" (steer {r['steer_positions']})" if "steer_positions" in r else "")
        share = f"{r['lens_share']:.0%}" if "lens_share" in r else ""
        stored = f"{r['bytes_per_row']:.1f} ({r['compression']:.1f}x)" if "bytes_per_row" in r else ""
        lines.append(
            f"| {r['workload']} | {r['T']} | {system} | {tps} | {wall} | {_mib(r.get('peak_rss'))} "
            f"| {_mib(r.get('largest_process_rss', r.get('peak_rss')))} | {_mib(r.get('capture_memory'))} "
            f"| {share} | {stored} | {agree} | {note} |"
        )
    lines += ["", *targets(rows)]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    plt = _pyplot()
    traj = [r for r in rows if re.fullmatch(r"trajectory(_\d+pos)?", r["workload"]) and "tokens_per_s" in r]
    for metric, name, ylabel, log in (
        ("tokens_per_s", "throughput_vs_T.png", "generated tokens / s", True),
        ("peak_rss", "memory_vs_T.png", "peak RSS (MiB, all processes)", False),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        colors = plt.get_cmap("tab20").colors  # more systems than the default ten colours
        for i, system in enumerate(dict.fromkeys(r["system"] for r in traj)):
            pts = sorted(
                (r["T"], r[metric] / (2**20 if metric == "peak_rss" else 1))
                for r in traj
                if r["system"] == system and metric in r
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="osD^v<>"[i % 7],
                    color=colors[i % len(colors)],
                    ls="--" if any(r.get("extrapolated") for r in traj if r["system"] == system) else "-",
                    label=system,
                )
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("generated tokens T")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for where in dict.fromkeys(r.get("steer_positions", "all") for r in rows if r["workload"] == "sweep"):
        mine = [r for r in rows if r.get("steer_positions", "all") == where and "cost_vs_unsteered_pass" in r]
        sweep = sorted((r["T"], r["cost_vs_unsteered_pass"]) for r in mine if r["system"] == "distlens_sweep_one_pass")
        per = [
            (r["T"], r["cost_vs_unsteered_pass"]) for r in mine if r["system"] == "distlens_one_pass_per_coefficient"
        ]
        if sweep:
            ax.plot(*zip(*sweep), marker="o", label=f"distlens, one pass (steer {where})")
        if per:
            ax.plot(*zip(*per), marker="s", ls="", label=f"one pass per coefficient (steer {where})")
    ax.set_xlabel("coefficients M")
    ax.set_ylabel("cost / one unsteered pass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep_cost.png", dpi=110)
    plt.close(fig)
    scaling_plot(rows, out_dir / "scaling.png", plt)


def scaling_plot(rows: list[dict], path: Path, plt) -> None:
    """Throughput against layers captured, against pipeline stages (largest trajectory T) and
    against prompts per batch, side by side; a panel with no rows says so."""
    ok = [r for r in rows if "tokens_per_s" in r]
    biggest = max((r["T"] for r in ok if r["workload"] == "trajectory"), default=None)
    stage_pts = {}
    for r in ok:
        if r["workload"] == "trajectory" and r["T"] == biggest and "stages" in r and "nocapture" not in r["system"]:
            stage_pts.setdefault(f"distlens {r.get('executor', '')}", []).append((r["stages"], r["tokens_per_s"]))
    panels = (
        ("layers captured", {"distlens local 2 stages": [(r["T"], r["tokens_per_s"]) for r in ok
                                                         if r["workload"] == "scaling_layers"]}),
        (f"pipeline stages (T={biggest})", stage_pts),
        ("prompts per batch", {s: [(r["T"], r["tokens_per_s"]) for r in ok
                                   if r["workload"] == "scaling_prompts" and r["system"] == s]
                               for s in dict.fromkeys(r["system"] for r in ok if r["workload"] == "scaling_prompts")}),
    )  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (xlabel, series) in zip(axes, panels):
        for label, pts in series.items():
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        if not any(series.values()):
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="bench")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.report_only:  # table.md and plots again from this run's results.json, nothing measured
        results = out_dir / "results.json"
        if not results.exists():
            exit_with_error(f"report_only=true: {results} does not exist; run the benchmark first")
        rows = json.loads(results.read_text())["rows"]
        report(rows, out_dir)
        print(f"report: {out_dir}/table.md")
        return rows
    return run(cfg, out_dir)


if __name__ == "__main__":
    from pipelines.config import BenchConf, check_overrides

    check_overrides(BenchConf)
    main()
