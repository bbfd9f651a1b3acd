"""Figures of steering studies: propensity against coefficient (mean with its bootstrap 95%
band) and steerability by layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_propensity(result: dict, path: Path) -> Path:
    plt = pyplot()
    x = np.asarray(result["coefficients"])
    mean = np.asarray(result["mean_propensity"])
    band = np.asarray(result["mean_propensity_ci95"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.fill_between(x, band[:, 0], band[:, 1], alpha=0.25, label="bootstrap 95% CI")
    ax.plot(x, mean, marker="o", label=f"mean propensity (slope {result['slope_of_mean']:.3f})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("logit(matching) - logit(not matching)")
    ax.set_title(
        f"{result['dataset']}: layer {result['best_layer']} {result['site']}, {result['items']} test items", fontsize=9
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, save at 110 dpi and close `fig` (tokens in scripts the default font lacks draw as
    boxes: matplotlib's warning about them is left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return Path(path)


def plot_layers(by_layer: dict, best: int, dataset: str, path: Path) -> Path:
    plt = pyplot()
    layers = sorted(by_layer)
    slopes = [by_layer[layer]["mean_of_slopes"] for layer in layers]
    ci = np.asarray([by_layer[layer]["mean_of_slopes_ci95"] for layer in layers])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar(
        layers, slopes, yerr=[np.subtract(slopes, ci[:, 0]), np.subtract(ci[:, 1], slopes)], marker="o", capsize=3
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(best, color="tab:red", ls="--", lw=0.8, label=f"chosen: layer {best}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean per-example slope (train)")
    ax.set_title(f"{dataset}: steerability by layer", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
