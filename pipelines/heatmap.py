"""The lens heatmap: layers x positions, each cell the lens's (logit or tuned) top-1 token,
coloured by its probability. Built from the store's reader API, so the picture shows exactly what was stored."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from actors.store import LensStore


def token_label(tokenizer, token_id: int) -> str:
    if token_id < 0:
        return ""
    text = tokenizer.decode([int(token_id)]) if tokenizer is not None else str(int(token_id))
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 8 else text[:7] + "…"


def top1_labels(store: LensStore, prompt: int, tokenizer, max_positions: int, lens: str = "logit"):
    """(ids [layer, pos], probs [layer, pos], cell labels, x labels, first position) for the
    last `max_positions` positions of one prompt, as `lens` ("logit" or "tuned") reads them."""
    ids, probs = store.top1_table(prompt, lens=lens)
    first = max(0, ids.shape[1] - max_positions)
    ids, probs = ids[:, first:], probs[:, first:]
    labels = [[token_label(tokenizer, t) for t in row] for row in ids]
    tokens = store.tokens(prompt)
    x_labels = [f"{first + j}:{token_label(tokenizer, tokens[first + j])}" for j in range(ids.shape[1])]
    return ids, probs, labels, x_labels, first


def write_heatmap(
    store: LensStore, prompt: int, tokenizer, path: Path, max_positions: int = 32, lens: str = "logit"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, probs, labels, x_labels, _ = top1_labels(store, prompt, tokenizer, max_positions, lens)
    layers = store.layers
    n_layers, n_pos = ids.shape
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * n_pos + 2), max(4, 0.32 * n_layers + 2)))
    image = ax.imshow(np.nan_to_num(probs, nan=0.0), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for li in range(n_layers):
        for pj in range(n_pos):
            color = "black" if (probs[li, pj] or 0) > 0.6 else "white"
            ax.text(pj, li, labels[li][pj], ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(n_pos), x_labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n_layers), [str(layer) for layer in layers], fontsize=6)
    ax.set_xlabel("position: input token (the cell shows the lens's prediction of the next one)")
    ax.set_ylabel("layer (resid_post)")
    model = store.attrs.get("model", {}).get("name", "")
    ax.set_title(f"{lens} lens, top-1 token per layer — {model}, prompt {prompt}", fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 probability")
    with warnings.catch_warnings():  # tokens in scripts the default font lacks draw as boxes
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
