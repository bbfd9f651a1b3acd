"""trace.zarr, a causal trace's store, and its pictures: a heatmap per pair, the mean over pairs
and trace.html, a page that shows them beside the pairs.

Arrays (Zarr v3, one chunk per pair, shards of 64 pairs; NaN or -1 where a pair has fewer positions):
- `target_logprob`, `recovery`, `logit_diff` (pair, site, layer, position): the target's log-prob
  with the clean activation restored at that cell of the corrupted run; the normalised recovery
  `(patched - corrupt) / (clean - corrupt)` of that log-prob; target-minus-foil logit difference;
- `clean_logprob`, `corrupt_logprob`, `clean_logit_diff`, `corrupt_logit_diff` (pair);
- `clean_tokens`, `corrupt_tokens` (pair, position), `target_token`, `foil_token`, `prompt_length` (pair);
- `clean_text`, `corrupt_text`, `target_text`, `foil_text` (pair): the pairs as given;
- `done` (pair): written last for each pair, so a resumed trace skips exactly the pairs it holds;
- `site`, `layer`: the coordinates.
`attrs["complete"]` turns true only once every pair is in.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np

from actors.store import compressor
from pipelines.config import ConfigError

GRID = ("target_logprob", "recovery", "logit_diff")
PER_PAIR = ("clean_logprob", "corrupt_logprob", "clean_logit_diff", "corrupt_logit_diff")
SHARD = 64


class TraceStore:
    def __init__(self, group):
        self.group = group

    @classmethod
    def create(cls, path: Path, pairs, texts, sites, layers, attrs: dict) -> TraceStore:
        import zarr

        n, s, la = len(pairs), len(sites), len(layers)
        width = max(len(p.corrupt) for p in pairs)
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        shard = min(SHARD, n)

        def array(name, shape, dtype, fill, dims):
            chunks = (1, *shape[1:])
            g.create_array(
                name, shape=shape, chunks=chunks, shards=(shard, *shape[1:]), dtype=dtype, fill_value=fill,
                compressors=compressor(), dimension_names=dims,
            )  # fmt: skip

        for name in GRID:
            array(name, (n, s, la, width), "float32", np.nan, ["pair", "site", "layer", "position"])
        for name in PER_PAIR:
            array(name, (n,), "float32", np.nan, ["pair"])
        g.create_array(
            "clean_tokens", data=_tokens([p.clean for p in pairs], width), dimension_names=["pair", "position"]
        )
        g.create_array(
            "corrupt_tokens", data=_tokens([p.corrupt for p in pairs], width), dimension_names=["pair", "position"]
        )
        g.create_array("target_token", data=np.asarray([p.target for p in pairs], np.int32), dimension_names=["pair"])
        foils = [-1 if p.foil is None else p.foil for p in pairs]
        g.create_array("foil_token", data=np.asarray(foils, np.int32), dimension_names=["pair"])
        lengths = np.asarray([len(p.corrupt) for p in pairs], np.int32)
        g.create_array("prompt_length", data=lengths, dimension_names=["pair"])
        for name in ("clean", "corrupt", "target", "foil"):  # the pairs as given (a trace's pairs are few)
            values = np.asarray([t.get(name, "") for t in texts], dtype=str)
            g.create_array(f"{name}_text", data=values, dimension_names=["pair"])
        g.create_array("site", data=np.asarray(sites, dtype=str), dimension_names=["site"])
        g.create_array("layer", data=np.asarray(layers, np.int32), dimension_names=["layer"])
        array("done", (n,), "bool", False, ["pair"])
        g.attrs.update({**attrs, "complete": False})
        return cls(g)

    @classmethod
    def open(cls, path: Path, attrs: dict) -> TraceStore:
        """An existing trace to resume: refused when it was made with other pairs, sites, layers or model."""
        import zarr

        g = zarr.open_group(str(path), mode="r+", zarr_format=3)
        for key in ("model", "pairs", "sites", "layers"):
            if g.attrs.get(key) != attrs[key]:
                raise ConfigError(
                    f"resume=true: {path} was traced with {key}={g.attrs.get(key)!r}, this run has "
                    f"{attrs[key]!r}: resume with the same settings, or use overwrite=true"
                )
        return cls(g)

    @property
    def done(self) -> np.ndarray:
        return self.group["done"][:]

    def write(self, i: int, cell: dict) -> None:
        """Pair `i`'s cells (actors.tracing.InterventionRunner.trace_pair's result)."""
        target, foil = cell["target"], cell["foil"]
        (clean, clean_foil), (corrupt, corrupt_foil) = cell["clean"], cell["corrupt"]
        n_pos = target.shape[-1]
        g = self.group
        g["target_logprob"][i, :, :, :n_pos] = target
        with np.errstate(divide="ignore", invalid="ignore"):
            recovery = (target - corrupt) / (clean - corrupt) if clean != corrupt else np.full_like(target, np.nan)
        g["recovery"][i, :, :, :n_pos] = recovery
        g["clean_logprob"][i], g["corrupt_logprob"][i] = clean, corrupt
        if foil is not None:
            g["logit_diff"][i, :, :, :n_pos] = target - foil
            g["clean_logit_diff"][i], g["corrupt_logit_diff"][i] = clean - clean_foil, corrupt - corrupt_foil
        g["done"][i] = True

    def complete(self, summary: dict) -> None:
        self.group.attrs.update({"complete": True, "summary": summary})


def _tokens(rows, width: int) -> np.ndarray:
    out = np.full((len(rows), width), -1, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _label(tokenizer, token: int) -> str:
    from pipelines.heatmap import token_label

    return token_label(tokenizer, int(token))


def mean_from_end(grid: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[site, layer, width] the mean over pairs of `grid` [pair, site, layer, width], positions
    counted from each prompt's end (column -1 is every pair's last token), NaNs left out."""
    width = grid.shape[-1]
    aligned = np.full(grid.shape, np.nan, np.float32)
    for i, n in enumerate(lengths):
        aligned[i, :, :, width - n :] = grid[i, :, :, :n]
    with warnings.catch_warnings():  # a column no pair reaches stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aligned, axis=0)


def write_pictures(path: Path, out_dir: Path, tokenizer, max_pairs: int = 16) -> list[Path]:
    """trace_mean.png, trace_pair<i>.png (the first `max_pairs` pairs) and trace.html (`distlens view`
    on a trace folder writes them again)."""
    import zarr

    from pipelines.plots import pyplot, save_figure

    g = zarr.open_group(str(path), mode="r")
    plt = pyplot()
    sites, layers = [str(s) for s in g["site"][:]], g["layer"][:]
    lengths, recovery = g["prompt_length"][:], g["recovery"][:]
    written = []

    def figure(values, x_labels, title, name):
        fig, axes = plt.subplots(1, len(sites), figsize=(max(4.5, 0.45 * len(x_labels) + 2) * len(sites), 4.2))
        for ax, s in zip(np.atleast_1d(axes), range(len(sites))):
            image = ax.imshow(values[s], aspect="auto", origin="lower", cmap="magma", vmin=-0.2, vmax=1.0)
            ax.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=7)
            step = max(1, len(layers) // 15)
            ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]], fontsize=7)
            ax.set_xlabel("position (corrupted token; clean→corrupted where they differ)" if "pair" in name else
                          "position from the prompt's end")  # fmt: skip
            ax.set_ylabel("layer")
            ax.set_title(f"{sites[s]}", fontsize=9)
            fig.colorbar(image, ax=ax, label="recovery of the target's log-prob")
        fig.suptitle(title, fontsize=9)
        written.append(save_figure(fig, out_dir / name))

    width = recovery.shape[-1]
    figure(
        mean_from_end(recovery, lengths), [f"-{width - j}" for j in range(width)],
        f"mean recovery over {len(lengths)} pairs — {g.attrs.get('model', {}).get('name', '')}", "trace_mean.png",
    )  # fmt: skip
    clean_tokens, corrupt_tokens = g["clean_tokens"][:], g["corrupt_tokens"][:]
    for i in range(min(max_pairs, len(lengths))):
        n = int(lengths[i])
        labels = []
        for c, k in zip(clean_tokens[i, :n], corrupt_tokens[i, :n]):
            a, b = _label(tokenizer, c), _label(tokenizer, k)
            labels.append(b if c == k else f"{a}→{b}")
        target = _label(tokenizer, g["target_token"][i])
        figure(recovery[i, :, :, :n], labels, f"pair {i}: target {target!r}", f"trace_pair{i}.png")
    _page(g, out_dir, [p.name for p in written])
    return written


def _page(g, out_dir: Path, images: list[str]) -> None:
    """trace.html: the pairs with their clean and corrupted log-probs, then the heatmaps."""
    clean, corrupt = g["clean_logprob"][:], g["corrupt_logprob"][:]
    fields = ("clean", "corrupt", "target", "foil")
    texts = [dict(zip(fields, row)) for row in zip(*(g[f"{f}_text"][:].tolist() for f in fields))]
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(t['clean'])}</td><td>{html.escape(t['corrupt'])}</td>"
        f"<td>{html.escape(t['target'])}</td><td>{html.escape(t.get('foil', ''))}</td>"
        f"<td>{clean[i]:.3f}</td><td>{corrupt[i]:.3f}</td></tr>"
        for i, t in enumerate(texts)
    )
    figures = "".join(
        f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>' for name in images
    )
    model = html.escape(str(g.attrs.get("model", {}).get("name", "")))
    (out_dir / "trace.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>distlens causal trace</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style>"
        f"<h1>Causal trace — {model}</h1><p>Recovery = (patched − corrupt) / (clean − corrupt) of the "
        "target's log-prob, with the clean run's activation restored at one (site, layer, position) of the "
        "corrupted run.</p><table><tr><th>pair</th><th>clean</th><th>corrupt</th><th>target</th><th>foil</th>"
        f"<th>clean log-prob</th><th>corrupt log-prob</th></tr>{rows}</table>{figures}"
    )
