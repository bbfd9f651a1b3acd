"""The transfer matrix of a steering study: every dataset's vector (at its own chosen layer) on
every dataset's test items. Per (source vector, target behaviour) cell, both steerability
definitions with bootstrap CIs, written as transfer.csv / transfer.json and drawn as a heatmap;
the diagonal is each dataset's own result. transfer.json also holds each source vector's steering
cost (KL and perplexity per coefficient on neutral prompts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipelines.plots import pyplot
from pipelines.steerability import steerability

FIELDS = (
    "source", "target", "source_layer", "mean_of_slopes", "mean_of_slopes_lo", "mean_of_slopes_hi", "slope_of_mean",
    "slope_of_mean_lo", "slope_of_mean_hi", "anti_steerable_fraction", "items",
)  # fmt: skip


def transfer_matrix(
    swept: dict, names: list[str], best: dict, coefficients, out_dir: Path, n_boot: int, seed: int, costs=None
):
    """`swept`: {(source, target): (propensity [items, coefficients], matching prob)}; `costs`:
    each source vector's steering cost (pipelines/steering_cost.py), the same whatever the target.
    Writes transfer.csv, transfer.json and transfer.png into `out_dir`; returns the json's content."""
    cells = []
    for source in names:
        for target in names:
            prop, prob = swept[(source, target)]
            r = steerability(coefficients, prop, prob, n_boot=n_boot, seed=seed)
            cells.append(
                {
                    "source": source, "target": target, "source_layer": int(best[source]),
                    "mean_of_slopes": r["mean_of_slopes"], "mean_of_slopes_lo": r["mean_of_slopes_ci95"][0],
                    "mean_of_slopes_hi": r["mean_of_slopes_ci95"][1], "slope_of_mean": r["slope_of_mean"],
                    "slope_of_mean_lo": r["slope_of_mean_ci95"][0], "slope_of_mean_hi": r["slope_of_mean_ci95"][1],
                    "anti_steerable_fraction": r["anti_steerable_fraction"], "items": r["items"],
                }
            )  # fmt: skip
    with open(out_dir / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(cells)
    result = {"datasets": names, "coefficients": list(map(float, coefficients)), "cells": cells}
    if costs:
        result["source_cost"] = {source: costs[source] for source in names}
    (out_dir / "transfer.json").write_text(json.dumps(result, indent=2))
    plot_transfer(result, out_dir / "transfer.png")
    return result


def plot_transfer(result: dict, path: Path, field: str = "mean_of_slopes") -> Path:
    """Heatmap, source vector (rows) x target behaviour (columns), of `field`; cells whose 95% CI
    excludes 0 are marked with a dot."""
    plt = pyplot()
    names = result["datasets"]
    n = len(names)
    grid = np.full((n, n), np.nan)
    sure = np.zeros((n, n), bool)
    for c in result["cells"]:
        i, j = names.index(c["source"]), names.index(c["target"])
        grid[i, j] = c[field]
        sure[i, j] = c[f"{field}_lo"] > 0 or c[f"{field}_hi"] < 0
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    size = 2.5 + 0.45 * n
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("target behaviour (test items)")
    ax.set_ylabel("source vector (its chosen layer)")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{grid[i, j]:.2f}" + (" •" if sure[i, j] else ""), ha="center", va="center", fontsize=5.5)
    fig.colorbar(image, ax=ax, label=f"{field.replace('_', ' ')} (• = 95% CI excludes 0)", shrink=0.8)
    ax.set_title("steering transfer: source vector x target behaviour", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
