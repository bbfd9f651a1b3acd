"""The capture workload: what every layer's lens costs against plain generation, measured in
rounds in turn in one run (HF `generate`, distlens with its defaults, distlens with
`kl_to_final` off, nnsight), each system once per round in a fresh process, the order rotating
by one each round; each ratio is taken within a round, so a machine shared with other work
moves both sides of it."""

from __future__ import annotations

import numpy as np

from pipelines.bench.agreement import like_for_like

OURS = dict(system="distlens", executor="local", stages=2)
SYSTEMS = {  # label -> job; distlens's defaults include kl_to_final
    "hf_generate": {"system": "hf_generate"},
    "distlens_local_2stage": OURS,
    "distlens_local_2stage_kl_off": {**OURS, "kl_to_final": False},
    "nnsight": {"system": "nnsight"},
}


def order(labels: list[str], round_index: int) -> list[str]:
    """The systems of round `round_index`: the list rotated by one per round, so no system
    always runs first (or right after the same other)."""
    k = round_index % len(labels)
    return labels[k:] + labels[:k]


def ratios(runs: dict[str, list[dict]], label: str, against: str, key: str = "tokens_per_s") -> list[float]:
    """`label`'s `key` (tokens/s) over `against`'s, per round where both ran."""
    return [a[key] / b[key] for a, b in zip(runs[label], runs[against]) if key in a and key in b]


def spread(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {name: float(np.median(values)), f"{name}_min": min(values), f"{name}_max": max(values),
            f"{name}_rounds": values}  # fmt: skip


def capture_rows(cfg, measure, row, keep=None) -> list[dict]:
    """The workload's rows at T=`capture_size`: one per system over `capture_rounds` rounds
    (median and min-max of its figures), each with its per-round ratio to HF generate and
    distlens's to nnsight; nnsight is checked like for like against distlens. `measure(job)`
    is one measurement (a fresh process), `row(label, workload, T, runs)` a table row;
    `keep(rows)`, where given, gets the rows so far after every measurement."""
    labels = [x for x in SYSTEMS if x != "nnsight" or "nnsight" in cfg.peers]
    runs = {label: [] for label in labels}
    t = cfg.capture_size
    for i in range(cfg.capture_rounds):
        for label in order(labels, i):
            runs[label].append(measure({"T": t, **SYSTEMS[label]}))
            got = runs[label][-1]
            shown = f"error: {got['error']}" if "error" in got else f"{got['tokens_per_s']:.2f} tokens/s"
            print(f"{'capture':>12} T={t:<5} {label:<28} round {i + 1}: {shown}", flush=True)
            if keep:
                keep(summarise(t, runs, row))
    return summarise(t, runs, row)


def summarise(t: int, runs: dict[str, list[dict]], row) -> list[dict]:
    """The rows of the rounds measured so far (a ratio pairs the two systems' i-th rounds)."""
    labels = [label for label in runs if runs[label]]
    rows = []
    for label in labels:
        r = row(label, "capture", t, runs[label])
        if label != "hf_generate" and "hf_generate" in labels:
            r.update(spread("vs_hf_generate", ratios(runs, label, "hf_generate")))
        if label.startswith("distlens") and "nnsight" in labels:
            r.update(spread("vs_nnsight", ratios(runs, label, "nnsight")))
        if "vs_hf_generate" in r:
            r["note"] = f"{note(r, 'vs_hf_generate', 'HF generate')}; {len(runs['hf_generate'])} rounds in turn"
            if "vs_nnsight" in r:
                r["note"] += f"; {note(r, 'vs_nnsight', 'nnsight')}"
        rows.append(r)
    if "nnsight" in labels and "distlens_local_2stage" in labels:
        ours = next((x for x in runs["distlens_local_2stage"] if "error" not in x), None)
        peer = next((x for x in runs["nnsight"] if "error" not in x), None)
        if ours and peer:
            rows[labels.index("nnsight")].update(like_for_like(peer, ours))
    return rows


def note(r: dict, name: str, what: str) -> str:
    return f"{r[f'{name}_min']:.2f}-{r[f'{name}_max']:.2f}x {what} in the same round (median {r[name]:.2f}x)"
